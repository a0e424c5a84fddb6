#include "broker/source/registry_client.h"

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
#include <charconv>
#include <chrono>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "broker/log/logging.h"
#include "broker/source/source.h"
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
  enum class Auth { kUnknown, kNone, kBasic, kBearer };

  // What Ping learned, shared by a client and its clones under `mu`.
  struct Shared {
    std::mutex mu;
    Auth auth = Auth::kUnknown;  // kUnknown until a Ping succeeded
    std::string scheme;
    std::string challenge;     // /v2/'s WWW-Authenticate: where a new token comes from
    std::string bearer_token;  // SECURITY: a secret; never logged or put in an Error
    uint64_t generation = 0;   // counts the tokens fetched, so a clone sees a newer one

    ~Shared() { OPENSSL_cleanse(bearer_token.data(), bearer_token.size()); }
  };

  CURL* curl = nullptr;
  // Runs `curl` (see RequestRunner::Perform) and keeps the connections it opened.
  CURLM* multi = nullptr;
  std::string cert_dir_pem;  // every *.crt of cert_dir, concatenated
  std::shared_ptr<Shared> shared = std::make_shared<Shared>();
  // This client's copy of `shared`'s, taken under its lock; requests read it without one.
  Auth auth = Auth::kUnknown;
  std::string bearer_token;  // SECURITY: a secret; never logged or put in an Error
  uint64_t generation = 0;

  ~Impl() {
    if (curl != nullptr) curl_easy_cleanup(curl);
    if (multi != nullptr) curl_multi_cleanup(multi);
    OPENSSL_cleanse(bearer_token.data(), bearer_token.size());
  }

  Status InitHandles() {
    curl = curl_easy_init();
    multi = curl_multi_init();
    if (curl == nullptr || multi == nullptr) {
      return Fail(MakeError(ErrorKind::kInternal, "curl_easy_init/curl_multi_init"));
    }
    return {};
  }

  // Takes `shared`'s state (its lock held).
  void Adopt(std::string& scheme) {
    auth = shared->auth;
    OPENSSL_cleanse(bearer_token.data(), bearer_token.size());
    bearer_token = shared->bearer_token;
    generation = shared->generation;
    scheme = shared->scheme;
  }

  struct Response {
    long status = 0;
    CURLcode code = CURLE_OK;
    std::string curl_error;  // curl's error buffer: names hosts and reasons, no secrets
    std::string body;        // the body when there is no sink (or the answer was not 2xx)
    std::string content_type;
    std::string content_range;
    std::string www_authenticate;  // the first challenge
    std::string scheme;            // of the last URL (after redirects)
    bool over_limit = false;
    bool body_started = false;  // on_body was called
    bool cancelled = false;     // options.cancel was set
    bool stalled = false;       // no byte for low_speed_seconds
    std::optional<Error> sink_error;
  };
  struct Request {
    std::string url;
    std::string accept;
    bool send_auth = true;
    bool basic_only = false;  // the token request: Basic credentials, never the token
    size_t max_body = kMaxErrorBody;
    uint64_t range_from = 0;  // > 0: "Range: bytes=range_from-"
    // Called once, before the first byte of a 2xx body goes to `sink` (the
    // status and headers are known then); an error stops the transfer.
    std::function<Status(const Response&)> on_body;
    // The 2xx body, streamed; an error stops the transfer and is returned as is.
    std::function<Status(std::span<const char>)> sink;
  };

  struct Transfer {
    Impl* impl;
    const RegistryOptions* options;
    const Request* request;
    Response* response;
    // When the last byte came, or the sink gave control back (a sink that blocks
    // is not a stalled transfer), or the request started.
    std::chrono::steady_clock::time_point last_byte;

    // Whether the transfer must stop now: cancelled, or nothing for low_speed_seconds.
    bool ShouldStop() {
      if (options->cancel != nullptr && options->cancel->load()) {
        response->cancelled = true;
        return true;
      }
      if (options->low_speed_seconds > 0 && std::chrono::steady_clock::now() - last_byte >=
                                                std::chrono::seconds(options->low_speed_seconds)) {
        response->stalled = true;
        return true;
      }
      return false;
    }
  };

  static size_t OnHeader(char* data, size_t size, size_t n, void* user) {
    auto* t = static_cast<Transfer*>(user);
    t->last_byte = std::chrono::steady_clock::now();
    std::string_view line(data, size * n);
    if (line.starts_with("HTTP/")) {  // a new response (after a redirect or 100): start over
      t->response->content_type.clear();
      t->response->content_range.clear();
      t->response->www_authenticate.clear();
      return size * n;
    }
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) return size * n;
    std::string name = Lower(Trim(line.substr(0, colon)));
    std::string_view value = Trim(line.substr(colon + 1));
    if (name == "content-type") t->response->content_type = std::string(value);
    if (name == "content-range") t->response->content_range = std::string(value);
    if (name == "www-authenticate" && t->response->www_authenticate.empty()) {
      t->response->www_authenticate = std::string(value);
    }
    return size * n;
  }

  static size_t OnData(char* data, size_t size, size_t n, void* user) {
    auto* t = static_cast<Transfer*>(user);
    const size_t len = size * n;
    t->last_byte = std::chrono::steady_clock::now();
    curl_easy_getinfo(t->impl->curl, CURLINFO_RESPONSE_CODE, &t->response->status);
    const bool ok = t->response->status >= 200 && t->response->status < 300;
    if (ok && t->request->sink) {
      if (!t->response->body_started) {
        t->response->body_started = true;
        if (t->request->on_body) {
          Status s = t->request->on_body(*t->response);
          if (!s) {
            t->response->sink_error = std::move(s.error());
            return 0;  // CURLE_WRITE_ERROR
          }
        }
      }
      Status s = t->request->sink(std::span<const char>(data, len));
      t->last_byte = std::chrono::steady_clock::now();
      if (!s) {
        t->response->sink_error = std::move(s.error());
        return 0;
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

  // CURLOPT_XFERINFOFUNCTION: non-zero aborts (CURLE_ABORTED_BY_CALLBACK).
  static int OnProgress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
    return static_cast<Transfer*>(user)->ShouldStop() ? 1 : 0;
  }

  // One GET of `client` with its retries (see the header): `prepare` adjusts the
  // request before each attempt (a blob's Range). Returns the answer to act on,
  // or an error for a cancel, a sink's error or retries exhausted.
  static Result<Response> Fetch(RegistryClient& client, const std::string& what, Request& request,
                                const std::function<void(Request&)>& prepare);
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
  LX_TRY(c->impl_->InitHandles());
  return c;
}

Result<std::unique_ptr<RegistryClient>> RegistryClient::Clone() const {
  return Clone(options_.cancel);
}

Result<std::unique_ptr<RegistryClient>> RegistryClient::Clone(
    const std::atomic<bool>* cancel) const {
  RegistryOptions options = options_;
  options.cancel = cancel;
  std::unique_ptr<RegistryClient> c(new RegistryClient(ref_, std::move(options)));
  // Both are set once, before any clone exists: reading them here needs no lock.
  c->impl_->cert_dir_pem = impl_->cert_dir_pem;
  c->impl_->shared = impl_->shared;
  LX_TRY(c->impl_->InitHandles());
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

// How long curl may wait for the network between two looks at the cancel flag
// and the stall clock.
constexpr int kPollMs = 100;
constexpr long kMaxBackoffMs = 60'000;

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
    RegistryClient::Impl::Transfer transfer{&impl_, &options_, &request, &response,
                                            std::chrono::steady_clock::now()};
    char error_buffer[CURL_ERROR_SIZE] = {0};
    struct curl_slist* headers = nullptr;
    std::string accept_header;
    std::string auth_header;
    std::string range;
    Setup s{curl};
    s.Set(CURLOPT_URL, request.url.c_str());
    s.Set(CURLOPT_NOSIGNAL, 1L);
    // Bigger reads from the socket: a tenth of the receive calls and callbacks
    // of curl's 16 KiB default for a blob.
    s.Set(CURLOPT_BUFFERSIZE, 512L * 1024);
    s.Set(CURLOPT_ERRORBUFFER, error_buffer);
    s.Set(CURLOPT_USERAGENT, kUserAgent);
    // The first URL is the registry's (or the token realm's) and of the scheme
    // Ping settled on; redirects go to https only, unless the registry is plain http.
    s.Set(CURLOPT_PROTOCOLS_STR, "http,https");
    s.Set(CURLOPT_REDIR_PROTOCOLS_STR, scheme_ == "http" ? "http,https" : "https");
    s.Set(CURLOPT_FOLLOWLOCATION, 1L);
    s.Set(CURLOPT_MAXREDIRS, kMaxRedirects);
    s.Set(CURLOPT_CONNECTTIMEOUT_MS, options_.connect_timeout_ms);
    // Not CURLOPT_LOW_SPEED_*: curl's clock runs while the write callback
    // blocks, and our sink may block for minutes on a full spool. Our own
    // clock (Transfer::ShouldStop) restarts when the sink returns.
    s.Set(CURLOPT_NOPROGRESS, 0L);
    s.Set(CURLOPT_XFERINFOFUNCTION, &RegistryClient::Impl::OnProgress);
    s.Set(CURLOPT_XFERINFODATA, static_cast<void*>(&transfer));
    if (options_.total_timeout_ms > 0) s.Set(CURLOPT_TIMEOUT_MS, options_.total_timeout_ms);
    if (request.range_from > 0) {
      // Sent after a redirect too: the storage backend serves the range.
      range = fmt::format("{}-", request.range_from);
      s.Set(CURLOPT_RANGE, range.c_str());
    }
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
    Result<CURLcode> rc = s.first;
    if (s.first == CURLE_OK) rc = Perform(transfer);
    curl_slist_free_all(headers);
    OPENSSL_cleanse(auth_header.data(), auth_header.size());
    if (s.first != CURLE_OK) {
      return Fail(MakeError(ErrorKind::kInternal, "curl_easy_setopt: {}",
                            curl_easy_strerror(s.first)));
    }
    if (!rc) return Fail(std::move(rc.error()));
    response.code = *rc;
    response.curl_error = error_buffer;
    if (response.code != CURLE_OK && response.stalled) {
      response.code = CURLE_OPERATION_TIMEDOUT;
      response.curl_error = fmt::format("no data for {} s", options_.low_speed_seconds);
    }
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response.status);
    char* scheme = nullptr;
    if (curl_easy_getinfo(curl, CURLINFO_SCHEME, &scheme) == CURLE_OK && scheme != nullptr) {
      response.scheme = Lower(scheme);
    }
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, nullptr);  // error_buffer goes out of scope
    return response;
  }

 private:
  // curl_easy_perform through the multi handle: curl_easy_perform waits up to a
  // second for the network between calls of the progress callback, and newer
  // curls call it only when there is something to do; here the cancel flag and
  // the stall clock are looked at every kPollMs whatever the network does.
  Result<CURLcode> Perform(RegistryClient::Impl::Transfer& transfer) {
    CURLM* multi = impl_.multi;
    CURL* curl = impl_.curl;
    CURLMcode mc = curl_multi_add_handle(multi, curl);
    if (mc != CURLM_OK) {
      return Fail(
          MakeError(ErrorKind::kInternal, "curl_multi_add_handle: {}", curl_multi_strerror(mc)));
    }
    CURLcode result = CURLE_OK;
    bool done = false;
    while (true) {
      int running = 0;
      mc = curl_multi_perform(multi, &running);
      int left = 0;
      while (CURLMsg* msg = curl_multi_info_read(multi, &left)) {
        if (msg->msg == CURLMSG_DONE && msg->easy_handle == curl) {
          result = msg->data.result;
          done = true;
        }
      }
      if (done || mc != CURLM_OK) break;
      if (transfer.ShouldStop()) {
        result = CURLE_ABORTED_BY_CALLBACK;
        break;
      }
      mc = curl_multi_poll(multi, nullptr, 0, kPollMs, nullptr);
      if (mc != CURLM_OK) break;
    }
    // Removing a handle mid-transfer closes its connection; a finished one's
    // stays in the multi handle's cache for the next request.
    curl_multi_remove_handle(multi, curl);
    if (mc != CURLM_OK) {
      return Fail(MakeError(ErrorKind::kInternal, "curl_multi: {}", curl_multi_strerror(mc)));
    }
    return result;
  }

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
  if (r.cancelled) return Error(ErrorKind::kCancelled, 0, fmt::format("{}: cancelled", what));
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

