// The ext4 image end to end through the CLI: a fixture image with every kind of
// entry, read back with libext2fs (tests/testcases/ext4_dump) and e2fsck -fn.
// ctest runs it as root and as uid 65534.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "sandbox/sys.h"
#include "tests/fixtures/layer_writer.h"
#include "tests/fixtures/test_util.h"

namespace {

using layerx::testing::LayerWriter;
using nlohmann::json;

int Shell(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = popen(cmd.c_str(), "r");
  std::string text;
  char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) text.append(buf, n);
  int status = pclose(p);
  if (out) *out = text;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::map<std::string, json> Dump(const std::string& image) {
  std::string text;
  EXPECT_EQ(Shell(std::string(LAYERX_EXT4_DUMP) + " " + image, &text), 0);
  std::map<std::string, json> out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    json j = json::parse(line);
    std::string path = j.contains("path") ? j["path"].get<std::string>()
                                          : "b64:" + j["path_b64"].get<std::string>();
    out[path] = j;
  }
  return out;
}

// A POSIX access ACL in the kernel's xattr format: version 2; user::rwx,
// user:1000:r-x, group::r-x, mask::r-x, other::---.
const std::string kAcl = std::string(
    "\x02\x00\x00\x00"
    "\x01\x00\x07\x00\xff\xff\xff\xff"
    "\x02\x00\x05\x00\xe8\x03\x00\x00"
    "\x04\x00\x05\x00\xff\xff\xff\xff"
    "\x10\x00\x05\x00\xff\xff\xff\xff"
    "\x20\x00\x00\x00\xff\xff\xff\xff",
    44);
const std::string kCap = std::string(
    "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", 20);

class Ext4Test : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerx-ext4-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    // Layer 1: every kind of entry the image must carry.
    LayerWriter(dir_ + "/l1.tar")
        .Dir("usr/")
        .Dir("usr/bin/")
        .File("usr/bin/sudo", "sudo", 04755)
        .File("usr/bin/ping", "ping", 0755)
        .File("usr/bin/ping6", "ping6", 0755, 0, 0,
              {{"security.capability", kCap}, {"user.note", "hi"}})
        .File("home/user/f", "mine", 0600, 1000, 1000)
        .File("home/big/f", "big ids", 0640, 100000, 100000)
        .Dir("dev/")
        .Device("dev/null", false, 1, 3)
        .Device("dev/sda", true, 8, 0)
        .Device("dev/wide", false, 300, 70000)
        .Fifo("run/initctl", 0600)
        .File("a/one", "shared", 0644)
        .Hardlink("a/two", "a/one")
        .Symlink("fast", "usr/bin")
        .Symlink("slow", std::string(100, 'x') + "/target")
        .File("empty", "")
        .Sparse("sparse", 10 << 20, 5 << 20, "middle")
        .Sparse("huge", int64_t{5} << 30, int64_t{4} << 30, "past 4 GiB")
        .File("names/sp ace", "1")
        .File("names/quo\"te", "2")
        .File("names/new\nline", "3")
        .File("names/back\\slash", "4")
        .File(std::string("names/\xff\xfe"), "5")
        .Dir("gone/")
        .File("gone/victim", "v")
        .Dir("opq/")
        .File("opq/lower", "l")
        .File("secret", "nobody may read me", 0000)
        .Dir("ro", 0500)
        .File("acl", "acl", 0750, 0, 0, {{"system.posix_acl_access", kAcl}});
    // Layer 2: a whiteout, an opaque dir with one new child, and a file in
    // ro/, which is 0500 from layer 1 (its owner may not write it).
    LayerWriter(dir_ + "/l2.tar")
        .Whiteout("", "gone")
        .Dir("opq/")
        .Opaque("opq")
        .File("opq/upper", "u")
        .File("ro/new", "written into a 0500 dir");
  }
  void TearDown() override {
    if (getenv("LAYERX_KEEP_TEST_DIR") == nullptr)
      (void)layerx::sandbox::RemoveTreeAt(AT_FDCWD, dir_);
  }

  // A third layer with one directory of 10,000 entries (mkfs -d is quadratic
  // in a directory's size, so only the test that needs it has it).
  void AddManyLayer() {
    LayerWriter l(dir_ + "/l3.tar");
    for (int i = 0; i < 10000; ++i) l.File("many/f" + std::to_string(i), "");
    layers_ += " " + dir_ + "/l3.tar";
  }

  int Extract(const std::string& image, const std::string& extra = "", std::string* err = nullptr) {
    std::string cmd = std::string(LAYERX_BIN) + " extract " + dir_ + "/l1.tar " + dir_ + "/l2.tar" +
                      layers_ + " --ext4 " + dir_ + "/" + image + " -q " + extra + " 2>" + dir_ +
                      "/err";
    int rc = Shell(cmd);
    if (err) {
      std::ifstream in(dir_ + "/err");
      err->assign(std::istreambuf_iterator<char>(in), {});
    }
    return rc;
  }
  // Only the given layer files (names in dir_), not the fixture's.
  int ExtractOnly(const std::vector<std::string>& layers, const std::string& image,
                  std::string* err) {
    std::string cmd = std::string(LAYERX_BIN) + " extract";
    for (const std::string& l : layers) cmd += " " + dir_ + "/" + l;
    cmd += " --ext4 " + dir_ + "/" + image + " -q 2>" + dir_ + "/err";
    int rc = Shell(cmd);
    std::ifstream in(dir_ + "/err");
    err->assign(std::istreambuf_iterator<char>(in), {});
    return rc;
  }
  std::string dir_;
  std::string layers_;
};

