// sandbox/sys.cc: OpenRegularFile against what another user may put where a
// file is read (a fifo with no writer, whose open would wait forever; a device;
// a socket; a directory; a symlink to any of them; a link leading out), and
// GetRandom. Each open is run in a thread with a deadline, so a call that
// blocks fails the test instead of hanging it.
#include "sandbox/sys.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <future>
#include <memory>
#include <set>
#include <thread>

namespace layerx::sandbox {
namespace {

class OpenRegularFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerx-sys-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto fd = OpenAt(AT_FDCWD, dir_, O_PATH | O_DIRECTORY);
    ASSERT_TRUE(fd);
    dir_fd_ = std::move(*fd);
  }
  void TearDown() override { (void)RemoveTreeAt(AT_FDCWD, dir_); }

  // OpenRegularFile(dir, name, RESOLVE_BENEATH) within two seconds; the call
  // runs in a detached thread, so one that blocks is reported, not waited for.
  Result<UniqueFd> OpenWithin(const std::string& name, uint64_t resolve = RESOLVE_BENEATH) {
    auto done = std::make_shared<std::promise<Result<UniqueFd>>>();
    auto result = done->get_future();
    std::thread([done, dir = dir_fd_.get(), name, resolve] {
      done->set_value(OpenRegularFile(dir, name, resolve));
    }).detach();
    if (result.wait_for(std::chrono::seconds(2)) != std::future_status::ready) {
      ADD_FAILURE() << "OpenRegularFile(" << name << ") blocked";
      return Fail(MakeError(ErrorKind::kInternal, "blocked"));
    }
    return result.get();
  }
  void ExpectRefused(const std::string& name, const std::string& kind) {
    auto fd = OpenWithin(name);
    ASSERT_FALSE(fd) << name;
    EXPECT_EQ(fd.error().kind(), ErrorKind::kInvalidInput) << fd.error().ToString();
    EXPECT_NE(fd.error().ToString().find("is " + kind + ", not a regular file"), std::string::npos)
        << fd.error().ToString();
  }

  std::string dir_;
  UniqueFd dir_fd_;
};

TEST_F(OpenRegularFileTest, OpensARegularFileForReading) {
  std::ofstream(dir_ + "/f") << "data";
  auto fd = OpenWithin("f");
  ASSERT_TRUE(fd) << fd.error().ToString();
  int flags = fcntl(fd->get(), F_GETFL);
  EXPECT_EQ(flags & O_ACCMODE, O_RDONLY);
  EXPECT_EQ(flags & O_PATH, 0);
  EXPECT_NE(fcntl(fd->get(), F_GETFD) & FD_CLOEXEC, 0);
  char buf[8] = {};
  EXPECT_EQ(read(fd->get(), buf, sizeof(buf)), 4);
  EXPECT_STREQ(buf, "data");
}

// ReadUpTo stops at the size asked for, and at EOF before it (a file sized
// by fstat that shrank meanwhile); a read error fails.
TEST_F(OpenRegularFileTest, ReadUpToStopsAtTheSizeOrAtEof) {
  std::ofstream(dir_ + "/f") << "0123456789";
  auto fd = OpenWithin("f");
  ASSERT_TRUE(fd) << fd.error().ToString();
  auto head = ReadUpTo(fd->get(), 4);
  ASSERT_TRUE(head) << head.error().ToString();
  EXPECT_EQ(*head, "0123");
  auto rest = ReadUpTo(fd->get(), 100);
  ASSERT_TRUE(rest) << rest.error().ToString();
  EXPECT_EQ(*rest, "456789");
  UniqueFd dir(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  auto bad = ReadUpTo(dir.get(), 4);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().err(), EISDIR);
}

TEST_F(OpenRegularFileTest, RejectsFifoWithoutWaitingForAWriter) {
  ASSERT_EQ(mkfifo((dir_ + "/fifo").c_str(), 0644), 0);
  ExpectRefused("fifo", "a fifo");
  // Nothing opened it for reading: a writer finds no reader (ENXIO).
  EXPECT_EQ(open((dir_ + "/fifo").c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC), -1);
  EXPECT_EQ(errno, ENXIO);
}

TEST_F(OpenRegularFileTest, RejectsSymlinkToFifoAndDevices) {
  ASSERT_EQ(mkfifo((dir_ + "/fifo").c_str(), 0644), 0);
  ASSERT_EQ(symlink("fifo", (dir_ + "/to-fifo").c_str()), 0);
  ExpectRefused("to-fifo", "a fifo");
  auto zero = OpenRegularFile(AT_FDCWD, "/dev/zero", 0);
  ASSERT_FALSE(zero);
  EXPECT_EQ(zero.error().kind(), ErrorKind::kInvalidInput);
  EXPECT_NE(zero.error().ToString().find("\"/dev/zero\" is a character device"), std::string::npos)
      << zero.error().ToString();
}

TEST_F(OpenRegularFileTest, RejectsSocketAndDirectory) {
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(s, 0);
  struct sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  std::string path = dir_ + "/sock";
  std::memcpy(addr.sun_path, path.data(), path.size());
  ASSERT_EQ(bind(s, reinterpret_cast<struct sockaddr*>(&addr), sizeof(addr)), 0);
  ExpectRefused("sock", "a socket");
  close(s);
  ASSERT_EQ(mkdir((dir_ + "/sub").c_str(), 0755), 0);
  ExpectRefused("sub", "a directory");
}

TEST_F(OpenRegularFileTest, RejectsLinkLeadingOutOfTheDir) {
  ASSERT_EQ(symlink("/etc/passwd", (dir_ + "/out").c_str()), 0);
  auto fd = OpenWithin("out", RESOLVE_BENEATH);
  ASSERT_FALSE(fd);
  EXPECT_EQ(fd.error().err(), EXDEV) << fd.error().ToString();
  auto missing = OpenWithin("missing");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().err(), ENOENT);
}

TEST(GetRandomTest, FillsAndDiffers) {
  std::set<uint64_t> seen;
  for (int i = 0; i < 64; ++i) {
    uint64_t v = 0;
    ASSERT_TRUE(GetRandom(std::as_writable_bytes(std::span(&v, 1))));
    seen.insert(v);
  }
  EXPECT_EQ(seen.size(), 64u);
}

}  // namespace
}  // namespace layerx::sandbox
