// C++17 core of the pagedkv block manager; see block_manager.h and pagedkv/_reference.py.
// Prefix caching lives in prefix_cache.cpp, the CPU tier and sliding windows in offload.cpp.
#include "block_manager.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>
#include <utility>

#include "internal.h"
#include "page_hash.h"

namespace pagedkv {
using internal::broken;
using internal::check_token_ids;
using internal::fail;
using internal::invalid;
using internal::is_count;
using internal::reserve_pages;

namespace {

// Slots of positions [start, stop) of a page table, written to out[0 .. stop - start).
inline void write_slots(const std::vector<int32_t>& pages, const PageMath& pm, int64_t start,
                        int64_t stop, int64_t* out) {
  int64_t pos = start;
  while (pos < stop) {
    const int64_t offset = pm.offset(pos);
    const int64_t chunk = std::min(stop - pos, pm.size - offset);
    const int64_t base = static_cast<int64_t>(pages[pm.index(pos)]) * pm.size + offset;
    for (int64_t k = 0; k < chunk; ++k) *out++ = base + k;
    pos += chunk;
  }
}

constexpr int64_t kEmptyKey = -1;

}  // namespace

// ===================================================================== SeqMap
PageMath::PageMath(int64_t page_size) : size(page_size), shift(-1) {
  if (page_size > 0 && (page_size & (page_size - 1)) == 0) {
    shift = 0;
    while ((int64_t{1} << shift) < page_size) ++shift;
  }
}

SeqMap::SeqMap() { rehash(16); }

size_t SeqMap::home(int64_t key) const { return mix64(static_cast<uint64_t>(key)) & mask_; }

int64_t SeqMap::find(int64_t key) const {
  if (key < 0) return -1;  // never stored; also keeps kEmptyKey from matching an empty slot
  for (size_t i = home(key);; i = (i + 1) & mask_) {
    const Entry& e = entries_[i];
    if (e.key == key) return e.value;
    if (e.key == kEmptyKey) return -1;
  }
}

void SeqMap::reserve_one_more() {
  // NOTE: load factor <= 1/2 keeps linear-probing runs short.
  if ((size_ + 1) * 2 > entries_.size()) rehash(entries_.size() * 2);
}

void SeqMap::insert(int64_t key, int64_t value) {
  size_t i = home(key);
  while (entries_[i].key != kEmptyKey) i = (i + 1) & mask_;
  entries_[i] = Entry{key, value};
  ++size_;
}

void SeqMap::erase(int64_t key) {
  size_t i = home(key);
  while (entries_[i].key != key) {
    if (entries_[i].key == kEmptyKey) return;
    i = (i + 1) & mask_;
  }
  // NOTE: backward-shift deletion: move later entries of the probe run into the hole when the
  // hole lies between their home and their position, so no tombstones are needed.
  for (size_t j = (i + 1) & mask_; entries_[j].key != kEmptyKey; j = (j + 1) & mask_) {
    const size_t h = home(entries_[j].key);
    const bool h_in_hole_to_j = (i <= j) ? (i < h && h <= j) : (i < h || h <= j);
    if (!h_in_hole_to_j) {
      entries_[i] = entries_[j];
      i = j;
    }
  }
  entries_[i].key = kEmptyKey;
  --size_;
}

void SeqMap::rehash(size_t capacity) {
  std::vector<Entry> old(capacity, Entry{kEmptyKey, 0});
  entries_.swap(old);
  mask_ = capacity - 1;
  size_ = 0;
  for (const Entry& e : old)
    if (e.key != kEmptyKey) insert(e.key, e.value);
}

// =============================================================== BlockManager
Failure BlockManager::check_config(int64_t num_pages, int64_t page_size, int64_t watermark_pages,
                                   int64_t num_cpu_pages, int64_t hash_bits,
                                   bool enable_prefix_caching, bool cpu_prefix_cache) {
  if (!is_count(num_pages)) return invalid(Arg::num_pages, num_pages);
  if (!is_count(page_size)) return invalid(Arg::page_size, page_size);
  if (watermark_pages < 0 || watermark_pages > num_pages)
    return invalid(Arg::watermark_pages, watermark_pages, num_pages);
  if (num_cpu_pages < 0 || num_cpu_pages > kMaxCount)
    return invalid(Arg::num_cpu_pages, num_cpu_pages);
  if (hash_bits < 1 || hash_bits > 64) return invalid(Arg::hash_bits, hash_bits);
  if (cpu_prefix_cache && !(enable_prefix_caching && num_cpu_pages > 0))
    return invalid(Arg::cpu_prefix_cache, 1);
  return Failure{};
}

BlockManager::BlockManager(int64_t num_pages, int64_t page_size, int64_t watermark_pages,
                           bool enable_prefix_caching, int64_t num_cpu_pages, int64_t hash_bits,
                           bool cpu_prefix_cache, bool enable_kv_events, bool kv_event_nodes)
    : num_pages_(num_pages),
      page_size_(page_size),
      page_math_(page_size),
      watermark_pages_(watermark_pages),
      enable_prefix_caching_(enable_prefix_caching),
      num_cpu_pages_(num_cpu_pages),
      cpu_prefix_cache_(cpu_prefix_cache && enable_prefix_caching && num_cpu_pages > 0),
      // NOTE: hash_bits < 64 truncates page hashes; tests use it to force collisions.
      hash_mask_(hash_bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << hash_bits) - 1),
      ref_count_(static_cast<size_t>(num_pages), 0),
      prev_(static_cast<size_t>(num_pages)),
      next_(static_cast<size_t>(num_pages)),
      queue_of_(static_cast<size_t>(num_pages), static_cast<int8_t>(kFree)),
      drop_epoch_(static_cast<size_t>(num_pages), 0),
      drop_count_(static_cast<size_t>(num_pages), 0),
      cpu_ref_count_(static_cast<size_t>(num_cpu_pages), 0),
      cpu_free_(static_cast<size_t>(num_cpu_pages)),
      cpu_mark_(static_cast<size_t>(num_cpu_pages), 0),
      cpu_move_to_(static_cast<size_t>(num_cpu_pages), kNullPage),
      pin_flags_(static_cast<size_t>(num_pages), 0),
      page_priority_(static_cast<size_t>(num_pages), 0),
      cpu_pinned_flag_(static_cast<size_t>(num_cpu_pages), 0),
      cpu_swapped_from_(static_cast<size_t>(num_cpu_pages), kNullPage) {
  pinned_.reserve(static_cast<size_t>(num_pages));
  cpu_pinned_.reserve(static_cast<size_t>(num_cpu_pages));
  if (enable_prefix_caching) {
    fresh_.reserve(static_cast<size_t>(num_pages));
    fresh_offset_.assign(static_cast<size_t>(num_pages), static_cast<int32_t>(page_size));
  }
  if (cpu_prefix_cache_) {
    cpu_lru_prev_.assign(static_cast<size_t>(num_cpu_pages), kNotQueued);
    cpu_lru_next_.assign(static_cast<size_t>(num_cpu_pages), kNotQueued);
  }
  // NOTE: a new manager's free queue is 0..N-1, head first, as in the reference; so is the
  // CPU free queue.
  const int32_t n = static_cast<int32_t>(num_pages);
  for (int32_t p = 0; p < n; ++p) {
    prev_[p] = p - 1;  // kNullPage (-1) for page 0
    next_[p] = (p + 1 < n) ? p + 1 : kNullPage;
  }
  queues_[kFree].head = 0;
  queues_[kFree].tail = n - 1;
  queues_[kFree].size = num_pages;
  for (int64_t p = 0; p < num_cpu_pages; ++p) cpu_free_[p] = static_cast<int32_t>(p);
  cpu_free_size_ = num_cpu_pages;
  if (enable_prefix_caching) {
    prefix_ = PrefixIndex(num_pages, page_size, cpu_prefix_cache_ ? num_cpu_pages : 0);
    prefix_.record_events(enable_kv_events, kv_event_nodes);
    block_.resize(static_cast<size_t>(page_size));
  }
}

