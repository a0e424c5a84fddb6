#include "broker/registry_client.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>

#include "broker/source.h"
#include "extractor/digest.h"
#include "sandbox/sys.h"

namespace layerx::broker {
namespace {

constexpr long kMaxRedirects = 5;
constexpr size_t kMaxErrorBody = 64 * 1024;      // kept of a non-2xx answer (and no more read)
constexpr size_t kMaxTokenBytes = 1024 * 1024;    // a token server's answer
constexpr uint64_t kMaxCertFileBytes = 1024 * 1024;
constexpr const char* kUserAgent = "layerx";

constexpr std::string_view kOciManifest = "application/vnd.oci.image.manifest.v1+json";
constexpr std::string_view kOciIndex = "application/vnd.oci.image.index.v1+json";
constexpr std::string_view kDockerManifest =
    "application/vnd.docker.distribution.manifest.v2+json";
constexpr std::string_view kDockerList =
    "application/vnd.docker.distribution.manifest.list.v2+json";

void GlobalInit() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

std::string Lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' ||
                        s.back() == '\n')) {
    s.remove_suffix(1);
  }
  return s;
}

// "application/json; charset=utf-8" -> "application/json"
std::string BareMediaType(std::string_view content_type) {
  return Lower(Trim(content_type.substr(0, content_type.find(';'))));
}

bool IsSchema1(std::string_view media_type) {
  return media_type == "application/vnd.docker.distribution.manifest.v1+json" ||
         media_type == "application/vnd.docker.distribution.manifest.v1+prettyjws";
}

bool IsAccepted(std::string_view media_type) {
  return media_type == kOciManifest || media_type == kOciIndex || media_type == kDockerManifest ||
         media_type == kDockerList;
}

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

// The bytes of a small regular file below `dir` (a cert); kPolicy naming it otherwise.
Result<std::string> ReadCertFile(int dir, const std::string& dir_name, const std::string& name) {
  auto fd = sandbox::OpenRegularFile(dir, name, 0);
  if (!fd) return Fail(std::move(fd.error()).With("cert dir {:?}", dir_name));
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(fd->get()));
  if (static_cast<uint64_t>(st.st_size) > kMaxCertFileBytes) {
    return Fail(MakeError(ErrorKind::kPolicy, "cert dir {:?}: {:?} is over {} bytes", dir_name,
                          name, kMaxCertFileBytes));
  }
  std::string out(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < out.size()) {
    LX_ASSIGN_OR_RETURN(size_t n, sandbox::ReadSome(fd->get(), std::as_writable_bytes(
                                                                    std::span(out)).subspan(done)));
    if (n == 0) break;
    done += n;
  }
  out.resize(done);
  return out;
}

// How many PEM certificates `pem` holds.
int CountCerts(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  if (bio == nullptr) return 0;
  int n = 0;
  while (X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) {
    X509_free(x);
    ++n;
  }
  ERR_clear_error();  // the last read's "no start line"
  BIO_free(bio);
  return n;
}

// CURLOPT_SSL_CTX_FUNCTION: adds the cert dir's CAs to the store curl loaded
// the system CAs into (skopeo adds them to the system pool the same way).
CURLcode AddCertDirCas(CURL*, void* ssl_ctx, void* user) {
  const auto* pem = static_cast<const std::string*>(user);
  X509_STORE* store = SSL_CTX_get_cert_store(static_cast<SSL_CTX*>(ssl_ctx));
  BIO* bio = BIO_new_mem_buf(pem->data(), static_cast<int>(pem->size()));
  if (bio == nullptr || store == nullptr) return CURLE_SSL_CERTPROBLEM;
  while (X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) {
    X509_STORE_add_cert(store, x);  // a duplicate is not an error worth failing on
    X509_free(x);
  }
  ERR_clear_error();
  BIO_free(bio);
  return CURLE_OK;
}

bool IsTlsError(CURLcode code) {
  switch (code) {
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
      return true;
    default:
      return false;
  }
}

}  // namespace

struct RegistryClient::Impl {
  CURL* curl = nullptr;
  std::string cert_dir_pem;  // every *.crt of cert_dir, concatenated
  enum class Auth { kUnknown, kNone, kBasic, kBearer } auth = Auth::kUnknown;
  std::string bearer_token;  // SECURITY: a secret; never logged or put in an Error

