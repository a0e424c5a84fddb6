// What the jail cannot do, done by the broker on the finished rootfs when it
// runs as root: create the device nodes (a user namespace cannot mknod; the
// names of one hardlinked device become hardlinks of one node) and
// write security.capability (the jail holds no CAP_SETFCAP), so that a root
// extraction matches `umoci unpack` entry for entry.
//
// SECURITY: every path is opened below `rootfs_fd` with openat2(RESOLVE_IN_ROOT |
// RESOLVE_NO_SYMLINKS): the tree's paths are canonical and symlink-free, so a
// symlink anywhere in one means the tree changed under us, and the call fails.
// The leaf is created with mknodat (never follows) or opened O_NOFOLLOW and
// checked to be a regular file. No extractor runs any more at this point.
#pragma once

#include "broker/tree/image_tree.h"
#include "policy/result.h"

namespace layerx::broker {

Status FinishRootfsAsRoot(int rootfs_fd, const ImageTree& tree);

}  // namespace layerx::broker
