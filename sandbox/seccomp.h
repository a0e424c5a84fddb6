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
// With a data fd (kDataFd), only pwrite64 at offsets >= `data_start` writes it.
Result<std::vector<sock_filter>> CompileSeccompFilter(
    const policy::Policy& policy, std::optional<uint64_t> data_start = std::nullopt);

}  // namespace layerx::sandbox