  ~Impl() {
    if (curl != nullptr) curl_easy_cleanup(curl);
    OPENSSL_cleanse(bearer_token.data(), bearer_token.size());
  }

  struct Request {
    std::string url;
    std::string accept;
    bool send_auth = true;
    bool basic_only = false;  // the token request: Basic credentials, never the token
    size_t max_body = kMaxErrorBody;
    // The 2xx body, streamed; an error stops the transfer and is returned as is.
    std::function<Status(std::span<const char>)> sink;
  };
  struct Response {
    long status = 0;
    CURLcode code = CURLE_OK;
    std::string curl_error;  // curl's error buffer: names hosts and reasons, no secrets
    std::string body;        // the body when there is no sink (or the answer was not 2xx)
    std::string content_type;
    std::string www_authenticate;  // the first challenge
    std::string scheme;            // of the last URL (after redirects)
    bool over_limit = false;
    std::optional<Error> sink_error;
  };

  struct Transfer {
    Impl* impl;
    const Request* request;
    Response* response;
  };

  static size_t OnHeader(char* data, size_t size, size_t n, void* user) {
    auto* t = static_cast<Transfer*>(user);
    std::string_view line(data, size * n);
    if (line.starts_with("HTTP/")) {  // a new response (after a redirect or 100): start over
      t->response->content_type.clear();
      t->response->www_authenticate.clear();
      return size * n;
    }
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) return size * n;
    std::string name = Lower(Trim(line.substr(0, colon)));
    std::string_view value = Trim(line.substr(colon + 1));
    if (name == "content-type") t->response->content_type = std::string(value);
    if (name == "www-authenticate" && t->response->www_authenticate.empty()) {
      t->response->www_authenticate = std::string(value);
    }
    return size * n;
  }

  static size_t OnData(char* data, size_t size, size_t n, void* user) {
    auto* t = static_cast<Transfer*>(user);
    const size_t len = size * n;
    long status = 0;
    curl_easy_getinfo(t->impl->curl, CURLINFO_RESPONSE_CODE, &status);
    const bool ok = status >= 200 && status < 300;
    if (ok && t->request->sink) {
      Status s = t->request->sink(std::span<const char>(data, len));
      if (!s) {
        t->response->sink_error = std::move(s.error());
        return 0;  // CURLE_WRITE_ERROR
      }
      return len;
    }
    const size_t cap = ok ? t->request->max_body : kMaxErrorBody;
    if (t->response->body.size() + len > cap) {
      t->response->over_limit = true;
      return 0;
    }
    t->response->body.append(data, len);
    return len;
  }
};

RegistryClient::RegistryClient(RegistryRef ref, RegistryOptions options)
    : ref_(std::move(ref)), options_(std::move(options)), impl_(std::make_unique<Impl>()) {}

RegistryClient::~RegistryClient() = default;

