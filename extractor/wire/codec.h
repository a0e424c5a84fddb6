// Conversion between the record values (extractor/records.h) and the Cap'n Proto
// schema (layer.capnp), and the writer that frames batches onto the channel.
#pragma once

#include <capnp/message.h>

#include <functional>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "extractor/records.h"
#include "extractor/wire/layer.capnp.h"
#include "policy/result.h"

namespace layerx::wire {

void ToWire(const extractor::EntryRecord& in, Entry::Builder out);
void ToWire(const extractor::RemovalRecord& in, Removal::Builder out);
// Copies fields out as they are; validation is the broker's job (broker/tree/image_tree.h).
// An unknown kind (a newer or lying writer) comes back as nullopt.
std::optional<extractor::EntryRecord> FromWire(Entry::Reader in);
extractor::RemovalRecord FromWire(Removal::Reader in);

// A RecordSink that batches records into Message{batch} and writes each as one
// framed Cap'n Proto message to `fd` (borrowed). Write errors come back as kOs.
class ChannelWriter : public extractor::RecordSink {
 public:
  explicit ChannelWriter(int fd, size_t batch_records = 1024) : fd_(fd), batch_(batch_records) {}
  Status Add(extractor::EntryRecord record) override;
  Status Add(extractor::RemovalRecord record) override;
  Status Flush();
  Status SendSummary(const std::function<void(Summary::Builder)>& fill);
  Status SendFailure(const Error& error, std::string_view entry);
  // Time spent in Send so far: encoding plus writing (the broker's back-pressure).
  int64_t send_ns() const { return send_ns_; }

 private:
  Status Send(capnp::MessageBuilder& message);
  int fd_;
  size_t batch_;
  std::vector<std::variant<extractor::EntryRecord, extractor::RemovalRecord>> pending_;
  size_t pending_bytes_ = 0;
  int64_t send_ns_ = 0;
};

}  // namespace layerx::wire
