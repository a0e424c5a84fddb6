// RegistryClient against the real distribution registry (Debian's
// docker-registry), started by tests/registry/registry.sh on 127.0.0.1: one
// https instance with a self-signed CA and an htpasswd user, one plain http
// instance. The image pushed is the corpus's debian (ref debian:test) when it is
// there, else a two-layer OCI layout written here; skopeo pushes it with its
// digests kept, so the registry serves the layout's manifest bytes unchanged.
#include "broker/source/registry_client.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "broker/log/logging.h"
#include "extractor/digest.h"
#include "tests/fixtures/layer_writer.h"
#include "tests/fixtures/oci_layout.h"
#include "tests/fixtures/registry_env.h"
#include "tests/fixtures/test_util.h"

namespace layerx::broker {
namespace {

using testing::ReadFile;

const std::string kScript = std::string(LAYERX_SOURCE_DIR) + "/tests/registry/registry.sh";
const char kCorpusLayout[] = "/var/tmp/layerx-corpus/images/debian/oci";

int Sh(const std::string& command) {
  int rc = std::system(command.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

class RegistryClientTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (Sh("sh " + kScript + " check >/dev/null 2>&1") != 0) {
      skip_ = "the registry harness's tools (docker-registry, skopeo, htpasswd) are missing";
      return;
    }
    char tmpl[] = "/tmp/layerx-registry-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    reg_ = dir_ + "/reg";
    ASSERT_EQ(Sh("sh " + kScript + " start " + reg_ + " >/dev/null"), 0);
    started_ = true;
    env_ = testing::ReadRegistryEnv(reg_ + "/env");
    ASSERT_FALSE(env_["TLS_HOST"].empty());

    std::string layout_ref;
    if (access((std::string(kCorpusLayout) + "/index.json").c_str(), R_OK) == 0) {
      layout_ = kCorpusLayout;
      layout_ref = "debian:test";
    } else {
      // Not the corpus: one gzip layer with a small file and 24 MiB that do not
      // compress (a blob big enough to cut in the middle: more than curl's
      // HTTP/2 window and the socket buffers hold), and one empty layer.
      layout_ = dir_ + "/layout";
      testing::OciLayout layout(layout_);
      std::string l1 = dir_ + "/l1.tar.gz", l2 = dir_ + "/l2.tar.gz";
      std::string noise(24 << 20, '\0');
      std::ifstream("/dev/urandom", std::ios::binary).read(noise.data(), noise.size());
      testing::LayerWriter(l1, "gzip")
          .Dir("etc")
          .File("etc/hostname", "layerx\n")
          .File("etc/noise", noise);
      { testing::LayerWriter w(l2, "gzip"); }
      const char* gz = "application/vnd.oci.image.layer.v1.tar+gzip";
      nlohmann::json m = layout.AddImage({layout.AddLayer(l1, gz), layout.AddLayer(l2, gz)});
      layout.WriteIndex({{m, "test"}});
      layout_ref = "test";
    }
    nlohmann::json index = nlohmann::json::parse(ReadFile(layout_ + "/index.json"));
    for (const auto& d : index["manifests"]) {
      auto ann = d.value("annotations", nlohmann::json::object());
      if (ann.value("org.opencontainers.image.ref.name", "") == layout_ref) {
        manifest_digest_ = d["digest"].get<std::string>();
        manifest_media_type_ = d["mediaType"].get<std::string>();
      }
    }
    ASSERT_FALSE(manifest_digest_.empty());
    manifest_bytes_ = ReadFile(layout_ + "/blobs/sha256/" + manifest_digest_.substr(7));
    manifest_ = nlohmann::json::parse(manifest_bytes_);
    for (const char* kind : {"tls", "http"}) {
      ASSERT_EQ(Sh("sh " + kScript + " push " + reg_ + " " + layout_ + ":" + layout_ref +
                   " debian:test " + kind + " >/dev/null"),
                0)
          << kind;
    }
  }

  static void TearDownTestSuite() {
    if (started_) Sh("sh " + kScript + " stop " + reg_ + " >/dev/null 2>&1");
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    ASSERT_FALSE(manifest_bytes_.empty()) << "the suite's setup failed";
  }

  static RegistryRef Ref(const std::string& host_key, const std::string& tail = "debian:test") {
    auto ref = ParseRegistryRef("docker://" + env_[host_key] + "/" + tail);
    EXPECT_TRUE(ref) << ref.error().ToString();
    return *ref;
  }
  static RegistryOptions TlsOptions() {
    RegistryOptions o;
    o.cert_dir = env_["CERT_DIR"];
    o.credentials = Credentials{env_["REGISTRY_USER"], env_["REGISTRY_PASS"]};
    return o;
  }
  static std::unique_ptr<RegistryClient> Client(const RegistryRef& ref, RegistryOptions options) {
    auto c = RegistryClient::Create(ref, std::move(options));
    EXPECT_TRUE(c) << c.error().ToString();
    return c ? std::move(*c) : nullptr;
  }
  // The smallest layer's descriptor.
  static std::pair<std::string, uint64_t> SmallLayer() {
    const nlohmann::json* best = nullptr;
    for (const auto& l : manifest_["layers"]) {
      if (best == nullptr || l["size"].get<uint64_t>() < (*best)["size"].get<uint64_t>()) best = &l;
    }
    return {(*best)["digest"].get<std::string>(), (*best)["size"].get<uint64_t>()};
  }
  static void ExpectOneLine(const Error& e) {
    EXPECT_EQ(e.ToString().find('\n'), std::string::npos) << e.ToString();
    EXPECT_EQ(e.ToString().find(env_["REGISTRY_PASS"]), std::string::npos) << e.ToString();
  }

  static inline std::string skip_, dir_, reg_, layout_, manifest_digest_, manifest_bytes_,
      manifest_media_type_;
  static inline nlohmann::json manifest_;
  static inline std::map<std::string, std::string> env_;
  static inline bool started_ = false;
};

TEST_F(RegistryClientTest, ManifestByTagOverTlsIsTheLayoutsBytes) {
  auto client = Client(Ref("TLS_HOST"), TlsOptions());
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
  EXPECT_EQ(client->scheme(), "https");
  EXPECT_EQ(m->digest, manifest_digest_);
  EXPECT_TRUE(m->bytes == manifest_bytes_);
  // The corpus manifest has no mediaType field: the index descriptor names it.
  EXPECT_EQ(m->media_type, manifest_media_type_);
}

TEST_F(RegistryClientTest, ManifestByDigestIsVerified) {
  auto client = Client(Ref("TLS_HOST", "debian@" + manifest_digest_), TlsOptions());
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
  EXPECT_EQ(m->digest, manifest_digest_);
}

TEST_F(RegistryClientTest, CredentialsFromTheHarnessAuthFile) {
  RegistryRef ref = Ref("TLS_HOST");
  auto creds =
      FindCredentials(ref.registry, std::nullopt, {dir_ + "/missing.json", env_["AUTH_FILE"]});
  ASSERT_TRUE(creds) << creds.error().ToString();
  ASSERT_TRUE(creds->has_value());
  RegistryOptions o = TlsOptions();
  o.credentials = **creds;
  auto client = Client(ref, o);
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
  EXPECT_EQ(m->digest, manifest_digest_);
}

TEST_F(RegistryClientTest, RejectsWrongPasswordInOneLine) {
  RegistryOptions o = TlsOptions();
  o.credentials->password += "-wrong";
  auto client = Client(Ref("TLS_HOST"), o);
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kPolicy);
  ExpectOneLine(m.error());
  EXPECT_EQ(m.error().ToString().find(o.credentials->password), std::string::npos);
  EXPECT_NE(m.error().ToString().find("unauthorized"), std::string::npos) << m.error().ToString();
}

// A registry that asks for Basic (htpasswd) gets the entry's user and password
// when an identity token came with them; a token alone is one line.
TEST_F(RegistryClientTest, IdentityTokenWithBasicRegistry) {
  RegistryOptions o = TlsOptions();
  o.credentials->identity_token = "idt-unused-s3cret";
  auto client = Client(Ref("TLS_HOST"), o);
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
  o.credentials = Credentials{.identity_token = "idt-alone-s3cret"};
  client = Client(Ref("TLS_HOST"), o);
  ASSERT_TRUE(client);
  m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kPolicy);
  const std::string e = m.error().ToString();
  EXPECT_NE(e.find("identity token"), std::string::npos) << e;
  EXPECT_EQ(e.find("s3cret"), std::string::npos) << e;
  EXPECT_EQ(e.find('\n'), std::string::npos) << e;
}

