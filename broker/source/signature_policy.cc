#include "broker/source/signature_policy.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdlib>
#include <nlohmann/json.hpp>
#include <set>

#include "broker/log/logging.h"
#include "broker/source/registries_conf.h"
#include "sandbox/sys.h"

namespace layerx::broker {

namespace {

constexpr const char* kSystemFile = "/etc/containers/policy.json";
constexpr const char* kUserFile = "/.config/containers/policy.json";
constexpr size_t kMaxFileBytes = 4 << 20;

using nlohmann::json;

Error PolicyError(const std::string& name, const std::string& why) {
  return Error(ErrorKind::kPolicy, 0, fmt::format("policy.json {:?}: {}", name, why));
}

// The fields each requirement type may have (containers/image rejects any other).
const std::map<std::string, std::set<std::string>>& KnownRequirements() {
  static const std::map<std::string, std::set<std::string>> known = {
      {"insecureAcceptAnything", {"type"}},
      {"reject", {"type"}},
      // Accepted in a file and never satisfied, as containers/image has it.
      {"signedBaseLayer", {"type", "baseLayerIdentity"}},
      {"signedBy", {"type", "keyType", "keyPath", "keyPaths", "keyData", "signedIdentity"}},
      {"sigstoreSigned",
       {"type", "keyPath", "keyPaths", "keyData", "keyDatas", "fulcio", "rekorPublicKeyPath",
        "rekorPublicKeyPaths", "rekorPublicKeyData", "rekorPublicKeyDatas", "pki",
        "signedIdentity"}},
  };
  return known;
}

Result<SignaturePolicy::Requirements> Requirements(const std::string& name, const json& list,
                                                   const std::string& where) {
  if (!list.is_array() || list.empty()) {
    return Fail(
        PolicyError(name, fmt::format("{}: want a non-empty array of requirements", where)));
  }
  SignaturePolicy::Requirements out;
  for (const json& r : list) {
    auto type = r.is_object() ? r.find("type") : json::const_iterator();
    if (!r.is_object() || type == r.end() || !type->is_string()) {
      return Fail(PolicyError(name, fmt::format("{}: a requirement without a \"type\"", where)));
    }
    const std::string& t = type->get_ref<const std::string&>();
    auto known = KnownRequirements().find(t);
    if (known == KnownRequirements().end()) {
      return Fail(PolicyError(
          name, fmt::format("{}: unknown requirement type {:?}", where, t.substr(0, 64))));
    }
    for (auto it = r.begin(); it != r.end(); ++it) {
      if (!known->second.contains(it.key())) {
        return Fail(PolicyError(name, fmt::format("{}: {} has an unknown field {:?}", where, t,
                                                  it.key().substr(0, 64))));
      }
    }
    out.push_back(t);
  }
  return out;
}

}  // namespace

Result<SignaturePolicy> ParseSignaturePolicy(const std::string& text, const std::string& name) {
  // Strict, as containers/image: a field given twice is refused (the JSON
  // library would keep the last one silently).
  std::vector<std::set<std::string>> keys;
  bool duplicate = false;
  json::parser_callback_t watch = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) keys.emplace_back();
    if (event == json::parse_event_t::object_end && !keys.empty()) keys.pop_back();
    if (event == json::parse_event_t::key && !keys.empty() &&
        !keys.back().insert(parsed.get<std::string>()).second) {
      duplicate = true;
    }
    return true;
  };
  json doc = json::parse(text, watch, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) return Fail(PolicyError(name, "not a JSON object"));
  if (duplicate) return Fail(PolicyError(name, "a field is given twice"));
  SignaturePolicy policy;
  policy.file = name;
  policy.present = true;
  bool has_default = false;
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    if (it.key() == "default") {
      LX_ASSIGN_OR_RETURN(policy.default_requirements, Requirements(name, *it, "default"));
      has_default = true;
    } else if (it.key() == "transports") {
      if (!it->is_object()) return Fail(PolicyError(name, "transports: want an object"));
      for (auto t = it->begin(); t != it->end(); ++t) {
        if (!t->is_object()) {
          return Fail(PolicyError(name, fmt::format("transports[{:?}]: want an object of scopes",
                                                    t.key().substr(0, 64))));
        }
        for (auto scope = t->begin(); scope != t->end(); ++scope) {
          const std::string where = fmt::format("transports[{:?}][{:?}]", t.key().substr(0, 64),
                                                scope.key().substr(0, 200));
          LX_ASSIGN_OR_RETURN(SignaturePolicy::Requirements r, Requirements(name, *scope, where));
          // Hosts are compared in lowercase (DNS and TLS do not care), so an
          // uppercase spelling of a name meets its scope.
          if (t.key() == "docker") policy.docker_scopes[LowerHost(scope.key())] = std::move(r);
        }
      }
    } else {
      return Fail(PolicyError(name, fmt::format("unknown field {:?}", it.key().substr(0, 64))));
    }
  }
  if (!has_default) return Fail(PolicyError(name, "\"default\" is missing"));
  return policy;
}

