// Registry credentials from --creds and the auth files skopeo reads
// (broker/registry_auth.cc). Each test writes its files into a temp dir.
#include "broker/source/registry_auth.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>

namespace layerx::broker {
namespace {

// base64("alice:s3cret:x") and base64("bob:pw"), written by hand once and
// checked by the decoder test below against the plain text.
constexpr char kAliceAuth[] = "YWxpY2U6czNjcmV0Ong=";
constexpr char kBobAuth[] = "Ym9iOnB3";

class RegistryAuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerx-auth-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    for (const char* v : {"REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "HOME",
                          "PATH", "DOCKER_CONFIG"}) {
      const char* old = getenv(v);
      saved_.emplace_back(v, old ? std::optional<std::string>(old) : std::nullopt);
    }
    unsetenv("DOCKER_CONFIG");  // a CI runner's would change the paths
  }
  void TearDown() override {
    for (auto& [name, value] : saved_) {
      if (value) {
        setenv(name.c_str(), value->c_str(), 1);
      } else {
        unsetenv(name.c_str());
      }
    }
    std::filesystem::permissions(dir_, std::filesystem::perms::owner_all);
    std::error_code ec;
    for (auto& p : std::filesystem::recursive_directory_iterator(dir_, ec)) {
      std::filesystem::permissions(p.path(), std::filesystem::perms::owner_all, ec);
    }
    std::filesystem::remove_all(dir_);
  }
  std::string Write(const std::string& rel, const std::string& text) {
    std::string path = dir_ + "/" + rel;
    std::filesystem::create_directories(std::filesystem::path(path).parent_path());
    std::ofstream(path) << text;
    return path;
  }
  static std::string Auths(const std::string& key, const std::string& auth) {
    return R"({"auths":{")" + key + R"(":{"auth":")" + auth + R"("}}})";
  }

  // A credential helper docker-credential-NAME in dir_/bin (put first in
  // PATH) running `body` (sh); each call's argv and stdin go to dir_/helper.log.
  void Helper(const std::string& name, const std::string& body) {
    std::string path =
        Write("bin/docker-credential-" + name, "#!/bin/sh\nread server\necho \"$* $server\" >>" +
                                                   dir_ + "/helper.log\n" + body + "\n");
    ::chmod(path.c_str(), 0755);
    const char* old = getenv("PATH");
    std::string p = dir_ + "/bin:" + (old != nullptr ? old : "/usr/bin:/bin");
    if (!std::string(old != nullptr ? old : "").starts_with(dir_ + "/bin:")) {
      setenv("PATH", p.c_str(), 1);
    }
  }
  std::string Log() {
    std::ifstream in(dir_ + "/helper.log");
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  std::string dir_;
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

TEST_F(RegistryAuthTest, CredsFlagWinsOverFiles) {
  std::string f = Write("a.json", Auths("quay.io", kBobAuth));
  auto c = FindCredentials("quay.io", std::string("alice:pw:with:colons"), {f});
  ASSERT_TRUE(c) << c.error().ToString();
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->username, "alice");
  EXPECT_EQ((*c)->password, "pw:with:colons");
}

TEST_F(RegistryAuthTest, RejectsCredsWithoutColonOrUser) {
  for (const char* bad : {"alice", ":pw", ""}) {
    auto c = FindCredentials("quay.io", std::string(bad), {});
    ASSERT_FALSE(c) << bad;
    EXPECT_EQ(c.error().kind(), ErrorKind::kPolicy);
  }
}

TEST_F(RegistryAuthTest, DecodesAuthWithOpenSsl) {
  std::string f = Write("a.json", Auths("quay.io", kAliceAuth));
  auto c = FindCredentials("quay.io", std::nullopt, {f});
  ASSERT_TRUE(c) << c.error().ToString();
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->username, "alice");
  EXPECT_EQ((*c)->password, "s3cret:x");
}

TEST_F(RegistryAuthTest, FirstFileWithAnEntryWins) {
  std::string none = Write("none.json", R"({"auths":{"other.io":{"auth":"Ym9iOnB3"}}})");
  std::string first = Write("first.json", Auths("127.0.0.1:5000", kBobAuth));
  std::string second = Write("second.json", Auths("127.0.0.1:5000", kAliceAuth));
  auto c = FindCredentials("127.0.0.1:5000", std::nullopt, {none, first, second});
  ASSERT_TRUE(c) << c.error().ToString();
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->username, "bob");
}

