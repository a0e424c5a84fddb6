// Hostile and semantic layers, end to end through `layerx extract`. Every test
// plants a world-writable probe directory with a sentinel OUTSIDE the rootfs
// and proves afterwards that nothing in it changed; ctest runs the whole file
// as root and as uid 65534 (tests/CMakeLists.txt), so each case holds both ways.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <grp.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <nlohmann/json.hpp>
#include <sstream>

#include "sandbox/sys.h"
#include "tests/fixtures/layer_writer.h"
#include "tests/fixtures/test_util.h"

namespace layerx {
namespace {

using testing::LayerWriter;
using testing::ReadFile;

// Everything about a directory tree that an escape could change.
std::map<std::string, std::string> Snapshot(const std::string& root) {
  std::map<std::string, std::string> out;
  std::function<void(const std::string&)> walk = [&](const std::string& rel) {
    std::string path = root + rel;
    struct stat st;
    if (lstat(path.c_str(), &st) != 0) return;
    char xattrs[4096] = {};
    ssize_t xl = llistxattr(path.c_str(), xattrs, sizeof(xattrs));
    std::ostringstream s;
    s << std::oct << st.st_mode << std::dec << " " << st.st_uid << ":" << st.st_gid << " n"
      << st.st_nlink << " s" << st.st_size << " m" << st.st_mtim.tv_sec << "." << st.st_mtim.tv_nsec
      << " x" << std::string(xattrs, xl > 0 ? static_cast<size_t>(xl) : 0);
    if (S_ISREG(st.st_mode)) s << " c" << ReadFile(path);
    out[rel] = s.str();
    if (!S_ISDIR(st.st_mode)) return;
    DIR* d = opendir(path.c_str());
    while (d != nullptr) {
      struct dirent* e = readdir(d);
      if (e == nullptr) break;
      std::string name = e->d_name;
      if (name != "." && name != "..") walk(rel + "/" + name);
    }
    if (d) closedir(d);
  };
  walk("");
  return out;
}

class HostileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char work[] = "/tmp/layerx-hostile-XXXXXX";
    char probe[] = "/tmp/layerx-probe-XXXXXX";
    ASSERT_NE(mkdtemp(work), nullptr);
    ASSERT_NE(mkdtemp(probe), nullptr);
    dir_ = work;
    probe_ = probe;
    // World-writable, so a rootless escape would not be stopped by permissions.
    ASSERT_EQ(chmod(probe_.c_str(), 0777), 0);
    ASSERT_EQ(mkdir((probe_ + "/sub").c_str(), 0777), 0);
    std::ofstream(probe_ + "/sentinel") << "sentinel";
    ASSERT_EQ(chmod((probe_ + "/sentinel").c_str(), 0666), 0);
    probe_before_ = Snapshot(probe_);
  }
  void TearDown() override {
    EXPECT_EQ(Snapshot(probe_), probe_before_) << "the host probe changed: an escape";
    (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_);
    (void)sandbox::RemoveTreeAt(AT_FDCWD, probe_);
  }

  std::string Layer(int n) { return dir_ + "/l" + std::to_string(n) + ".tar"; }
  std::string Out(const std::string& rel = "") {
    return dir_ + "/out" + (rel.empty() ? "" : "/" + rel);
  }
  // The probe's path as it lands inside the rootfs when a link clamps there.
  std::string InRoot(const std::string& rel) { return Out(probe_.substr(1) + "/" + rel); }