TEST_F(Ext4Test, ImageCarriesTrueMetadataAndIsClean) {
  AddManyLayer();
  std::string err;
  ASSERT_EQ(Extract("a.img", "", &err), 0) << err;
  EXPECT_EQ(Shell("e2fsck -fn " + dir_ + "/a.img >/dev/null 2>&1"), 0) << "e2fsck found problems";
  auto d = Dump(dir_ + "/a.img");
  EXPECT_EQ(d["usr/bin/sudo"]["uid"], 0);
  EXPECT_EQ(d["usr/bin/sudo"]["mode"], 04755);
  EXPECT_EQ(d["home/user/f"]["uid"], 1000);
  EXPECT_EQ(d["home/user/f"]["gid"], 1000);
  EXPECT_EQ(d["home/user/f"]["mode"], 0600);
  EXPECT_EQ(d["home/big/f"]["uid"], 100000);
  EXPECT_EQ(d["home/big/f"]["gid"], 100000);
  EXPECT_EQ(d["usr/bin/ping6"]["xattrs"]["security.capability"], "AQAAAgAgAAAAAAAAAAAAAAAAAAA=");
  EXPECT_EQ(d["usr/bin/ping6"]["xattrs"]["user.note"], "aGk=");
  EXPECT_FALSE(d["usr/bin/ping"].contains("xattrs"));
  EXPECT_FALSE(d["home/user/f"].contains("xattrs"))
      << "user.rootlesscontainers leaked into the image";
  EXPECT_EQ(d["dev/null"]["kind"], "char");
  EXPECT_EQ(d["dev/null"]["rdev_major"], 1);
  EXPECT_EQ(d["dev/null"]["rdev_minor"], 3);
  EXPECT_EQ(d["dev/null"]["mode"], 0666);
  EXPECT_EQ(d["dev/sda"]["kind"], "block");
  EXPECT_EQ(d["dev/sda"]["rdev_major"], 8);
  EXPECT_EQ(d["dev/wide"]["rdev_major"], 300);
  EXPECT_EQ(d["dev/wide"]["rdev_minor"], 70000);
  EXPECT_EQ(d["run/initctl"]["kind"], "fifo");
  EXPECT_EQ(d["run/initctl"]["mode"], 0600);
  EXPECT_EQ(d["a/one"]["ino"], d["a/two"]["ino"]);
  EXPECT_EQ(d["a/one"]["nlink"], 2);
  EXPECT_EQ(d["fast"]["target"], "usr/bin");
  EXPECT_EQ(d["slow"]["target"], std::string(100, 'x') + "/target");
  EXPECT_EQ(d["empty"]["size"], 0);
  EXPECT_EQ(d["sparse"]["size"], 10 << 20);
  EXPECT_EQ(d["huge"]["size"], int64_t{5} << 30);
  EXPECT_EQ(d["usr/bin/sudo"]["mtime"], 1700000000);
  EXPECT_EQ(d["usr/bin/sudo"]["mtime_nsec"], 123456789);
  int many = 0;
  for (const auto& [path, j] : d) many += path.rfind("many/", 0) == 0;
  EXPECT_EQ(many, 10000);
  for (const char* name :
       {"names/sp ace", "names/quo\"te", "names/new\nline", "names/back\\slash"}) {
    EXPECT_TRUE(d.contains(name)) << name;
  }
  EXPECT_TRUE(d.contains("b64:" + std::string("bmFtZXMv//4=")));
  EXPECT_EQ(d["."]["uid"], 0);
  EXPECT_EQ(d["."]["mode"], 0755);
  EXPECT_EQ(d["secret"]["mode"], 0);
  EXPECT_EQ(d["secret"]["size"], 18);
  EXPECT_EQ(d["ro"]["mode"], 0500);
  EXPECT_TRUE(d.contains("ro/new"));
  // Stored in ext4's own ACL format (version 1, short entries), which is what
  // the kernel reads; libext2fs converted it from the xattr format.
  EXPECT_EQ(d["acl"]["xattrs"]["system.posix_acl_access"],
            "AQAAAAEABwACAAUA6AMAAAQABQAQAAUAIAAAAA==");
  // Whiteouts leave no trace; the opaque dir has exactly the upper children.
  EXPECT_FALSE(d.contains("gone"));
  EXPECT_FALSE(d.contains("gone/victim"));
  EXPECT_FALSE(d.contains(".wh.gone"));
  EXPECT_FALSE(d.contains("opq/lower"));
  EXPECT_TRUE(d.contains("opq/upper"));
  EXPECT_FALSE(d.contains("opq/.wh..wh..opq"));
}

