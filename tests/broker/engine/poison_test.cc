// Nothing is ever loaded from the image (DESIGN rule 6, the docker cp
// CVE-2019-14271 class): an image that ships a poisoned dynamic loader,
// libnss_files, gconv modules, ld.so.preload and an OpenSSL config naming a
// poisoned engine, followed by a layer whose entries would make a careless
// extractor look up users and groups, convert names and run external
// decompressors, must extract without any of that code running.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>

#include "sandbox/sys.h"
#include "tests/fixtures/layer_writer.h"
#include "tests/fixtures/test_util.h"

namespace layerx {
namespace {

using testing::LayerWriter;
using testing::ReadFile;

TEST(PoisonTest, NothingFromTheImageEverRuns) {
  char tmpl[] = "/tmp/layerx-poison-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string dir = tmpl;
  const std::string host_marker = "/tmp/layerx-poison-ran";
  (void)unlink(host_marker.c_str());
  std::string poison = ReadFile(LAYERX_POISON_SO);
  ASSERT_GT(poison.size(), 1000u);
  {
    // Layer 1: the poison wherever a loader, NSS, iconv or OpenSSL would look.
    LayerWriter l(dir + "/l1.tar", "gzip");
    for (const char* path :
         {"lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
          "usr/lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libnss_files.so.2",
          "usr/lib/x86_64-linux-gnu/libnss_files.so.2", "lib/x86_64-linux-gnu/libc.so.6",
          "usr/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/gconv/UTF-16.so",
          "usr/lib/x86_64-linux-gnu/gconv/ISO8859-1.so",
          "usr/lib/x86_64-linux-gnu/libarchive.so.13",
          "usr/lib/x86_64-linux-gnu/engines-3/poison.so", "lib/poison.so"}) {
      l.File(path, poison, 0755);
    }
    l.File("usr/lib/x86_64-linux-gnu/gconv/gconv-modules",
           "alias UTF8// UTF-16//\nmodule INTERNAL UTF-16// UTF-16 1\nmodule UTF-16// INTERNAL "
           "UTF-16 1\n"
           "module INTERNAL ISO-8859-1// ISO8859-1 1\nmodule ISO-8859-1// INTERNAL ISO8859-1 1\n");
    l.File("etc/nsswitch.conf", "passwd: files\ngroup: files\nshadow: files\n");
    l.File("etc/passwd", "root:x:0:0::/root:/bin/sh\nevil:x:4242:4242::/:/bin/sh\n");
    l.File("etc/group", "root:x:0:\nevil:x:4242:\n");
    l.File("etc/ld.so.preload", "/lib/poison.so\n");
    l.File("usr/lib/ssl/openssl.cnf",
           "openssl_conf = init\n[init]\nengines = engines\n[engines]\npoison = poison\n"
           "[poison]\ndynamic_path = /lib/poison.so\ninit = 1\n");
    l.Symlink("etc/ssl/openssl.cnf", "/usr/lib/ssl/openssl.cnf");
  }
  // Layers 2-5: entries that name users and groups, UTF-8 and non-UTF-8 names,
  // each compression libarchive could hand to an external program.
  const char* filters[] = {"zstd", "xz", "bzip2", ""};
  for (int i = 0; i < 4; ++i) {
    LayerWriter l(dir + "/l" + std::to_string(i + 2) + ".tar", filters[i]);
    l.Names("evil", "evil").File("home/evil/f" + std::to_string(i), "x", 0644, 4242, 4242);
    l.Names("nosuchuser", "nosuchgroup")
        .File("home/nobody" + std::to_string(i), "y", 0644, 5555, 5555);
    l.File("caf\xc3\xa9/na\xc3\xafve-" + std::to_string(i), "utf8");
    l.File(std::string("latin1-\xe9-") + std::to_string(i), "bytes");
    l.Sparse("sparse" + std::to_string(i), 1 << 20, 4096, "data");
  }
  std::string cmd = std::string(LAYERX_BIN) + " extract";
  for (int i = 1; i <= 5; ++i) cmd += " " + dir + "/l" + std::to_string(i) + ".tar";
  cmd += " --rootfs " + dir + "/out --manifest " + dir + "/m.jsonl -q 2>" + dir + "/err";
  int status = system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << ReadFile(dir + "/err");
  struct stat st;
  EXPECT_NE(lstat((dir + "/out/POISON-RAN").c_str(), &st), 0) << "image code ran inside the jail";
  EXPECT_NE(lstat(host_marker.c_str(), &st), 0) << "image code ran on the host";
  EXPECT_EQ(ReadFile(dir + "/out/home/evil/f0"), "x");
  EXPECT_EQ(ReadFile(dir + "/out/caf\xc3\xa9/na\xc3\xafve-0"), "utf8");
  EXPECT_EQ(ReadFile(dir + "/out/latin1-\xe9-3"), "bytes");
  (void)sandbox::RemoveTreeAt(AT_FDCWD, dir);
}

}  // namespace
}  // namespace layerx
