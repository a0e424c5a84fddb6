// Micro-benchmarks of the per-byte and per-entry paths, in one process so the
// ratios hold on a noisy machine: ISA-L against zlib (the lever for gzip
// layers), SHA-256, name cleaning, the record codec, the broker's merge, and
// the applier writing a small-files layer outside a jail.
//
//   build/layerx_micro_bench [--benchmark_filter=Inflate]
#include <benchmark/benchmark.h>
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

#include <random>
#include <string>

#include "broker/tree/image_tree.h"
#include "extractor/applier.h"
#include "extractor/digest.h"
#include "extractor/entry_name.h"
#include "extractor/extract.h"
#include "extractor/gzip_inflater.h"
#include "extractor/layer_reader.h"
#include "extractor/wire/codec.h"
#include "sandbox/sys.h"
#include "tests/fixtures/gzip.h"

namespace layerx {
namespace {

// Text-like data (what layers mostly hold), about 3:1 under gzip -6.
std::string LayerLikeData(size_t n) {
  std::mt19937 rng(42);
  const char* words[] = {"usr",       "lib",     "share",  "doc",    "the",   "and",
                         "copyright", "license", "debian", "x86_64", "linux", "gnu",
                         "\n",        " ",       "0123",   "{",      "}"};
  std::string s;
  while (s.size() < n) s += words[rng() % 17];
  s.resize(n);
  return s;
}

std::string Gzip(const std::string& data) { return testing::GzipMember(data); }

int MemfdWith(const std::string& bytes) {
  int fd = memfd_create("bench", MFD_CLOEXEC);
  if (write(fd, bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size())) abort();
  return fd;
}

const size_t kInflateBytes = 32 << 20;

void BM_InflateIsal(benchmark::State& state) {
  static const std::string compressed = Gzip(LayerLikeData(kInflateBytes));
  int fd = MemfdWith(compressed);
  std::vector<std::byte> out(256 * 1024);
  for (auto _ : state) {
    lseek(fd, 0, SEEK_SET);
    extractor::GzipInflater inflater(fd, {});
    size_t total = 0;
    while (true) {
      auto n = inflater.Read(std::span(out));
      if (!n || *n == 0) break;
      total += *n;
    }
    if (total != kInflateBytes) state.SkipWithError("short");
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kInflateBytes));
  close(fd);
}
BENCHMARK(BM_InflateIsal)->Unit(benchmark::kMillisecond);

// zlib's inflate: what libarchive's gzip filter runs.
void BM_InflateZlib(benchmark::State& state) {
  static const std::string compressed = Gzip(LayerLikeData(kInflateBytes));
  std::string out(256 * 1024, '\0');
  for (auto _ : state) {
    z_stream z = {};
    inflateInit2(&z, 31);
    z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(compressed.data()));
    z.avail_in = static_cast<uInt>(compressed.size());
    size_t total = 0;
    int rc = Z_OK;
    while (rc == Z_OK) {
      z.next_out = reinterpret_cast<Bytef*>(out.data());
      z.avail_out = static_cast<uInt>(out.size());
      rc = inflate(&z, Z_NO_FLUSH);
      total += out.size() - z.avail_out;
    }
    inflateEnd(&z);
    if (total != kInflateBytes) state.SkipWithError("short");
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kInflateBytes));
}
BENCHMARK(BM_InflateZlib)->Unit(benchmark::kMillisecond);

void BM_Sha256(benchmark::State& state) {
  std::string block = LayerLikeData(1 << 20);
  for (auto _ : state) {
    extractor::Sha256 sha;
    for (int i = 0; i < 16; ++i) sha.Update(block.data(), block.size());
    benchmark::DoNotOptimize(sha.Finish());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * 16 * block.size()));
}
BENCHMARK(BM_Sha256)->Unit(benchmark::kMillisecond);

void BM_EntryNameParse(benchmark::State& state) {
  policy::Limits limits;
  const char* names[] = {"usr/share/doc/libc6/copyright", "./etc/alternatives/awk",
                         "usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30", "a/b/../c/./d"};
  size_t i = 0;
  for (auto _ : state)
    benchmark::DoNotOptimize(extractor::EntryName::Parse(names[i++ % 4], limits));
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_EntryNameParse);

