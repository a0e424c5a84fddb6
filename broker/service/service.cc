// `layerx serve`: the extraction service (include/layerx/layerx.hpp Serve,
// broker/service.capnp). One kj event loop thread owns every connection, the
// queue and the counters; each running job has a worker thread of its own that
// calls broker::RunExtract and touches nothing else of the loop's. The worker
// reports through its JobShared (progress under a mutex, the result once) and
// a cross-thread fulfiller; the loop reads progress on its 100 ms tick.
//
// Who a client is: SO_PEERCRED, read once at accept; a peer of no tenant and
// no operator gets one sentence and no connection (Hub::TurnAway), and the
// others are capped per tenant and closed when idle. What it may read or
// write: only the descriptors it passed, checked here (readable inputs that are
// regular files or pipes, never O_PATH; writable, empty, non-append regular
// outputs). The service never opens a path a client named.
#include <capnp/rpc-twoparty.h>
#include <capnp/rpc.capnp.h>
#include <capnp/serialize.h>
#include <fcntl.h>
#include <kj/async-io.h>
#include <kj/async-unix.h>
#include <kj/debug.h>
#include <linux/magic.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "broker/bridge/bridge.h"
#include "broker/service/service.capnp.h"
#include "broker/service/service_config.h"
#include "broker/service/service_wire.h"
#include "sandbox/sys.h"

namespace layerx {
namespace {

namespace rpc = layerx::service;
using sandbox::UniqueFd;

constexpr uint kMaxFdsPerMessage = 250;  // layers + outputs of one request (SCM_MAX_FD is 253)
constexpr size_t kMaxLayers = 240;
constexpr size_t kMaxConfigBytes = 4 << 20;       // as broker/source.cc reads configs
constexpr auto kFdWait = 10 * kj::SECONDS;        // for the fds of a request to come
constexpr size_t kMaxConnections = 1024;          // all tenants' and operators' (never strangers)
constexpr size_t kMaxTurnedAway = 64;             // peers turned away, waited for at once
constexpr int64_t kTurnedAwayNs = 2'000'000'000;  // the longest one is waited for
constexpr size_t kFlowLimitWords = 1 << 20;       // 8 MiB of calls in flight per connection
constexpr uint64_t kReceiveLimitWords = 2 << 20;  // 16 MiB per message

struct Peer {
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;
};

// What the idle clock of one connection needs: its calls in flight (an
// extract's lasts while its job waits and runs and its progress streams),
// and since when it has had none.
struct Activity {
  uint32_t calls = 0;
  int64_t idle_since_ns = 0;
};

// An error for a client: exactly `sentence`. (KJ_EXCEPTION and KJ_REQUIRE
// would add the C++ expressions that built it, and their values.)
kj::Exception ClientError(std::string_view sentence) {
  return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                       kj::heapString(sentence.data(), sentence.size()));
}

// Between the loop and one job's worker thread.
struct JobShared {
  CancelToken cancel;
  std::mutex mu;
  std::optional<Progress> progress;  // the newest, not yet sent
  std::atomic<uint32_t> layer{0}, layers{0};
  std::optional<ExtractResult> result;  // written once, before the fulfiller fires
};

struct JobOutcome {
  ExtractResult result;
  double queued_seconds = 0;
};

struct Job {
  uint64_t id = 0;
  size_t tenant = 0;
  Peer peer;
  int64_t accepted_ns = 0, started_ns = 0;
  bool running = false;
  std::vector<UniqueFd> fds;  // everything passed, dup'd: owned here
  broker::ResolvedImage image;
  std::optional<broker::DockerArchiveSpec> docker;
  int ext4_fd = -1, manifest_fd = -1, config_fd = -1;
  broker::Ext4Options ext4;
  policy::Policy policy;
  uint64_t input_bytes = 0;
  size_t fd_cost = 0;  // counted in Hub::fds_held_
  std::shared_ptr<JobShared> shared = std::make_shared<JobShared>();
  kj::Own<kj::PromiseFulfiller<JobOutcome>> waiter;  // the RPC's; null once it went away
  kj::Maybe<rpc::ProgressSink::Client> sink;
  bool sending = false;
  std::thread thread;
};

struct TenantState {
  const broker::TenantConfig* config = nullptr;
  uint32_t connections = 0;
  uint32_t running = 0;
  uint32_t pending = 0;  // calls whose fds are still coming
  std::deque<uint64_t> queue;
};

struct Counters {
  std::map<std::string, uint64_t> jobs;  // outcome -> count
  uint64_t input_bytes = 0, tar_bytes = 0, entries = 0;
  double seconds = 0, queued_seconds = 0;
};

// The metrics label of an outcome: FailureKindName as a label value
// ("invalid input" -> "invalid_input", "i/o" -> "io").
std::string OutcomeName(FailureKind kind) {
  std::string name;
  for (const char* c = FailureKindName(kind); *c != '\0'; ++c) {
    if (*c != '/') name += *c == ' ' ? '_' : *c;
  }
  return name;
}

void FillResult(rpc::Result::Builder out, const ExtractResult& result, double queued_seconds) {
  if (!result.ok()) {
    const ExtractError& e = result.error();
    auto f = out.initFailure();
    f.setKind(WireKind(e.kind));
    f.setMessage(e.message);
    f.setLayerIndex(static_cast<uint32_t>(e.layer_index));
    f.setLayer(e.layer);
    f.setEntry(kj::arrayPtr(reinterpret_cast<const kj::byte*>(e.entry.data()), e.entry.size()));
    f.setReason(e.reason);
    f.setErrno(e.sys_errno);
    return;
  }
  const ExtractReport& r = result.report();
  auto rep = out.initReport();
  rep.setEntries(r.entries);
  rep.setSeconds(r.seconds);
  rep.setManifestDigest(r.manifest_digest);
  rep.setQueuedSeconds(queued_seconds);
  auto layers = rep.initLayers(static_cast<uint>(r.layers.size()));
  for (size_t i = 0; i < r.layers.size(); ++i) {
    const LayerSummary& l = r.layers[i];
    auto w = layers[static_cast<uint>(i)];
    w.setIndex(static_cast<uint32_t>(l.index));
    w.setName(l.name);
    w.setDigest(l.digest);
    w.setDiffId(l.diff_id);
    w.setCompressedBytes(l.compressed_bytes);
    w.setUncompressedBytes(l.uncompressed_bytes);
    w.setEntries(l.entries);
    w.setFileBytes(l.file_bytes);
    w.setSetupMs(l.setup_ms);
    w.setExtractMs(l.extract_ms);
    w.setSendMs(l.send_ms);
    w.setMergeMs(l.merge_ms);
    w.setTotalMs(l.total_ms);
    w.setExtractorPeakRssKib(l.extractor_peak_rss_kib);
  }
  if (r.ext4) {
    rep.setHasExt4(true);
    auto e = rep.initExt4();
    e.setSizeBytes(r.ext4->size_bytes);
    e.setContentBytes(r.ext4->content_bytes);
    e.setInodes(r.ext4->inodes);
    e.setBuildMs(r.ext4->build_ms);
    e.setDeadBytes(static_cast<double>(r.ext4->dead_bytes));
  }
}

// A name the client chose, as it may appear in logs and errors: at most 256
// printable ASCII bytes, else `fallback`.
std::string ClientName(std::string_view name, std::string fallback) {
  if (name.empty() || name.size() > 256) return fallback;
  for (char c : name) {
    if (c < 0x20 || c > 0x7e) return fallback;
  }
  return std::string(name);
}

ExtractResult Failed(FailureKind kind, std::string reason) {
  return ExtractResult(detail::MakePublicError(kind, std::move(reason)));
}

// Files the service must not read or write for a client: on FUSE (a read can
// block for as long as the client's own server likes, past every clock and
// cancel), or the kernel's own file systems (proc, sys, debug, cgroup...),
// whose files answer with the reader's privileges.
Status CheckFileSystem(int fd, const char* what) {
  struct statfs fs;
  if (::fstatfs(fd, &fs) != 0) return Fail(OsError(errno, "{}: fstatfs", what));
  switch (static_cast<unsigned long>(fs.f_type)) {
    case FUSE_SUPER_MAGIC:
    case PROC_SUPER_MAGIC:
    case SYSFS_MAGIC:
    case DEBUGFS_MAGIC:
    case TRACEFS_MAGIC:
    case SECURITYFS_MAGIC:
    case CGROUP_SUPER_MAGIC:
    case CGROUP2_SUPER_MAGIC:
    case BPF_FS_MAGIC:
    case EFIVARFS_MAGIC:
    case 0x62656570:  // configfs
      return Fail(MakeError(ErrorKind::kPolicy,
                            "{}: on a file system the service does not read or write for "
                            "clients (FUSE, proc, sys, ...)",
                            what));
    default:
      return {};
  }
}

// A passed input: readable (not O_PATH), a regular file or a pipe.
Result<UniqueFd> TakeInput(int fd, const char* what) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return Fail(OsError(errno, "{}", what));
  if ((flags & O_PATH) != 0 || (flags & O_ACCMODE) == O_WRONLY) {
    return Fail(
        MakeError(ErrorKind::kPolicy, "{}: not opened for reading (O_RDONLY, not O_PATH)", what));
  }
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(fd));
  if (!S_ISREG(st.st_mode) && !S_ISFIFO(st.st_mode)) {
    return Fail(MakeError(ErrorKind::kPolicy, "{}: not a regular file or a pipe", what));
  }
  LX_TRY(CheckFileSystem(fd, what));
  return sandbox::Dup(fd);
}

