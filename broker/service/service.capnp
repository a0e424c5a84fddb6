# `layerx serve`: the extraction service's RPC interface (Cap'n Proto RPC over a
# unix socket). What `layerx serve` and `layerx extract --connect` speak
# (broker/service/hub.cc, broker/service/service_client.cc). Ordinals are append-only.
#
# No confused deputy: a client hands the service open file descriptors (an Fd
# capability travels with its descriptor, SCM_RIGHTS, and the service reads it
# with Capability::Client::getFd()); the service never opens a tenant's path by
# name. Inputs must be opened for reading (O_RDONLY, not O_PATH: an O_PATH fd
# would let the service read what the tenant cannot); outputs for writing.
# Who the client is comes from SO_PEERCRED on the connection, never from a field.
@0xd1b935326b1457a5;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("layerx::service");

# A file descriptor the client passes. Its server side does nothing but carry it.
interface Fd {}

# One layer blob, opened by the client (O_RDONLY; a regular file or a stream).
# For an image, the client resolved the layout with its own credentials and
# sends what the manifest says the blob is; the service checks the blob
# against digest and size as it streams, and the tar stream against diffId,
# which must equal the config's rootfs.diff_ids entry for this layer.
struct Layer {
  blob @0 :Fd;
  name @1 :Text;       # names the layer in errors: short digest or file name
  digest @2 :Text;     # "sha256:..." or empty (a plain file)
  diffId @3 :Text;     # "sha256:..." or empty
  size @4 :UInt64;     # 0 with no digest: unknown
  mediaType @5 :Text;
}

struct Image {
  layers @0 :List(Layer);   # lowest first
  config @1 :Data;          # the image config JSON; empty for plain layer files
  manifestDigest @2 :Text;
}

struct DockerArchive {
  file @0 :Fd;   # the archive, O_RDONLY; unpacked by a jailed extractor like a layer
  name @1 :Text; # names it in errors
  ref @2 :Text;  # a RepoTag; may be empty
}

struct Source {
  union {
    image @0 :Image;
    dockerArchive @1 :DockerArchive;
  }
}

struct Ext4Settings {
  sizeBytes @0 :UInt64;       # 0: computed
  blockSize @1 :UInt32 = 4096;
  inodeRatio @2 :UInt32;      # 0: computed
  label @3 :Text;
  uuid @4 :Text;
  reproducible @5 :Bool;
  sourceDateEpoch @6 :Int64 = -1;
}

struct ExtractRequest {
  source @0 :Source;
  platform @1 :Text;           # "os/arch[/variant]" (docker-archive only); empty: the service's
  # Outputs: regular files opened for writing (not O_APPEND), written from
  # offset 0 only when the whole job succeeded and left empty otherwise. At
  # least one. A client makes them O_TMPFILE and links them into place on
  # success, so that nothing is left if it dies.
  ext4 @2 :Fd;
  manifest @3 :Fd;
  config @4 :Fd;
  ext4Settings @5 :Ext4Settings;
  layerTimeoutMs @6 :UInt64;   # 0: the tenant's policy; never above it
  jobTimeoutMs @7 :UInt64;     # 0: the tenant's policy; never above it
}

enum FailureKind {
  refused @0;
  invalidInput @1;
  integrity @2;
  sandbox @3;
  io @4;
  usage @5;
  cancelled @6;
  internal @7;
  busy @8;            # the service or the tenant is at its limit: try later
  unauthorized @9;    # the peer's uid/gid maps to no tenant
}

struct Failure {
  kind @0 :FailureKind;
  message @1 :Text;   # the CLI's one line: layer, entry, reason
  layerIndex @2 :UInt32;
  layer @3 :Text;
  entry @4 :Data;     # bytes, as named in the layer
  reason @5 :Text;
  errno @6 :Int32;
}

# layerx::ExtractReport (include/layerx/layerx.hpp), field for field.
struct LayerSummary {
  index @0 :UInt32;
  name @1 :Text;
  digest @2 :Text;
  diffId @3 :Text;
  compressedBytes @4 :UInt64;
  uncompressedBytes @5 :UInt64;
  entries @6 :UInt64;
  fileBytes @7 :UInt64;
  setupMs @8 :Float64;
  extractMs @9 :Float64;
  sendMs @10 :Float64;
  mergeMs @11 :Float64;
  totalMs @12 :Float64;
  extractorPeakRssKib @13 :UInt64;
}

struct Ext4Summary {
  sizeBytes @0 :UInt64;
  contentBytes @1 :UInt64;
  inodes @2 :UInt64;
  buildMs @3 :Float64;
  deadBytes @4 :Float64;    # was ownershipPassMs (no longer made); ordinals never move
}

struct Report {
  entries @0 :UInt64;
  seconds @1 :Float64;
  manifestDigest @2 :Text;
  layers @3 :List(LayerSummary);
  hasExt4 @4 :Bool;
  ext4 @5 :Ext4Summary;
  queuedSeconds @6 :Float64;  # waiting for a slot, before `seconds` began
}

struct Result {
  union {
    report @0 :Report;
    failure @1 :Failure;
  }
}

struct ProgressEvent {
  layer @0 :UInt32;     # 1-based
  layers @1 :UInt32;
  bytesFed @2 :UInt64;
  blobBytes @3 :UInt64; # 0 when unknown
  entries @4 :UInt64;
  done @5 :Bool;
  queued @6 :Bool;      # the job waits for a slot (layer is 0)
}

# The client's: the service calls it as the job moves. Streaming: the service
# never has more than a few events in flight to a slow client.
interface ProgressSink {
  event @0 (event :ProgressEvent) -> stream;
}

struct JobStatus {
  tenant @0 :Text;
  id @1 :UInt64;
  state @2 :Text;        # "queued", "running"
  layer @3 :UInt32;      # running: the layer being applied (0: not started)
  layers @4 :UInt32;
  seconds @5 :Float64;   # since it was accepted
}

struct TenantStatus {
  name @0 :Text;
  running @1 :UInt32;
  queued @2 :UInt32;
  maxConcurrent @3 :UInt32;
  maxQueued @4 :UInt32;
}

# An operator (uid 0 or the service's own uid) sees every tenant; a tenant
# sees itself only.
struct ServiceStatus {
  jobs @0 :List(JobStatus);
  tenants @1 :List(TenantStatus);
  maxConcurrent @2 :UInt32;
  running @3 :UInt32;
  queued @4 :UInt32;
  draining @5 :Bool;     # SIGTERM came: no new jobs
  version @6 :Text;
  uptimeSeconds @7 :Float64;
}

# The bootstrap capability of the socket.
interface Service {
  # Runs one job for the calling peer's tenant. Returns when it ended. If the
  # client disconnects or cancels the call, the job stops at once: its
  # extractor is killed, no output is written, the slot is freed.
  extract @0 (request :ExtractRequest, progress :ProgressSink) -> (result :Result);
  status @1 () -> (status :ServiceStatus);
  # Counters in Prometheus text format (jobs by tenant and outcome, bytes,
  # seconds); operators only.
  metrics @2 () -> (text :Text);
}
