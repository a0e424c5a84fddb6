// The jail, tested from the outside: a probe program (tests/testcases/
// jail_probe.cc) enters it exactly as the extractor does and then tries things.
// The suite runs once as root and once as uid 65534 (see tests/CMakeLists.txt).
#include "sandbox/spawn.h"

#include <fcntl.h>
#include <poll.h>
#include <gtest/gtest.h>
#include <seccomp.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include "sandbox/jail_config.h"
#include "sandbox/sys.h"

namespace layerx::sandbox {
namespace {

class SpawnTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerx-spawn-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ASSERT_EQ(mkdir((dir_ + "/rootfs").c_str(), 0755), 0);
    std::ofstream(dir_ + "/rootfs/marker") << "marker";
    policy_ = policy::DefaultPolicy();
  }
  void TearDown() override { (void)RemoveTreeAt(AT_FDCWD, dir_); }

  struct Running {
    Child child;
    UniqueFd input;  // close to let a "wait" probe exit
    UniqueFd channel;
    UniqueFd err;
  };

  Running Start(const std::string& mode, int data_fd = -1, JailData data = {}) {
    auto program = OpenAt(AT_FDCWD, LAYERX_JAIL_PROBE, O_PATH);
    EXPECT_TRUE(program) << program.error().ToString();
    auto rootfs = OpenAt(AT_FDCWD, dir_ + "/rootfs", O_PATH | O_DIRECTORY);
    EXPECT_TRUE(rootfs);
    auto input = MakePipe(0);
    auto errpipe = MakePipe(0);
    auto sockets = MakeSocketPair();
    SpawnRequest request{.program_fd = program->get(),
                         .argv = {"jail_probe", mode},
                         .rootfs_fd = rootfs->get(),
                         .input_fd = input->read.get(),
                         .channel_fd = sockets->second.get(),
                         .stderr_fd = errpipe->write.get(),
                         .policy = &policy_,
                         .data_fd = data_fd,
                         .data = data};
    auto child = Spawn(request);
    EXPECT_TRUE(child) << child.error().ToString();
    return Running{std::move(*child), std::move(input->write), std::move(sockets->first),
                   std::move(errpipe->read)};
  }

  // A probe spawned ahead (SpawnWaiting), not started; our ends of its
  // channel and stderr.
  struct Waiting {
    WaitingChild child;
    UniqueFd channel;
    UniqueFd err;
  };
  std::optional<Waiting> SpawnProbeWaiting(const std::string& mode) {
    auto program = OpenAt(AT_FDCWD, LAYERX_JAIL_PROBE, O_PATH);
    auto rootfs = OpenAt(AT_FDCWD, dir_ + "/rootfs", O_PATH | O_DIRECTORY);
    auto errpipe = MakePipe(0);
    auto sockets = MakeSocketPair();
    EXPECT_TRUE(program && rootfs && errpipe && sockets);
    if (!program || !rootfs || !errpipe || !sockets) return std::nullopt;
    SpawnRequest request{.program_fd = program->get(),
                         .argv = {"jail_probe", mode},
                         .rootfs_fd = rootfs->get(),
                         .channel_fd = sockets->second.get(),
                         .stderr_fd = errpipe->write.get(),
                         .policy = &policy_};
    auto waiting = SpawnWaiting(request);
    EXPECT_TRUE(waiting) << waiting.error().ToString();
    if (!waiting) return std::nullopt;
    return Waiting{std::move(*waiting), std::move(sockets->first), std::move(errpipe->read)};
  }

  // Runs a probe to its end; returns its exit status and stderr.
  ExitStatus Run(const std::string& mode, std::string* err = nullptr, int data_fd = -1,
                 JailData data = {}) {
    Running r = Start(mode, data_fd, data);
    r.input.reset();
    r.channel.reset();
    auto status = r.child.Wait();
    EXPECT_TRUE(status);
    std::string text;
    char buf[4096];
    ssize_t n;
    while ((n = read(r.err.get(), buf, sizeof(buf))) > 0) text.append(buf, static_cast<size_t>(n));
    if (err) *err = text;
    return *status;
  }

  // Waits (up to 5 s) until `pid` is blocked in recvmsg: a jail spawned ahead,
  // pivoted, waiting for its start message.
  static bool WaitsForStart(pid_t pid) {
    for (int i = 0; i < 500; ++i) {
      std::ifstream in("/proc/" + std::to_string(pid) + "/syscall");
      std::string nr;
      if (in >> nr && nr == std::to_string(SYS_recvmsg)) return true;
      usleep(10'000);
    }
    return false;
  }

  static std::map<std::string, std::string> ProcStatus(pid_t pid) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/status");
    std::map<std::string, std::string> fields;
    std::string line;
    while (std::getline(in, line)) {
      size_t colon = line.find(':');
      if (colon == std::string::npos) continue;
      std::string value = line.substr(colon + 1);
      value.erase(0, value.find_first_not_of(" \t"));
      fields[line.substr(0, colon)] = value;
    }
    return fields;
  }