// A passed output: an empty regular file open for writing, not O_APPEND.
Result<UniqueFd> TakeOutput(int fd, const char* what) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return Fail(OsError(errno, "{}", what));
  if ((flags & O_PATH) != 0 || (flags & O_ACCMODE) == O_RDONLY || (flags & O_APPEND) != 0) {
    return Fail(MakeError(ErrorKind::kPolicy,
                          "{}: not opened for writing (O_WRONLY or O_RDWR, "
                          "not O_APPEND)",
                          what));
  }
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(fd));
  if (!S_ISREG(st.st_mode))
    return Fail(MakeError(ErrorKind::kPolicy, "{}: not a regular file", what));
  if (st.st_size != 0) return Fail(MakeError(ErrorKind::kPolicy, "{}: not empty", what));
  LX_TRY(CheckFileSystem(fd, what));
  return sandbox::Dup(fd);
}

std::string JsonEscape(std::string_view text) {
  return nlohmann::json(std::string(text))
      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

class Hub;
using ExtractCall = capnp::CallContext<rpc::Service::ExtractParams, rpc::Service::ExtractResults>;

// The bootstrap capability of one connection: bound to its peer and tenant.
// Only tenants and operators get one; strangers are turned away at accept.
class ServiceImpl final : public rpc::Service::Server {
 public:
  ServiceImpl(Hub& server, Peer peer, int tenant, std::shared_ptr<Activity> activity)
      : server_(server), peer_(peer), tenant_(tenant), activity_(std::move(activity)) {}
  kj::Promise<void> extract(ExtractContext context) override;
  kj::Promise<void> status(StatusContext context) override;
  kj::Promise<void> metrics(MetricsContext context) override;

 private:
  // Counts the call in flight for as long as its promise lives.
  kj::Promise<void> Counted(kj::Promise<void> call) {
    ++activity_->calls;
    return call.attach(kj::defer([activity = activity_]() {
      --activity->calls;
      activity->idle_since_ns = sandbox::MonotonicNs();
    }));
  }

  Hub& server_;
  Peer peer_;
  int tenant_;  // -1: an operator of no tenant
  std::shared_ptr<Activity> activity_;
};

struct Connection {
  Connection(kj::Own<kj::AsyncCapabilityStream> s, Peer p, int t, std::shared_ptr<Activity> a,
             capnp::Capability::Client bootstrap)
      : peer(p),
        tenant(t),
        activity(std::move(a)),
        stream(kj::mv(s)),
        network(
            *stream, kMaxFdsPerMessage, capnp::rpc::twoparty::Side::SERVER,
            capnp::ReaderOptions{.traversalLimitInWords = kReceiveLimitWords, .nestingLimit = 64}),
        rpc(capnp::makeRpcServer(network, kj::mv(bootstrap))) {}
  Peer peer;
  int tenant;  // -1: an operator of no tenant
  std::shared_ptr<Activity> activity;
  kj::Own<kj::AsyncCapabilityStream> stream;
  capnp::TwoPartyVatNetwork network;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpc;
};

class Hub final : public kj::TaskSet::ErrorHandler {
 public:
  Hub(broker::ServiceConfig config, const ServeOptions& options, kj::AsyncIoContext& io)
      : config_(std::move(config)), options_(options), io_(io), tasks_(*this) {
    max_concurrent_ = config_.max_concurrent_jobs;
    if (max_concurrent_ == 0) {
      long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
      max_concurrent_ = cpus > 0 ? static_cast<uint32_t>(cpus) : 1;
    }
    for (const broker::TenantConfig& t : config_.tenants) tenants_.push_back({.config = &t});
    start_ns_ = sandbox::MonotonicNs();
    json_ = (options_.log_format.empty() ? config_.log_format : options_.log_format) == "json";
    // Never /dev/shm by default: a tmpfs the whole host shares, sized from
    // what clients declare.
    if (config_.scratch_dir.empty()) config_.scratch_dir = "/var/tmp";
    // Jobs hold their inputs and outputs open while they wait: raise the
    // soft limit to the hard one and admit jobs within half of it.
    struct rlimit nofile;
    if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0) {
      if (nofile.rlim_cur < nofile.rlim_max) {
        nofile.rlim_cur = nofile.rlim_max;
        (void)::setrlimit(RLIMIT_NOFILE, &nofile);
        (void)::getrlimit(RLIMIT_NOFILE, &nofile);
      }
      fd_budget_ = std::max<size_t>(64, static_cast<size_t>(nofile.rlim_cur) / 2);
    }
  }

  // The connections first (their calls' Abandon runs while everything else
  // is alive), then any worker still running is stopped and joined.
  ~Hub() noexcept(false) {
    connections_.clear();
    for (auto& [id, job] : jobs_) {
      job->shared->cancel.Cancel();
      if (job->thread.joinable()) job->thread.join();
    }
  }

  void taskFailed(kj::Exception&& exception) override {
    Log(LogLevel::kWarn, "service", "", 0,
        "task failed: " + std::string(exception.getDescription()));
  }

  // One log line, for the operator: text "tenant=ci job=12 message", or one JSON object.
  void Log(LogLevel level, std::string_view component, std::string_view tenant, uint64_t job,
           std::string_view message) const {
    if (!options_.log || level < options_.min_log_level) return;
    std::string line;
    if (json_) {
      static const char* const kLevels[] = {"", "debug", "info", "warn", "error"};
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      line = fmt::format("{{\"ts\":{}.{:03},\"level\":\"{}\",\"component\":{}", ts.tv_sec,
                         ts.tv_nsec / 1'000'000, kLevels[static_cast<int>(level)],
                         JsonEscape(component));
      if (!tenant.empty()) line += fmt::format(",\"tenant\":{}", JsonEscape(tenant));
      if (job != 0) line += fmt::format(",\"job\":{}", job);
      line += fmt::format(",\"msg\":{}}}", JsonEscape(message));
    } else {
      if (!tenant.empty()) line += fmt::format("tenant={} ", tenant);
      if (job != 0) line += fmt::format("job={} ", job);
      line += message;
    }
    options_.log(level, component, line);
  }

  Status Listen(UniqueFd fd, std::string ours);
  kj::Promise<void> Run();

  kj::Promise<void> Extract(const Peer& peer, int tenant, ExtractCall context);
  std::string Admission(size_t tenant) const;
  void FillStatus(const Peer& peer, int tenant, rpc::ServiceStatus::Builder out);
  std::string Metrics() const;
  bool IsOperator(const Peer& peer) const { return peer.uid == 0 || peer.uid == ::geteuid(); }
  const std::string& TenantName(int tenant) const {
    static const std::string kNone = "-";
    return tenant < 0 ? kNone : tenants_[static_cast<size_t>(tenant)].config->name;
  }
  void CountRefusal(int tenant, FailureKind kind) {
    refusals_[{tenant < 0 ? std::string("-") : TenantName(tenant), OutcomeName(kind)}]++;
  }

 private:
  kj::Promise<void> AcceptLoop();
  kj::Promise<void> AcceptSome();
  void Accept(UniqueFd fd);
  void TurnAway(UniqueFd fd, const std::string& sentence);
  void DrainTurnedAway();
  void LogTurnedAway(int tenant, const std::string& what);
  void Drop(uint64_t connection);
  void CloseIdle();
  kj::Promise<void> Tick();
  kj::Promise<void> WatchSignals();
  void Dispatch();
  void Start(Job& job);
  void Ended(uint64_t id);
  void Abandon(uint64_t id);
  void Erase(std::map<uint64_t, std::unique_ptr<Job>>::iterator it) {
    fds_held_ -= it->second->fd_cost;
    jobs_.erase(it);
  }
  void RunJob(Job& job);  // on the worker thread
  void SendProgress(Job& job);
  void BeginStop(const char* why);
  Result<std::unique_ptr<Job>> BuildJob(const Peer& peer, size_t tenant,
                                        rpc::ExtractRequest::Reader request,
                                        const std::vector<int>& fds);

  broker::ServiceConfig config_;
  const ServeOptions& options_;
  kj::AsyncIoContext& io_;
  uint32_t max_concurrent_ = 1;
  std::vector<TenantState> tenants_;
  size_t rr_ = 0;
  uint32_t running_ = 0, queued_ = 0, pending_ = 0;
  size_t fds_held_ = 0, fd_budget_ = 512;
  uint64_t next_job_ = 1, next_conn_ = 1;
  std::map<uint64_t, std::unique_ptr<Job>> jobs_;
  std::map<uint64_t, kj::Own<Connection>> connections_;
  struct TurnedAway {
    UniqueFd fd;
    int64_t until_ns;
  };
  std::vector<TurnedAway> turned_away_;
  int64_t turned_away_logged_ns_ = -1'000'000'000;
  uint64_t turned_away_unlogged_ = 0;
  std::map<std::string, Counters> counters_;  // by tenant
  std::map<std::pair<std::string, std::string>, uint64_t> refusals_;
  UniqueFd listen_fd_, signal_fd_;
  std::string socket_path_;  // ours to unlink at exit; empty when systemd's
  kj::Own<kj::UnixEventPort::FdObserver> listen_observer_, signal_observer_;
  kj::Maybe<kj::Promise<void>> accepting_;
  bool draining_ = false;
  int64_t start_ns_ = 0, stop_deadline_ns_ = 0;
  bool json_ = false;
  kj::Own<kj::PromiseFulfiller<void>> stopped_;
  std::atomic<bool> draining_stop_{false};  // draining_, for the workers
  kj::TaskSet tasks_;                       // last: its promises go before what they point at
};

