// fuzz_sources: the broker's reading of image documents (broker/source/source.h): an
// OCI layout through ResolveSources("oci:DIR[:REF]"), an unpacked docker-archive
// through ResolveDockerArchive (manifest.json, or the legacy `repositories`).
//
// The input is a small text format, so that digests can match:
//
//   oci|docker|legacy [PLATFORM|- [REF]]      optional header line
//   <the top document>                         index.json | manifest.json | repositories
//   ----                                       (a line of four dashes between parts)
//   <blob 1>
//   ----
//   <blob 2> ...
//
// Without a header line the whole input is an OCI layout's index.json. In a
// part, $D<n> $S<n> $P<n> $J<n> $H<n> stand for blob n's "sha256:<hex>", size,
// "blobs/sha256/<hex>", "<hex>.json" and <hex> (a legacy layer id), for blobs
// after the part only (so the digests are computable, last blob first). Blob n
// is stored under the names that were used: blobs/sha256/<hex>, <hex>.json,
// <hex>/json. The files go to a fresh dir below /tmp, removed after each input.
//
// On success the target traps unless what came back is consistent: valid
// digests, the config matching config_digest, layers named below the dir.
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "broker/source/source.h"
#include "extractor/digest.h"
#include "sandbox/sys.h"

namespace {

using namespace layerx;

constexpr std::string_view kPartSeparator = "\n----\n";
constexpr size_t kMaxParts = 8;

[[noreturn]] void Bug(const std::string& what) {
  std::fprintf(stderr, "fuzz_sources: BUG: %s\n", what.c_str());
  __builtin_trap();
}

std::string Sha256Hex(const std::string& bytes) {
  extractor::Sha256 sha;
  sha.Update(bytes.data(), bytes.size());
  return sha.Finish().substr(7);
}

struct Blob {
  std::string bytes;
  std::string hex;
  // Which of its names some part used: only those are written (/tmp may be
  // slow to create and unlink files in).
  bool as_blob = false;  // $D $S $P: blobs/sha256/<hex>
  bool as_json = false;  // $J: <hex>.json
  bool as_id = false;    // $H: <hex>/json, a legacy layer's
};

// Replaces $X<n> with what blob n (n > `self`) stands for.
std::string Substitute(std::string_view part, size_t self, std::vector<Blob>& blobs) {
  std::string out;
  for (size_t i = 0; i < part.size(); ++i) {
    if (part[i] == '$' && i + 2 < part.size() && part[i + 2] >= '1' && part[i + 2] <= '9') {
      size_t n = static_cast<size_t>(part[i + 2] - '0');
      if (n > self && n < blobs.size()) {
        Blob& b = blobs[n];
        std::string with;
        switch (part[i + 1]) {
          case 'D':
            with = "sha256:" + b.hex;
            b.as_blob = true;
            break;
          case 'H':
            with = b.hex;
            b.as_id = true;
            break;
          case 'S':
            with = std::to_string(b.bytes.size());
            b.as_blob = true;
            break;
          case 'P':
            with = "blobs/sha256/" + b.hex;
            b.as_blob = true;
            break;
          case 'J':
            with = b.hex + ".json";
            b.as_json = true;
            break;
        }
        if (!with.empty()) {
          out += with;
          i += 2;
          continue;
        }
      }
    }
    out += part[i];
  }
  return out;
}

void WriteFile(int dir, const std::string& path, const std::string& bytes) {
  // Never O_TRUNC: ext4 flushes a truncated-and-rewritten file on close. A
  // name that exists is the same content (names are digests).
  auto fd = sandbox::OpenAt(dir, path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0644);
  if (!fd && fd.error().err() == EEXIST) return;
  if (!fd) Bug("create " + path + ": " + fd.error().ToString());
  if (!sandbox::WriteAll(fd->get(), std::as_bytes(std::span(bytes)))) Bug("write " + path);
}

void MakeDir(int dir, const std::string& path) {
  if (::mkdirat(dir, path.c_str(), 0755) != 0 && errno != EEXIST) Bug("mkdir " + path);
}

void CheckDigest(const std::string& digest, const char* what) {
  if (!broker::IsValidDigest(digest)) Bug(fmt::format("{}: invalid digest {:?}", what, digest));
}

enum class Source { kOci, kDockerArchive, kLegacyArchive };

// What a resolver returned is what it promised (broker/source/source.h). A legacy
// archive carries no digests at all.
void CheckImage(const broker::ResolvedImage& image, Source source) {
  if (source != Source::kLegacyArchive) {
    CheckDigest(image.config_digest, "config");
    if ("sha256:" + Sha256Hex(image.config) != image.config_digest) {
      Bug("config does not match config_digest");
    }
  }
  if (source == Source::kOci) CheckDigest(image.manifest_digest, "manifest");
  for (const broker::LayerSource& l : image.layers) {
    if (l.dir_fd != image.dir.get()) Bug("a layer is not below the image's dir");
    if (l.path.empty()) Bug("a layer without a path");
    if (l.digest) CheckDigest(*l.digest, "layer");
    if (l.diff_id) CheckDigest(*l.diff_id, "diff_id");
    if (source == Source::kOci) {
      if (!l.digest || !l.diff_id) Bug("an OCI layer without digest or diff_id");
      if (l.path != "blobs/sha256/" + l.digest->substr(7)) Bug("an OCI layer's path");
    }
    if (source == Source::kDockerArchive && !l.diff_id) Bug("an archive layer without diff_id");
  }
}

std::string g_base;

void RemoveBase() { (void)sandbox::RemoveTreeAt(AT_FDCWD, g_base); }

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  char base[] = "/tmp/lx-fuzz-sources.XXXXXX";
  if (::mkdtemp(base) == nullptr) Bug("mkdtemp");
  g_base = base;
  std::atexit(RemoveBase);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);

  // The header line, when there is one.
  std::string mode = "oci", platform_text, ref;
  size_t nl = input.find('\n');
  std::string_view first = input.substr(0, nl);
  for (const char* m : {"oci", "docker", "legacy"}) {
    if (first == m || first.starts_with(std::string(m) + " ")) {
      mode = m;
      std::string_view rest = first.substr(std::min(first.size(), mode.size() + 1));
      size_t space = rest.find(' ');
      platform_text = std::string(rest.substr(0, space));
      if (space != std::string_view::npos) ref = std::string(rest.substr(space + 1));
      input.remove_prefix(nl == std::string_view::npos ? input.size() : nl + 1);
      break;
    }
  }
  broker::Platform platform{.os = "linux", .arch = "amd64", .variant = ""};
  if (!platform_text.empty() && platform_text != "-") {
    if (auto parsed = broker::Platform::Parse(platform_text)) platform = *parsed;
  }

  std::vector<std::string_view> parts;
  while (parts.size() + 1 < kMaxParts) {
    size_t at = input.find(kPartSeparator);
    if (at == std::string_view::npos) break;
    parts.push_back(input.substr(0, at));
    input.remove_prefix(at + kPartSeparator.size());
  }
  parts.push_back(input);
  // Last first: a part may name the blobs after it.
  std::vector<Blob> blobs(parts.size());
  for (size_t i = parts.size(); i-- > 0;) {
    blobs[i].bytes = Substitute(parts[i], i, blobs);
    blobs[i].hex = Sha256Hex(blobs[i].bytes);
  }
  ref = Substitute(ref, 0, blobs);  // "@$D1" names blob 1
  static const bool verbose = std::getenv("LAYERX_FUZZ_VERBOSE") != nullptr;
  auto report = [&](const Result<broker::ResolvedImage>& image) {
    if (!verbose) return;
    if (!image) {
      std::fprintf(stderr, "refused: %s\n", image.error().ToString().c_str());
      return;
    }
    std::fprintf(stderr, "resolved: %zu layers, config %s\n", image->layers.size(),
                 image->config_digest.c_str());
  };

  std::string dir = g_base + "/layout.XXXXXX";
  if (::mkdtemp(dir.data()) == nullptr) Bug("mkdtemp layout");
  {
    auto fd = sandbox::OpenAt(AT_FDCWD, dir, O_PATH | O_DIRECTORY);
    if (!fd) Bug("open layout");
    int d = fd->get();
    MakeDir(d, "blobs");
    MakeDir(d, "blobs/sha256");
    for (size_t i = 1; i < blobs.size(); ++i) {
      const Blob& b = blobs[i];
      if (b.as_blob) WriteFile(d, "blobs/sha256/" + b.hex, b.bytes);
      if (b.as_json) WriteFile(d, b.hex + ".json", b.bytes);
      if (b.as_id) {
        MakeDir(d, b.hex);
        WriteFile(d, b.hex + "/json", b.bytes);
      }
    }
    if (mode == "oci") {
      WriteFile(d, "oci-layout", R"({"imageLayoutVersion":"1.0.0"})");
      WriteFile(d, "index.json", blobs[0].bytes);
      std::string spec = "oci:" + dir + (ref.empty() ? "" : ":" + ref);
      auto image = broker::ResolveSources({spec}, platform);
      report(image);
      if (image) CheckImage(*image, Source::kOci);
    } else {
      WriteFile(d, mode == "docker" ? "manifest.json" : "repositories", blobs[0].bytes);
      auto spec = broker::ParseDockerArchiveSpec({"docker-archive:" + dir + ":" + ref});
      if (!spec || spec->file != dir || spec->ref != ref) Bug("ParseDockerArchiveSpec");
      auto image = broker::ResolveDockerArchive(std::move(*fd), spec->ref);
      report(image);
      if (image) {
        CheckImage(*image, mode == "docker" ? Source::kDockerArchive : Source::kLegacyArchive);
      }
    }
  }
  if (Status removed = sandbox::RemoveTreeAt(AT_FDCWD, dir); !removed) {
    Bug("remove layout: " + removed.error().ToString());
  }
  return 0;
}
