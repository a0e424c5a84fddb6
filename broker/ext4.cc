#include "broker/ext4.h"

#include <errno.h>
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cstring>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "broker/logging.h"
#include "sandbox/sys.h"

extern char** environ;

namespace layerx::broker {

using extractor::EntryRecord;
using extractor::Kind;

namespace {

uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

constexpr uint16_t kMaxLinks = 65000;  // EXT4_LINK_MAX

Error Ext2Error(errcode_t code, std::string what) {
  return Error(ErrorKind::kOs, 0, fmt::format("{}: {}", what, error_message(code)));
}

// The UUID of a reproducible image: from the seed (the layers' digests), so the
// same input names the same filesystem.
std::string DerivedUuid(const std::string& seed) {
  // FNV-1a over the seed, twice with different offsets: 128 stable bits. Not a
  // security property, only stability.
  uint64_t a = 1469598103934665603ull, b = 1099511628211ull ^ 0x9e3779b97f4a7c15ull;
  for (unsigned char c : seed) {
    a = (a ^ c) * 1099511628211ull;
    b = (b ^ c) * 0x100000001b3ull + 0x7f4a7c15;
  }
  return fmt::format("{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}", a >> 32, (a >> 16) & 0xffff, a & 0xfff,
                     0x8000 | ((b >> 48) & 0x3fff), b & 0xffffffffffffull);
}

std::string FindTool(const char* name) {
  for (const char* dir : {"/usr/sbin", "/sbin", "/usr/bin", "/bin"}) {
    std::string path = fmt::format("{}/{}", dir, name);
    if (::access(path.c_str(), X_OK) == 0) return path;
  }
  return name;
}

// Runs argv with `env`, stdout and stderr into a pipe; returns the exit status
// and the output's last line for the error. The tool runs in its own process
// group, killed and reaped when `stop` is set or the deadline passes.
Result<int> RunTool(const std::vector<std::string>& argv, const std::vector<std::string>& env,
                    const ToolControl& control, std::string* output) {
  LX_ASSIGN_OR_RETURN(sandbox::Pipe out, sandbox::MakePipe(0));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out.write.get(), 1);
  posix_spawn_file_actions_adddup2(&actions, out.write.get(), 2);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // Its own process group (killed as one), and no signal blocked: the service
  // blocks SIGTERM in its threads, and a mask survives exec.
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK);
  posix_spawnattr_setpgroup(&attr, 0);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  std::vector<char*> args, envp;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  for (const std::string& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  pid_t pid;
  int rc = posix_spawn(&pid, args[0], &actions, &attr, args.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  out.write.reset();
  if (rc != 0) return Fail(OsError(rc, "spawn {}", argv[0]));
  std::optional<Error> stopped;
  char buf[4096];
  while (true) {
    if (control.cancel != nullptr && control.cancel->load()) {
      stopped = MakeError(ErrorKind::kCancelled, "interrupted");
    } else if (control.deadline_ns > 0 && sandbox::MonotonicNs() >= control.deadline_ns) {
      stopped = MakeError(ErrorKind::kLimitExceeded, "{} took past job_timeout_ms", argv[0]);
    }
    if (stopped) {
      ::kill(-pid, SIGKILL);
      break;
    }
    struct pollfd pfd = {out.read.get(), POLLIN, 0};
    int ready = ::poll(&pfd, 1, 100);
    if (ready < 0 && errno != EINTR) break;
    if (ready <= 0) continue;
    ssize_t n = ::read(out.read.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    if (output->size() < 64 * 1024) output->append(buf, static_cast<size_t>(n));
  }
  int status;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return Fail(OsError(errno, "waitpid {}", argv[0]));
  }
  if (stopped) return Fail(*stopped);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string LastLine(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  size_t nl = text.rfind('\n');
  return nl == std::string::npos ? text : text.substr(nl + 1);
}

uint32_t ToExtraTime(int64_t sec, int64_t nsec) {
  // ext4: bits 0-1 extend the seconds past 2038, bits 2-31 hold nanoseconds.
  return static_cast<uint32_t>(((sec - static_cast<int32_t>(sec)) >> 32) & 3) |
         static_cast<uint32_t>(nsec << 2);
}

class OwnershipPass {
 public:
  OwnershipPass(ext2_filsys fs, const ImageTree& tree, std::optional<int64_t> epoch)
      : fs_(fs), tree_(tree), epoch_(epoch) {}

  Status Run() {
    LX_TRY(Walk());
    std::unordered_set<ext2_ino_t> done;
    for (const auto& [path, ino] : found_) {
      auto it = tree_.entries().find(path);
      if (it == tree_.entries().end()) {
        if (path == "lost+found") {  // mkfs's own
          if (epoch_) LX_TRY(StampTimes(ino, *epoch_));
          continue;
        }
        return Fail(
            MakeError(ErrorKind::kInternal, "ext4: {:?} is in the image, not in the tree", path));
      }
      if (!done.insert(ino).second) continue;  // another name of a done inode
      if (Status s = Apply(ino, it->second->meta); !s) {
        return Fail(std::move(s).error().With("ext4 {:?}", path));
      }
    }
    if (epoch_) {
      // Reproducible: the reserved inodes (journal, resize) and the superblock
      // carry the epoch instead of the build's clock.
      for (ext2_ino_t ino = 1; ino < EXT2_FIRST_INODE(fs_->super); ++ino) {
        if (ino != EXT2_ROOT_INO) LX_TRY(StampTimes(ino, *epoch_));
      }
      auto t = static_cast<uint32_t>(*epoch_);
      fs_->super->s_mkfs_time = fs_->super->s_lastcheck = fs_->super->s_wtime = t;
      fs_->super->s_mkfs_time_hi = fs_->super->s_lastcheck_hi = fs_->super->s_wtime_hi = 0;
      // libext2fs stamps s_wtime with fs->now, or the clock when that is 0.
      fs_->now = static_cast<time_t>(std::max<int64_t>(*epoch_, 1));
      ext2fs_mark_super_dirty(fs_);
    }
    // What the tree has and the copy could not: device nodes (on no disk). The
    // names of one hardlinked device are one inode: made at the first name,
    // linked at the others.
    std::unordered_map<const Inode*, ext2_ino_t> made;
    for (const auto& [path, inode] : tree_.entries()) {
      if (ino_of_.contains(path)) continue;
      const EntryRecord& m = inode->meta;
      if (m.kind != Kind::kChar && m.kind != Kind::kBlock && m.kind != Kind::kFifo) {
        return Fail(MakeError(ErrorKind::kInternal, "ext4: {:?} missing from the copy", path));
      }
      if (auto it = made.find(inode.get()); it != made.end()) {
        LX_TRY(LinkSpecial(path, it->second, m));
        continue;
      }
      LX_ASSIGN_OR_RETURN(ext2_ino_t ino, MakeSpecial(path, m));
      made.emplace(inode.get(), ino);
    }
    return {};
  }

 private:
  struct WalkState {
    OwnershipPass* self;
    std::string dir;
    std::vector<std::pair<std::string, ext2_ino_t>>* subdirs;
  };

  static int Visit(ext2_ino_t, int, struct ext2_dir_entry* dirent, int, int, char*, void* priv) {
    auto* state = static_cast<WalkState*>(priv);
    int len = ext2fs_dirent_name_len(dirent);
    std::string name(dirent->name, static_cast<size_t>(len));
    if (name == "." || name == "..") return 0;
    std::string path = state->dir.empty() ? name : state->dir + "/" + name;
    state->self->found_.emplace_back(path, dirent->inode);
    state->self->ino_of_[path] = dirent->inode;
    if (ext2fs_dirent_file_type(dirent) == EXT2_FT_DIR)
      state->subdirs->emplace_back(path, dirent->inode);
    return 0;
  }

  Status Walk() {
    found_.emplace_back("", EXT2_ROOT_INO);
    ino_of_[""] = EXT2_ROOT_INO;
    std::vector<std::pair<std::string, ext2_ino_t>> pending = {{"", EXT2_ROOT_INO}};
    while (!pending.empty()) {
      auto [dir, ino] = std::move(pending.back());
      pending.pop_back();
      std::vector<std::pair<std::string, ext2_ino_t>> subdirs;
      WalkState state{this, dir, &subdirs};
      errcode_t rc = ext2fs_dir_iterate2(fs_, ino, 0, nullptr, &OwnershipPass::Visit, &state);
      if (rc) return Fail(Ext2Error(rc, fmt::format("ext4: read dir {:?}", dir)));
      for (auto& s : subdirs) pending.push_back(std::move(s));
    }
    return {};
  }

  Status SetXattrs(ext2_ino_t ino, const EntryRecord& m, bool may_have_some) {
    if (m.xattrs.empty() && !may_have_some) return {};
    struct ext2_xattr_handle* h = nullptr;
    errcode_t rc = ext2fs_xattrs_open(fs_, ino, &h);
    if (rc) return Fail(Ext2Error(rc, "xattrs open"));
    rc = ext2fs_xattrs_read(h);
    // The copy's xattrs (user.rootlesscontainers, whatever the host added) go;
    // the layers' come in.
    std::vector<std::string> existing;
    if (!rc) {
      rc = ext2fs_xattrs_iterate(
          h,
          [](char* name, char*, size_t, void* data) -> int {
            static_cast<std::vector<std::string>*>(data)->emplace_back(name);
            return 0;
          },
          &existing);
    }
    for (const std::string& name : existing) {
      if (!rc) rc = ext2fs_xattr_remove(h, name.c_str());
    }
    for (const auto& [name, value] : m.xattrs) {
      if (!rc) rc = ext2fs_xattr_set(h, name.c_str(), value.data(), value.size());
    }
    errcode_t close_rc = ext2fs_xattrs_close(&h);
    if (rc || close_rc) return Fail(Ext2Error(rc ? rc : close_rc, "xattrs"));
    return {};
  }

  static void SetTimes(struct ext2_inode_large& inode, int64_t ns) {
    int64_t sec = ns / 1'000'000'000, nsec = ns % 1'000'000'000;
    if (nsec < 0) {
      nsec += 1'000'000'000;
      sec -= 1;
    }
    inode.i_atime = inode.i_mtime = inode.i_ctime = static_cast<uint32_t>(sec);
    if (inode.i_extra_isize >=
        offsetof(struct ext2_inode_large, i_crtime) - EXT2_GOOD_OLD_INODE_SIZE) {
      inode.i_atime_extra = inode.i_mtime_extra = inode.i_ctime_extra = ToExtraTime(sec, nsec);
    }
    // Birth time too: mkfs stamped "now", which no layer said and which would
    // make two builds differ.
    if (inode.i_extra_isize >=
        offsetof(struct ext2_inode_large, i_projid) - EXT2_GOOD_OLD_INODE_SIZE) {
      inode.i_crtime = static_cast<uint32_t>(sec);
      inode.i_crtime_extra = ToExtraTime(sec, nsec);
    }
  }

  Status StampTimes(ext2_ino_t ino, int64_t epoch) {
    struct ext2_inode_large inode;
    errcode_t rc =
        ext2fs_read_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&inode), sizeof(inode));
    if (rc) return Fail(Ext2Error(rc, "read inode"));
    if (inode.i_mode == 0 && inode.i_links_count == 0 && inode.i_mtime == 0) return {};
    SetTimes(inode, epoch * 1'000'000'000);
    rc = ext2fs_write_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&inode), sizeof(inode));
    if (rc) return Fail(Ext2Error(rc, "write inode"));
    return {};
  }

