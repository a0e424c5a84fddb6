#include "extractor/gzip_inflater.h"

#include <errno.h>
#include <isa-l/igzip_lib.h>
#include <unistd.h>

#include <cstring>

namespace layerx::extractor {

namespace {

constexpr size_t kInputBlock = 256 * 1024;

const char* IsalErrorName(int rc) {
  switch (rc) {
    case ISAL_INVALID_BLOCK:
      return "invalid deflate block";
    case ISAL_INVALID_SYMBOL:
      return "invalid deflate symbol";
    case ISAL_INVALID_LOOKBACK:
      return "invalid lookback distance";
    case ISAL_INVALID_WRAPPER:
      return "invalid gzip header";
    case ISAL_UNSUPPORTED_METHOD:
      return "unsupported gzip method";
    case ISAL_INCORRECT_CHECKSUM:
      return "gzip CRC or size mismatch";
    default:
      return "inflate failed";
  }
}

}  // namespace

GzipInflater::GzipInflater(int fd, std::span<const std::byte> prefix)
    : fd_(fd), state_(std::make_unique<inflate_state>()), in_(kInputBlock) {
  isal_inflate_init(state_.get());
  state_->crc_flag = ISAL_GZIP;  // parse the header, check CRC-32 and size at the end
  if (!prefix.empty()) std::memcpy(in_.data(), prefix.data(), prefix.size());
  in_len_ = prefix.size();
  compressed_bytes_ = prefix.size();
}

GzipInflater::~GzipInflater() = default;

Status GzipInflater::Refill() {
  if (in_pos_ > 0) {
    std::memmove(in_.data(), in_.data() + in_pos_, in_len_ - in_pos_);
    in_len_ -= in_pos_;
    in_pos_ = 0;
  }
  while (true) {
    ssize_t n = ::read(fd_, in_.data() + in_len_, in_.size() - in_len_);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Fail(Error(ErrorKind::kOs, errno, "read layer"));
    if (n == 0) eof_ = true;
    in_len_ += static_cast<size_t>(n);
    compressed_bytes_ += static_cast<uint64_t>(n);
    return {};
  }
}

Result<size_t> GzipInflater::Read(std::span<std::byte> out, bool may_read) {
  while (true) {
    if (member_done_) {
      // Another member, or the end. Two bytes tell which.
      while (in_len_ - in_pos_ < 2 && !eof_) {
        if (!may_read) return size_t{0};
        LX_TRY(Refill());
      }
      size_t left = in_len_ - in_pos_;
      if (left == 0) return size_t{0};
      if (left < 2 || in_[in_pos_] != std::byte{0x1f} || in_[in_pos_ + 1] != std::byte{0x8b}) {
        return Fail(MakeError(ErrorKind::kInvalidInput,
                              "decompress layer: trailing garbage "
                              "after the gzip stream"));
      }
      isal_inflate_reset(state_.get());
      state_->crc_flag = ISAL_GZIP;
      member_done_ = false;
    }
    if (in_pos_ == in_len_ && !eof_) {
      if (!may_read) return size_t{0};
      LX_TRY(Refill());
    }
    state_->next_in = reinterpret_cast<uint8_t*>(in_.data() + in_pos_);
    state_->avail_in = static_cast<uint32_t>(in_len_ - in_pos_);
    state_->next_out = reinterpret_cast<uint8_t*>(out.data());
    state_->avail_out = static_cast<uint32_t>(out.size());
    int rc = isal_inflate(state_.get());
    in_pos_ = in_len_ - state_->avail_in;
    if (rc < 0) {
      return Fail(MakeError(ErrorKind::kInvalidInput, "decompress layer: {}", IsalErrorName(rc)));
    }
    size_t produced = out.size() - state_->avail_out;
    if (state_->block_state == ISAL_BLOCK_FINISH) member_done_ = true;
    if (produced > 0) return produced;
    if (!member_done_ && in_pos_ == in_len_ && eof_) {
      return Fail(MakeError(ErrorKind::kInvalidInput, "decompress layer: truncated gzip stream"));
    }
  }
}

}  // namespace layerx::extractor
