// The translations between the public types (include/layerx/layerx.hpp) and
// the engine's, shared by the public API (broker/api) and the service
// (broker/service). Nothing here decides anything about layers.
#include "broker/bridge/bridge.h"

#include <signal.h>
#include <time.h>

#include "broker/engine/job.h"
#include "broker/log/logging.h"
#include "broker/source/registry_auth.h"
#include "layerx/layerx.hpp"
#include "policy/policy_file.h"

#ifndef LAYERX_VERSION
#error "LAYERX_VERSION must be defined by the build"
#endif

namespace layerx {

namespace detail {

FailureKind PublicKind(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kOs:
      return FailureKind::kIo;
    case ErrorKind::kInvalidInput:
      return FailureKind::kInvalidInput;
    case ErrorKind::kSafetyViolation:
    case ErrorKind::kLimitExceeded:
    case ErrorKind::kRefused:
      return FailureKind::kRefused;
    case ErrorKind::kPolicy:
      return FailureKind::kUsage;
    case ErrorKind::kPeer:
      return FailureKind::kSandbox;
    case ErrorKind::kIntegrity:
      return FailureKind::kIntegrity;
    case ErrorKind::kCancelled:
      return FailureKind::kCancelled;
    case ErrorKind::kInternal:
      break;
  }
  return FailureKind::kInternal;
}

// The one line of an ExtractError, whatever the bytes in it.
std::string OneLine(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return text;
}

ExtractError PublicError(const Error& error) {
  ExtractError out;
  out.kind = PublicKind(error.kind());
  out.sys_errno = error.err();
  out.layer_index = error.layer_index();
  out.layer = error.layer_name();
  out.entry = error.entry();
  out.reason = error.message();
  out.message = OneLine(error.ToString());  // names in it are {:?}-escaped already
  return out;
}

// Writing to the pipe of an extractor that died raises SIGPIPE in the writing
// thread. A library may not change the process's disposition, so the signal
// is blocked on this thread for the call, and one left pending by it is taken
// before the mask is restored (the write itself failed with EPIPE).
SigpipeBlock::SigpipeBlock() {
  sigemptyset(&pipe_);
  sigaddset(&pipe_, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
}

SigpipeBlock::~SigpipeBlock() {
  if (!sigismember(&old_, SIGPIPE)) {
    sigset_t pending;
    struct timespec zero = {0, 0};
    while (sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) &&
           sigtimedwait(&pipe_, nullptr, &zero) == SIGPIPE) {
    }
  }
  pthread_sigmask(SIG_SETMASK, &old_, nullptr);
}

ExtractError MakePublicError(FailureKind kind, std::string reason, int sys_errno) {
  ExtractError out;
  out.kind = kind;
  out.sys_errno = sys_errno;
  out.reason = std::move(reason);
  out.message = OneLine(out.reason);
  return out;
}

LogLevel PublicLevel(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace:
    case spdlog::level::debug:
      return LogLevel::kDebug;
    case spdlog::level::info:
      return LogLevel::kInfo;
    case spdlog::level::warn:
      return LogLevel::kWarn;
    default:
      return LogLevel::kError;
  }
}

spdlog::level::level_enum InternalLevel(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return spdlog::level::debug;
    case LogLevel::kInfo:
      return spdlog::level::info;
    case LogLevel::kWarn:
      return spdlog::level::warn;
    case LogLevel::kError:
      break;
  }
  return spdlog::level::err;
}

broker::LogFunction InternalLog(const ExtractRequest& request) {
  if (!request.log) return {};
  return
      [&fn = request.log](spdlog::level::level_enum level, std::string_view component,
                          std::string_view message) { fn(PublicLevel(level), component, message); };
}

Result<policy::Policy> LoadPolicy(const std::string& file, const std::string& toml) {
  policy::Policy policy = policy::DefaultPolicy();
  if (!file.empty()) {
    LX_ASSIGN_OR_RETURN(policy, policy::LoadPolicyFile(file));
  }
  if (!toml.empty()) {
    LX_ASSIGN_OR_RETURN(policy, policy::ParsePolicyToml(toml, "policy text", std::move(policy)));
  }
  return policy;
}

Result<broker::Platform> ParsePlatform(const std::string& text) {
  if (text.empty()) return broker::Platform::Host();
  return broker::Platform::Parse(text);
}

Result<broker::Ext4Options> InternalExt4(const Ext4Settings& e) {
  broker::Ext4Options out;
  if (e.block_size != 1024 && e.block_size != 2048 && e.block_size != 4096) {
    return Fail(
        MakeError(ErrorKind::kPolicy, "ext4 block size {}: 1024, 2048 or 4096", e.block_size));
  }
  if (e.label.size() > 16) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 label {:?}: at most 16 bytes", e.label));
  }
  if (e.inode_ratio != 0 && (e.inode_ratio < 1024 || e.inode_ratio > 67108864)) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 inode ratio {}: 1024 to 67108864 bytes",
                          e.inode_ratio));
  }
  // 8-4-4-4-12 hex digits and nothing else: it ends up in mkfs.ext4's -E list.
  auto uuid_ok = [](const std::string& u) {
    if (u.size() != 36) return false;
    for (size_t i = 0; i < u.size(); ++i) {
      bool dash = i == 8 || i == 13 || i == 18 || i == 23;
      if (dash ? u[i] != '-' : !std::isxdigit(static_cast<unsigned char>(u[i]))) return false;
    }
    return true;
  };
  if (!e.uuid.empty() && !uuid_ok(e.uuid)) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 uuid {:?}: not 8-4-4-4-12 hex digits", e.uuid));
  }
  if (e.size_bytes > 0) out.size_bytes = e.size_bytes;
  out.block_size = e.block_size;
  if (e.inode_ratio > 0) out.inode_ratio = e.inode_ratio;
  out.label = e.label;
  if (!e.uuid.empty()) out.uuid = e.uuid;
  out.reproducible = e.reproducible;
  if (e.source_date_epoch >= 0) out.source_date_epoch = e.source_date_epoch;

  return out;
}

