#include "extractor/layer_reader.h"

#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>
#include <locale.h>
#include <openssl/crypto.h>

#include <cstring>

namespace layerx::extractor {

namespace {

constexpr size_t kBlock = 256 * 1024;
// Below this, the rest of a file's data is read like the rest of the stream
// (one read(2) brings it with the next headers).
constexpr uint64_t kMinCopy = 64 * 1024;

}  // namespace

void PrepareLibrariesBeforeJail() {
  // libarchive converts PAX (UTF-8) names to the locale's charset. In C.UTF-8
  // that is a copy, with no iconv_open: iconv would read gconv-modules and
  // dlopen modules from the image once "/" is the image (CVE-2019-14271 class).
  // The locale's files are read now, from the host.
  if (setlocale(LC_CTYPE, "C.UTF-8") == nullptr) setlocale(LC_CTYPE, "C.utf8");
  // OpenSSL must not read openssl.cnf (it can load providers) after the pivot.
  // The digest (extractor/digest.cc) needs no provider: none is registered.
  OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG | OPENSSL_INIT_NO_ADD_ALL_CIPHERS |
                          OPENSSL_INIT_NO_ADD_ALL_DIGESTS,
                      nullptr);
}

namespace {

Error ArchiveError(struct archive* a, ErrorKind kind, std::string_view what) {
  const char* msg = archive_error_string(a);
  return Error(kind, 0, fmt::format("{}: {}", what, msg ? msg : "unknown libarchive error"));
}

}  // namespace

// A compressed layer's bytes, decompressed: ISA-L for gzip (most layers),
// libarchive's built-in filters for the rest. Every byte out counts against
// the layer's limit, and past the grace the ratio of out to in is checked, so
// a bomb stops within a block of crossing it. Used by one thread at a time:
// the read-ahead's, or the reader's.
class Decoder {
 public:
  static Result<std::shared_ptr<Decoder>> Open(int fd, std::span<const std::byte> sniffed,
                                               const policy::Limits& limits) {
    std::shared_ptr<Decoder> d(new Decoder(fd, limits));
    if (sniffed.size() >= 2 && sniffed[0] == std::byte{0x1f} && sniffed[1] == std::byte{0x8b}) {
      d->gzip_ = std::make_unique<GzipInflater>(fd, sniffed);
      return d;
    }
    d->outer_ = archive_read_new();
    if (!d->outer_) return Fail(MakeError(ErrorKind::kInternal, "layer reader setup failed"));
    // Each filter must be built in: ARCHIVE_WARN means libarchive would fork an
    // external program for it, which the jail forbids and we refuse.
    using Enable = int (*)(struct archive*);
    for (Enable enable : {archive_read_support_filter_gzip, archive_read_support_filter_bzip2,
                          archive_read_support_filter_xz, archive_read_support_filter_zstd}) {
      if (enable(d->outer_) != ARCHIVE_OK) {
        return Fail(MakeError(ErrorKind::kInternal, "libarchive lacks a built-in filter: {}",
                              archive_error_string(d->outer_)));
      }
    }
    if (archive_read_support_format_raw(d->outer_) != ARCHIVE_OK) {
      return Fail(MakeError(ErrorKind::kInternal, "libarchive format setup failed"));
    }
    d->prefix_.assign(sniffed.begin(), sniffed.end());
    d->input_ = sandbox::ReadBuffer(kBlock);
    if (archive_read_open(d->outer_, d.get(), nullptr, &Decoder::OuterRead, nullptr) !=
        ARCHIVE_OK) {
      return Fail(ArchiveError(d->outer_, ErrorKind::kInvalidInput, "read layer"));
    }
    struct archive_entry* raw;
    int rc = archive_read_next_header(d->outer_, &raw);
    if (rc == ARCHIVE_EOF) return Fail(MakeError(ErrorKind::kInvalidInput, "layer is empty"));
    if (rc != ARCHIVE_OK) {
      return Fail(ArchiveError(d->outer_, ErrorKind::kInvalidInput, "read layer"));
    }
    return d;
  }

