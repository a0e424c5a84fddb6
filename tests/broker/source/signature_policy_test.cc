// containers-policy.json for docker:// (broker/source/signature_policy.cc):
// which scope decides, what its requirements say, what a bad file gets.
#include "broker/source/signature_policy.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>

namespace layerx::broker {
namespace {

const char kDigest[] = "sha256:f3b4600e0123456789abcdef0123456789abcdef0123456789abcdef01234567";

SignaturePolicy Parse(const std::string& text) {
  auto p = ParseSignaturePolicy(text, "test.json");
  EXPECT_TRUE(p) << p.error().ToString();
  return p ? *p : SignaturePolicy{};
}

RegistryRef Ref(const std::string& spec) {
  auto r = ParseRegistryRef(spec);
  EXPECT_TRUE(r) << r.error().ToString();
  return *r;
}

// "" when accepted, else the one line.
std::string Verdict(const SignaturePolicy& p, const std::string& spec) {
  Status s = CheckSignaturePolicy(p, Ref(spec));
  if (s) return "";
  EXPECT_EQ(s.error().kind(), ErrorKind::kRefused);
  return s.error().ToString();
}

TEST(SignaturePolicyTest, ScopesFromTheImageToWildcardsOfItsHost) {
  EXPECT_EQ(PolicyScopes(Ref("docker://a.b.example.com:5000/ns/sub/repo:1")),
            (std::vector<std::string>{
                "a.b.example.com:5000/ns/sub/repo:1", "a.b.example.com:5000/ns/sub/repo",
                "a.b.example.com:5000/ns/sub", "a.b.example.com:5000/ns", "a.b.example.com:5000",
                "*.b.example.com", "*.example.com", "*.com"}));
  EXPECT_EQ(PolicyScopes(Ref(std::string("docker://debian@") + kDigest)).front(),
            std::string("docker.io/library/debian@") + kDigest);
  EXPECT_EQ(PolicyScopes(Ref("docker://index.docker.io/library/debian")),
            (std::vector<std::string>{"docker.io/library/debian:latest", "docker.io/library/debian",
                                      "docker.io/library", "docker.io", "*.io"}));
}

// The man page's locked-down example: default reject, some scopes accepted.
TEST(SignaturePolicyTest, TheMostSpecificScopeDecides) {
  SignaturePolicy p = Parse(R"({
    "default": [{"type": "reject"}],
    "transports": {
      "docker": {
        "docker.io/openshift": [{"type": "insecureAcceptAnything"}],
        "docker.io/library/busybox": [{"type": "insecureAcceptAnything"}],
        "docker.io/library/busybox:evil": [{"type": "reject"}],
        "*.temporary-project.example.com": [{"type": "insecureAcceptAnything"}],
        "hostname:5000/myns/signed": [{"type": "sigstoreSigned", "keyPath": "/k.pub"}]
      },
      "dir": {"": [{"type": "insecureAcceptAnything"}]}
    }
  })");
  EXPECT_EQ(Verdict(p, "docker://busybox"), "");
  EXPECT_EQ(Verdict(p, "docker://docker.io/openshift/origin:v3"), "");
  EXPECT_EQ(Verdict(p, "docker://a.b.temporary-project.example.com:443/x/y"), "");
  EXPECT_NE(Verdict(p, "docker://busybox:evil")
                .find("rejected by policy.json \"test.json\" "
                      "(transports.docker[\"docker.io/library/busybox:evil\"])"),
            std::string::npos);
  EXPECT_NE(Verdict(p, "docker://debian").find("rejected by policy.json \"test.json\" (default)"),
            std::string::npos);
  // Hosts in any case meet their scope: an uppercase spelling is no way around it.
  EXPECT_NE(Verdict(p, "docker://HOSTNAME:5000/myns/signed/app:1").find("wants it sigstoreSigned"),
            std::string::npos);
  EXPECT_EQ(Verdict(p, "docker://A.Temporary-Project.Example.COM/x/y"), "");
  EXPECT_NE(Verdict(p, "docker://temporary-project.example.com/x").find("(default)"),
            std::string::npos);
  const std::string signed_line = Verdict(p, "docker://hostname:5000/myns/signed/app:1");
  EXPECT_NE(signed_line.find("wants it sigstoreSigned, and layerx does not verify signatures"),
            std::string::npos)
      << signed_line;
}

TEST(SignaturePolicyTest, TheTransportDefaultComesBeforeTheGlobalOne) {
  SignaturePolicy p = Parse(R"({"default": [{"type": "insecureAcceptAnything"}],
    "transports": {"docker": {"": [{"type": "reject"}],
                              "quay.io": [{"type": "insecureAcceptAnything"}]}}})");
  EXPECT_EQ(Verdict(p, "docker://quay.io/a/b"), "");
  EXPECT_NE(Verdict(p, "docker://debian").find("transports.docker[\"\"]"), std::string::npos);
}

TEST(SignaturePolicyTest, EveryRequirementMustAccept) {
  SignaturePolicy p = Parse(R"({"default": [{"type": "insecureAcceptAnything"},
      {"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k.gpg",
       "signedIdentity": {"type": "matchRepository"}}]})");
  EXPECT_NE(Verdict(p, "docker://debian").find("wants it signedBy"), std::string::npos);
}

