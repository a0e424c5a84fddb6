#include "extractor/entry_name.h"

#include <gtest/gtest.h>

namespace layerx::extractor {
namespace {

struct NameCase {
  const char* label;
  std::string input;
  std::string cleaned;  // Join() of the result when ok
  std::optional<ErrorKind> error;
};

class EntryNameTest : public ::testing::TestWithParam<NameCase> {};

TEST_P(EntryNameTest, ParsesAsDockerCleans) {
  const NameCase& c = GetParam();
  auto name = EntryName::Parse(c.input, policy::Limits{});
  if (c.error) {
    ASSERT_FALSE(name) << c.label;
    EXPECT_EQ(name.error().kind(), *c.error);
    return;
  }
  ASSERT_TRUE(name) << name.error().ToString();
  EXPECT_EQ(name->Join(), c.cleaned);
  for (const std::string& comp : name->components()) {
    EXPECT_FALSE(comp.empty() || comp == "." || comp == ".." ||
                 comp.find('/') != std::string::npos);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Names, EntryNameTest,
    ::testing::Values(
        NameCase{"Plain", "usr/bin/tool", "usr/bin/tool", {}},
        NameCase{"DotSlashPrefix", "./usr/bin/", "usr/bin", {}},
        NameCase{"AbsoluteIsRelativeToRoot", "/etc/passwd", "etc/passwd", {}},
        NameCase{"Root", "./", "", {}}, NameCase{"RootSlash", "/", "", {}},
        NameCase{"EmptyComponents", "a//b///c", "a/b/c", {}},
        NameCase{"InnerDotDot", "a/b/../c", "a/c", {}}, NameCase{"DotDotToRoot", "a/..", "", {}},
        NameCase{"BytesKept",
                 std::string("sp ace/quo\"te/new\nline/back\\slash/\xff\xfe"),
                 std::string("sp ace/quo\"te/new\nline/back\\slash/\xff\xfe"),
                 {}},
        NameCase{"RejectsDotDotEscape", "../etc/passwd", "", ErrorKind::kSafetyViolation},
        NameCase{"RejectsNestedDotDotEscape", "a/../../x", "", ErrorKind::kSafetyViolation},
        NameCase{"RejectsAbsoluteDotDotEscape", "/../x", "", ErrorKind::kSafetyViolation},
        NameCase{"RejectsNulInName", std::string("a\0b", 3), "", ErrorKind::kInvalidInput},
        NameCase{"RejectsOverlongName", std::string(5000, 'a'), "", ErrorKind::kLimitExceeded},
        NameCase{"RejectsTooDeep",
                 [] {
                   std::string s;
                   for (int i = 0; i < 600; ++i) s += "d/";
                   return s;
                 }(),
                 "", ErrorKind::kLimitExceeded}),
    [](const auto& info) { return std::string(info.param.label); });

TEST(CanonicalPathTest, AcceptsOnlyCleanRelativePaths) {
  EXPECT_TRUE(IsCanonicalPath(""));
  EXPECT_TRUE(IsCanonicalPath("a/b c/\xff"));
  for (std::string bad : std::vector<std::string>{"/a", "a/", "a//b", "./a", "a/.", "a/../b", "..",
                                                  std::string("a\0b", 3)}) {
    EXPECT_FALSE(IsCanonicalPath(bad)) << bad;
  }
}

}  // namespace
}  // namespace layerx::extractor