  std::string dir_;
  policy::Policy policy_;
};

TEST_F(SpawnTest, ChildIsLockedDownBeforeItRuns) {
  Running r = Start("wait");
  char c = 0;
  ASSERT_EQ(read(r.channel.get(), &c, 1), 1) << "probe never reported ready";
  auto status = ProcStatus(r.child.pid());
  // Rootless the extractor keeps nothing; with a full id range exactly
  // CHOWN(0), DAC_OVERRIDE(1), FOWNER(3), FSETID(4) in permitted and effective.
  std::string kept = policy_.ids.full_range() ? "000000000000001b" : "0000000000000000";
  EXPECT_EQ(status["CapInh"], "0000000000000000");
  EXPECT_EQ(status["CapPrm"], kept);
  EXPECT_EQ(status["CapEff"], kept);
  EXPECT_EQ(status["CapBnd"], "0000000000000000");
  EXPECT_EQ(status["CapAmb"], "0000000000000000");
  EXPECT_EQ(status["NoNewPrivs"], "1");
  EXPECT_EQ(status["Seccomp"], "2");
  // Fresh namespaces of every kind.
  for (const char* ns : {"user", "mnt", "pid", "net", "ipc", "uts", "cgroup"}) {
    struct stat mine, its;
    ASSERT_EQ(stat((std::string("/proc/self/ns/") + ns).c_str(), &mine), 0);
    ASSERT_EQ(stat(("/proc/" + std::to_string(r.child.pid()) + "/ns/" + ns).c_str(), &its), 0);
    EXPECT_NE(mine.st_ino, its.st_ino) << ns << " namespace shared with the broker";
  }
  // No network interface but lo.
  std::ifstream dev("/proc/" + std::to_string(r.child.pid()) + "/net/dev");
  std::string line, interfaces;
  std::getline(dev, line);
  std::getline(dev, line);
  while (std::getline(dev, line)) interfaces += line.substr(0, line.find(':')) + ";";
  interfaces.erase(std::remove(interfaces.begin(), interfaces.end(), ' '), interfaces.end());
  EXPECT_EQ(interfaces, "lo;");
  r.input.reset();
  auto exit = r.child.Wait();
  ASSERT_TRUE(exit);
  EXPECT_TRUE(exit->exited && exit->code == 0);
}

TEST_F(SpawnTest, ExtractorCannotOpenHostFile) {
  std::string err;
  ExitStatus s = Run("host-paths", &err);
  EXPECT_TRUE(s.exited && s.code == 0) << "signal " << s.signal << ": " << err;
}

TEST_F(SpawnTest, OnlyTheFourFdsReachTheJail) {
  int leaked = open("/dev/null", O_RDONLY);  // not O_CLOEXEC: must still not leak
  std::string err;
  ExitStatus s = Run("fds", &err);
  close(leaked);
  EXPECT_TRUE(s.exited && s.code == 0) << "signal " << s.signal << ": " << err;
}

