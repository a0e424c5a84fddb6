/* layerx: extract untrusted container image layers, each in its own jail.
 *
 * The C ABI, for C and for every language with a C FFI (Go's cgo, Rust,
 * Python's ctypes). It is the C++ API of <layerx/layerx.hpp> behind opaque
 * handles; see there for how extraction runs and where the layerx-extractor
 * helper is looked for.
 *
 *   layerx_request *req = layerx_request_new();
 *   layerx_request_add_source(req, "oci:./image:latest");
 *   layerx_request_set_output(req, LAYERX_OUTPUT_EXT4, "rootfs.img");
 *   layerx_result *res = NULL;
 *   if (layerx_extract(req, &res) != LAYERX_OK)
 *     fprintf(stderr, "%s\n", layerx_result_message(res));
 *   layerx_result_free(res);
 *   layerx_request_free(req);
 *
 * Ownership: every handle a *_new or layerx_extract/layerx_inspect gives you
 * is yours to free with its *_free; NULL may be passed to every *_free. Strings
 * you pass in are copied; strings handed out are owned by the handle they come
 * from and live until it is freed.
 * Threads: one request or result handle must not be used from two threads at
 * once; different handles may. Callbacks run on the thread that called
 * layerx_extract, before it returns.
 * Errors: functions return a layerx_status; LAYERX_OK is 0. The setters fail
 * only with LAYERX_E_USAGE for a NULL handle or a bad argument.
 * ABI: the SONAME is liblayerx.so.0. Structs handed to callbacks begin with
 * their size; fields are only ever added at the end.
 */
#ifndef LAYERX_LAYERX_H
#define LAYERX_LAYERX_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define LAYERX_C_API __attribute__((visibility("default")))
#else
#define LAYERX_C_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum layerx_status {
  LAYERX_OK = 0,
  LAYERX_E_REFUSED = 1,       /* the policy said no: a limit, an entry rule, an escape,
                                 a registries.conf block, policy.json */
  LAYERX_E_INVALID_INPUT = 2, /* malformed layer or document */
  LAYERX_E_INTEGRITY = 3,     /* content does not match its digest, size or diff_id */
  LAYERX_E_SANDBOX = 4,       /* the jail failed, or the extractor died or lied */
  LAYERX_E_IO = 5,            /* the system said no (ENOSPC, EACCES, ...) */
  LAYERX_E_USAGE = 6,         /* a bad request or policy file */
  LAYERX_E_CANCELLED = 7,     /* cancelled, or out of time */
  LAYERX_E_INTERNAL = 8,      /* a bug in layerx */
  LAYERX_E_NOMEM = 9,         /* an allocation failed */
  LAYERX_E_BUSY = 10,         /* the service or the tenant is at its limit: try later */
  LAYERX_E_UNAUTHORIZED = 11  /* the service maps the caller to no tenant */
} layerx_status;

/* "0.1.0", the same as `layerx --version`. */
LAYERX_C_API const char *layerx_version(void);
/* "ok", "refused", "invalid input", ... Never NULL. */
LAYERX_C_API const char *layerx_status_name(layerx_status status);

typedef struct layerx_request layerx_request;
typedef struct layerx_result layerx_result;
typedef struct layerx_cancel layerx_cancel;

LAYERX_C_API layerx_request *layerx_request_new(void); /* NULL when out of memory */
LAYERX_C_API void layerx_request_free(layerx_request *request);

/* "oci:DIR[:REF]", "docker-archive:FILE[:REF]", "docker://REF", or a layer
 * file; layer files
 * are applied in the order added. */
LAYERX_C_API layerx_status layerx_request_add_source(layerx_request *request, const char *source);

typedef enum layerx_output {
  LAYERX_OUTPUT_ROOTFS = 1,   /* a new directory, or an existing empty one */
  LAYERX_OUTPUT_EXT4 = 2,     /* an ext4 image with true ownership */
  LAYERX_OUTPUT_MANIFEST = 3, /* JSON lines, one per path */
  LAYERX_OUTPUT_CONFIG = 4    /* the image config JSON (image sources) */
} layerx_output;
/* path NULL or "" removes that output. */
LAYERX_C_API layerx_status layerx_request_set_output(layerx_request *request, layerx_output output,
                                                     const char *path);

