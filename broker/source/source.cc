#include "broker/source/source.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/utsname.h>

#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>

#include "extractor/digest.h"
#include "sandbox/sys.h"

namespace layerx::broker {

using nlohmann::json;
using sandbox::UniqueFd;

namespace {

constexpr uint64_t kMaxDocumentBytes = 4 * 1024 * 1024;
constexpr int kMaxIndexDepth = 4;
constexpr const char* kRefName = "org.opencontainers.image.ref.name";

constexpr const char* kIndexTypes[] = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
};
constexpr const char* kManifestTypes[] = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
};
constexpr const char* kLayerTypes[] = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
};

template <size_t N>
bool OneOf(const std::string& value, const char* const (&set)[N]) {
  for (const char* s : set) {
    if (value == s) return true;
  }
  return false;
}

Error Bad(std::string message) { return Error(ErrorKind::kInvalidInput, 0, std::move(message)); }

std::string Str(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// A descriptor as the spec has it; only validated fields.
struct Descriptor {
  std::string media_type;
  std::string digest;
  std::optional<uint64_t> size;
  json platform;
  std::string ref_name;
};

Result<Descriptor> ParseDescriptor(const json& j, const char* what) {
  if (!j.is_object()) return Fail(Bad(fmt::format("{}: descriptor is not an object", what)));
  Descriptor d;
  d.media_type = Str(j, "mediaType");
  d.digest = Str(j, "digest");
  if (!IsValidDigest(d.digest)) {
    return Fail(Bad(fmt::format("{}: invalid digest {:?}", what, d.digest.substr(0, 100))));
  }
  if (auto it = j.find("size"); it != j.end()) {
    if (!it->is_number_unsigned()) return Fail(Bad(fmt::format("{}: invalid size", what)));
    d.size = it->get<uint64_t>();
  }
  if (auto it = j.find("platform"); it != j.end() && it->is_object()) d.platform = *it;
  if (auto it = j.find("annotations"); it != j.end() && it->is_object())
    d.ref_name = Str(*it, kRefName);
  return d;
}

// Reads a regular file below `dir` (never out of it), at most `max` bytes.
// Whoever wrote the layout (or the archive staged into `dir`) may have put a
// fifo or a device there: it is refused before anything opens it for reading,
// which would block (a fifo without a writer) or never end (a device).
Result<std::string> ReadBounded(int dir, const std::string& path, uint64_t max) {
  auto fd = sandbox::OpenRegularFile(dir, path,
                                     RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS);  // links stay inside
  if (!fd) {
    if (fd.error().err() == ENOENT) return Fail(Bad(fmt::format("{:?} is missing", path)));
    if (fd.error().err() == EXDEV)
      return Fail(Bad(fmt::format("{:?} leads out of the layout", path)));
    return Fail(fd.error());
  }
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(fd->get()));
  if (static_cast<uint64_t>(st.st_size) > max) {
    return Fail(Error(ErrorKind::kLimitExceeded, 0,
                      fmt::format("{:?} is {} bytes, over {}", path, st.st_size, max)));
  }
  return sandbox::ReadUpTo(fd->get(), static_cast<size_t>(st.st_size));
}

std::string BlobPath(const std::string& digest) { return "blobs/sha256/" + digest.substr(7); }

// A blob whose bytes must hash to its descriptor's digest (and size).
Result<std::string> ReadBlob(int dir, const Descriptor& d) {
  LX_ASSIGN_OR_RETURN(std::string bytes, ReadBounded(dir, BlobPath(d.digest), kMaxDocumentBytes));
  extractor::Sha256 sha;
  sha.Update(bytes.data(), bytes.size());
  std::string got = sha.Finish();
  if (got != d.digest) {
    return Fail(MakeError(ErrorKind::kIntegrity,
                          "blob {} does not match its digest (content is {})", d.digest, got));
  }
  if (d.size && *d.size != bytes.size()) {
    return Fail(MakeError(ErrorKind::kIntegrity, "blob {} is {} bytes, descriptor says {}",
                          d.digest, bytes.size(), *d.size));
  }
  return bytes;
}

