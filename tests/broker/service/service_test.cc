// `layerx serve` end to end: the real `layerx` binary as the service, real
// clients (`layerx extract --connect` as other uids, the library from
// threads, and raw RPC for what no honest client sends). Jobs that must wait
// read a layer from a fifo the test feeds when it wants them to go on.
//
// As root, the service runs as root and as uid 65533 (the packaged service's
// shape: an unprivileged user), clients as 65534 and 65532 (two tenants) and
// 4242 (no tenant). Run as 65534 (the .rootless variant), the service and its
// one client share that uid; what needs a second uid is skipped there.
// gcc 12 sees kj::Own in a promise of a capability as maybe uninitialized (a
// false positive inside kj's headers).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <capnp/rpc-twoparty.h>
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <kj/async-io.h>
#include <poll.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "broker/service/service.capnp.h"
#include "layerx/layerx.h"
#include "layerx/layerx.hpp"
#include "sandbox/sys.h"
#include "tests/fixtures/layer_writer.h"
#include "tests/fixtures/oci_layout.h"
#include "tests/fixtures/test_util.h"

namespace layerx {
namespace {

using testing::ReadFile;
using Clock = std::chrono::steady_clock;

constexpr uid_t kServiceUid = 65533;  // the service's own user, when root runs the test
constexpr uid_t kAlpha = 65534, kBeta = 65532, kGamma = 65531, kStranger = 4242;

bool Root() { return ::geteuid() == 0; }

// The first fd Spawn() passes `passed` paths on.
constexpr int kFirstPassedFd = 100;

// fork + exec as `uid` (when root and uid != -1), stdout and stderr to `log`.
// With `listen_fd`, as systemd starts a socket-activated service: the socket
// as fd 3, LISTEN_PID and LISTEN_FDS=1. Each of `passed` (fifos) is opened
// for reading, without waiting for a writer, as fd kFirstPassedFd + i, the way
// a shell passes a pipe (`/dev/fd/N`).
pid_t Spawn(const std::vector<std::string>& argv, int uid, const std::string& log,
            int listen_fd = -1, const std::vector<std::string>& passed = {}) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0666);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    for (size_t i = 0; i < passed.size(); ++i) {
      int in = ::open(passed[i].c_str(), O_RDONLY | O_NONBLOCK);
      if (in < 0 || ::dup2(in, kFirstPassedFd + static_cast<int>(i)) < 0) ::_exit(125);
    }
    if (listen_fd >= 0) {
      if (listen_fd == 3) {
        ::fcntl(3, F_SETFD, 0);
      } else {
        ::dup2(listen_fd, 3);  // dup2 clears FD_CLOEXEC
      }
      char pid[32];
      std::snprintf(pid, sizeof(pid), "%d", ::getpid());
      ::setenv("LISTEN_PID", pid, 1);
      ::setenv("LISTEN_FDS", "1", 1);
    }
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    if (uid >= 0 && Root()) {
      if (::setgroups(0, nullptr) != 0 || ::setresgid(uid, uid, uid) != 0 ||
          ::setresuid(uid, uid, uid) != 0) {
        ::_exit(126);
      }
    }
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  return pid;
}

// Waits for pid; its exit status, or 128+signal; -1 past the deadline.
int Wait(pid_t pid, double seconds = 60) {
  auto end = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < end) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return -1;
}

int CountLines(const std::string& path) {
  std::ifstream in(path);
  return static_cast<int>(std::count(std::istreambuf_iterator<char>(in), {}, '\n'));
}

int CountEntries(const std::string& dir) {
  return static_cast<int>(testing::Listing(dir).size()) - 2;
}

// Processes whose parent is `pid`.
int ChildrenOf(pid_t pid) {
  int n = 0;
  for (const std::string& name : testing::Listing("/proc")) {
    if (name.empty() || !std::isdigit(static_cast<unsigned char>(name[0]))) continue;
    std::string stat = ReadFile("/proc/" + name + "/stat");
    size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    int ppid = 0;
    char state = 0;
    if (std::sscanf(stat.c_str() + close + 1, " %c %d", &state, &ppid) == 2 && ppid == pid) ++n;
  }
  return n;
}

uint64_t RssKib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  uint64_t value = 0;
  while (in >> key) {
    if (key == "VmRSS:") {
      in >> value;
      return value;
    }
    in.ignore(256, '\n');
  }
  return 0;
}

// Runs `fn` in a child process as `uid` (when root and uid != -1); its
// return value is the child's exit status.
pid_t RunAs(int uid, const std::function<int()>& fn) {
  pid_t pid = ::fork();
  if (pid == 0) {
    if (uid >= 0 && Root()) {
      if (::setgroups(0, nullptr) != 0 || ::setresgid(uid, uid, uid) != 0 ||
          ::setresuid(uid, uid, uid) != 0) {
        ::_exit(126);
      }
    }
    ::_exit(fn());
  }
  return pid;
}

