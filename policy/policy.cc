#include "policy/policy.h"

#include <unistd.h>

#include <fstream>

namespace layerx::policy {

namespace {

// Whether this process's user namespace maps every id (the initial namespace,
// or a container that maps the full range). Root of a namespace that maps only
// a few ids (a rootless container, `unshare -r`) cannot hand a full range on.
bool MapsEveryId(const char* map_file) {
  std::ifstream in(map_file);
  uint64_t inside = 0, outside = 0, count = 0;
  while (in >> inside >> outside >> count) {
    if (inside == 0 && count == 4294967295u) return true;
  }
  return false;
}

}  // namespace

Policy DefaultPolicy() {
  Policy policy;
  if (geteuid() == 0 && MapsEveryId("/proc/self/uid_map") && MapsEveryId("/proc/self/gid_map")) {
    // uid 4294967295 is (uid_t)-1 and can never be mapped.
    policy.ids = IdMapping{.host_uid = 0, .host_gid = 0, .count = 4294967295u};
  } else {
    policy.ids = IdMapping{.host_uid = geteuid(), .host_gid = getegid(), .count = 1};
  }
  return policy;
}

void PolicyBuilder::Record(Error error) {
  if (!first_error_) first_error_ = std::move(error);
}

PolicyBuilder& PolicyBuilder::LayerTimeoutMs(uint64_t ms) {
  if (ms == 0) Record(MakeError(ErrorKind::kPolicy, "layer_timeout_ms must be positive"));
  policy_.limits.layer_timeout_ms = ms;
  return *this;
}

PolicyBuilder& PolicyBuilder::JobTimeoutMs(uint64_t ms) {
  if (ms == 0) Record(MakeError(ErrorKind::kPolicy, "job_timeout_ms must be positive"));
  policy_.limits.job_timeout_ms = ms;
  return *this;
}

PolicyBuilder& PolicyBuilder::MaxEntries(uint64_t n) {
  if (n == 0) Record(MakeError(ErrorKind::kPolicy, "max_entries must be positive"));
  policy_.limits.max_entries = n;
  return *this;
}

PolicyBuilder& PolicyBuilder::MaxLayerBytes(uint64_t n) {
  policy_.limits.max_layer_bytes = n;
  return *this;
}

PolicyBuilder& PolicyBuilder::SeccompOnViolation(SeccompAction action) {
  policy_.seccomp_action = action;
  return *this;
}

PolicyBuilder& PolicyBuilder::MapIds(uint32_t host_uid, uint32_t host_gid, uint32_t count) {
  if (count == 0) Record(MakeError(ErrorKind::kPolicy, "id mapping count must be positive"));
  if (uint64_t{host_uid} + count > 4294967295u || uint64_t{host_gid} + count > 4294967295u) {
    Record(MakeError(ErrorKind::kPolicy, "id mapping {}+{} overflows 32 bits", host_uid, count));
  }
  policy_.ids = IdMapping{.host_uid = host_uid, .host_gid = host_gid, .count = count};
  return *this;
}

PolicyBuilder& PolicyBuilder::Rlimits(JailRlimits rlimits) {
  if (rlimits.open_files < 8) Record(MakeError(ErrorKind::kPolicy, "rlimit open_files < 8"));
  policy_.rlimits = rlimits;
  return *this;
}

Result<Policy> PolicyBuilder::Build() const {
  if (first_error_) return Fail(*first_error_);
  return policy_;
}

}  // namespace layerx::policy
