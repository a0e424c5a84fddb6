// layerx: extract untrusted container image layers, each in its own jail.
//
// The C++ API. Everything `layerx extract`, `layerx inspect` and `layerx policy
// show` do is here; the CLI is a thin user of it. C callers (and Go, Rust,
// Python through their C FFI) use <layerx/layerx.h>, the same engine behind a C
// ABI.
//
//   #include <layerx/layerx.hpp>
//
//   layerx::ExtractRequest request;
//   request.sources = {"oci:./image:latest"};
//   request.ext4 = "rootfs.img";
//   layerx::ExtractResult result = layerx::Extract(request);
//   if (!result.ok()) {
//     std::fprintf(stderr, "%s\n", result.error().message.c_str());
//     return 1;
//   }
//   std::printf("%llu entries\n", (unsigned long long)result.report().entries);
//
// How extraction runs. The library never forks the caller's process to run
// extraction code: for each layer it spawns the `layerx-extractor` helper
// program (clone3 into fresh user, mount, pid, net, ipc, uts and cgroup
// namespaces, then exec), which pivots into the image rootfs, drops every
// capability and installs seccomp before it reads the layer. The helper is
// found, in order, at: ExtractRequest::extractor_path; $LAYERX_EXTRACTOR;
// `layerx-extractor` beside the running executable; `../libexec/layerx/` from
// the running executable; the same path relative to the directory liblayerx
// was loaded from; and the libexec directory layerx was configured to install
// into (e.g. /usr/libexec/layerx/layerx-extractor).
//
// Threads. Extract, Inspect and ShowPolicy may run concurrently from any
// number of threads; each call runs on its calling thread, and its callbacks
// (log, progress) are called on that thread only. Nothing is global except the
// process-wide SIGPIPE disposition, which is left as the caller set it:
// layerx blocks SIGPIPE on its own thread for the call's duration instead.
// The calling thread must not exit while its Extract runs (the helper is tied
// to it with PR_SET_PDEATHSIG).
//
// Compatibility: C++17 or later; only the standard library. The names of this
// header are the stable API: members may be added at the end of structs,
// never removed or reordered within a major version.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#if defined(__GNUC__)
#define LAYERX_API __attribute__((visibility("default")))
#else
#define LAYERX_API
#endif

namespace layerx {

// "0.1.0": the library's version, the same string `layerx --version` prints.
LAYERX_API const char* Version();

// What kind of failure an extraction ended in; what a caller can act on.
enum class FailureKind {
  kRefused,       // the policy said no: a limit, an entry rule, an escape attempt,
                  // a registries.conf block, policy.json
  kInvalidInput,  // malformed input: corrupt or truncated layer, bad document, bad name
  kIntegrity,     // content does not match its digest, size or diff_id
  kSandbox,       // the jail could not be set up, or the extractor died or lied
  kIo,            // the system said no (ENOSPC, EACCES, ...), not the input's fault
  kUsage,         // a bad request: bad source name, output exists, bad policy file
  kCancelled,     // the cancel token was set, or the job ran out of time
  kInternal,      // a bug in layerx
  kBusy,          // the service (ExtractRequest::connect) or the tenant is at its limit: try later
  kUnauthorized,  // the service maps the caller's uid/gid to no tenant, or it is not an operator
};
LAYERX_API const char* FailureKindName(FailureKind kind);  // "refused", "integrity", ...

// Why an extraction failed: the structured form of the CLI's one line. Outputs
// are absent (or untouched if they existed) whenever there is an error.
struct ExtractError {
  FailureKind kind = FailureKind::kInternal;
  int sys_errno = 0;       // the errno, when the system said no; else 0
  size_t layer_index = 0;  // 1-based, lowest first; 0 when no layer is involved
  std::string layer;       // names that layer: "sha256:0123456789ab" or its file
  std::string entry;       // the tar entry as named in the layer (bytes); may be empty
  std::string reason;      // the innermost cause, e.g. "entries over max_entries=1000"
  std::string message;     // the whole line: layer, entry and reason, one line
};

enum class LogLevel { kDebug = 1, kInfo = 2, kWarn = 3, kError = 4 };

// Where a layer stands; called about ten times a second per layer and once
// when it is done.
struct Progress {
  size_t layer = 0;         // 1-based
  size_t layers = 0;        // in the job
  uint64_t bytes_fed = 0;   // of the layer's blob, so far
  uint64_t blob_bytes = 0;  // 0 when unknown (a stream)
  uint64_t entries = 0;     // entries merged so far
  bool done = false;
};

// Cancels an extraction from any thread (or a signal handler: Cancel() is
// async-signal-safe). The extractor is killed, outputs are not written, the
// call returns kCancelled promptly (within about 100 ms).
class CancelToken {
 public:
  void Cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }
  const std::atomic<bool>* flag() const { return &cancelled_; }

 private:
  std::atomic<bool> cancelled_{false};
};

