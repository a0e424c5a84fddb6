// The broker is the judge: records from an extractor (which may be compromised)
// are validated before anything is merged. First the ImageTree on crafted
// records, then whole jobs whose "extractor" is a probe that lies on the wire.
#include <dirent.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>

#include "broker/tree/image_tree.h"
#include "broker/engine/job.h"
#include "sandbox/sys.h"
#include "tests/fixtures/test_util.h"

namespace layerx::broker {
namespace {

using extractor::EntryRecord;
using extractor::Kind;
using extractor::RemovalRecord;

struct BadRecord {
  const char* name;
  EntryRecord record;
};

class ImageTreeRejectsTest : public ::testing::TestWithParam<BadRecord> {};

TEST_P(ImageTreeRejectsTest, WithPeerError) {
  ImageTree tree(policy::Limits{});
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "dir", .kind = Kind::kDir, .mode = 0755}));
  ASSERT_TRUE(tree.Add(
      EntryRecord{.path = "link", .kind = Kind::kSymlink, .mode = 0777, .symlink_target = "/etc"}));
  size_t before = tree.size();
  Status status = tree.Add(GetParam().record);
  ASSERT_FALSE(status) << GetParam().name;
  EXPECT_EQ(status.error().kind(), ErrorKind::kPeer);
  EXPECT_EQ(tree.size(), before);
}

INSTANTIATE_TEST_SUITE_P(
    Records, ImageTreeRejectsTest,
    ::testing::Values(
        BadRecord{"AbsolutePath", {.path = "/etc/passwd", .kind = Kind::kFile}},
        BadRecord{"DotDot", {.path = "dir/../../etc", .kind = Kind::kFile}},
        BadRecord{"Dot", {.path = "dir/./x", .kind = Kind::kFile}},
        BadRecord{"EmptyComponent", {.path = "dir//x", .kind = Kind::kFile}},
        BadRecord{"TrailingSlash", {.path = "dir/", .kind = Kind::kFile}},
        BadRecord{"NulInPath", {.path = std::string("dir/a\0b", 7), .kind = Kind::kFile}},
        BadRecord{"OversizePath", {.path = std::string(5000, 'a'), .kind = Kind::kFile}},
        BadRecord{"RootAsFile", {.path = "", .kind = Kind::kFile}},
        BadRecord{"RootAsSymlink", {.path = "", .kind = Kind::kSymlink, .symlink_target = "/x"}},
        BadRecord{"ModeWithTypeBits", {.path = "f", .kind = Kind::kFile, .mode = 0100644}},
        BadRecord{"UidMinusOne", {.path = "f", .kind = Kind::kFile, .uid = 0xffffffffu}},
        BadRecord{"SymlinkWithoutTarget", {.path = "s", .kind = Kind::kSymlink}},
        BadRecord{"FileWithTarget", {.path = "f", .kind = Kind::kFile, .symlink_target = "x"}},
        BadRecord{"SizeOnDir", {.path = "d2", .kind = Kind::kDir, .size = 10}},
        BadRecord{"RdevOnFile", {.path = "f", .kind = Kind::kFile, .rdev_major = 1}},
        BadRecord{"UnderSymlink", {.path = "link/passwd", .kind = Kind::kFile}},
        BadRecord{"NoParent", {.path = "missing/file", .kind = Kind::kFile}},
        BadRecord{"HardlinkOutside",
                  {.path = "h", .kind = Kind::kHardlink, .hardlink_target = "../etc/shadow"}},
        BadRecord{"HardlinkToDir",
                  {.path = "h", .kind = Kind::kHardlink, .hardlink_target = "dir"}},
        BadRecord{"EmptyXattrName", {.path = "f", .kind = Kind::kFile, .xattrs = {{"", "v"}}}},
        BadRecord{
            "HugeXattr",
            {.path = "f", .kind = Kind::kFile, .xattrs = {{"user.x", std::string(1 << 20, 'v')}}}}),
    [](const auto& info) { return std::string("Rejects") + info.param.name; });

