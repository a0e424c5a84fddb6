// broker/bridge: what the public API's parts share (broker/api, and the
// service's server and client in broker/service): the translations between
// the public types of include/layerx/layerx.hpp and the engine's own, errors as
// the API reports them, the SIGPIPE guard. Not installed.
// May use: engine, source, log (and policy).
#pragma once

#include <signal.h>

#include "broker/engine/job.h"
#include "broker/log/logging.h"
#include "layerx/layerx.hpp"

namespace layerx::detail {

FailureKind PublicKind(ErrorKind kind);
ExtractError PublicError(const Error& error);
ExtractReport PublicReport(const broker::JobReport& job);
LogLevel PublicLevel(spdlog::level::level_enum level);
spdlog::level::level_enum InternalLevel(LogLevel level);
Result<broker::Ext4Options> InternalExt4(const Ext4Settings& settings);
Result<broker::Platform> ParsePlatform(const std::string& text);
// kPolicy for malformed --creds or parallel downloads out of 0..16.
Result<broker::PullOptions> PullOptionsFrom(const RegistrySettings& settings);
// The policy of a request: the defaults, then the file, then the TOML text.
Result<policy::Policy> LoadPolicy(const std::string& file, const std::string& toml);
// The engine's request for a public one (kPolicy for a bad setting).
Result<broker::ExtractRequest> InternalRequest(const ExtractRequest& request);
// The request's log callback as the engine's (empty when it has none).
broker::LogFunction InternalLog(const ExtractRequest& request);

// An error of the client side of the service, as one line.
ExtractError MakePublicError(FailureKind kind, std::string reason, int sys_errno = 0);

// SIGPIPE blocked on this thread for the scope; one left pending is taken.
class SigpipeBlock {
 public:
  SigpipeBlock();
  ~SigpipeBlock();
  SigpipeBlock(const SigpipeBlock&) = delete;
  SigpipeBlock& operator=(const SigpipeBlock&) = delete;

 private:
  sigset_t pipe_, old_;
};

}  // namespace layerx::detail