  static void SetOwner(struct ext2_inode_large& inode, const EntryRecord& m) {
    inode.i_uid = static_cast<uint16_t>(m.uid & 0xffff);
    ext2fs_set_i_uid_high(inode, m.uid >> 16);
    inode.i_gid = static_cast<uint16_t>(m.gid & 0xffff);
    ext2fs_set_i_gid_high(inode, m.gid >> 16);
  }

  Status Apply(ext2_ino_t ino, const EntryRecord& m) {
    struct ext2_inode_large inode;
    errcode_t rc =
        ext2fs_read_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&inode), sizeof(inode));
    if (rc) return Fail(Ext2Error(rc, "read inode"));
    bool has_xattrs = inode.i_file_acl != 0 || inode.i_extra_isize > 0;  // cheap over-approximation
    LX_TRY(SetXattrs(ino, m, has_xattrs));
    // xattrs may have moved to a block: read again before writing the inode.
    rc = ext2fs_read_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&inode), sizeof(inode));
    if (rc) return Fail(Ext2Error(rc, "read inode"));
    inode.i_mode = static_cast<uint16_t>((inode.i_mode & S_IFMT) | (m.mode & 07777));
    SetOwner(inode, m);
    SetTimes(inode, m.mtime_ns);
    rc = ext2fs_write_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&inode), sizeof(inode));
    if (rc) return Fail(Ext2Error(rc, "write inode"));
    return {};
  }

  static int FileType(Kind kind) {
    return kind == Kind::kChar    ? EXT2_FT_CHRDEV
           : kind == Kind::kBlock ? EXT2_FT_BLKDEV
                                  : EXT2_FT_FIFO;
  }

  // Enters `ino` in the directory that holds `path`, under its last component.
  Status LinkInto(const std::string& path, ext2_ino_t ino, int filetype) {
    size_t slash = path.rfind('/');
    std::string parent = slash == std::string::npos ? "" : path.substr(0, slash);
    std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
    auto pit = ino_of_.find(parent);
    if (pit == ino_of_.end())
      return Fail(MakeError(ErrorKind::kInternal, "ext4: no parent for {:?}", path));
    errcode_t rc = ext2fs_link(fs_, pit->second, name.c_str(), ino, filetype);
    if (rc == EXT2_ET_DIR_NO_SPACE) {
      rc = ext2fs_expand_dir(fs_, pit->second);
      if (!rc) rc = ext2fs_link(fs_, pit->second, name.c_str(), ino, filetype);
    }
    if (rc) return Fail(Ext2Error(rc, fmt::format("ext4: link {:?}", path)));
    ino_of_[path] = ino;
    return {};
  }

  // Another name of a device node made by MakeSpecial: a directory entry and
  // one more link on the inode.
  Status LinkSpecial(const std::string& path, ext2_ino_t ino, const EntryRecord& m) {
    LX_TRY(LinkInto(path, ino, FileType(m.kind)));
    struct ext2_inode_large inode;
    errcode_t rc =
        ext2fs_read_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&inode), sizeof(inode));
    if (rc) return Fail(Ext2Error(rc, fmt::format("ext4: read inode for {:?}", path)));
    // 16 bits on disk, and the kernel's EXT4_LINK_MAX: a layer may name one
    // device more often than that, which must not wrap the count.
    if (inode.i_links_count >= kMaxLinks) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "ext4: {:?}: over {} links to one inode",
                            path, kMaxLinks));
    }
    ++inode.i_links_count;
    rc = ext2fs_write_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&inode), sizeof(inode));
    if (rc) return Fail(Ext2Error(rc, fmt::format("ext4: write inode for {:?}", path)));
    return {};
  }

  // A device node or fifo the copy lacks: a new inode linked into its parent.
  Result<ext2_ino_t> MakeSpecial(const std::string& path, const EntryRecord& m) {
    size_t slash = path.rfind('/');
    std::string parent = slash == std::string::npos ? "" : path.substr(0, slash);
    auto pit = ino_of_.find(parent);
    if (pit == ino_of_.end())
      return Fail(MakeError(ErrorKind::kInternal, "ext4: no parent for {:?}", path));
    mode_t type = m.kind == Kind::kChar    ? LINUX_S_IFCHR
                  : m.kind == Kind::kBlock ? LINUX_S_IFBLK
                                           : LINUX_S_IFIFO;
    ext2_ino_t ino;
    errcode_t rc = ext2fs_new_inode(fs_, pit->second, static_cast<int>(type), nullptr, &ino);
    if (rc) return Fail(Ext2Error(rc, fmt::format("ext4: new inode for {:?}", path)));
    LX_TRY(LinkInto(path, ino, FileType(m.kind)));
    ext2fs_inode_alloc_stats2(fs_, ino, +1, 0);
    struct ext2_inode_large inode;
    std::memset(&inode, 0, sizeof(inode));
    inode.i_extra_isize = sizeof(struct ext2_inode_large) - EXT2_GOOD_OLD_INODE_SIZE;
    inode.i_mode = static_cast<uint16_t>(type | (m.mode & 07777));
    inode.i_links_count = 1;
    SetOwner(inode, m);
    SetTimes(inode, m.mtime_ns);
    if (m.kind != Kind::kFifo) {
      // The kernel's encodings (fs/ext4/inode.c): old for 8-bit numbers, new otherwise.
      if (m.rdev_major < 256 && m.rdev_minor < 256) {
        inode.i_block[0] = (m.rdev_major << 8) | m.rdev_minor;
      } else {
        inode.i_block[1] =
            (m.rdev_minor & 0xff) | (m.rdev_major << 8) | ((m.rdev_minor & ~0xffu) << 12);
      }
    }
    rc = ext2fs_write_new_inode(fs_, ino, reinterpret_cast<ext2_inode*>(&inode));
    if (rc) return Fail(Ext2Error(rc, fmt::format("ext4: write inode {:?}", path)));
    LX_TRY(SetXattrs(ino, m, false));
    return ino;
  }

  ext2_filsys fs_;
  const ImageTree& tree_;
  std::optional<int64_t> epoch_;
  std::vector<std::pair<std::string, ext2_ino_t>> found_;
  std::unordered_map<std::string, ext2_ino_t> ino_of_;
};

}  // namespace