Result<std::unique_ptr<RegistryClient>> RegistryClient::Create(RegistryRef ref,
                                                               RegistryOptions options) {
  GlobalInit();
  std::unique_ptr<RegistryClient> c(new RegistryClient(std::move(ref), std::move(options)));
  if (!c->options_.cert_dir.empty() && c->options_.tls_verify) {
    const std::string& dir_name = c->options_.cert_dir;
    auto dir = sandbox::OpenAt(AT_FDCWD, dir_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (!dir) {
      return Fail(Error(ErrorKind::kPolicy, dir.error().err(),
                        fmt::format("cert dir {:?}: {}", dir_name, dir.error().ToString())));
    }
    LX_ASSIGN_OR_RETURN(std::vector<std::string> names, sandbox::ListDir(dir->get()));
    std::sort(names.begin(), names.end());
    for (const std::string& name : names) {
      if (!name.ends_with(".crt")) continue;  // *.cert/*.key are client certs: not used yet
      LX_ASSIGN_OR_RETURN(std::string pem, ReadCertFile(dir->get(), dir_name, name));
      if (CountCerts(pem) == 0) {
        return Fail(MakeError(ErrorKind::kPolicy, "cert dir {:?}: {:?} holds no PEM certificate",
                              dir_name, name));
      }
      c->impl_->cert_dir_pem += pem;
      c->impl_->cert_dir_pem += "\n";
    }
  }
  c->impl_->curl = curl_easy_init();
  if (c->impl_->curl == nullptr) return Fail(MakeError(ErrorKind::kInternal, "curl_easy_init"));
  return c;
}

namespace {

// Sets every option of one GET on a handle just reset (a reset keeps the
// connection cache, so requests to one registry share connections).
struct Setup {
  CURL* curl;
  CURLcode first = CURLE_OK;
  template <typename T>
  void Set(CURLoption option, T value) {
    CURLcode rc = curl_easy_setopt(curl, option, value);
    if (rc != CURLE_OK && first == CURLE_OK) first = rc;
  }
};

}  // namespace

// One GET, redirects followed; curl errors and HTTP statuses come back in the
// Response, only setup failures as errors.
class RequestRunner {
 public:
  RequestRunner(RegistryClient::Impl& impl, const RegistryOptions& options,
                const std::string& scheme)
      : impl_(impl), options_(options), scheme_(scheme) {}

  Result<RegistryClient::Impl::Response> Run(const RegistryClient::Impl::Request& request) {
    CURL* curl = impl_.curl;
    curl_easy_reset(curl);
    RegistryClient::Impl::Response response;
    RegistryClient::Impl::Transfer transfer{&impl_, &request, &response};
    char error_buffer[CURL_ERROR_SIZE] = {0};
    struct curl_slist* headers = nullptr;
    std::string accept_header;
    std::string auth_header;
    Setup s{curl};
    s.Set(CURLOPT_URL, request.url.c_str());
    s.Set(CURLOPT_NOSIGNAL, 1L);
    s.Set(CURLOPT_ERRORBUFFER, error_buffer);
    s.Set(CURLOPT_USERAGENT, kUserAgent);
    // The first URL is the registry's (or the token realm's) and of the scheme
    // Ping settled on; redirects go to https only, unless the registry is plain http.
    s.Set(CURLOPT_PROTOCOLS_STR, "http,https");
    s.Set(CURLOPT_REDIR_PROTOCOLS_STR, scheme_ == "http" ? "http,https" : "https");
    s.Set(CURLOPT_FOLLOWLOCATION, 1L);
    s.Set(CURLOPT_MAXREDIRS, kMaxRedirects);
    s.Set(CURLOPT_CONNECTTIMEOUT_MS, options_.connect_timeout_ms);
    if (options_.low_speed_seconds > 0) {
      s.Set(CURLOPT_LOW_SPEED_LIMIT, 1L);
      s.Set(CURLOPT_LOW_SPEED_TIME, options_.low_speed_seconds);
    }
    if (options_.total_timeout_ms > 0) s.Set(CURLOPT_TIMEOUT_MS, options_.total_timeout_ms);
    if (!options_.tls_verify) {
      s.Set(CURLOPT_SSL_VERIFYPEER, 0L);
      s.Set(CURLOPT_SSL_VERIFYHOST, 0L);
    } else if (!impl_.cert_dir_pem.empty()) {
      s.Set(CURLOPT_SSL_CTX_FUNCTION, &AddCertDirCas);
      s.Set(CURLOPT_SSL_CTX_DATA, static_cast<void*>(&impl_.cert_dir_pem));
#if LIBCURL_VERSION_NUM >= 0x075700  // 7.87: the CA store would be cached with our CAs in it
      s.Set(CURLOPT_CA_CACHE_TIMEOUT, 0L);
#endif
    }
    s.Set(CURLOPT_HEADERFUNCTION, &RegistryClient::Impl::OnHeader);
    s.Set(CURLOPT_HEADERDATA, static_cast<void*>(&transfer));
    s.Set(CURLOPT_WRITEFUNCTION, &RegistryClient::Impl::OnData);
    s.Set(CURLOPT_WRITEDATA, static_cast<void*>(&transfer));
    if (!request.accept.empty()) {
      accept_header = "Accept: " + request.accept;
      headers = curl_slist_append(headers, accept_header.c_str());
    }
    // SECURITY: curl sends CURLOPT_USERNAME/PASSWORD and a custom Authorization
    // header only to the host of the first URL, never to a host a redirect leads to
    // (CURLOPT_UNRESTRICTED_AUTH stays off; curl >= 7.58 drops the custom header).
    const bool basic = request.basic_only ||
                       (request.send_auth && impl_.auth == RegistryClient::Impl::Auth::kBasic);
    if (basic && options_.credentials) {
      s.Set(CURLOPT_HTTPAUTH, static_cast<long>(CURLAUTH_BASIC));
      s.Set(CURLOPT_USERNAME, options_.credentials->username.c_str());
      s.Set(CURLOPT_PASSWORD, options_.credentials->password.c_str());
    } else if (request.send_auth && impl_.auth == RegistryClient::Impl::Auth::kBearer) {
      auth_header = "Authorization: Bearer " + impl_.bearer_token;
      headers = curl_slist_append(headers, auth_header.c_str());
    }
    if (headers != nullptr) s.Set(CURLOPT_HTTPHEADER, headers);
    CURLcode rc = s.first;
    if (rc == CURLE_OK) rc = curl_easy_perform(curl);
    curl_slist_free_all(headers);
    OPENSSL_cleanse(auth_header.data(), auth_header.size());
    if (s.first != CURLE_OK) {
      return Fail(MakeError(ErrorKind::kInternal, "curl_easy_setopt: {}",
                            curl_easy_strerror(s.first)));
    }
    response.code = rc;
    response.curl_error = error_buffer;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response.status);
    char* scheme = nullptr;
    if (curl_easy_getinfo(curl, CURLINFO_SCHEME, &scheme) == CURLE_OK && scheme != nullptr) {
      response.scheme = Lower(scheme);
    }
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, nullptr);  // error_buffer goes out of scope
    return response;
  }

 private:
  RegistryClient::Impl& impl_;
  const RegistryOptions& options_;
  const std::string& scheme_;
};