kj::Promise<void> ServiceImpl::extract(ExtractContext context) {
  return Counted(server_.Extract(peer_, tenant_, context));
}

kj::Promise<void> ServiceImpl::status(StatusContext context) {
  server_.FillStatus(peer_, tenant_, context.getResults().initStatus());
  return Counted(kj::READY_NOW);
}

kj::Promise<void> ServiceImpl::metrics(MetricsContext context) {
  if (!server_.IsOperator(peer_)) {
    server_.CountRefusal(tenant_, FailureKind::kUnauthorized);
    return Counted(ClientError(fmt::format(
        "unauthorized: metrics are for the service's operators (root and its own uid), not uid {}",
        peer_.uid)));
  }
  context.getResults().setText(server_.Metrics());
  return Counted(kj::READY_NOW);
}

// Binds `sock` at `dir`/`name` with mode 0666 (anyone who can reach the path
// may connect; SO_PEERCRED decides what they get) and listens. A chmod by path
// after bind would follow whatever another user of a shared `dir` put at the
// name meanwhile (a symlink to a file of root's, made 0666 by root), and the
// umask is the whole process's (Serve() is a library call; its caller may be
// making files in other threads). So the socket is bound in a private dir
// beside its place (0700, a random name), given its mode there, and renamed
// into place, listening, with its mode already set; nothing is ever done to
// `dir`/`name` but that rename (and unlinking a socket a dead service left).
Status BindListening(int sock, const std::string& dir, const std::string& name) {
  LX_ASSIGN_OR_RETURN(UniqueFd parent, sandbox::OpenAt(AT_FDCWD, dir, O_PATH | O_DIRECTORY));
  std::string hidden;
  for (int attempt = 0;; ++attempt) {
    uint64_t nonce = 0;
    LX_TRY(sandbox::GetRandom(std::as_writable_bytes(std::span(&nonce, 1))));
    hidden = fmt::format(".layerx-sock-{:016x}", nonce);
    Status made = sandbox::MkdirAt(parent.get(), hidden, 0700);
    if (made) break;
    if (made.error().err() != EEXIST || attempt == 99) return made;
  }
  auto private_dir = sandbox::OpenAt(parent.get(), hidden, O_PATH | O_DIRECTORY | O_NOFOLLOW);
  // Whatever happens next, the private dir goes (through our fd for its
  // entry; the dir itself by name, which removes only an empty dir).
  struct Cleanup {
    int parent, dir;
    const std::string& name;
    ~Cleanup() {
      if (dir >= 0) (void)::unlinkat(dir, "s", 0);
      (void)::unlinkat(parent, name.c_str(), AT_REMOVEDIR);
    }
  } cleanup{parent.get(), private_dir ? private_dir->get() : -1, hidden};
  if (!private_dir) return Fail(private_dir.error());
  // In a dir others may write, the name could have been swapped between
  // mkdir and open: what we opened must be ours and shut to everyone else.
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(private_dir->get()));
  if (st.st_uid != ::geteuid() || (st.st_mode & 0077) != 0) {
    return Fail(MakeError(ErrorKind::kOs, "private dir {:?} was replaced", hidden));
  }
  // Bound through our fd of the dir, not its name; by name only without /proc.
  struct sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  int rc = -1;
  for (const std::string& path :
       {fmt::format("/proc/self/fd/{}/s", private_dir->get()), dir + "/" + hidden + "/s"}) {
    if (path.size() >= sizeof(addr.sun_path)) continue;
    std::memset(addr.sun_path, 0, sizeof(addr.sun_path));
    std::memcpy(addr.sun_path, path.data(), path.size());
    rc = ::bind(sock, reinterpret_cast<struct sockaddr*>(&addr), sizeof(addr));
    if (rc == 0 || errno != ENOENT) break;
  }
  if (rc != 0) return Fail(OsError(errno, "bind"));
  LX_TRY(sandbox::FchmodAtNoFollow(private_dir->get(), "s", 0666));
  if (::listen(sock, 128) != 0) return Fail(OsError(errno, "listen"));
  if (auto old = sandbox::FstatAt(parent.get(), name, AT_SYMLINK_NOFOLLOW);
      old && S_ISSOCK(old->st_mode)) {
    (void)::unlinkat(parent.get(), name.c_str(), 0);  // a socket left by a service that died
  }
  if (::renameat2(private_dir->get(), "s", parent.get(), name.c_str(), RENAME_NOREPLACE) != 0) {
    return Fail(OsError(errno == EEXIST ? EADDRINUSE : errno, "bind"));
  }
  return {};
}

// The listening socket: ours at options.socket, or systemd's fd 3. Taken
// before the event loop exists, whose own fds would otherwise take the number.
Result<UniqueFd> ListenSocket(const ServeOptions& options, std::string* ours) {
  UniqueFd fd;
  if (options.socket.empty()) {
    // systemd socket activation: LISTEN_PID is us, LISTEN_FDS >= 1, fd 3.
    const char* pid = ::getenv("LISTEN_PID");
    const char* fds = ::getenv("LISTEN_FDS");
    if (pid == nullptr || fds == nullptr || std::atol(pid) != ::getpid() || std::atoi(fds) < 1) {
      return Fail(MakeError(ErrorKind::kPolicy,
                            "no socket: give --socket PATH, or start from a systemd socket unit"));
    }
    ::unsetenv("LISTEN_PID");
    ::unsetenv("LISTEN_FDS");
    ::unsetenv("LISTEN_FDNAMES");
    int listening = 0, domain = 0;
    socklen_t len = sizeof(int);
    if (::getsockopt(3, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || listening == 0 ||
        ::getsockopt(3, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || domain != AF_UNIX) {
      return Fail(MakeError(ErrorKind::kPolicy, "LISTEN_FDS: fd 3 is not a listening unix socket"));
    }
    ::fcntl(3, F_SETFD, FD_CLOEXEC);
    fd = UniqueFd(3);
    LX_TRY(sandbox::SetNonBlocking(3));
    return fd;
  }
  if (options.socket.size() >= sizeof(sockaddr_un::sun_path)) {
    return Fail(MakeError(ErrorKind::kPolicy, "socket path {:?} is too long", options.socket));
  }
  size_t slash = options.socket.rfind('/');
  std::string dir = slash == std::string::npos ? "." : options.socket.substr(0, slash);
  std::string name = slash == std::string::npos ? options.socket : options.socket.substr(slash + 1);
  if (dir.empty()) dir = "/";
  if (name.empty() || name == "." || name == "..") {
    return Fail(MakeError(ErrorKind::kPolicy, "socket path {:?}: not a file name", options.socket));
  }
  int raw = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (raw < 0) return Fail(OsError(errno, "socket"));
  fd = UniqueFd(raw);
  if (Status s = BindListening(raw, dir, name); !s) {
    return Fail(std::move(s).error().With("socket {:?}", options.socket));
  }
  *ours = options.socket;
  return fd;
}

Status Hub::Listen(UniqueFd fd, std::string ours) {
  listen_fd_ = std::move(fd);
  socket_path_ = std::move(ours);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int sfd = ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) return Fail(OsError(errno, "signalfd"));
  signal_fd_ = UniqueFd(sfd);
  listen_observer_ = kj::heap<kj::UnixEventPort::FdObserver>(
      io_.unixEventPort, listen_fd_.get(), kj::UnixEventPort::FdObserver::OBSERVE_READ);
  signal_observer_ = kj::heap<kj::UnixEventPort::FdObserver>(
      io_.unixEventPort, signal_fd_.get(), kj::UnixEventPort::FdObserver::OBSERVE_READ);
  return {};
}

kj::Promise<void> Hub::AcceptLoop() {
  return listen_observer_->whenBecomesReadable().then([this]() { return AcceptSome(); });
}

// Accepts until the backlog is empty (the observer is edge-triggered); out of
// fds or memory, tries again shortly rather than leaving the backlog waiting.
kj::Promise<void> Hub::AcceptSome() {
  while (!draining_) {
    int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      Accept(UniqueFd(fd));
      continue;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN) return AcceptLoop();
    Log(LogLevel::kError, "service", "", 0, fmt::format("accept: {}", std::strerror(errno)));
    return io_.provider->getTimer().afterDelay(100 * kj::MILLISECONDS).then([this]() {
      return AcceptSome();
    });
  }
  return kj::READY_NOW;
}

