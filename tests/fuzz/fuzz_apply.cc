// fuzz_apply: the extractor's side on arbitrary bytes, outside a jail.
//
// The input is one to kMaxLayers layers joined by kLayerSeparator; its last
// byte picks the policy's entry rules (RulesFrom). Each layer is fed through a
// memfd to LayerReader (which detects the compression), Applier and
// ExtractLayer, as extractor/main.cc does, into one fresh rootfs per input
// (mkdtemp below /tmp); the records go to one broker::ImageTree, as in a job.
// The target traps when
//  - the ImageTree refuses a record as kPeer: an honest applier must only send
//    what the broker accepts;
//  - anything changed beside the rootfs (the sentinel dir next to it, or the
//    dir holding both): a name got out of the root. Outside a jail only the
//    applier's own resolver keeps it in, which is exactly what is tested;
//  - after a layer applied, the rootfs and the tree disagree: every name on
//    disk is in the tree with the same kind (size, link target, shared inode),
//    and every name in the tree is on disk, but device nodes, which the jail
//    cannot make and which live in the metadata only (every name of one: a
//    hardlink to a device is recorded without a linkat), and are on no disk.
// Run as root, the applier works rootless-style (no chown), like a user's job.
#include <dirent.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "broker/tree/image_tree.h"
#include "extractor/applier.h"
#include "extractor/extract.h"
#include "extractor/layer_reader.h"
#include "sandbox/sys.h"

namespace {

using namespace layerx;
using extractor::Kind;

constexpr std::string_view kLayerSeparator = "--layerx-fuzz-next-layer--";
constexpr size_t kMaxLayers = 3;

[[noreturn]] void Bug(const std::string& what) {
  std::fprintf(stderr, "fuzz_apply: BUG: %s\n", what.c_str());
  __builtin_trap();
}

policy::Limits FuzzLimits() {
  policy::Limits limits;
  limits.max_entries = 10000;
  limits.max_layer_bytes = 4 * policy::kMiB;
  limits.max_image_bytes = 8 * policy::kMiB;
  limits.max_path_depth = 128;  // the disk walk below holds a fd per level
  return limits;
}

// The entry rules of the job, from the input's last byte (two bits each for
// devices, fifos, setuid and file caps: keep, strip, refuse, keep), so that a
// plain tar, which ends in zeros, keeps everything.
policy::EntryRules RulesFrom(std::string_view input) {
  uint8_t bits = input.empty() ? 0 : static_cast<uint8_t>(input.back());
  auto treatment = [&](int shift) {
    switch ((bits >> shift) & 3) {
      case 1:
        return policy::Treatment::kStrip;
      case 2:
        return policy::Treatment::kRefuse;
      default:
        return policy::Treatment::kKeep;
    }
  };
  policy::EntryRules rules;
  rules.devices = treatment(0);
  rules.fifos = treatment(2);
  rules.setuid = treatment(4);
  rules.file_caps = treatment(6);
  return rules;
}

// Forwards to the tree; a kPeer refusal is the applier's bug.
class CheckingSink : public extractor::RecordSink {
 public:
  explicit CheckingSink(broker::ImageTree& tree) : tree_(tree) {}
  Status Add(extractor::EntryRecord record) override {
    std::string path = record.path;
    return Check(tree_.Add(std::move(record)), path);
  }
  Status Add(extractor::RemovalRecord record) override {
    std::string path = record.path;
    return Check(tree_.Add(std::move(record)), path);
  }

 private:
  Status Check(Status status, const std::string& path) {
    if (!status && status.error().kind() == ErrorKind::kPeer) {
      Bug(fmt::format("the tree refused the applier's record for {:?}: {}", path,
                      status.error().ToString()));
    }
    return status;
  }
  broker::ImageTree& tree_;
};

struct OnDisk {
  mode_t type;
  off_t size;
  dev_t dev;
  ino_t ino;
  std::string target;  // symlinks
};

std::vector<std::string> Names(int dir) {
  std::vector<std::string> names;
  // A fresh open file (a dup would share, and leave, the read position).
  int fd = ::openat(dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) Bug("open dir");
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) Bug("fdopendir");
  while (struct dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
      names.emplace_back(e->d_name);
    }
  }
  ::closedir(d);
  return names;
}

