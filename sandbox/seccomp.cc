#include "sandbox/seccomp.h"

#include <errno.h>
#include <fcntl.h>
#include <seccomp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <memory>
#include <optional>

#include "sandbox/jail_config.h"
#include "sandbox/sys.h"

namespace layerx::sandbox {

namespace {

// What the extractor really calls (glibc, libstdc++, libarchive's built-in
// filters, capnp's writer). No socket calls: the record socket is written with
// write(2). No clone/fork/exec, no mount or namespace calls, no ptrace.
constexpr const char* kAllowed[] = {
    "read",
    "readv",
    "pread64",
    "lseek",
    "close",
    "openat",
    "openat2",
    "newfstatat",
    "fstat",
    "statx",
    "lstat",
    "stat",
    "mkdirat",
    "unlinkat",
    "renameat",
    "renameat2",
    "symlinkat",
    "readlinkat",
    "mknodat",  // fifos only: a user namespace cannot make device nodes
    "lsetxattr",
    "fgetxattr",
    "lgetxattr",
    "flistxattr",
    "llistxattr",
    "lremovexattr",
    "getdents64",
    "fsync",
    "fdatasync",
    "brk",
    "munmap",
    "mremap",
    "madvise",
    "exit",
    "exit_group",
    "rt_sigreturn",
    "rt_sigprocmask",
    "clock_gettime",
    "clock_nanosleep",
    "nanosleep",
    "gettid",
    "getpid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "futex",
    "sched_yield",
    "restart_syscall",
    "getrandom",
    "umask",
    "getrusage",  // the extractor reports its peak RSS
};

// Allowed by the allowlist, but never on the data fd (the ext4 image, fd 6),
// which a second filter (CompileFdFilter) sees to: what could
// write it other than pwrite64 past this layer's start, change its size, mode,
// owner, times or xattrs, link it into the tree, or make a second fd for it.
// The fd is compared on its low 32 bits, as the kernel reads it.
constexpr const char* kNotOnDataFd[] = {
    "write",     "writev",       "ftruncate", "fallocate", "fchmod", "fchown",
    "fsetxattr", "fremovexattr", "fcntl",     "dup",       "dup3",   "utimensat",
    "fchmodat",  "fchmodat2",    "fchownat",  "linkat",
};

#ifdef LAYERX_SANITIZE
// Sanitizer test builds only (LAYERX_SANITIZE): what the ASan and UBSan
// runtimes call inside the jail, found by running the whole suite with the
// deny action set to SCMP_ACT_LOG and reading the kernel's audit lines, and by
// strace -f -k for the callers. None of them is in SpawnTest's forbidden list.
constexpr const char* kSanitizerRuntime[] = {
    // UBSan's vptr check (__ubsan::checkDynamicType -> IsAccessibleMemoryRange)
    // probes memory by write(2)-ing it into a fresh pipe.
    "pipe2",
    // A report re-reads /proc/self/maps and /proc/self/exe (ENOENT in the jail;
    // the memory map is cached before the pivot, see sandbox/jail.cc). Nothing
    // more than the openat and readlinkat with AT_FDCWD allowed above.
    "open",
    "readlink",
};
#endif

struct CtxDeleter {
  void operator()(scmp_filter_ctx ctx) const { seccomp_release(ctx); }
};

Status Check(int rc, const char* what) {
  // libseccomp returns -errno.
  if (rc < 0) return Fail(OsError(-rc, "seccomp {}", what));
  return {};
}

}  // namespace

namespace {

Result<std::vector<sock_filter>> Export(scmp_filter_ctx ctx) {
  LX_ASSIGN_OR_RETURN(UniqueFd memfd, MemfdCreate("layerx-bpf"));
  LX_TRY(Check(seccomp_export_bpf(ctx, memfd.get()), "export"));
  LX_ASSIGN_OR_RETURN(struct stat st, Fstat(memfd.get()));
  if (st.st_size <= 0 || st.st_size % sizeof(sock_filter) != 0) {
    return Fail(MakeError(ErrorKind::kInternal, "seccomp export: bad size {}", st.st_size));
  }
  std::vector<sock_filter> program(static_cast<size_t>(st.st_size) / sizeof(sock_filter));
  if (::pread(memfd.get(), program.data(), static_cast<size_t>(st.st_size), 0) != st.st_size) {
    return Fail(OsError(errno, "read seccomp program"));
  }
  return program;
}

uint32_t DenyAction(const policy::Policy& policy) {
  return policy.seccomp_action == policy::SeccompAction::kKillProcess ? SCMP_ACT_KILL_PROCESS
                                                                      : SCMP_ACT_ERRNO(EPERM);
}

}  // namespace

Result<std::vector<sock_filter>> CompileFdFilter(const policy::Policy& policy,
                                                 const JailData& data) {
  std::unique_ptr<void, CtxDeleter> ctx(seccomp_init(SCMP_ACT_ALLOW));
  if (!ctx) return Fail(MakeError(ErrorKind::kOs, "seccomp_init failed"));
  LX_TRY(Check(seccomp_attr_set(ctx.get(), SCMP_FLTATR_CTL_NNP, 0), "attr nnp"));
  const uint32_t deny = DenyAction(policy);
  // The kernel reads an fd argument's low 32 bits only: so does this match
  // (a plain 64-bit "!= 6" would let 0x100000006 through).
  auto is_data_fd = [](unsigned arg) {
    return scmp_arg_cmp{arg, SCMP_CMP_MASKED_EQ, 0xffffffffu, static_cast<scmp_datum_t>(kDataFd)};
  };
  auto is_input_fd = [](unsigned arg) {
    return scmp_arg_cmp{arg, SCMP_CMP_MASKED_EQ, 0xffffffffu, static_cast<scmp_datum_t>(kInputFd)};
  };
  // The layer's fd 0 is read and nothing else, ever: it may be a read-only
  // open of the caller's own file (see broker/engine/layer_runner.cc), whose inode
  // the jail's uid owns (rootless: 0 is the caller) or may act on (root: the
  // file caps). fchmod(0, 04755) would make a root-owned blob with the
  // attacker's bytes setuid on the host (the review found it).
  for (const char* name : kNotOnDataFd) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;
    LX_TRY(Check(seccomp_rule_add(ctx.get(), deny, nr, 1, is_input_fd(0)), name));
  }
  LX_TRY(Check(seccomp_rule_add(ctx.get(), deny, SCMP_SYS(pwrite64), 1, is_input_fd(0)),
               "pwrite64 on fd 0"));
  if (data.mode != DataMode::kImage && data.mode != DataMode::kTreeAndImage) {
    return Export(ctx.get());  // no data fd
  }
  const uint64_t data_start = data.start;
  const bool allow_copy = data.copy_input != 0 && data.mode == DataMode::kImage;
  for (const char* name : kNotOnDataFd) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;
    // fcntl among them, every command: F_DUPFD would alias it, and F_SETFL
    // with O_APPEND would make pwrite64 ignore the offset the rule below checks
    // (the review found it). The extractor never needs one on fd 6.
    LX_TRY(Check(seccomp_rule_add(ctx.get(), deny, nr, 1, is_data_fd(0)), name));
  }
  // pwrite64 only from this layer's start on: the lower layers' data and the
  // image's first blocks stay out of reach.
  LX_TRY(Check(seccomp_rule_add(ctx.get(), deny, SCMP_SYS(pwrite64), 2, is_data_fd(0),
                                SCMP_A3_64(SCMP_CMP_LT, data_start)),
               "pwrite64"));
  // Never mapped (it is write-only anyway).
  LX_TRY(Check(seccomp_rule_add(ctx.get(), deny, SCMP_SYS(mmap), 1, is_data_fd(4)), "mmap"));
  // copy_file_range's offset is behind a pointer, out of the filter's sight:
  // only a window with nothing below it may use it.
  if (!allow_copy) {
    LX_TRY(Check(seccomp_rule_add(ctx.get(), deny, SCMP_SYS(copy_file_range), 1, is_data_fd(2)),
                 "copy_file_range"));
  }
  return Export(ctx.get());
}

