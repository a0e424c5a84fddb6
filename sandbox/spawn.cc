#include "sandbox/spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/close_range.h>
#include <linux/sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "sandbox/jail.h"
#include "sandbox/jail_config.h"
#include "sandbox/seccomp.h"
#include "sandbox/sys.h"

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

namespace layerx::sandbox {

namespace {

struct StatusReport {
  SetupStep step;
  int err;
};

struct ExecPlan {
  int sync_fd;    // read: one byte once the id maps are written
  int status_fd;  // write: a StatusReport if anything fails before exec
  int program_fd;
  int targets[7];  // source fd for child fds 0..6 (-1: none)
  char* const* argv;
  char* const* envp;
};

// Child side, between clone and exec: async-signal-safe calls only, no
// allocation, no logging (the parent may be a multithreaded library caller).
[[noreturn]] void ChildExec(ExecPlan plan) {
  auto fail = [&plan](SetupStep step) {
    StatusReport report{step, errno};
    (void)!::write(plan.status_fd, &report, sizeof(report));
    ::_exit(kSetupFailedExit);
  };
  // If the broker dies, so do we (the pipe read below also sees its death).
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) fail(SetupStep::kWaitForMaps);
  // Before the parent writes our id maps we are the overflow id with no caps.
  char byte;
  if (::read(plan.sync_fd, &byte, 1) != 1) fail(SetupStep::kWaitForMaps);
  // Park every source above the target range (cloexec), then place it: dup2
  // clears O_CLOEXEC on the target, so exactly fds 0..6 survive the exec.
  // The status pipe and the program fd move up first: dup2 below may land on
  // their numbers.
  int status_fd = ::fcntl(plan.status_fd, F_DUPFD_CLOEXEC, 64);
  int program_fd = ::fcntl(plan.program_fd, F_DUPFD_CLOEXEC, 64);
  if (status_fd < 0 || program_fd < 0) fail(SetupStep::kDupFds);
  plan.status_fd = status_fd;
  int parked[7];
  for (int i = 0; i < 7; ++i) {
    parked[i] = plan.targets[i] < 0 ? -1 : ::fcntl(plan.targets[i], F_DUPFD_CLOEXEC, 64);
    if (plan.targets[i] >= 0 && parked[i] < 0) fail(SetupStep::kDupFds);
  }
  for (int i = 0; i < 7; ++i) {
    if (parked[i] >= 0 && ::dup2(parked[i], i) != i) fail(SetupStep::kDupFds);
  }
  // Whatever else the caller left open (even without O_CLOEXEC) dies at exec;
  // the status pipe and program fd stay usable until then.
  if (::syscall(SYS_close_range, 7, ~0U, CLOSE_RANGE_CLOEXEC) != 0) fail(SetupStep::kDupFds);
  // Whatever the caller had there: fd 0 comes with Start(), fd 6 only with an image.
  for (int i = 0; i < 7; ++i) {
    if (plan.targets[i] < 0) ::close(i);
  }
  ::syscall(SYS_execveat, program_fd, "", plan.argv, plan.envp, AT_EMPTY_PATH);
  fail(SetupStep::kExec);
  __builtin_unreachable();
}

Status WriteProcFile(pid_t pid, const char* name, const std::string& content) {
  std::string path = fmt::format("/proc/{}/{}", pid, name);
  LX_ASSIGN_OR_RETURN(UniqueFd fd, OpenAt(AT_FDCWD, path, O_WRONLY));
  if (::write(fd.get(), content.data(), content.size()) != static_cast<ssize_t>(content.size())) {
    return Fail(OsError(errno, "write {} {:?}", path, content));
  }
  return {};
}

// The sealed memfd the child reads its config from (jail_config.h), with the
// policy's filter compiled before and the data fd's filter for `data` now.
Result<UniqueFd> MakeJailConfig(const policy::Policy& policy, const JailData& data,
                                const std::vector<sock_filter>& program) {
  LX_ASSIGN_OR_RETURN(std::vector<sock_filter> data_program, CompileFdFilter(policy, data));
  JailConfigHeader header;
  header.rlimits = policy.rlimits;
  header.limits = policy.limits;
  header.rules = policy.rules;
  header.keep_fs_caps = policy.ids.full_range() ? 1 : 0;
  header.data = data;
  // The data fd's offsets start past the lower layers' data: the file size
  // limit counts from there (saturating).
  if (data.mode == DataMode::kImage || data.mode == DataMode::kTreeAndImage) {
    uint64_t fsize = header.rlimits.file_size;
    header.rlimits.file_size = fsize > UINT64_MAX - data.start ? UINT64_MAX : fsize + data.start;
  }
  header.bpf_instructions = static_cast<uint32_t>(program.size());
  header.data_bpf_instructions = static_cast<uint32_t>(data_program.size());
  LX_ASSIGN_OR_RETURN(UniqueFd memfd, MemfdCreate("layerx-jail"));
  LX_TRY(WriteAll(memfd.get(), std::as_bytes(std::span(&header, 1))));
  LX_TRY(WriteAll(memfd.get(), std::as_bytes(std::span(program))));
  LX_TRY(WriteAll(memfd.get(), std::as_bytes(std::span(data_program))));
  // Sealed: the child reads exactly what we compiled, nobody can change it.
  if (::fcntl(memfd.get(), F_ADD_SEALS, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) !=
      0) {
    return Fail(OsError(errno, "seal jail config"));
  }
  return memfd;
}

}  // namespace