namespace {

std::string Url(const std::string& scheme, const RegistryRef& ref, const std::string& path) {
  return fmt::format("{}://{}{}", scheme, ref.host, path);
}

// A curl failure (no HTTP answer, or a transfer cut short) as one line.
Error TransferError(const RegistryRef& ref, const std::string& what,
                    const RegistryClient::Impl::Response& r) {
  if (IsTlsError(r.code)) {
    return Error(ErrorKind::kPolicy, 0,
                 fmt::format("{}: TLS with {} failed: {}", what, ref.host,
                             r.curl_error.empty() ? curl_easy_strerror(r.code) : r.curl_error));
  }
  ErrorKind kind = ErrorKind::kOs;
  if (r.code == CURLE_TOO_MANY_REDIRECTS || r.code == CURLE_UNSUPPORTED_PROTOCOL) {
    kind = ErrorKind::kInvalidInput;  // a redirect loop, or one to plain http
  }
  return Error(kind, 0,
               fmt::format("{}: {}", what,
                           r.curl_error.empty() ? curl_easy_strerror(r.code) : r.curl_error));
}

// The registry's own words for a 4xx/5xx ({"errors":[{"code":..,"message":..}]}),
// shortened, or the status alone.
std::string StatusText(const RegistryClient::Impl::Response& r) {
  nlohmann::json doc = nlohmann::json::parse(r.body, nullptr, false);
  if (!doc.is_discarded() && doc.is_object() && doc.contains("errors") &&
      doc["errors"].is_array() && !doc["errors"].empty() && doc["errors"][0].is_object()) {
    const auto& e = doc["errors"][0];
    std::string code = e.value("code", std::string());
    std::string message = e.value("message", std::string());
    if (message.size() > 200) message.resize(200);
    return fmt::format("HTTP {} {:?} {:?}", r.status, code, message);
  }
  return fmt::format("HTTP {}", r.status);
}

}  // namespace

