// The extract run (RunExtract, job.h): the request and its sources checked,
// the work dir placed, the layers run and verified, the outputs written and
// renamed into place. Where it writes: job_outputs.h; what it reads besides
// the layers: job_sources.h.
#include "broker/engine/job.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <time.h>
#include <unistd.h>

#include <fstream>

#include "broker/engine/job_outputs.h"
#include "broker/engine/job_sources.h"
#include "broker/engine/manifest.h"
#include "broker/engine/rootfs_finish.h"
#include "broker/log/logging.h"
#include "sandbox/read_buffer.h"
#include "sandbox/sys.h"

namespace layerx::broker {

using sandbox::UniqueFd;

namespace {

std::string ShortDigest(const std::string& digest) {
  return digest.substr(0, std::min<size_t>(digest.size(), 7 + 12));
}

// What the manifest and config promise about a layer, against what streamed.
Status VerifyLayer(const LayerSource& source, const LayerReport& got) {
  if (source.digest && got.compressed_digest != *source.digest) {
    return Fail(MakeError(ErrorKind::kIntegrity,
                          "blob does not match its digest: manifest says {}, content is {}",
                          *source.digest, got.compressed_digest));
  }
  if (source.size && got.compressed_bytes != *source.size) {
    return Fail(MakeError(ErrorKind::kIntegrity, "blob is {} bytes, manifest says {}",
                          got.compressed_bytes, *source.size));
  }
  if (source.diff_id && got.uncompressed_digest != *source.diff_id) {
    return Fail(MakeError(ErrorKind::kIntegrity,
                          "tar stream does not match its diff_id: config says {}, content is {}",
                          *source.diff_id, got.uncompressed_digest));
  }
  return {};
}

// Bytes of input the job reads: the blobs, or the docker-archive.
uint64_t InputBytes(const ResolvedImage& image, const std::optional<DockerArchiveSpec>& docker) {
  struct stat st;
  if (docker) {
    int r = docker->fd >= 0 ? ::fstat(docker->fd, &st) : ::stat(docker->file.c_str(), &st);
    return r == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  }
  uint64_t total = 0;
  for (const LayerSource& l : image.layers) {
    if (l.size) {
      total += *l.size;
    } else if (l.fd >= 0 && ::fstat(l.fd, &st) == 0) {
      total += static_cast<uint64_t>(st.st_size);
    } else if (l.fd < 0 && l.dir_fd < 0 && ::stat(l.path.c_str(), &st) == 0) {
      total += static_cast<uint64_t>(st.st_size);
    }
  }
  return total;
}

Result<JobReport> RunJobIn(const std::string& work_parent, const ExtractRequest& request,
                           ResolvedImage& image, const std::optional<DockerArchiveSpec>& docker,
                           int64_t start, int extractor_fd,
                           const std::optional<OutputPath>& rootfs_out, RootfsTarget* rootfs,
                           const std::optional<OutputPath>& manifest_out,
                           const std::optional<OutputPath>& ext4_out,
                           const std::optional<OutputPath>& config_out) {
  auto log = Logger("broker");
  // With a rootfs, the work dir goes where it is renamed or moved from, in
  // the dir opened when the rootfs was checked (not looked up again): beside
  // a new one, inside an existing one, which is 0700 before anything is made
  // in it.
  Workspace work;
  if (rootfs != nullptr) {
    LX_TRY(rootfs->Hold());
    LX_TRY(work.CreateIn(rootfs->written_dir_fd(),
                         rootfs->existing() ? *request.rootfs : work_parent));
  } else {
    LX_TRY(work.Create(work_parent));
  }

  ImageTree tree(request.policy.limits, request.policy.rules);
  const int64_t deadline =
      start + static_cast<int64_t>(request.policy.limits.job_timeout_ms) * 1'000'000;
  RunContext ctx{.policy = &request.policy,
                 .rootfs_fd = work.rootfs_fd(),
                 .extractor_fd = extractor_fd,
                 .cancel = request.cancel,
                 .extractor_args = request.extractor_args,
                 .job_deadline_ns = deadline};
  sandbox::ReadBuffer feed_buffer(kFeedBufferBytes);
  ctx.feed_buffer = feed_buffer.data();
  // Between the stages: a cancel or the job's clock stops the job before the
  // next one starts (the layers and mkfs also watch both while they run).
  auto check_stop = [&]() -> Status {
    if (request.cancel != nullptr && request.cancel->load()) {
      return Fail(MakeError(ErrorKind::kCancelled, "interrupted"));
    }
    if (sandbox::MonotonicNs() >= deadline) {
      return Fail(MakeError(ErrorKind::kLimitExceeded, "job took longer than job_timeout_ms={}",
                            request.policy.limits.job_timeout_ms));
    }
    return {};
  };
  if (request.progress) {
    ctx.progress = [&request, &image](const LayerProgress& p) {
      LayerProgress with_total = p;
      with_total.layers = image.layers.size();
      request.progress(with_total);
    };
  }
  if (docker) {
    LX_ASSIGN_OR_RETURN(image, StageDockerArchive(*docker, work, ctx));
  }
  JobReport report;
  report.manifest_digest = image.manifest_digest;

  // With an ext4 image to make, the jails write every file's data straight
  // into it (each layer from where the one below it stopped), and the work
  // tree holds placeholders only, unless a rootfs is wanted too. A manifest
  // alone needs no data at all.
  PendingOutput ext4_file, manifest_file, config_file;
  auto reserve = [&work](PendingOutput& file, const std::optional<OutputPath>& path, int fd,
                         const char* name) -> Status {
    if (fd >= 0) return file.ReserveFd(fd, work, name);
    return file.Reserve(*path);
  };
  const bool want_ext4 = ext4_out.has_value() || request.ext4_fd >= 0;
  UniqueFd image_fd;
  uint64_t data_start = 0;
  if (want_ext4) {
    LX_TRY(reserve(ext4_file, ext4_out, request.ext4_fd, "out.ext4"));
    LX_ASSIGN_OR_RETURN(image_fd, ext4_file.Create(O_RDWR));
    // The most data the layers can bring, for the room the image's group
    // descriptors get in front of it: max_image_bytes, or less when the
    // input's size and max_compression_ratio say so (the broker stops a layer
    // past either).
    const policy::Limits& limits = request.policy.limits;
    uint64_t max_data = limits.max_image_bytes;
    uint64_t input = InputBytes(image, docker);
    bool sized = docker.has_value() || !image.layers.empty();
    for (const LayerSource& l : image.layers) {
      struct stat st;
      sized &=
          l.size.has_value() ||
          (l.fd >= 0 ? ::fstat(l.fd, &st) == 0 && S_ISREG(st.st_mode)
                     : l.dir_fd < 0 && ::stat(l.path.c_str(), &st) == 0 && S_ISREG(st.st_mode));
    }
    if (docker) {
      struct stat st;
      sized = docker->fd >= 0 ? ::fstat(docker->fd, &st) == 0 && S_ISREG(st.st_mode)
                              : ::stat(docker->file.c_str(), &st) == 0 && S_ISREG(st.st_mode);
    }
    if (sized && input > 0 && limits.max_compression_ratio > 0 &&
        input < UINT64_MAX / limits.max_compression_ratio / 2) {
      uint64_t bound = input * limits.max_compression_ratio +
                       std::max<size_t>(image.layers.size(), 1) * policy::kRatioGraceBytes;
      max_data = std::min(max_data, bound);
    }
    data_start = Ext4DataStart(request.ext4_options, max_data);
    ctx.data_fd = image_fd.get();
    ctx.data = sandbox::JailData{
        .mode = rootfs_out ? sandbox::DataMode::kTreeAndImage : sandbox::DataMode::kImage,
        .block_size = request.ext4_options.block_size,
        .start = data_start};
  } else if (!rootfs_out) {
    ctx.data = sandbox::JailData{.mode = sandbox::DataMode::kDiscard};
  }
  // Each layer's jail is spawned while the one below it applies (PendingJail);
  // one that could not be spawned ahead is spawned, or fails, in its turn.
  std::optional<PendingJail> next_jail;
  auto spawn_ahead = [&] {
    if (auto jail = SpawnJail(ctx)) {
      next_jail.emplace(std::move(*jail));
    } else {
      log->debug("spawn ahead: {} (the layer spawns its own)", jail.error().ToString());
    }
  };
  if (!image.layers.empty()) spawn_ahead();
  for (size_t i = 0; i < image.layers.size(); ++i) {
    const LayerSource& source = image.layers[i];
    std::optional<PendingJail> jail = std::move(next_jail);
    next_jail.reset();
    LayerInput input{.index = i + 1, .dir_fd = source.dir_fd, .path = source.path, .fd = source.fd};
    UniqueFd taken;  // a stream made for this layer now (docker://), closed after it
    if (image.take_input) {
      auto got = image.take_input(i);
      if (!got) return Fail(std::move(got).error().WithLayer(input.index, source.display));
      taken = std::move(got->fd);
      input.fd = taken.get();
      input.hashed = got->hashed;
      input.expected_bytes = source.size.value_or(0);
    }
    if (want_ext4 && ::ftruncate(image_fd.get(), static_cast<off_t>(ctx.data.start)) != 0) {
      // The file ends where this layer's window starts: even a write that
      // got to append would land inside the window.
      return Fail(OsError(errno, "ext4 {:?}: size the image", ext4_out ? *request.ext4 : "(fd)"));
    }
    ctx.window_at_front = want_ext4 && ctx.data.start == data_start;
    const bool more = i + 1 < image.layers.size();
    auto layer = RunLayer(ctx, input, tree, std::move(jail), [&] {
      if (more) spawn_ahead();
    });
    if (layer) {
      Status verified = VerifyLayer(source, *layer);
      if (!verified) layer = Fail(std::move(verified).error());
    }
    if (!layer) {
      // A stream fed from the network that ended early: the download says why
      // (this layer's, or one ahead whose failure stopped the pull). A verdict
      // of the layer's own (an escape, a limit, a clock) or a cancel stands.
      const ErrorKind kind = layer.error().kind();
      const bool short_stream = kind == ErrorKind::kInvalidInput ||
                                kind == ErrorKind::kIntegrity || kind == ErrorKind::kPeer ||
                                kind == ErrorKind::kOs;
      const bool cancelled = request.cancel != nullptr && request.cancel->load();
      if (image.feed_failure && short_stream && !cancelled) {
        if (std::optional<Error> why = image.feed_failure(i)) layer = Fail(std::move(*why));
      }
      return Fail(std::move(layer).error().WithLayer(input.index, source.display));
    }
    log->info(
        "layer done: layer={} digest={} entries={} bytes={} setup_ms={:.2f} extract_ms={:.1f}",
        input.index, ShortDigest(layer->compressed_digest), layer->entries, layer->file_bytes,
        layer->setup_ns / 1e6, layer->extract_ns / 1e6);
    if (want_ext4) ctx.data.start = layer->data_end;
    report.layers.push_back(std::move(*layer));
  }
  report.final_entries = tree.size();
  if (!rootfs_out) work.DropTreeAsync();
  const bool true_owners = ::geteuid() == 0 && request.policy.ids.full_range();
  if (request.rootfs && true_owners) {
    if (Status s = FinishRootfsAsRoot(work.rootfs_fd(), tree); !s) {
      return Fail(std::move(s).error().With("rootfs"));
    }
  }

  // Every output is written beside its place under a temp name and renamed
  // into place only when all of them are ready; a failure removes the temps.
  const std::string ext4_name = request.ext4 ? *request.ext4 : "(fd)";
  const std::string manifest_name = request.manifest ? *request.manifest : "(fd)";
  const std::string config_name = request.config ? *request.config : "(fd)";
  if (want_ext4) {
    Ext4Options options = request.ext4_options;
    if (options.seed.empty()) {
      for (const LayerReport& l : report.layers) options.seed += l.compressed_digest;
    }
    LX_TRY(check_stop());
    auto built = BuildExt4(image_fd.get(), tree, data_start, options,
                           BuildControl{.cancel = request.cancel, .deadline_ns = deadline});
    if (!built) return Fail(std::move(built).error().With("ext4 {:?}", ext4_name));
    report.ext4 = *built;
    image_fd.reset();
  }
  if (manifest_out || request.manifest_fd >= 0) {
    LX_TRY(reserve(manifest_file, manifest_out, request.manifest_fd, "out.manifest"));
    LX_ASSIGN_OR_RETURN(UniqueFd fd, manifest_file.Create());
    Status written = WriteManifest(tree, fd.get());
    if (written && ::fsync(fd.get()) != 0) written = Fail(OsError(errno, "fsync"));
    if (!written) return Fail(std::move(written).error().With("manifest {:?}", manifest_name));
  }
  if (config_out || request.config_fd >= 0) {
    LX_TRY(reserve(config_file, config_out, request.config_fd, "out.config"));
    LX_ASSIGN_OR_RETURN(UniqueFd fd, config_file.Create());
    Status written = sandbox::WriteAll(fd.get(), std::as_bytes(std::span(image.config)));
    if (!written) return Fail(std::move(written).error().With("config {:?}", config_name));
  }
  // The last moment a stop can still leave nothing behind.
  LX_TRY(check_stop());
  if (rootfs != nullptr) LX_TRY(rootfs->Place(work));
  for (PendingOutput* file : {&ext4_file, &config_file, &manifest_file}) {
    if (Status s = file->Commit(); !s) {
      for (PendingOutput* f : {&ext4_file, &config_file, &manifest_file}) f->Revert();
      return Fail(std::move(s).error());
    }
  }
  work.Cleanup();
  // Only now, everything done, does an existing rootfs dir open up.
  if (rootfs != nullptr) LX_TRY(rootfs->OpenUp(true_owners));
  report.total_ns = sandbox::MonotonicNs() - start;
  return report;
}

// Whether every layer can be read a second time (files, not streams).
bool Rereadable(const ResolvedImage& image, const std::optional<DockerArchiveSpec>& docker) {
  struct stat st;
  if (docker) {
    int r = docker->fd >= 0 ? ::fstat(docker->fd, &st) : ::stat(docker->file.c_str(), &st);
    return r == 0 && S_ISREG(st.st_mode);
  }
  for (const LayerSource& l : image.layers) {
    if (l.fd >= 0) {
      if (::fstat(l.fd, &st) != 0 || !S_ISREG(st.st_mode)) return false;
    } else if (l.dir_fd < 0 && (::stat(l.path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))) {
      return false;
    }
  }
  return true;
}

// The scratch dir for a job that writes no rootfs: the caller's choice, or
// /dev/shm when it is a tmpfs with room for what the job puts there (below)
// and that is at most half the memory available. Making and removing
// thousands of inodes on a disk filesystem costs far more than in RAM (on a
// journal-less ext4 each create scans past recently deleted inodes), and the
// tree is thrown away once the records are merged. nullopt: beside the output.
std::optional<std::string> ChooseScratch(const ExtractRequest& request, const ResolvedImage& image,
                                         const std::optional<DockerArchiveSpec>& docker) {
  if (!request.scratch_dir.empty()) return request.scratch_dir;
  const char* candidate = "/dev/shm";
  struct statfs fs;
  if (::statfs(candidate, &fs) != 0 || fs.f_type != TMPFS_MAGIC || ::access(candidate, W_OK) != 0) {
    return std::nullopt;
  }
  // The tree holds placeholders only: names, not data. What else lands there:
  // a docker-archive, staged (about its own size); an image built for an fd
  // output (the service), about four times the input.
  uint64_t input = InputBytes(image, docker);
  uint64_t need =
      input / 4 + (docker ? input : 0) + (request.ext4_fd >= 0 ? input * 4 : 0) + 16 * policy::kMiB;
  uint64_t free_bytes = static_cast<uint64_t>(fs.f_bavail) * static_cast<uint64_t>(fs.f_bsize);
  uint64_t available = 0;
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  while (meminfo >> key >> kib) {
    if (key == "MemAvailable:") available = kib * 1024;
    meminfo.ignore(64, '\n');
  }
  if (need > free_bytes || need > available / 2) {
    Logger("broker")->debug("scratch: beside the output (need {} MiB, {} has {} MiB free)",
                            need >> 20, candidate, free_bytes >> 20);
    return std::nullopt;
  }
  Logger("broker")->debug("scratch: {} (need {} MiB of {} MiB free)", candidate, need >> 20,
                          free_bytes >> 20);
  return std::string(candidate);
}

}  // namespace

Result<JobReport> RunExtract(const ExtractRequest& request) {
  auto log = Logger("broker");
  int64_t start = sandbox::MonotonicNs();
  const bool from_fds = request.resolved != nullptr || request.docker.has_value();
  if (request.layers.empty() && !from_fds) {
    return Fail(MakeError(ErrorKind::kPolicy, "no layers given"));
  }
  const bool fd_outputs =
      request.ext4_fd >= 0 || request.manifest_fd >= 0 || request.config_fd >= 0;
  if (!request.rootfs && !request.manifest && !request.ext4 && !fd_outputs) {
    return Fail(
        MakeError(ErrorKind::kPolicy, "nothing to write: give --rootfs, --ext4 or --manifest"));
  }
  std::optional<OutputPath> rootfs_out, manifest_out, ext4_out;
  if (request.ext4) {
    LX_ASSIGN_OR_RETURN(ext4_out, SplitOutput(*request.ext4, "ext4 image"));
  }
  // Declared before the job runs and destroyed after it: an existing dir the
  // job failed in is put back once the work dir inside it is gone.
  RootfsTarget rootfs;
  if (request.rootfs) {
    LX_ASSIGN_OR_RETURN(rootfs_out, SplitOutput(*request.rootfs, "rootfs"));
    LX_TRY(rootfs.Open(*request.rootfs, *rootfs_out));
  }
  if (request.manifest) {
    LX_ASSIGN_OR_RETURN(manifest_out, SplitOutput(*request.manifest, "manifest"));
  }
  std::optional<OutputPath> config_out;
  if (request.config) {
    LX_ASSIGN_OR_RETURN(config_out, SplitOutput(*request.config, "config"));
  }
  std::optional<DockerArchiveSpec> docker =
      from_fds ? request.docker : ParseDockerArchiveSpec(request.layers);
  // docker://: the downloads run until the job is over, whichever way.
  std::unique_ptr<RegistryPull> pull;
  ResolvedImage image;
  if (request.resolved != nullptr) {
    image.layers = request.resolved->layers;
    image.manifest_digest = request.resolved->manifest_digest;
    image.config = request.resolved->config;
    image.config_digest = request.resolved->config_digest;
    image.feed_failure = request.resolved->feed_failure;
    image.take_input = request.resolved->take_input;
    if (request.config_fd >= 0 && image.config.empty()) {
      return Fail(MakeError(ErrorKind::kPolicy, "a config was asked for, and the source has none"));
    }
  } else if (docker && docker->fd >= 0) {
    // An open fd: the service checked what it took; one the caller passed
    // by name ("/dev/fd/N") is checked here.
    if (!from_fds) {
      if (Status s = CheckPassedFd(docker->fd, docker->file); !s) {
        return Fail(std::move(s).error().With("docker-archive"));
      }
    }
  } else if (docker) {
    // Opened the way the job will open it (no open that can block, a regular
    // file only), so that a fifo or a device is refused now, before any work.
    if (auto fd = sandbox::OpenRegularFile(AT_FDCWD, docker->file, 0); !fd) {
      return Fail(std::move(fd).error().With("docker-archive"));
    }
  } else if (IsRegistrySource(request.layers)) {
    PullOptions options = request.pull;
    options.cancel = request.cancel;
    // No request outlives the job's clock (a manifest dripped a byte a second).
    options.total_timeout_ms = static_cast<long>(request.policy.limits.job_timeout_ms);
    LX_ASSIGN_OR_RETURN(pull, RegistryPull::Start(request.layers[0], request.platform, options));
    image.layers = pull->image().layers;
    image.manifest_digest = pull->image().manifest_digest;
    image.config = pull->image().config;
    image.config_digest = pull->image().config_digest;
    image.feed_failure = [p = pull.get()](size_t i) { return p->Failure(i); };
    image.take_input = [p = pull.get()](size_t i) { return p->HashedInput(i); };
  } else {
    LX_ASSIGN_OR_RETURN(image, ResolveSources(request.layers, request.platform));
    // Every blob found by name, plain or in the layout, is opened now the way
    // the layer will open it: a fifo, a device or a missing blob is refused
    // before any work, not after the layers below it (passed descriptors were
    // checked by ResolveSources).
    for (size_t i = 0; i < image.layers.size(); ++i) {
      const LayerSource& layer = image.layers[i];
      if (layer.fd >= 0) continue;
      auto fd = layer.dir_fd >= 0
                    ? sandbox::OpenRegularFile(layer.dir_fd, layer.path,
                                               RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
                    : sandbox::OpenRegularFile(AT_FDCWD, layer.path, 0);
      if (!fd) return Fail(std::move(fd).error().WithLayer(i + 1, layer.display));
    }
    if (config_out && image.config.empty()) {
      return Fail(MakeError(ErrorKind::kPolicy,
                            "--config needs an image source (oci: or docker-archive:)"));
    }
  }

  LX_ASSIGN_OR_RETURN(UniqueFd extractor_fd, OpenExtractor(request.extractor_path));

  // The work tree goes beside the rootfs (renamed into place at the end), or,
  // when only an image or a manifest is wanted, where it is cheapest to make
  // and remove (ChooseScratch); a tmpfs that fills up is retried on disk once.
  const std::string beside = rootfs_out                     ? rootfs_out->dir
                             : ext4_out                     ? ext4_out->dir
                             : manifest_out                 ? manifest_out->dir
                             : !request.scratch_dir.empty() ? request.scratch_dir
                                                            : "/var/tmp";
  std::optional<std::string> scratch;
  if (!rootfs_out) scratch = ChooseScratch(request, image, docker);
  if (::geteuid() == 0) {
    SharedDirNotes notes;
    if (rootfs_out) {
      notes.Note(rootfs.written_dir_fd(), rootfs.existing() ? *request.rootfs : rootfs_out->dir,
                 rootfs.existing() ? "rootfs dir" : "output dir");
    }
    for (const auto* out : {&ext4_out, &manifest_out, &config_out}) {
      if (*out) notes.Note((*out)->dir, "output dir");
    }
    if (scratch) notes.Note(*scratch, "scratch dir");
    if (!rootfs_out) notes.Note(beside, "scratch dir");
  }
  RootfsTarget* rootfs_target = rootfs_out ? &rootfs : nullptr;
  if (scratch) {
    auto report = RunJobIn(*scratch, request, image, docker, start, extractor_fd.get(), rootfs_out,
                           rootfs_target, manifest_out, ext4_out, config_out);
    if (report || report.error().err() != ENOSPC || !request.scratch_dir.empty() ||
        !Rereadable(image, docker)) {
      return report;
    }
    log->warn("scratch: {} is full; extracting again beside the output", *scratch);
  }
  return RunJobIn(beside, request, image, docker, start, extractor_fd.get(), rootfs_out,
                  rootfs_target, manifest_out, ext4_out, config_out);
}

}  // namespace layerx::broker
