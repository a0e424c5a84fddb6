#include "broker/ext4/ext4.h"

#include <errno.h>
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>
#include <ext2fs/ext3_extents.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <span>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "broker/ext4/ext4_io.h"
#include "broker/log/logging.h"
#include "sandbox/sys.h"

namespace layerx::broker {

using extractor::EntryRecord;
using extractor::Kind;

namespace {

uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }
uint64_t DivUp(uint64_t v, uint64_t by) { return (v + by - 1) / by; }

constexpr uint32_t kMaxLinks = 65000;  // EXT4_LINK_MAX: 16 bits on disk, and the kernel's cap
constexpr uint32_t kMaxExtentBlocks = 32768;  // EXT_INIT_MAX_LEN
constexpr uint32_t kInodeSize = 256;
constexpr uint32_t kDescSize = EXT2_MIN_DESC_SIZE_64BIT;
constexpr uint32_t kLostFoundBytes = 4096;  // one block (mke2fs gives 16 KiB, tar2ext4 one block)
constexpr uint32_t kDirTail = sizeof(struct ext2_dir_entry_tail);  // metadata_csum, every dir block

Error Ext2Error(errcode_t code, std::string what) {
  // Out of blocks or inodes: ENOSPC, which the build answers with a bigger image.
  int err = code == EXT2_ET_BLOCK_ALLOC_FAIL || code == EXT2_ET_INODE_ALLOC_FAIL ||
                    code == EXT2_ET_DIR_NO_SPACE || code == ENOSPC
                ? ENOSPC
                : 0;
  return Error(ErrorKind::kOs, err, fmt::format("{}: {}", what, error_message(code)));
}

// The UUID of a reproducible image: from the seed (the layers' digests), so the
// same input names the same filesystem.
void DerivedUuid(const std::string& seed, uint8_t out[16]) {
  // FNV-1a over the seed, twice with different offsets: 128 stable bits. Not a
  // security property, only stability.
  uint64_t a = 1469598103934665603ull, b = 1099511628211ull ^ 0x9e3779b97f4a7c15ull;
  for (unsigned char c : seed) {
    a = (a ^ c) * 1099511628211ull;
    b = (b ^ c) * 0x100000001b3ull + 0x7f4a7c15;
  }
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<uint8_t>(a >> (56 - 8 * i));
    out[8 + i] = static_cast<uint8_t>(b >> (56 - 8 * i));
  }
  out[6] = static_cast<uint8_t>((out[6] & 0x0f) | 0x40);  // version 4
  out[8] = static_cast<uint8_t>((out[8] & 0x3f) | 0x80);  // RFC 4122 variant
}

// "0123abcd-..." (36 characters, dashes at 8, 13, 18 and 23) to 16 bytes.
bool ParseUuid(const std::string& text, uint8_t out[16]) {
  if (text.size() != 36) return false;
  size_t o = 0;
  for (size_t i = 0; i < 36;) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (text[i++] != '-') return false;
      continue;
    }
    auto nibble = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    int hi = nibble(text[i]), lo = nibble(text[i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[o++] = static_cast<uint8_t>(hi << 4 | lo);
    i += 2;
  }
  return o == 16;
}

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

// A run of blocks of one inode: logical block, physical block, length.
struct Run {
  uint64_t logical;
  uint64_t physical;
  uint64_t length;
};

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

// Extent tree blocks for `runs` extents: four fit in the inode; past that,
// leaves, and past four leaves a level of index blocks.
uint64_t ExtentTreeBlocks(uint64_t runs, uint64_t bs) {
  if (runs <= 4) return 0;
  const uint64_t per_block = (bs - 12) / 12;
  uint64_t leaves = DivUp(runs, per_block);
  return leaves + (leaves > 4 ? DivUp(leaves, per_block) + 1 : 0);
}

// The runs of a file's data extents (checked by ImageTree: block-aligned,
// ascending), cut to what one ext4 extent holds.
std::vector<Run> RunsOf(const std::vector<extractor::DataExtent>& extents, uint64_t bs) {
  std::vector<Run> runs;
  for (const extractor::DataExtent& x : extents) {
    uint64_t logical = x.logical / bs, physical = x.physical / bs, blocks = DivUp(x.length, bs);
    while (blocks > 0) {
      uint64_t n = std::min<uint64_t>(blocks, kMaxExtentBlocks);
      runs.push_back(Run{logical, physical, n});
      logical += n;
      physical += n;
      blocks -= n;
    }
  }
  return runs;
}

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
uint32_t DirentBytes(size_t name_len) { return static_cast<uint32_t>(RoundUp(8 + name_len, 4)); }

