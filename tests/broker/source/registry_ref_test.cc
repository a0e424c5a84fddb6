// docker:// references as skopeo names them (broker/registry_ref.cc).
#include "broker/source/registry_ref.h"

#include <gtest/gtest.h>

namespace layerx::broker {
namespace {

struct RefCase {
  const char* name;
  const char* spec;
  const char* registry;
  const char* host;
  const char* repository;
  const char* tag;
  const char* digest;
};

const char kDigest[] = "sha256:f3b4600e0123456789abcdef0123456789abcdef0123456789abcdef01234567";

class RegistryRefParseTest : public ::testing::TestWithParam<RefCase> {};

TEST_P(RegistryRefParseTest, Parses) {
  const RefCase& c = GetParam();
  auto ref = ParseRegistryRef(c.spec);
  ASSERT_TRUE(ref) << ref.error().ToString();
  EXPECT_EQ(ref->registry, c.registry);
  EXPECT_EQ(ref->host, c.host);
  EXPECT_EQ(ref->repository, c.repository);
  EXPECT_EQ(ref->tag, c.tag);
  EXPECT_EQ(ref->digest, c.digest);
  EXPECT_EQ(ref->Reference(), *c.digest != '\0' ? std::string(c.digest) : std::string(c.tag));
}

INSTANTIATE_TEST_SUITE_P(
    Names, RegistryRefParseTest,
    ::testing::Values(
        RefCase{"HubOfficialImage", "docker://debian", "docker.io", "registry-1.docker.io",
                "library/debian", "latest", ""},
        RefCase{"WithoutScheme", "debian:bookworm", "docker.io", "registry-1.docker.io",
                "library/debian", "bookworm", ""},
        RefCase{"HubUserImage", "docker://user/app:1.0", "docker.io", "registry-1.docker.io",
                "user/app", "1.0", ""},
        RefCase{"HubNamedExplicitly", "docker://docker.io/debian", "docker.io",
                "registry-1.docker.io", "library/debian", "latest", ""},
        RefCase{"HubAlias", "docker://index.docker.io/library/debian:12", "docker.io",
                "registry-1.docker.io", "library/debian", "12", ""},
        RefCase{"IpAndPort", "docker://127.0.0.1:5000/debian:test", "127.0.0.1:5000",
                "127.0.0.1:5000", "debian", "test", ""},
        RefCase{"Localhost", "docker://localhost/a/b", "localhost", "localhost", "a/b", "latest",
                ""},
        RefCase{"LocalhostPort", "docker://localhost:5000/app", "localhost:5000",
                "localhost:5000", "app", "latest", ""},
        RefCase{"DottedHost", "docker://quay.io/org/sub/app:v_1-x", "quay.io", "quay.io",
                "org/sub/app", "v_1-x", ""},
        RefCase{"Digest", "docker://quay.io/app@sha256:"
                          "f3b4600e0123456789abcdef0123456789abcdef0123456789abcdef01234567",
                "quay.io", "quay.io", "app", "", kDigest},
        RefCase{"HubDigest", "debian@sha256:"
                             "f3b4600e0123456789abcdef0123456789abcdef0123456789abcdef01234567",
                "docker.io", "registry-1.docker.io", "library/debian", "", kDigest},
        RefCase{"Separators", "docker://a.b/x.y/z__w/a--b/c_d", "a.b", "a.b",
                "x.y/z__w/a--b/c_d", "latest", ""},
        RefCase{"FirstComponentPlain", "docker://myorg/app", "docker.io",
                "registry-1.docker.io", "myorg/app", "latest", ""}),
    [](const auto& info) { return std::string(info.param.name); });

struct BadCase {
  const char* name;
  const char* spec;
};

class RegistryRefRejectsTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(RegistryRefRejectsTest, RejectsWithOneLine) {
  auto ref = ParseRegistryRef(GetParam().spec);
  ASSERT_FALSE(ref) << ref->ToString();
  EXPECT_EQ(ref.error().kind(), ErrorKind::kPolicy);
  EXPECT_EQ(ref.error().ToString().find('\n'), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(
    Names, RegistryRefRejectsTest,
    ::testing::Values(
        BadCase{"Empty", "docker://"}, BadCase{"UppercaseRepo", "docker://Debian"},
        BadCase{"UppercaseUnderRegistry", "docker://quay.io/Org/app"},
        BadCase{"EmptyComponent", "docker://quay.io/org//app"},
        BadCase{"TrailingSlash", "docker://quay.io/app/"},
        BadCase{"RegistryOnly", "docker://quay.io/"}, BadCase{"EmptyTag", "docker://debian:"},
        BadCase{"BadTagChar", "docker://debian:a+b"},
        BadCase{"TagStartsWithDot", "docker://debian:.x"},
        BadCase{"EmptyDigest", "docker://debian@"},
        BadCase{"ShortDigest", "docker://debian@sha256:abc"},
        BadCase{"UppercaseDigest",
                "docker://debian@sha256:"
                "F3B4600E0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF01234567"},
        BadCase{"OtherAlgorithm",
                "docker://debian@sha512:"
                "f3b4600e0123456789abcdef0123456789abcdef0123456789abcdef01234567"},
        BadCase{"TagAndDigest",
                "docker://debian:12@sha256:"
                "f3b4600e0123456789abcdef0123456789abcdef0123456789abcdef01234567"},
        BadCase{"BadSeparator", "docker://a.b/x..y"}, BadCase{"LeadingDash", "docker://-x"},
        BadCase{"BadPort", "docker://127.0.0.1:99999/x"},
        BadCase{"EmptyPort", "docker://127.0.0.1:/x"},
        BadCase{"BadHostLabel", "docker://a..b/x"},
        BadCase{"SpaceInName", "docker://deb ian"},
        BadCase{"TooLong", "docker://quay.io/"
                           "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                           "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                           "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                           "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(RegistryRefTest, ToStringNamesTheNormalizedReference) {
  auto ref = ParseRegistryRef("debian");
  ASSERT_TRUE(ref);
  EXPECT_EQ(ref->ToString(), "docker.io/library/debian:latest");
}

TEST(RegistryRefTest, NormalizeRegistryFoldsDockerHubAliases) {
  EXPECT_EQ(NormalizeRegistry("index.docker.io"), "docker.io");
  EXPECT_EQ(NormalizeRegistry("registry-1.docker.io"), "docker.io");
  EXPECT_EQ(NormalizeRegistry("docker.io"), "docker.io");
  EXPECT_EQ(NormalizeRegistry("quay.io"), "quay.io");
}

}  // namespace
}  // namespace layerx::broker
