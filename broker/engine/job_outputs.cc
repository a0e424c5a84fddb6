// The job's work dir, its --rootfs target and its output files (job_outputs.h).
#include "broker/engine/job_outputs.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <system_error>

#include "broker/log/logging.h"
#include "sandbox/sys.h"

namespace layerx::broker {

using sandbox::UniqueFd;

Result<OutputPath> SplitOutput(const std::string& path, const char* what) {
  std::filesystem::path p(path);
  std::string name = p.filename().string();
  if (name.empty() || name == "." || name == "..") {
    return Fail(MakeError(ErrorKind::kPolicy, "{} {:?}: not a file name", what, path));
  }
  std::string dir = p.parent_path().string();
  return OutputPath{dir.empty() ? "." : dir, name};
}

Status Workspace::Create(const std::string& parent) {
  LX_ASSIGN_OR_RETURN(UniqueFd parent_fd, sandbox::OpenAt(AT_FDCWD, parent, O_PATH | O_DIRECTORY));
  return CreateIn(parent_fd.get(), parent);
}

Status Workspace::CreateIn(int parent_fd, const std::string& parent) {
  parent_ = parent;
  LX_ASSIGN_OR_RETURN(parent_fd_, sandbox::Dup(parent_fd));
  for (int attempt = 0; attempt < 100; ++attempt) {
    // Unguessable (getrandom, not random()): the parent may be a shared dir,
    // where another user could otherwise make the names first.
    LX_ASSIGN_OR_RETURN(std::string name,
                        sandbox::UnguessableName(fmt::format(".layerx-work-{}-", ::getpid())));
    if (::mkdirat(parent_fd_.get(), name.c_str(), 0700) == 0) {
      name_ = name;
      LX_ASSIGN_OR_RETURN(
          dir_fd_, sandbox::OpenAt(parent_fd_.get(), name_, O_PATH | O_DIRECTORY | O_NOFOLLOW));
      LX_TRY(sandbox::MkdirAt(dir_fd_.get(), "rootfs", 0755));
      LX_ASSIGN_OR_RETURN(
          rootfs_fd_, sandbox::OpenAt(dir_fd_.get(), "rootfs", O_PATH | O_DIRECTORY | O_NOFOLLOW));
      return {};
    }
    if (errno != EEXIST) return Fail(OsError(errno, "mkdir work dir in {:?}", parent));
  }
  return Fail(MakeError(ErrorKind::kOs, "no free work dir name in {:?}", parent));
}

Result<UniqueFd> Workspace::MakeDir(const std::string& name) {
  LX_TRY(sandbox::MkdirAt(dir_fd_.get(), name, 0700));
  return sandbox::OpenAt(dir_fd_.get(), name, O_PATH | O_DIRECTORY | O_NOFOLLOW);
}

void Workspace::DropTreeAsync() {
  rootfs_fd_.reset();
  try {
    dropper_ = std::thread([fd = dir_fd_.get()] { (void)sandbox::RemoveTreeAt(fd, "rootfs"); });
  } catch (const std::system_error&) {
    // No thread to be had: Cleanup() removes it with the rest.
  }
}

void Workspace::Cleanup() {
  if (dropper_.joinable()) dropper_.join();
  if (name_.empty()) return;
  rootfs_fd_.reset();
  dir_fd_.reset();
  if (Status s = sandbox::RemoveTreeAt(parent_fd_.get(), name_); !s) {
    Logger("broker")->error("cleanup: work dir {:?} not removed: {}", name_, s.error().ToString());
  }
  name_.clear();
}

void SharedDirNotes::Note(int dir_fd, const std::string& path, const char* what) {
  auto stat = sandbox::Fstat(dir_fd);
  if (!stat || !seen_.emplace(stat->st_dev, stat->st_ino).second) return;
  const struct stat& st = *stat;
  std::string who;
  auto add = [&who](const std::string& one) { who += (who.empty() ? "by " : " / by ") + one; };
  if (st.st_uid != ::geteuid() && (st.st_mode & S_IWUSR) != 0) {
    add(fmt::format("uid {}", st.st_uid));
  }
  if ((st.st_mode & S_IWOTH) != 0) {
    add("others");
  } else if ((st.st_mode & S_IWGRP) != 0) {
    add(fmt::format("group {}", st.st_gid));
  }
  if (who.empty()) return;
  Logger("broker")->info(
      "{} {:?} is writable {} (mode {:04o}): layerx uses only unguessable names and fds there",
      what, path, who, st.st_mode & 07777);
}

void SharedDirNotes::Note(const std::string& path, const char* what) {
  if (auto fd = sandbox::OpenAt(AT_FDCWD, path, O_PATH | O_DIRECTORY)) Note(fd->get(), path, what);
}

Status RootfsTarget::Open(const std::string& path, const OutputPath& out) {
  path_ = path;
  name_ = out.name;
  LX_ASSIGN_OR_RETURN(parent_, sandbox::OpenAt(AT_FDCWD, out.dir, O_PATH | O_DIRECTORY));
  auto fd = sandbox::OpenAt(parent_.get(), name_, O_PATH | O_NOFOLLOW);
  if (!fd) {
    if (fd.error().err() == ENOENT) return {};
    return Fail(std::move(fd).error().With("rootfs {:?}", path));
  }
  LX_ASSIGN_OR_RETURN(found_, sandbox::Fstat(fd->get()));
  if (S_ISLNK(found_.st_mode)) {
    return Fail(
        MakeError(ErrorKind::kPolicy, "rootfs {:?} is a symlink: give the directory itself", path));
  }
  if (!S_ISDIR(found_.st_mode)) {
    return Fail(MakeError(ErrorKind::kPolicy, "rootfs {:?} already exists", path));
  }
  // "." below the fd: the same inode, whatever the name means by now.
  auto dir = sandbox::OpenAt(fd->get(), ".", O_RDONLY | O_DIRECTORY);
  if (!dir) return Fail(std::move(dir).error().With("rootfs {:?}", path));
  LX_TRY(CheckEmpty(dir->get()));
  dir_ = std::move(*dir);
  return {};
}

Status RootfsTarget::Hold() {
  if (!existing()) return {};
  if (Status s = sandbox::Fchmod(dir_.get(), 0700); !s) {
    return Fail(std::move(s).error().With("rootfs {:?}", path_));
  }
  held_ = true;
  return CheckEmpty(dir_.get());
}

Status RootfsTarget::Place(Workspace& work) {
  // The root's metadata now: the chmod and moving entries out change it.
  LX_ASSIGN_OR_RETURN(root_, sandbox::Fstat(work.rootfs_fd()));
  LX_ASSIGN_OR_RETURN(UniqueFd tree,
                      sandbox::OpenAt(work.rootfs_fd(), ".", O_RDONLY | O_DIRECTORY));
  // A new dir appears closed, and opens up only in OpenUp(). Rootless, the
  // image's root mode is on disk (0555, say), which would keep us from
  // moving its entries out.
  LX_TRY(sandbox::Fchmod(tree.get(), 0700));
  if (!existing()) {
    if (Status s = sandbox::RenameNoReplace(work.dir_fd(), "rootfs", parent_.get(), name_); !s) {
      return Fail(std::move(s).error().With("rootfs {:?}", path_));
    }
    placed_ = std::move(tree);
    return {};
  }
  LX_ASSIGN_OR_RETURN(std::vector<std::string> names, sandbox::ListDir(tree.get()));
  for (const std::string& name : names) {
    LX_ASSIGN_OR_RETURN(struct stat st, sandbox::FstatAt(tree.get(), name, AT_SYMLINK_NOFOLLOW));
    Status moved = sandbox::RenameNoReplace(tree.get(), name, dir_.get(), name);
    if (moved) {
      moved_.emplace_back(name, st.st_ino);
      continue;
    }
    if (moved.error().err() == EACCES && S_ISDIR(st.st_mode) && (st.st_mode & S_IWUSR) == 0) {
      moved = MoveReadOnlyDir(tree.get(), name, st);
    }
    if (!moved) return Fail(std::move(moved).error().With("rootfs {:?}", path_));
  }
  return {};
}

Status RootfsTarget::OpenUp(bool chown) {
  int fd = existing() ? dir_.get() : placed_.get();
  Status s;
  if (chown && existing()) s = sandbox::Fchown(fd, root_.st_uid, root_.st_gid);
  if (s) s = sandbox::Fchmod(fd, root_.st_mode & 07777);
  if (s) s = sandbox::Futimens(fd, root_.st_atim, root_.st_mtim);
  if (!s) return Fail(std::move(s).error().With("rootfs {:?}", path_));
  held_ = false;
  return {};
}

void RootfsTarget::Revert() {
  if (!held_) return;
  held_ = false;
  auto log = Logger("broker");
  for (const auto& [name, ino] : moved_) {
    // Still what we moved there? The dir's owner (another user, root
    // extracting into their dir) may have swapped a name meanwhile: what
    // is theirs is left alone.
    auto st = sandbox::FstatAt(dir_.get(), name, AT_SYMLINK_NOFOLLOW);
    if (!st || st->st_ino != ino) {
      log->warn("cleanup: rootfs {:?}: {:?} is not what the job put there; left", path_, name);
      continue;
    }
    if (Status s = sandbox::RemoveTreeAt(dir_.get(), name); !s) {
      log->error("cleanup: rootfs {:?}: {:?} not removed: {}", path_, name, s.error().ToString());
    }
  }
  moved_.clear();
  Status s;
  if (::geteuid() == 0) s = sandbox::Fchown(dir_.get(), found_.st_uid, found_.st_gid);
  if (s) s = sandbox::Fchmod(dir_.get(), found_.st_mode & 07777);
  if (s) s = sandbox::Futimens(dir_.get(), found_.st_atim, found_.st_mtim);
  if (!s) log->error("cleanup: rootfs {:?} not restored: {}", path_, s.error().ToString());
}

Status RootfsTarget::CheckEmpty(int dir_fd) {
  auto names = sandbox::ListDir(dir_fd);
  if (!names) return Fail(std::move(names).error().With("rootfs {:?}", path_));
  if (!names->empty()) {
    return Fail(
        MakeError(ErrorKind::kPolicy, "rootfs {:?} already exists and is not empty", path_));
  }
  return {};
}

Status RootfsTarget::MoveReadOnlyDir(int from, const std::string& name, const struct stat& st) {
  LX_TRY(sandbox::FchmodAtNoFollow(from, name, (st.st_mode & 07777) | S_IWUSR));
  LX_TRY(sandbox::RenameNoReplace(from, name, dir_.get(), name));
  moved_.emplace_back(name, st.st_ino);
  return sandbox::FchmodAtNoFollow(dir_.get(), name, st.st_mode & 07777);
}

PendingOutput::~PendingOutput() {
  if (!temp_.empty()) ::unlinkat(dir_.get(), temp_.c_str(), 0);
}

Status PendingOutput::Reserve(const OutputPath& out) {
  LX_ASSIGN_OR_RETURN(dir_, sandbox::OpenAt(AT_FDCWD, out.dir, O_PATH | O_DIRECTORY));
  dir_path_ = out.dir;
  name_ = out.name;
  // Unguessable, and never a name that is there already (Create() is
  // O_EXCL|O_NOFOLLOW): nothing of anyone else's is unlinked or written.
  LX_ASSIGN_OR_RETURN(temp_, sandbox::UnguessableName(fmt::format(".{}.layerx-tmp-", out.name)));
  return {};
}

Status PendingOutput::ReserveFd(int fd, const Workspace& work, const std::string& name) {
  LX_ASSIGN_OR_RETURN(dir_, sandbox::OpenAt(work.dir_fd(), ".", O_PATH | O_DIRECTORY));
  dir_path_ = work.path();
  temp_ = name;
  out_fd_ = fd;
  return {};
}

Result<UniqueFd> PendingOutput::Create(int access) {
  return sandbox::OpenAt(dir_.get(), temp_, access | O_CREAT | O_EXCL | O_NOFOLLOW, 0644);
}

Status PendingOutput::Commit() {
  if (temp_.empty()) return {};
  if (out_fd_ >= 0) {
    LX_ASSIGN_OR_RETURN(UniqueFd from, sandbox::OpenAt(dir_.get(), temp_, O_RDONLY | O_NOFOLLOW));
    LX_TRY(sandbox::CopySparse(from.get(), out_fd_));
    (void)::unlinkat(dir_.get(), temp_.c_str(), 0);
    temp_.clear();
    return {};
  }
  LX_TRY(sandbox::RenameAt(dir_.get(), temp_, dir_.get(), name_));
  temp_.clear();
  return {};
}

void PendingOutput::Revert() {
  if (out_fd_ >= 0) (void)::ftruncate(out_fd_, 0);
}

}  // namespace layerx::broker