// Device nodes live in the metadata only (no user namespace can mknod), so
// the copy mkfs makes has none: the opaque marker must hide a lower one all
// the same, and a hardlink to one must give one inode with two names.
TEST_F(Ext4Test, OpaqueMarkerHidesLowerDevices) {
  // Layer 1: d/ with a char device and a file, e/ with a block device.
  // Layer 2: d/new before (or after) d's opaque marker.
  LayerWriter(dir_ + "/dev1.tar")
      .Dir("d/")
      .Device("d/null", false, 1, 3)
      .File("d/keep", "lower")
      .Dir("e/")
      .Device("e/blk", true, 8, 0);
  LayerWriter(dir_ + "/dev2-before.tar").File("d/new", "upper").Opaque("d");
  LayerWriter(dir_ + "/dev2-after.tar").Opaque("d").File("d/new", "upper");
  for (const char* upper : {"dev2-before.tar", "dev2-after.tar"}) {
    SCOPED_TRACE(upper);
    std::string err;
    std::string image = std::string(upper) + ".img";
    ASSERT_EQ(ExtractOnly({"dev1.tar", upper}, image, &err), 0) << err;
    EXPECT_EQ(Shell("e2fsck -fn " + dir_ + "/" + image + " >/dev/null 2>&1"), 0)
        << "e2fsck found problems";
    auto d = Dump(dir_ + "/" + image);
    EXPECT_TRUE(d.contains("d/new"));
    EXPECT_FALSE(d.contains("d/null"));
    EXPECT_FALSE(d.contains("d/keep"));
    EXPECT_EQ(d["e/blk"]["kind"], "block");
    EXPECT_EQ(d["e/blk"]["rdev_major"], 8);
  }
}

