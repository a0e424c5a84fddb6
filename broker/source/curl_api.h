// libcurl, loaded the first time a registry is used: dlopen of libcurl.so.4
// (Debian's libcurl4), its functions called through CurlApi. Linked, it and
// the 32 libraries it pulls in (TLS, LDAP, Kerberos, SSH, RTMP...) would be
// mapped into every process that links layerx: every local extract, and the
// service, whose pulls run in its clients. Here that cost 444 page faults and
// ~14 ms at every start. Not installed.
#pragma once

#include <curl/curl.h>
#include <time.h>

#include <string>

#include "policy/result.h"

namespace layerx::broker {

struct CurlApi {
  CURLcode (*global_init)(long flags);
  CURL* (*easy_init)();
  void (*easy_cleanup)(CURL* curl);
  CURLcode (*easy_setopt)(CURL* curl, CURLoption option, ...);
  CURLcode (*easy_getinfo)(CURL* curl, CURLINFO info, ...);
  void (*easy_reset)(CURL* curl);
  const char* (*easy_strerror)(CURLcode code);
  char* (*easy_escape)(CURL* curl, const char* string, int length);
  void (*free)(void* p);
  time_t (*getdate)(const char* p, const time_t* unused);
  CURLM* (*multi_init)();
  CURLMcode (*multi_cleanup)(CURLM* multi);
  CURLMcode (*multi_add_handle)(CURLM* multi, CURL* curl);
  CURLMcode (*multi_remove_handle)(CURLM* multi, CURL* curl);
  CURLMcode (*multi_perform)(CURLM* multi, int* running);
  CURLMcode (*multi_poll)(CURLM* multi, struct curl_waitfd extra_fds[], unsigned int extra_nfds,
                          int timeout_ms, int* ret);
  CURLMsg* (*multi_info_read)(CURLM* multi, int* msgs_in_queue);
  const char* (*multi_strerror)(CURLMcode code);
  struct curl_slist* (*slist_append)(struct curl_slist* list, const char* string);
  void (*slist_free_all)(struct curl_slist* list);
  // Its TLS is the OpenSSL 3 layerx links (Debian's libcurl4): only then may
  // CURLOPT_SSL_CTX_FUNCTION hand its SSL_CTX to layerx's OpenSSL calls.
  bool openssl3 = false;
  std::string ssl_version;  // as curl_version_info says it ("OpenSSL/3.0.19")
};

// Loads libcurl and runs curl_global_init, once per process (thread-safe);
// the same answer every time after. kOs naming the library when it is not
// there or lacks a function.
Status LoadCurl();

// The loaded functions: only after LoadCurl() succeeded.
const CurlApi& Curl();

}  // namespace layerx::broker
