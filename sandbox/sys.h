// One thin wrapper per syscall layerx uses outside the jail's setup path. Each
// retries EINTR where that is safe, captures errno only when the call failed, and
// names the call and its object in the Error.
#pragma once

#include <fcntl.h>
#include <linux/openat2.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "policy/result.h"
#include "sandbox/fd.h"

namespace layerx::sandbox {

// openat(2) with O_CLOEXEC always added.
Result<UniqueFd> OpenAt(int dirfd, const std::string& path, int flags, mode_t mode = 0);
// openat2(2): `resolve` is RESOLVE_* flags; O_CLOEXEC always added.
Result<UniqueFd> OpenAt2(int dirfd, const std::string& path, uint64_t flags, uint64_t resolve,
                         mode_t mode = 0);
Result<struct stat> FstatAt(int dirfd, const std::string& path, int flags);
Result<struct stat> Fstat(int fd);
Status MkdirAt(int dirfd, const std::string& path, mode_t mode);
Status UnlinkAt(int dirfd, const std::string& path, int flags);
Status RenameAt(int olddirfd, const std::string& oldpath, int newdirfd, const std::string& newpath);
// renameat2(RENAME_NOREPLACE): EEXIST where `newpath` is taken, never replaced.
Status RenameNoReplace(int olddirfd, const std::string& oldpath, int newdirfd,
                       const std::string& newpath);
// chmod that never follows a symlink: fchmodat2(AT_SYMLINK_NOFOLLOW) where the
// kernel has it (6.6+), else fchmodat on a path lstat just showed is no symlink.
Status FchmodAtNoFollow(int dirfd, const std::string& path, mode_t mode);
Status Fchmod(int fd, mode_t mode);
Status Fchown(int fd, uid_t uid, gid_t gid);
// futimens(2): atime and mtime of the file open at `fd` (not an O_PATH fd).
Status Futimens(int fd, const struct timespec& atime, const struct timespec& mtime);
// The names in the directory open at `dir_fd` ("." and ".." left out), read
// through a new O_RDONLY open of "." below it: `dir_fd` may be O_PATH, and no
// name is looked up but the directory itself.
Result<std::vector<std::string>> ListDir(int dir_fd);

// Opens an existing file for reading so that opening cannot block and nothing
// but a regular file is ever opened (DESIGN rule 8): an O_PATH open first,
// which runs no device's open and waits for no fifo writer, then fstat, then
// that same inode opened O_RDONLY through /proc/self/fd (no name is looked up
// twice, so nothing can be swapped in between; without /proc, the name once
// more, non-blocking, and it must be the inode fstat saw). `resolve`: RESOLVE_*
// flags for openat2, 0 for a plain openat. A fifo, device, socket or directory
// is kInvalidInput naming it ("\"x\" is a fifo, not a regular file"); a failed
// open is kOs with its errno (ENOENT, EXDEV for a path leading out, ...).
Result<UniqueFd> OpenRegularFile(int dirfd, const std::string& path, uint64_t resolve);
// "a fifo", "a character device", ... for error messages.
const char* FileTypeName(mode_t mode);

struct Pipe {
  UniqueFd read;
  UniqueFd write;
};
Result<Pipe> MakePipe(int flags);                        // pipe2; O_CLOEXEC always added
Result<std::pair<UniqueFd, UniqueFd>> MakeSocketPair();  // AF_UNIX stream, cloexec
Result<UniqueFd> MemfdCreate(const char* name);
Result<UniqueFd> Dup(int fd);  // F_DUPFD_CLOEXEC
// A new open file description of the file `fd` refers to, with `flags` (e.g.
// O_WRONLY where `fd` is read-write), through /proc/self/fd/N: never by a name
// someone else could change. The result is checked to be the same inode.
Result<UniqueFd> ReopenFd(int fd, int flags);
// fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): the range reads as
// zeros and takes no space.
Status PunchHole(int fd, uint64_t offset, uint64_t length);
// `prefix` and 16 hex digits from getrandom(2): a name for a temp file or dir
// that no one else can guess and make first in a shared directory.
Result<std::string> UnguessableName(std::string_view prefix);
// Fills `out` from getrandom(2) (the kernel's CSPRNG; EINTR and short reads retried).
// Blocks only before the kernel's pool is first seeded, early in boot.
Status GetRandom(std::span<std::byte> out);

// Copies the whole of regular file `from` into `to` (a regular file open for
// writing, from its offset 0), keeping holes: only the data ranges are copied
// (SEEK_DATA, copy_file_range, read/write where that is refused), then `to` is
// cut to `from`'s size. A sparse ext4 image stays sparse.
Status CopySparse(int from, int to);

// CLOCK_MONOTONIC in nanoseconds; one clock for the whole machine, so the
// broker and a jailed child can compare their readings.
int64_t MonotonicNs();

// Writes everything or fails (EINTR and short writes retried).
Status WriteAll(int fd, std::span<const std::byte> bytes);
// One read(2), EINTR retried. 0 means EOF.
Result<size_t> ReadSome(int fd, std::span<std::byte> buf);
// Reads until `size` bytes or EOF, whichever comes first (a file sized by
// fstat that shrank meanwhile gives fewer). Allocates `size` bytes first: the
// caller bounds it.
Result<std::string> ReadUpTo(int fd, size_t size);

// A small file read whole by name (a config file, an auth file): opened as
// OpenRegularFile opens it (never a fifo or a device; the error keeps its
// errno, ENOENT for one that is not there), kLimitExceeded when it is over
// `max_bytes`, then read up to its size.
Result<std::string> ReadRegularFile(const std::string& path, size_t max_bytes);
Status SetNonBlocking(int fd);

// Blocks SIGPIPE in the calling thread for its lifetime, so writing to a pipe
// whose reader died is EPIPE, not the death of a library caller's process;
// a SIGPIPE that became pending meanwhile is consumed before the old mask is
// restored (the way a library must do it without touching the disposition).
class ScopedSigpipeBlock {
 public:
  ScopedSigpipeBlock();
  ~ScopedSigpipeBlock();
  ScopedSigpipeBlock(const ScopedSigpipeBlock&) = delete;
  ScopedSigpipeBlock& operator=(const ScopedSigpipeBlock&) = delete;

 private:
  sigset_t old_;
  bool was_pending_ = false;
};

// Removes `name` below `dirfd` and everything under it without following any
// symlink: every step is an *at call on a directory fd opened with O_NOFOLLOW.
// Directories its owner cannot write or search are made so first (rootless trees
// carry the image's modes, 0555 and 0000 included). ENOENT is success.
Status RemoveTreeAt(int dirfd, const std::string& name);

}  // namespace layerx::sandbox
