// docker:// sources end to end: the real `layerx` CLI against real registries
// (Debian's docker-registry, started by tests/registry/registry.sh: an https
// instance with a self-signed CA and an htpasswd user, and a plain http one),
// and against tests/registry/fake_registry.py for what an honest registry
// never does. Root and rootless (uid 65534; every state dir is a mkdtemp under
// /tmp, made by the uid that runs).
//
// What a user relies on: a pull gives the bytes an `oci:` extraction of the
// same layout gives (manifest lines, config, ext4 that passes e2fsck), by tag,
// by digest, over TLS with --cert-dir and every way of passing credentials, over
// plain http; the platform picked from an index; a blob cache that is filled
// with exactly the verified layer blobs and spares the network; a resumed
// transfer when the registry restarts mid-blob; the service used through
// --connect, with the client doing the network.
// What an attacker tries: a wrong password (never echoed, never logged),
// tampered blobs in the registry's storage, a registry that dies, drips,
// stalls, sends too much or too little, loops, serves schema 1, a huge or
// endless manifest, a config that is not its digest; a poisoned blob cache (a
// corrupt blob, a symlink, a fifo); bad names. Each refusal is exit 1 (2 for a
// usage error), exactly one line "layerx: ..." on stderr naming the layer when
// a layer is at fault, and nothing left where the outputs would have been.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <layerx/layerx.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "sandbox/sys.h"
#include "tests/fixtures/layer_writer.h"
#include "tests/fixtures/oci_layout.h"
#include "tests/fixtures/registry_env.h"
#include "tests/fixtures/test_util.h"

