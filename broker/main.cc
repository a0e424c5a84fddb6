// `layerx`: the command line. A thin user of the broker's job API.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "broker/job.h"
#include "broker/logging.h"
#include "policy/policy_file.h"

namespace {

std::atomic<bool> g_cancel{false};

void OnSignal(int) { g_cancel.store(true); }

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

Examples:
  layerx extract oci:./image:latest --ext4 rootfs.img --config config.json
  layerx extract docker-archive:app.tar:app:v1 --rootfs ./rootfs
  layerx extract oci:./image:@sha256:... --platform linux/arm64 --rootfs ./rootfs
  layerx extract base.tar.gz app.tar.zst --rootfs ./rootfs
  layerx extract layer1.tar layer2.tar --rootfs out --manifest out.jsonl
  layerx extract base.tar.gz app.tar.gz --ext4 rootfs.img        # no root needed
  SOURCE_DATE_EPOCH=0 layerx extract l.tar --ext4 a.img --label root  # reproducible

Exit status: 0 ok, 1 refused or failed, 2 usage error.)";

void PrintError(const layerx::Error& error) {
  // One line, whatever the bytes of the names in it ({:?} escaped them).
  std::string line = error.ToString();
  for (char& c : line) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  std::fprintf(stderr, "layerx: %s\n", line.c_str());
}

// The default policy, or the one in `path` read over it.
layerx::Result<layerx::policy::Policy> LoadPolicy(const std::string& path) {
  if (path.empty()) return layerx::policy::DefaultPolicy();
  return layerx::policy::LoadPolicyFile(path);
}

