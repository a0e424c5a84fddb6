// broker/api: the public C++ API (include/layerx/layerx.hpp; this file) and C
// ABI (layerx.h; c_api.cc) over the engine and the service, and the public
// library (liblayerx.so, liblayerx.a; liblayerx.map says what the .so
// exports). May use: service, bridge, engine, log.
//
// Requests in, reports or structured errors out. Nothing here decides
// anything about layers; it translates (broker/bridge).
#include <nlohmann/json.hpp>

#include "broker/bridge/bridge.h"
#include "broker/engine/job.h"
#include "broker/log/logging.h"
#include "broker/service/service.h"
#include "layerx/layerx.hpp"
#include "policy/policy_file.h"

namespace layerx {

using namespace detail;
ExtractResult Extract(const ExtractRequest& request) {
  // Before the remote branch too: a docker:// pull runs in this process then,
  // and its lines go to the caller's log, not to stderr.
  broker::LogTarget target(InternalLog(request), InternalLevel(request.min_log_level));
  if (!request.connect.empty()) return RemoteExtract(request);
  SigpipeBlock sigpipe;
  auto internal = InternalRequest(request);
  if (!internal) return ExtractResult(PublicError(internal.error()));
  auto report = broker::RunExtract(*internal);
  if (!report) {
    broker::Logger("broker")->debug("extract failed: {}", report.error().ToString());
    return ExtractResult(PublicError(report.error()));
  }
  return ExtractResult(PublicReport(*report));
}

bool Inspect(const InspectRequest& request, ImageInfo* info, ExtractError* error) {
  return Inspect(request, info, error, {}, LogLevel::kError);
}

bool Inspect(const InspectRequest& request, ImageInfo* info, ExtractError* error,
             const std::function<void(LogLevel level, std::string_view component,
                                      std::string_view message)>& log,
             LogLevel min_log_level) {
  broker::LogFunction internal;
  if (log) {
    internal = [&log](spdlog::level::level_enum level, std::string_view component,
                      std::string_view message) { log(PublicLevel(level), component, message); };
  }
  broker::LogTarget target(internal, log ? InternalLevel(min_log_level) : spdlog::level::off);
  SigpipeBlock sigpipe;
  auto fail = [error](const Error& e) {
    if (error != nullptr) *error = PublicError(e);
    return false;
  };
  auto policy = LoadPolicy(request.policy_file, "");
  if (!policy) return fail(policy.error());
  auto platform = ParsePlatform(request.platform);
  if (!platform) return fail(platform.error());
  auto pull = PullOptionsFrom(request.registry);
  if (!pull) return fail(pull.error());
  auto got = broker::Inspect(broker::InspectRequest{.sources = request.sources,
                                                    .platform = *platform,
                                                    .policy = *policy,
                                                    .extractor_path = request.extractor_path,
                                                    .pull = *pull});
  if (!got) return fail(got.error());
  if (info == nullptr) return true;
  *info = ImageInfo{.manifest_digest = got->manifest_digest,
                    .config_digest = got->config_digest,
                    .config = got->config,
                    .layers = {}};
  for (const auto& l : got->layers) {
    info->layers.push_back(ImageInfo::Layer{.name = l.name,
                                            .digest = l.digest,
                                            .diff_id = l.diff_id,
                                            .media_type = l.media_type,
                                            .size = l.size});
  }
  return true;
}

bool ShowPolicy(const std::string& policy_file, const std::string& policy_toml, std::string* toml,
                ExtractError* error) {
  auto policy = LoadPolicy(policy_file, policy_toml);
  if (!policy) {
    if (error != nullptr) *error = PublicError(policy.error());
    return false;
  }
  if (toml != nullptr) *toml = policy::FormatPolicyToml(*policy);
  return true;
}

std::string ToJson(const ExtractReport& report) {
  nlohmann::ordered_json out;
  out["entries"] = report.entries;
  out["seconds"] = report.seconds;
  if (!report.manifest_digest.empty()) out["manifest_digest"] = report.manifest_digest;
  if (report.ext4) {
    out["ext4"] = {{"size_bytes", report.ext4->size_bytes},
                   {"content_bytes", report.ext4->content_bytes},
                   {"inodes", report.ext4->inodes},
                   {"dead_bytes", report.ext4->dead_bytes},
                   {"build_ms", report.ext4->build_ms}};
  }
  out["layers"] = nlohmann::ordered_json::array();
  for (const LayerSummary& l : report.layers) {
    out["layers"].push_back({{"index", l.index},
                             {"path", l.name},
                             {"digest", l.digest},
                             {"diff_id", l.diff_id},
                             {"compressed_bytes", l.compressed_bytes},
                             {"uncompressed_bytes", l.uncompressed_bytes},
                             {"entries", l.entries},
                             {"file_bytes", l.file_bytes},
                             {"setup_ms", l.setup_ms},
                             {"extract_ms", l.extract_ms},
                             {"records_send_ms", l.send_ms},
                             {"merge_ms", l.merge_ms},
                             {"extractor_peak_rss_kib", l.extractor_peak_rss_kib},
                             {"total_ms", l.total_ms}});
  }
  // Names are bytes: replace what is not UTF-8 rather than throw.
  return out.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

std::string ToJson(const ImageInfo& info) {
  nlohmann::ordered_json config = nlohmann::ordered_json::parse(info.config, nullptr, false);
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
  nlohmann::ordered_json out;
  if (!info.manifest_digest.empty()) out["manifest_digest"] = info.manifest_digest;
  if (!info.config_digest.empty()) out["config_digest"] = info.config_digest;
  out["layers"] = nlohmann::ordered_json::array();
  for (size_t i = 0; i < info.layers.size(); ++i) {
    const auto& l = info.layers[i];
    out["layers"].push_back({{"index", i + 1},
                             {"name", l.name},
                             {"digest", l.digest},
                             {"diff_id", l.diff_id},
                             {"media_type", l.media_type},
                             {"size", l.size}});
  }
  out["config"] = summary;
  return out.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

}  // namespace layerx