Status RegistryClient::Ping() {
  if (impl_->auth != Impl::Auth::kUnknown) return {};
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
    if (i + 1 == schemes.size()) {
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
  Challenge challenge = ParseChallenge(r.www_authenticate);
  if (challenge.scheme == "basic") {
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
      return Fail(MakeError(ErrorKind::kPolicy,
                            "{}: unauthorized: user name or password refused", what));
    }
    if (r.status != 200) {
      impl_->auth = Impl::Auth::kUnknown;
      return Fail(MakeError(ErrorKind::kPolicy, "{}: GET /v2/ answered {}", what, StatusText(r)));
    }
    return {};
  }
  if (challenge.scheme == "bearer") {
    const std::string& realm = challenge.params["realm"];
    // SECURITY: the realm is named by the registry; credentials go there only over
    // https (or plain http when the registry itself is plain http).
    if (!(realm.starts_with("https://") || (scheme_ == "http" && realm.starts_with("http://")))) {
      return Fail(MakeError(ErrorKind::kInvalidInput,
                            "{}: bearer realm {:?} is not an https URL", what,
                            realm.substr(0, 200)));
    }
    std::string url = realm + (realm.find('?') == std::string::npos ? "?" : "&");
    auto escape = [&](const std::string& v) {
      char* e = curl_easy_escape(impl_->curl, v.data(), static_cast<int>(v.size()));
      std::string out = e != nullptr ? e : "";
      curl_free(e);
      return out;
    };
    bool first = true;
    if (auto it = challenge.params.find("service"); it != challenge.params.end()) {
      url += "service=" + escape(it->second);
      first = false;
    }
    url += std::string(first ? "" : "&") + "scope=" +
           escape(fmt::format("repository:{}:pull", ref_.repository));
    RequestRunner run(*impl_, options_, scheme_);
    Impl::Request req;
    req.url = url;
    req.send_auth = false;
    req.basic_only = options_.credentials.has_value();
    req.max_body = kMaxTokenBytes;
    LX_ASSIGN_OR_RETURN(r, run.Run(req));
    const std::string token_what = what + " token";
    if (r.code != CURLE_OK) {
      if (r.over_limit) {
        return Fail(MakeError(ErrorKind::kLimitExceeded, "{}: answer over {} bytes", token_what,
                              kMaxTokenBytes));
      }
      return Fail(TransferError(ref_, token_what, r));
    }
    if (r.status == 401 || r.status == 403) {
      return Fail(MakeError(ErrorKind::kPolicy,
                            "{}: unauthorized: the token server refused {}", what,
                            options_.credentials ? "the user name or password" : "anonymous access"));
    }
    if (r.status != 200) {
      return Fail(MakeError(ErrorKind::kInvalidInput, "{}: answered {}", token_what, StatusText(r)));
    }
    nlohmann::json doc = nlohmann::json::parse(r.body, nullptr, false);
    OPENSSL_cleanse(r.body.data(), r.body.size());
    std::string token;
    if (doc.is_object()) {
      for (const char* key : {"token", "access_token"}) {
        if (doc.contains(key) && doc[key].is_string() && !doc[key].get<std::string>().empty()) {
          token = doc[key].get<std::string>();
          break;
        }
      }
    }
    // A token goes into a header line: nothing but visible ASCII.
    if (token.empty() || token.size() > 64 * 1024 ||
        !std::all_of(token.begin(), token.end(), [](char ch) { return ch > ' ' && ch < 0x7f; })) {
      return Fail(MakeError(ErrorKind::kInvalidInput, "{}: no usable token in the answer",
                            token_what));
    }
    impl_->bearer_token = std::move(token);
    impl_->auth = Impl::Auth::kBearer;
    return {};
  }
  return Fail(MakeError(ErrorKind::kInvalidInput, "{}: unsupported authentication scheme {:?}",
                        what, challenge.scheme.substr(0, 40)));
}

