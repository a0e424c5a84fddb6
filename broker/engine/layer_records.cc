// The record channel of one extractor: framed Cap'n Proto messages read off
// its socket and dispatched (RecordReader::Read, RecordReader::HandleMessage),
// batches merged into the tree (MergeBatch, layer_runner.h), and the broker's
// own check on how far a layer inflates (RecordReader::CheckInflation).
#include "broker/engine/layer_records.h"

#include <capnp/serialize.h>
#include <errno.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "extractor/wire/codec.h"
#include "sandbox/sys.h"

namespace layerx::broker {

// The layer's limits on the broker's own counts (file data from the records,
// compressed bytes it fed), so an extractor that ignores them is stopped too.
// The feed runs ahead of what the extractor consumed, so this is the looser
// check; the extractor's own, on the tar stream, stops an honest one first.
Status RecordReader::CheckInflation(uint64_t data_bytes) {
  const policy::Limits& limits = ctx_.policy->limits;
  layer_data_bytes_ += data_bytes;
  if (layer_data_bytes_ > limits.max_layer_bytes) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "layer data over max_layer_bytes={}",
                          limits.max_layer_bytes));
  }
  uint64_t fed = std::max<uint64_t>(report_.compressed_bytes, 1);
  if (limits.max_compression_ratio != 0 && layer_data_bytes_ > policy::kRatioGraceBytes &&
      layer_data_bytes_ / fed >= limits.max_compression_ratio) {
    return Fail(MakeError(ErrorKind::kLimitExceeded,
                          "layer data {} bytes from {}: over max_compression_ratio={}",
                          layer_data_bytes_, fed, limits.max_compression_ratio));
  }
  return {};
}

Status RecordReader::HandleMessage(kj::ArrayPtr<const capnp::word> words) {
  if (got_summary_ || failure_) return Fail(MakeError(ErrorKind::kPeer, "message after the end"));
  capnp::ReaderOptions options;
  options.traversalLimitInWords = ctx_.policy->limits.max_record_message_bytes / 8;
  options.nestingLimit = 8;
  try {
    capnp::FlatArrayMessageReader reader(words, options);
    auto message = reader.getRoot<wire::Message>();
    switch (message.which()) {
      case wire::Message::BATCH:
        return MergeBatch(message.getBatch(), tree_, [this](uint64_t data_bytes) {
          ++records_;
          return CheckInflation(data_bytes);
        });
      case wire::Message::SUMMARY: {
        auto s = message.getSummary();
        got_summary_ = true;
        report_.entries = s.getEntries();
        report_.file_bytes = s.getFileBytes();
        report_.uncompressed_bytes = s.getUncompressedBytes();
        report_.uncompressed_digest = std::string(s.getUncompressedDigest().cStr());
        if (report_.uncompressed_bytes > ctx_.policy->limits.max_layer_bytes) {
          return Fail(MakeError(ErrorKind::kLimitExceeded, "layer inflates past max_layer_bytes={}",
                                ctx_.policy->limits.max_layer_bytes));
        }
        report_.setup_ns = s.getReadyMonotonicNs();  // made relative by the caller
        report_.extract_ns = s.getDoneMonotonicNs() - s.getReadyMonotonicNs();
        report_.send_ns = s.getSendNs();
        report_.extractor_peak_rss_kib = s.getPeakRssKib();
        return {};
      }
      case wire::Message::FAILURE: {
        auto f = message.getFailure();
        uint16_t kind = f.getKind();
        if (kind > static_cast<uint16_t>(ErrorKind::kInternal))
          kind = static_cast<uint16_t>(ErrorKind::kPeer);
        // The errno is the extractor's word, used only to tell a full disk
        // (a scratch tmpfs is retried on disk), never trusted for more.
        int err = f.getErrno() > 0 && f.getErrno() < 4096 ? f.getErrno() : 0;
        std::string message(f.getMessage().cStr());
        std::string suffix = err != 0 ? ": " + ErrnoName(err) : std::string();
        if (err != 0 && message.ends_with(suffix)) {
          message.resize(message.size() - suffix.size());  // ToString() adds it back
        }
        Error error(static_cast<ErrorKind>(kind), err, std::move(message));
        auto entry = f.getEntry();
        if (entry.size() > 0) {
          error = std::move(error).WithEntry(
              std::string(reinterpret_cast<const char*>(entry.begin()), entry.size()));
        }
        failure_ = std::move(error);
        return {};
      }
      default:
        return Fail(MakeError(ErrorKind::kPeer, "unknown message"));
    }
  } catch (const kj::Exception& e) {
    return Fail(
        MakeError(ErrorKind::kPeer, "malformed record message: {}", e.getDescription().cStr()));
  }
}

