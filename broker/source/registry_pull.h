// docker:// sources: an image resolved in a registry, its layers streamed from
// the network into the job.
//
// Resolution reads the manifest by tag or digest (an index picks the manifest
// for the platform, as for oci:), starts the layers' downloads, and reads the
// config meanwhile, each checked against its digest (broker/source/source.cc
// walks the documents, broker/source/registry_client.cc fetches them). A
// download that fails stops the pull: the pipes end, and Failure() says which
// layer failed. Then RegistryPull::Start gives every layer a pipe: the job
// reads layer i from its pipe exactly as it reads a pipe the service was
// handed, so the blob's digest and size (against the manifest) and the tar
// stream's digest (against the config's diff_ids) are checked while it
// streams, as for every source.
//
// Behind the pipes: up to 1 + `parallel` workers download layers in order, the
// lowest first, each into its spool, and one feeder moves the spools into the
// pipes, layer by layer, as the job reads them. The layer being applied is
// streamed (its spool drains as fast as the job reads); the layers ahead of it
// download at the same time into their spools, together at most `spool_bytes`,
// and then wait their turn (the transfer waits; the connection stays open). No
// blob file is written, unless a blob cache is given.
//
// The blob cache (--blob-cache DIR): blobs kept as DIR/sha256/HEX, each verified
// against its digest before it was put there (written to an unguessable temp
// name in the same dir, then renamed: concurrent layerx processes never see a
// partial blob) and verified again before use; one that fails is dropped and
// fetched again.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "broker/source/source.h"
#include "policy/result.h"
#include "sandbox/fd.h"

namespace layerx::broker {

struct RegistryRef;
class RegistryClient;

struct PullOptions {
  std::optional<std::string> creds;  // --creds USER:PASS; SECURITY: a secret, never logged
  std::string auth_file;             // --authfile: only this file; empty: AuthFilePaths()
  std::string cert_dir;              // --cert-dir: CAs (*.crt) for the registry
  // false: no certificate checks, plain http allowed; unset: true, unless
  // registries.conf says the registry is `insecure`.
  std::optional<bool> tls_verify;
  std::string registries_conf;  // --registries-conf; empty: the usual files (registries_conf.h)
  std::string signature_policy;  // --signature-policy; empty: the usual policy.json
  std::string blob_cache;       // empty: none
  unsigned parallel = 3;        // layers downloaded ahead of the one being applied
  uint64_t spool_bytes = 32ull << 20;  // downloaded ahead, all layers together
  long low_speed_seconds = 60;         // a transfer with no byte for this long fails
  long total_timeout_ms = 0;           // any one request; 0: none (the job's clock)
  int blob_retries = 5;                // a blob transfer cut short resumes this often
  long retry_backoff_ms = 250;         // before the first resume, doubled after each
  const std::atomic<bool>* cancel = nullptr;
};

// One source "docker://...".
bool IsRegistrySource(const std::vector<std::string>& specs);

// The image alone (layerx inspect): its layers have no stream.
Result<ResolvedImage> ResolveRegistry(const std::string& spec, const Platform& platform,
                                      const PullOptions& options);

class RegistryPull {
 public:
  // Resolves the image (network: manifest, index, config) and starts the
  // downloads. Errors are one line naming the registry, the repository and what
  // failed (broker/registry_client.h).
  static Result<std::unique_ptr<RegistryPull>> Start(const std::string& spec,
                                                     const Platform& platform,
                                                     const PullOptions& options);
  // Stops every download (within ~100 ms), closes the pipes, joins.
  ~RegistryPull();
  RegistryPull(const RegistryPull&) = delete;
  RegistryPull& operator=(const RegistryPull&) = delete;

  // The image; its layers have no fd: take each with Input().
  const ResolvedImage& image() const { return image_; }
  // The read end of layer `index`'s pipe (0-based), made now, once per layer:
  // the job takes each as it reaches it (the service's client takes all at
  // once). The feeder fills the pipes in order; closing one early stops the
  // pull.
  Result<sandbox::UniqueFd> Input(size_t index);
  // The same for the job in this process: the feeder also hashes the stream as
  // it writes it, and the extractor reads the pipe itself (no copy through
  // the job's own pipe); `hashed` gives the digest once the stream ended.
  Result<ResolvedImage::Taken> HashedInput(size_t index);
  // Why layer `index` (0-based) ended early: its download failed, or a layer
  // ahead's did and stopped the pull (then the error names that layer; Input()
  // of a later layer fails with it too). nullopt while none has, or when the
  // stream was whole (the job's checks decide).
  std::optional<Error> Failure(size_t index) const;
  // The download threads' log lines (retries, the blob cache's warnings), said
  // on the calling thread; every call above and the destructor relay too.
  void RelayLogs() const;

  struct Counts {
    size_t fetched = 0;  // layer blobs downloaded
    size_t cached = 0;   // layer blobs taken from the blob cache
  };
  Counts counts() const;

  struct State;
  class LayerHash;

 private:
  RegistryPull() = default;
  static Result<std::unique_ptr<State>> StartDownloads(const RegistryRef& ref,
                                                       const PullOptions& options,
                                                       const std::vector<LayerSource>& layers,
                                                       RegistryClient& client);
  ResolvedImage image_;
  std::unique_ptr<State> state_;
  std::vector<std::unique_ptr<LayerHash>> hashes_;  // one per layer
};

}  // namespace layerx::broker
