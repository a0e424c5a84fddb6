// broker/log: per-thread targets and the relay of helper threads' lines.
#include "broker/log/logging.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

namespace layerx::broker {
namespace {

struct Seen {
  std::thread::id thread;
  spdlog::level::level_enum level;
  std::string component, message;
};

// What lands on this thread's target, at `level` and above.
class Collect {
 public:
  explicit Collect(spdlog::level::level_enum level)
      : target_(
            [this](spdlog::level::level_enum l, std::string_view c, std::string_view m) {
              seen.push_back({std::this_thread::get_id(), l, std::string(c), std::string(m)});
            },
            level) {}
  std::vector<Seen> seen;

 private:
  LogTarget target_;
};

// Lines a helper thread logs reach the owner's target only when the owner
// relays them, on the owner's thread, filtered by the owner's level, in order.
TEST(LogRelayTest, HelperLinesAreSaidOnTheOwnersThreadWhenRelayed) {
  Collect owner(spdlog::level::info);
  LogRelay relay;
  std::thread helper([&relay] {
    LogTarget captured = relay.Capture();
    Logger("broker")->debug("below the owner's level");
    Logger("broker")->info("registry retry: one");
    Logger("ext4")->warn("two");
  });
  helper.join();
  EXPECT_TRUE(owner.seen.empty()) << "said before Relay()";
  relay.Relay();
  ASSERT_EQ(owner.seen.size(), 2u);
  for (const Seen& s : owner.seen) EXPECT_EQ(s.thread, std::this_thread::get_id());
  EXPECT_EQ(owner.seen[0].message, "registry retry: one");
  EXPECT_EQ(owner.seen[0].level, spdlog::level::info);
  EXPECT_EQ(owner.seen[1].component, "ext4");
  EXPECT_EQ(owner.seen[1].level, spdlog::level::warn);
  relay.Relay();
  EXPECT_EQ(owner.seen.size(), 2u) << "a line said twice";
}

// A helper that logs without end cannot grow the queue without bound: past
// kMaxLines, one line says how many were dropped.
TEST(LogRelayTest, TheQueueIsBounded) {
  Collect owner(spdlog::level::trace);
  LogRelay relay;
  std::thread helper([&relay] {
    LogTarget captured = relay.Capture();
    for (size_t i = 0; i < LogRelay::kMaxLines + 5; ++i) Logger("broker")->info("line {}", i);
  });
  helper.join();
  relay.Relay();
  ASSERT_EQ(owner.seen.size(), LogRelay::kMaxLines + 1);
  EXPECT_EQ(owner.seen.back().message,
            "log relay: dropped=5 (lines of helper threads past the queue)");
}

// Without a target, a thread's warnings go to stderr; a captured helper's
// never do, however loud (a library's host owns its stderr).
TEST(LogRelayTest, ACapturedHelperWritesNothingToStderr) {
  std::string path = ::testing::TempDir() + "/stderr-" + std::to_string(::getpid());
  std::fflush(stderr);
  int saved = ::dup(2);
  std::FILE* f = std::fopen(path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  ::dup2(::fileno(f), 2);
  LogRelay relay;
  std::thread helper([&relay] {
    LogTarget captured = relay.Capture();
    Logger("broker")->error("captured");
  });
  helper.join();
  std::thread bare([] { Logger("broker")->warn("bare"); });
  bare.join();
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  std::fclose(f);
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), {});
  std::remove(path.c_str());
  EXPECT_EQ(text, "warning broker: bare\n");
}

}  // namespace
}  // namespace layerx::broker