  ~Decoder() {
    if (outer_) archive_read_free(outer_);
  }

  // Fills `out` as far as the bytes already read allow (a stream that comes
  // slowly, or stops, must not hold back what it brought): one read of the
  // fd at most, at the start; 0 at the end. An error after some bytes comes
  // on the next call, after them, as it would one block at a time.
  Result<size_t> Fill(std::span<std::byte> out) {
    if (pending_) {
      Error error = std::move(*pending_);
      pending_.reset();
      return Fail(std::move(error));
    }
    size_t filled = 0;
    while (filled < out.size()) {
      Result<size_t> got = More(out.subspan(filled), filled == 0);
      if (got && *got > 0) {
        // Bytes past a limit are not given: the error comes where they were.
        bytes_ += *got;
        if (Status within = CheckInflation(); !within) {
          got = Fail(std::move(within).error());
        } else {
          filled += *got;
        }
      }
      if (!got) {
        if (filled == 0) return got;
        pending_ = std::move(got).error();
        break;
      }
      if (*got == 0) break;
    }
    return filled;
  }

 private:
  Decoder(int fd, const policy::Limits& limits) : fd_(fd), limits_(limits) {}

  // Decompressed bytes into `out`; 0 at the end, or (not `may_read`) when
  // more would need a read of the fd.
  Result<size_t> More(std::span<std::byte> out, bool may_read) {
    if (gzip_) return gzip_->Read(out, may_read);
    if (!may_read) return size_t{0};  // libarchive reads when it needs to
    la_ssize_t n = archive_read_data(outer_, out.data(), out.size());
    if (n < 0) {
      if (outer_error_) return Fail(*outer_error_);
      return Fail(ArchiveError(outer_, ErrorKind::kInvalidInput, "decompress layer"));
    }
    return static_cast<size_t>(n);
  }

  Status CheckInflation() const {
    if (bytes_ > limits_.max_layer_bytes) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "layer inflates past max_layer_bytes={}",
                            limits_.max_layer_bytes));
    }
    uint64_t ratio = limits_.max_compression_ratio;
    if (ratio == 0 || bytes_ <= policy::kRatioGraceBytes) return {};
    // Compressed bytes taken from the fd so far.
    la_int64_t in = gzip_ ? static_cast<la_int64_t>(gzip_->compressed_bytes())
                          : archive_filter_bytes(outer_, -1);
    if (in > 0 && bytes_ / static_cast<uint64_t>(in) >= ratio) {
      return Fail(MakeError(ErrorKind::kLimitExceeded,
                            "layer inflates {} bytes from {}: over max_compression_ratio={}",
                            bytes_, in, ratio));
    }
    return {};
  }

  // The outer reader's input: the sniffed bytes, then the fd.
  static la_ssize_t OuterRead(struct archive*, void* self_ptr, const void** out) {
    auto* self = static_cast<Decoder*>(self_ptr);
    *out = self->input_.data();
    if (!self->prefix_.empty()) {
      size_t n = self->prefix_.size();
      std::memcpy(self->input_.data(), self->prefix_.data(), n);
      self->prefix_.clear();
      return static_cast<la_ssize_t>(n);
    }
    while (true) {
      ssize_t n = ::read(self->fd_, self->input_.data(), self->input_.size());
      if (n >= 0) return n;
      if (errno != EINTR) {
        self->outer_error_ = Error(ErrorKind::kOs, errno, "read layer");
        return -1;
      }
    }
  }

  int fd_;
  policy::Limits limits_;
  std::unique_ptr<GzipInflater> gzip_;  // gzip; otherwise outer_ decompresses
  struct archive* outer_ = nullptr;
  std::vector<std::byte> prefix_;  // sniffed bytes the outer reader has yet to see
  sandbox::ReadBuffer input_;      // the outer reader's input block
  std::optional<Error> outer_error_;
  std::optional<Error> pending_;  // an error that came after bytes Fill returned
  uint64_t bytes_ = 0;
};

