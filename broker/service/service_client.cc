// The client of `layerx serve`: ExtractRequest::connect and QueryService
// (include/layerx/layerx.hpp). The sources are opened and resolved here, with
// the caller's own credentials, and only open descriptors cross the socket.
// Outputs are unnamed files (O_TMPFILE) in their target dir, linked into place
// when the service reports success: a client that dies leaves nothing.
#include <capnp/rpc-twoparty.h>
#include <fcntl.h>
#include <kj/async-io.h>
#include <kj/debug.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "broker/bridge/bridge.h"
#include "broker/service/service.capnp.h"
#include "broker/service/service.h"
#include "broker/service/service_wire.h"
#include "broker/source/registry_pull.h"
#include "sandbox/sys.h"

namespace layerx {
namespace {

namespace rpc = layerx::service;
using sandbox::UniqueFd;

constexpr uint kMaxFdsPerMessage = 250;

// Carries one descriptor to the service; the descriptor stays ours.
class FdCap final : public rpc::Fd::Server {
 public:
  explicit FdCap(int fd) : fd_(fd) {}
  kj::Maybe<int> getFd() override { return fd_; }

 private:
  int fd_;
};

class ProgressImpl final : public rpc::ProgressSink::Server {
 public:
  explicit ProgressImpl(const std::function<void(const Progress&)>& fn) : fn_(fn) {}
  kj::Promise<void> event(EventContext context) override {
    auto e = context.getParams().getEvent();
    if (fn_ && !e.getQueued()) {
      fn_(Progress{.layer = e.getLayer(),
                   .layers = e.getLayers(),
                   .bytes_fed = e.getBytesFed(),
                   .blob_bytes = e.getBlobBytes(),
                   .entries = e.getEntries(),
                   .done = e.getDone()});
    }
    return kj::READY_NOW;
  }

 private:
  const std::function<void(const Progress&)>& fn_;
};

// An output being made: an unnamed file in its dir until Commit().
class ClientOutput {
 public:
  ~ClientOutput() {
    if (!temp_.empty()) ::unlinkat(dir_.get(), temp_.c_str(), 0);
  }
  Status Open(const std::string& path, const char* what) {
    std::filesystem::path p(path);
    if (!p.has_filename() || p.filename() == "." || p.filename() == "..") {
      return Fail(MakeError(ErrorKind::kPolicy, "{} {:?}: not a file name", what, path));
    }
    path_ = path;
    name_ = p.filename().string();
    std::string dir = p.parent_path().string();
    LX_ASSIGN_OR_RETURN(dir_,
                        sandbox::OpenAt(AT_FDCWD, dir.empty() ? "." : dir, O_RDONLY | O_DIRECTORY));
    auto fd = sandbox::OpenAt(dir_.get(), ".", O_TMPFILE | O_WRONLY, 0644);
    if (!fd && (fd.error().err() == EOPNOTSUPP || fd.error().err() == EISDIR)) {
      // No O_TMPFILE here: a named temp, removed unless committed.
      LX_ASSIGN_OR_RETURN(temp_, sandbox::UnguessableName(fmt::format(".{}.layerx-tmp-", name_)));
      fd = sandbox::OpenAt(dir_.get(), temp_, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0644);
    }
    if (!fd) return Fail(std::move(fd).error().With("{} {:?}", what, path));
    fd_ = std::move(*fd);
    return {};
  }
  int fd() const { return fd_.get(); }
  bool open() const { return fd_.get() >= 0; }
  // Gives the unnamed file a temp name beside its place (first step of two,
  // so that several outputs all appear or none does).
  Status Link() {
    if (!temp_.empty()) return {};  // the named fallback has one already
    LX_ASSIGN_OR_RETURN(temp_, sandbox::UnguessableName(fmt::format(".{}.layerx-tmp-", name_)));
    std::string self = fmt::format("/proc/self/fd/{}", fd_.get());
    if (::linkat(AT_FDCWD, self.c_str(), dir_.get(), temp_.c_str(), AT_SYMLINK_FOLLOW) != 0) {
      int err = errno;
      temp_.clear();
      return Fail(OsError(err, "link {:?}", path_));
    }
    return {};
  }
  // Renames it into place, replacing what was there.
  Status Place() {
    LX_TRY(sandbox::RenameAt(dir_.get(), temp_, dir_.get(), name_));
    temp_.clear();
    return {};
  }

