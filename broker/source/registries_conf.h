// docker:// sources as containers-registries.conf(5) has them set up: where an
// image is pulled from (a prefix's `location`, its `mirror`s first), whether
// plain http and unchecked certificates are allowed there (`insecure`), and
// which names may not be pulled at all (`blocked`), read as skopeo and podman
// read it:
//
//   registries.conf  --registries-conf FILE, else $CONTAINERS_REGISTRIES_CONF
//                    (or the older $REGISTRIES_CONFIG_PATH); /dev/null reads
//                    as empty; else ~/.config/containers/registries.conf when it exists
//                    (then only the per-user drop-ins below), else
//                    /etc/containers/registries.conf
//   drop-ins         /etc/containers/registries.conf.d/*.conf, then
//                    ~/.config/containers/registries.conf.d/*.conf, each dir
//                    in name order; a [[registry]] table replaces an earlier
//                    one with the same prefix
//
// Version 2 ([[registry]] tables, `credential-helpers`) and version 1
// ([registries.insecure] and [registries.block] lists) are read; short names,
// aliases and search registries are not used (a docker:// name is always whole: "debian" is
// docker.io/library/debian). A file that is not there is skipped; one that is
// there and cannot be read, or is wrong, fails every docker:// pull in one
// line naming it (and the line), as in skopeo: a file passed over could be
// the one that blocks a registry.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "policy/result.h"

namespace layerx::broker {

struct RegistryEndpoint {
  // "HOST[:PORT][/NAMESPACE...]"; empty only for a "*.domain" prefix: the
  // name is used as given.
  std::string location;
  bool insecure = false;  // plain http and unchecked certificates allowed
  // Mirrors only (pull-from-mirror): which references the mirror serves.
  enum class PullFrom { kAll, kDigestOnly, kTagOnly } pull_from = PullFrom::kAll;
};

struct RegistryConfEntry {
  // What the image name starts with: "HOST[:PORT][/NAMESPACE...]", a whole
  // reference, or "*.domain" (any host below domain).
  std::string prefix;
  RegistryEndpoint endpoint;  // the primary location, tried last
  bool blocked = false;
  bool mirror_by_digest_only = false;
  std::vector<RegistryEndpoint> mirrors;  // tried first, in order
  std::string source;                     // "FILE:LINE", for messages
};

struct RegistriesConf {
  std::vector<RegistryConfEntry> registries;
  // `credential-helpers`: docker-credential-NAME helpers asked in order, with
  // "containers-auth.json" for the auth files (registry_auth.h); empty: the
  // auth files alone. A later file's list replaces an earlier one.
  std::vector<std::string> credential_helpers;
  std::vector<std::string> files;  // read, in order
};

// Everything the files say, merged. `path`: --registries-conf (empty: the
// lookup above). A file given by name that is not there is an error.
Result<RegistriesConf> LoadRegistriesConf(const std::string& path);

// One file's text merged over `conf` (`name` is for messages); a drop-in
// must be version 2.
Status MergeRegistriesConf(std::string_view text, const std::string& name, RegistriesConf& conf,
                           bool drop_in = false);

// $HOME, when this user can enter it, for the config files below it
// (registries.conf, policy.json). One it cannot (rootless under root's HOME,
// `setpriv` keeping it) holds no config of this user's: empty, its files are
// passed over, as skopeo passes over the auth files there. Below a HOME it can
// enter, a file it cannot read fails the lookup like any other.
std::string ConfigHome();

// `name` with its host (what comes before the first '/') in lowercase: hosts
// are compared so ("LocalHost:5000" is "localhost:5000").
std::string LowerHost(std::string_view name);

// The table for `name`, the repository without tag or digest
// ("docker.io/library/debian", host in lowercase), as containers/image looks
// it up: the one whose prefix matches the longest start of it, ending at a
// '/', ':' or '@' (so "example.com" covers "example.com:5000"); nullptr when
// none does.
const RegistryConfEntry* FindRegistryConf(const RegistriesConf& conf, std::string_view name);

struct PullSource {
  std::string name;  // the image name there: "mirror.local/library/debian:latest"
  bool insecure = false;
  bool mirror = false;
};

// Where `name` ("docker.io/library/debian:12", with its tag or digest) is
// pulled from, in order: the mirrors that serve it (by digest or by tag, as
// each says), then the primary location; `name` itself alone when `entry` is
// nullptr.
std::vector<PullSource> PullSources(const RegistryConfEntry* entry, std::string_view name,
                                    bool by_digest);

}  // namespace layerx::broker