struct LayerReaderCallbacks {
  // The inner (tar) reader pulls decompressed bytes here.
  static la_ssize_t Read(struct archive* inner, void* self_ptr, const void** out) {
    auto* self = static_cast<LayerReader*>(self_ptr);
    la_ssize_t n;
    if (self->plain_) {
      // An uncompressed tar: straight from the fd into the tar reader, no
      // decompressor between, the sniffed bytes first.
      if (!self->prefix_.empty()) {
        n = static_cast<la_ssize_t>(self->prefix_.size());
        std::memcpy(self->buffer_.data(), self->prefix_.data(), self->prefix_.size());
        self->prefix_.clear();
        self->buffer_pos_ = self->prefix_pos_;
      } else {
        do {
          n = ::read(self->input_fd_, self->buffer_.data(), self->buffer_.size());
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
          self->outer_error_ = Error(ErrorKind::kOs, errno, "read layer");
          archive_set_error(inner, EIO, "read failed");
          return -1;
        }
        self->buffer_pos_ = self->read_pos_;
        self->read_pos_ += static_cast<uint64_t>(n);
      }
      self->buffer_len_ = static_cast<size_t>(n);
      self->uncompressed_bytes_ += static_cast<uint64_t>(n);
      if (Status within = self->CheckPlainSize(); !within) {
        self->outer_error_ = std::move(within).error();
        archive_set_error(inner, EFBIG, "layer over a limit");
        return -1;
      }
      *out = self->buffer_.data();
      return n;
    }
    Result<std::span<const std::byte>> got = std::span<const std::byte>();
    if (self->ahead_started_) {
      got = self->ahead_->Next();
    } else if (auto filled = self->decoder_->Fill(std::span(self->buffer_)); filled) {
      got = std::span<const std::byte>(self->buffer_.data(), *filled);
    } else {
      got = Fail(std::move(filled).error());
    }
    if (!got) {
      self->outer_error_ = std::move(got).error();
      archive_set_error(inner, self->outer_error_->kind() == ErrorKind::kLimitExceeded ? EFBIG : EIO,
                        "decompression failed");
      return -1;
    }
    self->uncompressed_bytes_ += got->size();
    // The diff_id: with the read-ahead, hashed by whichever thread has time.
    if (!self->ahead_started_) self->sha_->Update(got->data(), got->size());
    *out = got->data();
    return static_cast<la_ssize_t>(got->size());
  }

  // A plain tar in a regular file: data the tar reader skips (what was
  // copied, trailing padding) is seeked over, never past the file's end (the
  // reads that follow then find the archive truncated, as they should).
  static la_int64_t Skip(struct archive* inner, void* self_ptr, la_int64_t request) {
    auto* self = static_cast<LayerReader*>(self_ptr);
    if (!self->prefix_.empty() || request <= 0 || self->read_pos_ >= self->file_size_) return 0;
    uint64_t n = std::min(static_cast<uint64_t>(request), self->file_size_ - self->read_pos_);
    if (::lseek(self->input_fd_, static_cast<off_t>(self->read_pos_ + n), SEEK_SET) < 0) return 0;
    self->read_pos_ += n;
    self->buffer_len_ = 0;
    self->uncompressed_bytes_ += n;
    if (Status within = self->CheckPlainSize(); !within) {
      self->outer_error_ = std::move(within).error();
      archive_set_error(inner, EFBIG, "layer over a limit");
      return -1;
    }
    return static_cast<la_int64_t>(n);
  }
};

Status LayerReader::CheckPlainSize() const {
  if (uncompressed_bytes_ > limits_.max_layer_bytes) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "layer inflates past max_layer_bytes={}",
                          limits_.max_layer_bytes));
  }
  return {};
}

Result<std::unique_ptr<LayerReader>> LayerReader::Create(const policy::Limits& limits,
                                                         std::shared_ptr<ReadAhead> ahead) {
  std::unique_ptr<LayerReader> r(new LayerReader(limits));
  r->ahead_ = std::move(ahead);
  r->inner_ = archive_read_new();
  if (!r->inner_) return Fail(MakeError(ErrorKind::kInternal, "layer reader setup failed"));
  if (archive_read_support_format_tar(r->inner_) != ARCHIVE_OK) {
    return Fail(MakeError(ErrorKind::kInternal, "libarchive format setup failed"));
  }
  return r;
}