// Whether asking again may help: the network failed under the transfer (the
// registry restarting, a connection reset, a proxy dropping it) or the registry
// said it is overloaded or broken for now (5xx). Not a stall (a slow drip must
// fail, not be resumed forever), a timeout, TLS, or anything the answer said.
bool IsRetryable(const RegistryClient::Impl::Response& r) {
  if (r.cancelled || r.stalled || r.sink_error || r.over_limit) return false;
  switch (r.code) {
    case CURLE_OK:
      return r.status >= 500 && r.status <= 599;
    case CURLE_COULDNT_CONNECT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_PARTIAL_FILE:
    case CURLE_GOT_NOTHING:
    case CURLE_HTTP2:         // the connection's HTTP/2 framing broke (a GOAWAY, a reset)
    case CURLE_HTTP2_STREAM:  // the stream was reset
      return true;
    default:
      return false;
  }
}

// Sleeps `ms`, looking at the cancel flag every 50 ms.
Status WaitBackoff(long ms, const std::atomic<bool>* cancel, const std::string& what) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (true) {
    if (cancel != nullptr && cancel->load()) {
      return Fail(MakeError(ErrorKind::kCancelled, "{}: cancelled", what));
    }
    const auto now = std::chrono::steady_clock::now();
    if (now >= end) return {};
    std::this_thread::sleep_for(
        std::min<std::chrono::steady_clock::duration>(end - now, std::chrono::milliseconds(50)));
  }
}

