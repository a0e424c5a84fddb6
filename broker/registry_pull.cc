#include "broker/registry_pull.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "broker/logging.h"
#include "broker/registry_auth.h"
#include "broker/registry_client.h"
#include "extractor/digest.h"
#include "sandbox/sys.h"

namespace layerx::broker {

using sandbox::UniqueFd;

namespace {

constexpr std::string_view kPrefix = "docker://";
constexpr uint64_t kMaxConfigBytes = 4 * 1024 * 1024;
constexpr size_t kCopyChunk = 256 * 1024;

Result<std::unique_ptr<RegistryClient>> Connect(const RegistryRef& ref, const PullOptions& options) {
  std::vector<std::string> files =
      options.auth_file.empty() ? AuthFilePaths() : std::vector<std::string>{options.auth_file};
  LX_ASSIGN_OR_RETURN(std::optional<Credentials> credentials,
                      FindCredentials(ref.registry, options.creds, files));
  if (!options.tls_verify) {
    Logger("broker")->warn(
        "{}: TLS verification is off: certificates are not checked and plain http is allowed",
        ref.registry);
  }
  Logger("broker")->info("registry {}: {} as {}", ref.registry, ref.ToString(),
                         credentials ? "a user (credentials found)" : "anonymous");
  RegistryOptions o{.credentials = std::move(credentials),
                    .tls_verify = options.tls_verify,
                    .cert_dir = options.cert_dir,
                    .low_speed_seconds = options.low_speed_seconds};
  return RegistryClient::Create(ref, std::move(o));
}

Result<ResolvedImage> Resolve(RegistryClient& client, const Platform& platform) {
  LX_ASSIGN_OR_RETURN(RegistryManifest top, client.GetManifest());
  auto read = [&client](const std::string& digest, std::optional<uint64_t> size,
                        bool manifest) -> Result<std::string> {
    if (manifest) {
      LX_ASSIGN_OR_RETURN(RegistryManifest m, client.GetManifest(digest));
      if (size && *size != m.bytes.size()) {
        return Fail(MakeError(ErrorKind::kIntegrity, "manifest {} is {} bytes, its descriptor says {}",
                              digest, m.bytes.size(), *size));
      }
      return std::move(m.bytes);
    }
    if (size && *size > kMaxConfigBytes) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "config {} is {} bytes, over {}", digest,
                            *size, kMaxConfigBytes));
    }
    std::string bytes;
    auto got = client.GetBlob(digest, size, [&](std::span<const char> chunk) -> Status {
      if (bytes.size() + chunk.size() > kMaxConfigBytes) {
        return Fail(MakeError(ErrorKind::kLimitExceeded, "config {}: over {} bytes", digest,
                              kMaxConfigBytes));
      }
      bytes.append(chunk.data(), chunk.size());
      return {};
    });
    if (!got) return Fail(std::move(got).error());
    return bytes;
  };
  return ResolveFromDocument(top.bytes, top.media_type, top.digest, platform, read);
}

}  // namespace

bool IsRegistrySource(const std::vector<std::string>& specs) {
  return specs.size() == 1 && specs[0].starts_with(kPrefix);
}

Result<ResolvedImage> ResolveRegistry(const std::string& spec, const Platform& platform,
                                      const PullOptions& options) {
  LX_ASSIGN_OR_RETURN(RegistryRef ref, ParseRegistryRef(spec));
  LX_ASSIGN_OR_RETURN(std::unique_ptr<RegistryClient> client, Connect(ref, options));
  return Resolve(*client, platform);
}

// Everything the workers and the feeder share, under one mutex.
struct RegistryPull::State {
  struct Layer {
    std::string digest;
    std::optional<uint64_t> size;
    std::string display;
    UniqueFd write;                  // the pipe's write end, the feeder's
    std::deque<std::string> chunks;  // downloaded, not yet fed
    UniqueFd cached;                 // a verified blob from the cache, fed whole
    bool done = false;               // the download finished (or the cache had it)
    std::optional<Error> error;      // the download failed
  };

  RegistryRef ref;
  PullOptions options;
  std::vector<Layer> layers;
  std::vector<std::unique_ptr<RegistryClient>> clients;  // one per worker
  UniqueFd cache_dir;                                    // DIR/sha256, or -1

  std::mutex mu;
  std::condition_variable cv;
  size_t current = 0;  // the layer the feeder is on: never held back by the budget
  uint64_t spooled = 0;
  bool stop = false;
  size_t next = 0;  // the next layer a worker takes
  Counts counts;
  std::atomic<bool> cancel{false};

  std::vector<std::thread> workers;
  std::thread feeder;

  bool Stopped() const {
    return stop || (options.cancel != nullptr && options.cancel->load());
  }

