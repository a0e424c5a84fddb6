#include "broker/tree/image_tree.h"

#include <algorithm>
#include <iterator>
#include <vector>

#include "extractor/entry_name.h"
#include "extractor/entry_rules.h"

namespace layerx::broker {

using extractor::EntryRecord;
using extractor::Kind;
using extractor::RemovalRecord;

namespace {

Error Bad(std::string message) { return Error(ErrorKind::kPeer, 0, "bad record: " + message); }

std::string ParentOf(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash);
}

}  // namespace

ImageTree::ImageTree(const policy::Limits& limits, const policy::EntryRules& rules)
    : limits_(limits), rules_(rules) {
  auto root = std::make_shared<Inode>();
  root->meta.kind = Kind::kDir;
  root->meta.mode = 0755;
  entries_.emplace("", std::move(root));
}

Status ImageTree::Validate(const EntryRecord& r) const {
  if (!extractor::IsCanonicalPath(r.path)) return Fail(Bad(fmt::format("path {:?}", r.path)));
  if (r.path.size() > limits_.max_path_bytes) return Fail(Bad("path too long"));
  if (r.path.empty() && r.kind != Kind::kDir) return Fail(Bad("the root must be a directory"));
  if (r.mode > 07777) return Fail(Bad(fmt::format("mode {:o}", r.mode)));
  if (r.uid == 0xffffffffu || r.gid == 0xffffffffu) return Fail(Bad("uid/gid -1"));
  if (r.size > limits_.max_layer_bytes || (r.kind != Kind::kFile && r.size != 0) ||
      r.data_bytes > r.size) {
    return Fail(Bad("size"));
  }
  bool symlink = r.kind == Kind::kSymlink;
  if (symlink == r.symlink_target.empty() ||
      r.symlink_target.size() > limits_.max_link_target_bytes ||
      r.symlink_target.find('\0') != std::string::npos) {
    return Fail(Bad("symlink target"));
  }
  bool hardlink = r.kind == Kind::kHardlink;
  if (hardlink == r.hardlink_target.empty() ||
      (hardlink && (r.hardlink_target.empty() || !extractor::IsCanonicalPath(r.hardlink_target)))) {
    return Fail(Bad("hardlink target"));
  }
  bool device = r.kind == Kind::kChar || r.kind == Kind::kBlock;
  if (!device && (r.rdev_major != 0 || r.rdev_minor != 0)) return Fail(Bad("rdev on a non-device"));
  size_t xattr_bytes = 0;
  if (r.xattrs.size() > limits_.max_xattrs_per_entry) return Fail(Bad("too many xattrs"));
  for (const auto& [name, value] : r.xattrs) {
    xattr_bytes += name.size() + value.size();
    if (name.empty() || name.find('\0') != std::string::npos) return Fail(Bad("xattr name"));
  }
  if (xattr_bytes > limits_.max_xattr_bytes) return Fail(Bad("xattrs too large"));
  // Every entry hangs below a directory the records made: a path through a
  // symlink or a file means the extractor lied about where it wrote.
  if (!r.path.empty()) {
    auto parent = entries_.find(ParentOf(r.path));
    if (parent == entries_.end() || parent->second->meta.kind != Kind::kDir) {
      return Fail(Bad(fmt::format("{:?} has no parent directory", r.path)));
    }
  }
  return {};
}

void ImageTree::EraseSubtree(const std::string& path, bool include_self) {
  // Below "p": every key starting "p/", a contiguous range from "p/" to "p0"
  // ('0' follows '/'); the root's subtree is everything but "".
  if (path.empty()) {
    entries_.erase(std::next(entries_.begin()), entries_.end());
    return;
  }
  entries_.erase(entries_.lower_bound(path + "/"), entries_.lower_bound(path + "0"));
  if (include_self) entries_.erase(path);
}

void ImageTree::BeginLayer(DataWindow window) {
  this_layer_.clear();
  window_ = window;
  layer_data_end_ = 0;
}

// SECURITY: where the extractor says a file's data went is checked as closely as
// its name: whole blocks, ascending, inside the file's size, and only inside
// this layer's window of the data fd, where seccomp let it write. Two live
// files sharing blocks is checked when the image is built (broker/ext4/ext4.cc),
// since only the final tree says which files live.
Status ImageTree::ValidateExtents(const EntryRecord& r) {
  if (r.extents.empty()) return {};
  if (!window_.enabled || r.kind != Kind::kFile) return Fail(Bad("data extents"));
  const uint64_t bs = window_.block_size;
  uint64_t next_logical = 0, total = 0;
  for (const extractor::DataExtent& x : r.extents) {
    // Ascending in the data fd too, over the whole layer (the extractor
    // appends): no two records of a layer can name one block, and a layer
    // cannot name more blocks than its window holds.
    const uint64_t next_physical = (layer_data_end_ + bs - 1) / bs * bs;
    if (x.length == 0 || x.logical % bs != 0 || x.physical % bs != 0 || x.logical < next_logical ||
        x.physical < window_.start || x.physical < next_physical || x.length > r.size ||
        x.logical > r.size - x.length || x.physical > UINT64_MAX - x.length - bs) {
      return Fail(Bad(
          fmt::format("data extent {}+{} at {} of {:?}", x.logical, x.length, x.physical, r.path)));
    }
    total += x.length;
    next_logical = (x.logical + x.length + bs - 1) / bs * bs;
    layer_data_end_ = std::max(layer_data_end_, x.physical + x.length);
  }
  if (total > r.size) return Fail(Bad(fmt::format("data extents of {:?}", r.path)));
  return {};
}

