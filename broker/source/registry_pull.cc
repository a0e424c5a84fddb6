#include "broker/source/registry_pull.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "broker/log/logging.h"
#include "broker/source/registry_client.h"
#include "broker/source/registry_resolve.h"
#include "broker/source/signature_policy.h"
#include "extractor/digest.h"
#include "sandbox/sys.h"

namespace layerx::broker {

using registry_detail::Answered;
using registry_detail::Reach;
using registry_detail::Resolve;
using sandbox::UniqueFd;

namespace {

constexpr size_t kCopyChunk = 256 * 1024;
// Spool besides the budget for the layer being fed: it always drains.
constexpr uint64_t kCurrentReserve = 8 * 1024 * 1024;

}  // namespace

// Everything the workers and the feeder share, under one mutex.
struct RegistryPull::State {
  // A block of a downloaded blob: filled by a worker, then moved into its pipe
  // by the feeder. Blocks come from one arena, mapped once and backed by huge
  // pages where the kernel allows (a fresh 4 KiB page per 4 KiB downloaded
  // cost more than the copy), and are reused: no allocation per chunk.
  struct Block {
    char* bytes = nullptr;
    size_t size = 0;
  };

  struct Layer {
    std::string digest;
    std::optional<uint64_t> size;
    std::string display;
    UniqueFd write;      // the pipe's write end, the feeder's (once taken)
    bool taken = false;  // Input() made its pipe
    // Hashed by the feeder as it writes (Input(i, true)): the extractor reads
    // the pipe itself, and the job takes the digest from here.
    bool hash = false;
    extractor::Sha256 sha;
    std::atomic<uint64_t> written{0};
    std::optional<HashedStream::Whole> whole;  // under mu
    std::deque<Block> blocks;                  // downloaded, not yet fed
    uint64_t held = 0;                         // bytes of blocks this layer holds
    UniqueFd cached;                           // a verified blob from the cache, fed whole
    bool done = false;                         // the download finished (or the cache had it)
    std::optional<Error> error;                // the download failed
    bool cut = false;  // its pipe closed before its end: the pull stopped (`failed`)
  };

  RegistryRef ref;
  PullOptions options;
  std::vector<Layer> layers;
  std::vector<std::unique_ptr<RegistryClient>> clients;  // one per worker
  UniqueFd cache_dir;                                    // DIR/sha256, or -1

  UniqueFd wake;  // an eventfd: StopAll() wakes a feeder waiting on a full pipe
  std::mutex mu;
  std::condition_variable space;  // workers wait for room in the spool
  std::condition_variable fed;    // the feeder waits for blocks
  size_t current = 0;             // the layer the feeder is on
  // The first layer whose download failed (not because the pull stopped). One
  // ahead of the layer being applied stops the pull at once: the job is told
  // now, not when it reaches that layer.
  std::optional<size_t> failed;
  uint64_t spooled = 0;  // bytes of blocks held, all layers
  std::vector<char*> free_blocks;
  char* arena = nullptr;
  size_t arena_size = 0, arena_used = 0;
  std::vector<std::unique_ptr<char[]>> overflow;  // blocks past the arena (not expected)
  std::atomic<bool> stop{false};                  // set under mu; FromCache reads it without
  size_t next = 0;                                // the next layer a worker takes
  Counts counts;
  std::atomic<bool> cancel{false};

  std::vector<std::thread> workers;
  std::thread feeder;
  LogRelay relay;  // the workers' and the feeder's lines, said on the job's thread

  ~State() {
    if (arena != nullptr) ::munmap(arena, arena_size);
  }

  bool Stopped() const { return stop || (options.cancel != nullptr && options.cancel->load()); }

  void StopAll() {
    stop = true;
    space.notify_all();
    fed.notify_all();
    uint64_t one = 1;
    (void)!::write(wake.get(), &one, sizeof(one));  // a feeder waiting on a full pipe
  }

  // The spool: `spool_bytes` for all layers, and besides it kCurrentReserve
  // for the layer being fed, which always drains (so it can never wait on
  // layers that wait for it).
  void MapArena(size_t workers_count) {
    constexpr size_t kHuge = 2 << 20;
    arena_size =
        (options.spool_bytes + kCurrentReserve + (workers_count + 1) * kCopyChunk + 2 * kHuge - 1) /
        kHuge * kHuge;
    void* p = ::mmap(nullptr, arena_size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      arena_size = 0;
      return;
    }
    arena = static_cast<char*>(p);
    (void)::madvise(arena, arena_size, MADV_HUGEPAGE);  // best effort
    // Blocks from the first 2 MiB boundary: whole huge pages.
    arena_used = (kHuge - reinterpret_cast<uintptr_t>(arena) % kHuge) % kHuge;
  }

