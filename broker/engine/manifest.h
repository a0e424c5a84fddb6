// The manifest: one JSON object per line per final entry, sorted by path bytes,
// the root as ".". Keys: path, kind, uid, gid, mode, size, mtime_ns, target,
// rdev_major, rdev_minor, inode, nlink, xattrs (name -> base64 value). A string
// whose bytes are not valid UTF-8 is written as KEY_b64 (base64) instead, so
// every name round-trips exactly.
#pragma once

#include <string>

#include "broker/tree/image_tree.h"
#include "policy/result.h"

namespace layerx::broker {

// Writes the manifest of `tree` to `fd` (borrowed).
Status WriteManifest(const ImageTree& tree, int fd);

bool IsValidUtf8(std::string_view s);
std::string Base64(std::string_view bytes);

}  // namespace layerx::broker
