// Registry credentials, found where skopeo and podman find them
// (containers/image pkg/docker/config, getAuthFilePaths and
// findCredentialsInFile):
//   1. --creds USER:PASS, when given;
//   2. $REGISTRY_AUTH_FILE when set — and then no other file, as skopeo does;
//      otherwise $XDG_RUNTIME_DIR/containers/auth.json (/run/containers/UID/auth.json
//      when XDG_RUNTIME_DIR is unset), ${XDG_CONFIG_HOME:-~/.config}/containers/auth.json,
//      ${DOCKER_CONFIG:-~/.docker}/config.json and the legacy ~/.dockercfg (its
//      registries at the top, no `auths` or `credHelpers`; any file so named is
//      read so), in that order;
//   3. in each file, a `credHelpers` entry for the registry first: the helper
//      `docker-credential-NAME get` is run (from $PATH; the registry on its
//      stdin, its JSON answer on stdout, 30 s at most); "credentials not found"
//      goes on to the next file; a helper that fails ends the search (another
//      file could hold another identity), as in skopeo;
//   4. else the `auths` entry whose key is the repository ("host/ns/repo"), a
//      namespace of it ("host/ns") or the registry, exactly, the most specific
//      first; else one whose key
//      names the same registry in another form ("https://host/v1/",
//      "http://host:port/..."; docker.io, index.docker.io and registry-1.docker.io
//      are one registry). The first file with an entry wins.
// registries.conf's `credential-helpers` (registries_conf.h) can put helpers
// of their own before, after or instead of steps 2-4 ("containers-auth.json"
// stands for them): each is asked in turn; one that has none, or fails, gives
// way to the next; the first credentials win, and when none are found the
// first failure is the error, as in containers/image.
// An `auth` value is base64 of "user:pass". A file that is missing or cannot be
// read (EACCES: rootless under a root HOME) is skipped; a file that is not a
// regular file is skipped too (never opened for reading).
// An entry's `identitytoken`, or a helper's "<token>" user, gives an identity
// token (Credentials::identity_token). Not read (skopeo does not read it
// either): `credsStore`.
// SECURITY: no secret ever enters an Error or a log line; errors name the file and
// the registry only.
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <vector>

#include "policy/result.h"

namespace layerx::broker {

struct Credentials {
  std::string username;
  std::string password;
  // An identity token (an OAuth2 refresh token: an auth file's `identitytoken`,
  // a helper's "<token>" user), traded at the registry's token realm for a
  // Bearer token (username and password, when the entry had them too, serve a
  // registry that asks for Basic). SECURITY: a secret.
  std::string identity_token;
  // SECURITY: every copy wipes the three when it goes (no move is declared, so
  // a move is a copy, and both wipe).
  ~Credentials();
};

// Overwrites `s` up to its capacity (what a shorter value left behind too).
void WipeString(std::string& s);
// WipeString on every string in `doc` (an auth file, a helper's or a token
// server's answer), at any depth, before it is freed.
void WipeJson(nlohmann::json& doc);

// "USER:PASS" as --creds takes it (split at the first ':'); kPolicy without a ':'
// or with an empty user name.
Result<Credentials> ParseCreds(const std::string& user_colon_pass);

// The auth files to look in, in order, from the environment (REGISTRY_AUTH_FILE,
// XDG_RUNTIME_DIR, XDG_CONFIG_HOME, DOCKER_CONFIG, HOME).
std::vector<std::string> AuthFilePaths();

// Credentials for `registry` ("host" or "host:port", as in RegistryRef::registry)
// and `repository` ("library/debian"; empty: the registry's entries only):
// `creds` when given, else from `auth_files` as above. nullopt: none found
// (anonymous). Errors: kPolicy for malformed --creds, an auth file that is not
// valid JSON, or an entry for this registry whose `auth` is not base64 of
// "user:pass", a credential helper that fails (not in $PATH, an error exit,
// no answer in 30 s, an answer that is not the protocol's JSON).
// `helpers`: registries.conf's credential-helpers; empty: the auth files alone.
Result<std::optional<Credentials>> FindCredentials(const std::string& registry,
                                                   const std::optional<std::string>& creds,
                                                   const std::vector<std::string>& auth_files,
                                                   const std::string& repository = "",
                                                   const std::vector<std::string>& helpers = {});

// The name in `credential-helpers` that stands for the auth files.
inline constexpr char kAuthFilesHelper[] = "containers-auth.json";

}  // namespace layerx::broker
