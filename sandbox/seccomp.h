// The extractor's syscall allowlist, compiled with libseccomp in the (trusted)
// parent and installed by the child as its last setup step.
#pragma once

#include <linux/filter.h>

#include <vector>

#include "policy/policy.h"

namespace layerx::sandbox {

// Compiles the allowlist for `policy` to classic BPF for this architecture.
// Allowed: file I/O on fds and *at paths, memory management without PROT_EXEC,
// exit. Everything else (socket, exec, ptrace, mount, unshare/setns, keyctl, bpf,
// io_uring, userfaultfd, perf_event_open, clone/fork...) takes the policy's action.
Result<std::vector<sock_filter>> CompileSeccompFilter(const policy::Policy& policy);

}  // namespace layerx::sandbox
