// Jobs end cleanly whatever happens: timeouts, cancellation, a refused layer,
// an existing output. No output, no work dir, no child left; a second run works.
#include "broker/engine/job.h"

#include <archive.h>
#include <archive_entry.h>
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <span>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "sandbox/sys.h"
#include "tests/fixtures/layer_writer.h"
#include "tests/fixtures/test_util.h"

namespace layerx::broker {
namespace {

using testing::LayerWriter;

// A one-file layer, written with libarchive: "hello" at etc/greeting.
void WriteSmallLayer(const std::string& path) {
  struct archive* a = archive_write_new();
  archive_write_set_format_pax_restricted(a);
  archive_write_add_filter_gzip(a);
  ASSERT_EQ(archive_write_open_filename(a, path.c_str()), ARCHIVE_OK);
  struct archive_entry* e = archive_entry_new();
  archive_entry_set_pathname(e, "etc/greeting");
  archive_entry_set_filetype(e, AE_IFREG);
  archive_entry_set_perm(e, 0644);
  archive_entry_set_size(e, 5);
  archive_write_header(a, e);
  archive_write_data(a, "hello", 5);
  archive_entry_free(e);
  archive_write_close(a);
  archive_write_free(a);
}

class JobTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerx-job-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    WriteSmallLayer(dir_ + "/good.tar.gz");
    request_.rootfs = dir_ + "/out";
    request_.manifest = dir_ + "/out.jsonl";
    request_.policy = policy::DefaultPolicy();
  }
  void TearDown() override { (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_); }

  std::vector<std::string> Listing() { return testing::Listing(dir_); }
  // The children of thread `tid` (ours by default) still around, zombies included.
  static int Children(pid_t tid = gettid()) {
    int n = 0;
    std::ifstream in("/proc/self/task/" + std::to_string(tid) + "/children");
    std::string pid;
    while (in >> pid) ++n;
    return n;
  }
  // The most children this thread had at once while `run` ran (sampled
  // every 10 ms from another thread).
  template <typename Run>
  static int MostChildrenDuring(Run run) {
    const pid_t tid = gettid();
    std::atomic<bool> done{false};
    int most = 0;
    std::thread watcher([&] {
      while (!done.load()) {
        most = std::max(most, Children(tid));
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    });
    run();
    done.store(true);
    watcher.join();
    return most;
  }

  std::string dir_;
  ExtractRequest request_;
};

TEST_F(JobTest, GoodLayerGivesRootfsAndManifest) {
  request_.layers = {dir_ + "/good.tar.gz"};
  auto report = RunExtract(request_);
  ASSERT_TRUE(report) << report.error().ToString();
  std::ifstream greeting(dir_ + "/out/etc/greeting");
  std::string text;
  greeting >> text;
  EXPECT_EQ(text, "hello");
  EXPECT_EQ(Listing(), (std::vector<std::string>{".", "..", "good.tar.gz", "out", "out.jsonl"}));
  ASSERT_EQ(report->layers.size(), 1u);
  EXPECT_EQ(report->layers[0].entries, 1u);
  EXPECT_GT(report->layers[0].setup_ns, 0);
}

// libcurl (and the 32 libraries it brings) is loaded for a registry only
// (broker/source/curl_api.h): a local job never maps it.
TEST_F(JobTest, LocalJobNeverLoadsLibcurl) {
  request_.layers = {dir_ + "/good.tar.gz"};
  auto report = RunExtract(request_);
  ASSERT_TRUE(report) << report.error().ToString();
  EXPECT_EQ(testing::ReadFile("/proc/self/maps").find("libcurl"), std::string::npos);
}

// A pipe that gives `bytes` (none: it stays silent) only after `hold`, then
// closes; the layer is its read end, passed as a descriptor ("/dev/fd/N": a
// fifo by name is refused).
struct LatePipe {
  LatePipe(std::string bytes, std::chrono::milliseconds hold) {
    int fds[2];
    EXPECT_EQ(pipe2(fds, O_CLOEXEC), 0);
    read_end = fds[0];
    writer = std::thread([w = fds[1], hold, bytes = std::move(bytes)] {
      std::this_thread::sleep_for(hold);
      (void)sandbox::WriteAll(w, std::as_bytes(std::span(bytes)));
      close(w);
    });
  }
  ~LatePipe() {
    writer.join();
    close(read_end);
  }
  std::string Name() const { return "/dev/fd/" + std::to_string(read_end); }
  int read_end = -1;
  std::thread writer;
};

// A pipe whose writer stays silent for `hold`, then closes.
struct SilentPipe : LatePipe {
  explicit SilentPipe(std::chrono::milliseconds hold) : LatePipe("", hold) {}
};

TEST_F(JobTest, StopsAtLayerTimeoutAndReapsTheExtractor) {
  // A layer that never ends: a pipe whose writer stays silent.
  SilentPipe slow(std::chrono::milliseconds(1500));
  request_.layers = {slow.Name()};
  request_.policy.limits.layer_timeout_ms = 300;
  auto before = Listing();
  auto report = RunExtract(request_);
  ASSERT_FALSE(report);
  EXPECT_EQ(report.error().kind(), ErrorKind::kLimitExceeded) << report.error().ToString();
  EXPECT_EQ(Listing(), before);
  EXPECT_EQ(Children(), 0) << "extractor not reaped";
}

TEST_F(JobTest, CancelStopsTheJobAndLeavesNothing) {
  SilentPipe slow(std::chrono::milliseconds(700));
  std::atomic<bool> cancel{false};
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    cancel.store(true);
  });
  request_.layers = {slow.Name()};
  request_.cancel = &cancel;
  auto before = Listing();
  auto report = RunExtract(request_);
  canceller.join();
  ASSERT_FALSE(report);
  EXPECT_EQ(Listing(), before);
  EXPECT_EQ(Children(), 0);
}

