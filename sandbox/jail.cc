#include "sandbox/jail.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/mount.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <sys/capability.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#ifdef LAYERX_SANITIZE
#include <sanitizer/common_interface_defs.h>

// UBSan reads its options lazily, at its first report: inside the jail, where
// /proc/self/environ is gone, so UBSAN_OPTIONS cannot reach it. Colour would
// cost an ioctl(TCGETS) on stderr, which the jail forbids. (Linked into every
// program that links this file; the environment still overrides it.)
extern "C" const char* __ubsan_default_options() { return "color=never"; }
#endif

namespace layerx::sandbox {

const char* SetupStepName(SetupStep step) {
  switch (step) {
    case SetupStep::kOk:
      return "ok";
    case SetupStep::kReadConfig:
      return "receive input and jail config";
    case SetupStep::kMountPrivate:
      return "make mounts private";
    case SetupStep::kOpenTree:
      return "clone rootfs mount";
    case SetupStep::kMountAttr:
      return "set rootfs mount nosuid,nodev,noexec";
    case SetupStep::kMoveMount:
      return "attach rootfs mount";
    case SetupStep::kPivotRoot:
      return "pivot_root";
    case SetupStep::kDetachOldRoot:
      return "detach old root";
    case SetupStep::kCloseFds:
      return "close fds";
    case SetupStep::kRlimits:
      return "set rlimits";
    case SetupStep::kCapabilities:
      return "drop capabilities";
    case SetupStep::kNoNewPrivs:
      return "set no_new_privs";
    case SetupStep::kSeccomp:
      return "install seccomp";
    case SetupStep::kWaitForMaps:
      return "wait for id maps";
    case SetupStep::kDupFds:
      return "arrange fds";
    case SetupStep::kExec:
      return "exec";
  }
  return "unknown";
}

namespace {

JailSetupResult Failed(SetupStep step) { return {step, errno}; }

std::vector<sock_filter> g_seccomp_program;  // read before the pivot, installed last
std::vector<sock_filter> g_data_program;     // the fd filter (fd 0, the data fd), stacked on it

bool ReadConfig(int fd, JailConfigHeader* config) {
  if (::pread(fd, config, sizeof(*config), 0) != static_cast<ssize_t>(sizeof(*config))) {
    if (errno == 0) errno = EPROTO;
    return false;
  }
  if (config->magic != kJailConfigMagic || config->header_size != sizeof(*config) ||
      config->bpf_instructions == 0 || config->bpf_instructions > BPF_MAXINSNS ||
      config->data_bpf_instructions == 0 || config->data_bpf_instructions > BPF_MAXINSNS) {
    errno = EPROTO;
    return false;
  }
  g_seccomp_program.resize(config->bpf_instructions);
  g_data_program.resize(config->data_bpf_instructions);
  size_t bytes = g_seccomp_program.size() * sizeof(sock_filter);
  size_t data_bytes = g_data_program.size() * sizeof(sock_filter);
  if (::pread(fd, g_seccomp_program.data(), bytes, sizeof(*config)) !=
          static_cast<ssize_t>(bytes) ||
      (data_bytes > 0 &&
       ::pread(fd, g_data_program.data(), data_bytes,
               static_cast<off_t>(sizeof(*config) + bytes)) != static_cast<ssize_t>(data_bytes))) {
    errno = EPROTO;
    return false;
  }
  return true;
}

// Waits for the broker's start message on fd 5 (sandbox/spawn.h, Start): the
// layer's input, placed as fd 0, and the sealed config, read into *config.
// EOF (the broker gave up on us) or anything but exactly those two fds fails.
bool ReceiveStart(JailConfigHeader* config) {
  char byte;
  struct iovec iov = {&byte, 1};
  alignas(struct cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))];
  struct msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n;
  do {
    n = ::recvmsg(kStartFd, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n != 1) {
    if (n == 0) errno = ECANCELED;
    return false;
  }
  int fds[2] = {-1, -1};
  size_t count = 0;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t got = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < got; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (count < 2) fds[count] = fd;
      else ::close(fd);
      ++count;
    }
  }
  // The config must be the sealed memfd the broker made (jail_config.h).
  const int kSealed = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE;
  if (count != 2 || (msg.msg_flags & MSG_CTRUNC) != 0 ||
      (::fcntl(fds[1], F_GET_SEALS) & kSealed) != kSealed) {
    errno = EPROTO;
    return false;
  }
  // They took the lowest free numbers (0, 6 without a data fd): move them up
  // first, then place the input.
  int input = ::fcntl(fds[0], F_DUPFD_CLOEXEC, 64);
  int config_fd = ::fcntl(fds[1], F_DUPFD_CLOEXEC, 64);
  ::close(fds[0]);
  ::close(fds[1]);
  bool ok = input >= 0 && config_fd >= 0 && ::dup2(input, kInputFd) == kInputFd &&
            ReadConfig(config_fd, config);
  int saved = errno;
  if (input >= 0) ::close(input);
  if (config_fd >= 0) ::close(config_fd);
  errno = saved;
  return ok;
}

