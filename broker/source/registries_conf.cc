#define TOML_EXCEPTIONS 0
#include "broker/source/registries_conf.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>

#include "broker/log/logging.h"
#include "sandbox/sys.h"

namespace layerx::broker {

namespace {

constexpr const char* kSystemFile = "/etc/containers/registries.conf";
constexpr const char* kSystemDir = "/etc/containers/registries.conf.d";
constexpr const char* kUserFile = "/.config/containers/registries.conf";
constexpr const char* kUserDir = "/.config/containers/registries.conf.d";
constexpr size_t kMaxFileBytes = 1 << 20;

Error ConfError(std::string_view file, const toml::source_region& where, std::string message) {
  return Error(ErrorKind::kPolicy, 0,
               fmt::format("registries.conf {}:{}: {}", file, where.begin.line, message));
}

}  // namespace

std::string ConfigHome() {
  const char* h = std::getenv("HOME");
  if (h == nullptr || h[0] != '/') return {};
  if (::access(h, X_OK) != 0) {
    Logger("broker")->info("HOME {:?} cannot be entered: its config files are not read", h);
    return {};
  }
  return h;
}

std::string LowerHost(std::string_view name) {
  std::string out(name);
  const size_t end = std::min(out.find('/'), out.size());
  for (size_t i = 0; i < end; ++i) {
    if (out[i] >= 'A' && out[i] <= 'Z') out[i] = static_cast<char>(out[i] - 'A' + 'a');
  }
  return out;
}

namespace {

// "host[:port][/ns...]" as the file may write it: a trailing '/' dropped; a
// scheme refused, as containers/image refuses it.
Result<std::string> Location(std::string_view file, const toml::node& node, std::string_view key) {
  std::optional<std::string_view> v = node.value_exact<std::string_view>();
  if (!v) return Fail(ConfError(file, node.source(), fmt::format("{}: want a string", key)));
  std::string s(*v);
  while (!s.empty() && s.back() == '/') s.pop_back();
  s = LowerHost(s);
  if (s.starts_with("http://") || s.starts_with("https://")) {
    return Fail(ConfError(file, node.source(),
                          fmt::format("{} {:?}: a URI scheme is not allowed (insecure = true "
                                      "allows plain http)",
                                      key, s)));
  }
  return s;
}

Result<bool> Bool(std::string_view file, const toml::node& node, std::string_view key) {
  std::optional<bool> v = node.value_exact<bool>();
  if (!v) return Fail(ConfError(file, node.source(), fmt::format("{}: want true or false", key)));
  return *v;
}

Status ParseMirror(std::string_view file, const toml::table& table, RegistryEndpoint& out) {
  for (const auto& [key, node] : table) {
    const std::string_view name = key.str();
    if (name == "location") {
      LX_ASSIGN_OR_RETURN(out.location, Location(file, node, "mirror.location"));
    } else if (name == "insecure") {
      LX_ASSIGN_OR_RETURN(out.insecure, Bool(file, node, "mirror.insecure"));
    } else if (name == "pull-from-mirror") {
      std::optional<std::string_view> v = node.value_exact<std::string_view>();
      if (v && (*v == "all" || v->empty())) {
        out.pull_from = RegistryEndpoint::PullFrom::kAll;
      } else if (v && *v == "digest-only") {
        out.pull_from = RegistryEndpoint::PullFrom::kDigestOnly;
      } else if (v && *v == "tag-only") {
        out.pull_from = RegistryEndpoint::PullFrom::kTagOnly;
      } else {
        return Fail(ConfError(file, node.source(),
                              "pull-from-mirror: want \"all\", \"digest-only\" or \"tag-only\""));
      }
    } else {
      Logger("broker")->info("registries.conf {}:{}: mirror key {:?} is not used", file,
                             node.source().begin.line, name);
    }
  }
  if (out.location.empty()) {
    return Fail(ConfError(file, table.source(), "a mirror needs a location"));
  }
  return {};
}

// A "*.domain" prefix: no port, no namespace, the wildcard only in front.
bool IsWildcard(std::string_view prefix) { return prefix.starts_with("*."); }

Result<RegistryConfEntry> ParseRegistry(std::string_view file, const toml::table& table) {
  RegistryConfEntry r;
  r.source = fmt::format("{}:{}", file, table.source().begin.line);
  bool has_prefix = false, has_pull_from = false;
  for (const auto& [key, node] : table) {
    const std::string_view name = key.str();
    if (name == "prefix") {
      LX_ASSIGN_OR_RETURN(r.prefix, Location(file, node, "prefix"));
      has_prefix = true;
    } else if (name == "location") {
      LX_ASSIGN_OR_RETURN(r.endpoint.location, Location(file, node, "location"));
    } else if (name == "insecure") {
      LX_ASSIGN_OR_RETURN(r.endpoint.insecure, Bool(file, node, "insecure"));
    } else if (name == "blocked") {
      LX_ASSIGN_OR_RETURN(r.blocked, Bool(file, node, "blocked"));
    } else if (name == "mirror-by-digest-only") {
      LX_ASSIGN_OR_RETURN(r.mirror_by_digest_only, Bool(file, node, "mirror-by-digest-only"));
    } else if (name == "mirror") {
      const toml::array* list = node.as_array();
      if (list == nullptr) {
        return Fail(ConfError(file, node.source(), "mirror: want [[registry.mirror]] tables"));
      }
      for (const toml::node& item : *list) {
        const toml::table* m = item.as_table();
        if (m == nullptr) {
          return Fail(ConfError(file, item.source(), "mirror: want [[registry.mirror]] tables"));
        }
        RegistryEndpoint mirror;
        LX_TRY(ParseMirror(file, *m, mirror));
        if (const toml::node* p = m->get("pull-from-mirror")) {
          has_pull_from |= p->value_exact<std::string_view>().value_or("") != "";
        }
        r.mirrors.push_back(std::move(mirror));
      }
    } else if (name == "pull-from-mirror") {
      return Fail(ConfError(file, node.source(),
                            "pull-from-mirror belongs in a [[registry.mirror]] table"));
    } else {
      Logger("broker")->info("registries.conf {}:{}: registry key {:?} is not used", file,
                             node.source().begin.line, name);
    }
  }
  if (!has_prefix || r.prefix.empty()) r.prefix = r.endpoint.location;
  if (r.prefix.empty()) {
    return Fail(ConfError(file, table.source(), "a [[registry]] needs a prefix or a location"));
  }
  if (IsWildcard(r.prefix)) {
    std::string_view domain = std::string_view(r.prefix).substr(2);
    if (domain.empty() || domain.find_first_of("*/:@") != std::string_view::npos) {
      return Fail(ConfError(file, table.source(),
                            fmt::format("prefix {:?}: a wildcard prefix is \"*.DOMAIN\", with no "
                                        "port, namespace or other wildcard",
                                        r.prefix)));
    }
  } else if (r.prefix.find('*') != std::string::npos) {
    return Fail(ConfError(file, table.source(),
                          fmt::format("prefix {:?}: a wildcard only as \"*.DOMAIN\"", r.prefix)));
  }
  if (r.endpoint.location.empty() && !IsWildcard(r.prefix)) {
    return Fail(ConfError(
        file, table.source(),
        fmt::format("prefix {:?}: an empty location needs a \"*.DOMAIN\" prefix", r.prefix)));
  }
  if (r.mirror_by_digest_only && has_pull_from) {
    return Fail(ConfError(file, table.source(),
                          fmt::format("prefix {:?}: mirror-by-digest-only and a mirror's "
                                      "pull-from-mirror cannot both be set",
                                      r.prefix)));
  }
  return r;
}

// Version 1: [registries.insecure] / [registries.block] lists of registries.
Status ParseV1(std::string_view file, const toml::table& registries,
               std::vector<RegistryConfEntry>& out) {
  std::map<std::string, RegistryConfEntry> by_name;
  for (const auto& [key, node] : registries) {
    const std::string_view kind = key.str();
    const toml::table* t = node.as_table();
    if (t == nullptr) {
      return Fail(ConfError(file, node.source(), fmt::format("registries.{}: want a table", kind)));
    }
    if (kind != "insecure" && kind != "block") continue;  // "search": short names, not used
    const toml::node* list_node = t->get("registries");
    if (list_node == nullptr) continue;
    const toml::array* list = list_node->as_array();
    if (list == nullptr) {
      return Fail(ConfError(file, list_node->source(),
                            fmt::format("registries.{}.registries: want an array", kind)));
    }
    for (const toml::node& item : *list) {
      LX_ASSIGN_OR_RETURN(std::string name,
                          Location(file, item, fmt::format("registries.{}.registries", kind)));
      if (name.empty()) continue;
      RegistryConfEntry& r = by_name[name];
      r.prefix = r.endpoint.location = name;
      r.source = fmt::format("{}:{}", file, item.source().begin.line);
      if (kind == "insecure") r.endpoint.insecure = true;
      if (kind == "block") r.blocked = true;
    }
  }
  for (auto& [name, r] : by_name) out.push_back(std::move(r));
  return {};
}

// Where `prefix` matches the start of `name` ending at a separator: the
// length matched, or 0.
size_t MatchLength(std::string_view name, std::string_view prefix) {
  if (IsWildcard(prefix)) {
    // "*.example.com" matches "a.example.com/..." and "a.b.example.com:5000/...":
    // the suffix must end the host.
    const std::string_view suffix = prefix.substr(1);  // ".example.com"
    const size_t host_end = std::min(name.find('/'), name.size());
    std::string_view host = name.substr(0, host_end);
    if (size_t colon = host.find(':'); colon != std::string_view::npos)
      host = host.substr(0, colon);
    if (host.size() <= suffix.size() || !host.ends_with(suffix)) return 0;
    return host.size();
  }
  if (!name.starts_with(prefix)) return 0;
  if (name.size() == prefix.size()) return prefix.size();
  // As containers/image: a '/', or a ':' or '@' (a tag, a digest; and a port:
  // "example.com" covers "example.com:5000", so a block cannot be walked
  // around by naming the port).
  const char next = name[prefix.size()];
  return next == '/' || next == ':' || next == '@' ? prefix.size() : 0;
}

// *.conf in `dir`, by name; none when `dir` is not there. A dir that is
// there and cannot be listed is an error: what it holds may block a registry.
Result<std::vector<std::string>> DropIns(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec);
  if (ec == std::errc::no_such_file_or_directory) return out;
  for (std::filesystem::directory_iterator end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() > 5 && name.ends_with(".conf")) out.push_back(it->path());
  }
  if (ec) {
    return Fail(Error(ErrorKind::kPolicy, ec.value(),
                      fmt::format("registries.conf.d {:?}: cannot be listed", dir)));
  }
  std::sort(out.begin(), out.end());
  return out;
}