// The tree as the image will hold it: one Node per inode, in path order, with
// every directory's names; sizes for the plan.
class Layout {
 public:
  Status Collect(const ImageTree& tree, uint32_t bs) {
    bs_ = bs;
    nodes_.reserve(tree.size() + 1);
    std::unordered_map<const extractor::EntryRecord*, uint32_t> node_of;
    std::unordered_map<std::string_view, uint32_t> dir_node;
    node_of.reserve(tree.size());
    for (const auto& [path, inode] : tree.entries()) {
      const EntryRecord* meta = &inode->meta;
      auto [it, fresh] = node_of.try_emplace(meta, static_cast<uint32_t>(nodes_.size()));
      if (fresh) {
        nodes_.push_back(Node{.meta = meta, .path = path});
        if (meta->kind == Kind::kFile) nodes_.back().runs = RunsOf(meta->extents, bs);
      }
      const uint32_t idx = it->second;
      if (path.empty()) {  // the root: always first, always a directory
        dir_node.emplace(path, idx);
        continue;
      }
      size_t slash = path.rfind('/');
      std::string_view parent =
          slash == std::string::npos ? std::string_view() : std::string_view(path).substr(0, slash);
      std::string_view name =
          std::string_view(path).substr(slash == std::string::npos ? 0 : slash + 1);
      if (name.size() > EXT2_NAME_LEN) {
        return Fail(MakeError(ErrorKind::kPeer, "bad record: name of {:?} over {} bytes", path,
                              EXT2_NAME_LEN));
      }
      auto pit = dir_node.find(parent);
      if (pit == dir_node.end()) {
        return Fail(MakeError(ErrorKind::kInternal, "ext4: no directory holds {:?}", path));
      }
      nodes_[pit->second].children.push_back(Node::Child{name, idx});
      Node& node = nodes_[idx];
      ++node.names;
      if (meta->kind == Kind::kDir) {
        dir_node.emplace(path, idx);
        node.parent = pit->second;
        ++nodes_[pit->second].subdirs;
      } else if (node.names > kMaxLinks) {
        // 16 bits on disk: a count that wrapped would free an inode in use.
        return Fail(MakeError(ErrorKind::kLimitExceeded,
                              "{:?}: over {} links to one inode, more than ext4 holds", path,
                              kMaxLinks));
      }
    }
    if (nodes_.empty() || nodes_[0].path != "" || nodes_[0].kind() != Kind::kDir) {
      return Fail(MakeError(ErrorKind::kInternal, "ext4: the tree has no root directory"));
    }
    // lost+found, as mke2fs makes it, unless the image brings its own name.
    bool named = false;
    for (const Node::Child& c : nodes_[0].children) {
      if (c.name != "lost+found") continue;
      named = true;
      // e2fsck insists on a directory there (it would report the image
      // broken): refused, naming it, rather than an image that fails.
      if (nodes_[c.node].kind() != Kind::kDir) {
        return Fail(MakeError(ErrorKind::kInvalidInput,
                              "\"lost+found\" is a {}: an ext4 image needs a directory there",
                              extractor::KindName(nodes_[c.node].kind())));
      }
    }
    if (!named) {
      lost_found_ = static_cast<uint32_t>(nodes_.size());
      nodes_.push_back(Node{.meta = nullptr, .path = "lost+found", .names = 1});
      nodes_[0].children.push_back(Node::Child{"lost+found", lost_found_});
      ++nodes_[0].subdirs;
    }
    return {};
  }

  // Blocks the directory's entries take, packed in order ("." and ".." first).
  uint64_t DirBlocks(const Node& dir) const {
    const uint32_t room = bs_ - kDirTail;
    uint64_t blocks = 1;
    uint32_t used = DirentBytes(1) + DirentBytes(2);
    for (const Node::Child& c : dir.children) {
      uint32_t need = DirentBytes(c.name.size());
      if (used + need > room) {
        ++blocks;
        used = 0;
      }
      used += need;
    }
    if (&dir == &nodes_[lost_found_] && lost_found_ != 0) {
      blocks = std::max<uint64_t>(blocks, kLostFoundBytes / bs_);
    }
    return blocks;
  }

