// Every inode of the ext4 image, written through libext2fs (ext4_builder.h).
#include "broker/ext4/ext4_builder.h"

#include <errno.h>
#include <ext2fs/ext3_extents.h>

#include <algorithm>
#include <cstring>
#include <string_view>

#include "sandbox/sys.h"

namespace layerx::broker::ext4_detail {

Error Ext2Error(errcode_t code, std::string what) {
  // Out of blocks or inodes: ENOSPC, which the build answers with a bigger image.
  int err = code == EXT2_ET_BLOCK_ALLOC_FAIL || code == EXT2_ET_INODE_ALLOC_FAIL ||
                    code == EXT2_ET_DIR_NO_SPACE || code == ENOSPC
                ? ENOSPC
                : 0;
  return Error(ErrorKind::kOs, err, fmt::format("{}: {}", what, error_message(code)));
}

namespace {

uint32_t ToExtraTime(int64_t sec, int64_t nsec) {
  // ext4: bits 0-1 extend the seconds past 2038, bits 2-31 hold nanoseconds.
  return static_cast<uint32_t>(((sec - static_cast<int32_t>(sec)) >> 32) & 3) |
         static_cast<uint32_t>(nsec << 2);
}

void SetTimes(struct ext2_inode_large& inode, int64_t ns) {
  int64_t sec = ns / 1'000'000'000, nsec = ns % 1'000'000'000;
  if (nsec < 0) {
    nsec += 1'000'000'000;
    sec -= 1;
  }
  inode.i_atime = inode.i_mtime = inode.i_ctime = static_cast<uint32_t>(sec);
  inode.i_atime_extra = inode.i_mtime_extra = inode.i_ctime_extra = ToExtraTime(sec, nsec);
  // Birth time too: the layer's mtime, not the build's clock (which would
  // make two builds differ).
  inode.i_crtime = static_cast<uint32_t>(sec);
  inode.i_crtime_extra = ToExtraTime(sec, nsec);
}

void SetOwner(struct ext2_inode_large& inode, uint32_t uid, uint32_t gid) {
  inode.i_uid = static_cast<uint16_t>(uid & 0xffff);
  ext2fs_set_i_uid_high(inode, uid >> 16);
  inode.i_gid = static_cast<uint16_t>(gid & 0xffff);
  ext2fs_set_i_gid_high(inode, gid >> 16);
}

uint8_t FileType(Kind kind) {
  switch (kind) {
    case Kind::kFile:
      return EXT2_FT_REG_FILE;
    case Kind::kDir:
      return EXT2_FT_DIR;
    case Kind::kSymlink:
      return EXT2_FT_SYMLINK;
    case Kind::kChar:
      return EXT2_FT_CHRDEV;
    case Kind::kBlock:
      return EXT2_FT_BLKDEV;
    case Kind::kFifo:
      return EXT2_FT_FIFO;
    case Kind::kHardlink:
      break;
  }
  return EXT2_FT_UNKNOWN;
}

uint16_t ModeType(Kind kind) {
  switch (kind) {
    case Kind::kFile:
      return LINUX_S_IFREG;
    case Kind::kDir:
      return LINUX_S_IFDIR;
    case Kind::kSymlink:
      return LINUX_S_IFLNK;
    case Kind::kChar:
      return LINUX_S_IFCHR;
    case Kind::kBlock:
      return LINUX_S_IFBLK;
    case Kind::kFifo:
      return LINUX_S_IFIFO;
    case Kind::kHardlink:
      break;
  }
  return 0;
}

// `blocks` blocks from `physical` on, mapped from logical block 0, cut to what
// one ext4 extent holds (a directory's blocks).
std::vector<Run> RunsFrom(uint64_t physical, uint64_t blocks) {
  std::vector<Run> runs;
  for (uint64_t logical = 0; logical < blocks; logical += kMaxExtentBlocks) {
    uint64_t n = std::min<uint64_t>(blocks - logical, kMaxExtentBlocks);
    runs.push_back(Run{logical, physical + logical, n});
  }
  return runs;
}

}  // namespace

Status Builder::ReserveInodes() {
  ext2fs_inode_alloc_stats2(fs_, EXT2_ROOT_INO, +1, 1);
  for (ext2_ino_t ino = 1; ino < EXT2_FIRST_INODE(fs_->super); ++ino) {
    if (ino != EXT2_ROOT_INO) ext2fs_inode_alloc_stats2(fs_, ino, +1, 0);
  }
  return {};
}

Status Builder::WriteAll(blk64_t goal) {
  goal_ = goal;
  // The bad blocks inode: empty, with mke2fs's times.
  struct ext2_inode_large bad;
  std::memset(&bad, 0, sizeof(bad));
  bad.i_extra_isize = sizeof(struct ext2_inode_large) - EXT2_GOOD_OLD_INODE_SIZE;
  bad.i_atime = bad.i_mtime = bad.i_ctime = static_cast<uint32_t>(default_time_);
  LX_TRY(WriteInode(EXT2_BAD_INO, bad));
  // Inode numbers in path order: the root is 2, the rest from the first free one.
  std::vector<Node>& nodes = layout_.nodes();
  ext2_ino_t next = EXT2_FIRST_INODE(fs_->super);
  nodes[0].ino = EXT2_ROOT_INO;
  for (size_t i = 1; i < nodes.size(); ++i) nodes[i].ino = next++;
  if (next - 1 > fs_->super->s_inodes_count) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4: {} inodes needed, the image has room for {}",
                          next - 1, fs_->super->s_inodes_count));
  }
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (i % 1024 == 0) LX_TRY(CheckStop());
    Node& n = nodes[i];
    if (i != 0) ext2fs_inode_alloc_stats2(fs_, n.ino, +1, n.kind() == Kind::kDir);
    Status s = Write(n);
    if (!s) return Fail(std::move(s).error().With("ext4 {:?}", n.path));
  }
  return {};
}

