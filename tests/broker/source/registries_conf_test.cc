// registries.conf as skopeo and podman read it (broker/source/registries_conf.cc):
// which table a name picks, where it is pulled from, what is refused.
#include "broker/source/registries_conf.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace layerx::broker {
namespace {

const char kDigest[] = "sha256:f3b4600e0123456789abcdef0123456789abcdef0123456789abcdef01234567";

RegistriesConf Parse(const std::string& text) {
  RegistriesConf conf;
  Status s = MergeRegistriesConf(text, "test.conf", conf);
  EXPECT_TRUE(s) << s.error().ToString();
  return conf;
}

std::string ParseError(const std::string& text) {
  RegistriesConf conf;
  Status s = MergeRegistriesConf(text, "test.conf", conf);
  if (s) return "(parsed)";
  EXPECT_EQ(s.error().kind(), ErrorKind::kPolicy);
  return s.error().ToString();
}

std::vector<std::string> Names(const std::vector<PullSource>& sources) {
  std::vector<std::string> out;
  for (const PullSource& s : sources) out.push_back(s.name);
  return out;
}

std::string Prefix(const RegistriesConf& conf, const std::string& name) {
  const RegistryConfEntry* e = FindRegistryConf(conf, name);
  return e == nullptr ? "(none)" : e->prefix;
}

TEST(RegistriesConfTest, TheManPageExampleTriesMirrorsThenTheLocation) {
  RegistriesConf conf = Parse(R"(
unqualified-search-registries = ["example.com"]

[[registry]]
prefix = "example.com/foo"
insecure = false
blocked = false
location = "internal-registry-for-example.com/bar"

[[registry.mirror]]
location = "example-mirror-0.local/mirror-for-foo"

[[registry.mirror]]
location = "example-mirror-1.local/mirrors/foo"
insecure = true
)");
  const std::string name = "example.com/foo/image:latest";
  const RegistryConfEntry* e = FindRegistryConf(conf, name);
  ASSERT_NE(e, nullptr);
  std::vector<PullSource> sources = PullSources(e, name, false);
  EXPECT_EQ(Names(sources),
            (std::vector<std::string>{"example-mirror-0.local/mirror-for-foo/image:latest",
                                      "example-mirror-1.local/mirrors/foo/image:latest",
                                      "internal-registry-for-example.com/bar/image:latest"}));
  EXPECT_TRUE(sources[0].mirror);
  EXPECT_FALSE(sources[0].insecure);
  EXPECT_TRUE(sources[1].insecure);
  EXPECT_FALSE(sources[2].mirror);
}

TEST(RegistriesConfTest, TheLongestPrefixEndingAtASeparatorWins) {
  RegistriesConf conf = Parse(R"(
[[registry]]
location = "docker.io"
[[registry]]
location = "docker.io/library"
[[registry]]
prefix = "docker.io/library/debian"
location = "mirror.local/debian"
[[registry]]
location = "quay.io:5000"
)");
  // Names are looked up without their tag or digest, as containers/image does.
  EXPECT_EQ(Prefix(conf, "docker.io/library/debian"), "docker.io/library/debian");
  EXPECT_EQ(Prefix(conf, "docker.io/library/debian-slim"), "docker.io/library");
  EXPECT_EQ(Prefix(conf, "docker.io/libraryx/a"), "docker.io");
  EXPECT_EQ(Prefix(conf, "docker.iox/a"), "(none)");
  EXPECT_EQ(Prefix(conf, "quay.io:5000/a"), "quay.io:5000");
  EXPECT_EQ(Prefix(conf, "quay.io/a"), "(none)");
  // A bare host covers it on any port (so a block cannot be walked around by
  // naming the port), as in containers/image.
  EXPECT_EQ(Prefix(conf, "docker.io:443/a"), "docker.io");
  const RegistryConfEntry* e = FindRegistryConf(conf, "docker.io/library/debian:12");
  EXPECT_EQ(Names(PullSources(e, "docker.io/library/debian:12", false)),
            std::vector<std::string>{"mirror.local/debian:12"});
}

TEST(RegistriesConfTest, WildcardPrefixMatchesSubdomainsOnly) {
  RegistriesConf conf = Parse(R"(
[[registry]]
prefix = "*.example.com"
insecure = true
[[registry.mirror]]
location = "mirror.local/ex"
)");
  EXPECT_EQ(Prefix(conf, "a.example.com/foo:1"), "*.example.com");
  EXPECT_EQ(Prefix(conf, "a.b.example.com:5000/foo:1"), "*.example.com");
  EXPECT_EQ(Prefix(conf, "example.com/foo:1"), "(none)");
  EXPECT_EQ(Prefix(conf, "aexample.com/foo:1"), "(none)");
  EXPECT_EQ(Prefix(conf, "evil.com/a.example.com/foo:1"), "(none)");
  // No location: the name as given, with the table's settings.
  const std::string name = "a.example.com/foo:1";
  std::vector<PullSource> sources = PullSources(FindRegistryConf(conf, name), name, false);
  EXPECT_EQ(Names(sources), (std::vector<std::string>{"mirror.local/ex/foo:1", name}));
  EXPECT_TRUE(sources[1].insecure);
}

TEST(RegistriesConfTest, MirrorsServeDigestsOrTagsAsTheySay) {
  RegistriesConf conf = Parse(R"(
[[registry]]
location = "r.example"
[[registry.mirror]]
location = "all.mirror"
[[registry.mirror]]
location = "digests.mirror"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "tags.mirror"
pull-from-mirror = "tag-only"

[[registry]]
location = "d.example"
mirror-by-digest-only = true
[[registry.mirror]]
location = "d.mirror"
)");
  const std::string tag = "r.example/a:1", digest = "r.example/a@" + std::string(kDigest);
  EXPECT_EQ(Names(PullSources(FindRegistryConf(conf, tag), tag, false)),
            (std::vector<std::string>{"all.mirror/a:1", "tags.mirror/a:1", tag}));
  EXPECT_EQ(Names(PullSources(FindRegistryConf(conf, digest), digest, true)),
            (std::vector<std::string>{"all.mirror/a@" + std::string(kDigest),
                                      "digests.mirror/a@" + std::string(kDigest), digest}));
  const std::string dtag = "d.example/a:1", ddigest = "d.example/a@" + std::string(kDigest);
  EXPECT_EQ(Names(PullSources(FindRegistryConf(conf, dtag), dtag, false)),
            std::vector<std::string>{dtag});
  EXPECT_EQ(Names(PullSources(FindRegistryConf(conf, ddigest), ddigest, true)),
            (std::vector<std::string>{"d.mirror/a@" + std::string(kDigest), ddigest}));
}

TEST(RegistriesConfTest, NoTableMeansTheNameItself) {
  RegistriesConf conf = Parse("");
  EXPECT_EQ(Names(PullSources(FindRegistryConf(conf, "x.io/a:1"), "x.io/a:1", false)),
            std::vector<std::string>{"x.io/a:1"});
}

TEST(RegistriesConfTest, VersionOneListsAreInsecureAndBlockedTables) {
  RegistriesConf conf = Parse(R"(
[registries.search]
registries = ["docker.io"]
[registries.insecure]
registries = ["localhost:5000", "both.example"]
[registries.block]
registries = ["bad.example", "both.example"]
)");
  const RegistryConfEntry* insecure = FindRegistryConf(conf, "localhost:5000/a:1");
  ASSERT_NE(insecure, nullptr);
  EXPECT_TRUE(insecure->endpoint.insecure);
  EXPECT_FALSE(insecure->blocked);
  const RegistryConfEntry* bad = FindRegistryConf(conf, "bad.example/a:1");
  ASSERT_NE(bad, nullptr);
  EXPECT_TRUE(bad->blocked);
  const RegistryConfEntry* both = FindRegistryConf(conf, "both.example/a:1");
  ASSERT_NE(both, nullptr);
  EXPECT_TRUE(both->blocked && both->endpoint.insecure);
  EXPECT_EQ(FindRegistryConf(conf, "docker.io/library/a:1"), nullptr);  // search: unused
}

TEST(RegistriesConfTest, ShortNameSettingsAreAcceptedAndUnused) {
  RegistriesConf conf = Parse(R"(
unqualified-search-registries = ["docker.io"]
short-name-mode = "enforcing"
credential-helpers = ["containers-auth.json"]
[aliases]
"debian" = "docker.io/library/debian"
)");
  EXPECT_TRUE(conf.registries.empty());
}

TEST(RegistriesConfTest, RejectsBadFilesInOneLineNamingTheLine) {
  struct Case {
    const char* text;
    const char* says;
  } cases[] = {
      {"[[registry]\nlocation = \"a\"", "test.conf:1:"},
      {"[[registry]]\nlocation = \"https://a.example\"", "test.conf:2: location \"https://a"},
      {"[[registry]]\ninsecure = true", "needs a prefix or a location"},
      {"[[registry]]\nprefix = \"a.example\"", "an empty location needs a \"*.DOMAIN\" prefix"},
      {"[[registry]]\nprefix = \"*.example.com:5000\"", "a wildcard prefix is \"*.DOMAIN\""},
      {"[[registry]]\nprefix = \"a.*.example\"\nlocation = \"b\"", "a wildcard only as"},
      {"[[registry]]\nlocation = \"a.example\"\ninsecure = \"yes\"",
       "insecure: want true or false"},
      {"[[registry]]\nlocation = \"a.example\"\n[[registry.mirror]]\ninsecure = true",
       "a mirror needs a location"},
      {"[[registry]]\nlocation = \"a.example\"\n[[registry.mirror]]\nlocation = \"m\"\n"
       "pull-from-mirror = \"sometimes\"",
       "pull-from-mirror: want"},
      {"[[registry]]\nlocation = \"a.example\"\nmirror-by-digest-only = true\n"
       "[[registry.mirror]]\nlocation = \"m\"\npull-from-mirror = \"tag-only\"",
       "cannot both be set"},
      {"[[registry]]\nlocation = \"a.example\"\n[[registry]]\nprefix = \"b.example\"\n"
       "location = \"a.example/\"\ninsecure = true",
       "location \"a.example\" is set again with another insecure or blocked (first at "
       "test.conf:1)"},
      {"[[registry]]\nlocation = \"a.example\"\npull-from-mirror = \"digest-only\"",
       "pull-from-mirror belongs in a [[registry.mirror]] table"},
      {"[registries.insecure]\nregistries = [\"a\"]\n[[registry]]\nlocation = \"b\"",
       "mixes version 1"},
  };
  for (const Case& c : cases) {
    std::string e = ParseError(c.text);
    EXPECT_NE(e.find(c.says), std::string::npos) << c.text << "\n  gave: " << e;
    EXPECT_NE(e.find("registries.conf test.conf:"), std::string::npos) << e;
    EXPECT_EQ(e.find('\n'), std::string::npos) << e;
  }
}

TEST(RegistriesConfTest, HostsAreCaseInsensitiveAndTheFirstOfAPrefixWins) {
  RegistriesConf conf = Parse(R"(
[[registry]]
prefix = "LocalHost:5000/Team"
location = "Mirror.Example/Team"
[[registry]]
prefix = ""
location = "LOCALHOST:5000/Team"
blocked = true
)");
  ASSERT_EQ(conf.registries.size(), 1u);  // the second table's prefix is the first's
  EXPECT_EQ(conf.registries[0].prefix, "localhost:5000/Team");
  EXPECT_EQ(conf.registries[0].endpoint.location, "mirror.example/Team");
  EXPECT_FALSE(conf.registries[0].blocked);
  EXPECT_EQ(LowerHost("LocalHost:5000/Team/App:V1"), "localhost:5000/Team/App:V1");
  EXPECT_EQ(Prefix(conf, LowerHost("LOCALHOST:5000/Team/app")), "localhost:5000/Team");
}

TEST(RegistriesConfTest, ADropInMustBeVersionTwo) {
  RegistriesConf conf;
  Status s = MergeRegistriesConf("[registries.block]\nregistries = [\"x\"]\n", "d.conf", conf,
                                 /*drop_in=*/true);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().ToString().find("a drop-in must be version 2"), std::string::npos);
}