TEST_F(RegistryClientTest, RejectsMissingCredentials) {
  RegistryOptions o = TlsOptions();
  o.credentials.reset();
  auto client = Client(Ref("TLS_HOST"), o);
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kPolicy);
  ExpectOneLine(m.error());
}

TEST_F(RegistryClientTest, RejectsSelfSignedCertWithoutCertDir) {
  RegistryOptions o = TlsOptions();
  o.cert_dir.clear();
  auto client = Client(Ref("TLS_HOST"), o);
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kPolicy);
  ExpectOneLine(m.error());
}

TEST_F(RegistryClientTest, TlsVerifyFalseOnTlsRegistryStaysHttps) {
  RegistryOptions o = TlsOptions();
  o.cert_dir.clear();
  o.tls_verify = false;
  auto client = Client(Ref("TLS_HOST"), o);
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
  EXPECT_EQ(client->scheme(), "https");
  EXPECT_EQ(m->digest, manifest_digest_);
}

TEST_F(RegistryClientTest, PlainHttpWithTlsVerifyFalse) {
  RegistryOptions o;
  o.tls_verify = false;
  auto client = Client(Ref("HTTP_HOST"), o);
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
  EXPECT_EQ(client->scheme(), "http");
  EXPECT_EQ(m->digest, manifest_digest_);
  EXPECT_TRUE(m->bytes == manifest_bytes_);
}

TEST_F(RegistryClientTest, RefusesPlainHttpWhenVerifyingTls) {
  auto client = Client(Ref("HTTP_HOST"), RegistryOptions{});
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kPolicy) << m.error().ToString();
  ExpectOneLine(m.error());
}

TEST_F(RegistryClientTest, UnknownTagIsNotFound) {
  auto client = Client(Ref("TLS_HOST", "debian:no-such-tag"), TlsOptions());
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kPolicy);
  ExpectOneLine(m.error());
}

TEST_F(RegistryClientTest, BlobStreamsWithItsDigestAndSize) {
  auto client = Client(Ref("TLS_HOST"), TlsOptions());
  ASSERT_TRUE(client);
  for (const auto& l : manifest_["layers"]) {
    const std::string digest = l["digest"].get<std::string>();
    const uint64_t size = l["size"].get<uint64_t>();
    extractor::Sha256 sha;
    uint64_t seen = 0;
    auto n = client->GetBlob(digest, size, [&](std::span<const char> b) -> Status {
      sha.Update(b.data(), b.size());
      seen += b.size();
      return {};
    });
    ASSERT_TRUE(n) << n.error().ToString();
    EXPECT_EQ(*n, size);
    EXPECT_EQ(seen, size);
    EXPECT_EQ(sha.Finish(), digest);
  }
}

// The connection is close-on-exec while it carries a transfer: a library
// user's fork + exec elsewhere in the process must not inherit it. (curl's
// multi handle also holds an AF_UNIX wakeup pair without it: it carries no
// byte of the transfer.)
TEST_F(RegistryClientTest, ConnectionsAreCloseOnExec) {
  for (const char* host : {"TLS_HOST", "HTTP_HOST"}) {
    RegistryOptions o = TlsOptions();
    if (std::string(host) == "HTTP_HOST") o = RegistryOptions{.tls_verify = false};
    auto client = Client(Ref(host), o);
    ASSERT_TRUE(client);
    const auto& l = manifest_["layers"][0];
    int sockets = 0, inheritable = 0;
    bool looked = false;
    auto n = client->GetBlob(
        l["digest"].get<std::string>(), l["size"].get<uint64_t>(),
        [&](std::span<const char>) -> Status {
          if (looked) return {};
          looked = true;
          for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
            int fd = std::stoi(e.path().filename().string());
            struct stat st;
            if (::fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
            int domain = -1;
            socklen_t len = sizeof(domain);
            ::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len);
            if (domain != AF_INET && domain != AF_INET6) continue;
            ++sockets;
            if ((::fcntl(fd, F_GETFD) & FD_CLOEXEC) == 0) ++inheritable;
          }
          return {};
        });
    ASSERT_TRUE(n) << host << ": " << n.error().ToString();
    EXPECT_GE(sockets, 1) << host;
    EXPECT_EQ(inheritable, 0) << host;
  }
}

