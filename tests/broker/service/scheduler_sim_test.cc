// The tenant scheduler (broker/service/scheduler.h) by simulation: thousands
// of random services (tenants, limits) and arrival patterns (bursts, job
// lengths, calls whose fds come late, clients that go away while queued),
// driven the way the service's loop drives it, with the README's promises
// ("Fairness and limits") checked after every event against a model the
// simulation keeps itself:
// - max_concurrent_jobs, each tenant's max_concurrent, max_queued and
//   queue_limit are never exceeded, nor the file budget;
// - no slot is idle while a queued job could run in it;
// - busy only when a job can neither start nor queue;
// - while a tenant has a job that could run, every other tenant starts at
//   most one job before it starts one (one turn of every other tenant).
// It prints the worst wait seen per tenant.
#include "broker/service/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace layerx::serve {
namespace {

constexpr int kPatterns = 4000;
constexpr int kMaxTenants = 6;

struct Service {
  std::vector<broker::TenantConfig> tenants;
  uint32_t max_concurrent = 1;
  uint32_t queue_limit = 1;
  size_t file_budget = 1;
};

// What the simulation knows, kept apart from the scheduler's own counts.
struct TenantModel {
  uint32_t running = 0;
  uint32_t pending = 0;
  uint32_t pending_to_start = 0;  // pending calls admitted to start at once
  std::deque<uint64_t> queue;
  std::vector<int> others_started;  // per other tenant, since this one could run
};

struct JobModel {
  size_t tenant = 0;
  int64_t length = 0;
  size_t files = 0;
  int64_t since = 0;  // accepted, then started
  bool started = false;
};

// The worst seen over every pattern, per tenant index.
struct Worst {
  int64_t wait[kMaxTenants] = {};       // ticks from acceptance to start
  int other_starts[kMaxTenants] = {};  // another tenant's starts while it could run
  uint64_t jobs[kMaxTenants] = {};
  uint64_t busy[kMaxTenants] = {};
};

class Simulation {
 public:
  Simulation(const Service& service, Worst& worst, std::string where)
      : service_(service),
        scheduler_(service.tenants, service.max_concurrent, service.queue_limit,
                   service.file_budget),
        model_(service.tenants.size()),
        worst_(worst),
        where_(std::move(where)) {
    for (TenantModel& t : model_) t.others_started.assign(service.tenants.size(), 0);
  }

  // A call of `tenant` comes: busy (none), or admitted, pending while its
  // fds come (whether it was admitted to start at once).
  std::optional<bool> Call(size_t tenant) {
    std::string busy = scheduler_.Admission(tenant);
    CheckBusy(tenant, busy);
    if (!busy.empty()) {
      ++worst_.busy[tenant];
      return std::nullopt;
    }
    bool to_start = StartsNow(tenant);
    scheduler_.PendingBegan(tenant);
    ++model_[tenant].pending;
    if (to_start) ++model_[tenant].pending_to_start;
    Check();
    return to_start;
  }

  // The fds of one of `tenant`'s pending calls came (`came`), or not: the
  // job is admitted again, and queued and dispatched as the service does.
  void FdsCame(size_t tenant, bool to_start, bool came, int64_t length, size_t files) {
    scheduler_.PendingEnded(tenant);
    --model_[tenant].pending;
    if (to_start) --model_[tenant].pending_to_start;
    if (!came) return Check();
    std::string busy = scheduler_.Admission(tenant);
    CheckBusy(tenant, busy);
    if (!busy.empty()) {
      ++worst_.busy[tenant];
      return Check();
    }
    std::string no_files = scheduler_.ReserveFiles(files);
    ASSERT_EQ(no_files.empty(), files_held_ + files <= service_.file_budget)
        << where_ << ": files held " << files_held_ << " + " << files << ", budget "
        << service_.file_budget << ": " << no_files;
    if (!no_files.empty()) {
      ++worst_.busy[tenant];
      return Check();
    }
    files_held_ += files;
    uint64_t id = next_id_++;
    jobs_[id] = JobModel{.tenant = tenant, .length = length, .files = files, .since = now_};
    scheduler_.Enqueue(tenant, id);
    TenantModel& t = model_[tenant];
    bool could_run_before = CouldRun(tenant);
    t.queue.push_back(id);
    if (!could_run_before && CouldRun(tenant)) std::fill(t.others_started.begin(), t.others_started.end(), 0);
    Dispatch();
    Check();
  }