// The first byte position of a Content-Range ("bytes 100-199/200").
std::optional<uint64_t> RangeStart(std::string_view content_range) {
  std::string lower = Lower(Trim(content_range));
  std::string_view v = lower;
  if (!v.starts_with("bytes ")) return std::nullopt;
  v.remove_prefix(6);
  v = Trim(v);
  uint64_t start = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), start);
  if (ec != std::errc() || end == v.data() || end == v.data() + v.size() || *end != '-') {
    return std::nullopt;
  }
  return start;
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
  std::string url = realm + (realm.find('?') == std::string::npos ? "?" : "&");
  auto escape = [&](const std::string& v) {
    char* e = curl_easy_escape(impl.curl, v.data(), static_cast<int>(v.size()));
    std::string out = e != nullptr ? e : "";
    curl_free(e);
    return out;
  };
  bool first = true;
  if (auto it = challenge.params.find("service"); it != challenge.params.end()) {
    url += "service=" + escape(it->second);
    first = false;
  }
  url += std::string(first ? "" : "&") +
         "scope=" + escape(fmt::format("repository:{}:pull", ref.repository));
  RequestRunner run(impl, options, scheme);
  RegistryClient::Impl::Request req;
  req.url = url;
  req.send_auth = false;
  req.basic_only = options.credentials.has_value();
  req.max_body = kMaxTokenBytes;
  LX_ASSIGN_OR_RETURN(RegistryClient::Impl::Response r, run.Run(req));
  const std::string token_what = what + " token";
  if (r.code != CURLE_OK) {
    if (r.over_limit) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "{}: answer over {} bytes", token_what,
                            kMaxTokenBytes));
    }
    return Fail(TransferError(ref, token_what, r));
  }
  if (r.status == 401 || r.status == 403) {
    return Fail(MakeError(ErrorKind::kPolicy, "{}: unauthorized: the token server refused {}", what,
                          options.credentials ? "the user name or password" : "anonymous access"));
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
    return Fail(
        MakeError(ErrorKind::kInvalidInput, "{}: no usable token in the answer", token_what));
  }
  return token;
}

}  // namespace