LayerReader::~LayerReader() {
  // The thread lets go of the decoder once off the block it is on.
  if (ahead_) ahead_->Stop();
  if (inner_) archive_read_free(inner_);
}

Status LayerReader::Open(int fd) {
  // Sniff: an uncompressed tar is read here, straight from the fd; anything
  // else goes to a Decoder, which tells gzip from the other filters.
  input_fd_ = fd;
  struct stat st;
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
    off_t at = ::lseek(fd, 0, SEEK_CUR);
    if (at >= 0 && at <= st.st_size) {
      seekable_ = true;
      file_size_ = static_cast<uint64_t>(st.st_size);
      prefix_pos_ = static_cast<uint64_t>(at);
    }
  }
  // Up to a tar header's worth: gzip's magic, or ustar's at offset 257.
  std::byte magic[512];
  size_t got = 0;
  while (got < sizeof(magic)) {
    ssize_t n = ::read(fd, magic + got, sizeof(magic) - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Fail(Error(ErrorKind::kOs, errno, "read layer"));
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  if (got == 0) return Fail(MakeError(ErrorKind::kInvalidInput, "layer is empty"));
  const bool gzip = got >= 2 && magic[0] == std::byte{0x1f} && magic[1] == std::byte{0x8b};
  if (!gzip && got == sizeof(magic) && std::memcmp(magic + 257, "ustar", 5) == 0) {
    plain_ = true;
    prefix_.assign(magic, magic + got);
    read_pos_ = prefix_pos_ + got;
    buffer_ = sandbox::ReadBuffer(kBlock);
  } else {
    LX_ASSIGN_OR_RETURN(decoder_, Decoder::Open(fd, std::span(magic, got), limits_));
    // The thread holds the decoder from now on, and drops it when it ends;
    // without one (or its buffer), the stream is decompressed here.
    ahead_started_ =
        ahead_ &&
        ahead_->Start([d = decoder_](std::span<std::byte> block) { return d->Fill(block); },
                      [sha = sha_](std::span<const std::byte> block) {
                        sha->Update(block.data(), block.size());
                      });
    if (!ahead_started_) buffer_ = sandbox::ReadBuffer(kBlock);
  }
  auto skip = plain_ && seekable_ ? &LayerReaderCallbacks::Skip : nullptr;
  if (archive_read_open2(inner_, this, nullptr, &LayerReaderCallbacks::Read, skip, nullptr) !=
      ARCHIVE_OK) {
    if (outer_error_) return Fail(*outer_error_);
    return Fail(ArchiveError(inner_, ErrorKind::kInvalidInput, "read tar"));
  }
  return {};
}

Result<std::optional<TarEntry>> LayerReader::Next() {
  failed_name_.clear();
  struct archive_entry* ae;
  int rc = archive_read_next_header(inner_, &ae);
  if (rc == ARCHIVE_EOF) {
    if (uncompressed_bytes_ == 0) {
      return Fail(MakeError(ErrorKind::kInvalidInput, "layer is empty: not a tar archive"));
    }
    return std::nullopt;
  }
  if (outer_error_) return Fail(*outer_error_);
  // ARCHIVE_WARN is a failure too: it flags names that could not be converted,
  // bad checksums or truncated headers, all security-relevant.
  if (rc != ARCHIVE_OK)
    return Fail(ArchiveError(inner_, ErrorKind::kInvalidInput, "read tar header"));

  TarEntry e;
  const char* name = archive_entry_pathname(ae);
  if (name == nullptr) return Fail(MakeError(ErrorKind::kInvalidInput, "entry without a name"));
  e.untrusted_name = name;
  failed_name_ = name;  // an error from here on is this entry's
  e.uid = static_cast<uint32_t>(archive_entry_uid(ae));
  e.gid = static_cast<uint32_t>(archive_entry_gid(ae));
  if (archive_entry_uid(ae) < 0 || archive_entry_uid(ae) > 0xfffffffe ||
      archive_entry_gid(ae) < 0 || archive_entry_gid(ae) > 0xfffffffe) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "uid/gid out of range"));
  }
  e.mode = archive_entry_perm(ae) & 07777;
  // Nanoseconds since the epoch fit an int64 from 1678 to 2262; a pax or
  // base-256 header can name any second (the product would overflow).
  constexpr int64_t kMaxMtimeSeconds = INT64_MAX / 1'000'000'000 - 1;
  int64_t mtime = archive_entry_mtime(ae);
  if (mtime < -kMaxMtimeSeconds || mtime > kMaxMtimeSeconds) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "mtime {} out of range", mtime));
  }
  e.mtime_ns = mtime * 1'000'000'000 + archive_entry_mtime_nsec(ae);
  if (const char* hardlink = archive_entry_hardlink(ae)) {
    e.kind = Kind::kHardlink;
    e.untrusted_link_target = hardlink;
  } else {
    switch (archive_entry_filetype(ae)) {
      case AE_IFREG:
        e.kind = Kind::kFile;
        break;
      case AE_IFDIR:
        e.kind = Kind::kDir;
        break;
      case AE_IFLNK:
        e.kind = Kind::kSymlink;
        if (const char* target = archive_entry_symlink(ae)) e.untrusted_link_target = target;
        break;
      case AE_IFCHR:
        e.kind = Kind::kChar;
        break;
      case AE_IFBLK:
        e.kind = Kind::kBlock;
        break;
      case AE_IFIFO:
        e.kind = Kind::kFifo;
        break;
      default:
        return Fail(MakeError(ErrorKind::kInvalidInput, "unsupported entry type {:o}",
                              archive_entry_filetype(ae)));
    }
  }
  if (e.untrusted_link_target.size() > limits_.max_link_target_bytes) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "link target is {} bytes, limit {}",
                          e.untrusted_link_target.size(), limits_.max_link_target_bytes));
  }
  if (e.kind == Kind::kSymlink && e.untrusted_link_target.empty()) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "symlink with an empty target"));
  }
  if (e.kind == Kind::kChar || e.kind == Kind::kBlock) {
    e.rdev_major = static_cast<uint32_t>(archive_entry_rdevmajor(ae));
    e.rdev_minor = static_cast<uint32_t>(archive_entry_rdevminor(ae));
  }
  if (e.kind == Kind::kFile) {
    if (archive_entry_size(ae) < 0)
      return Fail(MakeError(ErrorKind::kInvalidInput, "negative size"));
    e.size = static_cast<uint64_t>(archive_entry_size(ae));
  }
  entry_size_ = e.kind == Kind::kFile ? e.size : 0;
  entry_sparse_ = archive_entry_sparse_count(ae) > 0;
  size_t xattr_bytes = 0;
  archive_entry_xattr_reset(ae);
  const char* xname;
  const void* xvalue;
  size_t xsize;
  while (archive_entry_xattr_next(ae, &xname, &xvalue, &xsize) == ARCHIVE_OK) {
    xattr_bytes += std::strlen(xname) + xsize;
    if (e.xattrs.size() >= limits_.max_xattrs_per_entry) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "more than max_xattrs_per_entry={} xattrs",
                            limits_.max_xattrs_per_entry));
    }
    if (xattr_bytes > limits_.max_xattr_bytes) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "xattrs over max_xattr_bytes={}",
                            limits_.max_xattr_bytes));
    }
    e.xattrs.emplace_back(xname, std::string(static_cast<const char*>(xvalue), xsize));
  }
  failed_name_.clear();
  return e;
}