Status Builder::CheckStop() const {
  if (control_.cancel != nullptr && control_.cancel->load()) {
    return Fail(MakeError(ErrorKind::kCancelled, "interrupted"));
  }
  if (control_.deadline_ns > 0 && sandbox::MonotonicNs() >= control_.deadline_ns) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "ext4 build took past job_timeout_ms"));
  }
  return {};
}

struct ext2_inode_large Builder::Base(const Node& n, uint16_t links) const {
  struct ext2_inode_large in;
  std::memset(&in, 0, sizeof(in));
  in.i_extra_isize = sizeof(struct ext2_inode_large) - EXT2_GOOD_OLD_INODE_SIZE;
  in.i_links_count = links;
  if (n.meta == nullptr) {  // lost+found
    in.i_mode = LINUX_S_IFDIR | 0700;
    SetTimes(in, default_time_ * 1'000'000'000);
    return in;
  }
  in.i_mode = static_cast<uint16_t>(ModeType(n.meta->kind) | (n.meta->mode & 07777));
  SetOwner(in, n.meta->uid, n.meta->gid);
  SetTimes(in, n.meta->mtime_ns);
  return in;
}

// Single blocks fill the room left in front of the data first (the group
// descriptors' reserve, which the plan counts on); runs go after the data.
Result<blk64_t> Builder::Allocate(uint64_t blocks) {
  blk64_t blk;
  blk64_t goal = blocks == 1 ? front_goal_ : goal_;
  errcode_t rc = ext2fs_alloc_range(fs_, 0, goal, static_cast<blk_t>(blocks), &blk);
  if (rc) return Fail(Ext2Error(rc, fmt::format("allocate {} blocks", blocks)));
  if (blocks == 1) {
    front_goal_ = blk + 1;
  } else {
    goal_ = blk + blocks;
  }
  return blk;
}

// Writes the inode whole, then its extents (each insert rewrites its first
// 128 bytes, where i_block lives).
Status Builder::WriteWithExtents(ext2_ino_t ino, struct ext2_inode_large& in,
                                 const std::vector<Run>& runs) {
  if (!runs.empty() && runs.back().logical + runs.back().length > (uint64_t{1} << 32)) {
    return Fail(MakeError(ErrorKind::kPolicy, "past 2^32 blocks: more than ext4 holds"));
  }
  if (runs.size() <= 4) {
    // Up to four runs fit in the inode itself: the extent tree is its header
    // and leaves in i_block (libext2fs's on-disk structs), and the inode is
    // written once. Most files are one run.
    auto* header = reinterpret_cast<struct ext3_extent_header*>(in.i_block);
    header->eh_magic = ext2fs_cpu_to_le16(EXT3_EXT_MAGIC);
    header->eh_entries = ext2fs_cpu_to_le16(static_cast<uint16_t>(runs.size()));
    header->eh_max = ext2fs_cpu_to_le16(4);
    header->eh_depth = 0;
    header->eh_generation = 0;
    auto* leaf = reinterpret_cast<struct ext3_extent*>(header + 1);
    for (size_t i = 0; i < runs.size(); ++i) {
      leaf[i].ee_block = ext2fs_cpu_to_le32(static_cast<uint32_t>(runs[i].logical));
      leaf[i].ee_len = ext2fs_cpu_to_le16(static_cast<uint16_t>(runs[i].length));
      leaf[i].ee_start = ext2fs_cpu_to_le32(static_cast<uint32_t>(runs[i].physical));
      leaf[i].ee_start_hi = ext2fs_cpu_to_le16(static_cast<uint16_t>(runs[i].physical >> 32));
    }
    in.i_flags |= EXT4_EXTENTS_FL;
    return WriteInode(ino, in);
  }
  ext2_extent_handle_t handle = nullptr;
  // With an all-zero i_block this makes an empty extent tree in `in` and
  // sets EXT4_EXTENTS_FL, writing nothing yet.
  errcode_t rc = ext2fs_extent_open2(fs_, ino, reinterpret_cast<ext2_inode*>(&in), &handle);
  if (rc) return Fail(Ext2Error(rc, "extent open"));
  rc = ext2fs_write_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&in), sizeof(in));
  for (size_t i = 0; i < runs.size() && !rc; ++i) {
    struct ext2fs_extent e = {.e_pblk = runs[i].physical,
                              .e_lblk = static_cast<blk64_t>(runs[i].logical),
                              .e_len = static_cast<__u32>(runs[i].length),
                              .e_flags = 0};
    rc = ext2fs_extent_insert(handle, i == 0 ? 0 : EXT2_EXTENT_INSERT_AFTER, &e);
  }
  ext2fs_extent_free(handle);
  if (rc) return Fail(Ext2Error(rc, "extents"));
  return {};
}

