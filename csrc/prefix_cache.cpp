// Prefix caching in the C++ core: the hash index, matching a prompt against cached pages,
// indexing full pages as they are committed, and reset (the nodes themselves live in
// prefix_index.cpp). Mirrors ReferenceBlockManager._plan_allocate, commit, _index_page,
// _reattach, _extend_cached_tokens, _offer_pages and reset_prefix_cache (pagedkv/_reference.py).
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
  s.num_cached_pages = enable_prefix_caching_ ? prefix_.num_cached_pages() : 0;
  s.num_evictable_pages = evictable_size_;
  std::vector<int32_t> held;
  for (const PrefixPin& pin : prefix_pins_) held.insert(held.end(), pin.pages.begin(), pin.pages.end());
  std::sort(held.begin(), held.end());
  s.num_pinned_prefix_pages = std::unique(held.begin(), held.end()) - held.begin();
  s.num_cpu_cached_pages = enable_prefix_caching_ ? prefix_.num_cpu_cached_pages() : 0;
  return s;
}

BlockManager::AllocatePlan BlockManager::plan_allocate(int64_t num_tokens, TokenIds token_ids,
                                                       uint64_t salt, int64_t max_cached_tokens,
                                                       int64_t skip) {
  AllocatePlan plan;
  hits_.clear();
  hit_nodes_.clear();
  lead_node_ = PrefixIndex::kRoot;
  const int64_t pages = page_math_.pages_for(num_tokens);
  plan.need = pages - skip;
  if (!enable_prefix_caching_ || !token_ids.given()) return plan;
  const int64_t ps = page_size_;
  int64_t limit = page_math_.index(num_tokens);
  if (max_cached_tokens >= 0) limit = std::min(limit, max_cached_tokens / ps);
  int32_t parent = match_prefix(token_ids.data, limit, salt, hits_, cpu_prefix_cache_, &hit_nodes_, skip);
  // NOTE: a hit needs the chain through the released pages, and then a page, unless the
  // released pages are the whole hit (a chunked group hit at its chunk's start).
  if (static_cast<int64_t>(hit_nodes_.size()) < skip || (skip == 0 && hits_.empty())) {
    hits_.clear();
    hit_nodes_.clear();
    return plan;
  }
  // NOTE: hit_nodes_ holds the skipped pages' nodes first; keep only the hits' own.
  if (skip) {
    lead_node_ = hit_nodes_[static_cast<size_t>(skip - 1)];
    hit_nodes_.erase(hit_nodes_.begin(), hit_nodes_.begin() + skip);
  }
  const int64_t hit_tokens = (skip + static_cast<int64_t>(hits_.size())) * ps;
  plan.num_cached = std::min(hit_tokens, num_tokens - 1);
  plan.copy = plan.num_cached < hit_tokens;
  // NOTE: the last hit page is a copy source: prefer a page no copy of this step writes (a copy
  // from one would have to wait for that copy).
  if (plan.copy && !hits_.empty() && hits_.back() != kNullPage) {
    // NOTE: a copy source whose KV is written before this step's copies run, but for its last
    // slot (which this prompt recomputes); without one, the hit stops a page earlier.
    const int32_t src = prefix_.pick_page(parent, ref_count_, &pin_flags_, &fresh_offset_,
                                          static_cast<int32_t>(ps - 1));
    if (src == kNullPage) {
      hits_.pop_back();
      hit_nodes_.pop_back();
      if (hits_.empty() && skip == 0) {
        lead_node_ = PrefixIndex::kRoot;
        plan.num_cached = 0;
        plan.copy = false;
        return plan;
      }
      plan.num_cached = (skip + static_cast<int64_t>(hits_.size())) * ps;
      plan.copy = false;
    } else {
      hits_.back() = src;
    }
  }
  // NOTE: a hit on a page only a pending copy pins takes no page from the free queues; a hit
  // on the CPU tier takes one (its promotion's destination).
  int64_t taken = 0;
  for (int32_t page : hits_)
    taken += page == kNullPage || (ref_count_[page] == 0 && !(pin_flags_[page] & kPinned));
  plan.need = pages - skip - static_cast<int64_t>(hits_.size()) + (plan.copy ? 1 : 0) + taken;
  return plan;
}