// ------------------------------------------------------------------ free queues
int32_t BlockManager::queue_pop_head(int queue) {
  PageQueue& q = queues_[queue];
  const int32_t page = q.head;
  if (page < 0) return kNullPage;
  const int32_t next = next_[page];
  q.head = next;
  if (next != kNullPage) prev_[next] = kNullPage; else q.tail = kNullPage;
  prev_[page] = next_[page] = kNotQueued;
  queue_of_[page] = -1;
  --q.size;
  if (queue >= kEvictable) {
    --evictable_size_;
    const int p = queue - kEvictable;
    if (q.size == 0) evictable_mask_[p >> 6] &= ~(uint64_t{1} << (p & 63));
  }
  return page;
}

int32_t BlockManager::pop_evictable() {
  for (int w = 0; w < 2; ++w)
    if (evictable_mask_[w]) return queue_pop_head(kEvictable + 64 * w + __builtin_ctzll(evictable_mask_[w]));
  return kNullPage;
}

void BlockManager::hold_priority(const std::vector<int32_t>& pages, int32_t priority) {
  for (int32_t page : pages)
    if (page >= 0 && page_priority_[page] < priority) page_priority_[page] = static_cast<int8_t>(priority);
}

void BlockManager::queue_push_tail(int queue, int32_t page) {
  if (prev_[page] != kNotQueued) return;  // only reachable after debug_* corruption
  PageQueue& q = queues_[queue];
  if (queue >= kEvictable) {
    ++evictable_size_;
    const int p = queue - kEvictable;
    evictable_mask_[p >> 6] |= uint64_t{1} << (p & 63);
  }
  prev_[page] = q.tail;
  next_[page] = kNullPage;
  if (q.tail != kNullPage) next_[q.tail] = page; else q.head = page;
  q.tail = page;
  queue_of_[page] = static_cast<int8_t>(queue);
  ++q.size;
}

void BlockManager::queue_remove(int32_t page) {
  if (prev_[page] == kNotQueued) return;
  const int queue = queue_of_[page];
  PageQueue& q = queues_[queue];
  const int32_t prev = prev_[page];
  const int32_t next = next_[page];
  if (prev != kNullPage) next_[prev] = next; else q.head = next;
  if (next != kNullPage) prev_[next] = prev; else q.tail = prev;
  prev_[page] = next_[page] = kNotQueued;
  queue_of_[page] = -1;
  --q.size;
  if (queue >= kEvictable) {
    --evictable_size_;
    const int p = queue - kEvictable;
    if (q.size == 0) evictable_mask_[p >> 6] &= ~(uint64_t{1} << (p & 63));
  }
}

int32_t BlockManager::take_free_page() {
  // NOTE: uncached pages go first; only then is the least recently freed cached page evicted.
  int32_t page = queue_pop_head(kFree);
  if (page == kNullPage) {
    page = pop_evictable();
    if (page == kNullPage) return kNullPage;  // unreachable: callers checked the free count
    if (cpu_prefix_cache_) demote(page);
    prefix_.detach(page);  // NOTE: evicted: its node may be deleted, or stay a ghost
  }
  ref_count_[page] = 1;
  page_priority_[page] = 0;  // NOTE: its holder sets it
  return page;
}

void BlockManager::take_cached_page(int32_t page) {
  // NOTE: O(1) removal from the middle of the evictable queue (a pinned page is on none).
  if (ref_count_[page] == 0 && !(pin_flags_[page] & kPinned)) queue_remove(page);
  ++ref_count_[page];
}

void BlockManager::release(int32_t page) {
  if (--ref_count_[page] == 0 && !(pin_flags_[page] & kPinned)) enqueue(page);
}

void BlockManager::release_cpu(int32_t page) {
  if (page < 0 || page >= num_cpu_pages_) return;  // only reachable after corruption
  if (--cpu_ref_count_[page] == 0 && !cpu_pinned_flag_[page]) enqueue_cpu(page);
}

// ------------------------------------------------- CPU tier of the prefix cache
int32_t BlockManager::take_cpu_page() {
  // NOTE: swap-out outranks the tier: a cached CPU page is taken once no free one is left.
  if (cpu_free_size_) return cpu_pop_head();
  const int32_t cpu = cpu_lru_.head;
  if (cpu < 0) return kNullPage;  // unreachable: callers checked num_free_cpu_pages()
  const int32_t next = cpu_lru_next_[cpu];
  cpu_lru_.head = next;
  if (next != kNullPage) cpu_lru_prev_[next] = kNullPage; else cpu_lru_.tail = kNullPage;
  cpu_lru_prev_[cpu] = cpu_lru_next_[cpu] = kNotQueued;
  --cpu_lru_.size;
  prefix_.detach_cpu(cpu);  // NOTE: its content is lost; its node may be deleted
  return cpu;
}

void BlockManager::enqueue_cpu(int32_t cpu) {
  if (!cpu_prefix_cache_ || !prefix_.is_cpu_cached(cpu)) {
    cpu_push_tail(cpu);
    return;
  }
  if (cpu_lru_prev_[cpu] != kNotQueued) return;  // only reachable after corruption
  cpu_lru_prev_[cpu] = cpu_lru_.tail;
  cpu_lru_next_[cpu] = kNullPage;
  if (cpu_lru_.tail != kNullPage) cpu_lru_next_[cpu_lru_.tail] = cpu; else cpu_lru_.head = cpu;
  cpu_lru_.tail = cpu;
  ++cpu_lru_.size;
}

void BlockManager::demote(int32_t page) {
  // NOTE: only content written before this step (a page indexed in it gets its KV in this
  // step's forward pass, after the demotion would run), only once per node (the tier is
  // inclusive), and never into a swapped-out sequence's page.
  const int32_t node = prefix_.node_of(page);
  if (fresh_offset_[page] < page_size_ || prefix_.cpu_page_of(node) != PrefixIndex::kNone ||
      num_free_cpu_pages() == 0)
    return;
  const int32_t cpu = take_cpu_page();
  prefix_.attach_cpu(cpu, node);
  pin_cpu(cpu);  // NOTE: a destination: no other move of this step may write it
  demotions_.push_back(page);  // within reserve_moves()
  demotions_.push_back(cpu);
  ++stats_.demotions;
}

void BlockManager::promote(int64_t num_cached) {
  const int64_t ps = page_size_;
  // NOTE: every source is pinned (off the LRU list) before the first GPU page is taken: an
  // eviction that page causes may demote, and a demotion must not take a CPU page read here.
  for (size_t i = 0; i < hits_.size(); ++i) {
    if (hits_[i] != kNullPage) continue;
    const int32_t cpu = prefix_.cpu_page_of(hit_nodes_[i]);
    if (cpu_lru_prev_[cpu] != kNotQueued) {
      const int32_t prev = cpu_lru_prev_[cpu];
      const int32_t next = cpu_lru_next_[cpu];
      if (prev != kNullPage) cpu_lru_next_[prev] = next; else cpu_lru_.head = next;
      if (next != kNullPage) cpu_lru_prev_[next] = prev; else cpu_lru_.tail = prev;
      cpu_lru_prev_[cpu] = cpu_lru_next_[cpu] = kNotQueued;
      --cpu_lru_.size;
    }
    pin_cpu(cpu);
  }
  for (size_t i = 0; i < hits_.size(); ++i) {
    if (hits_[i] != kNullPage) continue;
    const int32_t cpu = prefix_.cpu_page_of(hit_nodes_[i]);
    const int32_t page = take_free_page();  // NOTE: held as a hit is (ref_count 1)
    prefix_.attach(page, hit_nodes_[i]);
    pin(page);
    pin_flags_[page] |= kCopyDst;
    promotions_.push_back(cpu);  // within reserve_moves()
    promotions_.push_back(page);
    hits_[i] = page;
    ++stats_.promotions;
    stats_.cpu_hit_tokens += std::max<int64_t>(0, std::min<int64_t>(ps, num_cached - static_cast<int64_t>(i) * ps));
  }
}