Result<json> ParseJson(const std::string& text, const std::string& what) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return Fail(Bad(fmt::format("{}: not a JSON object", what)));
  return j;
}

Result<std::vector<std::string>> ParseDiffIds(const json& config) {
  std::vector<std::string> diff_ids;
  auto rootfs = config.find("rootfs");
  if (rootfs == config.end() || !rootfs->is_object() || !rootfs->contains("diff_ids") ||
      !(*rootfs)["diff_ids"].is_array()) {
    return Fail(Bad("config has no rootfs.diff_ids"));
  }
  for (const json& id : (*rootfs)["diff_ids"]) {
    if (!id.is_string() || !IsValidDigest(id.get<std::string>())) {
      return Fail(Bad("config: invalid diff_id"));
    }
    diff_ids.push_back(id.get<std::string>());
  }
  return diff_ids;
}

// "sha256:<hex>" when a file name is a content address ("<hex>", "<hex>.json",
// "<hex>.tar", "blobs/sha256/<hex>"), else empty.
std::string DigestFromName(const std::string& path) {
  std::string base = path.substr(path.rfind('/') == std::string::npos ? 0 : path.rfind('/') + 1);
  for (const char* suffix : {".json", ".tar"}) {
    if (base.size() > 5 && base.ends_with(suffix)) base.resize(base.size() - std::strlen(suffix));
  }
  std::string digest = "sha256:" + base;
  return IsValidDigest(digest) ? digest : std::string();
}

bool Matches(const json& platform, const Platform& want) {
  if (!platform.is_object()) return false;
  if (Str(platform, "os") != want.os || Str(platform, "architecture") != want.arch) return false;
  std::string variant = Str(platform, "variant");
  return want.variant.empty() || variant.empty() || variant == want.variant;
}

// Walks index -> manifest -> config -> layers. Documents come from `read`
// (checked against their descriptor there); layers are blobs below `dir` (an
// OCI layout), or, with dir -1, streams the caller opens (a registry's).
class OciResolver {
 public:
  using Reader = std::function<Result<std::string>(const Descriptor&, bool manifest)>;
  OciResolver(int dir, const Platform& platform)
      : dir_(dir),
        platform_(platform),
        read_([dir](const Descriptor& d, bool) { return ReadBlob(dir, d); }) {}
  OciResolver(const Platform& platform, Reader read, LayersFound on_layers)
      : dir_(-1), platform_(platform), read_(std::move(read)), on_layers_(std::move(on_layers)) {}

  Status Resolve(const std::string& ref, ResolvedImage* out) {
    LX_ASSIGN_OR_RETURN(std::string layout, ReadBounded(dir_, "oci-layout", kMaxDocumentBytes));
    LX_ASSIGN_OR_RETURN(json layout_json, ParseJson(layout, "oci-layout"));
    if (Str(layout_json, "imageLayoutVersion").empty()) {
      return Fail(Bad("oci-layout: no imageLayoutVersion"));
    }
    LX_ASSIGN_OR_RETURN(std::string index_text, ReadBounded(dir_, "index.json", kMaxDocumentBytes));
    LX_ASSIGN_OR_RETURN(json index, ParseJson(index_text, "index.json"));
    LX_ASSIGN_OR_RETURN(std::vector<Descriptor> all, Manifests(index, "index.json"));
    std::vector<Descriptor> chosen;
    if (all.empty()) return Fail(Bad("index.json lists no manifests"));
    if (ref.empty()) {
      if (all.size() != 1) {
        return Fail(Error(
            ErrorKind::kPolicy, 0,
            fmt::format("index.json lists {} manifests: name one as oci:DIR:REF", all.size())));
      }
      chosen = all;
    } else if (ref[0] == '@') {
      for (const Descriptor& d : all) {
        if (d.digest == ref.substr(1)) chosen.push_back(d);
      }
    } else {
      for (const Descriptor& d : all) {
        if (d.ref_name == ref) chosen.push_back(d);
      }
    }
    if (chosen.empty())
      return Fail(Error(ErrorKind::kPolicy, 0, fmt::format("no image {:?} in the layout", ref)));
    if (chosen.size() > 1) {
      // Several entries under one tag: the platform decides, as in an index.
      std::vector<Descriptor> matching;
      for (const Descriptor& d : chosen) {
        if (Matches(d.platform, platform_)) matching.push_back(d);
      }
      if (matching.size() != 1) {
        return Fail(Error(ErrorKind::kPolicy, 0,
                          fmt::format("{} entries named {:?} and none unique for {}", chosen.size(),
                                      ref, platform_.ToString())));
      }
      chosen = matching;
    }
    return ResolveDescriptor(chosen[0], 0, out);
  }

