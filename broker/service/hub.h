// The service's loop: one kj event loop thread owns every connection
// (Connections), the scheduler's state and the counters (Metrics); each
// running job has a worker thread of its own that calls broker::RunExtract and
// touches nothing else of the loop's. The worker reports through its JobShared
// (progress under a mutex, the result once) and a cross-thread fulfiller; the
// loop reads progress on its 100 ms tick.
#pragma once

#include <kj/async-io.h>

#include <atomic>
#include <map>
#include <memory>
#include <string>

#include "broker/service/connections.h"
#include "broker/service/listen.h"
#include "broker/service/metrics.h"
#include "broker/service/request.h"
#include "broker/service/scheduler.h"
#include "broker/service/service_config.h"
#include "broker/service/service_log.h"
#include "layerx/layerx.hpp"

namespace layerx::serve {

using ExtractCall = capnp::CallContext<rpc::Service::ExtractParams, rpc::Service::ExtractResults>;

class Hub final : public kj::TaskSet::ErrorHandler {
 public:
  Hub(broker::ServiceConfig config, const ServeOptions& options, kj::AsyncIoContext& io);
  // The connections first (their calls' Abandon runs while everything else
  // is alive), then any worker still running is stopped and joined.
  ~Hub() noexcept(false);

  Status Listen(sandbox::UniqueFd fd, std::string ours);
  // Serves until stopped (SIGTERM, SIGINT, ServeOptions::stop) and every job is gone.
  kj::Promise<void> Run();

  // The calls of one connection (broker/service/connections.cc).
  kj::Promise<void> Extract(const Peer& peer, int tenant, ExtractCall context);
  void FillStatus(const Peer& peer, int tenant, rpc::ServiceStatus::Builder out);
  std::string MetricsText() const;

  bool IsOperator(const Peer& peer) const { return peer.uid == 0 || peer.uid == ::geteuid(); }
  const std::string& TenantName(int tenant) const {
    static const std::string kNone = "-";
    return tenant < 0 ? kNone : scheduler_.config(static_cast<size_t>(tenant)).name;
  }
  void CountRefusal(int tenant, FailureKind kind) {
    metrics_.CountRefusal(tenant < 0 ? std::string("-") : TenantName(tenant), kind);
  }
  void Log(LogLevel level, std::string_view component, std::string_view tenant, uint64_t job,
           std::string_view message) const {
    log_(level, component, tenant, job, message);
  }

  void taskFailed(kj::Exception&& exception) override;

 private:
  kj::Promise<void> Admitted(const Peer& peer, int tenant, ExtractCall context,
                             kj::Maybe<kj::Array<kj::Maybe<int>>> got);
  kj::Promise<void> Busy(int tenant, ExtractCall context, std::string why);
  void Dispatch();
  void Start(Job& job);
  void Ended(uint64_t id);
  void Abandon(uint64_t id);
  void Erase(std::map<uint64_t, std::unique_ptr<Job>>::iterator it);
  kj::Promise<void> Tick();
  void BeginStop(const char* why);
  void StoppedIfIdle();

  broker::ServiceConfig config_;
  const ServeOptions& options_;
  kj::AsyncIoContext& io_;
  ServiceLog log_;
  Scheduler scheduler_;
  Metrics metrics_;
  uint64_t next_job_ = 1;
  std::map<uint64_t, std::unique_ptr<Job>> jobs_;
  StopSignals signals_;
  bool draining_ = false;
  int64_t start_ns_ = 0, stop_deadline_ns_ = 0;
  kj::Own<kj::PromiseFulfiller<void>> stopped_;
  std::atomic<bool> draining_stop_{false};  // draining_, for the workers
  Connections connections_;  // holds tasks_ (by reference only until it is made)
  kj::TaskSet tasks_;        // last: its promises go before what they point at
};

}  // namespace layerx::serve
