// docker:// sources and containers-policy.json(5): whether an image may be
// pulled at all, decided as skopeo and podman decide it, before any registry
// is contacted.
//
//   policy.json  --signature-policy FILE, else ~/.config/containers/policy.json
//                when it exists, else /etc/containers/policy.json; with none
//                of them, every image is accepted (said with -v; skopeo
//                refuses to run instead)
//
// The requirements are looked up for the name as given (before registries.conf
// rewrites it): transports.docker's scope for the image itself
// ("docker.io/library/debian:12" or "...@sha256:..."), then its repository,
// each namespace above it, its registry, "*.DOMAIN" wildcards of the registry's
// host, the transport's "" scope, and the policy's "default": the first that
// is there decides. All of its requirements must accept: "insecureAcceptAnything"
// does; "reject" refuses; "signedBy" and "sigstoreSigned" ask for signatures,
// which layerx does not verify yet, so they refuse too, in a line that says so
// (fail closed: an image the policy wants signed is never pulled unchecked).
// The file is read as strictly as containers/image reads it: an unknown or
// duplicated field, an empty requirement list, a missing "default" fail every
// pull in one line.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "broker/source/registry_ref.h"
#include "policy/result.h"

namespace layerx::broker {

struct SignaturePolicy {
  std::string file;  // where it came from; empty: no policy file (accept all)
  using Requirements = std::vector<std::string>;  // the requirement types, in order
  Requirements default_requirements;
  std::map<std::string, Requirements> docker_scopes;  // transports.docker
  bool present = false;
};

// `path`: --signature-policy (empty: the lookup above).
Result<SignaturePolicy> LoadSignaturePolicy(const std::string& path);

// policy.json's text (`name` is for messages).
Result<SignaturePolicy> ParseSignaturePolicy(const std::string& text, const std::string& name);

// The scopes looked up for `ref`, most specific first ("" not included).
std::vector<std::string> PolicyScopes(const RegistryRef& ref);

// kRefused naming the scope and the requirement when the policy does not
// accept `ref`.
Status CheckSignaturePolicy(const SignaturePolicy& policy, const RegistryRef& ref);

}  // namespace layerx::broker
