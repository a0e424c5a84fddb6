#include "extractor/applier.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <deque>

#include "extractor/entry_rules.h"
#include "sandbox/sys.h"

namespace layerx::extractor {

using sandbox::UniqueFd;

namespace {

struct timespec ToTimespec(int64_t ns) {
  struct timespec ts;
  ts.tv_sec = ns / 1'000'000'000;
  ts.tv_nsec = ns % 1'000'000'000;
  if (ts.tv_nsec < 0) {
    ts.tv_nsec += 1'000'000'000;
    ts.tv_sec -= 1;
  }
  return ts;
}

void AppendVarint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

Error Os(int err, std::string_view what) { return Error(ErrorKind::kOs, err, std::string(what)); }

std::vector<std::string> SplitTarget(const std::string& target) {
  std::vector<std::string> parts;
  size_t pos = 0;
  while (pos <= target.size()) {
    size_t slash = target.find('/', pos);
    if (slash == std::string::npos) slash = target.size();
    if (slash > pos) parts.push_back(target.substr(pos, slash - pos));
    pos = slash + 1;
  }
  return parts;
}

}  // namespace

std::string RootlessOwnerXattr(uint32_t uid, uint32_t gid) {
  // Two proto3 varint fields; a zero field is omitted, as protobuf does.
  std::string out;
  if (uid != 0) {
    out.push_back(0x08);
    AppendVarint(out, uid);
  }
  if (gid != 0) {
    out.push_back(0x10);
    AppendVarint(out, gid);
  }
  return out;
}

Applier::Applier(int root_fd, const policy::Limits& limits, ApplyOptions options, RecordSink& sink,
                 std::function<void(std::string_view)> warn)
    : root_fd_(root_fd), limits_(limits), options_(options), sink_(sink), warn_(std::move(warn)) {}

std::string Applier::JoinPath(const std::string& dir, const std::string& leaf) {
  return dir.empty() ? leaf : dir + "/" + leaf;
}

void Applier::Invalidate() {
  cache_valid_ = false;
  cache_fd_.reset();
}

void Applier::Touch(const std::string& path) {
  std::string p = path;
  while (touched_.insert(p).second && !p.empty()) {
    size_t slash = p.rfind('/');
    p = slash == std::string::npos ? std::string() : p.substr(0, slash);
  }
}

int Applier::WithWritable(const Dir& dir, const std::function<int()>& op) {
  int rc = op();
  if (rc >= 0 || errno != EACCES || options_.chown) return rc;
  if (!OpenUp(dir)) {
    errno = EACCES;
    return -1;
  }
  return op();
}

// Rootless: we own every inode but have no DAC override, and the image's modes
// are on disk (a 0555 dir a later layer writes into, a 0000 dir). Such a dir is
// opened to its owner until Finish(), which puts its mode and mtime back.
bool Applier::OpenUp(const Dir& dir) {
  struct stat st;
  if (::fstat(dir.fd, &st) != 0 || (st.st_mode & 0700) == 0700) return false;
  if (!fixups_.contains(dir.path)) {
    fixups_[dir.path] =
        Fixup{st.st_mode & 07777u, int64_t{st.st_mtim.tv_sec} * 1'000'000'000 + st.st_mtim.tv_nsec};
  }
  return static_cast<bool>(sandbox::FchmodAtNoFollow(root_fd_, dir.path.empty() ? "." : dir.path,
                                                     (st.st_mode & 07777) | 0700));
}

// Walks `dir` below the root the way the kernel would inside the jail: each
// component is looked up without following; a symlink's target is spliced in
// (absolute targets restart at the root, ".." never climbs above it), so the
// result is the canonical path with no symlink in it.
Result<Applier::Dir> Applier::ResolveDir(const EntryName& dir, bool create, int64_t mtime_ns) {
  std::string key = dir.Join();
  if (cache_valid_ && cache_key_ == key) return Dir{cache_path_, cache_fd_.get()};

  std::deque<std::string> queue(dir.components().begin(), dir.components().end());
  std::vector<std::string> stack;
  UniqueFd cur;  // invalid: the root
  auto cur_fd = [&] { return cur.valid() ? cur.get() : root_fd_; };
  auto joined = [&] {
    std::string p;
    for (const std::string& c : stack) p = JoinPath(p, c);
    return p;
  };
  uint64_t hops = 0;
  while (!queue.empty()) {
    std::string c = std::move(queue.front());
    queue.pop_front();
    if (c.empty() || c == ".") continue;
    if (c == "..") {
      if (stack.empty()) continue;  // clamped at the root
      stack.pop_back();
      if (stack.empty()) {
        cur.reset();
      } else {
        LX_ASSIGN_OR_RETURN(
            cur, sandbox::OpenAt2(root_fd_, joined(), O_PATH | O_DIRECTORY,
                                  RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS));
      }
      continue;
    }
    if (stack.size() >= limits_.max_path_depth) {
      return Fail(MakeError(ErrorKind::kLimitExceeded,
                            "resolved path deeper than max_path_depth={}", limits_.max_path_depth));
    }
    struct stat st;
    Dir here{joined(), cur_fd()};
    if (WithWritable(
            here, [&] { return ::fstatat(cur_fd(), c.c_str(), &st, AT_SYMLINK_NOFOLLOW); }) != 0) {
      if (errno != ENOENT) return Fail(Os(errno, fmt::format("fstatat {:?}", c)));
      if (!create) return Fail(Error(ErrorKind::kOs, ENOENT, "no such directory"));
      // A missing parent is made the way Docker does: root-owned 0755.
      Dir parent{joined(), cur_fd()};
      if (WithWritable(parent, [&] { return ::mkdirat(cur_fd(), c.c_str(), 0700); }) != 0) {
        return Fail(Os(errno, fmt::format("mkdirat {:?}", c)));
      }
      std::string path = JoinPath(parent.path, c);
      Touch(path);
      fixups_[path] = Fixup{0755, mtime_ns};
      LX_TRY(sink_.Add(
          EntryRecord{.path = path, .kind = Kind::kDir, .mode = 0755, .mtime_ns = mtime_ns}));
      st.st_mode = S_IFDIR | 0700;
    }
    if (S_ISLNK(st.st_mode)) {
      if (++hops > limits_.max_symlink_hops) {
        return Fail(Error(ErrorKind::kInvalidInput, ELOOP, "too many levels of symbolic links"));
      }
      std::string target(4096, '\0');
      ssize_t n = ::readlinkat(cur_fd(), c.c_str(), target.data(), target.size());
      if (n < 0) return Fail(Os(errno, fmt::format("readlinkat {:?}", c)));
      target.resize(static_cast<size_t>(n));
      std::vector<std::string> parts = SplitTarget(target);
      queue.insert(queue.begin(), parts.begin(), parts.end());
      if (!target.empty() && target[0] == '/') {
        stack.clear();
        cur.reset();
      }
      continue;
    }
    if (!S_ISDIR(st.st_mode)) {
      return Fail(Error(ErrorKind::kInvalidInput, ENOTDIR,
                        fmt::format("parent {:?} is not a directory", JoinPath(joined(), c))));
    }
    int fd = WithWritable(here, [&] {
      return ::openat(cur_fd(), c.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    });
    if (fd < 0) return Fail(Os(errno, fmt::format("openat {:?}", c)));
    cur.reset(fd);
    stack.push_back(std::move(c));
  }
  if (!cur.valid()) {
    LX_ASSIGN_OR_RETURN(cur, sandbox::OpenAt(root_fd_, ".", O_PATH | O_DIRECTORY));
  }
  cache_key_ = std::move(key);
  cache_path_ = joined();
  cache_fd_ = std::move(cur);
  cache_valid_ = true;
  return Dir{cache_path_, cache_fd_.get()};
}

Result<std::optional<Applier::Dir>> Applier::ResolveExistingDir(const EntryName& dir) {
  auto resolved = ResolveDir(dir, /*create=*/false, 0);
  if (resolved) return std::optional<Dir>(*resolved);
  const Error& err = resolved.error();
  // Nothing there (or something that is no dir): a whiteout has nothing to hide.
  if (err.kind() == ErrorKind::kOs && err.err() == ENOENT) return std::optional<Dir>();
  if (err.err() == ENOTDIR) return std::optional<Dir>();
  return Fail(err);
}

// Removes `name` in `dir` and everything below it, never following a link.
Status Applier::RemoveTree(const Dir& dir, const std::string& name) {
  Status removed;
  if (WithWritable(dir, [&] {
        removed = sandbox::RemoveTreeAt(dir.fd, name);
        if (!removed) errno = removed.error().err();
        return removed ? 0 : -1;
      }) != 0) {
    return Fail(removed.error());
  }
  // A cached chain may have run through what went away; only now, after the
  // last use of `dir`, which may be the cache's own.
  Invalidate();
  return {};
}

Status Applier::RemoveExisting(const Dir& dir, const std::string& leaf, const struct stat& st) {
  std::string path = JoinPath(dir.path, leaf);
  if (S_ISDIR(st.st_mode)) {
    LX_TRY(RemoveTree(dir, leaf));
    return sink_.Add(RemovalRecord{.path = path});
  }
  if (WithWritable(dir, [&] { return ::unlinkat(dir.fd, leaf.c_str(), 0); }) != 0) {
    return Fail(Os(errno, fmt::format("unlinkat {:?}", leaf)));
  }
  Invalidate();  // `dir` may be the cache's: only now
  return {};
}

Status Applier::RemoveLower(const Dir& dir, const std::string& name) {
  std::string path = JoinPath(dir.path, name);
  struct stat st;
  if (WithWritable(
          dir, [&] { return ::fstatat(dir.fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW); }) != 0) {
    if (errno != ENOENT) return Fail(Os(errno, fmt::format("fstatat {:?}", name)));
    // Nothing on disk, yet a lower layer's device node may stand there: it
    // lives in the metadata only (the jail cannot mknod). The broker drops it.
    if (touched_.contains(path)) return {};
    return sink_.Add(RemovalRecord{.path = path});
  }
  if (!touched_.contains(path)) {
    LX_TRY(RemoveTree(dir, name));
    return sink_.Add(RemovalRecord{.path = path});
  }
  // This layer made it (or something below it): keep that, hide the rest.
  if (!S_ISDIR(st.st_mode)) return {};
  LX_ASSIGN_OR_RETURN(UniqueFd child,
                      sandbox::OpenAt(dir.fd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW));
  return HideLower(Dir{path, child.get()});
}

Status Applier::HideLower(const Dir& dir) {
  LX_TRY(RemoveLowerBelow(dir));
  // One record for the whole directory rather than one per name removed: a
  // lower layer's device node below `dir` is on no disk, so no listing here
  // finds it; the broker applies the same rule to its tree, where it is.
  return sink_.Add(RemovalRecord{.path = dir.path, .opaque_dir = true});
}

Status Applier::RemoveLowerBelow(const Dir& dir) {
  LX_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDir(dir));
  for (const std::string& n : names) {
    std::string path = JoinPath(dir.path, n);
    if (!touched_.contains(path)) {
      LX_TRY(RemoveTree(dir, n));
      continue;
    }
    struct stat st;
    auto stat_child = [&] { return ::fstatat(dir.fd, n.c_str(), &st, AT_SYMLINK_NOFOLLOW); };
    if (WithWritable(dir, stat_child) != 0) return Fail(Os(errno, fmt::format("fstatat {:?}", n)));
    if (!S_ISDIR(st.st_mode)) continue;
    LX_ASSIGN_OR_RETURN(UniqueFd child,
                        sandbox::OpenAt(dir.fd, n, O_PATH | O_DIRECTORY | O_NOFOLLOW));
    LX_TRY(RemoveLowerBelow(Dir{path, child.get()}));
  }
  return {};
}

Result<std::vector<std::string>> Applier::ListDir(const Dir& dir) {
  int fd =
      WithWritable(dir, [&] { return ::openat(dir.fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC); });
  if (fd < 0) return Fail(Os(errno, fmt::format("open dir {:?}", dir.path)));
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) {
    ::close(fd);
    return Fail(Os(errno, "fdopendir"));
  }
  std::vector<std::string> names;
  while (struct dirent* ent = ::readdir(d)) {
    std::string n = ent->d_name;
    if (n != "." && n != "..") names.push_back(std::move(n));
  }
  ::closedir(d);
  return names;
}

Status Applier::Whiteout(const EntryName& dir_name, const std::string& victim) {
  if (victim.empty() || victim == "." || victim == "..") {
    return Fail(MakeError(ErrorKind::kSafetyViolation, "whiteout of {:?}", victim));
  }
  LX_ASSIGN_OR_RETURN(std::optional<Dir> dir, ResolveExistingDir(dir_name));
  if (!dir) return {};
  Dir copy = *dir;
  return RemoveLower(copy, victim);
}

Status Applier::Opaque(const EntryName& dir_name) {
  // A marker at the top of the layer (`.wh..wh..opq` in the root) names the
  // root: everything of the lower layers is hidden.
  LX_ASSIGN_OR_RETURN(std::optional<Dir> dir, ResolveExistingDir(dir_name));
  if (!dir) return {};
  // Hold our own fd: removals below invalidate the resolver's cache.
  LX_ASSIGN_OR_RETURN(UniqueFd fd, sandbox::OpenAt(dir->fd, ".", O_PATH | O_DIRECTORY));
  return HideLower(Dir{dir->path, fd.get()});
}

EntryRecord Applier::MakeRecord(const TarEntry& e, std::string path) const {
  EntryRecord r{.path = std::move(path),
                .kind = e.kind,
                .uid = e.uid,
                .gid = e.gid,
                .mode = e.mode,
                .mtime_ns = e.mtime_ns};
  if (e.kind == Kind::kFile) r.size = e.size;
  if (e.kind == Kind::kSymlink) r.symlink_target = e.untrusted_link_target;
  if (e.kind == Kind::kChar || e.kind == Kind::kBlock) {
    r.rdev_major = e.rdev_major;
    r.rdev_minor = e.rdev_minor;
  }
  r.xattrs = e.xattrs;  // as Admit() left them
  return r;
}

Status Applier::SetXattrs(int fd, const TarEntry& e) {
  for (const auto& [name, value] : e.xattrs) {
    // On disk only the user namespace: security.capability, ACLs and the rest
    // need capabilities the jail does not have; they live in the metadata and
    // the ext4 image.
    if (name.rfind("user.", 0) != 0 || name == kRootlessXattr) continue;
    if (::fsetxattr(fd, name.c_str(), value.data(), value.size(), 0) != 0) {
      if (errno == ENOTSUP || errno == EPERM) continue;
      return Fail(Os(errno, fmt::format("fsetxattr {:?}", name)));
    }
  }
  if (!options_.chown && (e.uid != 0 || e.gid != 0)) {
    std::string value = RootlessOwnerXattr(e.uid, e.gid);
    if (::fsetxattr(fd, kRootlessXattr, value.data(), value.size(), 0) != 0 && errno != ENOTSUP) {
      return Fail(Os(errno, "fsetxattr user.rootlesscontainers"));
    }
  }
  return {};
}

namespace {

// pwrite(2) of all of `b` at `offset`; EFBIG (RLIMIT_FSIZE) is the limit it is.
Status PwriteAll(int fd, std::span<const std::byte> b, uint64_t offset) {
  while (!b.empty()) {
    ssize_t n = ::pwrite(fd, b.data(), b.size(), static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EFBIG) {
        return Fail(Error(ErrorKind::kLimitExceeded, EFBIG, "file over rlimit file_size"));
      }
      return Fail(Error(ErrorKind::kOs, errno, "write file data"));
    }
    b = b.subspan(static_cast<size_t>(n));
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// copy_file_range(2) of `length` bytes, in the kernel: false when this pair of
// files cannot (another filesystem: EXDEV; a kernel or filesystem without it)
// and nothing was copied, so the caller reads the bytes instead.
Result<bool> CopyAll(int in_fd, uint64_t in_offset, int out_fd, uint64_t out_offset,
                     uint64_t length) {
  auto in = static_cast<loff_t>(in_offset), out = static_cast<loff_t>(out_offset);
  bool copied = false;
  while (length > 0) {
    ssize_t n = ::copy_file_range(in_fd, &in, out_fd, &out, length, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (!copied && (errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP ||
                      errno == ENOSYS || errno == EPERM)) {
        return false;
      }
      if (errno == EFBIG) {
        return Fail(Error(ErrorKind::kLimitExceeded, EFBIG, "file over rlimit file_size"));
      }
      return Fail(Error(ErrorKind::kOs, errno, "copy file data"));
    }
    if (n == 0) {
      return Fail(MakeError(ErrorKind::kInvalidInput, "layer ends inside the file's data"));
    }
    copied = true;
    length -= static_cast<uint64_t>(n);
  }
  return true;
}

}  // namespace

Result<uint64_t> Applier::WriteFile(int fd, const TarEntry& e, const DataFeed& data,
                                    std::vector<DataExtent>* extents) {
  if (file_bytes_ + e.size > limits_.max_layer_bytes) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "layer data over max_layer_bytes={}",
                          limits_.max_layer_bytes));
  }
  const sandbox::DataMode mode = options_.data.mode;
  const bool to_tree = mode == sandbox::DataMode::kTree || mode == sandbox::DataMode::kTreeAndImage;
  const bool to_image =
      mode == sandbox::DataMode::kImage || mode == sandbox::DataMode::kTreeAndImage;
  const uint64_t bs = options_.data.block_size;
  if (to_image && data_pos_ < options_.data.start) data_pos_ = options_.data.start;
  uint64_t next = 0;  // the file's data arrives in ascending order
  auto check = [&](uint64_t at, uint64_t length) -> Status {
    if (at + length > e.size || at + length < at) {
      return Fail(MakeError(ErrorKind::kInvalidInput, "file data beyond its size"));
    }
    if (at < next) return Fail(MakeError(ErrorKind::kInvalidInput, "file data out of order"));
    return {};
  };
  // Where the file's bytes from `at` go in the data fd: the same run while
  // they start in its last block or the next one (the bytes between are
  // zeros: the data fd is fresh past data_pos_); past a hole of whole blocks,
  // a new run at the next free block.
  auto place = [&](uint64_t at) -> uint64_t {
    const DataExtent* run = extents->empty() ? nullptr : &extents->back();
    if (run == nullptr || at / bs > RoundUp(run->logical + run->length, bs) / bs) {
      return data_pos_ + at % bs;
    }
    return run->physical + (at - run->logical);
  };
  auto placed = [&](uint64_t at, uint64_t length) {
    DataExtent* run = extents->empty() ? nullptr : &extents->back();
    if (run == nullptr || at / bs > RoundUp(run->logical + run->length, bs) / bs) {
      extents->push_back(DataExtent{.logical = at / bs * bs, .physical = data_pos_});
      run = &extents->back();
    }
    run->length = at + length - run->logical;
    data_pos_ = RoundUp(run->physical + run->length, bs);
    next = at + length;
  };
  DataSink sink;
  sink.bytes = [&](int64_t offset, std::span<const std::byte> b) -> Status {
    if (offset < 0) return Fail(MakeError(ErrorKind::kInvalidInput, "file data beyond its size"));
    const auto at = static_cast<uint64_t>(offset);
    LX_TRY(check(at, b.size()));
    if (b.empty()) return {};
    if (to_tree) LX_TRY(PwriteAll(fd, b, at));
    if (!to_image) {
      next = at + b.size();
      return {};
    }
    LX_TRY(WriteData(b, place(at)));
    placed(at, b.size());
    return {};
  };
  // Only the image wants the bytes, and the jail may copy into it.
  if (mode == sandbox::DataMode::kImage && options_.data.copy_input != 0) {
    sink.copy = [&](uint64_t at, uint64_t length, int in_fd, uint64_t in_offset) -> Result<bool> {
      LX_TRY(check(at, length));
      if (length == 0) return true;
      LX_ASSIGN_OR_RETURN(bool copied,
                          CopyAll(in_fd, in_offset, options_.data_fd, place(at), length));
      if (copied) placed(at, length);
      return copied;
    };
  }
  LX_ASSIGN_OR_RETURN(uint64_t written, data(sink));
  file_bytes_ += written;
  // Sparse files end in a hole, placeholders are all hole: ftruncate gives the
  // file its full size.
  if (::ftruncate(fd, static_cast<off_t>(e.size)) != 0) {
    if (errno == EFBIG) return Fail(Error(ErrorKind::kLimitExceeded, EFBIG, "file over rlimit"));
    return Fail(Os(errno, "ftruncate"));
  }
  return written;
}

