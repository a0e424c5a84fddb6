// What the broker hands the jailed child besides its fds: a sealed memfd holding
// this header followed by the compiled seccomp programs, sent with the layer's
// input in one start message (sandbox/spawn.h). Both sides come from the
// same build, so a plain struct is the format; magic and size catch a mismatch.
#pragma once

#include <linux/filter.h>

#include <cstdint>

#include "policy/limits.h"

namespace layerx::sandbox {

inline constexpr uint32_t kJailConfigMagic = 0x6c786a33;  // "lxj3"

// Where a layer's regular-file data goes.
enum class DataMode : uint32_t {
  kTree = 0,         // into the files of the tree (a rootfs, a docker-archive's staging)
  kImage = 1,        // into the data fd (the ext4 image); the tree gets placeholders
  kTreeAndImage = 2, // both (a rootfs and an ext4 image)
  kDiscard = 3,      // nowhere: placeholders only (a manifest is all that is wanted)
};

// The data fd (kDataFd) of kImage/kTreeAndImage: the extractor appends each
// file's data at block-aligned offsets from `start` on and reports where in the
// file's record. SECURITY: seccomp lets it write to that fd only with pwrite64 at
// offsets >= `start`, so a layer cannot touch a lower layer's data (or anything
// else about the image file: no truncate, chmod, xattrs or dup of it); see
// sandbox/seccomp.h, CompileFdFilter.
//
// `copy_input` (kImage only): fd 0 is the layer's file itself, not a pipe, and
// nothing of anyone else's lies below `start` (the first layer: only the
// image's front, which the broker punches out and writes last). Then the
// extractor may also copy_file_range(2) from fd 0 into the data fd, which
// seccomp cannot bound by offset (it cannot read the offset pointer).
struct JailData {
  DataMode mode = DataMode::kTree;
  uint32_t block_size = 4096;
  uint64_t start = 0;
  uint32_t copy_input = 0;
  uint32_t reserved = 0;
};

struct JailConfigHeader {
  uint32_t magic = kJailConfigMagic;
  uint32_t header_size = sizeof(JailConfigHeader);
  policy::JailRlimits rlimits;
  policy::Limits limits;      // the extractor's per-layer limits
  policy::EntryRules rules;   // kinds, bits and xattrs a layer may bring
  uint32_t keep_fs_caps = 0;  // 1: keep CHOWN, DAC_OVERRIDE, FOWNER, FSETID (full id range)
  JailData data;
  uint32_t bpf_instructions = 0;
  uint32_t data_bpf_instructions = 0;  // the fd filter (fd 0, the data fd); never 0
  // followed by bpf_instructions, then data_bpf_instructions, sock_filters
};

// The fds every jailed child finds after exec; everything else is closed.
inline constexpr int kInputFd = 0;    // the layer: a pipe the broker feeds, or its file (copy_input)
inline constexpr int kStderrFd = 2;   // a pipe the broker reads and re-logs (fd 1 too)
inline constexpr int kChannelFd = 3;  // the record socket
inline constexpr int kRootfsFd = 4;   // the image rootfs dir; closed after the pivot
inline constexpr int kStartFd = 5;    // a socket: the start message (fd 0 and the sealed
                                      // config memfd); closed after setup
inline constexpr int kDataFd = 6;     // the ext4 image, write-only (DataMode kImage, kTreeAndImage)

// Exit status of a child whose setup failed before its program ran.
inline constexpr int kSetupFailedExit = 125;

}  // namespace layerx::sandbox