Failure BlockManager::prefix_match(TokenIds token_ids, uint64_t salt, std::vector<int8_t>& out) const {
  out.clear();
  if (token_ids.given()) {
    Failure f = internal::check_token_ids(token_ids);
    if (!f.ok()) return f;
  }
  if (!enable_prefix_caching_ || !token_ids.given()) return Failure{};
  const int64_t ps = page_size_;
  const int64_t num_full = static_cast<int64_t>(token_ids.size) / ps;
  uint64_t h = 0;
  int32_t parent = PrefixIndex::kRoot;
  for (int64_t i = 0; i < num_full; ++i) {
    const int64_t* block = token_ids.data + i * ps;
    h = page_hash(h, block, static_cast<size_t>(ps), salt) & hash_mask_;
    const int32_t node = prefix_.find(h, parent, salt, block);
    if (node == PrefixIndex::kNone) break;
    const bool hit = prefix_.pick_page(node, ref_count_) != kNullPage ||
                     (cpu_prefix_cache_ && prefix_.cpu_page_of(node) != PrefixIndex::kNone);
    out.push_back(hit ? 2 : 1);
    parent = node;
  }
  return Failure{};
}

int32_t BlockManager::match_prefix(const int64_t* token_ids, int64_t num_full, uint64_t salt,
                                   std::vector<int32_t>& pages, bool cpu,
                                   std::vector<int32_t>* nodes, int64_t skip) const {
  // NOTE: one hash-chain probe per full page, confirmed by content (tokens, salt and parent
  // node): no scan of the cache. The match stops at the first page not cached. The cost is the
  // hash chain itself (serial: each page's hash starts from its parent's).
  const int64_t ps = page_size_;
  uint64_t h = 0;
  int32_t parent = PrefixIndex::kRoot;
  for (int64_t i = 0; i < num_full; ++i) {
    const int64_t* block = token_ids + i * ps;
    h = page_hash(h, block, static_cast<size_t>(ps), salt) & hash_mask_;
    const int32_t node = prefix_.find(h, parent, salt, block);
    if (node == PrefixIndex::kNone) break;
    if (i < skip) {
      if (nodes) nodes->push_back(node);
      parent = node;
      continue;
    }
    const int32_t page = prefix_.pick_page(node, ref_count_);
    if (page == kNullPage && !(cpu && prefix_.cpu_page_of(node) != PrefixIndex::kNone)) break;
    pages.push_back(page);
    if (nodes) nodes->push_back(node);
    parent = node;
  }
  return parent;
}

void BlockManager::reserve_cache(int64_t n) {
  if (enable_prefix_caching_ && n > 0) prefix_.reserve(n);
}

void BlockManager::reserve_events(int64_t n, int64_t pages) {
  if (prefix_.recording()) prefix_.reserve_events(n, pages);  // a no-op with events off
}

bool BlockManager::index_page(Sequence& seq, size_t i, const int64_t* block) {
  SequenceCache& cache = *seq.cache;
  const int32_t parent = cache.node;
  const uint64_t h =
      page_hash(prefix_.hash_of(parent), block, static_cast<size_t>(page_size_), cache.salt) & hash_mask_;
  const int32_t node = prefix_.child(h, parent, cache.salt, block);
  prefix_.acquire(node);
  prefix_.release(parent);  // NOTE: after acquire: the parent is the new node's parent
  cache.node = node;
  if (i >= seq.pages.size()) return false;
  const int32_t page = seq.pages[i];
  if (page < 0 || prefix_.is_cached(page)) return false;  // a window released it, or a hit
  prefix_.attach(page, node);
  const int64_t offset = std::max<int64_t>(written_from_ - static_cast<int64_t>(i) * page_size_, 0);
  if (offset < page_size_) {
    if (fresh_offset_[page] == page_size_) fresh_.push_back(page);  // within capacity num_pages
    fresh_offset_[page] = std::min(fresh_offset_[page], static_cast<int32_t>(offset));
  }
  return true;
}

void BlockManager::reattach(const Sequence& seq) {
  if (!seq.cache) return;
  // The nodes of pages 0, 1, ... are the chain from the root to the sequence's node. They are
  // attached root first, as the reference does, so that KV events name a parent before its child.
  std::vector<int32_t> chain;
  for (int32_t node = seq.cache->node; node != PrefixIndex::kRoot; node = prefix_.parent_of(node))
    chain.push_back(node);
  const size_t depth = std::min(chain.size(), seq.pages.size());
  for (size_t i = 0; i < depth; ++i) {
    const int32_t page = seq.pages[i];
    if (page >= 0 && !prefix_.is_cached(page)) prefix_.attach(page, chain[chain.size() - 1 - i]);
  }
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
    indexed += index_page(seq, static_cast<size_t>(page), cache.tail.data() + cache.head);
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
  const int64_t offered = cache.tail_known ? pages_to_offer(seq, seq.num_tokens, num_computed_tokens) : 0;
  reserve_cache(offered);
  reserve_events(offered, offered);
  // Nothing below allocates.
  written_from_ = cache.committed;  // NOTE: the chunk up to num_computed_tokens lands in this step
  cache.committed = num_computed_tokens;
  if (cache.tail_known) indexed = offer_pages(seq, seq.num_tokens, num_computed_tokens);
  return Failure{};
}