// Fedora's and RHEL's default policy.json, which a valid file must parse as:
// docker-daemon, keyPaths, signedBaseLayer are all things skopeo accepts.
TEST(SignaturePolicyTest, ADistributionsPolicyParses) {
  SignaturePolicy p = Parse(R"({
    "default": [{"type": "insecureAcceptAnything"}],
    "transports": {
      "docker": {
        "registry.access.redhat.com": [{"type": "signedBy", "keyType": "GPGKeys",
            "keyPaths": ["/etc/pki/rpm-gpg/RPM-GPG-KEY-redhat-release",
                         "/etc/pki/rpm-gpg/RPM-GPG-KEY-redhat-beta"]}],
        "registry.redhat.io": [{"type": "signedBy", "keyType": "GPGKeys",
            "keyPath": "/etc/pki/rpm-gpg/RPM-GPG-KEY-redhat-release"}],
        "quay.io/base": [{"type": "signedBaseLayer",
            "baseLayerIdentity": {"type": "exactRepository", "dockerRepository": "x.io/y"}}],
        "registry-1.docker.io": [{"type": "reject"}]
      },
      "docker-daemon": {"": [{"type": "insecureAcceptAnything"}]}
    }
  })");
  EXPECT_NE(Verdict(p, "docker://registry.redhat.io/ubi9/ubi").find("wants it signedBy"),
            std::string::npos);
  EXPECT_NE(Verdict(p, "docker://quay.io/base/app").find("wants it signedBaseLayer"),
            std::string::npos);
  // docker.io's other names are docker.io (its scopes name it so): a scope
  // for "registry-1.docker.io" is never met (README).
  EXPECT_EQ(Verdict(p, "docker://registry-1.docker.io/library/debian"), "");
  EXPECT_EQ(Verdict(p, "docker://debian"), "");
  EXPECT_EQ(Verdict(p, "docker://index.docker.io/library/debian"), "");
}

TEST(SignaturePolicyTest, NoFileAcceptsEverything) {
  EXPECT_EQ(Verdict(SignaturePolicy{}, "docker://debian"), "");
}

// The user's policy.json, when it is there, is the one; one that is there and
// cannot be read fails (it could be the one that refuses), never "no policy".
TEST(SignaturePolicyTest, TheUsersFileIsReadAndOneThatCannotBeFails) {
  char tmpl[] = "/tmp/layerx-policy-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string home = tmpl;
  const char* old = std::getenv("HOME");
  const std::string saved = old != nullptr ? old : "";
  ::setenv("HOME", home.c_str(), 1);
  std::filesystem::create_directories(home + "/.config/containers");
  std::ofstream(home + "/.config/containers/policy.json") << R"({"default": [{"type": "reject"}]})";
  auto p = LoadSignaturePolicy("");
  ASSERT_TRUE(p) << p.error().ToString();
  EXPECT_EQ(p->file, home + "/.config/containers/policy.json");
  EXPECT_NE(Verdict(*p, "docker://debian").find("rejected"), std::string::npos);
  std::filesystem::remove(home + "/.config/containers/policy.json");
  std::filesystem::create_directories(home + "/.config/containers/policy.json");  // not a file
  auto unreadable = LoadSignaturePolicy("");
  EXPECT_FALSE(unreadable);
  ::setenv("HOME", saved.c_str(), 1);
  std::filesystem::remove_all(home);
}

TEST(SignaturePolicyTest, RejectsBadFilesInOneLine) {
  struct Case {
    const char* text;
    const char* says;
  } cases[] = {
      {"not json", "not a JSON object"},
      {"[]", "not a JSON object"},
      {R"({"transports": {}})", "\"default\" is missing"},
      {R"({"default": []})", "default: want a non-empty array"},
      {R"({"default": [{"type": "maybe"}]})", "unknown requirement type \"maybe\""},
      {R"({"default": [{"kind": "reject"}]})", "a requirement without a \"type\""},
      {R"({"default": [{"type": "reject", "why": "x"}]})", "reject has an unknown field \"why\""},
      {R"({"default": [{"type": "reject"}], "extra": 1})", "unknown field \"extra\""},
      {R"({"default": [{"type": "reject"}], "default": [{"type": "insecureAcceptAnything"}]})",
       "a field is given twice"},
      {R"({"default": [{"type": "reject"}], "transports": {"docker": {"x.io": []}}})",
       "transports[\"docker\"][\"x.io\"]: want a non-empty array"},
      {R"({"default": [{"type": "reject"}], "transports": {"docker": []}})",
       "transports[\"docker\"]: want an object of scopes"},
  };
  for (const Case& c : cases) {
    auto p = ParseSignaturePolicy(c.text, "bad.json");
    ASSERT_FALSE(p) << c.text;
    EXPECT_EQ(p.error().kind(), ErrorKind::kPolicy);
    const std::string e = p.error().ToString();
    EXPECT_NE(e.find(c.says), std::string::npos) << c.text << "\n  gave: " << e;
    EXPECT_NE(e.find("policy.json \"bad.json\": "), std::string::npos) << e;
  }
}

}  // namespace
}  // namespace layerx::broker