// A plain connection to the service that says nothing; -1 if it failed.
int ConnectRaw(const std::string& socket) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, socket.data(), socket.size());
  if (::connect(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Reads what the service sends on `fd` until it closes the connection:
// the bytes read, or -1 if it is still open at `deadline`.
ssize_t ReadUntilClosed(int fd, Clock::time_point deadline) {
  ssize_t total = 0;
  char buf[4096];
  while (true) {
    int left = static_cast<int>(
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    struct pollfd pfd = {fd, POLLIN, 0};
    if (left <= 0 || ::poll(&pfd, 1, left) != 1) return -1;
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n == 0 || (n < 0 && errno == ECONNRESET)) return total;
    if (n < 0 && errno != EINTR) return -1;
    total += std::max<ssize_t>(n, 0);
  }
}

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerx-service-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ::chmod(dir_.c_str(), 0777);
    for (const char* sub : {"/out", "/scratch", "/in"}) {
      std::string d = dir_ + sub;
      ::mkdir(d.c_str(), 0777);
      ::chmod(d.c_str(), 0777);
    }
    // Three small layers: a base, an update with a whiteout, a fifo entry.
    testing::LayerWriter(In("l1.tar.gz"), "gzip")
        .Dir("etc")
        .File("etc/greeting", "hello\n")
        .File("usr/bin/sudo", "pretend\n", 04755)
        .File("stale", "x");
    testing::LayerWriter(In("l2.tar.zst"), "zstd").File("etc/motd", "motd\n").Whiteout("", "stale");
    testing::LayerWriter(In("l3.tar"))
        .Fifo("run/pipe")
        .File("home/user/.profile", "", 0600, 1000, 1000);
    for (const char* f : {"l1.tar.gz", "l2.tar.zst", "l3.tar"}) ::chmod(In(f).c_str(), 0644);
  }

  void TearDown() override {
    if (service_ > 0) {
      ::kill(service_, SIGKILL);
      Wait(service_, 10);
    }
    if (::testing::Test::HasFailure() && !log_.empty()) {
      std::fprintf(stderr, "--- service log ---\n%s", ReadFile(log_).c_str());
    }
    (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_);
  }

  std::string In(const std::string& name) const { return dir_ + "/in/" + name; }
  std::string Out(const std::string& name) const { return dir_ + "/out/" + name; }
  std::string Socket() const { return dir_ + "/sock"; }

  // Starts `layerx serve` with these tenants (TOML) and [service] keys.
  void StartService(const std::string& tenants, const std::string& service_keys = "", int uid = -1,
                    bool activated = false) {
    std::string config = dir_ + "/serve.toml";
    std::ofstream(config) << "[service]\nscratch_dir = \"" << dir_ << "/scratch\"\n"
                          << service_keys << "\n"
                          << tenants;
    ::chmod(config.c_str(), 0644);
    log_ = dir_ + "/service.log";
    if (activated) {
      // systemd's part: the socket is made and bound before the service runs.
      int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      struct sockaddr_un addr = {};
      addr.sun_family = AF_UNIX;
      std::memcpy(addr.sun_path, Socket().data(), Socket().size());
      ASSERT_EQ(::bind(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof(addr)), 0);
      ASSERT_EQ(::listen(fd, 16), 0);
      ::chmod(Socket().c_str(), 0666);
      service_ = Spawn({LAYERX_BINARY, "serve", "--config", config, "-v"}, uid, log_, fd);
      ::close(fd);
    } else {
      service_ = Spawn({LAYERX_BINARY, "serve", "--socket", Socket(), "--config", config, "-v"},
                       uid, log_);
    }
    auto end = Clock::now() + std::chrono::seconds(10);
    while (Clock::now() < end) {
      std::string text;
      if (QueryService(Socket(), ServiceQuery::kStatus, &text, nullptr)) return;
      ASSERT_EQ(::waitpid(service_, nullptr, WNOHANG), 0) << ReadFile(log_);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    FAIL() << "the service did not come up: " << ReadFile(log_);
  }

  // `layerx extract --connect` as `uid` with these sources and an ext4 and a
  // manifest output named `name`.img / `name`.jsonl.
  // A source that is a fifo goes over as a descriptor the client inherits
  // ("/dev/fd/N"): a fifo by name is refused.
  pid_t Client(int uid, const std::vector<std::string>& sources, const std::string& name,
               std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {LAYERX_BINARY, "extract", "--connect", Socket()};
    std::vector<std::string> passed;
    for (const std::string& source : sources) {
      struct stat st;
      if (::stat(source.c_str(), &st) == 0 && S_ISFIFO(st.st_mode)) {
        argv.push_back("/dev/fd/" + std::to_string(kFirstPassedFd + passed.size()));
        passed.push_back(source);
      } else {
        argv.push_back(source);
      }
    }
    argv.insert(argv.end(), {"--ext4", Out(name + ".img"), "--manifest", Out(name + ".jsonl")});
    argv.insert(argv.end(), extra.begin(), extra.end());
    return Spawn(argv, uid, Out(name + ".log"), -1, passed);
  }
  std::vector<std::string> Layers() const {
    return {In("l1.tar.gz"), In("l2.tar.zst"), In("l3.tar")};
  }

  // A fifo whose layer the test feeds later (l1.tar.gz by default).
  std::string MakeFifo(const std::string& name) {
    std::string path = In(name);
    EXPECT_EQ(::mkfifo(path.c_str(), 0666), 0);
    ::chmod(path.c_str(), 0666);
    return path;
  }
  // Writes `bytes` of the layer into the fifo (all: -1), then closes it if `close`.
  static void Feed(const std::string& fifo, const std::string& layer, ssize_t bytes = -1) {
    std::string data = ReadFile(layer);
    int fd = ::open(fifo.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    size_t n = bytes < 0 ? data.size() : static_cast<size_t>(bytes);
    ASSERT_EQ(::write(fd, data.data(), n), static_cast<ssize_t>(n));
    ::close(fd);
  }
  // Opens the fifo for writing and keeps it open (the job waits for more).
  int Hold(const std::string& fifo, const std::string& layer, size_t bytes) {
    std::string data = ReadFile(layer);
    int fd = ::open(fifo.c_str(), O_WRONLY);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::write(fd, data.data(), bytes), static_cast<ssize_t>(bytes));
    return fd;
  }

  nlohmann::json Status() {
    std::string text;
    ExtractError error;
    EXPECT_TRUE(QueryService(Socket(), ServiceQuery::kStatusJson, &text, &error)) << error.message;
    return nlohmann::json::parse(text.empty() ? "{}" : text);
  }
  // Waits until the status says so.
  bool WaitFor(const std::function<bool(const nlohmann::json&)>& pred, double seconds = 20) {
    auto end = Clock::now() + std::chrono::duration<double>(seconds);
    while (Clock::now() < end) {
      if (pred(Status())) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }
  std::string Metrics() {
    std::string text;
    ExtractError error;
    EXPECT_TRUE(QueryService(Socket(), ServiceQuery::kMetrics, &text, &error)) << error.message;
    return text;
  }
  // The manifest a local `layerx extract` writes for the same layers.
  std::string LocalManifest() {
    ExtractRequest request;
    request.sources = Layers();
    request.manifest = Out("local.jsonl");
    ExtractResult result = Extract(request);
    EXPECT_TRUE(result.ok()) << result.error().message;
    return ReadFile(Out("local.jsonl"));
  }
  // Nothing of a job left behind: no work dir, no extractor, no mkfs.
  void ExpectServiceClean() {
    EXPECT_TRUE(
        WaitFor([](const nlohmann::json& s) { return s["running"] == 0 && s["queued"] == 0; }, 10));
    auto end = Clock::now() + std::chrono::seconds(5);
    while (Clock::now() < end &&
           (CountEntries(dir_ + "/scratch") != 0 || ChildrenOf(service_) != 0)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_EQ(CountEntries(dir_ + "/scratch"), 0) << "a work dir was left";
    EXPECT_EQ(ChildrenOf(service_), 0) << "a child of the service is still around";
  }

  const std::string kTwoTenants = "[[tenant]]\nname = \"alpha\"\nuids = [" +
                                  std::to_string(kAlpha) +
                                  "]\nmax_concurrent = 1\nmax_queued = 32\n"
                                  "[[tenant]]\nname = \"beta\"\nuids = [" +
                                  std::to_string(kBeta) + "]\n";
  // The rootless run: the one uid there is, as a tenant.
  const std::string kSelf = "[[tenant]]\nname = \"self\"\nuids = [" + std::to_string(::geteuid()) +
                            "]\nmax_concurrent = 2\nmax_queued = 64\n";

  // The one line a CLI printed for the service's answer: the sentence, and
  // none of what kj adds to an error built from C++ expressions
  // (`fmt::format(...) = ...`, `expected ...;`), no source file and line,
  // nothing that calls itself remote.
  void ExpectPlainSentence(const std::string& log, const std::string& sentence) {
    std::string text = ReadFile(log);
    EXPECT_EQ(CountLines(log), 1) << text;
    EXPECT_NE(text.find(sentence), std::string::npos) << text;
    for (size_t at; (at = text.find(dir_)) != std::string::npos;) text.erase(at, dir_.size());
    for (const char* junk : {"fmt::", "format(", " = ", "KJ", "kj::", "expected ",
                             ".cc:", ".c++:", ".h:", "remote exception", "(remote)", "capnp"}) {
      EXPECT_EQ(text.find(junk), std::string::npos) << "\"" << junk << "\" in: " << text;
    }
  }

  std::string dir_, log_;
  pid_t service_ = -1;
};

// Two tenants, their files passed as fds: each gets the image a local
// extraction makes, in files it owns; the service's counters name them.
TEST_F(ServiceTest, TwoTenantsGetTheirImagesThroughPassedFds) {
  if (!Root()) GTEST_SKIP() << "needs two uids (root runs it)";
  std::string local = LocalManifest();
  StartService(kTwoTenants, "", kServiceUid);  // the service unprivileged, as packaged
  pid_t a = Client(kAlpha, Layers(), "a");
  pid_t b = Client(kBeta, Layers(), "b");
  ASSERT_EQ(Wait(a), 0) << ReadFile(Out("a.log"));
  ASSERT_EQ(Wait(b), 0) << ReadFile(Out("b.log"));
  EXPECT_EQ(ReadFile(Out("a.jsonl")), local);
  EXPECT_EQ(ReadFile(Out("b.jsonl")), local);
  struct stat st;
  ASSERT_EQ(::stat(Out("a.img").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, kAlpha);
  ASSERT_EQ(::stat(Out("b.img").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, kBeta);
  std::string metrics = Metrics();
  EXPECT_NE(metrics.find("layerx_jobs_total{tenant=\"alpha\",outcome=\"ok\"} 1"), std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find("layerx_jobs_total{tenant=\"beta\",outcome=\"ok\"} 1"), std::string::npos);
  std::string log = ReadFile(log_);
  EXPECT_NE(log.find("tenant=alpha job="), std::string::npos);
  EXPECT_NE(log.find("tenant=beta job="), std::string::npos);
  ExpectServiceClean();
}

// An OCI layout, resolved by the client as itself: the config output, the
// digests checked by the service against what streams.
TEST_F(ServiceTest, OciLayoutAndConfigOutput) {
  testing::OciLayout oci(dir_ + "/in/oci");
  auto l1 = oci.AddLayer(In("l1.tar.gz"), "application/vnd.oci.image.layer.v1.tar+gzip");
  auto l2 = oci.AddLayer(In("l2.tar.zst"), "application/vnd.oci.image.layer.v1.tar+zstd");
  oci.WriteIndex({{oci.AddImage({l1, l2}), "v1"}});
  StartService(kSelf);
  pid_t c = Client(-1, {"oci:" + oci.dir() + ":v1"}, "oci", {"--config", Out("config.json")});
  ASSERT_EQ(Wait(c), 0) << ReadFile(Out("oci.log"));
  EXPECT_NE(ReadFile(Out("config.json")).find("diff_ids"), std::string::npos);
  EXPECT_NE(ReadFile(Out("oci.jsonl")).find("etc/motd"), std::string::npos);

  // A blob that does not match its digest: integrity, nothing written.
  std::string blob = oci.BlobPath(l2["digest"]);
  ::chmod(blob.c_str(), 0644);
  std::ofstream(blob, std::ios::app) << "tampered";
  pid_t bad = Client(-1, {"oci:" + oci.dir() + ":v1"}, "bad");
  EXPECT_EQ(Wait(bad), 1);
  EXPECT_NE(ReadFile(Out("bad.log")).find("layer 2"), std::string::npos)
      << ReadFile(Out("bad.log"));
  EXPECT_EQ(::access(Out("bad.img").c_str(), F_OK), -1);
  EXPECT_EQ(::access(Out("bad.jsonl").c_str(), F_OK), -1);
  ExpectServiceClean();
}

TEST_F(ServiceTest, UnknownUidIsRefusedBeforeAnyWork) {
  if (!Root()) GTEST_SKIP() << "needs a second uid (root runs it)";
  StartService(kTwoTenants);
  auto t0 = Clock::now();
  pid_t c = Client(kStranger, Layers(), "s");
  EXPECT_EQ(Wait(c), 1);
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
  ExpectPlainSentence(Out("s.log"), "unauthorized: uid 4242 gid 4242 is no tenant of this service");
  EXPECT_EQ(CountEntries(dir_ + "/out"), 1);  // its log only
  EXPECT_NE(Metrics().find("layerx_requests_refused_total{tenant=\"-\",reason=\"unauthorized\"} 1"),
            std::string::npos);
  EXPECT_NE(ReadFile(log_).find("uid=4242"), std::string::npos);
  // Its status call is refused too; an operator's is not.
  pid_t st = Spawn({LAYERX_BINARY, "status", "--socket", Socket()}, kStranger, Out("st.log"));
  EXPECT_EQ(Wait(st), 1);
  ExpectPlainSentence(Out("st.log"),
                      "unauthorized: uid 4242 gid 4242 is no tenant of this service");
  EXPECT_EQ(Status()["tenants"].size(), 2u);
  // A tenant's call for metrics (an error of a call, not of the connection).
  pid_t m =
      Spawn({LAYERX_BINARY, "status", "--socket", Socket(), "--metrics"}, kAlpha, Out("m.log"));
  EXPECT_EQ(Wait(m), 1);
  ExpectPlainSentence(Out("m.log"),
                      "unauthorized: metrics are for the service's operators (root "
                      "and its own uid), not uid " +
                          std::to_string(kAlpha));
}

// A tenant at its concurrency limit with no queue gets "busy" at once (exit
// 75); its running job is untouched and finishes.
TEST_F(ServiceTest, TenantOverItsLimitIsBusy) {
  StartService("[[tenant]]\nname = \"one\"\nuids = [" +
               std::to_string(Root() ? kAlpha : ::geteuid()) +
               "]\nmax_concurrent = 1\nmax_queued = 0\n");
  int uid = Root() ? static_cast<int>(kAlpha) : -1;
  std::string fifo = MakeFifo("slow.tar.gz");
  pid_t first = Client(uid, {fifo}, "first");
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["running"] == 1; }));
  auto t0 = Clock::now();
  pid_t second = Client(uid, Layers(), "second");
  EXPECT_EQ(Wait(second), 75);
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
  std::string err = ReadFile(Out("second.log"));
  EXPECT_NE(err.find("busy: tenant one has 1 jobs running (max_concurrent=1)"), std::string::npos)
      << err;
  EXPECT_EQ(::access(Out("second.img").c_str(), F_OK), -1);
  Feed(fifo, In("l1.tar.gz"));
  EXPECT_EQ(Wait(first), 0) << ReadFile(Out("first.log"));
  EXPECT_NE(Metrics().find("reason=\"busy\"} 1"), std::string::npos);
  ExpectServiceClean();
}

// Tenant A queues 20 jobs behind one that holds the only slot; B's single job,
// sent last, is served before A's 3rd queued job (round-robin).
TEST_F(ServiceTest, QueuedJobsAreServedRoundRobinAcrossTenants) {
  if (!Root()) GTEST_SKIP() << "needs two uids (root runs it)";
  StartService(kTwoTenants, "max_concurrent_jobs = 1\n");
  std::string fifo = MakeFifo("hold.tar.gz");
  pid_t holder = Client(kAlpha, {fifo}, "hold");
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["running"] == 1; }));
  std::vector<pid_t> a;
  for (int i = 0; i < 20; ++i)
    a.push_back(Client(kAlpha, {In("l1.tar.gz")}, "a" + std::to_string(i)));
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["queued"] == 20; }));
  pid_t b = Client(kBeta, {In("l1.tar.gz")}, "b");
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["queued"] == 21; }));
  Feed(fifo, In("l1.tar.gz"));
  ASSERT_EQ(Wait(holder), 0);
  // Completion order, from the service's log ("done: ok" lines in order).
  ASSERT_EQ(Wait(b), 0) << ReadFile(Out("b.log"));
  for (pid_t p : a) ASSERT_EQ(Wait(p), 0);
  std::vector<std::string> order;
  std::istringstream log(ReadFile(log_));
  for (std::string line; std::getline(log, line);) {
    if (line.find("done: ok") == std::string::npos) continue;
    order.push_back(line.find("tenant=beta") != std::string::npos ? "B" : "A");
  }
  ASSERT_EQ(order.size(), 22u);
  // order[0] is the holder; A's queued jobs are order[1..]; B must come
  // before the third of them.
  auto b_at = std::find(order.begin(), order.end(), "B") - order.begin();
  EXPECT_LE(b_at, 3) << "B finished after A's 3rd queued job";
}

