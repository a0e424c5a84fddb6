// RegistryClient's public calls (registry_client.h): making a client (the
// cert dir read) and its clones, GET of a manifest and of a blob, and what
// their answers must be. Ping is in registry_login.cc, one GET and its
// retries in registry_transfer.cc.
#include "broker/source/registry_client.h"

#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/stat.h>

#include <algorithm>
#include <charconv>
#include <mutex>
#include <nlohmann/json.hpp>

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