Result<std::vector<sock_filter>> CompileSeccompFilter(const policy::Policy& policy) {
  std::unique_ptr<void, CtxDeleter> ctx(seccomp_init(DenyAction(policy)));
  if (!ctx) return Fail(MakeError(ErrorKind::kOs, "seccomp_init failed"));
  // A syscall from a foreign ABI (x32, i386 on x86_64) is denied too.
  LX_TRY(Check(seccomp_attr_set(ctx.get(), SCMP_FLTATR_CTL_NNP, 0), "attr nnp"));
  for (const char* name : kAllowed) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;  // not on this architecture (lstat on arm64)
    LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, nr, 0), name));
  }
#ifdef LAYERX_SANITIZE
  for (const char* name : kSanitizerRuntime) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;  // open, readlink: not on arm64
    LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, nr, 0), name));
  }
#endif
  // Allowed here for every fd; the data fd filter below narrows them for fd 6.
  for (const char* name : kNotOnDataFd) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;  // fchmodat2: only in newer libseccomp tables
    LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, nr, 0), name));
  }
  LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, SCMP_SYS(pwrite64), 0), "pwrite64"));
  // copy_file_range only from the layer's file (fd 0) into the data fd, no
  // flags; the data fd filter allows it only where nothing lies below the window.
  auto fd_is = [](unsigned arg, int fd) {
    return scmp_arg_cmp{arg, SCMP_CMP_MASKED_EQ, 0xffffffffu, static_cast<scmp_datum_t>(fd)};
  };
  LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, SCMP_SYS(copy_file_range), 3,
                                fd_is(0, kInputFd), fd_is(2, kDataFd), SCMP_A5(SCMP_CMP_EQ, 0)),
               "copy_file_range rule"));
  // Memory may be mapped but never executable: even a loader that somehow ran
  // could not map the image's code (rule 6, second wall).
  // Nor is the data fd ever mapped (it is write-only anyway).
  LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, SCMP_SYS(mmap), 1,
                                SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0)),
               "mmap rule"));
  LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, SCMP_SYS(mprotect), 1,
                                SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0)),
               "mprotect rule"));
  // rt_sigaction only for SIGXFSZ/SIGPIPE ignoring at setup is done before the
  // filter; abort() may still want it, so allow it (it grants nothing).
  LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, SCMP_SYS(rt_sigaction), 0),
               "rt_sigaction"));
  // tgkill only towards ourselves (abort() raising SIGABRT).
  LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, SCMP_SYS(tgkill), 0), "tgkill"));

  return Export(ctx.get());
}

}  // namespace layerx::sandbox
