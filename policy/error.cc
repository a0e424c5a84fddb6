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
    case ErrorKind::kIntegrity:
      return "integrity";
    case ErrorKind::kCancelled:
      return "cancelled";
    case ErrorKind::kRefused:
      return "refused";
  }
  return "unknown";
}

std::string ErrnoName(int err) {
  const char* name = strerrorname_np(err);
  if (name != nullptr) return name;
  return fmt::format("errno {}", err);
}

Error Error::WithLayer(size_t index, const std::string& name) && {
  if (layer_index_ != 0) return std::move(*this);  // it names its layer already
  layer_index_ = index;
  layer_name_ = name;
  return std::move(*this).With("layer {} ({})", index, name);
}

Error Error::WithEntry(const std::string& untrusted_name) && {
  entry_ = untrusted_name;
  // Untrusted and possibly huge: escaped by {:?}, and cut to keep one readable line.
  constexpr size_t kMaxNameInError = 160;
  if (untrusted_name.size() > kMaxNameInError) {
    return std::move(*this).With("entry {:?}... ({} bytes)",
                                 untrusted_name.substr(0, kMaxNameInError), untrusted_name.size());
  }
  return std::move(*this).With("entry {:?}", untrusted_name);
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