TEST(RegistriesConfTest, CredentialHelpersInOrderAndADropInReplacesThem) {
  RegistriesConf conf = Parse(R"(credential-helpers = ["ecr-login", "containers-auth.json"])");
  EXPECT_EQ(conf.credential_helpers,
            (std::vector<std::string>{"ecr-login", "containers-auth.json"}));
  ASSERT_TRUE(MergeRegistriesConf("[[registry]]\nlocation = \"x.example\"\n", "a.conf", conf));
  EXPECT_EQ(conf.credential_helpers.size(), 2u);  // not set there: kept
  ASSERT_TRUE(MergeRegistriesConf(R"(credential-helpers = ["pass"])", "b.conf", conf));
  EXPECT_EQ(conf.credential_helpers, std::vector<std::string>{"pass"});
  for (const char* bad : {R"(credential-helpers = "pass")", R"(credential-helpers = [""])",
                          R"(credential-helpers = ["../bin/x"])", R"(credential-helpers = [1])"}) {
    EXPECT_NE(ParseError(bad).find("credential-helpers: want"), std::string::npos) << bad;
  }
}

TEST(RegistriesConfTest, ADropInReplacesTheTableWithItsPrefix) {
  RegistriesConf conf = Parse(R"(
[[registry]]
prefix = "a.example"
location = "a-primary.example"
[[registry]]
location = "b.example"
insecure = true
)");
  ASSERT_TRUE(MergeRegistriesConf(R"(
[[registry]]
prefix = "a.example"
location = "a-moved.example"
[[registry]]
location = "c.example"
blocked = true
)",
                                  "drop-in.conf", conf));
  ASSERT_EQ(conf.registries.size(), 3u);
  EXPECT_EQ(conf.registries[0].endpoint.location, "a-moved.example");
  EXPECT_EQ(conf.registries[0].source, "drop-in.conf:2");
  EXPECT_TRUE(conf.registries[1].endpoint.insecure);
  EXPECT_TRUE(conf.registries[2].blocked);
  EXPECT_EQ(conf.files, (std::vector<std::string>{"test.conf", "drop-in.conf"}));
}