typedef enum layerx_option {
  LAYERX_OPT_PLATFORM = 1,       /* string: "os/arch[/variant]" */
  LAYERX_OPT_POLICY_FILE = 2,    /* string: a TOML policy file, read over the defaults */
  LAYERX_OPT_POLICY_TOML = 3,    /* string: TOML text, read over the file */
  LAYERX_OPT_SCRATCH_DIR = 4,    /* string: where the work tree goes without a rootfs */
  LAYERX_OPT_EXTRACTOR_PATH = 5, /* string: the layerx-extractor helper */
  LAYERX_OPT_EXT4_LABEL = 6,     /* string: at most 16 bytes */
  LAYERX_OPT_EXT4_UUID = 7,      /* string */
  LAYERX_OPT_CONNECT = 8,        /* string: run on the layerx service at this socket */
  LAYERX_OPT_CREDS = 9,          /* string: "USER:PASS" for a docker:// registry */
  LAYERX_OPT_AUTH_FILE = 10,     /* string: the only auth.json to look in */
  LAYERX_OPT_CERT_DIR = 11,      /* string: CAs (*.crt), client NAME.cert+NAME.key; default: certs.d */
  LAYERX_OPT_BLOB_CACHE = 12,    /* string: a dir of verified blobs, reused */
  LAYERX_OPT_REGISTRIES_CONF = 13, /* string: registries.conf (mirrors...); default: the usual */
  LAYERX_OPT_SIGNATURE_POLICY = 14, /* string: policy.json (who may be pulled); default: usual */
  LAYERX_OPT_EXT4_SIZE = 100,    /* integer: bytes; 0 computes it */
  LAYERX_OPT_EXT4_BLOCK_SIZE = 101,   /* integer: 1024, 2048, 4096 */
  LAYERX_OPT_EXT4_INODE_RATIO = 102,  /* integer: bytes per inode; 0 computes it */
  LAYERX_OPT_REPRODUCIBLE = 103,      /* integer: 1 for a byte-identical image */
  LAYERX_OPT_SOURCE_DATE_EPOCH = 104, /* integer: seconds; -1 the newest mtime */
  LAYERX_OPT_LAYER_TIMEOUT_MS = 105,  /* integer: 0 keeps the policy's */
  LAYERX_OPT_JOB_TIMEOUT_MS = 106,    /* integer: 0 keeps the policy's */
  LAYERX_OPT_TLS_VERIFY = 107,        /* integer: 0 allows plain http, no cert checks;
                                         unset (or negative): registries.conf's
                                         `insecure` decides */
  LAYERX_OPT_PARALLEL_DOWNLOADS = 108 /* integer: docker:// layers fetched ahead, 0..16 */
} layerx_option;
/* A string option (value NULL resets it) or an integer option; the wrong
 * setter for an option is LAYERX_E_USAGE. */
LAYERX_C_API layerx_status layerx_request_set_string(layerx_request *request, layerx_option option,
                                                     const char *value);
LAYERX_C_API layerx_status layerx_request_set_int(layerx_request *request, layerx_option option,
                                                  int64_t value);

/* Log lines at min_level and above (1 debug, 2 info, 3 warn, 4 error) go to
 * fn; without it nothing is logged. component: "broker", "extractor",
 * "sandbox" or "ext4". The strings live for the call only. */
typedef void (*layerx_log_fn)(void *user, int level, const char *component, const char *message);
LAYERX_C_API layerx_status layerx_request_set_log(layerx_request *request, layerx_log_fn fn,
                                                  int min_level, void *user);

typedef struct layerx_progress {
  size_t struct_size; /* sizeof(layerx_progress) of the library */
  size_t layer;       /* 1-based */
  size_t layers;
  uint64_t bytes_fed;  /* of this layer's blob */
  uint64_t blob_bytes; /* 0 when unknown */
  uint64_t entries;    /* merged so far */
  int done;
} layerx_progress;
typedef void (*layerx_progress_fn)(void *user, const layerx_progress *progress);
LAYERX_C_API layerx_status layerx_request_set_progress(layerx_request *request,
                                                       layerx_progress_fn fn, void *user);

/* A cancellation token: layerx_cancel_trigger may be called from any thread
 * or a signal handler; the extraction using it ends with LAYERX_E_CANCELLED.
 * The request borrows it: keep it alive until layerx_extract returns. */
LAYERX_C_API layerx_cancel *layerx_cancel_new(void);
LAYERX_C_API void layerx_cancel_trigger(layerx_cancel *cancel);
LAYERX_C_API void layerx_cancel_free(layerx_cancel *cancel);
LAYERX_C_API layerx_status layerx_request_set_cancel(layerx_request *request,
                                                     layerx_cancel *cancel);

/* Runs the extraction; blocks until done. *result receives a result handle in
 * every case but LAYERX_E_NOMEM (and a NULL request/result pointer, which is
 * LAYERX_E_USAGE); the status is also layerx_result_status(*result). */
LAYERX_C_API layerx_status layerx_extract(const layerx_request *request, layerx_result **result);

/* `layerx inspect`: resolves the sources of `request` (and its platform,
 * policy file and extractor path), applies nothing. On success
 * layerx_result_json(*result) is what `layerx inspect --json` prints. */
LAYERX_C_API layerx_status layerx_inspect(const layerx_request *request, layerx_result **result);

/* `layerx policy show`: the effective policy of `request` as TOML, in
 * layerx_result_json(*result) (despite the name: the text of the result). */
LAYERX_C_API layerx_status layerx_policy_show(const layerx_request *request,
                                              layerx_result **result);

LAYERX_C_API void layerx_result_free(layerx_result *result);
LAYERX_C_API layerx_status layerx_result_status(const layerx_result *result);
/* On failure: the one line naming layer, entry and reason; "" on success. */
LAYERX_C_API const char *layerx_result_message(const layerx_result *result);
/* On failure: the innermost reason, the errno (0 if none), the 1-based layer
 * index (0 if none) and its name, and the entry as named in the layer: bytes,
 * not necessarily UTF-8, so its length comes back in *size when size != NULL. */
LAYERX_C_API const char *layerx_result_reason(const layerx_result *result);
LAYERX_C_API int layerx_result_errno(const layerx_result *result);
LAYERX_C_API size_t layerx_result_layer_index(const layerx_result *result);
LAYERX_C_API const char *layerx_result_layer_name(const layerx_result *result);
LAYERX_C_API const char *layerx_result_entry(const layerx_result *result, size_t *size);
/* On success: a JSON summary (what `layerx extract --json` prints: entries,
 * seconds, manifest_digest, ext4, layers with digests and timings), the
 * inspect JSON, or the policy TOML. "" on failure. */
LAYERX_C_API const char *layerx_result_json(const layerx_result *result);
LAYERX_C_API uint64_t layerx_result_entries(const layerx_result *result);
LAYERX_C_API size_t layerx_result_layer_count(const layerx_result *result);

#ifdef __cplusplus
}
#endif

#endif /* LAYERX_LAYERX_H */