Child::~Child() {
  if (!reaped_ && pidfd_.valid()) {
    Kill();
    (void)Wait();
  }
}

void Child::Kill() {
  if (!reaped_ && pidfd_.valid())
    ::syscall(SYS_pidfd_send_signal, pidfd_.get(), SIGKILL, nullptr, 0);
}

Result<ExitStatus> Child::Wait() {
  if (reaped_) return Fail(MakeError(ErrorKind::kInternal, "child {} already reaped", pid_));
  siginfo_t info = {};
  int rc;
  do {
    rc = ::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd_.get()), &info, WEXITED);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return Fail(OsError(errno, "waitid pid {}", pid_));
  reaped_ = true;
  if (info.si_code == CLD_EXITED) return ExitStatus{.exited = true, .code = info.si_status};
  return ExitStatus{.exited = false, .signal = info.si_status};
}

Result<WaitingChild> SpawnWaiting(const SpawnRequest& r) {
  LX_CHECK(r.policy != nullptr && r.program_fd >= 0 && !r.argv.empty());
  const policy::Policy& policy = *r.policy;
  // Our end sends the start message; the child's is its fd 5.
  LX_ASSIGN_OR_RETURN(auto start, MakeSocketPair());
  LX_ASSIGN_OR_RETURN(Pipe sync, MakePipe(0));
  LX_ASSIGN_OR_RETURN(Pipe status, MakePipe(0));

  // Everything the child touches is built now: it may not allocate.
  std::vector<char*> argv;
  for (const std::string& arg : r.argv) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  // The extractor gets no environment from the caller (no LD_*, no locale paths).
#ifdef LAYERX_SANITIZE
  // Except, in sanitizer test builds, ASan's options (read at its start, before
  // the pivot). LeakSanitizer's exit-time check stops the world with clone and
  // ptrace, which the jail forbids: the jailed child runs without it (the
  // broker keeps it). No colour: deciding it is an ioctl(TCGETS) on stderr, and
  // ioctl stays forbidden. See kSanitizerRuntime in sandbox/seccomp.cc.
  char asan_options[] = "ASAN_OPTIONS=detect_leaks=0:color=never";
  char* envp[] = {asan_options, nullptr};
#else
  char* envp[] = {nullptr};
#endif
  ExecPlan plan = {
      .sync_fd = sync.read.get(),
      .status_fd = status.write.get(),
      .program_fd = r.program_fd,
      .targets = {-1, r.stderr_fd, r.stderr_fd, r.channel_fd, r.rootfs_fd, start.second.get(),
                  r.data_fd},
      .argv = argv.data(),
      .envp = envp,
  };

  int pidfd = -1;
  struct clone_args args = {};
  args.flags = CLONE_PIDFD | CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET |
               CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP;
  args.pidfd = reinterpret_cast<uint64_t>(&pidfd);
  args.exit_signal = SIGCHLD;
  long pid = ::syscall(SYS_clone3, &args, sizeof(args));
  if (pid < 0 && errno == ENOSYS) {
    // systemd's RestrictNamespaces= (packaging/systemd/layerx.service) makes
    // clone3 fail with ENOSYS because a seccomp filter cannot look into its
    // argument struct; clone(2) carries the flags in a register, where the
    // filter checks them against the allowed namespaces. Same child, same
    // pidfd (returned through parent_tid); x86_64 order: flags, stack,
    // parent_tid, child_tid, tls.
    pid = ::syscall(SYS_clone, args.flags | SIGCHLD, nullptr, &pidfd, nullptr, nullptr);
  }
  if (pid < 0) return Fail(OsError(errno, "clone3 into new namespaces"));
  if (pid == 0) ChildExec(plan);

  Child child(UniqueFd(pidfd), static_cast<pid_t>(pid));
  sync.read.reset();
  status.write.reset();
  const policy::IdMapping& ids = policy.ids;
  // setgroups must be denied before an unprivileged gid_map write; it also keeps
  // the child from dropping a group that denies it access to something.
  LX_TRY(WriteProcFile(child.pid(), "setgroups", "deny"));
  LX_TRY(WriteProcFile(child.pid(), "uid_map", fmt::format("0 {} {}\n", ids.host_uid, ids.count)));
  LX_TRY(WriteProcFile(child.pid(), "gid_map", fmt::format("0 {} {}\n", ids.host_gid, ids.count)));
  LX_TRY(WriteAll(sync.write.get(), std::as_bytes(std::span("x", 1))));
  sync.write.reset();
  start.second.reset();
  // Compiled while the child execs and loads its libraries; whether the exec
  // worked is read in Start.
  LX_ASSIGN_OR_RETURN(std::vector<sock_filter> program, CompileSeccompFilter(policy));
  return WaitingChild(std::move(child), std::move(start.first), std::move(status.read), r.policy,
                      r.data_fd >= 0, std::move(program));
}