Status Builder::WriteInode(ext2_ino_t ino, struct ext2_inode_large& in) {
  errcode_t rc = ext2fs_write_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&in), sizeof(in));
  if (rc) return Fail(Ext2Error(rc, "write inode"));
  return {};
}

Status Builder::SetXattrs(ext2_ino_t ino, const EntryRecord& m) {
  if (m.xattrs.empty()) return {};
  struct ext2_xattr_handle* h = nullptr;
  errcode_t rc = ext2fs_xattrs_open(fs_, ino, &h);
  if (rc) return Fail(Ext2Error(rc, "xattrs open"));
  rc = ext2fs_xattrs_read(h);
  for (const auto& [name, value] : m.xattrs) {
    // ACLs arrive in the kernel's xattr format; libext2fs stores them in ext4's.
    if (!rc) rc = ext2fs_xattr_set(h, name.c_str(), value.data(), value.size());
  }
  errcode_t close_rc = ext2fs_xattrs_close(&h);
  if (rc || close_rc) return Fail(Ext2Error(rc ? rc : close_rc, "xattrs"));
  return {};
}

Status Builder::Write(const Node& n) {
  switch (n.kind()) {
    case Kind::kDir:
      LX_TRY(WriteDir(n));
      break;
    case Kind::kFile: {
      struct ext2_inode_large in = Base(n, static_cast<uint16_t>(n.names));
      const std::vector<Run>& runs = n.runs;
      uint64_t blocks = 0;
      for (const Run& r : runs) blocks += r.length;
      errcode_t rc = ext2fs_iblk_set(fs_, reinterpret_cast<ext2_inode*>(&in), blocks);
      if (!rc) rc = ext2fs_inode_size_set(fs_, reinterpret_cast<ext2_inode*>(&in), n.meta->size);
      if (rc) return Fail(Ext2Error(rc, "inode size"));
      LX_TRY(WriteWithExtents(n.ino, in, runs));
      break;
    }
    case Kind::kSymlink: {
      struct ext2_inode_large in = Base(n, static_cast<uint16_t>(n.names));
      const std::string& target = n.meta->symlink_target;
      in.i_size = static_cast<uint32_t>(target.size());
      if (target.size() < sizeof(in.i_block)) {
        // A fast symlink: the target in i_block, no blocks, no extents.
        std::memcpy(in.i_block, target.data(), target.size());
        LX_TRY(WriteInode(n.ino, in));
        break;
      }
      if (target.size() >= fs_->blocksize) {
        return Fail(MakeError(ErrorKind::kPolicy,
                              "symlink target of {} bytes does not fit a {}-byte block",
                              target.size(), fs_->blocksize));
      }
      LX_ASSIGN_OR_RETURN(blk64_t blk, Allocate(1));
      std::vector<char> block(fs_->blocksize, 0);
      std::memcpy(block.data(), target.data(), target.size());
      errcode_t rc = io_channel_write_blk64(fs_->io, blk, 1, block.data());
      if (!rc) rc = ext2fs_iblk_set(fs_, reinterpret_cast<ext2_inode*>(&in), 1);
      if (rc) return Fail(Ext2Error(rc, "symlink block"));
      LX_TRY(WriteWithExtents(n.ino, in, {Run{0, blk, 1}}));
      break;
    }
    case Kind::kChar:
    case Kind::kBlock:
    case Kind::kFifo: {
      struct ext2_inode_large in = Base(n, static_cast<uint16_t>(n.names));
      if (n.kind() != Kind::kFifo) {
        // The kernel's encodings (fs/ext4/inode.c): old for 8-bit numbers, new otherwise.
        uint32_t major = n.meta->rdev_major, minor = n.meta->rdev_minor;
        if (major < 256 && minor < 256) {
          in.i_block[0] = (major << 8) | minor;
        } else {
          in.i_block[1] = (minor & 0xff) | (major << 8) | ((minor & ~0xffu) << 12);
        }
      }
      LX_TRY(WriteInode(n.ino, in));
      break;
    }
    case Kind::kHardlink:
      return Fail(MakeError(ErrorKind::kInternal, "ext4: a hardlink record in the tree"));
  }
  if (n.meta != nullptr) LX_TRY(SetXattrs(n.ino, *n.meta));
  return {};
}

