#include "extractor/wire/codec.h"

#include <capnp/serialize.h>

#include "sandbox/sys.h"

namespace layerx::wire {

namespace {

capnp::Data::Reader Bytes(const std::string& s) {
  return capnp::Data::Reader(reinterpret_cast<const kj::byte*>(s.data()), s.size());
}

std::string String(capnp::Data::Reader d) {
  return std::string(reinterpret_cast<const char*>(d.begin()), d.size());
}

}  // namespace

void ToWire(const extractor::EntryRecord& in, Entry::Builder out) {
  out.setPath(Bytes(in.path));
  out.setKind(static_cast<Kind>(in.kind));
  out.setUid(in.uid);
  out.setGid(in.gid);
  out.setMode(in.mode);
  out.setMtimeNs(in.mtime_ns);
  out.setSize(in.size);
  out.setDataBytes(in.data_bytes);
  if (!in.symlink_target.empty()) out.setSymlinkTarget(Bytes(in.symlink_target));
  if (!in.hardlink_target.empty()) out.setHardlinkTarget(Bytes(in.hardlink_target));
  out.setRdevMajor(in.rdev_major);
  out.setRdevMinor(in.rdev_minor);
  if (!in.xattrs.empty()) {
    auto list = out.initXattrs(static_cast<unsigned>(in.xattrs.size()));
    for (size_t i = 0; i < in.xattrs.size(); ++i) {
      list[i].setName(Bytes(in.xattrs[i].first));
      list[i].setValue(Bytes(in.xattrs[i].second));
    }
  }
  if (!in.extents.empty()) {
    auto list = out.initExtents(static_cast<unsigned>(in.extents.size()));
    for (size_t i = 0; i < in.extents.size(); ++i) {
      list[i].setLogical(in.extents[i].logical);
      list[i].setPhysical(in.extents[i].physical);
      list[i].setLength(in.extents[i].length);
    }
  }
}

void ToWire(const extractor::RemovalRecord& in, Removal::Builder out) {
  out.setPath(Bytes(in.path));
  out.setOpaque(in.opaque);
  out.setOpaqueDir(in.opaque_dir);
}

std::optional<extractor::EntryRecord> FromWire(Entry::Reader in) {
  extractor::EntryRecord out;
  auto kind = static_cast<uint16_t>(in.getKind());
  if (kind > static_cast<uint16_t>(extractor::Kind::kFifo)) return std::nullopt;
  out.kind = static_cast<extractor::Kind>(kind);
  out.path = String(in.getPath());
  out.uid = in.getUid();
  out.gid = in.getGid();
  out.mode = in.getMode();
  out.mtime_ns = in.getMtimeNs();
  out.size = in.getSize();
  out.data_bytes = in.getDataBytes();
  out.symlink_target = String(in.getSymlinkTarget());
  out.hardlink_target = String(in.getHardlinkTarget());
  out.rdev_major = in.getRdevMajor();
  out.rdev_minor = in.getRdevMinor();
  for (auto x : in.getXattrs()) out.xattrs.emplace_back(String(x.getName()), String(x.getValue()));
  auto extents = in.getExtents();
  out.extents.reserve(extents.size());
  for (auto x : extents) {
    out.extents.push_back({.logical = x.getLogical(), .physical = x.getPhysical(), .length = x.getLength()});
  }
  return out;
}

extractor::RemovalRecord FromWire(Removal::Reader in) {
  return extractor::RemovalRecord{
      .path = String(in.getPath()), .opaque = in.getOpaque(), .opaque_dir = in.getOpaqueDir()};
}

Status ChannelWriter::Add(extractor::EntryRecord record) {
  pending_bytes_ += record.path.size() + record.symlink_target.size() + 64;
  for (const auto& [name, value] : record.xattrs) pending_bytes_ += name.size() + value.size();
  pending_bytes_ += record.extents.size() * 32;
  pending_.emplace_back(std::move(record));
  if (pending_.size() >= batch_ || pending_bytes_ >= (1u << 20)) return Flush();
  return {};
}

Status ChannelWriter::Add(extractor::RemovalRecord record) {
  pending_bytes_ += record.path.size() + 16;
  pending_.emplace_back(std::move(record));
  if (pending_.size() >= batch_ || pending_bytes_ >= (1u << 20)) return Flush();
  return {};
}

Status ChannelWriter::Flush() {
  if (pending_.empty()) return {};
  capnp::MallocMessageBuilder message;
  auto batch = message.initRoot<Message>().initBatch(static_cast<unsigned>(pending_.size()));
  for (size_t i = 0; i < pending_.size(); ++i) {
    if (auto* e = std::get_if<extractor::EntryRecord>(&pending_[i])) {
      ToWire(*e, batch[i].initEntry());
    } else {
      ToWire(std::get<extractor::RemovalRecord>(pending_[i]), batch[i].initRemoval());
    }
  }
  pending_.clear();
  pending_bytes_ = 0;
  return Send(message);
}

Status ChannelWriter::SendSummary(const std::function<void(Summary::Builder)>& fill) {
  LX_TRY(Flush());
  capnp::MallocMessageBuilder message;
  fill(message.initRoot<Message>().initSummary());
  return Send(message);
}

Status ChannelWriter::SendFailure(const Error& error, std::string_view entry) {
  pending_.clear();  // records after a failure are never applied
  capnp::MallocMessageBuilder message;
  auto failure = message.initRoot<Message>().initFailure();
  failure.setKind(static_cast<uint16_t>(error.kind()));
  failure.setErrno(error.err());
  failure.setEntry(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(entry.data()),
                                       std::min<size_t>(entry.size(), 4096)));
  std::string text = error.ToString();
  failure.setMessage(text.substr(0, 4096));
  return Send(message);
}

Status ChannelWriter::Send(capnp::MessageBuilder& message) {
  int64_t start = sandbox::MonotonicNs();
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  kj::ArrayPtr<const kj::byte> bytes = words.asBytes();
  Status sent = sandbox::WriteAll(
      fd_, std::span(reinterpret_cast<const std::byte*>(bytes.begin()), bytes.size()));
  send_ns_ += sandbox::MonotonicNs() - start;
  return sent;
}

}  // namespace layerx::wire
