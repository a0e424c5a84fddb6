// libarchive, adapted: the only file that talks to it. Two readers are stacked:
// the outer one detects and runs the decompression filter from the bytes (gzip,
// bzip2, xz, zstd or none; only filters built into libarchive, never an external
// program; gzip goes to ISA-L instead, see Decoder in layer_reader.cc), the
// inner one parses tar (ustar, pax, GNU) from the outer's output, which passes
// through a SHA-256 on the way: the layer's diff_id.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "extractor/digest.h"
#include "extractor/gzip_inflater.h"
#include "extractor/read_ahead.h"
#include "sandbox/read_buffer.h"
#include "extractor/records.h"
#include "policy/limits.h"
#include "policy/result.h"

struct archive;

namespace layerx::extractor {

struct TarEntry {
  std::string untrusted_name;  // bytes as stored
  Kind kind = Kind::kFile;     // kHardlink when the entry names a link target
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint32_t mode = 0;  // & 07777
  int64_t mtime_ns = 0;
  uint64_t size = 0;
  std::string untrusted_link_target;  // symlink target or hardlink target name
  uint32_t rdev_major = 0;
  uint32_t rdev_minor = 0;
  std::vector<std::pair<std::string, std::string>> xattrs;
};

// Where the current entry's file data goes. `bytes` takes it block by block,
// at offsets in the file (a sparse file skips its holes). `copy`, when set, may
// be offered the rest of the data as a range of the layer's own file instead,
// to copy in the kernel (copy_file_range); it answers false when it cannot, and
// the bytes keep coming.
struct DataSink {
  std::function<Status(int64_t offset, std::span<const std::byte>)> bytes;
  std::function<Result<bool>(uint64_t offset, uint64_t length, int in_fd, uint64_t in_offset)>
      copy;
};
// Everything that must happen before the jail is locked down: the locale that
// keeps names as UTF-8/bytes without iconv, and OpenSSL's SHA-256 fetched with no
// config file read. After the pivot these would read the image's files.
void PrepareLibrariesBeforeJail();

class Decoder;  // layer_reader.cc

class LayerReader {
 public:
  // Sets up both readers; reads nothing yet. With `ahead`, a compressed
  // stream is decompressed on its thread, and hashed by whichever of the two
  // threads has time (see read_ahead.h).
  static Result<std::unique_ptr<LayerReader>> Create(const policy::Limits& limits,
                                                     std::shared_ptr<ReadAhead> ahead = nullptr);
  ~LayerReader();

  // Starts reading from `fd` (borrowed). kInvalidInput when the stream is no
  // compressed or plain tar.
  Status Open(int fd);
  // The next entry, or nullopt at the end of the archive.
  Result<std::optional<TarEntry>> Next();
  // After Next() failed: the name of the entry whose header was refused, when
  // the header got as far as a name ("" when it did not).
  const std::string& failed_name() const { return failed_name_; }
  // Feeds the current entry's data to `sink` block by block (sparse files come
  // as blocks at offsets). With copying enabled, the rest of a file's data past
  // what was read already is offered to sink.copy as a range of the input file.
  // Returns the bytes delivered.
  Result<uint64_t> ReadData(const DataSink& sink);
  // The input is a plain tar in a regular file (fd 0 is the layer's file, see
  // sandbox::JailData::copy_input): file data may be copied from it in the
  // kernel instead of read. A no-op for any other input.
  void EnableCopy() { copy_ = plain_ && seekable_; }

  // After the end: "sha256:<hex>" and the size of the decompressed stream;
  // "" when the stream was not compressed (it is the blob, which the broker
  // hashes itself). kInvalidInput or kLimitExceeded when the rest is bad.
  Result<std::string> UncompressedDigest();
  uint64_t uncompressed_bytes() const { return uncompressed_bytes_; }

 private:
  LayerReader(const policy::Limits& limits) : limits_(limits) {}
  // kLimitExceeded past max_layer_bytes (a plain tar; a compressed one is
  // checked by its Decoder).
  Status CheckPlainSize() const;
  Error ShortData() const;
  Status PreadInto(const DataSink& sink, uint64_t offset, uint64_t length, uint64_t in_offset);

  policy::Limits limits_;
  struct archive* inner_ = nullptr;
  // A compressed stream: decompressed by decoder_, on ahead_'s
  // thread when there is one (the decoder is then the thread's, not touched
  // here until the stream's end), else here into buffer_.
  std::shared_ptr<Decoder> decoder_;
  std::shared_ptr<ReadAhead> ahead_;
  bool ahead_started_ = false;
  // The decompressed stream's: the diff_id. Shared with the read-ahead's hash,
  // which may still run a moment after this reader is gone (a refused layer).
  std::shared_ptr<Sha256> sha_ = std::make_shared<Sha256>();
  bool plain_ = false;                  // an uncompressed tar: read straight from the fd
  int input_fd_ = -1;
  // A plain tar in a regular file: skipped data is seeked over, and with copy_
  // the rest of a file's data goes by copy_file_range. buffer_ holds the input
  // from file offset buffer_pos_, buffer_len_ bytes; the fd stands at read_pos_.
  bool seekable_ = false;
  bool copy_ = false;
  uint64_t file_size_ = 0;
  uint64_t read_pos_ = 0;
  uint64_t prefix_pos_ = 0;
  uint64_t buffer_pos_ = 0;
  size_t buffer_len_ = 0;
  uint64_t entry_size_ = 0;     // the current entry's data size
  bool entry_sparse_ = false;   // its data is not one contiguous range
  std::vector<std::byte> prefix_;  // sniffed bytes of a plain tar the reader has yet to see
  uint64_t uncompressed_bytes_ = 0;
  sandbox::ReadBuffer buffer_;
  std::optional<Error> outer_error_;
  std::string failed_name_;
  friend struct LayerReaderCallbacks;
};

}  // namespace layerx::extractor
