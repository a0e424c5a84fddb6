#include "broker/service/request.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>

#include <nlohmann/json.hpp>

#include "broker/bridge/bridge.h"
#include "broker/service/service_wire.h"
#include "sandbox/sys.h"

namespace layerx::serve {

using sandbox::UniqueFd;


// An error for a client: exactly `sentence`. (KJ_EXCEPTION and KJ_REQUIRE
// would add the C++ expressions that built it, and their values.)
kj::Exception ClientError(std::string_view sentence) {
  return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                       kj::heapString(sentence.data(), sentence.size()));
}

void FillResult(rpc::Result::Builder out, const ExtractResult& result, double queued_seconds) {
  if (!result.ok()) {
    const ExtractError& e = result.error();
    auto f = out.initFailure();
    f.setKind(WireKind(e.kind));
    f.setMessage(e.message);
    f.setLayerIndex(static_cast<uint32_t>(e.layer_index));
    f.setLayer(e.layer);
    f.setEntry(kj::arrayPtr(reinterpret_cast<const kj::byte*>(e.entry.data()), e.entry.size()));
    f.setReason(e.reason);
    f.setErrno(e.sys_errno);
    return;
  }
  const ExtractReport& r = result.report();
  auto rep = out.initReport();
  rep.setEntries(r.entries);
  rep.setSeconds(r.seconds);
  rep.setManifestDigest(r.manifest_digest);
  rep.setQueuedSeconds(queued_seconds);
  auto layers = rep.initLayers(static_cast<uint>(r.layers.size()));
  for (size_t i = 0; i < r.layers.size(); ++i) {
    const LayerSummary& l = r.layers[i];
    auto w = layers[static_cast<uint>(i)];
    w.setIndex(static_cast<uint32_t>(l.index));
    w.setName(l.name);
    w.setDigest(l.digest);
    w.setDiffId(l.diff_id);
    w.setCompressedBytes(l.compressed_bytes);
    w.setUncompressedBytes(l.uncompressed_bytes);
    w.setEntries(l.entries);
    w.setFileBytes(l.file_bytes);
    w.setSetupMs(l.setup_ms);
    w.setExtractMs(l.extract_ms);
    w.setSendMs(l.send_ms);
    w.setMergeMs(l.merge_ms);
    w.setTotalMs(l.total_ms);
    w.setExtractorPeakRssKib(l.extractor_peak_rss_kib);
  }
  if (r.ext4) {
    rep.setHasExt4(true);
    auto e = rep.initExt4();
    e.setSizeBytes(r.ext4->size_bytes);
    e.setContentBytes(r.ext4->content_bytes);
    e.setInodes(r.ext4->inodes);
    e.setBuildMs(r.ext4->build_ms);
    e.setDeadBytes(static_cast<double>(r.ext4->dead_bytes));
  }
}

ExtractResult Failed(FailureKind kind, std::string reason) {
  return ExtractResult(detail::MakePublicError(kind, std::move(reason)));
}

namespace {

// A name the client chose, as it may appear in logs and errors: at most 256
// printable ASCII bytes, else `fallback`.
std::string ClientName(std::string_view name, std::string fallback) {
  if (name.empty() || name.size() > 256) return fallback;
  for (char c : name) {
    if (c < 0x20 || c > 0x7e) return fallback;
  }
  return std::string(name);
}


// Files the service must not read or write for a client: on FUSE (a read can
// block for as long as the client's own server likes, past every clock and
// cancel), or the kernel's own file systems (proc, sys, debug, cgroup...),
// whose files answer with the reader's privileges.
Status CheckFileSystem(int fd, const char* what) {
  struct statfs fs;
  if (::fstatfs(fd, &fs) != 0) return Fail(OsError(errno, "{}: fstatfs", what));
  switch (static_cast<unsigned long>(fs.f_type)) {
    case FUSE_SUPER_MAGIC:
    case PROC_SUPER_MAGIC:
    case SYSFS_MAGIC:
    case DEBUGFS_MAGIC:
    case TRACEFS_MAGIC:
    case SECURITYFS_MAGIC:
    case CGROUP_SUPER_MAGIC:
    case CGROUP2_SUPER_MAGIC:
    case BPF_FS_MAGIC:
    case EFIVARFS_MAGIC:
    case 0x62656570:  // configfs
      return Fail(MakeError(ErrorKind::kPolicy,
                            "{}: on a file system the service does not read or write for "
                            "clients (FUSE, proc, sys, ...)",
                            what));
    default:
      return {};
  }
}

// A passed input: readable (not O_PATH), a regular file or a pipe.
Result<UniqueFd> TakeInput(int fd, const char* what) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return Fail(OsError(errno, "{}", what));
  if ((flags & O_PATH) != 0 || (flags & O_ACCMODE) == O_WRONLY) {
    return Fail(
        MakeError(ErrorKind::kPolicy, "{}: not opened for reading (O_RDONLY, not O_PATH)", what));
  }
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(fd));
  if (!S_ISREG(st.st_mode) && !S_ISFIFO(st.st_mode)) {
    return Fail(MakeError(ErrorKind::kPolicy, "{}: not a regular file or a pipe", what));
  }
  LX_TRY(CheckFileSystem(fd, what));
  return sandbox::Dup(fd);
}