TEST_F(RegistryClientTest, ConfigBlobOverPlainHttpIsTheLayoutsBytes) {
  RegistryOptions o;
  o.tls_verify = false;
  auto client = Client(Ref("HTTP_HOST"), o);
  ASSERT_TRUE(client);
  const std::string digest = manifest_["config"]["digest"].get<std::string>();
  std::string got;
  auto n = client->GetBlob(digest, manifest_["config"]["size"].get<uint64_t>(),
                           [&](std::span<const char> b) -> Status {
                             got.append(b.data(), b.size());
                             return {};
                           });
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_TRUE(got == ReadFile(layout_ + "/blobs/sha256/" + digest.substr(7)));
}

TEST_F(RegistryClientTest, RejectsBlobOverOrUnderItsSize) {
  auto client = Client(Ref("TLS_HOST"), TlsOptions());
  ASSERT_TRUE(client);
  auto [digest, size] = SmallLayer();
  auto discard = [](std::span<const char>) -> Status { return {}; };
  auto over = client->GetBlob(digest, size - 1, discard);
  ASSERT_FALSE(over);
  EXPECT_EQ(over.error().kind(), ErrorKind::kLimitExceeded);
  EXPECT_NE(over.error().ToString().find(digest), std::string::npos);
  auto under = client->GetBlob(digest, size + 1, discard);
  ASSERT_FALSE(under);
  EXPECT_EQ(under.error().kind(), ErrorKind::kIntegrity);
  EXPECT_NE(under.error().ToString().find(digest), std::string::npos);
}

TEST_F(RegistryClientTest, SinkErrorStopsTheTransfer) {
  auto client = Client(Ref("TLS_HOST"), TlsOptions());
  ASSERT_TRUE(client);
  auto [digest, size] = SmallLayer();
  auto n = client->GetBlob(digest, size, [](std::span<const char>) -> Status {
    return std::unexpected(MakeError(ErrorKind::kCancelled, "stop"));
  });
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().kind(), ErrorKind::kCancelled);
  // The handle is still usable afterwards.
  auto m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
}

// The registry serves a blob's stored bytes as they are (it does not re-hash on
// GET): one byte flipped in the http instance's storage, same size.
TEST_F(RegistryClientTest, RejectsTamperedBlobNamingIt) {
  const std::string digest = manifest_["config"]["digest"].get<std::string>();
  const std::string data = env_["HTTP_STORAGE"] + "/blobs/sha256/" + digest.substr(7, 2) + "/" +
                           digest.substr(7) + "/data";
  std::string original = ReadFile(data);
  ASSERT_FALSE(original.empty()) << data;
  std::string tampered = original;
  tampered[tampered.size() / 2] ^= 0x20;
  std::ofstream(data, std::ios::binary | std::ios::trunc) << tampered;
  RegistryOptions o;
  o.tls_verify = false;
  auto client = Client(Ref("HTTP_HOST"), o);
  ASSERT_TRUE(client);
  auto n =
      client->GetBlob(digest, original.size(), [](std::span<const char>) -> Status { return {}; });
  std::ofstream(data, std::ios::binary | std::ios::trunc) << original;
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().kind(), ErrorKind::kIntegrity);
  EXPECT_NE(n.error().ToString().find(digest), std::string::npos) << n.error().ToString();
  ExpectOneLine(n.error());
}

// The registry is killed in the middle of the biggest layer and started again on
// its port: GetBlob resumes with a Range request (the access log shows the 206)
// and the sink sees each byte once.
TEST_F(RegistryClientTest, ResumesBlobAfterTheRegistryRestarts) {
  std::string digest;
  uint64_t size = 0;
  for (const auto& l : manifest_["layers"]) {
    if (l["size"].get<uint64_t>() > size) {
      size = l["size"].get<uint64_t>();
      digest = l["digest"].get<std::string>();
    }
  }
  ASSERT_GT(size, 2u << 20) << "no layer big enough to cut";
  RegistryOptions o = TlsOptions();
  o.retry_backoff_ms = 200;  // 200 + 400 + ... 3200 ms: the restart takes 1-2 s
  auto client = Client(Ref("TLS_HOST"), o);
  ASSERT_TRUE(client);
  extractor::Sha256 sha;
  uint64_t seen = 0;
  std::thread restart;
  std::vector<std::string> lines;
  LogTarget target([&](spdlog::level::level_enum, std::string_view,
                       std::string_view line) { lines.emplace_back(line); },
                   spdlog::level::info);
  auto n = client->GetBlob(digest, size, [&](std::span<const char> b) -> Status {
    sha.Update(b.data(), b.size());
    if (seen < (1u << 20) && seen + b.size() >= (1u << 20)) {
      EXPECT_EQ(Sh("sh " + kScript + " kill " + reg_ + " tls >/dev/null 2>&1"), 0);
      restart = std::thread(
          [] { EXPECT_EQ(Sh("sh " + kScript + " restart " + reg_ + " tls >/dev/null"), 0); });
    }
    seen += b.size();
    return {};
  });
  if (restart.joinable()) restart.join();
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_EQ(*n, size);
  EXPECT_EQ(seen, size);
  EXPECT_EQ(sha.Finish(), digest);
  ASSERT_FALSE(lines.empty()) << "no retry logged";
  EXPECT_NE(lines[0].find("blob " + digest), std::string::npos) << lines[0];
  // Access log lines: "GET /v2/debian/blobs/sha256:... HTTP/2.0" 206 ...
  std::istringstream log(ReadFile(env_["TLS_ACCESS_LOG"]));
  int ranged = 0;
  for (std::string line; std::getline(log, line);) {
    size_t at = line.find("/blobs/" + digest + " HTTP/");
    if (at != std::string::npos && line.find("\" 206 ", at) != std::string::npos) ++ranged;
  }
  EXPECT_EQ(ranged, 1) << "Range requests answered 206 for " << digest;
}

