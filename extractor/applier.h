// The entry rules of DESIGN.md, applied with *at calls below one root dir fd.
// Inside the jail that fd is "/", and the kernel is the boundary; the resolver
// here also keeps every lookup below it in userspace, so the records carry the
// resolved path and the rules hold (and are testable) outside a jail too.
//
//  - intermediate components are followed, symlinks included, but never above
//    the root ("..", absolute targets clamp there, as chroot does);
//  - the leaf is never followed: an existing leaf is replaced (unlink, then
//    create with O_EXCL|O_NOFOLLOW), except dir-on-dir, which merges;
//  - whiteouts (.wh.NAME, .wh..wh..opq) remove only what lower layers made;
//  - a hardlink whose target is missing waits for the end of the layer; then,
//    if the target's directory exists, it is recorded for the broker to judge
//    (a device node lives in the metadata only).
#pragma once

#include <sys/stat.h>

#include <functional>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "extractor/entry_name.h"
#include "extractor/entry_rules.h"
#include "extractor/layer_reader.h"
#include "extractor/records.h"
#include "policy/limits.h"
#include "sandbox/fd.h"
#include "sandbox/jail_config.h"

namespace layerx::extractor {

struct ApplyOptions {
  // A full id range is mapped: chown to the true owners on disk. Otherwise every
  // inode stays the caller's and non-zero owners go to user.rootlesscontainers.
  bool chown = false;
  // Which kinds, bits and xattrs the policy admits (policy/limits.h).
  policy::EntryRules rules;
  // Where regular-file data goes (sandbox/jail_config.h). With kImage and
  // kTreeAndImage it is appended to `data_fd` from data.start on, each file at
  // a block boundary, and the record says where (EntryRecord::extents); with
  // kImage and kDiscard the tree gets a placeholder of the file's size.
  sandbox::JailData data;
  int data_fd = -1;  // borrowed
};

// Delivers the current entry's file data to a sink; returns the bytes delivered.
using DataFeed = std::function<Result<uint64_t>(const DataSink&)>;

class Applier {
 public:
  Applier(int root_fd, const policy::Limits& limits, ApplyOptions options, RecordSink& sink,
          std::function<void(std::string_view)> warn = nullptr);

  // Applies one entry; `data` is called for regular files only.
  Status Apply(const TarEntry& entry, const DataFeed& data);
  // End of the layer: pending hardlinks, then directory modes and mtimes
  // (deepest first, so a 0555 or 0000 dir is closed only after its children).
  // When a pending hardlink fails, failed_entry() names it.
  Status Finish();
  const std::string& failed_entry() const { return failed_entry_; }

  uint64_t file_bytes() const { return file_bytes_; }

 private:
  struct Dir {
    std::string path;  // canonical, "" for the root
    int fd;            // O_PATH; owned by the resolver's cache
  };
  struct Fixup {
    uint32_t mode;
    int64_t mtime_ns;
  };
  struct PendingLink {
    TarEntry entry;
    EntryName name;
  };

  Result<Dir> ResolveDir(const EntryName& dir, bool create, int64_t mtime_ns);
  Result<std::optional<Dir>> ResolveExistingDir(const EntryName& dir);
  void Invalidate();
  void Touch(const std::string& path);
  static std::string JoinPath(const std::string& dir, const std::string& leaf);

  // Runs `op` (returns -1/errno like a syscall); rootless, when `dir` denies
  // its owner access, opens it up (OpenUp) and runs `op` again.
  int WithWritable(const Dir& dir, const std::function<int()>& op);
  bool OpenUp(const Dir& dir);
  Result<std::vector<std::string>> ListDir(const Dir& dir);  // names but . and ..
  Status RemoveTree(const Dir& dir, const std::string& name);
  Status RemoveExisting(const Dir& dir, const std::string& leaf, const struct stat& st);
  // A whiteout of `name` in `dir`: removes what lower layers made there; a
  // directory this layer also wrote into stays, with only its lower content
  // hidden (HideLower).
  Status RemoveLower(const Dir& dir, const std::string& name);
  // Hides what lower layers put below `dir`: on disk (RemoveLowerBelow) and, by
  // one opaqueDir record, in the broker's metadata, device nodes included.
  // Both keep what this layer made (touched_) and the directories leading to it.
  Status HideLower(const Dir& dir);
  Status RemoveLowerBelow(const Dir& dir);
  Status Whiteout(const EntryName& dir, const std::string& victim);
  Status Opaque(const EntryName& dir);
  Status ApplyRoot(const TarEntry& entry);
  Status ApplyHardlink(const TarEntry& entry, const EntryName& name, bool final_attempt,
                       bool* deferred);
  // Writes the entry's data where options_.data says; returns the bytes read
  // and fills `extents` with where they went in the data fd.
  Result<uint64_t> WriteFile(int fd, const TarEntry& entry, const DataFeed& data,
                             std::vector<DataExtent>* extents);
  Status SetXattrs(int fd, const TarEntry& entry);
  EntryRecord MakeRecord(const TarEntry& entry, std::string path) const;
  // The policy's entry rules: nullopt when the entry is left out, the entry as
  // it will be applied (bits or xattrs stripped) otherwise; kLimitExceeded when
  // the policy refuses it.
  Result<std::optional<TarEntry>> Admit(const TarEntry& entry) const;

  int root_fd_;
  policy::Limits limits_;
  ApplyOptions options_;
  RecordSink& sink_;
  std::function<void(std::string_view)> warn_;

  // One cached directory: tar entries come grouped by directory.
  std::string cache_key_;
  bool cache_valid_ = false;
  std::string cache_path_;
  sandbox::UniqueFd cache_fd_;

  std::unordered_set<std::string> touched_;  // made by this layer, and their ancestors
  std::unordered_map<std::string, Fixup> fixups_;
  std::vector<PendingLink> pending_links_;
  uint64_t file_bytes_ = 0;
  uint64_t data_pos_ = 0;  // next free byte of the data fd (block-aligned)
  // Small files' data bound for the data fd, gathered while it is contiguous
  // (each file starts at the block after the last one ends: the bytes between
  // are zeros) and written in one pwrite: one syscall for many files.
  Status WriteData(std::span<const std::byte> bytes, uint64_t offset);
  Status FlushData();
  std::vector<std::byte> gathered_;
  uint64_t gathered_at_ = 0;
  std::string failed_entry_;  // the pending hardlink Finish() failed on
};

// The value of user.rootlesscontainers for an owner (umoci's convention: the
// protobuf message `Resource { uint32 uid = 1; uint32 gid = 2; }`).
std::string RootlessOwnerXattr(uint32_t uid, uint32_t gid);

}  // namespace layerx::extractor
