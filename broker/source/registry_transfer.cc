// One GET to a registry (registry_transfer.h): every libcurl option of a
// request, the transfer's callbacks, curl driven through the multi handle so
// that a cancel or a stall is seen within kPollMs, what a failure reads as,
// and the retries around a GET (RegistryClient::Impl::Fetch).
#include "broker/source/registry_transfer.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <sys/socket.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <ctime>
#include <nlohmann/json.hpp>
#include <thread>

#include "broker/log/logging.h"

namespace layerx::broker {
namespace registry_detail {

std::string Lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() &&
         (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n')) {
    s.remove_suffix(1);
  }
  return s;
}

namespace {

constexpr long kMaxRedirects = 5;
constexpr const char* kUserAgent = "layerx";

// SSL_CTX_set_cert_cb: OpenSSL calls it on the client when the server asks
// for a certificate, before it picks one (whether or not there is one). The
// client is told, so that a failure can say what the registry wanted.
int OnCertRequest(SSL*, void* arg) {
  static_cast<RegistryClient::Impl*>(arg)->client_cert_asked = true;
  return 1;
}

// CURLOPT_SSL_CTX_FUNCTION, for each new TLS context of a client's handle
// (`user`: its Impl, which outlives the handle's connections): adds the cert
// dir's CAs to the store curl loaded the system CAs into (skopeo adds them to
// the system pool the same way) when certificates are checked, and gives the
// context the client certificate, its chain and key when the dir has a pair.
CURLcode ApplyCertDir(CURL*, void* ssl_ctx, void* user) {
  auto* impl = static_cast<RegistryClient::Impl*>(user);
  auto* ctx = static_cast<SSL_CTX*>(ssl_ctx);
  SSL_CTX_set_cert_cb(ctx, &OnCertRequest, impl);
  const TlsFiles* tls = impl->tls.get();
  if (tls == nullptr) return CURLE_OK;
  if (!tls->ca_pem.empty()) {  // read only when certificates are checked
    X509_STORE* store = SSL_CTX_get_cert_store(ctx);
    BIO* bio = BIO_new_mem_buf(tls->ca_pem.data(), static_cast<int>(tls->ca_pem.size()));
    if (bio == nullptr || store == nullptr) {
      BIO_free(bio);
      return CURLE_SSL_CERTPROBLEM;
    }
    while (X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) {
      X509_STORE_add_cert(store, x);  // a duplicate is not an error worth failing on
      X509_free(x);
    }
    ERR_clear_error();
    BIO_free(bio);
  }
  if (tls->client != nullptr) {
    if (SSL_CTX_use_certificate(ctx, tls->client) != 1 ||
        SSL_CTX_use_PrivateKey(ctx, tls->key) != 1) {
      ERR_clear_error();
      return CURLE_SSL_CERTPROBLEM;
    }
    for (int i = 0; tls->chain != nullptr && i < sk_X509_num(tls->chain); ++i) {
      if (SSL_CTX_add1_chain_cert(ctx, sk_X509_value(tls->chain, i)) != 1) {
        ERR_clear_error();
        return CURLE_SSL_CERTPROBLEM;
      }
    }
  }
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

// The connection ended before any answer, the way a TLS 1.3 server ends it
// when it refuses the client's certificate after the handshake: an alert read
// (a failed read), or the connection found reset (a failed send, or HTTP/2's
// framing when h2 was agreed).
bool EndedBeforeAnswer(const RegistryClient::Impl::Response& r) {
  return r.status == 0 && (r.code == CURLE_SEND_ERROR || r.code == CURLE_RECV_ERROR ||
                           r.code == CURLE_HTTP2 || r.code == CURLE_GOT_NOTHING);
}

// A TLS alert read after the handshake of a connection whose server asked for
// a client certificate ("sslv3 alert bad certificate", "tlsv13 alert
// certificate required"): the certificate, or its lack, refused. Only then: an
// abrupt close of any other connection is a network failure, retried.
bool IsTlsAlert(const RegistryClient::Impl::Response& r) {
  return r.client_cert_asked && (r.code == CURLE_RECV_ERROR || r.code == CURLE_SEND_ERROR) &&
         r.curl_error.find("SSL routines") != std::string::npos &&
         r.curl_error.find(" alert ") != std::string::npos;
}

// Whether the registry asked for a client certificate and then ended the
// connection before answering: what it does when it refuses the certificate
// given, or wants one there is none of. A server that only asks (optional
// client certificates) and fails later for another reason is not this.
bool ClientCertRefused(const RegistryClient::Impl::Response& r) {
  // CURLE_SSL_CONNECT_ERROR: TLS 1.2, where the refusal fails the handshake
  // itself (the request for a certificate came first). Not a server
  // certificate that failed our checks: that ends the handshake before.
  return r.client_cert_asked &&
         (EndedBeforeAnswer(r) || IsTlsAlert(r) || r.code == CURLE_SSL_CONNECT_ERROR);
}

// Sets every option of one GET on a handle just reset (a reset keeps the
// connection cache, so requests to one registry share connections).
struct Setup {
  CURL* curl;
  CURLcode first = CURLE_OK;
  template <typename T>
  void Set(CURLoption option, T value) {
    CURLcode rc = Curl().easy_setopt(curl, option, value);
    if (rc != CURLE_OK && first == CURLE_OK) first = rc;
  }
};

// Every connection close-on-exec: curl (7.88) makes its sockets without
// SOCK_CLOEXEC, and a library user's fork + exec on another thread would hand
// the registry's connection, and the token on it, to the child.
curl_socket_t OpenCloexecSocket(void*, curlsocktype, struct curl_sockaddr* address) {
  int fd = ::socket(address->family, address->socktype | SOCK_CLOEXEC, address->protocol);
  return fd < 0 ? CURL_SOCKET_BAD : fd;
}

// How long curl may wait for the network between two looks at the cancel flag
// and the stall clock.
constexpr int kPollMs = 100;
constexpr long kMaxBackoffMs = 60'000;
// The longest Retry-After honoured; a longer one fails the request at once.
constexpr long kMaxRetryAfterMs = 60'000;

}  // namespace

Result<RegistryClient::Impl::Response> RequestRunner::Run(
    const RegistryClient::Impl::Request& request) {
  CURL* curl = impl_.curl;
  Curl().easy_reset(curl);
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
  s.Set(CURLOPT_OPENSOCKETFUNCTION, &OpenCloexecSocket);
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
  }
  // Every TLS context: the cert dir's CAs and client certificate if there is
  // one, and a word when the server asks for a certificate we do not have.
  // SECURITY: the context is the handle's own; what it gets from the cert dir
  // is read-only here, shared with the clones.
  impl_.client_cert_asked = false;
  if (Curl()
          .openssl3) {  // else the context is not one of our OpenSSL's (Create refused a cert dir)
    s.Set(CURLOPT_SSL_CTX_FUNCTION, &ApplyCertDir);
    s.Set(CURLOPT_SSL_CTX_DATA, static_cast<void*>(&impl_));
  }
#if LIBCURL_VERSION_NUM >= 0x075700  // 7.87: the CA store would be cached with our CAs in it
  if (impl_.tls && !impl_.tls->ca_pem.empty()) s.Set(CURLOPT_CA_CACHE_TIMEOUT, 0L);
#endif
  s.Set(CURLOPT_HEADERFUNCTION, &RegistryClient::Impl::OnHeader);
  s.Set(CURLOPT_HEADERDATA, static_cast<void*>(&transfer));
  s.Set(CURLOPT_WRITEFUNCTION, &RegistryClient::Impl::OnData);
  s.Set(CURLOPT_WRITEDATA, static_cast<void*>(&transfer));
  if (!request.accept.empty()) {
    accept_header = "Accept: " + request.accept;
    headers = Curl().slist_append(headers, accept_header.c_str());
  }
  // SECURITY: curl sends CURLOPT_USERNAME/PASSWORD and a custom Authorization
  // header only to the host of the first URL, never to a host a redirect leads to
  // (CURLOPT_UNRESTRICTED_AUTH stays off; curl >= 7.58 drops the custom header).
  const bool basic =
      request.basic_only || (request.send_auth && impl_.auth == RegistryClient::Impl::Auth::kBasic);
  if (basic && options_.credentials) {
    s.Set(CURLOPT_HTTPAUTH, static_cast<long>(CURLAUTH_BASIC));
    s.Set(CURLOPT_USERNAME, options_.credentials->username.c_str());
    s.Set(CURLOPT_PASSWORD, options_.credentials->password.c_str());
  } else if (request.send_auth && impl_.auth == RegistryClient::Impl::Auth::kBearer) {
    auth_header = "Authorization: Bearer " + impl_.bearer_token;
    headers = Curl().slist_append(headers, auth_header.c_str());
  }
  if (!request.post_form.empty()) {
    // SECURITY: a body is not a credential to curl: a 307/308 would send it on
    // to wherever the redirect points. The token realm answers itself.
    s.Set(CURLOPT_FOLLOWLOCATION, 0L);
    s.Set(CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(request.post_form.size()));
    s.Set(CURLOPT_POSTFIELDS, request.post_form.c_str());
  }
  if (headers != nullptr) s.Set(CURLOPT_HTTPHEADER, headers);
  Result<CURLcode> rc = s.first;
  if (s.first == CURLE_OK) rc = Perform(transfer);
  // The handle must not keep pointing at the caller's form (a secret, wiped
  // and freed after this).
  if (!request.post_form.empty()) Curl().easy_setopt(curl, CURLOPT_POSTFIELDS, nullptr);
  Curl().slist_free_all(headers);
  OPENSSL_cleanse(auth_header.data(), auth_header.size());
  if (s.first != CURLE_OK) {
    return Fail(
        MakeError(ErrorKind::kInternal, "curl_easy_setopt: {}", Curl().easy_strerror(s.first)));
  }
  if (!rc) return Fail(std::move(rc.error()));
  response.code = *rc;
  response.curl_error = error_buffer;
  response.client_cert_asked = std::exchange(impl_.client_cert_asked, false);
  if (impl_.tls && impl_.tls->client != nullptr) {
    response.client_cert = impl_.tls->dir + "/" + impl_.tls->client_name;
  }
  if (response.code != CURLE_OK && response.stalled) {
    response.code = CURLE_OPERATION_TIMEDOUT;
    response.curl_error = fmt::format("no data for {} s", options_.low_speed_seconds);
  }
  Curl().easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response.status);
  char* scheme = nullptr;
  if (Curl().easy_getinfo(curl, CURLINFO_SCHEME, &scheme) == CURLE_OK && scheme != nullptr) {
    response.scheme = Lower(scheme);
  }
  Curl().easy_setopt(curl, CURLOPT_ERRORBUFFER, nullptr);  // error_buffer goes out of scope
  return response;
}