std::vector<extractor::EntryRecord> TreeRecords(size_t files) {
  std::vector<extractor::EntryRecord> out;
  for (size_t d = 0; d < files / 50 + 1; ++d) {
    std::string dir = "usr/lib/node_modules/pkg" + std::to_string(d);
    if (d == 0) {
      for (const char* p : {"usr", "usr/lib", "usr/lib/node_modules"}) {
        out.push_back({.path = p, .kind = extractor::Kind::kDir, .mode = 0755});
      }
    }
    out.push_back({.path = dir, .kind = extractor::Kind::kDir, .mode = 0755});
    for (size_t f = 0; f < 50 && out.size() < files; ++f) {
      out.push_back({.path = dir + "/file" + std::to_string(f) + ".js",
                     .kind = extractor::Kind::kFile,
                     .mode = 0644,
                     .mtime_ns = 1,
                     .size = 1024,
                     .data_bytes = 1024});
    }
  }
  return out;
}

void BM_ImageTreeMerge(benchmark::State& state) {
  auto records = TreeRecords(static_cast<size_t>(state.range(0)));
  for (auto _ : state) {
    broker::ImageTree tree(policy::Limits{});
    for (const auto& r : records) {
      if (!tree.Add(r)) state.SkipWithError("refused");
    }
    benchmark::DoNotOptimize(tree.size());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * records.size()));
}
BENCHMARK(BM_ImageTreeMerge)->Arg(10'000)->Arg(40'000)->Unit(benchmark::kMillisecond);

void BM_RecordRoundTrip(benchmark::State& state) {
  auto records = TreeRecords(1024);
  records.resize(1024);
  for (auto _ : state) {
    capnp::MallocMessageBuilder message;
    auto batch = message.initRoot<wire::Message>().initBatch(static_cast<unsigned>(records.size()));
    for (size_t i = 0; i < records.size(); ++i) {
      wire::ToWire(records[i], batch[static_cast<unsigned>(i)].initEntry());
    }
    kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
    capnp::FlatArrayMessageReader reader(words);
    for (auto r : reader.getRoot<wire::Message>().getBatch()) {
      benchmark::DoNotOptimize(wire::FromWire(r.getEntry()));
    }
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * records.size()));
}
BENCHMARK(BM_RecordRoundTrip)->Unit(benchmark::kMicrosecond);

// The applier's own cost per entry: a gzip layer of 2,000 1 KiB files in 40
// dirs applied into a fresh dir on /dev/shm (no disk), records into a tree.
void BM_ApplySmallFilesLayer(benchmark::State& state) {
  static const std::string layer = [] {
    std::string tar;
    auto header = [](const std::string& name, char type, size_t size) {
      std::string h(512, '\0');
      std::memcpy(h.data(), name.data(), name.size());
      std::snprintf(h.data() + 100, 8, "%07o", type == '5' ? 0755 : 0644);
      std::snprintf(h.data() + 108, 8, "%07o", 0);
      std::snprintf(h.data() + 116, 8, "%07o", 0);
      std::snprintf(h.data() + 124, 12, "%011zo", size);
      std::snprintf(h.data() + 136, 12, "%011o", 0);
      h[156] = type;
      std::memcpy(h.data() + 257,
                  "ustar\0"
                  "00",
                  8);
      std::memset(h.data() + 148, ' ', 8);
      unsigned sum = 0;
      for (unsigned char c : h) sum += c;
      std::snprintf(h.data() + 148, 8, "%06o", sum);
      return h;
    };
    std::string data = LayerLikeData(1024);
    for (int d = 0; d < 40; ++d) {
      std::string dir = "d" + std::to_string(d) + "/";
      tar += header(dir, '5', 0);
      for (int f = 0; f < 50; ++f) tar += header(dir + "f" + std::to_string(f), '0', 1024) + data;
    }
    tar += std::string(1024, '\0');
    return Gzip(tar);
  }();
  policy::Limits limits;
  extractor::PrepareLibrariesBeforeJail();
  for (auto _ : state) {
    state.PauseTiming();
    char tmpl[] = "/dev/shm/layerx-bench-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) state.SkipWithError("mkdtemp");
    int fd = MemfdWith(layer);
    lseek(fd, 0, SEEK_SET);
    auto root = sandbox::OpenAt(AT_FDCWD, tmpl, O_PATH | O_DIRECTORY);
    broker::ImageTree tree(limits);
    state.ResumeTiming();
    auto reader = extractor::LayerReader::Create(limits);
    if (!reader || !(*reader)->Open(fd)) state.SkipWithError("open");
    extractor::Applier applier(root->get(), limits, {}, tree);
    auto totals = extractor::ExtractLayer(**reader, applier, limits);
    if (!totals) state.SkipWithError(totals.error().error.ToString().c_str());
    state.PauseTiming();
    close(fd);
    (void)sandbox::RemoveTreeAt(AT_FDCWD, tmpl);
    state.ResumeTiming();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * 2040));
}
BENCHMARK(BM_ApplySmallFilesLayer)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace layerx

BENCHMARK_MAIN();