// A passed output: an empty regular file open for writing, not O_APPEND.
Result<UniqueFd> TakeOutput(int fd, const char* what) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return Fail(OsError(errno, "{}", what));
  if ((flags & O_PATH) != 0 || (flags & O_ACCMODE) == O_RDONLY || (flags & O_APPEND) != 0) {
    return Fail(MakeError(ErrorKind::kPolicy,
                          "{}: not opened for writing (O_WRONLY or O_RDWR, "
                          "not O_APPEND)",
                          what));
  }
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(fd));
  if (!S_ISREG(st.st_mode))
    return Fail(MakeError(ErrorKind::kPolicy, "{}: not a regular file", what));
  if (st.st_size != 0) return Fail(MakeError(ErrorKind::kPolicy, "{}: not empty", what));
  LX_TRY(CheckFileSystem(fd, what));
  return sandbox::Dup(fd);
}

}  // namespace

kj::Array<kj::Promise<kj::Maybe<int>>> RequestFds(rpc::ExtractRequest::Reader request) {
  auto source = request.getSource();
  kj::Vector<kj::Promise<kj::Maybe<int>>> fd_promises;
  if (source.isDockerArchive()) {
    fd_promises.add(source.getDockerArchive().getFile().getFd());
  } else if (source.getImage().getLayers().size() <= kMaxLayers) {
    for (auto layer : source.getImage().getLayers()) fd_promises.add(layer.getBlob().getFd());
  }
  if (request.hasExt4()) fd_promises.add(request.getExt4().getFd());
  if (request.hasManifest()) fd_promises.add(request.getManifest().getFd());
  if (request.hasConfig()) fd_promises.add(request.getConfig().getFd());
  return fd_promises.releaseAsArray();
}

std::optional<std::vector<int>> FdNumbers(kj::Maybe<kj::Array<kj::Maybe<int>>> got) {
  std::vector<int> fds;
  KJ_IF_MAYBE (array, got) {
    for (auto& m : *array) {
      KJ_IF_MAYBE (fd, m) {
        fds.push_back(*fd);
      } else {
        fds.push_back(-1);
      }
    }
    return fds;
  }
  return std::nullopt;
}

