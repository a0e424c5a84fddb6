// broker/engine, inside layer_runner: Session, the broker's side of one jailed
// extractor. Its spawn, feed, clock, stderr and reaping are in
// layer_runner.cc; the record channel it reads and merges is a RecordReader
// (layer_records.h). Not installed.
#pragma once

#include <spdlog/spdlog.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "broker/engine/layer_records.h"
#include "broker/engine/layer_runner.h"
#include "broker/log/logging.h"
#include "extractor/digest.h"
#include "sandbox/fd.h"
#include "sandbox/read_buffer.h"
#include "sandbox/spawn.h"
#include "sandbox/sys.h"

namespace layerx::broker {

// The broker's side of one extractor: the fds it polls and what came back.
class Session {
 public:
  Session(const RunContext& ctx, ImageTree& tree, LayerReport& report)
      : ctx_(ctx), report_(report), log_(Logger("extractor")), records_(ctx, tree, report) {}

  // With no `jail`, spawns one; calls `started` (if any) once it has its input.
  Status Run(const LayerInput& layer, std::optional<PendingJail> jail,
             const std::function<void()>& started);

 private:
  Status Feed();
  Status HashSome();
  Status DrainBlob();
  Result<std::optional<size_t>> ReadBlob();
  Error TimeoutError() const;
  void ReadStderr(bool flush);
  Error ExitError(const sandbox::ExitStatus& status);

  const RunContext& ctx_;
  LayerReport& report_;
  std::shared_ptr<spdlog::logger> log_;

  sandbox::UniqueFd blob_;
  sandbox::UniqueFd feed_;    // write end of the child's fd 0
  sandbox::UniqueFd stderr_;  // read end of the child's fds 1 and 2
  // The blob's next chunk, read to be hashed and (for a pipe) fed: the job's
  // buffer (RunContext::feed_buffer) or own_feed_mem_.
  std::byte* feed_mem_ = nullptr;
  sandbox::ReadBuffer own_feed_mem_;
  size_t feed_len_ = 0;
  size_t feed_off_ = 0;
  bool blob_eof_ = false;
  bool direct_ = false;  // the extractor reads the blob's file itself; we only hash it
  // The extractor reads a stream its maker hashes (LayerInput::hashed); blob_
  // is our own open of it, to drain what the extractor leaves.
  const HashedStream* hashed_ = nullptr;
  extractor::Sha256 sha_;

  RecordReader records_;
  std::string stderr_line_;
  std::string last_stderr_;
  size_t stderr_bytes_ = 0;
  pid_t pid_ = 0;
  uint64_t blob_bytes_ = 0;
  int64_t last_progress_ns_ = 0;
  void Report(size_t index, bool done) {
    if (!ctx_.progress) return;
    int64_t now = sandbox::MonotonicNs();
    if (!done && now - last_progress_ns_ < 100'000'000) return;
    last_progress_ns_ = now;
    ctx_.progress(LayerProgress{.index = index,
                                .bytes_fed = report_.compressed_bytes,
                                .blob_bytes = blob_bytes_,
                                .records = records_.records(),
                                .done = done});
  }
  int64_t deadline_ = 0;
  bool job_clock_ = false;  // the job's deadline comes before the layer's
};

}  // namespace layerx::broker
