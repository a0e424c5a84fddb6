// The C ABI (include/layerx/layerx.h): opaque handles over the C++ API. No
// exception crosses it: allocation failure is LAYERX_E_NOMEM, anything else
// unexpected LAYERX_E_INTERNAL.
#include <new>
#include <string>

#include "layerx/layerx.h"
#include "layerx/layerx.hpp"

struct layerx_request {
  layerx::ExtractRequest request;
  layerx_log_fn log_fn = nullptr;
  void* log_user = nullptr;
  layerx_progress_fn progress_fn = nullptr;
  void* progress_user = nullptr;
};

struct layerx_result {
  layerx_status status = LAYERX_OK;
  layerx::ExtractError error;
  std::string json;
  uint64_t entries = 0;
  size_t layers = 0;
};

struct layerx_cancel {
  layerx::CancelToken token;
};

namespace {

layerx_status StatusOf(layerx::FailureKind kind) {
  switch (kind) {
    case layerx::FailureKind::kRefused:
      return LAYERX_E_REFUSED;
    case layerx::FailureKind::kInvalidInput:
      return LAYERX_E_INVALID_INPUT;
    case layerx::FailureKind::kIntegrity:
      return LAYERX_E_INTEGRITY;
    case layerx::FailureKind::kSandbox:
      return LAYERX_E_SANDBOX;
    case layerx::FailureKind::kIo:
      return LAYERX_E_IO;
    case layerx::FailureKind::kUsage:
      return LAYERX_E_USAGE;
    case layerx::FailureKind::kCancelled:
      return LAYERX_E_CANCELLED;
    case layerx::FailureKind::kBusy:
      return LAYERX_E_BUSY;
    case layerx::FailureKind::kUnauthorized:
      return LAYERX_E_UNAUTHORIZED;
    case layerx::FailureKind::kInternal:
      break;
  }
  return LAYERX_E_INTERNAL;
}

// Runs `body` (which fills `result`), turning a stray exception into a status.
template <typename Body>
layerx_status Run(layerx_result** out, Body body) {
  if (out == nullptr) return LAYERX_E_USAGE;
  *out = nullptr;
  auto* result = new (std::nothrow) layerx_result;
  if (result == nullptr) return LAYERX_E_NOMEM;
  try {
    body(*result);
  } catch (const std::bad_alloc&) {
    delete result;
    return LAYERX_E_NOMEM;
  } catch (...) {
    result->status = LAYERX_E_INTERNAL;
    result->error = layerx::ExtractError{};
    result->error.message = result->error.reason = "unexpected exception";
  }
  *out = result;
  return result->status;
}

void SetFailure(layerx_result& result, layerx::ExtractError error) {
  result.status = StatusOf(error.kind);
  result.error = std::move(error);
}

// The setters: copy a C string into `field` (NULL clears it).
layerx_status SetString(std::string& field, const char* value) {
  try {
    field = value != nullptr ? value : "";
  } catch (...) {
    return LAYERX_E_NOMEM;
  }
  return LAYERX_OK;
}

// The request's C log callback as the C++ API takes it (empty when none).
std::function<void(layerx::LogLevel, std::string_view, std::string_view)> CLog(
    const layerx_request& request) {
  if (request.log_fn == nullptr) return {};
  return [fn = request.log_fn, user = request.log_user](
             layerx::LogLevel level, std::string_view component, std::string_view message) {
    std::string c(component), m(message);
    fn(user, static_cast<int>(level), c.c_str(), m.c_str());
  };
}

}  // namespace