void Hub::Accept(UniqueFd fd) {
  struct ucred cred = {};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return;
  Peer peer{.uid = cred.uid, .gid = cred.gid, .pid = cred.pid};
  const broker::TenantConfig* tenant = config_.TenantFor(cred.uid, cred.gid);
  int index = tenant == nullptr ? -1 : static_cast<int>(tenant - config_.tenants.data());
  // SECURITY: a peer of no tenant is answered and closed right here. It
  // holds no place under any cap, however many connections and uids it has
  // (one user with a subuid range has 65536), and no RPC state.
  if (tenant == nullptr && !IsOperator(peer)) {
    CountRefusal(-1, FailureKind::kUnauthorized);
    LogTurnedAway(-1, fmt::format("peer uid={} gid={} pid={}: no tenant: turned away", cred.uid,
                                  cred.gid, cred.pid));
    TurnAway(std::move(fd), fmt::format("unauthorized: uid {} gid {} is no tenant of this service",
                                        cred.uid, cred.gid));
    return;
  }
  // Each connection costs an fd: capped per tenant, and in all.
  std::string busy;
  if (tenant != nullptr && tenants_[index].connections >= tenant->max_connections) {
    busy = fmt::format("busy: tenant {} has {} connections open (max_connections={})", tenant->name,
                       tenants_[index].connections, tenant->max_connections);
  } else if (connections_.size() >= kMaxConnections) {
    busy =
        fmt::format("busy: the service has {} connections open (its limit)", connections_.size());
  }
  if (!busy.empty()) {
    CountRefusal(index, FailureKind::kBusy);
    LogTurnedAway(index, fmt::format("peer uid={} pid={}: {}", cred.uid, cred.pid, busy));
    TurnAway(std::move(fd), busy);
    return;
  }
  Log(LogLevel::kDebug, "service", TenantName(index), 0,
      fmt::format("connection from uid={} gid={} pid={}", cred.uid, cred.gid, cred.pid));
  auto stream = io_.lowLevelProvider->wrapUnixSocketFd(
      fd.release(), kj::LowLevelAsyncIoProvider::TAKE_OWNERSHIP |
                        kj::LowLevelAsyncIoProvider::ALREADY_CLOEXEC |
                        kj::LowLevelAsyncIoProvider::ALREADY_NONBLOCK);
  auto activity = std::make_shared<Activity>(Activity{.idle_since_ns = sandbox::MonotonicNs()});
  auto conn = kj::heap<Connection>(kj::mv(stream), peer, index, activity,
                                   kj::heap<ServiceImpl>(*this, peer, index, activity));
  conn->rpc.setFlowLimit(kFlowLimitWords);  // a peer that pipelines calls is read no further
  uint64_t id = next_conn_++;
  auto disconnected = conn->network.onDisconnect();
  connections_.emplace(id, kj::mv(conn));
  if (index >= 0) ++tenants_[index].connections;
  // Dropping the connection drops its calls: each extract's Abandon then
  // stops its job. (Dropped here first, its network's promise is broken.)
  tasks_.add(disconnected.then([this, id]() { return kj::evalLater([this, id]() { Drop(id); }); },
                               [](kj::Exception&&) {}));
}