namespace layerx {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;
using testing::LayerWriter;
using testing::OciLayout;
using testing::ReadFile;

const std::string kScript = std::string(LAYERX_SOURCE_DIR) + "/tests/registry/registry.sh";
const std::string kFakeRegistry =
    std::string(LAYERX_SOURCE_DIR) + "/tests/registry/fake_registry.py";
const char kCorpusLayout[] = "/var/tmp/layerx-corpus/images/debian/oci";
constexpr const char* kGzip = "application/vnd.oci.image.layer.v1.tar+gzip";
constexpr const char* kZstd = "application/vnd.oci.image.layer.v1.tar+zstd";
constexpr const char* kTar = "application/vnd.oci.image.layer.v1.tar";
// Layer 3's file: the tamper test flips its case in the registry's storage,
// which keeps the tar valid (its header checksums do not cover data), so the
// digest is all that can tell.
const std::string kMotd = "layerx motd: the bytes the tamper test flips\n";

bool Root() { return ::geteuid() == 0; }

int Sh(const std::string& command) {
  int rc = std::system(command.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

std::string ShOut(const std::string& command) {
  std::string out;
  if (FILE* p = ::popen(command.c_str(), "r")) {
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
    ::pclose(p);
  }
  return out;
}

std::string Base64(const std::string& in) {
  static const char* k = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    for (int s : {18, 12, 6, 0}) out += k[(v >> s) & 63];
  }
  if (i + 1 == in.size()) {
    uint32_t v = uint8_t(in[i]) << 16;
    out += {k[(v >> 18) & 63], k[(v >> 12) & 63], '=', '='};
  } else if (i + 2 == in.size()) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8);
    out += {k[(v >> 18) & 63], k[(v >> 12) & 63], k[(v >> 6) & 63], '='};
  }
  return out;
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// One run of a program: exit status (-1: killed at its deadline, 128+N: signal
// N), what it printed, how long it took.
struct Outcome {
  int code = -1;
  std::string out, err;
  double seconds = 0;
  std::string Both() const { return "stdout: " + out + "\nstderr: " + err; }
};

// A started program; Finish() waits for it.
class Proc {
 public:
  // argv[0] is the program; `env` entries (KEY=VALUE, or KEY= to unset) are
  // applied over this process's environment, after the credential lookups
  // were pinned to `home` (HOME, no XDG dirs, no REGISTRY_AUTH_FILE): a pull
  // sees the auth files a test gives it and no other.
  Proc(const std::vector<std::string>& argv, const std::string& log_base, const std::string& home,
       const std::vector<std::string>& env = {})
      : out_(log_base + ".out"), err_(log_base + ".err"), start_(Clock::now()) {
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      int o = ::open(out_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      int e = ::open(err_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (o < 0 || e < 0 || ::dup2(o, 1) < 0 || ::dup2(e, 2) < 0) ::_exit(125);
      int null = ::open("/dev/null", O_RDONLY);
      if (null >= 0) ::dup2(null, 0);
      ::setenv("HOME", home.c_str(), 1);
      for (const char* v :
           {"XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG",
            "CONTAINERS_REGISTRIES_CONF", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
            "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"}) {
        ::unsetenv(v);
      }
      for (const std::string& kv : env) {
        size_t eq = kv.find('=');
        if (eq + 1 == kv.size()) {
          ::unsetenv(kv.substr(0, eq).c_str());
        } else {
          ::setenv(kv.substr(0, eq).c_str(), kv.c_str() + eq + 1, 1);
        }
      }
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
  }
  Proc(const Proc&) = delete;
  Proc& operator=(const Proc&) = delete;
  ~Proc() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  pid_t pid() const { return pid_; }

  Outcome Finish(double seconds = 90) {
    Outcome r;
    auto end = start_ + std::chrono::duration<double>(seconds);
    while (pid_ > 0) {
      int status = 0;
      pid_t w = ::waitpid(pid_, &status, WNOHANG);
      if (w == pid_) {
        r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        pid_ = -1;
        break;
      }
      if (Clock::now() > end) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
        pid_ = -1;
        r.code = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    r.seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    r.out = ReadFile(out_);
    r.err = ReadFile(err_);
    ::unlink(out_.c_str());
    ::unlink(err_.c_str());
    return r;
  }

 private:
  std::string out_, err_;
  Clock::time_point start_;
  pid_t pid_ = -1;
};

size_t Lines(const std::string& text) { return std::count(text.begin(), text.end(), '\n'); }

// The refusal every failing case must give: the exit status, exactly one
// line "layerx: ..." on stderr with each of `needles`, nothing on stdout.
void ExpectOneLineRefusal(const Outcome& r, std::set<int> codes,
                          const std::vector<std::string>& needles) {
  EXPECT_TRUE(codes.contains(r.code)) << "exit " << r.code << "\n" << r.Both();
  EXPECT_EQ(Lines(r.err), 1u) << r.err;
  EXPECT_EQ(r.err.rfind("layerx: ", 0), 0u) << r.err;
  for (const std::string& n : needles) {
    EXPECT_NE(r.err.find(n), std::string::npos) << "\"" << n << "\" not in: " << r.err;
  }
  EXPECT_TRUE(r.out.empty()) << r.out;
}

// "layer N (sha256:<12 hex>" as the one line names a layer.
std::string LayerName(size_t n, const std::string& digest) {
  return "layer " + std::to_string(n) + " (" + digest.substr(0, 19);
}

// sha256 hex names in DIR (anything else there is named as it is).
std::set<std::string> Names(const std::string& dir) {
  std::set<std::string> names;
  for (const std::string& n : testing::Listing(dir)) {
    if (n != "." && n != "..") names.insert(n);
  }
  return names;
}

// The layout's image for tag `ref`: its manifest (parsed) and digest.
std::pair<json, std::string> LayoutImage(const std::string& layout, const std::string& ref) {
  json index = json::parse(ReadFile(layout + "/index.json"));
  for (const auto& d : index["manifests"]) {
    auto ann = d.value("annotations", json::object());
    if (ann.value("org.opencontainers.image.ref.name", "") == ref) {
      std::string digest = d["digest"];
      return {json::parse(ReadFile(layout + "/blobs/sha256/" + digest.substr(7))), digest};
    }
  }
  return {json(), ""};
}

// Bytes written by process `pid` so far (sockets included).
uint64_t WrittenBy(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/io");
  std::string key;
  uint64_t value = 0;
  while (in >> key >> value) {
    if (key == "wchar:") return value;
  }
  return 0;
}

// The registry of tests/registry, one per suite, with three small images
// written here (see SetUpTestSuite); a big one is pushed when a test needs it.
class RegistryPullTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (Sh("sh " + kScript + " check >/dev/null 2>&1") != 0) {
      skip_ = "the registry harness's tools (docker-registry, skopeo, htpasswd) are missing";
      return;
    }
    char tmpl[] = "/tmp/layerx-pull-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ::chmod(dir_.c_str(), 0755);
    ::mkdir((dir_ + "/home").c_str(), 0755);
    reg_ = dir_ + "/reg";
    ASSERT_EQ(Sh("sh " + kScript + " start " + reg_ + " >/dev/null"), 0);
    started_ = true;
    env_ = testing::ReadRegistryEnv(reg_ + "/env");
    ASSERT_FALSE(env_["TLS_HOST"].empty());

    // app:v1, three layers: gzip, zstd and plain tar.
    //  1: a setuid and a setgid binary, a 1000:1000 home, files to be whited
    //     out and a dir to be made opaque;
    //  2: a hardlink to the setuid binary, a symlink dir, a whiteout, an
    //     opaque dir with a new file;
    //  3: kMotd, a hardlink and a relative symlink to it, a whiteout in the home.
    app_ = dir_ + "/app";
    {
      OciLayout layout(app_);
      const std::string l1 = dir_ + "/l1.tar.gz", l2 = dir_ + "/l2.tar.zst", l3 = dir_ + "/l3.tar";
      LayerWriter(l1, "gzip")
          .Dir("etc")
          .File("etc/passwd", "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
          .Dir("usr/bin")
          .File("usr/bin/su", "su\n", 04755)
          .File("usr/bin/wall", "wall\n", 02755, 0, 5)
          .Dir("home/user", 0700, 1000, 1000)
          .File("home/user/.profile", "profile\n", 0644, 1000, 1000)
          .File("stale", "x")
          .Dir("opt/old")
          .File("opt/old/a", "a\n");
      LayerWriter(l2, "zstd")
          .Hardlink("usr/bin/su-again", "usr/bin/su")
          .Symlink("bin", "usr/bin")
          .Whiteout("", "stale")
          .Opaque("opt/old")
          .File("opt/old/b", "b\n");
      LayerWriter(l3)
          .File("etc/motd", kMotd)
          .Hardlink("etc/motd.hard", "etc/motd")
          .Symlink("etc/motd.link", "motd")
          .Whiteout("home/user", ".profile");
      json m = layout.AddImage(
          {layout.AddLayer(l1, kGzip), layout.AddLayer(l2, kZstd), layout.AddLayer(l3, kTar)});
      layout.WriteIndex({{m, "v1"}});
    }
    std::tie(app_manifest_, app_digest_) = LayoutImage(app_, "v1");
    ASSERT_FALSE(app_digest_.empty());

    // arm:v1, one other layer: the arm64/v8 entry of the index multi:test.
    arm_ = dir_ + "/arm";
    {
      OciLayout layout(arm_);
      const std::string l = dir_ + "/arm.tar.gz";
      LayerWriter(l, "gzip").File("arch", "arm64\n").Dir("usr/lib/aarch64-linux-gnu");
      layout.WriteIndex({{layout.AddImage({layout.AddLayer(l, kGzip)}), "v1"}});
    }

    for (const char* kind : {"tls", "http", "mtls"}) {
      ASSERT_EQ(
          Sh("sh " + kScript + " push " + reg_ + " " + app_ + ":v1 app:v1 " + kind + " >/dev/null"),
          0)
          << kind;
    }
    // The blob cache tests count GETs of their own name.
    ASSERT_EQ(
        Sh("sh " + kScript + " push " + reg_ + " " + app_ + ":v1 cache/app:v1 tls >/dev/null"), 0);
    ASSERT_EQ(Sh("sh " + kScript + " index " + reg_ + " multi:test tls " + app_ +
                 ":v1=linux/amd64 " + arm_ + ":v1=linux/arm64/v8 >/dev/null 2>&1"),
              0);
    ready_ = true;
  }

  static void TearDownTestSuite() {
    if (started_) Sh("sh " + kScript + " stop " + reg_ + " >/dev/null 2>&1");
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    ASSERT_TRUE(ready_) << "the suite's setup failed";
    env_ = testing::ReadRegistryEnv(reg_ + "/env");  // a restart may have changed the pids
    out_ = dir_ + "/out-" + ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::replace(out_.begin() + dir_.size(), out_.end(), '/', '_');
    ASSERT_EQ(::mkdir(out_.c_str(), 0755), 0) << out_;
  }
  void TearDown() override {
    if (!out_.empty()) std::filesystem::remove_all(out_);
  }

  std::string Host(const char* kind = "tls") {
    const std::string k = kind;
    return env_[k == "tls" ? "TLS_HOST" : k == "mtls" ? "MTLS_HOST" : "HTTP_HOST"];
  }
  std::string Docker(const std::string& tail, const char* kind = "tls") {
    return "docker://" + Host(kind) + "/" + tail;
  }
  std::vector<std::string> TlsCreds() {
    return {"--cert-dir", env_["CERT_DIR"], "--creds",
            env_["REGISTRY_USER"] + ":" + env_["REGISTRY_PASS"]};
  }
  static std::vector<std::string> Cat(std::vector<std::string> a,
                                      const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }
  // `layerx ARGS...`, waited for.
  Outcome Layerx(const std::vector<std::string>& args, const std::vector<std::string>& env = {},
                 double seconds = 90) {
    return Start(args, env).Finish(seconds);
  }
  Proc Start(const std::vector<std::string>& args, const std::vector<std::string>& env = {}) {
    static int n = 0;
    return Proc(Cat({LAYERX_BINARY}, args),
                out_ + "/../run-" + std::to_string(::getpid()) + "-" + std::to_string(n++),
                dir_ + "/home", env);
  }

  // The manifest lines and config of `oci:LAYOUT:REF` (--platform P when not
  // empty), each extracted once per suite.
  std::pair<std::string, std::string> Oci(const std::string& layout_ref,
                                          const std::string& platform = "") {
    static std::map<std::string, std::pair<std::string, std::string>> done;
    const std::string key = layout_ref + " " + platform;
    if (auto it = done.find(key); it != done.end()) return it->second;
    const std::string m = dir_ + "/oci-" + std::to_string(done.size()) + ".jsonl";
    const std::string c = dir_ + "/oci-" + std::to_string(done.size()) + ".config";
    std::vector<std::string> args = {"extract", "oci:" + layout_ref, "--manifest",
                                     m,         "--config",          c};
    if (!platform.empty()) args.insert(args.end(), {"--platform", platform});
    Outcome r = Layerx(args);
    EXPECT_EQ(r.code, 0) << r.Both();
    done[key] = {ReadFile(m), ReadFile(c)};
    EXPECT_FALSE(done[key].first.empty());
    return done[key];
  }

  // Pulls SOURCE with ARGS into out_/NAME.jsonl and out_/NAME.config and
  // checks both against `expected` (an Oci() pair).
  void ExpectSameAsOci(const std::string& source, const std::vector<std::string>& args,
                       const std::pair<std::string, std::string>& expected,
                       const std::vector<std::string>& env = {}, const std::string& name = "m") {
    const std::string m = out_ + "/" + name + ".jsonl", c = out_ + "/" + name + ".config";
    Outcome r = Layerx(Cat({"extract", source, "--manifest", m, "--config", c}, args), env);
    ASSERT_EQ(r.code, 0) << r.Both();
    EXPECT_TRUE(ReadFile(m) == expected.first) << "manifest lines differ from oci:'s";
    EXPECT_TRUE(ReadFile(c) == expected.second) << "config differs from oci:'s";
  }

  // Every output of a refused pull, in out_: after it, out_ must be empty.
  std::vector<std::string> AllOutputs() {
    return {"--rootfs",   out_ + "/rootfs",  "--ext4",   out_ + "/img",
            "--manifest", out_ + "/m.jsonl", "--config", out_ + "/config.json"};
  }
  void ExpectNothingLeft() {
    EXPECT_TRUE(Names(out_).empty())
        << "left in the output dir: " << testing::Listing(out_).size() - 2 << " entries, e.g. "
        << *Names(out_).begin();
  }

  int BlobGets(const char* kind, const std::string& name) {
    // The access log line is written when the answer is complete: give the
    // registry a moment after the client is done.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    return std::atoi(
        ShOut("sh " + kScript + " blob-gets " + reg_ + " " + kind + " " + name).c_str());
  }
  // The data file of blob `digest` in the storage of instance `kind`.
  std::string StoredBlob(const char* kind, const std::string& digest) {
    const std::string hex = digest.substr(7);
    return env_[std::string(kind) == "tls" ? "TLS_STORAGE" : "HTTP_STORAGE"] + "/blobs/sha256/" +
           hex.substr(0, 2) + "/" + hex + "/data";
  }
  std::string AppLayer(size_t i) { return app_manifest_["layers"][i]["digest"]; }

  // big:v1 on the http instance: a small gzip layer, then an uncompressed one
  // holding kBigBytes of pseudo-random data. Pushed once, when first needed.
  static constexpr size_t kBigBytes = 192u << 20;
  void PushBig() {
    if (!big_.empty()) return;
    const std::string layout_dir = dir_ + "/big";
    {
      OciLayout layout(layout_dir);
      const std::string l1 = dir_ + "/big1.tar.gz", l2 = dir_ + "/big2.tar";
      LayerWriter(l1, "gzip").File("hello", "hello\n");
      {
        std::string data(kBigBytes, '\0');
        std::mt19937_64 rng(16);
        for (size_t i = 0; i + 8 <= data.size(); i += 8) {
          uint64_t v = rng();
          std::memcpy(&data[i], &v, 8);
        }
        LayerWriter(l2).File("big.bin", data);
      }
      json m = layout.AddImage({layout.AddLayer(l1, kGzip), layout.AddLayer(l2, kTar)});
      layout.WriteIndex({{m, "v1"}});
      ::unlink(l1.c_str());
      ::unlink(l2.c_str());
    }
    ASSERT_EQ(
        Sh("sh " + kScript + " push " + reg_ + " " + layout_dir + ":v1 big:v1 http >/dev/null"), 0);
    big_ = layout_dir;
    big_manifest_ = LayoutImage(big_, "v1").first;
  }

  // Once the registry `registry` has sent 16 MiB more than `before` (of
  // big:v1's layer 2), stops the client (SIGSTOP: deterministic, however fast
  // the transfer), kills the registry (SIGKILL) and checks the kill was
  // mid-blob. The client is left stopped: the caller restarts the registry (or
  // not) and sends SIGCONT.
  void KillMidBlob(Proc& pull, pid_t registry, uint64_t before) {
    auto end = Clock::now() + std::chrono::seconds(30);
    while (WrittenBy(registry) - before < (16u << 20) && Clock::now() < end) {
      ASSERT_EQ(::waitpid(pull.pid(), nullptr, WNOHANG), 0) << "the pull ended before the kill";
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
    ASSERT_EQ(::kill(pull.pid(), SIGSTOP), 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the socket buffers fill
    const uint64_t sent = WrittenBy(registry) - before;
    ASSERT_EQ(::kill(registry, SIGKILL), 0);
    ASSERT_GT(sent, 16u << 20) << "the registry sent too little within 30 s";
    ASSERT_LT(sent, kBigBytes - (8u << 20)) << "the blob was (nearly) all sent before the kill";
  }

  static inline std::string skip_, dir_, reg_, app_, arm_, big_, app_digest_;
  static inline json app_manifest_, big_manifest_;
  static inline std::map<std::string, std::string> env_;
  static inline bool started_ = false, ready_ = false;
  std::string out_;
};

// ---- 1. the same bytes as oci: ------------------------------------------

TEST_F(RegistryPullTest, TlsWithCertDirAndCredsGivesTheOciBytes) {
  ExpectSameAsOci(Docker("app:v1"), TlsCreds(), Oci(app_ + ":v1"));
}

TEST_F(RegistryPullTest, TlsWithAuthFileGivesTheOciBytes) {
  ExpectSameAsOci(Docker("app:v1"),
                  {"--cert-dir", env_["CERT_DIR"], "--authfile", env_["AUTH_FILE"]},
                  Oci(app_ + ":v1"));
}

TEST_F(RegistryPullTest, TlsWithRegistryAuthFileEnvGivesTheOciBytes) {
  ExpectSameAsOci(Docker("app:v1"), {"--cert-dir", env_["CERT_DIR"]}, Oci(app_ + ":v1"),
                  {"REGISTRY_AUTH_FILE=" + env_["AUTH_FILE"]});
}

// $DOCKER_CONFIG (as CI runners set it) names the dir of Docker's config.json.
TEST_F(RegistryPullTest, TlsWithDockerConfigEnvGivesTheOciBytes) {
  const std::string dir = out_ + "/ci-docker";
  ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
  WriteFile(dir + "/config.json", ReadFile(env_["AUTH_FILE"]));
  ExpectSameAsOci(Docker("app:v1"), {"--cert-dir", env_["CERT_DIR"]}, Oci(app_ + ":v1"),
                  {"DOCKER_CONFIG=" + dir});
}

TEST_F(RegistryPullTest, PlainHttpWithTlsVerifyFalseGivesTheOciBytes) {
  ExpectSameAsOci(Docker("app:v1", "http"), {"--tls-verify=false"}, Oci(app_ + ":v1"));
}

TEST_F(RegistryPullTest, ByDigestGivesTheOciBytes) {
  ExpectSameAsOci(Docker("app@" + app_digest_), TlsCreds(), Oci(app_ + ":v1"));
}

// A pull that needs no credentials does not stop at auth files it cannot read
// (rootless, HOME is often a dir of another user, as /root under setpriv).
TEST_F(RegistryPullTest, UnreadableHomeDoesNotStopAnAnonymousPull) {
  const std::string home = out_ + "/locked-home";
  ASSERT_EQ(::mkdir(home.c_str(), 0755), 0);
  ::mkdir((home + "/.docker").c_str(), 0755);
  WriteFile(home + "/.docker/config.json", "{}");
  ::chmod((home + "/.docker").c_str(), 0);
  ::chmod(home.c_str(), 0);
  ExpectSameAsOci(Docker("app:v1", "http"), {"--tls-verify=false"}, Oci(app_ + ":v1"),
                  {"HOME=" + home});
  ::chmod(home.c_str(), 0755);
  ::chmod((home + "/.docker").c_str(), 0755);
}

// A registry that wants a client certificate (containers-certs.d(5)): the
// pair from --cert-dir, or from the registry's dir below
// $HOME/.config/containers/certs.d with no --cert-dir, as skopeo reads them.
TEST_F(RegistryPullTest, ClientCertificateFromCertDirGivesTheOciBytes) {
  ExpectSameAsOci(Docker("app:v1", "mtls"), {"--cert-dir", env_["MTLS_CERT_DIR"]},
                  Oci(app_ + ":v1"));
  // Not verifying the server does not drop the client certificate.
  ExpectSameAsOci(Docker("app:v1", "mtls"),
                  {"--cert-dir", env_["MTLS_CERT_DIR"], "--tls-verify=false"}, Oci(app_ + ":v1"),
                  {}, "insecure");
}

TEST_F(RegistryPullTest, ClientCertificateFromHomeCertsDGivesTheOciBytes) {
  const std::string home = out_ + "/home";
  const std::string d = home + "/.config/containers/certs.d/" + Host("mtls");
  std::filesystem::create_directories(d);
  for (const char* f : {"ca.crt", "client.cert", "client.key"}) {
    std::filesystem::copy_file(env_["MTLS_CERT_DIR"] + "/" + f, d + "/" + f);
  }
  ExpectSameAsOci(Docker("app:v1", "mtls"), {}, Oci(app_ + ":v1"), {"HOME=" + home});
  // inspect too; -v says which dir it read and what it gave.
  Outcome r = Layerx({"inspect", Docker("app:v1", "mtls"), "-v"}, {"HOME=" + home});
  EXPECT_EQ(r.code, 0) << r.Both();
  EXPECT_NE(r.err.find("cert dir " + d + ": 1 CA certificate(s), client certificate client.cert"),
            std::string::npos)
      << r.err;
  Outcome quiet = Layerx({"inspect", Docker("app:v1", "mtls")}, {"HOME=" + home});
  EXPECT_EQ(quiet.code, 0) << quiet.Both();
  EXPECT_TRUE(quiet.err.empty()) << quiet.err;
  std::filesystem::remove_all(home);
}

TEST_F(RegistryPullTest, MissingOrRefusedClientCertificateIsOneLine) {
  // The registry's CA alone: it asks for a certificate there is none of.
  Outcome r = Layerx(
      Cat({"extract", Docker("app:v1", "mtls"), "--cert-dir", env_["CERT_DIR"]}, AllOutputs()));
  ExpectOneLineRefusal(r, {1}, {"asks for a client certificate", Host("mtls")});
  ExpectNothingLeft();
  // A certificate its client CA did not sign: refused, and the line names it.
  const std::string d = dir_ + "/stranger-certs";
  std::filesystem::create_directories(d);
  ::chmod(d.c_str(), 0755);
  std::filesystem::copy_file(env_["CA_CERT"], d + "/ca.crt",
                             std::filesystem::copy_options::overwrite_existing);
  ASSERT_EQ(Sh("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " + d +
               "/me.key 2>/dev/null && openssl req -new -x509 -key " + d +
               "/me.key -subj /CN=stranger -days 2 -out " + d + "/me.cert 2>/dev/null"),
            0);
  Outcome q = Layerx(Cat({"extract", Docker("app:v1", "mtls"), "--cert-dir", d}, AllOutputs()));
  ExpectOneLineRefusal(q, {1}, {"TLS with", d + "/me.cert"});
  ExpectNothingLeft();
  // A certificate without its key: a usage error before any connection.
  ::unlink((d + "/me.key").c_str());
  Outcome k = Layerx(Cat({"extract", Docker("app:v1", "mtls"), "--cert-dir", d}, AllOutputs()));
  ExpectOneLineRefusal(k, {2}, {"has no key \"me.key\""});
  ExpectNothingLeft();
  std::filesystem::remove_all(d);
}

// credHelpers in the auth file: `docker-credential-NAME get` from $PATH gives
// the user and password, which appear in no output, -vv included.
TEST_F(RegistryPullTest, CredentialHelperGivesTheOciBytes) {
  const std::string bin = out_ + "-helper/bin";  // not in out_: that is checked empty below
  std::filesystem::create_directories(bin);
  const std::string helper = bin + "/docker-credential-lxpull";
  WriteFile(helper, "#!/bin/sh\nread server\n[ \"$1\" = get ] && [ \"$server\" = '" + Host() +
                        "' ] || { echo 'credentials not found in native keychain'; exit 1; }\n"
                        "printf '{\"ServerURL\":\"%s\",\"Username\":\"%s\",\"Secret\":\"%s\"}' "
                        "\"$server\" '" +
                        env_["REGISTRY_USER"] + "' '" + env_["REGISTRY_PASS"] + "'\n");
  ASSERT_EQ(::chmod(helper.c_str(), 0755), 0);
  ::chmod(bin.c_str(), 0755);
  const std::string auth = out_ + "-helper/auth.json";
  WriteFile(auth, "{\"credHelpers\":{\"" + Host() + "\":\"lxpull\"}}");
  const char* path = std::getenv("PATH");
  const std::vector<std::string> env = {
      "REGISTRY_AUTH_FILE=" + auth,
      "PATH=" + bin + ":" + (path != nullptr ? path : "/usr/bin:/bin")};
  ExpectSameAsOci(Docker("app:v1"), {"--cert-dir", env_["CERT_DIR"]}, Oci(app_ + ":v1"), env);
  Outcome r = Layerx({"extract", Docker("app:v1"), "--cert-dir", env_["CERT_DIR"], "--manifest",
                      out_ + "/v.jsonl", "--json", "-vv"},
                     env);
  ASSERT_EQ(r.code, 0) << r.Both();
  for (const char* f : {"/v.jsonl", "/m.jsonl", "/m.config"}) ::unlink((out_ + f).c_str());
  EXPECT_NE(r.err.find("a user (credentials found)"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find(env_["REGISTRY_PASS"]), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find(env_["REGISTRY_PASS"]), std::string::npos) << r.out;
  // A helper that is not there: one line naming it (no other file has credentials).
  WriteFile(auth, "{\"credHelpers\":{\"" + Host() + "\":\"lxgone\"}}");
  Outcome q =
      Layerx(Cat({"extract", Docker("app:v1"), "--cert-dir", env_["CERT_DIR"]}, AllOutputs()), env);
  ExpectOneLineRefusal(q, {1, 2}, {"docker-credential-lxgone", auth});
  ExpectNothingLeft();
  std::filesystem::remove_all(out_ + "-helper");
}

TEST_F(RegistryPullTest, Ext4PassesFsckAndInspectMatchesOci) {
  const std::string img = out_ + "/img";
  Outcome r = Layerx(Cat({"extract", Docker("app:v1"), "--ext4", img}, TlsCreds()));
  ASSERT_EQ(r.code, 0) << r.Both();
  const std::string fsck = ::access("/usr/sbin/e2fsck", X_OK) == 0 ? "/usr/sbin/e2fsck" : "e2fsck";
  EXPECT_EQ(Sh(fsck + " -fn " + img + " >" + out_ + "/fsck.log 2>&1"), 0)
      << ReadFile(out_ + "/fsck.log");
  Outcome docker = Layerx(Cat({"inspect", Docker("app:v1"), "--json"}, TlsCreds()));
  Outcome oci = Layerx({"inspect", "oci:" + app_ + ":v1", "--json"});
  ASSERT_EQ(docker.code, 0) << docker.Both();
  ASSERT_EQ(oci.code, 0) << oci.Both();
  json d = json::parse(docker.out), o = json::parse(oci.out);
  EXPECT_EQ(d["manifest_digest"], app_digest_);
  ASSERT_EQ(d["layers"].size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(d["layers"][i]["digest"], AppLayer(i));
    EXPECT_EQ(d["layers"][i]["digest"], o["layers"][i]["digest"]);
    EXPECT_EQ(d["layers"][i]["diff_id"], o["layers"][i]["diff_id"]);
  }
  EXPECT_EQ(d, o) << "inspect of docker:// and oci: differ";
}

// The corpus's debian (3 layers, 103 MiB): ext4 and manifest as from oci:.
TEST_F(RegistryPullTest, DebianCorpusImageGivesTheOciBytes) {
  if (::access((std::string(kCorpusLayout) + "/index.json").c_str(), R_OK) != 0) {
    GTEST_SKIP() << "no debian corpus image at " << kCorpusLayout
                 << " (scripts/test.sh builds it from ../shared/corpus)";
  }
  ASSERT_EQ(Sh("sh " + kScript + " push " + reg_ + " " + kCorpusLayout +
               ":debian:test debian:test tls >/dev/null"),
            0);
  const std::string img = out_ + "/img";
  ExpectSameAsOci(Docker("debian:test"), Cat({"--ext4", img}, TlsCreds()),
                  Oci(std::string(kCorpusLayout) + ":debian:test"));
  const std::string fsck = ::access("/usr/sbin/e2fsck", X_OK) == 0 ? "/usr/sbin/e2fsck" : "e2fsck";
  EXPECT_EQ(Sh(fsck + " -fn " + img + " >" + out_ + "/fsck.log 2>&1"), 0)
      << ReadFile(out_ + "/fsck.log");
}

// ---- 2. platforms -------------------------------------------------------

TEST_F(RegistryPullTest, IndexPicksThePlatform) {
  const std::string index_layout = reg_ + "/layouts/multi_test:test";
  auto amd = Oci(index_layout, "linux/amd64");
  auto arm = Oci(index_layout, "linux/arm64/v8");
  ASSERT_NE(amd.first, arm.first);
  EXPECT_EQ(amd.first, Oci(app_ + ":v1").first);
  EXPECT_NE(arm.first.find("\"arch\""), std::string::npos) << arm.first;
  ExpectSameAsOci(Docker("multi:test"), Cat({"--platform", "linux/amd64"}, TlsCreds()), amd, {},
                  "amd");
  ExpectSameAsOci(Docker("multi:test"), Cat({"--platform", "linux/arm64/v8"}, TlsCreds()), arm, {},
                  "arm");
  EXPECT_EQ(json::parse(ReadFile(out_ + "/arm.config"))["architecture"], "arm64");

  std::filesystem::remove_all(out_);
  ::mkdir(out_.c_str(), 0755);
  Outcome r =
      Layerx(Cat(Cat({"extract", Docker("multi:test"), "--platform", "linux/s390x"}, AllOutputs()),
                 TlsCreds()));
  // Exit 1 or 2 (oci: calls a platform that is not there a usage error).
  ExpectOneLineRefusal(r, {1, 2}, {"linux/s390x"});
  ExpectNothingLeft();
}

// ---- 3. credentials -----------------------------------------------------

TEST_F(RegistryPullTest, RejectsWrongPasswordWithoutEchoingIt) {
  const std::string wrong = "Wr0ng-" + env_["REGISTRY_PASS"].substr(0, 6) + "-s3cret";
  Outcome r = Layerx(Cat({"extract", Docker("app:v1"), "--cert-dir", env_["CERT_DIR"], "--creds",
                          env_["REGISTRY_USER"] + ":" + wrong, "-vv"},
                         AllOutputs()));
  // -vv: the log lines go to stderr too; the one error line is the last.
  EXPECT_EQ(r.code, 1) << r.Both();
  std::string last = r.err.substr(r.err.rfind('\n', r.err.size() - 2) + 1);
  EXPECT_EQ(last.rfind("layerx: ", 0), 0u) << r.err;
  EXPECT_NE(last.find("unauthorized"), std::string::npos) << r.err;
  for (const std::string& secret :
       {wrong, Base64(env_["REGISTRY_USER"] + ":" + wrong), env_["REGISTRY_PASS"]}) {
    EXPECT_EQ(r.err.find(secret), std::string::npos) << "secret in stderr: " << r.err;
    EXPECT_EQ(r.out.find(secret), std::string::npos) << "secret in stdout: " << r.out;
  }
  ExpectNothingLeft();
  // And at the default verbosity: that one line alone.
  Outcome q = Layerx(Cat({"extract", Docker("app:v1"), "--cert-dir", env_["CERT_DIR"], "--creds",
                          env_["REGISTRY_USER"] + ":" + wrong},
                         AllOutputs()));
  ExpectOneLineRefusal(q, {1}, {"unauthorized", Host()});
  EXPECT_EQ(q.err.find(wrong), std::string::npos) << q.err;
  ExpectNothingLeft();
}

TEST_F(RegistryPullTest, RejectsMissingCredentialsInOneLine) {
  Outcome r =
      Layerx(Cat({"extract", Docker("app:v1"), "--cert-dir", env_["CERT_DIR"]}, AllOutputs()));
  ExpectOneLineRefusal(r, {1}, {"unauthorized", Host()});
  ExpectNothingLeft();
}

TEST_F(RegistryPullTest, RejectsSelfSignedCertWithoutCertDir) {
  Outcome r = Layerx(Cat(
      {"extract", Docker("app:v1"), "--creds", env_["REGISTRY_USER"] + ":" + env_["REGISTRY_PASS"]},
      AllOutputs()));
  ExpectOneLineRefusal(r, {1}, {Host()});
  EXPECT_EQ(r.err.find(env_["REGISTRY_PASS"]), std::string::npos) << r.err;
  ExpectNothingLeft();
}

// A good pull with --json and -vv: the password and its base64 appear in no
// output and no log line, whichever way it was given.
TEST_F(RegistryPullTest, PasswordNeverInJsonOrDebugLogs) {
  const std::string pass = env_["REGISTRY_PASS"];
  const std::string basic = Base64(env_["REGISTRY_USER"] + ":" + pass);
  const std::vector<std::vector<std::string>> ways = {
      TlsCreds(), {"--cert-dir", env_["CERT_DIR"], "--authfile", env_["AUTH_FILE"]}};
  int n = 0;
  for (const auto& way : ways) {
    const std::string m = out_ + "/m" + std::to_string(n++) + ".jsonl";
    Outcome r = Layerx(Cat({"extract", Docker("app:v1"), "--manifest", m, "--json", "-vv"}, way));
    ASSERT_EQ(r.code, 0) << r.Both();
    EXPECT_TRUE(json::accept(r.out)) << r.out;
    EXPECT_GT(Lines(r.err), 2u) << "-vv logged nothing: " << r.err;
    for (const std::string& secret : {pass, basic}) {
      EXPECT_EQ(r.out.find(secret), std::string::npos) << r.out;
      EXPECT_EQ(r.err.find(secret), std::string::npos) << r.err;
    }
    Outcome i = Layerx(Cat({"inspect", Docker("app:v1"), "--json", "-vv"}, way));
    ASSERT_EQ(i.code, 0) << i.Both();
    for (const std::string& secret : {pass, basic}) {
      EXPECT_EQ(i.out.find(secret), std::string::npos) << i.out;
      EXPECT_EQ(i.err.find(secret), std::string::npos) << i.err;
    }
  }
}

// ---- 4. tampered blobs in the registry's storage ------------------------

// Restores a file when it goes out of scope.
class Restore {
 public:
  explicit Restore(std::string path) : path_(std::move(path)), bytes_(ReadFile(path_)) {}
  ~Restore() { WriteFile(path_, bytes_); }
  const std::string& bytes() const { return bytes_; }

 private:
  std::string path_, bytes_;
};

TEST_F(RegistryPullTest, RejectsTamperedLayerSameSizeNamingIt) {
  const std::string digest = AppLayer(2);
  Restore data(StoredBlob("tls", digest));
  std::string tampered = data.bytes();
  size_t at = tampered.find(kMotd);
  ASSERT_NE(at, std::string::npos) << "layer 3 is not the uncompressed tar with kMotd";
  for (size_t i = 0; i < kMotd.size(); ++i) tampered[at + i] = std::toupper(tampered[at + i]);
  WriteFile(StoredBlob("tls", digest), tampered);
  Outcome r = Layerx(Cat(Cat({"extract", Docker("app:v1")}, AllOutputs()), TlsCreds()));
  ExpectOneLineRefusal(r, {1}, {LayerName(3, digest)});
  ExpectNothingLeft();
}

TEST_F(RegistryPullTest, RejectsTamperedLayerOfAnotherSizeNamingIt) {
  const std::string digest = AppLayer(2);
  Restore data(StoredBlob("tls", digest));
  // Longer: zeros after the tar's end (still a valid tar); shorter: its last
  // 512 bytes gone.
  for (const std::string& tampered : {data.bytes() + std::string(4096, '\0'),
                                      data.bytes().substr(0, data.bytes().size() - 512)}) {
    WriteFile(StoredBlob("tls", digest), tampered);
    Outcome r = Layerx(Cat(Cat({"extract", Docker("app:v1")}, AllOutputs()), TlsCreds()));
    ExpectOneLineRefusal(r, {1}, {LayerName(3, digest)});
    ExpectNothingLeft();
  }
}

// ---- 5. the registry dies mid-blob --------------------------------------

// A transfer cut short is resumed with an HTTP Range request (registry_client,
// commit a991fea); before that landed this failed with exit 1 "layer 2 (...):
// blob ...: transfer closed with N bytes remaining to read".
TEST_F(RegistryPullTest, RegistryRestartedMidBlobIsResumed) {
  PushBig();
  ASSERT_FALSE(big_.empty());
  auto expected = Oci(big_ + ":v1");
  const pid_t registry = std::stoi(env_["HTTP_PID"]);
  const int gets_before = BlobGets("http", "big");
  const uint64_t before = WrittenBy(registry);
  const std::string m = out_ + "/m.jsonl", c = out_ + "/c.json";
  Proc pull = Start({"extract", Docker("big:v1", "http"), "--tls-verify=false", "--manifest", m,
                     "--config", c, "--parallel-downloads", "0"});
  ASSERT_NO_FATAL_FAILURE(KillMidBlob(pull, registry, before));
  ASSERT_EQ(Sh("sh " + kScript + " restart " + reg_ + " http >/dev/null 2>&1"), 0);
  ::kill(pull.pid(), SIGCONT);
  Outcome r = pull.Finish(60);
  env_ = testing::ReadRegistryEnv(reg_ + "/env");
  ASSERT_EQ(r.code, 0) << "the pull was not resumed after the restart\n" << r.Both();
  EXPECT_TRUE(ReadFile(m) == expected.first);
  EXPECT_TRUE(ReadFile(c) == expected.second);
  // The rest came by a Range request (206), not all over again.
  EXPECT_GE(BlobGets("http", "big"), gets_before + 1);
  EXPECT_NE(ReadFile(env_["HTTP_ACCESS_LOG"]).find("\" 206 "), std::string::npos)
      << "no 206 answer: the blob was not resumed with a Range request";
}

TEST_F(RegistryPullTest, RegistryGoneMidBlobFailsWithinTheRetryBudget) {
  PushBig();
  ASSERT_FALSE(big_.empty());
  const pid_t registry = std::stoi(env_["HTTP_PID"]);
  const uint64_t before = WrittenBy(registry);
  // The registry comes back for the tests after this one, whatever happens.
  struct Restart {
    std::string reg;
    ~Restart() { Sh("sh " + kScript + " restart " + reg + " http >/dev/null 2>&1"); }
  } restart{reg_};
  Proc pull = Start(Cat({"extract", Docker("big:v1", "http"), "--tls-verify=false",
                         "--parallel-downloads", "0", "-q"},
                        AllOutputs()));
  ASSERT_NO_FATAL_FAILURE(KillMidBlob(pull, registry, before));
  auto resumed = Clock::now();
  ::kill(pull.pid(), SIGCONT);
  Outcome r = pull.Finish(60);
  const double seconds = std::chrono::duration<double>(Clock::now() - resumed).count();
  ExpectOneLineRefusal(r, {1}, {LayerName(2, big_manifest_["layers"][1]["digest"])});
  EXPECT_LT(seconds, 12) << "the retries took longer than their budget (~10 s)";
  ExpectNothingLeft();
}

// ---- 8. the blob cache --------------------------------------------------

std::set<std::string> LayerHexes(const json& manifest) {
  std::set<std::string> hexes;
  for (const auto& l : manifest["layers"]) hexes.insert(l["digest"].get<std::string>().substr(7));
  return hexes;
}

TEST_F(RegistryPullTest, BlobCacheHoldsTheLayersAndSparesTheNetwork) {
  const std::string cache = out_ + "/cache";
  auto expected = Oci(app_ + ":v1");
  const std::vector<std::string> args = Cat({"--blob-cache", cache}, TlsCreds());
  const int g0 = BlobGets("tls", "cache/app");
  ExpectSameAsOci(Docker("cache/app:v1"), args, expected, {}, "first");
  const int g1 = BlobGets("tls", "cache/app");
  EXPECT_EQ(g1 - g0, 4) << "the first pull fetches the config and the three layers";
  EXPECT_EQ(Names(cache + "/sha256"), LayerHexes(app_manifest_))
      << "the cache holds exactly the layer blobs";
  for (const std::string& hex : Names(cache + "/sha256")) {
    EXPECT_EQ(OciLayout::Sha256(ReadFile(cache + "/sha256/" + hex)), "sha256:" + hex);
  }

  ExpectSameAsOci(Docker("cache/app:v1"), args, expected, {}, "second");
  const int g2 = BlobGets("tls", "cache/app");
  EXPECT_EQ(g2 - g1, 1) << "the second pull fetches the config only, no layer";

  // One cached blob corrupted on disk (same size): dropped, fetched again,
  // and the cache holds the good bytes afterwards.
  const std::string victim = cache + "/sha256/" + AppLayer(1).substr(7);
  std::string bytes = ReadFile(victim);
  ASSERT_FALSE(bytes.empty());
  const std::string good = bytes;
  bytes[bytes.size() / 2] ^= 0x01;
  WriteFile(victim, bytes);
  ExpectSameAsOci(Docker("cache/app:v1"), args, expected, {}, "third");
  EXPECT_EQ(BlobGets("tls", "cache/app") - g2, 2) << "the config and the corrupted layer";
  EXPECT_TRUE(ReadFile(victim) == good) << "the corrupted blob was not replaced";
  EXPECT_EQ(Names(cache + "/sha256"), LayerHexes(app_manifest_));
}

// What another user of a shared cache dir may leave at a blob's name: a
// symlink to the right bytes elsewhere (never followed), a fifo (never opened
// so that it blocks), a directory. Each is passed over and the blob fetched.
TEST_F(RegistryPullTest, PoisonedBlobCacheEntriesAreNotTrusted) {
  const std::string cache = out_ + "/cache";
  auto expected = Oci(app_ + ":v1");
  const std::vector<std::string> args = Cat({"--blob-cache", cache}, TlsCreds());
  ASSERT_EQ(::mkdir(cache.c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((cache + "/sha256").c_str(), 0755), 0);
  const std::string hex0 = AppLayer(0).substr(7), hex1 = AppLayer(1).substr(7),
                    hex2 = AppLayer(2).substr(7);
  ASSERT_EQ(
      ::symlink((app_ + "/blobs/sha256/" + hex0).c_str(), (cache + "/sha256/" + hex0).c_str()), 0);
  ASSERT_EQ(::mkfifo((cache + "/sha256/" + hex1).c_str(), 0644), 0);
  ASSERT_EQ(::mkdir((cache + "/sha256/" + hex2).c_str(), 0755), 0);
  const int g0 = BlobGets("tls", "cache/app");
  Outcome r;
  {
    const std::string m = out_ + "/m.jsonl";
    r = Layerx(Cat({"extract", Docker("cache/app:v1"), "--manifest", m}, args), {}, 30);
    ASSERT_EQ(r.code, 0) << r.Both();
    EXPECT_LT(r.seconds, 15) << "a fifo in the cache made the pull wait";
    EXPECT_TRUE(ReadFile(m) == expected.first);
  }
  EXPECT_EQ(BlobGets("tls", "cache/app") - g0, 4) << "every layer is fetched";
}

TEST_F(RegistryPullTest, TwoConcurrentPullsShareAnEmptyCache) {
  const std::string cache = out_ + "/cache";
  auto expected = Oci(app_ + ":v1");
  std::vector<std::string> args = Cat({"--blob-cache", cache}, TlsCreds());
  Proc a = Start(Cat({"extract", Docker("cache/app:v1"), "--manifest", out_ + "/a.jsonl"}, args));
  Proc b = Start(Cat({"extract", Docker("cache/app:v1"), "--manifest", out_ + "/b.jsonl"}, args));
  Outcome ra = a.Finish(), rb = b.Finish();
  ASSERT_EQ(ra.code, 0) << ra.Both();
  ASSERT_EQ(rb.code, 0) << rb.Both();
  EXPECT_TRUE(ReadFile(out_ + "/a.jsonl") == expected.first);
  EXPECT_TRUE(ReadFile(out_ + "/b.jsonl") == expected.first);
  EXPECT_EQ(Names(cache + "/sha256"), LayerHexes(app_manifest_)) << "a temp file was left";
  for (const std::string& hex : Names(cache + "/sha256")) {
    EXPECT_EQ(OciLayout::Sha256(ReadFile(cache + "/sha256/" + hex)), "sha256:" + hex);
  }
  EXPECT_EQ(Names(cache), (std::set<std::string>{"sha256"}));
}

// ---- 9. names -----------------------------------------------------------

TEST_F(RegistryPullTest, RejectsBadNamesInOneLine) {
  const std::string digest = "@sha256:" + std::string(64, 'a');
  const std::vector<std::string> bad = {
      "docker://UPPER/case",
      "docker://" + Host() + "/app:v1" + digest,  // a tag and a digest
      "docker://" + Host() + "/app@sha256:../../../etc/passwd",
      "docker://" + Host() + "/app@sha256:abc",
      "docker://" + Host() + "/../app:v1",
      "docker://" + Host() + "/app:v1\nlayerx: all good",
      "docker://",
      "docker:///app:v1",
      "docker://" + Host() + "/app:" + std::string(200, 't'),
  };
  for (const std::string& name : bad) {
    SCOPED_TRACE(name);
    Outcome r = Layerx(Cat(Cat({"extract", name}, AllOutputs()), TlsCreds()), {}, 20);
    ExpectOneLineRefusal(r, {1, 2}, {});
    EXPECT_LT(r.seconds, 5);
    ExpectNothingLeft();
    Outcome i = Layerx(Cat({"inspect", name}, TlsCreds()), {}, 20);
    ExpectOneLineRefusal(i, {1, 2}, {});
  }
}

TEST_F(RegistryPullTest, RegistryThatDoesNotExistIsNamed) {
  Outcome r = Layerx(
      Cat({"extract", "docker://127.0.0.1:1/app:v1", "--tls-verify=false", "-q"}, AllOutputs()), {},
      30);
  ExpectOneLineRefusal(r, {1}, {"127.0.0.1:1"});
  EXPECT_LT(r.seconds, 12);
  ExpectNothingLeft();
}

// The warning --tls-verify=false logs at the default verbosity must not make
// a refusal more than the one line.
TEST_F(RegistryPullTest, RefusalWithTlsVerifyOffIsStillOneLine) {
  Outcome r =
      Layerx(Cat({"extract", Docker("no-such:v1", "http"), "--tls-verify=false"}, AllOutputs()));
  ExpectOneLineRefusal(r, {1}, {"no-such"});
  ExpectNothingLeft();
}

// ---- 10. through the service --------------------------------------------

// `layerx serve` runs in a network namespace of its own with no interface up
// (`unshare -n`; rootless `unshare -c -n`, the caller's uid mapped to itself
// so that SO_PEERCRED still names the tenant): it cannot reach 127.0.0.1 at
// all, so a pull through it that succeeds was done by the client, as designed
// (the service is handed one pipe per layer).
TEST_F(RegistryPullTest, ThroughTheServiceTheClientDoesTheNetwork) {
  if (Sh("unshare " + std::string(Root() ? "" : "-c ") + "-n true 2>/dev/null") != 0) {
    GTEST_SKIP() << "unshare -n is not allowed here";
  }
  const std::string sdir = out_ + "/service";
  ::mkdir(sdir.c_str(), 0755);
  ::mkdir((sdir + "/scratch").c_str(), 0755);
  const std::string config = sdir + "/serve.toml", socket = sdir + "/sock";
  WriteFile(config, "[service]\nscratch_dir = \"" + sdir +
                        "/scratch\"\n[[tenant]]\nname = \"self\"\n" + "uids = [" +
                        std::to_string(::geteuid()) + "]\n");
  std::vector<std::string> argv = {"/usr/bin/unshare"};
  if (!Root()) argv.push_back("-c");
  argv.insert(argv.end(),
              {"-n", LAYERX_BINARY, "serve", "--socket", socket, "--config", config, "-v"});
  static int n = 0;
  Proc service(argv, dir_ + "/service-" + std::to_string(n++), dir_ + "/home");
  bool up = false;
  for (int i = 0; i < 200 && !up; ++i) {
    up = Layerx({"status", "--socket", socket}, {}, 10).code == 0;
    if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(up) << "the service did not come up";
  char own[64] = {}, its[64] = {};
  ASSERT_GT(::readlink("/proc/self/ns/net", own, sizeof(own) - 1), 0);
  ASSERT_GT(::readlink(("/proc/" + std::to_string(service.pid()) + "/ns/net").c_str(), its,
                       sizeof(its) - 1),
            0);
  ASSERT_STRNE(own, its) << "the service shares our network namespace";

  auto expected = Oci(app_ + ":v1");
  const int g0 = BlobGets("tls", "app");
  ExpectSameAsOci(Docker("app:v1"), Cat({"--connect", socket}, TlsCreds()), expected);
  EXPECT_EQ(BlobGets("tls", "app") - g0, 4);
  // A tampered layer through the service: refused, named, nothing written.
  const std::string digest = AppLayer(2);
  {
    Restore data(StoredBlob("tls", digest));
    std::string tampered = data.bytes();
    size_t at = tampered.find(kMotd);
    ASSERT_NE(at, std::string::npos);
    tampered[at] ^= 0x20;
    WriteFile(StoredBlob("tls", digest), tampered);
    Outcome r = Layerx(Cat({"extract", Docker("app:v1"), "--connect", socket, "--ext4",
                            out_ + "/img", "--manifest", out_ + "/bad.jsonl"},
                           TlsCreds()));
    ExpectOneLineRefusal(r, {1}, {LayerName(3, digest)});
    EXPECT_NE(::access((out_ + "/img").c_str(), F_OK), 0);
    EXPECT_NE(::access((out_ + "/bad.jsonl").c_str(), F_OK), 0);
  }
}

// ---- 10b. a proxy from the environment ----------------------------------

// As curl (and skopeo) read them: HTTPS_PROXY for https (a CONNECT tunnel),
// http_proxy for plain http, NO_PROXY to go around. The proxy's password in
// its URL is never printed.
TEST_F(RegistryPullTest, ProxyFromTheEnvironmentCarriesThePull) {
  const std::string portfile = dir_ + "/proxy-port", log = dir_ + "/proxy.log";
  ::unlink(portfile.c_str());
  ::unlink(log.c_str());
  Proc proxy({"/usr/bin/python3", std::string(LAYERX_SOURCE_DIR) + "/tests/registry/http_proxy.py",
              portfile, log},
             dir_ + "/proxy", dir_ + "/home");
  for (int i = 0; i < 500 && ::access(portfile.c_str(), F_OK) != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const std::string port = ReadFile(portfile);
  ASSERT_FALSE(port.empty()) << "the proxy did not start";
  const std::string proxy_url = "http://someone:proxy-secret@127.0.0.1:" + port;

  ExpectSameAsOci(Docker("app:v1"), TlsCreds(), Oci(app_ + ":v1"), {"HTTPS_PROXY=" + proxy_url},
                  "tls");
  EXPECT_NE(ReadFile(log).find("CONNECT " + Host("tls") + " "), std::string::npos) << ReadFile(log);
  ExpectSameAsOci(Docker("app:v1", "http"), {"--tls-verify=false"}, Oci(app_ + ":v1"),
                  {"http_proxy=" + proxy_url}, "http");
  EXPECT_NE(ReadFile(log).find("GET http://" + Host("http") + "/v2/"), std::string::npos)
      << ReadFile(log);

  // NO_PROXY goes around a proxy that is not even there.
  ExpectSameAsOci(Docker("app:v1"), TlsCreds(), Oci(app_ + ":v1"),
                  {"HTTPS_PROXY=http://127.0.0.1:1", "NO_PROXY=127.0.0.1"}, "around");
  for (const char* name : {"tls", "http", "around"}) {
    std::filesystem::remove(out_ + "/" + name + ".jsonl");
    std::filesystem::remove(out_ + "/" + name + ".config");
  }
  // A proxy that is down: one line, and its password nowhere.
  Outcome r = Layerx(Cat(Cat({"extract", Docker("app:v1"), "-vv"}, AllOutputs()), TlsCreds()),
                     {"HTTPS_PROXY=http://someone:proxy-secret@127.0.0.1:1"}, 30);
  EXPECT_EQ(r.code, 1) << r.Both();
  EXPECT_EQ(r.Both().find("proxy-secret"), std::string::npos) << r.Both();
  ExpectNothingLeft();
}

// ---- 11. registries.conf: mirrors, locations, insecure, blocked ----------

// A registries.conf of the test's own (beside out_, which must end empty).
std::string WriteConf(const std::string& dir, const std::string& text) {
  static int n = 0;
  const std::string path = dir + "/registries-" +
                           ::testing::UnitTest::GetInstance()->current_test_info()->name() + "-" +
                           std::to_string(n++) + ".conf";
  WriteFile(path, text);
  return path;
}

// skopeo's example: the image is named where it is not (a dead location),
// and comes from the mirror, with the mirror's own insecure = true (the
// http instance): no --tls-verify anywhere.
TEST_F(RegistryPullTest, MirrorInRegistriesConfGivesTheOciBytes) {
  const std::string conf = WriteConf(dir_, R"(
[[registry]]
prefix = "primary.invalid/team"
location = "127.0.0.1:1/team"
[[registry.mirror]]
location = ")" + Host("http") + R"("
insecure = true
)");
  ExpectSameAsOci("docker://primary.invalid/team/app:v1", {"--registries-conf", conf},
                  Oci(app_ + ":v1"));
  // The same through $CONTAINERS_REGISTRIES_CONF, with -v saying where it went.
  const std::string m = out_ + "/env.jsonl";
  Outcome r = Layerx({"extract", "docker://primary.invalid/team/app:v1", "--manifest", m, "-v"},
                     {"CONTAINERS_REGISTRIES_CONF=" + conf});
  ASSERT_EQ(r.code, 0) << r.Both();
  EXPECT_NE(r.err.find("trying the mirror " + Host("http") + "/app:v1"), std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("insecure = true in registries.conf"), std::string::npos) << r.err;
  EXPECT_TRUE(ReadFile(m) == Oci(app_ + ":v1").first);
}

// A mirror that is down, or that lacks the image, is passed over for the next
// source; the location is tried last.
TEST_F(RegistryPullTest, MirrorsThatFailFallBackToTheLocation) {
  const std::string conf = WriteConf(dir_, R"(
[[registry]]
prefix = "primary.invalid"
location = ")" + Host("http") + R"("
insecure = true
[[registry.mirror]]
location = "127.0.0.1:1"
[[registry.mirror]]
location = ")" + Host("http") + R"(/not-here"
insecure = true
)");
  ExpectSameAsOci("docker://primary.invalid/app:v1", {"--registries-conf", conf},
                  Oci(app_ + ":v1"));
}

// A mirror's credentials are the mirror's: the auth file's entry for the TLS
// instance signs its requests, and its CA comes from --cert-dir.
TEST_F(RegistryPullTest, MirrorUsesItsOwnCredentials) {
  const std::string conf = WriteConf(dir_, R"(
[[registry]]
prefix = "primary.invalid"
location = "127.0.0.1:1"
[[registry.mirror]]
location = ")" + Host("tls") + R"("
)");
  ExpectSameAsOci(
      "docker://primary.invalid/app:v1",
      {"--registries-conf", conf, "--cert-dir", env_["CERT_DIR"], "--authfile", env_["AUTH_FILE"]},
      Oci(app_ + ":v1"));
}

// insecure = true is what --tls-verify=false would be; an explicit
// --tls-verify=true wins over it, as in skopeo.
TEST_F(RegistryPullTest, InsecureInRegistriesConfYieldsToAnExplicitTlsVerify) {
  const std::string conf =
      WriteConf(dir_, "[[registry]]\nlocation = \"" + Host("http") + "\"\ninsecure = true\n");
  ExpectSameAsOci(Docker("app:v1", "http"), {"--registries-conf", conf}, Oci(app_ + ":v1"));
  std::filesystem::remove(out_ + "/m.jsonl");
  std::filesystem::remove(out_ + "/m.config");
  Outcome r = Layerx(
      Cat({"extract", Docker("app:v1", "http"), "--registries-conf", conf, "--tls-verify=true"},
          AllOutputs()),
      {}, 30);
  ExpectOneLineRefusal(r, {1}, {Host("http")});
  ExpectNothingLeft();
}

TEST_F(RegistryPullTest, RejectsBlockedRegistriesInOneLine) {
  const std::string v2 =
      WriteConf(dir_, "[[registry]]\nprefix = \"" + Host("tls") + "/app\"\nlocation = \"" +
                          Host("tls") + "/app\"\nblocked = true\n");
  Outcome r = Layerx(
      Cat(Cat({"extract", Docker("app:v1"), "--registries-conf", v2}, AllOutputs()), TlsCreds()),
      {}, 30);
  ExpectOneLineRefusal(r, {1}, {"blocked by registries.conf", Host("tls") + "/app:v1"});
  ExpectNothingLeft();
  Outcome i = Layerx({"inspect", Docker("app:v1"), "--registries-conf", v2}, {}, 30);
  ExpectOneLineRefusal(i, {1}, {"blocked by registries.conf"});
  // Version 1's block list, through $CONTAINERS_REGISTRIES_CONF: the bare
  // host covers it on every port (a block is not walked around by the port).
  const std::string v1 =
      WriteConf(dir_, "[registries.block]\nregistries = [\"LOCALHOST\", \"127.0.0.1\"]\n");
  Outcome e = Layerx(Cat({"extract", Docker("app:v1")}, AllOutputs()),
                     {"CONTAINERS_REGISTRIES_CONF=" + v1}, 30);
  ExpectOneLineRefusal(e, {1}, {"blocked by registries.conf"});
  ExpectNothingLeft();
}

// The C ABI's way to the same: LAYERX_OPT_REGISTRIES_CONF, and no
// LAYERX_OPT_TLS_VERIFY (the file's insecure = true decides); then 1, which wins.
TEST_F(RegistryPullTest, CAbiReadsTheRegistriesConfItIsGiven) {
  const std::string conf = WriteConf(dir_, R"(
[[registry]]
prefix = "primary.invalid"
location = "127.0.0.1:1"
[[registry.mirror]]
location = ")" + Host("http") + R"("
insecure = true
)");
  auto run = [&](const std::string& manifest, int tls_verify, const std::string& policy = "") {
    layerx_request* req = layerx_request_new();
    layerx_request_add_source(req, "docker://primary.invalid/app:v1");
    layerx_request_set_output(req, LAYERX_OUTPUT_MANIFEST, manifest.c_str());
    layerx_request_set_string(req, LAYERX_OPT_REGISTRIES_CONF, conf.c_str());
    layerx_request_set_string(req, LAYERX_OPT_EXTRACTOR_PATH, LAYERX_EXTRACTOR_BINARY);
    if (tls_verify >= 0) layerx_request_set_int(req, LAYERX_OPT_TLS_VERIFY, tls_verify);
    if (!policy.empty())
      layerx_request_set_string(req, LAYERX_OPT_SIGNATURE_POLICY, policy.c_str());
    layerx_result* res = nullptr;
    layerx_status status = layerx_extract(req, &res);
    std::string message = res != nullptr ? layerx_result_message(res) : "";
    layerx_result_free(res);
    layerx_request_free(req);
    return std::make_pair(status, message);
  };
  auto [ok, message] = run(out_ + "/c.jsonl", -1);
  ASSERT_EQ(ok, LAYERX_OK) << message;
  EXPECT_TRUE(ReadFile(out_ + "/c.jsonl") == Oci(app_ + ":v1").first);
  auto [refused, why] = run(out_ + "/refused.jsonl", 1);
  EXPECT_NE(refused, LAYERX_OK);
  EXPECT_NE(why.find("127.0.0.1:1"), std::string::npos) << why;
  EXPECT_NE(::access((out_ + "/refused.jsonl").c_str(), F_OK), 0);
  // LAYERX_OPT_SIGNATURE_POLICY: a policy that rejects all is LAYERX_E_REFUSED.
  const std::string policy = dir_ + "/reject-all-" + std::to_string(::getpid()) + ".json";
  WriteFile(policy, R"({"default": [{"type": "reject"}]})");
  auto [rejected, said] = run(out_ + "/p.jsonl", -1, policy);
  EXPECT_EQ(rejected, LAYERX_E_REFUSED);
  EXPECT_NE(said.find("rejected by policy.json"), std::string::npos) << said;
}

// registries.conf's credential-helpers: a helper of its own signs the
// requests to the TLS instance, with no auth file anywhere; a list without it
// leaves the pull anonymous (refused in one line).
TEST_F(RegistryPullTest, CredentialHelpersFromRegistriesConf) {
  const std::string bin = out_ + "-conf-helper/bin";  // not in out_: checked empty below
  std::filesystem::create_directories(bin);
  const std::string helper = bin + "/docker-credential-lxconf";
  WriteFile(helper, "#!/bin/sh\nread server\n[ \"$1\" = get ] && [ \"$server\" = '" + Host() +
                        "' ] || { echo 'credentials not found in native keychain'; exit 1; }\n"
                        "printf '{\"ServerURL\":\"%s\",\"Username\":\"%s\",\"Secret\":\"%s\"}' "
                        "\"$server\" '" +
                        env_["REGISTRY_USER"] + "' '" + env_["REGISTRY_PASS"] + "'\n");
  ASSERT_EQ(::chmod(helper.c_str(), 0755), 0);
  ::chmod(bin.c_str(), 0755);
  ::chmod((out_ + "-conf-helper").c_str(), 0755);
  const char* path = std::getenv("PATH");
  const std::vector<std::string> env = {"PATH=" + bin + ":" +
                                        (path != nullptr ? path : "/usr/bin:/bin")};
  const std::string conf =
      WriteConf(dir_, "credential-helpers = [\"containers-auth.json\", \"lxconf\"]\n");
  ExpectSameAsOci(Docker("app:v1"), {"--cert-dir", env_["CERT_DIR"], "--registries-conf", conf},
                  Oci(app_ + ":v1"), env);
  std::filesystem::remove(out_ + "/m.jsonl");
  std::filesystem::remove(out_ + "/m.config");
  const std::string without = WriteConf(dir_, "credential-helpers = [\"containers-auth.json\"]\n");
  Outcome r = Layerx(Cat({"extract", Docker("app:v1"), "--cert-dir", env_["CERT_DIR"],
                          "--registries-conf", without},
                         AllOutputs()),
                     env, 30);
  ExpectOneLineRefusal(r, {1}, {"unauthorized"});
  EXPECT_EQ(r.err.find(env_["REGISTRY_PASS"]), std::string::npos);
  ExpectNothingLeft();
  std::filesystem::remove_all(out_ + "-conf-helper");
}

// --creds belong to the registry named: a mirror elsewhere never gets them
// (here the TLS instance as a mirror, which then refuses the anonymous pull);
// a location on the same registry does.
TEST_F(RegistryPullTest, CredsAreNeverSentToAMirrorElsewhere) {
  const std::string conf = WriteConf(dir_, R"(
[[registry]]
prefix = "primary.invalid"
location = "127.0.0.1:1"
[[registry.mirror]]
location = ")" + Host("tls") + R"("

[[registry]]
prefix = ")" + Host("tls") + R"(/alias"
location = ")" + Host("tls") + R"("
)");
  Outcome r =
      Layerx(Cat(Cat({"extract", "docker://primary.invalid/app:v1", "--registries-conf", conf},
                     AllOutputs()),
                 TlsCreds()),
             {}, 30);
  ExpectOneLineRefusal(r, {1}, {"unauthorized"});
  ExpectNothingLeft();
  ExpectSameAsOci(Docker("alias/app:v1"), Cat({"--registries-conf", conf}, TlsCreds()),
                  Oci(app_ + ":v1"));
}

// A source that is blocked in its own right is passed over, never contacted;
// a mirror for digests only serves a pull by digest.
TEST_F(RegistryPullTest, BlockedMirrorsAreSkippedAndDigestOnlyMirrorsServeDigests) {
  const std::string conf = WriteConf(dir_, R"(
[[registry]]
prefix = "primary.invalid"
location = ")" + Host("http") + R"("
insecure = true
[[registry.mirror]]
location = "127.0.0.1:2"

[[registry]]
location = "127.0.0.1:2"
blocked = true

[[registry]]
prefix = "digests.invalid"
location = "127.0.0.1:1"
[[registry.mirror]]
location = ")" + Host("http") + R"("
insecure = true
pull-from-mirror = "digest-only"
)");
  const std::string m = out_ + "/blocked.jsonl";
  Outcome r = Layerx({"extract", "docker://primary.invalid/app:v1", "--registries-conf", conf,
                      "--manifest", m, "-v"},
                     {}, 30);
  ASSERT_EQ(r.code, 0) << r.Both();
  EXPECT_NE(r.err.find("127.0.0.1:2/app:v1: blocked by registries.conf"), std::string::npos)
      << r.err;
  EXPECT_TRUE(ReadFile(m) == Oci(app_ + ":v1").first);
  ::unlink(m.c_str());
  ExpectSameAsOci("docker://digests.invalid/app@" + app_digest_, {"--registries-conf", conf},
                  Oci(app_ + ":v1"));
  std::filesystem::remove(out_ + "/m.jsonl");
  std::filesystem::remove(out_ + "/m.config");
  Outcome tag = Layerx(
      Cat({"extract", "docker://digests.invalid/app:v1", "--registries-conf", conf}, AllOutputs()),
      {}, 30);
  ExpectOneLineRefusal(tag, {1}, {"127.0.0.1:1"});
  EXPECT_EQ(tag.err.find("mirrors tried first"), std::string::npos) << tag.err;
  ExpectNothingLeft();
}

// containers-policy.json decides, for the name as given, before any registry
// is contacted: an accepted scope pulls; the default's reject refuses in one
// line (the "registry" at 127.0.0.1:1 is never dialled: the line is the
// policy's); a scope that wants signatures refuses and says why; inspect
// reads metadata whatever the policy says, as skopeo's does.
TEST_F(RegistryPullTest, PolicyJsonDecidesWhatMayBePulled) {
  const std::string policy = dir_ + "/policy-" + std::to_string(::getpid()) + ".json";
  WriteFile(policy, R"({"default": [{"type": "reject"}], "transports": {"docker": {
      ")" + Host("http") +
                        R"(/app": [{"type": "insecureAcceptAnything"}],
      ")" + Host("http") +
                        R"(/signed": [{"type": "sigstoreSigned", "keyPath": "/k.pub"}]}}})");
  ExpectSameAsOci(Docker("app:v1", "http"), {"--tls-verify=false", "--signature-policy", policy},
                  Oci(app_ + ":v1"));
  std::filesystem::remove(out_ + "/m.jsonl");
  std::filesystem::remove(out_ + "/m.config");
  Outcome r = Layerx(Cat({"extract", "docker://127.0.0.1:1/app:v1", "--tls-verify=false",
                          "--signature-policy", policy},
                         AllOutputs()),
                     {}, 30);
  ExpectOneLineRefusal(r, {1}, {"rejected by policy.json \"" + policy + "\" (default)"});
  ExpectNothingLeft();
  Outcome sig = Layerx(Cat({"extract", Docker("signed/app:v1", "http"), "--tls-verify=false",
                            "--signature-policy", policy},
                           AllOutputs()),
                       {}, 30);
  ExpectOneLineRefusal(sig, {1}, {"wants it sigstoreSigned", "does not verify signatures"});
  ExpectNothingLeft();
  Outcome i = Layerx({"inspect", Docker("app:v1", "tls"), "--cert-dir", env_["CERT_DIR"],
                      "--authfile", env_["AUTH_FILE"], "--signature-policy", policy},
                     {}, 30);
  EXPECT_EQ(i.code, 0) << i.Both();
  // A policy file that is wrong: one line naming it, exit 2.
  const std::string bad = dir_ + "/bad-policy-" + std::to_string(::getpid()) + ".json";
  WriteFile(bad, R"({"default": []})");
  Outcome b = Layerx(
      Cat({"extract", Docker("app:v1", "http"), "--tls-verify=false", "--signature-policy", bad},
          AllOutputs()),
      {}, 30);
  ExpectOneLineRefusal(b, {2}, {bad, "want a non-empty array"});
  ExpectNothingLeft();
}

TEST_F(RegistryPullTest, EverySourceFailingIsOneLineNamingEach) {
  const std::string conf = WriteConf(dir_, R"(
[[registry]]
prefix = "primary.invalid"
location = "127.0.0.1:1"
[[registry.mirror]]
location = ")" + Host("http") + R"(/elsewhere"
insecure = true
)");
  Outcome r = Layerx(
      Cat({"extract", "docker://primary.invalid/app:v1", "--registries-conf", conf}, AllOutputs()),
      {}, 30);
  ExpectOneLineRefusal(r, {1},
                       {"127.0.0.1:1", "mirrors tried first", Host("http") + "/elsewhere/app:v1"});
  ExpectNothingLeft();
}

TEST_F(RegistryPullTest, RejectsABadRegistriesConfInOneLine) {
  const std::string conf =
      WriteConf(dir_, "[[registry]]\nlocation = \"https://" + Host("http") + "\"\n");
  Outcome r = Layerx(
      Cat({"extract", Docker("app:v1", "http"), "--registries-conf", conf}, AllOutputs()), {}, 30);
  ExpectOneLineRefusal(r, {2}, {conf + ":2", "URI scheme"});
  ExpectNothingLeft();
  Outcome missing =
      Layerx(Cat({"extract", Docker("app:v1", "http"), "--registries-conf", dir_ + "/no-such.conf"},
                 AllOutputs()),
             {}, 30);
  ExpectOneLineRefusal(missing, {2}, {"no-such.conf"});
  ExpectNothingLeft();
}

// ---- 6, 7. a hostile registry -------------------------------------------

// tests/registry/fake_registry.py over a layout written here (image v1: two
// small gzip layers); the repository name picks how the registry lies, and
// the lies are about layer 2 (so the line must name that one, not the first).
class RegistryPullFakeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (::access("/usr/bin/python3", X_OK) != 0) {
      skip_ = "/usr/bin/python3 is missing (the fake registry needs it)";
      return;
    }
    char tmpl[] = "/tmp/layerx-pull-fake-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ::mkdir((dir_ + "/home").c_str(), 0755);
    {
      OciLayout layout(dir_ + "/oci");
      const std::string l1 = dir_ + "/l1.tar.gz", l2 = dir_ + "/l2.tar.gz";
      LayerWriter(l1, "gzip").Dir("etc").File("etc/hostname", "fake\n");
      std::string noise(64 << 10, '\0');
      std::mt19937 rng(7);
      for (char& ch : noise) ch = static_cast<char>(rng());
      LayerWriter(l2, "gzip").File("usr/share/noise", noise);
      json m = layout.AddImage({layout.AddLayer(l1, kGzip), layout.AddLayer(l2, kGzip)});
      layout.WriteIndex({{m, "v1"}});
      manifest_ = LayoutImage(dir_ + "/oci", "v1").first;
    }
    const std::string port_file = dir_ + "/port";
    const std::string layout_dir = dir_ + "/oci";
    const char* argv[] = {"/usr/bin/python3", kFakeRegistry.c_str(), layout_dir.c_str(),
                          port_file.c_str(), nullptr};
    pid_ = ::fork();
    if (pid_ == 0) {
      int null = ::open("/dev/null", O_RDWR);
      ::dup2(null, 0);
      ::dup2(null, 1);
      ::execv(argv[0], const_cast<char**>(argv));
      ::_exit(127);
    }
    for (int i = 0; i < 200 && ::access(port_file.c_str(), R_OK) != 0; ++i) ::usleep(50'000);
    host_ = "127.0.0.1:" + ReadFile(port_file);
    ASSERT_NE(host_, "127.0.0.1:") << "the fake registry did not start";
  }
  static void TearDownTestSuite() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    ASSERT_NE(host_, "") << "the suite's setup failed";
    out_ = dir_ + "/out-" + ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::replace(out_.begin() + dir_.size(), out_.end(), '/', '_');
    std::filesystem::remove_all(out_);
    ASSERT_EQ(::mkdir(out_.c_str(), 0755), 0);
  }
  void TearDown() override {
    if (!out_.empty()) std::filesystem::remove_all(out_);
  }

  // `layerx serve` for this test (its tenant: this uid), up and answering.
  void StartService(std::unique_ptr<Proc>* service, std::string* socket) {
    const std::string sdir = out_ + "/service";
    ASSERT_EQ(::mkdir(sdir.c_str(), 0755), 0);
    ASSERT_EQ(::mkdir((sdir + "/scratch").c_str(), 0755), 0);
    const std::string config = sdir + "/serve.toml";
    *socket = sdir + "/sock";
    {
      std::ofstream(config) << "[service]\nscratch_dir = \"" << sdir
                            << "/scratch\"\n[[tenant]]\nname = \"self\"\nuids = [" << ::geteuid()
                            << "]\n";
    }
    *service = std::make_unique<Proc>(
        std::vector<std::string>{LAYERX_BINARY, "serve", "--socket", *socket, "--config", config},
        dir_ + "/connect-service", dir_ + "/home");
    bool up = false;
    for (int i = 0; i < 200 && !up; ++i) {
      up = Proc({LAYERX_BINARY, "status", "--socket", *socket}, dir_ + "/connect-status",
                dir_ + "/home")
               .Finish(10)
               .code == 0;
      if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ASSERT_TRUE(up) << "the service did not come up";
  }

  // `layerx extract docker://FAKE/MODE:v1` with every output; -q (unless
  // `extra` has -v): the --tls-verify=false note is not what these tests are about.
  Outcome Pull(const std::string& mode, const std::vector<std::string>& extra = {},
               double seconds = 60) {
    std::vector<std::string> argv = {LAYERX_BINARY,
                                     "extract",
                                     "docker://" + host_ + "/" + mode + ":v1",
                                     "--tls-verify=false",
                                     "-q",
                                     "--rootfs",
                                     out_ + "/rootfs",
                                     "--ext4",
                                     out_ + "/img",
                                     "--manifest",
                                     out_ + "/m.jsonl",
                                     "--config",
                                     out_ + "/config.json"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    if (std::find(extra.begin(), extra.end(), "-v") != extra.end()) {
      argv.erase(std::find(argv.begin(), argv.end(), "-q"));  // -q would win
    }
    static int n = 0;
    return Proc(argv, dir_ + "/run-" + std::to_string(n++), dir_ + "/home").Finish(seconds);
  }
  void ExpectNothingLeft() { EXPECT_TRUE(Names(out_).empty()) << "output or work dir left behind"; }
  std::string Layer2() { return LayerName(2, manifest_["layers"][1]["digest"]); }

  static inline std::string skip_, dir_, host_;
  static inline json manifest_;
  static inline pid_t pid_ = -1;
  std::string out_;
};

TEST_F(RegistryPullFakeTest, GoodModeWorks) {
  // The control: the fake serves a pullable image when it does not lie.
  Outcome r = Pull("good");
  ASSERT_EQ(r.code, 0) << r.Both();
  EXPECT_EQ(ReadFile(out_ + "/rootfs/etc/hostname"), "fake\n");
}

TEST_F(RegistryPullFakeTest, LayersDownloadWhileTheConfigIsFetched) {
  // "configlast" answers the config only after a layer blob was asked for: a
  // pull that fetched the config first, then the layers, would wait 10 s and
  // get a 404. The layers' requests go out once the manifest names them.
  Outcome r = Pull("configlast", {}, 30);
  ASSERT_EQ(r.code, 0) << r.Both();
  EXPECT_LT(r.seconds, 8) << "the config waited for a layer request that never came";
  EXPECT_EQ(ReadFile(out_ + "/rootfs/etc/hostname"), "fake\n");
}

TEST_F(RegistryPullFakeTest, ConfigThatFailsWhileTheLayersDownloadIsOneLine) {
  // The downloads have started when the config fails: they stop, the job
  // says what failed in one line, and nothing is left.
  Outcome r = Pull("configgone", {}, 30);
  ExpectOneLineRefusal(r, {1}, {"config: blob sha256:", "404", "BLOB_UNKNOWN"});
  EXPECT_LT(r.seconds, 8);
  ExpectNothingLeft();
}

TEST_F(RegistryPullFakeTest, LayerAheadThatFailsStopsTheJobAtOnce) {
  // Layer 2's blob is a 404 while layer 1 drips (about 40 s): the job hears
  // of layer 2 now, in one line naming it, and stops layer 1.
  Outcome r = Pull("failahead", {}, 30);
  ExpectOneLineRefusal(r, {1}, {Layer2(), "404", "BLOB_UNKNOWN"});
  EXPECT_LT(r.seconds, 8) << "the job waited for layer 1 before saying layer 2 failed";
  ExpectNothingLeft();
}

TEST_F(RegistryPullFakeTest, ThroughTheServiceALayerAheadThatFailsStopsTheJobAtOnce) {
  // The same through --connect: the client's pull stops, every pipe it handed
  // the service ends, and the client names the layer that failed.
  std::unique_ptr<Proc> service;
  std::string socket;
  ASSERT_NO_FATAL_FAILURE(StartService(&service, &socket));
  Outcome r =
      Proc({LAYERX_BINARY, "extract", "docker://" + host_ + "/failahead:v1", "--tls-verify=false",
            "-q", "--connect", socket, "--ext4", out_ + "/img", "--manifest", out_ + "/m.jsonl"},
           dir_ + "/connect-run", dir_ + "/home")
          .Finish(30);
  ExpectOneLineRefusal(r, {1}, {Layer2(), "404", "BLOB_UNKNOWN"});
  EXPECT_LT(r.seconds, 8);
  auto left = Names(out_);
  left.erase("service");
  EXPECT_TRUE(left.empty()) << "output left behind";
}

// ---- 6. slow drip and stall: the clocks ---------------------------------

TEST_F(RegistryPullFakeTest, DripStopsAtTheLayerClock) {
  Outcome r = Pull("drip", {"--layer-timeout", "3"}, 15);
  ExpectOneLineRefusal(r, {1}, {Layer2(), "layer_timeout"});
  EXPECT_LT(r.seconds, 6) << "the layer clock is 3 s";
  ExpectNothingLeft();
}

TEST_F(RegistryPullFakeTest, DripStopsAtTheJobClock) {
  Outcome r = Pull("drip", {"--job-timeout", "3"}, 15);
  ExpectOneLineRefusal(r, {1}, {"job_timeout"});
  EXPECT_LT(r.seconds, 6) << "the job clock is 3 s";
  ExpectNothingLeft();
}

// Nothing at all after 16 bytes (curl's own low-speed clock is 60 s): the
// layer clock must still end the job, and the download with it, at once.
// Found (main at e3e00a2): after the layer clock ends the job, ~RegistryPull
// joins a worker whose RegistryClient has no cancel flag (registry_pull.cc's
// Connect does not pass one), so a stalled blob holds the exit until curl's
// 60 s low-speed clock, and a dripping one until the whole blob has dripped
// (SIGTERM does not help: main is in the join). The job clock works because
// it also bounds each request (total_timeout_ms). Runs are cut at 15 s here.
TEST_F(RegistryPullFakeTest, StallStopsAtTheLayerClock) {
  Outcome r = Pull("stall", {"--layer-timeout", "3"}, 15);
  ExpectOneLineRefusal(r, {1}, {Layer2(), "layer_timeout"});
  EXPECT_LT(r.seconds, 6) << "the layer clock is 3 s";
  ExpectNothingLeft();
}

TEST_F(RegistryPullFakeTest, StallStopsAtTheJobClock) {
  Outcome r = Pull("stall", {"--job-timeout", "3"}, 15);
  ExpectOneLineRefusal(r, {1}, {"job_timeout"});
  EXPECT_LT(r.seconds, 6) << "the job clock is 3 s";
  ExpectNothingLeft();
}

// ---- 6b. too many requests -----------------------------------------------

// A 429 that names a short wait is waited out (counted as a retry, shown with
// -v), and the pull goes on; one that names hours (Docker Hub's pull limit)
// fails at once with the registry's words and its Retry-After, not a hang.
TEST_F(RegistryPullFakeTest, TooManyRequestsWithAShortRetryAfterIsWaitedOut) {
  Outcome r = Pull("busy", {"-v"}, 30);
  ASSERT_EQ(r.code, 0) << r.Both();
  EXPECT_GE(r.seconds, 2) << "two answers of Retry-After: 1";
  EXPECT_NE(r.err.find("registry retry"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("HTTP 429"), std::string::npos) << r.err;
  EXPECT_EQ(ReadFile(out_ + "/rootfs/etc/hostname"), "fake\n");
}

// Through the service the pull runs in the client: its retries reach the
// client's -v log while the job runs, through the CLI's log, not raw stderr.
TEST_F(RegistryPullFakeTest, ThroughTheServiceTheClientSaysItsRetries) {
  std::unique_ptr<Proc> service;
  std::string socket;
  ASSERT_NO_FATAL_FAILURE(StartService(&service, &socket));
  Outcome r = Proc({LAYERX_BINARY, "extract", "docker://" + host_ + "/busy-connect:v1",
                    "--tls-verify=false", "-v", "--connect", socket, "--ext4", out_ + "/img"},
                   dir_ + "/connect-run", dir_ + "/home")
                  .Finish(60);
  ASSERT_EQ(r.code, 0) << r.Both();
  EXPECT_NE(r.err.find("registry retry"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("HTTP 429"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("warning broker:"), std::string::npos) << "raw stderr: " << r.err;
}

TEST_F(RegistryPullFakeTest, TooManyRequestsForHoursFailsAtOnce) {
  Outcome r = Pull("ratelimit", {}, 30);
  ExpectOneLineRefusal(r, {1}, {"HTTP 429", "TOOMANYREQUESTS", "pull rate limit", "21600"});
  EXPECT_LT(r.seconds, 5) << "no waiting for hours, no retries";
  ExpectNothingLeft();
}

// ---- 7. hostile answers -------------------------------------------------

struct HostileCase {
  const char* name;
  const char* mode;
  const char* needle;  // in the one line ("" none); "LAYER2": names layer 2
};

class RegistryPullHostileTest : public RegistryPullFakeTest,
                                public ::testing::WithParamInterface<HostileCase> {};

TEST_P(RegistryPullHostileTest, RejectsInOneLineLeavingNothing) {
  const HostileCase& c = GetParam();
  Outcome r = Pull(c.mode, {}, 60);
  std::vector<std::string> needles;
  if (std::string(c.needle) == "LAYER2") {
    needles.push_back(Layer2());
  } else if (*c.needle != '\0') {
    needles.push_back(c.needle);
  }
  ExpectOneLineRefusal(r, {1}, needles);
  EXPECT_LT(r.seconds, 15);
  ExpectNothingLeft();
}

INSTANTIATE_TEST_SUITE_P(
    Hostile, RegistryPullHostileTest,
    ::testing::Values(HostileCase{"ManifestOver4MiB", "big", ""},
                      HostileCase{"EndlessManifest", "endless", ""},
                      HostileCase{"EndlessLayerBlob", "long", "LAYER2"},
                      HostileCase{"ShortLayerBlob", "short", "LAYER2"},
                      HostileCase{"RedirectLoop", "loop", ""},
                      HostileCase{"Schema1Manifest", "schema1", "schema 1"},
                      HostileCase{"ConfigNotItsDigest", "badconfig", ""},
                      HostileCase{"UnavailableForHours", "maintenance", "HTTP 503"}),
    [](const ::testing::TestParamInfo<HostileCase>& info) { return info.param.name; });

}  // namespace
}  // namespace layerx
