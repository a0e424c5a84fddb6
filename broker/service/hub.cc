// `layerx serve`: the extraction service (include/layerx/layerx.hpp Serve,
// broker/service/service.capnp), its loop (hub.h) and its jobs from the call
// to the answer.
//
// Who a client is: SO_PEERCRED, read once at accept; a peer of no tenant and
// no operator gets one sentence and no connection (connections.cc), and the
// others are capped per tenant and closed when idle. What it may read or
// write: only the descriptors it passed, checked in request.cc (readable
// inputs that are regular files or pipes, never O_PATH; writable, empty,
// non-append regular outputs). The service never opens a path a client named.
// When a job runs: the scheduler decides (scheduler.h, plain logic).
#include "broker/service/hub.h"

#include <fmt/format.h>
#include <kj/debug.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "broker/bridge/bridge.h"
#include "broker/service/worker.h"
#include "sandbox/sys.h"

namespace layerx::serve {

namespace {

constexpr auto kFdWait = 10 * kj::SECONDS;  // for the fds of a request to come

uint32_t MaxConcurrent(const broker::ServiceConfig& config) {
  if (config.max_concurrent_jobs != 0) return config.max_concurrent_jobs;
  long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  return cpus > 0 ? static_cast<uint32_t>(cpus) : 1;
}

// Jobs hold their inputs and outputs open while they wait: the soft limit is
// raised to the hard one, and jobs are admitted within half of it.
size_t FileBudget() {
  struct rlimit nofile;
  if (::getrlimit(RLIMIT_NOFILE, &nofile) != 0) return 512;
  if (nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &nofile);
    (void)::getrlimit(RLIMIT_NOFILE, &nofile);
  }
  return std::max<size_t>(64, static_cast<size_t>(nofile.rlim_cur) / 2);
}

bool JsonLog(const broker::ServiceConfig& config, const ServeOptions& options) {
  return (options.log_format.empty() ? config.log_format : options.log_format) == "json";
}

// A call counted as pending until its fds came (or it went away).
struct Pending {
  Scheduler* scheduler;
  size_t index;
  bool counted = true;
  void Release() {
    if (!counted) return;
    counted = false;
    scheduler->PendingEnded(index);
  }
  ~Pending() { Release(); }
};

}  // namespace

Hub::Hub(broker::ServiceConfig config, const ServeOptions& options, kj::AsyncIoContext& io)
    : config_(std::move(config)),
      options_(options),
      io_(io),
      log_(options_, JsonLog(config_, options_)),
      scheduler_(config_.tenants, MaxConcurrent(config_), config_.queue_limit, FileBudget()),
      connections_(*this, scheduler_, config_, io_, tasks_),
      tasks_(*this) {
  start_ns_ = sandbox::MonotonicNs();
  // Never /dev/shm by default: a tmpfs the whole host shares, sized from
  // what clients declare.
  if (config_.scratch_dir.empty()) config_.scratch_dir = "/var/tmp";
}

Hub::~Hub() noexcept(false) {
  connections_.Clear();
  for (auto& [id, job] : jobs_) {
    job->shared->cancel.Cancel();
    if (job->thread.joinable()) job->thread.join();
  }
}

void Hub::taskFailed(kj::Exception&& exception) {
  Log(LogLevel::kWarn, "service", "", 0,
      "task failed: " + std::string(exception.getDescription()));
}

Status Hub::Listen(sandbox::UniqueFd fd, std::string ours) {
  connections_.Listen(std::move(fd), std::move(ours));
  return signals_.Open(io_.unixEventPort);
}

kj::Promise<void> Hub::Run() {
  auto paf = kj::newPromiseAndFulfiller<void>();
  stopped_ = kj::mv(paf.fulfiller);
  connections_.Start();
  tasks_.add(Tick());
  tasks_.add(signals_.Watch([this](const char* why) { BeginStop(why); }));
  if (options_.ready) options_.ready();
  Log(LogLevel::kInfo, "service", "", 0,
      fmt::format("listening on {}: {} tenants, max_concurrent_jobs={}, queue_limit={}",
                  options_.socket.empty() ? "the systemd socket" : options_.socket,
                  scheduler_.tenants(), scheduler_.max_concurrent(), config_.queue_limit));
  return kj::mv(paf.promise);
}