TEST_F(RegistryClientTest, RejectsBadCertDir) {
  RegistryOptions o = TlsOptions();
  o.cert_dir = dir_ + "/no-such-dir";
  auto c = RegistryClient::Create(Ref("TLS_HOST"), o);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().kind(), ErrorKind::kPolicy);
  std::filesystem::create_directories(dir_ + "/badcerts");
  std::ofstream(dir_ + "/badcerts/x.crt") << "not a certificate\n";
  o.cert_dir = dir_ + "/badcerts";
  c = RegistryClient::Create(Ref("TLS_HOST"), o);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().kind(), ErrorKind::kPolicy);
}

// A cert dir as containers-certs.d(5) lays it out: NAME.cert and NAME.key
// are a client certificate, checked as a pair when the client is made.
TEST_F(RegistryClientTest, CertDirClientPairsAreCheckedAsAPair) {
  const std::string src = env_["MTLS_CERT_DIR"];
  ASSERT_FALSE(src.empty());
  auto dir = [&](const std::string& name, const std::map<std::string, std::string>& files) {
    std::string d = dir_ + "/pairs-" + name;
    std::filesystem::create_directories(d);
    for (const auto& [to, from] : files) {
      if (from.starts_with("text:")) {
        std::ofstream(d + "/" + to) << from.substr(5);
      } else {
        std::filesystem::copy_file(from, d + "/" + to,
                                   std::filesystem::copy_options::overwrite_existing);
      }
    }
    return d;
  };
  auto refused = [&](const std::string& d, const std::string& needle, bool verify = true) {
    RegistryOptions o;
    o.cert_dir = d;
    o.tls_verify = verify;
    auto c = RegistryClient::Create(Ref("MTLS_HOST"), o);
    ASSERT_FALSE(c) << d;
    EXPECT_EQ(c.error().kind(), ErrorKind::kPolicy);
    EXPECT_NE(c.error().ToString().find(needle), std::string::npos) << c.error().ToString();
  };
  const std::string cert = src + "/client.cert", key = src + "/client.key", ca = src + "/ca.crt";
  refused(dir("no-key", {{"ca.crt", ca}, {"me.cert", cert}}), "has no key \"me.key\"");
  refused(dir("no-cert", {{"ca.crt", ca}, {"me.key", key}}),
          "has no client certificate \"me.cert\"");
  refused(dir("no-pem", {{"me.cert", "text:not a certificate\n"}, {"me.key", key}}),
          "\"me.cert\" holds no PEM certificate");
  // Another key of the same kind: a pair that does not match.
  const std::string other = dir_ + "/other.key";
  ASSERT_EQ(Sh("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " + other +
               " 2>/dev/null"),
            0);
  refused(dir("mismatch", {{"me.cert", cert}, {"me.key", other}}),
          "\"me.key\" is not the key of \"me.cert\"");
  // An encrypted key is refused, never asked for (no terminal prompt).
  const std::string locked = dir_ + "/locked.key";
  ASSERT_EQ(Sh("openssl pkey -in " + key + " -aes256 -passout pass:secret -out " + locked +
               " 2>/dev/null </dev/null"),
            0);
  refused(dir("encrypted", {{"me.cert", cert}, {"me.key", locked}}), "holds no PEM private key");
  // Without verification the CAs are not read, but a pair still is.
  refused(dir("no-key-insecure", {{"x.crt", "text:junk\n"}, {"me.cert", cert}}), "has no key",
          false);
  RegistryOptions o;
  o.cert_dir = dir("junk-ca-insecure", {{"x.crt", "text:junk\n"}});
  o.tls_verify = false;
  EXPECT_TRUE(RegistryClient::Create(Ref("MTLS_HOST"), o));
}