  // Past the in-inode room (256-byte inodes: 96 bytes less a 4-byte header),
  // xattrs take a block.
  static bool XattrsNeedBlock(const EntryRecord& m) {
    // Each entry: 16 bytes, the name less its namespace prefix, the value;
    // then a 4-byte end. (An ACL's ext4 form is no longer than the kernel's.)
    size_t bytes = 4;
    for (const auto& [name, value] : m.xattrs) {
      size_t name_len = name.size();
      for (std::string_view prefix : {"user.", "trusted.", "security.", "system."}) {
        if (name.starts_with(prefix)) name_len -= prefix.size();
      }
      if (name == "system.posix_acl_access" || name == "system.posix_acl_default") name_len = 0;
      bytes += 16 + RoundUp(name_len, 4) + RoundUp(value.size(), 4);
    }
    return bytes > 92;
  }

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

Sizing Measure(const Layout& layout, uint64_t bs, uint64_t data_start) {
  Sizing s;
  s.data_end_block = data_start / bs;
  for (const Node& n : layout.nodes()) {
    ++s.inodes;
    if (n.meta != nullptr && Layout::XattrsNeedBlock(*n.meta)) ++s.meta_blocks;
    switch (n.kind()) {
      case Kind::kFile: {
        const std::vector<Run>& runs = n.runs;
        for (const Run& r : runs) {
          s.data_blocks += r.length;
          s.data_end_block = std::max(s.data_end_block, r.physical + r.length);
        }
        s.meta_blocks += ExtentTreeBlocks(runs.size(), bs);
        break;
      }
      case Kind::kDir: {
        uint64_t blocks = layout.DirBlocks(n);
        s.meta_blocks += blocks + ExtentTreeBlocks(DivUp(blocks, kMaxExtentBlocks), bs);
        if (blocks == 1) ++s.single_blocks;
        break;
      }
      case Kind::kSymlink:
        if (n.meta->symlink_target.size() >= sizeof(((ext2_inode*)nullptr)->i_block)) {
          ++s.meta_blocks;
          ++s.single_blocks;
        }
        break;
      default:
        break;
    }
  }
  return s;
}

class Builder {
 public:
  Builder(ext2_filsys fs, Layout& layout, const BuildControl& control, int64_t default_time)
      : fs_(fs), layout_(layout), control_(control), default_time_(default_time) {}

  // The reserved inodes, as mke2fs has them (the root is a directory); the
  // journal's among them.
  Status ReserveInodes() {
    ext2fs_inode_alloc_stats2(fs_, EXT2_ROOT_INO, +1, 1);
    for (ext2_ino_t ino = 1; ino < EXT2_FIRST_INODE(fs_->super); ++ino) {
      if (ino != EXT2_ROOT_INO) ext2fs_inode_alloc_stats2(fs_, ino, +1, 0);
    }
    return {};
  }

