#include "broker/ext4/ext4_io.h"

#include <errno.h>
#include <limits.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

namespace layerx::broker {

namespace {

constexpr size_t kMaxDirtyBytes = 64u << 20;  // then written out early

struct Private {
  int fd = -1;
  // Dirty blocks by number: libext2fs writes an inode table block once per
  // inode in it; here it reaches the file once, in order with its neighbours.
  std::map<unsigned long long, std::vector<char>> dirty;
};

Private* Data(io_channel channel) { return static_cast<Private*>(channel->private_data); }

// Byte size of `count` in libext2fs's convention: blocks, or -bytes.
size_t Bytes(io_channel channel, int count) {
  return count < 0 ? static_cast<size_t>(-count)
                   : static_cast<size_t>(count) * static_cast<size_t>(channel->block_size);
}

errcode_t PreadAll(int fd, char* buf, size_t size, off_t offset) {
  while (size > 0) {
    ssize_t n = ::pread(fd, buf, size, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) {  // past the end: a hole to be
      std::memset(buf, 0, size);
      return 0;
    }
    buf += n;
    size -= static_cast<size_t>(n);
    offset += n;
  }
  return 0;
}

errcode_t PwriteAll(int fd, const char* buf, size_t size, off_t offset) {
  while (size > 0) {
    ssize_t n = ::pwrite(fd, buf, size, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    buf += n;
    size -= static_cast<size_t>(n);
    offset += n;
  }
  return 0;
}

// pwritev(2) of all of `iov` (which it may advance) at `offset`.
errcode_t PwritevAll(int fd, std::vector<struct iovec>& iov, off_t offset) {
  size_t first = 0;
  while (first < iov.size()) {
    ssize_t n = ::pwritev(fd, iov.data() + first, static_cast<int>(iov.size() - first), offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    offset += n;
    for (auto left = static_cast<size_t>(n); left > 0;) {
      size_t step = std::min(left, iov[first].iov_len);
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + step;
      iov[first].iov_len -= step;
      left -= step;
      if (iov[first].iov_len == 0) ++first;
    }
  }
  return 0;
}

// Each run of consecutive dirty blocks in one pwritev, straight from the
// blocks (IOV_MAX at a time).
errcode_t FlushDirty(io_channel channel) {
  Private* p = Data(channel);
  const size_t bs = static_cast<size_t>(channel->block_size);
  std::vector<struct iovec> iov;
  auto it = p->dirty.begin();
  while (it != p->dirty.end()) {
    unsigned long long first = it->first, next = first;
    iov.clear();
    for (; it != p->dirty.end() && it->first == next && iov.size() < IOV_MAX; ++it, ++next) {
      iov.push_back({it->second.data(), it->second.size()});
    }
    if (errcode_t rc = PwritevAll(p->fd, iov, static_cast<off_t>(first * bs))) return rc;
  }
  p->dirty.clear();
  return 0;
}

errcode_t Open(const char* name, int flags, io_channel* channel) {
  if (name == nullptr) return EXT2_ET_BAD_DEVICE_NAME;
  char* end = nullptr;
  long fd = std::strtol(name, &end, 10);
  if (end == name || *end != '\0' || fd < 0) return EXT2_ET_BAD_DEVICE_NAME;
  (void)flags;
  auto* io = new struct_io_channel{};
  io->magic = EXT2_ET_MAGIC_IO_CHANNEL;
  io->manager = MemoryCachedFdIoManager();
  io->name = strdup(name);
  io->block_size = 1024;
  io->refcount = 1;
  auto* p = new Private;
  p->fd = static_cast<int>(fd);
  io->private_data = p;
  *channel = io;
  return 0;
}

errcode_t Close(io_channel channel) {
  if (--channel->refcount > 0) return 0;
  Private* p = Data(channel);
  errcode_t rc = FlushDirty(channel);
  if (::close(p->fd) != 0 && rc == 0) rc = errno;
  delete p;
  std::free(channel->name);
  delete channel;
  return rc;
}

errcode_t SetBlksize(io_channel channel, int blksize) {
  if (channel->block_size == blksize) return 0;
  if (errcode_t rc = FlushDirty(channel)) return rc;
  channel->block_size = blksize;
  return 0;
}

errcode_t Read64(io_channel channel, unsigned long long block, int count, void* data) {
  Private* p = Data(channel);
  const size_t bs = static_cast<size_t>(channel->block_size), size = Bytes(channel, count);
  char* out = static_cast<char*>(data);
  if (errcode_t rc = PreadAll(p->fd, out, size, static_cast<off_t>(block * bs))) return rc;
  // What is still in memory is newer than the file.
  unsigned long long last = block + (size + bs - 1) / bs;
  for (auto it = p->dirty.lower_bound(block); it != p->dirty.end() && it->first < last; ++it) {
    size_t at = (it->first - block) * bs;
    std::memcpy(out + at, it->second.data(), std::min(bs, size - at));
  }
  return 0;
}

errcode_t WriteByte(io_channel channel, unsigned long offset, int size, const void* data) {
  Private* p = Data(channel);
  const size_t bs = static_cast<size_t>(channel->block_size);
  const char* in = static_cast<const char*>(data);
  if (errcode_t rc = PwriteAll(p->fd, in, static_cast<size_t>(size), static_cast<off_t>(offset))) {
    return rc;
  }
  // Blocks held in memory that the bytes touch take them too.
  unsigned long long first = offset / bs, last = (offset + size + bs - 1) / bs;
  for (auto it = p->dirty.lower_bound(first); it != p->dirty.end() && it->first < last; ++it) {
    size_t block_start = it->first * bs;
    size_t from = std::max<size_t>(block_start, offset);
    size_t to = std::min<size_t>(block_start + bs, offset + static_cast<size_t>(size));
    std::memcpy(it->second.data() + (from - block_start), in + (from - offset), to - from);
  }
  return 0;
}

errcode_t Write64(io_channel channel, unsigned long long block, int count, const void* data) {
  Private* p = Data(channel);
  const size_t bs = static_cast<size_t>(channel->block_size), size = Bytes(channel, count);
  const char* in = static_cast<const char*>(data);
  if (size % bs != 0) {
    return WriteByte(channel, static_cast<unsigned long>(block * bs), static_cast<int>(size), data);
  }
  for (size_t i = 0; i < size / bs; ++i) {
    std::vector<char>& slot = p->dirty[block + i];
    slot.assign(in + i * bs, in + (i + 1) * bs);
  }
  if (p->dirty.size() * bs > kMaxDirtyBytes) return FlushDirty(channel);
  return 0;
}

errcode_t Read32(io_channel channel, unsigned long block, int count, void* data) {
  return Read64(channel, block, count, data);
}

errcode_t Write32(io_channel channel, unsigned long block, int count, const void* data) {
  return Write64(channel, block, count, data);
}

errcode_t Flush(io_channel channel) { return FlushDirty(channel); }

errcode_t SetOption(io_channel, const char*, const char*) { return EXT2_ET_INVALID_ARGUMENT; }

struct struct_io_manager g_manager = {
    .magic = EXT2_ET_MAGIC_IO_MANAGER,
    .name = "layerx memory-cached fd I/O",
    .open = Open,
    .close = Close,
    .set_blksize = SetBlksize,
    .read_blk = Read32,
    .write_blk = Write32,
    .flush = Flush,
    .write_byte = WriteByte,
    .set_option = SetOption,
    .get_stats = nullptr,
    .read_blk64 = Read64,
    .write_blk64 = Write64,
    .discard = nullptr,
    .cache_readahead = nullptr,
    .zeroout = nullptr,
    .reserved = {},
};

}  // namespace

io_manager MemoryCachedFdIoManager() { return &g_manager; }

}  // namespace layerx::broker
