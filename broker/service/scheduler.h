// The service's tenant scheduler, as plain logic: no sockets, threads or
// clocks of its own; the service tells it what happened (a call came, a job
// was accepted, started by it, ended, went away) and asks it what to do.
//
// What it promises (README, "Fairness and limits"; tests/broker/service/
// scheduler_sim_test.cc checks each by simulation):
// - at most max_concurrent jobs run, and at most each tenant's max_concurrent;
// - a tenant waits in its own queue (at most max_queued, pending calls
//   included) and all queues together hold at most queue_limit;
// - slots go round-robin across the tenants with work, so a queued job waits
//   for at most one turn of every other tenant;
// - no slot stays idle while a queued job could run in it;
// - a job is refused busy only when it can neither start nor queue.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "broker/service/service_config.h"

namespace layerx::serve {

class Scheduler {
 public:
  // `tenants` must outlive the scheduler; tenant indexes are theirs.
  // `file_budget`: the files all admitted jobs may hold open together.
  Scheduler(const std::vector<broker::TenantConfig>& tenants, uint32_t max_concurrent,
            uint32_t queue_limit, size_t file_budget);

  // Whether one more job of `tenant` has room: it can start now, or wait in
  // its queue and the service's. Pending calls (fds still coming) count as
  // queued. Empty: room; else the busy reason, one sentence.
  std::string Admission(size_t tenant) const;
  // Whether one more connection of `tenant` (-1: an operator of no tenant)
  // has room, `open` being all tenants' and operators' connections and
  // `max_open` their limit. Empty: room; else the busy reason.
  std::string ConnectionAdmission(int tenant, size_t open, size_t max_open) const;
  void ConnectionOpened(size_t tenant) { ++tenants_[tenant].connections; }
  void ConnectionClosed(size_t tenant) { --tenants_[tenant].connections; }

  // A call whose descriptors are still coming: it holds a place in the queues.
  void PendingBegan(size_t tenant);
  void PendingEnded(size_t tenant);

  // The files a job holds while it waits and runs: within the budget, or the
  // busy reason (nothing is reserved then).
  std::string ReserveFiles(size_t count);
  void ReleaseFiles(size_t count) { files_held_ -= count; }

  // An accepted job waits at the end of its tenant's queue.
  void Enqueue(size_t tenant, uint64_t job);
  // The next job to start now, counted as running, or none: round-robin
  // from the tenant after the last one served, skipping tenants with an
  // empty queue or at their own max_concurrent. Call until none.
  std::optional<uint64_t> Next();
  // A running job of `tenant` ended: its slot is free.
  void Finished(size_t tenant);
  // A queued job leaves its queue without running (its client went away, the
  // service stops). False when it was not queued.
  bool Remove(size_t tenant, uint64_t job);

  // How long a job of `tenant` may still run, its time budget counting from
  // acceptance (`queued_ms` already gone): min(limit_ms, what is left),
  // at least 1 ms. `limit_ms` when the tenant has no time budget.
  uint64_t JobTimeoutMs(size_t tenant, uint64_t limit_ms, int64_t queued_ms) const;

  size_t tenants() const { return tenants_.size(); }
  const broker::TenantConfig& config(size_t tenant) const { return *tenants_[tenant].config; }
  uint32_t max_concurrent() const { return max_concurrent_; }
  uint32_t running() const { return running_; }
  uint32_t queued() const { return queued_; }
  uint32_t pending() const { return pending_; }
  uint32_t running(size_t tenant) const { return tenants_[tenant].running; }
  uint32_t queued(size_t tenant) const {
    return static_cast<uint32_t>(tenants_[tenant].queue.size());
  }
  uint32_t pending(size_t tenant) const { return tenants_[tenant].pending; }
  uint32_t connections(size_t tenant) const { return tenants_[tenant].connections; }
  size_t files_held() const { return files_held_; }
  size_t file_budget() const { return file_budget_; }

 private:
  struct Tenant {
    const broker::TenantConfig* config = nullptr;
    uint32_t connections = 0;
    uint32_t running = 0;
    uint32_t pending = 0;  // calls whose fds are still coming
    std::deque<uint64_t> queue;
  };

  std::vector<Tenant> tenants_;
  uint32_t max_concurrent_;
  uint32_t queue_limit_;
  size_t next_ = 0;  // round-robin: where the next pick starts
  uint32_t running_ = 0, queued_ = 0, pending_ = 0;
  size_t files_held_ = 0, file_budget_;
};

}  // namespace layerx::serve