void BlockManager::reserve_moves(int64_t pages, int64_t promotions) {
  if (!cpu_prefix_cache_) return;
  demotions_.reserve(demotions_.size() + 2 * static_cast<size_t>(std::max<int64_t>(pages, 0)));
  promotions_.reserve(promotions_.size() + 2 * static_cast<size_t>(std::max<int64_t>(promotions, 0)));
}

void BlockManager::take_offload(std::vector<int32_t>& demotions, std::vector<int32_t>& promotions) {
  demotions.clear();
  promotions.clear();
  demotions.swap(demotions_);
  promotions.swap(promotions_);
}

// ------------------------------------------------------------ step-safe copies
void BlockManager::pin(int32_t page) {
  if (pin_flags_[page] & kPinned) return;
  pin_flags_[page] |= kPinned;
  pinned_.push_back(page);  // within the capacity reserved at construction
}

void BlockManager::pin_cpu(int32_t page) {
  if (cpu_pinned_flag_[page]) return;
  cpu_pinned_flag_[page] = 1;
  cpu_pinned_.push_back(page);  // within the capacity reserved at construction
}

void BlockManager::gpu_copy(int32_t src, int32_t dst, std::vector<int32_t>& copies) {
  pin(src);
  pin(dst);
  pin_flags_[dst] |= kCopyDst;
  copies.push_back(src);
  copies.push_back(dst);
}

int64_t BlockManager::num_pinned_pages() const {
  int64_t n = 0;
  for (int32_t page : pinned_) n += ref_count_[page] == 0;
  return n;
}

void BlockManager::end_step() {
  for (int32_t page : pinned_) {
    pin_flags_[page] = 0;
    if (ref_count_[page] == 0) enqueue(page);
  }
  pinned_.clear();
  for (int32_t page : cpu_pinned_) {
    cpu_pinned_flag_[page] = 0;
    cpu_swapped_from_[page] = kNullPage;
    if (cpu_ref_count_[page] == 0) enqueue_cpu(page);
  }
  cpu_pinned_.clear();
  for (int32_t page : fresh_) fresh_offset_[page] = static_cast<int32_t>(page_size_);
  fresh_.clear();
}

int32_t BlockManager::cpu_pop_head() {
  if (cpu_free_size_ == 0) return kNullPage;
  const int32_t page = cpu_free_[cpu_free_head_];
  cpu_free_head_ = cpu_free_head_ + 1 == num_cpu_pages_ ? 0 : cpu_free_head_ + 1;
  --cpu_free_size_;
  return page;
}

void BlockManager::cpu_push_tail(int32_t page) {
  if (cpu_free_size_ == num_cpu_pages_) return;  // only reachable after corruption
  int64_t at = cpu_free_head_ + cpu_free_size_;
  if (at >= num_cpu_pages_) at -= num_cpu_pages_;
  cpu_free_[at] = page;
  ++cpu_free_size_;
}

// --------------------------------------------------------------------- queries
Failure BlockManager::resident(int64_t seq_id, int64_t& slot) const {
  slot = index_.find(seq_id);
  if (slot < 0) return fail(Status::unknown_sequence, seq_id);
  if (seqs_[slot].swapped) return fail(Status::sequence_swapped, seq_id, 1);
  return Failure{};
}

Failure BlockManager::page_table(int64_t seq_id, std::vector<int32_t>& out) const {
  const int64_t slot = index_.find(seq_id);
  if (slot < 0) return fail(Status::unknown_sequence, seq_id);
  out = seqs_[slot].pages;
  return Failure{};
}

Failure BlockManager::num_tokens(int64_t seq_id, int64_t& out) const {
  const int64_t slot = index_.find(seq_id);
  if (slot < 0) return fail(Status::unknown_sequence, seq_id);
  out = seqs_[slot].num_tokens;
  return Failure{};
}

Failure BlockManager::ref_count(int64_t page_id, int64_t& out) const {
  if (page_id < 0 || page_id >= num_pages_) return invalid(Arg::page_id, page_id, num_pages_);
  out = ref_count_[page_id];
  return Failure{};
}

Failure BlockManager::can_allocate(int64_t num_tokens, TokenIds token_ids, uint64_t salt,
                                   bool& out, int64_t max_cached_tokens, int64_t release_before) {
  out = false;
  if (num_tokens < 0) return Failure{};
  int64_t need = 0;
  Failure f = pages_needed(num_tokens, token_ids, salt, need, max_cached_tokens, release_before);
  if (!f.ok()) return f;
  out = need <= num_free_pages() - watermark_pages_;
  return Failure{};
}

Failure BlockManager::pages_needed(int64_t num_tokens, TokenIds token_ids, uint64_t salt,
                                   int64_t& out, int64_t max_cached_tokens, int64_t release_before) {
  out = 0;
  if (num_tokens < 0) return invalid(Arg::num_tokens, num_tokens);
  if (max_cached_tokens < -1) return invalid(Arg::max_cached_tokens, max_cached_tokens);
  if (release_before < 0 || (release_before > 0 && release_before >= num_tokens))
    return invalid(Arg::release_before, release_before, num_tokens);
  if (token_ids.given()) {
    if (static_cast<int64_t>(token_ids.size) != num_tokens)
      return invalid(Arg::num_tokens_len, num_tokens, static_cast<int64_t>(token_ids.size));
    Failure f = check_token_ids(token_ids);
    if (!f.ok()) return f;
  }
  const AllocatePlan plan =
      plan_allocate(num_tokens, token_ids, salt, max_cached_tokens, release_before / page_size_);
  out = plan.need;
  return Failure{};
}

Failure BlockManager::can_append(int64_t seq_id, int64_t num_tokens, bool& out) {
  int64_t slot = -1;
  Failure f = resident(seq_id, slot);
  if (!f.ok()) return f;
  if (!is_count(num_tokens)) return invalid(Arg::num_tokens, num_tokens);
  out = pages_to_append(seqs_[slot], num_tokens, false) <= num_free_pages();
  return Failure{};
}

int64_t BlockManager::pages_to_append(Sequence& seq, int64_t num_tokens, bool batch,
                                      bool* copy_on_write) {
  const int64_t current = seq.num_tokens;
  int64_t need =
      page_math_.pages_for(current + num_tokens) - static_cast<int64_t>(seq.pages.size());
  // NOTE: the last page is never kNullPage (a window releases only pages wholly before the
  // last token); the check keeps a corrupted table from indexing ref_count_[-1].
  if (page_math_.offset(current) != 0 && !seq.pages.empty() && seq.pages.back() >= 0) {
    const int32_t last = seq.pages.back();
    // drops >= 0, so an unshared last page (the common case) never reads the drop arrays.
    const int64_t refs = ref_count_[last];
    int64_t drops = 0;
    if (refs > 1 && batch && drop_epoch_[last] == epoch_) drops = drop_count_[last];
    if (refs - drops > 1) {
      if (batch) {
        if (drop_epoch_[last] != epoch_) {
          drop_epoch_[last] = epoch_;
          drop_count_[last] = 0;
        }
        ++drop_count_[last];
      }
      ++need;
      if (copy_on_write) *copy_on_write = true;
    }
  }
  return need;
}