extern "C" {

const char* layerx_version(void) { return layerx::Version(); }

const char* layerx_status_name(layerx_status status) {
  switch (status) {
    case LAYERX_OK:
      return "ok";
    case LAYERX_E_REFUSED:
      return "refused";
    case LAYERX_E_INVALID_INPUT:
      return "invalid input";
    case LAYERX_E_INTEGRITY:
      return "integrity";
    case LAYERX_E_SANDBOX:
      return "sandbox";
    case LAYERX_E_IO:
      return "i/o";
    case LAYERX_E_USAGE:
      return "usage";
    case LAYERX_E_CANCELLED:
      return "cancelled";
    case LAYERX_E_INTERNAL:
      return "internal";
    case LAYERX_E_NOMEM:
      return "out of memory";
    case LAYERX_E_BUSY:
      return "busy";
    case LAYERX_E_UNAUTHORIZED:
      return "unauthorized";
  }
  return "unknown";
}

layerx_request* layerx_request_new(void) { return new (std::nothrow) layerx_request; }

void layerx_request_free(layerx_request* request) { delete request; }

layerx_status layerx_request_add_source(layerx_request* request, const char* source) {
  if (request == nullptr || source == nullptr || *source == '\0') return LAYERX_E_USAGE;
  try {
    request->request.sources.emplace_back(source);
  } catch (...) {
    return LAYERX_E_NOMEM;
  }
  return LAYERX_OK;
}

layerx_status layerx_request_set_output(layerx_request* request, layerx_output output,
                                        const char* path) {
  if (request == nullptr) return LAYERX_E_USAGE;
  layerx::ExtractRequest& r = request->request;
  switch (output) {
    case LAYERX_OUTPUT_ROOTFS:
      return SetString(r.rootfs, path);
    case LAYERX_OUTPUT_EXT4:
      return SetString(r.ext4, path);
    case LAYERX_OUTPUT_MANIFEST:
      return SetString(r.manifest, path);
    case LAYERX_OUTPUT_CONFIG:
      return SetString(r.config, path);
  }
  return LAYERX_E_USAGE;
}

layerx_status layerx_request_set_string(layerx_request* request, layerx_option option,
                                        const char* value) {
  if (request == nullptr) return LAYERX_E_USAGE;
  layerx::ExtractRequest& r = request->request;
  switch (option) {
    case LAYERX_OPT_PLATFORM:
      return SetString(r.platform, value);
    case LAYERX_OPT_POLICY_FILE:
      return SetString(r.policy_file, value);
    case LAYERX_OPT_POLICY_TOML:
      return SetString(r.policy_toml, value);
    case LAYERX_OPT_SCRATCH_DIR:
      return SetString(r.scratch_dir, value);
    case LAYERX_OPT_EXTRACTOR_PATH:
      return SetString(r.extractor_path, value);
    case LAYERX_OPT_EXT4_LABEL:
      return SetString(r.ext4_settings.label, value);
    case LAYERX_OPT_EXT4_UUID:
      return SetString(r.ext4_settings.uuid, value);
    case LAYERX_OPT_CONNECT:
      return SetString(r.connect, value);
    case LAYERX_OPT_CREDS:
      return SetString(r.registry.creds, value);
    case LAYERX_OPT_AUTH_FILE:
      return SetString(r.registry.auth_file, value);
    case LAYERX_OPT_CERT_DIR:
      return SetString(r.registry.cert_dir, value);
    case LAYERX_OPT_BLOB_CACHE:
      return SetString(r.registry.blob_cache, value);
    case LAYERX_OPT_REGISTRIES_CONF:
      return SetString(r.registry.registries_conf, value);
    case LAYERX_OPT_SIGNATURE_POLICY:
      return SetString(r.registry.signature_policy, value);
    default:
      return LAYERX_E_USAGE;
  }
}

layerx_status layerx_request_set_int(layerx_request* request, layerx_option option, int64_t value) {
  if (request == nullptr) return LAYERX_E_USAGE;
  layerx::ExtractRequest& r = request->request;
  bool negative = value < 0;
  auto u64 = static_cast<uint64_t>(value);
  switch (option) {
    case LAYERX_OPT_EXT4_SIZE:
      if (negative) return LAYERX_E_USAGE;
      r.ext4_settings.size_bytes = u64;
      return LAYERX_OK;
    case LAYERX_OPT_EXT4_BLOCK_SIZE:
      if (value != 1024 && value != 2048 && value != 4096) return LAYERX_E_USAGE;
      r.ext4_settings.block_size = static_cast<uint32_t>(value);
      return LAYERX_OK;
    case LAYERX_OPT_EXT4_INODE_RATIO:
      if (negative || value > UINT32_MAX) return LAYERX_E_USAGE;
      r.ext4_settings.inode_ratio = static_cast<uint32_t>(value);
      return LAYERX_OK;
    case LAYERX_OPT_REPRODUCIBLE:
      r.ext4_settings.reproducible = value != 0;
      return LAYERX_OK;
    case LAYERX_OPT_SOURCE_DATE_EPOCH:
      r.ext4_settings.source_date_epoch = negative ? -1 : value;
      return LAYERX_OK;
    case LAYERX_OPT_LAYER_TIMEOUT_MS:
      if (negative) return LAYERX_E_USAGE;
      r.layer_timeout_ms = u64;
      return LAYERX_OK;
    case LAYERX_OPT_JOB_TIMEOUT_MS:
      if (negative) return LAYERX_E_USAGE;
      r.job_timeout_ms = u64;
      return LAYERX_OK;
    case LAYERX_OPT_TLS_VERIFY:  // negative: unset again (registries.conf decides)
      if (negative) {
        r.registry.tls_verify.reset();
      } else {
        r.registry.tls_verify = value != 0;
      }
      return LAYERX_OK;
    case LAYERX_OPT_PARALLEL_DOWNLOADS:
      if (negative || value > 16) return LAYERX_E_USAGE;
      r.registry.parallel_downloads = static_cast<int>(value);
      return LAYERX_OK;
    default:
      return LAYERX_E_USAGE;
  }
}

layerx_status layerx_request_set_log(layerx_request* request, layerx_log_fn fn, int min_level,
                                     void* user) {
  if (request == nullptr || min_level < 1 || min_level > 4) return LAYERX_E_USAGE;
  request->log_fn = fn;
  request->log_user = user;
  request->request.min_log_level = static_cast<layerx::LogLevel>(min_level);
  return LAYERX_OK;
}

layerx_status layerx_request_set_progress(layerx_request* request, layerx_progress_fn fn,
                                          void* user) {
  if (request == nullptr) return LAYERX_E_USAGE;
  request->progress_fn = fn;
  request->progress_user = user;
  return LAYERX_OK;
}

layerx_cancel* layerx_cancel_new(void) { return new (std::nothrow) layerx_cancel; }

void layerx_cancel_trigger(layerx_cancel* cancel) {
  if (cancel != nullptr) cancel->token.Cancel();
}

void layerx_cancel_free(layerx_cancel* cancel) { delete cancel; }

layerx_status layerx_request_set_cancel(layerx_request* request, layerx_cancel* cancel) {
  if (request == nullptr) return LAYERX_E_USAGE;
  request->request.cancel = cancel != nullptr ? &cancel->token : nullptr;
  return LAYERX_OK;
}

layerx_status layerx_extract(const layerx_request* request, layerx_result** out) {
  if (request == nullptr) return out != nullptr ? (*out = nullptr, LAYERX_E_USAGE) : LAYERX_E_USAGE;
  return Run(out, [request](layerx_result& result) {
    layerx::ExtractRequest r = request->request;  // the callbacks are bound to this copy
    r.log = CLog(*request);
    if (request->progress_fn != nullptr) {
      r.progress = [fn = request->progress_fn,
                    user = request->progress_user](const layerx::Progress& p) {
        layerx_progress c = {
            sizeof(layerx_progress), p.layer, p.layers, p.bytes_fed, p.blob_bytes, p.entries,
            p.done ? 1 : 0};
        fn(user, &c);
      };
    }
    layerx::ExtractResult got = layerx::Extract(r);
    if (!got.ok()) return SetFailure(result, got.error());
    result.entries = got.report().entries;
    result.layers = got.report().layers.size();
    result.json = layerx::ToJson(got.report());
  });
}

layerx_status layerx_inspect(const layerx_request* request, layerx_result** out) {
  if (request == nullptr) return out != nullptr ? (*out = nullptr, LAYERX_E_USAGE) : LAYERX_E_USAGE;
  return Run(out, [request](layerx_result& result) {
    const layerx::ExtractRequest& r = request->request;
    layerx::ImageInfo info;
    layerx::ExtractError error;
    if (!layerx::Inspect(layerx::InspectRequest{.sources = r.sources,
                                                .platform = r.platform,
                                                .policy_file = r.policy_file,
                                                .extractor_path = r.extractor_path,
                                                .registry = r.registry},
                         &info, &error, CLog(*request), r.min_log_level)) {
      return SetFailure(result, std::move(error));
    }
    result.layers = info.layers.size();
    result.json = layerx::ToJson(info);
  });
}

layerx_status layerx_policy_show(const layerx_request* request, layerx_result** out) {
  if (request == nullptr) return out != nullptr ? (*out = nullptr, LAYERX_E_USAGE) : LAYERX_E_USAGE;
  return Run(out, [request](layerx_result& result) {
    layerx::ExtractError error;
    if (!layerx::ShowPolicy(request->request.policy_file, request->request.policy_toml,
                            &result.json, &error)) {
      SetFailure(result, std::move(error));
    }
  });
}

void layerx_result_free(layerx_result* result) { delete result; }

layerx_status layerx_result_status(const layerx_result* result) {
  return result != nullptr ? result->status : LAYERX_E_USAGE;
}

const char* layerx_result_message(const layerx_result* result) {
  return result != nullptr ? result->error.message.c_str() : "";
}

const char* layerx_result_reason(const layerx_result* result) {
  return result != nullptr ? result->error.reason.c_str() : "";
}

int layerx_result_errno(const layerx_result* result) {
  return result != nullptr ? result->error.sys_errno : 0;
}

size_t layerx_result_layer_index(const layerx_result* result) {
  return result != nullptr ? result->error.layer_index : 0;
}

const char* layerx_result_layer_name(const layerx_result* result) {
  return result != nullptr ? result->error.layer.c_str() : "";
}

const char* layerx_result_entry(const layerx_result* result, size_t* size) {
  if (result == nullptr) {
    if (size != nullptr) *size = 0;
    return "";
  }
  if (size != nullptr) *size = result->error.entry.size();
  return result->error.entry.c_str();
}

const char* layerx_result_json(const layerx_result* result) {
  return result != nullptr && result->status == LAYERX_OK ? result->json.c_str() : "";
}

uint64_t layerx_result_entries(const layerx_result* result) {
  return result != nullptr ? result->entries : 0;
}

size_t layerx_result_layer_count(const layerx_result* result) {
  return result != nullptr ? result->layers : 0;
}

}  // extern "C"