// Every name below `dir`, never following a link.
void Walk(int dir, const std::string& prefix, std::map<std::string, OnDisk>& out) {
  for (const std::string& name : Names(dir)) {
    std::string path = prefix.empty() ? name : prefix + "/" + name;
    struct stat st;
    if (::fstatat(dir, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) Bug("fstatat " + path);
    OnDisk entry{st.st_mode & S_IFMT, st.st_size, st.st_dev, st.st_ino, ""};
    if (S_ISLNK(st.st_mode)) {
      char buf[8192];
      ssize_t n = ::readlinkat(dir, name.c_str(), buf, sizeof(buf));
      if (n < 0) Bug("readlinkat " + path);
      entry.target.assign(buf, static_cast<size_t>(n));
    }
    out.emplace(path, entry);
    if (S_ISDIR(st.st_mode)) {
      int sub = ::openat(dir, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (sub < 0) Bug("openat " + path);
      Walk(sub, path, out);
      ::close(sub);
    }
  }
}

mode_t TypeOf(Kind kind) {
  switch (kind) {
    case Kind::kFile:
      return S_IFREG;
    case Kind::kDir:
      return S_IFDIR;
    case Kind::kSymlink:
      return S_IFLNK;
    case Kind::kFifo:
      return S_IFIFO;
    case Kind::kChar:
    case Kind::kBlock:
    case Kind::kHardlink:
      break;
  }
  return 0;
}

// The rootfs and the merged tree describe the same files.
void CompareTreeWithDisk(int root, const broker::ImageTree& tree) {
  std::map<std::string, OnDisk> disk;
  int dir = ::openat(root, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);  // root is O_PATH
  if (dir < 0) Bug("open rootfs");
  Walk(dir, "", disk);
  ::close(dir);
  std::map<const broker::Inode*, std::set<std::string>> tree_links;
  std::map<std::pair<dev_t, ino_t>, std::set<std::string>> disk_links;
  for (const auto& [path, inode] : tree.entries()) {
    if (path.empty()) {
      if (inode->meta.kind != Kind::kDir) Bug("the root is no directory in the tree");
      continue;
    }
    const extractor::EntryRecord& m = inode->meta;
    auto it = disk.find(path);
    if (m.kind == Kind::kChar || m.kind == Kind::kBlock) {
      if (it != disk.end()) Bug(fmt::format("device {:?} has a file on disk", path));
      continue;
    }
    if (it == disk.end()) Bug(fmt::format("{:?} is in the tree, not on disk", path));
    const OnDisk& d = it->second;
    if (TypeOf(m.kind) != d.type) {
      Bug(fmt::format("{:?} is a {} in the tree, mode {:o} on disk", path,
                      extractor::KindName(m.kind), d.type));
    }
    if (m.kind == Kind::kFile && static_cast<uint64_t>(d.size) != m.size) {
      Bug(fmt::format("{:?} is {} bytes in the tree, {} on disk", path, m.size, d.size));
    }
    if (m.kind == Kind::kSymlink && d.target != m.symlink_target) {
      Bug(fmt::format("symlink {:?}: {:?} in the tree, {:?} on disk", path, m.symlink_target,
                      d.target));
    }
    if (m.kind != Kind::kDir) {
      tree_links[inode.get()].insert(path);
      disk_links[{d.dev, d.ino}].insert(path);
    }
  }
  for (const auto& [path, d] : disk) {
    if (!tree.entries().contains(path)) Bug(fmt::format("{:?} is on disk, not in the tree", path));
  }
  for (const auto& [path, inode] : tree.entries()) {
    if (path.empty() || !tree_links.contains(inode.get())) continue;
    const OnDisk& d = disk.at(path);
    if (tree_links[inode.get()] != disk_links[{d.dev, d.ino}]) {
      Bug(fmt::format("{:?}: its hardlinks differ between the tree and the disk", path));
    }
  }
}

struct Sandbox {
  std::string base;  // /tmp/lx-fuzz-apply.XXXXXX: holds "sentinel" and the rootfs
  sandbox::UniqueFd base_fd;
  struct stat sentinel_st;
};

Sandbox* g_box = nullptr;

void RemoveBase() {
  if (g_box == nullptr) return;
  (void)sandbox::RemoveTreeAt(AT_FDCWD, g_box->base);
}

struct stat StatSentinel() {
  struct stat st;
  if (::fstatat(g_box->base_fd.get(), "sentinel", &st, AT_SYMLINK_NOFOLLOW) != 0) {
    Bug("the sentinel is gone");
  }
  return st;
}

// Nothing beside the rootfs changed: the base holds the sentinel (and the
// rootfs, when given), the sentinel is empty and as it was.
void CheckOutside(const std::string& rootfs) {
  std::set<std::string> want = {"sentinel"};
  if (!rootfs.empty()) want.insert(rootfs);
  std::vector<std::string> names = Names(g_box->base_fd.get());
  if (std::set<std::string>(names.begin(), names.end()) != want) {
    Bug("something was made beside the rootfs");
  }
  struct stat st = StatSentinel();
  const struct stat& was = g_box->sentinel_st;
  if (!S_ISDIR(st.st_mode) || st.st_ino != was.st_ino || st.st_mode != was.st_mode ||
      st.st_uid != was.st_uid || st.st_gid != was.st_gid ||
      st.st_mtim.tv_sec != was.st_mtim.tv_sec || st.st_mtim.tv_nsec != was.st_mtim.tv_nsec ||
      st.st_nlink != was.st_nlink) {
    Bug("the sentinel beside the rootfs changed");
  }
  int fd = ::openat(g_box->base_fd.get(), "sentinel", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) Bug("open sentinel");
  bool empty = Names(fd).empty();
  ::close(fd);
  if (!empty) Bug("something was made in the sentinel beside the rootfs");
}

std::vector<std::string_view> SplitLayers(std::string_view input) {
  std::vector<std::string_view> layers;
  while (layers.size() + 1 < kMaxLayers) {
    size_t at = input.find(kLayerSeparator);
    if (at == std::string_view::npos) break;
    layers.push_back(input.substr(0, at));
    input.remove_prefix(at + kLayerSeparator.size());
  }
  layers.push_back(input);
  return layers;
}

// One layer into the rootfs; false when it was refused (the job would stop).
bool ApplyLayer(std::string_view bytes, int root, const policy::Limits& limits,
                const policy::EntryRules& rules, CheckingSink& sink) {
  auto memfd = sandbox::MemfdCreate("fuzz-layer");
  if (!memfd) Bug("memfd_create");
  if (!sandbox::WriteAll(memfd->get(), std::as_bytes(std::span(bytes.data(), bytes.size())))) {
    Bug("write memfd");
  }
  if (::lseek(memfd->get(), 0, SEEK_SET) != 0) Bug("lseek");
  auto reader = extractor::LayerReader::Create(limits);
  if (!reader) Bug("LayerReader::Create: " + reader.error().ToString());
  static const bool verbose = std::getenv("LAYERX_FUZZ_VERBOSE") != nullptr;
  if (Status opened = (*reader)->Open(memfd->get()); !opened) {
    if (verbose) std::fprintf(stderr, "layer refused: %s\n", opened.error().ToString().c_str());
    return false;
  }
  extractor::Applier applier(root, limits, extractor::ApplyOptions{.chown = false, .rules = rules},
                             sink);
  auto totals = extractor::ExtractLayer(**reader, applier, limits);
  if (!totals) {
    // As the broker reports a refused layer: the untrusted name through {:?}.
    (void)fmt::format("entry {:?}: {}", totals.error().entry, totals.error().error.ToString());
  }
  if (verbose) {
    std::fprintf(stderr, "layer %s: %s\n", totals ? "applied" : "refused",
                 totals ? fmt::format("{} entries", totals->entries).c_str()
                        : fmt::format("{:?}: {}", totals.error().entry,
                                      totals.error().error.ToString())
                              .c_str());
  }
  return totals.has_value();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  extractor::PrepareLibrariesBeforeJail();
  char base[] = "/tmp/lx-fuzz-apply.XXXXXX";
  if (::mkdtemp(base) == nullptr) Bug("mkdtemp");
  g_box = new Sandbox{base, {}, {}};
  auto fd = sandbox::OpenAt(AT_FDCWD, base, O_RDONLY | O_DIRECTORY);
  if (!fd) Bug("open base");
  g_box->base_fd = std::move(*fd);
  if (!sandbox::MkdirAt(g_box->base_fd.get(), "sentinel", 0755)) Bug("mkdir sentinel");
  g_box->sentinel_st = StatSentinel();
  std::atexit(RemoveBase);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const policy::Limits limits = FuzzLimits();
  std::string_view input(reinterpret_cast<const char*>(data), size);

  std::string rootfs_path = g_box->base + "/rootfs.XXXXXX";
  if (::mkdtemp(rootfs_path.data()) == nullptr) Bug("mkdtemp rootfs");
  std::string rootfs = rootfs_path.substr(g_box->base.size() + 1);
  {
    auto root = sandbox::OpenAt(g_box->base_fd.get(), rootfs, O_PATH | O_DIRECTORY | O_NOFOLLOW);
    if (!root) Bug("open rootfs");
    policy::EntryRules rules = RulesFrom(input);
    broker::ImageTree tree(limits, rules);
    CheckingSink sink(tree);
    for (std::string_view layer : SplitLayers(input)) {
      tree.BeginLayer();  // as RunLayer does
      bool applied = ApplyLayer(layer, root->get(), limits, rules, sink);
      CheckOutside(rootfs);
      if (!applied) break;
      CompareTreeWithDisk(root->get(), tree);
      if (std::getenv("LAYERX_FUZZ_VERBOSE") != nullptr) {
        for (const auto& [path, inode] : tree.entries()) {
          std::fprintf(stderr, "  %s %s\n", extractor::KindName(inode->meta.kind),
                       fmt::format("{:?}", path).c_str());
        }
      }
    }
  }
  if (Status removed = sandbox::RemoveTreeAt(g_box->base_fd.get(), rootfs); !removed) {
    Bug("remove rootfs: " + removed.error().ToString());
  }
  CheckOutside("");
  return 0;
}
