// Internal to broker/ext4: the tree as the ext4 image will hold it. One Node
// per inode (each file's runs of data where the layers wrote it, each
// directory's names), what the filesystem needs beyond that data (Measure),
// and compaction, which moves live data into the room dead data left.
// ext4_builder.h writes it; ext4.cc plans the image around it.
#pragma once

#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>

#include <cstdint>
#include <string_view>
#include <vector>

#include "broker/tree/image_tree.h"
#include "policy/result.h"

namespace layerx::broker::ext4_detail {

using extractor::EntryRecord;
using extractor::Kind;

inline uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }
inline uint64_t DivUp(uint64_t v, uint64_t by) { return (v + by - 1) / by; }

constexpr uint32_t kMaxLinks = 65000;  // EXT4_LINK_MAX: 16 bits on disk, and the kernel's cap
constexpr uint32_t kMaxExtentBlocks = 32768;                       // EXT_INIT_MAX_LEN
constexpr uint32_t kDirTail = sizeof(struct ext2_dir_entry_tail);  // metadata_csum, every dir block

// A run of blocks of one inode: logical block, physical block, length.
struct Run {
  uint64_t logical;
  uint64_t physical;
  uint64_t length;
};

// A live run of a file's data, in blocks, and the node it belongs to.
struct Placed {
  uint64_t physical, length;
  uint32_t node;
  uint32_t run;  // index in the node's runs
};

// One inode of the image and, for a directory, its names.
struct Node {
  struct Child {
    std::string_view name;
    uint32_t node;
  };
  const EntryRecord* meta = nullptr;  // nullptr: lost+found, which we add
  std::string_view path;              // its first name (for errors)
  ext2_ino_t ino = 0;
  uint32_t names = 0;    // directory entries that name it
  uint32_t subdirs = 0;  // directories only
  uint32_t parent = 0;   // directories only: the node holding it
  std::vector<Child> children;
  std::vector<Run> runs;  // files only: where the data stands (compaction may move it)
  Kind kind() const { return meta ? meta->kind : Kind::kDir; }
};

// Bytes of one directory entry (ext2_dir_entry_2: 8 bytes and the name, 4-aligned).
inline uint32_t DirentBytes(size_t name_len) {
  return static_cast<uint32_t>(RoundUp(8 + name_len, 4));
}

// The tree as the image will hold it: one Node per inode, in path order, with
// every directory's names; sizes for the plan.
class Layout {
 public:
  Status Collect(const ImageTree& tree, uint32_t bs);

  // Blocks the directory's entries take, packed in order ("." and ".." first).
  uint64_t DirBlocks(const Node& dir) const;

  // Past the in-inode room (256-byte inodes: 96 bytes less a 4-byte header),
  // xattrs take a block.
  static bool XattrsNeedBlock(const EntryRecord& m);

  std::vector<Node>& nodes() { return nodes_; }
  const std::vector<Node>& nodes() const { return nodes_; }
  uint32_t lost_found() const { return lost_found_; }

 private:
  uint32_t bs_ = 4096;
  std::vector<Node> nodes_;
  uint32_t lost_found_ = 0;  // 0: the image has its own
};

// What the filesystem needs beyond the data already in place.
struct Sizing {
  uint64_t data_end_block = 0;  // one past the last live data block
  uint64_t data_blocks = 0;     // live data blocks
  uint64_t meta_blocks = 0;     // directories, slow symlinks, xattr and extent blocks
  uint64_t single_blocks = 0;   // of which one-block directories and slow symlinks
  uint64_t inodes = 0;          // distinct inodes incl. lost+found
};

Sizing Measure(const Layout& layout, uint64_t bs, uint64_t data_start);

// Moves the live data standing past `data_start + live blocks` into the
// holes below that line (data a layer wrote and a later one removed or
// replaced), so dead data costs the image no size: at most as many blocks are
// copied as are dead, in the kernel, never through user space. `placed` is
// sorted by where runs stand, and is again on return.
Status Compact(int fd, Layout& layout, std::vector<Placed>& placed, uint64_t data_start_block,
               uint64_t bs, uint64_t* moved);

}  // namespace layerx::broker::ext4_detail