// -------------------------------------------------------------------- mutators
int64_t BlockManager::acquire_slot() {
  if (!free_slots_.empty()) {
    const int64_t slot = free_slots_.back();
    free_slots_.pop_back();
    return slot;
  }
  // NOTE: free_slots_ keeps room for every slot, so free() never allocates (cannot throw).
  free_slots_.reserve(seqs_.size() + 1);
  slot_row_.reserve(seqs_.size() + 1);
  seqs_.emplace_back();
  slot_row_.push_back(-1);
  return static_cast<int64_t>(seqs_.size()) - 1;
}

// ------------------------------------------------------------ persistent page table
void BlockManager::bind_table(int32_t* table, int64_t rows, int64_t width, int32_t* lens) {
  std::fill(slot_row_.begin(), slot_row_.end(), -1);
  table_ = table;
  table_lens_ = table ? lens : nullptr;
  table_rows_ = table ? rows : 0;
  table_width_ = table ? width : 0;
  row_slot_.assign(static_cast<size_t>(table_rows_), -1);
  if (!table) return;
  std::fill(table_, table_ + rows * width, kNullPage);
  if (table_lens_) std::fill(table_lens_, table_lens_ + rows, 0);
}

Failure BlockManager::set_row(int64_t seq_id, int64_t row) {
  const int64_t slot = index_.find(seq_id);
  if (slot < 0) return fail(Status::unknown_sequence, seq_id);
  if (row < 0) {
    clear_row(slot);
    return Failure{};
  }
  if (row >= table_rows_) return invalid(Arg::row, row, table_rows_);
  const int64_t owner = row_slot_[static_cast<size_t>(row)];
  if (owner >= 0 && owner != slot) return invalid(Arg::row_taken, row, seqs_[owner].seq_id);
  const int64_t pages = static_cast<int64_t>(seqs_[slot].pages.size());
  if (pages > table_width_) return invalid(Arg::row_pages, seq_id, pages, table_width_);
  // NOTE: its token count goes to an int32 entry, as page_tables' seq_lens
  if (seqs_[slot].num_tokens > kMaxCount)
    return fail(Status::int32_overflow, seq_id, seqs_[slot].num_tokens);
  clear_row(slot);
  slot_row_[static_cast<size_t>(slot)] = static_cast<int32_t>(row);
  row_slot_[static_cast<size_t>(row)] = slot;
  write_row(slot);
  return Failure{};
}

int64_t BlockManager::row_of(int64_t seq_id) const {
  const int64_t slot = index_.find(seq_id);
  return slot < 0 ? -1 : slot_row_[static_cast<size_t>(slot)];
}

void BlockManager::write_row(int64_t slot) {
  const int32_t row = slot_row_[static_cast<size_t>(slot)];
  if (row < 0) return;
  const Sequence& seq = seqs_[static_cast<size_t>(slot)];
  int32_t* out = table_ + static_cast<int64_t>(row) * table_width_;
  // NOTE: a swapped-out sequence holds CPU page ids: its row says it has no device page.
  if (seq.swapped) {
    std::fill(out, out + table_width_, kNullPage);
  } else {
    std::copy(seq.pages.begin(), seq.pages.end(), out);
    std::fill(out + seq.pages.size(), out + table_width_, kNullPage);
  }
  if (table_lens_) table_lens_[row] = static_cast<int32_t>(seq.num_tokens);
}

void BlockManager::write_row_from(int64_t slot, size_t from) {
  const int32_t row = slot_row_[static_cast<size_t>(slot)];
  if (row < 0) return;
  const Sequence& seq = seqs_[static_cast<size_t>(slot)];
  std::copy(seq.pages.begin() + static_cast<std::ptrdiff_t>(from), seq.pages.end(),
            table_ + static_cast<int64_t>(row) * table_width_ + from);
  if (table_lens_) table_lens_[row] = static_cast<int32_t>(seq.num_tokens);
}

void BlockManager::clear_row(int64_t slot) {
  const int32_t row = slot_row_[static_cast<size_t>(slot)];
  if (row < 0) return;
  std::fill(table_ + static_cast<int64_t>(row) * table_width_, table_ + (row + 1) * table_width_, kNullPage);
  if (table_lens_) table_lens_[row] = 0;
  slot_row_[static_cast<size_t>(slot)] = -1;
  row_slot_[static_cast<size_t>(row)] = -1;
}

Failure BlockManager::allocate(int64_t seq_id, int64_t num_tokens, TokenIds token_ids,
                               uint64_t salt, int64_t num_computed_tokens, int64_t& num_cached,
                               std::vector<int32_t>& copies, int64_t priority,
                               int64_t max_cached_tokens, int64_t release_before) {
  if (seq_id < 0) return invalid(Arg::seq_id, seq_id);
  if (priority < 0 || priority >= kNumPriorities) return invalid(Arg::priority, priority);
  if (!is_count(num_tokens)) return invalid(Arg::num_tokens, num_tokens);
  if (token_ids.given()) {
    if (static_cast<int64_t>(token_ids.size) != num_tokens)
      return invalid(Arg::num_tokens_len, num_tokens, static_cast<int64_t>(token_ids.size));
    Failure f = check_token_ids(token_ids);
    if (!f.ok()) return f;
  }
  if (num_computed_tokens < 0 || num_computed_tokens > num_tokens)
    return invalid(Arg::num_computed_tokens, num_computed_tokens, num_tokens);
  if (max_cached_tokens < -1) return invalid(Arg::max_cached_tokens, max_cached_tokens);
  if (release_before < 0 || (release_before > 0 && release_before >= num_tokens))
    return invalid(Arg::release_before, release_before, num_tokens);
  if (index_.find(seq_id) >= 0) return fail(Status::sequence_exists, seq_id);
  const bool caching = enable_prefix_caching_ && token_ids.given();
  const int64_t ps = page_size_;
  const int64_t skip = release_before / ps;
  const AllocatePlan plan = plan_allocate(num_tokens, token_ids, salt, max_cached_tokens, skip);
  const int64_t available = num_free_pages() - watermark_pages_;
  if (plan.need > available)
    return fail(Status::out_of_pages, plan.need, std::max<int64_t>(available, 0), num_pages_);

  const int64_t num_hits = static_cast<int64_t>(hits_.size());
  const int64_t lead = plan.num_cached ? skip : 0;  // released entries before the hit pages
  const int64_t committed = std::max(num_computed_tokens, plan.num_cached);
  // NOTE: shared hit pages are indexed already: the sequence chains after the last of them.
  // The prompt's own pages, the private copy of a whole-prompt hit's last page included (it
  // holds the same content once the engine writes its last token), are offered up to the
  // committed tokens only: the KV of the others is not written yet.
  const int64_t shared = lead + num_hits - (plan.copy ? 1 : 0);
  const size_t len = static_cast<size_t>(page_math_.pages_for(num_tokens));
  std::vector<int32_t> pages;
  pages.reserve(len);
  std::unique_ptr<SequenceCache> cache;
  const int64_t new_nodes = caching ? page_math_.index(committed) - shared : 0;
  if (caching) {
    reserve_cache(new_nodes);
    cache = std::make_unique<SequenceCache>();
    cache->salt = salt;
    cache->committed = committed;
    cache->tail.assign(token_ids.data + shared * ps, token_ids.data + num_tokens);
  }
  copies.clear();
  copies.reserve(2);
  index_.reserve_one_more();
  int64_t num_promotions = 0;
  for (int32_t page : hits_) num_promotions += page == kNullPage;
  reserve_moves(plan.need, num_promotions);
  // NOTE: evictions (and their demotions) of the pages it takes, and its own pages attached
  reserve_events(new_nodes, 2 * plan.need + static_cast<int64_t>(len));
  const int64_t slot = acquire_slot();
  // Nothing below allocates.
  if (caching) {
    ++stats_.queries;
    stats_.query_tokens += num_tokens;
    if (plan.num_cached) {
      ++stats_.hits;
      stats_.hit_tokens += plan.num_cached;
    }
  }
  // NOTE: the node the sequence chains after is held before any page is taken: when the hit is
  // released pages only (a chunk's start), it may be a ghost that an eviction below would delete.
  int32_t chain_node = PrefixIndex::kRoot;
  if (caching) {
    if (shared == 0) chain_node = PrefixIndex::kRoot;
    else if (shared == lead) chain_node = lead_node_;
    else chain_node = hit_nodes_[static_cast<size_t>(shared - lead - 1)];
    prefix_.acquire(chain_node);
  }
  for (int32_t page : hits_)
    if (page != kNullPage) take_cached_page(page);
  if (num_promotions) promote(plan.num_cached - lead * ps);
  pages.assign(static_cast<size_t>(skip), kNullPage);  // within the capacity reserved
  pages.insert(pages.end(), hits_.begin(), hits_.end());
  if (plan.copy) {
    // NOTE: the whole prompt was cached, but the engine must still compute the last token,
    // which it writes into the last hit page: that page is copied, not shared.
    const int32_t src = pages.back();
    const int32_t dst = take_free_page();
    pages.back() = dst;
    gpu_copy(src, dst, copies);
    release(src);
  }
  while (pages.size() < len) pages.push_back(take_free_page());
  Sequence& seq = seqs_[slot];
  seq.seq_id = seq_id;
  seq.num_tokens = num_tokens;
  seq.mark = 0;
  seq.swapped = false;
  seq.window_start = static_cast<int32_t>(skip);
  seq.cache = std::move(cache);
  seq.pages.swap(pages);
  seq.priority = static_cast<int8_t>(priority);
  hold_priority(seq.pages, seq.priority);
  if (caching) {
    seq.cache->node = chain_node;
    written_from_ = plan.num_cached;  // NOTE: the rest of the prompt is computed in this step
    offer_pages(seq, num_tokens, committed);
  }
  index_.insert(seq_id, slot);
  num_cached = plan.num_cached;
  return Failure{};
}

