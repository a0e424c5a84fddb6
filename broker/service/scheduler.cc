#include "broker/service/scheduler.h"

#include <fmt/format.h>

#include <algorithm>

namespace layerx::serve {

Scheduler::Scheduler(const std::vector<broker::TenantConfig>& tenants, uint32_t max_concurrent,
                     uint32_t queue_limit, size_t file_budget)
    : max_concurrent_(max_concurrent), queue_limit_(queue_limit), file_budget_(file_budget) {
  for (const broker::TenantConfig& t : tenants) tenants_.push_back({.config = &t});
}

std::string Scheduler::Admission(size_t tenant) const {
  const Tenant& t = tenants_[tenant];
  const std::string& name = t.config->name;
  // Next() leaves no job waiting that could start, so a tenant with an
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
  if (queued_ + pending_ >= queue_limit_) {
    return fmt::format("busy: the service has {} jobs queued (queue_limit={})", queued_ + pending_,
                       queue_limit_);
  }
  return {};
}

std::string Scheduler::ConnectionAdmission(int tenant, size_t open, size_t max_open) const {
  const Tenant* t = tenant < 0 ? nullptr : &tenants_[static_cast<size_t>(tenant)];
  if (t != nullptr && t->connections >= t->config->max_connections) {
    return fmt::format("busy: tenant {} has {} connections open (max_connections={})",
                       t->config->name, t->connections, t->config->max_connections);
  }
  if (open >= max_open) {
    return fmt::format("busy: the service has {} connections open (its limit)", open);
  }
  return {};
}

void Scheduler::PendingBegan(size_t tenant) {
  ++tenants_[tenant].pending;
  ++pending_;
}

void Scheduler::PendingEnded(size_t tenant) {
  --tenants_[tenant].pending;
  --pending_;
}

std::string Scheduler::ReserveFiles(size_t count) {
  if (files_held_ + count > file_budget_) {
    return fmt::format("busy: the service holds {} files (its budget is {})", files_held_,
                       file_budget_);
  }
  files_held_ += count;
  return {};
}

void Scheduler::Enqueue(size_t tenant, uint64_t job) {
  tenants_[tenant].queue.push_back(job);
  ++queued_;
}

std::optional<uint64_t> Scheduler::Next() {
  if (running_ >= max_concurrent_ || queued_ == 0) return std::nullopt;
  for (size_t k = 0; k < tenants_.size(); ++k) {
    size_t i = (next_ + k) % tenants_.size();
    Tenant& t = tenants_[i];
    if (t.queue.empty() || t.running >= t.config->max_concurrent) continue;
    next_ = (i + 1) % tenants_.size();  // the next pick starts after this tenant
    uint64_t job = t.queue.front();
    t.queue.pop_front();
    --queued_;
    ++t.running;
    ++running_;
    return job;
  }
  return std::nullopt;
}

void Scheduler::Finished(size_t tenant) {
  --tenants_[tenant].running;
  --running_;
}

bool Scheduler::Remove(size_t tenant, uint64_t job) {
  std::deque<uint64_t>& queue = tenants_[tenant].queue;
  auto it = std::find(queue.begin(), queue.end(), job);
  if (it == queue.end()) return false;
  queue.erase(it);
  --queued_;
  return true;
}

uint64_t Scheduler::JobTimeoutMs(size_t tenant, uint64_t limit_ms, int64_t queued_ms) const {
  const broker::TenantConfig& t = *tenants_[tenant].config;
  if (t.time_budget_seconds == 0) return limit_ms;
  int64_t left_ms = static_cast<int64_t>(t.time_budget_seconds) * 1000 - queued_ms;
  return std::min(limit_ms, static_cast<uint64_t>(std::max<int64_t>(left_ms, 1)));
}

}  // namespace layerx::serve
