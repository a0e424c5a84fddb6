// The policy's entry rules (policy/limits.h EntryRules) on one entry: which
// kinds may come in, which bits and xattrs stay. The extractor applies them
// before it writes anything; the broker applies them again to every record, so
// an extractor that lets a refused entry through cannot get it into the image.
#pragma once

#include <algorithm>
#include <string_view>

#include "extractor/records.h"
#include "policy/limits.h"
#include "policy/result.h"

namespace layerx::extractor {

inline constexpr const char* kRootlessXattr = "user.rootlesscontainers";

// `entry` is a TarEntry or an EntryRecord. False: the policy leaves it out.
// kLimitExceeded: the policy refuses it. Otherwise the bits and xattrs the
// policy strips are gone from `entry`, and so is user.rootlesscontainers, our
// own ownership channel, which no layer may set.
template <typename E>
Result<bool> ApplyEntryRules(const policy::EntryRules& rules, E& entry) {
  using policy::Treatment;
  auto refused = [](std::string_view what, std::string_view key) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "{} refused by policy (entries.{} = refuse)",
                          what, key));
  };
  bool device = entry.kind == Kind::kChar || entry.kind == Kind::kBlock;
  if (device && rules.devices != Treatment::kKeep) {
    if (rules.devices == Treatment::kRefuse) return refused("device node", "devices");
    return false;
  }
  if (entry.kind == Kind::kFifo && rules.fifos != Treatment::kKeep) {
    if (rules.fifos == Treatment::kRefuse) return refused("fifo", "fifos");
    return false;
  }
  if (entry.kind != Kind::kDir && (entry.mode & 06000) != 0) {
    if (rules.setuid == Treatment::kRefuse) {
      return refused(fmt::format("setuid/setgid mode {:04o}", entry.mode), "setuid");
    }
    if (rules.setuid == Treatment::kStrip) entry.mode &= ~06000u;
  }
  bool has_caps = std::any_of(entry.xattrs.begin(), entry.xattrs.end(),
                              [](const auto& x) { return x.first == "security.capability"; });
  if (has_caps && rules.file_caps == Treatment::kRefuse) {
    return refused("file capability", "file_caps");
  }
  std::erase_if(entry.xattrs, [&](const auto& x) {
    if (x.first == kRootlessXattr) return true;
    if (x.first == "security.capability" && rules.file_caps != Treatment::kKeep) return true;
    return !rules.xattrs.Keeps(x.first);
  });
  return true;
}

}  // namespace layerx::extractor
