// ISA-L's igzip, adapted: gzip layers are inflated here, about three times
// faster than zlib (libarchive's gzip filter), and the raw tar goes on to
// libarchive's tar reader. The only file that talks to ISA-L.
//
// Strict like Go's gzip reader (what containerd uses): members may follow one
// another, each with its CRC-32 and size checked; anything else after a member,
// or a stream that ends inside one, is an error.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "policy/result.h"
#include "sandbox/read_buffer.h"

struct inflate_state;

namespace layerx::extractor {

class GzipInflater {
 public:
  // Reads compressed bytes from `fd` (borrowed); `prefix` is what the caller
  // already read from it to sniff the format.
  GzipInflater(int fd, std::span<const std::byte> prefix);
  ~GzipInflater();

  // Fills `out` with the next inflated bytes; 0 at the end of the last
  // member. kInvalidInput for a corrupt or truncated stream. With `may_read`
  // false it inflates only what is buffered and never reads the fd (which may
  // block, on a pipe): 0 then also means "more needs a read".
  Result<size_t> Read(std::span<std::byte> out, bool may_read = true);
  // Compressed bytes inflated so far (read from the fd, less what waits in the buffer).
  uint64_t compressed_bytes() const { return compressed_bytes_ - (in_len_ - in_pos_); }

 private:
  Status Refill();  // more input into in_; sets eof_

  int fd_;
  std::unique_ptr<inflate_state> state_;
  sandbox::ReadBuffer in_;
  size_t in_pos_ = 0, in_len_ = 0;
  bool eof_ = false;
  bool member_done_ = false;
  uint64_t compressed_bytes_ = 0;
};

}  // namespace layerx::extractor
