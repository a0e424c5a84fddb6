#include "broker/service/connections.h"

#include <capnp/rpc-twoparty.h>
#include <capnp/rpc.capnp.h>
#include <capnp/serialize.h>
#include <fmt/format.h>
#include <sys/socket.h>

#include <cstring>
#include <memory>

#include "broker/service/hub.h"
#include "sandbox/sys.h"

namespace layerx::serve {

using sandbox::UniqueFd;

namespace {

constexpr uint kMaxFdsPerMessage = 250;  // layers + outputs of one request (SCM_MAX_FD is 253)
constexpr size_t kMaxConnections = 1024;          // all tenants' and operators' (never strangers)
constexpr size_t kMaxTurnedAway = 64;             // peers turned away, waited for at once
constexpr int64_t kTurnedAwayNs = 2'000'000'000;  // the longest one is waited for
constexpr size_t kFlowLimitWords = 1 << 20;       // 8 MiB of calls in flight per connection
constexpr uint64_t kReceiveLimitWords = 2 << 20;  // 16 MiB per message

// What the idle clock of one connection needs: its calls in flight (an
// extract's lasts while its job waits and runs and its progress streams),
// and since when it has had none.
struct Activity {
  uint32_t calls = 0;
  int64_t idle_since_ns = 0;
};

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

}  // namespace

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
  context.getResults().setText(server_.MetricsText());
  return Counted(kj::READY_NOW);
}

Connections::Connections(Hub& hub, Scheduler& scheduler, const broker::ServiceConfig& config,
                         kj::AsyncIoContext& io, kj::TaskSet& tasks)
    : hub_(hub), scheduler_(scheduler), config_(config), io_(io), tasks_(tasks) {}

Connections::~Connections() = default;

void Connections::Listen(UniqueFd fd, std::string ours) {
  listen_fd_ = std::move(fd);
  socket_path_ = std::move(ours);
  listen_observer_ = kj::heap<kj::UnixEventPort::FdObserver>(
      io_.unixEventPort, listen_fd_.get(), kj::UnixEventPort::FdObserver::OBSERVE_READ);
}

void Connections::Start() {
  accepting_ = AcceptLoop().eagerlyEvaluate([this](kj::Exception&& e) {
    hub_.Log(LogLevel::kError, "service", "", 0, "accepting: " + std::string(e.getDescription()));
  });
}

void Connections::StopListening() {
  stopped_ = true;
  accepting_ = nullptr;  // before the observer it waits on
  listen_observer_ = nullptr;
  listen_fd_.reset();
  if (!socket_path_.empty()) ::unlink(socket_path_.c_str());
}

void Connections::Tick() {
  CloseIdle();
  DrainTurnedAway();
}

void Connections::Clear() { connections_.clear(); }

kj::Promise<void> Connections::AcceptLoop() {
  return listen_observer_->whenBecomesReadable().then([this]() { return AcceptSome(); });
}

// Accepts until the backlog is empty (the observer is edge-triggered); out of
// fds or memory, tries again shortly rather than leaving the backlog waiting.
kj::Promise<void> Connections::AcceptSome() {
  while (!stopped_) {
    int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      Accept(UniqueFd(fd));
      continue;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN) return AcceptLoop();
    hub_.Log(LogLevel::kError, "service", "", 0, fmt::format("accept: {}", std::strerror(errno)));
    return io_.provider->getTimer().afterDelay(100 * kj::MILLISECONDS).then([this]() {
      return AcceptSome();
    });
  }
  return kj::READY_NOW;
}

