# The record stream from a jailed extractor to the broker, one layer per stream.
# The extractor may be compromised: the broker validates every field. Names and
# link targets are Data (bytes, never assumed UTF-8). Ordinals are append-only.
@0xe1b823480aa85576;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("layerx::wire");

enum Kind {
  file @0;
  dir @1;
  symlink @2;
  hardlink @3;  # another name for the inode at hardlinkTarget
  char @4;
  block @5;
  fifo @6;
}

struct Xattr {
  name @0 :Data;
  value @1 :Data;
}

struct DataExtent {
  logical @0 :UInt64;       # byte offset in the file (a multiple of the block size)
  physical @1 :UInt64;      # byte offset in the data fd (a multiple of the block size)
  length @2 :UInt64;        # bytes of data (> 0)
}

struct Entry {
  path @0 :Data;            # resolved path: canonical, relative, "" for the root
  kind @1 :Kind;
  uid @2 :UInt32;           # true owner from the tar header
  gid @3 :UInt32;
  mode @4 :UInt32;          # permission bits incl. setuid/setgid/sticky (07777)
  mtimeNs @5 :Int64;        # nanoseconds since the epoch
  size @6 :UInt64;          # file data bytes (files only)
  symlinkTarget @7 :Data;   # as stored, not resolved (symlinks only)
  hardlinkTarget @8 :Data;  # resolved path of the existing name (hardlinks only)
  rdevMajor @9 :UInt32;     # char/block devices only
  rdevMinor @10 :UInt32;
  xattrs @11 :List(Xattr);
  dataBytes @12 :UInt64;    # file data present in the layer: < size for sparse files
  extents @13 :List(DataExtent);
                            # where the data went when the broker gave a data fd
                            # (the ext4 image): ascending, block-aligned runs whose
                            # lengths add up to dataBytes; empty otherwise
}

struct Removal {
  path @0 :Data;            # resolved path removed with everything below it
  opaque @1 :Bool;          # removed because of an opaque marker in its parent
                            # (informational; opaque markers now send opaqueDir)
  opaqueDir @2 :Bool;       # instead of removing path: hide every lower-layer entry
                            # below the directory path ("" is the root); device
                            # nodes, on no disk, are hidden only by this
}

struct Record {
  union {
    entry @0 :Entry;
    removal @1 :Removal;
  }
}

struct Summary {
  entries @0 :UInt64;             # tar entries read
  fileBytes @1 :UInt64;           # file data bytes written
  uncompressedBytes @2 :UInt64;   # bytes of the decompressed tar stream
  uncompressedDigest @3 :Text;    # "sha256:<hex>" of the decompressed tar stream
  readyMonotonicNs @4 :Int64;     # CLOCK_MONOTONIC when the jail was locked down
  doneMonotonicNs @5 :Int64;      # CLOCK_MONOTONIC after the last entry
  sendNs @6 :Int64;               # time spent encoding and writing record batches
  peakRssKib @7 :UInt64;          # the extractor's peak resident set (getrusage)
}

struct Failure {
  kind @0 :UInt16;       # layerx::ErrorKind
  errno @1 :Int32;
  entry @2 :Data;        # the tar entry's name as read, empty if none
  message @3 :Text;
}

struct Message {
  union {
    batch @0 :List(Record);  # applied in order
    summary @1 :Summary;     # last message of a good layer
    failure @2 :Failure;     # last message of a refused layer
  }
}