  Status WriteAll(blk64_t goal) {
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

 private:
  Status CheckStop() const {
    if (control_.cancel != nullptr && control_.cancel->load()) {
      return Fail(MakeError(ErrorKind::kCancelled, "interrupted"));
    }
    if (control_.deadline_ns > 0 && sandbox::MonotonicNs() >= control_.deadline_ns) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "ext4 build took past job_timeout_ms"));
    }
    return {};
  }

  struct ext2_inode_large Base(const Node& n, uint16_t links) const {
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
  Result<blk64_t> Allocate(uint64_t blocks) {
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
  Status WriteWithExtents(ext2_ino_t ino, struct ext2_inode_large& in,
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

  Status WriteInode(ext2_ino_t ino, struct ext2_inode_large& in) {
    errcode_t rc =
        ext2fs_write_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&in), sizeof(in));
    if (rc) return Fail(Ext2Error(rc, "write inode"));
    return {};
  }

  Status SetXattrs(ext2_ino_t ino, const EntryRecord& m) {
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

  Status Write(const Node& n) {
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
  Status WriteDir(const Node& n) {
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

  ext2_filsys fs_;
  Layout& layout_;
  const BuildControl& control_;
  int64_t default_time_;
  blk64_t goal_ = 0;
  blk64_t front_goal_ = 0;
};

// The front of the image: the superblock and a group descriptor table for a
// filesystem of `max_bytes`.
uint64_t FrontBlocks(uint32_t bs, uint64_t max_bytes) {
  uint64_t first_data_block = bs == 1024 ? 1 : 0;
  uint64_t blocks_per_group = 8ull * bs;
  uint64_t groups = DivUp(DivUp(max_bytes, bs), blocks_per_group);
  return first_data_block + 1 + DivUp(groups * kDescSize, bs);
}

uint64_t MaxImageBytes(const Ext4Options& options, uint64_t max_data_bytes) {
  // The data, and generously what metadata and a journal add to it.
  uint64_t max = max_data_bytes + max_data_bytes / 4 + (1ull << 30);
  if (options.size_bytes) max = std::max(max, *options.size_bytes);
  return max;
}

Status PwriteBytes(int fd, const char* buf, size_t size, loff_t offset) {
  while (size > 0) {
    ssize_t n = ::pwrite(fd, buf, size, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Fail(OsError(errno, "ext4: move data within the image"));
    buf += n;
    size -= static_cast<size_t>(n);
    offset += n;
  }
  return {};
}

// Copies `blocks` blocks of the image from `from` to `to` (non-overlapping),
// in the kernel.
Status CopyBlocks(int fd, uint64_t from, uint64_t to, uint64_t blocks, uint64_t bs) {
  loff_t in = static_cast<loff_t>(from * bs), out = static_cast<loff_t>(to * bs);
  uint64_t left = blocks * bs;
  while (left > 0) {
    ssize_t n = ::copy_file_range(fd, &in, fd, &out, left, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EXDEV || errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS)) {
      // A filesystem without copy_file_range (some FUSE, NFS, overlay):
      // through a buffer, at most the dead blocks' worth.
      std::vector<char> buf(1 << 20);
      while (left > 0) {
        ssize_t got = ::pread(fd, buf.data(), std::min<uint64_t>(left, buf.size()), in);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return Fail(OsError(errno, "ext4: move data within the image"));
        if (got == 0) break;
        LX_TRY(PwriteBytes(fd, buf.data(), static_cast<size_t>(got), out));
        in += got;
        out += got;
        left -= static_cast<uint64_t>(got);
      }
      break;
    }
    if (n < 0) return Fail(OsError(errno, "ext4: move data within the image"));
    if (n == 0) {  // past the end of the file: the rest is a hole already
      break;
    }
    left -= static_cast<uint64_t>(n);
  }
  return {};
}

// Moves the live data standing past `data_start + live blocks` into the
// holes below that line (data a layer wrote and a later one removed or
// replaced), so dead data costs the image no size: at most as many blocks are
// copied as are dead, in the kernel, never through user space. `placed` is
// sorted by where runs stand, and is again on return.
Status Compact(int fd, Layout& layout, std::vector<Placed>& placed, uint64_t data_start_block,
               uint64_t bs, uint64_t* moved) {
  uint64_t live = 0;
  for (const Placed& p : placed) live += p.length;
  const uint64_t line = data_start_block + live;
  if (placed.empty() || placed.back().physical + placed.back().length <= line) return {};
  // The holes below the line, in order.
  std::vector<std::pair<uint64_t, uint64_t>> holes;
  uint64_t cursor = data_start_block;
  for (const Placed& p : placed) {
    if (p.physical >= line) break;
    if (p.physical > cursor) holes.emplace_back(cursor, p.physical);
    cursor = std::max(cursor, p.physical + p.length);
  }
  if (cursor < line) holes.emplace_back(cursor, line);
  // Dead data out first: a run's last block may hold fewer bytes than a block
  // (the file ends there), and the rest of the block it lands in must be zeros,
  // not what stood there.
  for (const auto& [start, end] : holes) {
    LX_TRY(sandbox::PunchHole(fd, start * bs, (end - start) * bs));
  }
  // Each run past the line, whole or its part past it, goes into the holes,
  // split where a hole ends. New runs per node, by run index.
  std::unordered_map<uint32_t, std::unordered_map<uint32_t, std::vector<Run>>> pieces;
  size_t h = 0;
  for (const Placed& p : placed) {
    if (p.physical + p.length <= line) continue;
    const Run& run = layout.nodes()[p.node].runs[p.run];
    std::vector<Run>& out = pieces[p.node][p.run];
    uint64_t keep = p.physical < line ? line - p.physical : 0;
    if (keep > 0) out.push_back(Run{run.logical, run.physical, keep});
    uint64_t done = keep;
    while (done < run.length) {
      if (h == holes.size()) {
        return Fail(MakeError(ErrorKind::kInternal, "ext4: compaction ran out of holes"));
      }
      auto& [start, end] = holes[h];
      uint64_t n = std::min(run.length - done, end - start);
      LX_TRY(CopyBlocks(fd, run.physical + done, start, n, bs));
      out.push_back(Run{run.logical + done, start, n});
      *moved += n;
      done += n;
      start += n;
      if (start == end) ++h;
    }
  }
  for (auto& [node, by_run] : pieces) {
    std::vector<Run>& runs = layout.nodes()[node].runs;
    std::vector<Run> next;
    for (uint32_t r = 0; r < runs.size(); ++r) {
      auto it = by_run.find(r);
      if (it == by_run.end()) {
        next.push_back(runs[r]);
      } else {
        next.insert(next.end(), it->second.begin(), it->second.end());
      }
    }
    runs = std::move(next);
  }
  placed.clear();
  for (uint32_t i = 0; i < layout.nodes().size(); ++i) {
    const std::vector<Run>& runs = layout.nodes()[i].runs;
    for (uint32_t r = 0; r < runs.size(); ++r) {
      placed.push_back({runs[r].physical, runs[r].length, i, r});
    }
  }
  std::sort(placed.begin(), placed.end(),
            [](const Placed& a, const Placed& b) { return a.physical < b.physical; });
  return {};
}

// One build of the filesystem around the data, `blocks` big.
Status BuildOnce(int image_fd, const ImageTree& tree, Layout& layout,
                 const std::vector<Placed>& placed, const Ext4Options& options,
                 const BuildControl& control, uint64_t blocks, uint64_t inode_count,
                 uint64_t journal_blocks, uint64_t data_start, uint64_t data_end_block,
                 Ext4Plan& plan) {
  const uint64_t bs = options.block_size;
  const uint64_t front = data_start / bs;
  const uint64_t wanted = blocks;
  struct ext2_super_block param;
  std::memset(&param, 0, sizeof(param));
  param.s_log_block_size = static_cast<uint32_t>(__builtin_ctz(options.block_size) - 10);
  param.s_rev_level = EXT2_DYNAMIC_REV;
  param.s_inode_size = kInodeSize;
  param.s_desc_size = kDescSize;
  param.s_log_groups_per_flex = 4;
  param.s_min_extra_isize = param.s_want_extra_isize =
      sizeof(struct ext2_inode_large) - EXT2_GOOD_OLD_INODE_SIZE;
  param.s_default_mount_opts = EXT2_DEFM_XATTR_USER | EXT2_DEFM_ACL;
  param.s_feature_compat = EXT2_FEATURE_COMPAT_EXT_ATTR | EXT2_FEATURE_COMPAT_DIR_INDEX |
                           EXT4_FEATURE_COMPAT_SPARSE_SUPER2;
  param.s_feature_incompat = EXT2_FEATURE_INCOMPAT_FILETYPE | EXT3_FEATURE_INCOMPAT_EXTENTS |
                             EXT4_FEATURE_INCOMPAT_64BIT | EXT4_FEATURE_INCOMPAT_FLEX_BG;
  param.s_feature_ro_compat = EXT2_FEATURE_RO_COMPAT_LARGE_FILE | EXT4_FEATURE_RO_COMPAT_HUGE_FILE |
                              EXT4_FEATURE_RO_COMPAT_DIR_NLINK |
                              EXT4_FEATURE_RO_COMPAT_EXTRA_ISIZE |
                              EXT4_FEATURE_RO_COMPAT_METADATA_CSUM;
  param.s_inodes_count = static_cast<uint32_t>(inode_count);
  ext2_filsys fs = nullptr;
  for (int attempt = 0;; ++attempt) {
    ext2fs_blocks_count_set(&param, blocks);
    // libext2fs closes the fd it is given: it gets its own.
    LX_ASSIGN_OR_RETURN(sandbox::UniqueFd io_fd, sandbox::Dup(image_fd));
    std::string name = std::to_string(io_fd.get());
    errcode_t rc =
        ext2fs_initialize(name.c_str(), EXT2_FLAG_64BITS, &param, MemoryCachedFdIoManager(), &fs);
    if (rc) return Fail(Ext2Error(rc, "ext4: initialize"));
    (void)io_fd.release();
    if (ext2fs_blocks_count(fs->super) >= blocks || attempt == 1) break;
    // A last group too small for its own tables (and 50 blocks) was dropped:
    // give it that much.
    uint64_t kept = ext2fs_blocks_count(fs->super);
    uint64_t overhead = 2 + fs->inode_blocks_per_group + 50;
    ext2fs_free(fs);
    fs = nullptr;
    blocks = std::max(blocks, kept + overhead + 1);
  }
  struct FsCloser {
    ext2_filsys* fs;
    ~FsCloser() {
      if (*fs != nullptr) ext2fs_free(*fs);
    }
  } closer{&fs};
  blocks = ext2fs_blocks_count(fs->super);
  if (fs->desc_blocks + 1 + fs->super->s_first_data_block > front) {
    return Fail(MakeError(ErrorKind::kLimitExceeded,
                          "ext4: an image of {} bytes needs more group descriptors than its "
                          "front has room for",
                          blocks * bs));
  }
  if (blocks < wanted) {
    return Fail(MakeError(ErrorKind::kInternal, "ext4: {} blocks made, {} needed", blocks, wanted));
  }
  plan.size_bytes = blocks * bs;
  plan.inode_count = fs->super->s_inodes_count;
  // The file is the filesystem, nothing before or after it; what no one
  // writes reads as zeros (a hole), which libext2fs may read back.
  if (::ftruncate(image_fd, static_cast<off_t>(plan.size_bytes)) != 0) {
    return Fail(OsError(errno, "ext4: size the image"));
  }

  // Identity: UUID, hash seed, label, checksum seed; the times.
  std::optional<int64_t> epoch;
  if (options.reproducible) {
    epoch = options.source_date_epoch;
    if (!epoch) {
      int64_t newest = 0;
      for (const auto& [path, inode] : tree.entries()) {
        newest = std::max<int64_t>(newest, inode->meta.mtime_ns / 1'000'000'000);
      }
      epoch = newest;
    }
  }
  uint8_t uuid[16];
  if (options.uuid) {
    (void)ParseUuid(*options.uuid, uuid);
  } else if (options.reproducible) {
    DerivedUuid(options.seed, uuid);
  } else {
    LX_TRY(sandbox::GetRandom(std::as_writable_bytes(std::span(uuid))));
    uuid[6] = static_cast<uint8_t>((uuid[6] & 0x0f) | 0x40);
    uuid[8] = static_cast<uint8_t>((uuid[8] & 0x3f) | 0x80);
  }
  std::memcpy(fs->super->s_uuid, uuid, sizeof(uuid));
  if (options.reproducible) {
    std::memcpy(fs->super->s_hash_seed, uuid, sizeof(uuid));
  } else {
    LX_TRY(sandbox::GetRandom(std::as_writable_bytes(std::span(fs->super->s_hash_seed))));
  }
  fs->super->s_def_hash_version = EXT2_HASH_HALF_MD4;
  fs->super->s_checksum_type = EXT2_CRC32C_CHKSUM;
  fs->super->s_max_mnt_count = static_cast<int16_t>(-1);
  std::memset(fs->super->s_volume_name, 0, sizeof(fs->super->s_volume_name));
  std::memcpy(fs->super->s_volume_name, options.label.data(), options.label.size());
  ext2fs_init_csum_seed(fs);
  const int64_t now = epoch ? *epoch : static_cast<int64_t>(::time(nullptr));
  fs->now = static_cast<time_t>(std::max<int64_t>(now, 1));
  fs->super->s_mkfs_time = fs->super->s_lastcheck = fs->super->s_wtime = static_cast<uint32_t>(now);
  fs->super->s_mkfs_time_hi = fs->super->s_lastcheck_hi = fs->super->s_wtime_hi = 0;

  // The live data first, so the tables and everything else go around it.
  for (size_t i = 0; i < placed.size();) {
    uint64_t run_start = placed[i].physical, run_end = run_start + placed[i].length;
    for (++i; i < placed.size() && placed[i].physical == run_end; ++i) run_end += placed[i].length;
    if (run_end > blocks) {
      return Fail(MakeError(ErrorKind::kInternal, "ext4: data past the end of the image"));
    }
    ext2fs_block_alloc_stats_range(fs, run_start, static_cast<unsigned>(run_end - run_start), +1);
  }
  errcode_t rc = ext2fs_allocate_tables(fs);
  if (rc) return Fail(Ext2Error(rc, "ext4: allocate group tables"));
  // Every block no one wrote reads as zeros (a fresh file, or punched): the
  // inode tables need no zeroing.
  for (dgrp_t g = 0; g < fs->group_desc_count; ++g) {
    ext2fs_bg_flags_set(fs, g, EXT2_BG_INODE_ZEROED);
  }

  Builder builder(fs, layout, control, now);
  LX_TRY(builder.ReserveInodes());
  // The journal first, right after the data, so that it is one run: the
  // journal planned for (libext2fs would size it from the final block count,
  // which may cross one of its steps). Lazily: its blocks read as zeros.
  struct ext2fs_journal_params journal_params = {};
  journal_params.num_journal_blocks = static_cast<blk_t>(journal_blocks);
  if (journal_blocks > 0) {
    rc = ext2fs_add_journal_inode3(fs, &journal_params, data_end_block,
                                   EXT2_MKJOURNAL_LAZYINIT | EXT2_MKJOURNAL_NO_MNT_CHECK);
    if (rc) return Fail(Ext2Error(rc, "ext4: journal"));
  }
  LX_TRY(builder.WriteAll(data_end_block));
  if (epoch) {
    fs->super->s_mkfs_time = fs->super->s_lastcheck = fs->super->s_wtime =
        static_cast<uint32_t>(*epoch);
  }
  rc = ext2fs_set_gdt_csum(fs);
  if (rc) return Fail(Ext2Error(rc, "ext4: group descriptors"));
  ext2fs_mark_super_dirty(fs);
  ext2fs_mark_bb_dirty(fs);
  ext2fs_mark_ib_dirty(fs);
  rc = ext2fs_close_free(&fs);
  if (rc) return Fail(Ext2Error(rc, "ext4: write image"));
  return {};
}

}  // namespace

Status CheckExt4Options(const Ext4Options& options) {
  const uint32_t bs = options.block_size;
  if (bs != 1024 && bs != 2048 && bs != 4096) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 block size {} (1024, 2048 or 4096)", bs));
  }
  if (options.label.size() > 16) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 label {:?}: over 16 bytes", options.label));
  }
  uint8_t uuid[16];
  if (options.uuid && !ParseUuid(*options.uuid, uuid)) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 uuid {:?}: not a UUID", *options.uuid));
  }
  if (options.inode_ratio && (*options.inode_ratio < 1024 || *options.inode_ratio > 67108864)) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 inode ratio {} (1024 to 67108864)",
                          *options.inode_ratio));
  }
  return {};
}