// Where a file's data went in the image, as the extractor reports it: checked
// like its name. The layer's window starts at 8 KiB, blocks of 4 KiB.
struct BadExtents {
  const char* name;
  EntryRecord record;
  bool window = true;
};

class ImageTreeRejectsExtentsTest : public ::testing::TestWithParam<BadExtents> {};

TEST_P(ImageTreeRejectsExtentsTest, WithPeerError) {
  ImageTree tree(policy::Limits{});
  tree.BeginLayer(DataWindow{.enabled = GetParam().window, .start = 8192, .block_size = 4096});
  size_t before = tree.size();
  Status status = tree.Add(GetParam().record);
  ASSERT_FALSE(status) << GetParam().name;
  EXPECT_EQ(status.error().kind(), ErrorKind::kPeer) << status.error().ToString();
  EXPECT_EQ(tree.size(), before);
}

EntryRecord FileWith(uint64_t size, std::vector<extractor::DataExtent> extents,
                     Kind kind = Kind::kFile) {
  return EntryRecord{.path = "f",
                     .kind = kind,
                     .mode = 0644,
                     .size = kind == Kind::kFile ? size : 0,
                     .data_bytes = kind == Kind::kFile ? size : 0,
                     .symlink_target = kind == Kind::kSymlink ? "t" : "",
                     .extents = std::move(extents)};
}

INSTANTIATE_TEST_SUITE_P(
    Records, ImageTreeRejectsExtentsTest,
    ::testing::Values(
        BadExtents{"WithoutADataFd", FileWith(10, {{0, 8192, 10}}), false},
        BadExtents{"OnADirectory", FileWith(0, {{0, 8192, 10}}, Kind::kDir)},
        BadExtents{"OnASymlink", FileWith(0, {{0, 8192, 10}}, Kind::kSymlink)},
        BadExtents{"BelowTheLayersWindow", FileWith(10, {{0, 4096, 10}})},
        BadExtents{"AtTheSuperblock", FileWith(10, {{0, 0, 10}})},
        BadExtents{"PhysicalNotBlockAligned", FileWith(10, {{0, 8193, 10}})},
        BadExtents{"LogicalNotBlockAligned", FileWith(5000, {{100, 8192, 10}})},
        BadExtents{"Empty", FileWith(10, {{0, 8192, 0}})},
        BadExtents{"PastTheFilesSize", FileWith(10, {{0, 8192, 11}})},
        BadExtents{"LogicalPastTheSize", FileWith(10, {{4096, 8192, 10}})},
        BadExtents{"Descending", FileWith(9000, {{4096, 8192, 10}, {0, 12288, 10}})},
        BadExtents{"SameBlockTwice", FileWith(9000, {{0, 8192, 10}, {0, 12288, 10}})},
        BadExtents{"OverlappingBlocks", FileWith(9000, {{0, 8192, 5000}, {4096, 16384, 10}})},
        BadExtents{"MoreThanTheSize", FileWith(8192, {{0, 8192, 4096}, {4096, 16384, 8192}})},
        BadExtents{"WrappingPhysical", FileWith(10, {{0, UINT64_MAX - 4095, 10}})}),
    [](const auto& info) { return std::string("Rejects") + info.param.name; });

TEST(ImageTreeTest, RejectsALayersRecordsNamingOneBlockTwice) {
  // Each record alone is fine; the second names the block the first has.
  ImageTree tree(policy::Limits{});
  tree.BeginLayer(DataWindow{.enabled = true, .start = 8192, .block_size = 4096});
  ASSERT_TRUE(tree.Add(EntryRecord{
      .path = "a", .kind = Kind::kFile, .size = 10, .data_bytes = 10, .extents = {{0, 8192, 10}}}));
  Status status = tree.Add(EntryRecord{
      .path = "b", .kind = Kind::kFile, .size = 10, .data_bytes = 10, .extents = {{0, 8192, 10}}});
  ASSERT_FALSE(status);
  EXPECT_EQ(status.error().kind(), ErrorKind::kPeer);
}

