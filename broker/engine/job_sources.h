// broker/engine, inside the job: what a job reads besides its layers. The
// extractor helper, opened; a docker-archive's own tar, staged by a jailed
// extractor. job_sources.cc also holds FindExtractor and Inspect (job.h).
// Shared by job.cc and job_sources.cc; not installed.
#pragma once

#include <string>

#include "broker/engine/job_outputs.h"
#include "broker/engine/layer_runner.h"
#include "broker/source/source.h"
#include "policy/result.h"
#include "sandbox/fd.h"

namespace layerx::broker {

// The extractor binary at `path` (empty: FindExtractor()), opened O_PATH.
Result<sandbox::UniqueFd> OpenExtractor(std::string path);

// The archive's own tar is unpacked like a layer, by a jailed extractor, into a
// staging dir beside the rootfs; only then are its manifest.json and config read.
Result<ResolvedImage> StageDockerArchive(const DockerArchiveSpec& spec, Workspace& work,
                                         const RunContext& ctx);

}  // namespace layerx::broker
