// `layerx`: the command line. A thin user of the public API
// (include/layerx/layerx.hpp), linked against liblayerx like any other user.
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "layerx/layerx.hpp"

namespace {

layerx::CancelToken g_cancel;

void OnSignal(int) { g_cancel.Cancel(); }

constexpr const char* kExtractHelp =
    R"(Apply container image layers, lowest first, each in its own jail.

Every layer is unpacked by a separate layerx-extractor process inside fresh
user, mount, pid, net, ipc, uts and cgroup namespaces whose "/" is the image
rootfs, with no capabilities and a seccomp allowlist. Symlinks, "..",
whiteouts and hardlinks therefore resolve inside the image, never on the host.

Layers may be tar, tar.gz, tar.zst, tar.xz or tar.bz2; the compression is
detected from the bytes.

Outputs appear only when everything succeeded. On failure layerx prints one
line naming the layer, the entry and the reason, exits 1, and leaves nothing.

Sources are named the way skopeo names them: oci:DIR[:REF] is an OCI image
layout (REF a tag from org.opencontainers.image.ref.name or @sha256:...; it
may be omitted when the index holds one image); docker-archive:FILE[:REF] is
a docker save / skopeo tarball (REF a RepoTag). Every blob is checked against
its digest as it streams, every tar stream against the config's diff_ids.
Plain layer files are applied in the order given.

docker://[REGISTRY[:PORT]/]REPO[:TAG|@sha256:...] pulls from a registry, with
Docker Hub's defaults (docker://debian is docker.io/library/debian:latest).
Layers stream from the network into their jails; --parallel-downloads more
download at the same time and wait their turn, and a dropped connection is
resumed. Credentials: --creds, else --authfile, else $REGISTRY_AUTH_FILE,
$XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json and
~/.docker/config.json, as skopeo and podman read them.

Examples:
  layerx extract oci:./image:latest --ext4 rootfs.img --config config.json
  layerx extract docker-archive:app.tar:app:v1 --rootfs ./rootfs
  layerx extract docker://debian:bookworm --ext4 rootfs.img --blob-cache ~/.cache/layerx
  layerx extract docker://localhost:5000/app:v1 --tls-verify=false --rootfs ./rootfs
  layerx extract oci:./image:@sha256:... --platform linux/arm64 --rootfs ./rootfs
  layerx extract base.tar.gz app.tar.zst --rootfs ./rootfs
  layerx extract layer1.tar layer2.tar --rootfs out --manifest out.jsonl
  layerx extract base.tar.gz app.tar.gz --ext4 rootfs.img        # no root needed
  SOURCE_DATE_EPOCH=0 layerx extract l.tar --ext4 a.img --label root  # reproducible

Exit status: 0 ok, 1 refused or failed, 2 usage error.)";

void PrintError(const layerx::ExtractError& error) {
  std::fprintf(stderr, "layerx: %s\n", error.message.c_str());
}

// Exit status: 2 for a usage error (a bad request, source name or policy
// file), 1 for everything the input or the system caused.
// 75 (EX_TEMPFAIL) when the service is busy: try again later.
int ExitStatus(const layerx::ExtractError& error) {
  if (error.kind == layerx::FailureKind::kBusy) return 75;
  return error.kind == layerx::FailureKind::kUsage ? 2 : 1;
}

constexpr const char* kServeHelp =
    R"(Run the extraction service for a multi-tenant build farm.

Clients (layerx extract --connect SOCKET, or the library with
ExtractRequest::connect) send open file descriptors, never paths: the layer
blobs or the docker-archive, and the output files. The service never opens a
client's path, so it cannot be made to read or write what the client could
not. Who a client is comes from the kernel (SO_PEERCRED); --config maps uids
and gids to tenants, each with its own policy, concurrency and queue limits,
and byte and time budgets. A peer of no tenant is answered "unauthorized"
and disconnected at once; a tenant over its max_connections is "busy"; a
connection idle for idle_timeout_seconds is closed. Jobs wait in one
queue per tenant and are started round-robin across tenants; beyond the
limits the answer is "busy" (exit status 75 for the client), never a hang.
A client that disconnects or is interrupted stops its job at once.