 private:
  Result<std::vector<Descriptor>> Manifests(const json& index, const char* what) {
    auto it = index.find("manifests");
    if (it == index.end() || !it->is_array())
      return Fail(Bad(fmt::format("{}: no manifests", what)));
    std::vector<Descriptor> out;
    for (const json& m : *it) {
      LX_ASSIGN_OR_RETURN(Descriptor d, ParseDescriptor(m, what));
      out.push_back(std::move(d));
    }
    return out;
  }

  Status ResolveDescriptor(const Descriptor& d, int depth, ResolvedImage* out) {
    if (depth > kMaxIndexDepth) return Fail(Bad("image indexes nested too deep"));
    LX_ASSIGN_OR_RETURN(std::string text, read_(d, true));
    return ResolveText(d, text, depth, out);
  }

 public:
  // `text` is the document `d` names, already checked against it.
  Status ResolveText(const Descriptor& d, const std::string& text, int depth, ResolvedImage* out) {
    LX_ASSIGN_OR_RETURN(json doc, ParseJson(text, d.digest));
    std::string type = !d.media_type.empty() ? d.media_type : Str(doc, "mediaType");
    if (type.empty()) type = doc.contains("manifests") ? kIndexTypes[0] : kManifestTypes[0];
    if (OneOf(type, kIndexTypes)) {
      LX_ASSIGN_OR_RETURN(std::vector<Descriptor> children, Manifests(doc, "image index"));
      for (const Descriptor& child : children) {
        if (Matches(child.platform, platform_)) return ResolveDescriptor(child, depth + 1, out);
      }
      return Fail(Error(
          ErrorKind::kPolicy, 0,
          fmt::format("image index {} has no manifest for {}", d.digest, platform_.ToString())));
    }
    if (!OneOf(type, kManifestTypes)) {
      return Fail(
          Bad(fmt::format("{}: unsupported media type {:?}", d.digest, type.substr(0, 200))));
    }
    out->manifest_digest = d.digest;
    return ResolveManifest(doc, out);
  }

 private:
  // The layers first, then the config: a registry starts their downloads
  // (on_layers_) while the config is fetched.
  Status ResolveManifest(const json& manifest, ResolvedImage* out) {
    auto cfg = manifest.find("config");
    if (cfg == manifest.end()) return Fail(Bad("manifest has no config"));
    LX_ASSIGN_OR_RETURN(Descriptor config_desc, ParseDescriptor(*cfg, "config"));
    auto layers = manifest.find("layers");
    if (layers == manifest.end() || !layers->is_array()) return Fail(Bad("manifest has no layers"));
    for (size_t i = 0; i < layers->size(); ++i) {
      LX_ASSIGN_OR_RETURN(Descriptor l, ParseDescriptor((*layers)[i], "layer"));
      if (!OneOf(l.media_type, kLayerTypes)) {
        return Fail(Bad(fmt::format("layer {} ({}): unsupported media type {:?}", i + 1, l.digest,
                                    l.media_type.substr(0, 200))));
      }
      out->layers.push_back(LayerSource{.display = l.digest.substr(0, 19),
                                        .dir_fd = dir_,
                                        .path = dir_ >= 0 ? BlobPath(l.digest) : std::string(),
                                        .digest = l.digest,
                                        .size = l.size,
                                        .media_type = l.media_type});
    }
    if (on_layers_) LX_TRY(on_layers_(out->layers));
    LX_ASSIGN_OR_RETURN(out->config, read_(config_desc, false));
    out->config_digest = config_desc.digest;
    LX_ASSIGN_OR_RETURN(json config, ParseJson(out->config, "config"));
    LX_ASSIGN_OR_RETURN(std::vector<std::string> diff_ids, ParseDiffIds(config));
    if (out->layers.size() != diff_ids.size()) {
      return Fail(Bad(fmt::format("manifest has {} layers, config has {} diff_ids",
                                  out->layers.size(), diff_ids.size())));
    }
    for (size_t i = 0; i < diff_ids.size(); ++i) out->layers[i].diff_id = diff_ids[i];
    return {};
  }

