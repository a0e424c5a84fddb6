// Image references in a registry, named as skopeo names them:
//   docker://[REGISTRY[:PORT]/]REPO[:TAG|@sha256:HEX]
// with Docker Hub's defaults, as the distribution project's reference grammar
// has them (github.com/distribution/reference, "normalize.go"):
//   debian                     -> registry docker.io, repository library/debian, tag latest
//   user/app:1                 -> docker.io, user/app, 1
//   127.0.0.1:5000/debian:test -> 127.0.0.1:5000, debian, test
// The first component names a registry only when it contains '.' or ':' or is
// "localhost"; otherwise the whole name is a repository on Docker Hub.
#pragma once

#include <string>
#include <string_view>

#include "policy/result.h"

namespace layerx::broker {

struct RegistryRef {
  std::string registry;    // as named, with the port: "docker.io", "127.0.0.1:5000" (the
                           // key credentials are looked up by)
  std::string host;        // where it is served: "registry-1.docker.io" for docker.io
  std::string repository;  // "library/debian"
  std::string tag;         // empty when `digest` is set
  std::string digest;      // "sha256:<64 hex>" or empty

  // The manifest reference for /v2/REPO/manifests/REF: the digest, else the tag.
  const std::string& Reference() const { return digest.empty() ? tag : digest; }
  // "docker.io/library/debian:latest" or ".../debian@sha256:..."; no secrets.
  std::string ToString() const;
};

// Parses `spec` with or without the "docker://" prefix. A bad name is kPolicy
// with one line saying what is wrong: an uppercase or otherwise invalid
// repository component, an empty part, a bad tag, a digest that is not
// "sha256:" + 64 lowercase hex, both a tag and a digest (skopeo refuses those
// too), a name over 255 characters.
Result<RegistryRef> ParseRegistryRef(std::string_view spec);

// "docker.io" and its aliases ("index.docker.io", "registry-1.docker.io") -> "docker.io";
// any other registry unchanged. Credentials files use all three.
std::string NormalizeRegistry(std::string_view registry);

}  // namespace layerx::broker