Result<Ext4Plan> PlanExt4(const ImageTree& tree, const Ext4Options& options) {
  const uint64_t bs = options.block_size;
  if (bs != 1024 && bs != 2048 && bs != 4096) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 block size {} (1024, 2048 or 4096)", bs));
  }
  Ext4Plan plan;
  std::unordered_set<const Inode*> seen;
  std::unordered_map<std::string, uint64_t> dir_bytes;
  uint64_t blocks = 0;
  for (const auto& [path, inode] : tree.entries()) {
    const EntryRecord& m = inode->meta;
    if (!path.empty()) {
      size_t slash = path.rfind('/');
      std::string parent = slash == std::string::npos ? "" : path.substr(0, slash);
      size_t name_len = path.size() - (slash == std::string::npos ? 0 : slash + 1);
      dir_bytes[parent] += RoundUp(8 + name_len, 4);
    }
    if (!seen.insert(inode.get()).second) continue;
    ++plan.inodes;
    size_t xattr_bytes = 0;
    for (const auto& [n, v] : m.xattrs)
      xattr_bytes += RoundUp(16 + n.size(), 4) + RoundUp(v.size(), 4);
    if (xattr_bytes > 96) blocks += (xattr_bytes + bs - 1) / bs;  // past the in-inode space
    if (m.kind == Kind::kFile) {
      plan.content_bytes += m.data_bytes;
      // Blocks for the data present: a sparse file's holes take none.
      uint64_t data = (m.data_bytes + bs - 1) / bs;
      blocks += data + data / 300 + (data > 4 ? 1 : 0);  // extent tree blocks, generously
    } else if (m.kind == Kind::kSymlink && m.symlink_target.size() >= 60) {
      blocks += 1;
    }
  }
  for (const auto& [path, inode] : tree.entries()) {
    if (inode->meta.kind != Kind::kDir) continue;
    auto it = dir_bytes.find(path);
    uint64_t bytes = (it == dir_bytes.end() ? 0 : it->second) + 24;  // "." and ".."
    blocks += (bytes + bs - 1) / bs + (bytes > bs ? 1 : 0);          // + an htree index block
  }
  blocks += 4 + 16;  // lost+found, and slack for the root and resize inode
  plan.inode_count = plan.inodes + plan.inodes / 10 + 64;
  if (options.inode_ratio) plan.inode_count = 0;
  uint64_t inode_table = plan.inode_count * 256;
  uint64_t size = blocks * bs + inode_table;
  // mkfs adds a journal sized from the filesystem; bitmaps and group
  // descriptors cost a little per group; then 5% headroom and 4 MiB.
  int journal_blocks = ext2fs_default_journal_size(size / bs);
  if (journal_blocks > 0) size += static_cast<uint64_t>(journal_blocks) * bs;
  size += size / 20 + 4 * 1024 * 1024 + (size / (bs * 8 * bs)) * 2 * bs;
  if (options.inode_ratio) size += (size / *options.inode_ratio) * 256;
  size = RoundUp(size, 1024 * 1024);
  if (options.size_bytes) {
    uint64_t need = RoundUp(blocks * bs + inode_table, 1024 * 1024);
    if (*options.size_bytes < need) {
      return Fail(MakeError(ErrorKind::kPolicy,
                            "ext4 size {} bytes is too small: the content needs at least {} bytes",
                            *options.size_bytes, need));
    }
    size = RoundUp(*options.size_bytes, bs);
  }
  plan.size_bytes = size;
  return plan;
}