// The client dies mid-layer: the service kills the extractor, writes nothing,
// removes the work dir and frees the slot at once.
TEST_F(ServiceTest, ClientDisconnectCancelsItsJob) {
  StartService(kSelf);
  std::string fifo = MakeFifo("mid.tar.gz");
  pid_t c = Client(-1, {fifo}, "gone");
  int hold = Hold(fifo, In("l1.tar.gz"), 100);  // part of the layer; the extractor waits for more
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["running"] == 1; }));
  auto end = Clock::now() + std::chrono::seconds(10);
  while (ChildrenOf(service_) == 0 && Clock::now() < end)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_GE(ChildrenOf(service_), 1) << "no extractor running";
  ::kill(c, SIGKILL);
  Wait(c);
  auto t0 = Clock::now();
  ExpectServiceClean();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));  // promptly, even under ASan
  ::close(hold);
  EXPECT_EQ(::access(Out("gone.img").c_str(), F_OK), -1);
  EXPECT_EQ(::access(Out("gone.jsonl").c_str(), F_OK), -1);
  EXPECT_EQ(CountEntries(dir_ + "/out"), 1);  // the client's log only: its O_TMPFILEs died with it
  EXPECT_NE(ReadFile(log_).find("client went away"), std::string::npos);
  EXPECT_NE(Metrics().find("outcome=\"cancelled\"} 1"), std::string::npos);
  // The slot is free: the next job runs.
  pid_t next = Client(-1, Layers(), "next");
  EXPECT_EQ(Wait(next), 0) << ReadFile(Out("next.log"));
}