Status Applier::WriteData(std::span<const std::byte> b, uint64_t offset) {
  constexpr size_t kGather = 1 << 20;  // written out when this full
  const uint64_t end = gathered_at_ + gathered_.size();
  const bool follows = !gathered_.empty() && offset >= end &&
                       offset - end < options_.data.block_size;
  if (!follows || gathered_.size() + (offset - end) + b.size() > kGather) {
    LX_TRY(FlushData());
    if (b.size() >= kGather / 4) return PwriteAll(options_.data_fd, b, offset);  // big: as it is
    gathered_at_ = offset;
  }
  gathered_.resize(static_cast<size_t>(offset - gathered_at_), std::byte{0});
  gathered_.insert(gathered_.end(), b.begin(), b.end());
  return {};
}

Status Applier::FlushData() {
  if (gathered_.empty()) return {};
  Status written = PwriteAll(options_.data_fd, gathered_, gathered_at_);
  gathered_.clear();
  return written;
}

Status Applier::ApplyRoot(const TarEntry& e) {
  // The root is and stays a directory: "./" only updates its metadata.
  if (e.kind != Kind::kDir) {
    if (warn_) warn_(fmt::format("ignored: root entry of kind {}", KindName(e.kind)));
    return {};
  }
  if (options_.chown && ::fchownat(root_fd_, ".", e.uid, e.gid, AT_SYMLINK_NOFOLLOW) != 0) {
    return Fail(Os(errno, "chown root"));
  }
  Touch("");
  fixups_[""] = Fixup{e.mode, e.mtime_ns};
  return sink_.Add(MakeRecord(e, ""));
}

