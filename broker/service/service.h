// broker/service: `layerx serve` and its client (include/layerx/layerx.hpp
// Serve, QueryService, ExtractRequest::connect). The scheduler (scheduler.h,
// plain logic), the loop and its jobs (hub.h), connections, request and
// descriptor checks (request.h), workers, metrics and status, the listening
// socket and stop signals (listen.h), the config and the RPC schema.
// May use: bridge, engine, source, log.
//
// What the public API (broker/api) calls besides Serve and QueryService:
#pragma once

#include "layerx/layerx.hpp"

namespace layerx::detail {

// Runs `request` on the service at request.connect (broker/service/service_client.cc).
ExtractResult RemoteExtract(const ExtractRequest& request);

}  // namespace layerx::detail
