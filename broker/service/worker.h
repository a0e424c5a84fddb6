// A running job's worker thread: the one place a job's extraction runs
// (broker::RunExtract), apart from the service's loop. It reads the job's
// request fields (the loop leaves them alone while it runs) and writes only
// job.shared; the loop learns of its end through a cross-thread fulfiller.
#pragma once

#include <kj/async.h>

#include <atomic>
#include <string>

#include "broker/service/request.h"
#include "broker/service/service_log.h"

namespace layerx::serve {

// What a worker needs of the service; everything must outlive the job.
struct Worker {
  const ServiceLog* log = nullptr;  // its lines, named for the tenant and the job
  const std::string* tenant = nullptr;
  LogLevel min_level = LogLevel::kInfo;
  const std::string* scratch_dir = nullptr;
  const std::string* extractor_path = nullptr;
  const std::atomic<bool>* stopping = nullptr;  // the service is stopping: say so on cancel
};

// Runs `job` on a thread of its own (job.thread), then sets job.shared->result
// and fulfills `done`. Without a thread (EAGAIN: TasksMax, RLIMIT_NPROC) the
// result is a kIo failure, and `done` is fulfilled at once.
void StartWorker(Job& job, Worker worker, kj::Own<kj::CrossThreadPromiseFulfiller<void>> done);

}  // namespace layerx::serve
