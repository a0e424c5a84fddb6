// Result<T> = std::expected<T, Error>, and the two macros that keep early returns short.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <expected>

#include "policy/error.h"

namespace layerx {

template <typename T>
using Result = std::expected<T, Error>;
using Status = std::expected<void, Error>;

inline std::unexpected<Error> Fail(Error error) { return std::unexpected<Error>(std::move(error)); }

}  // namespace layerx

#define LX_CONCAT_INNER(a, b) a##b
#define LX_CONCAT(a, b) LX_CONCAT_INNER(a, b)

// Returns the error of `expr` (a Result or Status) from the enclosing function.
#define LX_TRY(expr)                                                                \
  do {                                                                              \
    auto&& lx_try_result = (expr);                                                  \
    if (!lx_try_result) return ::std::unexpected(std::move(lx_try_result).error()); \
  } while (0)

#define LX_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr)              \
  auto tmp = (expr);                                          \
  if (!tmp) return ::std::unexpected(std::move(tmp).error()); \
  lhs = std::move(*tmp)

// LX_ASSIGN_OR_RETURN(auto fd, OpenAt2(...));
#define LX_ASSIGN_OR_RETURN(lhs, expr) \
  LX_ASSIGN_OR_RETURN_IMPL(LX_CONCAT(lx_result_, __LINE__), lhs, expr)

// Aborts on a broken invariant of ours. Never used on input.
#define LX_CHECK(cond)                                                                     \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "layerx: internal check failed: %s (%s:%d)\n", #cond, __FILE__, \
                   __LINE__);                                                              \
      std::abort();                                                                        \
    }                                                                                      \
  } while (0)
