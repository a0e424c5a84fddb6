// What the public API's parts share (broker/api.cc, broker/service.cc,
// broker/service_client.cc): the translations between the public types of
// include/layerx/layerx.hpp and the broker's own. Not installed.
#pragma once

#include <signal.h>

#include "broker/job.h"
#include "broker/logging.h"
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

// An error of the client side of the service, as one line.
ExtractError MakePublicError(FailureKind kind, std::string reason, int sys_errno = 0);

// Runs `request` on the service at request.connect (broker/service_client.cc).
ExtractResult RemoteExtract(const ExtractRequest& request);

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
