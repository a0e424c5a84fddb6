// How a registry client gets in (registry_client.h: Ping): GET /v2/ and its
// WWW-Authenticate challenge, then Basic credentials or a Bearer token from
// the challenge's realm; a token renewed after a 401, shared among clones.
#include <openssl/crypto.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <vector>

#include "broker/source/registry_auth.h"
#include "broker/source/registry_client.h"
#include "broker/source/registry_transfer.h"

namespace layerx::broker {

using namespace registry_detail;

namespace {

constexpr size_t kMaxTokenBytes = 1024 * 1024;  // a token server's answer

// A WWW-Authenticate challenge: the scheme and its auth-params (RFC 7235), e.g.
// Bearer realm="https://auth.docker.io/token",service="registry.docker.io".
struct Challenge {
  std::string scheme;  // lowercase: "basic", "bearer"
  std::map<std::string, std::string> params;
};

Challenge ParseChallenge(std::string_view header) {
  Challenge c;
  header = Trim(header);
  size_t sp = header.find(' ');
  c.scheme = Lower(header.substr(0, sp));
  if (sp == std::string_view::npos) return c;
  std::string_view rest = header.substr(sp + 1);
  size_t i = 0;
  while (i < rest.size()) {
    while (i < rest.size() && (rest[i] == ' ' || rest[i] == ',')) ++i;
    size_t eq = rest.find('=', i);
    if (eq == std::string_view::npos) break;
    std::string key = Lower(Trim(rest.substr(i, eq - i)));
    i = eq + 1;
    std::string value;
    if (i < rest.size() && rest[i] == '"') {
      for (++i; i < rest.size() && rest[i] != '"'; ++i) {
        if (rest[i] == '\\' && i + 1 < rest.size()) ++i;
        value.push_back(rest[i]);
      }
      ++i;  // the closing quote
    } else {
      size_t end = rest.find(',', i);
      if (end == std::string_view::npos) end = rest.size();
      value = std::string(Trim(rest.substr(i, end - i)));
      i = end;
    }
    c.params[key] = value;
  }
  return c;
}

// A token for repository:REPO:pull from the realm of a Bearer `challenge`,
// asked with the Basic credentials when there are some.
Result<std::string> FetchBearerToken(RegistryClient::Impl& impl, const RegistryRef& ref,
                                     const RegistryOptions& options, const std::string& scheme,
                                     const std::string& www_authenticate) {
  const std::string what = fmt::format("registry {}", ref.registry);
  Challenge challenge = ParseChallenge(www_authenticate);
  const std::string& realm = challenge.params["realm"];
  // SECURITY: the realm is named by the registry; credentials go there only over
  // https (or plain http when the registry itself is plain http).
  if (!(realm.starts_with("https://") || (scheme == "http" && realm.starts_with("http://")))) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "{}: bearer realm {:?} is not an https URL",
                          what, realm.substr(0, 200)));
  }
  auto escape = [&](const std::string& v) {
    char* e = Curl().easy_escape(impl.curl, v.data(), static_cast<int>(v.size()));
    std::string out = e != nullptr ? e : "";
    if (e != nullptr) OPENSSL_cleanse(e, out.size());
    Curl().free(e);
    return out;  // SECURITY: the caller wipes what it escaped a secret into
  };
  // service=...&scope=repository:REPO:pull, each escaped.
  std::string params;
  if (auto it = challenge.params.find("service"); it != challenge.params.end()) {
    params = "service=" + escape(it->second) + "&";
  }
  params += "scope=" + escape(fmt::format("repository:{}:pull", ref.repository));
  const bool identity = options.credentials && !options.credentials->identity_token.empty();
  RequestRunner run(impl, options, scheme);
  RegistryClient::Impl::Request req;
  req.send_auth = false;
  req.max_body = kMaxTokenBytes;
  if (identity) {
    // The OAuth2 refresh-token grant (the distribution token spec's POST
    // /token, as containers/image sends it): the identity token in the body,
    // no Basic credentials.
    req.url = realm;
    std::string escaped = escape(options.credentials->identity_token);
    req.post_form.reserve(64 + params.size() + escaped.size());  // one buffer, wiped below
    req.post_form.append("grant_type=refresh_token&client_id=layerx&");
    req.post_form.append(params);
    req.post_form.append("&refresh_token=");
    req.post_form.append(escaped);
    WipeString(escaped);
  } else {
    req.url = realm + (realm.find('?') == std::string::npos ? "?" : "&") + params;
    req.basic_only = options.credentials.has_value();
  }
  Result<RegistryClient::Impl::Response> ran = run.Run(req);
  WipeString(req.post_form);
  LX_ASSIGN_OR_RETURN(RegistryClient::Impl::Response r, std::move(ran));
  const std::string token_what = what + " token";
  if (r.code != CURLE_OK) {
    if (r.over_limit) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "{}: answer over {} bytes", token_what,
                            kMaxTokenBytes));
    }
    return Fail(TransferError(ref, token_what, r));
  }
  if (r.status == 401 || r.status == 403 || (identity && r.status == 400)) {
    // An OAuth2 server answers the exchange with 400 and an `error` code
    // (invalid_grant: a bad refresh token); the code is its word, no secret.
    std::string code;
    if (identity) {
      nlohmann::json e = nlohmann::json::parse(r.body, nullptr, false);
      if (e.is_object() && e.contains("error") && e["error"].is_string()) {
        code = e["error"].get<std::string>();
        if (code.size() > 40 || !std::all_of(code.begin(), code.end(), [](char ch) {
              return std::islower(static_cast<unsigned char>(ch)) || ch == '_';
            })) {
          code.clear();
        }
      }
    }
    return Fail(MakeError(ErrorKind::kPolicy, "{}: unauthorized: the token server refused {}{}",
                          what,
                          identity              ? "the identity token"
                          : options.credentials ? "the user name or password"
                                                : "anonymous access",
                          code.empty() ? "" : fmt::format(" ({})", code)));
  }
  if (identity && r.status >= 300 && r.status < 400) {
    return Fail(MakeError(ErrorKind::kPolicy,
                          "{}: the token server redirected the identity token's exchange ({}): "
                          "not followed",
                          token_what, StatusText(r)));
  }
  if (r.status != 200) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "{}: answered {}", token_what, StatusText(r)));
  }
  nlohmann::json doc = nlohmann::json::parse(r.body, nullptr, false);
  WipeString(r.body);
  std::string token;
  if (doc.is_object()) {
    for (const char* key : {"token", "access_token"}) {
      auto it = doc.find(key);
      if (it != doc.end() && it->is_string() && !it->get_ref<const std::string&>().empty()) {
        token = it->get_ref<const std::string&>();
        break;
      }
    }
  }
  // What the answer held (the token, a rotated refresh token) goes wiped.
  WipeJson(doc);
  // A token goes into a header line: nothing but visible ASCII.
  if (token.empty() || token.size() > 64 * 1024 ||
      !std::all_of(token.begin(), token.end(), [](char ch) { return ch > ' ' && ch < 0x7f; })) {
    WipeString(token);
    return Fail(
        MakeError(ErrorKind::kInvalidInput, "{}: no usable token in the answer", token_what));
  }
  return token;
}

}  // namespace