TEST_F(Ext4Test, HardlinkedDeviceIsOneInodeWithTwoNames) {
  // Layer 1: char device dev/tty0. Layer 2: dev/console, a hardlink to it;
  // and in one layer, dev/null with a link to it after and before it.
  LayerWriter(dir_ + "/dev1.tar").Dir("dev/").Device("dev/tty0", false, 4, 0, 0620);
  LayerWriter(dir_ + "/dev2.tar")
      .Hardlink("dev/console", "dev/tty0")
      .Hardlink("dev/early", "dev/null")
      .Device("dev/null", false, 1, 3)
      .Hardlink("dev/null2", "dev/null");
  std::string err;
  ASSERT_EQ(ExtractOnly({"dev1.tar", "dev2.tar"}, "links.img", &err), 0) << err;
  EXPECT_EQ(Shell("e2fsck -fn " + dir_ + "/links.img >/dev/null 2>&1"), 0)
      << "e2fsck found problems (link counts?)";
  auto d = Dump(dir_ + "/links.img");
  EXPECT_EQ(d["dev/console"]["kind"], "char");
  EXPECT_EQ(d["dev/console"]["ino"], d["dev/tty0"]["ino"]);
  EXPECT_EQ(d["dev/console"]["nlink"], 2);
  EXPECT_EQ(d["dev/console"]["rdev_major"], 4);
  EXPECT_EQ(d["dev/console"]["rdev_minor"], 0);
  EXPECT_EQ(d["dev/console"]["mode"], 0620);
  EXPECT_EQ(d["dev/null"]["kind"], "char");
  EXPECT_EQ(d["dev/null"]["ino"], d["dev/null2"]["ino"]);
  EXPECT_EQ(d["dev/null"]["ino"], d["dev/early"]["ino"]);
  EXPECT_EQ(d["dev/null"]["nlink"], 3);
  EXPECT_EQ(d["dev/early"]["rdev_minor"], 3);
}

// The file data the jail wrote in place reads back exactly through ext4
// (debugfs reads it with libext2fs), sparse files with their holes.
TEST_F(Ext4Test, DataReadsBackExactly) {
  std::string err;
  ASSERT_EQ(Extract("data.img", "", &err), 0) << err;
  std::string out;
  ASSERT_EQ(Shell("debugfs -R 'cat /usr/bin/sudo' " + dir_ + "/data.img 2>/dev/null", &out), 0);
  EXPECT_EQ(out, "sudo");
  ASSERT_EQ(Shell("debugfs -R 'cat /secret' " + dir_ + "/data.img 2>/dev/null", &out), 0);
  EXPECT_EQ(out, "nobody may read me");
  ASSERT_EQ(Shell("debugfs -R 'dump /sparse " + dir_ + "/sparse.out' " + dir_ +
                  "/data.img >/dev/null 2>&1"),
            0);
  std::ifstream in(dir_ + "/sparse.out", std::ios::binary);
  std::string sparse((std::istreambuf_iterator<char>(in)), {});
  ASSERT_EQ(sparse.size(), size_t{10} << 20);
  EXPECT_EQ(sparse.substr(5 << 20, 6), "middle");
  EXPECT_EQ(sparse.find_first_not_of('\0'), size_t{5} << 20);
  EXPECT_EQ(sparse.find_last_not_of('\0'), (size_t{5} << 20) + 5);
}