// Answers a peer that gets no connection (no tenant, or over a cap): one
// Cap'n Proto RPC Abort message, which fails the client's calls with exactly
// `sentence`, written at once into the socket just accepted (its buffer
// takes the few bytes), and the end of our side. The socket is closed when
// the peer closes its end, reading and dropping what it sends meanwhile (fds
// in it are closed by the kernel), or after kTurnedAwayNs; closed at once
// beyond kMaxTurnedAway. (A close that meets the client's own first
// messages unread makes its write fail with EPIPE before it reads the
// answer, and it would show only that.)
void Hub::TurnAway(UniqueFd fd, const std::string& sentence) {
  capnp::MallocMessageBuilder message(64);
  auto abort = message.initRoot<capnp::rpc::Message>().initAbort();
  abort.setReason(sentence.c_str());
  abort.setType(capnp::rpc::Exception::Type::FAILED);
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  kj::ArrayPtr<const kj::byte> bytes = words.asBytes();
  (void)::send(fd.get(), bytes.begin(), bytes.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  (void)::shutdown(fd.get(), SHUT_WR);
  if (turned_away_.size() < kMaxTurnedAway) {
    turned_away_.push_back({std::move(fd), sandbox::MonotonicNs() + kTurnedAwayNs});
  }
}

// On each tick: what the peers turned away sent is dropped (at most 64 KiB
// each); those that closed their end, or whose time is over, are closed.
void Hub::DrainTurnedAway() {
  const int64_t now = sandbox::MonotonicNs();
  std::erase_if(turned_away_, [now](const TurnedAway& peer) {
    char buf[16384];
    for (int i = 0; i < 4; ++i) {
      ssize_t n = ::recv(peer.fd.get(), buf, sizeof(buf), MSG_DONTWAIT);
      if (n > 0) continue;
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
      return true;  // its end is closed
    }
    return now >= peer.until_ns;
  });
}

// At most one line a second for peers turned away at accept: a flood of
// connections must not flood the journal (the metrics count every one).
void Hub::LogTurnedAway(int tenant, const std::string& what) {
  int64_t now = sandbox::MonotonicNs();
  if (now - turned_away_logged_ns_ < 1'000'000'000) {
    ++turned_away_unlogged_;
    return;
  }
  std::string more =
      turned_away_unlogged_ == 0
          ? ""
          : fmt::format(" ({} more turned away since the last such line)", turned_away_unlogged_);
  Log(LogLevel::kWarn, "service", tenant < 0 ? "" : TenantName(tenant), 0, what + more);
  turned_away_logged_ns_ = now;
  turned_away_unlogged_ = 0;
}

void Hub::Drop(uint64_t connection) {
  auto it = connections_.find(connection);
  if (it == connections_.end()) return;
  if (it->second->tenant >= 0) --tenants_[static_cast<size_t>(it->second->tenant)].connections;
  connections_.erase(it);
}

// A connection with no call in flight for idle_timeout_seconds is closed: it
// is an fd and a place under the caps, held for nothing.
void Hub::CloseIdle() {
  const int64_t now = sandbox::MonotonicNs();
  const int64_t limit = static_cast<int64_t>(config_.idle_timeout_seconds) * 1'000'000'000;
  std::vector<uint64_t> idle;
  for (const auto& [id, conn] : connections_) {
    if (conn->activity->calls == 0 && now - conn->activity->idle_since_ns >= limit) {
      idle.push_back(id);
    }
  }
  for (uint64_t id : idle) {
    const Connection& conn = *connections_.at(id);
    Log(LogLevel::kInfo, "service", conn.tenant < 0 ? "" : TenantName(conn.tenant), 0,
        fmt::format("connection of uid={} pid={}: no call for {} s: closed", conn.peer.uid,
                    conn.peer.pid, config_.idle_timeout_seconds));
    Drop(id);
  }
}

Result<std::unique_ptr<Job>> Hub::BuildJob(const Peer& peer, size_t tenant,
                                           rpc::ExtractRequest::Reader request,
                                           const std::vector<int>& fds) {
  auto job = std::make_unique<Job>();
  job->tenant = tenant;
  job->peer = peer;
  size_t next = 0;
  auto take_input = [&](const char* what) -> Result<int> {
    if (next >= fds.size() || fds[next] < 0) {
      return Fail(MakeError(ErrorKind::kPolicy, "{}: no file descriptor came with it", what));
    }
    LX_ASSIGN_OR_RETURN(UniqueFd fd, TakeInput(fds[next++], what));
    job->fds.push_back(std::move(fd));
    return job->fds.back().get();
  };
  auto source = request.getSource();
  if (source.isDockerArchive()) {
    auto d = source.getDockerArchive();
    LX_ASSIGN_OR_RETURN(int fd, take_input("docker-archive"));
    std::string ref = d.getRef();
    if (ClientName(ref, "") != ref) {
      return Fail(
          MakeError(ErrorKind::kPolicy, "docker-archive ref: over 256 bytes or not printable"));
    }
    job->docker = broker::DockerArchiveSpec{
        .file = ClientName(d.getName().cStr(), "(fd)"), .ref = ref, .fd = fd};
    struct stat st;
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) job->input_bytes = st.st_size;
  } else {
    auto image = source.getImage();
    if (image.getLayers().size() == 0)
      return Fail(MakeError(ErrorKind::kPolicy, "no layers given"));
    if (image.getLayers().size() > kMaxLayers) {
      return Fail(MakeError(ErrorKind::kPolicy, "over {} layers", kMaxLayers));
    }
    auto config = image.getConfig();
    job->image.config.assign(reinterpret_cast<const char*>(config.begin()), config.size());
    job->image.manifest_digest = image.getManifestDigest();
    if (!job->image.manifest_digest.empty() && !broker::IsValidDigest(job->image.manifest_digest)) {
      return Fail(MakeError(ErrorKind::kInvalidInput, "manifest digest: not sha256:<64 hex>"));
    }
    std::vector<std::string> diff_ids;
    if (!job->image.config.empty()) {
      // The tar streams are checked against the config's diff_ids, not the client's word.
      auto doc = nlohmann::json::parse(job->image.config, nullptr, false);
      if (doc.is_discarded() || !doc.is_object()) {
        return Fail(MakeError(ErrorKind::kInvalidInput, "image config: not a JSON object"));
      }
      auto ids = doc.find("rootfs");
      if (ids != doc.end() && ids->is_object() && ids->contains("diff_ids") &&
          (*ids)["diff_ids"].is_array()) {
        for (const auto& d : (*ids)["diff_ids"]) {
          if (!d.is_string() || !broker::IsValidDigest(d.get<std::string>())) {
            return Fail(MakeError(ErrorKind::kInvalidInput, "image config: bad diff_ids"));
          }
          diff_ids.push_back(d.get<std::string>());
        }
      }
      if (diff_ids.size() != image.getLayers().size()) {
        return Fail(MakeError(ErrorKind::kInvalidInput,
                              "image config lists {} diff_ids for {} layers", diff_ids.size(),
                              image.getLayers().size()));
      }
    }
    size_t i = 0;
    for (auto layer : image.getLayers()) {
      broker::LayerSource l;
      l.display = ClientName(layer.getName().cStr(), fmt::format("layer {}", i + 1));
      l.path = l.display;  // names it in the report (read from l.fd)
      std::string digest = layer.getDigest();
      std::string diff_id = layer.getDiffId();
      if (!diff_id.empty() && !broker::IsValidDigest(diff_id)) {
        return Fail(
            MakeError(ErrorKind::kInvalidInput, "layer {}: diff_id: not sha256:<64 hex>", i + 1));
      }
      if (!digest.empty()) {
        if (!broker::IsValidDigest(digest)) {
          return Fail(
              MakeError(ErrorKind::kInvalidInput, "layer {}: digest: not sha256:<64 hex>", i + 1));
        }
        l.digest = digest;
        l.size = layer.getSize();
      }
      if (!diff_ids.empty()) {
        if (!diff_id.empty() && diff_id != diff_ids[i]) {
          return Fail(MakeError(ErrorKind::kIntegrity,
                                "layer {}: diff_id {} is not the config's {}", i + 1, diff_id,
                                diff_ids[i]));
        }
        l.diff_id = diff_ids[i];
      } else if (!diff_id.empty()) {
        l.diff_id = diff_id;
      }
      l.media_type = ClientName(layer.getMediaType().cStr(), "");
      LX_ASSIGN_OR_RETURN(l.fd, take_input("layer"));
      struct stat st;
      if (l.size) {
        job->input_bytes += *l.size;
      } else if (::fstat(l.fd, &st) == 0 && S_ISREG(st.st_mode)) {
        job->input_bytes += st.st_size;
      }
      job->image.layers.push_back(std::move(l));
      ++i;
    }
  }
  struct Out {
    bool has;
    int* slot;
    const char* what;
  };
  bool any = false;
  for (Out out : {Out{request.hasExt4(), &job->ext4_fd, "ext4 output"},
                  Out{request.hasManifest(), &job->manifest_fd, "manifest output"},
                  Out{request.hasConfig(), &job->config_fd, "config output"}}) {
    if (!out.has) continue;
    if (next >= fds.size() || fds[next] < 0) {
      return Fail(MakeError(ErrorKind::kPolicy, "{}: no file descriptor came with it", out.what));
    }
    LX_ASSIGN_OR_RETURN(UniqueFd fd, TakeOutput(fds[next++], out.what));
    *out.slot = fd.get();
    job->fds.push_back(std::move(fd));
    any = true;
  }
  if (!any)
    return Fail(
        MakeError(ErrorKind::kPolicy, "nothing to write: give an ext4, manifest or config output"));
  if (job->config_fd >= 0 && !job->docker && job->image.config.empty()) {
    return Fail(MakeError(ErrorKind::kPolicy, "a config was asked for, and the source has none"));
  }

  auto s = request.getExt4Settings();
  Ext4Settings settings;
  settings.size_bytes = s.getSizeBytes();
  settings.block_size = s.getBlockSize();
  settings.inode_ratio = s.getInodeRatio();
  settings.label = s.getLabel();
  settings.uuid = s.getUuid();
  settings.reproducible = s.getReproducible();
  settings.source_date_epoch = s.getSourceDateEpoch();
  LX_ASSIGN_OR_RETURN(job->ext4, detail::InternalExt4(settings));
  // mkfs writes an image of the size asked for into the service's scratch:
  // no bigger than the content could need.
  const uint64_t max_ext4 =
      std::max<uint64_t>(64 * policy::kGiB, 2 * tenants_[tenant].config->byte_budget);
  if (settings.size_bytes > max_ext4) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "ext4 size {} is over the service's {}",
                          settings.size_bytes, max_ext4));
  }

  // The tenant's policy; the client may only shorten its clocks. The byte
  // budget caps each layer's tar stream and the image's file data.
  const broker::TenantConfig& t = *tenants_[tenant].config;
  policy::PolicyBuilder builder(t.policy);
  const policy::Limits& limits = t.policy.limits;
  if (request.getLayerTimeoutMs() > 0 && request.getLayerTimeoutMs() < limits.layer_timeout_ms) {
    builder.LayerTimeoutMs(request.getLayerTimeoutMs());
  }
  if (request.getJobTimeoutMs() > 0 && request.getJobTimeoutMs() < limits.job_timeout_ms) {
    builder.JobTimeoutMs(request.getJobTimeoutMs());
  }
  if (t.byte_budget > 0) {
    builder.MaxLayerBytes(std::min(limits.max_layer_bytes, t.byte_budget));
  }
  LX_ASSIGN_OR_RETURN(job->policy, builder.Build());
  if (t.byte_budget > 0) {
    job->policy.limits.max_image_bytes =
        std::min(job->policy.limits.max_image_bytes, t.byte_budget);
  }
  return job;
}

// Whether one more job of `tenant` has room: it can start now, or wait in
// its queue and the service's. Pending calls (fds still coming) count as
// queued. Empty: room; else the busy reason.
std::string Hub::Admission(size_t tenant) const {
  const TenantState& t = tenants_[tenant];
  const std::string& name = t.config->name;
  // Dispatch() leaves no job waiting that could start, so a tenant with an
  // empty queue under both limits starts at once.
  bool starts_now = t.running < t.config->max_concurrent && running_ < max_concurrent_ &&
                    t.queue.empty() && t.pending == 0;
  if (starts_now) return {};
  if (t.queue.size() + t.pending >= t.config->max_queued) {
    return fmt::format(
        "busy: tenant {} has {} jobs running (max_concurrent={}) and {} queued "
        "(max_queued={})",
        name, t.running, t.config->max_concurrent, t.queue.size() + t.pending,
        t.config->max_queued);
  }
  if (queued_ + pending_ >= config_.queue_limit) {
    return fmt::format("busy: the service has {} jobs queued (queue_limit={})", queued_ + pending_,
                       config_.queue_limit);
  }
  return {};
}

