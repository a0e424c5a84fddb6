// A program the sandbox tests spawn in place of the extractor. It enters the
// jail exactly as the extractor does, then tries what argv[1] names. Forbidden
// syscalls are expected to kill it with SIGSYS; other modes exit 0 when the jail
// held and 1 (with a line on stderr) when it did not.
#include <capnp/serialize.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/falloc.h>
#include <linux/perf_event.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/capability.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <string>

#include "extractor/records.h"
#include "extractor/wire/codec.h"
#include "sandbox/jail.h"

namespace {

using namespace layerx;

int Check(bool ok, const char* what) {
  if (!ok) {
    fprintf(stderr, "jail_probe: %s: %s\n", what, strerror(errno));
    return 1;
  }
  return 0;
}

// Data records that lie about where a file's bytes went in the image (the
// probe runs with a data fd, as the extractor does for --ext4).
int LieAboutData(const std::string& how, const sandbox::JailConfigHeader& config) {
  wire::ChannelWriter writer(sandbox::kChannelFd);
  const uint64_t start = config.data.start;
  if (pwrite(sandbox::kDataFd, std::string(8192, 'x').data(), 8192, static_cast<off_t>(start)) !=
      8192) {
    return 1;
  }
  extractor::EntryRecord a{
      .path = "a", .kind = extractor::Kind::kFile, .mode = 0644, .size = 4096, .data_bytes = 4096};
  extractor::EntryRecord b = a;
  b.path = "b";
  a.extents = {{.logical = 0, .physical = start, .length = 4096}};
  b.extents = {{.logical = 0, .physical = start + 4096, .length = 4096}};
  if (how == "lie-extent-below") a.extents[0].physical = 0;  // the superblock, a lower layer
  if (how == "lie-extent-past-written") a.extents[0].physical = start + (1 << 20);
  if (how == "lie-extent-overlap") b.extents[0].physical = start;  // a's block
  if (how == "lie-extent-past-size") a.extents[0].length = 8192;
  (void)writer.Add(std::move(a));
  (void)writer.Add(std::move(b));
  (void)writer.Flush();
  (void)writer.SendSummary([](wire::Summary::Builder s) { s.setUncompressedDigest("sha256:0"); });
  return 0;
}

// Sends records the real extractor never would: the broker must refuse them.
int Lie(const std::string& how) {
  wire::ChannelWriter writer(sandbox::kChannelFd);
  extractor::EntryRecord r{.path = "ok", .kind = extractor::Kind::kFile, .mode = 0644};
  if (how == "lie-absolute") r.path = "/etc/passwd";
  if (how == "lie-dotdot") r.path = "a/../../etc/passwd";
  if (how == "lie-empty-component") r.path = "a//b";
  if (how == "lie-root-file") r.path = "";
  if (how == "lie-huge-path") r.path = std::string(100000, 'a');
  if (how == "lie-no-parent") r.path = "missing/dir/file";
  if (how == "lie-mode") r.mode = 0170000;
  if (how == "lie-hardlink") {
    r.kind = extractor::Kind::kHardlink;
    r.hardlink_target = "../../etc/shadow";
  }
  if (how == "lie-removal-root") {
    (void)writer.Add(extractor::RemovalRecord{"", false});
    (void)writer.Flush();
    return 0;
  }
  if (how == "lie-kind") {
    capnp::MallocMessageBuilder message;
    auto entry = message.initRoot<wire::Message>().initBatch(1)[0].initEntry();
    entry.setPath(capnp::Data::Reader(reinterpret_cast<const kj::byte*>("x"), 1));
    entry.setKind(static_cast<wire::Kind>(99));
    kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
    auto bytes = words.asBytes();
    return write(sandbox::kChannelFd, bytes.begin(), bytes.size()) < 0;
  }
  if (how == "lie-garbage") {
    char junk[64];
    memset(junk, 0xff, sizeof(junk));
    return write(sandbox::kChannelFd, junk, sizeof(junk)) < 0;
  }
  (void)writer.Add(std::move(r));
  (void)writer.Flush();
  (void)writer.SendSummary([](wire::Summary::Builder s) { s.setUncompressedDigest("sha256:0"); });
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  sandbox::JailConfigHeader config;
  sandbox::JailSetupResult setup = sandbox::EnterJail(&config);
  if (!setup.ok()) {
    fprintf(stderr, "jail_probe: setup failed at %s: %s\n", sandbox::SetupStepName(setup.step),
            strerror(setup.err));
    return 125;
  }
  std::string mode = argc > 1 ? argv[1] : "";

  if (mode == "wait") {
    // Tell the test we are locked down, then wait for it to look at us.
    char c = 'r';
    if (write(sandbox::kChannelFd, &c, 1) != 1) return 1;
    while (read(sandbox::kInputFd, &c, 1) > 0) {
    }
    return 0;
  }
  if (mode == "host-paths") {
    // "/" is the test's empty rootfs with one marker file in it.
    struct stat marker;
    int rc = Check(stat("/marker", &marker) == 0, "marker missing: / is not the rootfs");
    for (const char* host : {"/etc/passwd", "/proc/self/status", "/sys/kernel", "/dev/null", "/tmp",
                             "/usr/lib", "/../etc/passwd", "/work"}) {
      if (open(host, O_RDONLY | O_CLOEXEC) >= 0 || errno != ENOENT) {
        fprintf(stderr, "jail_probe: host path %s reachable (errno %d)\n", host, errno);
        rc = 1;
      }
    }
    // ".." from the root stays at the root.
    struct stat root, up;
    rc |= Check(stat("/", &root) == 0 && stat("/..", &up) == 0, "stat");
    rc |= Check(root.st_ino == up.st_ino && root.st_dev == up.st_dev, "/.. is not /");
    return rc;
  }
  if (mode == "fds") {
    for (int fd = 0; fd < 4; ++fd) {  // fstat: fcntl on fd 0 is forbidden
      struct stat st;
      if (fstat(fd, &st) < 0) return Check(false, "fd 0-3 not open");
    }
    for (int fd = 4; fd < 1024; ++fd) {
      if (fcntl(fd, F_GETFD) >= 0) {
        fprintf(stderr, "jail_probe: fd %d leaked into the jail\n", fd);
        return 1;
      }
    }
    return 0;
  }
  if (mode == "write-rootfs") {
    // Writing inside the rootfs works (the extractor's whole job).
    int fd = open("/written", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    return Check(fd >= 0 && write(fd, "ok", 2) == 2, "write inside rootfs");
  }
  if (mode.rfind("lie-extent-", 0) == 0) return LieAboutData(mode, config);
  if (mode.rfind("lie-", 0) == 0) return Lie(mode);
  if (mode == "crash-mid-layer" || mode == "syscall-mid-layer") {
    // An extractor a layer has taken over halfway: it has read some of the
    // layer, written into the rootfs and sent records, then it crashes or
    // tries a forbidden syscall. The broker must leave nothing of it.
    char buf[4096];
    (void)!read(sandbox::kInputFd, buf, sizeof(buf));
    int fd = open("/half-written", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0) (void)!write(fd, "half", 4);
    wire::ChannelWriter writer(sandbox::kChannelFd);
    (void)writer.Add(extractor::EntryRecord{
        .path = "half-written", .kind = extractor::Kind::kFile, .mode = 0644, .size = 4});
    (void)writer.Flush();
    if (mode == "syscall-mid-layer") syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);
    *static_cast<volatile int*>(nullptr) = 1;  // SIGSEGV
    return 0;
  }

#ifdef LAYERX_SANITIZE
  // A bug inside the jail, in a sanitizer build: the report must get out.
  if (mode == "asan-heap-overflow") {
    char* p = new char[argc];                         // argc == 2
    static_cast<volatile char*>(p)[argc + 14] = 'x';  // 16 bytes past the end
    delete[] p;
  }
  if (mode == "ubsan-overflow") {
    int big = __INT_MAX__ - 1;
    big += argc;  // signed overflow
    return big == 0;
  }
  if (mode == "asan-segv") *reinterpret_cast<volatile int*>(uintptr_t(argc) * 8) = argc;  // 0x10
#endif

  // The data fd (the ext4 image, fd 6): this layer writes from its start on,
  // and nothing else may be done to the file.
  const int data = sandbox::kDataFd;
  const off_t start = static_cast<off_t>(config.data.start);
  if (mode == "data-pwrite-at-start") {
    return Check(pwrite(data, "mine", 4, start) == 4, "pwrite at the layer's start");
  }
  if (mode == "data-read") {
    // Write-only: the lower layers' data cannot be read back either.
    char c;
    return Check(pread(data, &c, 1, 0) < 0 && errno == EBADF, "pread of the data fd");
  }
  if (mode == "data-getfl") fcntl(data, F_GETFL);
  if (mode == "data-append") {
    // O_APPEND would make pwrite64 write at the end, whatever the offset.
    fcntl(data, F_SETFL, O_APPEND);
    pwrite(data, "evil", 4, start);
  }
  if (mode == "input-metadata") {
    // fd 0 is the layer's own host file (direct input): each of these must be
    // killed before it returns; exits 1 naming the first that passed.
    if (fchmod(0, 04777) == 0) return Check(false, "fchmod(0, 04777) changed the host layer file");
    if (fsetxattr(0, "user.layerx_probe", "v", 1, 0) == 0)
      return Check(false, "fsetxattr(0) changed the host layer file");
    struct timespec ts[2] = {{0, 0}, {0, 0}};
    if (syscall(SYS_utimensat, 0, nullptr, ts, 0) == 0)
      return Check(false, "utimensat(0) changed the host layer file");
    int copy = dup(0);
    if (copy >= 0 && fchmod(copy, 0666) == 0) return Check(false, "fchmod(dup(0)) passed");
    return 1;
  }
  if (mode == "data-copy-allowed") {
    // With copy_input, copy_file_range from fd 0 into the data fd passes the
    // filters (fd 0 is a pipe here: the kernel then refuses it, EINVAL).
    loff_t out = start;
    return Check(copy_file_range(0, nullptr, data, &out, 4, 0) < 0 && errno == EINVAL,
                 "copy_file_range from fd 0 reaches the kernel");
  }
  // Each of these must be killed by seccomp before it returns.
  if (mode == "data-copy") {
    loff_t out = start - 4;  // the offset is behind a pointer: no filter can see it
    copy_file_range(0, nullptr, data, &out, 4, 0);
  }
  if (mode == "data-copy-from-other-fd") {
    loff_t out = start;
    copy_file_range(2, nullptr, data, &out, 4, 0);
  }
  if (mode == "data-copy-flags") {
    loff_t out = start;
    copy_file_range(0, nullptr, data, &out, 4, 1);
  }
  if (mode == "data-pwrite-below") pwrite(data, "evil", 4, start - 4);
  if (mode == "data-pwrite-high-fd") {
    // The kernel reads only the fd's low 32 bits: so must the filter.
    syscall(SYS_pwrite64, 0x100000000L | data, "evil", 4, 0L);
  }
  if (mode == "data-write") write(data, "evil", 4);
  if (mode == "data-writev") {
    struct iovec iov = {const_cast<char*>("evil"), 4};
    writev(data, &iov, 1);
  }
  if (mode == "data-ftruncate") ftruncate(data, 0);
  if (mode == "data-fallocate")
    fallocate(data, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096);
  if (mode == "data-fchmod") fchmod(data, 06777);
  if (mode == "data-fchown") fchown(data, 0, 0);
  if (mode == "data-fchownat") fchownat(data, "", 0, 0, AT_EMPTY_PATH);
  if (mode == "data-fsetxattr") fsetxattr(data, "user.x", "v", 1, 0);
  if (mode == "data-utimensat") syscall(SYS_utimensat, data, nullptr, nullptr, 0);
  if (mode == "data-dup") dup(data);
  if (mode == "data-dup3") dup3(data, 100, 0);
  if (mode == "data-fcntl-dupfd") fcntl(data, F_DUPFD_CLOEXEC, 100);
  if (mode == "data-linkat") linkat(data, "", AT_FDCWD, "/stolen", AT_EMPTY_PATH);
  if (mode == "data-mmap") mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, data, 0);
  if (mode == "socket") syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);
  if (mode == "socket-unix") syscall(SYS_socket, AF_UNIX, SOCK_STREAM, 0);
  if (mode == "ptrace") syscall(SYS_ptrace, PTRACE_ATTACH, 1, 0, 0);
  if (mode == "execve") {
    char* args[] = {const_cast<char*>("/bin/sh"), nullptr};
    syscall(SYS_execve, "/bin/sh", args, nullptr);
  }
  if (mode == "execveat") syscall(SYS_execveat, AT_FDCWD, "/bin/sh", nullptr, nullptr, 0);
  if (mode == "mount") syscall(SYS_mount, "none", "/", "tmpfs", 0, nullptr);
  if (mode == "umount") syscall(SYS_umount2, "/", MNT_DETACH);
  if (mode == "unshare") syscall(SYS_unshare, CLONE_NEWUSER);
  if (mode == "setns") syscall(SYS_setns, 0, 0);
  if (mode == "clone") syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
  if (mode == "fork") syscall(SYS_fork);
  if (mode == "keyctl") syscall(SYS_keyctl, 0, 0, 0, 0, 0);
  if (mode == "add_key") syscall(SYS_add_key, "user", "x", "y", 1, 0);
  if (mode == "bpf") syscall(SYS_bpf, BPF_PROG_LOAD, nullptr, 0);
  if (mode == "io_uring") syscall(SYS_io_uring_setup, 1, nullptr);
  if (mode == "userfaultfd") syscall(SYS_userfaultfd, 0);
  if (mode == "perf") syscall(SYS_perf_event_open, nullptr, 0, -1, -1, 0);
  if (mode == "chroot") syscall(SYS_chroot, "/");
  if (mode == "pivot_root") syscall(SYS_pivot_root, ".", ".");
  if (mode == "open_by_handle_at") syscall(SYS_open_by_handle_at, 0, nullptr, 0);
  if (mode == "init_module") syscall(SYS_init_module, nullptr, 0, "");
  if (mode == "capset") {
    // Regaining a capability: even through libcap's capset.
    cap_t caps = cap_from_text("all=eip");
    cap_set_proc(caps);
  }
  if (mode == "setuid") syscall(SYS_setuid, 0);
  if (mode == "mmap-exec")
    mmap(nullptr, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mode == "mprotect-exec") {
    void* p = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mprotect(p, 4096, PROT_READ | PROT_EXEC);
  }
  if (mode == "connect-channel") {
    // Even on its own socket the extractor may only write, not send fds.
    char c = 'x';
    struct iovec iov = {&c, 1};
    struct msghdr msg = {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    syscall(SYS_sendmsg, sandbox::kChannelFd, &msg, 0);
  }
  fprintf(stderr, "jail_probe: mode %s survived\n", mode.c_str());
  return 3;
}