  char* NewBlock() {
    if (!free_blocks.empty()) {
      char* b = free_blocks.back();
      free_blocks.pop_back();
      return b;
    }
    if (arena != nullptr && arena_used + kCopyChunk <= arena_size) {
      char* b = arena + arena_used;
      arena_used += kCopyChunk;
      return b;
    }
    overflow.push_back(std::make_unique_for_overwrite<char[]>(kCopyChunk));
    return overflow.back().get();
  }

  // A block for layer i's download, once there is room for it.
  Result<Block> Acquire(size_t i) {
    std::unique_lock lock(mu);
    Layer& l = layers[i];
    space.wait(lock, [&] {
      return Stopped() || spooled + kCopyChunk <= options.spool_bytes ||
             (i == current && l.held + kCopyChunk <= kCurrentReserve);
    });
    if (Stopped()) return Fail(MakeError(ErrorKind::kCancelled, "pull stopped"));
    spooled += kCopyChunk;
    l.held += kCopyChunk;
    return Block{NewBlock(), 0};
  }

  void ReleaseLocked(size_t i, Block b) {
    spooled -= kCopyChunk;
    layers[i].held -= kCopyChunk;
    free_blocks.push_back(b.bytes);
    space.notify_all();
  }

  void Push(size_t i, Block b) {
    std::lock_guard lock(mu);
    layers[i].blocks.push_back(b);
    if (i == current) fed.notify_one();
  }

  // Downloaded bytes into layer i's blocks (`tail`: the one being filled).
  Status Append(size_t i, Block& tail, std::span<const char> bytes) {
    while (!bytes.empty()) {
      if (tail.bytes == nullptr) {
        LX_ASSIGN_OR_RETURN(tail, Acquire(i));
      }
      size_t n = std::min(bytes.size(), kCopyChunk - tail.size);
      std::memcpy(tail.bytes + tail.size, bytes.data(), n);
      tail.size += n;
      bytes = bytes.subspan(n);
      if (tail.size == kCopyChunk) Push(i, std::exchange(tail, Block{}));
    }
    return {};
  }

  void Finish(size_t i, Block tail, Status status) {
    std::lock_guard lock(mu);
    if (tail.bytes != nullptr) {
      if (status && tail.size > 0) {
        layers[i].blocks.push_back(tail);
      } else {
        ReleaseLocked(i, tail);
      }
    }
    if (status) {
      layers[i].done = true;
    } else {
      layers[i].error = std::move(status).error();
      if (!Stopped() && !failed) {
        failed = i;
        // The layer being fed drains what it got first, then ends (Feed).
        if (i != current) StopAll();
      }
    }
    fed.notify_one();
  }

  // The pull stopped: every pipe still open ends now (under mu), so no job or
  // service waits on a stream nobody feeds; the job asks Failure() why.
  void CutPipes() {
    for (Layer& l : layers) {
      if (l.write.get() < 0) continue;
      l.cut = true;
      l.write.reset();
    }
  }

  // Why layer i's stream ended early (under mu): its own download, or another
  // layer's that stopped the pull (named as that layer).
  std::optional<Error> FailureLocked(size_t i) const {
    if (!failed || *failed == i) return layers[i].error;
    if (!layers[i].cut && !layers[i].error) return std::nullopt;  // whole: the job's checks decide
    const Layer& other = layers[*failed];
    Error e = *other.error;
    return std::move(e).WithLayer(*failed + 1, other.display);
  }