void Connections::Accept(UniqueFd fd) {
  struct ucred cred = {};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return;
  Peer peer{.uid = cred.uid, .gid = cred.gid, .pid = cred.pid};
  const broker::TenantConfig* tenant = config_.TenantFor(cred.uid, cred.gid);
  int index = tenant == nullptr ? -1 : static_cast<int>(tenant - config_.tenants.data());
  // SECURITY: a peer of no tenant is answered and closed right here. It
  // holds no place under any cap, however many connections and uids it has
  // (one user with a subuid range has 65536), and no RPC state.
  if (tenant == nullptr && !hub_.IsOperator(peer)) {
    hub_.CountRefusal(-1, FailureKind::kUnauthorized);
    LogTurnedAway(-1, fmt::format("peer uid={} gid={} pid={}: no tenant: turned away", cred.uid,
                                  cred.gid, cred.pid));
    TurnAway(std::move(fd), fmt::format("unauthorized: uid {} gid {} is no tenant of this service",
                                        cred.uid, cred.gid));
    return;
  }
  // Each connection costs an fd: capped per tenant, and in all.
  std::string busy = scheduler_.ConnectionAdmission(index, connections_.size(), kMaxConnections);
  if (!busy.empty()) {
    hub_.CountRefusal(index, FailureKind::kBusy);
    LogTurnedAway(index, fmt::format("peer uid={} pid={}: {}", cred.uid, cred.pid, busy));
    TurnAway(std::move(fd), busy);
    return;
  }
  hub_.Log(LogLevel::kDebug, "service", hub_.TenantName(index), 0,
      fmt::format("connection from uid={} gid={} pid={}", cred.uid, cred.gid, cred.pid));
  auto stream = io_.lowLevelProvider->wrapUnixSocketFd(
      fd.release(), kj::LowLevelAsyncIoProvider::TAKE_OWNERSHIP |
                        kj::LowLevelAsyncIoProvider::ALREADY_CLOEXEC |
                        kj::LowLevelAsyncIoProvider::ALREADY_NONBLOCK);
  auto activity = std::make_shared<Activity>(Activity{.idle_since_ns = sandbox::MonotonicNs()});
  auto conn = kj::heap<Connection>(kj::mv(stream), peer, index, activity,
                                   kj::heap<ServiceImpl>(hub_, peer, index, activity));
  conn->rpc.setFlowLimit(kFlowLimitWords);  // a peer that pipelines calls is read no further
  uint64_t id = next_conn_++;
  auto disconnected = conn->network.onDisconnect();
  connections_.emplace(id, kj::mv(conn));
  if (index >= 0) scheduler_.ConnectionOpened(static_cast<size_t>(index));
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
void Connections::TurnAway(UniqueFd fd, const std::string& sentence) {
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
void Connections::DrainTurnedAway() {
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
void Connections::LogTurnedAway(int tenant, const std::string& what) {
  int64_t now = sandbox::MonotonicNs();
  if (now - turned_away_logged_ns_ < 1'000'000'000) {
    ++turned_away_unlogged_;
    return;
  }
  std::string more =
      turned_away_unlogged_ == 0
          ? ""
          : fmt::format(" ({} more turned away since the last such line)", turned_away_unlogged_);
  hub_.Log(LogLevel::kWarn, "service", tenant < 0 ? "" : hub_.TenantName(tenant), 0, what + more);
  turned_away_logged_ns_ = now;
  turned_away_unlogged_ = 0;
}

void Connections::Drop(uint64_t connection) {
  auto it = connections_.find(connection);
  if (it == connections_.end()) return;
  if (it->second->tenant >= 0) {
    scheduler_.ConnectionClosed(static_cast<size_t>(it->second->tenant));
  }
  connections_.erase(it);
}

// A connection with no call in flight for idle_timeout_seconds is closed: it
// is an fd and a place under the caps, held for nothing.
void Connections::CloseIdle() {
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
    hub_.Log(LogLevel::kInfo, "service", conn.tenant < 0 ? "" : hub_.TenantName(conn.tenant), 0,
        fmt::format("connection of uid={} pid={}: no call for {} s: closed", conn.peer.uid,
                    conn.peer.pid, config_.idle_timeout_seconds));
    Drop(id);
  }
}

}  // namespace layerx::serve
