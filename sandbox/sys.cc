#include "sandbox/sys.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

namespace layerx::sandbox {

namespace {

template <typename F>
auto RetryEintr(F f) {
  decltype(f()) r;
  do {
    r = f();
  } while (r == -1 && errno == EINTR);
  return r;
}

}  // namespace

Result<UniqueFd> OpenAt(int dirfd, const std::string& path, int flags, mode_t mode) {
  int fd = RetryEintr([&] { return ::openat(dirfd, path.c_str(), flags | O_CLOEXEC, mode); });
  if (fd < 0) return Fail(OsError(errno, "openat {:?}", path));
  return UniqueFd(fd);
}

Result<UniqueFd> OpenAt2(int dirfd, const std::string& path, uint64_t flags, uint64_t resolve,
                         mode_t mode) {
  struct open_how how = {};
  how.flags = flags | O_CLOEXEC;
  how.mode = (flags & (O_CREAT | O_TMPFILE)) ? mode : 0;
  how.resolve = resolve;
  long fd =
      RetryEintr([&] { return ::syscall(SYS_openat2, dirfd, path.c_str(), &how, sizeof(how)); });
  if (fd < 0) return Fail(OsError(errno, "openat2 {:?}", path));
  return UniqueFd(static_cast<int>(fd));
}

Result<struct stat> FstatAt(int dirfd, const std::string& path, int flags) {
  struct stat st;
  if (::fstatat(dirfd, path.c_str(), &st, flags) != 0) {
    return Fail(OsError(errno, "fstatat {:?}", path));
  }
  return st;
}

Result<struct stat> Fstat(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return Fail(OsError(errno, "fstat"));
  return st;
}

Status MkdirAt(int dirfd, const std::string& path, mode_t mode) {
  if (::mkdirat(dirfd, path.c_str(), mode) != 0) return Fail(OsError(errno, "mkdirat {:?}", path));
  return {};
}

Status UnlinkAt(int dirfd, const std::string& path, int flags) {
  if (::unlinkat(dirfd, path.c_str(), flags) != 0) {
    return Fail(OsError(errno, "unlinkat {:?}", path));
  }
  return {};
}

Status RenameAt(int olddirfd, const std::string& oldpath, int newdirfd,
                const std::string& newpath) {
  if (::renameat(olddirfd, oldpath.c_str(), newdirfd, newpath.c_str()) != 0) {
    return Fail(OsError(errno, "renameat {:?} -> {:?}", oldpath, newpath));
  }
  return {};
}

Status RenameNoReplace(int olddirfd, const std::string& oldpath, int newdirfd,
                       const std::string& newpath) {
  if (::renameat2(olddirfd, oldpath.c_str(), newdirfd, newpath.c_str(), RENAME_NOREPLACE) != 0) {
    return Fail(OsError(errno, "renameat2 {:?} -> {:?}", oldpath, newpath));
  }
  return {};
}

Status FchmodAtNoFollow(int dirfd, const std::string& path, mode_t mode) {
#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452
#endif
  if (::syscall(SYS_fchmodat2, dirfd, path.c_str(), mode, AT_SYMLINK_NOFOLLOW) == 0) return {};
  if (errno != ENOSYS) return Fail(OsError(errno, "fchmodat2 {:?}", path));
  // Older kernels: only callers that own the tree and have no concurrent writer
  // reach this; a symlink is never chmod'ed.
  LX_ASSIGN_OR_RETURN(struct stat st, FstatAt(dirfd, path, AT_SYMLINK_NOFOLLOW));
  if (S_ISLNK(st.st_mode)) return Fail(OsError(ELOOP, "fchmodat {:?}", path));
  if (::fchmodat(dirfd, path.c_str(), mode, 0) != 0) {
    return Fail(OsError(errno, "fchmodat {:?}", path));
  }
  return {};
}

Status Fchmod(int fd, mode_t mode) {
  if (::fchmod(fd, mode) != 0) return Fail(OsError(errno, "fchmod"));
  return {};
}

Status Fchown(int fd, uid_t uid, gid_t gid) {
  if (::fchown(fd, uid, gid) != 0) return Fail(OsError(errno, "fchown {}:{}", uid, gid));
  return {};
}

Status Futimens(int fd, const struct timespec& atime, const struct timespec& mtime) {
  const struct timespec times[2] = {atime, mtime};
  if (::futimens(fd, times) != 0) return Fail(OsError(errno, "futimens"));
  return {};
}

Result<std::vector<std::string>> ListDir(int dir_fd) {
  LX_ASSIGN_OR_RETURN(UniqueFd fd, OpenAt(dir_fd, ".", O_RDONLY | O_DIRECTORY));
  DIR* d = ::fdopendir(fd.get());
  if (d == nullptr) return Fail(OsError(errno, "fdopendir"));
  (void)fd.release();  // closedir closes it
  std::vector<std::string> names;
  errno = 0;
  while (struct dirent* ent = ::readdir(d)) {
    std::string name = ent->d_name;
    if (name != "." && name != "..") names.push_back(std::move(name));
  }
  int err = errno;
  ::closedir(d);
  if (err != 0) return Fail(OsError(err, "readdir"));
  return names;
}

const char* FileTypeName(mode_t mode) {
  switch (mode & S_IFMT) {
    case S_IFREG:
      return "a regular file";
    case S_IFDIR:
      return "a directory";
    case S_IFLNK:
      return "a symlink";
    case S_IFIFO:
      return "a fifo";
    case S_IFCHR:
      return "a character device";
    case S_IFBLK:
      return "a block device";
    case S_IFSOCK:
      return "a socket";
    default:
      return "of an unknown type";
  }
}

Result<UniqueFd> OpenRegularFile(int dirfd, const std::string& path, uint64_t resolve) {
  auto open_named = [&](int flags) {
    return resolve != 0 ? OpenAt2(dirfd, path, static_cast<uint64_t>(flags), resolve)
                        : OpenAt(dirfd, path, flags);
  };
  // O_PATH: opening a fifo without a writer blocks (O_NONBLOCK only moves the
  // wait into read), and opening a device runs its driver (a tape rewinds, a
  // watchdog arms, a tty may become the controlling one) before fstat could
  // tell. An O_PATH open does neither.
  LX_ASSIGN_OR_RETURN(UniqueFd handle, open_named(O_PATH));
  LX_ASSIGN_OR_RETURN(struct stat st, Fstat(handle.get()));
  if (!S_ISREG(st.st_mode)) {
    return Fail(
        Error(ErrorKind::kInvalidInput, 0,
              fmt::format("{:?} is {}, not a regular file", path, FileTypeName(st.st_mode))));
  }
  std::string self = fmt::format("/proc/self/fd/{}", handle.get());
  int fd = RetryEintr([&] { return ::open(self.c_str(), O_RDONLY | O_NOCTTY | O_CLOEXEC); });
  if (fd >= 0) return UniqueFd(fd);
  if (errno != ENOENT) return Fail(OsError(errno, "open {:?}", path));
  // No /proc mounted: the name once more. O_NONBLOCK, so that whatever was
  // swapped in meanwhile cannot block the open either, and it must be the
  // inode fstat saw.
  LX_ASSIGN_OR_RETURN(UniqueFd again, open_named(O_RDONLY | O_NONBLOCK | O_NOCTTY));
  LX_ASSIGN_OR_RETURN(struct stat now, Fstat(again.get()));
  if (now.st_dev != st.st_dev || now.st_ino != st.st_ino) {
    return Fail(Error(ErrorKind::kInvalidInput, 0,
                      fmt::format("{:?} was replaced while it was opened", path)));
  }
  return again;
}

Result<Pipe> MakePipe(int flags) {
  int fds[2];
  if (::pipe2(fds, flags | O_CLOEXEC) != 0) return Fail(OsError(errno, "pipe2"));
  return Pipe{UniqueFd(fds[0]), UniqueFd(fds[1])};
}

Result<std::pair<UniqueFd, UniqueFd>> MakeSocketPair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    return Fail(OsError(errno, "socketpair"));
  }
  return std::pair{UniqueFd(fds[0]), UniqueFd(fds[1])};
}