  // A downloaded chunk into layer i's spool: waits while the spool is full,
  // unless layer i is the one being fed (it drains) or the spool is empty.
  Status Append(size_t i, std::span<const char> bytes) {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] {
      return Stopped() || i == current || spooled == 0 ||
             spooled + bytes.size() <= options.spool_bytes;
    });
    if (Stopped()) return Fail(MakeError(ErrorKind::kCancelled, "pull stopped"));
    layers[i].chunks.emplace_back(bytes.data(), bytes.size());
    spooled += bytes.size();
    cv.notify_all();
    return {};
  }

  void Finish(size_t i, Status status) {
    std::lock_guard lock(mu);
    if (status) {
      layers[i].done = true;
    } else {
      layers[i].error = std::move(status).error();
    }
    cv.notify_all();
  }

  // Blob i from the cache, verified: true when it is there and good. A blob
  // that does not match its digest or size is dropped (and fetched again).
  bool FromCache(size_t i) {
    Layer& l = layers[i];
    std::string name = l.digest.substr(7);
    auto fd = sandbox::OpenRegularFile(cache_dir.get(), name, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS);
    if (!fd) return false;
    extractor::Sha256 sha;
    uint64_t total = 0;
    std::vector<std::byte> buf(kCopyChunk);
    for (;;) {
      if (Stopped()) return false;
      auto n = sandbox::ReadSome(fd->get(), buf);
      if (!n) return false;
      if (*n == 0) break;
      sha.Update(buf.data(), *n);
      total += *n;
    }
    if (sha.Finish() != l.digest || (l.size && *l.size != total)) {
      Logger("broker")->warn("blob cache: {} does not match its digest: dropped, fetching it again",
                             l.digest);
      (void)sandbox::UnlinkAt(cache_dir.get(), name, 0);
      return false;
    }
    if (::lseek(fd->get(), 0, SEEK_SET) != 0) return false;
    std::lock_guard lock(mu);
    l.cached = std::move(*fd);
    l.done = true;
    ++counts.cached;
    cv.notify_all();
    return true;
  }

  void Fetch(size_t worker, size_t i) {
    Layer& l = layers[i];
    if (cache_dir.get() >= 0 && FromCache(i)) {
      Logger("broker")->info("layer {} ({}): from the blob cache", i + 1, l.display);
      return;
    }
    // With a cache, the blob goes to a temp name beside its place as well, and
    // is renamed into place once the client checked its digest.
    UniqueFd temp;
    std::string temp_name;
    if (cache_dir.get() >= 0) {
      if (auto name = sandbox::UnguessableName(".tmp-")) {
        temp_name = *name;
        auto fd = sandbox::OpenAt(cache_dir.get(), temp_name,
                                  O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0644);
        if (fd) {
          temp = std::move(*fd);
        } else {
          Logger("broker")->warn("blob cache: {}", fd.error().message());
        }
      }
    }
    bool cache_ok = temp.get() >= 0;
    auto got = clients[worker]->GetBlob(l.digest, l.size, [&](std::span<const char> bytes) {
      if (cache_ok && !sandbox::WriteAll(temp.get(), std::as_bytes(bytes))) cache_ok = false;
      return Append(i, bytes);
    });
    if (temp.get() >= 0) {
      temp.reset();
      if (!got || !cache_ok ||
          !sandbox::RenameAt(cache_dir.get(), temp_name, cache_dir.get(), l.digest.substr(7))) {
        (void)sandbox::UnlinkAt(cache_dir.get(), temp_name, 0);
      }
    }
    if (got) {
      std::lock_guard lock(mu);
      ++counts.fetched;
    }
    Finish(i, got ? Status() : Status(Fail(std::move(got).error())));
  }

  void Work(size_t worker) {
    for (;;) {
      size_t i;
      {
        std::lock_guard lock(mu);
        if (Stopped() || next >= layers.size()) return;
        i = next++;
      }
      Fetch(worker, i);
    }
  }

  // Moves layer after layer into its pipe, in order, as the job reads them.
  void Feed() {
    sandbox::ScopedSigpipeBlock no_sigpipe;  // a reader gone is EPIPE here
    std::vector<std::byte> buf(kCopyChunk);
    for (size_t i = 0; i < layers.size(); ++i) {
      Layer& l = layers[i];
      std::unique_lock lock(mu);
      current = i;
      cv.notify_all();
      for (;;) {
        cv.wait(lock, [&] { return Stopped() || !l.chunks.empty() || l.done || l.error; });
        if (Stopped()) return;
        if (!l.chunks.empty()) {
          std::string chunk = std::move(l.chunks.front());
          l.chunks.pop_front();
          spooled -= chunk.size();
          cv.notify_all();
          lock.unlock();
          Status written = sandbox::WriteAll(l.write.get(), std::as_bytes(std::span(chunk)));
          lock.lock();
          if (!written) {  // the job stopped reading: it is over
            stop = true;
            cv.notify_all();
            return;
          }
          continue;
        }
        break;
      }
      if (l.error) {  // the job sees the stream end early; Failure() says why
        l.write.reset();
        stop = true;
        cv.notify_all();
        return;
      }
      UniqueFd cached = std::move(l.cached);
      lock.unlock();
      while (cached.get() >= 0) {
        auto n = sandbox::ReadSome(cached.get(), buf);
        if (!n || *n == 0) break;
        if (!sandbox::WriteAll(l.write.get(), std::span(buf).first(*n))) {
          std::lock_guard relock(mu);
          stop = true;
          cv.notify_all();
          return;
        }
        if (Stopped()) return;
      }
      l.write.reset();
    }
  }
};

