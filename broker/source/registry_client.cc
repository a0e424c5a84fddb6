// RegistryClient's public calls (registry_client.h): making a client (the
// cert dir read) and its clones, GET of a manifest and of a blob, and what
// their answers must be. Ping is in registry_login.cc, one GET and its
// retries in registry_transfer.cc.
#include "broker/source/registry_client.h"

#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <pwd.h>
#include <sys/stat.h>

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <mutex>
#include <nlohmann/json.hpp>

#include "broker/log/logging.h"
#include "broker/source/registry_transfer.h"
#include "broker/source/source.h"
#include "extractor/digest.h"
#include "sandbox/sys.h"

namespace layerx::broker {

using namespace registry_detail;

namespace {

constexpr uint64_t kMaxCertFileBytes = 1024 * 1024;

constexpr std::string_view kOciManifest = "application/vnd.oci.image.manifest.v1+json";
constexpr std::string_view kOciIndex = "application/vnd.oci.image.index.v1+json";
constexpr std::string_view kDockerManifest = "application/vnd.docker.distribution.manifest.v2+json";
constexpr std::string_view kDockerList =
    "application/vnd.docker.distribution.manifest.list.v2+json";

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

// The bytes of a small regular file below `dir` (a cert); kPolicy naming it otherwise.
Result<std::string> ReadCertFile(int dir, const std::string& dir_name, const std::string& name) {
  auto fd = sandbox::OpenRegularFile(dir, name, 0);
  if (!fd) return Fail(std::move(fd.error()).With("cert dir {:?}", dir_name));
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(fd->get()));
  if (static_cast<uint64_t>(st.st_size) > kMaxCertFileBytes) {
    return Fail(MakeError(ErrorKind::kPolicy, "cert dir {:?}: {:?} is over {} bytes", dir_name,
                          name, kMaxCertFileBytes));
  }
  return sandbox::ReadUpTo(fd->get(), static_cast<size_t>(st.st_size));
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

// containers-certs.d(5): with no --cert-dir, skopeo and podman read
// HOST[:PORT] below $HOME/.config/containers/certs.d, /etc/containers/certs.d
// and /etc/docker/certs.d, the first that exists. "" when none does.
Result<std::string> DefaultCertDir(const std::string& registry) {
  if (registry.empty() || registry == "." || registry == ".." ||
      registry.find('/') != std::string::npos) {
    return std::string();
  }
  std::vector<std::string> bases;
  std::string home;
  if (const char* h = std::getenv("HOME"); h != nullptr && h[0] == '/') {
    home = h;
  } else {  // as Go's os/user: the passwd entry
    struct passwd pw, *found = nullptr;
    char buf[4096];
    if (::getpwuid_r(::getuid(), &pw, buf, sizeof(buf), &found) == 0 && found != nullptr &&
        found->pw_dir != nullptr && found->pw_dir[0] == '/') {
      home = found->pw_dir;
    }
  }
  if (!home.empty()) bases.push_back(home + "/.config/containers/certs.d");
  bases.push_back("/etc/containers/certs.d");
  bases.push_back("/etc/docker/certs.d");
  for (const std::string& base : bases) {
    std::string path = base + "/" + registry;
    struct stat st;
    if (::stat(path.c_str(), &st) == 0) return path;
    if (errno == ENOENT || errno == ENOTDIR || errno == EACCES) continue;  // as skopeo does
    return Fail(Error(ErrorKind::kPolicy, errno, fmt::format("cert dir {:?}", path)));
  }
  return std::string();
}

// PEM_read_bio_PrivateKey's passphrase callback: none (an encrypted key is
// refused, never asked for on the terminal).
int NoPassphrase(char*, int, int, void*) { return 0; }

// A client certificate pair of a cert dir: NAME.cert (the leaf, then its
// chain) and NAME.key, which must match it.
Status LoadClientPair(int dir, const std::string& dir_name, const std::string& cert_name,
                      const std::string& key_name, TlsFiles& out) {
  LX_ASSIGN_OR_RETURN(std::string cert_pem, ReadCertFile(dir, dir_name, cert_name));
  LX_ASSIGN_OR_RETURN(std::string key_pem, ReadCertFile(dir, dir_name, key_name));
  BIO* bio = BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size()));
  X509* leaf = bio != nullptr ? PEM_read_bio_X509(bio, nullptr, nullptr, nullptr) : nullptr;
  STACK_OF(X509)* chain = sk_X509_new_null();
  while (leaf != nullptr && chain != nullptr) {
    X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
    if (x == nullptr) break;
    if (sk_X509_push(chain, x) == 0) {
      X509_free(x);
      break;
    }
  }
  BIO_free(bio);
  bio = BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size()));
  EVP_PKEY* key =
      bio != nullptr ? PEM_read_bio_PrivateKey(bio, nullptr, &NoPassphrase, nullptr) : nullptr;
  BIO_free(bio);
  OPENSSL_cleanse(key_pem.data(), key_pem.size());
  ERR_clear_error();
  std::string problem;
  if (leaf == nullptr) {
    problem = fmt::format("{:?} holds no PEM certificate", cert_name);
  } else if (key == nullptr) {
    problem =
        fmt::format("{:?} holds no PEM private key (an encrypted key is not supported)", key_name);
  } else if (X509_check_private_key(leaf, key) != 1) {
    problem = fmt::format("{:?} is not the key of {:?}", key_name, cert_name);
  }
  ERR_clear_error();
  if (!problem.empty() || out.client != nullptr) {  // a second pair: checked, not used
    X509_free(leaf);
    sk_X509_pop_free(chain, X509_free);
    EVP_PKEY_free(key);
    if (problem.empty()) return {};
    return Fail(MakeError(ErrorKind::kPolicy, "cert dir {:?}: {}", dir_name, problem));
  }
  out.client = leaf;
  out.chain = chain;
  out.key = key;
  out.client_name = cert_name;
  return {};
}