// The file's text; nullopt when it is not there and was not named. Any other
// failure (not readable, not a regular file) is an error: a file skipped
// could be one that blocks a registry. "/dev/null", named, is an empty file
// (the usual way to read none).
Result<std::optional<std::string>> ReadConf(const std::string& path, bool named) {
  if (named && path == "/dev/null") return std::optional<std::string>(std::string());
  auto text = sandbox::ReadRegularFile(path, kMaxFileBytes);
  if (text) return std::optional<std::string>(std::move(*text));
  if (!named && text.error().err() == ENOENT) return std::optional<std::string>();
  if (text.error().kind() == ErrorKind::kLimitExceeded) {
    return Fail(std::move(text).error().With("registries.conf"));
  }
  return Fail(
      Error(ErrorKind::kPolicy, 0, fmt::format("registries.conf: {}", text.error().ToString())));
}

}  // namespace

Status MergeRegistriesConf(std::string_view text, const std::string& name, RegistriesConf& conf,
                           bool drop_in) {
  toml::parse_result parsed = toml::parse(text, name);
  if (!parsed) {
    const toml::parse_error& err = parsed.error();
    return Fail(ConfError(name, err.source(), std::string(err.description())));
  }
  const toml::table& root = parsed.table();
  std::vector<RegistryConfEntry> found;
  std::optional<std::vector<std::string>> credential_helpers;
  bool v1 = false, v2 = false;
  for (const auto& [key, node] : root) {
    const std::string_view k = key.str();
    if (k == "registry") {
      v2 = true;
      const toml::array* list = node.as_array();
      if (list == nullptr) return Fail(ConfError(name, node.source(), "want [[registry]] tables"));
      for (const toml::node& item : *list) {
        const toml::table* t = item.as_table();
        if (t == nullptr) return Fail(ConfError(name, item.source(), "want [[registry]] tables"));
        LX_ASSIGN_OR_RETURN(RegistryConfEntry r, ParseRegistry(name, *t));
        bool twice = false;
        for (const RegistryConfEntry& seen : found) {
          // One location, two minds about TLS or blocking: refused, as in
          // containers/image.
          if (!r.endpoint.location.empty() && seen.endpoint.location == r.endpoint.location &&
              (seen.endpoint.insecure != r.endpoint.insecure || seen.blocked != r.blocked)) {
            return Fail(ConfError(name, t->source(),
                                  fmt::format("location {:?} is set again with another insecure "
                                              "or blocked (first at {})",
                                              r.endpoint.location, seen.source)));
          }
          twice |= seen.prefix == r.prefix;
        }
        if (twice) {  // the first one is the one containers/image finds
          Logger("broker")->info("registries.conf {}: prefix {:?} again: not used", r.source,
                                 r.prefix);
          continue;
        }
        found.push_back(std::move(r));
      }
    } else if (k == "registries") {
      v1 = true;
      const toml::table* t = node.as_table();
      if (t == nullptr) return Fail(ConfError(name, node.source(), "registries: want a table"));
      LX_TRY(ParseV1(name, *t, found));
    } else if (k == "credential-helpers") {
      const toml::array* list = node.as_array();
      if (list == nullptr) {
        return Fail(ConfError(name, node.source(), "credential-helpers: want an array of names"));
      }
      std::vector<std::string> helpers;
      for (const toml::node& item : *list) {
        std::optional<std::string_view> v = item.value_exact<std::string_view>();
        if (!v || v->empty() || v->find('/') != std::string_view::npos) {
          return Fail(ConfError(name, item.source(),
                                "credential-helpers: want helper names (\"containers-auth.json\" "
                                "or NAME of docker-credential-NAME)"));
        }
        helpers.emplace_back(*v);
      }
      credential_helpers = std::move(helpers);
    } else if (k == "unqualified-search-registries" || k == "short-name-mode" || k == "aliases" ||
               k == "additional-layer-store-auth-helper") {
      // Short names: a docker:// name is whole (README).
    } else {
      Logger("broker")->info("registries.conf {}:{}: key {:?} is not used", name,
                             node.source().begin.line, k);
    }
  }
  if (v1 && v2) {
    return Fail(ConfError(name, root.source(),
                          "mixes version 1 ([registries.*]) and version 2 ([[registry]]) tables"));
  }
  if (v1 && drop_in) {
    return Fail(ConfError(name, root.source(),
                          "a drop-in must be version 2 ([[registry]] tables), as in skopeo"));
  }
  // A drop-in's table replaces the one with its prefix, in its place.
  for (RegistryConfEntry& r : found) {
    auto same = std::find_if(conf.registries.begin(), conf.registries.end(),
                             [&](const RegistryConfEntry& e) { return e.prefix == r.prefix; });
    if (same != conf.registries.end()) {
      *same = std::move(r);
    } else {
      conf.registries.push_back(std::move(r));
    }
  }
  if (credential_helpers) conf.credential_helpers = std::move(*credential_helpers);
  conf.files.push_back(name);
  return {};
}

