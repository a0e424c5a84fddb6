// broker/source, inside registry_pull: a docker:// image resolved in its
// registry (the manifest, an index picked by platform, the config, each checked
// against its digest) through a RegistryClient made from the pull's options.
#include "broker/source/registry_resolve.h"

#include "broker/log/logging.h"
#include "broker/source/registry_auth.h"

namespace layerx::broker {

namespace {

constexpr std::string_view kPrefix = "docker://";
constexpr uint64_t kMaxConfigBytes = 4 * 1024 * 1024;

}  // namespace

namespace registry_detail {

Error Answered(Error e) {
  if (e.kind() != ErrorKind::kPolicy) return e;
  return Error(ErrorKind::kOs, 0, e.ToString());
}

Result<std::unique_ptr<RegistryClient>> Connect(const RegistryRef& ref,
                                                const PullOptions& options) {
  std::vector<std::string> files =
      options.auth_file.empty() ? AuthFilePaths() : std::vector<std::string>{options.auth_file};
  LX_ASSIGN_OR_RETURN(std::optional<Credentials> credentials,
                      FindCredentials(ref.registry, options.creds, files, ref.repository));
  if (!options.tls_verify) {
    // Said with -v, where a user looks for why: a warning on every run would
    // break the one line a failure prints.
    Logger("broker")->info(
        "{}: TLS VERIFICATION IS OFF (--tls-verify=false): certificates are not checked and "
        "plain http is allowed",
        ref.registry);
  }
  Logger("broker")->info("registry {}: {} as {}", ref.registry, ref.ToString(),
                         credentials ? "a user (credentials found)" : "anonymous");
  RegistryOptions o{.credentials = std::move(credentials),
                    .tls_verify = options.tls_verify,
                    .cert_dir = options.cert_dir,
                    .low_speed_seconds = options.low_speed_seconds,
                    .total_timeout_ms = options.total_timeout_ms,
                    .blob_retries = options.blob_retries,
                    .retry_backoff_ms = options.retry_backoff_ms,
                    .cancel = options.cancel};
  return RegistryClient::Create(ref, std::move(o));
}

Result<ResolvedImage> Resolve(RegistryClient& client, const Platform& platform,
                              const LayersFound& on_layers) {
  auto got = client.GetManifest();
  if (!got) return Fail(Answered(std::move(got).error()));
  RegistryManifest top = std::move(*got);
  auto read = [&client](const std::string& digest, std::optional<uint64_t> size,
                        bool manifest) -> Result<std::string> {
    if (manifest) {
      auto got = client.GetManifest(digest);
      if (!got) return Fail(Answered(std::move(got).error()));
      RegistryManifest m = std::move(*got);
      if (size && *size != m.bytes.size()) {
        return Fail(MakeError(ErrorKind::kIntegrity,
                              "manifest {} is {} bytes, its descriptor says {}", digest,
                              m.bytes.size(), *size));
      }
      return std::move(m.bytes);
    }
    if (size && *size > kMaxConfigBytes) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "config {} is {} bytes, over {}", digest,
                            *size, kMaxConfigBytes));
    }
    std::string bytes;
    auto got = client.GetBlob(digest, size, [&](std::span<const char> chunk) -> Status {
      if (bytes.size() + chunk.size() > kMaxConfigBytes) {
        return Fail(MakeError(ErrorKind::kLimitExceeded, "config {}: over {} bytes", digest,
                              kMaxConfigBytes));
      }
      bytes.append(chunk.data(), chunk.size());
      return {};
    });
    if (!got) return Fail(Answered(std::move(got).error()).With("config"));
    return bytes;
  };
  return ResolveFromDocument(top.bytes, top.media_type, top.digest, platform, read, on_layers);
}

}  // namespace registry_detail

using registry_detail::Connect;
using registry_detail::Resolve;

bool IsRegistrySource(const std::vector<std::string>& specs) {
  return specs.size() == 1 && specs[0].starts_with(kPrefix);
}

Result<ResolvedImage> ResolveRegistry(const std::string& spec, const Platform& platform,
                                      const PullOptions& options) {
  LX_ASSIGN_OR_RETURN(RegistryRef ref, ParseRegistryRef(spec));
  LX_ASSIGN_OR_RETURN(std::unique_ptr<RegistryClient> client, Connect(ref, options));
  return Resolve(*client, platform);
}

}  // namespace layerx::broker