TEST(ImageTreeTest, ExtentsCountAgainstTheImageLimitWhateverDataBytesSays) {
  // dataBytes 0, and 1 MiB placed: the limit counts the megabyte.
  policy::Limits limits;
  limits.max_image_bytes = 64 * 1024;
  ImageTree tree(limits);
  tree.BeginLayer(DataWindow{.enabled = true, .start = 8192, .block_size = 4096});
  Status status = tree.Add(EntryRecord{.path = "big",
                                       .kind = Kind::kFile,
                                       .size = 1 << 20,
                                       .data_bytes = 0,
                                       .extents = {{0, 8192, 1 << 20}}});
  ASSERT_FALSE(status);
  EXPECT_EQ(status.error().kind(), ErrorKind::kLimitExceeded);
}

TEST(ImageTreeTest, AcceptsSparseExtentsInTheWindow) {
  ImageTree tree(policy::Limits{});
  tree.BeginLayer(DataWindow{.enabled = true, .start = 8192, .block_size = 4096});
  // 10 bytes at 0 and 10 at 1 MiB: two runs, each at its own block.
  ASSERT_TRUE(tree.Add(FileWith((1 << 20) + 10, {{0, 8192, 10}, {1 << 20, 12288, 10}})));
  EXPECT_EQ(tree.layer_data_end(), 12288u + 10);
}

TEST(ImageTreeTest, RejectsRemovalOfRootOrBadPath) {
  ImageTree tree(policy::Limits{});
  EXPECT_FALSE(tree.Add(RemovalRecord{"", false}));
  EXPECT_FALSE(tree.Add(RemovalRecord{"/etc", false}));
  EXPECT_FALSE(tree.Add(RemovalRecord{"a/..", false}));
}

TEST(ImageTreeTest, RemovalDropsTheSubtreeOnly) {
  ImageTree tree(policy::Limits{});
  for (const char* dir : {"a", "a/b", "a-b", "a0"}) {
    ASSERT_TRUE(tree.Add(EntryRecord{.path = dir, .kind = Kind::kDir, .mode = 0755}));
  }
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "a/b/f", .kind = Kind::kFile, .mode = 0644}));
  ASSERT_TRUE(tree.Add(RemovalRecord{"a", false}));
  std::vector<std::string> left;
  for (const auto& [path, inode] : tree.entries()) left.push_back(path);
  EXPECT_EQ(left, (std::vector<std::string>{"", "a-b", "a0"}));
}

TEST(ImageTreeTest, HardlinksShareOneInode) {
  ImageTree tree(policy::Limits{});
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "f", .kind = Kind::kFile, .uid = 7, .mode = 04755}));
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "g", .kind = Kind::kHardlink, .hardlink_target = "f"}));
  EXPECT_EQ(tree.entries().at("f"), tree.entries().at("g"));
  EXPECT_EQ(tree.entries().at("g")->meta.uid, 7u);
  // Replacing one name leaves the other with the old inode.
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "f", .kind = Kind::kFile, .mode = 0600}));
  EXPECT_NE(tree.entries().at("f"), tree.entries().at("g"));
  EXPECT_EQ(tree.entries().at("g")->meta.mode, 04755u);
}

TEST(ImageTreeTest, HardlinkToAnUnknownTargetIsInvalidInput) {
  // The extractor sends a link whose target is on no disk (a device node lives
  // in the tree only); when the tree has none either, the layer was bad.
  ImageTree tree(policy::Limits{});
  Status status =
      tree.Add(EntryRecord{.path = "h", .kind = Kind::kHardlink, .hardlink_target = "nope"});
  ASSERT_FALSE(status);
  EXPECT_EQ(status.error().kind(), ErrorKind::kInvalidInput);
  EXPECT_EQ(status.error().entry(), "h");
  EXPECT_EQ(tree.size(), 1u);
}

