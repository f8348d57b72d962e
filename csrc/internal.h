// Helpers shared by the core's .cpp files (block_manager.cpp, prefix_cache.cpp, offload.cpp):
// building Failure values and checking arguments. Not part of the core's interface.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "block_manager.h"

namespace pagedkv {
namespace internal {

inline Failure fail(Status status, int64_t v0 = 0, int64_t v1 = 0, int64_t v2 = 0,
                    int64_t v3 = 0) {
  Failure f;
  f.status = status;
  f.values[0] = v0;
  f.values[1] = v1;
  f.values[2] = v2;
  f.values[3] = v3;
  return f;
}

inline Failure invalid(Arg argument, int64_t v0, int64_t v1 = 0, int64_t v2 = 0) {
  Failure f = fail(Status::invalid_argument, v0, v1, v2);
  f.argument = argument;
  return f;
}

inline Failure broken(Invariant invariant, int64_t v0, int64_t v1 = 0, int64_t v2 = 0,
                      int64_t v3 = 0) {
  Failure f = fail(Status::invariant_violation, v0, v1, v2, v3);
  f.invariant = invariant;
  return f;
}

inline bool is_count(int64_t n) { return n >= 1 && n <= kMaxCount; }

// Every token id in [0, kMaxTokenId]; else the failure names the smallest id when one is
// negative, else the largest (as pagedkv._validate.int_array reports it).
inline Failure check_token_ids(TokenIds tokens) {
  if (!tokens.given() || tokens.size == 0) return Failure{};
  // NOTE: a branch-free OR of the bits above bit 30 (set for negative ids and ids >= 2**31)
  // vectorises; the slower min/max runs only to name a bad id.
  static_assert(kMaxTokenId == (int64_t{1} << 31) - 1, "the fast check assumes 31-bit ids");
  uint64_t high_bits = 0;
  for (size_t i = 0; i < tokens.size; ++i) high_bits |= static_cast<uint64_t>(tokens.data[i]) >> 31;
  if (high_bits == 0) return Failure{};
  const auto [lo, hi] = std::minmax_element(tokens.data, tokens.data + tokens.size);
  if (*lo < 0) return invalid(Arg::token_ids, *lo);
  if (*hi > kMaxTokenId) return invalid(Arg::token_ids, *hi);
  return Failure{};
}

// Room for new_len pages, growing geometrically (an exact reserve per new page would copy the
// whole table every time a page is added). May throw std::bad_alloc; changes nothing visible.
inline void reserve_pages(std::vector<int32_t>& pages, int64_t new_len) {
  const size_t want = static_cast<size_t>(new_len);
  if (pages.capacity() < want) pages.reserve(std::max(want, 2 * pages.capacity()));
}

}  // namespace internal
}  // namespace pagedkv