// SIGINT to the client (Ctrl-C) cancels the same way, and the client says so.
TEST_F(ServiceTest, InterruptedClientCancelsItsJob) {
  StartService(kSelf);
  std::string fifo = MakeFifo("int.tar.gz");
  pid_t c = Client(-1, {fifo}, "int");
  int hold = Hold(fifo, In("l1.tar.gz"), 100);
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["running"] == 1; }));
  ::kill(c, SIGINT);
  EXPECT_EQ(Wait(c, 10), 1);
  EXPECT_NE(ReadFile(Out("int.log")).find("interrupted"), std::string::npos)
      << ReadFile(Out("int.log"));
  ExpectServiceClean();
  ::close(hold);
  EXPECT_EQ(CountEntries(dir_ + "/out"), 1);
}

// SIGTERM with jobs in flight: no new work; a job that can finish within the
// grace does; one that cannot is cancelled at the deadline; queued ones at
// once; the service cleans up and exits 0.
TEST_F(ServiceTest, SigtermFinishesOrCancelsJobsWithinTheGrace) {
  StartService("[[tenant]]\nname = \"t\"\nuids = [" + std::to_string(::geteuid()) +
                   "]\nmax_concurrent = 2\nmax_queued = 4\n",
               "max_concurrent_jobs = 2\nshutdown_grace_seconds = 2\n");
  std::string quick = MakeFifo("quick.tar.gz"), stuck = MakeFifo("stuck.tar.gz");
  pid_t finishes = Client(-1, {quick}, "finishes");
  pid_t cancelled = Client(-1, {stuck}, "cancelled");
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["running"] == 2; }));
  pid_t queued = Client(-1, Layers(), "queued");
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["queued"] == 1; }));
  int hold = Hold(stuck, In("l1.tar.gz"), 100);
  auto t0 = Clock::now();
  ASSERT_EQ(::kill(service_, SIGTERM), 0);
  EXPECT_EQ(Wait(queued, 10), 1);
  EXPECT_NE(ReadFile(Out("queued.log")).find("shutting down"), std::string::npos)
      << ReadFile(Out("queued.log"));
  // New connections are not accepted any more: the socket is gone.
  EXPECT_EQ(::access(Socket().c_str(), F_OK), -1);
  Feed(quick, In("l1.tar.gz"));
  EXPECT_EQ(Wait(finishes, 10), 0) << ReadFile(Out("finishes.log"));
  EXPECT_EQ(Wait(cancelled, 10), 1);
  EXPECT_NE(ReadFile(Out("cancelled.log")).find("shutting down"), std::string::npos)
      << ReadFile(Out("cancelled.log"));
  EXPECT_EQ(Wait(service_, 10), 0) << ReadFile(log_);
  service_ = -1;
  double took = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_GE(took, 1.5);
  EXPECT_LT(took, 6.0);
  ::close(hold);
  EXPECT_EQ(CountEntries(dir_ + "/scratch"), 0);
  EXPECT_EQ(::access(Out("finishes.img").c_str(), F_OK), 0);
  EXPECT_EQ(::access(Out("cancelled.img").c_str(), F_OK), -1);
  EXPECT_EQ(::access(Out("queued.img").c_str(), F_OK), -1);
}

// A client given a fifo or a device by name (another user's swap in a shared
// dir, or a mistake) refuses it at once, naming it, and sends the service
// nothing: opening the fifo would wait for a writer, reading the device would
// not end before the tenant's clock. Nothing is written.
TEST_F(ServiceTest, ClientRefusesAFifoOrDeviceByNameAtOnce) {
  StartService(kSelf);
  std::string fifo = MakeFifo("named.tar.gz");
  int n = 0;
  for (const std::string& bad : {fifo, std::string("/dev/zero"), "docker-archive:" + fifo}) {
    SCOPED_TRACE(bad);
    std::string name = "named" + std::to_string(n++);
    auto t0 = Clock::now();
    pid_t c = Spawn({LAYERX_BINARY, "extract", "--connect", Socket(), bad, "--ext4",
                     Out(name + ".img"), "--manifest", Out(name + ".jsonl")},
                    -1, Out(name + ".log"));
    EXPECT_EQ(Wait(c, 30), 1);
    EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
    std::string err = ReadFile(Out(name + ".log"));
    std::string file = bad == "/dev/zero" ? bad : fifo;
    EXPECT_NE(err.find("\"" + file + "\" is a"), std::string::npos) << err;
    EXPECT_EQ(CountLines(Out(name + ".log")), 1) << err;
    EXPECT_EQ(::access(Out(name + ".img").c_str(), F_OK), -1);
    EXPECT_EQ(::access(Out(name + ".jsonl").c_str(), F_OK), -1);
  }
  EXPECT_EQ(Metrics().find("layerx_jobs_total{"), std::string::npos) << "a job reached the service";
  ExpectServiceClean();
}

// A tenant's docker-archive whose manifest.json is a fifo (the jailed
// extractor makes it in the service's staging dir): reading it would wait for
// a writer forever, outside any clock, holding a slot. Refused at once, naming
// it; the work dir goes, and the slot serves the next job.
TEST_F(ServiceTest, ArchiveWithAFifoInsideIsRefusedAtOnce) {
  StartService(kSelf);
  testing::LayerWriter(In("fifo.tar")).Fifo("manifest.json").File("a/layer.tar", "x");
  ::chmod(In("fifo.tar").c_str(), 0644);
  auto t0 = Clock::now();
  pid_t c = Client(-1, {"docker-archive:" + In("fifo.tar")}, "fifo");
  EXPECT_EQ(Wait(c, 30), 1);
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
  std::string err = ReadFile(Out("fifo.log"));
  EXPECT_NE(err.find("\"manifest.json\" is a fifo"), std::string::npos) << err;
  EXPECT_EQ(CountLines(Out("fifo.log")), 1) << err;
  EXPECT_EQ(::access(Out("fifo.img").c_str(), F_OK), -1);
  ExpectServiceClean();
  pid_t next = Client(-1, Layers(), "next");
  EXPECT_EQ(Wait(next), 0) << ReadFile(Out("next.log"));
}