// The next layer's jail is spawned while a layer applies (its setup is then
// off the critical path): while layer 1 waits for its bytes, two extractors
// are this thread's children, the second waiting for its layer.
TEST_F(JobTest, NextLayersJailIsSpawnedWhileALayerApplies) {
  LatePipe late(testing::ReadFile(dir_ + "/good.tar.gz"), std::chrono::milliseconds(600));
  request_.layers = {late.Name(), dir_ + "/good.tar.gz"};
  Result<JobReport> report = Fail(MakeError(ErrorKind::kInternal, "not run"));
  int most = MostChildrenDuring([&] { report = RunExtract(request_); });
  ASSERT_TRUE(report) << report.error().ToString();
  ASSERT_EQ(report->layers.size(), 2u);
  EXPECT_EQ(most, 2) << "layer 2's jail was not spawned while layer 1 ran";
  EXPECT_EQ(Children(), 0);
}

// A layer that fails leaves no jail behind, neither its own nor the one
// spawned ahead for the layer above it (seen waiting while layer 2 ran).
TEST_F(JobTest, JailSpawnedAheadIsReapedWhenALayerFails) {
  std::string corrupt = testing::ReadFile(dir_ + "/good.tar.gz");
  corrupt.resize(corrupt.size() / 2);
  LatePipe late(corrupt, std::chrono::milliseconds(600));
  request_.layers = {dir_ + "/good.tar.gz", late.Name(), dir_ + "/good.tar.gz"};
  auto before = Listing();
  Result<JobReport> report = Fail(MakeError(ErrorKind::kInternal, "not run"));
  int most = MostChildrenDuring([&] { report = RunExtract(request_); });
  EXPECT_EQ(most, 2) << "layer 3's jail was not spawned while layer 2 ran";
  ASSERT_FALSE(report);
  EXPECT_NE(report.error().ToString().find("layer 2"), std::string::npos)
      << report.error().ToString();
  EXPECT_EQ(Listing(), before);
  EXPECT_EQ(Children(), 0) << "a jail spawned ahead was not reaped";
}

// A pipe that gives `bytes` at once and then stays open until the test ends
// (at most `hold`).
struct HeldPipe {
  HeldPipe(std::string bytes, std::chrono::milliseconds hold) {
    int fds[2];
    EXPECT_EQ(pipe2(fds, O_CLOEXEC), 0);
    read_end = fds[0];
    writer = std::thread([this, w = fds[1], hold, bytes = std::move(bytes)] {
      (void)sandbox::WriteAll(w, std::as_bytes(std::span(bytes)));
      std::unique_lock lock(mu);
      cv.wait_for(lock, hold, [this] { return done; });
      close(w);
    });
  }
  ~HeldPipe() {
    Release();
    writer.join();
    close(read_end);
  }
  // Closes the write end now.
  void Release() {
    {
      std::lock_guard lock(mu);
      done = true;
    }
    cv.notify_all();
  }
  std::string Name() const { return "/dev/fd/" + std::to_string(read_end); }
  int read_end = -1;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread writer;
};