struct Ext4Settings {
  uint64_t size_bytes = 0;     // 0: computed from the content
  uint32_t block_size = 4096;  // 1024, 2048 or 4096
  uint32_t inode_ratio = 0;    // bytes per inode; 0: from the entry count
  std::string label;           // at most 16 bytes
  std::string uuid;            // empty: random (or derived from the layers when reproducible)
  // Same input, byte-identical image. source_date_epoch stamps what no layer
  // dated (-1: the newest mtime in the image).
  bool reproducible = false;
  int64_t source_date_epoch = -1;
};

// docker:// sources: how the registry is reached. Credentials are looked up
// as skopeo and podman look them up: `creds`, else `auth_file`, else
// $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json,
// ~/.config/containers/auth.json and ~/.docker/config.json (`auths`).
struct RegistrySettings {
  std::string creds;      // "USER:PASS"; empty: from the auth files, else anonymous
  std::string auth_file;  // only this auth file; empty: the list above
  std::string cert_dir;   // as skopeo's --cert-dir: CAs (*.crt), a client NAME.cert + NAME.key;
                          // empty: HOST[:PORT] below ~/.config/containers/certs.d,
                          // /etc/containers/certs.d or /etc/docker/certs.d
  // false: no certificate checks, and plain http is allowed; unset: true,
  // unless registries.conf says the registry is `insecure`.
  std::optional<bool> tls_verify;
  // containers-registries.conf(5): mirrors, locations, `insecure`, `blocked`.
  // Empty: $CONTAINERS_REGISTRIES_CONF, else ~/.config/containers/registries.conf,
  // else /etc/containers/registries.conf, with their registries.conf.d drop-ins.
  std::string registries_conf;
  // containers-policy.json(5): which images may be pulled. Empty:
  // ~/.config/containers/policy.json, else /etc/containers/policy.json, else
  // none (every image accepted). Signatures are not verified: a scope that
  // wants them refuses.
  std::string signature_policy;
  // Verified compressed blobs kept by digest (DIR/sha256/HEX) and reused by
  // the next pull of any image sharing them; safe for concurrent processes.
  std::string blob_cache;
  int parallel_downloads = 3;  // layers downloaded ahead of the one applied (0..16)
};

struct ExtractRequest {
  // "oci:DIR[:REF]", "docker-archive:FILE[:REF]",
  // "docker://[REGISTRY[:PORT]/]REPO[:TAG|@sha256:...]", or layer files lowest
  // first (tar, tar.gz, tar.zst, tar.xz, tar.bz2).
  std::vector<std::string> sources;
  std::string platform;  // "os/arch[/variant]"; empty: this machine's

  // Outputs; at least one of rootfs, ext4, manifest. Each appears only when
  // everything succeeded.
  std::string rootfs;    // a directory that must not exist yet, or an empty one
  std::string ext4;      // an ext4 image with true ownership (no root needed)
  std::string manifest;  // JSON lines, one per path: owner, mode, kind, xattrs...
  std::string config;    // the image config JSON (image sources only)
  Ext4Settings ext4_settings;

  // Policy: the defaults, then policy_file (TOML), then policy_toml, each read
  // over the last (see `layerx policy show` and policy.example.toml).
  std::string policy_file;
  std::string policy_toml;
  uint64_t layer_timeout_ms = 0;  // non-zero: overrides the policy's
  uint64_t job_timeout_ms = 0;    // non-zero: overrides the policy's

  // Where the work tree goes when no rootfs is written. Empty: /dev/shm when
  // it is a tmpfs with room, else beside the output.
  std::string scratch_dir;
  std::string extractor_path;  // empty: found as described at the top

  // Optional. Log lines at min_log_level and above go to `log` (component is
  // "broker", "extractor", "sandbox" or "ext4"); without it, nothing is logged.
  std::function<void(LogLevel level, std::string_view component, std::string_view message)> log;
  LogLevel min_log_level = LogLevel::kWarn;
  std::function<void(const Progress&)> progress;
  const CancelToken* cancel = nullptr;  // borrowed; must outlive the call

  // Non-empty: the job runs on the layerx service listening on this unix
  // socket (`layerx serve`, e.g. /run/layerx/layerx.sock) instead of in this
  // process. The sources are opened and resolved here, with the caller's
  // credentials, and handed over as open file descriptors; the outputs too
  // (ext4, manifest, config; not rootfs). The service applies its policy for
  // the caller's tenant: policy_file and policy_toml must be empty, timeouts
  // may only shorten the tenant's. progress, cancel and log work as locally;
  // cancelling, or dying, stops the job on the service at once. The call runs
  // a kj event loop of its own on the calling thread: a thread that already
  // has one (a Cap'n Proto user's) must call from another thread.
  std::string connect;
  // docker:// sources. With `connect`, the pull runs here, with the caller's
  // network and credentials; the service is handed one pipe per layer.
  RegistrySettings registry;
};

struct LayerSummary {
  size_t index = 0;     // 1-based, lowest first
  std::string name;     // the blob's path
  std::string digest;   // sha256 of the compressed blob as fed in
  std::string diff_id;  // sha256 of the tar stream
  uint64_t compressed_bytes = 0;
  uint64_t uncompressed_bytes = 0;
  uint64_t entries = 0;     // tar entries read
  uint64_t file_bytes = 0;  // file data written
  double setup_ms = 0;      // spawn to jail locked down
  double extract_ms = 0;    // jail locked down to last entry
  double send_ms = 0;       // the extractor encoding and sending records
  double merge_ms = 0;      // the broker validating and merging them
  double total_ms = 0;      // spawn to reaped
  uint64_t extractor_peak_rss_kib = 0;
};

