#define TOML_EXCEPTIONS 0
#include "broker/service/service_config.h"

#include <fmt/format.h>
#include <toml++/toml.h>

#include <algorithm>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>

#include "policy/policy_file.h"

namespace layerx::broker {

namespace {

Error ConfigError(std::string_view source, const toml::source_region& where, std::string message) {
  return Error(ErrorKind::kPolicy, 0,
               fmt::format("{}:{}: {}", source, where.begin.line, std::move(message)));
}

// A whole number in [min, max], or an error naming `key`.
Result<uint64_t> Number(std::string_view source, const toml::node& node, const std::string& key,
                        uint64_t min, uint64_t max) {
  std::optional<int64_t> v = node.value_exact<int64_t>();
  if (!v || *v < 0 || static_cast<uint64_t>(*v) < min || static_cast<uint64_t>(*v) > max) {
    return Fail(ConfigError(source, node.source(),
                            fmt::format("{}: want a whole number from {} to {}", key, min, max)));
  }
  return static_cast<uint64_t>(*v);
}

Result<std::string> Text(std::string_view source, const toml::node& node, const std::string& key) {
  std::optional<std::string_view> v = node.value_exact<std::string_view>();
  if (!v) return Fail(ConfigError(source, node.source(), fmt::format("{}: want a string", key)));
  return std::string(*v);
}

Result<std::vector<uint32_t>> Ids(std::string_view source, const toml::node& node,
                                  const std::string& key) {
  const toml::array* list = node.as_array();
  if (list == nullptr) {
    return Fail(ConfigError(source, node.source(), fmt::format("{}: want an array of ids", key)));
  }
  std::vector<uint32_t> ids;
  for (const toml::node& item : *list) {
    // 4294967295 is (uid_t)-1, "no id": never a peer's.
    LX_ASSIGN_OR_RETURN(uint64_t id, Number(source, item, key, 0, 0xfffffffeu));
    ids.push_back(static_cast<uint32_t>(id));
  }
  return ids;
}

Status ParseService(std::string_view source, const toml::table& table, ServiceConfig& out) {
  constexpr uint64_t kMaxU32 = std::numeric_limits<uint32_t>::max();
  for (const auto& [key, node] : table) {
    std::string name(key.str());
    std::string full = "service." + name;
    if (name == "max_concurrent_jobs") {
      LX_ASSIGN_OR_RETURN(uint64_t v, Number(source, node, full, 0, 4096));
      out.max_concurrent_jobs = static_cast<uint32_t>(v);
    } else if (name == "queue_limit") {
      LX_ASSIGN_OR_RETURN(uint64_t v, Number(source, node, full, 0, kMaxU32));
      out.queue_limit = static_cast<uint32_t>(v);
    } else if (name == "shutdown_grace_seconds") {
      LX_ASSIGN_OR_RETURN(uint64_t v, Number(source, node, full, 0, 86400));
      out.shutdown_grace_seconds = static_cast<uint32_t>(v);
    } else if (name == "idle_timeout_seconds") {
      LX_ASSIGN_OR_RETURN(uint64_t v, Number(source, node, full, 1, 86400));
      out.idle_timeout_seconds = static_cast<uint32_t>(v);
    } else if (name == "log_format") {
      LX_ASSIGN_OR_RETURN(out.log_format, Text(source, node, full));
      if (out.log_format != "text" && out.log_format != "json") {
        return Fail(ConfigError(source, node.source(), full + ": want \"text\" or \"json\""));
      }
    } else if (name == "scratch_dir") {
      LX_ASSIGN_OR_RETURN(out.scratch_dir, Text(source, node, full));
    } else {
      return Fail(ConfigError(source, node.source(), "unknown key " + full));
    }
  }
  return {};
}

Result<TenantConfig> ParseTenant(std::string_view source, const toml::table& table, size_t index,
                                 const PolicyLoader& load_policy) {
  TenantConfig t;
  std::string at = fmt::format("tenant[{}]", index);
  for (const auto& [key, node] : table) {
    std::string name(key.str());
    std::string full = at + "." + name;
    if (name == "name") {
      LX_ASSIGN_OR_RETURN(t.name, Text(source, node, full));
      bool printable = !t.name.empty() && std::all_of(t.name.begin(), t.name.end(),
                                                      [](char c) { return c > ' ' && c < 0x7f; });
      if (!printable) {
        return Fail(ConfigError(source, node.source(), full + ": want a printable word"));
      }
    } else if (name == "uids") {
      LX_ASSIGN_OR_RETURN(t.uids, Ids(source, node, full));
    } else if (name == "gids") {
      LX_ASSIGN_OR_RETURN(t.gids, Ids(source, node, full));
    } else if (name == "max_concurrent") {
      LX_ASSIGN_OR_RETURN(uint64_t v, Number(source, node, full, 1, 4096));
      t.max_concurrent = static_cast<uint32_t>(v);
    } else if (name == "max_queued") {
      LX_ASSIGN_OR_RETURN(uint64_t v, Number(source, node, full, 0, 1u << 20));
      t.max_queued = static_cast<uint32_t>(v);
    } else if (name == "byte_budget") {
      LX_ASSIGN_OR_RETURN(t.byte_budget,
                          Number(source, node, full, 0, std::numeric_limits<int64_t>::max()));
    } else if (name == "time_budget_seconds") {
      LX_ASSIGN_OR_RETURN(t.time_budget_seconds, Number(source, node, full, 0, 30 * 86400));
    } else if (name == "max_connections") {
      LX_ASSIGN_OR_RETURN(uint64_t v, Number(source, node, full, 1, 1024));
      t.max_connections = static_cast<uint32_t>(v);
    } else if (name == "policy") {
      LX_ASSIGN_OR_RETURN(t.policy_file, Text(source, node, full));
    } else {
      return Fail(ConfigError(source, node.source(), "unknown key " + full));
    }
  }
  if (t.name.empty()) {
    return Fail(ConfigError(source, table.source(), at + ": no name"));
  }
  if (t.uids.empty() && t.gids.empty()) {
    return Fail(
        ConfigError(source, table.source(),
                    fmt::format("tenant {:?}: no uids or gids: nobody could use it", t.name)));
  }
  if (t.policy_file.empty()) {
    t.policy = policy::DefaultPolicy();
  } else {
    auto loaded = load_policy ? load_policy(t.policy_file) : policy::LoadPolicyFile(t.policy_file);
    if (!loaded) return Fail(std::move(loaded).error().With("tenant {:?}", t.name));
    t.policy = std::move(*loaded);
  }
  return t;
}

}  // namespace

const TenantConfig* ServiceConfig::TenantFor(uid_t uid, gid_t gid) const {
  for (const TenantConfig& t : tenants) {
    if (std::find(t.uids.begin(), t.uids.end(), uid) != t.uids.end()) return &t;
  }
  for (const TenantConfig& t : tenants) {
    if (std::find(t.gids.begin(), t.gids.end(), gid) != t.gids.end()) return &t;
  }
  return nullptr;
}

Result<ServiceConfig> ParseServiceConfig(std::string_view text, std::string_view source_name,
                                         const PolicyLoader& load_policy) {
  // toml++ 3.3 has undefined behaviour on some non-ASCII code points (see
  // policy/policy_file.cc); every key and value here is ASCII.
  auto non_ascii = std::find_if(text.begin(), text.end(),
                                [](char c) { return static_cast<unsigned char>(c) >= 0x80; });
  if (non_ascii != text.end()) {
    return Fail(Error(ErrorKind::kPolicy, 0,
                      fmt::format("{}:{}: not ASCII (the service config is ASCII only)",
                                  source_name, 1 + std::count(text.begin(), non_ascii, '\n'))));
  }
  toml::parse_result parsed = toml::parse(text, source_name);
  if (!parsed) {
    const toml::parse_error& err = parsed.error();
    return Fail(ConfigError(source_name, err.source(), std::string(err.description())));
  }
  ServiceConfig config;
  for (const auto& [key, node] : parsed.table()) {
    std::string section(key.str());
    if (section == "service" && node.is_table()) {
      LX_TRY(ParseService(source_name, *node.as_table(), config));
    } else if (section == "tenant" && node.is_array_of_tables()) {
      size_t index = 0;
      for (const toml::node& item : *node.as_array()) {
        LX_ASSIGN_OR_RETURN(TenantConfig t,
                            ParseTenant(source_name, *item.as_table(), index++, load_policy));
        config.tenants.push_back(std::move(t));
      }
    } else {
      return Fail(
          ConfigError(source_name, node.source(),
                      fmt::format("unknown section {:?} ([service], [[tenant]])", section)));
    }
  }
  // One name, uid or gid per tenant: a peer must never be two tenants.
  std::map<std::string, std::string> names, uids, gids;
  for (const TenantConfig& t : config.tenants) {
    auto twice = [&](std::map<std::string, std::string>& seen, const std::string& what,
                     const std::string& value) -> Status {
      auto [it, fresh] = seen.emplace(value, t.name);
      if (!fresh) {
        return Fail(Error(ErrorKind::kPolicy, 0,
                          fmt::format("{}: {} {} is given to tenant {:?} and to tenant {:?}",
                                      source_name, what, value, it->second, t.name)));
      }
      return {};
    };
    LX_TRY(twice(names, "name", t.name));
    if (t.max_queued > config.queue_limit) {
      return Fail(Error(ErrorKind::kPolicy, 0,
                        fmt::format("{}: tenant {:?}: max_queued={} is over [service] "
                                    "queue_limit={}: one tenant could fill the queue",
                                    source_name, t.name, t.max_queued, config.queue_limit)));
    }
    for (uint32_t uid : t.uids) LX_TRY(twice(uids, "uid", std::to_string(uid)));
    for (uint32_t gid : t.gids) LX_TRY(twice(gids, "gid", std::to_string(gid)));
  }
  return config;
}

Result<ServiceConfig> LoadServiceConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Fail(Error(ErrorKind::kPolicy, errno, fmt::format("service config {:?}", path)));
  std::ostringstream text;
  text << in.rdbuf();
  if (text.str().size() > (1 << 20)) {
    return Fail(Error(ErrorKind::kPolicy, 0, fmt::format("service config {:?} over 1 MiB", path)));
  }
  return ParseServiceConfig(text.str(), path);
}

}  // namespace layerx::broker
