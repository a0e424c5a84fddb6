// broker/ext4: the ext4 image built with libext2fs from the tree (ext4_layout:
// the tree as the image holds it; ext4_builder: its inodes; ext4_io: the I/O
// manager). May use: tree, log.
//
// The ext4 image, built with libext2fs straight from the merged records. The
// jailed extractors already wrote every regular file's bytes into the image
// file, block-aligned from Ext4DataStart() on (sandbox/jail_config.h, DataMode
// kImage), and their records say where (checked by ImageTree). The build only
// adds the metadata around that data: a superblock and groups sized from the
// tree, every inode with its true uid/gid (32-bit), mode (setuid included),
// times with nanoseconds and xattrs (file capabilities, user.*, ACLs) at
// creation, extents pointing at the data where it stands, directories
// assembled in memory and written whole, symlinks fast and slow, device nodes,
// fifos, hardlinks as one inode, lost+found and a journal. The blocks of data
// no live file uses (a later layer removed or replaced it) are punched out.
// No program runs, and no file of the work tree is opened: names are bytes
// throughout and nothing goes through a text command language.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

#include "broker/tree/image_tree.h"
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

// kPolicy for what no image could be made with (a block size, a label, a
// UUID): checked before any layer runs.
Status CheckExt4Options(const Ext4Options& options);

// The first byte of the image file the layers' data may use: past the
// superblock and the largest group descriptor table an image of at most
// `max_data_bytes` of file data (or of options.size_bytes) could need.
uint64_t Ext4DataStart(const Ext4Options& options, uint64_t max_data_bytes);

struct Ext4Plan {
  uint64_t content_bytes = 0;  // file data of the live files
  uint64_t inodes = 0;         // distinct inodes in the tree
  uint64_t size_bytes = 0;     // the image size
  uint64_t inode_count = 0;    // inodes the filesystem has room for
  uint64_t dead_bytes = 0;     // data written by a layer and dropped since (punched out)
};

struct Ext4Report {
  Ext4Plan plan;
  int64_t build_ns = 0;
};

// Stops the build: a cancel flag and a monotonic deadline, looked at between
// inodes.
struct BuildControl {
  const std::atomic<bool>* cancel = nullptr;
  int64_t deadline_ns = 0;  // 0: none
};

// Builds the filesystem into `image_fd` (borrowed, open read-write; the layers'
// data stands in it from `data_start` on) from `tree`. The file ends up exactly
// the image's size. Errors: kPolicy (a given size or inode ratio too small),
// kLimitExceeded (more links to one inode than ext4 holds), kPeer (records whose
// data overlaps another live file's: a lying extractor), kOs.
Result<Ext4Report> BuildExt4(int image_fd, const ImageTree& tree, uint64_t data_start,
                             const Ext4Options& options, const BuildControl& control = {});

}  // namespace layerx::broker
