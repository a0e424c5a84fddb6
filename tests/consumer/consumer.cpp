// A library user of layerx, built out of tree against the installed package
// (C++17, only <layerx/layerx.hpp>). Checks what the API promises:
//   consumer OUTDIR LAYER...
// 1. two extractions of LAYER... at once, on two threads, each with its own
//    log sink and progress callback (lines must not cross);
// 2. a failing extraction (a truncated copy of the first layer) gives a
//    structured error naming layer 1 and kind "invalid input", and no output;
// 3. a cancelled extraction ends with kind "cancelled" and no output;
// 4. Inspect and ShowPolicy answer.
// Prints "consumer: ok" and exits 0, or names the first broken promise.
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <layerx/layerx.hpp>
#include <string>
#include <thread>
#include <vector>

namespace {

int failures = 0;
void Check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "consumer: FAILED: %s\n", what.c_str());
    ++failures;
  }
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

struct Run {
  layerx::ExtractRequest request;
  std::vector<std::string> log_components;
  size_t layers_done = 0;
  std::thread::id callback_thread;
  std::thread::id run_thread;
  bool ok = false;
  uint64_t entries = 0;
};

void Extract(Run& run) {
  run.run_thread = std::this_thread::get_id();
  run.request.min_log_level = layerx::LogLevel::kDebug;
  run.request.log = [&run](layerx::LogLevel, std::string_view component, std::string_view) {
    run.log_components.emplace_back(component);
    run.callback_thread = std::this_thread::get_id();
  };
  run.request.progress = [&run](const layerx::Progress& p) {
    if (p.done) ++run.layers_done;
  };
  layerx::ExtractResult result = layerx::Extract(run.request);
  run.ok = result.ok();
  if (!result.ok()) {
    std::fprintf(stderr, "consumer: %s\n", result.error().message.c_str());
    return;
  }
  run.entries = result.report().entries;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: consumer OUTDIR LAYER...\n");
    return 2;
  }
  std::string out = argv[1];
  std::vector<std::string> layers(argv + 2, argv + argc);
  std::printf("layerx %s\n", layerx::Version());

  // 1. Concurrent extractions, each with its own sinks.
  Run a, b;
  a.request.sources = b.request.sources = layers;
  a.request.ext4 = out + "/a.img";
  b.request.rootfs = out + "/b-rootfs";
  b.request.manifest = out + "/b.jsonl";
  std::thread ta(Extract, std::ref(a)), tb(Extract, std::ref(b));
  ta.join();
  tb.join();
  for (Run* r : {&a, &b}) {
    Check(r->ok, "concurrent extraction succeeded");
    Check(r->entries > 0, "entries reported");
    Check(r->layers_done == layers.size(), "a progress 'done' per layer");
    Check(!r->log_components.empty(), "debug log lines reached this extraction's sink");
    Check(r->callback_thread == r->run_thread, "callbacks on the calling thread");
  }
  Check(a.entries == b.entries, "both extractions saw the same image");
  Check(Exists(out + "/a.img") && Exists(out + "/b-rootfs") && Exists(out + "/b.jsonl"),
        "outputs written");

  // 2. A truncated layer: a structured error and nothing left.
  {
    std::ifstream in(layers[0], std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(out + "/truncated.tar.gz", std::ios::binary)
        .write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
    layerx::ExtractRequest bad;
    bad.sources = {out + "/truncated.tar.gz"};
    bad.rootfs = out + "/bad-rootfs";
    layerx::ExtractResult result = layerx::Extract(bad);
    Check(!result.ok(), "a truncated layer fails");
    if (!result.ok()) {
      const layerx::ExtractError& e = result.error();
      std::printf("truncated: %s [%s]\n", e.message.c_str(), layerx::FailureKindName(e.kind));
      Check(e.kind == layerx::FailureKind::kInvalidInput, "kind is invalid input");
      Check(e.layer_index == 1, "the error names layer 1");
      Check(!e.reason.empty() && e.message.find('\n') == std::string::npos, "one line, a reason");
    }
    Check(!Exists(out + "/bad-rootfs"), "no output after a failure");
  }

  // 3. Cancelled before it starts: kCancelled, nothing written.
  {
    layerx::CancelToken token;
    token.Cancel();
    layerx::ExtractRequest cancelled;
    cancelled.sources = layers;
    cancelled.ext4 = out + "/cancelled.img";
    cancelled.cancel = &token;
    layerx::ExtractResult result = layerx::Extract(cancelled);
    Check(!result.ok() && result.error().kind == layerx::FailureKind::kCancelled,
          "a cancelled extraction is kCancelled");
    Check(!Exists(out + "/cancelled.img"), "no output after a cancel");
  }

  // 4. Inspect and ShowPolicy.
  {
    layerx::InspectRequest request;
    request.sources = layers;
    layerx::ImageInfo info;
    layerx::ExtractError error;
    Check(layerx::Inspect(request, &info, &error), "inspect: " + error.message);
    Check(info.layers.size() == layers.size(), "inspect lists every layer");
    std::string toml;
    Check(layerx::ShowPolicy("", "[limits]\nmax_entries = 1234\n", &toml, &error),
          "show policy: " + error.message);
    Check(toml.find("max_entries = 1234") != std::string::npos, "policy text read over defaults");
    Check(!layerx::ShowPolicy("", "[limits]\nno_such_key = 1\n", &toml, &error) &&
              error.kind == layerx::FailureKind::kUsage &&
              error.message.find("no_such_key") != std::string::npos,
          "an unknown policy key is a usage error naming it");
  }
  if (failures == 0) std::printf("consumer: ok\n");
  return failures == 0 ? 0 : 1;
}
