// Attacks by size, count, time and crashes, end to end through `layerx
// extract`, and the policy's entry rules. Every refusal must be exit 1 with one
// line naming the limit, the layer and the entry, and leave nothing: no output,
// no work dir, no process (this test is a subreaper, so an orphaned extractor
// or mkfs would become its child), no mount. ctest runs the file as root and
// as uid 65534.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <chrono>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "broker/tree/image_tree.h"
#include "sandbox/sys.h"
#include "tests/fixtures/gzip.h"
#include "tests/fixtures/layer_writer.h"
#include "tests/fixtures/test_util.h"

namespace layerx {
namespace {

using testing::LayerWriter;
using testing::ReadFile;

using testing::GzipMember;  // gzip streams may be concatenated members: a bomb is one
                            // 16 MiB-of-zeros member, repeated

// A ustar header (512 bytes) for a regular file `name` of `size` bytes.
std::string TarHeader(const std::string& name, uint64_t size) {
  std::string h(512, '\0');
  std::memcpy(h.data(), name.data(), std::min<size_t>(name.size(), 100));
  std::snprintf(h.data() + 100, 8, "%07o", 0644);
  std::snprintf(h.data() + 108, 8, "%07o", 0);
  std::snprintf(h.data() + 116, 8, "%07o", 0);
  std::snprintf(h.data() + 124, 12, "%011llo", static_cast<unsigned long long>(size));
  std::snprintf(h.data() + 136, 12, "%011o", 0);
  h[156] = '0';
  std::memcpy(h.data() + 257, "ustar", 6);
  std::memcpy(h.data() + 263, "00", 2);
  std::memset(h.data() + 148, ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : h) sum += c;
  std::snprintf(h.data() + 148, 8, "%06o", sum);
  return h;
}

class LimitsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { prctl(PR_SET_CHILD_SUBREAPER, 1); }

  void SetUp() override {
    char work[] = "/tmp/layerx-limits-XXXXXX";
    ASSERT_NE(mkdtemp(work), nullptr);
    dir_ = work;
    ASSERT_EQ(chmod(dir_.c_str(), 0755), 0);
    mounts_before_ = ReadFile("/proc/self/mountinfo");
  }
  void TearDown() override {
    EXPECT_EQ(ReadFile("/proc/self/mountinfo"), mounts_before_) << "a mount was left";
    EXPECT_EQ(Descendants(), 0) << "a process was left";
    (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_);
  }

  // Reaps what is ours; counts what is still running below us.
  static int Descendants() {
    while (waitpid(-1, nullptr, WNOHANG) > 0) {
    }
    std::ifstream in("/proc/self/task/" + std::to_string(gettid()) + "/children");
    int n = 0;
    std::string pid;
    while (in >> pid) ++n;
    return n;
  }

  std::string Path(const std::string& name) { return dir_ + "/" + name; }
  void WritePolicy(const std::string& text) { std::ofstream(Path("policy.toml")) << text; }