Status Applier::ApplyHardlink(const TarEntry& e, const EntryName& name, bool final_attempt,
                              bool* deferred) {
  *deferred = false;
  LX_ASSIGN_OR_RETURN(EntryName target, EntryName::Parse(e.untrusted_link_target, limits_));
  if (target.is_root()) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "hardlink to the root directory"));
  }
  auto missing = [&]() -> Status {
    if (!final_attempt) {
      *deferred = true;
      return {};
    }
    return Fail(MakeError(ErrorKind::kInvalidInput, "hardlink target {:?} not found",
                          e.untrusted_link_target));
  };
  LX_ASSIGN_OR_RETURN(std::optional<Dir> tdir, ResolveExistingDir(target.Parent()));
  if (!tdir) return missing();
  // Our own fd: resolving the link's parent reuses the resolver's cache.
  LX_ASSIGN_OR_RETURN(UniqueFd tfd, sandbox::OpenAt(tdir->fd, ".", O_PATH | O_DIRECTORY));
  std::string tpath = JoinPath(tdir->path, target.leaf());
  struct stat tst;
  Dir tdir_own{tdir->path, tfd.get()};
  // The target is on no disk at the end of the layer, yet its directory is:
  // a device node (a lower layer's, or this layer's) may stand there, which
  // lives in the metadata only (the jail cannot mknod) and which only the
  // broker knows. The link is recorded without a linkat, and the broker
  // judges: "not found" when its tree has no such non-directory either.
  bool metadata_only = false;
  if (WithWritable(tdir_own, [&] {
        return ::fstatat(tfd.get(), target.leaf().c_str(), &tst, AT_SYMLINK_NOFOLLOW);
      }) != 0) {
    if (errno != ENOENT) return Fail(Os(errno, "fstatat hardlink target"));
    if (!final_attempt) return missing();  // it may still come in this layer
    metadata_only = true;
  } else if (S_ISDIR(tst.st_mode)) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "hardlink to a directory {:?}", tpath));
  }
  LX_ASSIGN_OR_RETURN(Dir dir, ResolveDir(name.Parent(), true, e.mtime_ns));
  std::string path = JoinPath(dir.path, name.leaf());
  EntryRecord r = MakeRecord(e, path);
  r.hardlink_target = tpath;
  if (path == tpath) {
    // A link to itself changes nothing; to a name on no disk, the broker
    // still says whether there is such a name at all.
    return metadata_only ? sink_.Add(std::move(r)) : Status{};
  }
  struct stat st;
  if (WithWritable(dir, [&] {
        return ::fstatat(dir.fd, name.leaf().c_str(), &st, AT_SYMLINK_NOFOLLOW);
      }) == 0) {
    LX_TRY(RemoveExisting(dir, name.leaf(), st));
    LX_ASSIGN_OR_RETURN(dir, ResolveDir(name.Parent(), true, e.mtime_ns));
  }
  // linkat without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
  auto link = [&] {
    return ::linkat(tfd.get(), target.leaf().c_str(), dir.fd, name.leaf().c_str(), 0);
  };
  if (!metadata_only && WithWritable(dir, link) != 0) {
    return Fail(Os(errno, fmt::format("linkat {:?}", tpath)));
  }
  Touch(path);
  return sink_.Add(std::move(r));
}

