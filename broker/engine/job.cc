#include "broker/engine/job.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <time.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <system_error>
#include <thread>

#include "broker/log/logging.h"
#include "broker/engine/manifest.h"
#include "broker/engine/rootfs_finish.h"
#include "sandbox/sys.h"

namespace layerx::broker {

using sandbox::UniqueFd;

namespace {

struct OutputPath {
  std::string dir;   // parent directory
  std::string name;  // last component
};

Result<OutputPath> SplitOutput(const std::string& path, const char* what) {
  std::filesystem::path p(path);
  std::string name = p.filename().string();
  if (name.empty() || name == "." || name == "..") {
    return Fail(MakeError(ErrorKind::kPolicy, "{} {:?}: not a file name", what, path));
  }
  std::string dir = p.parent_path().string();
  return OutputPath{dir.empty() ? "." : dir, name};
}

// The work dir and temp files of one job; removed without following symlinks
// unless Commit()ted.
class Workspace {
 public:
  ~Workspace() { Cleanup(); }

  Status Create(const std::string& parent) {
    LX_ASSIGN_OR_RETURN(UniqueFd parent_fd,
                        sandbox::OpenAt(AT_FDCWD, parent, O_PATH | O_DIRECTORY));
    return CreateIn(parent_fd.get(), parent);
  }
  // In the directory open at `parent_fd` (borrowed; duplicated), never looked
  // up by name again; `parent` names it in messages.
  Status CreateIn(int parent_fd, const std::string& parent) {
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
        LX_ASSIGN_OR_RETURN(rootfs_fd_, sandbox::OpenAt(dir_fd_.get(), "rootfs",
                                                        O_PATH | O_DIRECTORY | O_NOFOLLOW));
        return {};
      }
      if (errno != EEXIST) return Fail(OsError(errno, "mkdir work dir in {:?}", parent));
    }
    return Fail(MakeError(ErrorKind::kOs, "no free work dir name in {:?}", parent));
  }

  int rootfs_fd() const { return rootfs_fd_.get(); }
  // Another dir beside the rootfs (O_PATH fd), removed with the work dir.
  Result<UniqueFd> MakeDir(const std::string& name) {
    LX_TRY(sandbox::MkdirAt(dir_fd_.get(), name, 0700));
    return sandbox::OpenAt(dir_fd_.get(), name, O_PATH | O_DIRECTORY | O_NOFOLLOW);
  }
  int dir_fd() const { return dir_fd_.get(); }
  std::string path() const { return parent_ + "/" + name_; }

  // The work tree is done with (the image is built from the records, not from
  // it): remove it on another thread while the job goes on; Cleanup() waits.
  void DropTreeAsync() {
    rootfs_fd_.reset();
    try {
      dropper_ = std::thread([fd = dir_fd_.get()] { (void)sandbox::RemoveTreeAt(fd, "rootfs"); });
    } catch (const std::system_error&) {
      // No thread to be had: Cleanup() removes it with the rest.
    }
  }

  void Cleanup() {
    if (dropper_.joinable()) dropper_.join();
    if (name_.empty()) return;
    rootfs_fd_.reset();
    dir_fd_.reset();
    if (Status s = sandbox::RemoveTreeAt(parent_fd_.get(), name_); !s) {
      Logger("broker")->error("cleanup: work dir {:?} not removed: {}", name_,
                              s.error().ToString());
    }
    name_.clear();
  }

 private:
  std::string parent_;
  UniqueFd parent_fd_;
  std::string name_;
  UniqueFd dir_fd_;
  UniqueFd rootfs_fd_;
  std::thread dropper_;
};

// SECURITY: root writing into a directory another user can write (a shared
// output dir, /dev/shm, --scratch) is said in -v, once per directory. It
// changes nothing: every name layerx makes there is unguessable and created
// O_EXCL|O_NOFOLLOW, and what it made is reached only through fds.
class SharedDirNotes {
 public:
  void Note(int dir_fd, const std::string& path, const char* what) {
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
  void Note(const std::string& path, const char* what) {
    if (auto fd = sandbox::OpenAt(AT_FDCWD, path, O_PATH | O_DIRECTORY))
      Note(fd->get(), path, what);
  }

 private:
  std::set<std::pair<dev_t, ino_t>> seen_;
};

// Where --rootfs goes. A new directory: the finished work tree (made beside
// it) is renamed into place with RENAME_NOREPLACE. An existing empty
// directory, which nothing can be renamed over when it is a mount point or on
// another filesystem: opened once without following a link and reached only
// through that fd from then on; the work tree is made inside it (so on its
// filesystem) and its entries are moved up into it one by one at the end.
//
// SECURITY: the rootfs is mode 0700 until the job has succeeded, so the
// image's setuid binaries and device nodes cannot be reached by another user
// meanwhile: an existing dir from the start of the job (before anything is
// made in it), a new one while it is built (inside the 0700 work dir) and
// when it is renamed into place; only then does it take the mode and times of
// the image's root (an existing dir, as root with a full id range, its owner
// too: a new one is the jail's root and has it already). On any failure an
// existing dir is left as found: emptied of what the job moved in, its mode,
// owner and times put back, never removed (it was there before).
class RootfsTarget {
 public:
  ~RootfsTarget() { Revert(); }

