// The extractor's syscall allowlist, compiled with libseccomp in the (trusted)
// parent and installed by the child as its last setup step.
#pragma once

#include <linux/filter.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "policy/policy.h"
#include "sandbox/jail_config.h"

namespace layerx::sandbox {

// Compiles the allowlist for `policy` to classic BPF for this architecture.
// Allowed: file I/O on fds and *at paths, memory management without PROT_EXEC,
// exit. Everything else (socket, exec, ptrace, mount, unshare/setns, keyctl, bpf,
// io_uring, userfaultfd, perf_event_open, clone/fork...) takes the policy's action.
Result<std::vector<sock_filter>> CompileSeccompFilter(const policy::Policy& policy);

// A second filter, stacked on the first in every jail, for the two fds that
// reach the host's files. fd 0 (the layer: a pipe, or a read-only open of the
// caller's own file) may only be read: writing it, chmod/chown, xattrs,
// times, fcntl, dup or linking it take the policy's action. With a data fd
// (kDataFd, the ext4 image; data.mode kImage or kTreeAndImage): on that fd only
// pwrite64 at offsets >= data.start and looking (fstat) pass; writing it
// otherwise, truncating, punching, chmod/chown, xattrs, times, linking it,
// mapping it or duplicating it take the policy's action; copy_file_range into
// it too, unless data.copy_input (nothing below the window to protect).
// Everything else it allows (the allowlist decides). The kernel runs both;
// the stricter answer wins.
Result<std::vector<sock_filter>> CompileFdFilter(const policy::Policy& policy,
                                                 const JailData& data);

}  // namespace layerx::sandbox
