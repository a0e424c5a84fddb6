// Force-included into every C++ file of the fuzz build (LAYERX_FUZZ), never
// into the gcc build. capnp 0.9.2's blob.h compares `const char*` with a
// kj::StringPtr; kj leaves out operator==(const char*, StringPtr) in C++20 and
// counts on the rewritten `b == a`. clang 16 implements P2468R2, which drops
// that rewrite for a class that also declares operator!= (StringPtr does), so
// the comparison has no candidate. These are the two kj declares before C++20.
#pragma once

#include <kj/string.h>

#if __cpp_impl_three_way_comparison
namespace kj {
inline bool operator==(const char* a, const StringPtr& b) { return b == StringPtr(a); }
inline bool operator!=(const char* a, const StringPtr& b) { return b != StringPtr(a); }
}  // namespace kj
#endif
