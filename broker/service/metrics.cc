#include "broker/service/metrics.h"

#include <fmt/format.h>

#include <functional>

namespace layerx::serve {

std::string OutcomeName(FailureKind kind) {
  std::string name;
  for (const char* c = FailureKindName(kind); *c != '\0'; ++c) {
    if (*c != '/') name += *c == ' ' ? '_' : *c;
  }
  return name;
}

void Metrics::CountEnded(const std::string& tenant, const ExtractResult& result, double seconds,
                         double queued_seconds) {
  Counters& c = counters_[tenant];
  c.seconds += seconds;
  c.queued_seconds += queued_seconds;
  if (result.ok()) {
    c.jobs["ok"]++;
    for (const LayerSummary& l : result.report().layers) {
      c.input_bytes += l.compressed_bytes;
      c.tar_bytes += l.uncompressed_bytes;
    }
    c.entries += result.report().entries;
  } else {
    c.jobs[OutcomeName(result.error().kind)]++;
  }
}

std::string Metrics::Text(const Scheduler& scheduler, size_t connections,
                          double uptime_seconds) const {
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
  for (size_t i = 0; i < scheduler.tenants(); ++i) {
    out += fmt::format("layerx_jobs_running{{tenant=\"{}\"}} {}\n",
                       label(scheduler.config(i).name), scheduler.running(i));
  }
  head("layerx_jobs_queued", "gauge", "Jobs waiting for a slot, by tenant.");
  for (size_t i = 0; i < scheduler.tenants(); ++i) {
    out += fmt::format("layerx_jobs_queued{{tenant=\"{}\"}} {}\n",
                       label(scheduler.config(i).name), scheduler.queued(i));
  }
  head("layerx_max_concurrent_jobs", "gauge", "The global limit of running jobs.");
  out += fmt::format("layerx_max_concurrent_jobs {}\n", scheduler.max_concurrent());
  head("layerx_connections", "gauge", "Client connections open now.");
  out += fmt::format("layerx_connections {}\n", connections);
  head("layerx_uptime_seconds", "gauge", "Seconds since the service started.");
  out += fmt::format("layerx_uptime_seconds {:.3f}\n", uptime_seconds);
  return out;
}

void FillStatus(rpc::ServiceStatus::Builder out, const std::vector<const Job*>& shown,
                const Scheduler& scheduler, bool all, int tenant, bool draining, int64_t now,
                double uptime_seconds) {
  auto jobs = out.initJobs(static_cast<uint>(shown.size()));
  for (size_t i = 0; i < shown.size(); ++i) {
    const Job& j = *shown[i];
    auto w = jobs[static_cast<uint>(i)];
    w.setTenant(scheduler.config(j.tenant).name);
    w.setId(j.id);
    w.setState(j.running ? "running" : "queued");
    w.setLayer(j.shared->layer.load());
    w.setLayers(j.shared->layers.load());
    w.setSeconds((now - j.accepted_ns) / 1e9);
  }
  std::vector<size_t> tenants;
  for (size_t i = 0; i < scheduler.tenants(); ++i) {
    if (all || static_cast<int>(i) == tenant) tenants.push_back(i);
  }
  auto list = out.initTenants(static_cast<uint>(tenants.size()));
  for (size_t i = 0; i < tenants.size(); ++i) {
    const size_t t = tenants[i];
    auto w = list[static_cast<uint>(i)];
    w.setName(scheduler.config(t).name);
    w.setRunning(scheduler.running(t));
    w.setQueued(scheduler.queued(t));
    w.setMaxConcurrent(scheduler.config(t).max_concurrent);
    w.setMaxQueued(scheduler.config(t).max_queued);
  }
  out.setMaxConcurrent(scheduler.max_concurrent());
  if (all) {
    out.setRunning(scheduler.running());
    out.setQueued(scheduler.queued());
  } else {  // a tenant sees its own load, not the others'
    out.setRunning(tenant < 0 ? 0 : scheduler.running(static_cast<size_t>(tenant)));
    out.setQueued(tenant < 0 ? 0 : scheduler.queued(static_cast<size_t>(tenant)));
  }
  out.setDraining(draining);
  out.setVersion(Version());
  out.setUptimeSeconds(uptime_seconds);
}

}  // namespace layerx::serve
