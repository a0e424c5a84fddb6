// Internal to broker/source: what the parts of RegistryClient share. Its state
// (RegistryClient::Impl: the libcurl handles, the cert dir's CAs, what Ping
// learned, shared with clones), one request and its answer, RequestRunner (one
// GET, redirects followed) and how a failed answer reads. registry_transfer.cc
// runs requests and retries them (Impl::Fetch), registry_login.cc
// authenticates (Ping), registry_client.cc has the public calls.
#pragma once

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "broker/source/curl_api.h"
#include "broker/source/registry_client.h"
#include "broker/source/registry_ref.h"
#include "policy/result.h"

namespace layerx::broker {

namespace registry_detail {

constexpr size_t kMaxErrorBody = 64 * 1024;  // kept of a non-2xx answer (and no more read)

// ASCII lowercase (header names, schemes, media types).
std::string Lower(std::string_view s);
// Without the spaces and tabs before and after it, nor a line's end.
std::string_view Trim(std::string_view s);

}  // namespace registry_detail

// What a cert dir gave (containers-certs.d(5)): every *.crt as a CA, and the
// first <name>.cert/<name>.key pair as the client's certificate. Read once by
// RegistryClient::Create and handed to OpenSSL for each TLS connection.
struct TlsFiles {
  std::string dir;                   // where they came from (for -v)
  std::string ca_pem;                // every *.crt, concatenated; empty when not verifying
  X509* client = nullptr;            // the leaf of the pair's *.cert
  STACK_OF(X509) * chain = nullptr;  // the certificates after it in that file
  EVP_PKEY* key = nullptr;           // SECURITY: a secret; never logged
  std::string client_name;           // "client.cert"

  TlsFiles() = default;
  TlsFiles(const TlsFiles&) = delete;
  TlsFiles& operator=(const TlsFiles&) = delete;
  ~TlsFiles() {
    X509_free(client);
    sk_X509_pop_free(chain, X509_free);
    EVP_PKEY_free(key);
  }
};

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
  // The cert dir's CAs and client certificate (registry_client.cc reads it);
  // null when there is none. Shared with clones, read-only once made.
  std::shared_ptr<const TlsFiles> tls;
  // Set by OpenSSL's certificate request callback during a handshake of this
  // client's handle; read and cleared after each request.
  bool client_cert_asked = false;
  std::shared_ptr<Shared> shared = std::make_shared<Shared>();
  // This client's copy of `shared`'s, taken under its lock; requests read it without one.
  Auth auth = Auth::kUnknown;
  std::string bearer_token;  // SECURITY: a secret; never logged or put in an Error
  uint64_t generation = 0;

  ~Impl() {
    if (curl != nullptr) Curl().easy_cleanup(curl);
    if (multi != nullptr) Curl().multi_cleanup(multi);
    OPENSSL_cleanse(bearer_token.data(), bearer_token.size());
  }

  Status InitHandles() {
    curl = Curl().easy_init();
    multi = Curl().multi_init();
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
    std::string retry_after;       // Retry-After, as sent (a 429 or 503 may say when)
    std::string scheme;            // of the last URL (after redirects)
    bool over_limit = false;
    bool body_started = false;  // on_body was called
    bool cancelled = false;     // options.cancel was set
    bool stalled = false;       // no byte for low_speed_seconds
    // A TLS server asked for a client certificate during this request.
    bool client_cert_asked = false;
    std::string client_cert;  // the client certificate given (DIR/NAME.cert), if any
    std::optional<Error> sink_error;
  };
  struct Request {
    std::string url;
    std::string accept;
    bool send_auth = true;
    bool basic_only = false;  // the token request: Basic credentials, never the token
    // Non-empty: a POST of this application/x-www-form-urlencoded body (the
    // identity token's exchange), with no redirect followed. SECURITY: may
    // hold a secret; the caller wipes it.
    std::string post_form;
    size_t max_body = registry_detail::kMaxErrorBody;
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

  static size_t OnHeader(char* data, size_t size, size_t n, void* user);
  static size_t OnData(char* data, size_t size, size_t n, void* user);

  // CURLOPT_XFERINFOFUNCTION: non-zero aborts (CURLE_ABORTED_BY_CALLBACK).
  static int OnProgress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t);

  // One GET of `client` with its retries (see the header): `prepare` adjusts the
  // request before each attempt (a blob's Range). Returns the answer to act on,
  // or an error for a cancel, a sink's error or retries exhausted.
  static Result<Response> Fetch(RegistryClient& client, const std::string& what, Request& request,
                                const std::function<void(Request&)>& prepare);
};

namespace registry_detail {

// One GET, redirects followed; curl errors and HTTP statuses come back in the
// Response, only setup failures as errors.
class RequestRunner {
 public:
  RequestRunner(RegistryClient::Impl& impl, const RegistryOptions& options,
                const std::string& scheme)
      : impl_(impl), options_(options), scheme_(scheme) {}

  Result<RegistryClient::Impl::Response> Run(const RegistryClient::Impl::Request& request);

 private:
  Result<CURLcode> Perform(RegistryClient::Impl::Transfer& transfer);

  RegistryClient::Impl& impl_;
  const RegistryOptions& options_;
  const std::string& scheme_;
};

std::string Url(const std::string& scheme, const RegistryRef& ref, const std::string& path);

// A curl failure (no HTTP answer, or a transfer cut short) as one line.
Error TransferError(const RegistryRef& ref, const std::string& what,
                    const RegistryClient::Impl::Response& r);

// The registry's own words for a 4xx/5xx ({"errors":[{"code":..,"message":..}]}),
// shortened, or the status alone.
std::string StatusText(const RegistryClient::Impl::Response& r);

}  // namespace registry_detail

}  // namespace layerx::broker