Result<std::unique_ptr<RegistryPull>> RegistryPull::Start(const std::string& spec,
                                                          const Platform& platform,
                                                          const PullOptions& options) {
  LX_ASSIGN_OR_RETURN(RegistryRef ref, ParseRegistryRef(spec));
  LX_ASSIGN_OR_RETURN(std::unique_ptr<RegistryClient> client, Connect(ref, options));
  std::unique_ptr<RegistryPull> pull(new RegistryPull());
  LX_ASSIGN_OR_RETURN(pull->image_, Resolve(*client, platform));
  auto state = std::make_unique<State>();
  state->ref = ref;
  state->options = options;
  if (state->options.parallel > 16) state->options.parallel = 16;
  if (!options.blob_cache.empty()) {
    // DIR and DIR/sha256 are made when missing, as mkdir -p would.
    if (Status s = sandbox::MkdirAt(AT_FDCWD, options.blob_cache, 0755);
        !s && s.error().err() != EEXIST) {
      return Fail(std::move(s).error().With("blob cache {:?}", options.blob_cache));
    }
    auto dir = sandbox::OpenAt(AT_FDCWD, options.blob_cache, O_PATH | O_DIRECTORY);
    if (!dir) return Fail(std::move(dir).error().With("blob cache {:?}", options.blob_cache));
    if (Status s = sandbox::MkdirAt(dir->get(), "sha256", 0755); !s && s.error().err() != EEXIST) {
      return Fail(std::move(s).error().With("blob cache {:?}", options.blob_cache));
    }
    auto sha = sandbox::OpenAt(dir->get(), "sha256", O_PATH | O_DIRECTORY | O_NOFOLLOW);
    if (!sha) return Fail(std::move(sha).error().With("blob cache {:?}", options.blob_cache));
    state->cache_dir = std::move(*sha);
  }
  std::vector<UniqueFd> reads;
  state->layers.resize(pull->image_.layers.size());
  for (size_t i = 0; i < pull->image_.layers.size(); ++i) {
    LayerSource& source = pull->image_.layers[i];
    LX_ASSIGN_OR_RETURN(sandbox::Pipe pipe, sandbox::MakePipe(0));
    // A bigger pipe: fewer wakeups between the feeder and the job.
    (void)::fcntl(pipe.write.get(), F_SETPIPE_SZ, 1 << 20);
    State::Layer& l = state->layers[i];
    l.digest = source.digest.value_or("");
    l.size = source.size;
    l.display = source.display;
    l.write = std::move(pipe.write);
    source.fd = pipe.read.get();
    reads.push_back(std::move(pipe.read));
  }
  size_t workers = std::min<size_t>(state->layers.size(), options.parallel + 1);
  for (size_t w = 0; w < workers; ++w) {
    if (w == 0) {
      state->clients.push_back(std::move(client));
    } else {
      LX_ASSIGN_OR_RETURN(std::unique_ptr<RegistryClient> more, Connect(ref, options));
      state->clients.push_back(std::move(more));
    }
  }
  pull->reads_ = std::move(reads);
  pull->state_ = std::move(state);
  State* s = pull->state_.get();
  for (size_t w = 0; w < workers; ++w) s->workers.emplace_back([s, w] { s->Work(w); });
  s->feeder = std::thread([s] { s->Feed(); });
  return pull;
}

RegistryPull::~RegistryPull() {
  if (!state_) return;
  {
    std::lock_guard lock(state_->mu);
    state_->stop = true;
    state_->cv.notify_all();
  }
  state_->cancel = true;
  reads_.clear();  // a feeder blocked on a full pipe gets EPIPE
  if (state_->feeder.joinable()) state_->feeder.join();
  for (std::thread& t : state_->workers) t.join();
}

std::optional<Error> RegistryPull::Failure(size_t index) const {
  if (!state_ || index >= state_->layers.size()) return std::nullopt;
  std::lock_guard lock(state_->mu);
  return state_->layers[index].error;
}

RegistryPull::Counts RegistryPull::counts() const {
  if (!state_) return {};
  std::lock_guard lock(state_->mu);
  return state_->counts;
}

}  // namespace layerx::broker
