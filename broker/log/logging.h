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

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

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

// Log lines of helper threads, said later on the thread that owns them: the
// public API calls a log callback on the caller's thread only, and a helper
// thread has no target of its own (its warnings would reach stderr past -q
// and a library's host). A helper thread keeps Capture() in scope; the owner
// calls Relay() where it may log. At most kMaxLines wait; later ones are
// counted and said as one line.
class LogRelay {
 public:
  static constexpr size_t kMaxLines = 1000;

  LogTarget Capture();
  // On the owner's thread: every queued line, through the same component
  // loggers (so the owner's target filters them). Cheap when none wait.
  void Relay();

 private:
  struct Line {
    spdlog::level::level_enum level;
    std::string component;
    std::string message;
  };
  std::mutex mu_;
  std::vector<Line> lines_;
  size_t dropped_ = 0;
  std::atomic<bool> pending_{false};
};

}  // namespace layerx::broker
