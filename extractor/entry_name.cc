#include "extractor/entry_name.h"

namespace layerx::extractor {

Result<EntryName> EntryName::Parse(std::string_view untrusted_name, const policy::Limits& limits) {
  if (untrusted_name.find('\0') != std::string_view::npos) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "name contains a NUL byte"));
  }
  if (untrusted_name.size() > limits.max_path_bytes) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "name is {} bytes, limit max_path_bytes={}",
                          untrusted_name.size(), limits.max_path_bytes));
  }
  std::vector<std::string> components;
  size_t pos = 0;
  while (pos <= untrusted_name.size()) {
    size_t slash = untrusted_name.find('/', pos);
    if (slash == std::string_view::npos) slash = untrusted_name.size();
    std::string_view part = untrusted_name.substr(pos, slash - pos);
    pos = slash + 1;
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      // Docker cleans "/.." to "/" for absolute names; a relative name that
      // climbs above its start is an escape attempt either way.
      if (components.empty()) {
        return Fail(MakeError(ErrorKind::kSafetyViolation, "name climbs above the root"));
      }
      components.pop_back();
      continue;
    }
    components.emplace_back(part);
    if (components.size() > limits.max_path_depth) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "name deeper than max_path_depth={}",
                            limits.max_path_depth));
    }
  }
  return EntryName(std::move(components));
}

EntryName EntryName::Parent() const {
  std::vector<std::string> parent(components_.begin(),
                                  components_.empty() ? components_.end() : components_.end() - 1);
  return EntryName(std::move(parent));
}

EntryName EntryName::Child(std::string name) const {
  std::vector<std::string> child = components_;
  child.push_back(std::move(name));
  return EntryName(std::move(child));
}

std::string EntryName::Join() const {
  std::string out;
  for (const std::string& c : components_) {
    if (!out.empty()) out += '/';
    out += c;
  }
  return out;
}

bool IsCanonicalPath(std::string_view path) {
  if (path.empty()) return true;
  size_t pos = 0;
  while (true) {
    size_t slash = path.find('/', pos);
    std::string_view part =
        path.substr(pos, slash == std::string_view::npos ? std::string_view::npos : slash - pos);
    if (part.empty() || part == "." || part == ".." || part.find('\0') != std::string_view::npos) {
      return false;
    }
    if (slash == std::string_view::npos) return true;
    pos = slash + 1;
  }
}

}  // namespace layerx::extractor
