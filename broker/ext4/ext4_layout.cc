// The tree as the ext4 image will hold it (ext4_layout.h): collecting the
// nodes, sizing what the filesystem needs, and compacting the data.
#include "broker/ext4/ext4_layout.h"

#include <errno.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <unordered_map>
#include <utility>

#include "sandbox/sys.h"

namespace layerx::broker::ext4_detail {

namespace {

constexpr uint32_t kLostFoundBytes = 4096;  // one block (mke2fs gives 16 KiB, tar2ext4 one block)

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

}  // namespace

Status Layout::Collect(const ImageTree& tree, uint32_t bs) {
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

uint64_t Layout::DirBlocks(const Node& dir) const {
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

bool Layout::XattrsNeedBlock(const EntryRecord& m) {
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

}  // namespace layerx::broker::ext4_detail