Status RecordReader::Read() {
  const size_t max_bytes = ctx_.policy->limits.max_record_message_bytes;
  while (true) {
    if (msg_buf_.size() * sizeof(capnp::word) - msg_bytes_ < 64 * 1024) {
      auto bigger = kj::heapArray<capnp::word>(std::max<size_t>(msg_buf_.size() * 2, 16 * 1024));
      if (msg_bytes_ > 0) std::memcpy(bigger.asBytes().begin(), msg_buf_.begin(), msg_bytes_);
      msg_buf_ = kj::mv(bigger);
    }
    auto* base = reinterpret_cast<std::byte*>(msg_buf_.begin());
    ssize_t n = ::read(channel_.get(), base + msg_bytes_,
                       msg_buf_.size() * sizeof(capnp::word) - msg_bytes_);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      return Fail(OsError(errno, "read records"));
    }
    if (n == 0) {
      eof_ = true;
      break;
    }
    msg_bytes_ += static_cast<size_t>(n);
    // Every complete message in the buffer, in order.
    size_t consumed = 0;
    while (true) {
      size_t avail_words = (msg_bytes_ - consumed) / sizeof(capnp::word);
      if (avail_words == 0) break;
      kj::ArrayPtr<const capnp::word> prefix(msg_buf_.begin() + consumed / sizeof(capnp::word),
                                             avail_words);
      size_t need = capnp::expectedSizeInWordsFromPrefix(prefix);
      if (need * sizeof(capnp::word) > max_bytes) {
        return Fail(MakeError(ErrorKind::kPeer, "record message over {} bytes", max_bytes));
      }
      if (need > avail_words) break;
      int64_t merge_start = sandbox::MonotonicNs();
      LX_TRY(HandleMessage(prefix.slice(0, need)));
      report_.merge_ns += sandbox::MonotonicNs() - merge_start;
      consumed += need * sizeof(capnp::word);
    }
    if (consumed > 0) {
      std::memmove(base, base + consumed, msg_bytes_ - consumed);
      msg_bytes_ -= consumed;
    }
  }
  if (eof_ && msg_bytes_ != 0) {
    return Fail(MakeError(ErrorKind::kPeer, "record stream ends inside a message"));
  }
  return {};
}

Status MergeBatch(capnp::List<wire::Record>::Reader batch, ImageTree& tree,
                  const std::function<Status(uint64_t data_bytes)>& on_entry) {
  for (auto record : batch) {
    switch (record.which()) {
      case wire::Record::ENTRY: {
        auto entry = wire::FromWire(record.getEntry());
        if (!entry) return Fail(MakeError(ErrorKind::kPeer, "bad record: unknown kind"));
        uint64_t data_bytes = AccountedBytes(*entry);
        LX_TRY(tree.Add(std::move(*entry)));
        LX_TRY(on_entry(data_bytes));
        break;
      }
      case wire::Record::REMOVAL:
        LX_TRY(tree.Add(wire::FromWire(record.getRemoval())));
        break;
      default:
        return Fail(MakeError(ErrorKind::kPeer, "bad record: unknown union member"));
    }
  }
  return {};
}

}  // namespace layerx::broker
