// Jobs end cleanly whatever happens: timeouts, cancellation, a refused layer,
// an existing output. No output, no work dir, no child left; a second run works.
#include "broker/job.h"

#include <archive.h>
#include <archive_entry.h>
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <memory>
#include <thread>

#include "sandbox/sys.h"
#include "tests/fixtures/test_util.h"

namespace layerx::broker {
namespace {

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
  // Our children that are still around (zombies included).
  static int Children() {
    int n = 0;
    std::ifstream in("/proc/self/task/" + std::to_string(gettid()) + "/children");
    std::string pid;
    while (in >> pid) ++n;
    return n;
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

// A pipe whose writer stays silent for `hold`, then closes; the layer is its
// read end, passed as a descriptor ("/dev/fd/N": a fifo by name is refused).
struct SilentPipe {
  explicit SilentPipe(std::chrono::milliseconds hold) {
    int fds[2];
    EXPECT_EQ(pipe2(fds, O_CLOEXEC), 0);
    read_end = fds[0];
    writer = std::thread([w = fds[1], hold] {
      std::this_thread::sleep_for(hold);
      close(w);
    });
  }
  ~SilentPipe() {
    writer.join();
    close(read_end);
  }
  std::string Name() const { return "/dev/fd/" + std::to_string(read_end); }
  int read_end = -1;
  std::thread writer;
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
