// fuzz_records: the broker's record validation and merge on an arbitrary record
// stream, as a compromised extractor could send it. The bytes are cut into
// framed Cap'n Proto messages and dispatched the way broker/engine/layer_records.cc
// does (RecordReader::Read and HandleMessage: the same reader options, the
// same dispatch, kj::Exception caught as kPeer) into a broker::ImageTree; the
// stream stops at the first refusal, as the broker does. A summary ends one
// layer's stream; up to kMaxLayers streams merge into the one tree, each after
// ImageTree::BeginLayer, as a job's layers do (so that whiteouts and opaque
// markers have lower layers to hide).
//
// Every layer gets a window of the data fd, as a --ext4 job gives it (the next
// starts past the last one's data), so data extents are judged too; the tree
// that results is then built into an ext4 image on a memfd (when its data ends
// within 64 MiB: the real broker refuses extents past what the layer wrote),
// which must work or fail with a clean error (overlapping data is kPeer),
// never trip an internal check.
//
// After each input the target traps when a tree invariant is broken (the root
// is a directory; every other path is canonical and its parent is a directory
// in the tree; no inode is a hardlink or a shared directory), or when the
// manifest (broker/engine/manifest.h) of the tree is not one JSON object per entry,
// naming each path exactly.
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "broker/engine/layer_runner.h"
#include "broker/engine/manifest.h"
#include "broker/ext4/ext4.h"
#include "broker/tree/image_tree.h"
#include "extractor/entry_name.h"
#include "extractor/wire/codec.h"
#include "sandbox/sys.h"