Result<RegistriesConf> LoadRegistriesConf(const std::string& path) {
  RegistriesConf conf;
  std::string file = path;
  bool named = !file.empty();
  for (const char* var : {"CONTAINERS_REGISTRIES_CONF", "REGISTRIES_CONFIG_PATH"}) {
    if (named) break;
    if (const char* env = std::getenv(var); env != nullptr && *env) {
      file = env;
      named = true;
    }
  }
  const std::string home = ConfigHome();
  std::vector<std::string> dirs;
  if (!named && !home.empty() && ::access((home + kUserFile).c_str(), F_OK) == 0) {
    file = home + kUserFile;  // then the system's drop-ins are not read either
  } else {
    if (file.empty()) file = kSystemFile;
    dirs.push_back(kSystemDir);
  }
  if (!home.empty()) dirs.push_back(home + kUserDir);
  LX_ASSIGN_OR_RETURN(std::optional<std::string> main_text, ReadConf(file, named));
  if (main_text) LX_TRY(MergeRegistriesConf(*main_text, file, conf));
  for (const std::string& dir : dirs) {
    LX_ASSIGN_OR_RETURN(std::vector<std::string> drop_ins, DropIns(dir));
    for (const std::string& f : drop_ins) {
      LX_ASSIGN_OR_RETURN(std::optional<std::string> text, ReadConf(f, false));
      if (text) LX_TRY(MergeRegistriesConf(*text, f, conf, /*drop_in=*/true));
    }
  }
  if (!conf.files.empty()) {
    Logger("broker")->info("registries.conf: read {}", fmt::join(conf.files, ", "));
  }
  return conf;
}