  // A queued job's client goes away.
  void Abandon(uint64_t id) {
    JobModel& job = jobs_.at(id);
    if (job.started) return;
    ASSERT_TRUE(scheduler_.Remove(job.tenant, id)) << where_;
    std::deque<uint64_t>& q = model_[job.tenant].queue;
    q.erase(std::find(q.begin(), q.end(), id));
    Forget(id);
    Check();
  }

  // Every job that ends at `now` ends, then the scheduler fills the slots.
  void Advance(int64_t now) {
    now_ = now;
    std::vector<uint64_t> ending;
    for (const auto& [id, job] : jobs_) {
      if (job.started && job.since + job.length <= now) ending.push_back(id);
    }
    // (Ended() runs once per job, each followed by Dispatch().)
    for (uint64_t id : ending) {
      JobModel& job = jobs_.at(id);
      if (job.since + job.length > now_) continue;
      size_t tenant = job.tenant;
      bool could_run_before = CouldRun(tenant);
      scheduler_.Finished(tenant);
      --model_[tenant].running;
      --running_;
      Forget(id);
      TenantModel& t = model_[tenant];
      if (!could_run_before && CouldRun(tenant)) std::fill(t.others_started.begin(), t.others_started.end(), 0);
      Dispatch();
      Check();
    }
  }

  bool Idle() const { return jobs_.empty() && pending_calls() == 0; }
  const std::vector<uint64_t> Queued() const {
    std::vector<uint64_t> out;
    for (const auto& [id, job] : jobs_) {
      if (!job.started) out.push_back(id);
    }
    return out;
  }
  Scheduler& scheduler() { return scheduler_; }

 private:
  uint32_t pending_calls() const {
    uint32_t n = 0;
    for (const TenantModel& t : model_) n += t.pending;
    return n;
  }
  uint32_t queued() const {
    uint32_t n = 0;
    for (const TenantModel& t : model_) n += static_cast<uint32_t>(t.queue.size());
    return n;
  }
  bool CouldRun(size_t tenant) const {
    return !model_[tenant].queue.empty() &&
           model_[tenant].running < service_.tenants[tenant].max_concurrent;
  }
  bool StartsNow(size_t tenant) const {
    const TenantModel& t = model_[tenant];
    return t.running < service_.tenants[tenant].max_concurrent &&
           running_ < service_.max_concurrent && t.queue.empty() && t.pending == 0;
  }
  bool CanQueue(size_t tenant) const {
    const TenantModel& t = model_[tenant];
    return t.queue.size() + t.pending < service_.tenants[tenant].max_queued &&
           queued() + pending_calls() < service_.queue_limit;
  }

  // Busy exactly when the job can neither start nor queue.
  void CheckBusy(size_t tenant, const std::string& busy) {
    bool room = StartsNow(tenant) || CanQueue(tenant);
    ASSERT_EQ(busy.empty(), room) << where_ << ": tenant " << tenant << " running "
                                  << model_[tenant].running << " queued "
                                  << model_[tenant].queue.size() << " pending "
                                  << model_[tenant].pending << ", service running " << running_
                                  << " queued " << queued() << ": \"" << busy << "\"";
    if (!busy.empty()) {
      ASSERT_EQ(busy.rfind("busy: ", 0), 0u) << busy;
    }
  }

  // As the service's Dispatch(): every job the scheduler starts, at once.
  void Dispatch() {
    while (std::optional<uint64_t> id = scheduler_.Next()) {
      JobModel& job = jobs_.at(*id);
      const size_t tenant = job.tenant;
      TenantModel& t = model_[tenant];
      ASSERT_FALSE(job.started) << where_;
      ASSERT_FALSE(t.queue.empty()) << where_;
      ASSERT_EQ(t.queue.front(), *id) << where_ << ": a tenant's jobs start in their order";
      ASSERT_LT(t.running, service_.tenants[tenant].max_concurrent) << where_;
      ASSERT_LT(running_, service_.max_concurrent) << where_;
      // One turn: while another tenant could run, this one starts at most
      // one job before it does.
      for (size_t other = 0; other < model_.size(); ++other) {
        if (other == tenant || !CouldRun(other)) continue;
        int& n = model_[other].others_started[tenant];
        ++n;
        worst_.other_starts[other] = std::max(worst_.other_starts[other], n);
        ASSERT_LE(n, 1) << where_ << ": tenant " << tenant << " started " << n
                        << " jobs while tenant " << other << " had one that could run";
      }
      t.queue.pop_front();
      ++t.running;
      ++running_;
      job.started = true;
      int64_t wait = now_ - job.since;
      worst_.wait[tenant] = std::max(worst_.wait[tenant], wait);
      ++worst_.jobs[tenant];
      job.since = now_;
      std::fill(t.others_started.begin(), t.others_started.end(), 0);
    }
  }