// The image rootfs becomes "/": a detached clone of the rootfs dir's mount is
// attached on top of that very dir, entered, and pivoted to. Using the fd (not a
// path) means no host path is looked up here at all. The clone is nosuid, nodev
// and noexec: even an exec or a PROT_EXEC mmap that got past seccomp could not
// run the image's code.
SetupStep PivotIntoRootfs() {
  // Our mount events must not propagate back to the host (and vice versa).
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    return SetupStep::kMountPrivate;
  }
  // The rootfs fd belongs to the broker's mount namespace, and a mount can only
  // be cloned from our own: look the same directory up again here, by the path
  // the kernel reports for the fd, and make sure it is the same inode.
  char path[4096];
  ssize_t len = ::readlink("/proc/self/fd/4", path, sizeof(path) - 1);
  if (len <= 0) return SetupStep::kOpenTree;
  path[len] = '\0';
  int rootfs = ::open(path, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (rootfs < 0) return SetupStep::kOpenTree;
  struct stat given, found;
  if (::fstat(kRootfsFd, &given) != 0 || ::fstat(rootfs, &found) != 0) return SetupStep::kOpenTree;
  if (given.st_dev != found.st_dev || given.st_ino != found.st_ino) {
    errno = ESTALE;
    return SetupStep::kOpenTree;
  }
  // AT_RECURSIVE: in a user namespace a mount with locked submounts (the host's
  // "/" has /proc, /dev...) may only be cloned whole; only those below the
  // rootfs dir come along, and there are none.
  int tree = static_cast<int>(
      ::syscall(SYS_open_tree, rootfs, "",
                OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | AT_RECURSIVE));
  if (tree < 0) return SetupStep::kOpenTree;
  struct mount_attr attr = {};
  attr.attr_set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
  if (::syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr, sizeof(attr)) !=
      0) {
    return SetupStep::kMountAttr;
  }
  if (::syscall(SYS_move_mount, tree, "", rootfs, "",
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) != 0) {
    return SetupStep::kMoveMount;
  }
  // `tree` is now the root of a mount attached in our namespace: enter it.
  if (::fchdir(tree) != 0) return SetupStep::kMoveMount;
  ::close(tree);
  ::close(rootfs);  // the dir below the mount: "..", from it, is the host's
  // pivot_root(".", ".") stacks the old root on top of the new one (bubblewrap's
  // and runc's trick: no directory for the old root is needed inside the image);
  // detaching "." then drops the whole host tree from this namespace.
  if (::syscall(SYS_pivot_root, ".", ".") != 0) return SetupStep::kPivotRoot;
  if (::umount2(".", MNT_DETACH) != 0) return SetupStep::kDetachOldRoot;
  if (::chdir("/") != 0) return SetupStep::kDetachOldRoot;
  return SetupStep::kOk;
}

bool SetRlimits(const policy::JailRlimits& limits) {
  struct Item {
    int resource;
    uint64_t value;
  } items[] = {
      {RLIMIT_FSIZE, limits.file_size},
      {RLIMIT_NOFILE, limits.open_files},
      {RLIMIT_AS, limits.address_space},
      {RLIMIT_CPU, limits.cpu_seconds},
      {RLIMIT_CORE, 0},
  };
  for (const Item& item : items) {
#ifdef LAYERX_SANITIZE
    // ASan reserves its shadow memory (~20 TiB of virtual address space on
    // x86_64) at startup, and every later mmap by its allocator fails under a
    // 4 GiB RLIMIT_AS. Sanitizer builds are for tests only; the others still apply.
    if (item.resource == RLIMIT_AS) continue;
#endif
    struct rlimit rl = {item.value, item.value};
    if (::setrlimit(item.resource, &rl) != 0) return false;
  }
  // Over RLIMIT_FSIZE, write(2) fails with EFBIG and the extractor reports the
  // entry, instead of dying of SIGXFSZ. A vanished broker is EPIPE, not SIGPIPE.
  ::signal(SIGXFSZ, SIG_IGN);
  ::signal(SIGPIPE, SIG_IGN);
  return true;
}

