# `layerx serve`: the extraction service's RPC interface (Cap'n Proto RPC over a
# unix socket; issue 8). DRAFT: the schema the service and `layerx extract
# --connect` will speak; not built yet. Ordinals are append-only.
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

struct OciLayout {
  dir @0 :Fd;    # the layout directory, opened O_RDONLY|O_DIRECTORY
  ref @1 :Text;  # a tag or "@sha256:..."; empty when the index holds one image
}

struct DockerArchive {
  file @0 :Fd;   # the archive, opened O_RDONLY
  ref @1 :Text;  # a RepoTag; may be empty
}

struct Source {
  union {
    ociLayout @0 :OciLayout;
    dockerArchive @1 :DockerArchive;
    layerFiles @2 :List(Fd);  # plain layer blobs, lowest first, each O_RDONLY
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
  platform @1 :Text;           # "os/arch[/variant]"; empty: the service's
  # Outputs, each written only when the whole job succeeded; on failure an
  # output fd is left as it was given (the client removes what it created).
  ext4 @2 :Fd;                 # a regular file opened O_WRONLY (empty)
  manifest @3 :Fd;             # a regular file opened O_WRONLY (empty)
  config @4 :Fd;               # a regular file opened O_WRONLY (empty)
  rootfsParent @5 :Fd;         # a directory opened O_RDONLY|O_DIRECTORY ...
  rootfsName @6 :Text;         # ... in which the service creates this (must not exist)
  ext4Settings @7 :Ext4Settings;
  layerTimeoutMs @8 :UInt64;   # 0: the tenant's policy; never above it
  jobTimeoutMs @9 :UInt64;     # 0: the tenant's policy; never above it
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

struct LayerSummary {
  index @0 :UInt32;
  digest @1 :Text;
  diffId @2 :Text;
  compressedBytes @3 :UInt64;
  uncompressedBytes @4 :UInt64;
  entries @5 :UInt64;
  setupMs @6 :Float64;
  extractMs @7 :Float64;
}

struct Report {
  entries @0 :UInt64;
  seconds @1 :Float64;
  manifestDigest @2 :Text;
  layers @3 :List(LayerSummary);
  json @4 :Text;      # what `layerx extract --json` prints
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
  layer @3 :UInt32;
  seconds @4 :Float64;   # since it was accepted
}

struct ServiceStatus {
  running @0 :List(JobStatus);
  queued @1 :List(JobStatus);
  maxConcurrent @2 :UInt32;
}

# The bootstrap capability of the socket.
interface Service {
  # Runs one job for the calling peer's tenant. Returns when it ended. If the
  # client disconnects or cancels the call, the job stops at once: its
  # extractor is killed, no output is written, the slot is freed.
  extract @0 (request :ExtractRequest, progress :ProgressSink) -> (result :Result);
  status @1 () -> (status :ServiceStatus);
  # Counters in Prometheus text format (jobs by tenant and outcome, bytes, seconds).
  metrics @2 () -> (text :Text);
}
