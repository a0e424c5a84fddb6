// Every limit layerx enforces, with its default. The extractor stops at the
// per-layer ones where the bytes are; the broker enforces the totals and the clock
// independently, so a compromised extractor cannot exceed them either.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace layerx::policy {

inline constexpr uint64_t kKiB = 1024;
inline constexpr uint64_t kMiB = 1024 * kKiB;
inline constexpr uint64_t kGiB = 1024 * kMiB;

struct Limits {
  uint64_t max_layer_bytes = 64 * kGiB;   // uncompressed bytes of one layer (its tar stream)
  uint64_t max_image_bytes = 256 * kGiB;  // uncompressed file data in all layers
  uint64_t max_entries = 4'000'000;       // tar entries in one layer
  uint64_t max_path_bytes = 4096;         // one entry name, after cleaning
  uint64_t max_path_depth = 512;          // components in one name
  uint64_t max_link_target_bytes = 4096;  // symlink / hardlink target
  uint64_t max_xattrs_per_entry = 128;
  uint64_t max_xattr_bytes = 64 * kKiB;  // names + values of one entry
  uint64_t max_symlink_hops = 40;        // as the kernel's MAXSYMLINKS
  uint64_t layer_timeout_ms = 30 * 60 * 1000;
  uint64_t job_timeout_ms = 2 * 60 * 60 * 1000;  // all layers and the ext4 build
  // Tar bytes out per compressed byte in, once a layer has inflated past
  // kRatioGraceBytes (a small stream may compress well; a bomb cannot hide
  // for long: a 10 MB gzip of zeros passes 1000:1 within its first 16 MiB).
  uint64_t max_compression_ratio = 1000;
  uint64_t max_record_message_bytes = 64 * kMiB;  // one Cap'n Proto message
};

inline constexpr uint64_t kRatioGraceBytes = 16 * kMiB;

// What happens to an entry or a bit the policy does not want: kept, stripped
// (a device or fifo entry is left out, a setuid bit or a file capability is
// removed), or refused (the job fails naming the entry).
enum class Treatment : uint8_t { kKeep, kStrip, kRefuse };

// Which xattrs from the layers are kept (in the manifest, the rootfs and the
// ext4 image), as patterns: a name ending in "." keeps a namespace ("user."),
// any other keeps that exact name. By default the user namespace, file
// capabilities and POSIX ACLs; trusted.*, security.selinux, security.ima and
// the like are dropped: a layer must not label or sign files for the host that
// runs the image. A plain value (NUL-separated patterns in a fixed buffer), so
// it travels to the jail inside the sealed config.
class XattrAllowlist {
 public:
  static constexpr size_t kCapacity = 1024;
  XattrAllowlist() {
    for (const char* p :
         {"user.", "security.capability", "system.posix_acl_access", "system.posix_acl_default"}) {
      (void)Add(p);
    }
  }
  static XattrAllowlist Empty() { return XattrAllowlist(nullptr); }
  // False when the pattern is empty, holds a NUL, or does not fit.
  bool Add(std::string_view pattern) {
    if (pattern.empty() || pattern.find('\0') != std::string_view::npos ||
        used_ + pattern.size() + 1 > kCapacity) {
      return false;
    }
    std::memcpy(buf_ + used_, pattern.data(), pattern.size());
    used_ += pattern.size();
    buf_[used_++] = '\0';
    return true;
  }
  bool Keeps(std::string_view name) const {
    for (size_t off = 0; off < used_;) {
      std::string_view p(buf_ + off);
      off += p.size() + 1;
      if (p.back() == '.' ? name.starts_with(p) && name.size() > p.size() : name == p) return true;
    }
    return false;
  }
  template <typename F>
  void ForEach(F&& f) const {
    for (size_t off = 0; off < used_;) {
      std::string_view p(buf_ + off);
      off += p.size() + 1;
      f(p);
    }
  }

 private:
  explicit XattrAllowlist(std::nullptr_t) {}
  char buf_[kCapacity] = {};
  size_t used_ = 0;
};

// What kinds of entries and bits a layer may bring. Setuid applies to
// non-directories: setgid on a directory only makes new files inherit its group.
struct EntryRules {
  Treatment devices = Treatment::kKeep;  // char and block device nodes
  Treatment fifos = Treatment::kKeep;
  Treatment setuid = Treatment::kKeep;     // setuid and setgid bits
  Treatment file_caps = Treatment::kKeep;  // security.capability xattrs
  XattrAllowlist xattrs;
};

// Resource limits set on the jailed extractor before it reads input.
struct JailRlimits {
  uint64_t file_size = 64 * kGiB;     // RLIMIT_FSIZE
  uint64_t open_files = 1024;         // RLIMIT_NOFILE (removing a tree holds one per level)
  uint64_t address_space = 4 * kGiB;  // RLIMIT_AS
  uint64_t cpu_seconds = 3600;        // RLIMIT_CPU
};

}  // namespace layerx::policy