int Inspect(const std::vector<std::string>& sources, const std::string& platform, bool as_json,
            const std::string& policy_file) {
  using namespace layerx;
  auto policy = LoadPolicy(policy_file);
  if (!policy) {
    PrintError(policy.error());
    return 2;
  }
  broker::InspectRequest request{.sources = sources, .policy = *policy};
  if (!platform.empty()) {
    auto parsed = broker::Platform::Parse(platform);
    if (!parsed) {
      PrintError(parsed.error());
      return 2;
    }
    request.platform = *parsed;
  }
  auto info = broker::Inspect(request);
  if (!info) {
    PrintError(info.error());
    return info.error().kind() == ErrorKind::kPolicy ? 2 : 1;
  }
  nlohmann::ordered_json config = nlohmann::ordered_json::parse(info->config, nullptr, false);
  nlohmann::ordered_json summary = nlohmann::ordered_json::object();
  if (config.is_object()) {
    for (const char* key : {"os", "architecture", "variant"}) {
      if (config.contains(key)) summary[key] = config[key];
    }
    if (config.contains("config") && config["config"].is_object()) {
      for (const char* key :
           {"User", "Env", "Entrypoint", "Cmd", "WorkingDir", "ExposedPorts", "Labels"}) {
        if (config["config"].contains(key)) summary[key] = config["config"][key];
      }
    }
  }
  if (as_json) {
    nlohmann::ordered_json out;
    if (!info->manifest_digest.empty()) out["manifest_digest"] = info->manifest_digest;
    if (!info->config_digest.empty()) out["config_digest"] = info->config_digest;
    out["layers"] = nlohmann::ordered_json::array();
    for (size_t i = 0; i < info->layers.size(); ++i) {
      const auto& l = info->layers[i];
      out["layers"].push_back({{"index", i + 1},
                               {"name", l.name},
                               {"digest", l.digest},
                               {"diff_id", l.diff_id},
                               {"media_type", l.media_type},
                               {"size", l.size}});
    }
    out["config"] = summary;
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  if (!info->manifest_digest.empty()) std::printf("manifest  %s\n", info->manifest_digest.c_str());
  if (!info->config_digest.empty()) std::printf("config    %s\n", info->config_digest.c_str());
  for (size_t i = 0; i < info->layers.size(); ++i) {
    const auto& l = info->layers[i];
    std::printf("layer %-3zu %s  %12llu bytes  %s\n          diff_id %s\n", i + 1,
                l.digest.empty() ? l.name.c_str() : l.digest.c_str(),
                static_cast<unsigned long long>(l.size), l.media_type.c_str(),
                l.diff_id.empty() ? "-" : l.diff_id.c_str());
  }
  for (auto it = summary.begin(); it != summary.end(); ++it) {
    std::printf("%-10s %s\n", it.key().c_str(), it.value().dump().c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace layerx;
  CLI::App app{"layerx: extract untrusted container image layers in a jail"};
  app.set_version_flag("--version", std::string("layerx ") + LAYERX_VERSION);
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
                   "oci:DIR[:REF], docker-archive:FILE[:REF], or layer files "
                   "lowest first")
      ->required();
  extract->add_option("--platform", platform,
                      "os/arch[/variant] to pick from a multi-platform index (default: this "
                      "machine's)");
  extract->add_option("--config", config, "write the image's config JSON here (image sources)");
  extract->add_option("--rootfs", rootfs, "write the rootfs here (must not exist)");
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
  extract->add_flag("-v,--verbose", verbosity, "more logging (-vv for debug)");
  extract->add_flag("-q,--quiet", quiet, "errors only");

  CLI::App* inspect =
      app.add_subcommand("inspect", "show the layers and config of an image source");
  inspect->footer(
      "Resolves SOURCE as extract would (oci:DIR[:REF], docker-archive:FILE[:REF] or layer\n"
      "files) and prints each layer's digest, diff_id, media type and size, and the config.\n"
      "Manifest and config are checked against their digests; layers are not read.\n\n"
      "Example:\n  layerx inspect oci:./image:latest --json");
  std::vector<std::string> inspect_sources;
  std::string inspect_platform;
  bool inspect_json = false;
  inspect->add_option("SOURCE", inspect_sources, "the image")->required();
  inspect->add_option("--platform", inspect_platform, "os/arch[/variant]");
  inspect->add_flag("--json", inspect_json, "print JSON");
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
  inspect->add_flag("-v,--verbose", verbosity, "more logging");
  inspect->add_flag("-q,--quiet", quiet, "errors only");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }

  auto level = quiet            ? spdlog::level::err
               : verbosity >= 2 ? spdlog::level::debug
               : verbosity == 1 ? spdlog::level::info
                                : spdlog::level::warn;
  broker::SetUpLogging(level);
  ::signal(SIGPIPE, SIG_IGN);  // a dead extractor is EPIPE on its input pipe
  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  if (inspect->parsed()) {
    return Inspect(inspect_sources, inspect_platform, inspect_json, policy_file);
  }
  if (policy_show->parsed()) {
    auto shown = LoadPolicy(policy_file);
    if (!shown) {
      PrintError(shown.error());
      return 2;
    }
    std::printf("%s", policy::FormatPolicyToml(*shown).c_str());
    return 0;
  }

  broker::ExtractRequest request;
  request.layers = layers;
  if (!rootfs.empty()) request.rootfs = rootfs;
  if (!manifest.empty()) request.manifest = manifest;
  if (!config.empty()) request.config = config;
  if (!platform.empty()) {
    auto parsed = broker::Platform::Parse(platform);
    if (!parsed) {
      std::fprintf(stderr, "layerx: %s\n", parsed.error().ToString().c_str());
      return 2;
    }
    request.platform = *parsed;
  }
  if (!ext4.empty()) request.ext4 = ext4;
  request.scratch_dir = scratch;
  if (size > 0) request.ext4_options.size_bytes = size;
  request.ext4_options.block_size = block_size;
  if (inode_ratio > 0) request.ext4_options.inode_ratio = inode_ratio;
  request.ext4_options.label = label;
  if (!uuid.empty()) request.ext4_options.uuid = uuid;
  if (const char* epoch = std::getenv("SOURCE_DATE_EPOCH"); epoch != nullptr && *epoch != '\0') {
    request.ext4_options.reproducible = true;
    request.ext4_options.source_date_epoch = std::strtoll(epoch, nullptr, 10);
  }
  request.ext4_options.reproducible |= reproducible;
  auto base = LoadPolicy(policy_file);
  if (!base) {
    PrintError(base.error());
    return 2;
  }
  policy::PolicyBuilder builder(*base);
  if (timeout_s > 0) builder.LayerTimeoutMs(static_cast<uint64_t>(timeout_s * 1000));
  if (job_timeout_s > 0) builder.JobTimeoutMs(static_cast<uint64_t>(job_timeout_s * 1000));
  auto policy = builder.Build();
  if (!policy) {
    PrintError(policy.error());
    return 2;
  }
  request.policy = *policy;
  request.cancel = &g_cancel;
  // A progress line on a terminal: the layer, how much of its blob went in,
  // how many entries came back.
  bool progress_shown = false;
  if (::isatty(STDERR_FILENO) && level != spdlog::level::err) {
    request.progress = [&progress_shown](const broker::LayerProgress& p) {
      std::string line = fmt::format("layer {}/{}", p.index, p.layers);
      if (p.blob_bytes > 0) {
        int filled =
            static_cast<int>(24 * std::min<uint64_t>(p.bytes_fed, p.blob_bytes) / p.blob_bytes);
        line += fmt::format(" [{}{}] {:.1f}/{:.1f} MB", std::string(filled, '#'),
                            std::string(24 - filled, '.'), p.bytes_fed / 1e6, p.blob_bytes / 1e6);
      } else {
        line += fmt::format(" {:.1f} MB", p.bytes_fed / 1e6);
      }
      line += fmt::format("  {} entries", p.records);
      std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), p.done ? "\n" : "");
      progress_shown = !p.done;
    };
  }

  auto report = broker::RunExtract(request);
  if (!report) {
    if (progress_shown) std::fputs("\r\033[K", stderr);
    PrintError(report.error());
    return report.error().kind() == ErrorKind::kPolicy ? 2 : 1;
  }
  if (json) {
    nlohmann::ordered_json out;
    out["entries"] = report->final_entries;
    out["seconds"] = report->total_ns / 1e9;
    if (!report->manifest_digest.empty()) out["manifest_digest"] = report->manifest_digest;
    if (report->ext4) {
      out["ext4"] = {{"size_bytes", report->ext4->plan.size_bytes},
                     {"content_bytes", report->ext4->plan.content_bytes},
                     {"inodes", report->ext4->plan.inodes},
                     {"mkfs_ms", report->ext4->mkfs_ns / 1e6},
                     {"ownership_pass_ms", report->ext4->pass_ns / 1e6}};
    }
    for (const auto& l : report->layers) {
      out["layers"].push_back({{"index", l.index},
                               {"path", l.path},
                               {"digest", l.compressed_digest},
                               {"diff_id", l.uncompressed_digest},
                               {"compressed_bytes", l.compressed_bytes},
                               {"uncompressed_bytes", l.uncompressed_bytes},
                               {"entries", l.entries},
                               {"file_bytes", l.file_bytes},
                               {"setup_ms", l.setup_ns / 1e6},
                               {"extract_ms", l.extract_ns / 1e6},
                               {"records_send_ms", l.send_ns / 1e6},
                               {"merge_ms", l.merge_ns / 1e6},
                               {"extractor_peak_rss_kib", l.extractor_peak_rss_kib},
                               {"total_ms", l.total_ns / 1e6}});
    }
    std::printf("%s\n", out.dump(2).c_str());
  }
  return 0;
}