uint64_t AccountedBytes(const EntryRecord& r) {
  // What the limits count: the data the record says it has, or the data its
  // extents place, whichever is more (a lying dataBytes of 0 counts all the
  // same).
  uint64_t placed = 0;
  for (const extractor::DataExtent& x : r.extents) placed += x.length;
  return std::max(r.data_bytes, placed);
}

Status ImageTree::Add(EntryRecord r) {
  LX_TRY(Validate(r));
  LX_TRY(ValidateExtents(r));
  LX_ASSIGN_OR_RETURN(bool admitted, extractor::ApplyEntryRules(rules_, r));
  if (!admitted) return {};
  // The total is the broker's own count: no extractor can talk it down.
  file_bytes_ += AccountedBytes(r);
  if (file_bytes_ > limits_.max_image_bytes) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "image data over max_image_bytes={}",
                          limits_.max_image_bytes));
  }
  if (r.kind == Kind::kHardlink) {
    auto target = entries_.find(r.hardlink_target);
    if (target == entries_.end()) {
      // The extractor sends a link whose target is on no disk when the
      // target's directory exists: a device node may stand there, which only
      // this tree has. None does: the layer's fault, not the extractor's.
      return Fail(
          MakeError(ErrorKind::kInvalidInput, "hardlink target {:?} not found", r.hardlink_target)
              .WithEntry(r.path));
    }
    // Directories are always on disk, where the extractor refuses them.
    if (target->second->meta.kind == Kind::kDir) {
      return Fail(Bad(fmt::format("hardlink to the directory {:?}", r.hardlink_target)));
    }
    if (r.path == r.hardlink_target) return {};  // asked only whether it exists
    std::shared_ptr<Inode> inode = target->second;
    EraseSubtree(r.path, /*include_self=*/false);
    this_layer_.insert(r.path);
    entries_[r.path] = std::move(inode);
    return {};
  }
  this_layer_.insert(r.path);
  auto it = entries_.find(r.path);
  if (it != entries_.end() && it->second->meta.kind == Kind::kDir && r.kind == Kind::kDir) {
    // Dir on dir merges: new metadata, children stay (and stay their layers').
    it->second = std::make_shared<Inode>(Inode{std::move(r)});
    return {};
  }
  if (it != entries_.end()) EraseSubtree(r.path, /*include_self=*/false);
  std::string path = r.path;
  entries_[path] = std::make_shared<Inode>(Inode{std::move(r)});
  return {};
}

Status ImageTree::Add(RemovalRecord r) {
  if (r.opaque_dir) return HideLower(r.path);
  if (r.path.empty() || !extractor::IsCanonicalPath(r.path)) {
    return Fail(Bad(fmt::format("removal of {:?}", r.path)));
  }
  EraseSubtree(r.path, /*include_self=*/true);
  return {};
}

// SECURITY: an opaqueDir record only ever hides what LOWER layers put below a
// directory; the same extractor could hide each of those names with a plain
// removal record anyway, so a lying one gains nothing by it. Like every other
// record, it must name a directory the tree has, by a canonical path (the
// root, "", is allowed: an opaque marker at the top of a layer).
Status ImageTree::HideLower(const std::string& dir) {
  if (!dir.empty() && !extractor::IsCanonicalPath(dir)) {
    return Fail(Bad(fmt::format("opaque dir {:?}", dir)));
  }
  auto at = entries_.find(dir);
  if (at == entries_.end() || at->second->meta.kind != Kind::kDir) {
    return Fail(Bad(fmt::format("opaque dir {:?} is no directory in the tree", dir)));
  }
  // Below "p": from "p/" to "p0" ('0' follows '/'); below the root: all but "".
  auto first = dir.empty() ? std::next(at) : entries_.lower_bound(dir + "/");
  auto last = dir.empty() ? entries_.end() : entries_.lower_bound(dir + "0");
  // Backwards, so that every name is seen after all the names below it (they
  // sort after it): a lower layer's directory stays when something of this
  // layer stays below it, as the applier keeps it on disk (its touched_).
  std::unordered_set<std::string> holds_this_layer;
  std::vector<std::map<std::string, std::shared_ptr<Inode>>::iterator> hidden;
  for (auto it = last; it != first;) {
    --it;
    const std::string& path = it->first;
    if (this_layer_.contains(path) || holds_this_layer.contains(path)) {
      std::string parent = ParentOf(path);
      if (parent != dir) holds_this_layer.insert(std::move(parent));
    } else {
      hidden.push_back(it);
    }
  }
  for (auto it : hidden) entries_.erase(it);
  return {};
}

}  // namespace layerx::broker
