// broker/engine, inside layer_runner: RecordReader, the broker's reading of
// one extractor's record channel (framed Cap'n Proto messages: batches merged
// into the tree, the summary, a failure) and its own check on how far the
// layer inflates. Defined in layer_records.cc. Not installed.
#pragma once

#include <capnp/common.h>
#include <kj/array.h>

#include <cstddef>
#include <cstdint>
#include <optional>

#include "broker/engine/layer_runner.h"
#include "sandbox/fd.h"

namespace layerx::broker {

// Reads the channel as it becomes readable; the summary goes into the
// layer's report, a failure the extractor sent is kept for the caller.
class RecordReader {
 public:
  RecordReader(const RunContext& ctx, ImageTree& tree, LayerReport& report)
      : ctx_(ctx), tree_(tree), report_(report) {}

  // `channel` must be non-blocking: Read() reads until EAGAIN or EOF.
  void Open(sandbox::UniqueFd channel) { channel_ = std::move(channel); }
  int fd() const { return channel_.get(); }
  // Every complete message now readable, without blocking.
  Status Read();
  bool eof() const { return eof_; }
  bool got_summary() const { return got_summary_; }
  const std::optional<Error>& failure() const { return failure_; }
  uint64_t records() const { return records_; }

 private:
  Status HandleMessage(kj::ArrayPtr<const capnp::word> words);
  Status CheckInflation(uint64_t data_bytes);

  const RunContext& ctx_;
  ImageTree& tree_;
  LayerReport& report_;
  sandbox::UniqueFd channel_;  // our end of the record socket
  // Word-aligned for capnp. Not a std::vector: capnp::word cannot be copied or
  // moved, which libstdc++ refuses to grow under clang.
  kj::Array<capnp::word> msg_buf_;
  size_t msg_bytes_ = 0;
  bool eof_ = false;
  bool got_summary_ = false;
  std::optional<Error> failure_;
  uint64_t records_ = 0;
  uint64_t layer_data_bytes_ = 0;
};

}  // namespace layerx::broker
