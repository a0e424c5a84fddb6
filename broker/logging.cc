#include "broker/logging.h"

#include <spdlog/sinks/stdout_color_sinks.h>

namespace layerx::broker {

std::shared_ptr<spdlog::logger> Logger(const std::string& name) {
  if (auto logger = spdlog::get(name)) return logger;
  return spdlog::default_logger();
}

void SetUpLogging(spdlog::level::level_enum level) {
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  sink->set_pattern("%^%l%$ %n: %v");
  for (const char* name : {"broker", "sandbox", "extractor", "ext4"}) {
    if (spdlog::get(name)) continue;
    auto logger = std::make_shared<spdlog::logger>(name, sink);
    logger->set_level(level);
    spdlog::register_logger(logger);
  }
  spdlog::set_default_logger(spdlog::get("broker"));
}

}  // namespace layerx::broker
