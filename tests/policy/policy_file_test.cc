#include "policy/policy_file.h"

#include <gtest/gtest.h>

namespace layerx::policy {
namespace {

TEST(PolicyFileTest, ShowReadsBackToTheSamePolicy) {
  Policy policy = DefaultPolicy();
  policy.limits.max_entries = 12345;
  policy.rlimits.open_files = 99;
  policy.seccomp_action = SeccompAction::kErrno;
  policy.limits.max_compression_ratio = 0;
  policy.limits.job_timeout_ms = 60000;
  policy.rules.devices = Treatment::kRefuse;
  policy.rules.setuid = Treatment::kStrip;
  policy.rules.xattrs = XattrAllowlist::Empty();
  ASSERT_TRUE(policy.rules.xattrs.Add("user."));
  ASSERT_TRUE(policy.rules.xattrs.Add("trusted.overlay.opaque"));
  auto back = ParsePolicyToml(FormatPolicyToml(policy), "shown");
  ASSERT_TRUE(back) << back.error().ToString();
  EXPECT_EQ(FormatPolicyToml(*back), FormatPolicyToml(policy));
}

TEST(PolicyFileTest, EntriesSectionSetsRulesAndAllowlist) {
  auto p = ParsePolicyToml(
      "[entries]\ndevices = \"strip\"\nfile_caps = \"refuse\"\nxattrs = [\"user.\", "
      "\"security.selinux\"]\n",
      "t.toml");
  ASSERT_TRUE(p) << p.error().ToString();
  EXPECT_EQ(p->rules.devices, Treatment::kStrip);
  EXPECT_EQ(p->rules.file_caps, Treatment::kRefuse);
  EXPECT_EQ(p->rules.fifos, Treatment::kKeep);
  EXPECT_TRUE(p->rules.xattrs.Keeps("user.x"));
  EXPECT_TRUE(p->rules.xattrs.Keeps("security.selinux"));
  EXPECT_FALSE(p->rules.xattrs.Keeps("security.capability"));
  EXPECT_FALSE(p->rules.xattrs.Keeps("user."));  // a namespace needs a name in it
}

TEST(PolicyFileTest, DefaultAllowlistDropsHostLabels) {
  const XattrAllowlist& allow = DefaultPolicy().rules.xattrs;
  EXPECT_TRUE(allow.Keeps("user.mime_type"));
  EXPECT_TRUE(allow.Keeps("security.capability"));
  EXPECT_TRUE(allow.Keeps("system.posix_acl_access"));
  EXPECT_FALSE(allow.Keeps("trusted.overlay.opaque"));
  EXPECT_FALSE(allow.Keeps("security.selinux"));
  EXPECT_FALSE(allow.Keeps("security.ima"));
  EXPECT_FALSE(allow.Keeps("security.capability2"));
}

TEST(PolicyFileTest, FileChangesOnlyWhatItNames) {
  auto p = ParsePolicyToml("[limits]\nmax_entries = 7\n[jail]\ncpu_seconds = 5\n", "t.toml");
  ASSERT_TRUE(p) << p.error().ToString();
  EXPECT_EQ(p->limits.max_entries, 7u);
  EXPECT_EQ(p->rlimits.cpu_seconds, 5u);
  EXPECT_EQ(p->limits.max_path_bytes, Limits{}.max_path_bytes);
}

struct BadFile {
  const char* label;
  const char* text;
  const char* names;  // what the error must name
};

class PolicyFileRejectsTest : public ::testing::TestWithParam<BadFile> {};

TEST_P(PolicyFileRejectsTest, WithAnErrorNamingTheKey) {
  auto p = ParsePolicyToml(GetParam().text, "bad.toml");
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().kind(), ErrorKind::kPolicy);
  EXPECT_NE(p.error().ToString().find(GetParam().names), std::string::npos) << p.error().ToString();
}

INSTANTIATE_TEST_SUITE_P(
    Files, PolicyFileRejectsTest,
    ::testing::Values(
        BadFile{"UnknownKey", "[limits]\nmax_entires = 5\n", "limits.max_entires"},
        BadFile{"UnknownSection", "[limitz]\nx = 1\n", "[limitz]"},
        BadFile{"String", "[limits]\nmax_entries = \"many\"\n", "limits.max_entries"},
        BadFile{"Negative", "[limits]\nmax_layer_bytes = -1\n", "limits.max_layer_bytes"},
        BadFile{"Float", "[jail]\ncpu_seconds = 1.5\n", "jail.cpu_seconds"},
        BadFile{"BelowMinimum", "[jail]\nopen_files = 2\n", "jail.open_files"},
        BadFile{"Zero", "[limits]\nmax_entries = 0\n", "limits.max_entries"},
        BadFile{"BadAction", "[jail]\nseccomp_action = \"ignore\"\n", "jail.seccomp_action"},
        BadFile{"Syntax", "[limits\nmax_entries = 1\n", "bad.toml:"},
        BadFile{"BadTreatment", "[entries]\nsetuid = \"maybe\"\n", "entries.setuid"},
        BadFile{"UnknownEntriesKey", "[entries]\nsockets = \"keep\"\n", "entries.sockets"},
        BadFile{"XattrsNotArray", "[entries]\nxattrs = \"user.\"\n", "entries.xattrs"},
        BadFile{"XattrEmpty", "[entries]\nxattrs = [\"\"]\n", "entries.xattrs"},
        BadFile{"XattrNotString", "[entries]\nxattrs = [1]\n", "entries.xattrs"},
        BadFile{"XattrControlByte", "[entries]\nxattrs = [\"user.\\n\"]\n", "entries.xattrs"},
        BadFile{"JobTimeoutZero", "[limits]\njob_timeout_ms = 0\n", "limits.job_timeout_ms"}),
    [](const auto& info) { return std::string(info.param.label); });

}  // namespace
}  // namespace layerx::policy
