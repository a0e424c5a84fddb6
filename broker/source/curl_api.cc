#include "broker/source/curl_api.h"

#include <dlfcn.h>

#include <mutex>
#include <optional>
#include <type_traits>

namespace layerx::broker {

namespace {

CurlApi g_api;
std::optional<Error> g_failure;  // set once, when loading failed

// Every function, and the library itself, or the first thing missing.
std::optional<Error> Load() {
  constexpr const char* kLibrary = "libcurl.so.4";
  // RTLD_LOCAL: its symbols stay out of the global scope (a program that
  // links another libcurl, or none, is not disturbed). Never closed.
  void* lib = ::dlopen(kLibrary, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = ::dlerror();
    return MakeError(ErrorKind::kOs, "registry: cannot load {} (install libcurl4): {}", kLibrary,
                     why != nullptr ? why : "?");
  }
  std::optional<Error> missing;
  auto bind = [&](auto& fn, const char* name) {
    void* sym = ::dlsym(lib, name);
    if (sym == nullptr && !missing) {
      missing = MakeError(ErrorKind::kOs, "registry: {} has no {}", kLibrary, name);
    }
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(sym);
  };
  bind(g_api.global_init, "curl_global_init");
  bind(g_api.easy_init, "curl_easy_init");
  bind(g_api.easy_cleanup, "curl_easy_cleanup");
  bind(g_api.easy_setopt, "curl_easy_setopt");
  bind(g_api.easy_getinfo, "curl_easy_getinfo");
  bind(g_api.easy_reset, "curl_easy_reset");
  bind(g_api.easy_strerror, "curl_easy_strerror");
  bind(g_api.easy_escape, "curl_easy_escape");
  bind(g_api.free, "curl_free");
  bind(g_api.getdate, "curl_getdate");
  bind(g_api.multi_init, "curl_multi_init");
  bind(g_api.multi_cleanup, "curl_multi_cleanup");
  bind(g_api.multi_add_handle, "curl_multi_add_handle");
  bind(g_api.multi_remove_handle, "curl_multi_remove_handle");
  bind(g_api.multi_perform, "curl_multi_perform");
  bind(g_api.multi_poll, "curl_multi_poll");
  bind(g_api.multi_info_read, "curl_multi_info_read");
  bind(g_api.multi_strerror, "curl_multi_strerror");
  bind(g_api.slist_append, "curl_slist_append");
  bind(g_api.slist_free_all, "curl_slist_free_all");
  curl_version_info_data* (*version_info)(CURLversion) = nullptr;
  bind(version_info, "curl_version_info");
  if (missing) return missing;
  if (CURLcode rc = g_api.global_init(CURL_GLOBAL_DEFAULT); rc != CURLE_OK) {
    return MakeError(ErrorKind::kOs, "registry: curl_global_init: {}", g_api.easy_strerror(rc));
  }
  const curl_version_info_data* info = version_info(CURLVERSION_NOW);
  if (info != nullptr && info->ssl_version != nullptr) g_api.ssl_version = info->ssl_version;
  g_api.openssl3 = g_api.ssl_version.starts_with("OpenSSL/3.");
  return std::nullopt;
}

}  // namespace

Status LoadCurl() {
  static std::once_flag once;
  std::call_once(once, [] { g_failure = Load(); });
  if (g_failure) return Fail(*g_failure);
  return {};
}

const CurlApi& Curl() { return g_api; }

}  // namespace layerx::broker