// A jail spawned ahead of its layer (SpawnWaiting) runs nothing of the
// layer's until Start: it holds no fd 0 at all (not the caller's stdin, even
// one left without O_CLOEXEC), is already in its own namespaces, and once
// started is the same locked-down jail.
TEST_F(SpawnTest, WaitingChildHoldsNoInputUntilStarted) {
  // Our own fd 0 is a pipe the child must not inherit.
  auto stdin_pipe = MakePipe(0);
  ASSERT_TRUE(stdin_pipe);
  int saved_stdin = dup(0);
  ASSERT_EQ(dup2(stdin_pipe->read.get(), 0), 0);
  std::optional<Waiting> waiting = SpawnProbeWaiting("wait");
  dup2(saved_stdin, 0);
  close(saved_stdin);
  ASSERT_TRUE(waiting);
  ASSERT_TRUE(WaitsForStart(waiting->child.pid())) << "the child never waited for its start";
  // Not ready: nothing on the channel for a while.
  struct pollfd pfd = {waiting->channel.get(), POLLIN, 0};
  EXPECT_EQ(poll(&pfd, 1, 200), 0) << "a waiting child ran";
  char link[256];
  const std::string fds = "/proc/" + std::to_string(waiting->child.pid()) + "/fd/";
  EXPECT_GT(readlink((fds + "5").c_str(), link, sizeof(link)), 0)
      << "its start socket is not there: " << strerror(errno);
  errno = 0;
  EXPECT_LT(readlink((fds + "0").c_str(), link, sizeof(link)), 0) << "the waiting child has an fd 0";
  EXPECT_EQ(errno, ENOENT);
  EXPECT_EQ(ProcStatus(waiting->child.pid())["Seccomp"], "0") << "locked down before its start";
  struct stat mine, its;
  ASSERT_EQ(stat("/proc/self/ns/mnt", &mine), 0);
  ASSERT_EQ(stat(("/proc/" + std::to_string(waiting->child.pid()) + "/ns/mnt").c_str(), &its), 0);
  EXPECT_NE(mine.st_ino, its.st_ino);
  auto input = MakePipe(0);
  ASSERT_TRUE(input);
  auto child = std::move(waiting->child).Start(input->read.get(), JailData{});
  ASSERT_TRUE(child) << child.error().ToString();
  input->read.reset();
  char c = 0;
  ASSERT_EQ(read(waiting->channel.get(), &c, 1), 1) << "the started child never reported ready";
  auto status = ProcStatus(child->pid());
  EXPECT_EQ(status["Seccomp"], "2");
  EXPECT_EQ(status["NoNewPrivs"], "1");
  input->write.reset();
  auto exit = child->Wait();
  ASSERT_TRUE(exit);
  EXPECT_TRUE(exit->exited && exit->code == 0);
}

// One never started, dropped while it waits, is killed and reaped, having run
// nothing of its program.
TEST_F(SpawnTest, WaitingChildDroppedUnstartedIsGone) {
  pid_t pid;
  {
    std::optional<Waiting> waiting = SpawnProbeWaiting("write-rootfs");
    ASSERT_TRUE(waiting);
    pid = waiting->child.pid();
    ASSERT_TRUE(WaitsForStart(pid));
  }
  EXPECT_NE(kill(pid, 0), 0) << "child " << pid << " still around";
  EXPECT_NE(access((dir_ + "/rootfs/written").c_str(), F_OK), 0);
}

TEST_F(SpawnTest, WaitingChildStartedWithMismatchedDataIsRefused) {
  std::optional<Waiting> waiting = SpawnProbeWaiting("write-rootfs");
  ASSERT_TRUE(waiting);
  auto input = MakePipe(0);
  // An image window, and no data fd was given at spawn.
  auto child =
      std::move(waiting->child).Start(input->read.get(), JailData{.mode = DataMode::kImage});
  ASSERT_FALSE(child);
  EXPECT_EQ(child.error().kind(), ErrorKind::kInternal);
}

TEST_F(SpawnTest, ExtractorCanWriteInsideRootfs) {
  std::string err;
  ExitStatus s = Run("write-rootfs", &err);
  EXPECT_TRUE(s.exited && s.code == 0) << "signal " << s.signal << ": " << err;
  EXPECT_EQ(access((dir_ + "/rootfs/written").c_str(), F_OK), 0);
}

class ForbiddenSyscallTest : public SpawnTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(ForbiddenSyscallTest, IsKilledBySeccomp) {
  std::string err;
  ExitStatus s = Run(GetParam(), &err);
  EXPECT_FALSE(s.exited) << "probe survived " << GetParam() << ": " << err;
  EXPECT_EQ(s.signal, SIGSYS) << err;
}

