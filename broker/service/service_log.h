// The service's log lines, for the operator: text "tenant=ci job=12 message",
// or one JSON object a line (log_format = "json"), through ServeOptions::log.
#pragma once

#include <cstdint>
#include <string_view>

#include "layerx/layerx.hpp"

namespace layerx::serve {

class ServiceLog {
 public:
  // `options` must outlive the log.
  ServiceLog(const ServeOptions& options, bool json) : options_(options), json_(json) {}
  // Callable from any thread (the workers' lines come through it).
  void operator()(LogLevel level, std::string_view component, std::string_view tenant,
                  uint64_t job, std::string_view message) const;

 private:
  const ServeOptions& options_;
  bool json_;
};

}  // namespace layerx::serve