Result<UniqueFd> MemfdCreate(const char* name) {
  int fd = ::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return Fail(OsError(errno, "memfd_create"));
  return UniqueFd(fd);
}

Result<UniqueFd> Dup(int fd) {
  int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (copy < 0) return Fail(OsError(errno, "dup"));
  return UniqueFd(copy);
}

Result<UniqueFd> ReopenFd(int fd, int flags) {
  std::string path = fmt::format("/proc/self/fd/{}", fd);
  int copy = ::open(path.c_str(), flags | O_CLOEXEC | O_NOCTTY);
  if (copy < 0) return Fail(OsError(errno, "reopen {}", path));
  UniqueFd out(copy);
  LX_ASSIGN_OR_RETURN(struct stat a, Fstat(fd));
  LX_ASSIGN_OR_RETURN(struct stat b, Fstat(out.get()));
  if (a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
    return Fail(MakeError(ErrorKind::kOs, "reopen {}: another file", path));
  }
  return out;
}

Status PunchHole(int fd, uint64_t offset, uint64_t length) {
  if (length == 0) return {};
  if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(length)) != 0) {
    return Fail(OsError(errno, "punch hole at {}+{}", offset, length));
  }
  return {};
}

Result<std::string> UnguessableName(std::string_view prefix) {
  uint64_t nonce = 0;
  LX_TRY(GetRandom(std::as_writable_bytes(std::span(&nonce, 1))));
  return fmt::format("{}{:016x}", prefix, nonce);
}

