// The record types as plain C++ values, shared by the extractor's writer and the
// broker's reader. A RecordSink receives records in application order.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "policy/result.h"

namespace layerx::extractor {

enum class Kind : uint8_t { kFile, kDir, kSymlink, kHardlink, kChar, kBlock, kFifo };

const char* KindName(Kind kind);

// A run of a file's data in the data fd (the ext4 image being built): `length`
// bytes of the file from byte `logical` stand at byte `physical`. Both offsets
// are multiples of the image's block size; only the last run of a file may end
// inside a block.
struct DataExtent {
  uint64_t logical = 0;
  uint64_t physical = 0;
  uint64_t length = 0;
  bool operator==(const DataExtent&) const = default;
};

struct EntryRecord {
  std::string path;  // canonical, relative; "" is the root
  Kind kind = Kind::kFile;
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint32_t mode = 0;  // & 07777
  int64_t mtime_ns = 0;
  uint64_t size = 0;
  uint64_t data_bytes = 0;  // data actually present (sparse files have less than size)
  std::string symlink_target;
  std::string hardlink_target;
  uint32_t rdev_major = 0;
  uint32_t rdev_minor = 0;
  std::vector<std::pair<std::string, std::string>> xattrs;
  std::vector<DataExtent> extents;  // files whose data went to the data fd, ascending
};

struct RemovalRecord {
  std::string path;     // canonical, relative; "" (the root) only with opaque_dir
  bool opaque = false;  // informational (the applier sends opaque_dir instead)
  // Not a removal of `path` itself: every entry a LOWER layer put below the
  // directory `path` is hidden (an opaque marker in it, or a whiteout of a
  // directory this layer also wrote into). Only the broker can do this in
  // full: it alone knows the device nodes, which are on no disk.
  bool opaque_dir = false;
};

class RecordSink {
 public:
  virtual ~RecordSink() = default;
  virtual Status Add(EntryRecord record) = 0;
  virtual Status Add(RemovalRecord record) = 0;
};

}  // namespace layerx::extractor
