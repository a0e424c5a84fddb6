// FailureKind on the service's wire (broker/service/service.capnp) and in the public
// API, both ways: the server (broker/service/hub.cc) and the client
// (broker/service/service_client.cc) share one mapping. Not installed.
#pragma once

#include "broker/service/service.capnp.h"
#include "layerx/layerx.hpp"

namespace layerx {

inline service::FailureKind WireKind(FailureKind kind) {
  switch (kind) {
    case FailureKind::kRefused:
      return service::FailureKind::REFUSED;
    case FailureKind::kInvalidInput:
      return service::FailureKind::INVALID_INPUT;
    case FailureKind::kIntegrity:
      return service::FailureKind::INTEGRITY;
    case FailureKind::kSandbox:
      return service::FailureKind::SANDBOX;
    case FailureKind::kIo:
      return service::FailureKind::IO;
    case FailureKind::kUsage:
      return service::FailureKind::USAGE;
    case FailureKind::kCancelled:
      return service::FailureKind::CANCELLED;
    case FailureKind::kBusy:
      return service::FailureKind::BUSY;
    case FailureKind::kUnauthorized:
      return service::FailureKind::UNAUTHORIZED;
    case FailureKind::kInternal:
      break;
  }
  return service::FailureKind::INTERNAL;
}

// A kind this build does not know (a newer service's) is internal.
inline FailureKind PublicKind(service::FailureKind kind) {
  switch (kind) {
    case service::FailureKind::REFUSED:
      return FailureKind::kRefused;
    case service::FailureKind::INVALID_INPUT:
      return FailureKind::kInvalidInput;
    case service::FailureKind::INTEGRITY:
      return FailureKind::kIntegrity;
    case service::FailureKind::SANDBOX:
      return FailureKind::kSandbox;
    case service::FailureKind::IO:
      return FailureKind::kIo;
    case service::FailureKind::USAGE:
      return FailureKind::kUsage;
    case service::FailureKind::CANCELLED:
      return FailureKind::kCancelled;
    case service::FailureKind::BUSY:
      return FailureKind::kBusy;
    case service::FailureKind::UNAUTHORIZED:
      return FailureKind::kUnauthorized;
    case service::FailureKind::INTERNAL:
      break;
  }
  return FailureKind::kInternal;
}

}  // namespace layerx