  void Forget(uint64_t id) {
    JobModel& job = jobs_.at(id);
    files_held_ -= job.files;
    scheduler_.ReleaseFiles(job.files);
    jobs_.erase(id);
  }

  // The limits, the model against the scheduler's counts, and no idle slot.
  void Check() {
    ASSERT_EQ(scheduler_.running(), running_) << where_;
    ASSERT_EQ(scheduler_.queued(), queued()) << where_;
    ASSERT_EQ(scheduler_.pending(), pending_calls()) << where_;
    ASSERT_EQ(scheduler_.files_held(), files_held_) << where_;
    ASSERT_LE(running_, service_.max_concurrent) << where_;
    ASSERT_LE(files_held_, service_.file_budget) << where_;
    uint32_t to_start = 0;
    bool runnable = false;
    for (size_t i = 0; i < model_.size(); ++i) {
      const TenantModel& t = model_[i];
      const broker::TenantConfig& c = service_.tenants[i];
      ASSERT_EQ(scheduler_.running(i), t.running) << where_;
      ASSERT_EQ(scheduler_.queued(i), t.queue.size()) << where_;
      ASSERT_LE(t.running, c.max_concurrent) << where_ << ": tenant " << i;
      ASSERT_LE(t.queue.size(), c.max_queued) << where_ << ": tenant " << i;
      // Pending calls count as queued; one admitted to start at once may be
      // pending beyond max_queued (max_queued=0) until its fds come.
      ASSERT_LE(t.queue.size() + t.pending, c.max_queued + t.pending_to_start)
          << where_ << ": tenant " << i;
      to_start += t.pending_to_start;
      runnable = runnable || CouldRun(i);
    }
    ASSERT_LE(queued(), service_.queue_limit) << where_;
    ASSERT_LE(queued() + pending_calls(), service_.queue_limit + to_start) << where_;
    if (runnable) {
      ASSERT_EQ(running_, service_.max_concurrent)
          << where_ << ": a slot is idle while a queued job could run";
    }
  }