TEST_F(RegistryAuthTest, PortIsPartOfTheKey) {
  std::string f = Write("a.json", Auths("127.0.0.1:5000", kBobAuth));
  auto c = FindCredentials("127.0.0.1:5001", std::nullopt, {f});
  ASSERT_TRUE(c);
  EXPECT_FALSE(c->has_value());
}

TEST_F(RegistryAuthTest, MatchesUrlKeys) {
  std::string f = Write("a.json", Auths("https://quay.io/v1/", kBobAuth));
  auto c = FindCredentials("quay.io", std::nullopt, {f});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->username, "bob");
}

TEST_F(RegistryAuthTest, DockerHubV1KeyServesDockerIo) {
  std::string f = Write("home/.docker/config.json", Auths("https://index.docker.io/v1/", kBobAuth));
  auto c = FindCredentials("docker.io", std::nullopt, {f});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->username, "bob");
}

TEST_F(RegistryAuthTest, NoEntryMeansAnonymous) {
  std::string f = Write("a.json", R"({"auths":{}})");
  std::string g = Write("b.json", R"({"credHelpers":{"other.io":"x"}})");  // not run
  auto c = FindCredentials("quay.io", std::nullopt, {f, g, dir_ + "/missing.json"});
  ASSERT_TRUE(c) << c.error().ToString();
  EXPECT_FALSE(c->has_value());
}

TEST_F(RegistryAuthTest, SkipsUnreadableAndNonRegularFiles) {
  std::string unreadable = Write("unreadable.json", Auths("quay.io", kAliceAuth));
  chmod(unreadable.c_str(), 0);
  std::string fifo = dir_ + "/fifo.json";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  std::string subdir = dir_ + "/dir.json";
  ASSERT_EQ(mkdir(subdir.c_str(), 0700), 0);
  std::string good = Write("good.json", Auths("quay.io", kBobAuth));
  auto c = FindCredentials("quay.io", std::nullopt, {fifo, subdir, unreadable, good});
  ASSERT_TRUE(c) << c.error().ToString();
  ASSERT_TRUE(c->has_value());
  // Root reads a mode-0 file; others skip it. Either way the fifo did not block.
  EXPECT_EQ((*c)->username, geteuid() == 0 ? "alice" : "bob");
}

TEST_F(RegistryAuthTest, RejectsMalformedJsonWithoutQuotingIt) {
  std::string f = Write("a.json", R"({"auths":{"quay.io":{"auth":"c2VjcmV0LXZhbHVl" oops)");
  auto c = FindCredentials("quay.io", std::nullopt, {f});
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().kind(), ErrorKind::kPolicy);
  EXPECT_EQ(c.error().ToString().find("c2VjcmV0"), std::string::npos) << c.error().ToString();
}

TEST_F(RegistryAuthTest, RejectsBadBase64WithoutQuotingIt) {
  // Not base64; base64 without a colon ("secretvalue"); a missing user ("":pw).
  for (const char* bad : {"s3cr%t!!", "c2VjcmV0dmFsdWU=", "OnB3"}) {
    std::string f = Write("a.json", Auths("quay.io", bad));
    auto c = FindCredentials("quay.io", std::nullopt, {f});
    ASSERT_FALSE(c) << bad;
    EXPECT_EQ(c.error().kind(), ErrorKind::kPolicy);
    std::string msg = c.error().ToString();
    EXPECT_EQ(msg.find(bad), std::string::npos) << msg;
    EXPECT_EQ(msg.find("secretvalue"), std::string::npos) << msg;
  }
}

TEST_F(RegistryAuthTest, RegistryAuthFileIsTheOnlyFileWhenSet) {
  setenv("REGISTRY_AUTH_FILE", (dir_ + "/given.json").c_str(), 1);
  setenv("HOME", (dir_ + "/home").c_str(), 1);
  EXPECT_EQ(AuthFilePaths(), std::vector<std::string>{dir_ + "/given.json"});
}