// The mtls instance wants a client certificate signed by its client CA.
TEST_F(RegistryClientTest, ClientCertificateFromCertDirOrCertsD) {
  const RegistryRef ref = Ref("MTLS_HOST");
  {  // The CA alone: one line that says what is missing, at once (no retries).
    RegistryOptions o;
    o.cert_dir = env_["CERT_DIR"];
    o.default_cert_dirs = false;
    auto c = Client(ref, o);
    ASSERT_TRUE(c);
    auto start = std::chrono::steady_clock::now();
    Status s = c->Ping();
    ASSERT_FALSE(s);
    EXPECT_EQ(s.error().kind(), ErrorKind::kPolicy);
    EXPECT_NE(s.error().ToString().find("asks for a client certificate"), std::string::npos)
        << s.error().ToString();
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  }
  {  // --tls-verify=false: no fallback to plain http on a server that asked.
    RegistryOptions o;
    o.tls_verify = false;
    o.default_cert_dirs = false;
    auto c = Client(ref, o);
    ASSERT_TRUE(c);
    Status s = c->Ping();
    ASSERT_FALSE(s);
    EXPECT_NE(s.error().ToString().find("asks for a client certificate"), std::string::npos)
        << s.error().ToString();
  }
  {  // The pair: in, with and without verification.
    for (bool verify : {true, false}) {
      RegistryOptions o;
      o.cert_dir = env_["MTLS_CERT_DIR"];
      o.tls_verify = verify;
      auto c = Client(ref, o);
      ASSERT_TRUE(c);
      Status s = c->Ping();
      EXPECT_TRUE(s) << s.error().ToString();
      // A clone (a download worker) presents it too, on a connection of its
      // own: the registry answers (404: this instance holds no debian:test).
      auto clone = c->Clone();
      ASSERT_TRUE(clone);
      auto m = (*clone)->GetManifest();
      ASSERT_FALSE(m);
      EXPECT_NE(m.error().ToString().find("HTTP 404"), std::string::npos) << m.error().ToString();
    }
  }
  {  // A certificate the registry's client CA did not sign: one line naming it.
    const std::string d = dir_ + "/self-signed";
    std::filesystem::create_directories(d);
    std::filesystem::copy_file(env_["MTLS_CERT_DIR"] + "/ca.crt", d + "/ca.crt",
                               std::filesystem::copy_options::overwrite_existing);
    ASSERT_EQ(Sh("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " + d +
                 "/me.key 2>/dev/null && openssl req -new -x509 -key " + d +
                 "/me.key -subj /CN=stranger -days 2 -out " + d + "/me.cert 2>/dev/null"),
              0);
    for (bool verify : {true, false}) {  // not verifying: no fallback to plain http either
      RegistryOptions o;
      o.cert_dir = d;
      o.tls_verify = verify;
      auto c = Client(ref, o);
      ASSERT_TRUE(c);
      auto start = std::chrono::steady_clock::now();
      Status s = c->Ping();
      ASSERT_FALSE(s);
      EXPECT_EQ(s.error().kind(), ErrorKind::kPolicy) << s.error().ToString();
      EXPECT_NE(s.error().ToString().find("TLS with"), std::string::npos) << s.error().ToString();
      EXPECT_NE(s.error().ToString().find(d + "/me.cert"), std::string::npos)
          << s.error().ToString();
      EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
    }
  }
  {  // No --cert-dir: $HOME/.config/containers/certs.d/HOST:PORT, as skopeo reads it.
    const std::string home = dir_ + "/home-certs";
    const std::string d = home + "/.config/containers/certs.d/" + env_["MTLS_HOST"];
    std::filesystem::create_directories(d);
    for (const char* f : {"ca.crt", "client.cert", "client.key"}) {
      std::filesystem::copy_file(env_["MTLS_CERT_DIR"] + "/" + f, d + "/" + f,
                                 std::filesystem::copy_options::overwrite_existing);
    }
    const char* old = std::getenv("HOME");
    const std::string saved = old != nullptr ? old : "";
    ::setenv("HOME", home.c_str(), 1);
    auto c = RegistryClient::Create(ref, RegistryOptions{});
    RegistryOptions off;  // not verifying: only the missing client certificate can fail it
    off.tls_verify = false;
    off.default_cert_dirs = false;
    auto without = RegistryClient::Create(ref, off);
    if (old != nullptr) {
      ::setenv("HOME", saved.c_str(), 1);
    } else {
      ::unsetenv("HOME");
    }
    ASSERT_TRUE(c) << c.error().ToString();
    Status s = (*c)->Ping();
    EXPECT_TRUE(s) << s.error().ToString();
    ASSERT_TRUE(without);
    Status w = (*without)->Ping();
    ASSERT_FALSE(w) << "default_cert_dirs=false read certs.d";
    EXPECT_NE(w.error().ToString().find("asks for a client certificate"), std::string::npos)
        << w.error().ToString();
    // A certs.d dir this user cannot read is passed over, as skopeo passes it
    // over (root reads it anyway).
    ASSERT_EQ(::chmod(d.c_str(), 0), 0);
    ::setenv("HOME", home.c_str(), 1);
    RegistryOptions insecure;
    insecure.tls_verify = false;
    auto locked = RegistryClient::Create(ref, insecure);
    if (old != nullptr) {
      ::setenv("HOME", saved.c_str(), 1);
    } else {
      ::unsetenv("HOME");
    }
    ::chmod(d.c_str(), 0755);
    ASSERT_TRUE(locked) << locked.error().ToString();
    Status l = (*locked)->Ping();
    if (::geteuid() == 0) {
      EXPECT_TRUE(l) << l.error().ToString();
    } else {
      ASSERT_FALSE(l);
      EXPECT_NE(l.error().ToString().find("asks for a client certificate"), std::string::npos)
          << l.error().ToString();
    }
  }
}

// What the real registry cannot show without a token server: a fake one in
// python's stdlib (tests/registry/fake_bearer.py), plain http on 127.0.0.1.
class RegistryClientFakeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (access("/usr/bin/python3", X_OK) != 0) {
      skip_ = "/usr/bin/python3 is missing (the fake token server needs it)";
      return;
    }
    char tmpl[] = "/tmp/layerx-fake-registry-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    const std::string script = std::string(LAYERX_SOURCE_DIR) + "/tests/registry/fake_bearer.py";
    const std::string port_file = dir_ + "/port";
    const char* argv[] = {"/usr/bin/python3", script.c_str(), port_file.c_str(), nullptr};
    ASSERT_EQ(posix_spawn(&pid_, argv[0], nullptr, nullptr, const_cast<char**>(argv), environ), 0);
    for (int i = 0; i < 200 && access(port_file.c_str(), R_OK) != 0; ++i) usleep(50'000);
    host_ = "127.0.0.1:" + ReadFile(port_file);
    ASSERT_NE(host_, "127.0.0.1:") << "the fake registry did not start";
    big_ = ReadFile(port_file + ".blob");
    extractor::Sha256 sha;
    sha.Update(big_.data(), big_.size());
    big_digest_ = sha.Finish();
  }
  static void TearDownTestSuite() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      waitpid(pid_, nullptr, 0);
    }
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
  }
  static std::unique_ptr<RegistryClient> Client(const std::string& tail,
                                                std::optional<Credentials> creds) {
    auto ref = ParseRegistryRef("docker://" + host_ + "/" + tail);
    EXPECT_TRUE(ref) << ref.error().ToString();
    RegistryOptions o;
    o.tls_verify = false;
    o.credentials = std::move(creds);
    auto c = RegistryClient::Create(*ref, o);
    EXPECT_TRUE(c) << c.error().ToString();
    return c ? std::move(*c) : nullptr;
  }
  // Fast retries; the fake's user.
  static RegistryOptions Options() {
    RegistryOptions o;
    o.tls_verify = false;
    o.credentials = Credentials{"u", "p"};
    o.retry_backoff_ms = 5;
    return o;
  }
  static std::unique_ptr<RegistryClient> Client(const std::string& tail, RegistryOptions o) {
    auto ref = ParseRegistryRef("docker://" + host_ + "/" + tail);
    EXPECT_TRUE(ref) << ref.error().ToString();
    auto c = RegistryClient::Create(*ref, std::move(o));
    EXPECT_TRUE(c) << c.error().ToString();
    return c ? std::move(*c) : nullptr;
  }
  // The fake's log lines about repository `repo` ("blob REPO RANGE STATUS ...",
  // "token REPO"), without the repository.
  static std::vector<std::string> Log(const std::string& kind, const std::string& repo) {
    std::vector<std::string> out;
    std::istringstream in(ReadFile(dir_ + "/port.log"));
    const std::string prefix = kind + " " + repo;
    for (std::string line; std::getline(in, line);) {
      if (line == prefix) out.push_back("");
      if (line.starts_with(prefix + " ")) out.push_back(line.substr(prefix.size() + 1));
    }
    return out;
  }
  // A sink that keeps what it is given, and how often.
  struct Collect {
    std::string bytes;
    int calls = 0;
    std::function<Status(std::span<const char>)> Sink() {
      return [this](std::span<const char> b) -> Status {
        bytes.append(b.data(), b.size());
        ++calls;
        return {};
      };
    }
  };
  static void ExpectOneLine(const Error& e) {
    EXPECT_EQ(e.ToString().find('\n'), std::string::npos) << e.ToString();
    EXPECT_EQ(e.ToString().find("tok-"), std::string::npos) << e.ToString();
  }

  static inline std::string skip_, dir_, host_, big_, big_digest_;
  static inline pid_t pid_ = -1;
};