kj::Promise<void> Hub::Extract(const Peer& peer, int tenant, ExtractCall context) {
  context.allowCancellation();
  auto answer = [context](const ExtractResult& result) mutable {
    FillResult(context.getResults().initResult(), result, 0);
  };
  if (tenant < 0) {
    CountRefusal(tenant, FailureKind::kUnauthorized);
    Log(LogLevel::kWarn, "service", "", 0,
        fmt::format("refused: uid={} gid={} pid={} is no tenant", peer.uid, peer.gid, peer.pid));
    answer(Failed(FailureKind::kUnauthorized,
                  fmt::format("unauthorized: uid {} gid {} is no tenant of this service", peer.uid,
                              peer.gid)));
    return kj::READY_NOW;
  }
  const size_t index = static_cast<size_t>(tenant);
  const std::string& name = TenantName(tenant);
  auto busy = [this, tenant, &name, answer](std::string why) mutable {
    CountRefusal(tenant, FailureKind::kBusy);
    Log(LogLevel::kInfo, "service", name, 0, why);
    answer(Failed(FailureKind::kBusy, std::move(why)));
    return kj::Promise<void>(kj::READY_NOW);
  };
  if (draining_) return busy("busy: the service is shutting down");
  // Before anything is parsed or waited for.
  if (std::string why = Admission(index); !why.empty()) return busy(std::move(why));

  auto request = context.getParams().getRequest();
  auto source = request.getSource();
  if (source.isImage() && source.getImage().getConfig().size() > kMaxConfigBytes) {
    answer(Failed(FailureKind::kUsage, fmt::format("image config over {} bytes", kMaxConfigBytes)));
    return kj::READY_NOW;
  }
  // Every Fd capability, in order: the layers (or the archive), then the
  // outputs. A capability that is a promise would make this wait: at most
  // kFdWait, counted as pending meanwhile.
  kj::Vector<kj::Promise<kj::Maybe<int>>> fd_promises;
  if (source.isDockerArchive()) {
    fd_promises.add(source.getDockerArchive().getFile().getFd());
  } else if (source.getImage().getLayers().size() <= kMaxLayers) {
    for (auto layer : source.getImage().getLayers()) fd_promises.add(layer.getBlob().getFd());
  }
  if (request.hasExt4()) fd_promises.add(request.getExt4().getFd());
  if (request.hasManifest()) fd_promises.add(request.getManifest().getFd());
  if (request.hasConfig()) fd_promises.add(request.getConfig().getFd());
  // Counted as pending until the fds came (or the call went away).
  struct Pending {
    Hub* hub;
    size_t index;
    bool counted = true;
    void Release() {
      if (!counted) return;
      counted = false;
      --hub->tenants_[index].pending;
      --hub->pending_;
    }
    ~Pending() { Release(); }
  };
  ++tenants_[index].pending;
  ++pending_;
  auto unpend = std::make_shared<Pending>(this, index);  // in place: a copy would release
  using Fds = kj::Maybe<kj::Array<kj::Maybe<int>>>;
  return kj::joinPromises(fd_promises.releaseAsArray())
      .then([](kj::Array<kj::Maybe<int>> got) -> Fds { return kj::mv(got); })
      .exclusiveJoin(
          io_.provider->getTimer().afterDelay(kFdWait).then([]() -> Fds { return nullptr; }))
      .then([this, peer, tenant, index, context, unpend,
             busy](Fds got) mutable -> kj::Promise<void> {
        unpend->Release();
        const std::string& name = TenantName(tenant);
        auto refuse = [&](ExtractResult failed) {
          counters_[name].jobs[OutcomeName(failed.error().kind)]++;
          Log(LogLevel::kInfo, "service", name, 0, "refused: " + failed.error().message);
          FillResult(context.getResults().initResult(), failed, 0);
          return kj::Promise<void>(kj::READY_NOW);
        };
        std::vector<int> fds;
        KJ_IF_MAYBE (array, got) {
          for (auto& m : *array) {
            KJ_IF_MAYBE (fd, m) {
              fds.push_back(*fd);
            } else {
              fds.push_back(-1);
            }
          }
        } else {
          return refuse(
              Failed(FailureKind::kUsage, "the request's file descriptors did not arrive"));
        }
        if (draining_) return busy("busy: the service is shutting down");
        if (std::string why = Admission(index); !why.empty()) return busy(std::move(why));
        auto built = BuildJob(peer, index, context.getParams().getRequest(), fds);
        if (!built) return refuse(ExtractResult(detail::PublicError(built.error())));
        std::unique_ptr<Job> job = std::move(*built);
        // What the job holds open while it waits and runs: its fds, and the
        // extractor's pipes and sockets when it runs.
        size_t cost = job->fds.size() + 8;
        if (fds_held_ + cost > fd_budget_) {
          return busy(fmt::format("busy: the service holds {} files (its budget is {})", fds_held_,
                                  fd_budget_));
        }
        job->fd_cost = cost;
        fds_held_ += cost;
        job->sink = context.getParams().getProgress();
        context.releaseParams();  // the message and the fds it carried: the job has dups
        TenantState& t = tenants_[index];
        uint64_t id = next_job_++;
        job->id = id;
        job->accepted_ns = sandbox::MonotonicNs();
        auto paf = kj::newPromiseAndFulfiller<JobOutcome>();
        job->waiter = kj::mv(paf.fulfiller);
        Log(LogLevel::kInfo, "service", name, id,
            fmt::format("accepted: uid={} pid={} layers={} input_bytes={}", peer.uid, peer.pid,
                        job->docker ? 0 : job->image.layers.size(), job->input_bytes));
        t.queue.push_back(id);
        ++queued_;
        Job& ref = *job;
        jobs_.emplace(id, std::move(job));
        Dispatch();
        if (!ref.running) {
          // Tell the client it waits.
          KJ_IF_MAYBE (sink, ref.sink) {
            auto req = sink->eventRequest();
            req.getEvent().setQueued(true);
            tasks_.add(req.send().catch_([](kj::Exception&&) {}));
          }
        }
        // The RPC waits for the job; if it goes away first (cancel or
        // disconnect), Abandon stops the job.
        return paf.promise.attach(kj::defer([this, id]() { Abandon(id); }))
            .then([context](JobOutcome outcome) mutable {
              FillResult(context.getResults().initResult(), outcome.result, outcome.queued_seconds);
            });
      });
}

void Hub::Dispatch() {
  while (running_ < max_concurrent_ && queued_ > 0) {
    std::optional<size_t> pick;
    for (size_t k = 0; k < tenants_.size(); ++k) {
      size_t i = (rr_ + k) % tenants_.size();
      if (!tenants_[i].queue.empty() && tenants_[i].running < tenants_[i].config->max_concurrent) {
        pick = i;
        break;
      }
    }
    if (!pick) break;
    rr_ = (*pick + 1) % tenants_.size();  // the next pick starts after this tenant
    uint64_t id = tenants_[*pick].queue.front();
    tenants_[*pick].queue.pop_front();
    --queued_;
    Start(*jobs_.at(id));
  }
}

void Hub::Start(Job& job) {
  TenantState& t = tenants_[job.tenant];
  job.running = true;
  job.started_ns = sandbox::MonotonicNs();
  ++t.running;
  ++running_;
  const broker::TenantConfig& tc = *t.config;
  if (tc.time_budget_seconds > 0) {
    // The budget counts from acceptance: what the queue took is gone.
    int64_t left_ms = static_cast<int64_t>(tc.time_budget_seconds) * 1000 -
                      (job.started_ns - job.accepted_ns) / 1'000'000;
    uint64_t ms = static_cast<uint64_t>(std::max<int64_t>(left_ms, 1));
    job.policy.limits.job_timeout_ms = std::min(job.policy.limits.job_timeout_ms, ms);
  }
  Log(LogLevel::kInfo, "service", tc.name, job.id,
      fmt::format("started: queued_ms={}", (job.started_ns - job.accepted_ns) / 1'000'000));
  auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
  // (In a shared_ptr: a kj::Own's destructor may throw, a thread's state's may not.)
  auto fulfiller =
      std::make_shared<kj::Own<kj::CrossThreadPromiseFulfiller<void>>>(kj::mv(paf.fulfiller));
  uint64_t id = job.id;
  tasks_.add(paf.promise.then([this, id]() { Ended(id); }));
  try {
    job.thread = std::thread([this, &job, fulfiller]() {
      try {
        RunJob(job);
      } catch (const std::exception& e) {
        job.shared->result.emplace(detail::MakePublicError(FailureKind::kInternal, e.what()));
      } catch (...) {
        job.shared->result.emplace(
            detail::MakePublicError(FailureKind::kInternal, "unknown error"));
      }
      (*fulfiller)->fulfill();
    });
  } catch (const std::system_error& e) {
    // No thread (EAGAIN: TasksMax, RLIMIT_NPROC): the job fails, its slot is freed.
    job.shared->result.emplace(detail::MakePublicError(
        FailureKind::kIo, fmt::format("no thread for the job: {}", e.what()), e.code().value()));
    (*fulfiller)->fulfill();
  }
}