// The directory's blocks assembled in memory and written whole: no name is
// ever looked up in a block on disk.
Status Builder::WriteDir(const Node& n) {
  const uint32_t bs = fs_->blocksize;
  const uint64_t blocks = layout_.DirBlocks(n);
  // dir_nlink: a directory with more subdirectories than 16 bits hold
  // counts 1, as the kernel does it.
  uint32_t links = 2 + n.subdirs;
  struct ext2_inode_large in = Base(n, static_cast<uint16_t>(links > kMaxLinks ? 1 : links));
  LX_ASSIGN_OR_RETURN(blk64_t first, Allocate(blocks));
  errcode_t rc = ext2fs_iblk_set(fs_, reinterpret_cast<ext2_inode*>(&in), blocks);
  if (!rc) rc = ext2fs_inode_size_set(fs_, reinterpret_cast<ext2_inode*>(&in), blocks * bs);
  if (rc) return Fail(Ext2Error(rc, "inode size"));
  LX_TRY(WriteWithExtents(n.ino, in, RunsFrom(first, blocks)));

  std::vector<char> buf(blocks * bs, 0);
  const std::vector<Node>& nodes = layout_.nodes();
  uint64_t block = 0;
  uint32_t used = 0;
  struct ext2_dir_entry* last = nullptr;
  const uint32_t room = bs - kDirTail;
  auto close_block = [&] {
    char* base = buf.data() + block * bs;
    if (last == nullptr) {  // an empty block: one unused entry spanning it
      last = reinterpret_cast<struct ext2_dir_entry*>(base);
      used = 0;
    }
    uint32_t at = static_cast<uint32_t>(reinterpret_cast<char*>(last) - base);
    (void)ext2fs_set_rec_len(fs_, room - at, last);
    ext2fs_initialize_dirent_tail(fs_, EXT2_DIRENT_TAIL(base, bs));
  };
  auto put = [&](ext2_ino_t ino, std::string_view name, int type) {
    uint32_t need = DirentBytes(name.size());
    if (used + need > room) {
      close_block();
      ++block;
      used = 0;
      last = nullptr;
    }
    auto* d = reinterpret_cast<struct ext2_dir_entry*>(buf.data() + block * bs + used);
    d->inode = ino;
    ext2fs_dirent_set_name_len(d, static_cast<int>(name.size()));
    ext2fs_dirent_set_file_type(d, type);
    std::memcpy(d->name, name.data(), name.size());
    (void)ext2fs_set_rec_len(fs_, need, d);
    used += need;
    last = d;
  };
  put(n.ino, ".", EXT2_FT_DIR);
  put(nodes[n.parent].ino, "..", EXT2_FT_DIR);
  for (const Node::Child& c : n.children) {
    const Node& child = nodes[c.node];
    put(child.ino, c.name, FileType(child.kind()));
  }
  close_block();
  while (++block < blocks) {  // lost+found's spare blocks
    last = nullptr;
    close_block();
  }
  for (uint64_t i = 0; i < blocks; ++i) {
    rc = ext2fs_write_dir_block4(fs_, first + i, buf.data() + i * bs, 0, n.ino);
    if (rc) return Fail(Ext2Error(rc, "write directory block"));
  }
  return {};
}

}  // namespace layerx::broker::ext4_detail
