// The ext4 image: e2fsprogs' `mkfs.ext4 -d` copies the merged tree (no mount, no
// loop device, no root), then one pass through libext2fs gives every inode its
// true metadata from the ImageTree: uid/gid (32-bit), full mode incl. setuid,
// atime/mtime/ctime with nanoseconds, exactly the layers' xattrs (file
// capabilities, user.*, ACLs), and the device nodes a user namespace could not
// make. Names are bytes throughout; nothing goes through a text command language.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

#include "broker/image_tree.h"
#include "policy/result.h"

namespace layerx::broker {

struct Ext4Options {
  std::optional<uint64_t> size_bytes;   // unset: computed from the content
  uint32_t block_size = 4096;           // 1024, 2048 or 4096
  std::optional<uint32_t> inode_ratio;  // bytes per inode; unset: from the entry count
  std::string label;                    // at most 16 bytes
  std::optional<std::string> uuid;      // unset: random, or derived when reproducible
  // A reproducible image: the UUID and hash seed come from `seed` (unless
  // given), every timestamp no layer set is `source_date_epoch` (default: the
  // newest mtime in the tree), and the same input gives a byte-identical image.
  bool reproducible = false;
  std::optional<int64_t> source_date_epoch;
  std::string seed;  // e.g. the layers' digests; only used when reproducible
};

struct Ext4Plan {
  uint64_t content_bytes = 0;  // file data, as the tree says
  uint64_t inodes = 0;         // distinct inodes in the tree
  uint64_t size_bytes = 0;     // the image size to make
  uint64_t inode_count = 0;    // -N for mkfs
};

// Sizes the image from the merged metadata: data blocks, directory blocks,
// long symlinks, xattr blocks, inode tables, the journal mkfs will add, with
// modest headroom. A given size smaller than the content needs is kPolicy.
Result<Ext4Plan> PlanExt4(const ImageTree& tree, const Ext4Options& options);

struct Ext4Report {
  Ext4Plan plan;
  int64_t mkfs_ns = 0;
  int64_t pass_ns = 0;
};

// Stops a tool the build runs (mkfs): a cancel flag and a monotonic deadline.
struct ToolControl {
  const std::atomic<bool>* cancel = nullptr;
  int64_t deadline_ns = 0;  // 0: none
};

// Builds `image_path` (which must not exist; the caller renames it into place)
// from the tree on disk at `rootfs_path` (the work rootfs, as the extractors
// left it) and the metadata in `tree`. Rootless, mkfs runs in a user namespace
// where the caller is root over its own files, so modes like 0000 copy too.
Result<Ext4Report> BuildExt4(const std::string& rootfs_path, const ImageTree& tree,
                             const Ext4Plan& plan, const Ext4Options& options,
                             const std::string& image_path, const ToolControl& control = {});

}  // namespace layerx::broker
