// The image's merged metadata: one map keyed by resolved path, built from the
// records of every layer in order. Every record is validated first (the
// extractor may be compromised): a bad one is a kPeer error and nothing of it
// is applied.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "extractor/records.h"
#include "policy/limits.h"
#include "policy/result.h"

namespace layerx::broker {

struct Inode {
  extractor::EntryRecord meta;  // meta.path is the name it was made under
};

class ImageTree : public extractor::RecordSink {
 public:
  explicit ImageTree(const policy::Limits& limits, const policy::EntryRules& rules = {});

  // RecordSink: validate, apply the policy's entry rules (left out, stripped,
  // or kLimitExceeded), then merge. A removal drops the path and everything
  // below it; an entry replaces what its path held (a non-dir over a dir drops
  // the subtree); a hardlink shares its target's inode.
  Status Add(extractor::EntryRecord record) override;
  Status Add(extractor::RemovalRecord record) override;

  // path -> inode; "" is the root, always a directory.
  const std::map<std::string, std::shared_ptr<Inode>>& entries() const { return entries_; }
  size_t size() const { return entries_.size(); }

 private:
  Status Validate(const extractor::EntryRecord& r) const;
  void EraseSubtree(const std::string& path, bool include_self);

  policy::Limits limits_;
  policy::EntryRules rules_;
  uint64_t file_bytes_ = 0;  // all layers: against max_image_bytes
  std::map<std::string, std::shared_ptr<Inode>> entries_;
};

}  // namespace layerx::broker
