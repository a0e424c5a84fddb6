// The extractor's syscall allowlist, compiled with libseccomp in the (trusted)
// parent and installed by the child as its last setup step.
#pragma once

#include <linux/filter.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "policy/policy.h"

namespace layerx::sandbox {

// Compiles the allowlist for `policy` to classic BPF for this architecture.
// Allowed: file I/O on fds and *at paths, memory management without PROT_EXEC,
// exit. Everything else (socket, exec, ptrace, mount, unshare/setns, keyctl, bpf,
// io_uring, userfaultfd, perf_event_open, clone/fork...) takes the policy's action.
Result<std::vector<sock_filter>> CompileSeccompFilter(const policy::Policy& policy);

// A second filter, stacked on the first when the jail gets a data fd
// (kDataFd, the ext4 image): on that fd only pwrite64 at offsets >=
// `data_start` and looking (fstat, F_GETFL) pass; writing it otherwise,
// truncating, punching, chmod/chown, xattrs, times, linking it, mapping it or
// duplicating it take the policy's action; copy_file_range into it too, unless
// `allow_copy` (JailData::copy_input: nothing below the window to protect).
// Everything else it allows (the allowlist decides). The kernel runs both; the
// stricter answer wins.
Result<std::vector<sock_filter>> CompileDataFdFilter(const policy::Policy& policy,
                                                     uint64_t data_start, bool allow_copy);

}  // namespace layerx::sandbox