  // Runs layerx on layers 1..n; returns the exit status, stderr in err_.
  int Extract(int n, const std::string& extra = "") {
    std::string cmd = std::string(LAYERX_BIN) + " extract";
    for (int i = 1; i <= n; ++i) cmd += " " + Layer(i);
    cmd += " --rootfs " + Out() + " --manifest " + dir_ + "/m.jsonl " + extra + " -q 2>" + dir_ +
           "/err";
    int status = system(cmd.c_str());
    err_ = ReadFile(dir_ + "/err");
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  // A refused job: exit 1, one line naming the layer, nothing left behind.
  void ExpectRefused(int n, int bad_layer) {
    auto before = Listing();
    EXPECT_EQ(Extract(n), 1) << err_;
    EXPECT_EQ(std::count(err_.begin(), err_.end(), '\n'), 1) << err_;
    EXPECT_NE(err_.find("layer " + std::to_string(bad_layer)), std::string::npos) << err_;
    before.erase(std::remove(before.begin(), before.end(), "err"), before.end());
    auto after = Listing();
    after.erase(std::remove(after.begin(), after.end(), "err"), after.end());
    EXPECT_EQ(after, before) << "output or work dir left behind";
  }
  std::vector<std::string> Listing() { return testing::Listing(dir_); }
  static bool IsLink(const std::string& p) {
    struct stat st;
    return lstat(p.c_str(), &st) == 0 && S_ISLNK(st.st_mode);
  }
  static bool IsDir(const std::string& p) {
    struct stat st;
    return lstat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
  }
  static bool IsFile(const std::string& p) {
    struct stat st;
    return lstat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
  }
  static std::string Target(const std::string& p) {
    char buf[4096];
    ssize_t n = readlink(p.c_str(), buf, sizeof(buf));
    return n < 0 ? "" : std::string(buf, static_cast<size_t>(n));
  }
  std::map<std::string, nlohmann::json> Manifest() {
    std::map<std::string, nlohmann::json> out;
    std::istringstream lines(ReadFile(dir_ + "/m.jsonl"));
    std::string line;
    while (std::getline(lines, line)) {
      auto j = nlohmann::json::parse(line);
      out[j.contains("path") ? j["path"].get<std::string>()
                             : "b64:" + j["path_b64"].get<std::string>()] = j;
    }
    return out;
  }

  std::string dir_, probe_, err_;
  std::map<std::string, std::string> probe_before_;
};

// --- escapes ---------------------------------------------------------------

TEST_F(HostileTest, CannotWriteThroughAbsoluteSymlinkParent) {
  // etc -> /tmp/probe (absolute, at the host probe), then etc/x and etc/sentinel.
  LayerWriter(Layer(1)).Symlink("etc", probe_);
  LayerWriter(Layer(2)).File("etc/x", "pwn").File("etc/sentinel", "pwn");
  ASSERT_EQ(Extract(2), 0) << err_;
  EXPECT_TRUE(IsLink(Out("etc")));
  EXPECT_EQ(ReadFile(InRoot("x")), "pwn");  // clamped into the image
  EXPECT_EQ(ReadFile(InRoot("sentinel")), "pwn");
}

TEST_F(HostileTest, CannotWriteThroughSymlinkParentInSameLayer) {
  LayerWriter(Layer(1)).Symlink("etc", probe_).File("etc/x", "pwn");
  ASSERT_EQ(Extract(1), 0) << err_;
  EXPECT_EQ(ReadFile(InRoot("x")), "pwn");
}

TEST_F(HostileTest, CannotClimbWithRelativeDotDotChain) {
  LayerWriter(Layer(1))
      .Dir("a")
      .Symlink("a/up", "../../../../../../../../.." + probe_)
      .File("a/up/sentinel", "pwn");
  ASSERT_EQ(Extract(1), 0) << err_;
  EXPECT_EQ(ReadFile(InRoot("sentinel")), "pwn");
}

TEST_F(HostileTest, CannotEscapeThroughMultiHopChain) {
  LayerWriter(Layer(1))
      .Dir("d")
      .Symlink("h1", "h2")
      .Symlink("h2", "d/../h3")
      .Symlink("h3", "/../../.." + probe_ + "/sub")
      .File("h1/x", "pwn");
  ASSERT_EQ(Extract(1), 0) << err_;
  EXPECT_EQ(ReadFile(InRoot("sub/x")), "pwn");
}

TEST_F(HostileTest, CannotWhiteoutThroughSymlinkedParent) {
  LayerWriter(Layer(1)).Symlink("link", probe_).Symlink("sub", probe_ + "/sub");
  LayerWriter(Layer(2)).Whiteout("link", "sentinel").Opaque("link").Opaque("sub");
  ASSERT_EQ(Extract(2), 0) << err_;
  EXPECT_TRUE(IsLink(Out("link")));
}

TEST_F(HostileTest, RejectsHardlinkToAbsoluteHostPath) {
  LayerWriter(Layer(1)).Hardlink("h", probe_ + "/sentinel");
  ExpectRefused(1, 1);
}

TEST_F(HostileTest, HardlinkToAbsolutePathLinksTheImagesFile) {
  LayerWriter(Layer(1))
      .File(probe_.substr(1) + "/sentinel", "image's own")
      .Hardlink("h", probe_ + "/sentinel");
  ASSERT_EQ(Extract(1), 0) << err_;
  EXPECT_EQ(ReadFile(Out("h")), "image's own");
}

TEST_F(HostileTest, RejectsHardlinkClimbingOut) {
  LayerWriter(Layer(1)).Hardlink("h", "../../../etc/passwd");
  ExpectRefused(1, 1);
}

TEST_F(HostileTest, CannotWriteThroughHardlinkToSymlink) {
  // h is a hardlink to the symlink s (pointing out); a later write to h
  // replaces h, it never follows it.
  LayerWriter(Layer(1)).Symlink("s", probe_ + "/sentinel").Hardlink("h", "s");
  LayerWriter(Layer(2)).File("h", "overwrite");
  ASSERT_EQ(Extract(1), 0) << err_;
  EXPECT_TRUE(IsLink(Out("h")));
  EXPECT_EQ(Target(Out("h")), probe_ + "/sentinel");
  (void)sandbox::RemoveTreeAt(AT_FDCWD, Out());
  ASSERT_EQ(Extract(2), 0) << err_;
  EXPECT_TRUE(IsFile(Out("h")));
  EXPECT_EQ(ReadFile(Out("h")), "overwrite");
}

TEST_F(HostileTest, MetadataOnSymlinkPathReplacesTheLink) {
  // chmod/utime/xattr for an entry at a symlink's path: the link is replaced,
  // the host file it points to keeps its mode, times and xattrs.
  LayerWriter(Layer(1)).Symlink("s", probe_ + "/sentinel").Symlink("d", probe_ + "/sub");
  LayerWriter(Layer(2)).File("s", "x", 04777, 0, 0, {{"user.pwn", "1"}}).Dir("d", 0700);
  ASSERT_EQ(Extract(2), 0) << err_;
  EXPECT_TRUE(IsFile(Out("s")));
  EXPECT_TRUE(IsDir(Out("d")));
}

TEST_F(HostileTest, RejectsDotDotNames) {
  LayerWriter(Layer(1)).File("ok", "1").File("../escape", "pwn");
  ExpectRefused(1, 1);
}

TEST_F(HostileTest, RejectsNestedDotDotNames) {
  LayerWriter(Layer(1)).File("a/../../escape", "pwn");
  ExpectRefused(1, 1);
}

TEST_F(HostileTest, AbsoluteNamesLandInsideTheImage) {
  LayerWriter(Layer(1)).File(probe_ + "/sentinel", "inside");
  ASSERT_EQ(Extract(1), 0) << err_;
  EXPECT_EQ(ReadFile(InRoot("sentinel")), "inside");
}

TEST_F(HostileTest, SymlinkLoopIsAClearError) {
  LayerWriter(Layer(1)).Symlink("a", "b").Symlink("b", "a").File("a/x", "pwn");
  ExpectRefused(1, 1);
  EXPECT_NE(err_.find("ELOOP"), std::string::npos) << err_;
}

TEST_F(HostileTest, DanglingLinkParentIsConfined) {
  LayerWriter(Layer(1)).Symlink("d", "/nonexistent/dir").File("d/x", "ok");
  ASSERT_EQ(Extract(1), 0) << err_;
  EXPECT_EQ(ReadFile(Out("nonexistent/dir/x")), "ok");
}

TEST_F(HostileTest, DeepNesting200Levels) {
  std::string deep;
  for (int i = 0; i < 200; ++i) deep += "d/";
  LayerWriter(Layer(1)).File(deep + "f", "deep");
  LayerWriter(Layer(2)).Whiteout("", "d");
  ASSERT_EQ(Extract(1), 0) << err_;
  EXPECT_EQ(ReadFile(Out(deep + "f")), "deep");
  (void)sandbox::RemoveTreeAt(AT_FDCWD, Out());
  ASSERT_EQ(Extract(2), 0) << err_;
  EXPECT_FALSE(IsDir(Out("d")));
}

TEST_F(HostileTest, RejectsPaxNameLongerThanPathMax) {
  std::string name;
  while (name.size() < 5000) name += std::string(200, 'n') + "/";
  LayerWriter(Layer(1)).File(name + "f", "long");
  ExpectRefused(1, 1);
}

TEST_F(HostileTest, RootEntryThatIsASymlinkOrFileIsIgnored) {
  LayerWriter(Layer(1)).Symlink("./", probe_).File("x", "in root");
  LayerWriter(Layer(2)).File(".", "a file root").File("y", "in root");
  ASSERT_EQ(Extract(2), 0) << err_;
  EXPECT_TRUE(IsDir(Out()));
  EXPECT_EQ(ReadFile(Out("x")), "in root");
  EXPECT_EQ(ReadFile(Out("y")), "in root");
}

TEST_F(HostileTest, RejectsWhiteoutOfDotDot) {
  LayerWriter(Layer(1)).Dir("a").File("a/.wh...", "");
  ExpectRefused(1, 1);
}

// --- semantics -------------------------------------------------------------

TEST_F(HostileTest, UsrMergeAbsoluteAndRelative) {
  LayerWriter(Layer(1))
      .Dir("usr")
      .Dir("usr/bin")
      .Dir("usr/lib")
      .Symlink("bin", "usr/bin")
      .Symlink("lib", "/usr/lib");
  LayerWriter(Layer(2)).File("bin/tool", "t", 0755).File("lib/libx.so", "l");
  ASSERT_EQ(Extract(2), 0) << err_;
  EXPECT_EQ(ReadFile(Out("usr/bin/tool")), "t");
  EXPECT_EQ(ReadFile(Out("usr/lib/libx.so")), "l");
  EXPECT_TRUE(IsLink(Out("bin")));
  EXPECT_TRUE(IsLink(Out("lib")));
  auto m = Manifest();
  EXPECT_TRUE(m.contains("usr/bin/tool"));
  EXPECT_FALSE(m.contains("bin/tool"));
}

TEST_F(HostileTest, AlternativesAndDanglingResolvConf) {
  LayerWriter(Layer(1))
      .File("usr/bin/mawk", "awk")
      .Symlink("etc/alternatives/awk", "/usr/bin/mawk")
      .Symlink("etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf");
  ASSERT_EQ(Extract(1), 0) << err_;
  EXPECT_EQ(Target(Out("etc/alternatives/awk")), "/usr/bin/mawk");
  EXPECT_EQ(Target(Out("etc/resolv.conf")), "../run/systemd/resolve/stub-resolv.conf");
  EXPECT_FALSE(IsDir(Out("run")));
}

TEST_F(HostileTest, ReplacementsAcrossKinds) {
  LayerWriter(Layer(1)).Symlink("s", "target").File("f", "file").Dir("d").File("d/child", "c");
  // file over symlink, dir over file, file over dir (with children)
  LayerWriter(Layer(2)).File("s", "now a file").Dir("f").File("d", "now a file");
  ASSERT_EQ(Extract(2), 0) << err_;
  EXPECT_EQ(ReadFile(Out("s")), "now a file");
  EXPECT_TRUE(IsDir(Out("f")));
  EXPECT_EQ(ReadFile(Out("d")), "now a file");
  auto m = Manifest();
  EXPECT_FALSE(m.contains("d/child"));
  EXPECT_EQ(m["f"]["kind"], "dir");
}

TEST_F(HostileTest, WhiteoutsHideLowerLayersOnly) {
  LayerWriter(Layer(1))
      .Dir("a")
      .File("a/lower", "l")
      .File("a/gone", "g")
      .Dir("o")
      .File("o/lower", "l");
  // missing-name whiteout; plain whiteout before and after a same-layer entry of
  // that name; opaque marker with same-layer siblings before and after it.
  LayerWriter(Layer(2))
      .Whiteout("", "never-existed")
      .Whiteout("a", "gone")
      .Whiteout("a", "lower")
      .File("a/lower", "upper")
      .File("a/new", "n")
      .Whiteout("a", "new")
      .File("o/before", "b")
      .Opaque("o")
      .File("o/after", "a");
  ASSERT_EQ(Extract(2), 0) << err_;
  EXPECT_EQ(ReadFile(Out("a/lower")), "upper");
  EXPECT_EQ(ReadFile(Out("a/new")), "n");
  EXPECT_FALSE(IsFile(Out("a/gone")));
  EXPECT_FALSE(IsFile(Out("o/lower")));
  EXPECT_EQ(ReadFile(Out("o/before")), "b");
  EXPECT_EQ(ReadFile(Out("o/after")), "a");
  auto m = Manifest();
  EXPECT_FALSE(m.contains("a/gone"));
  EXPECT_FALSE(m.contains("o/lower"));
  EXPECT_TRUE(m.contains("o/before"));
  for (const auto& [path, j] : m) EXPECT_EQ(path.find(".wh."), std::string::npos) << path;
}

TEST_F(HostileTest, HardlinksShareAnInodeAndMayComeBeforeTheirTarget) {
  LayerWriter(Layer(1)).Hardlink("early", "late").File("late", "data").Hardlink("again", "late");
  ASSERT_EQ(Extract(1), 0) << err_;
  struct stat a, b, c;
  ASSERT_EQ(stat(Out("early").c_str(), &a), 0);
  ASSERT_EQ(stat(Out("late").c_str(), &b), 0);
  ASSERT_EQ(stat(Out("again").c_str(), &c), 0);
  EXPECT_EQ(a.st_ino, b.st_ino);
  EXPECT_EQ(c.st_ino, b.st_ino);
  EXPECT_EQ(b.st_nlink, 3u);
  auto m = Manifest();
  EXPECT_EQ(m["early"]["inode"], m["late"]["inode"]);
  EXPECT_EQ(m["late"]["nlink"], 3);
}

TEST_F(HostileTest, RejectsHardlinkWhoseTargetNeverComes) {
  LayerWriter(Layer(1)).Hardlink("h", "missing");
  ExpectRefused(1, 1);
}

// --- device nodes: in the metadata only (a user namespace cannot mknod) -----

// Rootless the jail cannot make devices and the rootfs has none; as root the
// broker makes them after the last layer.
static bool IsCharDevice(const std::string& p) {
  struct stat st;
  return lstat(p.c_str(), &st) == 0 && S_ISCHR(st.st_mode);
}

TEST_F(HostileTest, OpaqueMarkerHidesLowerDevices) {
  // Layer 1: d/ with a char device, a file; e/ with a block device.
  // Layer 2: an opaque marker in d/ and a new file d/new, once before the
  // marker in the tar and once after it. The marker hides d/null (which is on
  // no disk) like d/keep; e/blk stays.
  for (bool new_first : {true, false}) {
    SCOPED_TRACE(new_first ? "d/new before the marker" : "d/new after the marker");
    LayerWriter(Layer(1))
        .Dir("d")
        .Device("d/null", false, 1, 3)
        .File("d/keep", "lower")
        .Dir("e")
        .Device("e/blk", true, 8, 0);
    {
      LayerWriter l2(Layer(2));
      if (new_first) l2.File("d/new", "upper");
      l2.Opaque("d");
      if (!new_first) l2.File("d/new", "upper");
    }
    ASSERT_EQ(Extract(2), 0) << err_;
    auto m = Manifest();
    EXPECT_TRUE(m.contains("d/new"));
    EXPECT_FALSE(m.contains("d/null"));
    EXPECT_FALSE(m.contains("d/keep"));
    EXPECT_EQ(m["e/blk"]["kind"], "block");
    EXPECT_EQ(ReadFile(Out("d/new")), "upper");
    EXPECT_FALSE(IsFile(Out("d/keep")));
    EXPECT_FALSE(IsCharDevice(Out("d/null")));
    struct stat st;
    EXPECT_EQ(lstat(Out("e/blk").c_str(), &st) == 0 && S_ISBLK(st.st_mode), geteuid() == 0);
    (void)sandbox::RemoveTreeAt(AT_FDCWD, Out());
  }
}

TEST_F(HostileTest, OpaqueMarkerHidesLowerDevicesDeeperDown) {
  // Layer 1: d/sub/null, d/sub/zero (devices) and the root-level tty.
  // Layer 2 writes d/sub/mine, so d/sub stays (it holds this layer's file),
  // then opaque markers in d/ and at the image root: every lower device goes.
  LayerWriter(Layer(1))
      .Dir("d")
      .Dir("d/sub")
      .Device("d/sub/null", false, 1, 3)
      .Device("d/sub/zero", false, 1, 5)
      .Device("tty", false, 5, 0);
  LayerWriter(Layer(2)).File("d/sub/mine", "m").Opaque("d").Opaque("");
  ASSERT_EQ(Extract(2), 0) << err_;
  auto m = Manifest();
  EXPECT_TRUE(m.contains("d/sub/mine"));
  EXPECT_EQ(m["d/sub"]["kind"], "dir");
  EXPECT_FALSE(m.contains("d/sub/null"));
  EXPECT_FALSE(m.contains("d/sub/zero"));
  EXPECT_FALSE(m.contains("tty"));
  EXPECT_EQ(ReadFile(Out("d/sub/mine")), "m");
  EXPECT_FALSE(IsCharDevice(Out("d/sub/null")));
  EXPECT_FALSE(IsCharDevice(Out("tty")));
}

TEST_F(HostileTest, WhiteoutOfADirThisLayerWroteIntoHidesLowerDevices) {
  // Layer 2 adds d/new, then whites out d: d stays for d/new, and what layer 1
  // put in d goes, the device too.
  LayerWriter(Layer(1)).Dir("d").Device("d/null", false, 1, 3).File("d/keep", "lower");
  LayerWriter(Layer(2)).File("d/new", "upper").Whiteout("", "d");
  ASSERT_EQ(Extract(2), 0) << err_;
  auto m = Manifest();
  EXPECT_TRUE(m.contains("d/new"));
  EXPECT_FALSE(m.contains("d/null"));
  EXPECT_FALSE(m.contains("d/keep"));
  EXPECT_FALSE(IsCharDevice(Out("d/null")));
}

// Both names of one device inode: one inode in the manifest, a real hardlink
// on a root-made rootfs, nothing on a rootless one.
void ExpectLinkedDevices(const std::map<std::string, nlohmann::json>& m, const std::string& a,
                         const std::string& b, const std::string& out_a, const std::string& out_b) {
  ASSERT_TRUE(m.contains(a)) << a;
  ASSERT_TRUE(m.contains(b)) << b;
  EXPECT_EQ(m.at(a)["kind"], "char");
  EXPECT_EQ(m.at(b)["kind"], "char");
  EXPECT_EQ(m.at(a)["inode"], m.at(b)["inode"]);
  EXPECT_EQ(m.at(a)["nlink"], 2);
  EXPECT_EQ(m.at(b)["nlink"], 2);
  EXPECT_EQ(m.at(b)["rdev_major"], m.at(a)["rdev_major"]);
  EXPECT_EQ(m.at(b)["rdev_minor"], m.at(a)["rdev_minor"]);
  struct stat sa, sb;
  bool has_a = lstat(out_a.c_str(), &sa) == 0;
  bool has_b = lstat(out_b.c_str(), &sb) == 0;
  EXPECT_EQ(has_a, geteuid() == 0);
  EXPECT_EQ(has_b, geteuid() == 0);
  if (has_a && has_b) {
    EXPECT_TRUE(S_ISCHR(sa.st_mode));
    EXPECT_TRUE(S_ISCHR(sb.st_mode));
    EXPECT_EQ(sa.st_ino, sb.st_ino);
    EXPECT_EQ(sa.st_nlink, 2u);
  }
}

TEST_F(HostileTest, HardlinkToLowerLayerDevice) {
  // Layer 1: char device dev/tty0. Layer 2: dev/console, a hardlink to it.
  LayerWriter(Layer(1)).Dir("dev").Device("dev/tty0", false, 4, 0);
  LayerWriter(Layer(2)).Hardlink("dev/console", "dev/tty0");
  ASSERT_EQ(Extract(2), 0) << err_;
  auto m = Manifest();
  ExpectLinkedDevices(m, "dev/tty0", "dev/console", Out("dev/tty0"), Out("dev/console"));
  EXPECT_EQ(m["dev/console"]["rdev_major"], 4);
}

TEST_F(HostileTest, HardlinkToDeviceOfTheSameLayer) {
  // One layer: a device and a link to it after it; a link before its target
  // (waits for the end of the layer); a link over a lower layer's file.
  LayerWriter(Layer(1)).Dir("dev").File("dev/was-a-file", "f");
  LayerWriter(Layer(2))
      .Device("dev/null", false, 1, 3)
      .Hardlink("dev/null2", "dev/null")
      .Hardlink("dev/early", "dev/zero")
      .Device("dev/zero", false, 1, 5)
      .Hardlink("dev/was-a-file", "dev/null");
  ASSERT_EQ(Extract(2), 0) << err_;
  auto m = Manifest();
  ExpectLinkedDevices(m, "dev/zero", "dev/early", Out("dev/zero"), Out("dev/early"));
  EXPECT_EQ(m["dev/null"]["inode"], m["dev/null2"]["inode"]);
  EXPECT_EQ(m["dev/null"]["inode"], m["dev/was-a-file"]["inode"]);
  EXPECT_EQ(m["dev/null"]["nlink"], 3);
  EXPECT_FALSE(IsFile(Out("dev/was-a-file")));
  struct stat a, b;
  if (geteuid() == 0) {
    ASSERT_EQ(lstat(Out("dev/null").c_str(), &a), 0);
    ASSERT_EQ(lstat(Out("dev/was-a-file").c_str(), &b), 0);
    EXPECT_TRUE(S_ISCHR(b.st_mode));
    EXPECT_EQ(a.st_ino, b.st_ino);
    EXPECT_EQ(a.st_nlink, 3u);
  }
}

TEST_F(HostileTest, RejectsHardlinkToATargetThatIsNowhere) {
  // The target is on no disk and in no layer's metadata: refused, whichever
  // side finds out (the target's dir missing on disk, or the broker's tree
  // without it, or the device whited out / hidden earlier in the same layer).
  struct Case {
    const char* what;
    std::function<void()> layers;
    int n;
  } cases[] = {
      {"no such name", [&] { LayerWriter(Layer(1)).Dir("dev").Hardlink("dev/h", "dev/none"); }, 1},
      {"no such dir", [&] { LayerWriter(Layer(1)).Hardlink("h", "nodir/none"); }, 1},
      {"device whited out",
       [&] {
         LayerWriter(Layer(1)).Dir("dev").Device("dev/tty0", false, 4, 0);
         LayerWriter(Layer(2)).Whiteout("dev", "tty0").Hardlink("dev/console", "dev/tty0");
       },
       2},
      {"device behind an opaque marker",
       [&] {
         LayerWriter(Layer(1)).Dir("dev").Device("dev/tty0", false, 4, 0);
         LayerWriter(Layer(2)).Opaque("dev").Hardlink("dev/console", "dev/tty0");
       },
       2},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    c.layers();
    ExpectRefused(c.n, c.n);
    EXPECT_NE(err_.find("not found"), std::string::npos) << err_;
    EXPECT_NE(err_.find("entry \""), std::string::npos) << err_;
  }
}

TEST_F(HostileTest, NamesAreBytes) {
  const std::vector<std::string> names = {
      "sp ace", "quo\"te", "new\nline", "back\\slash", std::string("bin\xff\xfe"), "tab\there"};
  {
    LayerWriter w(Layer(1));
    for (const std::string& n : names) w.File(n, n);
  }
  ASSERT_EQ(Extract(1), 0) << err_;
  for (const std::string& n : names) EXPECT_EQ(ReadFile(Out(n)), n) << n;
  auto m = Manifest();
  EXPECT_TRUE(m.contains("new\nline"));
  EXPECT_TRUE(m.contains("b64:Ymlu//4=")) << "non-UTF-8 name not written as path_b64";
}

TEST_F(HostileTest, OwnersModesAndSpecialFiles) {
  LayerWriter(Layer(1))
      .File("usr/bin/sudo", "s", 04755)
      .File("home/u/f", "f", 0600, 1000, 1000)
      .Dir("home/u2", 0750, 1000, 100)
      .Fifo("run/fifo", 0620)
      .Device("dev/null", false, 1, 3);
  ASSERT_EQ(Extract(1), 0) << err_;
  struct stat st;
  ASSERT_EQ(lstat(Out("usr/bin/sudo").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 04755u);
  ASSERT_EQ(lstat(Out("home/u/f").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  if (geteuid() == 0) {
    EXPECT_EQ(st.st_uid, 1000u);
    EXPECT_EQ(st.st_gid, 1000u);
  } else {
    EXPECT_EQ(st.st_uid, geteuid());
    char value[64];
    ssize_t n = getxattr(Out("home/u/f").c_str(), "user.rootlesscontainers", value, sizeof(value));
    EXPECT_EQ(std::string(value, n > 0 ? static_cast<size_t>(n) : 0), "\x08\xe8\x07\x10\xe8\x07");
    n = getxattr(Out("home/u2").c_str(), "user.rootlesscontainers", value, sizeof(value));
    EXPECT_EQ(std::string(value, n > 0 ? static_cast<size_t>(n) : 0), "\x08\xe8\x07\x10\x64");
    EXPECT_LT(
        getxattr(Out("usr/bin/sudo").c_str(), "user.rootlesscontainers", value, sizeof(value)), 0);
  }
  ASSERT_EQ(lstat(Out("run/fifo").c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0620u);
  // Devices: on disk only as root (made by the broker), always in the manifest.
  EXPECT_EQ(lstat(Out("dev/null").c_str(), &st) == 0, geteuid() == 0);
  auto m = Manifest();
  EXPECT_EQ(m["dev/null"]["kind"], "char");
  EXPECT_EQ(m["dev/null"]["rdev_major"], 1);
  EXPECT_EQ(m["dev/null"]["rdev_minor"], 3);
  EXPECT_EQ(m["home/u/f"]["uid"], 1000);
  EXPECT_EQ(m["usr/bin/sudo"]["mode"], 04755);
}

TEST_F(HostileTest, HostLabelsAreDroppedCapabilitiesKept) {
  // A layer must not label files for the host (trusted.*, security.selinux).
  LayerWriter(Layer(1)).File(
      "f", "x", 0755, 0, 0,
      {{"trusted.overlay.opaque", "y"},
       {"security.selinux", "system_u:object_r:shadow_t:s0"},
       {"security.capability", std::string("\x01\x00\x00\x02", 4) + std::string(16, '\0')},
       {"user.keep", "1"}});
  ASSERT_EQ(Extract(1), 0) << err_;
  auto m = Manifest();
  EXPECT_TRUE(m["f"]["xattrs"].contains("user.keep"));
  EXPECT_TRUE(m["f"]["xattrs"].contains("security.capability"));
  EXPECT_FALSE(m["f"]["xattrs"].contains("trusted.overlay.opaque"));
  EXPECT_FALSE(m["f"]["xattrs"].contains("security.selinux"));
}

TEST_F(HostileTest, PolicyLimitsStopALayerWithOneLine) {
  // A policy file that allows three entries per layer; the layer has five.
  std::ofstream(dir_ + "/policy.toml") << "[limits]\nmax_entries = 3\n";
  LayerWriter(Layer(1)).File("a", "1").File("b", "2").File("c", "3").File("d", "4").File("e", "5");
  EXPECT_EQ(Extract(1, "--policy " + dir_ + "/policy.toml"), 1) << err_;
  EXPECT_NE(err_.find("max_entries=3"), std::string::npos) << err_;
  EXPECT_NE(err_.find("entry \"d\""), std::string::npos) << err_;
  EXPECT_EQ(std::count(err_.begin(), err_.end(), '\n'), 1) << err_;
  std::ofstream(dir_ + "/policy.toml") << "[limits]\nmax_image_bytes = 4\n";
  EXPECT_EQ(Extract(1, "--policy " + dir_ + "/policy.toml"), 1) << err_;
  EXPECT_NE(err_.find("max_image_bytes=4"), std::string::npos) << err_;
  std::ofstream(dir_ + "/policy.toml") << "[limits]\nmax_entrys = 3\n";
  EXPECT_EQ(Extract(1, "--policy " + dir_ + "/policy.toml"), 2) << err_;
  EXPECT_NE(err_.find("unknown key limits.max_entrys"), std::string::npos) << err_;
}

TEST_F(HostileTest, EveryCompressionFromTheBytes) {
  const char* filters[] = {"", "gzip", "zstd", "xz", "bzip2"};
  for (int i = 0; i < 5; ++i) {
    LayerWriter(Layer(i + 1), filters[i]).File(std::string("f") + std::to_string(i), filters[i]);
  }
  ASSERT_EQ(Extract(5), 0) << err_;
  for (int i = 0; i < 5; ++i) EXPECT_EQ(ReadFile(Out("f" + std::to_string(i))), filters[i]);
}

// --- bad input -------------------------------------------------------------

TEST_F(HostileTest, BadInputIsOneLineAndLeavesNothing) {
  LayerWriter(Layer(1), "gzip").File("a", std::string(100000, 'a'));
  std::string good = ReadFile(Layer(1));
  struct Bad {
    const char* what;
    std::string bytes;
  } cases[] = {
      {"truncated gzip", good.substr(0, good.size() / 2)},
      {"garbage", "this is not a layer at all, not even close"},
      {"empty", ""},
      {"corrupt tar header",
       [] {
         std::string tar(10240, '\0');
         std::memcpy(tar.data(), "file", 4);
         std::memcpy(tar.data() + 148, "garbage!", 8);  // bad checksum field
         return tar;
       }()},
  };
  for (const Bad& bad : cases) {
    std::ofstream(Layer(2)) << bad.bytes;
    SCOPED_TRACE(bad.what);
    ExpectRefused(2, 2);
  }
}

TEST_F(HostileTest, SigtermStopsTheJobAndLeavesNothing) {
  // The layer is a pipe nobody finishes writing, passed as fd 3 (a fifo by
  // name is refused): the job is mid-layer when SIGTERM arrives; layerx exits
  // 1, its extractor is reaped, nothing is left.
  int fds[2];
  ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
  int writer = fds[1];
  auto before = Listing();
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 2);
    if (fds[0] == 3) {
      fcntl(3, F_SETFD, 0);
    } else {
      dup2(fds[0], 3);  // dup2 clears FD_CLOEXEC
    }
    execl(LAYERX_BIN, "layerx", "extract", "/dev/fd/3", "--rootfs", Out().c_str(), "-q", nullptr);
    _exit(127);
  }
  close(fds[0]);
  // Mid-layer: its work dir is there (a fixed sleep raced a slow start under
  // ASan, where SIGTERM came before layerx had its handler).
  for (int i = 0; i < 1000 && Listing() == before; ++i) usleep(10 * 1000);
  ASSERT_NE(Listing(), before) << "layerx did not start the job";
  usleep(100 * 1000);
  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  close(writer);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status;
  EXPECT_EQ(Listing(), before) << "output or work dir left behind";
}

TEST_F(HostileTest, ExistingRootfsIsNotTouched) {
  LayerWriter(Layer(1)).File("a", "a");
  ASSERT_EQ(mkdir(Out().c_str(), 0755), 0);
  std::ofstream(Out("mine")) << "mine";
  EXPECT_NE(Extract(1), 0);
  EXPECT_EQ(ReadFile(Out("mine")), "mine");
  EXPECT_FALSE(IsFile(Out("a")));
}

// --- an existing empty dir as --rootfs ---------------------------------------

// stat -c "%a %u:%g %Y" and the entries of `path` (what a failed job must put back).
std::string Found(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return "missing";
  std::ostringstream s;
  s << std::oct << st.st_mode << std::dec << " " << st.st_uid << ":" << st.st_gid << " "
    << st.st_mtim.tv_sec << "." << st.st_mtim.tv_nsec;
  for (const std::string& name : testing::Listing(path)) s << " " << name;
  return s.str();
}

TEST_F(HostileTest, ExistingEmptyRootfsIsLeftAsFoundWhenALayerFails) {
  // Layer 1 is good (a setuid binary, a read-only dir), layer 2 a corrupt tar.
  LayerWriter(Layer(1)).Dir("./", 0755).File("usr/bin/su", "s", 04755).Dir("ro", 0555);
  std::string tar(10240, '\0');
  std::memcpy(tar.data(), "file", 4);
  std::memcpy(tar.data() + 148, "garbage!", 8);  // bad checksum field
  std::ofstream(Layer(2)) << tar;
  ASSERT_EQ(mkdir(Out().c_str(), 0750), 0);
  std::string found = Found(Out());
  EXPECT_EQ(Extract(2), 1) << err_;
  EXPECT_EQ(std::count(err_.begin(), err_.end(), '\n'), 1) << err_;
  EXPECT_NE(err_.find("layer 2"), std::string::npos) << err_;
  EXPECT_EQ(Found(Out()), found);
  EXPECT_FALSE(IsFile(dir_ + "/m.jsonl"));
  // The same dir, one good layer: the tree and the root entry's mode.
  ASSERT_EQ(Extract(1), 0) << err_;
  EXPECT_TRUE(IsFile(Out("usr/bin/su")));
  struct stat st;
  ASSERT_EQ(stat(Out().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0755u);
}

TEST_F(HostileTest, RejectsSymlinkAsRootfsAndNonEmptyDir) {
  // --rootfs out, out -> an empty dir of the probe's: refused, the dir as found.
  LayerWriter(Layer(1)).File("a", "a");
  ASSERT_EQ(mkdir((probe_ + "/sub/empty").c_str(), 0777), 0);
  ASSERT_EQ(chmod((probe_ + "/sub/empty").c_str(), 0777), 0);
  probe_before_ = Snapshot(probe_);
  ASSERT_EQ(symlink((probe_ + "/sub/empty").c_str(), Out().c_str()), 0);
  EXPECT_EQ(Extract(1), 2) << err_;  // like any existing rootfs: a usage error
  EXPECT_EQ(std::count(err_.begin(), err_.end(), '\n'), 1) << err_;
  EXPECT_NE(err_.find("symlink"), std::string::npos) << err_;
  EXPECT_TRUE(IsLink(Out()));
  // A dir with one entry: "already exists and is not empty", as found.
  ASSERT_EQ(unlink(Out().c_str()), 0);
  ASSERT_EQ(mkdir(Out().c_str(), 0755), 0);
  ASSERT_EQ(mkdir(Out("x").c_str(), 0755), 0);
  std::string found = Found(Out());
  EXPECT_EQ(Extract(1), 2) << err_;
  EXPECT_EQ(std::count(err_.begin(), err_.end(), '\n'), 1) << err_;
  EXPECT_NE(err_.find("not empty"), std::string::npos) << err_;
  EXPECT_EQ(Found(Out()), found);
}

TEST_F(HostileTest, VerboseSaysWhenRootWritesIntoASharedDir) {
  if (geteuid() != 0) GTEST_SKIP() << "said for root only";
  LayerWriter(Layer(1)).File("a", "a");
  ASSERT_EQ(chmod(dir_.c_str(), 01777), 0);
  std::string cmd = std::string(LAYERX_BIN) + " extract " + Layer(1) + " --rootfs " + Out() +
                    " --manifest " + dir_ + "/m.jsonl -v 2>" + dir_ + "/err";
  ASSERT_EQ(system(cmd.c_str()), 0);
  err_ = ReadFile(dir_ + "/err");
  EXPECT_NE(err_.find("output dir \"" + dir_ + "\" is writable by others (mode 1777)"),
            std::string::npos)
      << err_;
  // Once per directory, though the rootfs and the manifest both go there.
  EXPECT_EQ(err_.find("is writable"), err_.rfind("is writable")) << err_;
  // Another user's dir.
  ASSERT_EQ(chmod(dir_.c_str(), 0755), 0);
  ASSERT_EQ(chown(dir_.c_str(), 1000, 1000), 0);
  ASSERT_TRUE(sandbox::RemoveTreeAt(AT_FDCWD, Out()));
  ASSERT_EQ(system(cmd.c_str()), 0);
  err_ = ReadFile(dir_ + "/err");
  EXPECT_NE(err_.find("output dir \"" + dir_ + "\" is writable by uid 1000 (mode 0755)"),
            std::string::npos)
      << err_;
  // An existing rootfs dir is where the job writes; its parent, root's own
  // and private now, is not.
  ASSERT_EQ(chown(dir_.c_str(), 0, 0), 0);
  ASSERT_EQ(chmod(dir_.c_str(), 0700), 0);
  ASSERT_TRUE(sandbox::RemoveTreeAt(AT_FDCWD, Out()));
  ASSERT_EQ(mkdir(Out().c_str(), 0777), 0);
  ASSERT_EQ(chmod(Out().c_str(), 0777), 0);
  ASSERT_EQ(system(cmd.c_str()), 0);
  err_ = ReadFile(dir_ + "/err");
  EXPECT_NE(err_.find("rootfs dir \"" + Out() + "\" is writable by others (mode 0777)"),
            std::string::npos)
      << err_;
  EXPECT_EQ(err_.find("output dir"), std::string::npos) << err_;
  // Nothing shared: nothing said.
  ASSERT_TRUE(sandbox::RemoveTreeAt(AT_FDCWD, Out()));
  ASSERT_EQ(system(cmd.c_str()), 0);
  err_ = ReadFile(dir_ + "/err");
  EXPECT_EQ(err_.find("is writable"), std::string::npos) << err_;
}

// Root writes into a directory another user can write (0777, no sticky bit:
// the worst case): the other user watches it with inotify and, for every name
// layerx makes there (temporary outputs, the work dir, the outputs
// themselves), at once moves it aside and puts a symlink in its place, to a
// host file or a host dir. Nothing outside the shared dir may change (the
// probe, checked at TearDown), and each run ends in its clock: exit 0, or 1
// with one line.
TEST_F(HostileTest, AnotherUserRacingWithInotifyReachesNothing) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (a second uid)";
  LayerWriter(Layer(1)).Dir("etc/").File("etc/passwd", "root:x:0:0::/root:/bin/sh\n").File(
      "usr/bin/sudo", std::string(300000, 's'), 04755);
  const std::string shared = dir_ + "/shared";
  ASSERT_EQ(chmod(dir_.c_str(), 0755), 0);
  ASSERT_EQ(mkdir(shared.c_str(), 0777), 0);
  ASSERT_EQ(chmod(shared.c_str(), 0777), 0);
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  pid_t attacker = fork();
  ASSERT_GE(attacker, 0);
  if (attacker == 0) {
    if (setgroups(0, nullptr) != 0 || setresgid(65534, 65534, 65534) != 0 ||
        setresuid(65534, 65534, 65534) != 0) {
      _exit(2);
    }
    int in = inotify_init1(IN_CLOEXEC);
    if (in < 0 || inotify_add_watch(in, shared.c_str(), IN_CREATE | IN_MOVED_TO) < 0) _exit(3);
    (void)!write(ready[1], "r", 1);
    std::set<std::string> mine;
    alignas(struct inotify_event) char buf[65536];
    while (true) {
      ssize_t n = read(in, buf, sizeof(buf));
      if (n <= 0) continue;
      for (char* p = buf; p < buf + n;) {
        auto* ev = reinterpret_cast<struct inotify_event*>(p);
        p += sizeof(*ev) + ev->len;
        if (ev->len == 0) continue;
        std::string name = ev->name;
        if (mine.count(name) || name.ends_with(".moved")) continue;
        std::string path = shared + "/" + name;
        if (rename(path.c_str(), (path + ".moved").c_str()) != 0) continue;
        const bool dir = (ev->mask & IN_ISDIR) != 0;
        if (symlink((probe_ + (dir ? "/sub" : "/sentinel")).c_str(), path.c_str()) == 0) {
          mine.insert(name);
        }
      }
    }
  }
  close(ready[1]);
  char c;
  ASSERT_EQ(read(ready[0], &c, 1), 1) << "the attacker did not start";
  close(ready[0]);
  for (int run = 0; run < 4; ++run) {
    const std::string tag = std::to_string(run);
    std::string cmd = std::string(LAYERX_BIN) + " extract " + Layer(1) + " --rootfs " + shared +
                      "/root" + tag + " --ext4 " + shared + "/img" + tag + " --manifest " +
                      shared + "/m" + tag + ".json -q 2>" + dir_ + "/err";
    int status = system(cmd.c_str());
    err_ = ReadFile(dir_ + "/err");
    ASSERT_TRUE(WIFEXITED(status)) << "run " << run;
    int code = WEXITSTATUS(status);
    EXPECT_TRUE(code == 0 || code == 1) << "run " << run << ": " << code << " " << err_;
    if (code == 1) {
      EXPECT_EQ(std::count(err_.begin(), err_.end(), '\n'), 1) << err_;
    }
  }
  kill(attacker, SIGKILL);
  waitpid(attacker, nullptr, 0);
  // The attack took place: names of layerx's were moved aside.
  auto names = testing::Listing(shared);
  EXPECT_GT(std::count_if(names.begin(), names.end(),
                          [](const std::string& n) { return n.ends_with(".moved"); }),
            0)
      << "the attacker moved nothing";
  // The probe (TearDown) is as it was: no write, chmod, chown or removal went
  // through any of the links.
  struct stat st;
  ASSERT_EQ(lstat((probe_ + "/sentinel").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0666u);
  EXPECT_EQ(st.st_uid, geteuid());
}

TEST_F(HostileTest, ExtractsOntoAFreshTmpfsMount) {
  // A tmpfs mounted at the target (a private mount namespace; rootless, in a
  // user namespace too, where layerx is rootless): nothing can be renamed over
  // a mount point, so the tree is made inside and moved up. A failing job
  // leaves the mount's root as found (1777, empty); a good one gives it the
  // image root's mode, and (root) owner.
  LayerWriter(Layer(1)).Dir("./", 0751, 1000, 1000).File("etc/f", "f").Dir("proc", 0555);
  std::ofstream(Layer(2)) << "this is not a tar archive at all";
  std::string sh = dir_ + "/mnt.sh", mnt = dir_ + "/mnt";
  std::string x = std::string(LAYERX_BIN) + " extract ";
  std::ofstream(sh) << "set -u\nmkdir " << mnt << "\n"
                    << "mount -t tmpfs -o size=16m tmpfs " << mnt
                    << " || { echo nomount; exit 0; }\n"
                    << "stat -c 'found %a' " << mnt << "\n"
                    << x << Layer(1) << " " << Layer(2) << " --rootfs " << mnt << " -q 2>" << dir_
                    << "/err1; echo rc=$?\n"
                    << "stat -c 'failed %a' " << mnt << "; ls -A " << mnt << "; echo end\n"
                    << x << Layer(1) << " --rootfs " << mnt << " -q 2>" << dir_
                    << "/err2; echo rc=$?\n"
                    << "stat -c 'done %a %u' " << mnt << "; cat " << mnt << "/etc/f; echo; ls -A "
                    << mnt << "; stat -c 'proc %a' " << mnt << "/proc\n";
  std::string cmd = (geteuid() == 0 ? "unshare --mount --propagation private sh "
                                    : "unshare --user --map-root-user --mount sh ") +
                    sh + " >" + dir_ + "/mnt.out 2>&1";
  int status = system(cmd.c_str());
  std::string out = ReadFile(dir_ + "/mnt.out");
  if (status != 0 || out.find("nomount") != std::string::npos) {
    GTEST_SKIP() << "no tmpfs mount in a private mount namespace here: " << out;
  }
  std::string err1 = ReadFile(dir_ + "/err1");
  EXPECT_NE(out.find("found 1777\nrc=1\nfailed 1777\nend\n"), std::string::npos) << out << err1;
  EXPECT_NE(err1.find("layer 2"), std::string::npos) << err1;
  // Inside the user namespace the caller is uid 0.
  EXPECT_NE(out.find(std::string("rc=0\ndone 751 ") + (geteuid() == 0 ? "1000" : "0") +
                     "\nf\netc\nproc\nproc 555\n"),
            std::string::npos)
      << out << ReadFile(dir_ + "/err2");
}

}  // namespace
}  // namespace layerx