Result<std::unique_ptr<Job>> BuildJob(const Peer& peer, size_t index,
                                      const broker::TenantConfig& t,
                                      rpc::ExtractRequest::Reader request,
                                      const std::vector<int>& fds) {
  auto job = std::make_unique<Job>();
  job->tenant = index;
  job->peer = peer;
  size_t next = 0;
  auto take_input = [&](const char* what) -> Result<int> {
    if (next >= fds.size() || fds[next] < 0) {
      return Fail(MakeError(ErrorKind::kPolicy, "{}: no file descriptor came with it", what));
    }
    LX_ASSIGN_OR_RETURN(UniqueFd fd, TakeInput(fds[next++], what));
    job->fds.push_back(std::move(fd));
    return job->fds.back().get();
  };
  auto source = request.getSource();
  if (source.isDockerArchive()) {
    auto d = source.getDockerArchive();
    LX_ASSIGN_OR_RETURN(int fd, take_input("docker-archive"));
    std::string ref = d.getRef();
    if (ClientName(ref, "") != ref) {
      return Fail(
          MakeError(ErrorKind::kPolicy, "docker-archive ref: over 256 bytes or not printable"));
    }
    job->docker = broker::DockerArchiveSpec{
        .file = ClientName(d.getName().cStr(), "(fd)"), .ref = ref, .fd = fd};
    struct stat st;
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) job->input_bytes = st.st_size;
  } else {
    auto image = source.getImage();
    if (image.getLayers().size() == 0)
      return Fail(MakeError(ErrorKind::kPolicy, "no layers given"));
    if (image.getLayers().size() > kMaxLayers) {
      return Fail(MakeError(ErrorKind::kPolicy, "over {} layers", kMaxLayers));
    }
    auto config = image.getConfig();
    job->image.config.assign(reinterpret_cast<const char*>(config.begin()), config.size());
    job->image.manifest_digest = image.getManifestDigest();
    if (!job->image.manifest_digest.empty() && !broker::IsValidDigest(job->image.manifest_digest)) {
      return Fail(MakeError(ErrorKind::kInvalidInput, "manifest digest: not sha256:<64 hex>"));
    }
    std::vector<std::string> diff_ids;
    if (!job->image.config.empty()) {
      // The tar streams are checked against the config's diff_ids, not the client's word.
      auto doc = nlohmann::json::parse(job->image.config, nullptr, false);
      if (doc.is_discarded() || !doc.is_object()) {
        return Fail(MakeError(ErrorKind::kInvalidInput, "image config: not a JSON object"));
      }
      auto ids = doc.find("rootfs");
      if (ids != doc.end() && ids->is_object() && ids->contains("diff_ids") &&
          (*ids)["diff_ids"].is_array()) {
        for (const auto& d : (*ids)["diff_ids"]) {
          if (!d.is_string() || !broker::IsValidDigest(d.get<std::string>())) {
            return Fail(MakeError(ErrorKind::kInvalidInput, "image config: bad diff_ids"));
          }
          diff_ids.push_back(d.get<std::string>());
        }
      }
      if (diff_ids.size() != image.getLayers().size()) {
        return Fail(MakeError(ErrorKind::kInvalidInput,
                              "image config lists {} diff_ids for {} layers", diff_ids.size(),
                              image.getLayers().size()));
      }
    }
    size_t i = 0;
    for (auto layer : image.getLayers()) {
      broker::LayerSource l;
      l.display = ClientName(layer.getName().cStr(), fmt::format("layer {}", i + 1));
      l.path = l.display;  // names it in the report (read from l.fd)
      std::string digest = layer.getDigest();
      std::string diff_id = layer.getDiffId();
      if (!diff_id.empty() && !broker::IsValidDigest(diff_id)) {
        return Fail(
            MakeError(ErrorKind::kInvalidInput, "layer {}: diff_id: not sha256:<64 hex>", i + 1));
      }
      if (!digest.empty()) {
        if (!broker::IsValidDigest(digest)) {
          return Fail(
              MakeError(ErrorKind::kInvalidInput, "layer {}: digest: not sha256:<64 hex>", i + 1));
        }
        l.digest = digest;
        l.size = layer.getSize();
      }
      if (!diff_ids.empty()) {
        if (!diff_id.empty() && diff_id != diff_ids[i]) {
          return Fail(MakeError(ErrorKind::kIntegrity,
                                "layer {}: diff_id {} is not the config's {}", i + 1, diff_id,
                                diff_ids[i]));
        }
        l.diff_id = diff_ids[i];
      } else if (!diff_id.empty()) {
        l.diff_id = diff_id;
      }
      l.media_type = ClientName(layer.getMediaType().cStr(), "");
      LX_ASSIGN_OR_RETURN(l.fd, take_input("layer"));
      struct stat st;
      if (l.size) {
        job->input_bytes += *l.size;
      } else if (::fstat(l.fd, &st) == 0 && S_ISREG(st.st_mode)) {
        job->input_bytes += st.st_size;
      }
      job->image.layers.push_back(std::move(l));
      ++i;
    }
  }
  struct Out {
    bool has;
    int* slot;
    const char* what;
  };
  bool any = false;
  for (Out out : {Out{request.hasExt4(), &job->ext4_fd, "ext4 output"},
                  Out{request.hasManifest(), &job->manifest_fd, "manifest output"},
                  Out{request.hasConfig(), &job->config_fd, "config output"}}) {
    if (!out.has) continue;
    if (next >= fds.size() || fds[next] < 0) {
      return Fail(MakeError(ErrorKind::kPolicy, "{}: no file descriptor came with it", out.what));
    }
    LX_ASSIGN_OR_RETURN(UniqueFd fd, TakeOutput(fds[next++], out.what));
    *out.slot = fd.get();
    job->fds.push_back(std::move(fd));
    any = true;
  }
  if (!any)
    return Fail(
        MakeError(ErrorKind::kPolicy, "nothing to write: give an ext4, manifest or config output"));
  if (job->config_fd >= 0 && !job->docker && job->image.config.empty()) {
    return Fail(MakeError(ErrorKind::kPolicy, "a config was asked for, and the source has none"));
  }

  auto s = request.getExt4Settings();
  Ext4Settings settings;
  settings.size_bytes = s.getSizeBytes();
  settings.block_size = s.getBlockSize();
  settings.inode_ratio = s.getInodeRatio();
  settings.label = s.getLabel();
  settings.uuid = s.getUuid();
  settings.reproducible = s.getReproducible();
  settings.source_date_epoch = s.getSourceDateEpoch();
  LX_ASSIGN_OR_RETURN(job->ext4, detail::InternalExt4(settings));
  // mkfs writes an image of the size asked for into the service's scratch:
  // no bigger than the content could need.
  const uint64_t max_ext4 =
      std::max<uint64_t>(64 * policy::kGiB, 2 * t.byte_budget);
  if (settings.size_bytes > max_ext4) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "ext4 size {} is over the service's {}",
                          settings.size_bytes, max_ext4));
  }

  // The tenant's policy; the client may only shorten its clocks. The byte
  // budget caps each layer's tar stream and the image's file data.
  policy::PolicyBuilder builder(t.policy);
  const policy::Limits& limits = t.policy.limits;
  if (request.getLayerTimeoutMs() > 0 && request.getLayerTimeoutMs() < limits.layer_timeout_ms) {
    builder.LayerTimeoutMs(request.getLayerTimeoutMs());
  }
  if (request.getJobTimeoutMs() > 0 && request.getJobTimeoutMs() < limits.job_timeout_ms) {
    builder.JobTimeoutMs(request.getJobTimeoutMs());
  }
  if (t.byte_budget > 0) {
    builder.MaxLayerBytes(std::min(limits.max_layer_bytes, t.byte_budget));
  }
  LX_ASSIGN_OR_RETURN(job->policy, builder.Build());
  if (t.byte_budget > 0) {
    job->policy.limits.max_image_bytes =
        std::min(job->policy.limits.max_image_bytes, t.byte_budget);
  }
  return job;
}