kj::Promise<void> Hub::Busy(int tenant, ExtractCall context, std::string why) {
  CountRefusal(tenant, FailureKind::kBusy);
  Log(LogLevel::kInfo, "service", TenantName(tenant), 0, why);
  FillResult(context.getResults().initResult(), Failed(FailureKind::kBusy, std::move(why)), 0);
  return kj::READY_NOW;
}

kj::Promise<void> Hub::Extract(const Peer& peer, int tenant, ExtractCall context) {
  context.allowCancellation();
  if (tenant < 0) {
    CountRefusal(tenant, FailureKind::kUnauthorized);
    Log(LogLevel::kWarn, "service", "", 0,
        fmt::format("refused: uid={} gid={} pid={} is no tenant", peer.uid, peer.gid, peer.pid));
    FillResult(context.getResults().initResult(),
               Failed(FailureKind::kUnauthorized,
                      fmt::format("unauthorized: uid {} gid {} is no tenant of this service",
                                  peer.uid, peer.gid)),
               0);
    return kj::READY_NOW;
  }
  const size_t index = static_cast<size_t>(tenant);
  if (draining_) return Busy(tenant, context, "busy: the service is shutting down");
  // Before anything is parsed or waited for.
  if (std::string why = scheduler_.Admission(index); !why.empty()) {
    return Busy(tenant, context, std::move(why));
  }

  auto request = context.getParams().getRequest();
  auto source = request.getSource();
  if (source.isImage() && source.getImage().getConfig().size() > kMaxConfigBytes) {
    FillResult(context.getResults().initResult(),
               Failed(FailureKind::kUsage, fmt::format("image config over {} bytes", kMaxConfigBytes)),
               0);
    return kj::READY_NOW;
  }
  // Every Fd capability, in order. A capability that is a promise would make
  // this wait: at most kFdWait, counted as pending meanwhile.
  auto fd_promises = RequestFds(request);
  scheduler_.PendingBegan(index);
  auto unpend = std::make_shared<Pending>(&scheduler_, index);  // in place: a copy would release
  using Fds = kj::Maybe<kj::Array<kj::Maybe<int>>>;
  return kj::joinPromises(kj::mv(fd_promises))
      .then([](kj::Array<kj::Maybe<int>> got) -> Fds { return kj::mv(got); })
      .exclusiveJoin(
          io_.provider->getTimer().afterDelay(kFdWait).then([]() -> Fds { return nullptr; }))
      .then([this, peer, tenant, context, unpend](Fds got) mutable -> kj::Promise<void> {
        unpend->Release();
        return Admitted(peer, tenant, context, kj::mv(got));
      });
}

