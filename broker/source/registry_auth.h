// Registry credentials, found where skopeo and podman find them
// (containers/image pkg/docker/config, getAuthFilePaths and
// findCredentialsInFile):
//   1. --creds USER:PASS, when given;
//   2. $REGISTRY_AUTH_FILE when set — and then no other file, as skopeo does;
//      otherwise $XDG_RUNTIME_DIR/containers/auth.json (/run/containers/UID/auth.json
//      when XDG_RUNTIME_DIR is unset), ${XDG_CONFIG_HOME:-~/.config}/containers/auth.json
//      and ~/.docker/config.json, in that order;
//   3. in each file, the `auths` entry whose key is the registry exactly, else one
//      whose key names the same registry in another form ("https://host/v1/",
//      "http://host:port/..."; docker.io, index.docker.io and registry-1.docker.io
//      are one registry). The first file with an entry wins.
// An `auth` value is base64 of "user:pass". A file that is missing or cannot be
// read (EACCES: rootless under a root HOME) is skipped; a file that is not a
// regular file is skipped too (never opened for reading).
// Not supported yet: credential helpers (`credHelpers`, `credsStore`), identity
// tokens, and keys naming a repository ("host/namespace").
// SECURITY: no secret ever enters an Error or a log line; errors name the file and
// the registry only.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "policy/result.h"

namespace layerx::broker {

struct Credentials {
  std::string username;
  std::string password;
};

// "USER:PASS" as --creds takes it (split at the first ':'); kPolicy without a ':'
// or with an empty user name.
Result<Credentials> ParseCreds(const std::string& user_colon_pass);

// The auth files to look in, in order, from the environment (REGISTRY_AUTH_FILE,
// XDG_RUNTIME_DIR, XDG_CONFIG_HOME, HOME).
std::vector<std::string> AuthFilePaths();

// Credentials for `registry` ("host" or "host:port", as in RegistryRef::registry):
// `creds` when given, else from `auth_files` as above. nullopt: none found
// (anonymous). Errors: kPolicy for malformed --creds, an auth file that is not
// valid JSON, or an entry for this registry whose `auth` is not base64 of
// "user:pass".
Result<std::optional<Credentials>> FindCredentials(const std::string& registry,
                                                   const std::optional<std::string>& creds,
                                                   const std::vector<std::string>& auth_files);

}  // namespace layerx::broker