Result<Child> WaitingChild::Start(int input_fd, const JailData& data) && {
  bool wants_fd = data.mode == DataMode::kImage || data.mode == DataMode::kTreeAndImage;
  if (wants_fd != has_data_fd_ || input_fd < 0) {
    return Fail(MakeError(ErrorKind::kInternal, "spawn: data fd and data mode disagree"));
  }
  // EOF on the status pipe: the exec closed it, the program runs.
  StatusReport report;
  ssize_t got;
  do {
    got = ::read(status_.get(), &report, sizeof(report));
  } while (got < 0 && errno == EINTR);
  if (got == sizeof(report)) {
    (void)child_.Wait();
    return Fail(Error(ErrorKind::kPeer, report.err,
                      fmt::format("sandbox setup: {}", SetupStepName(report.step))));
  }
  status_.reset();
  LX_ASSIGN_OR_RETURN(UniqueFd config, MakeJailConfig(*policy_, data, program_));
  // One message: a byte, and the input and the config as SCM_RIGHTS.
  char byte = 'g';
  struct iovec iov = {&byte, 1};
  alignas(struct cmsghdr) char control[CMSG_SPACE(2 * sizeof(int))] = {};
  struct msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  struct cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(2 * sizeof(int));
  const int fds[2] = {input_fd, config.get()};
  std::memcpy(CMSG_DATA(cmsg), fds, sizeof(fds));
  ssize_t n;
  do {
    n = ::sendmsg(start_.get(), &msg, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  // EPIPE or ECONNRESET: the child is gone (its setup failed); its exit says why.
  if (n != 1 && errno != EPIPE && errno != ECONNRESET) {
    return Fail(OsError(errno, "start jailed child {}", child_.pid()));
  }
  start_.reset();
  return std::move(child_);
}

Result<Child> Spawn(const SpawnRequest& r) {
  LX_ASSIGN_OR_RETURN(WaitingChild waiting, SpawnWaiting(r));
  return std::move(waiting).Start(r.input_fd, r.data);
}

}  // namespace layerx::sandbox
