// broker/log: the component loggers and per-thread log targets every broker
// folder logs through. May use: no other broker folder (spdlog only).
//
// Component loggers: `broker`, `sandbox`, `extractor`, `ext4`. Their sink sends
// each line to the log target of the thread that logged it (a LogTarget in
// scope: one per extraction, so concurrent extractions in one process each get
// their own lines), or, with none in scope, to stderr at warn and above.
// Synchronous only: async loggers break across fork (spdlog#748).
#pragma once

#include <spdlog/spdlog.h>

#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace layerx::broker {

std::shared_ptr<spdlog::logger> Logger(const std::string& name);

using LogFunction = std::function<void(spdlog::level::level_enum level, std::string_view component,
                                       std::string_view message)>;

// While in scope, this thread's log lines at `level` and above go to `fn` (none
// when `fn` is empty). Nests: the previous target comes back at scope exit.
class LogTarget {
 public:
  LogTarget(LogFunction fn, spdlog::level::level_enum level);
  ~LogTarget();
  LogTarget(const LogTarget&) = delete;
  LogTarget& operator=(const LogTarget&) = delete;

  const LogFunction& fn() const { return fn_; }
  spdlog::level::level_enum level() const { return level_; }

 private:
  LogFunction fn_;
  spdlog::level::level_enum level_;
  const LogTarget* previous_;
};

}  // namespace layerx::broker