void BlockManager::extend_cached_tokens(Sequence& seq, int64_t start, const int64_t* token_ids,
                                        int64_t n) {
  SequenceCache& cache = *seq.cache;
  // NOTE: appended tokens are written in the step that appends them, and so is everything
  // before them: the append commits the whole sequence, pending prompt pages first.
  written_from_ = cache.committed;
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
    // The page's ids: the tail (ids of its first positions), then new ones.
    const size_t num_head = cache.tail.size();
    const int64_t take = ps - static_cast<int64_t>(num_head);
    std::copy(cache.tail.begin(), cache.tail.end(), block_.begin());
    std::copy(token_ids + used, token_ids + used + take, block_.begin() + static_cast<std::ptrdiff_t>(num_head));
    index_page(seq, page, block_.data());
    cache.tail.clear();
    used += take;
    ++page;
  }
  cache.tail.insert(cache.tail.end(), token_ids + used, token_ids + n);  // within reserve_tail
}

Failure BlockManager::pin_prefix(TokenIds token_ids, uint64_t salt, int64_t& pinned,
                                 int64_t release_before) {
  pinned = 0;
  Failure f = internal::check_token_ids(token_ids);
  if (!f.ok()) return f;
  if (release_before < 0) return invalid(Arg::release_before, release_before, static_cast<int64_t>(token_ids.size));
  PrefixPin pin;
  pin.salt = salt;
  pin.tokens.assign(token_ids.data, token_ids.data + token_ids.size);
  if (enable_prefix_caching_)
    match_prefix(token_ids.data, page_math_.index(static_cast<int64_t>(token_ids.size)), salt, pin.pages,
                 false, nullptr, release_before / page_size_);
  prefix_pins_.reserve(prefix_pins_.size() + 1);
  // Nothing below allocates.
  for (int32_t page : pin.pages) take_cached_page(page);
  pinned = static_cast<int64_t>(pin.pages.size());
  prefix_pins_.push_back(std::move(pin));
  return Failure{};
}

Failure BlockManager::unpin_prefix(TokenIds token_ids, uint64_t salt, int64_t& released) {
  released = 0;
  for (size_t k = 0; k < prefix_pins_.size(); ++k) {
    PrefixPin& pin = prefix_pins_[k];
    if (pin.salt != salt || pin.tokens.size() != token_ids.size ||
        !std::equal(pin.tokens.begin(), pin.tokens.end(), token_ids.data))
      continue;
    for (auto it = pin.pages.rbegin(); it != pin.pages.rend(); ++it) release(*it);
    released = static_cast<int64_t>(pin.pages.size());
    prefix_pins_.erase(prefix_pins_.begin() + static_cast<std::ptrdiff_t>(k));  // moves, no allocation
    return Failure{};
  }
  return invalid(Arg::pinned_prefix, static_cast<int64_t>(token_ids.size));
}

void BlockManager::reset_prefix_cache() {
  if (!enable_prefix_caching_) return;  // nothing can be cached
  reserve_events(0, 0);  // quiet: only DROP and CLEARED records
  // NOTE: nodes that sequences still chain after stay as ghosts, so the pages those sequences
  // commit later are found once their prefix is computed again.
  prefix_.clear_pages();
  // NOTE: cached free pages become plain free pages, keeping their LRU order.
  for (int32_t page = pop_evictable(); page != kNullPage; page = pop_evictable())
    queue_push_tail(kFree, page);
  // ... and so do the CPU tier's (already detached).
  while (cpu_lru_.head != kNullPage) {
    const int32_t cpu = cpu_lru_.head;
    cpu_lru_.head = cpu_lru_next_[cpu];
    cpu_lru_prev_[cpu] = cpu_lru_next_[cpu] = kNotQueued;
    cpu_push_tail(cpu);
  }
  cpu_lru_.tail = kNullPage;
  cpu_lru_.size = 0;
}

}  // namespace pagedkv
