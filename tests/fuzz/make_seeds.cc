// make_fuzz_seeds OUTDIR: writes the generated seed inputs of the fuzz targets,
// OUTDIR/fuzz_apply/* (layers, written with the fixtures' libarchive writer) and
// OUTDIR/fuzz_records/* (record streams, written with the extractor's own
// ChannelWriter), so no opaque binary seed lives in the repository. The text
// seeds (TOML, the sources format) are committed in corpus/ instead.
// scripts/fuzz.sh runs this into the working copy of the corpus.
#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "extractor/wire/codec.h"
#include "tests/fixtures/layer_writer.h"

namespace {

using layerx::testing::LayerWriter;
namespace extractor = layerx::extractor;
namespace wire = layerx::wire;

// Must match fuzz_apply.cc.
constexpr const char* kLayerSeparator = "--layerx-fuzz-next-layer--";

std::string g_out;

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void Save(const std::string& target, const std::string& name, const std::string& bytes) {
  std::string dir = g_out + "/" + target;
  ::mkdir(dir.c_str(), 0755);
  std::ofstream(dir + "/" + name, std::ios::binary) << bytes;
}

// One layer, as the bytes a blob would hold.
std::string Layer(const std::string& filter, const std::function<void(LayerWriter&)>& fill) {
  std::string path = g_out + "/.layer.tmp";
  {
    LayerWriter w(path, filter);
    fill(w);
  }
  std::string bytes = ReadAll(path);
  ::unlink(path.c_str());
  return bytes;
}

// A layer written entry by entry with libarchive's pax writer, for headers
// LayerWriter does not make.
std::string RawLayer(const std::function<void(struct archive*)>& fill) {
  std::string path = g_out + "/.layer.tmp";
  struct archive* a = archive_write_new();
  archive_write_set_format_pax(a);
  if (archive_write_open_filename(a, path.c_str()) != ARCHIVE_OK) {
    throw std::runtime_error("cannot write " + path);
  }
  fill(a);
  archive_write_close(a);
  archive_write_free(a);
  std::string bytes = ReadAll(path);
  ::unlink(path.c_str());
  return bytes;
}

std::string Layers(const std::vector<std::string>& layers) {
  std::string out;
  for (const std::string& l : layers) out += (out.empty() ? "" : kLayerSeparator) + l;
  return out;
}

void ApplySeeds() {
  // Every kind, owners, xattrs (kept, dropped, our own channel), a device.
  auto kinds = [](LayerWriter& w) {
    w.Dir("./", 0755)
        .Dir("etc", 0755)
        .File("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0644)
        .File("etc/shadow", "root:*:1::::::\n", 0640, 0, 42)
        .File("bin/su", "#!/bin/sh\n", 04755, 0, 0, {{"security.capability", "\x01\x02"}})
        .File("x", "x", 0600, 1000, 1000,
              {{"user.note", "hi"}, {"trusted.x", "no"}, {"user.rootlesscontainers", "no"}})
        .Symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .Hardlink("bin/su2", "bin/su")
        .Fifo("run/fifo")
        .Device("dev/null", false, 1, 3)
        .Device("dev/sda", true, 8, 0);
  };
  Save("fuzz_apply", "kinds.tar", Layer("", kinds));
  Save("fuzz_apply", "kinds.tar.gz", Layer("gzip", kinds));
  Save("fuzz_apply", "kinds.tar.zst", Layer("zstd", kinds));
  Save("fuzz_apply", "kinds.tar.xz", Layer("xz", kinds));
  Save("fuzz_apply", "kinds.tar.bz2", Layer("bzip2", kinds));

  // usrmerge, /etc/alternatives and resolv.conf: intermediate links are followed.
  Save("fuzz_apply", "links.tar.gz", Layer("gzip", [](LayerWriter& w) {
         w.Dir("usr/bin")
             .Symlink("bin", "usr/bin")
             .File("bin/sh", "sh")
             .Symlink("etc/alternatives/vi", "/usr/bin/vim")
             .Symlink("etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf")
             .File("etc/resolv.conf", "nameserver 1.1.1.1\n")
             .Symlink("loop1", "loop2")
             .Symlink("loop2", "loop1");
       }));

  // Escape attempts: links that climb out, absolute targets, .. in names; the
  // sentinel dir stands beside the rootfs. All stay inside (or are refused).
  Save("fuzz_apply", "escapes.tar", Layer("", [](LayerWriter& w) {
         w.Symlink("up", "../../../../..")
             .File("up/escaped", "x")
             .Symlink("abs", "/tmp")
             .File("abs/escaped", "x")
             .Dir("a/b")
             .Symlink("a/b/c", "../../..")
             .File("a/b/c/escaped", "x")
             .Symlink("a/b/s", "../../../sentinel")
             .File("a/b/s/escaped", "x")
             .Hardlink("a/b/c/sentinel/h", "up/escaped");
       }));
  Save("fuzz_apply", "escape-name.tar", Layer("", [](LayerWriter& w) {
         w.File("a/../../sentinel/escaped", "x");
       }));
  Save("fuzz_apply", "loop.tar", Layer("", [](LayerWriter& w) {
         w.Symlink("sentinel", "../sentinel").File("sentinel/escaped", "x");
       }));
  Save("fuzz_apply", "hardlink-out.tar", Layer("", [](LayerWriter& w) {
         w.Symlink("up", "..").Hardlink("link", "up/sentinel");
       }));

  // The leaf is never followed; dir-on-dir merges; replacements both ways.
  Save("fuzz_apply", "replace.tar", Layer("", [](LayerWriter& w) {
         w.Symlink("leaf", "/etc/passwd")
             .File("leaf", "replaced")
             .Dir("d")
             .File("d/f", "f")
             .File("d", "now a file")
             .File("f", "file")
             .Dir("f")
             .Dir("f", 0700)
             .File("f/g", "g")
             .Hardlink("f/h", "f/g")
             .File("f/g", "new g");
       }));

  // Modes a rootless extractor must open up: 0555 and 0000 dirs with children.
  Save("fuzz_apply", "modes.tar", Layer("", [](LayerWriter& w) {
         w.Dir("ro", 0555).File("ro/f", "f").Dir("none", 0).File("none/f", "f", 0).Dir("./", 0700);
       }));

  // A hardlink before its target; a sparse file.
  Save("fuzz_apply", "deferred.tar", Layer("", [](LayerWriter& w) {
         w.Hardlink("early", "late").File("late", "data").Sparse("sparse", 1 << 20, 4096, "mid");
       }));

  // Regression: a refused name ending inside a UTF-8 sequence, which the
  // broker escapes with {:?} (fmt 9.0's copy in libspdlog aborted on it).
  Save("fuzz_apply", "regress-fmt-escape.tar", Layer("", [](LayerWriter& w) {
         w.File("ok", "").File("../a\xee", "");
       }));

  // Regression: an mtime past 2262, whose nanoseconds overflowed an int64.
  Save("fuzz_apply", "regress-mtime-overflow.tar", RawLayer([](struct archive* a) {
         archive_entry* e = archive_entry_new();
         archive_entry_copy_pathname(e, "future");
         archive_entry_set_filetype(e, AE_IFREG);
         archive_entry_set_perm(e, 0644);
         archive_entry_set_mtime(e, 170000010230, 0);
         archive_write_header(a, e);
         archive_entry_free(e);
       }));

  // Layers: whiteouts and opaque markers hide lower layers, never their own.
  std::string lower = Layer("", [](LayerWriter& w) {
    w.Dir("a").File("a/b", "b").File("a/c", "c").Dir("o").File("o/old", "old").File("gone", "g");
    w.Device("a/dev", false, 1, 5).Fifo("o/fifo").Symlink("lnk", "a");
  });
  std::string upper = Layer("gzip", [](LayerWriter& w) {
    w.Whiteout("a", "b")
        .Whiteout("", "gone")
        .File("o/new", "new")
        .Opaque("o")
        .Whiteout("a", "dev")
        .File("lnk/through", "t")
        .Whiteout("", "lnk")
        .File("gone", "back");
  });
  std::string top = Layer("zstd", [](LayerWriter& w) {
    w.Opaque("").File("only", "only").Whiteout("", "a");
  });
  Save("fuzz_apply", "layers-whiteout", Layers({lower, upper}));
  Save("fuzz_apply", "layers-three", Layers({lower, upper, top}));
  // Device nodes live in the metadata only: an opaque marker and a whiteout of
  // a dir this layer wrote into must hide lower ones; hardlinks to a lower
  // layer's device and to one of the same layer (before and after it).
  std::string devices = Layer("", [](LayerWriter& w) {
    w.Dir("d").Device("d/null", false, 1, 3).File("d/keep", "k").Dir("d/sub");
    w.Device("d/sub/zero", false, 1, 5).Dir("w").Device("w/tty", false, 4, 0);
    w.Device("dev-tty0", false, 4, 0).Dir("e").Device("e/blk", true, 8, 0);
  });
  std::string device_links = Layer("", [](LayerWriter& w) {
    w.File("d/sub/mine", "m")
        .Opaque("d")
        .File("w/new", "n")
        .Whiteout("", "w")
        .Hardlink("console", "dev-tty0")
        .Hardlink("early", "e/late")
        .Device("e/late", false, 1, 7)
        .Hardlink("e/blk2", "e/blk");
  });
  Save("fuzz_apply", "layers-devices", Layers({devices, device_links}));
  Save("fuzz_apply", "layers-replace", Layers({Layer("", [](LayerWriter& w) {
                                                 w.Dir("ro", 0555).File("ro/f", "f").Dir("x");
                                               }),
                                               Layer("", [](LayerWriter& w) {
                                                 w.File("ro/g", "g").File("x", "x").Dir("ro/f");
                                               })}));
}

// A file that collects what a ChannelWriter sends.
class StreamFile {
 public:
  explicit StreamFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) throw std::runtime_error("cannot write " + path);
  }
  ~StreamFile() { ::close(fd_); }
  int fd() const { return fd_; }

