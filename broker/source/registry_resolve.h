// Internal to broker/source: how registry_pull reaches a registry and resolves
// an image there (registry_resolve.cc); ResolveRegistry and RegistryPull::Start
// share it.
#pragma once

#include <memory>

#include "broker/source/registry_client.h"
#include "broker/source/registry_pull.h"
#include "broker/source/registry_ref.h"
#include "broker/source/source.h"

namespace layerx::broker::registry_detail {

// What a registry answered (unauthorized, not found, a schema 1 manifest, TLS
// refused) fails the job like any other input, exit status 1: the same command
// may succeed once the registry or its credentials change. Only what is wrong
// in the command itself (a bad name, --creds, --cert-dir) is a usage error.
Error Answered(Error e);

// The registry that answers for `ref`, and its answer: registries.conf's
// sources in order (mirrors, then the primary location; `ref` itself when no
// table matches), the first that gives the image's manifest. A blocked name
// fails at once; a source that fails is said with -v and the next one is
// tried; when all fail, the primary's error names the mirrors' too.
struct Reached {
  RegistryRef ref;  // where the image is pulled from (a mirror's name, maybe)
  std::unique_ptr<RegistryClient> client;
  RegistryManifest top;  // the manifest `ref` names
};
Result<Reached> Reach(const RegistryRef& ref, const PullOptions& options);

// The image `top` is the manifest of: an index picks by `platform`, then the
// config. `on_layers`, when given, has the layers before the config is fetched.
Result<ResolvedImage> Resolve(RegistryClient& client, RegistryManifest top,
                              const Platform& platform, const LayersFound& on_layers = nullptr);

}  // namespace layerx::broker::registry_detail