Result<RegistryManifest> RegistryClient::GetManifest(const std::string& reference) {
  const bool by_digest = reference.starts_with("sha256:");
  const std::string what = fmt::format("manifest {}/{}{}{}", ref_.registry, ref_.repository,
                                       by_digest ? "@" : ":", reference);
  if (by_digest ? !IsValidDigest(reference) : reference.empty()) {
    return Fail(MakeError(ErrorKind::kPolicy, "{}: bad reference", what));
  }
  LX_TRY(Ping());
  Impl::Request req;
  req.url = Url(scheme_, ref_, fmt::format("/v2/{}/manifests/{}", ref_.repository, reference));
  req.accept = fmt::format("{}, {}, {}, {}", kOciManifest, kOciIndex, kDockerManifest, kDockerList);
  req.max_body = kMaxManifestBytes;
  RequestRunner run(*impl_, options_, scheme_);
  LX_ASSIGN_OR_RETURN(Impl::Response r, run.Run(req));
  if (r.over_limit && r.status >= 200 && r.status < 300) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "{}: over {} bytes", what, kMaxManifestBytes));
  }
  if (r.code != CURLE_OK) return Fail(TransferError(ref_, what, r));
  if (r.status == 401 || r.status == 403) {
    return Fail(MakeError(ErrorKind::kPolicy, "{}: unauthorized ({})", what, StatusText(r)));
  }
  if (r.status == 404) {
    return Fail(MakeError(ErrorKind::kPolicy, "{}: not found ({})", what, StatusText(r)));
  }
  if (r.status != 200) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "{}: answered {}", what, StatusText(r)));
  }
  RegistryManifest m;
  m.bytes = std::move(r.body);
  extractor::Sha256 sha;
  sha.Update(m.bytes.data(), m.bytes.size());
  m.digest = sha.Finish();
  if (by_digest && m.digest != reference) {
    return Fail(MakeError(ErrorKind::kIntegrity, "{}: content has digest {}", what, m.digest));
  }
  std::string media_type = BareMediaType(r.content_type);
  if (!IsAccepted(media_type) && !IsSchema1(media_type)) {
    // Some registries answer application/json: the document says what it is.
    nlohmann::json doc = nlohmann::json::parse(m.bytes, nullptr, false);
    if (doc.is_object() && doc.contains("schemaVersion") && doc["schemaVersion"] == 1) {
      media_type = "application/vnd.docker.distribution.manifest.v1+json";
    } else if (doc.is_object() && doc.contains("mediaType") && doc["mediaType"].is_string()) {
      media_type = doc["mediaType"].get<std::string>();
    }
  }
  if (IsSchema1(media_type)) {
    return Fail(MakeError(ErrorKind::kPolicy,
                          "{}: Docker schema 1 manifests are not supported (push the image again "
                          "with a current client)",
                          what));
  }
  if (!IsAccepted(media_type)) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "{}: unsupported media type {:?}", what,
                          media_type.substr(0, 100)));
  }
  m.media_type = std::move(media_type);
  return m;
}

Result<uint64_t> RegistryClient::GetBlob(const std::string& digest, std::optional<uint64_t> size,
                                         const std::function<Status(std::span<const char>)>& sink) {
  const std::string what = fmt::format("blob {}", digest);
  if (!IsValidDigest(digest)) {
    return Fail(MakeError(ErrorKind::kPolicy, "blob {:?}: not a sha256 digest", digest.substr(0, 80)));
  }
  LX_TRY(Ping());
  extractor::Sha256 sha;
  uint64_t seen = 0;
  Impl::Request req;
  req.url = Url(scheme_, ref_, fmt::format("/v2/{}/blobs/{}", ref_.repository, digest));
  req.sink = [&](std::span<const char> bytes) -> Status {
    seen += bytes.size();
    if (size && seen > *size) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "{}: more than the {} bytes the manifest says",
                            what, *size));
    }
    sha.Update(bytes.data(), bytes.size());
    return sink(bytes);
  };
  RequestRunner run(*impl_, options_, scheme_);
  LX_ASSIGN_OR_RETURN(Impl::Response r, run.Run(req));
  if (r.sink_error) return Fail(std::move(*r.sink_error));
  if (r.code != CURLE_OK) return Fail(TransferError(ref_, what, r));
  if (r.status == 401 || r.status == 403) {
    return Fail(MakeError(ErrorKind::kPolicy, "{}: unauthorized ({})", what, StatusText(r)));
  }
  if (r.status != 200) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "{}: answered {}", what, StatusText(r)));
  }
  if (size && seen != *size) {
    return Fail(MakeError(ErrorKind::kIntegrity, "{}: {} bytes, the manifest says {}", what, seen,
                          *size));
  }
  std::string got = sha.Finish();
  if (got != digest) {
    return Fail(MakeError(ErrorKind::kIntegrity, "{}: content has digest {}", what, got));
  }
  return seen;
}

}  // namespace layerx::broker