// On the worker thread: reads the job's request fields (the loop leaves them
// alone while it runs) and writes only job.shared.
void Hub::RunJob(Job& job) {
  const std::string& tenant = tenants_[job.tenant].config->name;
  const uint64_t id = job.id;
  broker::LogTarget target(
      [this, &tenant, id](spdlog::level::level_enum level, std::string_view component,
                          std::string_view message) {
        Log(detail::PublicLevel(level), component, tenant, id, message);
      },
      detail::InternalLevel(options_.min_log_level));
  detail::SigpipeBlock sigpipe;
  broker::ExtractRequest request;
  if (job.docker) {
    request.docker = job.docker;
  } else {
    request.resolved = &job.image;
  }
  request.ext4_fd = job.ext4_fd;
  request.manifest_fd = job.manifest_fd;
  request.config_fd = job.config_fd;
  request.ext4_options = job.ext4;
  request.policy = job.policy;
  request.scratch_dir = config_.scratch_dir;
  request.extractor_path = options_.extractor_path;
  request.cancel = job.shared->cancel.flag();
  std::shared_ptr<JobShared> shared = job.shared;
  request.progress = [shared](const broker::LayerProgress& p) {
    shared->layer.store(static_cast<uint32_t>(p.index));
    shared->layers.store(static_cast<uint32_t>(p.layers));
    std::lock_guard lock(shared->mu);
    shared->progress = Progress{.layer = p.index,
                                .layers = p.layers,
                                .bytes_fed = p.bytes_fed,
                                .blob_bytes = p.blob_bytes,
                                .entries = p.records,
                                .done = p.done};
  };
  auto report = broker::RunExtract(request);
  if (report) {
    shared->result.emplace(detail::PublicReport(*report));
  } else {
    ExtractError error = detail::PublicError(report.error());
    if (error.kind == FailureKind::kCancelled && draining_stop_.load()) {
      error.reason = "the service is shutting down";
      error.message = error.message + " (the service is shutting down)";
    }
    shared->result.emplace(std::move(error));
  }
}

void Hub::Ended(uint64_t id) {
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
  Job& job = *it->second;
  if (job.thread.joinable()) job.thread.join();
  TenantState& t = tenants_[job.tenant];
  --t.running;
  --running_;
  const std::string& name = t.config->name;
  ExtractResult& result = *job.shared->result;
  int64_t now = sandbox::MonotonicNs();
  Counters& c = counters_[name];
  c.seconds += (now - job.started_ns) / 1e9;
  c.queued_seconds += (job.started_ns - job.accepted_ns) / 1e9;
  if (result.ok()) {
    c.jobs["ok"]++;
    for (const LayerSummary& l : result.report().layers) {
      c.input_bytes += l.compressed_bytes;
      c.tar_bytes += l.uncompressed_bytes;
    }
    c.entries += result.report().entries;
    Log(LogLevel::kInfo, "service", name, id,
        fmt::format("done: ok entries={} seconds={:.3f}", result.report().entries,
                    (now - job.accepted_ns) / 1e9));
  } else {
    c.jobs[OutcomeName(result.error().kind)]++;
    Log(LogLevel::kInfo, "service", name, id,
        fmt::format("done: {}: {}", OutcomeName(result.error().kind), result.error().message));
  }
  if (job.waiter) SendProgress(job);  // the last event
  if (job.waiter && job.waiter->isWaiting()) {
    job.waiter->fulfill(JobOutcome{std::move(result), (job.started_ns - job.accepted_ns) / 1e9});
  }
  Erase(it);
  Dispatch();
  if (draining_ && jobs_.empty() && stopped_) stopped_->fulfill();
}

void Hub::Abandon(uint64_t id) {
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
  Job& job = *it->second;
  job.waiter = nullptr;
  job.sink = nullptr;
  const std::string& name = tenants_[job.tenant].config->name;
  if (job.running) {
    Log(LogLevel::kInfo, "service", name, id, "client went away: cancelling");
    job.shared->cancel.Cancel();  // Ended() frees the slot once the worker is back
    return;
  }
  TenantState& t = tenants_[job.tenant];
  t.queue.erase(std::remove(t.queue.begin(), t.queue.end(), id), t.queue.end());
  --queued_;
  counters_[name].jobs["cancelled"]++;
  Log(LogLevel::kInfo, "service", name, id, "client went away while queued");
  Erase(it);
  if (draining_ && jobs_.empty() && stopped_) stopped_->fulfill();
}

void Hub::SendProgress(Job& job) {
  if (job.sending) return;
  rpc::ProgressSink::Client* sink = nullptr;
  KJ_IF_MAYBE (s, job.sink) {
    sink = s;
  }
  if (sink == nullptr) return;
  std::optional<Progress> p;
  {
    std::lock_guard lock(job.shared->mu);
    p.swap(job.shared->progress);
  }
  if (!p) return;
  auto req = sink->eventRequest();
  auto e = req.getEvent();
  e.setLayer(static_cast<uint32_t>(p->layer));
  e.setLayers(static_cast<uint32_t>(p->layers));
  e.setBytesFed(p->bytes_fed);
  e.setBlobBytes(p->blob_bytes);
  e.setEntries(p->entries);
  e.setDone(p->done);
  job.sending = true;
  uint64_t id = job.id;
  tasks_.add(req.send().then(
      [this, id]() {
        auto it = jobs_.find(id);
        if (it != jobs_.end()) it->second->sending = false;
      },
      [this, id](kj::Exception&&) {
        auto it = jobs_.find(id);
        if (it != jobs_.end()) it->second->sink = nullptr;  // a broken sink: no more events
      }));
}

kj::Promise<void> Hub::Tick() {
  return io_.provider->getTimer()
      .afterDelay(100 * kj::MILLISECONDS)
      .then([this]() -> kj::Promise<void> {
        for (auto& [id, job] : jobs_) {
          if (job->running && job->waiter) SendProgress(*job);
        }
        CloseIdle();
        DrainTurnedAway();
        if (!draining_ && options_.stop != nullptr && options_.stop->cancelled())
          BeginStop("stop token");
        if (draining_ && sandbox::MonotonicNs() >= stop_deadline_ns_) {
          for (auto& [id, job] : jobs_) {
            if (job->running && !job->shared->cancel.cancelled()) {
              Log(LogLevel::kWarn, "service", tenants_[job->tenant].config->name, id,
                  "shutdown grace is over: cancelling");
              job->shared->cancel.Cancel();
            }
          }
        }
        return Tick();
      });
}

void Hub::BeginStop(const char* why) {
  if (draining_) return;
  draining_ = true;
  draining_stop_.store(true);
  stop_deadline_ns_ =
      sandbox::MonotonicNs() + static_cast<int64_t>(config_.shutdown_grace_seconds) * 1'000'000'000;
  Log(LogLevel::kInfo, "service", "", 0,
      fmt::format("{}: stopping; {} running get {} s, {} queued are cancelled", why, running_,
                  config_.shutdown_grace_seconds, queued_));
  accepting_ = nullptr;  // before the observer it waits on
  listen_observer_ = nullptr;
  listen_fd_.reset();
  if (!socket_path_.empty()) ::unlink(socket_path_.c_str());
  // Queued jobs end now: they would not finish within the grace anyway.
  std::vector<uint64_t> queued;
  for (auto& [id, job] : jobs_) {
    if (!job->running) queued.push_back(id);
  }
  for (uint64_t id : queued) {
    Job& job = *jobs_.at(id);
    TenantState& t = tenants_[job.tenant];
    t.queue.erase(std::remove(t.queue.begin(), t.queue.end(), id), t.queue.end());
    --queued_;
    counters_[t.config->name].jobs["cancelled"]++;
    if (job.waiter && job.waiter->isWaiting()) {
      job.waiter->fulfill(
          JobOutcome{Failed(FailureKind::kCancelled,
                            "cancelled: the service is shutting down (the job was queued)"),
                     0});
    }
    Erase(jobs_.find(id));
  }
  if (jobs_.empty() && stopped_) stopped_->fulfill();
}

