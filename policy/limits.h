// Every limit layerx enforces, with its default. The extractor stops at the
// per-layer ones where the bytes are; the broker enforces the totals and the clock
// independently, so a compromised extractor cannot exceed them either.
#pragma once

#include <cstdint>
#include <string_view>

namespace layerx::policy {

inline constexpr uint64_t kKiB = 1024;
inline constexpr uint64_t kMiB = 1024 * kKiB;
inline constexpr uint64_t kGiB = 1024 * kMiB;

struct Limits {
  uint64_t max_layer_bytes = 64 * kGiB;   // uncompressed file data in one layer
  uint64_t max_image_bytes = 256 * kGiB;  // uncompressed file data in all layers
  uint64_t max_entries = 4'000'000;       // tar entries in one layer
  uint64_t max_path_bytes = 4096;         // one entry name, after cleaning
  uint64_t max_path_depth = 512;          // components in one name
  uint64_t max_link_target_bytes = 4096;  // symlink / hardlink target
  uint64_t max_xattrs_per_entry = 128;
  uint64_t max_xattr_bytes = 64 * kKiB;  // names + values of one entry
  uint64_t max_symlink_hops = 40;        // as the kernel's MAXSYMLINKS
  uint64_t layer_timeout_ms = 30 * 60 * 1000;
  uint64_t max_record_message_bytes = 64 * kMiB;  // one Cap'n Proto message
};

// Which xattrs from the layers are kept (in the manifest, the rootfs and the
// ext4 image): the user namespace, file capabilities and POSIX ACLs. trusted.*,
// security.selinux, security.ima and the like are dropped: a layer must not
// label or sign files for the host that runs the image.
inline bool IsKeptXattr(std::string_view name) {
  return name.starts_with("user.") || name == "security.capability" ||
         name == "system.posix_acl_access" || name == "system.posix_acl_default";
}

// Resource limits set on the jailed extractor before it reads input.
struct JailRlimits {
  uint64_t file_size = 64 * kGiB;     // RLIMIT_FSIZE
  uint64_t open_files = 1024;         // RLIMIT_NOFILE (removing a tree holds one per level)
  uint64_t address_space = 4 * kGiB;  // RLIMIT_AS
  uint64_t cpu_seconds = 3600;        // RLIMIT_CPU
};

}  // namespace layerx::policy
