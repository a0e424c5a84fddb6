// The child side of the sandbox: called first thing in main() of a program that
// sandbox::Spawn exec'd, before it reads a byte of input. In order:
//   make mounts private; bind the rootfs (fd 4) onto itself nosuid,nodev,noexec;
//   pivot_root into it and detach the old root; wait for the start message
//   (fd 5: the layer's input becomes fd 0, the sealed config is read; a jail
//   spawned ahead of its layer waits here); close every fd but 0-3 (and 6);
//   rlimits; drop every capability (bounding, ambient, inheritable, and all of
//   permitted/effective but the four file caps when a full id range is mapped);
//   no_new_privs; `before_seccomp` (the program's other threads are made
//   there: they inherit all of the above); seccomp last, on every thread.
// After it returns, no path reaches the host, nothing may be exec'd or dlopen'd
// (both are also blocked by seccomp and noexec).
#pragma once

#include <cstdint>
#include <functional>

#include "sandbox/jail_config.h"

namespace layerx::sandbox {

enum class SetupStep : uint32_t {
  kOk = 0,
  kReadConfig,
  kMountPrivate,
  kOpenTree,
  kMountAttr,
  kMoveMount,
  kPivotRoot,
  kDetachOldRoot,
  kCloseFds,
  kRlimits,
  kCapabilities,
  kNoNewPrivs,
  kSeccomp,
  // parent / pre-exec steps
  kWaitForMaps,
  kDupFds,
  kExec,
};

const char* SetupStepName(SetupStep step);

struct JailSetupResult {
  SetupStep step = SetupStep::kOk;
  int err = 0;
  bool ok() const { return step == SetupStep::kOk; }
};

// Enters the jail. On success *config holds the header the broker sent.
// Allocates nothing after the config is read but what `before_seccomp` does;
// logs nothing. The filter never allows clone: a thread the program wants is
// made in `before_seccomp`, with no capability and no_new_privs already set,
// and the filters are then installed on all threads at once (TSYNC).
JailSetupResult EnterJail(JailConfigHeader* config,
                          const std::function<void()>& before_seccomp = {});

}  // namespace layerx::sandbox
