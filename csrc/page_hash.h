// The prefix-cache page hash, bit for bit as pagedkv/_hashing.py computes it:
//   h = mix64(mix64(parent) ^ salt); for each token: h = (h ^ token) * FNV_PRIME (mod 2**64);
//   hash = mix64(h ^ number of tokens).
// Tokens are reinterpreted as uint64 (two's complement), which is what Python's `h ^ token`
// followed by `& MASK64` computes for any int64 token. C++17 standard library only.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pagedkv {

constexpr uint64_t kFnvPrime = 0x100000001b3ULL;

// SplitMix64's finaliser (mix64 in Python): a bijection that spreads every input bit.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Streaming form of page_hash, for a page whose tokens come from two buffers (a sequence's
// partly filled tail and newly appended tokens).
class PageHasher {
 public:
  PageHasher(uint64_t parent, uint64_t salt) : h_(mix64(mix64(parent) ^ salt)) {}
  template <typename T>
  void add(const T* tokens, size_t n) {
    uint64_t h = h_;
    for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint64_t>(tokens[i])) * kFnvPrime;
    h_ = h;
    count_ += n;
  }
  uint64_t finish() const { return mix64(h_ ^ static_cast<uint64_t>(count_)); }

 private:
  uint64_t h_;
  size_t count_ = 0;
};

template <typename T>
inline uint64_t page_hash(uint64_t parent, const T* tokens, size_t n, uint64_t salt) {
  PageHasher hasher(parent, salt);
  hasher.add(tokens, n);
  return hasher.finish();
}

}  // namespace pagedkv