Status GetRandom(std::span<std::byte> out) {
  while (!out.empty()) {
    ssize_t n = ::getrandom(out.data(), out.size(), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Fail(OsError(errno, "getrandom"));
    }
    out = out.subspan(static_cast<size_t>(n));
  }
  return {};
}

namespace {

// Copies [offset, offset+length) at the same offset; copy_file_range first,
// pread/pwrite when the kernel refuses it between these two files.
Status CopyRange(int from, int to, off_t offset, off_t length) {
  bool plain = false;
  std::vector<std::byte> buf;
  while (length > 0) {
    if (!plain) {
      loff_t in = offset, out = offset;
      ssize_t n = ::copy_file_range(from, &in, to, &out, static_cast<size_t>(length), 0);
      if (n > 0) {
        offset += n;
        length -= n;
        continue;
      }
      if (n == 0) return Fail(OsError(EIO, "copy: source shrank"));
      if (errno == EINTR) continue;
      if (errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP) {
        return Fail(OsError(errno, "copy_file_range"));
      }
      plain = true;
      buf.resize(1 << 20);
    }
    size_t want = std::min<size_t>(buf.size(), static_cast<size_t>(length));
    ssize_t n = ::pread(from, buf.data(), want, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Fail(OsError(errno, "pread"));
    if (n == 0) return Fail(OsError(EIO, "copy: source shrank"));
    for (ssize_t done = 0; done < n;) {
      ssize_t w = ::pwrite(to, buf.data() + done, static_cast<size_t>(n - done), offset + done);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return Fail(OsError(errno, "write"));
      done += w;
    }
    offset += n;
    length -= n;
  }
  return {};
}

}  // namespace

Status CopySparse(int from, int to) {
  LX_ASSIGN_OR_RETURN(struct stat st, Fstat(from));
  const off_t size = st.st_size;
  if (::ftruncate(to, 0) != 0) return Fail(OsError(errno, "ftruncate"));
  off_t at = 0;
  while (at < size) {
    off_t data = ::lseek(from, at, SEEK_DATA);
    if (data < 0 && errno == ENXIO) break;  // only a hole is left
    if (data < 0) return Fail(OsError(errno, "lseek"));
    off_t hole = ::lseek(from, data, SEEK_HOLE);
    if (hole < 0) return Fail(OsError(errno, "lseek"));
    LX_TRY(CopyRange(from, to, data, hole - data));
    at = hole;
  }
  if (::ftruncate(to, size) != 0) return Fail(OsError(errno, "ftruncate"));
  return {};
}

int64_t MonotonicNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

Status WriteAll(int fd, std::span<const std::byte> bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return Fail(OsError(errno, "write"));
    }
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
  return {};
}

Result<size_t> ReadSome(int fd, std::span<std::byte> buf) {
  ssize_t n = RetryEintr([&] { return ::read(fd, buf.data(), buf.size()); });
  if (n < 0) return Fail(OsError(errno, "read"));
  return static_cast<size_t>(n);
}

