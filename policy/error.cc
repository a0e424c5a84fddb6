#include "policy/error.h"

#include <cstring>

namespace layerx {

const char* ErrorKindName(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kOs:
      return "os";
    case ErrorKind::kInvalidInput:
      return "invalid input";
    case ErrorKind::kSafetyViolation:
      return "safety violation";
    case ErrorKind::kLimitExceeded:
      return "limit exceeded";
    case ErrorKind::kPolicy:
      return "policy";
    case ErrorKind::kPeer:
      return "extractor failure";
    case ErrorKind::kInternal:
      return "internal";
  }
  return "unknown";
}

std::string ErrnoName(int err) {
  const char* name = strerrorname_np(err);
  if (name != nullptr) return name;
  return fmt::format("errno {}", err);
}

std::string Error::ToString() const {
  std::string out;
  for (auto it = context_.rbegin(); it != context_.rend(); ++it) {
    out += *it;
    out += ": ";
  }
  out += message_;
  if (errno_ != 0) {
    out += ": ";
    out += ErrnoName(errno_);
  }
  return out;
}

}  // namespace layerx
