// broker/source: image sources: OCI layouts, docker-archives, docker://
// registries (registry_*), resolved to ordered layers with their digests and
// opened without following links. May use: log (and extractor's digests,
// sandbox, policy).
//
// Image sources, named the way skopeo names them, resolved to an ordered list
// of layer blobs with what each must hash to:
//   oci:DIR[:REF]   an OCI image layout; REF is a tag (org.opencontainers.image.ref.name)
//                   or @sha256:...; with one manifest in index.json REF may be omitted
//   FILE...         plain layer files, lowest first (no digests to check)
// Every file read by name (a document, a blob, a layer file, the archive) must
// be a regular file, opened so that opening cannot block (sandbox::
// OpenRegularFile): a fifo, device, socket or directory is refused at once. A
// pipe is read only when the caller passed it as an open descriptor: through
// the service, or named "/dev/stdin", "/dev/fd/N" or "/proc/self/fd/N" (a
// shell's pipe or process substitution), which are taken as the descriptor
// itself, never opened.
// OCI documents are parsed with nlohmann::json under size limits; every blob is
// opened by a digest that was validated first ("sha256:" + 64 hex), below the
// layout dir (openat2 RESOLVE_BENEATH: a symlinked blob cannot lead out), and
// the manifest and config are checked against their digests as they are read.
// Layers are checked while they stream (broker/engine/job.cc): compressed digest and
// size against the manifest, the tar stream's digest against the config's
// rootfs.diff_ids.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "policy/result.h"
#include "sandbox/fd.h"

namespace layerx::broker {

struct Platform {
  std::string os = "linux";
  std::string arch;
  std::string variant;
  static Platform Host();
  // "linux/arm64/v8"; kPolicy when malformed.
  static Result<Platform> Parse(const std::string& text);
  std::string ToString() const;
};

// A stream its maker feeds and hashes itself (a registry pull): the
// extractor reads it directly, so its bytes cross no pipe of the job's; the
// job learns their count as they go and their sha256 once the stream ended.
// SECURITY: only for a stream whose every byte passes through its maker (the
// write end of a pipe it alone holds): the digest is of what was written.
class HashedStream {
 public:
  virtual ~HashedStream() = default;
  virtual uint64_t BytesSoFar() const = 0;
  struct Whole {
    std::string digest;  // "sha256:..."
    uint64_t bytes = 0;
  };
  // Set once the maker wrote the last byte (before it closes the stream);
  // nullopt while it goes on, or when it failed.
  virtual std::optional<Whole> Finished() const = 0;
  // On the reader's thread, between polls: log lines the maker's threads
  // queued are said now (LogRelay, broker/log/logging.h).
  virtual void RelayLogs() const {}
};

struct LayerSource {
  std::string display;                 // names the layer in errors: short digest or file
  int dir_fd = -1;                     // borrowed from the ResolvedImage; -1: `path` is plain
  std::string path;                    // below dir_fd, or a plain file path
  int fd = -1;                         // borrowed; when set, the blob is this open fd (the
                                       // service, or a passed descriptor: see PassedFd)
  std::optional<std::string> digest;   // sha256 of the blob, from the manifest
  std::optional<std::string> diff_id;  // sha256 of the tar stream, from the config
  std::optional<uint64_t> size;        // blob size, from the manifest
  std::string media_type;
};

struct ResolvedImage {
  std::vector<LayerSource> layers;  // lowest first
  std::string manifest_digest;      // empty for plain files
  std::string config;               // the image config JSON, verified; empty for plain files
  std::string config_digest;
  sandbox::UniqueFd dir;  // the OCI layout, kept open for the layers
  // Streams fed from elsewhere (a registry's): why layer i (0-based) ended
  // early, when its feed failed, or another layer's whose failure stopped the
  // feed (that error names its own layer); a better line than the stream's
  // short end.
  std::function<std::optional<Error>(size_t index)> feed_failure;
  // Streams made as the job reaches each layer (a registry's): layer i's fd,
  // owned by the caller for the layer's run. Unset: LayerSource::fd/path.
  struct Taken {
    sandbox::UniqueFd fd;
    const HashedStream* hashed = nullptr;  // set: read by the extractor directly
  };
  std::function<Result<Taken>(size_t index)> take_input;
};

// Errors: kPolicy for a malformed source name or a platform not in the index;
// kInvalidInput for documents that are malformed, missing, oversized, of an
// unknown media type, or do not match their digests.
Result<ResolvedImage> ResolveSources(const std::vector<std::string>& specs,
                                     const Platform& platform);

// What a store by digest gives the resolver: the manifest or index
// (manifest=true) or config blob `digest`, checked against it and against
// `size` when there is one.
using ReadByDigest = std::function<Result<std::string>(
    const std::string& digest, std::optional<uint64_t> size, bool manifest)>;
// The manifest's layers, once it is read and before its config is: a
// registry's pull starts their downloads while the config is fetched. They have
// no diff_id yet. An error stops the resolution.
using LayersFound = std::function<Status(const std::vector<LayerSource>& layers)>;
// An image from its top document (a manifest or an index, already checked
// against `digest`), the rest read through `read`: a registry's (docker://).
// Its layers have neither dir_fd nor path: the caller opens their streams.
Result<ResolvedImage> ResolveFromDocument(const std::string& text, const std::string& media_type,
                                          const std::string& digest, const Platform& platform,
                                          const ReadByDigest& read,
                                          const LayersFound& on_layers = nullptr);

// docker-archive:FILE[:REF] (REF a RepoTag such as "debian:test"). Its outer
// tar is attacker-controlled like a layer, so the broker never parses it: the
// job unpacks it with a jailed extractor into a staging dir first
// (broker/engine/job_sources.cc), then ResolveDockerArchive reads manifest.json there.
struct DockerArchiveSpec {
  std::string file;  // names it in errors
  std::string ref;
  int fd = -1;  // borrowed; when set, the archive is read from this open fd (the service,
                // or a passed descriptor: see PassedFd)
};
std::optional<DockerArchiveSpec> ParseDockerArchiveSpec(const std::vector<std::string>& specs);

// Resolves the unpacked archive in `staged` (taken): manifest.json (docker
// save / skopeo format) -> config (checked against its file name's digest when
// it has one) -> layers, each to be checked against the config's diff_ids.
Result<ResolvedImage> ResolveDockerArchive(sandbox::UniqueFd staged, const std::string& ref);

// The descriptor a plain input's name stands for when it names one the caller
// passed: "/dev/stdin" (0), "/dev/fd/N", "/proc/self/fd/N"; else -1.
int PassedFd(const std::string& path);
// A passed descriptor can be an input: open for reading (not O_PATH), a regular
// file or a pipe. kOs when `fd` is not open, kInvalidInput naming it otherwise.
Status CheckPassedFd(int fd, const std::string& name);

// True for "sha256:" followed by 64 lowercase hex digits.
bool IsValidDigest(const std::string& digest);

}  // namespace layerx::broker