void BlockManager::grow(Sequence& seq, int64_t num_tokens, int64_t new_len,
                        std::vector<int32_t>& copies, const int64_t* token_ids) {
  const int64_t current = seq.num_tokens;
  if (page_math_.offset(current) != 0 && !seq.pages.empty() && seq.pages.back() >= 0 &&
      ref_count_[seq.pages.back()] > 1) {
    // NOTE: copy-on-write. The shared, partly filled last page is never written: the new
    // tokens go to a fresh copy, taken before any new page, and the cache must copy
    // src -> dst before writing.
    const int32_t src = seq.pages.back();
    const int32_t dst = take_free_page();
    gpu_copy(src, dst, copies);
    release(src);
    seq.pages.back() = dst;
    page_priority_[dst] = seq.priority;
  }
  while (static_cast<int64_t>(seq.pages.size()) < new_len) {
    const int32_t page = take_free_page();
    page_priority_[page] = seq.priority;
    seq.pages.push_back(page);
  }
  seq.num_tokens = current + num_tokens;
  if (seq.cache) extend_cached_tokens(seq, current, token_ids, num_tokens);
}

Failure BlockManager::append(int64_t seq_id, int64_t num_tokens, TokenIds token_ids,
                             std::vector<int32_t>& copies) {
  int64_t slot = -1;
  Failure f = resident(seq_id, slot);
  if (!f.ok()) return f;
  if (!is_count(num_tokens)) return invalid(Arg::num_tokens, num_tokens);
  if (token_ids.given()) {
    if (static_cast<int64_t>(token_ids.size) != num_tokens)
      return invalid(Arg::token_ids_len, static_cast<int64_t>(token_ids.size), num_tokens);
    f = check_token_ids(token_ids);
    if (!f.ok()) return f;
  }
  Sequence& seq = seqs_[slot];
  const int64_t new_len = page_math_.pages_for(seq.num_tokens + num_tokens);
  if (!row_fits(slot, new_len)) return invalid(Arg::row_width, num_tokens, seq_id, table_width_);
  if (slot_row_[static_cast<size_t>(slot)] >= 0 && seq.num_tokens + num_tokens > kMaxCount)
    return fail(Status::int32_overflow, seq_id, seq.num_tokens + num_tokens);
  const int64_t need = pages_to_append(seq, num_tokens, false);
  const int64_t free_pages = num_free_pages();
  if (need > free_pages) return fail(Status::out_of_pages, need, free_pages, num_pages_);
  copies.clear();
  copies.reserve(2);
  reserve_pages(seq.pages, new_len);
  const int64_t filled = seq.cache ? pages_filled(seq, num_tokens, token_ids.given()) : 0;
  if (seq.cache) {
    reserve_tail(seq, num_tokens, token_ids.given());
    reserve_cache(filled);
  }
  reserve_moves(need);
  reserve_events(filled, 2 * need + filled);
  const size_t old_pages = seq.pages.size();
  grow(seq, num_tokens, new_len, copies, token_ids.data);
  // NOTE: from the old last page on (copy-on-write may have replaced it)
  write_row_from(slot, old_pages ? old_pages - 1 : 0);
  return Failure{};
}