Result<std::string> ReadRegularFile(const std::string& path, size_t max_bytes) {
  LX_ASSIGN_OR_RETURN(UniqueFd fd, OpenRegularFile(AT_FDCWD, path, 0));
  LX_ASSIGN_OR_RETURN(struct stat st, Fstat(fd.get()));
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return Fail(Error(ErrorKind::kLimitExceeded, 0,
                      fmt::format("{:?} is {} bytes, over {}", path, st.st_size, max_bytes)));
  }
  return ReadUpTo(fd.get(), static_cast<size_t>(st.st_size));
}

Result<std::string> ReadUpTo(int fd, size_t size) {
  std::string out(size, '\0');
  size_t done = 0;
  while (done < out.size()) {
    LX_ASSIGN_OR_RETURN(size_t n,
                        ReadSome(fd, std::as_writable_bytes(std::span(out)).subspan(done)));
    if (n == 0) break;
    done += n;
  }
  out.resize(done);
  return out;
}

Status SetNonBlocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
    return Fail(OsError(errno, "fcntl O_NONBLOCK"));
  }
  return {};
}

ScopedSigpipeBlock::ScopedSigpipeBlock() {
  sigset_t pipe_set;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  sigset_t pending;
  sigpending(&pending);
  was_pending_ = sigismember(&pending, SIGPIPE) == 1;
  pthread_sigmask(SIG_BLOCK, &pipe_set, &old_);
}

ScopedSigpipeBlock::~ScopedSigpipeBlock() {
  if (!was_pending_) {
    sigset_t pipe_set;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    struct timespec zero = {0, 0};
    while (sigtimedwait(&pipe_set, nullptr, &zero) == SIGPIPE) {
    }
  }
  pthread_sigmask(SIG_SETMASK, &old_, nullptr);
}

namespace {

// Empties the directory open at `dir` (a fd opened O_NOFOLLOW|O_DIRECTORY).
Status EmptyDir(int dir, int depth) {
  if (depth > 4096) return Fail(OsError(ELOOP, "remove tree: too deep"));
  // fdopendir takes the fd; give it a duplicate so `dir` stays ours.
  int dup = ::fcntl(dir, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return Fail(OsError(errno, "fcntl F_DUPFD"));
  DIR* d = ::fdopendir(dup);
  if (d == nullptr) {
    ::close(dup);
    return Fail(OsError(errno, "fdopendir"));
  }
  std::vector<std::string> subdirs;
  Status status;
  errno = 0;
  while (struct dirent* ent = ::readdir(d)) {
    std::string name = ent->d_name;
    if (name == "." || name == "..") continue;
    if (::unlinkat(dir, name.c_str(), 0) == 0 || errno == ENOENT) continue;
    if (errno == EISDIR || errno == EPERM) {
      subdirs.push_back(std::move(name));
    } else {
      status = Fail(OsError(errno, "unlinkat {:?}", name));
      break;
    }
  }
  ::closedir(d);
  if (!status) return status;
  for (const std::string& name : subdirs) LX_TRY(RemoveTreeAt(dir, name));
  return {};
}

}  // namespace

Status RemoveTreeAt(int dirfd, const std::string& name) {
  struct stat st;
  if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    if (errno == ENOENT) return {};
    return Fail(OsError(errno, "fstatat {:?}", name));
  }
  if (!S_ISDIR(st.st_mode)) {
    if (::unlinkat(dirfd, name.c_str(), 0) != 0 && errno != ENOENT) {
      return Fail(OsError(errno, "unlinkat {:?}", name));
    }
    return {};
  }
  // Rootless trees keep the image's modes: make the dir ours to empty. Only dirs
  // we own get here without EPERM, and a dir is never a symlink (checked above,
  // and nothing else writes the tree while we clean it).
  if ((st.st_mode & 0700) != 0700) (void)FchmodAtNoFollow(dirfd, name, 0700);
  int fd = RetryEintr([&] {
    return ::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  });
  if (fd < 0) return Fail(OsError(errno, "openat {:?}", name));
  UniqueFd dir(fd);
  LX_TRY(EmptyDir(dir.get(), 0));
  if (::unlinkat(dirfd, name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT) {
    return Fail(OsError(errno, "rmdir {:?}", name));
  }
  return {};
}

}  // namespace layerx::sandbox
