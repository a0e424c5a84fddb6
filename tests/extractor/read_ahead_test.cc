// The read-ahead thread (extractor/read_ahead.h): blocks come in order and
// whole, an error comes where it came in the stream (after the blocks before
// it), the end is an empty span, a stop never waits for a producer stuck in
// read(2); and the layer reader gives the same entries, bytes, diff_id and
// errors with the thread as without it.
#include "extractor/read_ahead.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <set>
#include <vector>
#include <string>
#include <thread>

#include "extractor/layer_reader.h"
#include "policy/limits.h"
#include "sandbox/sys.h"
#include "tests/fixtures/layer_writer.h"
#include "tests/fixtures/test_util.h"

namespace layerx::extractor {
namespace {

// Block i holds (i + 1) * 1000 % 250'001 + 1 bytes of the value i % 251:
// sizes vary, and many more blocks than the ring holds.
size_t SizeOf(uint64_t i) { return (i + 1) * 1000 % 250'001 + 1; }

TEST(ReadAheadTest, BlocksComeInOrderAndWhole) {
  auto ahead = ReadAhead::Spawn();
  ASSERT_NE(ahead, nullptr);
  constexpr uint64_t kCount = 500;
  uint64_t next = 0;
  ASSERT_TRUE(ahead->Start([&next](std::span<std::byte> block) -> Result<size_t> {
    if (next == kCount) return size_t{0};
    size_t n = std::min(SizeOf(next), block.size());
    std::memset(block.data(), static_cast<int>(next % 251), n);
    ++next;
    return n;
  }, [](std::span<const std::byte>) {}));
  for (uint64_t i = 0; i < kCount; ++i) {
    auto block = ahead->Next();
    ASSERT_TRUE(block) << block.error().ToString();
    ASSERT_EQ(block->size(), std::min<size_t>(SizeOf(i), 256 * 1024)) << "block " << i;
    for (std::byte b : *block) ASSERT_EQ(static_cast<int>(b), static_cast<int>(i % 251));
  }
  for (int i = 0; i < 3; ++i) {
    auto end = ahead->Next();
    ASSERT_TRUE(end);
    EXPECT_TRUE(end->empty());
  }
}

// The hash sees every block once, in order, before the end is said; the
// thread hashes while it is ahead (the reader slow: 150 blocks at 2 ms each),
// the reader while the thread is behind (the producer slow: 150 at 2 ms).
TEST(ReadAheadTest, EveryBlockIsHashedOnceInOrderByWhicheverThreadHasTime) {
  auto ahead = ReadAhead::Spawn();
  ASSERT_NE(ahead, nullptr);
  constexpr uint64_t kSlowReader = 150, kCount = 300;
  uint64_t next = 0;
  std::vector<std::pair<int, size_t>> hashed;  // (value, size) of each block hashed
  std::set<std::thread::id> hashers;
  ASSERT_TRUE(ahead->Start(
      [&next](std::span<std::byte> block) -> Result<size_t> {
        if (next == kCount) return size_t{0};
        if (next >= kSlowReader) std::this_thread::sleep_for(std::chrono::milliseconds(2));
        size_t n = std::min(SizeOf(next), block.size());
        std::memset(block.data(), static_cast<int>(next % 251), n);
        ++next;
        return n;
      },
      [&](std::span<const std::byte> block) {
        hashed.emplace_back(static_cast<int>(block[0]), block.size());
        hashers.insert(std::this_thread::get_id());
      }));
  for (uint64_t i = 0;; ++i) {
    auto block = ahead->Next();
    ASSERT_TRUE(block) << block.error().ToString();
    if (block->empty()) break;
    if (i < kSlowReader) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ASSERT_EQ(hashed.size(), kCount);
  for (uint64_t i = 0; i < kCount; ++i) {
    EXPECT_EQ(hashed[i].first, static_cast<int>(i % 251)) << "block " << i;
    EXPECT_EQ(hashed[i].second, std::min<size_t>(SizeOf(i), 256 * 1024)) << "block " << i;
  }
  EXPECT_EQ(hashers.size(), 2u) << "one thread hashed everything";
  EXPECT_TRUE(hashers.count(std::this_thread::get_id())) << "the reader never hashed";
}

TEST(ReadAheadTest, AnErrorComesAfterTheBlocksBeforeIt) {
  auto ahead = ReadAhead::Spawn();
  ASSERT_NE(ahead, nullptr);
  int calls = 0;
  ASSERT_TRUE(ahead->Start([&calls](std::span<std::byte> block) -> Result<size_t> {
    if (++calls > 3) return Fail(MakeError(ErrorKind::kInvalidInput, "bad block {}", calls));
    block[0] = std::byte{1};
    return size_t{1};
  }, [](std::span<const std::byte>) {}));
  for (int i = 0; i < 3; ++i) {
    auto block = ahead->Next();
    ASSERT_TRUE(block) << "block " << i << ": " << block.error().ToString();
    EXPECT_EQ(block->size(), 1u);
  }
  for (int i = 0; i < 2; ++i) {
    auto failed = ahead->Next();
    ASSERT_FALSE(failed);
    EXPECT_EQ(failed.error().kind(), ErrorKind::kInvalidInput);
    EXPECT_NE(failed.error().ToString().find("bad block 4"), std::string::npos);
  }
  EXPECT_EQ(calls, 4) << "the producer went on past its error";
}

// The producer is in read(2) on a pipe whose writer never writes: Stop and the
// handle's end return at once (the extractor then exits around the thread).
TEST(ReadAheadTest, StopDoesNotWaitForAProducerStuckInRead) {
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  std::atomic<bool> reading{false};
  {
    auto ahead = ReadAhead::Spawn();
    ASSERT_NE(ahead, nullptr);
    ASSERT_TRUE(ahead->Start([&reading, fd = p[0]](std::span<std::byte> block) -> Result<size_t> {
      reading = true;
      ssize_t n = read(fd, block.data(), block.size());
      if (n < 0) return Fail(Error(ErrorKind::kOs, errno, "read"));
      return static_cast<size_t>(n);
    }, [](std::span<const std::byte>) {}));
    while (!reading) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    auto t0 = std::chrono::steady_clock::now();
    ahead->Stop();
    ahead.reset();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(100));
  }
  // The writer's end closes: the producer's read returns 0 and it parks.
  close(p[1]);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  close(p[0]);
}

struct Read {
  std::vector<std::string> names;
  std::string data;  // every file's bytes, in order
  std::string digest;
  uint64_t bytes = 0;
  std::string error;  // "" when the layer read to its end
};

// The whole layer in `path`, through a pipe (as in the jail), with or without
// the read-ahead thread.
Read ReadLayer(const std::string& path, bool ahead, policy::Limits limits = policy::Limits{}) {
  signal(SIGPIPE, SIG_IGN);
  std::string bytes = testing::ReadFile(path);
  int p[2];
  EXPECT_EQ(pipe(p), 0);
  std::thread writer([&] {
    (void)sandbox::WriteAll(p[1], std::as_bytes(std::span(bytes)));
    close(p[1]);
  });
  Read out;
  auto reader = LayerReader::Create(limits, ahead ? ReadAhead::Spawn() : nullptr);
  EXPECT_TRUE(reader);
  auto run = [&]() -> Status {
    LX_TRY((*reader)->Open(p[0]));
    while (true) {
      LX_ASSIGN_OR_RETURN(std::optional<TarEntry> entry, (*reader)->Next());
      if (!entry) break;
      out.names.push_back(entry->untrusted_name);
      if (entry->kind != Kind::kFile) continue;
      DataSink sink{.bytes = [&](int64_t, std::span<const std::byte> b) -> Status {
        out.data.append(reinterpret_cast<const char*>(b.data()), b.size());
        return {};
      }};
      LX_ASSIGN_OR_RETURN(uint64_t n, (*reader)->ReadData(sink));
      (void)n;
    }
    LX_ASSIGN_OR_RETURN(out.digest, (*reader)->UncompressedDigest());
    out.bytes = (*reader)->uncompressed_bytes();
    return {};
  };
  if (Status s = run(); !s) out.error = s.error().ToString();
  reader->reset();  // closes nothing: the pipe is ours
  close(p[0]);
  writer.join();
  return out;
}

class ReaderAheadTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerx-ahead-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_); }
  std::string dir_;
};

