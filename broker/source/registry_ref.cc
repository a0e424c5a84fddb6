#include "broker/source/registry_ref.h"

#include <fmt/format.h>

#include "broker/source/source.h"

namespace layerx::broker {
namespace {

constexpr std::string_view kScheme = "docker://";
constexpr std::string_view kDockerHub = "docker.io";
constexpr std::string_view kDockerHubHost = "registry-1.docker.io";
constexpr size_t kMaxNameLength = 255;  // distribution's NameTotalLengthMax
constexpr size_t kMaxTagLength = 128;

std::unexpected<Error> Bad(std::string_view spec, std::string_view why) {
  return std::unexpected(MakeError(ErrorKind::kPolicy, "docker://{}: {}", spec, why));
}

bool IsLowerAlnum(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }
bool IsAlnum(char c) { return IsLowerAlnum(c) || (c >= 'A' && c <= 'Z'); }

// A path component: [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)* (distribution's
// reference grammar). Returns the reason it is not, or empty.
std::string CheckComponent(std::string_view c) {
  if (c.empty()) return "empty repository component";
  for (char ch : c) {
    if (ch >= 'A' && ch <= 'Z') return "repository name must be lowercase";
  }
  if (!IsLowerAlnum(c.front()) || !IsLowerAlnum(c.back())) {
    return fmt::format("repository component {:?} must start and end with a letter or digit", c);
  }
  for (size_t i = 0; i < c.size();) {
    if (IsLowerAlnum(c[i])) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < c.size() && !IsLowerAlnum(c[j])) ++j;
    std::string_view sep = c.substr(i, j - i);
    bool dashes = sep.find_first_not_of('-') == std::string_view::npos;
    if (!(sep == "." || sep == "_" || sep == "__" || dashes)) {
      return fmt::format("repository component {:?} has an invalid separator {:?}", c, sep);
    }
    i = j;
  }
  return {};
}

// HOST[:PORT], HOST being dot-separated labels of letters, digits and inner dashes.
bool IsValidRegistry(std::string_view r) {
  std::string_view host = r;
  if (size_t colon = r.find(':'); colon != std::string_view::npos) {
    host = r.substr(0, colon);
    std::string_view port = r.substr(colon + 1);
    if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != port.npos) {
      return false;
    }
    if (std::stoul(std::string(port)) > 65535) return false;
  }
  if (host.empty()) return false;
  size_t start = 0;
  while (start <= host.size()) {
    size_t end = host.find('.', start);
    if (end == std::string_view::npos) end = host.size();
    std::string_view label = host.substr(start, end - start);
    if (label.empty() || !IsAlnum(label.front()) || !IsAlnum(label.back())) return false;
    for (char ch : label) {
      if (!IsAlnum(ch) && ch != '-') return false;
    }
    start = end + 1;
  }
  return true;
}

bool IsValidTag(std::string_view t) {
  if (t.empty() || t.size() > kMaxTagLength) return false;
  if (!(IsAlnum(t[0]) || t[0] == '_')) return false;
  for (char ch : t) {
    if (!(IsAlnum(ch) || ch == '_' || ch == '.' || ch == '-')) return false;
  }
  return true;
}

}  // namespace

std::string NormalizeRegistry(std::string_view registry) {
  if (registry == "docker.io" || registry == "index.docker.io" ||
      registry == "registry-1.docker.io") {
    return std::string(kDockerHub);
  }
  return std::string(registry);
}

std::string RegistryRef::ToString() const {
  if (!digest.empty()) return fmt::format("{}/{}@{}", registry, repository, digest);
  return fmt::format("{}/{}:{}", registry, repository, tag);
}

Result<RegistryRef> ParseRegistryRef(std::string_view spec) {
  if (spec.starts_with(kScheme)) spec.remove_prefix(kScheme.size());
  if (spec.empty()) return Bad(spec, "empty image name");
  RegistryRef ref;
  std::string_view name = spec;
  if (size_t at = name.find('@'); at != std::string_view::npos) {
    std::string digest(name.substr(at + 1));
    if (!IsValidDigest(digest)) {
      return Bad(spec, fmt::format("bad digest {:?} (want sha256: and 64 lowercase hex digits)",
                                   digest));
    }
    ref.digest = std::move(digest);
    name = name.substr(0, at);
  }
  size_t last_slash = name.rfind('/');
  size_t colon = name.rfind(':');
  if (colon != std::string_view::npos &&
      (last_slash == std::string_view::npos || colon > last_slash)) {
    std::string_view tag = name.substr(colon + 1);
    if (!IsValidTag(tag)) {
      return Bad(spec, fmt::format("bad tag {:?} (want [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})", tag));
    }
    if (!ref.digest.empty()) {
      return Bad(spec, "a reference with both a tag and a digest is not supported");
    }
    ref.tag = std::string(tag);
    name = name.substr(0, colon);
  }
  if (name.empty()) return Bad(spec, "empty repository name");

  std::string_view repo = name;
  ref.registry = std::string(kDockerHub);
  if (size_t slash = name.find('/'); slash != std::string_view::npos) {
    std::string_view first = name.substr(0, slash);
    if (first.find_first_of(".:") != std::string_view::npos || first == "localhost") {
      if (!IsValidRegistry(first)) {
        return Bad(spec, fmt::format("bad registry {:?} (want HOST[:PORT])", first));
      }
      ref.registry = NormalizeRegistry(first);
      repo = name.substr(slash + 1);
    }
  }
  if (repo.empty()) return Bad(spec, "empty repository name");
  size_t start = 0;
  while (start <= repo.size()) {
    size_t end = repo.find('/', start);
    if (end == std::string_view::npos) end = repo.size();
    if (std::string why = CheckComponent(repo.substr(start, end - start)); !why.empty()) {
      return Bad(spec, why);
    }
    start = end + 1;
  }
  ref.repository = std::string(repo);
  if (ref.registry == kDockerHub) {
    ref.host = std::string(kDockerHubHost);
    if (ref.repository.find('/') == std::string::npos) ref.repository = "library/" + ref.repository;
  } else {
    ref.host = ref.registry;
  }
  if (ref.registry.size() + 1 + ref.repository.size() > kMaxNameLength) {
    return Bad(spec, fmt::format("name longer than {} characters", kMaxNameLength));
  }
  if (ref.tag.empty() && ref.digest.empty()) ref.tag = "latest";
  return ref;
}

}  // namespace layerx::broker