TEST_F(RegistryClientFakeTest, BearerTokenFromRealmWithBasicCreds) {
  auto client = Client("app:v1", Credentials{"u", "p"});
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
  EXPECT_EQ(client->scheme(), "http");
  EXPECT_EQ(m->media_type, "application/vnd.oci.image.manifest.v1+json");
  EXPECT_EQ(m->bytes.substr(0, 15), "{\"schemaVersion");
}

TEST_F(RegistryClientFakeTest, RejectsWrongPasswordAtTheTokenServer) {
  auto client = Client("app:v1", Credentials{"u", "wrong-pass-zz"});
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kPolicy);
  EXPECT_EQ(m.error().ToString().find("wrong-pass-zz"), std::string::npos);
  EXPECT_EQ(m.error().ToString().find('\n'), std::string::npos);
}

// An identity token (auth file `identitytoken`, helper "<token>") is traded at
// the realm with the OAuth2 refresh-token grant: a form POST, no Basic header.
TEST_F(RegistryClientFakeTest, IdentityTokenIsTradedForABearerToken) {
  auto client = Client("app:v1", Credentials{.identity_token = "rt-good+/="});
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
  EXPECT_EQ(m->bytes.substr(0, 15), "{\"schemaVersion");
  EXPECT_EQ(Log("refresh", "app").size(), 1u);
}

TEST_F(RegistryClientFakeTest, RejectedOrRedirectedIdentityTokenIsOneLine) {
  for (const char* token : {"rt-wrong-zz", "rt-redirect"}) {
    auto client = Client("app:v1", Credentials{.identity_token = token});
    ASSERT_TRUE(client);
    auto m = client->GetManifest();
    ASSERT_FALSE(m) << token;
    EXPECT_EQ(m.error().kind(), ErrorKind::kPolicy) << m.error().ToString();
    const std::string e = m.error().ToString();
    EXPECT_NE(e.find("identity token"), std::string::npos) << e;
    EXPECT_EQ(e.find(token), std::string::npos) << e;
    ExpectOneLine(m.error());
    if (std::string(token) == "rt-wrong-zz") {
      EXPECT_NE(e.find("(invalid_grant)"), std::string::npos) << "the server's code: " << e;
    }
  }
  // SECURITY: the body of a POST is not held back by curl as credentials are:
  // the redirect was not followed.
  EXPECT_TRUE(Log("leaked", "token").empty());
}

TEST_F(RegistryClientFakeTest, RejectsAnonymousWhenTheTokenServerDoes) {
  auto client = Client("app:v1", std::nullopt);
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kPolicy);
}

// The blob redirects to "localhost" (another host to curl); the data answers 400
// if the token followed it there.
TEST_F(RegistryClientFakeTest, RedirectToAnotherHostCarriesNoToken) {
  auto client = Client("app:v1", Credentials{"u", "p"});
  ASSERT_TRUE(client);
  extractor::Sha256 sha;
  sha.Update("hello\n", 6);
  const std::string digest = sha.Finish();
  std::string got;
  auto n = client->GetBlob(digest, 6, [&](std::span<const char> b) -> Status {
    got.append(b.data(), b.size());
    return {};
  });
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_EQ(got, "hello\n");
}

TEST_F(RegistryClientFakeTest, RejectsRedirectLoop) {
  auto client = Client("loop:x", Credentials{"u", "p"});
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kInvalidInput) << m.error().ToString();
}

TEST_F(RegistryClientFakeTest, RejectsSchema1InOneLine) {
  auto client = Client("old:v1", Credentials{"u", "p"});
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kPolicy) << m.error().ToString();
  EXPECT_NE(m.error().ToString().find("schema 1"), std::string::npos) << m.error().ToString();
}

TEST_F(RegistryClientFakeTest, RejectsManifestOver4MiB) {
  auto client = Client("big:x", Credentials{"u", "p"});
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kLimitExceeded) << m.error().ToString();
}

// A blob that stalls after one byte fails on the low-speed clock, and is not retried.
TEST_F(RegistryClientFakeTest, StalledBlobHitsTheLowSpeedTimeout) {
  auto ref = ParseRegistryRef("docker://" + host_ + "/slow:x");
  ASSERT_TRUE(ref);
  RegistryOptions o;
  o.tls_verify = false;
  o.credentials = Credentials{"u", "p"};
  o.low_speed_seconds = 1;
  auto client = RegistryClient::Create(*ref, o);
  ASSERT_TRUE(client);
  const auto start = std::chrono::steady_clock::now();
  auto n = (*client)->GetBlob("sha256:" + std::string(64, 'a'), 100,
                              [](std::span<const char>) -> Status { return {}; });
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().kind(), ErrorKind::kOs) << n.error().ToString();
  ExpectOneLine(n.error());
  EXPECT_EQ(n.error().ToString().find("retries"), std::string::npos) << n.error().ToString();
  EXPECT_LT(took, std::chrono::seconds(10));
}

