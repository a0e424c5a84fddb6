#include "broker/service/worker.h"

#include <fmt/format.h>

#include <memory>
#include <system_error>

#include "broker/bridge/bridge.h"
#include "broker/log/logging.h"

namespace layerx::serve {

namespace {

// On the worker thread: reads the job's request fields (the loop leaves them
// alone while it runs) and writes only job.shared.
void RunJob(Job& job, const Worker& worker) {
  const std::string& tenant = *worker.tenant;
  const uint64_t id = job.id;
  const ServiceLog& log = *worker.log;
  broker::LogTarget target(
      [&log, &tenant, id](spdlog::level::level_enum level, std::string_view component,
                          std::string_view message) {
        log(detail::PublicLevel(level), component, tenant, id, message);
      },
      detail::InternalLevel(worker.min_level));
  detail::SigpipeBlock sigpipe;
  broker::ExtractRequest request;
  if (job.docker) {
    request.docker = job.docker;
  } else {
    request.resolved = &job.image;
  }
  request.ext4_fd = job.ext4_fd;
  request.manifest_fd = job.manifest_fd;
  request.config_fd = job.config_fd;
  request.ext4_options = job.ext4;
  request.policy = job.policy;
  request.scratch_dir = *worker.scratch_dir;
  request.extractor_path = *worker.extractor_path;
  request.cancel = job.shared->cancel.flag();
  std::shared_ptr<JobShared> shared = job.shared;
  request.progress = [shared](const broker::LayerProgress& p) {
    shared->layer.store(static_cast<uint32_t>(p.index));
    shared->layers.store(static_cast<uint32_t>(p.layers));
    std::lock_guard lock(shared->mu);
    shared->progress = Progress{.layer = p.index,
                                .layers = p.layers,
                                .bytes_fed = p.bytes_fed,
                                .blob_bytes = p.blob_bytes,
                                .entries = p.records,
                                .done = p.done};
  };
  auto report = broker::RunExtract(request);
  if (report) {
    shared->result.emplace(detail::PublicReport(*report));
  } else {
    ExtractError error = detail::PublicError(report.error());
    if (error.kind == FailureKind::kCancelled && worker.stopping->load()) {
      error.reason = "the service is shutting down";
      error.message = error.message + " (the service is shutting down)";
    }
    shared->result.emplace(std::move(error));
  }
}

}  // namespace

void StartWorker(Job& job, Worker worker, kj::Own<kj::CrossThreadPromiseFulfiller<void>> done) {
  // (In a shared_ptr: a kj::Own's destructor may throw, a thread's state's may not.)
  auto fulfiller = std::make_shared<kj::Own<kj::CrossThreadPromiseFulfiller<void>>>(kj::mv(done));
  try {
    job.thread = std::thread([&job, worker, fulfiller]() {
      try {
        RunJob(job, worker);
      } catch (const std::exception& e) {
        job.shared->result.emplace(detail::MakePublicError(FailureKind::kInternal, e.what()));
      } catch (...) {
        job.shared->result.emplace(
            detail::MakePublicError(FailureKind::kInternal, "unknown error"));
      }
      (*fulfiller)->fulfill();
    });
  } catch (const std::system_error& e) {
    // No thread (EAGAIN: TasksMax, RLIMIT_NPROC): the job fails, its slot is freed.
    job.shared->result.emplace(detail::MakePublicError(
        FailureKind::kIo, fmt::format("no thread for the job: {}", e.what()), e.code().value()));
    (*fulfiller)->fulfill();
  }
}

}  // namespace layerx::serve
