// OCI image layouts as sources, through the CLI (root and rootless): platform
// choice, nested indexes, zstd, the config output, and every way a layout can
// lie: tampered blob, wrong diff_id, traversal digest, missing blob, symlinked
// blob leading out, truncated gzip, layer count mismatch, unknown media type.
// Each refusal is exit 1 (2 for a usage problem), one line, nothing left.
// And what whoever can write a layout, an archive or a shared dir may put where
// a file is read: a fifo (whose open waits for a writer forever, or whose
// silent writer makes the read wait), a device, a socket, a directory, in every
// document position; each is refused at once, before any clock would run.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>

#include "sandbox/sys.h"
#include "tests/fixtures/layer_writer.h"
#include "tests/fixtures/oci_layout.h"
#include "tests/fixtures/test_util.h"

namespace layerx {
namespace {

using nlohmann::json;
using testing::LayerWriter;
using testing::OciLayout;
using testing::ReadFile;

constexpr const char* kGzip = "application/vnd.oci.image.layer.v1.tar+gzip";

class SourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerx-source-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    layout_ = std::make_unique<OciLayout>(dir_ + "/oci");
    LayerWriter(dir_ + "/base.tar.gz", "gzip").File("etc/os-release", "base\n").Dir("usr/bin");
    LayerWriter(dir_ + "/app.tar.gz", "gzip").File("usr/bin/app", "app\n", 0755);
  }
  void TearDown() override { (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_); }

  // A good two-layer image tagged "v1".
  json GoodImage() {
    return layout_->AddImage({layout_->AddLayer(dir_ + "/base.tar.gz", kGzip),
                              layout_->AddLayer(dir_ + "/app.tar.gz", kGzip)});
  }

