// broker/engine, inside the job: where a job writes. Its work dir
// (Workspace), the --rootfs target (RootfsTarget), each output file under a
// temp name until it is renamed into place (PendingOutput), and the -v note
// about directories others can write (SharedDirNotes). Shared by job.cc and
// job_sources.cc; not installed.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "policy/result.h"
#include "sandbox/fd.h"

namespace layerx::broker {

struct OutputPath {
  std::string dir;   // parent directory
  std::string name;  // last component
};

Result<OutputPath> SplitOutput(const std::string& path, const char* what);

// The work dir and temp files of one job; removed without following symlinks
// unless Commit()ted.
class Workspace {
 public:
  ~Workspace() { Cleanup(); }

  Status Create(const std::string& parent);
  // In the directory open at `parent_fd` (borrowed; duplicated), never looked
  // up by name again; `parent` names it in messages.
  Status CreateIn(int parent_fd, const std::string& parent);

  int rootfs_fd() const { return rootfs_fd_.get(); }
  // Another dir beside the rootfs (O_PATH fd), removed with the work dir.
  Result<sandbox::UniqueFd> MakeDir(const std::string& name);
  int dir_fd() const { return dir_fd_.get(); }
  std::string path() const { return parent_ + "/" + name_; }

  // The work tree is done with (the image is built from the records, not from
  // it): remove it on another thread while the job goes on; Cleanup() waits.
  void DropTreeAsync();

  void Cleanup();

 private:
  std::string parent_;
  sandbox::UniqueFd parent_fd_;
  std::string name_;
  sandbox::UniqueFd dir_fd_;
  sandbox::UniqueFd rootfs_fd_;
  std::thread dropper_;
};

// SECURITY: root writing into a directory another user can write (a shared
// output dir, /dev/shm, --scratch) is said in -v, once per directory. It
// changes nothing: every name layerx makes there is unguessable and created
// O_EXCL|O_NOFOLLOW, and what it made is reached only through fds.
class SharedDirNotes {
 public:
  void Note(int dir_fd, const std::string& path, const char* what);
  void Note(const std::string& path, const char* what);

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
  Status Open(const std::string& path, const OutputPath& out);
  bool existing() const { return dir_.get() >= 0; }
  // The directory the job writes into: the existing dir, else the parent.
  int written_dir_fd() const { return existing() ? dir_.get() : parent_.get(); }

  // An existing dir: closed to everyone but its owner (0700) before anything
  // is made in it, then checked to be empty still. A new one: nothing to do.
  Status Hold();

  // The finished tree of `work` in place, its top still 0700.
  Status Place(Workspace& work);

  // The job has succeeded (the work dir is gone): the top of the tree takes
  // the image root's mode and times, and an existing dir (`chown`) its owner.
  // A new dir that fails here stays, 0700 (never removed by name: the name is
  // in a dir others may write, and could be someone else's by now).
  Status OpenUp(bool chown);

  // An existing dir the job failed in: what it moved in removed, mode, owner
  // and times as found. The work dir inside is gone by now (the Workspace
  // lives in RunJobIn, this in RunExtract).
  void Revert();

 private:
  Status CheckEmpty(int dir_fd);
  // Rootless, a directory without write permission for its owner (the
  // image's /proc is 0555) cannot be moved to another parent (its ".." is
  // rewritten): made writable for the move, its mode put back after. By
  // name below our own dirs: the work tree (0700, no jail runs any more) and
  // the held target. `st`: the dir's. Recorded in moved_ once moved.
  Status MoveReadOnlyDir(int from, const std::string& name, const struct stat& st);

  std::string path_, name_;
  sandbox::UniqueFd parent_;  // O_PATH
  sandbox::UniqueFd dir_;     // O_RDONLY: an existing dir only
  sandbox::UniqueFd placed_;  // O_RDONLY: a new dir, once renamed into place
  struct stat found_ = {};
  struct stat root_ = {};  // the work tree's root, before its entries moved
  bool held_ = false;      // an existing dir, changed by this job, not yet done
  std::vector<std::pair<std::string, ino_t>> moved_;  // names moved in, their inodes
};

// An output file being written under a temp name beside its place; removed
// unless Commit() renamed it into place. Never follows a link.
class PendingOutput {
 public:
  ~PendingOutput();
  Status Reserve(const OutputPath& out);
  // An output the caller passed as an open fd (the service): the temp goes in
  // the work dir, and Commit() copies it into `fd` (holes kept).
  Status ReserveFd(int fd, const Workspace& work, const std::string& name);
  // The temp file, new (O_EXCL, never a link); `access` O_WRONLY or O_RDWR.
  Result<sandbox::UniqueFd> Create(int access = O_WRONLY);
  Status Commit();
  // Undoes a Commit() into an fd: the caller's file is left empty, as given.
  void Revert();

 private:
  sandbox::UniqueFd dir_;
  std::string dir_path_, name_, temp_;
  int out_fd_ = -1;
};

}  // namespace layerx::broker