INSTANTIATE_TEST_SUITE_P(Attempts, ForbiddenSyscallTest,
                         ::testing::Values("socket", "socket-unix", "ptrace", "execve", "execveat",
                                           "mount", "umount", "unshare", "setns", "clone", "fork",
                                           "keyctl", "add_key", "bpf", "io_uring", "userfaultfd",
                                           "perf", "chroot", "pivot_root", "open_by_handle_at",
                                           "init_module", "capset", "setuid", "mmap-exec",
                                           "mprotect-exec", "connect-channel"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// The data fd: the ext4 image the extractors write file data into. A layer
// gets it write-only with its window starting past the lower layers' data;
// seccomp lets it pwrite64 there and do nothing else to the file. Here the
// "image" holds 8 KiB of a lower layer's data and the window starts at 8 KiB.
class DataFdTest : public SpawnTest, public ::testing::WithParamInterface<const char*> {
 protected:
  void SetUp() override {
    SpawnTest::SetUp();
    image_ = dir_ + "/image";
    std::ofstream(image_) << std::string(8192, 'L');
    ASSERT_EQ(chmod(image_.c_str(), 0644), 0);
    auto fd = OpenAt(AT_FDCWD, image_, O_WRONLY);
    ASSERT_TRUE(fd);
    data_fd_ = std::move(*fd);
  }
  ExitStatus RunWithData(const std::string& mode, std::string* err, uint32_t copy_input = 0) {
    return Run(mode, err, data_fd_.get(),
               JailData{.mode = DataMode::kImage,
                        .block_size = 4096,
                        .start = 8192,
                        .copy_input = copy_input});
  }
  std::string Image() {
    std::ifstream in(image_);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  void ExpectLowerDataUntouched() {
    std::string now = Image();
    ASSERT_GE(now.size(), 8192u);
    EXPECT_EQ(now.substr(0, 8192), std::string(8192, 'L'));
    struct stat st;
    ASSERT_EQ(stat(image_.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0644u);
    char value[16];
    EXPECT_LT(getxattr(image_.c_str(), "user.x", value, sizeof(value)), 0);
    EXPECT_NE(access((dir_ + "/rootfs/stolen").c_str(), F_OK), 0);
  }
  std::string image_;
  UniqueFd data_fd_;
};

TEST_F(DataFdTest, LayerWritesItsWindowAndCannotReadTheLowerData) {
  std::string err;
  ExitStatus s = RunWithData("data-pwrite-at-start", &err);
  EXPECT_TRUE(s.exited && s.code == 0) << "signal " << s.signal << ": " << err;
  EXPECT_EQ(Image().substr(8192), "mine");
  s = RunWithData("data-read", &err);
  EXPECT_TRUE(s.exited && s.code == 0) << "signal " << s.signal << ": " << err;
  ExpectLowerDataUntouched();
}

// copy_file_range's offsets are behind pointers, where no filter looks: it is
// allowed only where nothing lies below the window (copy_input, the first
// layer of an image), only from fd 0 into the data fd, and with no flags.
TEST_F(DataFdTest, CopyFromTheLayerFileOnlyWhereNothingLiesBelow) {
  std::string err;
  ExitStatus s = RunWithData("data-copy-allowed", &err, 1);
  EXPECT_TRUE(s.exited && s.code == 0) << "signal " << s.signal << ": " << err;
  for (const char* mode : {"data-copy-from-other-fd", "data-copy-flags"}) {
    s = RunWithData(mode, &err, 1);
    EXPECT_FALSE(s.exited) << "probe survived " << mode << ": " << err;
    EXPECT_EQ(s.signal, SIGSYS) << mode << ": " << err;
  }
  ExpectLowerDataUntouched();
}

// With direct input (broker/engine/layer_runner.cc) fd 0 is a read-only open of the
// caller's (or root's) own layer file on the host, an inode the jail's uid
// owns (rootless: 0 is the caller) or may act on (root: the file caps). It may
// only be read: chmod, xattrs, times and dup of it are killed (the review
// found fchmod(0, 04777) passing), and the file is as it was.
TEST_F(SpawnTest, DirectInputFileMetadataIsOutOfReach) {
  const std::string blob = dir_ + "/layer.tar";
  std::ofstream(blob) << std::string(1024, '\0');
  ASSERT_EQ(chmod(blob.c_str(), 0644), 0);
  auto program = OpenAt(AT_FDCWD, LAYERX_JAIL_PROBE, O_PATH);
  ASSERT_TRUE(program);
  auto rootfs = OpenAt(AT_FDCWD, dir_ + "/rootfs", O_PATH | O_DIRECTORY);
  ASSERT_TRUE(rootfs);
  auto blob_fd = OpenAt(AT_FDCWD, blob, O_RDONLY);
  ASSERT_TRUE(blob_fd);
  auto input = ReopenFd(blob_fd->get(), O_RDONLY);  // as Session::Run does
  ASSERT_TRUE(input);
  auto errpipe = MakePipe(0);
  auto sockets = MakeSocketPair();
  SpawnRequest request{.program_fd = program->get(),
                       .argv = {"jail_probe", "input-metadata"},
                       .rootfs_fd = rootfs->get(),
                       .input_fd = input->get(),
                       .channel_fd = sockets->second.get(),
                       .stderr_fd = errpipe->write.get(),
                       .policy = &policy_};
  auto child = Spawn(request);
  ASSERT_TRUE(child) << child.error().ToString();
  input->reset();
  errpipe->write.reset();
  sockets->second.reset();
  sockets->first.reset();
  auto status = child->Wait();
  ASSERT_TRUE(status);
  std::string text;
  char buf[4096];
  ssize_t n;
  while ((n = read(errpipe->read.get(), buf, sizeof(buf))) > 0) text.append(buf, size_t(n));
  struct stat st;
  ASSERT_EQ(stat(blob.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0644u) << "host layer file's mode changed by the jail: " << text;
  EXPECT_FALSE(status->exited) << "probe survived: " << text;
  EXPECT_EQ(status->signal, SIGSYS) << text;
}

TEST_P(DataFdTest, CannotTouchTheImageOtherwise) {
  std::string err;
  ExitStatus s = RunWithData(GetParam(), &err);
  EXPECT_FALSE(s.exited) << "probe survived " << GetParam() << ": " << err;
  EXPECT_EQ(s.signal, SIGSYS) << err;
  EXPECT_EQ(Image(), std::string(8192, 'L'));
  ExpectLowerDataUntouched();
}

INSTANTIATE_TEST_SUITE_P(Attempts, DataFdTest,
                         ::testing::Values("data-pwrite-below", "data-pwrite-high-fd", "data-copy",
                                           "data-copy-from-other-fd", "data-write",
                                           "data-writev", "data-ftruncate", "data-fallocate",
                                           "data-fchmod", "data-fchown", "data-fchownat",
                                           "data-fsetxattr", "data-utimensat", "data-dup",
                                           "data-dup3", "data-fcntl-dupfd", "data-getfl",
                                           "data-append", "data-linkat", "data-mmap"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return "Rejects_" + name;
                         });

#ifdef LAYERX_SANITIZE
// In a sanitizer build the jail still leaves the runtime what it needs to
// report a bug found inside it: a report on stderr and a plain exit, not SIGSYS
// halfway through.
class SanitizerInJailTest
    : public SpawnTest,
      public ::testing::WithParamInterface<std::pair<const char*, const char*>> {};

TEST_P(SanitizerInJailTest, ReportLeavesTheJail) {
  std::string err;
  ExitStatus s = Run(GetParam().first, &err);
  EXPECT_TRUE(s.exited) << "signal " << s.signal << ": " << err;
  EXPECT_NE(s.code, 0) << err;
  EXPECT_NE(err.find(GetParam().second), std::string::npos) << err;
}

INSTANTIATE_TEST_SUITE_P(
    Bugs, SanitizerInJailTest,
    ::testing::Values(std::pair{"asan-heap-overflow", "AddressSanitizer: heap-buffer-overflow"},
                      std::pair{"asan-segv", "AddressSanitizer: SEGV"},
                      std::pair{"ubsan-overflow", "runtime error: signed integer overflow"}),
    [](const auto& info) {
      std::string name = info.param.first;
      std::replace(name.begin(), name.end(), '-', '_');
      return name;
    });
#endif

// systemd's RestrictNamespaces= makes clone3 fail with ENOSYS (a filter cannot
// read its flags); Spawn must fall back to clone(2) and build the same jail.
TEST_F(SpawnTest, FallsBackToCloneWhenClone3IsFiltered) {
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (ctx == nullptr || seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0) != 0 ||
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || seccomp_load(ctx) != 0) {
      _exit(3);
    }
    if (syscall(SYS_clone3, nullptr, 0) != -1 || errno != ENOSYS) _exit(4);
    std::string err;
    ExitStatus s = Run("write-rootfs", &err);
    _exit(s.exited && s.code == 0 && access((dir_ + "/rootfs/written").c_str(), F_OK) == 0 ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "3: no filter, 4: clone3 not filtered, 1: jail failed";
}

TEST_F(SpawnTest, FailedSetupIsReportedWithItsStep) {
  auto program = OpenAt(AT_FDCWD, LAYERX_JAIL_PROBE, O_PATH);
  ASSERT_TRUE(program);
  auto input = MakePipe(0);
  auto sockets = MakeSocketPair();
  auto errpipe = MakePipe(0);
  // The rootfs fd is a pipe, not a directory: the jail cannot be entered.
  SpawnRequest request{.program_fd = program->get(),
                       .argv = {"jail_probe", "wait"},
                       .rootfs_fd = input->read.get(),
                       .input_fd = input->read.get(),
                       .channel_fd = sockets->second.get(),
                       .stderr_fd = errpipe->write.get(),
                       .policy = &policy_};
  auto child = Spawn(request);
  ASSERT_TRUE(child);
  errpipe->write.reset();
  auto s = child->Wait();
  ASSERT_TRUE(s);
  EXPECT_TRUE(s->exited);
  EXPECT_EQ(s->code, kSetupFailedExit);
}

}  // namespace
}  // namespace layerx::sandbox
