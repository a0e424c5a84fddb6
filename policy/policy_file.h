// The policy's file form: TOML (toml++), read over the defaults, so a file
// names only what it changes. Every key is listed in FormatPolicyToml's output
// and in packaging/policy.example.toml.
//
//   [limits]  max_layer_bytes max_image_bytes max_entries max_path_bytes
//             max_path_depth max_link_target_bytes max_xattrs_per_entry
//             max_xattr_bytes max_symlink_hops layer_timeout_ms
//             max_record_message_bytes
//   [jail]    file_size open_files address_space cpu_seconds
//             seccomp_action = "kill" | "errno"
#pragma once

#include <string>
#include <string_view>

#include "policy/policy.h"

namespace layerx::policy {

// kPolicy naming the key (and line) for a syntax error, an unknown section or
// key, a value of the wrong type, or one out of range.
Result<Policy> ParsePolicyToml(std::string_view text, std::string_view source_name,
                               Policy base = DefaultPolicy());
Result<Policy> LoadPolicyFile(const std::string& path);

// The effective policy as a TOML document ParsePolicyToml reads back.
std::string FormatPolicyToml(const Policy& policy);

}  // namespace layerx::policy