Failure BlockManager::append_batch(const int64_t* seq_ids, size_t num_seq_ids,
                                   const int64_t* num_tokens, size_t num_counts,
                                   TokenIds token_ids, StepPlan& out) {
  // NOTE: ids are range-checked here, as the facade's check would (the smallest one named),
  // so that the facade can pass an int64 array straight through.
  int64_t lowest = 0;
  for (size_t i = 0; i < num_seq_ids; ++i) lowest = std::min(lowest, seq_ids[i]);
  if (lowest < 0) return invalid(Arg::seq_ids, lowest);
  if (num_counts != num_seq_ids)
    return invalid(Arg::num_tokens_size, static_cast<int64_t>(num_counts),
                   static_cast<int64_t>(num_seq_ids));
  if (token_ids.given()) {
    int64_t sum = 0;
    for (size_t i = 0; i < num_counts; ++i) {
      if (!is_count(num_tokens[i])) return invalid(Arg::num_tokens, num_tokens[i]);
      sum += num_tokens[i];
    }
    if (static_cast<int64_t>(token_ids.size) != sum)
      return invalid(Arg::token_ids_sum, static_cast<int64_t>(token_ids.size), sum);
    Failure f = check_token_ids(token_ids);
    if (!f.ok()) return f;
  }
  batch_slots_.resize(num_seq_ids);
  batch_lens_.resize(num_seq_ids);
  ++epoch_;  // new marks for duplicate detection and copy-on-write accounting
  int64_t need = 0;
  int64_t total_tokens = 0;
  size_t num_copies = 0;
  // NOTE: a new step: the copies returned since the last one have run, so their pinned pages
  // are released first (and count as free for this call).
  const int64_t free_pages = num_free_pages() + num_pinned_pages();
  for (size_t i = 0; i < num_seq_ids; ++i) {
    const int64_t seq_id = seq_ids[i];
    const int64_t n = num_tokens[i];
    if (!is_count(n)) return invalid(Arg::num_tokens, n);
    // NOTE: in list order, the first duplicate, unknown or swapped-out id wins (as in the
    // reference, where the duplicate check precedes the lookup); OutOfPages is reported only
    // after every id.
    const int64_t slot = index_.find(seq_id);
    if (slot < 0) return fail(Status::unknown_sequence, seq_id);
    Sequence& seq = seqs_[slot];
    if (seq.mark == epoch_) return fail(Status::duplicate_sequence, seq_id);
    seq.mark = epoch_;
    if (seq.swapped) return fail(Status::sequence_swapped, seq_id, 1);
    const int64_t new_len = page_math_.pages_for(seq.num_tokens + n);
    if (!row_fits(slot, new_len)) return invalid(Arg::row_width, n, seq_id, table_width_);
    if (slot_row_[static_cast<size_t>(slot)] >= 0 && seq.num_tokens + n > kMaxCount)
      return fail(Status::int32_overflow, seq_id, seq.num_tokens + n);
    bool copy_on_write = false;
    const int64_t pages = pages_to_append(seq, n, true, &copy_on_write);
    // Room in the page table now, so that no allocation follows the first change. Only when
    // this sequence alone fits the free queues: a bigger need fails with OutOfPages below, and
    // bounding the reservation by num_pages keeps a huge request from throwing bad_alloc.
    if (pages <= free_pages) reserve_pages(seq.pages, new_len);
    batch_slots_[i] = slot;
    batch_lens_[i] = new_len;
    num_copies += copy_on_write;
    need += pages;
    total_tokens += n;
  }
  if (need > free_pages) return fail(Status::out_of_pages, need, free_pages, num_pages_);
  int64_t filled = 0;
  if (enable_prefix_caching_) {
    // NOTE: without token ids, only sequences with pending prompt pages fill any (the append
    // commits them); the loop runs only with prefix caching on, off the plain decode path.
    const bool has_tokens = token_ids.given();
    for (size_t i = 0; i < num_seq_ids; ++i) {
      Sequence& seq = seqs_[batch_slots_[i]];
      if (!seq.cache) continue;
      reserve_tail(seq, num_tokens[i], has_tokens);
      filled += pages_filled(seq, num_tokens[i], has_tokens);
    }
    reserve_cache(filled);
  }

  out.slot_mapping.resize(static_cast<size_t>(total_tokens));
  out.copies.clear();
  out.copies.reserve(2 * num_copies);
  reserve_moves(need);
  reserve_events(filled, 2 * need + filled);
  end_step();  // nothing below allocates
  int64_t* slot_out = out.slot_mapping.data();
  const int64_t* tokens = token_ids.data;
  for (size_t i = 0; i < num_seq_ids; ++i) {
    Sequence& seq = seqs_[batch_slots_[i]];
    const int64_t start = seq.num_tokens;
    const size_t old_pages = seq.pages.size();
    grow(seq, num_tokens[i], batch_lens_[i], out.copies, tokens);
    write_slots(seq.pages, page_math_, start, seq.num_tokens, slot_out);
    if (table_) write_row_from(batch_slots_[i], old_pages ? old_pages - 1 : 0);
    slot_out += num_tokens[i];
    if (tokens) tokens += num_tokens[i];
  }
  return Failure{};
}

Failure BlockManager::fork(int64_t parent_id, int64_t child_id) {
  int64_t parent_slot = -1;
  Failure f = resident(parent_id, parent_slot);
  if (!f.ok()) return f;
  if (child_id < 0) return invalid(Arg::child_id, child_id);
  if (index_.find(child_id) >= 0) return fail(Status::sequence_exists, child_id);

  // Copies first: acquire_slot may move seqs_.
  const Sequence& parent = seqs_[parent_slot];
  std::vector<int32_t> pages(parent.pages);
  std::unique_ptr<SequenceCache> cache;
  if (parent.cache) cache = std::make_unique<SequenceCache>(*parent.cache);
  const int64_t num_tokens = parent.num_tokens;
  const int32_t window_start = parent.window_start;
  const int8_t priority = parent.priority;
  index_.reserve_one_more();
  const int64_t slot = acquire_slot();
  // NOTE: ref counts are int32; overflowing one takes 2**31 live sequences (> 100 GiB).
  for (int32_t page : pages)
    if (page != kNullPage) ++ref_count_[page];
  Sequence& child = seqs_[slot];
  child.seq_id = child_id;
  child.num_tokens = num_tokens;
  child.mark = 0;
  child.swapped = false;
  child.window_start = window_start;
  child.priority = priority;
  child.cache = std::move(cache);
  child.pages.swap(pages);
  if (child.cache) prefix_.acquire(child.cache->node);
  index_.insert(child_id, slot);
  return Failure{};
}

Failure BlockManager::free(int64_t seq_id) {
  const int64_t slot = index_.find(seq_id);
  if (slot < 0) return fail(Status::unknown_sequence, seq_id);
  Sequence& seq = seqs_[slot];
  reserve_events(0, 0);  // node releases may delete nodes (DROP records)
  // NOTE: a sequence's pages are released last page first, so that when they are reused in
  // queue order the tail of a freed sequence goes before its head (the head is the part most
  // likely to be shared again by a prefix-cache hit).
  for (auto it = seq.pages.rbegin(); it != seq.pages.rend(); ++it) {
    const int32_t page = *it;
    if (page == kNullPage) continue;
    if (seq.swapped) release_cpu(page); else release(page);
  }
  std::vector<int32_t>().swap(seq.pages);
  clear_row(slot);
  if (seq.cache) prefix_.release(seq.cache->node);
  seq.cache.reset();
  seq.seq_id = -1;
  seq.num_tokens = 0;
  seq.window_start = 0;
  seq.swapped = false;
  index_.erase(seq_id);
  free_slots_.push_back(slot);  // capacity reserved in acquire_slot
  return Failure{};
}

// ----------------------------------------------------------------- batch views
Failure BlockManager::slots(int64_t seq_id, int64_t start, int64_t stop,
                            std::vector<int64_t>& out) const {
  int64_t slot = -1;
  Failure f = resident(seq_id, slot);
  if (!f.ok()) return f;
  const Sequence& seq = seqs_[slot];
  if (stop > seq.num_tokens) return invalid(Arg::stop, stop, seq_id, seq.num_tokens);
  if (start > stop) return invalid(Arg::start, start, stop);
  if (start < 0) return invalid(Arg::start_range, start);
  if (start < stop && seq.pages[page_math_.index(start)] == kNullPage)
    return invalid(Arg::start_released, start);
  out.resize(static_cast<size_t>(stop - start));
  write_slots(seq.pages, page_math_, start, stop, out.data());
  return Failure{};
}

Failure BlockManager::lookup_batch(const int64_t* seq_ids, size_t n) {
  batch_slots_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t slot = -1;
    Failure f = resident(seq_ids[i], slot);
    if (!f.ok()) return f;
    batch_slots_[i] = slot;
  }
  return Failure{};
}

