#include "broker/engine/rootfs_finish.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>

#include <string>
#include <unordered_map>

#include "sandbox/sys.h"

namespace layerx::broker {

using extractor::Kind;
using sandbox::UniqueFd;

namespace {

constexpr uint64_t kInRoot = RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;

Result<UniqueFd> OpenParent(int rootfs_fd, const std::string& path, std::string* leaf) {
  size_t slash = path.rfind('/');
  *leaf = slash == std::string::npos ? path : path.substr(slash + 1);
  std::string parent = slash == std::string::npos ? "." : path.substr(0, slash);
  return sandbox::OpenAt2(rootfs_fd, parent, O_PATH | O_DIRECTORY, kInRoot);
}

Status MakeDevice(int rootfs_fd, const std::string& path, const extractor::EntryRecord& m) {
  std::string leaf;
  LX_ASSIGN_OR_RETURN(UniqueFd parent, OpenParent(rootfs_fd, path, &leaf));
  mode_t type = m.kind == Kind::kChar ? S_IFCHR : S_IFBLK;
  if (::mknodat(parent.get(), leaf.c_str(), type | 0600, makedev(m.rdev_major, m.rdev_minor)) !=
      0) {
    return Fail(OsError(errno, "mknod {:?}", path));
  }
  if (::fchownat(parent.get(), leaf.c_str(), m.uid, m.gid, AT_SYMLINK_NOFOLLOW) != 0) {
    return Fail(OsError(errno, "chown {:?}", path));
  }
  LX_TRY(sandbox::FchmodAtNoFollow(parent.get(), leaf, m.mode));
  struct timespec ts[2];
  ts[0].tv_sec = ts[1].tv_sec = m.mtime_ns / 1'000'000'000;
  ts[0].tv_nsec = ts[1].tv_nsec = m.mtime_ns % 1'000'000'000;
  if (ts[0].tv_nsec < 0) {
    ts[0].tv_nsec = ts[1].tv_nsec = 0;
  }
  if (::utimensat(parent.get(), leaf.c_str(), ts, AT_SYMLINK_NOFOLLOW) != 0) {
    return Fail(OsError(errno, "utimensat {:?}", path));
  }
  return {};
}

// Another name of the device node made at `first`: a hardlink, as in the
// image, not a second node. linkat without AT_SYMLINK_FOLLOW never follows.
Status LinkDevice(int rootfs_fd, const std::string& first, const std::string& path) {
  std::string first_leaf, leaf;
  LX_ASSIGN_OR_RETURN(UniqueFd first_parent, OpenParent(rootfs_fd, first, &first_leaf));
  LX_ASSIGN_OR_RETURN(UniqueFd parent, OpenParent(rootfs_fd, path, &leaf));
  if (::linkat(first_parent.get(), first_leaf.c_str(), parent.get(), leaf.c_str(), 0) != 0) {
    return Fail(OsError(errno, "link {:?} to {:?}", path, first));
  }
  return {};
}

Status SetCapability(int rootfs_fd, const std::string& path, const std::string& value) {
  LX_ASSIGN_OR_RETURN(
      UniqueFd fd, sandbox::OpenAt2(rootfs_fd, path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK, kInRoot));
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(fd.get()));
  if (!S_ISREG(st.st_mode)) return Fail(OsError(EINVAL, "capability on non-file {:?}", path));
  if (::fsetxattr(fd.get(), "security.capability", value.data(), value.size(), 0) != 0) {
    return Fail(OsError(errno, "setxattr security.capability {:?}", path));
  }
  return {};
}

}  // namespace

Status FinishRootfsAsRoot(int rootfs_fd, const ImageTree& tree) {
  // The first name of each device inode, for the names after it.
  std::unordered_map<const Inode*, std::string> made;
  for (const auto& [path, inode] : tree.entries()) {
    const extractor::EntryRecord& m = inode->meta;
    if (m.kind == Kind::kChar || m.kind == Kind::kBlock) {
      auto [first, fresh] = made.emplace(inode.get(), path);
      LX_TRY(fresh ? MakeDevice(rootfs_fd, path, m) : LinkDevice(rootfs_fd, first->second, path));
      continue;
    }
    if (m.kind != Kind::kFile) continue;
    for (const auto& [name, value] : m.xattrs) {
      if (name == "security.capability") LX_TRY(SetCapability(rootfs_fd, path, value));
    }
  }
  return {};
}

}  // namespace layerx::broker
