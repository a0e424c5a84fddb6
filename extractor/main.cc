// layerx-extractor: the jailed program, one per layer. The broker spawns it with
// sandbox::Spawn; before it reads a byte of the layer it enters the jail
// (sandbox/jail.h): "/" is the image rootfs, no capabilities, seccomp on.
//
//   fd 0  the layer stream        fd 3  the record socket (Cap'n Proto)
//   fd 1,2  a pipe to the broker's log
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>

#include "extractor/extract.h"
#include "extractor/wire/codec.h"
#include "sandbox/jail.h"
#include "sandbox/sys.h"

namespace {

int Run() {
  using namespace layerx;
  // Everything that could read a file by name happens now, on the host's files.
  extractor::PrepareLibrariesBeforeJail();
  sandbox::JailConfigHeader config;
  // The read-ahead thread is made inside the jail, before its filter (which
  // never allows clone) goes on every thread.
  std::shared_ptr<extractor::ReadAhead> ahead;
  sandbox::JailSetupResult setup =
      sandbox::EnterJail(&config, [&] { ahead = extractor::ReadAhead::Spawn(); });
  if (!setup.ok()) {
    std::fprintf(stderr, "jail setup failed: %s: %s\n", sandbox::SetupStepName(setup.step),
                 ErrnoName(setup.err).c_str());
    return sandbox::kSetupFailedExit;
  }
  int64_t ready_ns = sandbox::MonotonicNs();
  wire::ChannelWriter writer(sandbox::kChannelFd);
  auto report = [&](const Error& error, std::string_view entry) {
    (void)writer.SendFailure(error, entry);
    return 1;
  };
  auto reader = extractor::LayerReader::Create(config.limits, std::move(ahead));
  if (!reader) return report(reader.error(), "");
  if (Status opened = (*reader)->Open(sandbox::kInputFd); !opened)
    return report(opened.error(), "");
  if (config.data.copy_input != 0 && config.data.mode == sandbox::DataMode::kImage) {
    (*reader)->EnableCopy();
  }
  auto root = sandbox::OpenAt(AT_FDCWD, "/", O_PATH | O_DIRECTORY);
  if (!root) return report(root.error(), "");
  extractor::Applier applier(
      root->get(), config.limits,
      extractor::ApplyOptions{.chown = config.keep_fs_caps != 0,
                              .rules = config.rules,
                              .data = config.data,
                              .data_fd = sandbox::kDataFd},
      writer,
      [](std::string_view warning) {
        std::fprintf(stderr, "warning: %.*s\n", static_cast<int>(warning.size()), warning.data());
      });
  auto totals = extractor::ExtractLayer(**reader, applier, config.limits);
  if (!totals) return report(totals.error().error, totals.error().entry);
  Status sent = writer.SendSummary([&](wire::Summary::Builder s) {
    s.setEntries(totals->entries);
    s.setFileBytes(totals->file_bytes);
    s.setUncompressedBytes(totals->uncompressed_bytes);
    s.setUncompressedDigest(totals->uncompressed_digest);
    s.setReadyMonotonicNs(ready_ns);
    s.setDoneMonotonicNs(sandbox::MonotonicNs());
    s.setSendNs(writer.send_ns());
    struct rusage ru;
    if (::getrusage(RUSAGE_SELF, &ru) == 0) s.setPeakRssKib(static_cast<uint64_t>(ru.ru_maxrss));
  });
  return sent ? 0 : 1;
}

}  // namespace

int main() {
  int rc;
  try {
    rc = Run();
  } catch (...) {
    // capnp reports OOM and the like by throwing; nothing else should.
    std::fputs("extractor: unexpected exception\n", stderr);
    rc = 1;
  }
  // Everything was said on the channel. exit_group(2) itself, not exit() or
  // _exit(): the read-ahead thread may still be in read(2) on a layer that
  // was refused early, and no atexit handler (OpenSSL's cleanup) may run
  // under it; nor may a sanitizer's _exit hook, which calls sigaltstack.
  std::fflush(nullptr);
  ::syscall(SYS_exit_group, rc);
  __builtin_unreachable();
}