Status RegistryClient::Ping() {
  if (impl_->auth != Impl::Auth::kUnknown) return {};
  // Clones wait here for the first one's answer rather than each asking.
  Impl::Shared& shared = *impl_->shared;
  std::lock_guard lock(shared.mu);
  if (shared.auth == Impl::Auth::kUnknown) {
    LX_TRY(Discover());
    shared.auth = impl_->auth;
    shared.scheme = scheme_;
    shared.bearer_token = impl_->bearer_token;
    if (impl_->auth == Impl::Auth::kBearer) ++shared.generation;
  }
  impl_->Adopt(scheme_);
  return {};
}

Status RegistryClient::Reauthenticate() {
  Impl::Shared& shared = *impl_->shared;
  std::lock_guard lock(shared.mu);
  // Another clone may have renewed it since this client took its copy: then
  // that one is tried (a Basic login has nothing to renew: it is tried again).
  if (impl_->auth == Impl::Auth::kBearer && shared.generation == impl_->generation) {
    LX_ASSIGN_OR_RETURN(std::string token,
                        FetchBearerToken(*impl_, ref_, options_, scheme_, shared.challenge));
    OPENSSL_cleanse(shared.bearer_token.data(), shared.bearer_token.size());
    shared.bearer_token = std::move(token);
    ++shared.generation;
  }
  impl_->Adopt(scheme_);
  return {};
}