// The request's fds came (or did not): the job is built, and queued.
kj::Promise<void> Hub::Admitted(const Peer& peer, int tenant, ExtractCall context,
                                kj::Maybe<kj::Array<kj::Maybe<int>>> got) {
  const size_t index = static_cast<size_t>(tenant);
  const std::string& name = TenantName(tenant);
  auto refuse = [&](ExtractResult failed) {
    metrics_.of(name).jobs[OutcomeName(failed.error().kind)]++;
    Log(LogLevel::kInfo, "service", name, 0, "refused: " + failed.error().message);
    FillResult(context.getResults().initResult(), failed, 0);
    return kj::Promise<void>(kj::READY_NOW);
  };
  std::optional<std::vector<int>> fds = FdNumbers(kj::mv(got));
  if (!fds) {
    return refuse(Failed(FailureKind::kUsage, "the request's file descriptors did not arrive"));
  }
  if (draining_) return Busy(tenant, context, "busy: the service is shutting down");
  if (std::string why = scheduler_.Admission(index); !why.empty()) {
    return Busy(tenant, context, std::move(why));
  }
  auto built =
      BuildJob(peer, index, scheduler_.config(index), context.getParams().getRequest(), *fds);
  if (!built) return refuse(ExtractResult(detail::PublicError(built.error())));
  std::unique_ptr<Job> job = std::move(*built);
  // What the job holds open while it waits and runs: its fds, and the
  // extractor's pipes and sockets when it runs.
  size_t cost = job->fds.size() + 8;
  if (std::string why = scheduler_.ReserveFiles(cost); !why.empty()) {
    return Busy(tenant, context, std::move(why));
  }
  job->fd_cost = cost;
  job->sink = context.getParams().getProgress();
  context.releaseParams();  // the message and the fds it carried: the job has dups
  uint64_t id = next_job_++;
  job->id = id;
  job->accepted_ns = sandbox::MonotonicNs();
  auto paf = kj::newPromiseAndFulfiller<JobOutcome>();
  job->waiter = kj::mv(paf.fulfiller);
  Log(LogLevel::kInfo, "service", name, id,
      fmt::format("accepted: uid={} pid={} layers={} input_bytes={}", peer.uid, peer.pid,
                  job->docker ? 0 : job->image.layers.size(), job->input_bytes));
  scheduler_.Enqueue(index, id);
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
}

void Hub::Dispatch() {
  while (std::optional<uint64_t> id = scheduler_.Next()) Start(*jobs_.at(*id));
}

// The scheduler counts the job as running already.
void Hub::Start(Job& job) {
  job.running = true;
  job.started_ns = sandbox::MonotonicNs();
  const broker::TenantConfig& tc = scheduler_.config(job.tenant);
  // The time budget counts from acceptance: what the queue took is gone.
  job.policy.limits.job_timeout_ms =
      scheduler_.JobTimeoutMs(job.tenant, job.policy.limits.job_timeout_ms,
                              (job.started_ns - job.accepted_ns) / 1'000'000);
  Log(LogLevel::kInfo, "service", tc.name, job.id,
      fmt::format("started: queued_ms={}", (job.started_ns - job.accepted_ns) / 1'000'000));
  auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
  uint64_t id = job.id;
  tasks_.add(paf.promise.then([this, id]() { Ended(id); }));
  StartWorker(job,
              Worker{.log = &log_,
                     .tenant = &tc.name,
                     .min_level = options_.min_log_level,
                     .scratch_dir = &config_.scratch_dir,
                     .extractor_path = &options_.extractor_path,
                     .stopping = &draining_stop_},
              kj::mv(paf.fulfiller));
}


void Hub::Ended(uint64_t id) {
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
  Job& job = *it->second;
  if (job.thread.joinable()) job.thread.join();
  scheduler_.Finished(job.tenant);
  const std::string& name = scheduler_.config(job.tenant).name;
  ExtractResult& result = *job.shared->result;
  int64_t now = sandbox::MonotonicNs();
  metrics_.CountEnded(name, result, (now - job.started_ns) / 1e9,
                      (job.started_ns - job.accepted_ns) / 1e9);
  if (result.ok()) {
    Log(LogLevel::kInfo, "service", name, id,
        fmt::format("done: ok entries={} seconds={:.3f}", result.report().entries,
                    (now - job.accepted_ns) / 1e9));
  } else {
    Log(LogLevel::kInfo, "service", name, id,
        fmt::format("done: {}: {}", OutcomeName(result.error().kind), result.error().message));
  }
  if (job.waiter) SendProgress(job, jobs_, tasks_);  // the last event
  if (job.waiter && job.waiter->isWaiting()) {
    job.waiter->fulfill(JobOutcome{std::move(result), (job.started_ns - job.accepted_ns) / 1e9});
  }
  Erase(it);
  Dispatch();
  StoppedIfIdle();
}

