// What a client's extract call becomes: its passed descriptors and fields
// checked (only descriptors the client passed are ever read or written, and
// only the kinds a job may use), the Job the service keeps for it, and the
// result it gets back on the wire.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "broker/engine/job.h"
#include "broker/service/service.capnp.h"
#include "broker/service/service_config.h"
#include "layerx/layerx.hpp"
#include "sandbox/fd.h"

namespace layerx::serve {

namespace rpc = layerx::service;

constexpr size_t kMaxLayers = 240;
constexpr size_t kMaxConfigBytes = 4 << 20;  // as broker/source/source.cc reads configs

struct Peer {
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;
};

// Between the loop and one job's worker thread.
struct JobShared {
  CancelToken cancel;
  std::mutex mu;
  std::optional<Progress> progress;  // the newest, not yet sent
  std::atomic<uint32_t> layer{0}, layers{0};
  std::optional<ExtractResult> result;  // written once, before the fulfiller fires
};

struct JobOutcome {
  ExtractResult result;
  double queued_seconds = 0;
};

struct Job {
  uint64_t id = 0;
  size_t tenant = 0;
  Peer peer;
  int64_t accepted_ns = 0, started_ns = 0;
  bool running = false;
  std::vector<sandbox::UniqueFd> fds;  // everything passed, dup'd: owned here
  broker::ResolvedImage image;
  std::optional<broker::DockerArchiveSpec> docker;
  int ext4_fd = -1, manifest_fd = -1, config_fd = -1;
  broker::Ext4Options ext4;
  policy::Policy policy;
  uint64_t input_bytes = 0;
  size_t fd_cost = 0;  // reserved with Scheduler::ReserveFiles
  std::shared_ptr<JobShared> shared = std::make_shared<JobShared>();
  kj::Own<kj::PromiseFulfiller<JobOutcome>> waiter;  // the RPC's; null once it went away
  kj::Maybe<rpc::ProgressSink::Client> sink;
  bool sending = false;
  std::thread thread;
};

// An error for a client: exactly `sentence`. (KJ_EXCEPTION and KJ_REQUIRE
// would add the C++ expressions that built it, and their values.)
kj::Exception ClientError(std::string_view sentence);

ExtractResult Failed(FailureKind kind, std::string reason);

// The file descriptors of `request`, in order: the layers (or the archive),
// then the outputs; none for the layers of a request over kMaxLayers.
kj::Array<kj::Promise<kj::Maybe<int>>> RequestFds(rpc::ExtractRequest::Reader request);

// The numbers of the descriptors that came (-1 for one that did not); none
// when they did not come in time.
std::optional<std::vector<int>> FdNumbers(kj::Maybe<kj::Array<kj::Maybe<int>>> got);

// The job `request` asks for, `fds` being the descriptors that came with it
// in RequestFds' order (-1: one that did not come), within the policy and
// budgets of `tenant` (its index `index`). Takes dups of the fds it uses.
// Errors: kPolicy (a missing or unfit descriptor, nothing to write),
// kInvalidInput (a malformed digest or config), kIntegrity (a diff_id that is
// not the config's), kLimitExceeded (an ext4 size over the service's).
Result<std::unique_ptr<Job>> BuildJob(const Peer& peer, size_t index,
                                      const broker::TenantConfig& tenant,
                                      rpc::ExtractRequest::Reader request,
                                      const std::vector<int>& fds);

// Sends the newest progress of running `job` to its client's sink, unless a
// send is under way; one that fails ends the job's events. `jobs` (where the
// job is looked up again when the send completes) and `tasks` outlive it.
void SendProgress(Job& job, std::map<uint64_t, std::unique_ptr<Job>>& jobs, kj::TaskSet& tasks);

void FillResult(rpc::Result::Builder out, const ExtractResult& result, double queued_seconds);

}  // namespace layerx::serve