Status RegistryClient::Discover() {
  const std::string what = fmt::format("registry {}", ref_.registry);
  // https first; with tls_verify=false plain http when https gets no TLS answer
  // (containers/image's detectProperties does the same).
  std::vector<std::string> schemes = {"https"};
  if (!options_.tls_verify) schemes.push_back("http");
  Impl::Response r;
  for (size_t i = 0; i < schemes.size(); ++i) {
    scheme_ = schemes[i];
    RequestRunner run(*impl_, options_, scheme_);
    Impl::Request req;
    req.url = Url(scheme_, ref_, "/v2/");
    req.send_auth = false;
    LX_ASSIGN_OR_RETURN(r, run.Run(req));
    if (r.code == CURLE_OK) break;
    // A server that asked for a client certificate speaks TLS: no plain http.
    if (i + 1 == schemes.size() || r.cancelled || r.client_cert_asked) {
      scheme_.clear();
      return Fail(TransferError(ref_, what, r));
    }
  }
  if (r.status == 200) {
    impl_->auth = Impl::Auth::kNone;
    return {};
  }
  if (r.status != 401) {
    scheme_.clear();
    return Fail(MakeError(ErrorKind::kPolicy, "{}: GET /v2/ answered {} (not a registry?)", what,
                          StatusText(r)));
  }
  impl_->shared->challenge = r.www_authenticate;
  Challenge challenge = ParseChallenge(r.www_authenticate);
  if (challenge.scheme == "basic") {
    if (options_.credentials && !options_.credentials->identity_token.empty() &&
        options_.credentials->username.empty()) {
      return Fail(MakeError(ErrorKind::kPolicy,
                            "{}: unauthorized: the registry asks for a user name and password "
                            "(Basic), and the credentials found are an identity token",
                            what));
    }
    if (!options_.credentials) {
      return Fail(MakeError(ErrorKind::kPolicy,
                            "{}: unauthorized: credentials needed (--creds or an auth file)",
                            what));
    }
    impl_->auth = Impl::Auth::kBasic;
    RequestRunner run(*impl_, options_, scheme_);
    Impl::Request req;
    req.url = Url(scheme_, ref_, "/v2/");
    LX_ASSIGN_OR_RETURN(r, run.Run(req));
    if (r.code != CURLE_OK) {
      impl_->auth = Impl::Auth::kUnknown;
      return Fail(TransferError(ref_, what, r));
    }
    if (r.status == 401 || r.status == 403) {
      impl_->auth = Impl::Auth::kUnknown;
      return Fail(
          MakeError(ErrorKind::kPolicy, "{}: unauthorized: user name or password refused", what));
    }
    if (r.status != 200) {
      impl_->auth = Impl::Auth::kUnknown;
      return Fail(MakeError(ErrorKind::kPolicy, "{}: GET /v2/ answered {}", what, StatusText(r)));
    }
    return {};
  }
  if (challenge.scheme == "bearer") {
    LX_ASSIGN_OR_RETURN(std::string token,
                        FetchBearerToken(*impl_, ref_, options_, scheme_, r.www_authenticate));
    OPENSSL_cleanse(impl_->bearer_token.data(), impl_->bearer_token.size());
    impl_->bearer_token = std::move(token);
    impl_->auth = Impl::Auth::kBearer;
    return {};
  }
  return Fail(MakeError(ErrorKind::kInvalidInput, "{}: unsupported authentication scheme {:?}",
                        what, challenge.scheme.substr(0, 40)));
}

}  // namespace layerx::broker
