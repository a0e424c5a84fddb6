// broker/tree: the image's merged metadata, every record of a (possibly
// compromised) extractor validated first. May use: no other broker folder
// (extractor's records, policy).
//
// The image's merged metadata: one map keyed by resolved path, built from the
// records of every layer in order. Every record is validated first (the
// extractor may be compromised): a bad one is a kPeer error and nothing of it
// is applied.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_set>

#include "extractor/records.h"
#include "policy/limits.h"
#include "policy/result.h"

namespace layerx::broker {

struct Inode {
  extractor::EntryRecord meta;  // meta.path is the name it was made under
};

// Where a layer's file data may stand in the data fd (the ext4 image): from
// `start` on, in whole blocks. Without a window, a record with extents is a lie.
struct DataWindow {
  bool enabled = false;
  uint64_t start = 0;
  uint32_t block_size = 4096;
};

// The bytes of file data a record stands for, for the limits: its dataBytes,
// or what its extents place if that is more.
uint64_t AccountedBytes(const extractor::EntryRecord& r);

class ImageTree : public extractor::RecordSink {
 public:
  explicit ImageTree(const policy::Limits& limits, const policy::EntryRules& rules = {});

  // The records that follow are the next layer's (the job calls it before each
  // layer's extractor starts). What came before is "lower" to them.
  void BeginLayer(DataWindow window = {});
  // The end of the data the current layer's records point at (0: none).
  uint64_t layer_data_end() const { return layer_data_end_; }

  // RecordSink: validate, apply the policy's entry rules (left out, stripped,
  // or kLimitExceeded), then merge. A removal drops the path and everything
  // below it; an entry replaces what its path held (a non-dir over a dir drops
  // the subtree); a hardlink shares its target's inode. A hardlink whose target
  // is not in the tree is kInvalidInput (the extractor cannot see device nodes,
  // so a link to a missing one is bad input, not a lie); one to a directory
  // is kPeer. An opaqueDir removal hides, below its directory, every entry of a
  // lower layer except the directories leading to an entry of this layer.
  Status Add(extractor::EntryRecord record) override;
  Status Add(extractor::RemovalRecord record) override;

  // path -> inode; "" is the root, always a directory.
  const std::map<std::string, std::shared_ptr<Inode>>& entries() const { return entries_; }
  size_t size() const { return entries_.size(); }

 private:
  Status Validate(const extractor::EntryRecord& r) const;
  Status ValidateExtents(const extractor::EntryRecord& r);
  void EraseSubtree(const std::string& path, bool include_self);
  Status HideLower(const std::string& dir);

  policy::Limits limits_;
  policy::EntryRules rules_;
  uint64_t file_bytes_ = 0;  // all layers: against max_image_bytes
  DataWindow window_;
  uint64_t layer_data_end_ = 0;
  std::map<std::string, std::shared_ptr<Inode>> entries_;
  // The names the current layer's records made (per name, not per inode: a
  // link made now to a lower layer's inode is this layer's, its target is
  // not). Only one layer's worth is kept: a name in the tree and not in here
  // is a lower layer's. A name erased since stays in here harmlessly: it can
  // only come back through a record of this layer.
  std::unordered_set<std::string> this_layer_;
};

}  // namespace layerx::broker