// Another user who can write the socket's dir swaps the socket, the moment it
// appears, for a symlink to a file of the service's user. A chmod by path
// after bind made that file 0666 (as root: any file), whenever the swap came
// between bind and chmod (about half the rounds here). The service sets the
// mode without touching the name (bound in a private dir, renamed into place
// with its mode): the file keeps its mode in every round, the socket is 0666
// under any umask (the service runs with umask 077 here), and no private dir
// is left.
TEST_F(ServiceTest, SocketModeIsSetWithoutFollowingTheName) {
  std::string victim = dir_ + "/victim";
  std::ofstream(victim) << "secret";
  ASSERT_EQ(::chmod(victim.c_str(), 0600), 0);
  std::string config = dir_ + "/serve.toml";
  std::ofstream(config) << "[service]\nscratch_dir = \"" << dir_ << "/scratch\"\n" << kSelf;
  ::chmod(config.c_str(), 0644);
  log_ = dir_ + "/service.log";
  const std::string moved = Socket() + ".moved";
  for (int round = 0; round < 6; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    int watch = ::inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    ASSERT_GE(watch, 0);
    ASSERT_GE(::inotify_add_watch(watch, dir_.c_str(), IN_CREATE | IN_MOVED_TO), 0);
    std::atomic<bool> swapped{false}, stop{false};
    std::thread racer([&] {
      alignas(struct inotify_event) char buf[4096];
      while (!stop && !swapped) {
        struct pollfd pfd = {watch, POLLIN, 0};
        if (::poll(&pfd, 1, 50) <= 0) continue;
        ssize_t len = ::read(watch, buf, sizeof(buf));
        for (ssize_t at = 0; at < len;) {
          auto* e = reinterpret_cast<struct inotify_event*>(buf + at);
          at += static_cast<ssize_t>(sizeof(struct inotify_event) + e->len);
          if (e->len == 0 || std::string(e->name) != "sock") continue;
          if (::rename(Socket().c_str(), moved.c_str()) == 0 &&
              ::symlink(victim.c_str(), Socket().c_str()) == 0) {
            swapped = true;
            break;
          }
        }
      }
    });
    service_ = Spawn({"/bin/sh", "-c", "umask 077 && exec \"$0\" \"$@\"", LAYERX_BINARY, "serve",
                      "--socket", Socket(), "--config", config},
                     -1, log_);
    auto end = Clock::now() + std::chrono::seconds(10);
    std::string text;
    while (Clock::now() < end &&
           !(swapped && QueryService(moved, ServiceQuery::kStatus, &text, nullptr))) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    stop = true;
    racer.join();
    ::close(watch);
    ASSERT_TRUE(swapped) << ReadFile(log_);
    EXPECT_TRUE(QueryService(moved, ServiceQuery::kStatus, &text, nullptr))
        << "the moved socket is the service's";
    struct stat st;
    ASSERT_EQ(::lstat(victim.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0600u) << "the service chmod'ed through the swapped name";
    EXPECT_EQ(ReadFile(victim), "secret");
    ASSERT_EQ(::lstat(moved.c_str(), &st), 0);
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
    EXPECT_EQ(st.st_mode & 07777, 0666u);
    for (const std::string& name : testing::Listing(dir_)) {
      EXPECT_EQ(name.rfind(".layerx-sock-", 0), std::string::npos) << name << " was left";
    }
    ::kill(service_, SIGKILL);
    Wait(service_, 10);
    service_ = -1;
    ::unlink(Socket().c_str());
    ::unlink(moved.c_str());
    if (::testing::Test::HasFailure()) break;
  }
}

// A docker-archive goes over as one fd; the service unpacks it in a jail like
// a layer, then applies its layers. Logs as JSON name tenant and job.
TEST_F(ServiceTest, DockerArchiveAndJsonLogs) {
  testing::WriteDockerArchive(In("image.tar"),
                              {{"a/layer.tar", In("l1.tar.gz")}, {"b/layer.tar", In("l2.tar.zst")}},
                              {"a/layer.tar", "b/layer.tar"});
  ::chmod(In("image.tar").c_str(), 0644);
  StartService(kSelf, "log_format = \"json\"\n");
  pid_t c = Client(-1, {"docker-archive:" + In("image.tar") + ":app:v1"}, "da",
                   {"--config", Out("da.json")});
  ASSERT_EQ(Wait(c), 0) << ReadFile(Out("da.log"));
  EXPECT_NE(ReadFile(Out("da.jsonl")).find("etc/motd"), std::string::npos);
  EXPECT_NE(ReadFile(Out("da.json")).find("diff_ids"), std::string::npos);
  int done = 0;
  std::istringstream log(ReadFile(log_));
  for (std::string line; std::getline(log, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << "not JSON: " << line;
    if (j.value("msg", "").rfind("done: ok", 0) == 0) {
      EXPECT_EQ(j["tenant"], "self");
      EXPECT_EQ(j["job"], 1);
      ++done;
    }
  }
  EXPECT_EQ(done, 1);
}

// Started the way layerx.socket starts it: the listening socket from systemd.
TEST_F(ServiceTest, SocketActivation) {
  StartService(kSelf, "", -1, /*activated=*/true);
  pid_t c = Client(-1, Layers(), "sa");
  EXPECT_EQ(Wait(c), 0) << ReadFile(Out("sa.log"));
  EXPECT_NE(ReadFile(log_).find("listening on the systemd socket"), std::string::npos);
}

// Each tenant's jobs run under its own policy: beta strips setuid bits and
// alpha keeps them; neither can choose.
TEST_F(ServiceTest, EachTenantHasItsOwnPolicyAndBudgets) {
  if (!Root()) GTEST_SKIP() << "needs two uids (root runs it)";
  std::string strict = dir_ + "/strict.toml";
  std::ofstream(strict) << "[entries]\nsetuid = \"strip\"\n";
  ::chmod(strict.c_str(), 0644);
  StartService("[[tenant]]\nname = \"alpha\"\nuids = [" + std::to_string(kAlpha) +
               "]\n[[tenant]]\nname = \"beta\"\nuids = [" + std::to_string(kBeta) +
               "]\npolicy = \"" + strict + "\"\nbyte_budget = 30000\n" +
               // The time budget on a tenant of its own: 1 s is too short for
               // a whole job under ASan on a loaded machine.
               "[[tenant]]\nname = \"gamma\"\nuids = [" + std::to_string(kGamma) +
               "]\ntime_budget_seconds = 1\n");
  pid_t a = Client(kAlpha, Layers(), "a");
  pid_t b = Client(kBeta, Layers(), "b");
  ASSERT_EQ(Wait(a), 0) << ReadFile(Out("a.log"));
  ASSERT_EQ(Wait(b), 0) << ReadFile(Out("b.log"));
  auto sudo_mode = [](const std::string& manifest) {
    std::istringstream in(manifest);
    for (std::string line; std::getline(in, line);) {
      auto j = nlohmann::json::parse(line);
      if (j["path"] == "usr/bin/sudo") return j["mode"].get<int>();
    }
    return -1;
  };
  EXPECT_EQ(sudo_mode(ReadFile(Out("a.jsonl"))), 04755) << ReadFile(Out("a.jsonl"));
  EXPECT_EQ(sudo_mode(ReadFile(Out("b.jsonl"))), 0755);
  // A client cannot bring its own policy.
  pid_t own = Spawn({LAYERX_BINARY, "extract", "--connect", Socket(), In("l1.tar.gz"), "--policy",
                     strict, "--ext4", Out("own.img")},
                    kAlpha, Out("own.log"));
  EXPECT_EQ(Wait(own), 2);
  EXPECT_NE(ReadFile(Out("own.log")).find("policy"), std::string::npos);
  // Beta's byte budget (30000 bytes of tar) refuses a bigger layer...
  testing::LayerWriter(In("big.tar")).File("big", std::string(40000, 'x'));
  ::chmod(In("big.tar").c_str(), 0644);
  pid_t big = Client(kBeta, {In("big.tar")}, "big");
  EXPECT_EQ(Wait(big), 1);
  EXPECT_NE(ReadFile(Out("big.log")).find("30000"), std::string::npos) << ReadFile(Out("big.log"));
  EXPECT_EQ(::access(Out("big.img").c_str(), F_OK), -1);
  // ...and gamma's time budget (1 s) stops a job that stalls.
  std::string fifo = MakeFifo("stall.tar.gz");
  pid_t slow = Client(kGamma, {fifo}, "slow");
  int hold = Hold(fifo, In("l1.tar.gz"), 100);
  EXPECT_EQ(Wait(slow, 10), 1);
  ::close(hold);
  EXPECT_NE(ReadFile(Out("slow.log")).find("job_timeout_ms"), std::string::npos)
      << ReadFile(Out("slow.log"));
  ExpectServiceClean();
}

// What no honest client sends: the service reads only what was passed, and
// only if it was opened for reading; it writes only into empty files opened
// for writing. (Raw RPC: the library client never sends these.)
class RawClient {
 public:
  explicit RawClient(const std::string& socket) : io_(kj::setupAsyncIo()) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, socket.data(), socket.size());
    EXPECT_EQ(::connect(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof(addr)), 0);
    stream_ =
        io_.lowLevelProvider->wrapUnixSocketFd(fd, kj::LowLevelAsyncIoProvider::TAKE_OWNERSHIP);
    client_ = kj::heap<capnp::TwoPartyClient>(*stream_, 16);
  }
  class FdCap final : public service::Fd::Server {
   public:
    explicit FdCap(int fd) : fd_(fd) {}
    kj::Maybe<int> getFd() override {
      if (fd_ < 0) return nullptr;
      return fd_;
    }

   private:
    int fd_;
  };
  // A request whose blob is a capability that never resolves: the service
  // waits for its fd (within a bound), counting it as pending meanwhile.
  kj::Promise<std::string> ExtractPending(int ext4) {
    auto paf = kj::newPromiseAndFulfiller<service::Fd::Client>();
    hold_.add(kj::mv(paf.fulfiller));
    auto svc = client_->bootstrap().castAs<service::Service>();
    auto call = svc.extractRequest();
    auto layers = call.initRequest().initSource().initImage().initLayers(1);
    layers[0].setBlob(service::Fd::Client(kj::mv(paf.promise)));
    call.getRequest().setExt4(kj::heap<FdCap>(ext4));
    return call.send().then([](auto response) {
      auto result = response.getResult();
      return result.isFailure() ? std::string(result.getFailure().getMessage().cStr()) : "ok";
    });
  }
  // A status call: the connection is then surely one the service counts.
  bool Status() {
    auto svc = client_->bootstrap().castAs<service::Service>();
    return svc.statusRequest()
        .send()
        .then([](auto) { return true; }, [](kj::Exception&&) { return false; })
        .wait(io_.waitScope);
  }
  kj::WaitScope& wait_scope() { return io_.waitScope; }
  kj::Timer& timer() { return io_.provider->getTimer(); }
  // One layer blob fd and one ext4 output fd (-1: a capability with no fd).
  std::string Extract(int layer, int ext4) {
    auto svc = client_->bootstrap().castAs<service::Service>();
    auto call = svc.extractRequest();
    auto layers = call.initRequest().initSource().initImage().initLayers(1);
    layers[0].setBlob(kj::heap<FdCap>(layer));
    layers[0].setName("raw");
    call.getRequest().setExt4(kj::heap<FdCap>(ext4));
    auto response = call.send().wait(io_.waitScope);
    auto result = response.getResult();
    return result.isFailure() ? std::string(result.getFailure().getMessage().cStr()) : "ok";
  }

 private:
  kj::AsyncIoContext io_;
  kj::Own<kj::AsyncCapabilityStream> stream_;
  kj::Own<capnp::TwoPartyClient> client_;
  kj::Vector<kj::Own<kj::PromiseFulfiller<service::Fd::Client>>> hold_;
};