Failure BlockManager::page_tables(const int64_t* seq_ids, size_t n, int64_t max_pages,
                                  bool has_max_pages, PageTables& out, bool live_only) {
  Failure f = lookup_batch(seq_ids, n);
  if (!f.ok()) return f;
  int64_t width = 0;
  for (size_t i = 0; i < n; ++i) {
    const Sequence& seq = seqs_[batch_slots_[i]];
    width = std::max<int64_t>(width, static_cast<int64_t>(seq.pages.size()) - (live_only ? seq.window_start : 0));
  }
  if (has_max_pages) {
    if (max_pages < 0) return invalid(Arg::max_pages_range, max_pages);
    if (max_pages < width) return invalid(Arg::max_pages, max_pages, width);
    width = max_pages;
  }
  for (size_t i = 0; i < n; ++i) {
    const int64_t tokens = seqs_[batch_slots_[i]].num_tokens;
    if (tokens > std::numeric_limits<int32_t>::max())
      return fail(Status::int32_overflow, seq_ids[i], tokens);
  }
  if (width > 0 && n > std::numeric_limits<size_t>::max() / 4 / static_cast<size_t>(width))
    throw std::bad_alloc();
  out.width = width;
  out.page_table.resize(n * static_cast<size_t>(width));
  out.seq_lens.resize(n);
  out.first_page.resize(live_only ? n : 0);
  int32_t* row = out.page_table.data();
  for (size_t i = 0; i < n; ++i, row += width) {
    const Sequence& seq = seqs_[batch_slots_[i]];
    // NOTE: released entries form a prefix of the table, so a windowed row costs its live pages
    // only, whatever the sequence's length.
    const size_t first = live_only ? static_cast<size_t>(seq.window_start) : 0;
    const size_t len = seq.pages.size() - first;
    if (len) std::memcpy(row, seq.pages.data() + first, len * sizeof(int32_t));
    std::fill(row + len, row + width, kNullPage);
    out.seq_lens[i] = static_cast<int32_t>(seq.num_tokens);
    if (live_only) out.first_page[i] = static_cast<int32_t>(first);
  }
  return Failure{};
}

Failure BlockManager::csr(const int64_t* seq_ids, size_t n, CSR& out) {
  Failure f = lookup_batch(seq_ids, n);
  if (!f.ok()) return f;
  // NOTE: a sliding window's released pages (entries before window_start) are left out: a CSR
  // page id of -1 would be read as a page.
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const Sequence& seq = seqs_[batch_slots_[i]];
    total += seq.pages.size() - static_cast<size_t>(seq.window_start);
  }
  out.indptr.resize(n + 1);
  out.indices.resize(total);
  out.last_page_len.resize(n);
  // NOTE: indptr is accumulated modulo 2**32, as numpy's int32 cumsum in the reference does;
  // it can only wrap for batches holding more than 2**31 page-table entries.
  uint32_t acc = 0;
  out.indptr[0] = 0;
  int32_t* dst = out.indices.data();
  for (size_t i = 0; i < n; ++i) {
    const Sequence& seq = seqs_[batch_slots_[i]];
    const size_t skip = static_cast<size_t>(seq.window_start);
    const size_t len = seq.pages.size() - skip;
    if (len) std::memcpy(dst, seq.pages.data() + skip, len * sizeof(int32_t));
    dst += len;
    acc += static_cast<uint32_t>(len);
    out.indptr[i + 1] = static_cast<int32_t>(acc);
    // Python's (num_tokens - 1) % page_size + 1 (num_tokens >= 1 for every live sequence).
    const int64_t tokens = seq.num_tokens;
    out.last_page_len[i] =
        static_cast<int32_t>(tokens > 0 ? page_math_.offset(tokens - 1) + 1 : page_size_);
  }
  return Failure{};
}

// ------------------------------------------------------------------ invariants
Failure BlockManager::check_queue(int queue, const std::vector<int64_t>& refs,
                                  std::vector<char>& on_queue) const {
  const int64_t n = num_pages_;
  const PageQueue& q = queues_[queue];
  int64_t walked = 0;
  int32_t prev = kNullPage;
  for (int32_t page = q.head; page != kNullPage; prev = page, page = next_[page]) {
    if (page < 0 || page >= n || on_queue[page]) return broken(Invariant::free_list_unique, page);
    if (prev_[page] != prev || queue_of_[page] != queue)
      return broken(Invariant::free_list_links, page);
    on_queue[page] = 1;
    ++walked;
    if (refs[page]) return broken(Invariant::free_page_unreferenced, page, refs[page]);
    const bool cached = is_cached(page);
    if (cached != (queue >= kEvictable))
      return broken(Invariant::free_queue_cached, page, queue >= kEvictable, cached,
                    cached ? static_cast<int64_t>(prefix_.hash_of(prefix_.node_of(page))) : 0);
  }
  if (prev != q.tail) return broken(Invariant::free_list_links, q.tail);
  if (walked != q.size) return broken(Invariant::free_list_size, walked, q.size);
  return Failure{};
}

Failure BlockManager::check_committed(const Sequence& seq) const {
  const SequenceCache& cache = *seq.cache;
  if (cache.committed > seq.num_tokens)
    return broken(Invariant::committed_tokens, seq.seq_id, cache.committed, seq.num_tokens);
  if (!cache.tail_known) return Failure{};
  const int64_t pending = cache.pending();
  const int64_t first = seq.num_tokens - pending;  // position of the first token not offered
  if (cache.head > cache.tail.size() || first < 0 || page_math_.offset(first) != 0)
    return broken(Invariant::pending_tokens, seq.seq_id, seq.num_tokens, pending);
  if (pending >= page_size_ && first + page_size_ <= cache.committed)
    return broken(Invariant::pending_pages, seq.seq_id, cache.committed, page_math_.index(first));
  return Failure{};
}

