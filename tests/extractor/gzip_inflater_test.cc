// The ISA-L inflater against zlib's deflate: what zlib writes comes back
// byte for byte, members may follow one another, and every corruption is an
// error (kInvalidInput), never silently short output.
#include "extractor/gzip_inflater.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>
#include <zlib.h>

#include <random>
#include <string>
#include <thread>

#include "tests/fixtures/gzip.h"

namespace layerx::extractor {
namespace {

std::string Gzip(const std::string& data, int level = 6) {
  return testing::GzipMember(data, level);
}

std::string Mixed(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = (i / 4096) % 2 ? 'a' + rng() % 4 : static_cast<char>(rng());
  return s;
}

// Inflates `compressed` fed through a pipe (as the layer arrives in the jail).
// A refused stream closes the pipe early: the writer sees EPIPE, not SIGPIPE.
Result<std::string> Inflate(const std::string& compressed) {
  signal(SIGPIPE, SIG_IGN);
  int p[2];
  EXPECT_EQ(pipe(p), 0);
  std::thread writer([&] {
    size_t off = 0;
    while (off < compressed.size()) {
      ssize_t n =
          write(p[1], compressed.data() + off, std::min<size_t>(compressed.size() - off, 7777));
      if (n <= 0) break;
      off += static_cast<size_t>(n);
    }
    close(p[1]);
  });
  std::byte magic[2];
  size_t got = read(p[0], magic, 2);
  GzipInflater inflater(p[0], std::span(magic, got));
  std::string out;
  std::vector<std::byte> buf(64 * 1024);
  Result<std::string> result = out;
  while (true) {
    auto n = inflater.Read(std::span(buf));
    if (!n) {
      result = Fail(n.error());
      break;
    }
    if (*n == 0) {
      result = out;
      break;
    }
    out.append(reinterpret_cast<const char*>(buf.data()), *n);
  }
  close(p[0]);
  writer.join();
  return result;
}

TEST(GzipInflaterTest, RoundTripsWhatZlibWrote) {
  for (size_t size : {size_t{0}, size_t{1}, size_t{65535}, size_t{3} << 20}) {
    std::string data = Mixed(size, static_cast<unsigned>(size));
    auto out = Inflate(Gzip(data));
    ASSERT_TRUE(out) << out.error().ToString();
    EXPECT_EQ(*out, data) << size;
  }
}

TEST(GzipInflaterTest, ReadsConcatenatedMembers) {
  std::string a = Mixed(100000, 1), b = Mixed(5000, 2);
  auto out = Inflate(Gzip(a, 1) + Gzip("") + Gzip(b, 9));
  ASSERT_TRUE(out) << out.error().ToString();
  EXPECT_EQ(*out, a + b);
}

TEST(GzipInflaterTest, RejectsCorruptCrc) {
  std::string z = Gzip(Mixed(10000, 3));
  z[z.size() - 6] ^= 0x55;  // in the CRC-32 of the trailer
  auto out = Inflate(z);
  ASSERT_FALSE(out);
  EXPECT_EQ(out.error().kind(), ErrorKind::kInvalidInput);
}

TEST(GzipInflaterTest, RejectsWrongSizeInTrailer) {
  std::string z = Gzip(Mixed(10000, 4));
  z[z.size() - 1] ^= 0x01;  // ISIZE
  ASSERT_FALSE(Inflate(z));
}

TEST(GzipInflaterTest, RejectsTruncatedStream) {
  std::string z = Gzip(Mixed(200000, 5));
  for (size_t cut : {size_t{10}, z.size() / 2, z.size() - 4, z.size() - 1}) {
    auto out = Inflate(z.substr(0, cut));
    ASSERT_FALSE(out) << cut;
    EXPECT_EQ(out.error().kind(), ErrorKind::kInvalidInput);
  }
}

TEST(GzipInflaterTest, RejectsTrailingGarbage) {
  std::string z = Gzip("hello");
  EXPECT_FALSE(Inflate(z + "x"));
  EXPECT_FALSE(Inflate(z + std::string(512, '\0')));
}

TEST(GzipInflaterTest, RejectsCorruptDeflateData) {
  std::string z = Gzip(Mixed(50000, 6));
  for (size_t i = 20; i < 60; ++i) z[i] = static_cast<char>(0xff);
  ASSERT_FALSE(Inflate(z));
}

}  // namespace
}  // namespace layerx::extractor
