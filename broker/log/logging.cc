#include "broker/log/logging.h"

#include <spdlog/sinks/base_sink.h>

#include <cstdio>
#include <map>

namespace layerx::broker {

namespace {

thread_local const LogTarget* t_target = nullptr;

// Formats nothing itself: the message goes to the logging thread's target as
// it is, the level and component beside it.
class DispatchSink final : public spdlog::sinks::base_sink<spdlog::details::null_mutex> {
 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    std::string_view component(msg.logger_name.data(), msg.logger_name.size());
    std::string_view text(msg.payload.data(), msg.payload.size());
    if (t_target != nullptr) {
      if (t_target->fn() && msg.level >= t_target->level())
        t_target->fn()(msg.level, component, text);
      return;
    }
    if (msg.level >= spdlog::level::warn) {
      auto level = spdlog::level::to_string_view(msg.level);
      std::fprintf(stderr, "%.*s %.*s: %.*s\n", static_cast<int>(level.size()), level.data(),
                   static_cast<int>(component.size()), component.data(),
                   static_cast<int>(text.size()), text.data());
    }
  }
  void flush_() override {}
};

}  // namespace

std::shared_ptr<spdlog::logger> Logger(const std::string& name) {
  // Made once, never registered with spdlog's global registry (whose default
  // logger a host program may own); the sink holds no state, so no lock.
  static const auto loggers = [] {
    auto sink = std::make_shared<DispatchSink>();
    std::map<std::string, std::shared_ptr<spdlog::logger>> made;
    for (const char* component : {"broker", "sandbox", "extractor", "ext4"}) {
      auto logger = std::make_shared<spdlog::logger>(component, sink);
      logger->set_level(spdlog::level::debug);  // each target filters for itself
      made.emplace(component, std::move(logger));
    }
    return made;
  }();
  auto it = loggers.find(name);
  return it != loggers.end() ? it->second : loggers.at("broker");
}

LogTarget::LogTarget(LogFunction fn, spdlog::level::level_enum level)
    : fn_(std::move(fn)), level_(level), previous_(t_target) {
  t_target = this;
}

LogTarget::~LogTarget() { t_target = previous_; }

LogTarget LogRelay::Capture() {
  return LogTarget(
      [this](spdlog::level::level_enum level, std::string_view component,
             std::string_view message) {
        std::lock_guard lock(mu_);
        if (lines_.size() >= kMaxLines) {
          ++dropped_;
        } else {
          lines_.push_back({level, std::string(component), std::string(message)});
        }
        pending_.store(true, std::memory_order_release);
      },
      spdlog::level::trace);
}

void LogRelay::Relay() {
  if (!pending_.load(std::memory_order_acquire)) return;
  std::vector<Line> lines;
  size_t dropped = 0;
  {
    std::lock_guard lock(mu_);
    lines.swap(lines_);
    std::swap(dropped, dropped_);
    pending_.store(false, std::memory_order_relaxed);
  }
  for (const Line& line : lines) Logger(line.component)->log(line.level, "{}", line.message);
  if (dropped > 0)
    Logger("broker")->warn("log relay: dropped={} (lines of helper threads past the queue)",
                           dropped);
}

}  // namespace layerx::broker