TEST(ImageTreeTest, HardlinkToADeviceSharesItsInode) {
  ImageTree tree(policy::Limits{});
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "dev", .kind = Kind::kDir, .mode = 0755}));
  ASSERT_TRUE(tree.Add(EntryRecord{
      .path = "dev/tty0", .kind = Kind::kChar, .mode = 0620, .rdev_major = 4, .rdev_minor = 0}));
  tree.BeginLayer();
  ASSERT_TRUE(tree.Add(
      EntryRecord{.path = "dev/console", .kind = Kind::kHardlink, .hardlink_target = "dev/tty0"}));
  EXPECT_EQ(tree.entries().at("dev/console"), tree.entries().at("dev/tty0"));
  // A link to itself only asks whether the name exists.
  EXPECT_TRUE(tree.Add(
      EntryRecord{.path = "dev/tty0", .kind = Kind::kHardlink, .hardlink_target = "dev/tty0"}));
  EXPECT_FALSE(tree.Add(
      EntryRecord{.path = "dev/tty9", .kind = Kind::kHardlink, .hardlink_target = "dev/tty9"}));
}

// An opaque marker (or a whiteout of a dir this layer wrote into) hides what
// lower layers put below the dir, the device nodes on no disk included; the
// layer's own entries, and the lower dirs leading to them, stay.
TEST(ImageTreeTest, OpaqueDirHidesLowerLayersOnly) {
  ImageTree tree(policy::Limits{});
  tree.BeginLayer();
  for (const char* dir : {"d", "d/sub", "d/old", "d-x", "e"}) {
    ASSERT_TRUE(tree.Add(EntryRecord{.path = dir, .kind = Kind::kDir, .mode = 0755}));
  }
  ASSERT_TRUE(tree.Add(EntryRecord{
      .path = "d/null", .kind = Kind::kChar, .mode = 0666, .rdev_major = 1, .rdev_minor = 3}));
  for (const char* file : {"d/keep", "d/sub/lower", "d/old/lower", "d-x/f", "e/f"}) {
    ASSERT_TRUE(tree.Add(EntryRecord{.path = file, .kind = Kind::kFile, .mode = 0644}));
  }
  tree.BeginLayer();
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "d/new", .kind = Kind::kFile, .mode = 0644}));
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "d/sub/mine", .kind = Kind::kFile, .mode = 0644}));
  // A name of this layer for a lower inode outside d, and one in d for a lower inode in d.
  ASSERT_TRUE(
      tree.Add(EntryRecord{.path = "d/link", .kind = Kind::kHardlink, .hardlink_target = "e/f"}));
  ASSERT_TRUE(tree.Add(
      EntryRecord{.path = "e/null", .kind = Kind::kHardlink, .hardlink_target = "d/null"}));
  ASSERT_TRUE(tree.Add(RemovalRecord{.path = "d", .opaque_dir = true}));
  std::vector<std::string> left;
  for (const auto& [path, inode] : tree.entries()) left.push_back(path);
  EXPECT_EQ(left, (std::vector<std::string>{"", "d", "d-x", "d-x/f", "d/link", "d/new", "d/sub",
                                            "d/sub/mine", "e", "e/f", "e/null"}));
  EXPECT_EQ(tree.entries().at("e/null")->meta.kind, Kind::kChar);
  // At the root: everything of lower layers goes; what this layer made stays.
  ASSERT_TRUE(tree.Add(RemovalRecord{.path = "", .opaque_dir = true}));
  left.clear();
  for (const auto& [path, inode] : tree.entries()) left.push_back(path);
  EXPECT_EQ(left, (std::vector<std::string>{"", "d", "d/link", "d/new", "d/sub", "d/sub/mine", "e",
                                            "e/null"}));
}