// The files skopeo reads, in its order, under a HOME of the test's own.
class RegistriesConfFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerx-regconf-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    const char* home = std::getenv("HOME");
    old_home_ = home != nullptr ? home : "";
    const char* env = std::getenv("CONTAINERS_REGISTRIES_CONF");
    old_env_ = env != nullptr ? env : "";
    ::setenv("HOME", dir_.c_str(), 1);
    ::unsetenv("CONTAINERS_REGISTRIES_CONF");
  }
  void TearDown() override {
    ::setenv("HOME", old_home_.c_str(), 1);
    if (!old_env_.empty()) {
      ::setenv("CONTAINERS_REGISTRIES_CONF", old_env_.c_str(), 1);
    } else {
      ::unsetenv("CONTAINERS_REGISTRIES_CONF");
    }
    std::filesystem::remove_all(dir_);
  }
  void Write(const std::string& rel, const std::string& text) {
    std::filesystem::create_directories(std::filesystem::path(dir_ + "/" + rel).parent_path());
    std::ofstream(dir_ + "/" + rel) << text;
  }
  std::string dir_, old_home_, old_env_;
};

TEST_F(RegistriesConfFilesTest, TheUsersFileAndDropInsInNameOrder) {
  Write(".config/containers/registries.conf", "[[registry]]\nlocation = \"a.example\"\n");
  Write(".config/containers/registries.conf.d/20-b.conf",
        "[[registry]]\nprefix = \"a.example\"\nlocation = \"b.example\"\n");
  Write(".config/containers/registries.conf.d/10-a.conf",
        "[[registry]]\nprefix = \"a.example\"\nlocation = \"z.example\"\n");
  Write(".config/containers/registries.conf.d/30-c.txt", "not read");
  auto conf = LoadRegistriesConf("");
  ASSERT_TRUE(conf) << conf.error().ToString();
  ASSERT_EQ(conf->files.size(), 3u);
  EXPECT_EQ(conf->files[0], dir_ + "/.config/containers/registries.conf");
  EXPECT_EQ(conf->files[2], dir_ + "/.config/containers/registries.conf.d/20-b.conf");
  const RegistryConfEntry* e = FindRegistryConf(*conf, "a.example/x:1");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->endpoint.location, "b.example");
}