SIGTERM or SIGINT: stop accepting, cancel queued jobs, give running ones
shutdown_grace_seconds, then cancel them; exit 0 once all are cleaned up.
Without --socket, the socket comes from systemd (LISTEN_FDS; see
layerx.socket).

Examples:
  layerx serve --socket /run/layerx/layerx.sock --config /etc/layerx/serve.toml
  layerx status --socket /run/layerx/layerx.sock
  layerx status --socket /run/layerx/layerx.sock --metrics   # Prometheus text)";

// The docker:// flags, as skopeo spells them, for `extract` and `inspect`.
void AddRegistryOptions(CLI::App* cmd, layerx::RegistrySettings& r) {
  cmd->add_option("--creds", r.creds,
                  "USER:PASS for a docker:// registry (default: from the auth files)");
  cmd->add_option("--authfile", r.auth_file,
                  "read credentials from this auth.json only (default: $REGISTRY_AUTH_FILE, "
                  "then containers' and docker's usual files)");
  cmd->add_option("--cert-dir", r.cert_dir,
                  "trust the CAs (*.crt) in this dir for the registry, besides the system's, "
                  "and present its client certificate (NAME.cert + NAME.key); default: the "
                  "registry's dir in ~/.config/containers/certs.d, /etc/containers/certs.d or "
                  "/etc/docker/certs.d, as skopeo");
  cmd->add_option_function<bool>(
         "--tls-verify", [&r](const bool& v) { r.tls_verify = v; },
         "--tls-verify=false: no certificate checks, and plain http is allowed (a local "
         "registry); default: true, unless registries.conf marks the registry insecure")
      ->default_str("true");
  cmd->add_option("--registries-conf", r.registries_conf,
                  "mirrors, locations, insecure and blocked registries from this "
                  "registries.conf (default: $CONTAINERS_REGISTRIES_CONF, else "
                  "~/.config/containers/registries.conf, else /etc/containers/registries.conf, "
                  "with their .d drop-ins, as skopeo)");
  cmd->add_option("--signature-policy", r.signature_policy,
                  "which images may be pulled, from this containers-policy.json (default: "
                  "~/.config/containers/policy.json, else /etc/containers/policy.json, else "
                  "every image); a scope that wants signatures refuses: they are not verified "
                  "yet. Extract only: inspect reads metadata whatever it says");
  cmd->add_option("--blob-cache", r.blob_cache,
                  "keep verified blobs here by digest and reuse them in later pulls");
  cmd->add_option("--parallel-downloads", r.parallel_downloads,
                  "docker:// layers downloaded ahead of the one being applied")
      ->check(CLI::Range(0, 16))
      ->capture_default_str();
}