Result<SignaturePolicy> LoadSignaturePolicy(const std::string& path) {
  std::string file = path;
  if (file.empty()) {
    // Only a file that is not there is passed over: one that cannot be
    // reached (EACCES, ELOOP, EIO) could be the one that refuses.
    auto there = [](const std::string& f) -> Result<bool> {
      if (::access(f.c_str(), F_OK) == 0) return true;
      if (errno == ENOENT || errno == ENOTDIR) return false;
      return Fail(
          Error(ErrorKind::kPolicy, 0, fmt::format("policy.json {:?}: {}", f, ErrnoName(errno))));
    };
    const std::string home = ConfigHome();
    bool user = false;
    if (!home.empty()) {
      LX_ASSIGN_OR_RETURN(user, there(home + kUserFile));
    }
    LX_ASSIGN_OR_RETURN(bool system, there(kSystemFile));
    if (user) {
      file = home + kUserFile;
    } else if (system) {
      file = kSystemFile;
    } else {
      Logger("broker")->info("policy.json: none ({} is not there): every image is accepted",
                             kSystemFile);
      return SignaturePolicy{};
    }
  }
  auto text = sandbox::ReadRegularFile(file, kMaxFileBytes);
  if (!text) return Fail(Error(ErrorKind::kPolicy, 0, "policy.json: " + text.error().ToString()));
  Logger("broker")->info("policy.json: {}", file);
  return ParseSignaturePolicy(*text, file);
}

std::vector<std::string> PolicyScopes(const RegistryRef& ref) {
  // The host in lowercase; docker.io's other names (index., registry-1.) are
  // docker.io here, as everywhere in layerx (so scopes name it docker.io).
  const std::string registry = NormalizeRegistry(LowerHost(ref.registry));
  std::vector<std::string> scopes;
  scopes.push_back(fmt::format("{}/{}{}{}", registry, ref.repository,
                               ref.digest.empty() ? ":" : "@",
                               ref.digest.empty() ? ref.tag : ref.digest));
  // The repository, each namespace above it, the registry.
  std::string name = registry + "/" + ref.repository;
  for (;;) {
    scopes.push_back(name);
    size_t slash = name.rfind('/');
    if (slash == std::string::npos) break;
    name.resize(slash);
  }
  // "*.DOMAIN" of the host, without its port, shortest last.
  if (size_t colon = name.find(':'); colon != std::string::npos) name.resize(colon);
  for (size_t dot = name.find('.'); dot != std::string::npos; dot = name.find('.')) {
    name.erase(0, dot + 1);
    scopes.push_back("*." + name);
  }
  return scopes;
}

Status CheckSignaturePolicy(const SignaturePolicy& policy, const RegistryRef& ref) {
  if (!policy.present) return {};
  const SignaturePolicy::Requirements* requirements = &policy.default_requirements;
  std::string scope = "default";
  bool found = false;
  for (const std::string& s : PolicyScopes(ref)) {
    if (auto it = policy.docker_scopes.find(s); it != policy.docker_scopes.end()) {
      requirements = &it->second;
      scope = fmt::format("transports.docker[{:?}]", s);
      found = true;
      break;
    }
  }
  if (!found) {
    if (auto it = policy.docker_scopes.find(""); it != policy.docker_scopes.end()) {
      requirements = &it->second;
      scope = "transports.docker[\"\"]";
    }
  }
  for (const std::string& type : *requirements) {
    if (type == "insecureAcceptAnything") continue;
    if (type == "reject") {
      return Fail(MakeError(ErrorKind::kRefused, "docker://{}: rejected by policy.json {:?} ({})",
                            ref.ToString(), policy.file, scope));
    }
    return Fail(MakeError(ErrorKind::kRefused,
                          "docker://{}: policy.json {:?} ({}) wants it {}, and layerx does not "
                          "verify signatures yet: refused",
                          ref.ToString(), policy.file, scope, type));
  }
  return {};
}

}  // namespace layerx::broker