// curl_easy_perform through the multi handle: curl_easy_perform waits up to a
// second for the network between calls of the progress callback, and newer
// curls call it only when there is something to do; here the cancel flag and
// the stall clock are looked at every kPollMs whatever the network does.
Result<CURLcode> RequestRunner::Perform(RegistryClient::Impl::Transfer& transfer) {
  CURLM* multi = impl_.multi;
  CURL* curl = impl_.curl;
  CURLMcode mc = Curl().multi_add_handle(multi, curl);
  if (mc != CURLM_OK) {
    return Fail(
        MakeError(ErrorKind::kInternal, "curl_multi_add_handle: {}", Curl().multi_strerror(mc)));
  }
  CURLcode result = CURLE_OK;
  bool done = false;
  while (true) {
    int running = 0;
    mc = Curl().multi_perform(multi, &running);
    int left = 0;
    while (CURLMsg* msg = Curl().multi_info_read(multi, &left)) {
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
    mc = Curl().multi_poll(multi, nullptr, 0, kPollMs, nullptr);
    if (mc != CURLM_OK) break;
  }
  // Removing a handle mid-transfer closes its connection; a finished one's
  // stays in the multi handle's cache for the next request.
  Curl().multi_remove_handle(multi, curl);
  if (mc != CURLM_OK) {
    return Fail(MakeError(ErrorKind::kInternal, "curl_multi: {}", Curl().multi_strerror(mc)));
  }
  return result;
}

std::string Url(const std::string& scheme, const RegistryRef& ref, const std::string& path) {
  return fmt::format("{}://{}{}", scheme, ref.host, path);
}

// A curl failure (no HTTP answer, or a transfer cut short) as one line.
Error TransferError(const RegistryRef& ref, const std::string& what,
                    const RegistryClient::Impl::Response& r) {
  if (r.cancelled) return Error(ErrorKind::kCancelled, 0, fmt::format("{}: cancelled", what));
  if (r.client_cert.empty() && ClientCertRefused(r)) {
    return Error(ErrorKind::kPolicy, 0,
                 fmt::format("{}: TLS with {} failed: the registry asks for a client certificate "
                             "and none is set up (NAME.cert and NAME.key in --cert-dir, or in "
                             "certs.d/{}/ as containers-certs.d(5) says)",
                             what, ref.host, ref.registry));
  }
  if (!r.client_cert.empty() && ClientCertRefused(r) && EndedBeforeAnswer(r) && !IsTlsAlert(r)) {
    // TLS 1.3: the server checks a client certificate after the handshake and
    // then sends an alert and closes; whether curl reads the alert or finds
    // the connection reset (in HTTP/2's framing, as CURLE_HTTP2, when h2 was
    // agreed) depends on timing.
    return Error(ErrorKind::kPolicy, 0,
                 fmt::format("{}: TLS with {} failed: the registry asked for a client certificate "
                             "and ended the connection with no answer: it likely refused {} ({})",
                             what, ref.host, r.client_cert,
                             r.curl_error.empty() ? Curl().easy_strerror(r.code) : r.curl_error));
  }
  if (IsTlsError(r.code) || IsTlsAlert(r)) {
    return Error(ErrorKind::kPolicy, 0,
                 fmt::format("{}: TLS with {} failed: {}{}", what, ref.host,
                             r.curl_error.empty() ? Curl().easy_strerror(r.code) : r.curl_error,
                             r.client_cert.empty()
                                 ? std::string()
                                 : fmt::format(" (client certificate {})", r.client_cert)));
  }
  ErrorKind kind = ErrorKind::kOs;
  if (r.code == CURLE_TOO_MANY_REDIRECTS || r.code == CURLE_UNSUPPORTED_PROTOCOL) {
    kind = ErrorKind::kInvalidInput;  // a redirect loop, or one to plain http
  }
  return Error(kind, 0,
               fmt::format("{}: {}", what,
                           r.curl_error.empty() ? Curl().easy_strerror(r.code) : r.curl_error));
}

namespace {

// A 429 or 503 with a Retry-After: the only answers whose Retry-After counts.
bool SaysWhen(const RegistryClient::Impl::Response& r) {
  return !r.retry_after.empty() && (r.status == 429 || r.status == 503);
}

// ", Retry-After ..." when a 429 or 503 said when (the registry's words, shortened).
std::string RetryAfterText(const RegistryClient::Impl::Response& r) {
  if (!SaysWhen(r)) return "";
  return fmt::format(", Retry-After {:?}", r.retry_after.substr(0, 64));
}

}  // namespace

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
    return fmt::format("HTTP {} {:?} {:?}{}", r.status, code, message, RetryAfterText(r));
  }
  return fmt::format("HTTP {}{}", r.status, RetryAfterText(r));
}

