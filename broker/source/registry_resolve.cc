// broker/source, inside registry_pull: a docker:// image resolved in its
// registry (the manifest, an index picked by platform, the config, each checked
// against its digest) through a RegistryClient made from the pull's options.
#include "broker/source/registry_resolve.h"

#include "broker/log/logging.h"
#include "broker/source/registries_conf.h"
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

namespace {

// A client for `ref` with the pull's options: the credentials found for it
// (--creds only when `use_creds`; registries.conf's credential-helpers among
// the rest) and the TLS setting: --tls-verify when given, else `insecure`.
Result<std::unique_ptr<RegistryClient>> Connect(const RegistryRef& ref, const PullOptions& options,
                                                bool use_creds, bool insecure,
                                                const RegistriesConf& conf) {
  std::vector<std::string> files =
      options.auth_file.empty() ? AuthFilePaths() : std::vector<std::string>{options.auth_file};
  static const std::optional<std::string> kNoCreds;
  LX_ASSIGN_OR_RETURN(std::optional<Credentials> credentials,
                      FindCredentials(ref.registry, use_creds ? options.creds : kNoCreds, files,
                                      ref.repository, conf.credential_helpers));
  const bool tls_verify = options.tls_verify.value_or(!insecure);
  if (!tls_verify) {
    // Said with -v, where a user looks for why: a warning on every run would
    // break the one line a failure prints.
    Logger("broker")->info(
        "{}: TLS VERIFICATION IS OFF ({}): certificates are not checked and plain http is "
        "allowed",
        ref.registry,
        options.tls_verify ? "--tls-verify=false" : "insecure = true in registries.conf");
  }
  Logger("broker")->info("registry {}: {} as {}", ref.registry, ref.ToString(),
                         credentials ? "a user (credentials found)" : "anonymous");
  RegistryOptions o{.credentials = std::move(credentials),
                    .tls_verify = tls_verify,
                    .cert_dir = options.cert_dir,
                    .low_speed_seconds = options.low_speed_seconds,
                    .total_timeout_ms = options.total_timeout_ms,
                    .blob_retries = options.blob_retries,
                    .retry_backoff_ms = options.retry_backoff_ms,
                    .cancel = options.cancel};
  return RegistryClient::Create(ref, std::move(o));
}

// The names registries.conf works with, the host in lowercase: the
// repository alone ("docker.io/library/debian"), which picks the table, and
// with its tag or digest, which is rewritten.
std::string BareName(const RegistryRef& ref) {
  return LowerHost(NormalizeRegistry(LowerHost(ref.registry)) + "/" + ref.repository);
}
std::string FullName(const RegistryRef& ref) {
  return BareName(ref) + (ref.digest.empty() ? ":" + ref.tag : "@" + ref.digest);
}

}  // namespace

Result<Reached> Reach(const RegistryRef& ref, const PullOptions& options) {
  LX_ASSIGN_OR_RETURN(RegistriesConf conf, LoadRegistriesConf(options.registries_conf));
  const std::string name = FullName(ref);
  const RegistryConfEntry* entry = FindRegistryConf(conf, BareName(ref));
  // A blocked name is refused whatever mirrors it has (containers/image would
  // still try them; a block should not depend on which source answers first).
  if (entry != nullptr && entry->blocked) {
    return Fail(MakeError(ErrorKind::kRefused, "docker://{}: blocked by registries.conf ({})", name,
                          entry->source));
  }
  const std::string named_registry = NormalizeRegistry(LowerHost(ref.registry));
  const std::vector<PullSource> sources = PullSources(entry, name, !ref.digest.empty());
  std::string failed;  // the mirrors' errors, for the primary's
  for (size_t i = 0; i < sources.size(); ++i) {
    const PullSource& source = sources[i];
    RegistryRef at = ref;
    if (entry != nullptr) {
      auto parsed = ParseRegistryRef(source.name);
      if (!parsed || FullName(*parsed) != source.name) {
        return Fail(MakeError(
            ErrorKind::kPolicy, "registries.conf ({}): {} gives {:?}, which is not an image name",
            entry->source, source.mirror ? "a mirror" : "the location", source.name));
      }
      at = std::move(*parsed);
    }
    auto reached = [&]() -> Result<Reached> {
      // Where a source is blocked in its own right, it is not contacted.
      if (const RegistryConfEntry* own = FindRegistryConf(conf, BareName(at));
          own != nullptr && own->blocked) {
        return Fail(MakeError(ErrorKind::kRefused, "blocked by registries.conf ({})", own->source));
      }
      if (source.mirror) Logger("broker")->info("{}: trying the mirror {}", name, source.name);
      // --creds are for the registry the user named: never sent to a mirror or
      // a location elsewhere (containers/image drops them there too).
      const bool use_creds = NormalizeRegistry(LowerHost(at.registry)) == named_registry;
      // TLS as the source's table says (its own insecure), unless --tls-verify.
      LX_ASSIGN_OR_RETURN(std::unique_ptr<RegistryClient> client,
                          Connect(at, options, use_creds, source.insecure, conf));
      auto top = client->GetManifest();
      if (!top) return Fail(Answered(std::move(top).error()));
      return Reached{.ref = at, .client = std::move(client), .top = std::move(*top)};
    }();
    if (reached) return reached;
    if (options.cancel != nullptr && options.cancel->load()) {
      return Fail(MakeError(ErrorKind::kCancelled, "{}: cancelled", name));
    }
    if (i + 1 == sources.size()) {
      if (failed.empty()) return Fail(std::move(reached).error());
      const Error& e = reached.error();
      return Fail(
          Error(e.kind(), 0, fmt::format("{} (mirrors tried first: {})", e.ToString(), failed)));
    }
    Logger("broker")->info("{}: {}; trying the next source", source.name,
                           reached.error().ToString());
    failed += fmt::format("{}{}: {}", failed.empty() ? "" : "; ", source.name,
                          reached.error().ToString());
  }
  return Fail(MakeError(ErrorKind::kInternal, "no source for {}", name));  // never: one at least
}

Result<ResolvedImage> Resolve(RegistryClient& client, RegistryManifest top,
                              const Platform& platform, const LayersFound& on_layers) {
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

using registry_detail::Reach;
using registry_detail::Reached;
using registry_detail::Resolve;

bool IsRegistrySource(const std::vector<std::string>& specs) {
  return specs.size() == 1 && specs[0].starts_with(kPrefix);
}

Result<ResolvedImage> ResolveRegistry(const std::string& spec, const Platform& platform,
                                      const PullOptions& options) {
  LX_ASSIGN_OR_RETURN(RegistryRef ref, ParseRegistryRef(spec));
  LX_ASSIGN_OR_RETURN(Reached reached, Reach(ref, options));
  return Resolve(*reached.client, std::move(reached.top), platform);
}

}  // namespace layerx::broker