TEST_F(RegistryAuthTest, AuthFilePathsInSkopeoOrder) {
  unsetenv("REGISTRY_AUTH_FILE");
  setenv("XDG_RUNTIME_DIR", (dir_ + "/run").c_str(), 1);
  unsetenv("XDG_CONFIG_HOME");
  setenv("HOME", (dir_ + "/home").c_str(), 1);
  std::vector<std::string> want = {dir_ + "/run/containers/auth.json",
                                   dir_ + "/home/.config/containers/auth.json",
                                   dir_ + "/home/.docker/config.json", dir_ + "/home/.dockercfg"};
  EXPECT_EQ(AuthFilePaths(), want);
  setenv("XDG_CONFIG_HOME", (dir_ + "/cfg").c_str(), 1);
  unsetenv("XDG_RUNTIME_DIR");
  want = {"/run/containers/" + std::to_string(getuid()) + "/auth.json",
          dir_ + "/cfg/containers/auth.json", dir_ + "/home/.docker/config.json",
          dir_ + "/home/.dockercfg"};
  EXPECT_EQ(AuthFilePaths(), want);
  // $DOCKER_CONFIG names the dir of Docker's config.json, instead of ~/.docker.
  setenv("DOCKER_CONFIG", (dir_ + "/ci-docker").c_str(), 1);
  want[2] = dir_ + "/ci-docker/config.json";
  EXPECT_EQ(AuthFilePaths(), want);
}

TEST_F(RegistryAuthTest, DockerConfigDirAndLegacyDockercfg) {
  unsetenv("REGISTRY_AUTH_FILE");
  setenv("XDG_RUNTIME_DIR", (dir_ + "/run").c_str(), 1);
  unsetenv("XDG_CONFIG_HOME");
  setenv("HOME", (dir_ + "/home").c_str(), 1);
  // ~/.dockercfg: the registries at the top, no "auths" around them.
  Write("home/.dockercfg", std::string(R"({"https://index.docker.io/v1/":{"auth":")") + kBobAuth +
                               R"(","email":"bob@example.com"},)" + R"("credHelpers":{"auth":")" +
                               kAliceAuth + R"("}})");
  auto c = FindCredentials("docker.io", std::nullopt, AuthFilePaths(), "library/debian");
  ASSERT_TRUE(c) << c.error().ToString();
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->username, "bob");
  // A registry key named "credHelpers" there is a registry, never a helper list.
  c = FindCredentials("quay.io", std::nullopt, AuthFilePaths());
  ASSERT_TRUE(c) << c.error().ToString();
  EXPECT_FALSE(c->has_value());
  // Nor is a modern file read as legacy, or the reverse.
  Write("home/.dockercfg", Auths("quay.io", kBobAuth));
  c = FindCredentials("quay.io", std::nullopt, AuthFilePaths());
  ASSERT_TRUE(c) << c.error().ToString();
  EXPECT_FALSE(c->has_value());
  // Docker's config.json before the legacy file; with $DOCKER_CONFIG, from there
  // and not from ~/.docker.
  Write("home/.dockercfg", std::string(R"({"quay.io":{"auth":")") + kBobAuth + R"("}})");
  Write("home/.docker/config.json", Auths("quay.io", kAliceAuth));
  c = FindCredentials("quay.io", std::nullopt, AuthFilePaths());
  ASSERT_TRUE(c && c->has_value());
  EXPECT_EQ((*c)->username, "alice");
  setenv("DOCKER_CONFIG", (dir_ + "/ci-docker").c_str(), 1);
  c = FindCredentials("quay.io", std::nullopt, AuthFilePaths());
  ASSERT_TRUE(c && c->has_value());
  EXPECT_EQ((*c)->username, "bob");
  Write("ci-docker/config.json", Auths("quay.io", kAliceAuth));
  c = FindCredentials("quay.io", std::nullopt, AuthFilePaths());
  ASSERT_TRUE(c && c->has_value());
  EXPECT_EQ((*c)->username, "alice");
}