Result<uint64_t> LayerReader::ReadData(const DataSink& sink) {
  uint64_t total = 0;
  while (true) {
    const void* buf;
    size_t size;
    la_int64_t offset;
    int rc = archive_read_data_block(inner_, &buf, &size, &offset);
    if (rc == ARCHIVE_EOF) {
      // A header may name a size past the data stored (pax SCHILY.realsize,
      // GNU realsize) without a sparse map: libarchive would end the file in
      // a hole. Neither path makes up bytes the archive does not hold.
      if (!entry_sparse_ && total != entry_size_) return Fail(ShortData());
      return total;
    }
    if (outer_error_) return Fail(*outer_error_);
    if (rc != ARCHIVE_OK)
      return Fail(ArchiveError(inner_, ErrorKind::kInvalidInput, "read file data"));
    if (size == 0) continue;
    total += size;
    const auto* bytes = static_cast<const std::byte*>(buf);
    LX_TRY(sink.bytes(offset, std::span(bytes, size)));
    // This block ended what was read of the input and the file goes on: the
    // rest of its data is where the fd stands, one range (not sparse), and
    // may be copied from there in the kernel, then skipped.
    const uint64_t done = static_cast<uint64_t>(offset) + size;
    if (!copy_ || !sink.copy || entry_sparse_ || done >= entry_size_ ||
        bytes + size != buffer_.data() + buffer_len_ || bytes < buffer_.data()) {
      continue;
    }
    const uint64_t rest = entry_size_ - done;
    if (rest < kMinCopy) continue;
    if (read_pos_ + rest > file_size_) {
      return Fail(MakeError(ErrorKind::kInvalidInput, "layer ends inside the file's data"));
    }
    // Skipped first, then copied (by offset): the skip must have moved the
    // stream by exactly the rest and its padding, or the archive stores less
    // than the header's size (see above) and the range would take the next
    // entry's bytes.
    const uint64_t from = read_pos_;
    if (archive_read_data_skip(inner_) != ARCHIVE_OK) {
      if (outer_error_) return Fail(*outer_error_);
      return Fail(ArchiveError(inner_, ErrorKind::kInvalidInput, "read file data"));
    }
    if (read_pos_ - from != rest + (512 - entry_size_ % 512) % 512) return Fail(ShortData());
    LX_ASSIGN_OR_RETURN(bool copied, sink.copy(done, rest, input_fd_, from));
    if (!copied) {
      // Not between these files (another filesystem): this file's rest by
      // pread, the next ones read with the stream.
      copy_ = false;
      LX_TRY(PreadInto(sink, done, rest, from));
    }
    return total + rest;
  }
}