Result<RegistryClient::Impl::Response> RegistryClient::Impl::Fetch(
    RegistryClient& client, const std::string& what, Request& request,
    const std::function<void(Request&)>& prepare) {
  const RegistryOptions& options = client.options_;
  int retries = 0;
  long backoff_ms = options.retry_backoff_ms;
  bool renewed = false;
  std::optional<Error> last;  // the failure the next attempt is a retry of
  while (true) {
    if (prepare) prepare(request);
    if (last) {
      std::string_view why = last->message();
      if (why.starts_with(what + ": ")) why.remove_prefix(what.size() + 2);
      Logger("broker")->info("registry retry: {} offset={} retry={}/{} wait_ms={} after={:?}", what,
                             request.range_from, retries, options.blob_retries, backoff_ms, why);
      LX_TRY(WaitBackoff(backoff_ms, options.cancel, what));
      backoff_ms = std::min(backoff_ms * 2, kMaxBackoffMs);
      last.reset();
    }
    RequestRunner run(*client.impl_, options, client.scheme_);
    LX_ASSIGN_OR_RETURN(Response r, run.Run(request));
    if (r.sink_error) return Fail(std::move(*r.sink_error));
    if (r.cancelled) return Fail(TransferError(client.ref_, what, r));
    // Tokens expire (Docker Hub's after 5 minutes, less than a big layer may
    // take): one new one, then a 401 is the caller's to report.
    const Auth auth = client.impl_->auth;
    if (r.code == CURLE_OK && r.status == 401 && !renewed &&
        (auth == Auth::kBearer || auth == Auth::kBasic)) {
      renewed = true;
      LX_TRY(client.Reauthenticate());
      continue;
    }
    if (!IsRetryable(r)) return r;
    Error failure = r.code != CURLE_OK ? TransferError(client.ref_, what, r)
                                       : MakeError(ErrorKind::kInvalidInput, "{}: answered {}",
                                                   what, StatusText(r));
    if (retries >= options.blob_retries) {
      if (retries == 0) return Fail(std::move(failure));
      return Fail(Error(failure.kind(), failure.err(),
                        fmt::format("{} (after {} retries)", failure.message(), retries)));
    }
    ++retries;
    last = std::move(failure);
  }
}

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
    if (i + 1 == schemes.size() || r.cancelled) {
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
  // A manifest is small: a failed transfer is asked for whole again.
  LX_ASSIGN_OR_RETURN(Impl::Response r, Impl::Fetch(*this, what, req, nullptr));
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
                                         const std::function<Status(std::span<const char>)>& sink,
                                         BlobOptions blob) {
  const std::string what = fmt::format("blob {}", digest);
  if (!IsValidDigest(digest)) {
    return Fail(
        MakeError(ErrorKind::kPolicy, "blob {:?}: not a sha256 digest", digest.substr(0, 80)));
  }
  LX_TRY(Ping());
  extractor::Sha256 sha;
  uint64_t delivered = 0;  // bytes the sink has seen (and the sha), over all attempts
  uint64_t skip = 0;       // of this answer's body, already delivered
  Impl::Request req;
  req.url = Url(scheme_, ref_, fmt::format("/v2/{}/blobs/{}", ref_.repository, digest));
  req.on_body = [&](const Impl::Response& r) -> Status {
    if (r.status == 200) {
      // The whole blob (again, when the Range was ignored): what the sink has
      // seen is skipped; the sha covers those bytes already, so a blob that
      // changed between the answers still fails on its digest.
      skip = req.range_from;
      return {};
    }
    if (r.status == 206 && req.range_from > 0) {
      if (RangeStart(r.content_range) != req.range_from) {
        return Fail(MakeError(ErrorKind::kInvalidInput,
                              "{}: asked for bytes from {}, answered Content-Range {:?}", what,
                              req.range_from, r.content_range.substr(0, 100)));
      }
      skip = 0;
      return {};
    }
    return Fail(MakeError(ErrorKind::kInvalidInput, "{}: answered HTTP {}", what, r.status));
  };
  req.sink = [&](std::span<const char> bytes) -> Status {
    if (skip > 0) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(skip, bytes.size()));
      skip -= n;
      bytes = bytes.subspan(n);
      if (bytes.empty()) return {};
    }
    if (size && delivered + bytes.size() > *size) {
      return Fail(MakeError(ErrorKind::kLimitExceeded,
                            "{}: more than the {} bytes the manifest says", what, *size));
    }
    delivered += bytes.size();
    if (blob.verify_digest) sha.Update(bytes.data(), bytes.size());
    return sink(bytes);
  };
  // Each attempt asks for what the sink has not seen yet, at the registry's URL
  // again (a storage backend's redirect may have expired).
  LX_ASSIGN_OR_RETURN(Impl::Response r, Impl::Fetch(*this, what, req, [&](Impl::Request& next) {
                        next.range_from = delivered;
                      }));
  if (r.code != CURLE_OK) return Fail(TransferError(ref_, what, r));
  if (r.status == 401 || r.status == 403) {
    return Fail(MakeError(ErrorKind::kPolicy, "{}: unauthorized ({})", what, StatusText(r)));
  }
  if (r.status != 200 && !(r.status == 206 && req.range_from > 0)) {
    return Fail(MakeError(ErrorKind::kInvalidInput, "{}: answered {}", what, StatusText(r)));
  }
  if (size && delivered != *size) {
    return Fail(MakeError(ErrorKind::kIntegrity, "{}: {} bytes, the manifest says {}", what,
                          delivered, *size));
  }
  if (blob.verify_digest) {
    std::string got = sha.Finish();
    if (got != digest) {
      return Fail(MakeError(ErrorKind::kIntegrity, "{}: content has digest {}", what, got));
    }
  }
  return delivered;
}

}  // namespace layerx::broker