TEST_F(RegistryAuthTest, FindsDockerConfigThroughTheEnvironment) {
  unsetenv("REGISTRY_AUTH_FILE");
  setenv("XDG_RUNTIME_DIR", (dir_ + "/run").c_str(), 1);
  unsetenv("XDG_CONFIG_HOME");
  setenv("HOME", (dir_ + "/home").c_str(), 1);
  Write("home/.docker/config.json", Auths("quay.io", kBobAuth));
  auto c = FindCredentials("quay.io", std::nullopt, AuthFilePaths());
  ASSERT_TRUE(c) << c.error().ToString();
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->username, "bob");
  Write("run/containers/auth.json", Auths("quay.io", kAliceAuth));
  c = FindCredentials("quay.io", std::nullopt, AuthFilePaths());
  ASSERT_TRUE(c && c->has_value());
  EXPECT_EQ((*c)->username, "alice");
}

// credHelpers: the helper is asked first (docker-credential-NAME get, the
// registry on stdin), before the same file's auths; "credentials not found"
// goes on to the next file.
TEST_F(RegistryAuthTest, CredentialHelperIsAskedFirst) {
  Helper("lxtest", R"(case $server in
  quay.io) printf '{"ServerURL":"quay.io","Username":"helper-user","Secret":"helper-s3cret"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac)");
  std::string f = Write("a.json", R"({"credHelpers":{"quay.io":"lxtest","other.io":"lxtest"},)"
                                  R"("auths":{"quay.io":{"auth":")" +
                                      std::string(kBobAuth) + R"("}}})");
  std::string g = Write("b.json", Auths("other.io", kAliceAuth));
  auto c = FindCredentials("quay.io", std::nullopt, {f, g});
  ASSERT_TRUE(c) << c.error().ToString();
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->username, "helper-user");
  EXPECT_EQ((*c)->password, "helper-s3cret");
  EXPECT_EQ(Log(), "get quay.io\n");
  // Not found by the helper: the next file's entry.
  c = FindCredentials("other.io", std::nullopt, {f, g});
  ASSERT_TRUE(c && c->has_value()) << (c ? "none" : c.error().ToString());
  EXPECT_EQ((*c)->username, "alice");
  EXPECT_EQ(Log(), "get quay.io\nget other.io\n");
  // No helper for this registry: the helper is not run.
  c = FindCredentials("third.io", std::nullopt, {f, g});
  ASSERT_TRUE(c);
  EXPECT_FALSE(c->has_value());
  EXPECT_EQ(Log(), "get quay.io\nget other.io\n");
}

TEST_F(RegistryAuthTest, FailingCredentialHelperIsOneClearLine) {
  Helper("fails", "echo 'no session: run login first'; exit 3");
  // What a failing helper printed is never quoted: it may be credentials.
  Helper("leaks", R"(printf '{"Username":"u","Secret":"printed-s3cret"}'; exit 1)");
  Helper("garbage", "echo 'Username=me Secret=leaked-s3cret'");
  struct Case {
    const char* helper;
    const char* needle;
  } cases[] = {{"nosuch", "docker-credential-nosuch: not found in $PATH"},
               {"fails", "docker-credential-fails: exit 3"},
               {"leaks", "docker-credential-leaks: exit 1"},
               {"garbage", "not JSON with \"Username\" and \"Secret\""},
               {"../../bin/sh", "not a helper name"}};
  for (const Case& k : cases) {
    std::string f = Write(std::string("h-") + (k.helper[0] == '.' ? "dots" : k.helper) + ".json",
                          R"({"credHelpers":{"quay.io":")" + std::string(k.helper) + R"("}})");
    auto c = FindCredentials("quay.io", std::nullopt, {f});
    ASSERT_FALSE(c) << k.helper;
    EXPECT_EQ(c.error().kind(), ErrorKind::kPolicy);
    const std::string e = c.error().ToString();
    EXPECT_NE(e.find(k.needle), std::string::npos) << e;
    EXPECT_NE(e.find(f), std::string::npos) << "names the file: " << e;
    for (const char* secret : {"leaked-s3cret", "printed-s3cret", "no session"}) {
      EXPECT_EQ(e.find(secret), std::string::npos) << e;
    }
  }
}