int Inspect(const layerx::InspectRequest& request, bool as_json,
            const std::function<void(layerx::LogLevel, std::string_view, std::string_view)>& log,
            layerx::LogLevel level) {
  layerx::ImageInfo info;
  layerx::ExtractError error;
  if (!layerx::Inspect(request, &info, &error, log, level)) {
    PrintError(error);
    return ExitStatus(error);
  }
  std::string json = layerx::ToJson(info);
  if (as_json) {
    std::printf("%s\n", json.c_str());
    return 0;
  }
  if (!info.manifest_digest.empty()) std::printf("manifest  %s\n", info.manifest_digest.c_str());
  if (!info.config_digest.empty()) std::printf("config    %s\n", info.config_digest.c_str());
  for (size_t i = 0; i < info.layers.size(); ++i) {
    const auto& l = info.layers[i];
    std::printf("layer %-3zu %s  %12llu bytes  %s\n          diff_id %s\n", i + 1,
                l.digest.empty() ? l.name.c_str() : l.digest.c_str(),
                static_cast<unsigned long long>(l.size), l.media_type.c_str(),
                l.diff_id.empty() ? "-" : l.diff_id.c_str());
  }
  nlohmann::ordered_json summary = nlohmann::ordered_json::parse(json)["config"];
  for (auto it = summary.begin(); it != summary.end(); ++it) {
    std::printf("%-10s %s\n", it.key().c_str(), it.value().dump().c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace layerx;
  CLI::App app{"layerx: extract untrusted container image layers in a jail"};
  app.set_version_flag("--version", std::string("layerx ") + layerx::Version());
  app.require_subcommand(1);
  int verbosity = 0;
  bool quiet = false;
  app.add_flag("-v,--verbose", verbosity, "more logging (-vv for debug)");
  app.add_flag("-q,--quiet", quiet, "errors only");

  CLI::App* extract = app.add_subcommand(
      "extract", "apply an image's layers into a rootfs dir and/or an ext4 image");
  extract->footer(kExtractHelp);
  std::vector<std::string> layers;
  std::string rootfs, manifest;
  double timeout_s = 0;
  bool json = false;
  std::string platform, config;
  extract
      ->add_option("SOURCE", layers,
                   "oci:DIR[:REF], docker-archive:FILE[:REF], docker://REF, or layer "
                   "files lowest first")
      ->required();
  extract->add_option("--platform", platform,
                      "os/arch[/variant] to pick from a multi-platform index (default: this "
                      "machine's)");
  extract->add_option("--config", config, "write the image's config JSON here (image sources)");
  extract->add_option("--rootfs", rootfs,
                      "write the rootfs here (must not exist, or be an empty dir)");
  extract->add_option("--manifest", manifest, "write the JSON-lines manifest here");
  std::string ext4, label, uuid;
  uint64_t size = 0;
  uint32_t block_size = 4096, inode_ratio = 0;
  bool reproducible = false;
  extract->add_option("--ext4", ext4,
                      "write an ext4 image with true ownership here (no root needed)");
  extract
      ->add_option("--size", size, "ext4 image size, e.g. 512M or 2G (default: from the content)")
      ->transform(CLI::AsSizeValue(false));
  extract->add_option("--block-size", block_size, "ext4 block size: 1024, 2048 or 4096")
      ->check(CLI::IsMember({1024, 2048, 4096}));
  extract
      ->add_option("--inode-ratio", inode_ratio,
                   "ext4 bytes per inode (default: from the entry count)")
      ->check(CLI::Range(1024u, 67108864u));
  extract->add_option("--label", label, "ext4 volume label")->check([](const std::string& v) {
    return v.size() <= 16 ? std::string() : std::string("at most 16 bytes");
  });
  extract->add_option("--uuid", uuid, "ext4 filesystem UUID");
  extract->add_flag(
      "--reproducible", reproducible,
      "same input, byte-identical ext4 image (also on when SOURCE_DATE_EPOCH is set)");
  extract->add_option("--layer-timeout", timeout_s, "seconds one layer may take (default 1800)")
      ->check(CLI::PositiveNumber);
  double job_timeout_s = 0;
  extract
      ->add_option("--job-timeout", job_timeout_s,
                   "seconds the whole job may take, ext4 build included (default 7200)")
      ->check(CLI::PositiveNumber);
  std::string scratch;
  extract->add_option("--scratch", scratch,
                      "where the work tree goes when no --rootfs is written (default: /dev/shm "
                      "when it is a tmpfs with room, else beside the output)");
  extract->add_flag("--json", json, "print a JSON summary on stdout");
  std::string connect;
  extract->add_option("--connect", connect,
                      "run the job on the layerx service at this unix socket (layerx serve); "
                      "sources and outputs are passed as open files, the service's policy for "
                      "your tenant applies; not with --rootfs or --policy");
  layerx::RegistrySettings registry;
  AddRegistryOptions(extract, registry);
  extract->add_flag("-v,--verbose", verbosity, "more logging (-vv for debug)");
  extract->add_flag("-q,--quiet", quiet, "errors only");

  CLI::App* inspect =
      app.add_subcommand("inspect", "show the layers and config of an image source");
  inspect->footer(
      "Resolves SOURCE as extract would (oci:DIR[:REF], docker-archive:FILE[:REF],\n"
      "docker://REF or layer files) and prints each layer's digest, diff_id, media type and\n"
      "size, and the config. Manifest and config are checked against their digests; layers are not "
      "read.\n\n"
      "Examples:\n  layerx inspect oci:./image:latest --json\n"
      "  layerx inspect docker://debian:bookworm --platform linux/arm64/v8");
  std::vector<std::string> inspect_sources;
  std::string inspect_platform;
  bool inspect_json = false;
  inspect->add_option("SOURCE", inspect_sources, "the image")->required();
  inspect->add_option("--platform", inspect_platform, "os/arch[/variant]");
  inspect->add_flag("--json", inspect_json, "print JSON");
  layerx::RegistrySettings inspect_registry;
  AddRegistryOptions(inspect, inspect_registry);
  std::string policy_file;
  inspect->add_option("--policy", policy_file, "policy TOML file (see layerx policy show)");
  extract->add_option("--policy", policy_file,
                      "policy TOML file: limits, allowed entries and xattrs, jail rlimits, seccomp "
                      "action (see layerx policy show)");
  CLI::App* policy_cmd = app.add_subcommand("policy", "the effective policy");
  CLI::App* policy_show =
      policy_cmd->add_subcommand("show", "print the effective policy as TOML (a policy file)");
  policy_show->add_option("--policy", policy_file, "read this policy file over the defaults");
  policy_cmd->require_subcommand(1);
  CLI::App* serve = app.add_subcommand("serve", "run the extraction service on a unix socket");
  serve->footer(kServeHelp);
  std::string serve_socket, serve_config, log_format;
  serve->add_option("--socket", serve_socket,
                    "listen on this unix socket path (default: the socket systemd passes)");
  serve->add_option("--config", serve_config,
                    "tenants and limits, TOML (/usr/share/doc/layerx/serve.example.toml)");
  serve->add_option("--log-format", log_format, "text or json (default: the config's)")
      ->check(CLI::IsMember({"text", "json"}));
  serve->add_flag("-v,--verbose", verbosity, "more logging (-vv for debug)");
  serve->add_flag("-q,--quiet", quiet, "errors only");
  CLI::App* status = app.add_subcommand("status", "show the service's jobs and tenants");
  status->footer(
      "Operators (root, or the service's own user) see every tenant; a tenant sees its own\n"
      "jobs. --metrics prints the service's counters in Prometheus text format (operators).\n\n"
      "Example:\n  layerx status --socket /run/layerx/layerx.sock --json");
  std::string status_socket = "/run/layerx/layerx.sock";
  bool status_metrics = false, status_json = false;
  status->add_option("--socket", status_socket, "the service's socket")->capture_default_str();
  status->add_flag("--metrics", status_metrics, "print counters in Prometheus text format");
  status->add_flag("--json", status_json, "print JSON");
  inspect->add_flag("-v,--verbose", verbosity, "more logging (-vv for debug)");
  inspect->add_flag("-q,--quiet", quiet, "errors only");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }

  using layerx::LogLevel;
  LogLevel level = quiet            ? LogLevel::kError
                   : verbosity >= 2 ? LogLevel::kDebug
                   : verbosity == 1 ? LogLevel::kInfo
                                    : LogLevel::kWarn;
  bool tty = ::isatty(STDERR_FILENO) != 0;
  // "warning broker: ..." as spdlog's pattern "%l %n: %v" had it; the level
  // coloured on a terminal.
  auto log = [tty](LogLevel l, std::string_view component, std::string_view message) {
    static constexpr const char* kNames[] = {"", "debug", "info", "warning", "error"};
    static constexpr const char* kColours[] = {"", "\033[36m", "\033[32m", "\033[33;1m",
                                               "\033[31;1m"};
    int i = std::clamp(static_cast<int>(l), 1, 4);
    std::fprintf(stderr, "%s%s%s %.*s: %.*s\n", tty ? kColours[i] : "", kNames[i],
                 tty ? "\033[m" : "", static_cast<int>(component.size()), component.data(),
                 static_cast<int>(message.size()), message.data());
  };
  // The library blocks SIGPIPE on its thread; a CLI may as well ignore it.
  ::signal(SIGPIPE, SIG_IGN);
  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  if (inspect->parsed()) {
    return Inspect(layerx::InspectRequest{.sources = inspect_sources,
                                          .platform = inspect_platform,
                                          .policy_file = policy_file,
                                          .extractor_path = {},
                                          .registry = inspect_registry},
                   inspect_json, log, level);
  }
  if (status->parsed()) {
    std::string text;
    layerx::ExtractError error;
    auto query = status_metrics ? layerx::ServiceQuery::kMetrics
                 : status_json  ? layerx::ServiceQuery::kStatusJson
                                : layerx::ServiceQuery::kStatus;
    if (!layerx::QueryService(status_socket, query, &text, &error)) {
      PrintError(error);
      return ExitStatus(error);
    }
    std::fputs(text.c_str(), stdout);
    return 0;
  }
  if (serve->parsed()) {
    layerx::ServeOptions options;
    options.socket = serve_socket;
    options.config_file = serve_config;
    options.log_format = log_format;
    options.min_log_level = quiet            ? LogLevel::kError
                            : verbosity >= 1 ? LogLevel::kDebug
                                             : LogLevel::kInfo;
    options.log = [log](LogLevel l, std::string_view component, std::string_view message) {
      if (!message.empty() && message.front() == '{') {  // --log-format json: a JSON object
        std::fprintf(stderr, "%.*s\n", static_cast<int>(message.size()), message.data());
        return;
      }
      log(l, component, message);
    };
    // The service takes SIGTERM and SIGINT itself (a signalfd).
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    layerx::ExtractError error;
    if (!layerx::Serve(options, &error)) {
      PrintError(error);
      return ExitStatus(error) == 2 ? 2 : 1;
    }
    return 0;
  }
  if (policy_show->parsed()) {
    std::string toml;
    layerx::ExtractError error;
    if (!layerx::ShowPolicy(policy_file, "", &toml, &error)) {
      PrintError(error);
      return 2;
    }
    std::printf("%s", toml.c_str());
    return 0;
  }

  layerx::ExtractRequest request;
  request.sources = layers;
  request.platform = platform;
  request.rootfs = rootfs;
  request.manifest = manifest;
  request.config = config;
  request.ext4 = ext4;
  request.scratch_dir = scratch;
  layerx::Ext4Settings& e = request.ext4_settings;
  e.size_bytes = size;
  e.block_size = block_size;
  e.inode_ratio = inode_ratio;
  e.label = label;
  e.uuid = uuid;
  if (const char* epoch = std::getenv("SOURCE_DATE_EPOCH"); epoch != nullptr && *epoch != '\0') {
    e.reproducible = true;
    e.source_date_epoch = std::strtoll(epoch, nullptr, 10);
  }
  e.reproducible |= reproducible;
  request.policy_file = policy_file;
  if (timeout_s > 0) request.layer_timeout_ms = static_cast<uint64_t>(timeout_s * 1000);
  if (job_timeout_s > 0) request.job_timeout_ms = static_cast<uint64_t>(job_timeout_s * 1000);
  request.connect = connect;
  request.registry = registry;
  request.cancel = &g_cancel;
  request.log = log;
  request.min_log_level = level;
  // A progress line on a terminal: the layer, how much of its blob went in,
  // how many entries came back.
  bool progress_shown = false;
  if (tty && level != LogLevel::kError) {
    request.progress = [&progress_shown](const layerx::Progress& p) {
      std::string line = fmt::format("layer {}/{}", p.layer, p.layers);
      if (p.blob_bytes > 0) {
        int filled =
            static_cast<int>(24 * std::min<uint64_t>(p.bytes_fed, p.blob_bytes) / p.blob_bytes);
        line += fmt::format(" [{}{}] {:.1f}/{:.1f} MB", std::string(filled, '#'),
                            std::string(24 - filled, '.'), p.bytes_fed / 1e6, p.blob_bytes / 1e6);
      } else {
        line += fmt::format(" {:.1f} MB", p.bytes_fed / 1e6);
      }
      line += fmt::format("  {} entries", p.entries);
      std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), p.done ? "\n" : "");
      progress_shown = !p.done;
    };
  }

  layerx::ExtractResult result = layerx::Extract(request);
  if (!result.ok()) {
    if (progress_shown) std::fputs("\r\033[K", stderr);
    PrintError(result.error());
    return ExitStatus(result.error());
  }
  if (json) std::printf("%s\n", layerx::ToJson(result.report()).c_str());
  return 0;
}
