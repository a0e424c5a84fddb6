// `layerx serve`'s configuration (broker/service/hub.cc): TOML (toml++),
// packaging/serve.example.toml documents every key. Who a
// peer is comes from SO_PEERCRED; this file maps its uid or gid to a tenant,
// and each tenant to its limits and its policy file.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "policy/policy.h"
#include "policy/result.h"

namespace layerx::broker {

struct TenantConfig {
  std::string name;
  std::vector<uint32_t> uids;        // a peer whose uid is here is this tenant...
  std::vector<uint32_t> gids;        // ...or whose gid is here (a uid match wins)
  uint32_t max_concurrent = 1;       // running at once (>= 1)
  uint32_t max_queued = 8;           // waiting; beyond it: busy
  uint64_t byte_budget = 0;          // uncompressed bytes per job; 0: the policy's limits only
  uint64_t time_budget_seconds = 0;  // per job, queue included; 0: the policy's only
  uint32_t max_connections = 64;     // open at once, all its peers together; beyond: busy
  std::string policy_file;           // empty: the default policy
  policy::Policy policy;             // loaded from policy_file
};

struct ServiceConfig {
  uint32_t max_concurrent_jobs = 0;  // 0: the number of online CPUs
  uint32_t queue_limit = 256;
  uint32_t shutdown_grace_seconds = 60;
  uint32_t idle_timeout_seconds = 60;  // a connection with no call in flight is closed after it
  std::string log_format = "text";     // "text" or "json"
  std::string scratch_dir;             // empty: as `layerx extract --scratch` decides
  std::vector<TenantConfig> tenants;

  // The tenant of a peer: the one listing its uid, else the one listing its
  // gid; nullptr when none does (the peer is refused).
  const TenantConfig* TenantFor(uid_t uid, gid_t gid) const;
};

// Reads a tenant's policy file; the default is policy::LoadPolicyFile.
using PolicyLoader = std::function<Result<policy::Policy>(const std::string& path)>;

// kPolicy naming the key (and line) for a syntax error, an unknown section or
// key, a wrong type or range, a tenant without a name or ids, a name, uid or
// gid given twice, or a policy file that does not load (naming the tenant).
Result<ServiceConfig> ParseServiceConfig(std::string_view text, std::string_view source_name,
                                         const PolicyLoader& load_policy = {});
Result<ServiceConfig> LoadServiceConfig(const std::string& path);

}  // namespace layerx::broker