TEST(ImageTreeTest, RejectsOpaqueDirThatIsNoDirectoryOfTheTree) {
  ImageTree tree(policy::Limits{});
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "d", .kind = Kind::kDir, .mode = 0755}));
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "d/f", .kind = Kind::kFile, .mode = 0644}));
  for (const char* path : {"d/f", "missing", "/d", "d/", "d/../d", "./d"}) {
    Status status = tree.Add(RemovalRecord{.path = path, .opaque_dir = true});
    ASSERT_FALSE(status) << path;
    EXPECT_EQ(status.error().kind(), ErrorKind::kPeer) << path;
  }
  EXPECT_EQ(tree.size(), 3u);
}

TEST(ImageTreeTest, FileOverDirDropsChildrenDirOverDirMerges) {
  ImageTree tree(policy::Limits{});
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "d", .kind = Kind::kDir, .mode = 0755}));
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "d/x", .kind = Kind::kFile, .mode = 0644}));
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "d", .kind = Kind::kDir, .uid = 5, .mode = 0700}));
  EXPECT_EQ(tree.size(), 3u);
  EXPECT_EQ(tree.entries().at("d")->meta.uid, 5u);
  ASSERT_TRUE(tree.Add(EntryRecord{.path = "d", .kind = Kind::kFile, .mode = 0644}));
  EXPECT_EQ(tree.size(), 2u);
}

// Whole jobs against a lying extractor: the job fails with kPeer, and no
// output or work dir is left.
class LyingExtractorTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerx-liar-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    std::ofstream(dir_ + "/layer.tar") << std::string(10240, '\0');
  }
  void TearDown() override { (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_); }
  std::vector<std::string> Listing() { return testing::Listing(dir_); }
  std::string dir_;
};

TEST_P(LyingExtractorTest, BrokerRevalidatesWhatExtractorSent) {
  ExtractRequest request;
  request.layers = {dir_ + "/layer.tar"};
  request.rootfs = dir_ + "/out";
  request.manifest = dir_ + "/m.jsonl";
  request.policy = policy::DefaultPolicy();
  request.extractor_path = LAYERX_JAIL_PROBE;
  request.extractor_args = {GetParam()};
  auto before = Listing();
  auto report = RunExtract(request);
  ASSERT_FALSE(report) << GetParam();
  EXPECT_EQ(report.error().kind(), ErrorKind::kPeer) << report.error().ToString();
  EXPECT_EQ(Listing(), before) << "output or work dir left behind";
}

// The same liars, with an ext4 image: the data records are judged too, and
// two live files on one block are caught when the image is built.
class LyingAboutDataTest : public LyingExtractorTest {};

TEST_P(LyingAboutDataTest, BrokerRefusesTheDataRecords) {
  ExtractRequest request;
  request.layers = {dir_ + "/layer.tar"};
  request.ext4 = dir_ + "/out.img";
  request.policy = policy::DefaultPolicy();
  request.extractor_path = LAYERX_JAIL_PROBE;
  request.extractor_args = {GetParam()};
  auto before = Listing();
  auto report = RunExtract(request);
  ASSERT_FALSE(report) << GetParam();
  EXPECT_EQ(report.error().kind(), ErrorKind::kPeer) << report.error().ToString();
  EXPECT_EQ(Listing(), before) << "output or work dir left behind";
}

INSTANTIATE_TEST_SUITE_P(Lies, LyingAboutDataTest,
                         ::testing::Values("lie-extent-below", "lie-extent-past-written",
                                           "lie-extent-overlap", "lie-extent-past-size"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

INSTANTIATE_TEST_SUITE_P(Lies, LyingExtractorTest,
                         ::testing::Values("lie-absolute", "lie-dotdot", "lie-empty-component",
                                           "lie-root-file", "lie-huge-path", "lie-no-parent",
                                           "lie-mode", "lie-hardlink", "lie-removal-root",
                                           "lie-kind", "lie-garbage", "socket"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace layerx::broker
