// A client for one repository of an OCI distribution registry
// (https://github.com/opencontainers/distribution-spec), through libcurl:
//   - GET /v2/ and the WWW-Authenticate challenge it answers: none, Basic (the
//     credentials go with every request to the registry's host, never to another
//     host), or Bearer (a token from the realm for scope repository:REPO:pull,
//     asked with Basic credentials when there are some, else anonymously);
//   - manifests by tag or digest: OCI manifest and index, Docker v2 schema 2
//     manifest and manifest list; schema 1 is refused. At most 4 MiB. The sha256
//     is always computed, and checked when the manifest was asked for by digest;
//   - blobs, streamed to a sink while their sha256 and size are checked.
// TLS: the system CAs, plus every *.crt of `cert_dir` as a CA (as skopeo's
// --cert-dir reads it). tls_verify=false skips certificate checks and allows
// plain http (https is tried first, as skopeo does). Redirects (blob storage on
// other hosts) are followed, at most 5, over https only unless the registry itself
// answered over plain http.
// Errors (one line each, naming the registry/repository and what failed; no
// secret in any of them): kPolicy for what the user can fix (unauthorized, TLS
// refused, a schema 1 manifest, a registry that does not exist); kOs for network
// failures (curl's error, with errno 0); kInvalidInput for a registry answer that
// breaks the protocol; kLimitExceeded for a manifest over 4 MiB or a blob over its
// size; kIntegrity for content that does not match its digest or size.
// Not thread-safe: one client per thread (libcurl easy handles).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "broker/registry_auth.h"
#include "broker/registry_ref.h"
#include "policy/result.h"

namespace layerx::broker {

struct RegistryOptions {
  std::optional<Credentials> credentials;  // none: anonymous
  bool tls_verify = true;
  std::string cert_dir;             // empty: system CAs only
  long connect_timeout_ms = 30'000;
  long low_speed_seconds = 60;      // a transfer slower than 1 byte/s for this long fails
  long total_timeout_ms = 0;        // 0: none
};

struct RegistryManifest {
  std::string media_type;  // from Content-Type (or the document's mediaType)
  std::string bytes;       // exactly as served
  std::string digest;      // "sha256:..." of `bytes`, computed here
};

inline constexpr uint64_t kMaxManifestBytes = 4 * 1024 * 1024;

class RegistryClient {
 public:
  // Reads cert_dir (kPolicy when it cannot be read or a *.crt holds no
  // certificate); no network traffic yet.
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
  // error (returned as is). `size`: the manifest's size, enforced while streaming
  // (more is kLimitExceeded, less kIntegrity). The digest is checked at the end:
  // a mismatch is kIntegrity naming the blob. Returns the bytes streamed.
  // SECURITY: `sink` sees the bytes before the digest is known to be right; it
  // must treat them as untrusted until this returns success.
  Result<uint64_t> GetBlob(const std::string& digest, std::optional<uint64_t> size,
                           const std::function<Status(std::span<const char>)>& sink);

  const RegistryRef& ref() const { return ref_; }
  // "https" or "http", once Ping succeeded.
  const std::string& scheme() const { return scheme_; }

  struct Impl;

 private:
  RegistryClient(RegistryRef ref, RegistryOptions options);
  RegistryRef ref_;
  RegistryOptions options_;
  std::string scheme_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace layerx::broker