// A status field of /proc/PID/task/TID/status ("Seccomp", "CapEff"...).
std::string TaskField(const std::string& task, const std::string& field) {
  std::string status = testing::ReadFile(task + "/status");
  size_t at = status.find("\n" + field + ":");
  if (at == std::string::npos) return "(none)";
  size_t from = status.find_first_not_of(" \t", at + field.size() + 2);
  return status.substr(from, status.find('\n', from) - from);
}

// The extractor's second thread (the read-ahead, extractor/read_ahead.h) is
// made inside the jail before the filters go on, never by a clone the filter
// allows: while the jail waits for its layer's bytes, each of its two threads
// has both filters, no_new_privs, an empty bounding set and the same
// capabilities as the other.
TEST_F(JobTest, EveryThreadOfTheExtractorIsLockedDown) {
  HeldPipe silent("", std::chrono::milliseconds(20'000));  // closed by the watcher
  request_.layers = {silent.Name()};
  std::vector<std::string> tasks;
  std::string pid;
  const pid_t tid = gettid();
  std::thread watcher([&] {
    for (int i = 0; i < 1500 && tasks.size() < 2; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      std::ifstream in("/proc/self/task/" + std::to_string(tid) + "/children");
      if (!(in >> pid)) continue;
      tasks.clear();
      for (const std::string& t : testing::Listing("/proc/" + pid + "/task")) {
        if (t != "." && t != "..") tasks.push_back("/proc/" + pid + "/task/" + t);
      }
      // Locked down once the main thread is: seccomp is its last step.
      if (TaskField("/proc/" + pid + "/task/" + pid, "Seccomp") != "2") tasks.clear();
    }
    // Checked while the jail waits for its bytes; then its stream ends.
    std::vector<std::string> fields;
    for (const std::string& task : tasks) {
      for (const char* f : {"Seccomp", "Seccomp_filters", "NoNewPrivs", "CapBnd", "CapInh",
                            "CapAmb", "CapEff", "CapPrm"}) {
        fields.push_back(TaskField(task, f));
      }
    }
    silent.Release();
    ASSERT_EQ(tasks.size(), 2u) << "the extractor did not have two threads";
    for (size_t t = 0; t < 2; ++t) {
      SCOPED_TRACE(tasks[t]);
      const std::string* f = &fields[t * 8];
      EXPECT_EQ(f[0], "2");  // Seccomp: filter mode
      EXPECT_EQ(f[1], "2");  // both filters
      EXPECT_EQ(f[2], "1");  // NoNewPrivs
      EXPECT_EQ(f[3], "0000000000000000");  // CapBnd
      EXPECT_EQ(f[4], "0000000000000000");  // CapInh
      EXPECT_EQ(f[5], "0000000000000000");  // CapAmb
      EXPECT_EQ(f[6], fields[6]);  // CapEff, as the other thread's
      EXPECT_EQ(f[7], fields[7]);  // CapPrm
    }
  });
  auto report = RunExtract(request_);
  watcher.join();
  ASSERT_FALSE(report);  // the pipe closes with no byte: an empty layer
  EXPECT_EQ(Children(), 0);
}

// A gzip layer refused at its second entry while its stream stays open: the
// read-ahead thread is then in read(2) on the pipe, and the extractor reports
// and exits at once, without waiting for it.
TEST_F(JobTest, RefusedLayerFailsAtOnceWhileItsStreamStaysOpen) {
  const std::string path = dir_ + "/three.tar.gz";
  std::string noise(8192, '\0');  // past the 512 bytes the extractor sniffs
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = static_cast<char>(i * 7919 % 251 + i / 97);
  LayerWriter(path, "gzip").File("a", noise).File("b", noise + "b").File("c", "3");
  HeldPipe held(testing::ReadFile(path), std::chrono::milliseconds(20'000));
  request_.layers = {held.Name()};
  request_.policy.limits.max_entries = 1;
  auto t0 = std::chrono::steady_clock::now();
  auto report = RunExtract(request_);
  auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(report);
  EXPECT_EQ(report.error().kind(), ErrorKind::kLimitExceeded) << report.error().ToString();
  EXPECT_LT(took, std::chrono::milliseconds(10'000)) << "the job waited for the stream's end";
  EXPECT_EQ(Children(), 0);
}

// Another user who can write the output's dir makes the work dir names first.
// Names from an unseeded random() were the same sequence in every process, so
// with the pid (there are few) all 100 tries were taken and the job failed;
// names from getrandom() cannot be guessed. What they made stays untouched.
TEST_F(JobTest, CannotBeBlockedByWorkDirNamesMadeFirst) {
  ::srandom(1);  // where an unseeded random() starts
  std::vector<std::string> taken;
  for (int i = 0; i < 100; ++i) {
    taken.push_back(fmt::format(".layerx-work-{}-{:08x}", ::getpid(), ::random()));
    ASSERT_EQ(mkdir((dir_ + "/" + taken.back()).c_str(), 0755), 0);
  }
  ::srandom(1);
  request_.layers = {dir_ + "/good.tar.gz"};
  auto report = RunExtract(request_);
  ASSERT_TRUE(report) << report.error().ToString();
  std::vector<std::string> expected = {".", "..", "good.tar.gz", "out", "out.jsonl"};
  expected.insert(expected.end(), taken.begin(), taken.end());
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(Listing(), expected);
  for (const std::string& name : taken) {
    EXPECT_EQ(testing::Listing(dir_ + "/" + name).size(), 2u) << name;
  }
}

TEST_F(JobTest, ExistingRootfsIsRefusedAndUntouched) {
  ASSERT_EQ(mkdir((dir_ + "/out").c_str(), 0755), 0);
  std::ofstream(dir_ + "/out/keep") << "mine";
  request_.layers = {dir_ + "/good.tar.gz"};
  auto report = RunExtract(request_);
  ASSERT_FALSE(report);
  EXPECT_EQ(report.error().kind(), ErrorKind::kPolicy);
  std::ifstream keep(dir_ + "/out/keep");
  std::string text;
  keep >> text;
  EXPECT_EQ(text, "mine");
}

TEST_F(JobTest, FailureKeepsAnOldManifestAndASecondRunSucceeds) {
  std::ofstream(dir_ + "/out.jsonl") << "old\n";
  std::ofstream(dir_ + "/bad.tar") << "this is not a tar archive at all";
  request_.layers = {dir_ + "/good.tar.gz", dir_ + "/bad.tar"};
  auto before = Listing();
  auto failed = RunExtract(request_);
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.error().kind(), ErrorKind::kInvalidInput) << failed.error().ToString();
  EXPECT_NE(failed.error().ToString().find("layer 2"), std::string::npos);
  EXPECT_EQ(Listing(), before);
  std::ifstream old(dir_ + "/out.jsonl");
  std::string text;
  old >> text;
  EXPECT_EQ(text, "old");
  request_.layers = {dir_ + "/good.tar.gz"};
  auto report = RunExtract(request_);
  ASSERT_TRUE(report) << report.error().ToString();
}

// --- an existing empty dir as --rootfs ---------------------------------------

// What a failed job must put back: type and mode, owner, mtime, entries.
std::string Found(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return "missing";
  std::string out = std::to_string(st.st_mode) + " " + std::to_string(st.st_uid) + ":" +
                    std::to_string(st.st_gid) + " " + std::to_string(st.st_mtim.tv_sec) + "." +
                    std::to_string(st.st_mtim.tv_nsec);
  for (const std::string& name : testing::Listing(path)) out += " " + name;
  return out;
}

// stat(path) as uid and gid 65534 with no groups, in a child: 0 when it could,
// else its errno.
int StatAsNobody(const std::string& path) {
  const char* p = path.c_str();
  pid_t pid = fork();
  if (pid == 0) {
    if (setgroups(0, nullptr) != 0 || setresgid(65534, 65534, 65534) != 0 ||
        setresuid(65534, 65534, 65534) != 0) {
      _exit(200);
    }
    struct stat st;
    _exit(stat(p, &st) == 0 ? 0 : errno);
  }
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

// A fresh filesystem's root is an empty directory that exists, and nothing can
// be renamed over it: the tree goes in, the dir takes the root entry's mode,
// mtime and (as root) owner, and nothing else of the job stays inside.
TEST_F(JobTest, ExtractsIntoAnExistingEmptyDir) {
  // The root at 0751 owned by 1000:1000, a file, a 0555 dir (rootless, a dir
  // the owner cannot write is still moved in) and a hardlink across dirs.
  LayerWriter(dir_ + "/l.tar")
      .Dir("./", 0751, 1000, 1000)
      .File("etc/greeting", "hello")
      .Dir("proc", 0555)
      .Hardlink("bin/greeting", "etc/greeting");
  ASSERT_EQ(mkdir((dir_ + "/out").c_str(), 0755), 0);
  request_.layers = {dir_ + "/l.tar"};
  auto report = RunExtract(request_);
  ASSERT_TRUE(report) << report.error().ToString();
  EXPECT_EQ(Listing(),
            (std::vector<std::string>{".", "..", "good.tar.gz", "l.tar", "out", "out.jsonl"}));
  EXPECT_EQ(testing::Listing(dir_ + "/out"),
            (std::vector<std::string>{".", "..", "bin", "etc", "proc"}));
  EXPECT_EQ(testing::ReadFile(dir_ + "/out/etc/greeting"), "hello");
  struct stat st, link;
  ASSERT_EQ(stat((dir_ + "/out").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0751u);
  EXPECT_EQ(st.st_uid, geteuid() == 0 ? 1000u : geteuid());
  EXPECT_EQ(st.st_gid, geteuid() == 0 ? 1000u : getegid());
  EXPECT_EQ(st.st_mtim.tv_sec, 1700000000);
  EXPECT_EQ(st.st_mtim.tv_nsec, 123456789);
  ASSERT_EQ(stat((dir_ + "/out/proc").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0555u);
  ASSERT_EQ(stat((dir_ + "/out/etc/greeting").c_str(), &st), 0);
  ASSERT_EQ(stat((dir_ + "/out/bin/greeting").c_str(), &link), 0);
  EXPECT_EQ(st.st_ino, link.st_ino);
}

TEST_F(JobTest, NonEmptyDirIsRefusedAsFound) {
  ASSERT_EQ(mkdir((dir_ + "/out").c_str(), 01777), 0);
  ASSERT_EQ(chmod((dir_ + "/out").c_str(), 01777), 0);
  std::ofstream(dir_ + "/out/.hidden") << "mine";
  std::string found = Found(dir_ + "/out");
  request_.layers = {dir_ + "/good.tar.gz"};
  auto report = RunExtract(request_);
  ASSERT_FALSE(report);
  EXPECT_EQ(report.error().kind(), ErrorKind::kPolicy) << report.error().ToString();
  EXPECT_EQ(Found(dir_ + "/out"), found);
  EXPECT_EQ(testing::ReadFile(dir_ + "/out/.hidden"), "mine");
}

TEST_F(JobTest, RejectsSymlinkToAnEmptyDir) {
  // out -> real, an empty dir: the link is not followed, real is not touched.
  ASSERT_EQ(mkdir((dir_ + "/real").c_str(), 0755), 0);
  ASSERT_EQ(symlink("real", (dir_ + "/out").c_str()), 0);
  std::string found = Found(dir_ + "/real");
  request_.layers = {dir_ + "/good.tar.gz"};
  auto report = RunExtract(request_);
  ASSERT_FALSE(report);
  EXPECT_EQ(report.error().kind(), ErrorKind::kPolicy) << report.error().ToString();
  EXPECT_NE(report.error().ToString().find("symlink"), std::string::npos)
      << report.error().ToString();
  EXPECT_EQ(Found(dir_ + "/real"), found);
  struct stat st;
  ASSERT_EQ(lstat((dir_ + "/out").c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));
}

TEST_F(JobTest, FailingLayerLeavesTheExistingDirAsFound) {
  // Layer 1 is good, layer 2 no tar at all: the dir (1777 with an old mtime,
  // like a fresh tmpfs) is empty again, mode, owner and mtime as they were.
  std::ofstream(dir_ + "/bad.tar") << "this is not a tar archive at all";
  LayerWriter(dir_ + "/l.tar").Dir("./", 0755).File("etc/f", "f").Dir("ro", 0555).File("ro/f", "");
  ASSERT_EQ(mkdir((dir_ + "/out").c_str(), 0), 0);
  ASSERT_EQ(chmod((dir_ + "/out").c_str(), 01777), 0);
  struct timespec old[2] = {{1600000000, 1}, {1600000000, 2}};
  ASSERT_EQ(utimensat(AT_FDCWD, (dir_ + "/out").c_str(), old, 0), 0);
  std::string found = Found(dir_ + "/out");
  request_.layers = {dir_ + "/l.tar", dir_ + "/bad.tar"};
  auto report = RunExtract(request_);
  ASSERT_FALSE(report);
  EXPECT_EQ(report.error().kind(), ErrorKind::kInvalidInput) << report.error().ToString();
  EXPECT_NE(report.error().ToString().find("layer 2"), std::string::npos);
  EXPECT_EQ(Found(dir_ + "/out"), found);
  EXPECT_EQ(Children(), 0);
  // And the same dir takes the next job.
  request_.layers = {dir_ + "/l.tar"};
  auto again = RunExtract(request_);
  ASSERT_TRUE(again) << again.error().ToString();
  EXPECT_EQ(testing::ReadFile(dir_ + "/out/etc/f"), "f");
}

// The last step that can fail comes after the tree is moved in: the manifest
// renamed over a directory (EISDIR). What was moved in goes again, a 0555
// dir included, and the dir is as found.
TEST_F(JobTest, FailureAfterTheTreeIsMovedInLeavesTheExistingDirAsFound) {
  LayerWriter(dir_ + "/l.tar").Dir("./", 0751).File("etc/f", "f").Dir("ro", 0555).File("ro/f", "");
  ASSERT_EQ(mkdir((dir_ + "/out").c_str(), 0755), 0);
  ASSERT_EQ(mkdir((dir_ + "/out.jsonl").c_str(), 0755), 0);
  std::ofstream(dir_ + "/out.jsonl/x") << "x";
  std::string found = Found(dir_ + "/out");
  request_.layers = {dir_ + "/l.tar"};
  auto report = RunExtract(request_);
  ASSERT_FALSE(report);
  EXPECT_EQ(report.error().err(), EISDIR) << report.error().ToString();
  EXPECT_EQ(Found(dir_ + "/out"), found);
}

// While a job runs, the tree it makes (setuid-root binaries, devices) is
// reachable by no other user: an existing dir is 0700 until the job has
// succeeded, a new one is in the 0700 work dir. Layer 2 is a pipe the test
// keeps silent while it looks, then feeds a good layer; afterwards the dir
// has the image root's mode and uid 65534 can reach inside (so the refusals
// before were the mode's doing).
class RootfsHeldTest : public JobTest, public ::testing::WithParamInterface<bool> {};

TEST_P(RootfsHeldTest, SetuidTreeIsClosedToOthersUntilTheJobSucceeded) {
  const bool existing = GetParam();
  const std::string out = dir_ + "/out";
  ASSERT_EQ(chmod(dir_.c_str(), 0755), 0);
  // Layer 1: the root at 0755 and a setuid-root binary.
  LayerWriter(dir_ + "/l1.tar").Dir("./", 0755).Dir("usr", 0755).File("usr/sudo", "s", 04755);
  LayerWriter(dir_ + "/l2.tar").File("etc/motd", "hi");
  std::string layer2 = testing::ReadFile(dir_ + "/l2.tar");
  if (existing) {
    ASSERT_EQ(mkdir(out.c_str(), 0755), 0);
  }
  int fds[2];
  ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
  request_.layers = {dir_ + "/l1.tar", "/dev/fd/" + std::to_string(fds[0])};
  std::optional<Result<JobReport>> report;
  std::thread job([&] { report.emplace(RunExtract(request_)); });
  int writer = fds[1];
  auto finish = [&] {
    if (writer >= 0) close(writer);
    writer = -1;
    if (job.joinable()) job.join();
  };
  // Layer 1 done: its setuid binary is in the work tree.
  const std::string where = existing ? out : dir_;
  std::string work, sudo;
  for (int i = 0; i < 1000 && sudo.empty(); ++i) {
    for (const std::string& name : testing::Listing(where)) {
      struct stat st;
      std::string p = where + "/" + name + "/rootfs/usr/sudo";
      if (name.rfind(".layerx-work-", 0) == 0 && lstat(p.c_str(), &st) == 0) {
        work = where + "/" + name;
        sudo = p;
      }
    }
    if (sudo.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (sudo.empty()) {
    finish();
    FAIL() << "layer 1 never showed up in a work dir";
  }
  struct stat st;
  EXPECT_EQ(stat(work.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u) << "work dir";
  if (existing) {
    EXPECT_EQ(stat(out.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0700u) << "rootfs dir while the job runs";
  } else {
    EXPECT_NE(lstat(out.c_str(), &st), 0) << "the rootfs appeared before the job ended";
  }
  if (geteuid() == 0) {
    EXPECT_EQ(StatAsNobody(sudo), EACCES);
    EXPECT_EQ(StatAsNobody(work + "/rootfs"), EACCES);
    if (existing) {
      EXPECT_EQ(StatAsNobody(work), EACCES);
    }
  }
  EXPECT_EQ(write(writer, layer2.data(), layer2.size()), static_cast<ssize_t>(layer2.size()));
  finish();
  ASSERT_TRUE(report.has_value() && *report) << report->error().ToString();
  ASSERT_EQ(stat(out.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0755u);
  ASSERT_EQ(stat((out + "/usr/sudo").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 04755u);
  EXPECT_EQ(st.st_uid, geteuid());
  EXPECT_EQ(testing::ReadFile(out + "/etc/motd"), "hi");
  if (geteuid() == 0) {
    EXPECT_EQ(StatAsNobody(out + "/usr/sudo"), 0);
  }
  for (const std::string& name : testing::Listing(out)) {
    EXPECT_EQ(name.rfind(".layerx-", 0), std::string::npos) << name << " left in the rootfs";
  }
  close(fds[0]);
}

INSTANTIATE_TEST_SUITE_P(Dirs, RootfsHeldTest, ::testing::Bool(), [](const auto& info) {
  return info.param ? "ExistingEmptyDir" : "NewDir";
});

// Open fds of this process, by number.
std::vector<std::string> OpenFds() { return testing::Listing("/proc/self/fd"); }

// An extractor taken over by a layer halfway (it wrote a file and sent a
// record) that then crashes, or tries a forbidden syscall and is killed by
// seccomp: the job fails as kPeer, nothing is left, no fd, no mount, no child.
class JobCrashTest : public JobTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(JobCrashTest, ExtractorDyingMidLayerLeavesNothing) {
  request_.layers = {dir_ + "/good.tar.gz"};
  request_.extractor_path = LAYERX_JAIL_PROBE;
  request_.extractor_args = {GetParam()};
  auto before = Listing();
  auto fds = OpenFds();
  std::string mounts = testing::ReadFile("/proc/self/mountinfo");
  auto report = RunExtract(request_);
  ASSERT_FALSE(report);
  EXPECT_EQ(report.error().kind(), ErrorKind::kPeer) << report.error().ToString();
  EXPECT_NE(report.error().ToString().find("layer 1"), std::string::npos);
  EXPECT_EQ(Listing(), before);
  EXPECT_EQ(OpenFds(), fds);
  EXPECT_EQ(testing::ReadFile("/proc/self/mountinfo"), mounts);
  EXPECT_EQ(Children(), 0);
  // And the next job runs as if nothing happened.
  request_.extractor_path.clear();
  request_.extractor_args.clear();
  ASSERT_TRUE(RunExtract(request_));
}

INSTANTIATE_TEST_SUITE_P(Modes, JobCrashTest,
                         ::testing::Values("crash-mid-layer", "syscall-mid-layer"),
                         [](const auto& info) {
                           return std::string(info.param) == "crash-mid-layer" ? "Crash"
                                                                               : "ForbiddenSyscall";
                         });

TEST_F(JobTest, SeccompKillIsNamedInTheError) {
  request_.layers = {dir_ + "/good.tar.gz"};
  request_.extractor_path = LAYERX_JAIL_PROBE;
  request_.extractor_args = {"syscall-mid-layer"};
  auto report = RunExtract(request_);
  ASSERT_FALSE(report);
#ifndef LAYERX_SANITIZE
  EXPECT_NE(report.error().ToString().find("SIGSYS"), std::string::npos)
      << report.error().ToString();
#endif
}

TEST_F(JobTest, TimeoutLeavesNoFdOrMount) {
  auto fds = OpenFds();  // before the pipe is made
  std::string mounts = testing::ReadFile("/proc/self/mountinfo");
  auto slow = std::make_unique<SilentPipe>(std::chrono::milliseconds(1000));
  request_.layers = {slow->Name()};
  request_.policy.limits.job_timeout_ms = 300;
  auto report = RunExtract(request_);
  slow.reset();  // both of its ends closed
  ASSERT_FALSE(report);
  EXPECT_NE(report.error().ToString().find("job_timeout_ms=300"), std::string::npos)
      << report.error().ToString();
  EXPECT_EQ(OpenFds(), fds);
  EXPECT_EQ(testing::ReadFile("/proc/self/mountinfo"), mounts);
  EXPECT_EQ(Children(), 0);
}

}  // namespace
}  // namespace layerx::broker