TEST_F(ServiceTest, OnlyReadableInputsAndEmptyWritableOutputsAreTaken) {
  StartService(kSelf);
  std::string layer = In("l1.tar.gz");
  int readable = ::open(layer.c_str(), O_RDONLY | O_CLOEXEC);
  int path_only = ::open(layer.c_str(), O_PATH | O_CLOEXEC);
  int write_only_in = ::open(layer.c_str(), O_WRONLY | O_CLOEXEC);
  int dir = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  std::string out = Out("raw.img");
  int output = ::open(out.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  int read_only_out = ::open(out.c_str(), O_RDONLY | O_CLOEXEC);
  int append_out = ::open(out.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
  int full = ::open(Out("full.img").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_EQ(::write(full, "keep", 4), 4);
  {
    // (Its kj event loop must be gone before the library makes its own.)
    RawClient raw(Socket());
    EXPECT_NE(raw.Extract(path_only, output).find("layer: not opened for reading"),
              std::string::npos);
    EXPECT_NE(raw.Extract(write_only_in, output).find("layer: not opened for reading"),
              std::string::npos);
    EXPECT_NE(raw.Extract(dir, output).find("layer: not a regular file or a pipe"),
              std::string::npos);
    EXPECT_NE(raw.Extract(-1, output).find("layer: no file descriptor came with it"),
              std::string::npos);
    EXPECT_NE(raw.Extract(readable, read_only_out).find("ext4 output: not opened for writing"),
              std::string::npos);
    EXPECT_NE(raw.Extract(readable, append_out).find("not opened for writing"), std::string::npos);
    EXPECT_NE(raw.Extract(readable, full).find("ext4 output: not empty"), std::string::npos);
    EXPECT_EQ(ReadFile(Out("full.img")), "keep");
    struct stat st;
    ASSERT_EQ(::fstat(output, &st), 0);
    EXPECT_EQ(st.st_size, 0);
    EXPECT_EQ(raw.Extract(readable, output), "ok");
    ASSERT_EQ(::fstat(output, &st), 0);
    EXPECT_GT(st.st_size, 0);
  }
  for (int fd :
       {readable, path_only, write_only_in, dir, output, read_only_out, append_out, full}) {
    ::close(fd);
  }
  ExpectServiceClean();
}

// The C ABI's way in: LAYERX_OPT_CONNECT, and the service's own answers as
// statuses of their own.
TEST_F(ServiceTest, CAbiConnects) {
  StartService(kSelf);
  auto run = [this](const char* ext4) {
    layerx_request* req = layerx_request_new();
    for (const std::string& l : Layers()) layerx_request_add_source(req, l.c_str());
    layerx_request_set_output(req, LAYERX_OUTPUT_EXT4, ext4);
    layerx_request_set_string(req, LAYERX_OPT_CONNECT, Socket().c_str());
    layerx_result* res = nullptr;
    layerx_status status = layerx_extract(req, &res);
    std::string message = layerx_result_message(res);
    layerx_result_free(res);
    layerx_request_free(req);
    return std::make_pair(status, message);
  };
  auto [ok, none] = run(Out("c.img").c_str());
  EXPECT_EQ(ok, LAYERX_OK) << none;
  EXPECT_EQ(::access(Out("c.img").c_str(), F_OK), 0);
  // A rootfs cannot go through the service: a usage error, nothing made.
  layerx_request* req = layerx_request_new();
  layerx_request_add_source(req, In("l1.tar.gz").c_str());
  layerx_request_set_output(req, LAYERX_OUTPUT_ROOTFS, Out("rootfs").c_str());
  layerx_request_set_string(req, LAYERX_OPT_CONNECT, Socket().c_str());
  layerx_result* res = nullptr;
  EXPECT_EQ(layerx_extract(req, &res), LAYERX_E_USAGE);
  layerx_result_free(res);
  layerx_request_free(req);
  EXPECT_STREQ(layerx_status_name(LAYERX_E_BUSY), "busy");
  EXPECT_STREQ(layerx_status_name(LAYERX_E_UNAUTHORIZED), "unauthorized");
}

// The library client names an unauthorized caller's failure as such.
TEST_F(ServiceTest, LibraryClientSeesUnauthorized) {
  StartService("[[tenant]]\nname = \"other\"\nuids = [4243]\n");
  ExtractRequest request;
  request.connect = Socket();
  request.sources = Layers();
  request.ext4 = Out("u.img");
  ExtractResult result = Extract(request);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().kind, FailureKind::kUnauthorized) << result.error().message;
  EXPECT_EQ(::access(Out("u.img").c_str(), F_OK), -1);
  // The CLI shows the service's sentence, and nothing of kj or C++.
  pid_t c = Client(-1, Layers(), "cli");
  EXPECT_EQ(Wait(c), 1);
  ExpectPlainSentence(Out("cli.log"),
                      fmt::format("unauthorized: uid {} gid {} is no tenant of this "
                                  "service",
                                  ::geteuid(), ::getegid()));
  // Its status call too, unless it is an operator (root, or the service's uid: rootless here).
  std::string text;
  ExtractError error;
  EXPECT_TRUE(QueryService(Socket(), ServiceQuery::kStatus, &text, &error)) << error.message;
}

// A request whose fds never come is counted against its tenant's queue while
// the service waits for them; the tenant is busy, not the service's fds.
TEST_F(ServiceTest, PendingRequestsCountAgainstTheQueue) {
  StartService("[[tenant]]\nname = \"t\"\nuids = [" + std::to_string(::geteuid()) +
               "]\nmax_concurrent = 1\nmax_queued = 1\n");
  int out1 = ::open(Out("p1.img").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  int out2 = ::open(Out("p2.img").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  {
    RawClient raw(Socket());
    auto first = raw.ExtractPending(out1);
    auto second = raw.ExtractPending(out2);
    std::string answer = second.wait(raw.wait_scope());
    EXPECT_NE(answer.find("busy: tenant t has 0 jobs running (max_concurrent=1) and 1 queued"),
              std::string::npos)
        << answer;
    EXPECT_FALSE(first.poll(raw.wait_scope()));  // still waiting for its fd
  }                                              // the client goes: its pending call with it
  ::close(out1);
  ::close(out2);
  pid_t c = Client(-1, Layers(), "after");
  EXPECT_EQ(Wait(c), 0) << ReadFile(Out("after.log"));
  ExpectServiceClean();
}

// A tenant whose own limit holds its queue does not make another tenant busy
// while slots are free.
TEST_F(ServiceTest, AnotherTenantsQueueDoesNotMakeATenantBusy) {
  if (!Root()) GTEST_SKIP() << "needs two uids (root runs it)";
  StartService("[[tenant]]\nname = \"alpha\"\nuids = [" + std::to_string(kAlpha) +
                   "]\nmax_concurrent = 1\nmax_queued = 4\n[[tenant]]\nname = \"beta\"\nuids = [" +
                   std::to_string(kBeta) + "]\nmax_concurrent = 1\nmax_queued = 0\n",
               "max_concurrent_jobs = 2\n");
  std::string fifo = MakeFifo("hold.tar.gz");
  pid_t holder = Client(kAlpha, {fifo}, "hold");
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["running"] == 1; }));
  pid_t waiting = Client(kAlpha, {In("l1.tar.gz")}, "wait");
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["queued"] == 1; }));
  pid_t b = Client(kBeta, Layers(), "b");
  EXPECT_EQ(Wait(b), 0) << ReadFile(Out("b.log"));
  Feed(fifo, In("l1.tar.gz"));
  EXPECT_EQ(Wait(holder), 0);
  EXPECT_EQ(Wait(waiting), 0);
}