  int dir_;
  Platform platform_;
  Reader read_;
  LayersFound on_layers_;
};

}  // namespace

bool IsValidDigest(const std::string& digest) {
  if (digest.size() != 71 || digest.compare(0, 7, "sha256:") != 0) return false;
  for (size_t i = 7; i < digest.size(); ++i) {
    char c = digest[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

Platform Platform::Host() {
  Platform p;
  struct utsname u;
  std::string machine = ::uname(&u) == 0 ? u.machine : "x86_64";
  if (machine == "x86_64")
    p.arch = "amd64";
  else if (machine == "aarch64")
    p.arch = "arm64";
  else if (machine.rfind("armv7", 0) == 0) {
    p.arch = "arm";
    p.variant = "v7";
  } else if (machine == "i686" || machine == "i386")
    p.arch = "386";
  else
    p.arch = machine;  // ppc64le, s390x, riscv64 are spelled the same
  return p;
}

Result<Platform> Platform::Parse(const std::string& text) {
  Platform p;
  size_t a = text.find('/');
  if (a == std::string::npos || a == 0 || a + 1 == text.size()) {
    return Fail(
        Error(ErrorKind::kPolicy, 0, fmt::format("platform {:?}: want os/arch[/variant]", text)));
  }
  p.os = text.substr(0, a);
  size_t b = text.find('/', a + 1);
  p.arch = text.substr(a + 1, b == std::string::npos ? std::string::npos : b - a - 1);
  if (b != std::string::npos) p.variant = text.substr(b + 1);
  if (p.arch.empty() || (b != std::string::npos && p.variant.empty())) {
    return Fail(
        Error(ErrorKind::kPolicy, 0, fmt::format("platform {:?}: want os/arch[/variant]", text)));
  }
  return p;
}

std::string Platform::ToString() const {
  return variant.empty() ? os + "/" + arch : os + "/" + arch + "/" + variant;
}

Result<ResolvedImage> ResolveFromDocument(const std::string& text, const std::string& media_type,
                                          const std::string& digest, const Platform& platform,
                                          const ReadByDigest& read,
                                          const LayersFound& on_layers) {
  ResolvedImage image;
  OciResolver resolver(
      platform,
      [&read](const Descriptor& d, bool manifest) { return read(d.digest, d.size, manifest); },
      on_layers);
  Descriptor top{.media_type = media_type, .digest = digest, .size = text.size()};
  LX_TRY(resolver.ResolveText(top, text, 0, &image));
  return image;
}

Result<ResolvedImage> ResolveSources(const std::vector<std::string>& specs,
                                     const Platform& platform) {
  ResolvedImage image;
  if (specs.size() == 1 && specs[0].rfind("oci:", 0) == 0) {
    std::string rest = specs[0].substr(4);
    size_t colon = rest.find(':');
    std::string dir = rest.substr(0, colon);
    std::string ref = colon == std::string::npos ? "" : rest.substr(colon + 1);
    if (dir.empty())
      return Fail(Error(ErrorKind::kPolicy, 0, "oci: needs a directory (oci:DIR[:REF])"));
    auto fd = sandbox::OpenAt(AT_FDCWD, dir, O_PATH | O_DIRECTORY);
    if (!fd) return Fail(std::move(fd).error().With("oci layout"));
    image.dir = std::move(*fd);
    OciResolver resolver(image.dir.get(), platform);
    if (Status s = resolver.Resolve(ref, &image); !s) {
      return Fail(std::move(s).error().With("oci:{}", dir));
    }
    return image;
  }
  for (const std::string& spec : specs) {
    for (const char* prefix : {"oci:", "docker-archive:", "docker://"}) {
      if (spec.starts_with(prefix)) {
        return Fail(MakeError(ErrorKind::kPolicy, "a {} source names a whole image: give it alone",
                              prefix));
      }
    }
    if (int passed = PassedFd(spec); passed >= 0) {
      LX_TRY(CheckPassedFd(passed, spec));
      image.layers.push_back(
          LayerSource{.display = spec, .dir_fd = -1, .path = spec, .fd = passed});
      continue;
    }
    std::string display =
        spec.substr(spec.rfind('/') == std::string::npos ? 0 : spec.rfind('/') + 1);
    image.layers.push_back(LayerSource{.display = display, .dir_fd = -1, .path = spec});
  }
  return image;
}

int PassedFd(const std::string& path) {
  std::string_view number;
  if (path == "/dev/stdin") {
    number = "0";
  } else if (path.starts_with("/dev/fd/")) {
    number = std::string_view(path).substr(8);
  } else if (path.starts_with("/proc/self/fd/")) {
    number = std::string_view(path).substr(14);
  } else {
    return -1;
  }
  if (number.empty() || number.size() > 9) return -1;
  int fd = 0;
  for (char c : number) {
    if (c < '0' || c > '9') return -1;
    fd = fd * 10 + (c - '0');
  }
  return fd;
}

Status CheckPassedFd(int fd, const std::string& name) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return Fail(OsError(errno, "{}: not an open descriptor", name));
  if ((flags & O_PATH) != 0 || (flags & O_ACCMODE) == O_WRONLY) {
    return Fail(Bad(fmt::format("{}: not open for reading", name)));
  }
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(fd));
  if (!S_ISREG(st.st_mode) && !S_ISFIFO(st.st_mode)) {
    return Fail(Bad(fmt::format("{} is {}, not a regular file or a pipe", name,
                                sandbox::FileTypeName(st.st_mode))));
  }
  return {};
}

std::optional<DockerArchiveSpec> ParseDockerArchiveSpec(const std::vector<std::string>& specs) {
  constexpr std::string_view kPrefix = "docker-archive:";
  if (specs.size() != 1 || !specs[0].starts_with(kPrefix)) return std::nullopt;
  std::string rest = specs[0].substr(kPrefix.size());
  size_t colon = rest.find(':');
  std::string file = rest.substr(0, colon);
  int fd = PassedFd(file);
  return DockerArchiveSpec{std::move(file),
                           colon == std::string::npos ? "" : rest.substr(colon + 1), fd};
}

namespace {

bool IsLegacyId(const std::string& id) { return IsValidDigest("sha256:" + id); }

// Archives from docker save before 1.10: no manifest.json, a `repositories`
// file naming the top layer id, and each layer's `<id>/json` naming its parent.
// They carry no digests: like plain layer files, nothing can be checked but
// what the layers themselves are.
Result<ResolvedImage> ResolveLegacyArchive(ResolvedImage image, const std::string& ref) {
  int dir = image.dir.get();
  LX_ASSIGN_OR_RETURN(std::string text, ReadBounded(dir, "repositories", kMaxDocumentBytes));
  LX_ASSIGN_OR_RETURN(json repos, ParseJson(text, "repositories"));
  std::string top;
  size_t colon = ref.rfind(':');
  for (auto repo = repos.begin(); repo != repos.end(); ++repo) {
    if (!repo.value().is_object()) continue;
    for (auto tag = repo.value().begin(); tag != repo.value().end(); ++tag) {
      bool wanted =
          ref.empty() || (colon != std::string::npos && repo.key() == ref.substr(0, colon) &&
                          tag.key() == ref.substr(colon + 1));
      if (!wanted || !tag.value().is_string()) continue;
      if (!top.empty() && top != tag.value().get<std::string>()) {
        return Fail(Error(ErrorKind::kPolicy, 0,
                          "the archive holds several images: name one as docker-archive:FILE:REF"));
      }
      top = tag.value().get<std::string>();
    }
  }
  if (top.empty())
    return Fail(Error(ErrorKind::kPolicy, 0, fmt::format("no image {:?} in the archive", ref)));
  std::vector<std::string> chain;
  for (std::string id = top; !id.empty();) {
    if (!IsLegacyId(id) || chain.size() > 256)
      return Fail(Bad(fmt::format("bad layer id {:?}", id.substr(0, 80))));
    LX_ASSIGN_OR_RETURN(std::string layer_json, ReadBounded(dir, id + "/json", kMaxDocumentBytes));
    LX_ASSIGN_OR_RETURN(json meta, ParseJson(layer_json, id + "/json"));
    if (chain.empty()) image.config = layer_json;
    chain.push_back(id);
    id = Str(meta, "parent");
  }
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
    image.layers.push_back(
        LayerSource{.display = it->substr(0, 12), .dir_fd = dir, .path = *it + "/layer.tar"});
  }
  return image;
}

}  // namespace

