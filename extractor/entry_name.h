// Tar names are bytes. EntryName::Parse cleans a name lexically the way Docker
// and containerd do (drop a leading "/", "." and empty components; "a/b/../c"
// becomes "a/c") and refuses one that still climbs above the root. What comes
// out is a list of plain components: none empty, ".", "..", or holding '/' or NUL.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "policy/limits.h"
#include "policy/result.h"

namespace layerx::extractor {

class EntryName {
 public:
  // kSafetyViolation: climbs above the root. kInvalidInput: NUL byte.
  // kLimitExceeded: longer than limits.max_path_bytes or deeper than max_path_depth.
  static Result<EntryName> Parse(std::string_view untrusted_name, const policy::Limits& limits);
  static EntryName Root() { return EntryName({}); }
  explicit EntryName(std::vector<std::string> components) : components_(std::move(components)) {}

  const std::vector<std::string>& components() const { return components_; }
  bool is_root() const { return components_.empty(); }
  const std::string& leaf() const { return components_.back(); }
  EntryName Parent() const;
  EntryName Child(std::string name) const;
  // "a/b/c"; "" for the root.
  std::string Join() const;

 private:
  std::vector<std::string> components_;
};

// True for a canonical relative path as records carry it: "" (the root) or
// components joined by '/', none empty, "." or "..", no NUL.
bool IsCanonicalPath(std::string_view path);

}  // namespace layerx::extractor