// 200 jobs from 8 concurrent clients (library threads, each its own
// connection): no failure; afterwards the service has the fds, threads,
// children and mounts it had before, and its memory is flat.
TEST_F(ServiceTest, Soak200JobsFrom8Clients) {
  StartService("[[tenant]]\nname = \"soak\"\nuids = [" + std::to_string(::geteuid()) +
               "]\nmax_concurrent = 8\nmax_queued = 64\n");
  auto fds = [this] { return CountEntries("/proc/" + std::to_string(service_) + "/fd"); };
  auto threads = [this] { return CountEntries("/proc/" + std::to_string(service_) + "/task"); };
  auto mounts = [this] { return CountLines("/proc/" + std::to_string(service_) + "/mountinfo"); };
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // StartService's probe is gone
  const int fds0 = fds(), threads0 = threads(), mounts0 = mounts();
#ifdef LAYERX_SANITIZE
  // Under ASan the point is memory errors, not figures: fewer jobs, and its
  // quarantine makes RSS grow by design.
  constexpr int kClients = 8, kJobsEach = 8, kWarmup = 2;
  constexpr uint64_t kRssSlackKib = 1 << 30;
#else
  constexpr int kClients = 8, kJobsEach = 25, kWarmup = 3;
  constexpr uint64_t kRssSlackKib = 8 * 1024;
#endif
  std::mutex mu;
  std::vector<double> latencies;
  std::vector<std::string> failures;
  uint64_t rss_warm = 0;
  auto run = [&](int client, int from, int to) {
    for (int j = from; j < to; ++j) {
      ExtractRequest request;
      request.connect = Socket();
      request.sources = Layers();
      request.ext4 = Out(fmt::format("soak-{}.img", client));
      auto t0 = Clock::now();
      ExtractResult result = Extract(request);
      double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      std::lock_guard lock(mu);
      latencies.push_back(ms);
      if (!result.ok()) failures.push_back(result.error().message);
    }
  };
  auto batch = [&](int from, int to) {
    std::vector<std::thread> clients;
    for (int c = 0; c < kClients; ++c) clients.emplace_back(run, c, from, to);
    for (std::thread& t : clients) t.join();
  };
  batch(0, kWarmup);  // 24 jobs: the service's allocator and caches warm up
  rss_warm = RssKib(service_);
  auto t0 = Clock::now();
  batch(kWarmup, kJobsEach);
  double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  ASSERT_TRUE(failures.empty()) << failures.size() << " failed, e.g. " << failures[0];
  ASSERT_EQ(latencies.size(), static_cast<size_t>(kClients * kJobsEach));
  ExpectServiceClean();
  // Connections close as their clients go; give the loop a moment.
  auto end = Clock::now() + std::chrono::seconds(5);
  while (Clock::now() < end && (fds() != fds0 || threads() != threads0)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(fds(), fds0);
  EXPECT_EQ(threads(), threads0);
  EXPECT_EQ(mounts(), mounts0);
  uint64_t rss_end = RssKib(service_);
  std::sort(latencies.begin(), latencies.end());
  auto pct = [&](double p) { return latencies[static_cast<size_t>(p * (latencies.size() - 1))]; };
  std::printf(
      "soak: %d jobs from %d clients; %.1f jobs/s after warm-up; latency p50 %.0f ms, "
      "p99 %.0f ms; service RSS %llu KiB at start of the measured run, %llu KiB at end\n",
      kClients * kJobsEach, kClients, (kClients * (kJobsEach - kWarmup)) / seconds, pct(0.5),
      pct(0.99), static_cast<unsigned long long>(rss_warm),
      static_cast<unsigned long long>(rss_end));
  EXPECT_LT(rss_end, rss_warm + kRssSlackKib) << "service memory grew";
  std::string metrics = Metrics();
  EXPECT_NE(metrics.find(fmt::format("layerx_jobs_total{{tenant=\"soak\",outcome=\"ok\"}} {}",
                                     kClients * kJobsEach)),
            std::string::npos)
      << metrics;
}

// A stranger's connections cost the service nothing: 20 uids of no tenant
// (a subuid range has 65536) open 60 connections each, more than the 1024
// the service holds in all, and keep them open. Each is answered
// `unauthorized` and closed by the service within moments, none is counted,
// and a tenant is served meanwhile.
TEST_F(ServiceTest, StrangersHoardingConnectionsCannotLockATenantOut) {
  if (!Root()) GTEST_SKIP() << "needs uids of no tenant (root runs it)";
  StartService(kTwoTenants);
  auto service_fds = [this] { return CountEntries("/proc/" + std::to_string(service_) + "/fd"); };
  const int fds0 = service_fds();
  constexpr int kUids = 20, kEach = 60;
  int ready[2], release[2];
  ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(release, O_CLOEXEC), 0);
  std::vector<pid_t> hoarders;
  for (int i = 0; i < kUids; ++i) {
    // Exit status: 0 when the service answered every connection and ended
    // it within 5 s; else how many it did not. The hoarder keeps its ends
    // open until released.
    hoarders.push_back(RunAs(5000 + i, [&] {
      ::close(release[1]);
      std::vector<int> fds;
      for (int k = 0; k < kEach; ++k) {
        int fd = ConnectRaw(Socket());
        if (fd < 0) return 100;
        fds.push_back(fd);
      }
      (void)!::write(ready[1], "r", 1);
      ::close(ready[1]);  // a hoarder that failed must not leave the test waiting on this one
      auto deadline = Clock::now() + std::chrono::seconds(5);
      int open = 0;
      for (int fd : fds) open += ReadUntilClosed(fd, deadline) > 0 ? 0 : 1;
      char c;
      (void)!::read(release[0], &c, 1);
      return open;
    }));
  }
  ::close(ready[1]);
  ::close(release[0]);
  struct Release {
    int fd;
    ~Release() { ::close(fd); }
  } release_on_exit{release[1]};
  char r;
  for (int i = 0; i < kUids; ++i) ASSERT_EQ(::read(ready[0], &r, 1), 1) << "hoarder " << i;
  ::close(ready[0]);
  // All 1200 are open on the strangers' side now: a tenant is still served.
  auto t0 = Clock::now();
  pid_t a = Client(kAlpha, Layers(), "a");
  EXPECT_EQ(Wait(a), 0) << ReadFile(Out("a.log"));
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(10));
  // And the service holds none of them (it waits 2 s at most for a peer
  // it turned away to close its end), while the strangers still do.
  auto end = Clock::now() + std::chrono::seconds(5);
  while (Clock::now() < end && service_fds() > fds0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_LE(service_fds(), fds0);  // (fds0 may count the start's status query)
  ::close(release_on_exit.fd);
  release_on_exit.fd = -1;
  for (pid_t pid : hoarders) EXPECT_EQ(Wait(pid, 20), 0) << "connections not answered and ended";
  std::string metrics = Metrics();
  EXPECT_NE(metrics.find(fmt::format(
                "layerx_requests_refused_total{{tenant=\"-\",reason=\"unauthorized\"}} {}",
                kUids * kEach)),
            std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find("layerx_connections 1\n"), std::string::npos) << metrics;  // this one
  // A line a second at most for them, not 1200.
  std::string log = ReadFile(log_);
  size_t lines = 0;
  for (size_t at = 0; (at = log.find("turned away", at)) != std::string::npos; ++at) ++lines;
  EXPECT_GE(lines, 1u);
  EXPECT_LE(lines, 15u) << log;
}