 private:
  UniqueFd dir_, fd_;
  std::string path_, name_, temp_;
};

Result<UniqueFd> ConnectTo(const std::string& path) {
  struct sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return Fail(MakeError(ErrorKind::kPolicy, "socket path {:?} is too long", path));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Fail(OsError(errno, "socket"));
  UniqueFd sock(fd);
  if (::connect(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof(addr)) != 0) {
    return Fail(OsError(errno, "connect to the layerx service at {:?}", path));
  }
  return sock;
}

ExtractResult FromWire(rpc::Result::Reader result) {
  if (result.isFailure()) {
    auto f = result.getFailure();
    ExtractError e;
    e.kind = PublicKind(f.getKind());
    e.message = f.getMessage();
    e.layer_index = f.getLayerIndex();
    e.layer = f.getLayer();
    auto entry = f.getEntry();
    e.entry.assign(reinterpret_cast<const char*>(entry.begin()), entry.size());
    e.reason = f.getReason();
    e.sys_errno = f.getErrno();
    return ExtractResult(std::move(e));
  }
  auto r = result.getReport();
  ExtractReport out;
  out.entries = r.getEntries();
  out.seconds = r.getSeconds();
  out.manifest_digest = r.getManifestDigest();
  for (auto l : r.getLayers()) {
    out.layers.push_back(LayerSummary{.index = l.getIndex(),
                                      .name = l.getName(),
                                      .digest = l.getDigest(),
                                      .diff_id = l.getDiffId(),
                                      .compressed_bytes = l.getCompressedBytes(),
                                      .uncompressed_bytes = l.getUncompressedBytes(),
                                      .entries = l.getEntries(),
                                      .file_bytes = l.getFileBytes(),
                                      .setup_ms = l.getSetupMs(),
                                      .extract_ms = l.getExtractMs(),
                                      .send_ms = l.getSendMs(),
                                      .merge_ms = l.getMergeMs(),
                                      .total_ms = l.getTotalMs(),
                                      .extractor_peak_rss_kib = l.getExtractorPeakRssKib()});
  }
  if (r.getHasExt4()) {
    auto e = r.getExt4();
    out.ext4 = Ext4Summary{.size_bytes = e.getSizeBytes(),
                           .content_bytes = e.getContentBytes(),
                           .inodes = e.getInodes(),
                           .dead_bytes = static_cast<uint64_t>(e.getDeadBytes()),
                           .build_ms = e.getBuildMs()};
  }
  return ExtractResult(std::move(out));
}

// One sentence for a failed exchange. The service's own answers come as
// "remote exception: SENTENCE" (a call's error, or the Abort that turns a
// peer away as it connects: `unauthorized: ...`, `busy: ...`) and are shown
// as they are. What kj made on this side describes our C++ (expressions,
// syscalls and their arguments), not the service's answer: it is not shown.
ExtractError ServiceError(const std::string& socket, const kj::Exception& e) {
  std::string what = e.getDescription().cStr();
  constexpr std::string_view kRemote = "remote exception: ";
  FailureKind kind = FailureKind::kInternal;
  if (what.rfind(kRemote, 0) == 0) {
    what = what.substr(kRemote.size(), what.find('\n') - kRemote.size());
    if (what.rfind("unauthorized:", 0) == 0) kind = FailureKind::kUnauthorized;
    if (what.rfind("busy:", 0) == 0) kind = FailureKind::kBusy;
  } else if (e.getType() == kj::Exception::Type::DISCONNECTED) {
    kind = FailureKind::kIo;
    what = "the service closed the connection";
  } else {
    what = "the exchange with the service failed";
  }
  return detail::MakePublicError(kind, fmt::format("layerx service {:?}: {}", socket, what));
}

// Waits for `promise`, giving up when `cancel` is set (checked 10x/s); `tick`,
// when set, runs on this thread at the same pace (the pull's log lines).
template <typename T>
kj::Maybe<T> WaitOrCancel(kj::Promise<T> promise, const CancelToken* cancel, kj::AsyncIoContext& io,
                          const std::function<void()>& tick = {}) {
  if (cancel == nullptr && !tick) return promise.wait(io.waitScope);
  auto& timer = io.provider->getTimer();
  auto watch = kj::heap<std::function<kj::Promise<void>()>>();
  *watch = [&timer, cancel, &tick, &watch = *watch]() -> kj::Promise<void> {
    if (tick) tick();
    if (cancel != nullptr && cancel->cancelled()) return kj::READY_NOW;
    return timer.afterDelay(100 * kj::MILLISECONDS).then([&watch]() { return watch(); });
  };
  return promise.then([](T value) -> kj::Maybe<T> { return kj::mv(value); })
      .exclusiveJoin((*watch)().then([]() -> kj::Maybe<T> { return nullptr; }))
      .wait(io.waitScope);
}

ExtractResult RunRemote(const ExtractRequest& request) {
  using detail::MakePublicError;
  using detail::PublicError;
  if (!request.rootfs.empty()) {
    return ExtractResult(MakePublicError(
        FailureKind::kUsage,
        "a rootfs cannot be written through the service (its files would belong to the "
        "service's user): ask for an ext4 image or a manifest"));
  }
  if (!request.policy_file.empty() || !request.policy_toml.empty()) {
    return ExtractResult(
        MakePublicError(FailureKind::kUsage,
                        "the service applies its policy for your tenant: no policy "
                        "file or text with a service connection"));
  }
  if (request.sources.empty()) {
    return ExtractResult(MakePublicError(FailureKind::kUsage, "no layers given"));
  }
  if (request.ext4.empty() && request.manifest.empty() && request.config.empty()) {
    return ExtractResult(
        MakePublicError(FailureKind::kUsage, "nothing to write: give --ext4 or --manifest"));
  }
  auto platform = detail::ParsePlatform(request.platform);
  if (!platform) return ExtractResult(PublicError(platform.error()));
  if (auto ext4 = detail::InternalExt4(request.ext4_settings); !ext4) {
    return ExtractResult(PublicError(ext4.error()));
  }

  // The sources, opened as the caller, as a local job opens them: a file found
  // by name must be a regular file and is opened so that the open cannot block
  // (a fifo or a device is refused here, not handed to the service); only a
  // descriptor the caller passed ("/dev/fd/N") may be a pipe.
  std::vector<UniqueFd> inputs;
  auto open_input = [&inputs](int passed, int dir, const std::string& path) -> Status {
    Result<UniqueFd> fd =
        passed >= 0 ? sandbox::Dup(passed)
        : dir >= 0  ? sandbox::OpenRegularFile(dir, path, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
                    : sandbox::OpenRegularFile(AT_FDCWD, path, 0);
    if (!fd) return Fail(std::move(fd).error());
    inputs.push_back(std::move(*fd));
    return {};
  };
  std::optional<broker::DockerArchiveSpec> docker = broker::ParseDockerArchiveSpec(request.sources);
  broker::ResolvedImage image;
  // docker://: pulled here, with this process's network and credentials; the
  // service is handed one pipe per layer (it never opens a connection).
  std::unique_ptr<broker::RegistryPull> pull;
  if (broker::IsRegistrySource(request.sources)) {
    auto options = detail::PullOptionsFrom(request.registry);
    if (!options) return ExtractResult(PublicError(options.error()));
    if (request.cancel != nullptr) options->cancel = request.cancel->flag();
    // The service's clock stops the layers' streams; this bounds the requests
    // made here, before the service has the job.
    options->total_timeout_ms =
        static_cast<long>(request.job_timeout_ms > 0 ? request.job_timeout_ms : 7'200'000);
    auto started = broker::RegistryPull::Start(request.sources[0], *platform, *options);
    if (!started) return ExtractResult(PublicError(started.error()));
    pull = std::move(*started);
    image.layers = pull->image().layers;
    image.manifest_digest = pull->image().manifest_digest;
    image.config = pull->image().config;
    image.config_digest = pull->image().config_digest;
    for (size_t i = 0; i < image.layers.size(); ++i) {
      auto fd = pull->Input(i);
      if (!fd) {
        return ExtractResult(
            PublicError(std::move(fd).error().WithLayer(i + 1, image.layers[i].display)));
      }
      inputs.push_back(std::move(*fd));
    }
  } else if (docker) {
    Status s = docker->fd >= 0 ? broker::CheckPassedFd(docker->fd, docker->file) : Status();
    if (s) s = open_input(docker->fd, -1, docker->file);
    if (!s) return ExtractResult(PublicError(std::move(s).error().With("docker-archive")));
  } else {
    auto resolved = broker::ResolveSources(request.sources, *platform);
    if (!resolved) return ExtractResult(PublicError(resolved.error()));
    image = std::move(*resolved);
    for (size_t i = 0; i < image.layers.size(); ++i) {
      const broker::LayerSource& l = image.layers[i];
      if (Status s = open_input(l.fd, l.dir_fd, l.path); !s) {
        return ExtractResult(PublicError(std::move(s).error().WithLayer(i + 1, l.display)));
      }
    }
  }
  ClientOutput ext4, manifest, config;
  for (auto [path, out, what] : {std::tuple{&request.ext4, &ext4, "ext4 image"},
                                 std::tuple{&request.manifest, &manifest, "manifest"},
                                 std::tuple{&request.config, &config, "config"}}) {
    if (path->empty()) continue;
    if (Status s = out->Open(*path, what); !s) return ExtractResult(PublicError(s.error()));
  }

  auto sock = ConnectTo(request.connect);
  if (!sock) return ExtractResult(PublicError(sock.error()));
  try {
    auto io = kj::setupAsyncIo();
    auto stream = io.lowLevelProvider->wrapUnixSocketFd(
        sock->release(),
        kj::LowLevelAsyncIoProvider::TAKE_OWNERSHIP | kj::LowLevelAsyncIoProvider::ALREADY_CLOEXEC);
    capnp::TwoPartyClient client(*stream, kMaxFdsPerMessage);
    auto service = client.bootstrap().castAs<rpc::Service>();
    auto call = service.extractRequest();
    call.setProgress(kj::heap<ProgressImpl>(request.progress));
    auto req = call.initRequest();
    req.setPlatform(request.platform);
    auto source = req.initSource();
    if (docker) {
      auto d = source.initDockerArchive();
      d.setFile(kj::heap<FdCap>(inputs[0].get()));
      d.setName(std::filesystem::path(docker->file).filename().string());
      d.setRef(docker->ref);
    } else {
      auto img = source.initImage();
      img.setConfig(kj::arrayPtr(reinterpret_cast<const kj::byte*>(image.config.data()),
                                 image.config.size()));
      img.setManifestDigest(image.manifest_digest);
      auto layers = img.initLayers(static_cast<uint>(image.layers.size()));
      for (size_t i = 0; i < image.layers.size(); ++i) {
        const broker::LayerSource& l = image.layers[i];
        auto w = layers[static_cast<uint>(i)];
        w.setBlob(kj::heap<FdCap>(inputs[i].get()));
        w.setName(l.display);
        w.setDigest(l.digest.value_or(""));
        w.setDiffId(l.diff_id.value_or(""));
        w.setSize(l.size.value_or(0));
        w.setMediaType(l.media_type);
      }
    }
    if (ext4.open()) req.setExt4(kj::heap<FdCap>(ext4.fd()));
    if (manifest.open()) req.setManifest(kj::heap<FdCap>(manifest.fd()));
    if (config.open()) req.setConfig(kj::heap<FdCap>(config.fd()));
    const Ext4Settings& e = request.ext4_settings;
    auto s = req.initExt4Settings();
    s.setSizeBytes(e.size_bytes);
    s.setBlockSize(e.block_size);
    s.setInodeRatio(e.inode_ratio);
    s.setLabel(e.label);
    s.setUuid(e.uuid);
    s.setReproducible(e.reproducible);
    s.setSourceDateEpoch(e.source_date_epoch);
    req.setLayerTimeoutMs(request.layer_timeout_ms);
    req.setJobTimeoutMs(request.job_timeout_ms);

    auto response = WaitOrCancel(
        call.send().then([](auto r) { return kj::mv(r); }), request.cancel, io,
        pull ? std::function<void()>([&pull] { pull->RelayLogs(); }) : std::function<void()>());
    KJ_IF_MAYBE (r, response) {
      ExtractResult result = FromWire(r->getResult());
      if (!result.ok()) {
        // A layer's stream that ended early because its download failed (its
        // own, or one ahead's that stopped the pull): the download says why,
        // not the service's view of a short stream. A refusal, a usage error
        // or a cancel from the service stands.
        size_t index = result.error().layer_index;
        const FailureKind kind = result.error().kind;
        const bool short_stream = kind == FailureKind::kInvalidInput ||
                                  kind == FailureKind::kIntegrity ||
                                  kind == FailureKind::kSandbox || kind == FailureKind::kIo;
        if (pull && short_stream && index > 0 && index <= image.layers.size()) {
          if (std::optional<Error> why = pull->Failure(index - 1)) {
            return ExtractResult(
                PublicError(std::move(*why).WithLayer(index, image.layers[index - 1].display)));
          }
        }
        return result;
      }
      for (ClientOutput* out : {&ext4, &manifest, &config}) {
        if (!out->open()) continue;
        if (Status c = out->Link(); !c) return ExtractResult(PublicError(c.error()));
      }
      for (ClientOutput* out : {&ext4, &manifest, &config}) {
        if (!out->open()) continue;
        if (Status c = out->Place(); !c) return ExtractResult(PublicError(c.error()));
      }
      return result;
    }
    // Dropping the call tells the service; it kills the job's extractor.
    return ExtractResult(MakePublicError(FailureKind::kCancelled, "interrupted"));
  } catch (const kj::Exception& e) {
    return ExtractResult(ServiceError(request.connect, e));
  }
}

std::string StatusText(rpc::ServiceStatus::Reader s) {
  std::string out =
      fmt::format("layerx serve {}, up {:.0f} s{}: {} of {} slots running, {} queued\n",
                  s.getVersion().cStr(), s.getUptimeSeconds(), s.getDraining() ? ", stopping" : "",
                  s.getRunning(), s.getMaxConcurrent(), s.getQueued());
  out += fmt::format("\n{:<24} {:>8} {:>8} {:>15} {:>11}\n", "TENANT", "RUNNING", "QUEUED",
                     "MAX_CONCURRENT", "MAX_QUEUED");
  for (auto t : s.getTenants()) {
    out += fmt::format("{:<24} {:>8} {:>8} {:>15} {:>11}\n", t.getName().cStr(), t.getRunning(),
                       t.getQueued(), t.getMaxConcurrent(), t.getMaxQueued());
  }
  if (s.getJobs().size() > 0) {
    out += fmt::format("\n{:>8} {:<24} {:<8} {:>7} {:>9}\n", "JOB", "TENANT", "STATE", "LAYER",
                       "SECONDS");
    for (auto j : s.getJobs()) {
      std::string layer =
          j.getLayers() > 0 ? fmt::format("{}/{}", j.getLayer(), j.getLayers()) : "-";
      out += fmt::format("{:>8} {:<24} {:<8} {:>7} {:>9.1f}\n", j.getId(), j.getTenant().cStr(),
                         j.getState().cStr(), layer, j.getSeconds());
    }
  }
  return out;
}

std::string StatusJson(rpc::ServiceStatus::Reader s) {
  nlohmann::json out = {
      {"version", s.getVersion().cStr()},   {"uptime_seconds", s.getUptimeSeconds()},
      {"draining", s.getDraining()},        {"max_concurrent", s.getMaxConcurrent()},
      {"running", s.getRunning()},          {"queued", s.getQueued()},
      {"tenants", nlohmann::json::array()}, {"jobs", nlohmann::json::array()}};
  for (auto t : s.getTenants()) {
    out["tenants"].push_back({{"name", t.getName().cStr()},
                              {"running", t.getRunning()},
                              {"queued", t.getQueued()},
                              {"max_concurrent", t.getMaxConcurrent()},
                              {"max_queued", t.getMaxQueued()}});
  }
  for (auto j : s.getJobs()) {
    out["jobs"].push_back({{"id", j.getId()},
                           {"tenant", j.getTenant().cStr()},
                           {"state", j.getState().cStr()},
                           {"layer", j.getLayer()},
                           {"layers", j.getLayers()},
                           {"seconds", j.getSeconds()}});
  }
  return out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

}  // namespace

namespace detail {

ExtractResult RemoteExtract(const ExtractRequest& request) {
  SigpipeBlock sigpipe;
  return RunRemote(request);
}

}  // namespace detail

bool QueryService(const std::string& socket, ServiceQuery query, std::string* out,
                  ExtractError* error) {
  detail::SigpipeBlock sigpipe;
  auto fail = [error](ExtractError e) {
    if (error != nullptr) *error = std::move(e);
    return false;
  };
  auto sock = ConnectTo(socket);
  if (!sock) return fail(detail::PublicError(sock.error()));
  try {
    auto io = kj::setupAsyncIo();
    auto stream = io.lowLevelProvider->wrapUnixSocketFd(
        sock->release(),
        kj::LowLevelAsyncIoProvider::TAKE_OWNERSHIP | kj::LowLevelAsyncIoProvider::ALREADY_CLOEXEC);
    capnp::TwoPartyClient client(*stream, kMaxFdsPerMessage);
    auto service = client.bootstrap().castAs<rpc::Service>();
    if (query == ServiceQuery::kMetrics) {
      auto r = service.metricsRequest().send().wait(io.waitScope);
      if (out != nullptr) *out = r.getText();
    } else {
      auto r = service.statusRequest().send().wait(io.waitScope);
      if (out != nullptr) {
        *out = query == ServiceQuery::kStatusJson ? StatusJson(r.getStatus())
                                                  : StatusText(r.getStatus());
      }
    }
  } catch (const kj::Exception& e) {
    return fail(ServiceError(socket, e));
  }
  return true;
}

}  // namespace layerx