const RegistryConfEntry* FindRegistryConf(const RegistriesConf& conf, std::string_view name) {
  const RegistryConfEntry* best = nullptr;
  size_t best_length = 0;
  for (const RegistryConfEntry& r : conf.registries) {
    // The longest prefix wins; a wildcard counts as its own length, as in
    // containers/image.
    if (MatchLength(name, r.prefix) > 0 && r.prefix.size() > best_length) {
      best = &r;
      best_length = r.prefix.size();
    }
  }
  return best;
}

std::vector<PullSource> PullSources(const RegistryConfEntry* entry, std::string_view name,
                                    bool by_digest) {
  if (entry == nullptr) return {PullSource{.name = std::string(name)}};
  const size_t matched = MatchLength(name, entry->prefix);
  auto at = [&](const RegistryEndpoint& e, bool mirror) {
    // An empty location (a "*.domain" prefix): the name as given.
    std::string rewritten =
        e.location.empty() ? std::string(name) : e.location + std::string(name.substr(matched));
    return PullSource{.name = std::move(rewritten), .insecure = e.insecure, .mirror = mirror};
  };
  std::vector<PullSource> out;
  for (const RegistryEndpoint& m : entry->mirrors) {
    bool use = true;
    if (entry->mirror_by_digest_only) {
      use = by_digest;
    } else if (m.pull_from == RegistryEndpoint::PullFrom::kDigestOnly) {
      use = by_digest;
    } else if (m.pull_from == RegistryEndpoint::PullFrom::kTagOnly) {
      use = !by_digest;
    }
    if (use) out.push_back(at(m, true));
  }
  out.push_back(at(entry->endpoint, false));
  return out;
}

}  // namespace layerx::broker