void SendProgress(Job& job, std::map<uint64_t, std::unique_ptr<Job>>& jobs, kj::TaskSet& tasks) {
  if (job.sending) return;
  rpc::ProgressSink::Client* sink = nullptr;
  KJ_IF_MAYBE (s, job.sink) {
    sink = s;
  }
  if (sink == nullptr) return;
  std::optional<Progress> p;
  {
    std::lock_guard lock(job.shared->mu);
    p.swap(job.shared->progress);
  }
  if (!p) return;
  auto req = sink->eventRequest();
  auto e = req.getEvent();
  e.setLayer(static_cast<uint32_t>(p->layer));
  e.setLayers(static_cast<uint32_t>(p->layers));
  e.setBytesFed(p->bytes_fed);
  e.setBlobBytes(p->blob_bytes);
  e.setEntries(p->entries);
  e.setDone(p->done);
  job.sending = true;
  uint64_t id = job.id;
  tasks.add(req.send().then(
      [&jobs, id]() {
        auto it = jobs.find(id);
        if (it != jobs.end()) it->second->sending = false;
      },
      [&jobs, id](kj::Exception&&) {
        auto it = jobs.find(id);
        if (it != jobs.end()) it->second->sink = nullptr;  // a broken sink: no more events
      }));
}

}  // namespace layerx::serve