Failure BlockManager::check_invariants() const {
  const int64_t n = num_pages_;
  const int64_t num_cpu = num_cpu_pages_;
  std::vector<int64_t> refs(static_cast<size_t>(n), 0);
  std::vector<int64_t> cpu_refs(static_cast<size_t>(num_cpu), 0);
  for (const PrefixPin& pin : prefix_pins_)
    for (int32_t page : pin.pages)
      if (page >= 0 && page < n) ++refs[page];
  for (const Sequence& seq : seqs_) {
    if (seq.seq_id < 0) continue;  // unused slot
    const int64_t len = static_cast<int64_t>(seq.pages.size());
    if (seq.num_tokens < 0 || len != page_math_.pages_for(seq.num_tokens))
      return broken(Invariant::pages_cover_tokens, seq.seq_id, seq.num_tokens, len, page_size_);
    const int64_t limit = seq.swapped ? num_cpu : n;
    std::vector<int64_t>& counts = seq.swapped ? cpu_refs : refs;
    for (int32_t page : seq.pages) {
      if (page == kNullPage) continue;
      if (page < 0 || page >= limit) return broken(Invariant::page_in_range, seq.seq_id, page, limit);
      ++counts[page];
    }
    if (seq.cache) {
      Failure f = check_committed(seq);
      if (!f.ok()) return f;
    }
  }
  for (int64_t p = 0; p < n; ++p)
    if (refs[p] != ref_count_[p]) return broken(Invariant::ref_count, p, ref_count_[p], refs[p]);
  for (int64_t p = 0; p < num_cpu; ++p)
    if (cpu_refs[p] != cpu_ref_count_[p])
      return broken(Invariant::cpu_ref_count, p, cpu_ref_count_[p], cpu_refs[p]);
  std::vector<char> on_queue(static_cast<size_t>(n), 0);
  for (int queue = 0; queue < kNumQueues; ++queue) {
    Failure f = check_queue(queue, refs, on_queue);
    if (!f.ok()) return f;
  }
  for (int32_t page : pinned_)
    if (page >= 0 && page < n && on_queue[page]) return broken(Invariant::pinned_page, page, 0);
  int64_t used = 0;
  for (int64_t p = 0; p < n; ++p) used += refs[p] != 0;
  const int64_t pinned = num_pinned_pages();
  if (used + num_free_pages() + pinned != n)
    return broken(Invariant::conservation, num_free_pages() + pinned, used, n);
  int64_t cpu_used = 0;
  for (int64_t p = 0; p < num_cpu; ++p) cpu_used += cpu_refs[p] != 0;
  bool cpu_unique = true;
  std::vector<char> cpu_on_queue(static_cast<size_t>(num_cpu), 0);
  for (int64_t k = 0; k < cpu_free_size_ && cpu_unique; ++k) {
    const int32_t page = cpu_free_[(cpu_free_head_ + k) % num_cpu];
    cpu_unique = page >= 0 && page < num_cpu && !cpu_on_queue[page];
    if (cpu_unique) cpu_on_queue[page] = 1;
  }
  int64_t cpu_pinned = 0;
  for (int32_t page : cpu_pinned_) {
    if (page < 0 || page >= num_cpu) continue;
    cpu_pinned += cpu_refs[page] == 0;
  }
  for (int32_t page : cpu_pinned_)
    if (page >= 0 && page < num_cpu && cpu_on_queue[page]) return broken(Invariant::pinned_page, page, 1);
  // The tier's LRU list (bounded walk): cached, unreferenced, unpinned pages, each once.
  int64_t on_lru = 0;
  for (int32_t cpu = cpu_lru_.head; cpu >= 0 && cpu < num_cpu && on_lru <= num_cpu; cpu = cpu_lru_next_[cpu], ++on_lru) {
    const int64_t what = cpu_on_queue[cpu] ? 0 : cpu_refs[cpu] ? 1 : !prefix_.is_cpu_cached(cpu) ? 2
                         : cpu_pinned_flag_[cpu] ? 3 : -1;
    if (what >= 0) return broken(Invariant::cpu_lru, cpu, what);
    cpu_on_queue[cpu] = 2;
  }
  if (cpu_prefix_cache_) {
    for (int64_t cpu = 0; cpu < num_cpu; ++cpu)
      if ((cpu_on_queue[cpu] == 1 || cpu_refs[cpu]) && prefix_.is_cpu_cached(static_cast<int32_t>(cpu)))
        return broken(Invariant::cpu_lru, cpu, 4);
  }
  const int64_t cpu_free_total = cpu_free_size_ + on_lru + cpu_pinned;
  if (cpu_used + cpu_free_total != num_cpu || !cpu_unique || on_lru != cpu_lru_.size)
    return broken(Invariant::cpu_conservation, cpu_free_total, cpu_used, num_cpu);
  if (enable_prefix_caching_) {
    std::vector<int64_t> seq_refs(static_cast<size_t>(prefix_.num_node_ids()), 0);
    for (const Sequence& seq : seqs_) {
      if (seq.seq_id < 0 || !seq.cache) continue;
      const int32_t node = seq.cache->node;
      if (node >= 0 && node < prefix_.num_node_ids()) ++seq_refs[node];
    }
    Failure f = prefix_.check(seq_refs);
    if (!f.ok()) return f;
  }
  return Failure{};
}

Snapshot BlockManager::snapshot() const {
  Snapshot s;
  // Bounded walks: even a corrupted queue (debug_* hooks) cannot loop forever.
  for (int queue = 0; queue < kNumQueues; ++queue) {
    // NOTE: the evictable queues in eviction order: priority ascending, LRU first.
    std::vector<int32_t>& out = queue == kFree ? s.free : s.evictable;
    int64_t steps = 0;
    for (int32_t page = queues_[queue].head; page >= 0 && page < num_pages_ && steps <= num_pages_;
         page = next_[page], ++steps)
      out.push_back(page);
  }
  s.ref_count = ref_count_;
  for (int64_t k = 0; k < cpu_free_size_; ++k)
    s.cpu_free.push_back(cpu_free_[(cpu_free_head_ + k) % num_cpu_pages_]);
  s.cpu_ref_count = cpu_ref_count_;
  std::vector<std::pair<int64_t, int64_t>> order;  // (seq_id, slot)
  order.reserve(index_.size());
  for (size_t slot = 0; slot < seqs_.size(); ++slot)
    if (seqs_[slot].seq_id >= 0) order.emplace_back(seqs_[slot].seq_id, slot);
  std::sort(order.begin(), order.end());
  s.indptr.push_back(0);
  for (const auto& [seq_id, slot] : order) {
    const Sequence& seq = seqs_[slot];
    s.seq_ids.push_back(seq_id);
    s.num_tokens.push_back(seq.num_tokens);
    s.pages.insert(s.pages.end(), seq.pages.begin(), seq.pages.end());
    s.indptr.push_back(static_cast<int64_t>(s.pages.size()));
    if (seq.swapped) s.swapped.push_back(seq_id);
  }
  if (enable_prefix_caching_) {
    for (int32_t page = 0; page < num_pages_; ++page) {
      const int32_t node = prefix_.node_of(page);
      if (node == PrefixIndex::kNone) continue;
      s.cached_pages.push_back(page);
      s.cached_nodes.push_back(node);
      s.cached_hashes.push_back(prefix_.node_hash(node));
    }
    s.node_indptr.push_back(0);
    for (int32_t node = 0; node < prefix_.num_node_ids(); ++node) {
      if (!prefix_.is_live(node)) continue;
      s.node_ids.push_back(node);
      s.node_hashes.push_back(prefix_.node_hash(node));
      s.node_parents.push_back(prefix_.parent_of(node));
      s.node_deps.push_back(prefix_.node_deps(node));
      prefix_.for_each_page(node, [&](int32_t page) { s.node_pages.push_back(page); });
      s.node_cpu_pages.push_back(prefix_.cpu_page_of(node));
      s.node_indptr.push_back(static_cast<int64_t>(s.node_pages.size()));
    }
  } else {
    s.node_indptr.push_back(0);
  }
  s.pinned = pinned_;
  s.cpu_pinned = cpu_pinned_;
  int64_t steps = 0;
  for (int32_t cpu = cpu_lru_.head; cpu >= 0 && cpu < num_cpu_pages_ && steps <= num_cpu_pages_;
       cpu = cpu_lru_next_[cpu], ++steps)
    s.cpu_lru.push_back(cpu);
  s.demotions = demotions_;
  s.promotions = promotions_;
  s.events = prefix_.events();
  s.prefix_pin_indptr.push_back(0);
  for (const PrefixPin& pin : prefix_pins_) {
    s.prefix_pin_pages.insert(s.prefix_pin_pages.end(), pin.pages.begin(), pin.pages.end());
    s.prefix_pin_indptr.push_back(static_cast<int64_t>(s.prefix_pin_pages.size()));
  }
  s.stats = prefix_cache_stats();
  return s;
}

bool BlockManager::debug_set_ref_count(int64_t page_id, int64_t value) {
  if (page_id < 0 || page_id >= num_pages_ || value < 0 || value > (int64_t{1} << 30))
    return false;
  ref_count_[page_id] = static_cast<int32_t>(value);
  return true;
}

bool BlockManager::debug_set_page(int64_t seq_id, int64_t index, int64_t page_id) {
  const int64_t slot = index_.find(seq_id);
  if (slot < 0) return false;
  const int64_t limit = seqs_[slot].swapped ? num_cpu_pages_ : num_pages_;
  if (page_id < 0 || page_id >= limit) return false;
  std::vector<int32_t>& pages = seqs_[slot].pages;
  if (index < 0 || index >= static_cast<int64_t>(pages.size())) return false;
  pages[index] = static_cast<int32_t>(page_id);
  return true;
}

}  // namespace pagedkv
