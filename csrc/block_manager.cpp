// C++17 core of the pagedkv block manager; see block_manager.h and pagedkv/_reference.py.
#include "block_manager.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>
#include <utility>

namespace pagedkv {
namespace {

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

// Room for new_len pages, growing geometrically (an exact reserve per new page would copy the
// whole table every time a page is added). May throw std::bad_alloc; changes nothing visible.
inline void reserve_pages(std::vector<int32_t>& pages, int64_t new_len) {
  const size_t want = static_cast<size_t>(new_len);
  if (pages.capacity() < want) pages.reserve(std::max(want, 2 * pages.capacity()));
}

// splitmix64's finaliser: sequential seq ids spread over the whole table.
inline uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
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

size_t SeqMap::home(int64_t key) const { return mix(static_cast<uint64_t>(key)) & mask_; }

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
Failure BlockManager::check_config(int64_t num_pages, int64_t page_size,
                                   int64_t watermark_pages) {
  if (!is_count(num_pages)) return invalid(Arg::num_pages, num_pages);
  if (!is_count(page_size)) return invalid(Arg::page_size, page_size);
  if (watermark_pages < 0 || watermark_pages > num_pages)
    return invalid(Arg::watermark_pages, watermark_pages, num_pages);
  return Failure{};
}

BlockManager::BlockManager(int64_t num_pages, int64_t page_size, int64_t watermark_pages)
    : num_pages_(num_pages),
      page_size_(page_size),
      page_math_(page_size),
      watermark_pages_(watermark_pages),
      ref_count_(static_cast<size_t>(num_pages), 0),
      prev_(static_cast<size_t>(num_pages)),
      next_(static_cast<size_t>(num_pages)),
      drop_epoch_(static_cast<size_t>(num_pages), 0),
      drop_count_(static_cast<size_t>(num_pages), 0) {
  // NOTE: a new manager's free queue is 0..N-1, head first, as in the reference.
  const int32_t n = static_cast<int32_t>(num_pages);
  for (int32_t p = 0; p < n; ++p) {
    prev_[p] = p - 1;  // kNullPage (-1) for page 0
    next_[p] = (p + 1 < n) ? p + 1 : kNullPage;
  }
  head_ = 0;
  tail_ = n - 1;
  free_size_ = num_pages;
}

// ------------------------------------------------------------------ free queue
int32_t BlockManager::free_queue_pop_head() {
  const int32_t page = head_;
  const int32_t next = next_[page];
  head_ = next;
  if (next != kNullPage) prev_[next] = kNullPage; else tail_ = kNullPage;
  prev_[page] = next_[page] = kNotQueued;
  --free_size_;
  return page;
}

void BlockManager::free_queue_push_tail(int32_t page) {
  if (on_free_queue(page)) return;  // only reachable after debug_* corruption
  prev_[page] = tail_;
  next_[page] = kNullPage;
  if (tail_ != kNullPage) next_[tail_] = page; else head_ = page;
  tail_ = page;
  ++free_size_;
}

void BlockManager::free_queue_remove(int32_t page) {
  if (!on_free_queue(page)) return;
  const int32_t prev = prev_[page];
  const int32_t next = next_[page];
  if (prev != kNullPage) next_[prev] = next; else head_ = next;
  if (next != kNullPage) prev_[next] = prev; else tail_ = prev;
  prev_[page] = next_[page] = kNotQueued;
  --free_size_;
}

int32_t BlockManager::take_free_page() {
  const int32_t page = free_queue_pop_head();
  ref_count_[page] = 1;
  return page;
}

// --------------------------------------------------------------------- queries
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

bool BlockManager::can_allocate(int64_t num_tokens) const {
  if (num_tokens < 0) return false;
  return page_math_.pages_for(num_tokens) <= free_size_ - watermark_pages_;
}

Failure BlockManager::can_append(int64_t seq_id, int64_t num_tokens, bool& out) {
  const int64_t slot = index_.find(seq_id);
  if (slot < 0) return fail(Status::unknown_sequence, seq_id);
  if (!is_count(num_tokens)) return invalid(Arg::num_tokens, num_tokens);
  out = pages_to_append(seqs_[slot], num_tokens, false) <= free_size_;
  return Failure{};
}

int64_t BlockManager::pages_to_append(Sequence& seq, int64_t num_tokens, bool batch,
                                      bool* copy_on_write) {
  const int64_t current = seq.num_tokens;
  int64_t need =
      page_math_.pages_for(current + num_tokens) - static_cast<int64_t>(seq.pages.size());
  if (page_math_.offset(current) != 0 && !seq.pages.empty()) {
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
  seqs_.emplace_back();
  return static_cast<int64_t>(seqs_.size()) - 1;
}

Failure BlockManager::allocate(int64_t seq_id, int64_t num_tokens) {
  if (seq_id < 0) return invalid(Arg::seq_id, seq_id);
  if (!is_count(num_tokens)) return invalid(Arg::num_tokens, num_tokens);
  if (index_.find(seq_id) >= 0) return fail(Status::sequence_exists, seq_id);
  const int64_t need = page_math_.pages_for(num_tokens);
  const int64_t available = free_size_ - watermark_pages_;
  if (need > available)
    return fail(Status::out_of_pages, need, std::max<int64_t>(available, 0), num_pages_);

  std::vector<int32_t> pages;
  pages.reserve(static_cast<size_t>(need));
  index_.reserve_one_more();
  const int64_t slot = acquire_slot();
  // Nothing below allocates.
  for (int64_t i = 0; i < need; ++i) pages.push_back(take_free_page());
  Sequence& seq = seqs_[slot];
  seq.seq_id = seq_id;
  seq.num_tokens = num_tokens;
  seq.mark = 0;
  seq.pages.swap(pages);
  index_.insert(seq_id, slot);
  return Failure{};
}

void BlockManager::grow(Sequence& seq, int64_t num_tokens, int64_t new_len,
                        std::vector<int32_t>& copies) {
  const int64_t current = seq.num_tokens;
  if (page_math_.offset(current) != 0 && !seq.pages.empty() &&
      ref_count_[seq.pages.back()] > 1) {
    // NOTE: copy-on-write. The shared, partly filled last page is never written: the new
    // tokens go to a fresh copy, taken before any new page, and the cache must copy
    // src -> dst before writing.
    const int32_t src = seq.pages.back();
    const int32_t dst = take_free_page();
    --ref_count_[src];
    seq.pages.back() = dst;
    copies.push_back(src);
    copies.push_back(dst);
  }
  while (static_cast<int64_t>(seq.pages.size()) < new_len) seq.pages.push_back(take_free_page());
  seq.num_tokens = current + num_tokens;
}

Failure BlockManager::append(int64_t seq_id, int64_t num_tokens, std::vector<int32_t>& copies) {
  const int64_t slot = index_.find(seq_id);
  if (slot < 0) return fail(Status::unknown_sequence, seq_id);
  if (!is_count(num_tokens)) return invalid(Arg::num_tokens, num_tokens);
  Sequence& seq = seqs_[slot];
  const int64_t need = pages_to_append(seq, num_tokens, false);
  if (need > free_size_) return fail(Status::out_of_pages, need, free_size_, num_pages_);
  const int64_t new_len = page_math_.pages_for(seq.num_tokens + num_tokens);
  copies.clear();
  copies.reserve(2);
  reserve_pages(seq.pages, new_len);
  grow(seq, num_tokens, new_len, copies);
  return Failure{};
}

Failure BlockManager::append_batch(const int64_t* seq_ids, size_t num_seq_ids,
                                   const int64_t* num_tokens, size_t num_counts,
                                   StepPlan& out) {
  if (num_counts != num_seq_ids)
    return invalid(Arg::num_tokens_size, static_cast<int64_t>(num_counts),
                   static_cast<int64_t>(num_seq_ids));
  batch_slots_.resize(num_seq_ids);
  batch_lens_.resize(num_seq_ids);
  ++epoch_;  // new marks for duplicate detection and copy-on-write accounting
  int64_t need = 0;
  int64_t total_tokens = 0;
  size_t num_copies = 0;
  for (size_t i = 0; i < num_seq_ids; ++i) {
    const int64_t seq_id = seq_ids[i];
    const int64_t n = num_tokens[i];
    if (!is_count(n)) return invalid(Arg::num_tokens, n);
    // NOTE: in list order, the first duplicate or unknown id wins (as in the reference, where
    // the duplicate check precedes the lookup); OutOfPages is reported only after every id.
    const int64_t slot = index_.find(seq_id);
    if (slot < 0) return fail(Status::unknown_sequence, seq_id);
    Sequence& seq = seqs_[slot];
    if (seq.mark == epoch_) return fail(Status::duplicate_sequence, seq_id);
    seq.mark = epoch_;
    bool copy_on_write = false;
    const int64_t pages = pages_to_append(seq, n, true, &copy_on_write);
    const int64_t new_len = page_math_.pages_for(seq.num_tokens + n);
    // Room in the page table now, so that no allocation follows the first change. Only when
    // this sequence alone fits the free queue: a bigger need fails with OutOfPages below, and
    // bounding the reservation by num_pages keeps a huge request from throwing bad_alloc.
    if (pages <= free_size_) reserve_pages(seq.pages, new_len);
    batch_slots_[i] = slot;
    batch_lens_[i] = new_len;
    num_copies += copy_on_write;
    need += pages;
    total_tokens += n;
  }
  if (need > free_size_) return fail(Status::out_of_pages, need, free_size_, num_pages_);

  out.slot_mapping.resize(static_cast<size_t>(total_tokens));
  out.copies.clear();
  out.copies.reserve(2 * num_copies);
  int64_t* slot_out = out.slot_mapping.data();
  for (size_t i = 0; i < num_seq_ids; ++i) {
    Sequence& seq = seqs_[batch_slots_[i]];
    const int64_t start = seq.num_tokens;
    grow(seq, num_tokens[i], batch_lens_[i], out.copies);
    write_slots(seq.pages, page_math_, start, seq.num_tokens, slot_out);
    slot_out += num_tokens[i];
  }
  return Failure{};
}

Failure BlockManager::fork(int64_t parent_id, int64_t child_id) {
  const int64_t parent_slot = index_.find(parent_id);
  if (parent_slot < 0) return fail(Status::unknown_sequence, parent_id);
  if (child_id < 0) return invalid(Arg::child_id, child_id);
  if (index_.find(child_id) >= 0) return fail(Status::sequence_exists, child_id);

  std::vector<int32_t> pages(seqs_[parent_slot].pages);
  const int64_t num_tokens = seqs_[parent_slot].num_tokens;
  index_.reserve_one_more();
  const int64_t slot = acquire_slot();  // may move seqs_: parent is read above
  // NOTE: ref counts are int32; overflowing one takes 2**31 live sequences (> 100 GiB).
  for (int32_t page : pages) ++ref_count_[page];
  Sequence& child = seqs_[slot];
  child.seq_id = child_id;
  child.num_tokens = num_tokens;
  child.mark = 0;
  child.pages.swap(pages);
  index_.insert(child_id, slot);
  return Failure{};
}

Failure BlockManager::free(int64_t seq_id) {
  const int64_t slot = index_.find(seq_id);
  if (slot < 0) return fail(Status::unknown_sequence, seq_id);
  Sequence& seq = seqs_[slot];
  // NOTE: a sequence's pages are released last page first, so that when they are reused in
  // queue order the tail of a freed sequence goes before its head (see the reference).
  for (auto it = seq.pages.rbegin(); it != seq.pages.rend(); ++it) {
    const int32_t page = *it;
    if (--ref_count_[page] == 0) free_queue_push_tail(page);
  }
  std::vector<int32_t>().swap(seq.pages);
  seq.seq_id = -1;
  seq.num_tokens = 0;
  index_.erase(seq_id);
  free_slots_.push_back(slot);  // capacity reserved in acquire_slot
  return Failure{};
}

// ----------------------------------------------------------------- batch views
Failure BlockManager::slots(int64_t seq_id, int64_t start, int64_t stop,
                            std::vector<int64_t>& out) const {
  const int64_t slot = index_.find(seq_id);
  if (slot < 0) return fail(Status::unknown_sequence, seq_id);
  const Sequence& seq = seqs_[slot];
  if (stop > seq.num_tokens) return invalid(Arg::stop, stop, seq_id, seq.num_tokens);
  if (start > stop) return invalid(Arg::start, start, stop);
  if (start < 0) return invalid(Arg::start_range, start);
  out.resize(static_cast<size_t>(stop - start));
  write_slots(seq.pages, page_math_, start, stop, out.data());
  return Failure{};
}

Failure BlockManager::lookup_batch(const int64_t* seq_ids, size_t n) {
  batch_slots_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t slot = index_.find(seq_ids[i]);
    if (slot < 0) return fail(Status::unknown_sequence, seq_ids[i]);
    batch_slots_[i] = slot;
  }
  return Failure{};
}

Failure BlockManager::page_tables(const int64_t* seq_ids, size_t n, int64_t max_pages,
                                  bool has_max_pages, PageTables& out) {
  Failure f = lookup_batch(seq_ids, n);
  if (!f.ok()) return f;
  int64_t width = 0;
  for (size_t i = 0; i < n; ++i)
    width = std::max<int64_t>(width, static_cast<int64_t>(seqs_[batch_slots_[i]].pages.size()));
  if (has_max_pages) {
    if (max_pages < 0) return invalid(Arg::max_pages_range, max_pages);
    if (max_pages < width) return invalid(Arg::max_pages, max_pages, width);
    width = max_pages;
  }
  for (size_t i = 0; i < n; ++i) {
    const int64_t tokens = seqs_[batch_slots_[i]].num_tokens;
    if (tokens > std::numeric_limits<int32_t>::max()) return fail(Status::int32_overflow, tokens);
  }
  if (width > 0 && n > std::numeric_limits<size_t>::max() / 4 / static_cast<size_t>(width))
    throw std::bad_alloc();
  out.width = width;
  out.page_table.resize(n * static_cast<size_t>(width));
  out.seq_lens.resize(n);
  int32_t* row = out.page_table.data();
  for (size_t i = 0; i < n; ++i, row += width) {
    const Sequence& seq = seqs_[batch_slots_[i]];
    const size_t len = seq.pages.size();
    if (len) std::memcpy(row, seq.pages.data(), len * sizeof(int32_t));
    std::fill(row + len, row + width, kNullPage);
    out.seq_lens[i] = static_cast<int32_t>(seq.num_tokens);
  }
  return Failure{};
}

Failure BlockManager::csr(const int64_t* seq_ids, size_t n, CSR& out) {
  Failure f = lookup_batch(seq_ids, n);
  if (!f.ok()) return f;
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) total += seqs_[batch_slots_[i]].pages.size();
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
    const size_t len = seq.pages.size();
    if (len) std::memcpy(dst, seq.pages.data(), len * sizeof(int32_t));
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
Failure BlockManager::check_invariants() const {
  const int64_t n = num_pages_;
  std::vector<int64_t> refs(static_cast<size_t>(n), 0);
  for (const Sequence& seq : seqs_) {
    if (seq.seq_id < 0) continue;  // unused slot
    const int64_t len = static_cast<int64_t>(seq.pages.size());
    if (seq.num_tokens < 0 || len != page_math_.pages_for(seq.num_tokens))
      return broken(Invariant::pages_cover_tokens, seq.seq_id, seq.num_tokens, len, page_size_);
    for (int32_t page : seq.pages) {
      if (page < 0 || page >= n) return broken(Invariant::page_in_range, seq.seq_id, page, n);
      ++refs[page];
    }
  }
  for (int64_t p = 0; p < n; ++p)
    if (refs[p] != ref_count_[p]) return broken(Invariant::ref_count, p, ref_count_[p], refs[p]);
  std::vector<char> on_free(static_cast<size_t>(n), 0);
  int64_t walked = 0;
  int32_t prev = kNullPage;
  for (int32_t page = head_; page != kNullPage; prev = page, page = next_[page]) {
    if (page < 0 || page >= n || on_free[page]) return broken(Invariant::free_list_unique, page);
    if (prev_[page] != prev) return broken(Invariant::free_list_links, page);
    on_free[page] = 1;
    ++walked;
    if (refs[page]) return broken(Invariant::free_page_unreferenced, page, refs[page]);
  }
  if (prev != tail_) return broken(Invariant::free_list_links, tail_);
  if (walked != free_size_) return broken(Invariant::free_list_size, walked, free_size_);
  int64_t used = 0;
  for (int64_t p = 0; p < n; ++p) used += refs[p] != 0;
  if (used + free_size_ != n) return broken(Invariant::conservation, free_size_, used, n);
  return Failure{};
}

Snapshot BlockManager::snapshot() const {
  Snapshot s;
  s.free.reserve(static_cast<size_t>(free_size_));
  // Bounded walk: even a corrupted queue (debug_* hooks) cannot loop forever.
  int64_t steps = 0;
  for (int32_t page = head_; page >= 0 && page < num_pages_ && steps <= num_pages_;
       page = next_[page], ++steps)
    s.free.push_back(page);
  s.ref_count = ref_count_;
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
  }
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
  if (slot < 0 || page_id < 0 || page_id >= num_pages_) return false;
  std::vector<int32_t>& pages = seqs_[slot].pages;
  if (index < 0 || index >= static_cast<int64_t>(pages.size())) return false;
  pages[index] = static_cast<int32_t>(page_id);
  return true;
}

}  // namespace pagedkv
