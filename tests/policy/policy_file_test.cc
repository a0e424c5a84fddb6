#include "policy/policy_file.h"

#include <gtest/gtest.h>

namespace layerx::policy {
namespace {

TEST(PolicyFileTest, ShowReadsBackToTheSamePolicy) {
  Policy policy = DefaultPolicy();
  policy.limits.max_entries = 12345;
  policy.rlimits.open_files = 99;
  policy.seccomp_action = SeccompAction::kErrno;
  auto back = ParsePolicyToml(FormatPolicyToml(policy), "shown");
  ASSERT_TRUE(back) << back.error().ToString();
  EXPECT_EQ(FormatPolicyToml(*back), FormatPolicyToml(policy));
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
        BadFile{"Syntax", "[limits\nmax_entries = 1\n", "bad.toml:"}),
    [](const auto& info) { return std::string(info.param.label); });

}  // namespace
}  // namespace layerx::policy
