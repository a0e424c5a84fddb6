// What the service tells about itself: the counters behind `layerx status
// --metrics` (Prometheus text) and the status a client asks for.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "broker/service/request.h"
#include "broker/service/scheduler.h"
#include "layerx/layerx.hpp"

namespace layerx::serve {

// The metrics label of an outcome: FailureKindName as a label value
// ("invalid input" -> "invalid_input", "i/o" -> "io").
std::string OutcomeName(FailureKind kind);

struct Counters {
  std::map<std::string, uint64_t> jobs;  // outcome -> count
  uint64_t input_bytes = 0, tar_bytes = 0, entries = 0;
  double seconds = 0, queued_seconds = 0;
};

class Metrics {
 public:
  // The counters of `tenant` (its name), made on first use.
  Counters& of(const std::string& tenant) { return counters_[tenant]; }
  // A request refused before a job was made; tenant "-" for none.
  void CountRefusal(const std::string& tenant, FailureKind kind) {
    refusals_[{tenant, OutcomeName(kind)}]++;
  }
  // A job that ran for `seconds` after waiting `queued_seconds` ended with `result`.
  void CountEnded(const std::string& tenant, const ExtractResult& result, double seconds,
                  double queued_seconds);
  // Prometheus text exposition format 0.0.4.
  std::string Text(const Scheduler& scheduler, size_t connections, double uptime_seconds) const;

 private:
  std::map<std::string, Counters> counters_;  // by tenant
  std::map<std::pair<std::string, std::string>, uint64_t> refusals_;
};

// The status a client asked for: `jobs` are those it may see; an operator
// (`all`) sees every tenant's load, a tenant (`tenant`) its own only.
void FillStatus(rpc::ServiceStatus::Builder out, const std::vector<const Job*>& jobs,
                const Scheduler& scheduler, bool all, int tenant, bool draining, int64_t now_ns,
                double uptime_seconds);

}  // namespace layerx::serve