// Many files across many blocks, big and small: the same with the thread.
TEST_P(ReaderAheadTest, SameEntriesBytesAndDigest) {
  const std::string path = dir_ + "/layer";
  {
    testing::LayerWriter w(path, GetParam());
    w.Dir("d");
    for (int i = 0; i < 300; ++i) {
      std::string data(static_cast<size_t>(i * 997 % 70'000), static_cast<char>('a' + i % 26));
      for (size_t j = 0; j < data.size(); j += 61) data[j] = static_cast<char>(i * j);
      w.File("d/f" + std::to_string(i), data);
    }
    w.File("big", std::string(3 << 20, 'x'));
  }
  Read one = ReadLayer(path, false);
  Read two = ReadLayer(path, true);
  ASSERT_EQ(one.error, "");
  EXPECT_EQ(two.error, "");
  EXPECT_EQ(two.names, one.names);
  EXPECT_EQ(two.data, one.data);
  EXPECT_EQ(two.digest, one.digest);
  EXPECT_EQ(two.bytes, one.bytes);
  EXPECT_EQ(one.names.size(), 302u);
}

// A stream cut short fails in the same words, after the same entries.
TEST_P(ReaderAheadTest, TruncatedStreamFailsTheSameWay) {
  const std::string path = dir_ + "/layer";
  {
    testing::LayerWriter w(path, GetParam());
    for (int i = 0; i < 50; ++i) {
      std::string data(20'000, static_cast<char>(i));
      for (size_t j = 0; j < data.size(); j += 7) data[j] = static_cast<char>(i * j + j / 13);
      w.File("f" + std::to_string(i), data);
    }
  }
  std::string bytes = testing::ReadFile(path);
  bytes.resize(bytes.size() * 2 / 3);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  Read one = ReadLayer(path, false);
  Read two = ReadLayer(path, true);
  ASSERT_NE(one.error, "");
  EXPECT_EQ(two.error, one.error);
  EXPECT_EQ(two.names, one.names);
}

// A bomb stops at the limit in the same words with the thread.
TEST_P(ReaderAheadTest, LimitStopsTheSameWay) {
  const std::string path = dir_ + "/layer";
  {
    testing::LayerWriter w(path, GetParam());
    w.File("zeros", std::string(8 << 20, '\0'));
  }
  policy::Limits limits;
  limits.max_layer_bytes = 2 << 20;
  Read one = ReadLayer(path, false, limits);
  Read two = ReadLayer(path, true, limits);
  ASSERT_NE(one.error.find("max_layer_bytes"), std::string::npos) << one.error;
  EXPECT_EQ(two.error, one.error);
}

// Good bytes before an error come out before it: a gzip stream followed by
// garbage gives every entry, then fails at the end in the same words, with
// the thread and without (the garbage arrives in the same read as the
// stream's last bytes).
TEST_P(ReaderAheadTest, TrailingGarbageFailsAfterEveryEntry) {
  if (std::string(GetParam()) != "gzip") GTEST_SKIP() << "a gzip stream's trailer";
  const std::string path = dir_ + "/layer";
  {
    testing::LayerWriter w(path, GetParam());
    for (int i = 0; i < 20; ++i) w.File("f" + std::to_string(i), std::string(1000, 'a' + i));
  }
  std::ofstream(path, std::ios::binary | std::ios::app) << "not a gzip member";
  for (bool ahead : {false, true}) {
    SCOPED_TRACE(ahead ? "with the thread" : "without");
    Read got = ReadLayer(path, ahead);
    EXPECT_EQ(got.names.size(), 20u);
    EXPECT_EQ(got.data.size(), 20'000u);
    EXPECT_NE(got.error.find("trailing garbage"), std::string::npos) << got.error;
  }
}

// A layer refused while the thread is well ahead, inflating and hashing: the
// reader goes at once, and the thread, still running a moment, touches
// nothing of it (run under ASan by scripts/test-sanitize.sh).
TEST_P(ReaderAheadTest, ReaderGoneWhileTheThreadIsAhead) {
  const std::string path = dir_ + "/layer";
  {
    testing::LayerWriter w(path, GetParam());
    for (int i = 0; i < 40; ++i) {
      std::string data(1 << 20, static_cast<char>(i));
      for (size_t j = 0; j < data.size(); j += 4093) data[j] = static_cast<char>(j);
      w.File("f" + std::to_string(i), data);
    }
  }
  std::string bytes = testing::ReadFile(path);
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  signal(SIGPIPE, SIG_IGN);
  std::thread writer([&] {
    (void)sandbox::WriteAll(p[1], std::as_bytes(std::span(bytes)));
    close(p[1]);
  });
  {
    auto reader = LayerReader::Create(policy::Limits{}, ReadAhead::Spawn());
    ASSERT_TRUE(reader);
    ASSERT_TRUE((*reader)->Open(p[0]));
    auto first = (*reader)->Next();
    ASSERT_TRUE(first && *first);
    // Slow, so the thread gets ahead and hashes.
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }  // refused: the reader is gone
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  close(p[0]);  // the writer sees EPIPE
  writer.join();
}

INSTANTIATE_TEST_SUITE_P(Filters, ReaderAheadTest, ::testing::Values("gzip", "zstd"));

}  // namespace
}  // namespace layerx::extractor