  const Service& service_;
  Scheduler scheduler_;
  std::vector<TenantModel> model_;
  std::map<uint64_t, JobModel> jobs_;
  Worst& worst_;
  std::string where_;
  uint32_t running_ = 0;
  size_t files_held_ = 0;
  uint64_t next_id_ = 1;
  int64_t now_ = 0;
};

Service RandomService(std::mt19937_64& rng) {
  auto pick = [&rng](uint32_t lo, uint32_t hi) {
    return std::uniform_int_distribution<uint32_t>(lo, hi)(rng);
  };
  Service s;
  size_t n = pick(1, kMaxTenants);
  s.max_concurrent = pick(1, 8);
  s.queue_limit = pick(0, 40);
  s.file_budget = pick(8, 200);
  for (size_t i = 0; i < n; ++i) {
    broker::TenantConfig t;
    t.name = "t" + std::to_string(i);
    t.max_concurrent = pick(1, 4);
    t.max_queued = std::min(pick(0, 12), s.queue_limit);  // as the config requires
    s.tenants.push_back(t);
  }
  return s;
}

// One pattern: `ticks` of arrivals (each tenant its own rate, in bursts),
// fds that come after 0-2 ticks or never, jobs of 1-30 ticks, clients that go
// away while queued; then the service drains.
void RunPattern(std::mt19937_64& rng, int pattern, Worst& worst) {
  Service service = RandomService(rng);
  Simulation sim(service, worst, "pattern " + std::to_string(pattern));
  std::uniform_real_distribution<double> unit(0, 1);
  std::vector<double> rate(service.tenants.size());
  for (double& r : rate) r = unit(rng) * 0.8;
  struct Later {
    int64_t at;
    size_t tenant;
    bool to_start, came;
    int64_t length;
    size_t files;
  };
  std::vector<Later> later;
  const int64_t ticks = 150;
  for (int64_t now = 0; now < ticks || !sim.Idle(); ++now) {
    ASSERT_LT(now, 100000) << "pattern " << pattern << " never drains";
    sim.Advance(now);
    if (testing::Test::HasFatalFailure()) return;
    // Fds that come now, in the order their calls came.
    for (auto it = later.begin(); it != later.end();) {
      if (it->at > now) {
        ++it;
        continue;
      }
      sim.FdsCame(it->tenant, it->to_start, it->came, it->length, it->files);
      if (testing::Test::HasFatalFailure()) return;
      it = later.erase(it);
    }
    if (now >= ticks) continue;
    for (size_t t = 0; t < service.tenants.size(); ++t) {
      if (unit(rng) >= rate[t]) continue;
      int burst = unit(rng) < 0.1 ? static_cast<int>(unit(rng) * 20) + 1 : 1;
      for (int b = 0; b < burst; ++b) {
        std::optional<bool> to_start = sim.Call(t);
        if (testing::Test::HasFatalFailure()) return;
        if (!to_start) continue;
        int64_t delay = unit(rng) < 0.7 ? 0 : static_cast<int64_t>(unit(rng) * 3);
        later.push_back({now + delay, t, *to_start, unit(rng) > 0.02,
                         1 + static_cast<int64_t>(unit(rng) * 30),
                         1 + static_cast<size_t>(unit(rng) * 12)});
      }
    }
    if (unit(rng) < 0.05) {
      std::vector<uint64_t> queued = sim.Queued();
      if (!queued.empty()) sim.Abandon(queued[static_cast<size_t>(unit(rng) * queued.size())]);
      if (testing::Test::HasFatalFailure()) return;
    }
  }
}

TEST(SchedulerSimTest, KeepsLimitsAndFairnessOverRandomArrivals) {
  auto start = std::chrono::steady_clock::now();
  std::mt19937_64 rng(20261203);
  Worst worst;
  for (int p = 0; p < kPatterns; ++p) {
    RunPattern(rng, p, worst);
    if (HasFatalFailure()) return;
  }
  double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%d patterns in %.2f s; worst per tenant index:\n", kPatterns, seconds);
  for (int t = 0; t < kMaxTenants; ++t) {
    std::printf(
        "  tenant %d: wait %3lld ticks, other tenant's starts while it could run %d, %llu jobs, "
        "%llu busy\n",
        t, static_cast<long long>(worst.wait[t]), worst.other_starts[t],
        static_cast<unsigned long long>(worst.jobs[t]),
        static_cast<unsigned long long>(worst.busy[t]));
    EXPECT_LE(worst.other_starts[t], 1);
  }
}

// The README's case: A holds the only slot and queues 20 more; B's one job
// starts before A's second queued one.
TEST(SchedulerSimTest, OneJobOfAnotherTenantGoesBeforeAHundred) {
  std::vector<broker::TenantConfig> tenants(2);
  tenants[0].name = "a";
  tenants[0].max_concurrent = 1;
  tenants[0].max_queued = 100;
  tenants[1].name = "b";
  tenants[1].max_concurrent = 1;
  tenants[1].max_queued = 100;
  Scheduler s(tenants, 1, 256, 1000);
  s.Enqueue(0, 1);
  ASSERT_EQ(s.Next(), 1u);
  for (uint64_t id = 2; id <= 21; ++id) s.Enqueue(0, id);
  EXPECT_EQ(s.Admission(1), "");  // B can queue
  s.Enqueue(1, 100);
  EXPECT_EQ(s.Next(), std::nullopt);  // the slot is taken
  s.Finished(0);
  EXPECT_EQ(s.Next(), 100u);  // B's turn
  s.Finished(1);
  EXPECT_EQ(s.Next(), 2u);
}

TEST(SchedulerSimTest, TimeBudgetCountsFromAcceptance) {
  std::vector<broker::TenantConfig> tenants(2);
  tenants[0].time_budget_seconds = 10;
  Scheduler s(tenants, 1, 1, 1);
  EXPECT_EQ(s.JobTimeoutMs(0, 60'000, 4'000), 6'000u);
  EXPECT_EQ(s.JobTimeoutMs(0, 5'000, 4'000), 5'000u);
  EXPECT_EQ(s.JobTimeoutMs(0, 60'000, 12'000), 1u);  // at least 1 ms
  EXPECT_EQ(s.JobTimeoutMs(1, 60'000, 12'000), 60'000u);  // no budget
}

TEST(SchedulerSimTest, ConnectionsCappedPerTenantAndInAll) {
  std::vector<broker::TenantConfig> tenants(1);
  tenants[0].name = "a";
  tenants[0].max_connections = 2;
  Scheduler s(tenants, 1, 1, 1);
  EXPECT_EQ(s.ConnectionAdmission(0, 0, 1024), "");
  s.ConnectionOpened(0);
  s.ConnectionOpened(0);
  EXPECT_EQ(s.ConnectionAdmission(0, 2, 1024),
            "busy: tenant a has 2 connections open (max_connections=2)");
  s.ConnectionClosed(0);
  EXPECT_EQ(s.ConnectionAdmission(0, 1024, 1024),
            "busy: the service has 1024 connections open (its limit)");
  EXPECT_EQ(s.ConnectionAdmission(-1, 1023, 1024), "");  // an operator
}

}  // namespace
}  // namespace layerx::serve