// auth.json keys naming a repository or a namespace match exactly, the most
// specific first (podman login quay.io/org writes them); not in
// ~/.docker/config.json.
// registries.conf's credential-helpers: each asked in turn, the auth files
// where "containers-auth.json" stands; "not found" and a failure both give way
// to the next; the first failure is the error when nothing is found.
TEST_F(RegistryAuthTest, RegistriesConfHelpersInTheirOrder) {
  Helper("lxfirst", R"(case $server in
  first.io) printf '{"ServerURL":"first.io","Username":"first-user","Secret":"s1"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac)");
  Helper("lxbroken", "echo 'no session'; exit 4");
  std::string f = Write("a.json", Auths("file.io", kAliceAuth));
  const std::vector<std::string> helpers = {"lxfirst", kAuthFilesHelper, "lxbroken"};
  auto c = FindCredentials("first.io", std::nullopt, {f}, "", helpers);
  ASSERT_TRUE(c && c->has_value()) << (c ? "none" : c.error().ToString());
  EXPECT_EQ((*c)->username, "first-user");
  EXPECT_EQ(Log(), "get first.io\n");
  // Not the first helper's: the auth file's entry, the broken helper not run.
  c = FindCredentials("file.io", std::nullopt, {f}, "", helpers);
  ASSERT_TRUE(c && c->has_value()) << (c ? "none" : c.error().ToString());
  EXPECT_EQ((*c)->username, "alice");
  EXPECT_EQ(Log(), "get first.io\nget file.io\n");
  // Nobody has it, and one helper failed: that failure, in one line.
  c = FindCredentials("none.io", std::nullopt, {f}, "", helpers);
  ASSERT_FALSE(c);
  EXPECT_NE(c.error().ToString().find("registries.conf credential-helpers: credential helper "
                                      "docker-credential-lxbroken: exit 4"),
            std::string::npos)
      << c.error().ToString();
  // A failure first, then a helper that has them: they win.
  c = FindCredentials("first.io", std::nullopt, {f}, "", {"lxbroken", "lxfirst"});
  ASSERT_TRUE(c && c->has_value()) << (c ? "none" : c.error().ToString());
  EXPECT_EQ((*c)->username, "first-user");
  // Without "containers-auth.json" the auth files are not read at all.
  c = FindCredentials("file.io", std::nullopt, {f}, "", {"lxfirst"});
  ASSERT_TRUE(c);
  EXPECT_FALSE(c->has_value());
  // --creds still comes first.
  c = FindCredentials("first.io", std::string("u:p"), {f}, "", helpers);
  ASSERT_TRUE(c && c->has_value());
  EXPECT_EQ((*c)->username, "u");
}

TEST_F(RegistryAuthTest, RepositoryAndNamespaceKeys) {
  std::string f =
      Write("auth.json", R"({"auths":{"quay.io/org/app":{"auth":")" + std::string(kAliceAuth) +
                             R"("},"quay.io/org":{"auth":")" + std::string(kBobAuth) + R"("}}})");
  auto c = FindCredentials("quay.io", std::nullopt, {f}, "org/app");
  ASSERT_TRUE(c && c->has_value());
  EXPECT_EQ((*c)->username, "alice");
  c = FindCredentials("quay.io", std::nullopt, {f}, "org/other/deep");
  ASSERT_TRUE(c && c->has_value());
  EXPECT_EQ((*c)->username, "bob");
  c = FindCredentials("quay.io", std::nullopt, {f}, "elsewhere/app");
  ASSERT_TRUE(c);
  EXPECT_FALSE(c->has_value());
  // skopeo reads them in ~/.docker/config.json too, and there as well a
  // namespace key never stands for the whole registry.
  std::string d = Write("home/.docker/config.json",
                        R"({"auths":{"quay.io/org":{"auth":")" + std::string(kBobAuth) + R"("}}})");
  c = FindCredentials("quay.io", std::nullopt, {d}, "org/app");
  ASSERT_TRUE(c && c->has_value());
  EXPECT_EQ((*c)->username, "bob");
  c = FindCredentials("quay.io", std::nullopt, {d}, "elsewhere/app");
  ASSERT_TRUE(c);
  EXPECT_FALSE(c->has_value()) << "quay.io/org's credentials sent for quay.io/elsewhere";
}