Result<ResolvedImage> ResolveDockerArchive(UniqueFd staged, const std::string& ref) {
  ResolvedImage image;
  image.dir = std::move(staged);
  int dir = image.dir.get();
  struct stat st;
  if (::fstatat(dir, "manifest.json", &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) {
    return ResolveLegacyArchive(std::move(image), ref);
  }
  LX_ASSIGN_OR_RETURN(std::string text, ReadBounded(dir, "manifest.json", kMaxDocumentBytes));
  json manifest = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (manifest.is_discarded() || !manifest.is_array() || manifest.empty()) {
    return Fail(Bad("manifest.json: not a non-empty JSON array"));
  }
  const json* chosen = nullptr;
  if (ref.empty()) {
    if (manifest.size() != 1) {
      return Fail(Error(ErrorKind::kPolicy, 0,
                        fmt::format("manifest.json lists {} images: name one as "
                                    "docker-archive:FILE:REF",
                                    manifest.size())));
    }
    chosen = &manifest[0];
  } else {
    for (const json& m : manifest) {
      auto tags = m.is_object() ? m.find("RepoTags") : m.end();
      if (!m.is_object() || tags == m.end() || !tags->is_array()) continue;
      for (const json& t : *tags) {
        if (t.is_string() && t.get<std::string>() == ref) chosen = &m;
      }
    }
    if (chosen == nullptr) {
      return Fail(Error(ErrorKind::kPolicy, 0, fmt::format("no image {:?} in the archive", ref)));
    }
  }
  if (!chosen->is_object()) return Fail(Bad("manifest.json: entry is not an object"));
  std::string config_path = Str(*chosen, "Config");
  if (config_path.empty()) return Fail(Bad("manifest.json: no Config"));
  LX_ASSIGN_OR_RETURN(image.config, ReadBounded(dir, config_path, kMaxDocumentBytes));
  image.config_digest = [&] {
    extractor::Sha256 sha;
    sha.Update(image.config.data(), image.config.size());
    return sha.Finish();
  }();
  if (std::string named = DigestFromName(config_path);
      !named.empty() && named != image.config_digest) {
    return Fail(Bad(fmt::format("config {:?} does not match its name (content is {})", config_path,
                                image.config_digest)));
  }
  LX_ASSIGN_OR_RETURN(json config, ParseJson(image.config, "config"));
  LX_ASSIGN_OR_RETURN(std::vector<std::string> diff_ids, ParseDiffIds(config));
  auto layers = chosen->find("Layers");
  if (layers == chosen->end() || !layers->is_array()) return Fail(Bad("manifest.json: no Layers"));
  if (layers->size() != diff_ids.size()) {
    return Fail(Bad(fmt::format("manifest.json has {} layers, config has {} diff_ids",
                                layers->size(), diff_ids.size())));
  }
  for (size_t i = 0; i < layers->size(); ++i) {
    const json& l = (*layers)[i];
    if (!l.is_string() || l.get<std::string>().empty())
      return Fail(Bad("manifest.json: bad layer"));
    std::string path = l.get<std::string>();
    LayerSource source{
        .display = path.substr(0, 40), .dir_fd = dir, .path = path, .diff_id = diff_ids[i]};
    // A content-addressed name is a promise about the blob too.
    if (std::string named = DigestFromName(path); !named.empty() && path.starts_with("blobs/")) {
      source.digest = named;
    }
    image.layers.push_back(std::move(source));
  }
  return image;
}

}  // namespace layerx::broker