TEST_F(RegistriesConfFilesTest, ANamedFileComesFirstAndMustBeThere) {
  Write("mine.conf", "[[registry]]\nlocation = \"m.example\"\nblocked = true\n");
  Write(".config/containers/registries.conf", "[[registry]]\nlocation = \"u.example\"\n");
  auto conf = LoadRegistriesConf(dir_ + "/mine.conf");
  ASSERT_TRUE(conf) << conf.error().ToString();
  EXPECT_EQ(conf->files.front(), dir_ + "/mine.conf");
  EXPECT_NE(FindRegistryConf(*conf, "m.example/x:1"), nullptr);
  EXPECT_EQ(FindRegistryConf(*conf, "u.example/x:1"), nullptr);  // the user's is not read

  ::setenv("CONTAINERS_REGISTRIES_CONF", (dir_ + "/mine.conf").c_str(), 1);
  auto by_env = LoadRegistriesConf("");
  ASSERT_TRUE(by_env) << by_env.error().ToString();
  EXPECT_NE(FindRegistryConf(*by_env, "m.example/x:1"), nullptr);

  auto missing = LoadRegistriesConf(dir_ + "/nope.conf");
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().ToString().find("nope.conf"), std::string::npos);
}

// A file passed over could be the one that blocks a registry: one that is
// there and cannot be read fails; only one that is not there is skipped.
TEST_F(RegistriesConfFilesTest, AFileThatCannotBeReadFailsTheLookup) {
  std::filesystem::create_directories(dir_ + "/.config/containers/registries.conf");  // a dir
  auto conf = LoadRegistriesConf("");
  ASSERT_FALSE(conf);
  EXPECT_NE(conf.error().ToString().find(".config/containers/registries.conf"), std::string::npos)
      << conf.error().ToString();
  std::filesystem::remove_all(dir_ + "/.config");
  Write(".config/containers/registries.conf.d", "a file where a dir should be");
  Write("main.conf", "");
  auto listed = LoadRegistriesConf(dir_ + "/main.conf");
  ASSERT_FALSE(listed);
  EXPECT_NE(listed.error().ToString().find("registries.conf.d"), std::string::npos);
}