// A file a later layer replaces, and one it removes: their bytes were written
// into the image by the lower layer's jail; the image must not hold them
// (punched out), and they cost it no size: it is no bigger than the image of
// one layer with the final content.
TEST_F(Ext4Test, DeadDataIsNotInTheImage) {
  const std::string marker = "DEAD-DATA-MARKER-";
  std::string dead;
  while (dead.size() < (1 << 20)) dead += marker + std::to_string(dead.size()) + "\n";
  LayerWriter(dir_ + "/d1.tar").File("replaced", dead).File("removed", dead).File("kept", "k");
  LayerWriter(dir_ + "/d2.tar").File("replaced", "new").Whiteout("", "removed");
  LayerWriter(dir_ + "/flat.tar").File("replaced", "new").File("kept", "k");
  std::string err;
  ASSERT_EQ(ExtractOnly({"d1.tar", "d2.tar"}, "dead.img", &err), 0) << err;
  ASSERT_EQ(ExtractOnly({"flat.tar"}, "flat.img", &err), 0) << err;
  EXPECT_EQ(Shell("e2fsck -fn " + dir_ + "/dead.img >/dev/null 2>&1"), 0);
  EXPECT_NE(Shell("grep -c " + marker + " " + dir_ + "/dead.img"), 0)
      << "dead data left in the image";
  struct stat layered, flat;
  ASSERT_EQ(stat((dir_ + "/dead.img").c_str(), &layered), 0);
  ASSERT_EQ(stat((dir_ + "/flat.img").c_str(), &flat), 0);
  EXPECT_LE(layered.st_size, flat.st_size);
  EXPECT_LE(layered.st_blocks, flat.st_blocks + 16);  // allocated: no dead megabytes either
  std::string out;
  ASSERT_EQ(Shell("debugfs -R 'cat /replaced' " + dir_ + "/dead.img 2>/dev/null", &out), 0);
  EXPECT_EQ(out, "new");
}

// --rootfs and --ext4 at once: the jail writes the data into the tree and
// into the image; both hold it.
TEST_F(Ext4Test, RootfsAndImageTogether) {
  std::string err;
  ASSERT_EQ(Extract("both.img", "--rootfs " + dir_ + "/both", &err), 0) << err;
  std::ifstream in(dir_ + "/both/usr/bin/sudo");
  EXPECT_EQ(std::string((std::istreambuf_iterator<char>(in)), {}), "sudo");
  std::string out;
  ASSERT_EQ(Shell("debugfs -R 'cat /usr/bin/sudo' " + dir_ + "/both.img 2>/dev/null", &out), 0);
  EXPECT_EQ(out, "sudo");
  EXPECT_EQ(Shell("e2fsck -fn " + dir_ + "/both.img >/dev/null 2>&1"), 0);
}

// No program but layerx and its extractor runs to build the image: no
// mkfs.ext4, no unshare, no debugfs.
TEST_F(Ext4Test, NoOtherProgramRuns) {
  if (Shell("command -v strace >/dev/null 2>&1") != 0) GTEST_SKIP() << "strace not installed";
  std::string out;
  // LeakSanitizer (the sanitizer build) cannot run under ptrace: off here.
  // One file per process (-ff): two extractors may exec at once (the next
  // layer's jail is spawned while one applies), and strace would split their
  // lines into "unfinished" and "resumed" halves in one file.
  std::string cmd = "ASAN_OPTIONS=detect_leaks=0 strace -ff -qq -e trace=execve,execveat -o " +
                    dir_ + "/trace " + std::string(LAYERX_BIN) + " extract " + dir_ + "/l1.tar " +
                    dir_ + "/l2.tar --ext4 " + dir_ + "/traced.img -q 2>&1";
  ASSERT_EQ(Shell(cmd, &out), 0) << out;
  int execs = 0;
  for (const std::string& name : layerx::testing::Listing(dir_)) {
    if (!name.starts_with("trace.")) continue;
    std::ifstream in(dir_ + "/" + name);
    std::string line;
    while (std::getline(in, line)) {
      if (line.find("exec") == std::string::npos || line.find("= 0") == std::string::npos) continue;
      ++execs;
      bool ours = line.find("layerx") != std::string::npos;
      EXPECT_TRUE(ours) << "a program ran: " << line;
    }
  }
  EXPECT_GE(execs, 3);  // layerx, then an extractor per layer
}