void Hub::Abandon(uint64_t id) {
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
  Job& job = *it->second;
  job.waiter = nullptr;
  job.sink = nullptr;
  const std::string& name = scheduler_.config(job.tenant).name;
  if (job.running) {
    Log(LogLevel::kInfo, "service", name, id, "client went away: cancelling");
    job.shared->cancel.Cancel();  // Ended() frees the slot once the worker is back
    return;
  }
  scheduler_.Remove(job.tenant, id);
  metrics_.of(name).jobs["cancelled"]++;
  Log(LogLevel::kInfo, "service", name, id, "client went away while queued");
  Erase(it);
  StoppedIfIdle();
}

void Hub::Erase(std::map<uint64_t, std::unique_ptr<Job>>::iterator it) {
  scheduler_.ReleaseFiles(it->second->fd_cost);
  jobs_.erase(it);
}

void Hub::StoppedIfIdle() {
  if (draining_ && jobs_.empty() && stopped_) stopped_->fulfill();
}


kj::Promise<void> Hub::Tick() {
  return io_.provider->getTimer()
      .afterDelay(100 * kj::MILLISECONDS)
      .then([this]() -> kj::Promise<void> {
        for (auto& [id, job] : jobs_) {
          if (job->running && job->waiter) SendProgress(*job, jobs_, tasks_);
        }
        connections_.Tick();
        if (!draining_ && options_.stop != nullptr && options_.stop->cancelled())
          BeginStop("stop token");
        if (draining_ && sandbox::MonotonicNs() >= stop_deadline_ns_) {
          for (auto& [id, job] : jobs_) {
            if (job->running && !job->shared->cancel.cancelled()) {
              Log(LogLevel::kWarn, "service", scheduler_.config(job->tenant).name, id,
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
      fmt::format("{}: stopping; {} running get {} s, {} queued are cancelled", why,
                  scheduler_.running(), config_.shutdown_grace_seconds, scheduler_.queued()));
  connections_.StopListening();
  // Queued jobs end now: they would not finish within the grace anyway.
  std::vector<uint64_t> queued;
  for (auto& [id, job] : jobs_) {
    if (!job->running) queued.push_back(id);
  }
  for (uint64_t id : queued) {
    Job& job = *jobs_.at(id);
    scheduler_.Remove(job.tenant, id);
    metrics_.of(scheduler_.config(job.tenant).name).jobs["cancelled"]++;
    if (job.waiter && job.waiter->isWaiting()) {
      job.waiter->fulfill(
          JobOutcome{Failed(FailureKind::kCancelled,
                            "cancelled: the service is shutting down (the job was queued)"),
                     0});
    }
    Erase(jobs_.find(id));
  }
  StoppedIfIdle();
}

void Hub::FillStatus(const Peer& peer, int tenant, rpc::ServiceStatus::Builder out) {
  const bool all = IsOperator(peer);
  int64_t now = sandbox::MonotonicNs();
  std::vector<const Job*> shown;
  for (auto& [id, job] : jobs_) {
    if (all || static_cast<int>(job->tenant) == tenant) shown.push_back(job.get());
  }
  serve::FillStatus(out, shown, scheduler_, all, tenant, draining_, now, (now - start_ns_) / 1e9);
}

std::string Hub::MetricsText() const {
  return metrics_.Text(scheduler_, connections_.size(), (sandbox::MonotonicNs() - start_ns_) / 1e9);
}

}  // namespace layerx::serve

namespace layerx {

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
  // threads inherit the mask; mkfs.ext4 gets an empty one (broker/ext4/ext4.cc).
  serve::SignalMask mask({SIGTERM, SIGINT});
  detail::SigpipeBlock sigpipe;
  try {
    std::string ours;
    auto listening = serve::ListenSocket(options, &ours);
    if (!listening) return fail(listening.error());
    auto io = kj::setupAsyncIo();
    serve::Hub server(std::move(config), options, io);
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
