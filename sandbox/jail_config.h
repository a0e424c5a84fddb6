// What the broker hands the jailed child besides its fds: a sealed memfd holding
// this header followed by the compiled seccomp program. Both sides come from the
// same build, so a plain struct is the format; magic and size catch a mismatch.
#pragma once

#include <linux/filter.h>

#include <cstdint>

#include "policy/limits.h"

namespace layerx::sandbox {

inline constexpr uint32_t kJailConfigMagic = 0x6c786a32;  // "lxj2"

struct JailConfigHeader {
  uint32_t magic = kJailConfigMagic;
  uint32_t header_size = sizeof(JailConfigHeader);
  policy::JailRlimits rlimits;
  policy::Limits limits;      // the extractor's per-layer limits
  policy::EntryRules rules;   // kinds, bits and xattrs a layer may bring
  uint32_t keep_fs_caps = 0;  // 1: keep CHOWN, DAC_OVERRIDE, FOWNER, FSETID (full id range)
  uint32_t bpf_instructions = 0;
  // followed by bpf_instructions * sizeof(sock_filter)
};

// The fds every jailed child finds after exec; everything else is closed.
inline constexpr int kInputFd = 0;    // the layer stream (a pipe the broker feeds)
inline constexpr int kStderrFd = 2;   // a pipe the broker reads and re-logs (fd 1 too)
inline constexpr int kChannelFd = 3;  // the record socket
inline constexpr int kRootfsFd = 4;   // the image rootfs dir; closed after the pivot
inline constexpr int kConfigFd = 5;   // the sealed JailConfig memfd; closed after setup

// Exit status of a child whose setup failed before its program ran.
inline constexpr int kSetupFailedExit = 125;

}  // namespace layerx::sandbox