  // Blob i from the cache, verified: true when it is there and good. A blob
  // that does not match its digest or size is dropped (and fetched again).
  bool FromCache(size_t i) {
    Layer& l = layers[i];
    std::string name = l.digest.substr(7);
    auto fd =
        sandbox::OpenRegularFile(cache_dir.get(), name, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS);
    if (!fd) return false;
    // Of another size: dropped unread (a planted huge file is never hashed).
    auto st = sandbox::Fstat(fd->get());
    if (!st || (l.size && static_cast<uint64_t>(st->st_size) != *l.size)) {
      Logger("broker")->warn("blob cache: {} is not the size its manifest says: dropped", l.digest);
      (void)sandbox::UnlinkAt(cache_dir.get(), name, 0);
      return false;
    }
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
    fed.notify_one();
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
    Block tail;
    // The job checks the digest as it reads the pipe; the client checks it
    // only for a blob that goes into the cache.
    auto got = clients[worker]->GetBlob(
        l.digest, l.size,
        [&](std::span<const char> bytes) {
          if (cache_ok && !sandbox::WriteAll(temp.get(), std::as_bytes(bytes))) cache_ok = false;
          return Append(i, tail, bytes);
        },
        BlobOptions{.verify_digest = temp.get() >= 0});
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
    Finish(i, std::move(tail), got ? Status() : Status(Fail(Answered(std::move(got).error()))));
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

  // Writes all of `bytes` into the pipe `fd` (non-blocking), waiting for room
  // or for StopAll(). False when stopped or the reader is gone (EPIPE).
  bool Put(int fd, std::span<const std::byte> bytes) {
    while (!bytes.empty()) {
      ssize_t n = ::write(fd, bytes.data(), bytes.size());
      if (n > 0) {
        bytes = bytes.subspan(static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno != EAGAIN) return false;
      struct pollfd fds[2] = {{.fd = fd, .events = POLLOUT, .revents = 0},
                              {.fd = wake.get(), .events = POLLIN, .revents = 0}};
      if (::poll(fds, 2, -1) < 0 && errno != EINTR) return false;
      if (fds[1].revents != 0) return false;
    }
    return true;
  }

  // Moves layer after layer into its pipe, in order, as the job takes them.
  void Feed() {
    sandbox::ScopedSigpipeBlock no_sigpipe;  // a reader gone is EPIPE here
    std::vector<std::byte> buf(kCopyChunk);
    for (size_t i = 0; i < layers.size(); ++i) {
      Layer& l = layers[i];
      std::unique_lock lock(mu);
      current = i;
      space.notify_all();  // its worker may use the reserve now
      for (;;) {
        fed.wait(lock, [&] {
          return Stopped() || (l.write.get() >= 0 && (!l.blocks.empty() || l.done || l.error));
        });
        if (Stopped()) {
          CutPipes();
          return;
        }
        if (l.blocks.empty()) break;
        Block b = l.blocks.front();
        l.blocks.pop_front();
        lock.unlock();
        Count(l, std::as_bytes(std::span(b.bytes, b.size)));
        bool written = Put(l.write.get(), std::as_bytes(std::span(b.bytes, b.size)));
        lock.lock();
        ReleaseLocked(i, b);
        if (!written) {  // stopped, or the job stopped reading: it is over
          StopAll();
          CutPipes();
          return;
        }
      }
      if (l.error) {  // the job sees the stream end early; Failure() says why
        StopAll();
        CutPipes();
        return;
      }
      UniqueFd cached = std::move(l.cached);
      lock.unlock();
      while (cached.get() >= 0) {
        auto n = sandbox::ReadSome(cached.get(), buf);
        if (!n || *n == 0) break;
        Count(l, std::span(buf).first(*n));
        if (!Put(l.write.get(), std::span(buf).first(*n))) {
          std::lock_guard relock(mu);
          StopAll();
          CutPipes();
          return;
        }
      }
      lock.lock();
      // Whole: the digest is known before the stream ends.
      if (l.hash) l.whole = HashedStream::Whole{l.sha.Finish(), l.written.load()};
      l.write.reset();
    }
  }

  void Count(Layer& l, std::span<const std::byte> bytes) {
    if (!l.hash) return;
    l.sha.Update(bytes.data(), bytes.size());
    l.written.fetch_add(bytes.size(), std::memory_order_relaxed);
  }

  // Layer i's pipe, made now: its read end for the caller, the write end the
  // feeder's. Made as the job reaches each layer, so a many-layer image holds
  // two descriptors at a time, not two per layer.
  Result<UniqueFd> Input(size_t i, bool hash) {
    std::lock_guard lock(mu);
    Layer& l = layers[i];
    if (l.taken) return Fail(MakeError(ErrorKind::kInternal, "layer {} taken twice", i + 1));
    if (failed) {  // the pull stopped on a failed download: nothing feeds this layer
      l.cut = true;
      if (std::optional<Error> why = FailureLocked(i)) return Fail(std::move(*why));
    }
    LX_ASSIGN_OR_RETURN(sandbox::Pipe pipe, sandbox::MakePipe(0));
    (void)::fcntl(pipe.write.get(), F_SETPIPE_SZ, 1 << 20);  // fewer wakeups; best effort
    LX_TRY(sandbox::SetNonBlocking(pipe.write.get()));
    l.write = std::move(pipe.write);
    l.taken = true;
    l.hash = hash;
    fed.notify_one();
    return std::move(pipe.read);
  }
};

// What the job asks of layer i's stream as it reads it.
class RegistryPull::LayerHash final : public HashedStream {
 public:
  LayerHash(State* state, size_t index) : state_(state), index_(index) {}
  uint64_t BytesSoFar() const override {
    return state_->layers[index_].written.load(std::memory_order_relaxed);
  }
  std::optional<Whole> Finished() const override {
    std::lock_guard lock(state_->mu);
    return state_->layers[index_].whole;
  }
  void RelayLogs() const override { state_->relay.Relay(); }

 private:
  State* state_;
  size_t index_;
};

Result<std::unique_ptr<RegistryPull>> RegistryPull::Start(const std::string& spec,
                                                          const Platform& platform,
                                                          const PullOptions& options) {
  LX_ASSIGN_OR_RETURN(RegistryRef named, ParseRegistryRef(spec));
  // Whether it may be pulled at all: decided for the name as given, before
  // any registry is contacted (inspect reads metadata only, as skopeo's).
  LX_ASSIGN_OR_RETURN(SignaturePolicy policy, LoadSignaturePolicy(options.signature_policy));
  LX_TRY(CheckSignaturePolicy(policy, named));
  // The registry that has it: a mirror, the location registries.conf names, or the one named.
  LX_ASSIGN_OR_RETURN(registry_detail::Reached reached, Reach(named, options));
  const RegistryRef& ref = reached.ref;
  RegistryClient* client = reached.client.get();
  std::unique_ptr<RegistryPull> pull(new RegistryPull());
  // The downloads start as soon as the manifest names the layers: the config
  // is fetched while the first layer's request is on its way (a registry
  // takes milliseconds to answer each). A config that fails stops them (the
  // pull is destroyed).
  auto begin = [&](const std::vector<LayerSource>& layers) -> Status {
    LX_ASSIGN_OR_RETURN(pull->state_, StartDownloads(ref, options, layers, *client));
    for (size_t i = 0; i < layers.size(); ++i) {
      pull->hashes_.push_back(std::make_unique<LayerHash>(pull->state_.get(), i));
    }
    return {};
  };
  LX_ASSIGN_OR_RETURN(pull->image_, Resolve(*client, std::move(reached.top), platform, begin));
  return pull;
}

Result<std::unique_ptr<RegistryPull::State>> RegistryPull::StartDownloads(
    const RegistryRef& ref, const PullOptions& options, const std::vector<LayerSource>& layers,
    RegistryClient& client) {
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
  int wake = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) return Fail(OsError(errno, "eventfd"));
  state->wake = UniqueFd(wake);
  state->layers = std::vector<State::Layer>(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerSource& source = layers[i];
    State::Layer& l = state->layers[i];
    l.digest = source.digest.value_or("");
    l.size = source.size;
    l.display = source.display;
  }
  size_t workers = std::min<size_t>(state->layers.size(), state->options.parallel + 1);
  state->MapArena(workers);
  // Clones share what the first client learnt (scheme, token): no worker
  // authenticates again. They stop on the pull's own flag, set when the job is
  // over whichever way it ended (a cancelled job ends, too).
  for (size_t w = 0; w < workers; ++w) {
    LX_ASSIGN_OR_RETURN(std::unique_ptr<RegistryClient> clone, client.Clone(&state->cancel));
    state->clients.push_back(std::move(clone));
  }
  State* s = state.get();
  for (size_t w = 0; w < workers; ++w) {
    s->workers.emplace_back([s, w] {
      LogTarget captured = s->relay.Capture();
      s->Work(w);
    });
  }
  s->feeder = std::thread([s] {
    LogTarget captured = s->relay.Capture();
    s->Feed();
  });
  return state;
}

RegistryPull::~RegistryPull() {
  if (!state_) return;
  {
    std::lock_guard lock(state_->mu);
    state_->StopAll();
  }
  state_->cancel = true;
  if (state_->feeder.joinable()) state_->feeder.join();
  for (std::thread& t : state_->workers) t.join();
  state_->relay.Relay();
}

void RegistryPull::RelayLogs() const {
  if (state_) state_->relay.Relay();
}

Result<UniqueFd> RegistryPull::Input(size_t index) {
  if (!state_ || index >= state_->layers.size()) {
    return Fail(MakeError(ErrorKind::kInternal, "no layer {}", index + 1));
  }
  state_->relay.Relay();
  return state_->Input(index, false);
}

Result<ResolvedImage::Taken> RegistryPull::HashedInput(size_t index) {
  if (!state_ || index >= state_->layers.size()) {
    return Fail(MakeError(ErrorKind::kInternal, "no layer {}", index + 1));
  }
  state_->relay.Relay();
  LX_ASSIGN_OR_RETURN(UniqueFd fd, state_->Input(index, true));
  return ResolvedImage::Taken{std::move(fd), hashes_[index].get()};
}

std::optional<Error> RegistryPull::Failure(size_t index) const {
  if (!state_ || index >= state_->layers.size()) return std::nullopt;
  state_->relay.Relay();
  std::lock_guard lock(state_->mu);
  return state_->FailureLocked(index);
}

RegistryPull::Counts RegistryPull::counts() const {
  if (!state_) return {};
  std::lock_guard lock(state_->mu);
  return state_->counts;
}

}  // namespace layerx::broker