// A connection with no call in flight for idle_timeout_seconds is closed;
// one whose job runs, or waits in the queue, longer than that is not.
TEST_F(ServiceTest, IdleConnectionsAreClosedButNotThoseWithAJob) {
  int uid = Root() ? static_cast<int>(kAlpha) : -1;
  StartService("[[tenant]]\nname = \"t\"\nuids = [" +
                   std::to_string(Root() ? kAlpha : ::geteuid()) +
                   "]\nmax_concurrent = 1\nmax_queued = 4\n",
               "idle_timeout_seconds = 1\n");
  // (As root this one is an operator's; rootless, the tenant's.)
  int idle = ConnectRaw(Socket());
  ASSERT_GE(idle, 0);
  auto t0 = Clock::now();
  EXPECT_EQ(ReadUntilClosed(idle, t0 + std::chrono::seconds(5)), 0) << "not closed within 5 s";
  EXPECT_GT(Clock::now() - t0, std::chrono::milliseconds(900));
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(3));
  ::close(idle);
  EXPECT_NE(ReadFile(log_).find("no call for 1 s: closed"), std::string::npos);
  if (Root()) {  // and the tenant's, from its own uid
    pid_t tenant = RunAs(uid, [this] {
      int fd = ConnectRaw(Socket());
      auto start = Clock::now();
      if (fd < 0 || ReadUntilClosed(fd, start + std::chrono::seconds(5)) != 0) return 1;
      auto took = Clock::now() - start;
      return took > std::chrono::milliseconds(900) && took < std::chrono::seconds(3) ? 0 : 2;
    });
    EXPECT_EQ(Wait(tenant), 0);
  }

  std::string running = MakeFifo("running.tar.gz"), queued = MakeFifo("queued.tar.gz");
  pid_t first = Client(uid, {running}, "running");
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["running"] == 1; }));
  pid_t second = Client(uid, {queued}, "queued");
  ASSERT_TRUE(WaitFor([](const nlohmann::json& s) { return s["queued"] == 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  Feed(running, In("l1.tar.gz"));
  Feed(queued, In("l1.tar.gz"));
  EXPECT_EQ(Wait(first), 0) << ReadFile(Out("running.log"));
  EXPECT_EQ(Wait(second), 0) << ReadFile(Out("queued.log"));
  ExpectServiceClean();
}

// A tenant at its max_connections gets `busy` for one more connection (exit
// 75, one sentence) while another tenant is served; when one of its own
// closes, it is served again.
TEST_F(ServiceTest, TenantOverItsConnectionCapIsBusyAndOthersAreNot) {
  int uid = Root() ? static_cast<int>(kAlpha) : -1;
  StartService("[[tenant]]\nname = \"alpha\"\nuids = [" +
               std::to_string(Root() ? kAlpha : ::geteuid()) +
               "]\nmax_connections = 2\n[[tenant]]\nname = \"beta\"\nuids = [" +
               std::to_string(kBeta) + "]\n");
  // Two connections of alpha's, held by children that each made a call on
  // theirs (so the service has surely counted it) and hold it until they
  // are killed or this process goes (`release` reads end of file).
  int ready[2], release[2];
  ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(release, O_CLOEXEC), 0);
  std::vector<pid_t> holders;
  for (int i = 0; i < 2; ++i) {
    holders.push_back(RunAs(uid, [&] {
      ::close(release[1]);
      ::close(ready[0]);
      // StartService's own status query was a connection of alpha's too: the
      // service may not have seen it close yet (then this one is "busy").
      std::optional<RawClient> raw;
      for (int attempt = 0; attempt < 100; ++attempt) {
        raw.emplace(Socket());
        if (raw->Status()) break;
        raw.reset();
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      // The write end goes with the byte: a holder that failed must not leave
      // the test waiting on one that holds it open.
      if (raw) (void)!::write(ready[1], "r", 1);
      ::close(ready[1]);
      if (!raw) return 1;
      char c;
      (void)!::read(release[0], &c, 1);
      return 0;
    }));
  }
  ::close(ready[1]);
  ::close(release[0]);
  struct Release {
    int fd;
    ~Release() { ::close(fd); }
  } release_on_exit{release[1]};
  char r;
  for (int i = 0; i < 2; ++i) ASSERT_EQ(::read(ready[0], &r, 1), 1) << "holder " << i;
  ::close(ready[0]);
  auto t0 = Clock::now();
  pid_t over = Client(uid, Layers(), "over");
  EXPECT_EQ(Wait(over), 75);
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
  ExpectPlainSentence(Out("over.log"),
                      "busy: tenant alpha has 2 connections open (max_connections=2)");
  EXPECT_EQ(CountEntries(dir_ + "/out"), 1);  // its log only
  if (Root()) {
    pid_t b = Client(kBeta, Layers(), "b");
    EXPECT_EQ(Wait(b), 0) << ReadFile(Out("b.log"));
    EXPECT_NE(Metrics().find("layerx_requests_refused_total{tenant=\"alpha\",reason=\"busy\"} 1"),
              std::string::npos);
  }
  ::kill(holders[0], SIGKILL);
  EXPECT_EQ(Wait(holders[0]), 128 + SIGKILL);
  // The service sees that connection go within moments.
  int status = -1;
  for (int attempt = 0; attempt < 20 && status != 0; ++attempt) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    status = Wait(Client(uid, Layers(), "again"));
  }
  EXPECT_EQ(status, 0) << ReadFile(Out("again.log"));
  ::kill(holders[1], SIGKILL);
  EXPECT_EQ(Wait(holders[1]), 128 + SIGKILL);
}

}  // namespace
}  // namespace layerx
