// A client for one repository of an OCI distribution registry
// (https://github.com/opencontainers/distribution-spec), through libcurl:
//   - GET /v2/ and the WWW-Authenticate challenge it answers: none, Basic (the
//     credentials go with every request to the registry's host, never to another
//     host), or Bearer (a token from the realm for scope repository:REPO:pull,
//     asked with Basic credentials when there are some, else anonymously);
//   - manifests by tag or digest: OCI manifest and index, Docker v2 schema 2
//     manifest and manifest list; schema 1 is refused. At most 4 MiB. The sha256
//     is always computed, and checked when the manifest was asked for by digest;
//   - blobs, streamed to a sink while their sha256 (unless the caller checks it
//     itself) and size are checked.
// Retries: a blob or manifest GET cut short by the network (connection refused,
// reset or closed early, nothing answered) or answered 5xx is tried again up to
// blob_retries times, after retry_backoff_ms doubled each time; a blob resumes
// where it stopped ("Range: bytes=N-"), so its sink sees one continuous stream.
// A 401 while authenticated renews the token (from /v2/'s challenge) once and
// asks again. A transfer with no byte for low_speed_seconds fails (kOs) and is not
// retried; the time the sink takes is not counted.
// TLS: the system CAs, plus every *.crt of the cert dir as a CA, and its first
// NAME.cert/NAME.key pair as the client certificate (as skopeo reads --cert-dir
// or, without it, the registry's certs.d dir). tls_verify=false skips certificate checks and allows
// plain http (https is tried first, as skopeo does). Redirects (blob storage on
// other hosts) are followed, at most 5, over https only unless the registry itself
// answered over plain http.
// Errors (one line each, naming the registry/repository and what failed; no
// secret in any of them): kPolicy for what the user can fix (unauthorized, TLS
// refused, a schema 1 manifest, a registry that does not exist); kOs for network
// failures (curl's error, with errno 0); kInvalidInput for a registry answer that
// breaks the protocol; kLimitExceeded for a manifest over 4 MiB or a blob over its
// size; kIntegrity for content that does not match its digest or size;
// kCancelled once options.cancel is set. Retries exhausted: the last failure's
// line plus " (after N retries)".
// Threads: a client is used by one thread at a time (it owns libcurl handles).
// For parallel transfers, give each thread its own Clone(): clones share what
// Ping learned (scheme, authentication, the bearer token, renewed tokens) under
// a lock, so they do not each authenticate.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "broker/source/registry_auth.h"
#include "broker/source/registry_ref.h"
#include "policy/result.h"

namespace layerx::broker {

struct RegistryOptions {
  std::optional<Credentials> credentials;  // none: anonymous
  bool tls_verify = true;
  // CAs (*.crt) and a client certificate (NAME.cert + NAME.key) as
  // containers-certs.d(5) lays them out. Empty: the registry's dir below
  // $HOME/.config/containers/certs.d, /etc/containers/certs.d or
  // /etc/docker/certs.d, the first that exists, unless default_cert_dirs is false.
  std::string cert_dir;
  bool default_cert_dirs = true;
  long connect_timeout_ms = 30'000;
  // A transfer with no byte for this long fails (kOs; not retried); time spent
  // in the caller's sink does not count. 0: never.
  long low_speed_seconds = 60;
  long total_timeout_ms = 0;        // 0: none
  // A blob or manifest GET cut short by the network or answered 5xx is tried
  // again (a blob resumed with a Range request) at most this many times.
  // total_timeout_ms bounds each request, not all of them.
  int blob_retries = 5;
  // The wait before the first retry, doubled after each (at most a minute).
  long retry_backoff_ms = 250;
  // When it becomes true, any request (and a wait between retries) stops within
  // ~100 ms with kCancelled. Not owned; must outlive the client and its clones.
  const std::atomic<bool>* cancel = nullptr;
};

struct BlobOptions {
  // false: the caller checks the digest itself downstream; no sha256 here (the
  // size is still enforced).
  bool verify_digest = true;
};

struct RegistryManifest {
  std::string media_type;  // from Content-Type (or the document's mediaType)
  std::string bytes;       // exactly as served
  std::string digest;      // "sha256:..." of `bytes`, computed here
};

inline constexpr uint64_t kMaxManifestBytes = 4 * 1024 * 1024;

class RegistryClient {
 public:
  // Reads the cert dir (kPolicy when it cannot be read, a *.crt holds no
  // certificate, or a client certificate and its key are not a pair); no
  // network traffic yet.
  static Result<std::unique_ptr<RegistryClient>> Create(RegistryRef ref, RegistryOptions options);
  ~RegistryClient();
  RegistryClient(const RegistryClient&) = delete;
  RegistryClient& operator=(const RegistryClient&) = delete;

  // GET /v2/ and authenticate (Basic is checked by a second GET /v2/; Bearer by
  // fetching the token). Called by the other calls when not done yet.
  Status Ping();
  // The manifest named by `reference` (a tag or "sha256:..."); ref.Reference() by default.
  Result<RegistryManifest> GetManifest(const std::string& reference);
  Result<RegistryManifest> GetManifest() { return GetManifest(ref_.Reference()); }
  // Streams blob `digest` to `sink`, which may fail the transfer by returning an
  // error (returned as is, not retried). `size`: the manifest's size, enforced
  // while streaming (more is kLimitExceeded, less kIntegrity). Unless
  // blob.verify_digest is false, the digest is checked at the end: a mismatch is
  // kIntegrity naming the blob. Returns the bytes streamed.
  // A transfer cut short is resumed (see the top): the sink sees each byte once,
  // in order, whatever the retries. A resumed answer must be 206 with a
  // Content-Range starting where the stream stopped (else kInvalidInput), or a
  // 200 with the whole blob again, whose first bytes are then skipped.
  // The sink may block (a bounded spool): that does not count as a stall.
  // SECURITY: `sink` sees the bytes before the digest is known to be right; it
  // must treat them as untrusted until this returns success (or, with
  // verify_digest false, until the caller checked the digest itself).
  Result<uint64_t> GetBlob(const std::string& digest, std::optional<uint64_t> size,
                           const std::function<Status(std::span<const char>)>& sink,
                           BlobOptions blob = {});

  // A client for the same ref and options with its own libcurl handles, for
  // another thread. It shares this client's authentication (see the top): the
  // first of them to Ping asks, the others take its answer; a token one renews
  // after a 401 is taken by the others at their next 401 instead of asking
  // again. May be called while this client is in use by another thread.
  // kInternal when libcurl cannot make a handle.
  Result<std::unique_ptr<RegistryClient>> Clone() const;
  // The same, stopped by `cancel` instead of this client's flag (a pull's own,
  // set when the job is over, whichever way).
  Result<std::unique_ptr<RegistryClient>> Clone(const std::atomic<bool>* cancel) const;

  const RegistryRef& ref() const { return ref_; }
  // "https" or "http", once Ping succeeded.
  const std::string& scheme() const { return scheme_; }

  struct Impl;

 private:
  RegistryClient(RegistryRef ref, RegistryOptions options);
  // Ping's work, under the shared lock: the scheme and the authentication.
  Status Discover();
  // After a 401: a new token (or the one another clone got since), once.
  Status Reauthenticate();
  RegistryRef ref_;
  RegistryOptions options_;
  std::string scheme_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace layerx::broker