// A cert dir as containers-certs.d(5) has it: *.crt are CAs (read only when
// certificates are checked), NAME.cert with NAME.key a client certificate (the
// first in name order is used; a .cert without its .key, or a .key without its
// .cert, is refused as skopeo refuses it). Null when it gives nothing.
Result<std::shared_ptr<const TlsFiles>> LoadCertDir(const std::string& dir_name, bool verify) {
  auto dir = sandbox::OpenAt(AT_FDCWD, dir_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (!dir) {
    return Fail(Error(ErrorKind::kPolicy, dir.error().err(),
                      fmt::format("cert dir {:?}: {}", dir_name, dir.error().ToString())));
  }
  LX_ASSIGN_OR_RETURN(std::vector<std::string> names, sandbox::ListDir(dir->get()));
  std::sort(names.begin(), names.end());
  auto has = [&](const std::string& name) {
    return std::binary_search(names.begin(), names.end(), name);
  };
  auto files = std::make_shared<TlsFiles>();
  files->dir = dir_name;
  for (const std::string& name : names) {
    if (name.ends_with(".crt")) {
      if (!verify) continue;
      LX_ASSIGN_OR_RETURN(std::string pem, ReadCertFile(dir->get(), dir_name, name));
      if (CountCerts(pem) == 0) {
        return Fail(MakeError(ErrorKind::kPolicy, "cert dir {:?}: {:?} holds no PEM certificate",
                              dir_name, name));
      }
      files->ca_pem += pem;
      files->ca_pem += "\n";
    } else if (name.ends_with(".cert")) {
      std::string key = name.substr(0, name.size() - 5) + ".key";
      if (!has(key)) {
        return Fail(MakeError(ErrorKind::kPolicy,
                              "cert dir {:?}: client certificate {:?} has no key {:?} (a CA "
                              "certificate's name ends in .crt)",
                              dir_name, name, key));
      }
      LX_TRY(LoadClientPair(dir->get(), dir_name, name, key, *files));
    } else if (name.ends_with(".key")) {
      std::string cert = name.substr(0, name.size() - 4) + ".cert";
      if (!has(cert)) {
        return Fail(MakeError(ErrorKind::kPolicy,
                              "cert dir {:?}: key {:?} has no client certificate {:?}", dir_name,
                              name, cert));
      }
    }
  }
  if (files->ca_pem.empty() && files->client == nullptr) return std::shared_ptr<const TlsFiles>();
  return std::shared_ptr<const TlsFiles>(std::move(files));
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

}  // namespace

RegistryClient::RegistryClient(RegistryRef ref, RegistryOptions options)
    : ref_(std::move(ref)), options_(std::move(options)), impl_(std::make_unique<Impl>()) {}

RegistryClient::~RegistryClient() = default;

Result<std::unique_ptr<RegistryClient>> RegistryClient::Create(RegistryRef ref,
                                                               RegistryOptions options) {
  LX_TRY(LoadCurl());
  std::unique_ptr<RegistryClient> c(new RegistryClient(std::move(ref), std::move(options)));
  std::string dir = c->options_.cert_dir;
  if (dir.empty() && c->options_.default_cert_dirs) {
    LX_ASSIGN_OR_RETURN(dir, DefaultCertDir(c->ref_.registry));
  }
  const bool defaulted = c->options_.cert_dir.empty();
  if (!dir.empty()) {
    auto tls = LoadCertDir(dir, c->options_.tls_verify);
    if (!tls && defaulted && tls.error().err() == EACCES) {
      // A certs.d dir this user may not read: skipped, as skopeo skips it.
      Logger("broker")->info("registry {}: cert dir {}: not readable (EACCES): skipped",
                             c->ref_.registry, dir);
      tls = std::shared_ptr<const TlsFiles>();
    }
    if (!tls) return Fail(std::move(tls).error());
    c->impl_->tls = std::move(*tls);
    if (c->impl_->tls && !Curl().openssl3) {
      return Fail(MakeError(ErrorKind::kPolicy,
                            "cert dir {:?}: needs libcurl built with OpenSSL 3 (this libcurl.so.4 "
                            "uses {:?})",
                            dir, Curl().ssl_version));
    }
    if (c->impl_->tls) {
      const TlsFiles& t = *c->impl_->tls;
      Logger("broker")->info("registry {}: cert dir {}: {} CA certificate(s){}{}", c->ref_.registry,
                             dir, CountCerts(t.ca_pem),
                             t.client != nullptr ? ", client certificate " : "", t.client_name);
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
  c->impl_->tls = impl_->tls;
  c->impl_->shared = impl_->shared;
  LX_TRY(c->impl_->InitHandles());
  return c;
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
