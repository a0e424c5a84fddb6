#include "sandbox/seccomp.h"

#include <errno.h>
#include <seccomp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <memory>

#include "sandbox/sys.h"

namespace layerx::sandbox {

namespace {

// What the extractor really calls (glibc, libstdc++, libarchive's built-in
// filters, capnp's writer). No socket calls: the record socket is written with
// write(2). No clone/fork/exec, no mount or namespace calls, no ptrace.
constexpr const char* kAllowed[] = {
    "read",          "write",
    "readv",         "writev",
    "pread64",       "pwrite64",
    "lseek",         "close",
    "openat",        "openat2",
    "newfstatat",    "fstat",
    "statx",         "lstat",
    "stat",          "mkdirat",
    "unlinkat",      "renameat",
    "renameat2",     "symlinkat",
    "linkat",        "readlinkat",
    "mknodat",  // fifos only: a user namespace cannot make device nodes
    "fchmod",        "fchmodat",
    "fchmodat2",     "fchown",
    "fchownat",      "utimensat",
    "fsetxattr",     "lsetxattr",
    "fgetxattr",     "lgetxattr",
    "flistxattr",    "llistxattr",
    "fremovexattr",  "lremovexattr",
    "getdents64",    "ftruncate",
    "fallocate",     "fsync",
    "fdatasync",     "fcntl",
    "dup",           "dup3",
    "brk",           "munmap",
    "mremap",        "madvise",
    "exit",          "exit_group",
    "rt_sigreturn",  "rt_sigprocmask",
    "clock_gettime", "clock_nanosleep",
    "nanosleep",     "gettid",
    "getpid",        "getuid",
    "geteuid",       "getgid",
    "getegid",       "futex",
    "sched_yield",   "restart_syscall",
    "getrandom",     "umask",
    "getrusage",  // the extractor reports its peak RSS
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

Result<std::vector<sock_filter>> CompileSeccompFilter(const policy::Policy& policy) {
  uint32_t deny = policy.seccomp_action == policy::SeccompAction::kKillProcess
                      ? SCMP_ACT_KILL_PROCESS
                      : SCMP_ACT_ERRNO(EPERM);
  std::unique_ptr<void, CtxDeleter> ctx(seccomp_init(deny));
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
  // Memory may be mapped but never executable: even a loader that somehow ran
  // could not map the image's code (rule 6, second wall).
  for (int nr : {SCMP_SYS(mmap), SCMP_SYS(mprotect)}) {
    LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, nr, 1,
                                  SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0)),
                 "mmap rule"));
  }
  // rt_sigaction only for SIGXFSZ/SIGPIPE ignoring at setup is done before the
  // filter; abort() may still want it, so allow it (it grants nothing).
  LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, SCMP_SYS(rt_sigaction), 0),
               "rt_sigaction"));
  // tgkill only towards ourselves (abort() raising SIGABRT).
  LX_TRY(Check(seccomp_rule_add(ctx.get(), SCMP_ACT_ALLOW, SCMP_SYS(tgkill), 0), "tgkill"));

  LX_ASSIGN_OR_RETURN(UniqueFd memfd, MemfdCreate("layerx-bpf"));
  LX_TRY(Check(seccomp_export_bpf(ctx.get(), memfd.get()), "export"));
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

}  // namespace layerx::sandbox