// Cut three times after 100000 bytes: resumed from 100000, 200000, 300000.
TEST_F(RegistryClientFakeTest, ResumesDroppedBlobWithRangeRequests) {
  auto client = Client("drop-3-100000", Options());
  ASSERT_TRUE(client);
  Collect got;
  std::vector<std::string> lines;
  LogTarget target(
      [&](spdlog::level::level_enum level, std::string_view component, std::string_view line) {
        EXPECT_EQ(level, spdlog::level::info);
        EXPECT_EQ(component, "broker");
        lines.emplace_back(line);
      },
      spdlog::level::info);
  auto n = client->GetBlob(big_digest_, big_.size(), got.Sink());
  ASSERT_TRUE(n) << n.error().ToString();
  // One line per retry, naming the blob and where it resumes; no token.
  ASSERT_EQ(lines.size(), 3u);
  for (size_t i = 0; i < lines.size(); ++i) {
    EXPECT_NE(lines[i].find("blob " + big_digest_), std::string::npos) << lines[i];
    EXPECT_NE(lines[i].find(fmt::format("offset={}", (i + 1) * 100000)), std::string::npos)
        << lines[i];
    EXPECT_EQ(lines[i].find("tok-"), std::string::npos) << lines[i];
  }
  EXPECT_EQ(*n, big_.size());
  EXPECT_TRUE(got.bytes == big_) << got.bytes.size() << " bytes";
  EXPECT_EQ(Log("blob", "drop-3-100000"),
            (std::vector<std::string>{"- 200 dropped", "bytes=100000- 206 dropped",
                                      "bytes=200000- 206 dropped", "bytes=300000- 206"}));
}

// A storage backend behind a redirect: each retry asks the registry again.
TEST_F(RegistryClientFakeTest, ResumesThroughARedirect) {
  auto client = Client("redir-drop-2-50000", Options());
  ASSERT_TRUE(client);
  Collect got;
  auto n = client->GetBlob(big_digest_, big_.size(), got.Sink());
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_TRUE(got.bytes == big_);
  EXPECT_EQ(
      Log("blob", "redir-drop-2-50000"),
      (std::vector<std::string>{"- 200 dropped", "bytes=50000- 206 dropped", "bytes=100000- 206"}));
}

// The server ignores Range: each answer is the whole blob, whose first bytes the
// sink has seen already and does not see again.
TEST_F(RegistryClientFakeTest, RestartsWhenTheRangeIsIgnored) {
  auto client = Client("norange-2-100000", Options());
  ASSERT_TRUE(client);
  Collect got;
  auto n = client->GetBlob(big_digest_, big_.size(), got.Sink());
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_TRUE(got.bytes == big_) << got.bytes.size() << " bytes";
  EXPECT_EQ(Log("blob", "norange-2-100000"),
            (std::vector<std::string>{"- 200 dropped", "bytes=100000- 200 dropped",
                                      "bytes=100000- 200"}));
}

// A 206 starting elsewhere than asked would splice the wrong bytes in.
TEST_F(RegistryClientFakeTest, RejectsContentRangeNotWhereItStopped) {
  auto client = Client("badrange-1-100000", Options());
  ASSERT_TRUE(client);
  Collect got;
  auto n = client->GetBlob(big_digest_, big_.size(), got.Sink());
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().kind(), ErrorKind::kInvalidInput) << n.error().ToString();
  ExpectOneLine(n.error());
  EXPECT_TRUE(got.bytes == big_.substr(0, 100000)) << got.bytes.size() << " bytes";
}

TEST_F(RegistryClientFakeTest, RetriesA503) {
  auto client = Client("e503-2-0", Options());
  ASSERT_TRUE(client);
  Collect got;
  auto n = client->GetBlob(big_digest_, big_.size(), got.Sink());
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_TRUE(got.bytes == big_);
  EXPECT_EQ(Log("blob", "e503-2-0"), (std::vector<std::string>{"- 503", "- 503", "- 200"}));
}

TEST_F(RegistryClientFakeTest, RetriesAManifestWhole) {
  for (const char* repo : {"drop-2-10-m", "e503-2-0-m"}) {
    auto client = Client(std::string(repo) + ":v1", Options());
    ASSERT_TRUE(client);
    auto m = client->GetManifest();
    ASSERT_TRUE(m) << repo << ": " << m.error().ToString();
    EXPECT_EQ(m->bytes.substr(0, 15), "{\"schemaVersion") << repo;
    EXPECT_EQ(Log("manifest", repo).size(), std::string(repo).starts_with("drop") ? 3u : 1u)
        << repo;
  }
}

TEST_F(RegistryClientFakeTest, GivesUpAfterItsRetriesInOneLine) {
  auto client = Client("drop-100-1000-giveup", Options());
  ASSERT_TRUE(client);
  Collect got;
  auto n = client->GetBlob(big_digest_, big_.size(), got.Sink());
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().kind(), ErrorKind::kOs) << n.error().ToString();
  ExpectOneLine(n.error());
  EXPECT_NE(n.error().ToString().find("blob " + big_digest_), std::string::npos)
      << n.error().ToString();
  EXPECT_TRUE(n.error().ToString().ends_with(" (after 5 retries)")) << n.error().ToString();
  EXPECT_EQ(Log("blob", "drop-100-1000-giveup").size(), 6u);
  EXPECT_TRUE(got.bytes == big_.substr(0, 6000)) << got.bytes.size() << " bytes";
}

TEST_F(RegistryClientFakeTest, NoRetriesWhenTheyAreOff) {
  RegistryOptions o = Options();
  o.blob_retries = 0;
  auto client = Client("drop-100-1000-none", o);
  ASSERT_TRUE(client);
  auto n = client->GetBlob(big_digest_, big_.size(), Collect().Sink());
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().kind(), ErrorKind::kOs) << n.error().ToString();
  EXPECT_EQ(n.error().ToString().find("retries"), std::string::npos) << n.error().ToString();
  EXPECT_EQ(Log("blob", "drop-100-1000-none").size(), 1u);
}

// verify_digest=false: a caller that checks the digest downstream; the size is
// still enforced.
TEST_F(RegistryClientFakeTest, VerifyDigestFalseSkipsTheDigestNotTheSize) {
  auto client = Client("drop-1-1000-verify", Options());
  ASSERT_TRUE(client);
  const std::string wrong = "sha256:" + std::string(64, 'b');
  auto checked = client->GetBlob(wrong, big_.size(), Collect().Sink());
  ASSERT_FALSE(checked);
  EXPECT_EQ(checked.error().kind(), ErrorKind::kIntegrity) << checked.error().ToString();
  Collect got;
  auto unchecked = client->GetBlob(wrong, big_.size(), got.Sink(), {.verify_digest = false});
  ASSERT_TRUE(unchecked) << unchecked.error().ToString();
  EXPECT_TRUE(got.bytes == big_);
  auto over = client->GetBlob(wrong, big_.size() - 1, Collect().Sink(), {.verify_digest = false});
  ASSERT_FALSE(over);
  EXPECT_EQ(over.error().kind(), ErrorKind::kLimitExceeded) << over.error().ToString();
  auto under = client->GetBlob(wrong, big_.size() + 1, Collect().Sink(), {.verify_digest = false});
  ASSERT_FALSE(under);
  EXPECT_EQ(under.error().kind(), ErrorKind::kIntegrity) << under.error().ToString();
}