 private:
  std::string path_;
  int fd_;
};

void RecordSeeds() {
  using extractor::EntryRecord;
  using extractor::Kind;
  using extractor::RemovalRecord;
  std::string dir = g_out + "/fuzz_records";
  ::mkdir(dir.c_str(), 0755);
  auto summary = [](wire::Summary::Builder s) {
    s.setEntries(9);
    s.setFileBytes(12);
    s.setUncompressedBytes(10240);
    s.setUncompressedDigest(
        "sha256:0000000000000000000000000000000000000000000000000000000000000000");
  };
  {
    // A layer as an honest extractor reports it, in batches of three.
    StreamFile f(dir + "/layer");
    wire::ChannelWriter w(f.fd(), 3);
    (void)w.Add(EntryRecord{.path = "", .kind = Kind::kDir, .mode = 0755});
    (void)w.Add(EntryRecord{.path = "etc", .kind = Kind::kDir, .mode = 0755, .mtime_ns = 1});
    (void)w.Add(EntryRecord{
        .path = "etc/passwd", .kind = Kind::kFile, .mode = 0644, .size = 5, .data_bytes = 5});
    (void)w.Add(EntryRecord{.path = "bin",
                            .kind = Kind::kSymlink,
                            .mode = 0777,
                            .symlink_target = "usr/bin"});
    (void)w.Add(EntryRecord{.path = "etc/su",
                            .kind = Kind::kFile,
                            .uid = 1000,
                            .gid = 1000,
                            .mode = 04755,
                            .size = 7,
                            .data_bytes = 3,
                            .xattrs = {{"security.capability", "\x01"}, {"user.a", "b"}}});
    (void)w.Add(EntryRecord{.path = "etc/su2",
                            .kind = Kind::kHardlink,
                            .mode = 04755,
                            .hardlink_target = "etc/su"});
    (void)w.Add(EntryRecord{
        .path = "null", .kind = Kind::kChar, .mode = 0666, .rdev_major = 1, .rdev_minor = 3});
    (void)w.Add(EntryRecord{.path = "fifo", .kind = Kind::kFifo, .mode = 0600});
    (void)w.Add(RemovalRecord{"etc/passwd", false});
    (void)w.Add(EntryRecord{.path = "etc/\xff\n name", .kind = Kind::kDir, .mode = 0700});
    (void)w.Add(RemovalRecord{"etc", true});
    (void)w.SendSummary(summary);
  }
  {
    // Two layers' streams: devices below, then a hardlink to one and opaque
    // dirs (one of them the root) hiding the rest.
    StreamFile f(dir + "/two-layers");
    wire::ChannelWriter w(f.fd(), 2);
    (void)w.Add(EntryRecord{.path = "dev", .kind = Kind::kDir, .mode = 0755});
    (void)w.Add(EntryRecord{
        .path = "dev/tty0", .kind = Kind::kChar, .mode = 0620, .rdev_major = 4, .rdev_minor = 0});
    (void)w.Add(EntryRecord{.path = "d", .kind = Kind::kDir, .mode = 0755});
    (void)w.Add(EntryRecord{
        .path = "d/null", .kind = Kind::kChar, .mode = 0666, .rdev_major = 1, .rdev_minor = 3});
    (void)w.Add(EntryRecord{.path = "d/keep", .kind = Kind::kFile, .mode = 0644});
    (void)w.SendSummary(summary);
    (void)w.Add(
        EntryRecord{.path = "dev/console", .kind = Kind::kHardlink, .hardlink_target = "dev/tty0"});
    (void)w.Add(EntryRecord{.path = "d/new", .kind = Kind::kFile, .mode = 0644});
    (void)w.Add(RemovalRecord{.path = "d", .opaque_dir = true});
    (void)w.Add(RemovalRecord{.path = "", .opaque_dir = true});
    (void)w.SendSummary(summary);
  }
  {
    // Two layers with data in the image (windows from 64 KiB on, 4 KiB
    // blocks): a sparse file, a hardlink to it, a file the second layer
    // replaces, and one whose data claims the first layer's block.
    StreamFile f(dir + "/data-extents");
    wire::ChannelWriter w(f.fd(), 2);
    const uint64_t k = 4096, start = 64 * 1024;
    (void)w.Add(EntryRecord{.path = "f",
                            .kind = Kind::kFile,
                            .mode = 0644,
                            .size = 3 * k + 10,
                            .data_bytes = 20,
                            .extents = {{0, start, 10}, {3 * k, start + k, 10}}});
    (void)w.Add(EntryRecord{.path = "g", .kind = Kind::kHardlink, .hardlink_target = "f"});
    (void)w.Add(EntryRecord{.path = "old",
                            .kind = Kind::kFile,
                            .mode = 0644,
                            .size = 2 * k,
                            .data_bytes = 2 * k,
                            .extents = {{0, start + 2 * k, 2 * k}}});
    (void)w.SendSummary(summary);
    (void)w.Add(EntryRecord{.path = "old",
                            .kind = Kind::kFile,
                            .mode = 0600,
                            .size = 5,
                            .data_bytes = 5,
                            .extents = {{0, start + 4 * k, 5}}});
    (void)w.Add(EntryRecord{.path = "thief",
                            .kind = Kind::kFile,
                            .mode = 0600,
                            .size = 5,
                            .data_bytes = 5,
                            .extents = {{0, start, 5}}});
    (void)w.SendSummary(summary);
  }
  {
    // A refused layer: records, then the failure.
    StreamFile f(dir + "/failure");
    wire::ChannelWriter w(f.fd());
    (void)w.Add(EntryRecord{.path = "a", .kind = Kind::kDir, .mode = 0755});
    (void)w.Flush();
    (void)w.SendFailure(layerx::MakeError(layerx::ErrorKind::kSafetyViolation, "climbs"),
                        "../etc/passwd");
  }
  {
    // Regression: a refused record whose path ends inside a UTF-8 sequence is
    // named with {:?} (fmt 9.0's copy in libspdlog aborted on it).
    StreamFile f(dir + "/regress-fmt-escape");
    wire::ChannelWriter w(f.fd());
    (void)w.Add(EntryRecord{.path = "", .kind = Kind::kDir, .mode = 0755});
    (void)w.Add(EntryRecord{.path = "etc/pass\xeew", .kind = Kind::kFile, .mode = 0644});
    (void)w.SendSummary(summary);
  }
  {
    // Records a lying extractor might send: each is refused somewhere.
    StreamFile f(dir + "/lies");
    wire::ChannelWriter w(f.fd(), 1);
    (void)w.Add(EntryRecord{.path = "f", .kind = Kind::kFile, .mode = 0644});
    (void)w.Add(EntryRecord{.path = "f/x", .kind = Kind::kFile, .mode = 0644});
    (void)w.Add(EntryRecord{.path = "../x", .kind = Kind::kFile});
    (void)w.Add(EntryRecord{.path = "h", .kind = Kind::kHardlink, .hardlink_target = ""});
    (void)w.Add(EntryRecord{.path = "", .kind = Kind::kFile});
    (void)w.SendSummary(summary);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_fuzz_seeds OUTDIR\n");
    return 2;
  }
  g_out = argv[1];
  ::mkdir(g_out.c_str(), 0755);
  ApplySeeds();
  RecordSeeds();
  return 0;
}