Result<std::optional<TarEntry>> Applier::Admit(const TarEntry& e) const {
  TarEntry out = e;
  LX_ASSIGN_OR_RETURN(bool admitted, ApplyEntryRules(options_.rules, out));
  if (!admitted) return std::optional<TarEntry>();
  return std::optional<TarEntry>(std::move(out));
}

Status Applier::Apply(const TarEntry& untrusted, const DataFeed& data) {
  LX_ASSIGN_OR_RETURN(EntryName name, EntryName::Parse(untrusted.untrusted_name, limits_));
  if (!name.is_root() && name.leaf().starts_with(".wh.")) {
    const std::string& leaf = name.leaf();
    if (leaf == ".wh..wh..opq") return Opaque(name.Parent());
    if (leaf.starts_with(".wh..wh.")) return {};  // aufs bookkeeping (.wh..wh.plnk)
    return Whiteout(name.Parent(), leaf.substr(4));
  }
  LX_ASSIGN_OR_RETURN(std::optional<TarEntry> admitted, Admit(untrusted));
  if (!admitted) return {};  // left out by the policy
  const TarEntry& e = *admitted;
  if (name.is_root()) return ApplyRoot(e);
  const std::string& leaf = name.leaf();
  if (e.kind == Kind::kHardlink) {
    bool deferred = false;
    LX_TRY(ApplyHardlink(e, name, /*final_attempt=*/false, &deferred));
    if (deferred) pending_links_.push_back(PendingLink{e, name});
    return {};
  }

  LX_ASSIGN_OR_RETURN(Dir dir, ResolveDir(name.Parent(), true, e.mtime_ns));
  std::string path = JoinPath(dir.path, leaf);
  const char* cleaf = leaf.c_str();
  // A file is created at once (O_EXCL|O_NOFOLLOW: nothing is followed or
  // overwritten); only when the name is taken does the slow path look at
  // what stands there and replace it. Most names of a layer are new.
  int early_fd = -1;
  if (e.kind == Kind::kFile) {
    early_fd = WithWritable(dir, [&] {
      return ::openat(dir.fd, cleaf, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    });
    if (early_fd < 0 && errno != EEXIST) return Fail(Os(errno, fmt::format("create {:?}", leaf)));
  }
  UniqueFd early(early_fd);
  bool merge = false;
  if (early_fd < 0) {
    struct stat st;
    bool exists = WithWritable(dir, [&] {
                    return ::fstatat(dir.fd, leaf.c_str(), &st, AT_SYMLINK_NOFOLLOW);
                  }) == 0;
    if (!exists && errno != ENOENT) return Fail(Os(errno, fmt::format("fstatat {:?}", leaf)));
    merge = exists && S_ISDIR(st.st_mode) && e.kind == Kind::kDir;
    if (exists && !merge) {
      LX_TRY(RemoveExisting(dir, leaf, st));
      LX_ASSIGN_OR_RETURN(dir, ResolveDir(name.Parent(), true, e.mtime_ns));
    }
  }
  uint64_t data_bytes = 0;
  std::vector<DataExtent> extents;
  struct timespec times[2] = {ToTimespec(e.mtime_ns), ToTimespec(e.mtime_ns)};

  switch (e.kind) {
    case Kind::kFile: {
      UniqueFd file = std::move(early);
      if (!file.valid()) {
        int fd = WithWritable(dir, [&] {
          return ::openat(dir.fd, cleaf, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                          0600);
        });
        if (fd < 0) return Fail(Os(errno, fmt::format("create {:?}", leaf)));
        file = UniqueFd(fd);
      }
      Touch(path);
      LX_ASSIGN_OR_RETURN(data_bytes, WriteFile(file.get(), e, data, &extents));
      // A placeholder stands only for the file's name and identity (later
      // layers replace, white out and link it): its owner, mode, xattrs and
      // times live in the record, and nothing reads them on disk.
      if (options_.data.mode == sandbox::DataMode::kImage ||
          options_.data.mode == sandbox::DataMode::kDiscard) {
        break;
      }
      if (options_.chown && ::fchown(file.get(), e.uid, e.gid) != 0) {
        return Fail(Os(errno, "fchown"));
      }
      // After chown, which clears setuid/setgid.
      LX_TRY(sandbox::Fchmod(file.get(), e.mode));
      LX_TRY(SetXattrs(file.get(), e));
      if (::futimens(file.get(), times) != 0) return Fail(Os(errno, "futimens"));
      break;
    }
    case Kind::kDir: {
      if (!merge && WithWritable(dir, [&] { return ::mkdirat(dir.fd, cleaf, 0700); }) != 0) {
        return Fail(Os(errno, fmt::format("mkdirat {:?}", leaf)));
      }
      // Owner-writable until Finish(): this layer may still write into it.
      if (merge) LX_TRY(sandbox::FchmodAtNoFollow(dir.fd, leaf, 0700));
      LX_ASSIGN_OR_RETURN(UniqueFd d,
                          sandbox::OpenAt(dir.fd, leaf, O_RDONLY | O_DIRECTORY | O_NOFOLLOW));
      Touch(path);
      if (options_.chown && ::fchown(d.get(), e.uid, e.gid) != 0) return Fail(Os(errno, "fchown"));
      if (merge && !options_.chown) (void)::fremovexattr(d.get(), kRootlessXattr);
      LX_TRY(SetXattrs(d.get(), e));
      fixups_[path] = Fixup{e.mode, e.mtime_ns};
      break;
    }
    case Kind::kSymlink: {
      if (WithWritable(dir, [&] {
            return ::symlinkat(e.untrusted_link_target.c_str(), dir.fd, cleaf);
          }) != 0) {
        return Fail(Os(errno, fmt::format("symlinkat {:?}", leaf)));
      }
      Touch(path);
      if (options_.chown && ::fchownat(dir.fd, cleaf, e.uid, e.gid, AT_SYMLINK_NOFOLLOW) != 0) {
        return Fail(Os(errno, "fchownat symlink"));
      }
      if (::utimensat(dir.fd, cleaf, times, AT_SYMLINK_NOFOLLOW) != 0) {
        return Fail(Os(errno, "utimensat symlink"));
      }
      break;
    }
    case Kind::kFifo: {
      if (WithWritable(dir, [&] { return ::mknodat(dir.fd, cleaf, S_IFIFO | 0600, 0); }) != 0) {
        return Fail(Os(errno, fmt::format("mkfifo {:?}", leaf)));
      }
      Touch(path);
      if (options_.chown && ::fchownat(dir.fd, cleaf, e.uid, e.gid, AT_SYMLINK_NOFOLLOW) != 0) {
        return Fail(Os(errno, "fchownat fifo"));
      }
      LX_TRY(sandbox::FchmodAtNoFollow(dir.fd, leaf, e.mode));
      if (::utimensat(dir.fd, cleaf, times, AT_SYMLINK_NOFOLLOW) != 0) {
        return Fail(Os(errno, "utimensat fifo"));
      }
      break;
    }
    case Kind::kChar:
    case Kind::kBlock:
      // A user namespace cannot mknod a device: it lives in the metadata (and
      // the ext4 image) only. Whatever stood at its name is gone.
      Touch(path);
      break;
    case Kind::kHardlink:
      LX_CHECK(false);
  }
  EntryRecord record = MakeRecord(e, path);
  record.data_bytes = data_bytes;
  record.extents = std::move(extents);
  return sink_.Add(std::move(record));
}

Status Applier::Finish() {
  LX_TRY(FlushData());  // the broker looks at the image's size once the layer is done
  std::vector<PendingLink> pending = std::move(pending_links_);
  pending_links_.clear();
  for (const PendingLink& link : pending) {
    bool deferred = false;
    Status status = ApplyHardlink(link.entry, link.name, /*final_attempt=*/true, &deferred);
    if (!status) {
      // Named by the caller, like any entry (structured, escaped and cut).
      failed_entry_ = link.entry.untrusted_name;
      return status;
    }
  }
  std::vector<std::pair<std::string, Fixup>> fixups(fixups_.begin(), fixups_.end());
  fixups_.clear();
  auto depth = [](const std::string& p) {
    return p.empty() ? 0 : 1 + std::count(p.begin(), p.end(), '/');
  };
  std::sort(fixups.begin(), fixups.end(),
            [&](const auto& a, const auto& b) { return depth(a.first) > depth(b.first); });
  for (const auto& [path, fixup] : fixups) {
    std::string p = path.empty() ? "." : path;
    // Still a directory at a symlink-free path? (A later entry may have replaced it.)
    auto fd = sandbox::OpenAt2(root_fd_, p, O_PATH | O_DIRECTORY | O_NOFOLLOW,
                               RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS);
    if (!fd) continue;
    LX_TRY(sandbox::FchmodAtNoFollow(root_fd_, p, fixup.mode));
    struct timespec times[2] = {ToTimespec(fixup.mtime_ns), ToTimespec(fixup.mtime_ns)};
    if (::utimensat(root_fd_, p.c_str(), times, AT_SYMLINK_NOFOLLOW) != 0) {
      return Fail(Os(errno, fmt::format("utimensat {:?}", p)));
    }
  }
  return {};
}

const char* KindName(Kind kind) {
  switch (kind) {
    case Kind::kFile:
      return "file";
    case Kind::kDir:
      return "dir";
    case Kind::kSymlink:
      return "symlink";
    case Kind::kHardlink:
      return "hardlink";
    case Kind::kChar:
      return "char";
    case Kind::kBlock:
      return "block";
    case Kind::kFifo:
      return "fifo";
  }
  return "unknown";
}

}  // namespace layerx::extractor
