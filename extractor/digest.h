// SHA-256 over a stream, through OpenSSL, printed the OCI way ("sha256:<hex>").
// Used by the extractor (the tar stream: diff_id) and the broker (the blob).
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace layerx::extractor {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(const void* data, size_t size);
  // "sha256:<64 hex>"; ends the stream.
  std::string Finish();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace layerx::extractor