Result<broker::PullOptions> PullOptionsFrom(const RegistrySettings& r) {
  if (r.parallel_downloads < 0 || r.parallel_downloads > 16) {
    return Fail(MakeError(ErrorKind::kPolicy, "parallel downloads: {} is not within 0..16",
                          r.parallel_downloads));
  }
  broker::PullOptions out;
  if (!r.creds.empty()) {
    // A malformed --creds fails before anything runs.
    if (auto creds = broker::ParseCreds(r.creds); !creds) return Fail(std::move(creds).error());
    out.creds = r.creds;
  }
  out.auth_file = r.auth_file;
  out.cert_dir = r.cert_dir;
  out.tls_verify = r.tls_verify;
  out.registries_conf = r.registries_conf;
  out.signature_policy = r.signature_policy;
  out.blob_cache = r.blob_cache;
  out.parallel = static_cast<unsigned>(r.parallel_downloads);
  return out;
}

Result<broker::ExtractRequest> InternalRequest(const ExtractRequest& r) {
  broker::ExtractRequest out;
  out.layers = r.sources;
  LX_ASSIGN_OR_RETURN(out.platform, ParsePlatform(r.platform));
  if (!r.rootfs.empty()) out.rootfs = r.rootfs;
  if (!r.ext4.empty()) out.ext4 = r.ext4;
  if (!r.manifest.empty()) out.manifest = r.manifest;
  if (!r.config.empty()) out.config = r.config;
  LX_ASSIGN_OR_RETURN(out.ext4_options, InternalExt4(r.ext4_settings));

  LX_ASSIGN_OR_RETURN(policy::Policy base, LoadPolicy(r.policy_file, r.policy_toml));
  policy::PolicyBuilder builder(std::move(base));
  if (r.layer_timeout_ms > 0) builder.LayerTimeoutMs(r.layer_timeout_ms);
  if (r.job_timeout_ms > 0) builder.JobTimeoutMs(r.job_timeout_ms);
  LX_ASSIGN_OR_RETURN(out.policy, builder.Build());
  out.scratch_dir = r.scratch_dir;
  out.extractor_path = r.extractor_path;
  LX_ASSIGN_OR_RETURN(out.pull, PullOptionsFrom(r.registry));
  if (r.cancel != nullptr) out.cancel = r.cancel->flag();
  if (r.progress) {
    out.progress = [&fn = r.progress](const broker::LayerProgress& p) {
      fn(Progress{.layer = p.index,
                  .layers = p.layers,
                  .bytes_fed = p.bytes_fed,
                  .blob_bytes = p.blob_bytes,
                  .entries = p.records,
                  .done = p.done});
    };
  }
  return out;
}

ExtractReport PublicReport(const broker::JobReport& job) {
  ExtractReport out;
  out.entries = job.final_entries;
  out.seconds = job.total_ns / 1e9;
  out.manifest_digest = job.manifest_digest;
  for (const broker::LayerReport& l : job.layers) {
    out.layers.push_back(LayerSummary{.index = l.index,
                                      .name = l.path,
                                      .digest = l.compressed_digest,
                                      .diff_id = l.uncompressed_digest,
                                      .compressed_bytes = l.compressed_bytes,
                                      .uncompressed_bytes = l.uncompressed_bytes,
                                      .entries = l.entries,
                                      .file_bytes = l.file_bytes,
                                      .setup_ms = l.setup_ns / 1e6,
                                      .extract_ms = l.extract_ns / 1e6,
                                      .send_ms = l.send_ns / 1e6,
                                      .merge_ms = l.merge_ns / 1e6,
                                      .total_ms = l.total_ns / 1e6,
                                      .extractor_peak_rss_kib = l.extractor_peak_rss_kib});
  }
  if (job.ext4) {
    out.ext4 = Ext4Summary{.size_bytes = job.ext4->plan.size_bytes,
                           .content_bytes = job.ext4->plan.content_bytes,
                           .inodes = job.ext4->plan.inodes,
                           .dead_bytes = job.ext4->plan.dead_bytes,
                           .build_ms = job.ext4->build_ns / 1e6};
  }
  return out;
}

}  // namespace detail

using namespace detail;

const char* Version() { return LAYERX_VERSION; }

const char* FailureKindName(FailureKind kind) {
  switch (kind) {
    case FailureKind::kRefused:
      return "refused";
    case FailureKind::kInvalidInput:
      return "invalid input";
    case FailureKind::kIntegrity:
      return "integrity";
    case FailureKind::kSandbox:
      return "sandbox";
    case FailureKind::kIo:
      return "i/o";
    case FailureKind::kUsage:
      return "usage";
    case FailureKind::kCancelled:
      return "cancelled";
    case FailureKind::kBusy:
      return "busy";
    case FailureKind::kUnauthorized:
      return "unauthorized";
    case FailureKind::kInternal:
      break;
  }
  return "internal";
}

}  // namespace layerx
