// Internal to broker/ext4: the libext2fs side of the build. Builder writes
// every inode of a Layout into a filesystem ext4.cc made: true owners, modes,
// times and xattrs, extents where the data stands, directories assembled in
// memory and written whole, symlinks, device nodes and fifos.
#pragma once

#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>

#include <cstdint>
#include <string>
#include <vector>

#include "broker/ext4/ext4.h"
#include "broker/ext4/ext4_layout.h"
#include "policy/result.h"

namespace layerx::broker::ext4_detail {

// A libext2fs error code as an Error (kOs), naming `what`.
Error Ext2Error(errcode_t code, std::string what);

// Writes the inodes of `layout` into `fs` (made by ext4.cc around the data
// already in place), with new blocks from the goal WriteAll is given.
class Builder {
 public:
  Builder(ext2_filsys fs, Layout& layout, const BuildControl& control, int64_t default_time)
      : fs_(fs), layout_(layout), control_(control), default_time_(default_time) {}

  // The reserved inodes, as mke2fs has them (the root is a directory); the
  // journal's among them.
  Status ReserveInodes();

  Status WriteAll(blk64_t goal);

 private:
  Status CheckStop() const;
  struct ext2_inode_large Base(const Node& n, uint16_t links) const;
  Result<blk64_t> Allocate(uint64_t blocks);
  Status WriteWithExtents(ext2_ino_t ino, struct ext2_inode_large& in,
                          const std::vector<Run>& runs);
  Status WriteInode(ext2_ino_t ino, struct ext2_inode_large& in);
  Status SetXattrs(ext2_ino_t ino, const EntryRecord& m);
  Status Write(const Node& n);
  Status WriteDir(const Node& n);

  ext2_filsys fs_;
  Layout& layout_;
  const BuildControl& control_;
  int64_t default_time_;
  blk64_t goal_ = 0;
  blk64_t front_goal_ = 0;
};

}  // namespace layerx::broker::ext4_detail