// A helper that fails ends the search, as in skopeo: a later file may hold
// another identity, which must not be used in its place.
TEST_F(RegistryAuthTest, FailingHelperEndsTheSearch) {
  std::string f = Write("a.json", R"({"credHelpers":{"quay.io":"nosuch"}})");
  std::string g = Write("b.json", Auths("quay.io", kAliceAuth));
  auto c = FindCredentials("quay.io", std::nullopt, {f, g});
  ASSERT_FALSE(c);
  EXPECT_NE(c.error().ToString().find("docker-credential-nosuch"), std::string::npos);
}

// The helper gets its stdin and stdout and no other fd of ours (not even one
// without O_CLOEXEC), the registry on stdin with no newline (as docker's
// client sends it); a child it leaves holding its stdout does not hold us.
TEST_F(RegistryAuthTest, HelperGetsOnlyItsPipesAndIsNotHeldByItsChildren) {
  int leaked = ::fcntl(::open("/dev/null", O_RDONLY), F_DUPFD, 50);  // no O_CLOEXEC
  ASSERT_GE(leaked, 50);
  Helper("lxfds", "[ -e /proc/$$/fd/" + std::to_string(leaked) + " ] && echo LEAKED >>" + dir_ +
                      "/helper.log\n"
                      "printf '{\"Username\":\"u\",\"Secret\":\"p\"}'\n"
                      "sleep 60 &");
  std::string f = Write("a.json", R"({"credHelpers":{"quay.io":"lxfds"}})");
  auto start = std::chrono::steady_clock::now();
  auto c = FindCredentials("quay.io", std::nullopt, {f});
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  ::close(leaked);
  ASSERT_TRUE(c && c->has_value()) << (c ? "none" : c.error().ToString());
  EXPECT_EQ((*c)->username, "u");
  EXPECT_EQ(Log().find("LEAKED"), std::string::npos) << Log();
  // Its stdin: exactly the registry's name.
  std::string raw = Write(
      "bin/docker-credential-lxraw",
      "#!/bin/sh\ncat >" + dir_ + "/stdin.bytes\nprintf '{\"Username\":\"u\",\"Secret\":\"p\"}'\n");
  ::chmod(raw.c_str(), 0755);
  std::string g = Write("b.json", R"({"credHelpers":{"other.io":"lxraw"}})");
  c = FindCredentials("other.io", std::nullopt, {g});
  ASSERT_TRUE(c && c->has_value()) << (c ? "none" : c.error().ToString());
  std::ifstream in(dir_ + "/stdin.bytes");
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), "other.io");
}

TEST_F(RegistryAuthTest, IdentityTokensFromEntriesAndHelpers) {
  // An entry's identitytoken wins over its auth (Docker keeps the user there).
  std::string f = Write("auth.json", std::string(R"({"auths":{"quay.io":{"auth":")") + kBobAuth +
                                         R"(","identitytoken":"idt-s3cret"}}})");
  auto c = FindCredentials("quay.io", std::nullopt, {f});
  ASSERT_TRUE(c) << c.error().ToString();
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->identity_token, "idt-s3cret");
  // The entry's auth comes along, for a registry that asks for Basic.
  EXPECT_EQ((*c)->username, "bob");
  EXPECT_EQ((*c)->password, "pw");
  // A helper's "<token>" user.
  Helper("token", R"(printf '{"Username":"<token>","Secret":"refresh-s3cret"}')");
  std::string g = Write("h.json", R"({"credHelpers":{"quay.io":"token"}})");
  c = FindCredentials("quay.io", std::nullopt, {g});
  ASSERT_TRUE(c) << c.error().ToString();
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->identity_token, "refresh-s3cret");
  EXPECT_TRUE((*c)->username.empty());
  // An empty one is one line.
  Helper("emptytoken", R"(printf '{"Username":"<token>","Secret":""}')");
  g = Write("h2.json", R"({"credHelpers":{"quay.io":"emptytoken"}})");
  c = FindCredentials("quay.io", std::nullopt, {g});
  ASSERT_FALSE(c);
  EXPECT_NE(c.error().ToString().find("empty identity token"), std::string::npos);
}

}  // namespace
}  // namespace layerx::broker
