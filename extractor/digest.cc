#include "extractor/digest.h"

// OpenSSL's SHA256_* calls, not EVP: in OpenSSL 3 the first EVP digest fetch
// starts the provider machinery (name maps, every algorithm registered), about
// 0.7 ms of a fresh process's life, measured with perf in the extractor, which
// is spawned once per layer and must be jailed and reading within 5 ms. The
// low-level calls run the same assembly (SHA-NI where the CPU has it), need no
// provider and read no file, so they are also safe after the pivot. They are
// deprecated in 3.0 but kept through the 3.x series.
#define OPENSSL_SUPPRESS_DEPRECATED
#include <fmt/format.h>
#include <openssl/sha.h>

namespace layerx::extractor {

struct Sha256::State {
  SHA256_CTX ctx;
};

Sha256::Sha256() : state_(std::make_unique<State>()) { SHA256_Init(&state_->ctx); }

Sha256::~Sha256() = default;

void Sha256::Update(const void* data, size_t size) { SHA256_Update(&state_->ctx, data, size); }

std::string Sha256::Finish() {
  unsigned char md[SHA256_DIGEST_LENGTH];
  SHA256_Final(md, &state_->ctx);
  std::string out = "sha256:";
  out.reserve(7 + 2 * SHA256_DIGEST_LENGTH);
  for (unsigned char byte : md) out += fmt::format("{:02x}", byte);
  return out;
}

}  // namespace layerx::extractor