  int Extract(const std::string& source, const std::string& extra = "") {
    std::string err_file = dir_ + ".err";
    std::string cmd = std::string(LAYERX_BIN) + " extract '" + source + "' --rootfs " + dir_ +
                      "/out " + extra + " -q 2>" + err_file;
    int status = system(cmd.c_str());
    err_ = ReadFile(err_file);
    unlink(err_file.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  void ExpectRefused(const std::string& source, const std::string& why, int code = 1) {
    auto before = testing::Listing(dir_);
    EXPECT_EQ(Extract(source), code) << err_;
    EXPECT_EQ(std::count(err_.begin(), err_.end(), '\n'), 1) << err_;
    EXPECT_NE(err_.find(why), std::string::npos) << err_;
    EXPECT_EQ(testing::Listing(dir_), before) << "output or work dir left behind";
  }
  // `layerx extract ARGS --rootfs out` is refused at once: exit 1 well within
  // kPromptSeconds, one line naming `what`, nothing left beside the output (the
  // work dir goes there). A run that hangs is killed after a minute, so it
  // fails the test instead of wedging it.
  static constexpr double kPromptSeconds = 5;
  void ExpectRefusedAtOnce(const std::string& args, const std::string& what) {
    auto before = testing::Listing(dir_);
    std::string err_file = dir_ + ".err";
    std::string cmd = std::string("timeout -s KILL 60 ") + LAYERX_BIN + " extract " + args +
                      " --rootfs " + dir_ + "/out -q 2>" + err_file;
    auto start = std::chrono::steady_clock::now();
    int status = system(cmd.c_str());
    double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    err_ = ReadFile(err_file);
    unlink(err_file.c_str());
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status << ": " << err_;
    EXPECT_LT(seconds, kPromptSeconds) << cmd;
    EXPECT_EQ(std::count(err_.begin(), err_.end(), '\n'), 1) << err_;
    EXPECT_NE(err_.find(what), std::string::npos) << err_;
    EXPECT_EQ(testing::Listing(dir_), before) << "output or work dir left behind";
  }
  // Replaces `path` with a fifo nobody writes.
  static void MakeFifo(const std::string& path) {
    (void)unlink(path.c_str());
    ASSERT_EQ(mkfifo(path.c_str(), 0644), 0) << path;
  }

  std::string dir_, err_;
  std::unique_ptr<OciLayout> layout_;
};

TEST_F(SourceTest, ExtractsATaggedImageAndWritesItsConfig) {
  layout_->WriteIndex({{GoodImage(), "v1"}});
  ASSERT_EQ(Extract("oci:" + dir_ + "/oci:v1", "--config " + dir_ + "/config.json"), 0) << err_;
  EXPECT_EQ(ReadFile(dir_ + "/out/usr/bin/app"), "app\n");
  json config = json::parse(ReadFile(dir_ + "/config.json"));
  EXPECT_EQ(config["config"]["Cmd"][0], "/bin/sh");
}

TEST_F(SourceTest, InspectPrintsLayersAndConfig) {
  json image = GoodImage();
  layout_->WriteIndex({{image, "v1"}});
  std::string out_file = dir_ + ".json";
  std::string cmd =
      std::string(LAYERX_BIN) + " inspect oci:" + dir_ + "/oci:v1 --json >" + out_file;
  ASSERT_EQ(system(cmd.c_str()), 0);
  json info = json::parse(ReadFile(out_file));
  unlink(out_file.c_str());
  EXPECT_EQ(info["manifest_digest"], image["digest"]);
  ASSERT_EQ(info["layers"].size(), 2u);
  EXPECT_EQ(info["layers"][1]["diff_id"], OciLayout::DiffId(dir_ + "/app.tar.gz"));
  EXPECT_EQ(info["layers"][0]["media_type"], kGzip);
  EXPECT_EQ(info["config"]["Cmd"][0], "/bin/sh");
}

TEST_F(SourceTest, RefMayBeOmittedForASingleImageAndGivenByDigest) {
  json image = GoodImage();
  layout_->WriteIndex({{image, ""}});
  ASSERT_EQ(Extract("oci:" + dir_ + "/oci"), 0) << err_;
  (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_ + "/out");
  ASSERT_EQ(Extract("oci:" + dir_ + "/oci:@" + image["digest"].get<std::string>()), 0) << err_;
}

TEST_F(SourceTest, MultiPlatformIndexPicksThePlatform) {
  LayerWriter(dir_ + "/amd.tar.gz", "gzip").File("arch", "amd64");
  LayerWriter(dir_ + "/arm.tar.gz", "gzip").File("arch", "arm64");
  json amd = layout_->AddImage({layout_->AddLayer(dir_ + "/amd.tar.gz", kGzip)},
                               {{"os", "linux"}, {"architecture", "amd64"}});
  json arm = layout_->AddImage({layout_->AddLayer(dir_ + "/arm.tar.gz", kGzip)},
                               {{"os", "linux"}, {"architecture", "arm64"}, {"variant", "v8"}});
  layout_->WriteIndex({{layout_->AddIndex({arm, amd}), "multi"}});
  ASSERT_EQ(Extract("oci:" + dir_ + "/oci:multi", "--platform linux/arm64"), 0) << err_;
  EXPECT_EQ(ReadFile(dir_ + "/out/arch"), "arm64");
  (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_ + "/out");
  ASSERT_EQ(Extract("oci:" + dir_ + "/oci:multi", "--platform linux/amd64"), 0) << err_;
  EXPECT_EQ(ReadFile(dir_ + "/out/arch"), "amd64");
  (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_ + "/out");
  EXPECT_EQ(Extract("oci:" + dir_ + "/oci:multi", "--platform linux/s390x"), 2) << err_;
  EXPECT_NE(err_.find("no manifest for linux/s390x"), std::string::npos) << err_;
}

TEST_F(SourceTest, NestedIndexIsFollowed) {
  json image = layout_->AddImage({layout_->AddLayer(dir_ + "/base.tar.gz", kGzip)},
                                 {{"os", "linux"}, {"architecture", "amd64"}});
  json inner = layout_->AddIndex({image});
  inner["platform"] = {{"os", "linux"}, {"architecture", "amd64"}};
  layout_->WriteIndex({{layout_->AddIndex({inner}), "nested"}});
  ASSERT_EQ(Extract("oci:" + dir_ + "/oci:nested", "--platform linux/amd64"), 0) << err_;
  EXPECT_EQ(ReadFile(dir_ + "/out/etc/os-release"), "base\n");
}

TEST_F(SourceTest, ZstdLayers) {
  LayerWriter(dir_ + "/z.tar.zst", "zstd").File("z", "zstd");
  layout_->WriteIndex({{layout_->AddImage({layout_->AddLayer(
                            dir_ + "/z.tar.zst", "application/vnd.oci.image.layer.v1.tar+zstd")}),
                        "z"}});
  ASSERT_EQ(Extract("oci:" + dir_ + "/oci:z"), 0) << err_;
  EXPECT_EQ(ReadFile(dir_ + "/out/z"), "zstd");
}

TEST_F(SourceTest, RejectsTamperedBlob) {
  json layer = layout_->AddLayer(dir_ + "/app.tar.gz", kGzip);
  layout_->WriteIndex({{layout_->AddImage({layer}), "v1"}});
  std::string path = layout_->BlobPath(layer["digest"]);
  std::string bytes = ReadFile(path);
  bytes[bytes.size() / 2] ^= 0x01;
  std::ofstream(path, std::ios::binary) << bytes;
  ExpectRefused("oci:" + dir_ + "/oci:v1", "layer 1");
}

TEST_F(SourceTest, RejectsWrongDiffId) {
  json layer = layout_->AddLayer(dir_ + "/app.tar.gz", kGzip);
  layout_->WriteIndex(
      {{layout_->AddImage({layer}, nullptr, {std::string("sha256:") + std::string(64, 'a')}),
        "v1"}});
  ExpectRefused("oci:" + dir_ + "/oci:v1", "diff_id");
}

TEST_F(SourceTest, RejectsTraversalDigest) {
  json layer = layout_->AddLayer(dir_ + "/app.tar.gz", kGzip);
  layer["digest"] = "sha256:../../../../etc/passwd";
  layout_->WriteIndex(
      {{layout_->AddImage({layer}, nullptr, {std::string("sha256:") + std::string(64, 'a')}),
        "v1"}});
  ExpectRefused("oci:" + dir_ + "/oci:v1", "invalid digest");
  layout_->WriteIndex({{json{{"mediaType", "application/vnd.oci.image.manifest.v1+json"},
                             {"digest", "sha256:../../index.json"},
                             {"size", 10}},
                        "v1"}});
  ExpectRefused("oci:" + dir_ + "/oci:v1", "invalid digest");
}

TEST_F(SourceTest, RejectsMissingBlob) {
  json layer = layout_->AddLayer(dir_ + "/app.tar.gz", kGzip);
  layout_->WriteIndex({{layout_->AddImage({layer}), "v1"}});
  ASSERT_EQ(unlink(layout_->BlobPath(layer["digest"]).c_str()), 0);
  ExpectRefused("oci:" + dir_ + "/oci:v1", "layer 1");
}

TEST_F(SourceTest, RejectsBlobSymlinkedOutOfTheLayout) {
  json image = GoodImage();
  layout_->WriteIndex({{image, "v1"}});
  std::string manifest = layout_->BlobPath(image["digest"]);
  std::string copy = dir_ + "/outside-manifest.json";
  std::ofstream(copy) << ReadFile(manifest);
  ASSERT_EQ(unlink(manifest.c_str()), 0);
  ASSERT_EQ(symlink(copy.c_str(), manifest.c_str()), 0);
  ExpectRefused("oci:" + dir_ + "/oci:v1", "leads out of the layout");
}

TEST_F(SourceTest, RejectsTruncatedGzipEvenWithMatchingDigests) {
  std::string bytes = ReadFile(dir_ + "/app.tar.gz");
  std::ofstream(dir_ + "/short.tar.gz", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  layout_->WriteIndex(
      {{layout_->AddImage({layout_->AddLayer(dir_ + "/short.tar.gz", kGzip)}), "v1"}});
  ExpectRefused("oci:" + dir_ + "/oci:v1", "layer 1");
}

TEST_F(SourceTest, RejectsLayerCountMismatch) {
  json layer = layout_->AddLayer(dir_ + "/app.tar.gz", kGzip);
  layout_->WriteIndex({{layout_->AddImage({layer}, nullptr,
                                          {OciLayout::DiffId(dir_ + "/app.tar.gz"),
                                           OciLayout::DiffId(dir_ + "/base.tar.gz")}),
                        "v1"}});
  ExpectRefused("oci:" + dir_ + "/oci:v1", "diff_ids");
}

TEST_F(SourceTest, RejectsUnknownMediaType) {
  json layer = layout_->AddLayer(dir_ + "/app.tar.gz", "application/x-evil");
  layout_->WriteIndex({{layout_->AddImage({layer}), "v1"}});
  ExpectRefused("oci:" + dir_ + "/oci:v1", "unsupported media type");
}

TEST_F(SourceTest, RejectsUnknownTagAndAmbiguousIndex) {
  layout_->WriteIndex({{GoodImage(), "v1"}, {GoodImage(), "v2"}});
  ExpectRefused("oci:" + dir_ + "/oci:v3", "no image", 2);
  ExpectRefused("oci:" + dir_ + "/oci", "name one", 2);
}

// Whoever can write the layout swaps one of its documents for a fifo. Twice:
// with no writer (open(2) without O_NONBLOCK waits for one forever, before any
// clock runs: SIGTERM and --job-timeout did not end it), then with a writer
// that holds it open and never writes (the read waits instead). Refused at
// once, naming the file; the layer is the upper one, so the refusal comes
// before the lower layer is extracted, not after it.
enum class OciDocument { kOciLayout, kIndex, kManifest, kConfig, kLayer };

class OciFifoTest : public SourceTest, public ::testing::WithParamInterface<OciDocument> {};

TEST_P(OciFifoTest, RejectsFifoInPlaceOfADocumentAtOnce) {
  json image = GoodImage();
  layout_->WriteIndex({{image, "v1"}});
  json manifest = json::parse(ReadFile(layout_->BlobPath(image["digest"])));
  auto blob = [](const json& digest) {
    return "blobs/sha256/" + digest.get<std::string>().substr(7);
  };
  std::string rel;
  switch (GetParam()) {
    case OciDocument::kOciLayout:
      rel = "oci-layout";
      break;
    case OciDocument::kIndex:
      rel = "index.json";
      break;
    case OciDocument::kManifest:
      rel = blob(image["digest"]);
      break;
    case OciDocument::kConfig:
      rel = blob(manifest["config"]["digest"]);
      break;
    case OciDocument::kLayer:
      rel = blob(manifest["layers"][1]["digest"]);
      break;
  }
  std::string path = dir_ + "/oci/" + rel;
  MakeFifo(path);
  ExpectRefusedAtOnce("oci:" + dir_ + "/oci:v1", rel);
  EXPECT_NE(err_.find("is a fifo"), std::string::npos) << err_;
  if (GetParam() == OciDocument::kLayer) {
    EXPECT_NE(err_.find("layer 2"), std::string::npos) << err_;
  }
  int writer = open(path.c_str(), O_RDWR | O_CLOEXEC);  // O_RDWR: never waits
  ASSERT_GE(writer, 0);
  ExpectRefusedAtOnce("oci:" + dir_ + "/oci:v1", rel);
  close(writer);
}

INSTANTIATE_TEST_SUITE_P(Documents, OciFifoTest,
                         ::testing::Values(OciDocument::kOciLayout, OciDocument::kIndex,
                                           OciDocument::kManifest, OciDocument::kConfig,
                                           OciDocument::kLayer),
                         [](const auto& info) {
                           switch (info.param) {
                             case OciDocument::kOciLayout:
                               return "OciLayout";
                             case OciDocument::kIndex:
                               return "IndexJson";
                             case OciDocument::kManifest:
                               return "Manifest";
                             case OciDocument::kConfig:
                               return "Config";
                             case OciDocument::kLayer:
                               return "Layer";
                           }
                           return "";
                         });

// A layer file named on the command line that is not a regular file: a fifo
// (nobody writing, then a silent writer), a character device that never ends
// (/dev/zero: read until the 30 min layer clock before), a socket, a
// directory; and the same as a docker-archive. Refused at once, naming it.
TEST_F(SourceTest, RejectsLayerFileThatIsNotARegularFileAtOnce) {
  std::string fifo = dir_ + "/layer.fifo";
  MakeFifo(fifo);
  std::string sock = dir_ + "/layer.sock";
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(s, 0);
  struct sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, sock.data(), sock.size());
  ASSERT_EQ(bind(s, reinterpret_cast<struct sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(s, 1), 0);
  std::string subdir = dir_ + "/layer.dir";
  ASSERT_EQ(mkdir(subdir.c_str(), 0755), 0);
  std::string base = dir_ + "/base.tar.gz";
  for (const auto& [bad, kind] :
       std::vector<std::pair<std::string, std::string>>{{fifo, "a fifo"},
                                                        {"/dev/zero", "a character device"},
                                                        {sock, "a socket"},
                                                        {subdir, "a directory"}}) {
    SCOPED_TRACE(bad);
    ExpectRefusedAtOnce(base + " " + bad, "\"" + bad + "\" is " + kind);
    EXPECT_NE(err_.find("layer 2"), std::string::npos) << err_;
    ExpectRefusedAtOnce("docker-archive:" + bad, "\"" + bad + "\" is " + kind);
  }
  int writer = open(fifo.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(writer, 0);
  ExpectRefusedAtOnce(base + " " + fifo, "\"" + fifo + "\" is a fifo");
  ExpectRefusedAtOnce("docker-archive:" + fifo, "\"" + fifo + "\" is a fifo");
  close(writer);
  close(s);
}

// What the caller passes as an open descriptor may be a pipe: "/dev/stdin",
// "/dev/fd/N" (a shell's pipe, process substitution) are that descriptor, not
// a name to open. It is still checked: a terminal or /dev/null is refused.
TEST_F(SourceTest, LayerMayBeAPipeTheCallerPasses) {
  std::string cmd = std::string("cat ") + dir_ + "/base.tar.gz | timeout -s KILL 60 " + LAYERX_BIN +
                    " extract /dev/stdin /dev/fd/3 3<" + dir_ + "/app.tar.gz --rootfs " + dir_ +
                    "/out -q";
  ASSERT_EQ(system(cmd.c_str()), 0) << cmd;
  EXPECT_EQ(ReadFile(dir_ + "/out/etc/os-release"), "base\n");
  EXPECT_EQ(ReadFile(dir_ + "/out/usr/bin/app"), "app\n");
  (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_ + "/out");
  ExpectRefusedAtOnce("/dev/stdin </dev/null", "/dev/stdin is a character device");
  ExpectRefusedAtOnce("/dev/fd/900", "/dev/fd/900: not an open descriptor");
}

// docker-archive: an outer tar holding manifest.json, the config and the layer
// tars, built here so each test can break one thing.
class DockerArchiveTest : public SourceTest {
 protected:
  // layers: name in the archive -> layer file; manifest_layers: what manifest.json lists.
  void Write(const std::vector<std::pair<std::string, std::string>>& layers,
             const std::vector<std::string>& manifest_layers,
             std::vector<std::string> diff_ids = {}) {
    testing::WriteDockerArchive(dir_ + "/image.tar", layers, manifest_layers, std::move(diff_ids));
  }
};

TEST_F(DockerArchiveTest, ExtractsByTagAndAlone) {
  LayerWriter(dir_ + "/l1.tar").File("etc/os-release", "base\n");
  LayerWriter(dir_ + "/l2.tar").File("usr/bin/app", "app\n", 0755);
  Write({{"a/layer.tar", dir_ + "/l1.tar"}, {"b/layer.tar", dir_ + "/l2.tar"}},
        {"a/layer.tar", "b/layer.tar"});
  ASSERT_EQ(Extract("docker-archive:" + dir_ + "/image.tar:app:v1", "--config " + dir_ + "/c.json"),
            0)
      << err_;
  EXPECT_EQ(ReadFile(dir_ + "/out/usr/bin/app"), "app\n");
  EXPECT_EQ(json::parse(ReadFile(dir_ + "/c.json"))["os"], "linux");
  (void)sandbox::RemoveTreeAt(AT_FDCWD, dir_ + "/out");
  ASSERT_EQ(Extract("docker-archive:" + dir_ + "/image.tar"), 0) << err_;
}

TEST_F(DockerArchiveTest, RejectsLayerNotMatchingItsDiffId) {
  LayerWriter(dir_ + "/l1.tar").File("etc/os-release", "base\n");
  LayerWriter(dir_ + "/evil.tar").File("etc/os-release", "evil\n");
  Write({{"a/layer.tar", dir_ + "/evil.tar"}}, {"a/layer.tar"},
        {OciLayout::DiffId(dir_ + "/l1.tar")});
  ExpectRefused("docker-archive:" + dir_ + "/image.tar", "diff_id");
}

TEST_F(DockerArchiveTest, RejectsTraversalAndMissingLayers) {
  LayerWriter(dir_ + "/l1.tar").File("etc/os-release", "base\n");
  Write({{"a/layer.tar", dir_ + "/l1.tar"}}, {"../../../../etc/passwd"});
  ExpectRefused("docker-archive:" + dir_ + "/image.tar", "layer 1");
  Write({{"a/layer.tar", dir_ + "/l1.tar"}}, {"missing/layer.tar"});
  ExpectRefused("docker-archive:" + dir_ + "/image.tar", "layer 1");
}

TEST_F(DockerArchiveTest, ExtractsOlderArchivesWithoutManifest) {
  // docker save before 1.10: repositories -> top layer id -> json "parent" chain.
  LayerWriter(dir_ + "/l1.tar").File("etc/os-release", "base\n").File("f", "lower");
  LayerWriter(dir_ + "/l2.tar").File("f", "upper");
  std::string lower(64, 'a'), upper(64, 'b');
  LayerWriter(dir_ + "/old.tar")
      .File("repositories", json{{"app", {{"v1", upper}}}}.dump())
      .File(lower + "/json", json{{"id", lower}}.dump())
      .File(lower + "/layer.tar", ReadFile(dir_ + "/l1.tar"))
      .File(upper + "/json", json{{"id", upper}, {"parent", lower}, {"os", "linux"}}.dump())
      .File(upper + "/layer.tar", ReadFile(dir_ + "/l2.tar"));
  ASSERT_EQ(Extract("docker-archive:" + dir_ + "/old.tar:app:v1"), 0) << err_;
  EXPECT_EQ(ReadFile(dir_ + "/out/f"), "upper");
  EXPECT_EQ(ReadFile(dir_ + "/out/etc/os-release"), "base\n");
}

// The archive's author makes a fifo of a document inside it (the jailed
// extractor faithfully makes it in the staging dir, where the broker then
// reads): manifest.json, the config, a layer, and in an older archive
// `repositories` and a layer's json. Refused at once, naming it, nothing left.
TEST_F(DockerArchiveTest, RejectsFifoInsideTheArchiveAtOnce) {
  LayerWriter(dir_ + "/l1.tar").File("etc/os-release", "base\n");
  std::string diff_id = OciLayout::DiffId(dir_ + "/l1.tar");
  std::string config = json{{"os", "linux"},
                            {"architecture", "amd64"},
                            {"rootfs", {{"type", "layers"}, {"diff_ids", {diff_id}}}}}
                           .dump();
  std::string config_name = OciLayout::Sha256(config).substr(7) + ".json";
  json manifest = json::array(
      {{{"Config", config_name}, {"RepoTags", {"app:v1"}}, {"Layers", {"a/layer.tar"}}}});
  std::string image = dir_ + "/image.tar";
  {
    SCOPED_TRACE("manifest.json");
    LayerWriter(image)
        .Fifo("manifest.json")
        .File(config_name, config)
        .File("a/layer.tar", ReadFile(dir_ + "/l1.tar"));
    ExpectRefusedAtOnce("docker-archive:" + image, "\"manifest.json\" is a fifo");
  }
  {
    SCOPED_TRACE("config");
    LayerWriter(image)
        .File("manifest.json", manifest.dump())
        .Fifo(config_name)
        .File("a/layer.tar", ReadFile(dir_ + "/l1.tar"));
    ExpectRefusedAtOnce("docker-archive:" + image, "\"" + config_name + "\" is a fifo");
  }
  {
    SCOPED_TRACE("layer");
    LayerWriter(image)
        .File("manifest.json", manifest.dump())
        .File(config_name, config)
        .Fifo("a/layer.tar");
    ExpectRefusedAtOnce("docker-archive:" + image, "\"a/layer.tar\" is a fifo");
    EXPECT_NE(err_.find("layer 1"), std::string::npos) << err_;
  }
  std::string id(64, 'a');
  {
    SCOPED_TRACE("repositories");
    LayerWriter(image)
        .Fifo("repositories")
        .File(id + "/json", json{{"id", id}}.dump())
        .File(id + "/layer.tar", ReadFile(dir_ + "/l1.tar"));
    ExpectRefusedAtOnce("docker-archive:" + image, "\"repositories\" is a fifo");
  }
  {
    SCOPED_TRACE("legacy json");
    LayerWriter(image)
        .File("repositories", json{{"app", {{"v1", id}}}}.dump())
        .Fifo(id + "/json")
        .File(id + "/layer.tar", ReadFile(dir_ + "/l1.tar"));
    ExpectRefusedAtOnce("docker-archive:" + image, "\"" + id + "/json\" is a fifo");
  }
}

TEST_F(DockerArchiveTest, ArchiveMayBeAPipeTheCallerPasses) {
  LayerWriter(dir_ + "/l1.tar").File("etc/os-release", "base\n");
  Write({{"a/layer.tar", dir_ + "/l1.tar"}}, {"a/layer.tar"});
  std::string cmd = std::string("cat ") + dir_ + "/image.tar | timeout -s KILL 60 " + LAYERX_BIN +
                    " extract docker-archive:/dev/stdin --rootfs " + dir_ + "/out -q";
  ASSERT_EQ(system(cmd.c_str()), 0) << cmd;
  EXPECT_EQ(ReadFile(dir_ + "/out/etc/os-release"), "base\n");
}

TEST_F(DockerArchiveTest, RejectsUnknownTag) {
  LayerWriter(dir_ + "/l1.tar").File("f", "x");
  Write({{"a/layer.tar", dir_ + "/l1.tar"}}, {"a/layer.tar"});
  ExpectRefused("docker-archive:" + dir_ + "/image.tar:other:v2", "no image", 2);
}

}  // namespace
}  // namespace layerx
