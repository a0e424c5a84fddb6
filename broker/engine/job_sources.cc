// What a job reads besides its layers (job_sources.h), where the extractor
// helper is (FindExtractor), and `layerx inspect` (Inspect): the sources
// resolved, nothing applied.
#include "broker/engine/job_sources.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <optional>
#include <system_error>
#include <vector>

#include "broker/engine/job.h"
#include "sandbox/sys.h"

namespace layerx::broker {

using sandbox::UniqueFd;

Result<UniqueFd> OpenExtractor(std::string path) {
  if (path.empty()) {
    LX_ASSIGN_OR_RETURN(path, FindExtractor());
  }
  return sandbox::OpenAt(AT_FDCWD, path, O_PATH);
}

Result<ResolvedImage> StageDockerArchive(const DockerArchiveSpec& spec, Workspace& work,
                                         const RunContext& ctx) {
  LX_ASSIGN_OR_RETURN(UniqueFd staging, work.MakeDir("archive"));
  ImageTree scratch(ctx.policy->limits, ctx.policy->rules);
  RunContext staging_ctx = ctx;
  staging_ctx.rootfs_fd = staging.get();
  staging_ctx.data = sandbox::JailData{};  // the archive's files are read back: a real tree
  staging_ctx.data_fd = -1;
  auto staged =
      RunLayer(staging_ctx, LayerInput{.index = 0, .path = spec.file, .fd = spec.fd}, scratch);
  if (!staged) return Fail(std::move(staged).error().With("docker-archive {:?}", spec.file));
  auto resolved = ResolveDockerArchive(std::move(staging), spec.ref);
  if (!resolved) return Fail(std::move(resolved).error().With("docker-archive:{}", spec.file));
  return resolved;
}

Result<ImageInfo> Inspect(const InspectRequest& request) {
  ImageInfo info;
  ResolvedImage image;
  Workspace work;
  if (auto docker = ParseDockerArchiveSpec(request.sources)) {
    if (docker->fd >= 0) {
      if (Status s = CheckPassedFd(docker->fd, docker->file); !s) {
        return Fail(std::move(s).error().With("docker-archive"));
      }
    }
    LX_ASSIGN_OR_RETURN(UniqueFd extractor_fd, OpenExtractor(request.extractor_path));
    const char* tmp = ::getenv("TMPDIR");
    LX_TRY(work.Create(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp"));
    RunContext ctx{.policy = &request.policy,
                   .rootfs_fd = work.rootfs_fd(),
                   .extractor_fd = extractor_fd.get()};
    LX_ASSIGN_OR_RETURN(image, StageDockerArchive(*docker, work, ctx));
  } else if (IsRegistrySource(request.sources)) {
    PullOptions options = request.pull;
    options.total_timeout_ms = static_cast<long>(request.policy.limits.job_timeout_ms);
    LX_ASSIGN_OR_RETURN(image, ResolveRegistry(request.sources[0], request.platform, options));
  } else {
    LX_ASSIGN_OR_RETURN(image, ResolveSources(request.sources, request.platform));
  }
  info.manifest_digest = image.manifest_digest;
  info.config_digest = image.config_digest;
  info.config = image.config;
  for (const LayerSource& l : image.layers) {
    std::optional<uint64_t> size = l.size;
    if (!size) {
      // Below the staging dir only, like the job opens it (never a link out).
      auto fd = l.dir_fd >= 0 ? sandbox::OpenAt2(l.dir_fd, l.path, O_PATH,
                                                 RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
                              : sandbox::OpenAt(AT_FDCWD, l.path, O_PATH);
      if (fd) {
        if (auto st = sandbox::Fstat(fd->get())) size = static_cast<uint64_t>(st->st_size);
      }
    }
    info.layers.push_back(ImageInfo::Layer{.name = l.display,
                                           .digest = l.digest.value_or(""),
                                           .diff_id = l.diff_id.value_or(""),
                                           .media_type = l.media_type,
                                           .size = size.value_or(0)});
  }
  return info;
}

Result<std::string> FindExtractor() {
  if (const char* env = ::getenv("LAYERX_EXTRACTOR"); env != nullptr && *env != '\0') {
    return std::string(env);
  }
  std::vector<std::filesystem::path> candidates;
  std::error_code ec;
  std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    candidates.push_back(self.parent_path() / "layerx-extractor");
    candidates.push_back(self.parent_path() / ".." / "libexec" / "layerx" / "layerx-extractor");
  }
#ifdef LAYERX_LIBDIR_TO_LIBEXEC
  // A program that loads liblayerx (python3, a Go binary) lives elsewhere:
  // look beside the library too, then where the install put the helper.
  Dl_info info;
  if (::dladdr(reinterpret_cast<void*>(&FindExtractor), &info) != 0 && info.dli_fname != nullptr) {
    std::filesystem::path lib = std::filesystem::canonical(info.dli_fname, ec);
    if (!ec)
      candidates.push_back(lib.parent_path() / LAYERX_LIBDIR_TO_LIBEXEC / "layerx-extractor");
  }
#endif
#ifdef LAYERX_INSTALL_LIBEXECDIR
  candidates.push_back(std::filesystem::path(LAYERX_INSTALL_LIBEXECDIR) / "layerx-extractor");
#endif
  for (const auto& candidate : candidates) {
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
  }
  return Fail(MakeError(
      ErrorKind::kPolicy,
      "layerx-extractor not found beside {:?} or liblayerx (set LAYERX_EXTRACTOR)", self.string()));
}

}  // namespace layerx::broker