Result<Ext4Report> BuildExt4(const std::string& rootfs_path, const ImageTree& tree,
                             const Ext4Plan& plan, const Ext4Options& options,
                             const std::string& image_path, const ToolControl& control) {
  auto log = Logger("ext4");
  Ext4Report report{.plan = plan};
  int64_t start = sandbox::MonotonicNs();

  std::vector<std::string> argv;
  if (::geteuid() != 0) {
    // The tree is ours but keeps the image's modes (a 0000 file, a 0500 dir):
    // as root of a user namespace over our own files, mkfs reads them all.
    argv = {FindTool("unshare"), "--map-root-user", "--"};
  }
  std::string extended = "root_owner=0:0";
  std::optional<std::string> uuid = options.uuid;
  std::optional<int64_t> epoch;
  if (options.reproducible) {
    epoch = options.source_date_epoch;
    if (!epoch) {
      int64_t newest = 0;
      for (const auto& [path, inode] : tree.entries()) {
        newest = std::max<int64_t>(newest, inode->meta.mtime_ns / 1'000'000'000);
      }
      epoch = newest;
    }
    if (!uuid) uuid = DerivedUuid(options.seed);
    extended += ",hash_seed=" + *uuid;
  }
  for (std::string a :
       {FindTool("mkfs.ext4"), std::string("-F"), std::string("-q"), std::string("-t"),
        std::string("ext4"), std::string("-b"), std::to_string(options.block_size),
        std::string("-m"), std::string("0"), std::string("-E"), extended}) {
    argv.push_back(std::move(a));
  }
  if (options.inode_ratio) {
    argv.insert(argv.end(), {"-i", std::to_string(*options.inode_ratio)});
  } else {
    argv.insert(argv.end(), {"-N", std::to_string(plan.inode_count)});
  }
  if (!options.label.empty()) argv.insert(argv.end(), {"-L", options.label});
  if (uuid) argv.insert(argv.end(), {"-U", *uuid});
  argv.insert(argv.end(),
              {"-d", rootfs_path, image_path, fmt::format("{}k", plan.size_bytes / 1024)});

  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, "E2FSPROGS_FAKE_TIME=", 20) != 0 && std::strncmp(*e, "MKE2FS_", 7) != 0) {
      env.emplace_back(*e);
    }
  }
  if (epoch) env.push_back(fmt::format("E2FSPROGS_FAKE_TIME={}", *epoch));
  std::string output;
  LX_ASSIGN_OR_RETURN(int rc, RunTool(argv, env, control, &output));
  if (rc != 0) {
    return Fail(
        MakeError(ErrorKind::kOs, "mkfs.ext4 -d failed (status {}): {}", rc, LastLine(output)));
  }
  report.mkfs_ns = sandbox::MonotonicNs() - start;
  log->info("mkfs: size={} inodes={} ms={:.1f}", plan.size_bytes, plan.inode_count,
            report.mkfs_ns / 1e6);

  int64_t pass_start = sandbox::MonotonicNs();
  ext2_filsys fs = nullptr;
  errcode_t err = ext2fs_open2(image_path.c_str(), nullptr, EXT2_FLAG_RW | EXT2_FLAG_64BITS, 0, 0,
                               unix_io_manager, &fs);
  if (err) return Fail(Ext2Error(err, "ext4: open image"));
  err = ext2fs_read_bitmaps(fs);
  Status status = err ? Status(Fail(Ext2Error(err, "ext4: read bitmaps")))
                      : OwnershipPass(fs, tree, epoch).Run();
  errcode_t close_err = status ? ext2fs_close_free(&fs) : (ext2fs_free(fs), 0);
  if (!status) return Fail(status.error());
  if (close_err) return Fail(Ext2Error(close_err, "ext4: write image"));
  report.pass_ns = sandbox::MonotonicNs() - pass_start;
  log->info("ownership pass: entries={} ms={:.1f}", tree.size(), report.pass_ns / 1e6);
  return report;
}

}  // namespace layerx::broker
