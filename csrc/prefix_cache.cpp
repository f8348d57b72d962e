// Prefix caching in the C++ core: the hash index, matching a prompt against cached pages,
// indexing full pages as they are committed, eviction and reset. Mirrors
// ReferenceBlockManager._plan_allocate, commit, _cache_page, _uncache, _extend_cached_tokens,
// _offer_pages and reset_prefix_cache (pagedkv/_reference.py).
#include <algorithm>
#include <cstring>

#include "block_manager.h"
#include "internal.h"
#include "page_hash.h"

namespace pagedkv {
using internal::invalid;

// ================================================================== HashIndex
HashIndex::HashIndex() { rehash(16); }

void HashIndex::reserve(size_t n) {
  // NOTE: load factor <= 1/2 keeps linear-probing runs short.
  size_t capacity = entries_.size();
  while (n * 2 > capacity) capacity *= 2;
  if (capacity != entries_.size()) rehash(capacity);
}

void HashIndex::insert(uint64_t key, int32_t page) {
  size_t i = home(key);
  while (entries_[i].page != kNullPage) i = (i + 1) & mask_;
  entries_[i] = Entry{key, page};
  ++size_;
}

void HashIndex::erase(uint64_t key) {
  size_t i = home(key);
  while (entries_[i].key != key || entries_[i].page == kNullPage) {
    if (entries_[i].page == kNullPage) return;
    i = (i + 1) & mask_;
  }
  // NOTE: backward-shift deletion (as in SeqMap): no tombstones.
  for (size_t j = (i + 1) & mask_; entries_[j].page != kNullPage; j = (j + 1) & mask_) {
    const size_t h = home(entries_[j].key);
    const bool h_in_hole_to_j = (i <= j) ? (i < h && h <= j) : (i < h || h <= j);
    if (!h_in_hole_to_j) {
      entries_[i] = entries_[j];
      i = j;
    }
  }
  entries_[i].page = kNullPage;
  --size_;
}

void HashIndex::clear() {
  std::fill(entries_.begin(), entries_.end(), Entry{0, kNullPage});
  size_ = 0;
}

void HashIndex::rehash(size_t capacity) {
  std::vector<Entry> old(capacity, Entry{0, kNullPage});
  entries_.swap(old);
  mask_ = capacity - 1;
  size_ = 0;
  for (const Entry& e : old)
    if (e.page != kNullPage) insert(e.key, e.page);
}

// ============================================================ prefix caching
PrefixCacheStats BlockManager::prefix_cache_stats() const {
  PrefixCacheStats s = stats_;
  s.num_cached_pages = static_cast<int64_t>(hash_index_.size());
  s.num_evictable_pages = queues_[kEvictable].size;
  return s;
}

BlockManager::AllocatePlan BlockManager::plan_allocate(int64_t num_tokens, TokenIds token_ids,
                                                       uint64_t salt, int64_t num_hash_pages) {
  AllocatePlan plan;
  hits_.clear();
  const int64_t pages = page_math_.pages_for(num_tokens);
  plan.need = pages;
  if (!enable_prefix_caching_ || !token_ids.given()) return plan;
  const int64_t ps = page_size_;
  const int64_t num_full = page_math_.index(num_tokens);
  hashes_.resize(static_cast<size_t>(std::max(num_full, int64_t{0})));
  // NOTE: one hash-index probe and one page_size comparison per full page: no scan of the
  // cache. The match stops at the first miss; allocate still hashes the pages it indexes (up
  // to the committed tokens), can_allocate stops there. The cost is the hash chain itself
  // (serial: each page's hash starts from its parent's); the probe and the comparison of page
  // i overlap with hashing page i + 1 in the CPU's out-of-order window.
  uint64_t parent_hash = 0;
  int32_t parent = kNullPage;
  uint64_t parent_gen = 0;
  bool matching = true;
  for (int64_t i = 0; i < num_full; ++i) {
    const int64_t* block = token_ids.data + i * ps;
    const uint64_t h = page_hash(parent_hash, block, static_cast<size_t>(ps), salt) & hash_mask_;
    hashes_[i] = h;
    if (matching) {
      const int32_t page = hash_index_.find(h);
      if (page != kNullPage && key_matches(page, block, salt, parent, parent_gen)) {
        hits_.push_back(page);
        parent = page;
        parent_gen = page_gen_[page];
      } else {
        matching = false;
      }
    }
    if (!matching && i + 1 >= num_hash_pages) break;
    parent_hash = h;
  }
  const int64_t num_hits = static_cast<int64_t>(hits_.size());
  const int64_t hit_tokens = num_hits * ps;
  plan.num_cached = std::min(hit_tokens, num_tokens - 1);
  plan.copy = plan.num_cached < hit_tokens;
  int64_t evictable_hits = 0;
  for (int32_t page : hits_) evictable_hits += ref_count_[page] == 0;
  plan.need = pages - num_hits + (plan.copy ? 1 : 0) + evictable_hits;
  return plan;
}

bool BlockManager::key_matches(int32_t page, const int64_t* block, uint64_t salt, int32_t parent,
                               uint64_t parent_gen) const {
  // NOTE: the hit is confirmed by comparing everything the page holds, so a hash collision is a
  // miss, never another prefix's KV.
  const CacheKey& key = keys_[page];
  if (key.slot < 0 || key.salt != salt || key.parent != parent || key.parent_gen != parent_gen)
    return false;
  const int64_t* stored = key_tokens_.data() + static_cast<size_t>(key.slot) * page_size_;
  uint64_t diff = 0;  // branch-free, so the comparison vectorises
  for (int64_t i = 0; i < page_size_; ++i)
    diff |= static_cast<uint64_t>(stored[i] ^ block[i]);
  return diff == 0;
}

void BlockManager::reserve_cache(int64_t n) {
  if (!enable_prefix_caching_ || n <= 0) return;
  // No more pages than the pool can be cached at once.
  const size_t max_slots = static_cast<size_t>(num_pages_);
  hash_index_.reserve(std::min(hash_index_.size() + static_cast<size_t>(n), max_slots));
  const size_t spare = free_key_slots_.size();
  if (static_cast<size_t>(n) <= spare) return;
  const size_t ps = static_cast<size_t>(page_size_);
  const size_t num_slots = key_tokens_.size() / ps;
  const size_t want = std::min(num_slots + (static_cast<size_t>(n) - spare), max_slots);
  if (key_tokens_.capacity() < want * ps)
    key_tokens_.reserve(std::min(std::max(want * ps, 2 * key_tokens_.capacity()), max_slots * ps));
  if (free_key_slots_.capacity() < want)
    free_key_slots_.reserve(std::min(std::max(want, 2 * free_key_slots_.capacity()), max_slots));
}

bool BlockManager::cache_page(const std::vector<int32_t>& pages, size_t i, uint64_t h,
                              uint64_t salt, const int64_t* head, size_t num_head,
                              const int64_t* rest) {
  if (i >= pages.size()) return false;
  const int32_t page = pages[i];
  if (page < 0) return false;  // released by a sliding window before it was committed
  int32_t parent = kNullPage;
  uint64_t parent_gen = 0;
  if (i > 0) {
    const int32_t prev = pages[i - 1];
    if (prev == kNullPage || !is_cached(prev)) return false;
    parent = prev;
    parent_gen = page_gen_[prev];
  }
  // NOTE: the first page indexed under a hash keeps it; an identical or colliding page
  // computed later is simply not cached.
  if (hash_index_.find(h) != kNullPage || is_cached(page)) return false;
  const size_t ps = static_cast<size_t>(page_size_);
  int32_t slot;
  if (!free_key_slots_.empty()) {
    slot = free_key_slots_.back();
    free_key_slots_.pop_back();
  } else {
    slot = static_cast<int32_t>(key_tokens_.size() / ps);
    key_tokens_.resize(key_tokens_.size() + ps);  // within the capacity of reserve_cache
  }
  int64_t* stored = key_tokens_.data() + static_cast<size_t>(slot) * ps;
  if (num_head) std::memcpy(stored, head, num_head * sizeof(int64_t));
  std::memcpy(stored + num_head, rest, (ps - num_head) * sizeof(int64_t));
  hash_index_.insert(h, page);
  CacheKey& key = keys_[page];
  key.hash = h;
  key.salt = salt;
  key.parent = parent;
  key.parent_gen = parent_gen;
  key.slot = slot;
  return true;
}

void BlockManager::uncache(int32_t page) {
  CacheKey& key = keys_[page];
  if (key.slot < 0) return;
  hash_index_.erase(key.hash);
  free_key_slots_.push_back(key.slot);  // capacity kept >= number of key slots
  key.slot = -1;
  ++page_gen_[page];
}

int64_t BlockManager::pages_filled(const Sequence& seq, int64_t n, bool has_tokens) const {
  if (!seq.cache || !seq.cache->tail_known) return 0;
  // The pending prompt pages (an append commits them), then the pages the new ids fill.
  return page_math_.index(seq.cache->pending() + (has_tokens ? n : 0));
}

void BlockManager::reserve_tail(Sequence& seq, int64_t n, bool has_tokens) {
  if (!seq.cache || !seq.cache->tail_known || !has_tokens) return;
  std::vector<int64_t>& tail = seq.cache->tail;
  // Once the pending full pages are offered, the tail keeps the ids of the partly filled last
  // page, then never holds more than min(those + n, page_size - 1) token ids.
  const int64_t partial = page_math_.offset(seq.cache->pending());
  const size_t want = static_cast<size_t>(std::min(partial + n, page_size_ - 1));
  if (tail.capacity() < want)
    tail.reserve(std::min(std::max(want, 2 * tail.capacity()), static_cast<size_t>(page_size_ - 1)));
}

int64_t BlockManager::pages_to_offer(const Sequence& seq, int64_t end, int64_t stop) const {
  const int64_t pending = seq.cache->pending();
  const int64_t first = end - pending;  // a page boundary
  if (stop <= first) return 0;
  return std::min(page_math_.index(pending), page_math_.index(stop - first));
}

int64_t BlockManager::offer_pages(Sequence& seq, int64_t end, int64_t stop) {
  SequenceCache& cache = *seq.cache;
  const int64_t ps = page_size_;
  int64_t pending = cache.pending();
  int64_t page = page_math_.index(end - pending);
  int64_t indexed = 0;
  while (pending >= ps && (page + 1) * ps <= stop) {
    const int64_t* block = cache.tail.data() + cache.head;
    const uint64_t h =
        page_hash(cache.hash, block, static_cast<size_t>(ps), cache.salt) & hash_mask_;
    indexed += cache_page(seq.pages, static_cast<size_t>(page), h, cache.salt, nullptr, 0, block);
    cache.hash = h;
    cache.head += static_cast<size_t>(ps);
    pending -= ps;
    ++page;
  }
  if (pending < ps && cache.head > 0) {
    // Fewer than a page left: move them to the front (no allocation).
    std::copy(cache.tail.begin() + static_cast<std::ptrdiff_t>(cache.head), cache.tail.end(),
              cache.tail.begin());
    cache.tail.resize(static_cast<size_t>(pending));
    cache.head = 0;
  }
  return indexed;
}

Failure BlockManager::commit(int64_t seq_id, int64_t num_computed_tokens, int64_t& indexed) {
  indexed = 0;
  int64_t slot = -1;
  Failure f = resident(seq_id, slot);
  if (!f.ok()) return f;
  Sequence& seq = seqs_[slot];
  if (num_computed_tokens < 0)
    return invalid(Arg::num_computed_tokens_range, num_computed_tokens);
  if (num_computed_tokens > seq.num_tokens)
    return invalid(Arg::num_computed_tokens_stop, num_computed_tokens, seq_id, seq.num_tokens);
  // NOTE: monotone: a value at or below the committed count changes nothing.
  if (!seq.cache || num_computed_tokens <= seq.cache->committed) return Failure{};
  SequenceCache& cache = *seq.cache;
  if (cache.tail_known) reserve_cache(pages_to_offer(seq, seq.num_tokens, num_computed_tokens));
  // Nothing below allocates.
  cache.committed = num_computed_tokens;
  if (cache.tail_known) indexed = offer_pages(seq, seq.num_tokens, num_computed_tokens);
  return Failure{};
}

void BlockManager::extend_cached_tokens(Sequence& seq, int64_t start, const int64_t* token_ids,
                                        int64_t n) {
  SequenceCache& cache = *seq.cache;
  // NOTE: appended tokens are written in the step that appends them, and so is everything
  // before them: the append commits the whole sequence, pending prompt pages first.
  cache.committed = seq.num_tokens;
  if (!cache.tail_known) return;
  if (cache.pending() >= page_size_) offer_pages(seq, start, start);
  if (token_ids == nullptr) {
    // Tokens unknown from here on: cache no more pages of this sequence.
    cache.tail_known = false;
    cache.head = 0;
    std::vector<int64_t>().swap(cache.tail);
    return;
  }
  const int64_t ps = page_size_;
  size_t page = static_cast<size_t>(page_math_.index(start));
  int64_t used = 0;
  while (static_cast<int64_t>(cache.tail.size()) + (n - used) >= ps) {
    const size_t num_head = cache.tail.size();
    const int64_t take = ps - static_cast<int64_t>(num_head);
    PageHasher hasher(cache.hash, cache.salt);
    hasher.add(cache.tail.data(), num_head);
    hasher.add(token_ids + used, static_cast<size_t>(take));
    const uint64_t h = hasher.finish() & hash_mask_;
    cache_page(seq.pages, page, h, cache.salt, cache.tail.data(), num_head, token_ids + used);
    cache.hash = h;
    cache.tail.clear();
    used += take;
    ++page;
  }
  cache.tail.insert(cache.tail.end(), token_ids + used, token_ids + n);  // within reserve_tail
}

void BlockManager::reset_prefix_cache() {
  if (!enable_prefix_caching_) return;  // nothing can be cached
  for (int64_t p = 0; p < num_pages_; ++p) {
    if (keys_[p].slot >= 0) {
      keys_[p].slot = -1;
      ++page_gen_[p];
    }
  }
  hash_index_.clear();
  key_tokens_.clear();
  free_key_slots_.clear();
  // NOTE: cached free pages become plain free pages, keeping their LRU order.
  for (int32_t page = queue_pop_head(kEvictable); page != kNullPage;
       page = queue_pop_head(kEvictable))
    queue_push_tail(kFree, page);
}

}  // namespace pagedkv
