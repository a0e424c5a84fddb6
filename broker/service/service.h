// broker/service: `layerx serve` and its client (include/layerx/layerx.hpp
// Serve, QueryService, ExtractRequest::connect). What the public API calls
// besides those two public functions. May use: bridge, engine, source, log.
#pragma once

#include "layerx/layerx.hpp"

namespace layerx::detail {

// Runs `request` on the service at request.connect (broker/service/service_client.cc).
ExtractResult RemoteExtract(const ExtractRequest& request);

}  // namespace layerx::detail