  // Missing: a new dir. An empty directory: taken. A symlink (to a dir or
  // not), any other file, or a non-empty dir: kPolicy, and left untouched.
  Status Open(const std::string& path, const OutputPath& out) {
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
      return Fail(MakeError(ErrorKind::kPolicy,
                            "rootfs {:?} is a symlink: give the directory itself", path));
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
  bool existing() const { return dir_.get() >= 0; }
  // The directory the job writes into: the existing dir, else the parent.
  int written_dir_fd() const { return existing() ? dir_.get() : parent_.get(); }

  // An existing dir: closed to everyone but its owner (0700) before anything
  // is made in it, then checked to be empty still. A new one: nothing to do.
  Status Hold() {
    if (!existing()) return {};
    if (Status s = sandbox::Fchmod(dir_.get(), 0700); !s) {
      return Fail(std::move(s).error().With("rootfs {:?}", path_));
    }
    held_ = true;
    return CheckEmpty(dir_.get());
  }

  // The finished tree of `work` in place, its top still 0700.
  Status Place(Workspace& work) {
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

  // The job has succeeded (the work dir is gone): the top of the tree takes
  // the image root's mode and times, and an existing dir (`chown`) its owner.
  // A new dir that fails here stays, 0700 (never removed by name: the name is
  // in a dir others may write, and could be someone else's by now).
  Status OpenUp(bool chown) {
    int fd = existing() ? dir_.get() : placed_.get();
    Status s;
    if (chown && existing()) s = sandbox::Fchown(fd, root_.st_uid, root_.st_gid);
    if (s) s = sandbox::Fchmod(fd, root_.st_mode & 07777);
    if (s) s = sandbox::Futimens(fd, root_.st_atim, root_.st_mtim);
    if (!s) return Fail(std::move(s).error().With("rootfs {:?}", path_));
    held_ = false;
    return {};
  }

  // An existing dir the job failed in: what it moved in removed, mode, owner
  // and times as found. The work dir inside is gone by now (the Workspace
  // lives in RunJobIn, this in RunExtract).
  void Revert() {
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

 private:
  Status CheckEmpty(int dir_fd) {
    auto names = sandbox::ListDir(dir_fd);
    if (!names) return Fail(std::move(names).error().With("rootfs {:?}", path_));
    if (!names->empty()) {
      return Fail(
          MakeError(ErrorKind::kPolicy, "rootfs {:?} already exists and is not empty", path_));
    }
    return {};
  }
  // Rootless, a directory without write permission for its owner (the
  // image's /proc is 0555) cannot be moved to another parent (its ".." is
  // rewritten): made writable for the move, its mode put back after. By
  // name below our own dirs: the work tree (0700, no jail runs any more) and
  // the held target. `st`: the dir's. Recorded in moved_ once moved.
  Status MoveReadOnlyDir(int from, const std::string& name, const struct stat& st) {
    LX_TRY(sandbox::FchmodAtNoFollow(from, name, (st.st_mode & 07777) | S_IWUSR));
    LX_TRY(sandbox::RenameNoReplace(from, name, dir_.get(), name));
    moved_.emplace_back(name, st.st_ino);
    return sandbox::FchmodAtNoFollow(dir_.get(), name, st.st_mode & 07777);
  }

  std::string path_, name_;
  UniqueFd parent_;  // O_PATH
  UniqueFd dir_;     // O_RDONLY: an existing dir only
  UniqueFd placed_;  // O_RDONLY: a new dir, once renamed into place
  struct stat found_ = {};
  struct stat root_ = {};  // the work tree's root, before its entries moved
  bool held_ = false;      // an existing dir, changed by this job, not yet done
  std::vector<std::pair<std::string, ino_t>> moved_;  // names moved in, their inodes
};

// An output file being written under a temp name beside its place; removed
// unless Commit() renamed it into place. Never follows a link.
class PendingOutput {
 public:
  ~PendingOutput() {
    if (!temp_.empty()) ::unlinkat(dir_.get(), temp_.c_str(), 0);
  }
  Status Reserve(const OutputPath& out) {
    LX_ASSIGN_OR_RETURN(dir_, sandbox::OpenAt(AT_FDCWD, out.dir, O_PATH | O_DIRECTORY));
    dir_path_ = out.dir;
    name_ = out.name;
    // Unguessable, and never a name that is there already (Create() is
    // O_EXCL|O_NOFOLLOW): nothing of anyone else's is unlinked or written.
    LX_ASSIGN_OR_RETURN(temp_, sandbox::UnguessableName(fmt::format(".{}.layerx-tmp-", out.name)));
    return {};
  }
  // An output the caller passed as an open fd (the service): the temp goes in
  // the work dir, and Commit() copies it into `fd` (holes kept).
  Status ReserveFd(int fd, const Workspace& work, const std::string& name) {
    LX_ASSIGN_OR_RETURN(dir_, sandbox::OpenAt(work.dir_fd(), ".", O_PATH | O_DIRECTORY));
    dir_path_ = work.path();
    temp_ = name;
    out_fd_ = fd;
    return {};
  }
  // The temp file, new (O_EXCL, never a link); `access` O_WRONLY or O_RDWR.
  Result<UniqueFd> Create(int access = O_WRONLY) {
    return sandbox::OpenAt(dir_.get(), temp_, access | O_CREAT | O_EXCL | O_NOFOLLOW, 0644);
  }
  Status Commit() {
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
  // Undoes a Commit() into an fd: the caller's file is left empty, as given.
  void Revert() {
    if (out_fd_ >= 0) (void)::ftruncate(out_fd_, 0);
  }

 private:
  UniqueFd dir_;
  std::string dir_path_, name_, temp_;
  int out_fd_ = -1;
};

std::string ShortDigest(const std::string& digest) {
  return digest.substr(0, std::min<size_t>(digest.size(), 7 + 12));
}

Result<UniqueFd> OpenExtractor(std::string path) {
  if (path.empty()) {
    LX_ASSIGN_OR_RETURN(path, FindExtractor());
  }
  return sandbox::OpenAt(AT_FDCWD, path, O_PATH);
}

// The archive's own tar is unpacked like a layer, by a jailed extractor, into a
// staging dir beside the rootfs; only then are its manifest.json and config read.
Result<ResolvedImage> StageDockerArchive(const DockerArchiveSpec& spec, Workspace& work,
                                         const RunContext& ctx) {
  LX_ASSIGN_OR_RETURN(UniqueFd staging, work.MakeDir("archive"));
  ImageTree scratch(ctx.policy->limits, ctx.policy->rules);
  RunContext staging_ctx = ctx;
  staging_ctx.rootfs_fd = staging.get();
  staging_ctx.data = sandbox::JailData{};  // the archive's files are read back: a real tree
  staging_ctx.data_fd = -1;
  auto staged =
      RunLayer(staging_ctx, LayerInput{.index = 0, .path = spec.file, .fd = spec.fd}, scratch);
  if (!staged) return Fail(std::move(staged).error().With("docker-archive {:?}", spec.file));
  auto resolved = ResolveDockerArchive(std::move(staging), spec.ref);
  if (!resolved) return Fail(std::move(resolved).error().With("docker-archive:{}", spec.file));
  return resolved;
}

// What the manifest and config promise about a layer, against what streamed.
Status VerifyLayer(const LayerSource& source, const LayerReport& got) {
  if (source.digest && got.compressed_digest != *source.digest) {
    return Fail(MakeError(ErrorKind::kIntegrity,
                          "blob does not match its digest: manifest says {}, content is {}",
                          *source.digest, got.compressed_digest));
  }
  if (source.size && got.compressed_bytes != *source.size) {
    return Fail(MakeError(ErrorKind::kIntegrity, "blob is {} bytes, manifest says {}",
                          got.compressed_bytes, *source.size));
  }
  if (source.diff_id && got.uncompressed_digest != *source.diff_id) {
    return Fail(MakeError(ErrorKind::kIntegrity,
                          "tar stream does not match its diff_id: config says {}, content is {}",
                          *source.diff_id, got.uncompressed_digest));
  }
  return {};
}

}  // namespace

Result<ImageInfo> Inspect(const InspectRequest& request) {
  ImageInfo info;
  ResolvedImage image;
  Workspace work;
  if (auto docker = ParseDockerArchiveSpec(request.sources)) {
    if (docker->fd >= 0) {
      if (Status s = CheckPassedFd(docker->fd, docker->file); !s) {
        return Fail(std::move(s).error().With("docker-archive"));
      }
    }
    LX_ASSIGN_OR_RETURN(UniqueFd extractor_fd, OpenExtractor(request.extractor_path));
    const char* tmp = ::getenv("TMPDIR");
    LX_TRY(work.Create(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp"));
    RunContext ctx{.policy = &request.policy,
                   .rootfs_fd = work.rootfs_fd(),
                   .extractor_fd = extractor_fd.get()};
    LX_ASSIGN_OR_RETURN(image, StageDockerArchive(*docker, work, ctx));
  } else if (IsRegistrySource(request.sources)) {
    PullOptions options = request.pull;
    options.total_timeout_ms = static_cast<long>(request.policy.limits.job_timeout_ms);
    LX_ASSIGN_OR_RETURN(image, ResolveRegistry(request.sources[0], request.platform, options));
  } else {
    LX_ASSIGN_OR_RETURN(image, ResolveSources(request.sources, request.platform));
  }
  info.manifest_digest = image.manifest_digest;
  info.config_digest = image.config_digest;
  info.config = image.config;
  for (const LayerSource& l : image.layers) {
    std::optional<uint64_t> size = l.size;
    if (!size) {
      // Below the staging dir only, like the job opens it (never a link out).
      auto fd = l.dir_fd >= 0 ? sandbox::OpenAt2(l.dir_fd, l.path, O_PATH,
                                                 RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
                              : sandbox::OpenAt(AT_FDCWD, l.path, O_PATH);
      if (fd) {
        if (auto st = sandbox::Fstat(fd->get())) size = static_cast<uint64_t>(st->st_size);
      }
    }
    info.layers.push_back(ImageInfo::Layer{.name = l.display,
                                           .digest = l.digest.value_or(""),
                                           .diff_id = l.diff_id.value_or(""),
                                           .media_type = l.media_type,
                                           .size = size.value_or(0)});
  }
  return info;
}

Result<std::string> FindExtractor() {
  if (const char* env = ::getenv("LAYERX_EXTRACTOR"); env != nullptr && *env != '\0') {
    return std::string(env);
  }
  std::vector<std::filesystem::path> candidates;
  std::error_code ec;
  std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    candidates.push_back(self.parent_path() / "layerx-extractor");
    candidates.push_back(self.parent_path() / ".." / "libexec" / "layerx" / "layerx-extractor");
  }
#ifdef LAYERX_LIBDIR_TO_LIBEXEC
  // A program that loads liblayerx (python3, a Go binary) lives elsewhere:
  // look beside the library too, then where the install put the helper.
  Dl_info info;
  if (::dladdr(reinterpret_cast<void*>(&FindExtractor), &info) != 0 && info.dli_fname != nullptr) {
    std::filesystem::path lib = std::filesystem::canonical(info.dli_fname, ec);
    if (!ec)
      candidates.push_back(lib.parent_path() / LAYERX_LIBDIR_TO_LIBEXEC / "layerx-extractor");
  }
#endif
#ifdef LAYERX_INSTALL_LIBEXECDIR
  candidates.push_back(std::filesystem::path(LAYERX_INSTALL_LIBEXECDIR) / "layerx-extractor");
#endif
  for (const auto& candidate : candidates) {
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
  }
  return Fail(MakeError(
      ErrorKind::kPolicy,
      "layerx-extractor not found beside {:?} or liblayerx (set LAYERX_EXTRACTOR)", self.string()));
}

namespace {

// Bytes of input the job reads: the blobs, or the docker-archive.
uint64_t InputBytes(const ResolvedImage& image, const std::optional<DockerArchiveSpec>& docker) {
  struct stat st;
  if (docker) {
    int r = docker->fd >= 0 ? ::fstat(docker->fd, &st) : ::stat(docker->file.c_str(), &st);
    return r == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  }
  uint64_t total = 0;
  for (const LayerSource& l : image.layers) {
    if (l.size) {
      total += *l.size;
    } else if (l.fd >= 0 && ::fstat(l.fd, &st) == 0) {
      total += static_cast<uint64_t>(st.st_size);
    } else if (l.fd < 0 && l.dir_fd < 0 && ::stat(l.path.c_str(), &st) == 0) {
      total += static_cast<uint64_t>(st.st_size);
    }
  }
  return total;
}

Result<JobReport> RunJobIn(const std::string& work_parent, const ExtractRequest& request,
                           ResolvedImage& image, const std::optional<DockerArchiveSpec>& docker,
                           int64_t start, int extractor_fd,
                           const std::optional<OutputPath>& rootfs_out, RootfsTarget* rootfs,
                           const std::optional<OutputPath>& manifest_out,
                           const std::optional<OutputPath>& ext4_out,
                           const std::optional<OutputPath>& config_out) {
  auto log = Logger("broker");
  // With a rootfs, the work dir goes where it is renamed or moved from, in
  // the dir opened when the rootfs was checked (not looked up again): beside
  // a new one, inside an existing one, which is 0700 before anything is made
  // in it.
  Workspace work;
  if (rootfs != nullptr) {
    LX_TRY(rootfs->Hold());
    LX_TRY(work.CreateIn(rootfs->written_dir_fd(),
                         rootfs->existing() ? *request.rootfs : work_parent));
  } else {
    LX_TRY(work.Create(work_parent));
  }

  ImageTree tree(request.policy.limits, request.policy.rules);
  const int64_t deadline =
      start + static_cast<int64_t>(request.policy.limits.job_timeout_ms) * 1'000'000;
  RunContext ctx{.policy = &request.policy,
                 .rootfs_fd = work.rootfs_fd(),
                 .extractor_fd = extractor_fd,
                 .cancel = request.cancel,
                 .extractor_args = request.extractor_args,
                 .job_deadline_ns = deadline};
  // Between the stages: a cancel or the job's clock stops the job before the
  // next one starts (the layers and mkfs also watch both while they run).
  auto check_stop = [&]() -> Status {
    if (request.cancel != nullptr && request.cancel->load()) {
      return Fail(MakeError(ErrorKind::kCancelled, "interrupted"));
    }
    if (sandbox::MonotonicNs() >= deadline) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "job took longer than job_timeout_ms={}",
                            request.policy.limits.job_timeout_ms));
    }
    return {};
  };
  if (request.progress) {
    ctx.progress = [&request, &image](const LayerProgress& p) {
      LayerProgress with_total = p;
      with_total.layers = image.layers.size();
      request.progress(with_total);
    };
  }
  if (docker) {
    LX_ASSIGN_OR_RETURN(image, StageDockerArchive(*docker, work, ctx));
  }
  JobReport report;
  report.manifest_digest = image.manifest_digest;

  // With an ext4 image to make, the jails write every file's data straight
  // into it (each layer from where the one below it stopped), and the work
  // tree holds placeholders only, unless a rootfs is wanted too. A manifest
  // alone needs no data at all.
  PendingOutput ext4_file, manifest_file, config_file;
  auto reserve = [&work](PendingOutput& file, const std::optional<OutputPath>& path, int fd,
                         const char* name) -> Status {
    if (fd >= 0) return file.ReserveFd(fd, work, name);
    return file.Reserve(*path);
  };
  const bool want_ext4 = ext4_out.has_value() || request.ext4_fd >= 0;
  UniqueFd image_fd;
  uint64_t data_start = 0;
  if (want_ext4) {
    LX_TRY(reserve(ext4_file, ext4_out, request.ext4_fd, "out.ext4"));
    LX_ASSIGN_OR_RETURN(image_fd, ext4_file.Create(O_RDWR));
    // The most data the layers can bring, for the room the image's group
    // descriptors get in front of it: max_image_bytes, or less when the
    // input's size and max_compression_ratio say so (the broker stops a layer
    // past either).
    const policy::Limits& limits = request.policy.limits;
    uint64_t max_data = limits.max_image_bytes;
    uint64_t input = InputBytes(image, docker);
    bool sized = docker.has_value() || !image.layers.empty();
    for (const LayerSource& l : image.layers) {
      struct stat st;
      sized &=
          l.size.has_value() ||
          (l.fd >= 0 ? ::fstat(l.fd, &st) == 0 && S_ISREG(st.st_mode)
                     : l.dir_fd < 0 && ::stat(l.path.c_str(), &st) == 0 && S_ISREG(st.st_mode));
    }
    if (docker) {
      struct stat st;
      sized = docker->fd >= 0 ? ::fstat(docker->fd, &st) == 0 && S_ISREG(st.st_mode)
                              : ::stat(docker->file.c_str(), &st) == 0 && S_ISREG(st.st_mode);
    }
    if (sized && input > 0 && limits.max_compression_ratio > 0 &&
        input < UINT64_MAX / limits.max_compression_ratio / 2) {
      uint64_t bound = input * limits.max_compression_ratio +
                       std::max<size_t>(image.layers.size(), 1) * policy::kRatioGraceBytes;
      max_data = std::min(max_data, bound);
    }
    data_start = Ext4DataStart(request.ext4_options, max_data);
    ctx.data_fd = image_fd.get();
    ctx.data = sandbox::JailData{
        .mode = rootfs_out ? sandbox::DataMode::kTreeAndImage : sandbox::DataMode::kImage,
        .block_size = request.ext4_options.block_size,
        .start = data_start};
  } else if (!rootfs_out) {
    ctx.data = sandbox::JailData{.mode = sandbox::DataMode::kDiscard};
  }
  for (size_t i = 0; i < image.layers.size(); ++i) {
    const LayerSource& source = image.layers[i];
    LayerInput input{.index = i + 1, .dir_fd = source.dir_fd, .path = source.path, .fd = source.fd};
    UniqueFd taken;  // a stream made for this layer now (docker://), closed after it
    if (image.take_input) {
      auto got = image.take_input(i);
      if (!got) return Fail(std::move(got).error().WithLayer(input.index, source.display));
      taken = std::move(got->fd);
      input.fd = taken.get();
      input.hashed = got->hashed;
      input.expected_bytes = source.size.value_or(0);
    }
    if (want_ext4 && ::ftruncate(image_fd.get(), static_cast<off_t>(ctx.data.start)) != 0) {
      // The file ends where this layer's window starts: even a write that
      // got to append would land inside the window.
      return Fail(OsError(errno, "ext4 {:?}: size the image", ext4_out ? *request.ext4 : "(fd)"));
    }
    ctx.window_at_front = want_ext4 && ctx.data.start == data_start;
    auto layer = RunLayer(ctx, input, tree);
    if (layer) {
      Status verified = VerifyLayer(source, *layer);
      if (!verified) layer = Fail(std::move(verified).error());
    }
    if (!layer) {
      // A stream fed from the network that ended early: the download says why.
      if (image.feed_failure) {
        if (std::optional<Error> why = image.feed_failure(i)) layer = Fail(std::move(*why));
      }
      return Fail(std::move(layer).error().WithLayer(input.index, source.display));
    }
    log->info(
        "layer done: layer={} digest={} entries={} bytes={} setup_ms={:.2f} extract_ms={:.1f}",
        input.index, ShortDigest(layer->compressed_digest), layer->entries, layer->file_bytes,
        layer->setup_ns / 1e6, layer->extract_ns / 1e6);
    if (want_ext4) ctx.data.start = layer->data_end;
    report.layers.push_back(std::move(*layer));
  }
  report.final_entries = tree.size();
  if (!rootfs_out) work.DropTreeAsync();
  const bool true_owners = ::geteuid() == 0 && request.policy.ids.full_range();
  if (request.rootfs && true_owners) {
    if (Status s = FinishRootfsAsRoot(work.rootfs_fd(), tree); !s) {
      return Fail(std::move(s).error().With("rootfs"));
    }
  }

  // Every output is written beside its place under a temp name and renamed
  // into place only when all of them are ready; a failure removes the temps.
  const std::string ext4_name = request.ext4 ? *request.ext4 : "(fd)";
  const std::string manifest_name = request.manifest ? *request.manifest : "(fd)";
  const std::string config_name = request.config ? *request.config : "(fd)";
  if (want_ext4) {
    Ext4Options options = request.ext4_options;
    if (options.seed.empty()) {
      for (const LayerReport& l : report.layers) options.seed += l.compressed_digest;
    }
    LX_TRY(check_stop());
    auto built = BuildExt4(image_fd.get(), tree, data_start, options,
                           BuildControl{.cancel = request.cancel, .deadline_ns = deadline});
    if (!built) return Fail(std::move(built).error().With("ext4 {:?}", ext4_name));
    report.ext4 = *built;
    image_fd.reset();
  }
  if (manifest_out || request.manifest_fd >= 0) {
    LX_TRY(reserve(manifest_file, manifest_out, request.manifest_fd, "out.manifest"));
    LX_ASSIGN_OR_RETURN(UniqueFd fd, manifest_file.Create());
    Status written = WriteManifest(tree, fd.get());
    if (written && ::fsync(fd.get()) != 0) written = Fail(OsError(errno, "fsync"));
    if (!written) return Fail(std::move(written).error().With("manifest {:?}", manifest_name));
  }
  if (config_out || request.config_fd >= 0) {
    LX_TRY(reserve(config_file, config_out, request.config_fd, "out.config"));
    LX_ASSIGN_OR_RETURN(UniqueFd fd, config_file.Create());
    Status written = sandbox::WriteAll(fd.get(), std::as_bytes(std::span(image.config)));
    if (!written) return Fail(std::move(written).error().With("config {:?}", config_name));
  }
  // The last moment a stop can still leave nothing behind.
  LX_TRY(check_stop());
  if (rootfs != nullptr) LX_TRY(rootfs->Place(work));
  for (PendingOutput* file : {&ext4_file, &config_file, &manifest_file}) {
    if (Status s = file->Commit(); !s) {
      for (PendingOutput* f : {&ext4_file, &config_file, &manifest_file}) f->Revert();
      return Fail(std::move(s).error());
    }
  }
  work.Cleanup();
  // Only now, everything done, does an existing rootfs dir open up.
  if (rootfs != nullptr) LX_TRY(rootfs->OpenUp(true_owners));
  report.total_ns = sandbox::MonotonicNs() - start;
  return report;
}

// Whether every layer can be read a second time (files, not streams).
bool Rereadable(const ResolvedImage& image, const std::optional<DockerArchiveSpec>& docker) {
  struct stat st;
  if (docker) {
    int r = docker->fd >= 0 ? ::fstat(docker->fd, &st) : ::stat(docker->file.c_str(), &st);
    return r == 0 && S_ISREG(st.st_mode);
  }
  for (const LayerSource& l : image.layers) {
    if (l.fd >= 0) {
      if (::fstat(l.fd, &st) != 0 || !S_ISREG(st.st_mode)) return false;
    } else if (l.dir_fd < 0 && (::stat(l.path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))) {
      return false;
    }
  }
  return true;
}

// The scratch dir for a job that writes no rootfs: the caller's choice, or
// /dev/shm when it is a tmpfs with room for what the job puts there (below)
// and that is at most half the memory available. Making and removing
// thousands of inodes on a disk filesystem costs far more than in RAM (on a
// journal-less ext4 each create scans past recently deleted inodes), and the
// tree is thrown away once the records are merged. nullopt: beside the output.
std::optional<std::string> ChooseScratch(const ExtractRequest& request, const ResolvedImage& image,
                                         const std::optional<DockerArchiveSpec>& docker) {
  if (!request.scratch_dir.empty()) return request.scratch_dir;
  const char* candidate = "/dev/shm";
  struct statfs fs;
  if (::statfs(candidate, &fs) != 0 || fs.f_type != TMPFS_MAGIC || ::access(candidate, W_OK) != 0) {
    return std::nullopt;
  }
  // The tree holds placeholders only: names, not data. What else lands there:
  // a docker-archive, staged (about its own size); an image built for an fd
  // output (the service), about four times the input.
  uint64_t input = InputBytes(image, docker);
  uint64_t need =
      input / 4 + (docker ? input : 0) + (request.ext4_fd >= 0 ? input * 4 : 0) + 16 * policy::kMiB;
  uint64_t free_bytes = static_cast<uint64_t>(fs.f_bavail) * static_cast<uint64_t>(fs.f_bsize);
  uint64_t available = 0;
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  while (meminfo >> key >> kib) {
    if (key == "MemAvailable:") available = kib * 1024;
    meminfo.ignore(64, '\n');
  }
  if (need > free_bytes || need > available / 2) {
    Logger("broker")->debug("scratch: beside the output (need {} MiB, {} has {} MiB free)",
                            need >> 20, candidate, free_bytes >> 20);
    return std::nullopt;
  }
  Logger("broker")->debug("scratch: {} (need {} MiB of {} MiB free)", candidate, need >> 20,
                          free_bytes >> 20);
  return std::string(candidate);
}

}  // namespace

Result<JobReport> RunExtract(const ExtractRequest& request) {
  auto log = Logger("broker");
  int64_t start = sandbox::MonotonicNs();
  const bool from_fds = request.resolved != nullptr || request.docker.has_value();
  if (request.layers.empty() && !from_fds) {
    return Fail(MakeError(ErrorKind::kPolicy, "no layers given"));
  }
  const bool fd_outputs =
      request.ext4_fd >= 0 || request.manifest_fd >= 0 || request.config_fd >= 0;
  if (!request.rootfs && !request.manifest && !request.ext4 && !fd_outputs) {
    return Fail(
        MakeError(ErrorKind::kPolicy, "nothing to write: give --rootfs, --ext4 or --manifest"));
  }
  std::optional<OutputPath> rootfs_out, manifest_out, ext4_out;
  if (request.ext4) {
    LX_ASSIGN_OR_RETURN(ext4_out, SplitOutput(*request.ext4, "ext4 image"));
  }
  // Declared before the job runs and destroyed after it: an existing dir the
  // job failed in is put back once the work dir inside it is gone.
  RootfsTarget rootfs;
  if (request.rootfs) {
    LX_ASSIGN_OR_RETURN(rootfs_out, SplitOutput(*request.rootfs, "rootfs"));
    LX_TRY(rootfs.Open(*request.rootfs, *rootfs_out));
  }
  if (request.manifest) {
    LX_ASSIGN_OR_RETURN(manifest_out, SplitOutput(*request.manifest, "manifest"));
  }
  std::optional<OutputPath> config_out;
  if (request.config) {
    LX_ASSIGN_OR_RETURN(config_out, SplitOutput(*request.config, "config"));
  }
  std::optional<DockerArchiveSpec> docker =
      from_fds ? request.docker : ParseDockerArchiveSpec(request.layers);
  // docker://: the downloads run until the job is over, whichever way.
  std::unique_ptr<RegistryPull> pull;
  ResolvedImage image;
  if (request.resolved != nullptr) {
    image.layers = request.resolved->layers;
    image.manifest_digest = request.resolved->manifest_digest;
    image.config = request.resolved->config;
    image.config_digest = request.resolved->config_digest;
    image.feed_failure = request.resolved->feed_failure;
    image.take_input = request.resolved->take_input;
    if (request.config_fd >= 0 && image.config.empty()) {
      return Fail(MakeError(ErrorKind::kPolicy, "a config was asked for, and the source has none"));
    }
  } else if (docker && docker->fd >= 0) {
    // An open fd: the service checked what it took; one the caller passed
    // by name ("/dev/fd/N") is checked here.
    if (!from_fds) {
      if (Status s = CheckPassedFd(docker->fd, docker->file); !s) {
        return Fail(std::move(s).error().With("docker-archive"));
      }
    }
  } else if (docker) {
    // Opened the way the job will open it (no open that can block, a regular
    // file only), so that a fifo or a device is refused now, before any work.
    if (auto fd = sandbox::OpenRegularFile(AT_FDCWD, docker->file, 0); !fd) {
      return Fail(std::move(fd).error().With("docker-archive"));
    }
  } else if (IsRegistrySource(request.layers)) {
    PullOptions options = request.pull;
    options.cancel = request.cancel;
    // No request outlives the job's clock (a manifest dripped a byte a second).
    options.total_timeout_ms = static_cast<long>(request.policy.limits.job_timeout_ms);
    LX_ASSIGN_OR_RETURN(pull, RegistryPull::Start(request.layers[0], request.platform, options));
    image.layers = pull->image().layers;
    image.manifest_digest = pull->image().manifest_digest;
    image.config = pull->image().config;
    image.config_digest = pull->image().config_digest;
    image.feed_failure = [p = pull.get()](size_t i) { return p->Failure(i); };
    image.take_input = [p = pull.get()](size_t i) { return p->HashedInput(i); };
  } else {
    LX_ASSIGN_OR_RETURN(image, ResolveSources(request.layers, request.platform));
    // Every blob found by name, plain or in the layout, is opened now the way
    // the layer will open it: a fifo, a device or a missing blob is refused
    // before any work, not after the layers below it (passed descriptors were
    // checked by ResolveSources).
    for (size_t i = 0; i < image.layers.size(); ++i) {
      const LayerSource& layer = image.layers[i];
      if (layer.fd >= 0) continue;
      auto fd = layer.dir_fd >= 0
                    ? sandbox::OpenRegularFile(layer.dir_fd, layer.path,
                                               RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
                    : sandbox::OpenRegularFile(AT_FDCWD, layer.path, 0);
      if (!fd) return Fail(std::move(fd).error().WithLayer(i + 1, layer.display));
    }
    if (config_out && image.config.empty()) {
      return Fail(MakeError(ErrorKind::kPolicy,
                            "--config needs an image source (oci: or docker-archive:)"));
    }
  }

  LX_ASSIGN_OR_RETURN(UniqueFd extractor_fd, OpenExtractor(request.extractor_path));

  // The work tree goes beside the rootfs (renamed into place at the end), or,
  // when only an image or a manifest is wanted, where it is cheapest to make
  // and remove (ChooseScratch); a tmpfs that fills up is retried on disk once.
  const std::string beside = rootfs_out                     ? rootfs_out->dir
                             : ext4_out                     ? ext4_out->dir
                             : manifest_out                 ? manifest_out->dir
                             : !request.scratch_dir.empty() ? request.scratch_dir
                                                            : "/var/tmp";
  std::optional<std::string> scratch;
  if (!rootfs_out) scratch = ChooseScratch(request, image, docker);
  if (::geteuid() == 0) {
    SharedDirNotes notes;
    if (rootfs_out) {
      notes.Note(rootfs.written_dir_fd(), rootfs.existing() ? *request.rootfs : rootfs_out->dir,
                 rootfs.existing() ? "rootfs dir" : "output dir");
    }
    for (const auto* out : {&ext4_out, &manifest_out, &config_out}) {
      if (*out) notes.Note((*out)->dir, "output dir");
    }
    if (scratch) notes.Note(*scratch, "scratch dir");
    if (!rootfs_out) notes.Note(beside, "scratch dir");
  }
  RootfsTarget* rootfs_target = rootfs_out ? &rootfs : nullptr;
  if (scratch) {
    auto report = RunJobIn(*scratch, request, image, docker, start, extractor_fd.get(), rootfs_out,
                           rootfs_target, manifest_out, ext4_out, config_out);
    if (report || report.error().err() != ENOSPC || !request.scratch_dir.empty() ||
        !Rereadable(image, docker)) {
      return report;
    }
    log->warn("scratch: {} is full; extracting again beside the output", *scratch);
  }
  return RunJobIn(beside, request, image, docker, start, extractor_fd.get(), rootfs_out,
                  rootfs_target, manifest_out, ext4_out, config_out);
}

}  // namespace layerx::broker
