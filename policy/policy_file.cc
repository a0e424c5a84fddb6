#define TOML_EXCEPTIONS 0
#include "policy/policy_file.h"

#include <fmt/format.h>
#include <toml++/toml.h>

#include <algorithm>
#include <fstream>
#include <sstream>

namespace layerx::policy {

namespace {

struct Key {
  const char* section;
  const char* name;
  uint64_t Limits::*limit = nullptr;
  uint64_t JailRlimits::*rlimit = nullptr;
  uint64_t min = 0;
  const char* help;
};

constexpr Key kKeys[] = {
    {"limits", "max_layer_bytes", &Limits::max_layer_bytes, nullptr, 0,
     "uncompressed bytes of one layer (its tar stream)"},
    {"limits", "max_image_bytes", &Limits::max_image_bytes, nullptr, 0,
     "uncompressed file data in all layers"},
    {"limits", "max_entries", &Limits::max_entries, nullptr, 1, "tar entries in one layer"},
    {"limits", "max_path_bytes", &Limits::max_path_bytes, nullptr, 1, "one entry name"},
    {"limits", "max_path_depth", &Limits::max_path_depth, nullptr, 1, "components in one name"},
    {"limits", "max_link_target_bytes", &Limits::max_link_target_bytes, nullptr, 1,
     "a symlink or hardlink target"},
    {"limits", "max_xattrs_per_entry", &Limits::max_xattrs_per_entry, nullptr, 0, ""},
    {"limits", "max_xattr_bytes", &Limits::max_xattr_bytes, nullptr, 0,
     "names and values of one entry's xattrs"},
    {"limits", "max_symlink_hops", &Limits::max_symlink_hops, nullptr, 1,
     "links followed resolving one name"},
    {"limits", "layer_timeout_ms", &Limits::layer_timeout_ms, nullptr, 1,
     "wall clock for one layer, enforced by the broker"},
    {"limits", "job_timeout_ms", &Limits::job_timeout_ms, nullptr, 1,
     "wall clock for the whole job: every layer and the ext4 build"},
    {"limits", "max_compression_ratio", &Limits::max_compression_ratio, nullptr, 0,
     "tar bytes per compressed byte past the first 16 MiB; 0: no limit"},
    {"limits", "max_record_message_bytes", &Limits::max_record_message_bytes, nullptr, 4096,
     "one record message from an extractor"},
    {"jail", "file_size", nullptr, &JailRlimits::file_size, 1, "RLIMIT_FSIZE of the extractor"},
    {"jail", "open_files", nullptr, &JailRlimits::open_files, 16, "RLIMIT_NOFILE"},
    {"jail", "address_space", nullptr, &JailRlimits::address_space, 64 * kMiB, "RLIMIT_AS"},
    {"jail", "cpu_seconds", nullptr, &JailRlimits::cpu_seconds, 1, "RLIMIT_CPU"},
};

struct RuleKey {
  const char* name;
  Treatment EntryRules::*field;
  const char* help;
};

constexpr RuleKey kRuleKeys[] = {
    {"devices", &EntryRules::devices, "char and block device nodes"},
    {"fifos", &EntryRules::fifos, "named pipes"},
    {"setuid", &EntryRules::setuid, "setuid and setgid bits on non-directories"},
    {"file_caps", &EntryRules::file_caps, "security.capability (file capabilities)"},
};

const char* TreatmentName(Treatment t) {
  switch (t) {
    case Treatment::kKeep:
      return "keep";
    case Treatment::kStrip:
      return "strip";
    case Treatment::kRefuse:
      return "refuse";
  }
  return "?";
}

std::string Quoted(std::string_view s) {
  // TOML basic string: escape what TOML requires; patterns hold no control bytes
  // anyway (a name with one would be refused on reading).
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

Error PolicyError(std::string_view source, const toml::source_region& where, std::string message) {
  return Error(ErrorKind::kPolicy, 0,
               fmt::format("{}:{}: {}", source, where.begin.line, std::move(message)));
}

}  // namespace

Result<Policy> ParsePolicyToml(std::string_view text, std::string_view source_name, Policy base) {
  // toml++ 3.3 reaches __builtin_unreachable() on some non-ASCII code points
  // (marzer/tomlplusplus#190, #295): undefined behaviour on a bad file. Every
  // key and value of a policy is ASCII, so the rest is refused before parsing.
  auto non_ascii = std::find_if(text.begin(), text.end(),
                                [](char c) { return static_cast<unsigned char>(c) >= 0x80; });
  if (non_ascii != text.end()) {
    return Fail(Error(ErrorKind::kPolicy, 0,
                      fmt::format("{}:{}: not ASCII (a policy file is ASCII only)", source_name,
                                  1 + std::count(text.begin(), non_ascii, '\n'))));
  }
  toml::parse_result parsed = toml::parse(text, source_name);
  if (!parsed) {
    const toml::parse_error& err = parsed.error();
    return Fail(PolicyError(source_name, err.source(), std::string(err.description())));
  }
  const toml::table& root = parsed.table();
  Policy policy = std::move(base);
  for (const auto& [section_key, section_node] : root) {
    std::string section(section_key.str());
    const toml::table* table = section_node.as_table();
    if (table == nullptr || (section != "limits" && section != "jail" && section != "entries")) {
      return Fail(
          PolicyError(source_name, section_node.source(),
                      fmt::format("unknown section [{}] (limits, entries, jail)", section)));
    }
    for (const auto& [key, node] : *table) {
      std::string name(key.str());
      std::string full = section + "." + name;
      if (section == "entries") {
        if (name == "xattrs") {
          const toml::array* list = node.as_array();
          if (list == nullptr) {
            return Fail(PolicyError(source_name, node.source(),
                                    fmt::format("{}: want an array of strings", full)));
          }
          XattrAllowlist allow = XattrAllowlist::Empty();
          for (const toml::node& item : *list) {
            std::optional<std::string_view> pattern = item.value<std::string_view>();
            bool printable = pattern && std::all_of(pattern->begin(), pattern->end(),
                                                    [](char c) { return c > ' ' && c < 0x7f; });
            if (!printable || !allow.Add(*pattern)) {
              return Fail(PolicyError(
                  source_name, item.source(),
                  fmt::format("{}: want names or namespaces like \"user.\" (printable, {} "
                              "bytes in all)",
                              full, XattrAllowlist::kCapacity)));
            }
          }
          policy.rules.xattrs = allow;
          continue;
        }
        const RuleKey* rule = nullptr;
        for (const RuleKey& r : kRuleKeys) {
          if (name == r.name) rule = &r;
        }
        if (rule == nullptr) {
          return Fail(PolicyError(source_name, node.source(), fmt::format("unknown key {}", full)));
        }
        std::optional<std::string_view> word = node.value<std::string_view>();
        Treatment t;
        if (word == "keep") {
          t = Treatment::kKeep;
        } else if (word == "strip") {
          t = Treatment::kStrip;
        } else if (word == "refuse") {
          t = Treatment::kRefuse;
        } else {
          return Fail(PolicyError(source_name, node.source(),
                                  fmt::format("{}: want \"keep\", \"strip\" or \"refuse\"", full)));
        }
        policy.rules.*(rule->field) = t;
        continue;
      }
      if (section == "jail" && name == "seccomp_action") {
        std::optional<std::string_view> action = node.value<std::string_view>();
        if (action == "kill") {
          policy.seccomp_action = SeccompAction::kKillProcess;
        } else if (action == "errno") {
          policy.seccomp_action = SeccompAction::kErrno;
        } else {
          return Fail(PolicyError(source_name, node.source(),
                                  fmt::format("{}: want \"kill\" or \"errno\"", full)));
        }
        continue;
      }
      const Key* spec = nullptr;
      for (const Key& k : kKeys) {
        if (section == k.section && name == k.name) spec = &k;
      }
      if (spec == nullptr) {
        return Fail(PolicyError(source_name, node.source(), fmt::format("unknown key {}", full)));
      }
      std::optional<int64_t> value = node.value_exact<int64_t>();
      if (!value || *value < 0 || static_cast<uint64_t>(*value) < spec->min) {
        return Fail(PolicyError(source_name, node.source(),
                                fmt::format("{}: want an integer >= {}", full, spec->min)));
      }
      if (spec->limit) policy.limits.*(spec->limit) = static_cast<uint64_t>(*value);
      if (spec->rlimit) policy.rlimits.*(spec->rlimit) = static_cast<uint64_t>(*value);
    }
  }
  return policy;
}

Result<Policy> LoadPolicyFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Fail(Error(ErrorKind::kPolicy, errno, fmt::format("policy file {:?}", path)));
  std::ostringstream text;
  text << in.rdbuf();
  if (text.str().size() > 1024 * 1024) {
    return Fail(Error(ErrorKind::kPolicy, 0, fmt::format("policy file {:?} over 1 MiB", path)));
  }
  return ParsePolicyToml(text.str(), path);
}

std::string FormatPolicyToml(const Policy& policy) {
  std::string out;
  const char* section = "";
  for (const Key& k : kKeys) {
    if (std::string_view(section) != k.section) {
      out += fmt::format("{}[{}]\n", out.empty() ? "" : "\n", k.section);
      section = k.section;
    }
    uint64_t value = k.limit ? policy.limits.*(k.limit) : policy.rlimits.*(k.rlimit);
    out += fmt::format("{} = {}", k.name, value);
    if (*k.help) out += fmt::format("  # {}", k.help);
    out += '\n';
  }
  out += fmt::format(
      "seccomp_action = \"{}\"  # a forbidden syscall: kill the extractor, or fail it\n",
      policy.seccomp_action == SeccompAction::kKillProcess ? "kill" : "errno");
  out += "\n[entries]  # keep, strip (leave the entry or bit out) or refuse (fail the job)\n";
  for (const RuleKey& r : kRuleKeys) {
    out +=
        fmt::format("{} = \"{}\"  # {}\n", r.name, TreatmentName(policy.rules.*(r.field)), r.help);
  }
  std::string patterns;
  policy.rules.xattrs.ForEach(
      [&](std::string_view p) { patterns += (patterns.empty() ? "" : ", ") + Quoted(p); });
  out += fmt::format("xattrs = [{}]  # kept xattrs: exact names, or namespaces ending in \".\"\n",
                     patterns);
  return out;
}

}  // namespace layerx::policy