Error LayerReader::ShortData() const {
  return MakeError(ErrorKind::kInvalidInput,
                   "file data shorter than its size {} (a realsize without a sparse map)",
                   entry_size_);
}

// `length` bytes of the input from `in_offset` to sink.bytes at `offset`.
Status LayerReader::PreadInto(const DataSink& sink, uint64_t offset, uint64_t length,
                              uint64_t in_offset) {
  while (length > 0) {
    ssize_t n = ::pread(input_fd_, buffer_.data(), std::min<uint64_t>(length, buffer_.size()),
                        static_cast<off_t>(in_offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Fail(Error(ErrorKind::kOs, errno, "read layer"));
    if (n == 0) return Fail(MakeError(ErrorKind::kInvalidInput, "layer ends inside the file's data"));
    buffer_len_ = 0;  // nothing of the stream's is there any more
    LX_TRY(sink.bytes(static_cast<int64_t>(offset), std::span(buffer_.data(), static_cast<size_t>(n))));
    offset += static_cast<uint64_t>(n);
    in_offset += static_cast<uint64_t>(n);
    length -= static_cast<uint64_t>(n);
  }
  return {};
}

Result<std::string> LayerReader::UncompressedDigest() {
  // Drain what the tar reader left unread (trailing blocks) so the digest covers
  // the whole stream, as the diff_id does. What fails there fails the layer: a
  // gzip cut before its trailer, or a bomb hiding after the end of the archive.
  const void* out;
  while (LayerReaderCallbacks::Read(inner_, this, &out) > 0) {
  }
  if (outer_error_) return Fail(*outer_error_);
  if (plain_) return std::string();
  return sha_->Finish();
}

}  // namespace layerx::extractor