namespace {

using namespace layerx;
using extractor::Kind;

[[noreturn]] void Bug(const std::string& what) {
  std::fprintf(stderr, "fuzz_records: BUG: %s\n", what.c_str());
  __builtin_trap();
}

policy::Limits FuzzLimits() {
  policy::Limits limits;
  // Small messages keep a pointer-sharing message (one struct behind many list
  // elements, capped only by the traversal limit) from making an input slow.
  limits.max_record_message_bytes = 1 * policy::kMiB;
  return limits;
}

constexpr size_t kMaxLayers = 3;

enum class End { kNone, kSummary, kFailure };

// RecordReader::HandleMessage without the layer report: a batch is merged (by the
// broker's MergeBatch), a summary or a failure ends the stream.
Status HandleMessage(kj::ArrayPtr<const capnp::word> words, const policy::Limits& limits,
                     broker::ImageTree& tree, End* ended) {
  if (*ended != End::kNone) return Fail(MakeError(ErrorKind::kPeer, "message after the end"));
  capnp::ReaderOptions options;
  options.traversalLimitInWords = limits.max_record_message_bytes / 8;
  options.nestingLimit = 8;
  try {
    capnp::FlatArrayMessageReader reader(words, options);
    auto message = reader.getRoot<wire::Message>();
    switch (message.which()) {
      case wire::Message::BATCH:  // the broker's own merge
        return broker::MergeBatch(message.getBatch(), tree, [](uint64_t) { return Status{}; });
      case wire::Message::SUMMARY: {
        auto s = message.getSummary();
        (void)s.getEntries();
        (void)std::string(s.getUncompressedDigest().cStr());
        *ended = End::kSummary;
        return {};
      }
      case wire::Message::FAILURE: {
        auto f = message.getFailure();
        (void)std::string(f.getMessage().cStr());
        (void)f.getEntry().size();
        *ended = End::kFailure;
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

std::string ParentOf(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash);
}

void CheckTree(const broker::ImageTree& tree) {
  const auto& entries = tree.entries();
  auto root = entries.find("");
  if (root == entries.end() || root->second->meta.kind != Kind::kDir) Bug("the root is no dir");
  std::map<const broker::Inode*, int> dir_names;
  for (const auto& [path, inode] : entries) {
    if (inode->meta.kind == Kind::kHardlink) Bug(fmt::format("{:?}: a hardlink inode", path));
    if (inode->meta.kind == Kind::kDir && ++dir_names[inode.get()] > 1) {
      Bug(fmt::format("{:?}: a directory under two names", path));
    }
    if (path.empty()) continue;
    if (!extractor::IsCanonicalPath(path)) Bug(fmt::format("{:?}: not canonical", path));
    auto parent = entries.find(ParentOf(path));
    if (parent == entries.end() || parent->second->meta.kind != Kind::kDir) {
      Bug(fmt::format("{:?}: its parent is no directory in the tree", path));
    }
  }
}

std::string Unbase64(const std::string& text) {
  std::string out(text.size() / 4 * 3 + 3, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(text.data()),
                          static_cast<int>(text.size()));
  if (n < 0) Bug("manifest: bad base64");
  out.resize(static_cast<size_t>(n));
  // EVP_DecodeBlock keeps the zero bytes that padding stands for.
  if (text.ends_with("==")) {
    out.resize(out.size() - 2);
  } else if (text.ends_with("=")) {
    out.resize(out.size() - 1);
  }
  return out;
}

// One JSON object per line, in the tree's order, each naming its path.
void CheckManifest(const broker::ImageTree& tree) {
  auto memfd = sandbox::MemfdCreate("fuzz-manifest");
  if (!memfd) Bug("memfd_create");
  if (Status written = broker::WriteManifest(tree, memfd->get()); !written) {
    Bug("WriteManifest: " + written.error().ToString());
  }
  off_t size = ::lseek(memfd->get(), 0, SEEK_END);
  std::string text(static_cast<size_t>(size), '\0');
  if (::pread(memfd->get(), text.data(), text.size(), 0) != size) Bug("read manifest");
  auto entry = tree.entries().begin();
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) Bug("manifest: last line not ended");
    auto line = nlohmann::json::parse(text.substr(pos, nl - pos), nullptr, false);
    pos = nl + 1;
    if (!line.is_object()) Bug("manifest: a line is no JSON object");
    if (entry == tree.entries().end()) Bug("manifest: more lines than entries");
    std::string path = line.contains("path") ? line["path"].get<std::string>()
                                             : Unbase64(line.at("path_b64").get<std::string>());
    if (path != (entry->first.empty() ? "." : entry->first)) {
      Bug(fmt::format("manifest: line for {:?} names {:?}", entry->first, path));
    }
    ++entry;
  }
  if (entry != tree.entries().end()) Bug("manifest: fewer lines than entries");
}

// The tree into an ext4 image on a memfd holding `data_end` bytes: a clean
// result or a clean refusal.
void BuildImage(const broker::ImageTree& tree, uint64_t data_start, uint64_t data_end) {
  auto memfd = sandbox::MemfdCreate("fuzz-image");
  if (!memfd) Bug("memfd_create");
  if (::ftruncate(memfd->get(), static_cast<off_t>(data_end)) != 0) Bug("ftruncate");
  broker::Ext4Options options;
  options.reproducible = true;  // no clock, no random bytes
  auto built = broker::BuildExt4(memfd->get(), tree, data_start, options);
  if (!built && built.error().kind() == ErrorKind::kInternal) {
    Bug("BuildExt4: " + built.error().ToString());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const policy::Limits limits = FuzzLimits();
  // Word-aligned, as the broker's buffer; a trailing partial word is a stream
  // that ends inside a message.
  std::vector<capnp::word> words(size / sizeof(capnp::word));
  if (!words.empty()) std::memcpy(words.data(), data, words.size() * sizeof(capnp::word));
  kj::ArrayPtr<const capnp::word> stream(words.data(), words.size());

  constexpr uint64_t kDataStart = 64 * 1024;
  constexpr uint64_t kBlock = 4096;
  uint64_t data_end = kDataStart;
  broker::ImageTree tree(limits);
  tree.BeginLayer(broker::DataWindow{.enabled = true, .start = data_end, .block_size = kBlock});
  size_t layers = 1;
  End ended = End::kNone;
  size_t at = 0;
  while (at < stream.size()) {
    kj::ArrayPtr<const capnp::word> prefix = stream.slice(at, stream.size());
    size_t need = capnp::expectedSizeInWordsFromPrefix(prefix);
    if (need == 0) Bug("a message of no words");  // the broker would loop forever
    if (need * sizeof(capnp::word) > limits.max_record_message_bytes) break;
    if (need > prefix.size()) break;
    if (!HandleMessage(prefix.slice(0, need), limits, tree, &ended)) break;
    at += need;
    if (ended == End::kSummary && layers < kMaxLayers) {
      // The next layer's extractor, streaming into the same tree, its window
      // past all the data the last one's records named.
      data_end = std::max(data_end, (tree.layer_data_end() + kBlock - 1) / kBlock * kBlock);
      tree.BeginLayer(broker::DataWindow{.enabled = true, .start = data_end, .block_size = kBlock});
      ++layers;
      ended = End::kNone;
    }
  }
  CheckTree(tree);
  CheckManifest(tree);
  data_end = std::max(data_end, tree.layer_data_end());
  for (const auto& [path, inode] : tree.entries()) {
    for (const auto& x : inode->meta.extents) {
      if (x.physical % kBlock != 0 || x.logical % kBlock != 0 || x.physical < kDataStart ||
          x.length == 0 || x.logical + x.length > inode->meta.size) {
        Bug(fmt::format("{:?}: an extent the tree should have refused", path));
      }
    }
  }
  if (data_end <= 64 * policy::kMiB) BuildImage(tree, kDataStart, data_end);
  return 0;
}