// A HOME this user cannot enter (rootless under root's HOME) holds none of
// its config: passed over. Below a HOME it can enter, a file it cannot read
// fails. (Root enters and reads everything: rootless only.)
TEST_F(RegistriesConfFilesTest, AHomeThatCannotBeEnteredIsPassedOver) {
  if (::geteuid() == 0) GTEST_SKIP() << "root reads every file (the .rootless run checks this)";
  Write(".config/containers/registries.conf", "[[registry]]\nlocation = \"u.example\"\n");
  ::chmod((dir_ + "/.config/containers/registries.conf").c_str(), 0);
  auto unreadable = LoadRegistriesConf("");
  EXPECT_FALSE(unreadable);
  ::chmod((dir_ + "/.config/containers/registries.conf").c_str(), 0644);
  ::chmod(dir_.c_str(), 0);
  auto conf = LoadRegistriesConf("");
  ::chmod(dir_.c_str(), 0755);
  ASSERT_TRUE(conf) << conf.error().ToString();
  EXPECT_EQ(FindRegistryConf(*conf, "u.example/x"), nullptr);
}

TEST_F(RegistriesConfFilesTest, DevNullIsAnEmptyFile) {
  auto conf = LoadRegistriesConf("/dev/null");
  ASSERT_TRUE(conf) << conf.error().ToString();
  EXPECT_TRUE(conf->registries.empty());
}

TEST_F(RegistriesConfFilesTest, AFifoIsNotWaitedOn) {
  ASSERT_EQ(::mkfifo((dir_ + "/fifo.conf").c_str(), 0600), 0);
  auto conf = LoadRegistriesConf(dir_ + "/fifo.conf");
  ASSERT_FALSE(conf);  // refused at once, not read (a read would block forever)
}

}  // namespace
}  // namespace layerx::broker