bool DropCapabilities(bool keep_fs_caps) {
  // The bounding set first: dropping from it needs CAP_SETPCAP, which goes last.
  for (int cap = 0; cap <= CAP_LAST_CAP; ++cap) {
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL) return false;
  }
  if (::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0) return false;
  cap_t caps = cap_init();  // every set empty
  if (caps == nullptr) return false;
  if (keep_fs_caps) {
    // With a full id range mapped the extractor chowns and writes into the
    // image's read-only dirs. These act only on inodes of mapped ids, and only
    // the rootfs is reachable. Nothing inheritable, nothing else.
    cap_value_t keep[] = {CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID};
    if (cap_set_flag(caps, CAP_PERMITTED, 4, keep, CAP_SET) != 0 ||
        cap_set_flag(caps, CAP_EFFECTIVE, 4, keep, CAP_SET) != 0) {
      cap_free(caps);
      return false;
    }
  }
  int rc = cap_set_proc(caps);
  int saved = errno;
  cap_free(caps);
  errno = saved;
  return rc == 0;
}

}  // namespace

JailSetupResult EnterJail(JailConfigHeader* config, const std::function<void()>& before_seccomp) {
  errno = 0;
  // Not dumpable, no core, from the start: a jail spawned ahead may wait a
  // whole layer long holding the rootfs dir and the image, with all its caps
  // in its namespace; no same-uid host process may ptrace it or read its
  // memory meanwhile, and a crash writes nothing.
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  struct rlimit no_core = {0, 0};
  if (::setrlimit(RLIMIT_CORE, &no_core) != 0) return Failed(SetupStep::kRlimits);
#ifdef LAYERX_SANITIZE
  // While /proc is still there: the sanitizer runtime caches the memory map,
  // so that a report from inside the jail names modules and offsets.
  __sanitizer_sandbox_on_notify(nullptr);
#endif
  if (SetupStep step = PivotIntoRootfs(); step != SetupStep::kOk) return Failed(step);
  // Ready but for the layer: a jail spawned ahead waits here, holding no input.
  if (!ReceiveStart(config)) return Failed(SetupStep::kReadConfig);
  // fd 4 (the rootfs dir) still points into the detached host tree: ".." from
  // it would reach the host. It, the start socket and anything else goes now.
  // fd 6, the data fd, stays when the broker gave one.
  if (::syscall(SYS_close_range, kRootfsFd, kStartFd, 0) != 0 ||
      ::syscall(SYS_close_range, kDataFd + 1, ~0U, 0) != 0) {
    return Failed(SetupStep::kCloseFds);
  }
  if (config->data.mode != DataMode::kImage && config->data.mode != DataMode::kTreeAndImage) {
    ::close(kDataFd);
  }
  if (!SetRlimits(config->rlimits)) return Failed(SetupStep::kRlimits);
  if (!DropCapabilities(config->keep_fs_caps != 0)) return Failed(SetupStep::kCapabilities);
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return Failed(SetupStep::kNoNewPrivs);
  // Threads made now start with what this one has: no capability, no_new_privs,
  // and (TSYNC below) the same filters, installed before this returns.
  if (before_seccomp) before_seccomp();
  struct sock_fprog prog = {static_cast<unsigned short>(g_seccomp_program.size()),
                            g_seccomp_program.data()};
  // Seccomp last: every step above needs a syscall the filter forbids.
  {
    // The fd filter first: the allowlist forbids seccomp(2) itself.
    // Stacked filters only ever narrow; the kernel takes the stricter answer.
    struct sock_fprog data_prog = {static_cast<unsigned short>(g_data_program.size()),
                                   g_data_program.data()};
    if (::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &data_prog) !=
        0) {
      return Failed(SetupStep::kSeccomp);
    }
  }
  // TSYNC: on every thread, or not at all (a thread it could not sync is a
  // positive return, a failure too).
  if (::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog) != 0) {
    return Failed(SetupStep::kSeccomp);
  }
  return {};
}

}  // namespace layerx::sandbox