struct Ext4Summary {
  uint64_t size_bytes = 0;
  uint64_t content_bytes = 0;
  uint64_t inodes = 0;
  uint64_t dead_bytes = 0;  // data a later layer removed or replaced: punched out, not in the image
  double build_ms = 0;      // metadata built around the data the jails wrote in place
};

struct ExtractReport {
  uint64_t entries = 0;  // paths in the final image
  double seconds = 0;
  std::string manifest_digest;  // image sources
  std::vector<LayerSummary> layers;
  std::optional<Ext4Summary> ext4;
};

// A report or an error.
class ExtractResult {
 public:
  explicit ExtractResult(ExtractReport report) : report_(std::move(report)) {}
  explicit ExtractResult(ExtractError error) : error_(std::move(error)) {}
  bool ok() const { return !error_.has_value(); }
  const ExtractReport& report() const { return report_; }  // when ok()
  const ExtractError& error() const { return *error_; }    // when !ok()

 private:
  ExtractReport report_;
  std::optional<ExtractError> error_;
};

// Applies the layers of request.sources, lowest first, each in its own jail,
// and writes the requested outputs. Blocks until done, failed or cancelled.
LAYERX_API ExtractResult Extract(const ExtractRequest& request);

// What a source resolves to, without applying anything: `layerx inspect`.
struct InspectRequest {
  std::vector<std::string> sources;
  std::string platform;
  std::string policy_file;
  std::string extractor_path;  // docker-archive sources are unpacked by a jailed extractor
  RegistrySettings registry;   // docker:// sources
};
struct ImageInfo {
  struct Layer {
    std::string name, digest, diff_id, media_type;
    uint64_t size = 0;  // compressed blob size
  };
  std::string manifest_digest, config_digest;
  std::string config;  // the image config JSON, verified against its digest
  std::vector<Layer> layers;
};
// On failure, returns false and fills *error (if given).
LAYERX_API bool Inspect(const InspectRequest& request, ImageInfo* info, ExtractError* error);
// The same, with what it logs (for a docker:// source: the registry and how it
// is reached, the cert dir, the retries) given to `log` at `min_log_level` and
// above, on the calling thread, as ExtractRequest::log is (`layerx inspect -v`).
LAYERX_API bool Inspect(const InspectRequest& request, ImageInfo* info, ExtractError* error,
                        const std::function<void(LogLevel level, std::string_view component,
                                                 std::string_view message)>& log,
                        LogLevel min_log_level);

// The effective policy as a TOML policy file: the defaults, then policy_file
// and policy_toml (either may be empty) read over them. `layerx policy show`.
LAYERX_API bool ShowPolicy(const std::string& policy_file, const std::string& policy_toml,
                           std::string* toml, ExtractError* error);

// The service: `layerx serve`. Runs until SIGTERM or SIGINT (or `stop` is
// set): listens on a unix socket for Cap'n Proto RPC (broker/service/service.capnp),
// maps each peer to a tenant by SO_PEERCRED, and runs its jobs with the
// tenant's policy and limits, fairly across tenants. On the stop signal it
// stops accepting, lets running jobs finish within the configured grace, then
// cancels the rest. SIGTERM and SIGINT are blocked on the calling thread while
// it runs (and taken through a signalfd). Returns true when it stopped
// cleanly.
struct ServeOptions {
  std::string socket;       // path to listen on; empty: the socket systemd passed (LISTEN_FDS)
  std::string config_file;  // serve.toml (packaging/serve.example.toml); empty: no tenants
  std::string log_format;   // "text" or "json"; empty: the config's
  std::function<void(LogLevel level, std::string_view component, std::string_view message)> log;
  LogLevel min_log_level = LogLevel::kInfo;
  std::string extractor_path;         // empty: found as for Extract
  const CancelToken* stop = nullptr;  // optional: set to stop like SIGTERM (checked 10x/s)
  std::function<void()> ready;        // optional: called once the socket accepts connections
};
LAYERX_API bool Serve(const ServeOptions& options, ExtractError* error);

// Asks the service on `socket`: its jobs and tenants as text (`layerx status`)
// or JSON, or its counters in Prometheus text format (operators only). Like
// Extract with `connect`, not from a thread that runs a kj event loop.
enum class ServiceQuery { kStatus, kStatusJson, kMetrics };
LAYERX_API bool QueryService(const std::string& socket, ServiceQuery query, std::string* out,
                             ExtractError* error);

// JSON for machines: what `layerx extract --json` and `layerx inspect --json`
// print. Bytes that are not UTF-8 (names are bytes) come out as U+FFFD.
LAYERX_API std::string ToJson(const ExtractReport& report);
LAYERX_API std::string ToJson(const ImageInfo& info);

}  // namespace layerx