// Sets `flag` after `delay`; the time it did so in `at`.
std::thread CancelLater(std::atomic<bool>& flag, std::chrono::milliseconds delay,
                        std::chrono::steady_clock::time_point& at) {
  return std::thread([&flag, delay, &at] {
    std::this_thread::sleep_for(delay);
    at = std::chrono::steady_clock::now();
    flag = true;
  });
}

TEST_F(RegistryClientFakeTest, CancelStopsAStalledTransferWithinASecond) {
  std::atomic<bool> cancel{false};
  RegistryOptions o = Options();
  o.cancel = &cancel;
  auto client = Client("slow:x", o);
  ASSERT_TRUE(client);
  ASSERT_TRUE(client->Ping());
  std::chrono::steady_clock::time_point at;
  std::thread t = CancelLater(cancel, std::chrono::milliseconds(300), at);
  auto n = client->GetBlob("sha256:" + std::string(64, 'a'), 100, Collect().Sink());
  const auto done = std::chrono::steady_clock::now();
  t.join();
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().kind(), ErrorKind::kCancelled) << n.error().ToString();
  EXPECT_LT(done - at, std::chrono::seconds(1));
}

TEST_F(RegistryClientFakeTest, CancelStopsTheWaitBetweenRetries) {
  std::atomic<bool> cancel{false};
  RegistryOptions o = Options();
  o.cancel = &cancel;
  o.retry_backoff_ms = 60'000;
  auto client = Client("drop-100-1000-cancel", o);
  ASSERT_TRUE(client);
  ASSERT_TRUE(client->Ping());
  std::chrono::steady_clock::time_point at;
  std::thread t = CancelLater(cancel, std::chrono::milliseconds(300), at);
  auto n = client->GetBlob(big_digest_, big_.size(), Collect().Sink());
  const auto done = std::chrono::steady_clock::now();
  t.join();
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().kind(), ErrorKind::kCancelled) << n.error().ToString();
  EXPECT_LT(done - at, std::chrono::seconds(1));
  EXPECT_EQ(Log("blob", "drop-100-1000-cancel").size(), 1u);
}

// A sink that blocks (a full spool) for longer than low_speed_seconds is not a
// stalled transfer.
TEST_F(RegistryClientFakeTest, BlockingSinkDoesNotTripTheLowSpeedClock) {
  RegistryOptions o = Options();
  o.low_speed_seconds = 1;
  auto client = Client("drop-0-0-sleep", o);
  ASSERT_TRUE(client);
  Collect got;
  auto n = client->GetBlob(big_digest_, big_.size(), [&](std::span<const char> b) -> Status {
    if (got.calls == 0) std::this_thread::sleep_for(std::chrono::seconds(3));
    return got.Sink()(b);
  });
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_TRUE(got.bytes == big_);
}

// Each expire* token is good for one request: the blob after the manifest gets
// 401, and one new token.
TEST_F(RegistryClientFakeTest, RenewsAnExpiredToken) {
  auto client = Client("expire-a:v1", Options());
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
  EXPECT_EQ(Log("token", "expire-a").size(), 1u);
  Collect got;
  auto n = client->GetBlob(big_digest_, big_.size(), got.Sink());
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_TRUE(got.bytes == big_);
  EXPECT_EQ(Log("token", "expire-a").size(), 2u);
  m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
  EXPECT_EQ(Log("token", "expire-a").size(), 3u);
}

// The same with an identity token: each renewal is one more exchange.
TEST_F(RegistryClientFakeTest, RenewsAnExpiredTokenWithTheIdentityToken) {
  RegistryOptions o = Options();
  o.credentials = Credentials{.identity_token = "rt-good+/="};
  auto client = Client("expire-idt:v1", o);
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_TRUE(m) << m.error().ToString();
  Collect got;
  auto n = client->GetBlob(big_digest_, big_.size(), got.Sink());
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_TRUE(got.bytes == big_);
  EXPECT_EQ(Log("refresh", "expire-idt").size(), 2u);
  EXPECT_TRUE(Log("token", "expire-idt").empty()) << "no Basic GET of a token";
}

// One new token, not more: a second 401 is the error.
TEST_F(RegistryClientFakeTest, RenewsATokenOnlyOnce) {
  auto client = Client("deny-a:v1", Options());
  ASSERT_TRUE(client);
  auto m = client->GetManifest();
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().kind(), ErrorKind::kPolicy) << m.error().ToString();
  ExpectOneLine(m.error());
  EXPECT_NE(m.error().ToString().find("unauthorized"), std::string::npos) << m.error().ToString();
  EXPECT_EQ(Log("token", "deny-a").size(), 2u);
}

// Clones, each in its own thread, share one authentication: one token for all.
TEST_F(RegistryClientFakeTest, ClonesFetchInParallelWithOneToken) {
  auto client = Client("drop-1-200000-clone", Options());
  ASSERT_TRUE(client);
  std::vector<std::unique_ptr<RegistryClient>> clones;
  for (int i = 0; i < 3; ++i) {
    auto c = client->Clone();
    ASSERT_TRUE(c) << c.error().ToString();
    clones.push_back(std::move(*c));
  }
  std::vector<Collect> got(clones.size());
  std::vector<Result<uint64_t>> results(clones.size(), 0);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < clones.size(); ++i) {
    threads.emplace_back(
        [&, i] { results[i] = clones[i]->GetBlob(big_digest_, big_.size(), got[i].Sink()); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < clones.size(); ++i) {
    ASSERT_TRUE(results[i]) << results[i].error().ToString();
    EXPECT_TRUE(got[i].bytes == big_) << i;
    EXPECT_EQ(clones[i]->scheme(), "http");
  }
  EXPECT_EQ(Log("token", "drop-1-200000-clone").size(), 1u);
  // The original learned it too, without asking.
  Collect more;
  auto n = client->GetBlob(big_digest_, big_.size(), more.Sink());
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_EQ(Log("token", "drop-1-200000-clone").size(), 1u);
}

}  // namespace
}  // namespace layerx::broker
