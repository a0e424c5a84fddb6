// Internal to broker/source: how registry_pull reaches a registry and resolves
// an image there (registry_resolve.cc); ResolveRegistry and RegistryPull::Start
// share it.
#pragma once

#include <memory>

#include "broker/source/registry_client.h"
#include "broker/source/registry_pull.h"
#include "broker/source/source.h"

namespace layerx::broker::registry_detail {

// What a registry answered (unauthorized, not found, a schema 1 manifest, TLS
// refused) fails the job like any other input, exit status 1: the same command
// may succeed once the registry or its credentials change. Only what is wrong
// in the command itself (a bad name, --creds, --cert-dir) is a usage error.
Error Answered(Error e);

// A client for `ref` with the pull's options and the credentials found for it.
Result<std::unique_ptr<RegistryClient>> Connect(const RegistryRef& ref, const PullOptions& options);

// The image `client` names: manifest (an index picks by `platform`) and config.
// `on_layers`, when given, has the layers before the config is fetched.
Result<ResolvedImage> Resolve(RegistryClient& client, const Platform& platform,
                              const LayersFound& on_layers = nullptr);

}  // namespace layerx::broker::registry_detail
