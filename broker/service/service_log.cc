#include "broker/service/service_log.h"

#include <fmt/format.h>
#include <time.h>

#include <nlohmann/json.hpp>
#include <string>

namespace layerx::serve {

namespace {

std::string JsonEscape(std::string_view text) {
  return nlohmann::json(std::string(text))
      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace

void ServiceLog::operator()(LogLevel level, std::string_view component, std::string_view tenant,
                            uint64_t job, std::string_view message) const {
  if (!options_.log || level < options_.min_log_level) return;
  std::string line;
  if (json_) {
    static const char* const kLevels[] = {"", "debug", "info", "warn", "error"};
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    line = fmt::format("{{\"ts\":{}.{:03},\"level\":\"{}\",\"component\":{}", ts.tv_sec,
                       ts.tv_nsec / 1'000'000, kLevels[static_cast<int>(level)],
                       JsonEscape(component));
    if (!tenant.empty()) line += fmt::format(",\"tenant\":{}", JsonEscape(tenant));
    if (job != 0) line += fmt::format(",\"job\":{}", job);
    line += fmt::format(",\"msg\":{}}}", JsonEscape(message));
  } else {
    if (!tenant.empty()) line += fmt::format("tenant={} ", tenant);
    if (job != 0) line += fmt::format("job={} ", job);
    line += message;
  }
  options_.log(level, component, line);
}

}  // namespace layerx::serve