kj::Promise<void> Hub::WatchSignals() {
  return signal_observer_->whenBecomesReadable().then([this]() -> kj::Promise<void> {
    struct signalfd_siginfo info;
    while (::read(signal_fd_.get(), &info, sizeof(info)) == sizeof(info)) {
      BeginStop(info.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
    }
    return WatchSignals();
  });
}

kj::Promise<void> Hub::Run() {
  auto paf = kj::newPromiseAndFulfiller<void>();
  stopped_ = kj::mv(paf.fulfiller);
  accepting_ = AcceptLoop().eagerlyEvaluate([this](kj::Exception&& e) {
    Log(LogLevel::kError, "service", "", 0, "accepting: " + std::string(e.getDescription()));
  });
  tasks_.add(Tick());
  tasks_.add(WatchSignals());
  if (options_.ready) options_.ready();
  Log(LogLevel::kInfo, "service", "", 0,
      fmt::format("listening on {}: {} tenants, max_concurrent_jobs={}, queue_limit={}",
                  options_.socket.empty() ? "the systemd socket" : options_.socket, tenants_.size(),
                  max_concurrent_, config_.queue_limit));
  return kj::mv(paf.promise);
}

void Hub::FillStatus(const Peer& peer, int tenant, rpc::ServiceStatus::Builder out) {
  const bool all = IsOperator(peer);
  int64_t now = sandbox::MonotonicNs();
  std::vector<const Job*> shown;
  for (auto& [id, job] : jobs_) {
    if (all || static_cast<int>(job->tenant) == tenant) shown.push_back(job.get());
  }
  auto jobs = out.initJobs(static_cast<uint>(shown.size()));
  for (size_t i = 0; i < shown.size(); ++i) {
    const Job& j = *shown[i];
    auto w = jobs[static_cast<uint>(i)];
    w.setTenant(tenants_[j.tenant].config->name);
    w.setId(j.id);
    w.setState(j.running ? "running" : "queued");
    w.setLayer(j.shared->layer.load());
    w.setLayers(j.shared->layers.load());
    w.setSeconds((now - j.accepted_ns) / 1e9);
  }
  std::vector<size_t> tenants;
  for (size_t i = 0; i < tenants_.size(); ++i) {
    if (all || static_cast<int>(i) == tenant) tenants.push_back(i);
  }
  auto list = out.initTenants(static_cast<uint>(tenants.size()));
  for (size_t i = 0; i < tenants.size(); ++i) {
    const TenantState& t = tenants_[tenants[i]];
    auto w = list[static_cast<uint>(i)];
    w.setName(t.config->name);
    w.setRunning(t.running);
    w.setQueued(static_cast<uint32_t>(t.queue.size()));
    w.setMaxConcurrent(t.config->max_concurrent);
    w.setMaxQueued(t.config->max_queued);
  }
  out.setMaxConcurrent(max_concurrent_);
  if (all) {
    out.setRunning(running_);
    out.setQueued(queued_);
  } else {  // a tenant sees its own load, not the others'
    out.setRunning(tenant < 0 ? 0 : tenants_[static_cast<size_t>(tenant)].running);
    out.setQueued(
        tenant < 0 ? 0 : static_cast<uint32_t>(tenants_[static_cast<size_t>(tenant)].queue.size()));
  }
  out.setDraining(draining_);
  out.setVersion(Version());
  out.setUptimeSeconds((now - start_ns_) / 1e9);
}

// Prometheus text exposition format 0.0.4.
std::string Hub::Metrics() const {
  std::string out;
  auto label = [](const std::string& v) {
    std::string e;
    for (char c : v) {
      if (c == '\\' || c == '"') e += '\\';
      if (c == '\n') {
        e += "\\n";
        continue;
      }
      e += c;
    }
    return e;
  };
  auto head = [&out](const char* name, const char* type, const char* help) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
  };
  head("layerx_jobs_total", "counter", "Jobs that ended, by tenant and outcome.");
  for (const auto& [tenant, c] : counters_) {
    for (const auto& [outcome, n] : c.jobs) {
      out += fmt::format("layerx_jobs_total{{tenant=\"{}\",outcome=\"{}\"}} {}\n", label(tenant),
                         outcome, n);
    }
  }
  head("layerx_requests_refused_total", "counter",
       "Requests refused before a job was made, by tenant (\"-\": none) and reason.");
  for (const auto& [key, n] : refusals_) {
    out += fmt::format("layerx_requests_refused_total{{tenant=\"{}\",reason=\"{}\"}} {}\n",
                       label(key.first), key.second, n);
  }
  struct Sum {
    const char* name;
    const char* type;
    const char* help;
    std::function<double(const Counters&)> get;
  };
  for (const Sum& sum : {
           Sum{"layerx_input_bytes_total", "counter",
               "Layer blob bytes read by jobs that succeeded.",
               [](const Counters& c) { return double(c.input_bytes); }},
           Sum{"layerx_tar_bytes_total", "counter",
               "Uncompressed tar bytes of jobs that succeeded.",
               [](const Counters& c) { return double(c.tar_bytes); }},
           Sum{"layerx_entries_total", "counter", "Paths in the images of jobs that succeeded.",
               [](const Counters& c) { return double(c.entries); }},
           Sum{"layerx_job_seconds_total", "counter", "Seconds jobs ran (from start to end).",
               [](const Counters& c) { return c.seconds; }},
           Sum{"layerx_queue_seconds_total", "counter", "Seconds jobs waited for a slot.",
               [](const Counters& c) { return c.queued_seconds; }},
       }) {
    head(sum.name, sum.type, sum.help);
    for (const auto& [tenant, c] : counters_) {
      out += fmt::format("{}{{tenant=\"{}\"}} {}\n", sum.name, label(tenant), sum.get(c));
    }
  }
  head("layerx_jobs_running", "gauge", "Jobs running now, by tenant.");
  for (const TenantState& t : tenants_) {
    out +=
        fmt::format("layerx_jobs_running{{tenant=\"{}\"}} {}\n", label(t.config->name), t.running);
  }
  head("layerx_jobs_queued", "gauge", "Jobs waiting for a slot, by tenant.");
  for (const TenantState& t : tenants_) {
    out += fmt::format("layerx_jobs_queued{{tenant=\"{}\"}} {}\n", label(t.config->name),
                       t.queue.size());
  }
  head("layerx_max_concurrent_jobs", "gauge", "The global limit of running jobs.");
  out += fmt::format("layerx_max_concurrent_jobs {}\n", max_concurrent_);
  head("layerx_connections", "gauge", "Client connections open now.");
  out += fmt::format("layerx_connections {}\n", connections_.size());
  head("layerx_uptime_seconds", "gauge", "Seconds since the service started.");
  out += fmt::format("layerx_uptime_seconds {:.3f}\n", (sandbox::MonotonicNs() - start_ns_) / 1e9);
  return out;
}

// Blocks `signals` on this thread for the scope (and on threads made in it).
class SignalMask {
 public:
  explicit SignalMask(std::initializer_list<int> signals) {
    sigset_t set;
    sigemptyset(&set);
    for (int s : signals) sigaddset(&set, s);
    pthread_sigmask(SIG_BLOCK, &set, &old_);
  }
  ~SignalMask() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }

 private:
  sigset_t old_;
};

}  // namespace

bool Serve(const ServeOptions& options, ExtractError* error) {
  auto fail = [error](const Error& e) {
    if (error != nullptr) *error = detail::PublicError(e);
    return false;
  };
  broker::ServiceConfig config;
  if (!options.config_file.empty()) {
    auto loaded = broker::LoadServiceConfig(options.config_file);
    if (!loaded) return fail(loaded.error());
    config = std::move(*loaded);
  }
  if (!options.log_format.empty() && options.log_format != "text" && options.log_format != "json") {
    return fail(MakeError(ErrorKind::kPolicy, "log format {:?}: text or json", options.log_format));
  }
  // SIGTERM and SIGINT come through a signalfd; SIGPIPE is EPIPE. Worker
  // threads inherit the mask; mkfs.ext4 gets an empty one (broker/ext4.cc).
  SignalMask mask({SIGTERM, SIGINT});
  detail::SigpipeBlock sigpipe;
  try {
    std::string ours;
    auto listening = ListenSocket(options, &ours);
    if (!listening) return fail(listening.error());
    auto io = kj::setupAsyncIo();
    Hub server(std::move(config), options, io);
    if (Status s = server.Listen(std::move(*listening), ours); !s) {
      if (!ours.empty()) ::unlink(ours.c_str());
      return fail(s.error());
    }
    server.Run().wait(io.waitScope);
    // Let the last answers reach their clients before the connections close.
    io.provider->getTimer().afterDelay(200 * kj::MILLISECONDS).wait(io.waitScope);
    server.Log(LogLevel::kInfo, "service", "", 0, "stopped");
  } catch (const kj::Exception& e) {
    return fail(MakeError(ErrorKind::kInternal, "service: {}", e.getDescription().cStr()));
  }
  return true;
}

}  // namespace layerx
