// broker/engine: the job: one jailed extractor per layer (layer_runner), the
// records merged into the tree, the outputs (rootfs, ext4, manifest) renamed
// into place only on success. May use: source, tree, ext4, log.
//
// One job = one image: layers applied lowest first, each by its own jailed
// extractor, into a work dir beside the outputs; outputs are renamed into place
// only when everything succeeded, and on any failure nothing is left behind.
//
// Its parts: job.cc (RunExtract), job_outputs.h (where a job writes: the work
// dir, the rootfs target, the output files), job_sources.h (what it reads
// besides the layers; job_sources.cc also has FindExtractor and Inspect),
// layer_runner.h (one layer; its Session in layer_session.h, the records in
// layer_records.cc).
#pragma once

#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include "broker/engine/layer_runner.h"
#include "broker/ext4/ext4.h"
#include "broker/source/registry_pull.h"
#include "broker/source/source.h"
#include "policy/policy.h"

namespace layerx::broker {

struct ExtractRequest {
  // sources: "oci:DIR[:REF]", "docker-archive:FILE[:REF]", "docker://REF", or
  // layer files lowest first
  std::vector<std::string> layers;
  Platform platform = Platform::Host();  // which manifest of a multi-platform index
  std::optional<std::string> config;     // write the image config JSON here (OCI sources)
  // Must not exist (its parent must), or be an empty directory (a mount
  // point, say), kept 0700 until the job succeeded and then given the image
  // root's mode (and owner, as root), left empty as found on failure.
  std::optional<std::string> rootfs;
  std::optional<std::string> manifest;  // replaced on success only
  std::optional<std::string> ext4;      // the ext4 image; replaced on success only
  Ext4Options ext4_options;
  policy::Policy policy;
  std::string extractor_path;  // empty: FindExtractor()
  const std::atomic<bool>* cancel = nullptr;
  std::vector<std::string> extractor_args;             // extra argv for the extractor (tests)
  std::function<void(const LayerProgress&)> progress;  // optional, on the calling thread
  // Where the work tree goes when no rootfs is written (an ext4 image or a
  // manifest only). Empty: /dev/shm when it is a tmpfs with room, else beside
  // the output (also the fallback when the tmpfs fills up).
  std::string scratch_dir;
  // docker:// sources: credentials, TLS, the blob cache, downloads ahead
  // (its cancel is `cancel`).
  PullOptions pull;

  // The service (layerx serve) never opens a tenant's path: its client sends
  // open descriptors. Then `layers` is unused and the image is `resolved`
  // (each LayerSource::fd set; borrowed) or the docker-archive `docker` (its
  // fd set), and outputs may be fds: regular files open for writing, written
  // from offset 0 only when the whole job succeeded, left empty otherwise.
  const ResolvedImage* resolved = nullptr;
  std::optional<DockerArchiveSpec> docker;
  int ext4_fd = -1;
  int manifest_fd = -1;
  int config_fd = -1;
};

struct JobReport {
  std::string manifest_digest;  // OCI sources
  std::vector<LayerReport> layers;
  size_t final_entries = 0;
  std::optional<Ext4Report> ext4;
  int64_t total_ns = 0;
};

// Errors name the layer ("layer 2 (sha256:0123456789ab, b.tar.gz)"), the entry
// and the reason.
Result<JobReport> RunExtract(const ExtractRequest& request);

// `layerx inspect`: the resolved layers and config of a source, nothing applied.
struct InspectRequest {
  std::vector<std::string> sources;
  Platform platform = Platform::Host();
  policy::Policy policy;
  std::string extractor_path;  // docker-archive sources are unpacked by a jailed extractor
  PullOptions pull;            // docker:// sources
};
struct ImageInfo {
  struct Layer {
    std::string name, digest, diff_id, media_type;
    uint64_t size = 0;  // compressed blob size
  };
  std::string manifest_digest, config_digest, config;
  std::vector<Layer> layers;
};
Result<ImageInfo> Inspect(const InspectRequest& request);

// Where the extractor helper lives: $LAYERX_EXTRACTOR, else `layerx-extractor`
// beside this executable, else ../libexec/layerx/layerx-extractor from it, else
// the libexec dir relative to the loaded liblayerx, else the configured install
// path (include/layerx/layerx.hpp documents the order for library users).
Result<std::string> FindExtractor();

}  // namespace layerx::broker