  // Runs `layerx extract SOURCES --rootfs out --manifest m.jsonl EXTRA`.
  int Extract(const std::string& sources, const std::string& extra = "") {
    std::string cmd = std::string(LAYERX_BIN) + " extract " + sources + " --rootfs " + Path("out") +
                      " --manifest " + Path("m.jsonl") + " " + extra + " -q 2>" + Path("err");
    int status = system(cmd.c_str());
    err_ = ReadFile(Path("err"));
    (void)unlink(Path("err").c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  // Refused: exit 1, one line naming the layer and `why`, nothing new in the dir.
  void ExpectRefused(const std::string& sources, const std::string& extra, const std::string& why,
                     const std::string& entry = "") {
    auto before = testing::Listing(dir_);
    EXPECT_EQ(Extract(sources, extra), 1) << err_;
    EXPECT_EQ(std::count(err_.begin(), err_.end(), '\n'), 1) << err_;
    EXPECT_NE(err_.find("layer 1"), std::string::npos) << err_;
    EXPECT_NE(err_.find(why), std::string::npos) << err_;
    if (!entry.empty()) {
      EXPECT_NE(err_.find("entry \"" + entry + "\""), std::string::npos) << err_;
    }
    EXPECT_EQ(testing::Listing(dir_), before) << "output or work dir left behind";
  }
  std::map<std::string, nlohmann::json> Manifest() {
    std::map<std::string, nlohmann::json> out;
    std::istringstream lines(ReadFile(Path("m.jsonl")));
    std::string line;
    while (std::getline(lines, line)) {
      auto j = nlohmann::json::parse(line);
      out[j["path"].get<std::string>()] = j;
    }
    return out;
  }
  // The largest resident set of any child reaped so far, in MiB. Bounds on it
  // are for real builds: under ASan (LAYERX_SANITIZE) its shadow memory and
  // quarantine at least double a process's resident set.
#ifdef LAYERX_SANITIZE
  static constexpr long kRssSlack = 3;
#else
  static constexpr long kRssSlack = 1;
#endif
  static long PeakChildRssMiB() {
    struct rusage ru;
    getrusage(RUSAGE_CHILDREN, &ru);
    return ru.ru_maxrss / 1024;
  }

  // bomb.tar.gz: one file "bomb" of `declared` bytes whose data is
  // `members` gzip members of 16 MiB of zeros each (about 16 KiB apiece).
  std::string GzipBomb(uint64_t declared, int members, bool after_end = false) {
    std::string path = Path("bomb.tar.gz");
    std::ofstream out(path, std::ios::binary);
    std::string zeros(16 << 20, '\0');
    std::string member = GzipMember(zeros, 9);
    if (after_end) {
      // A good little archive, its end marker, then the bomb as "padding".
      out << GzipMember(TarHeader("small", 5) + "hello" + std::string(507, '\0') +
                        std::string(1024, '\0'));
    } else {
      out << GzipMember(TarHeader("bomb", declared));
    }
    for (int i = 0; i < members; ++i) out << member;
    return path;
  }

  std::string dir_, err_, mounts_before_;
};

// --- size -------------------------------------------------------------------

TEST_F(LimitsTest, StopsGzipBombAtCompressionRatio) {
  // 4 GiB of zeros from 4 MiB of gzip (1030:1); the default policy's ratio is 1000.
  std::string bomb = GzipBomb(uint64_t{4} << 30, 256);
  ExpectRefused(bomb, "", "max_compression_ratio=1000", "bomb");
  // It stopped soon after the 16 MiB grace, not after inflating gigabytes.
  size_t at = err_.find("inflates ");
  ASSERT_NE(at, std::string::npos) << err_;
  EXPECT_LT(std::stoull(err_.substr(at + 9)), uint64_t{64} << 20) << err_;
  EXPECT_LT(PeakChildRssMiB(), 256 * kRssSlack) << "memory grew with the bomb";
}

TEST_F(LimitsTest, StopsZstdBombAtCompressionRatio) {
  // zstd compresses zeros far past gzip's 1030:1.
  LayerWriter(Path("bomb.tar.zst"), "zstd").File("bomb", std::string(64 << 20, '\0'));
  ExpectRefused(Path("bomb.tar.zst"), "", "max_compression_ratio", "bomb");
}

TEST_F(LimitsTest, StopsGzipBombAtLayerBytesBeforeInflatingIt) {
  // The header says 4 GiB; the limit is 256 MiB: refused before a byte is inflated.
  WritePolicy("[limits]\nmax_compression_ratio = 0\nmax_layer_bytes = 268435456\n");
  std::string bomb = GzipBomb(uint64_t{4} << 30, 256);
  ExpectRefused(bomb, "--policy " + Path("policy.toml"), "max_layer_bytes=268435456", "bomb");
}

TEST_F(LimitsTest, StopsBombHiddenAfterTheEndOfTheArchive) {
  // A valid archive, then 4 GiB of zeros after its end marker, which the
  // diff_id must cover: inflated, counted, and stopped at the layer limit.
  WritePolicy("[limits]\nmax_compression_ratio = 0\nmax_layer_bytes = 67108864\n");
  std::string bomb = GzipBomb(0, 256, /*after_end=*/true);
  ExpectRefused(bomb, "--policy " + Path("policy.toml"), "max_layer_bytes=67108864");
  EXPECT_LT(PeakChildRssMiB(), 256 * kRssSlack);
}

TEST_F(LimitsTest, StopsMillionEmptyFilesAtMaxEntries) {
  // A million empty files (ustar, gzip): refused at the 10,001st.
  {
    struct archive* a = archive_write_new();
    archive_write_set_format_ustar(a);
    archive_write_add_filter_gzip(a);
    archive_write_set_filter_option(a, "gzip", "compression-level", "1");
    ASSERT_EQ(archive_write_open_filename(a, Path("many.tar.gz").c_str()), ARCHIVE_OK);
    struct archive_entry* e = archive_entry_new();
    archive_entry_set_filetype(e, AE_IFREG);
    archive_entry_set_perm(e, 0644);
    archive_entry_set_size(e, 0);
    char name[32];
    for (int i = 0; i < 1'000'000; ++i) {
      std::snprintf(name, sizeof(name), "d%03d/f%07d", i / 4096, i);
      archive_entry_set_pathname(e, name);
      ASSERT_EQ(archive_write_header(a, e), ARCHIVE_OK);
    }
    archive_entry_free(e);
    archive_write_close(a);
    archive_write_free(a);
  }
  WritePolicy("[limits]\nmax_entries = 10000\n");
  ExpectRefused(Path("many.tar.gz"), "--policy " + Path("policy.toml"), "max_entries=10000",
                "d002/f0010000");
}

TEST_F(LimitsTest, RefusesNameDeeperThanMaxPathDepth) {
  std::string deep;
  for (int i = 0; i < 40; ++i) deep += "d/";
  LayerWriter(Path("deep.tar")).File("ok", "x").File(deep + "f", "x");
  WritePolicy("[limits]\nmax_path_depth = 32\n");
  ExpectRefused(Path("deep.tar"), "--policy " + Path("policy.toml"), "max_path_depth=32");
}

TEST_F(LimitsTest, RefusesNameLongerThanMaxPathBytes) {
  LayerWriter(Path("long.tar")).File(std::string(300, 'n'), "x");
  WritePolicy("[limits]\nmax_path_bytes = 255\n");
  ExpectRefused(Path("long.tar"), "--policy " + Path("policy.toml"), "max_path_bytes=255");
}

TEST_F(LimitsTest, RefusesSymlinkTargetOverLimit) {
  LayerWriter(Path("link.tar")).Symlink("l", std::string(600, 't'));
  WritePolicy("[limits]\nmax_link_target_bytes = 512\n");
  ExpectRefused(Path("link.tar"), "--policy " + Path("policy.toml"), "limit 512");
}

TEST_F(LimitsTest, Refuses64MiBXattr) {
  // One pax record of 64 MiB. libarchive refuses a pax header that large
  // before it yields a name, so the line names the last good entry.
  LayerWriter(Path("xattr.tar"))
      .File("ok", "x")
      .File("big", "x", 0644, 0, 0, {{"user.big", std::string(64 << 20, 'v')}});
  ExpectRefused(Path("xattr.tar"), "", "after entry \"ok\"");
  EXPECT_NE(err_.find("header too large"), std::string::npos) << err_;
  EXPECT_LT(PeakChildRssMiB(), 512 * kRssSlack);
}

TEST_F(LimitsTest, RefusesXattrsOverMaxXattrBytes) {
  // 128 KiB in one value: under libarchive's own header limit, over ours (64 KiB).
  LayerWriter(Path("xattr.tar"))
      .File("big", "x", 0644, 0, 0, {{"user.big", std::string(128 << 10, 'v')}});
  ExpectRefused(Path("xattr.tar"), "", "max_xattr_bytes=65536", "big");
}

TEST_F(LimitsTest, RefusesTooManyXattrs) {
  std::vector<std::pair<std::string, std::string>> many;
  for (int i = 0; i < 200; ++i) many.emplace_back("user.x" + std::to_string(i), "v");
  LayerWriter(Path("xattrs.tar")).File("f", "x", 0644, 0, 0, many);
  ExpectRefused(Path("xattrs.tar"), "", "max_xattrs_per_entry=128", "f");
}

// --- time -------------------------------------------------------------------

// A fifo as the layer: 512 bytes of a valid tar header, then silence until
// `hold` has passed. layerx refuses a fifo it finds by name (it must be a
// regular file), so the fifo is passed open, as a shell passes a pipe:
// FromFifo() gives the arguments for that.
std::thread StallingWriter(const std::string& fifo, std::chrono::milliseconds hold) {
  EXPECT_EQ(mkfifo(fifo.c_str(), 0644), 0);
  return std::thread([fifo, hold] {
    // Non-blocking until layerx opens the other end (ENXIO before), so a run
    // that fails before it reads cannot hang the test.
    int fd = -1;
    for (int i = 0; i < 200 && fd < 0; ++i) {
      fd = open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
      if (fd < 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (fd < 0) return;
    fcntl(fd, F_SETFL, 0);
    std::string header = TarHeader("slow", 1 << 20);
    (void)!write(fd, header.data(), header.size());
    // Silence until `hold` passes or the reader goes away (POLLERR).
    auto end = std::chrono::steady_clock::now() + hold;
    while (std::chrono::steady_clock::now() < end) {
      struct pollfd pfd = {fd, 0, 0};
      if (poll(&pfd, 1, 50) > 0 && (pfd.revents & (POLLERR | POLLHUP))) break;
    }
    close(fd);
  });
}

// "/dev/fd/3 3<FIFO": the layer is the fifo the shell opened as fd 3.
std::string FromFifo(const std::string& fifo) { return "/dev/fd/3 3<" + fifo; }

TEST_F(LimitsTest, StallingLayerHitsTheLayerClock) {
  std::thread writer = StallingWriter(Path("slow.tar"), std::chrono::seconds(10));
  ExpectRefused(FromFifo(Path("slow.tar")), "--layer-timeout 1", "layer_timeout_ms=1000");
  writer.join();
}

TEST_F(LimitsTest, StallingLayerHitsTheJobClock) {
  // Layer 1 is quick; layer 2 stalls: the job's clock, not the layer's, fires.
  LayerWriter(Path("a.tar")).File("a", "a");
  std::thread writer = StallingWriter(Path("slow.tar"), std::chrono::seconds(10));
  auto before = testing::Listing(dir_);
  EXPECT_EQ(Extract(Path("a.tar") + " " + FromFifo(Path("slow.tar")), "--job-timeout 1.5"), 1);
  EXPECT_NE(err_.find("layer 2"), std::string::npos) << err_;
  EXPECT_NE(err_.find("job_timeout_ms=1500"), std::string::npos) << err_;
  EXPECT_EQ(testing::Listing(dir_), before);
  writer.join();
}

TEST_F(LimitsTest, SigtermMidLayerLeavesNothing) {
  std::thread writer = StallingWriter(Path("slow.tar"), std::chrono::seconds(10));
  auto before = testing::Listing(dir_);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int err = open(Path("err").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    dup2(err, 2);
    int layer = open(Path("slow.tar").c_str(), O_RDONLY);  // until the writer comes
    dup2(layer, 3);
    execl(LAYERX_BIN, "layerx", "extract", "/dev/fd/3", "--rootfs", Path("out").c_str(), "-q",
          nullptr);
    _exit(127);
  }
  // Mid-layer: its work dir is there (a fixed sleep can race a slow start).
  auto working = [&] {
    for (const std::string& name : testing::Listing(dir_)) {
      if (name.rfind(".layerx-work", 0) == 0) return true;
    }
    return false;
  };
  for (int i = 0; i < 1000 && !working(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(working()) << "layerx did not start the job";
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  kill(pid, SIGTERM);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status;
  std::string err = ReadFile(Path("err"));
  EXPECT_NE(err.find("interrupted"), std::string::npos) << err;
  unlink(Path("err").c_str());
  EXPECT_EQ(testing::Listing(dir_), before);
  writer.join();
}

// --- disk full, failing mkfs ------------------------------------------------

// Runs `script` in a new user and mount namespace (the caller is root there,
// over a one-id map) with a 4 MiB tmpfs mounted at $T; the tmpfs and anything
// left on it vanish with the namespace, so the script lists it itself.
std::string InSmallTmpfs(const std::string& dir, const std::string& script) {
  std::string sh = dir + "/ns.sh";
  std::ofstream(sh) << "set -u\nT=" << dir << "/tmpfs\nmkdir -p $T\n"
                    << "mount -t tmpfs -o size=4m tmpfs $T || { echo nomount; exit 0; }\n"
                    << script << "\n";
  std::string cmd = "unshare --user --map-root-user --mount sh " + sh + " >" + dir + "/ns.out 2>&1";
  if (system(cmd.c_str()) != 0) return "unshare failed: " + ReadFile(dir + "/ns.out");
  return ReadFile(dir + "/ns.out");
}

TEST_F(LimitsTest, DiskFullWhileExtractingLeavesNothing) {
  LayerWriter(Path("big.tar.gz"), "gzip").File("small", "x").File("big", std::string(8 << 20, 'b'));
  std::string out =
      InSmallTmpfs(dir_, std::string(LAYERX_BIN) + " extract " + Path("big.tar.gz") +
                             " --rootfs $T/out --manifest $T/m.jsonl -q 2>$T.err; echo rc=$?; "
                             "cat $T.err; echo listing:; ls -A $T");
  if (out.find("nomount") != std::string::npos || out.find("unshare failed") == 0) {
    GTEST_SKIP() << "no user namespace with a tmpfs here: " << out;
  }
  EXPECT_NE(out.find("rc=1\n"), std::string::npos) << out;
  EXPECT_NE(out.find("layer 1"), std::string::npos) << out;
  EXPECT_NE(out.find("entry \"big\""), std::string::npos) << out;
  EXPECT_NE(out.find("ENOSPC"), std::string::npos) << out;
  EXPECT_NE(out.find("listing:\n"), std::string::npos) << out;
  EXPECT_EQ(out.substr(out.find("listing:\n") + 9), "") << "left on the full disk: " << out;
}

TEST_F(LimitsTest, FullImageDiskLeavesNothing) {
  // The rootfs goes to a roomy disk, the ext4 image to the full tmpfs: the
  // jail's write of the file's data into the image fails, and neither the
  // image nor the rootfs may appear.
  LayerWriter(Path("l.tar.gz"), "gzip").File("big", std::string(8 << 20, 'b'));
  std::string out =
      InSmallTmpfs(dir_, std::string(LAYERX_BIN) + " extract " + Path("l.tar.gz") + " --rootfs " +
                             Path("out") + " --ext4 $T/img -q 2>" + Path("mkfs.err") +
                             "; echo rc=$?; echo listing:; ls -A $T");
  if (out.find("nomount") != std::string::npos || out.find("unshare failed") == 0) {
    GTEST_SKIP() << "no user namespace with a tmpfs here: " << out;
  }
  std::string err = ReadFile(Path("mkfs.err"));
  unlink(Path("mkfs.err").c_str());
  unlink(Path("ns.sh").c_str());
  unlink(Path("ns.out").c_str());
  rmdir(Path("tmpfs").c_str());
  EXPECT_NE(out.find("rc=1\n"), std::string::npos) << out << err;
  EXPECT_NE(err.find("layer 1"), std::string::npos) << err;
  EXPECT_NE(err.find("entry \"big\""), std::string::npos) << err;
  EXPECT_NE(err.find("ENOSPC"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_EQ(out.substr(out.find("listing:\n") + 9), "") << out;
  EXPECT_EQ(testing::Listing(dir_), (std::vector<std::string>{".", "..", "l.tar.gz"}));
}

TEST_F(LimitsTest, SmallScratchTmpfsHoldsOnlyPlaceholders) {
  // --ext4 alone puts the work tree on /dev/shm, and the file data goes
  // straight into the image beside the output: the tree holds placeholders
  // (holes) only. Here /dev/shm is a 32 MiB tmpfs (in a mount namespace) and
  // the layer, 80 KiB of gzip, inflates to 80 MiB: the tmpfs does not fill,
  // the job succeeds at once, and nothing is left on either.
  LayerWriter(Path("z.tar.gz"), "gzip").File("zeros", std::string(80 << 20, '\0'));
  WritePolicy("[limits]\nmax_compression_ratio = 0\n");
  std::string sh = Path("shm.sh");
  std::ofstream(sh) << "mount -t tmpfs -o size=32m tmpfs /dev/shm || { echo nomount; exit 0; }\n"
                    << LAYERX_BIN << " extract " << Path("z.tar.gz") << " --ext4 " << Path("z.img")
                    << " --policy " << Path("policy.toml") << " 2>" << Path("shm.err")
                    << "; echo rc=$?; echo listing:; ls -A /dev/shm\n";
  std::string cmd = "unshare --user --map-root-user --mount sh " + sh + " >" + Path("shm.out");
  ASSERT_EQ(system(cmd.c_str()), 0);
  std::string out = ReadFile(Path("shm.out")), err = ReadFile(Path("shm.err"));
  if (out.find("nomount") != std::string::npos) GTEST_SKIP() << "no tmpfs in a user namespace";
  EXPECT_NE(out.find("rc=0\n"), std::string::npos) << out << err;
  EXPECT_EQ(err.find("is full; extracting again beside the output"), std::string::npos) << err;
  EXPECT_EQ(out.substr(out.find("listing:\n") + 9), "") << out;
  struct stat st;
  ASSERT_EQ(stat(Path("z.img").c_str(), &st), 0);
  EXPECT_GT(st.st_size, 80 << 20);
  for (const std::string& name : testing::Listing(dir_)) {
    EXPECT_EQ(name.find(".layerx-"), std::string::npos) << name << " left behind";
  }
}

// --- entry rules ------------------------------------------------------------

// dev (char 1:3), fifo, a setuid and a setgid binary, a setgid dir, a file
// with a capability and one with trusted.* and user.* xattrs.
void WriteRulesLayer(const std::string& path) {
  LayerWriter(path)
      .Device("dev/null", false, 1, 3)
      .Fifo("run/pipe")
      .File("bin/su", "su", 04755)
      .File("bin/wall", "wall", 02755)
      .Dir("var/mail", 02775)
      .File("bin/ping", "ping", 0755, 0, 0,
            {{"security.capability",
              std::string("\x01\x00\x00\x02\x00\x20\x00\x00", 8) + std::string(12, '\0')}})
      .File("etc/x", "x", 0644, 0, 0, {{"trusted.overlay", "y"}, {"user.note", "n"}});
}

TEST_F(LimitsTest, DefaultPolicyKeepsEveryKindAndBit) {
  WriteRulesLayer(Path("r.tar"));
  ASSERT_EQ(Extract(Path("r.tar")), 0) << err_;
  auto m = Manifest();
  EXPECT_EQ(m["dev/null"]["kind"], "char");
  EXPECT_EQ(m["run/pipe"]["kind"], "fifo");
  EXPECT_EQ(m["bin/su"]["mode"], 04755);
  EXPECT_TRUE(m["bin/ping"]["xattrs"].contains("security.capability"));
  EXPECT_TRUE(m["etc/x"]["xattrs"].contains("user.note"));
  EXPECT_FALSE(m["etc/x"]["xattrs"].contains("trusted.overlay"));
}

TEST_F(LimitsTest, StripPolicyLeavesOutDevicesFifosBitsAndCaps) {
  WriteRulesLayer(Path("r.tar"));
  WritePolicy(
      "[entries]\ndevices = \"strip\"\nfifos = \"strip\"\nsetuid = \"strip\"\n"
      "file_caps = \"strip\"\nxattrs = [\"trusted.\"]\n");
  ASSERT_EQ(Extract(Path("r.tar"), "--policy " + Path("policy.toml")), 0) << err_;
  auto m = Manifest();
  EXPECT_FALSE(m.contains("dev/null"));
  EXPECT_FALSE(m.contains("run/pipe"));
  EXPECT_FALSE(std::ifstream(Path("out/run/pipe")).good());
  EXPECT_EQ(m["bin/su"]["mode"], 0755);
  EXPECT_EQ(m["bin/wall"]["mode"], 0755);
  EXPECT_EQ(m["var/mail"]["mode"], 02775) << "setgid on a dir is not a privilege";
  struct stat st;
  ASSERT_EQ(stat(Path("out/bin/su").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0755u) << "the bit was stripped on disk too";
  EXPECT_FALSE(m["bin/ping"].contains("xattrs") &&
               m["bin/ping"]["xattrs"].contains("security.capability"));
  // The allowlist is only trusted.* now: user.note goes, trusted.overlay stays.
  EXPECT_TRUE(m["etc/x"]["xattrs"].contains("trusted.overlay"));
  EXPECT_FALSE(m["etc/x"]["xattrs"].contains("user.note"));
}

struct RefusalCase {
  const char* label;
  const char* policy;
  const char* why;
  const char* entry;
};

class LimitsRefusalTest : public LimitsTest, public ::testing::WithParamInterface<RefusalCase> {};

TEST_P(LimitsRefusalTest, RefusesNamingTheEntry) {
  WriteRulesLayer(Path("r.tar"));
  WritePolicy(GetParam().policy);
  ExpectRefused(Path("r.tar"), "--policy " + Path("policy.toml"), GetParam().why, GetParam().entry);
}

INSTANTIATE_TEST_SUITE_P(
    Rules, LimitsRefusalTest,
    ::testing::Values(
        RefusalCase{"Devices", "[entries]\ndevices = \"refuse\"\n", "entries.devices", "dev/null"},
        RefusalCase{"Fifos", "[entries]\nfifos = \"refuse\"\n", "entries.fifos", "run/pipe"},
        RefusalCase{"Setuid", "[entries]\nsetuid = \"refuse\"\n", "entries.setuid", "bin/su"},
        RefusalCase{"FileCaps", "[entries]\nfile_caps = \"refuse\"\n", "entries.file_caps",
                    "bin/ping"}),
    [](const auto& info) { return std::string(info.param.label); });

// The broker applies the same rules to every record, whatever the extractor did.
TEST(ImageTreeRulesTest, BrokerRefusesWhatTheExtractorShouldHaveRefused) {
  policy::EntryRules rules;
  rules.setuid = policy::Treatment::kRefuse;
  broker::ImageTree tree(policy::Limits{}, rules);
  auto refused =
      tree.Add(extractor::EntryRecord{.path = "su", .kind = extractor::Kind::kFile, .mode = 04755});
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().kind(), ErrorKind::kLimitExceeded);
  EXPECT_EQ(tree.size(), 1u);
}

TEST(ImageTreeRulesTest, BrokerStripsWhatTheExtractorShouldHaveStripped) {
  policy::EntryRules rules;
  rules.setuid = policy::Treatment::kStrip;
  rules.devices = policy::Treatment::kStrip;
  rules.file_caps = policy::Treatment::kStrip;
  broker::ImageTree tree(policy::Limits{}, rules);
  ASSERT_TRUE(tree.Add(extractor::EntryRecord{
      .path = "su",
      .kind = extractor::Kind::kFile,
      .mode = 04755,
      .xattrs = {
          {"security.capability", "c"}, {"user.rootlesscontainers", "o"}, {"user.a", "b"}}}));
  ASSERT_TRUE(tree.Add(extractor::EntryRecord{.path = "null",
                                              .kind = extractor::Kind::kChar,
                                              .mode = 0666,
                                              .rdev_major = 1,
                                              .rdev_minor = 3}));
  EXPECT_FALSE(tree.entries().contains("null"));
  const auto& su = tree.entries().at("su")->meta;
  EXPECT_EQ(su.mode, 0755u);
  ASSERT_EQ(su.xattrs.size(), 1u);
  EXPECT_EQ(su.xattrs[0].first, "user.a");
}

}  // namespace
}  // namespace layerx