namespace {

// How long a 429 or 503 asks the client to wait (Retry-After: seconds, or an
// HTTP date read by curl_getdate), in ms; nullopt when it says nothing usable.
std::optional<long> RetryAfterMs(const RegistryClient::Impl::Response& r) {
  if (!SaysWhen(r)) return std::nullopt;
  long seconds = 0;
  const char* end = r.retry_after.data() + r.retry_after.size();
  auto [ptr, ec] = std::from_chars(r.retry_after.data(), end, seconds);
  if (ec == std::errc() && ptr == end) {
    if (seconds < 0) return std::nullopt;
  } else {
    time_t when = Curl().getdate(r.retry_after.c_str(), nullptr);
    if (when < 0) return std::nullopt;
    const time_t now = ::time(nullptr);
    seconds = when <= now ? 0 : static_cast<long>(std::min<time_t>(when - now, 1'000'000));
  }
  return seconds > kMaxRetryAfterMs / 1000 ? kMaxRetryAfterMs + 1 : seconds * 1000;
}

// Whether asking again may help: the network failed under the transfer (the
// registry restarting, a connection reset, a proxy dropping it) or the registry
// said it is overloaded or broken for now (5xx), or too busy for a while it
// names (429 with a Retry-After). A Retry-After over a minute (Docker Hub's
// pull limit names hours; a 503 for maintenance may too) fails at once, as
// does a 429 that names no time: waiting would only hang the job. Not a
// stall (a slow drip must fail, not be resumed forever), a timeout, TLS, or
// anything else the answer said.
bool IsRetryable(const RegistryClient::Impl::Response& r) {
  if (r.cancelled || r.stalled || r.sink_error || r.over_limit) return false;
  if (ClientCertRefused(r)) return false;
  switch (r.code) {
    case CURLE_OK: {
      std::optional<long> wait = RetryAfterMs(r);
      if (wait && *wait > kMaxRetryAfterMs) return false;
      if (r.status == 429) return wait.has_value();
      return r.status >= 500 && r.status <= 599;
    }
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

}  // namespace

}  // namespace registry_detail

using namespace registry_detail;

size_t RegistryClient::Impl::OnHeader(char* data, size_t size, size_t n, void* user) {
  auto* t = static_cast<Transfer*>(user);
  t->last_byte = std::chrono::steady_clock::now();
  std::string_view line(data, size * n);
  if (line.starts_with("HTTP/")) {  // a new response (after a redirect or 100): start over
    t->response->content_type.clear();
    t->response->content_range.clear();
    t->response->www_authenticate.clear();
    t->response->retry_after.clear();
    return size * n;
  }
  size_t colon = line.find(':');
  if (colon == std::string_view::npos) return size * n;
  std::string name = Lower(Trim(line.substr(0, colon)));
  std::string_view value = Trim(line.substr(colon + 1));
  if (name == "content-type") t->response->content_type = std::string(value);
  if (name == "content-range") t->response->content_range = std::string(value);
  if (name == "retry-after") t->response->retry_after = std::string(value);
  if (name == "www-authenticate" && t->response->www_authenticate.empty()) {
    t->response->www_authenticate = std::string(value);
  }
  return size * n;
}

size_t RegistryClient::Impl::OnData(char* data, size_t size, size_t n, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const size_t len = size * n;
  t->last_byte = std::chrono::steady_clock::now();
  Curl().easy_getinfo(t->impl->curl, CURLINFO_RESPONSE_CODE, &t->response->status);
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

int RegistryClient::Impl::OnProgress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  return static_cast<Transfer*>(user)->ShouldStop() ? 1 : 0;
}

Result<RegistryClient::Impl::Response> RegistryClient::Impl::Fetch(
    RegistryClient& client, const std::string& what, Request& request,
    const std::function<void(Request&)>& prepare) {
  const RegistryOptions& options = client.options_;
  int retries = 0;
  long backoff_ms = options.retry_backoff_ms;
  bool renewed = false;
  std::optional<Error> last;  // the failure the next attempt is a retry of
  long asked_ms = 0;          // what its Retry-After asked for, if more than the backoff
  const auto give_up = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(std::max<long>(options.total_timeout_ms, 0));
  while (true) {
    if (prepare) prepare(request);
    if (last) {
      std::string_view why = last->message();
      if (why.starts_with(what + ": ")) why.remove_prefix(what.size() + 2);
      const long wait_ms = std::max(backoff_ms, asked_ms);
      // No wait past the request's clock (the job's, for a pull): a registry
      // asking again and again cannot hold a job longer than its timeout.
      if (options.total_timeout_ms > 0 &&
          std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms) > give_up) {
        return Fail(Error(last->kind(), last->err(),
                          fmt::format("{} (after {} retries; the next would pass the {} ms clock)",
                                      last->message(), retries - 1, options.total_timeout_ms)));
      }
      Logger("broker")->info("registry retry: {} offset={} retry={}/{} wait_ms={} after={:?}", what,
                             request.range_from, retries, options.blob_retries, wait_ms, why);
      LX_TRY(WaitBackoff(wait_ms, options.cancel, what));
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
    asked_ms = std::min(RetryAfterMs(r).value_or(0), kMaxRetryAfterMs);
    last = std::move(failure);
  }
}

}  // namespace layerx::broker
