// The policy model: what a job may do and how the jail is built. A Policy is a
// plain value; PolicyBuilder checks it and reports the first problem.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "policy/limits.h"
#include "policy/result.h"

namespace layerx::policy {

enum class SeccompAction {
  kKillProcess,  // default: a forbidden syscall kills the extractor (SIGSYS)
  kErrno,        // it fails with EPERM instead (for debugging)
};

// How ids inside the jail map to the host.
struct IdMapping {
  // Host ids that inside id 0 maps to, and how many ids are mapped from 0 up.
  // count == 1: rootless, the caller is the only id and true ownership lives in
  // metadata. count > 1 needs root (or newuidmap) and lets the extractor chown.
  uint32_t host_uid = 0;
  uint32_t host_gid = 0;
  uint32_t count = 1;
  bool full_range() const { return count > 1; }
};

struct Policy {
  Limits limits;
  EntryRules rules;
  JailRlimits rlimits;
  SeccompAction seccomp_action = SeccompAction::kKillProcess;
  IdMapping ids;
};

// The policy layerx uses when nothing is configured: rootless mapping of the
// calling uid/gid, or, when the caller is root, the full 32-bit identity range so
// the rootfs gets true ownership.
Policy DefaultPolicy();

class PolicyBuilder {
 public:
  PolicyBuilder() : policy_(DefaultPolicy()) {}
  explicit PolicyBuilder(Policy base) : policy_(std::move(base)) {}

  PolicyBuilder& LayerTimeoutMs(uint64_t ms);
  PolicyBuilder& JobTimeoutMs(uint64_t ms);
  PolicyBuilder& MaxEntries(uint64_t n);
  PolicyBuilder& MaxLayerBytes(uint64_t n);
  PolicyBuilder& SeccompOnViolation(SeccompAction action);
  // Maps inside ids [0, count) to host [host_uid, host_uid+count).
  PolicyBuilder& MapIds(uint32_t host_uid, uint32_t host_gid, uint32_t count);
  PolicyBuilder& Rlimits(JailRlimits rlimits);

  Result<Policy> Build() const;

 private:
  void Record(Error error);
  Policy policy_;
  std::optional<Error> first_error_;
};

}  // namespace layerx::policy
