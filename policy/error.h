// The one error type of layerx: a kind the caller can act on, the errno when the
// OS said no, and context strings added on the way up ("layer 2", "entry ...").
#pragma once

#include <fmt/format.h>

#include <string>
#include <utility>
#include <vector>

namespace layerx {

enum class ErrorKind {
  kOs,               // a syscall failed for a reason that is not the input's fault
  kInvalidInput,     // malformed layer: corrupt tar, truncated stream, bad name
  kSafetyViolation,  // escape attempt: climbing above the root, hardlink outside it
  kLimitExceeded,    // a policy limit was hit
  kPolicy,           // bad configuration or usage
  kPeer,             // the extractor died or broke the protocol
  kInternal,         // our bug
  // Appended: the extractor's Failure record may only claim the kinds above.
  kIntegrity,  // content does not match its digest, size or diff_id
  kCancelled,  // the caller cancelled (a signal, a cancel token)
  kRefused,    // a source the configuration forbids (registries.conf blocked, policy.json)
};

const char* ErrorKindName(ErrorKind kind);

class Error {
 public:
  Error(ErrorKind kind, int err, std::string message)
      : kind_(kind), errno_(err), message_(std::move(message)) {}

  ErrorKind kind() const { return kind_; }
  int err() const { return errno_; }
  const std::string& message() const { return message_; }
  const std::vector<std::string>& context() const { return context_; }

  // Adds an outer context ("layer 2 (sha256:...)"); the outermost comes first in
  // ToString().
  template <typename... Args>
  Error With(fmt::format_string<Args...> format, Args&&... args) && {
    context_.push_back(fmt::format(format, std::forward<Args>(args)...));
    return std::move(*this);
  }
  template <typename... Args>
  Error With(fmt::format_string<Args...> format, Args&&... args) const& {
    Error copy = *this;
    return std::move(copy).With(format, std::forward<Args>(args)...);
  }

  // The same, recorded for callers that want it structured (the library's
  // ExtractError) as well as in the context. An error that names a layer
  // already keeps it (a download that failed ahead of the layer being applied
  // names its own).
  Error WithLayer(size_t index, const std::string& name) &&;
  Error WithEntry(const std::string& untrusted_name) &&;
  size_t layer_index() const { return layer_index_; }  // 1-based; 0: none
  const std::string& layer_name() const { return layer_name_; }
  const std::string& entry() const { return entry_; }  // bytes, as named in the layer

  // "layer 2 (sha256:ab12...): entry \"usr/x\": openat2: ELOOP"
  std::string ToString() const;

 private:
  ErrorKind kind_;
  int errno_;
  std::string message_;
  std::vector<std::string> context_;  // innermost first
  size_t layer_index_ = 0;
  std::string layer_name_;
  std::string entry_;
};

template <typename... Args>
Error MakeError(ErrorKind kind, fmt::format_string<Args...> format, Args&&... args) {
  return Error(kind, 0, fmt::format(format, std::forward<Args>(args)...));
}

// An Error from a failed call; `err` is the errno it left.
template <typename... Args>
Error OsError(int err, fmt::format_string<Args...> format, Args&&... args) {
  return Error(ErrorKind::kOs, err, fmt::format(format, std::forward<Args>(args)...));
}

// The errno's symbolic name ("ELOOP"), or its number when unknown.
std::string ErrnoName(int err);

}  // namespace layerx