uint64_t Ext4DataStart(const Ext4Options& options, uint64_t max_data_bytes) {
  const uint32_t bs = options.block_size;
  return FrontBlocks(bs, MaxImageBytes(options, max_data_bytes)) * bs;
}

Result<Ext4Report> BuildExt4(int image_fd, const ImageTree& tree, uint64_t data_start,
                             const Ext4Options& options, const BuildControl& control) {
  static std::once_flag messages;  // error_message() names libext2fs's codes once this ran
  std::call_once(messages, [] { initialize_ext2_error_table(); });
  auto log = Logger("ext4");
  int64_t start = sandbox::MonotonicNs();
  LX_TRY(CheckExt4Options(options));
  const uint64_t bs = options.block_size;
  Ext4Report report;
  Ext4Plan& plan = report.plan;

  Layout layout;
  LX_TRY(layout.Collect(tree, options.block_size));
  plan.inodes = layout.nodes().size();
  for (const Node& n : layout.nodes()) {
    if (n.kind() == Kind::kFile) plan.content_bytes += n.meta->data_bytes;
  }

  // Every live run of data, by where it stands: two files on one block is a
  // lie of the records (the extractor wrote each block once).
  std::vector<Placed> placed;
  for (uint32_t i = 0; i < layout.nodes().size(); ++i) {
    const Node& n = layout.nodes()[i];
    if (n.kind() != Kind::kFile) continue;
    for (uint32_t r = 0; r < n.runs.size(); ++r) {
      placed.push_back({n.runs[r].physical, n.runs[r].length, i, r});
    }
  }
  std::sort(placed.begin(), placed.end(),
            [](const Placed& a, const Placed& b) { return a.physical < b.physical; });
  for (size_t i = 1; i < placed.size(); ++i) {
    if (placed[i].physical < placed[i - 1].physical + placed[i - 1].length) {
      return Fail(MakeError(ErrorKind::kPeer, "bad record: data of {:?} overlaps {:?}",
                            layout.nodes()[placed[i].node].path,
                            layout.nodes()[placed[i - 1].node].path));
    }
  }

  uint64_t moved = 0;
  LX_TRY(Compact(image_fd, layout, placed, data_start / bs, bs, &moved));
  if (moved > 0) log->debug("compacted: {} blocks moved into dead data's room", moved);
  Sizing sizing = Measure(layout, bs, data_start);

  // The size: the data where it stands, the metadata, the inode tables, the
  // bitmaps and a journal, and no more: like tar2ext4's, the image is as small
  // as its content allows (a container's root is mounted read-only or under
  // an overlay); --size makes room. Inodes: the tree's and 16 spare.
  const uint64_t needed_inodes = sizing.inodes + EXT2_GOOD_OLD_FIRST_INO;
  const uint64_t front = data_start / bs;
  const uint64_t blocks_per_group = 8 * bs;
  auto journal_for = [](uint64_t fs_blocks) -> uint64_t {
    int j = ext2fs_default_journal_size(fs_blocks);
    return j > 0 ? static_cast<uint64_t>(j) : 0;
  };
  // Blocks for `inodes` and everything else, as ext2fs_initialize lays them
  // out (inode tables rounded up per group); the group count follows the
  // total, so go round until it settles.
  auto size_for = [&](uint64_t inodes, uint64_t* journal) {
    uint64_t total =
        std::max(sizing.data_end_block, front + sizing.data_blocks) + sizing.meta_blocks;
    uint64_t groups = 1, blocks = total;
    for (int i = 0; i < 4; ++i) {
      groups = std::max<uint64_t>(1, DivUp(blocks, blocks_per_group));
      uint64_t per_group = RoundUp(DivUp(inodes, groups), 8);
      uint64_t itable = groups * DivUp(per_group * kInodeSize, bs);
      blocks = total + itable + 2 * groups;
      // What the group descriptors leave of their reserve in front of the
      // data (counted in the data's end) takes the bitmaps, then single
      // blocks (Builder::Allocate).
      uint64_t front_used = (bs == 1024 ? 1 : 0) + 1 + DivUp(groups * kDescSize, bs);
      uint64_t room = front > front_used ? front - front_used : 0;
      uint64_t bitmaps_in_front = std::min(room, 2 * groups);
      blocks -= bitmaps_in_front + std::min(room - bitmaps_in_front, sizing.single_blocks);
      *journal = journal_for(blocks);
      blocks += *journal;
    }
    return blocks;
  };
  uint64_t inode_count = needed_inodes + 16;
  uint64_t journal_blocks = 0;
  // At least 1 MiB: below that libext2fs finds no room for a group's tables.
  uint64_t need = std::max<uint64_t>(size_for(inode_count, &journal_blocks), (1u << 20) / bs);
  if (options.inode_ratio) {
    // The ratio decides the inode count from the size, and the inode tables
    // grow the size: solve for both.
    for (int i = 0; i < 8; ++i) {
      inode_count = std::max(needed_inodes, need * bs / *options.inode_ratio);
      need = std::max<uint64_t>(size_for(inode_count, &journal_blocks), (1u << 20) / bs);
    }
  }
  log->debug("plan: data_end={} data={} meta={} singles={} inodes={} journal={} blocks={}",
             sizing.data_end_block, sizing.data_blocks, sizing.meta_blocks, sizing.single_blocks,
             inode_count, journal_blocks, need);
  uint64_t blocks = need;
  if (options.size_bytes) {
    uint64_t given = *options.size_bytes / bs;
    if (given < need) {
      return Fail(MakeError(ErrorKind::kPolicy,
                            "ext4 size {} bytes is too small: the content needs at least {} bytes",
                            *options.size_bytes, need * bs));
    }
    // The journal mke2fs would give this size, where it fits.
    if (given - need + journal_blocks >= journal_for(given)) journal_blocks = journal_for(given);
    blocks = given;
    if (options.inode_ratio)
      inode_count = std::max(inode_count, blocks * bs / *options.inode_ratio);
  }
  if (inode_count > UINT32_MAX - 1024) {
    return Fail(
        MakeError(ErrorKind::kPolicy, "ext4: {} inodes, more than ext4 holds", inode_count));
  }

  // The blocks no live file holds get punched out: data of removed and
  // replaced files, whatever an extractor wrote beyond what its records name,
  // and (on a second attempt) the first one's metadata.
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(image_fd));
  uint64_t file_end = RoundUp(static_cast<uint64_t>(st.st_size), bs);
  auto punch_all_but_data = [&](uint64_t from, bool count) -> Status {
    uint64_t cursor = from;
    auto punch_to = [&](uint64_t end) -> Status {
      if (end <= cursor) return {};
      if (count) plan.dead_bytes += end - cursor;
      return sandbox::PunchHole(image_fd, cursor, end - cursor);
    };
    for (const Placed& p : placed) {
      LX_TRY(punch_to(p.physical * bs));
      cursor = std::max(cursor, (p.physical + p.length) * bs);
    }
    return punch_to(file_end);
  };
  LX_TRY(punch_all_but_data(data_start, true));
  // The front too: only the broker writes there (below, last), but a first
  // layer could reach it (JailData::copy_input). Every block no one wrote
  // reads as zeros: the inode tables are taken as zeroed.
  if (data_start > 0) LX_TRY(sandbox::PunchHole(image_fd, 0, data_start));

  // Sizing counts every block; should libext2fs still want one more (its
  // extent or xattr blocks are estimated from above), one more attempt with
  // room to spare, after its metadata is punched out again.
  for (int attempt = 0;; ++attempt) {
    Status built = BuildOnce(image_fd, tree, layout, placed, options, control, blocks, inode_count,
                             journal_blocks, data_start, sizing.data_end_block, plan);
    if (built) break;
    if (attempt > 0 || options.size_bytes || built.error().kind() != ErrorKind::kOs ||
        built.error().err() != ENOSPC) {
      return Fail(std::move(built).error());
    }
    log->debug("ext4: {} blocks were too few; again with more", blocks);
    blocks += blocks / 64 + 64;
    file_end = std::max(file_end, plan.size_bytes);
    LX_TRY(punch_all_but_data(0, false));
  }
  report.build_ns = sandbox::MonotonicNs() - start;
  log->info("built: size={} inodes={} content={} dead={} ms={:.1f}", plan.size_bytes, plan.inodes,
            plan.content_bytes, plan.dead_bytes, report.build_ns / 1e6);
  return report;
}

}  // namespace layerx::broker
