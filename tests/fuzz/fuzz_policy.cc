// fuzz_policy: policy::ParsePolicyToml on arbitrary text. What it accepts must
// survive the round trip: FormatPolicyToml's text parses back (over the
// defaults) to a policy that formats to the same text. Traps otherwise.
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "policy/policy_file.h"

namespace {

using namespace layerx;

[[noreturn]] void Bug(const std::string& what, const std::string& text) {
  std::fprintf(stderr, "fuzz_policy: BUG: %s\n--- formatted policy ---\n%s", what.c_str(),
               text.c_str());
  __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  Result<policy::Policy> parsed = policy::ParsePolicyToml(text, "fuzz.toml");
  if (!parsed) {
    (void)parsed.error().ToString();
    return 0;
  }
  std::string formatted = policy::FormatPolicyToml(*parsed);
  Result<policy::Policy> again = policy::ParsePolicyToml(formatted, "formatted.toml");
  if (!again) Bug("the formatted policy does not parse: " + again.error().ToString(), formatted);
  if (policy::FormatPolicyToml(*again) != formatted) Bug("the round trip changed it", formatted);
  return 0;
}