// A plain tar in a file only its owner (or root) can write: the jail reads it
// itself (no pipe) and the first layer's big files go into the image by
// copy_file_range, in the kernel. Their bytes must read back exactly, as those
// of the second layer (written: a copy there could reach the layer below); a
// layer cut inside a copied file is one line and leaves nothing; a file others
// may write goes through the broker's pipe instead (no copy).
TEST_F(Ext4Test, BigFilesOfAPlainTarAreCopiedByTheKernelExactly) {
  if (Shell("command -v strace >/dev/null 2>&1") != 0) GTEST_SKIP() << "strace not installed";
  auto noise = [](size_t n, uint32_t seed) {
    std::string s(n, '\0');
    for (char& c : s) {
      seed = seed * 1103515245u + 12345u;
      c = static_cast<char>(seed >> 16);
    }
    return s;
  };
  const std::string big = noise((3 << 20) + 123, 1), mid = noise(100 << 10, 2),
                    odd = noise((70 << 10) + 1, 3), upper = noise(1 << 20, 4);
  LayerWriter(dir_ + "/c1.tar")
      .File("small", "s")
      .File("big", big)
      .File("small2", "t")
      .File("mid", mid)
      .File("odd", odd);
  LayerWriter(dir_ + "/c2.tar").File("upper", upper);
  auto traced = [&](const std::string& image, std::string* trace) {
    std::string out;
    std::string cmd = "ASAN_OPTIONS=detect_leaks=0 strace -f -qq -e trace=copy_file_range -o " +
                      dir_ + "/copies " + std::string(LAYERX_BIN) + " extract " + dir_ +
                      "/c1.tar " + dir_ + "/c2.tar --ext4 " + dir_ + "/" + image + " -q 2>&1";
    int rc = Shell(cmd, &out);
    std::ifstream in(dir_ + "/copies");
    trace->assign(std::istreambuf_iterator<char>(in), {});
    return rc == 0 ? std::string() : out;
  };
  std::string trace;
  ASSERT_EQ(traced("copy.img", &trace), "");
  EXPECT_NE(trace.find("copy_file_range(0,"), std::string::npos) << trace;
  EXPECT_EQ(Shell("e2fsck -fn " + dir_ + "/copy.img >/dev/null 2>&1"), 0) << "e2fsck";
  for (const auto& [name, want] : std::map<std::string, std::string>{
           {"big", big}, {"mid", mid}, {"odd", odd}, {"upper", upper}, {"small2", "t"}}) {
    ASSERT_EQ(Shell("debugfs -R 'dump /" + name + " " + dir_ + "/" + name + ".out' " + dir_ +
                    "/copy.img >/dev/null 2>&1"),
              0);
    std::ifstream in(dir_ + "/" + name + ".out", std::ios::binary);
    EXPECT_TRUE(std::string(std::istreambuf_iterator<char>(in), {}) == want) << name;
  }

  // Others may write the layer: the broker feeds it, nothing is copied.
  ASSERT_EQ(chmod((dir_ + "/c1.tar").c_str(), 0666), 0);
  ASSERT_EQ(traced("fed.img", &trace), "");
  EXPECT_EQ(trace.find("copy_file_range(0,"), std::string::npos) << trace;
  ASSERT_EQ(chmod((dir_ + "/c1.tar").c_str(), 0644), 0);

  // Cut inside "big", past what one read brings.
  ASSERT_EQ(truncate((dir_ + "/c1.tar").c_str(), 2 << 20), 0);
  std::string err;
  EXPECT_EQ(ExtractOnly({"c1.tar"}, "cut.img", &err), 1);
  EXPECT_NE(err.find("big"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_NE(access((dir_ + "/cut.img").c_str(), F_OK), 0);
}

// A pax header may name a size (SCHILY.realsize) past the data the archive
// stores, with no sparse map: copied as a range of the file, the rest would be
// the next entry's header and data (the review found it); read, a hole made up
// by libarchive. Both paths refuse it in one line, naming the entry.
TEST_F(Ext4Test, SizePastTheStoredDataIsRefusedOnBothPaths) {
  std::string tar = dir_ + "/realsize.tar";
  ASSERT_EQ(Shell("python3 -c 'import io, sys, tarfile\n"
                  "with tarfile.open(sys.argv[1], \"w\", format=tarfile.PAX_FORMAT) as t:\n"
                  "    a = tarfile.TarInfo(\"a\"); a.size = 300000\n"
                  "    a.pax_headers = {\"SCHILY.realsize\": str(1 << 20)}\n"
                  "    t.addfile(a, io.BytesIO(b\"A\" * 300000))\n"
                  "    b = tarfile.TarInfo(\"b\"); b.size = 900000\n"
                  "    t.addfile(b, io.BytesIO(b\"B\" * 900000))\n' " +
                  tar),
            0);
  for (mode_t mode : {0644, 0666}) {  // read by the jail itself, then fed by the broker
    ASSERT_EQ(chmod(tar.c_str(), mode), 0);
    std::string err;
    EXPECT_EQ(ExtractOnly({"realsize.tar"}, "realsize.img", &err), 1) << mode;
    EXPECT_NE(err.find("shorter than its size"), std::string::npos) << err;
    EXPECT_NE(err.find("\"a\""), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_NE(access((dir_ + "/realsize.img").c_str(), F_OK), 0);
  }
}

// ext4 counts links in 16 bits (the kernel stops at 65,000): a file with more
// names is refused with one line, a directory with more subdirectories
// counts 1 (dir_nlink), and a hardlinked symlink stays one inode.
TEST_F(Ext4Test, LinkCountsBeyondExt4AreRefused) {
  {
    LayerWriter l(dir_ + "/links.tar");
    l.File("f", "x");
    for (int i = 0; i < 65000; ++i) l.Hardlink("l" + std::to_string(i), "f");
  }
  std::string err;
  EXPECT_EQ(ExtractOnly({"links.tar"}, "links.img", &err), 1);
  EXPECT_NE(err.find("over 65000 links"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_NE(access((dir_ + "/links.img").c_str(), F_OK), 0);
}

TEST_F(Ext4Test, ManySubdirectoriesUseDirNlink) {
  {
    LayerWriter l(dir_ + "/dirs.tar");
    for (int i = 0; i < 65010; ++i) l.Dir("d/" + std::to_string(i) + "/");
    l.Symlink("s", "target").Hardlink("s2", "s");
  }
  std::string err;
  ASSERT_EQ(ExtractOnly({"dirs.tar"}, "dirs.img", &err), 0) << err;
  EXPECT_EQ(Shell("e2fsck -fn " + dir_ + "/dirs.img >/dev/null 2>&1"), 0) << "e2fsck";
  std::string out;
  ASSERT_EQ(Shell("debugfs -R 'stat /d' " + dir_ + "/dirs.img 2>/dev/null", &out), 0);
  EXPECT_NE(out.find("Links: 1 "), std::string::npos) << out.substr(0, 300);
  ASSERT_EQ(Shell("debugfs -R 'stat /s' " + dir_ + "/dirs.img 2>/dev/null", &out), 0);
  EXPECT_NE(out.find("Links: 2 "), std::string::npos) << out.substr(0, 300);
}

// e2fsck insists that /lost+found is a directory: an image whose layers make
// it a file is refused in one line, not written broken.
TEST_F(Ext4Test, LostFoundThatIsNoDirectoryIsRefused) {
  LayerWriter(dir_ + "/lf.tar").File("lost+found", "not a dir");
  std::string err;
  EXPECT_EQ(ExtractOnly({"lf.tar"}, "lf.img", &err), 1);
  EXPECT_NE(err.find("lost+found"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_NE(access((dir_ + "/lf.img").c_str(), F_OK), 0);
}

TEST_F(Ext4Test, ReproducibleModeIsByteIdentical) {
  ASSERT_EQ(Extract("r1.img", "--reproducible"), 0);
  ASSERT_EQ(Extract("r2.img", "--reproducible"), 0);
  EXPECT_EQ(Shell("cmp -s " + dir_ + "/r1.img " + dir_ + "/r2.img"), 0) << "images differ";
}

TEST_F(Ext4Test, TooSmallSizeIsAClearErrorAndLeavesNothing) {
  std::string err;
  EXPECT_EQ(Extract("small.img", "--size 100K", &err), 2);
  EXPECT_NE(err.find("too small"), std::string::npos) << err;
  EXPECT_EQ(access((dir_ + "/small.img").c_str(), F_OK), -1);
}

}  // namespace
