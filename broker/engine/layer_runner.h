// One layer through one jailed extractor: spawn it on the work rootfs, feed the
// blob through a pipe while hashing it, read and merge the records it streams
// back, enforce the clock, and reap it. Whatever happens, the child is dead and
// reaped when RunLayer returns.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "broker/tree/image_tree.h"
#include "broker/source/source.h"
#include "extractor/wire/layer.capnp.h"
#include "policy/policy.h"
#include "policy/result.h"
#include "sandbox/jail_config.h"
#include "sandbox/spawn.h"

namespace layerx::broker {

// The chunk a layer's blob is read in, to hash it and feed it to its jail.
inline constexpr size_t kFeedBufferBytes = 1 << 20;

struct LayerInput {
  size_t index = 0;  // 1-based, lowest layer first
  int dir_fd = -1;   // borrowed; when set, `path` is opened below it (RESOLVE_BENEATH)
  std::string path;  // the blob file
  int fd = -1;       // borrowed; when set, the blob is read from this open fd (the service)
  // With `fd`: a pipe its maker feeds and hashes (source.h); the extractor
  // reads it itself and the digest comes from `hashed`.
  const HashedStream* hashed = nullptr;
  uint64_t expected_bytes = 0;  // the manifest's size, for progress on a stream; 0: unknown
};

struct LayerReport {
  size_t index = 0;
  std::string path;
  std::string compressed_digest;    // sha256 of the bytes fed in
  std::string uncompressed_digest;  // sha256 of the tar stream, from the extractor
  uint64_t compressed_bytes = 0;
  uint64_t uncompressed_bytes = 0;
  uint64_t entries = 0;
  uint64_t file_bytes = 0;
  int64_t setup_ns = 0;    // spawn start to jail locked down
  int64_t extract_ns = 0;  // jail locked down to last entry applied
  int64_t total_ns = 0;    // spawn start to child reaped
  int64_t send_ns = 0;     // the extractor encoding and writing records
  int64_t merge_ns = 0;    // the broker decoding, validating and merging them
  uint64_t extractor_peak_rss_kib = 0;
  // With a data fd: where the next layer's data may start (block-aligned, past
  // everything this layer wrote to the fd).
  uint64_t data_end = 0;
};

// Where a layer stands, for a progress display; reported about ten times a
// second and once at the end.
struct LayerProgress {
  size_t index = 0;         // 1-based
  size_t layers = 0;        // in the job
  uint64_t bytes_fed = 0;   // of the blob, so far
  uint64_t blob_bytes = 0;  // 0 when unknown (a stream)
  uint64_t records = 0;     // entries merged so far
  bool done = false;
};

struct RunContext {
  const policy::Policy* policy = nullptr;
  int rootfs_fd = -1;                         // borrowed: the work rootfs dir
  int extractor_fd = -1;                      // borrowed: the extractor binary (O_PATH)
  const std::atomic<bool>* cancel = nullptr;  // set from a signal handler or another thread
  std::vector<std::string> extractor_args;    // extra argv (tests run probe programs)
  std::function<void(const LayerProgress&)> progress;  // optional; called on the job's thread
  int64_t job_deadline_ns = 0;  // monotonic (sandbox::MonotonicNs); 0: only the layer's clock
  // Where file data goes (sandbox/jail_config.h). With kImage/kTreeAndImage,
  // `data_fd` (borrowed, the image open read-write) is reopened write-only for
  // the extractor, whose window starts at data.start.
  sandbox::JailData data;
  int data_fd = -1;
  // The window starts at the image's front: below it is only what the broker
  // punches out and writes last. Such a layer may copy_file_range file data
  // from its file (sandbox::JailData::copy_input).
  bool window_at_front = false;
  // kFeedBufferBytes the job lends every layer for reading its blob (touched
  // once per job, not per layer: fresh pages are dear); null: each allocates.
  std::byte* feed_buffer = nullptr;
};

// Merges one batch of records into `tree`, in order, calling `on_entry` with
// each entry's data bytes after it merged. kPeer for a record of an unknown
// kind; what the tree refuses comes back as it said. capnp may throw
// kj::Exception on a malformed message: the caller catches it.
Status MergeBatch(capnp::List<wire::Record>::Reader batch, ImageTree& tree,
                  const std::function<Status(uint64_t data_bytes)>& on_entry);

// A layer's jail spawned before its input is known (sandbox::SpawnWaiting):
// exec'd and pivoted into the work rootfs, holding no layer yet. The job spawns
// layer N+1's while layer N applies, so that its ~10 ms of setup (clone, exec,
// loading, the pivot) is off the critical path. Destroyed unused, the child is
// killed and reaped.
struct PendingJail {
  sandbox::WaitingChild child;
  sandbox::UniqueFd channel;  // our end of its record socket
  sandbox::UniqueFd err;      // the read end of its stderr
  int64_t spawned_ns = 0;     // monotonic, when SpawnWaiting returned (it may still be starting)
};

Result<PendingJail> SpawnJail(const RunContext& ctx);

// Errors carry the entry and reason; the caller adds the layer context.
// Runs the layer in `jail`, or in one spawned now; `started` (optional) is
// called once the jail has its input, while it runs.
Result<LayerReport> RunLayer(const RunContext& ctx, const LayerInput& layer, ImageTree& tree,
                             std::optional<PendingJail> jail = std::nullopt,
                             const std::function<void()>& started = {});

}  // namespace layerx::broker
