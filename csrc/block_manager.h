// C++17 core of the pagedkv block manager: free queues, ref counts, fork, copy-on-write, the
// batched decode path, prefix caching (hash index, LRU evictable queue), the CPU offload tier
// and sliding-window release.
//
// The executable specification is pagedkv/_reference.py; every method here mirrors the method
// of the same name there (snake_case, same order of checks, same page ids). This file and
// block_manager.cpp use the C++ standard library only: no Python.h, no torch. Expected failures
// (out of pages, unknown sequence, ...) come back as a `Failure` value with the fields the Python
// error needs; the messages are written in pagedkv/errors.py only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "page_hash.h"

namespace pagedkv {

// Page id of padded page-table entries and of entries released by a sliding window
// (NULL_PAGE in Python).
constexpr int32_t kNullPage = -1;
// Largest count of pages, tokens per page or tokens per call (MAX_COUNT in Python).
constexpr int64_t kMaxCount = 2147483647;
// Largest token id accepted for prefix caching (MAX_TOKEN_ID in Python): ids fit an int32.
constexpr int64_t kMaxTokenId = 2147483647;

enum class Status : int32_t {
  ok = 0,
  out_of_pages = 1,        // values: requested, free, total, pool (0 = gpu, 1 = cpu)
  unknown_sequence = 2,    // values: seq_id
  sequence_exists = 3,     // values: seq_id
  duplicate_sequence = 4,  // values: seq_id (argument: seq_ids)
  invalid_argument = 5,    // argument names which one; values depend on it (see Arg)
  int32_overflow = 6,      // values: seq_id, its num_tokens (beyond an int32 seq_lens)
  invariant_violation = 7, // invariant names which one; values depend on it (see Invariant)
  sequence_swapped = 8,    // values: seq_id, on_cpu (1 when swapped out, 0 when on the GPU)
};

// Which argument an invalid_argument failure is about.
enum class Arg : int32_t {
  none = 0,
  num_pages = 1,        // values: value
  page_size = 2,        // values: value
  watermark_pages = 3,  // values: value, num_pages
  seq_id = 4,           // values: value (negative ids cannot be created)
  num_tokens = 5,       // values: value (out of [1, kMaxCount])
  num_tokens_size = 6,  // values: len(num_tokens), len(seq_ids)
  page_id = 7,          // values: value, num_pages
  start = 8,            // values: start, stop            (start > stop)
  start_range = 9,      // values: start                  (start < 0)
  stop = 10,            // values: stop, seq_id, num_tokens(seq_id)
  max_pages = 11,       // values: max_pages, longest page table
  max_pages_range = 12, // values: max_pages              (negative)
  child_id = 13,        // values: value (negative)
  num_cpu_pages = 14,   // values: value
  hash_bits = 15,       // values: value
  num_tokens_len = 16,  // values: num_tokens, len(token_ids)       (allocate)
  token_ids = 17,       // values: min or max token id out of [0, kMaxTokenId]
  token_ids_len = 18,   // values: len(token_ids), num_tokens        (append)
  token_ids_sum = 19,   // values: len(token_ids), sum(num_tokens)   (append_batch)
  window = 20,          // values: value (out of [1, kMaxCount])
  start_released = 21,  // values: start (its page was released by a sliding window)
  num_computed_tokens = 22,        // values: value, num_tokens (allocate: out of [0, num_tokens])
  num_computed_tokens_range = 23,  // values: value (commit: negative)
  num_computed_tokens_stop = 24,   // values: value, seq_id, num_tokens(seq_id) (commit: above it)
  pinned_prefix = 25,   // values: len(token_ids) (unpin_prefix: no such pin)
  priority = 26,        // values: value (out of [0, 100])
  cpu_prefix_cache = 27,  // values: 1 (True without prefix caching or CPU pages)
  row_taken = 28,       // values: row, seq_id holding it            (set_row)
  row_pages = 29,       // values: seq_id, its pages, table width    (set_row: too wide)
  row_width = 30,       // values: num_tokens, seq_id, table width   (append: past the row)
  row = 31,             // values: row, rows                          (set_row: out of range)
  seq_ids = 32,         // values: the smallest id, when negative     (append_batch)
  release_before = 33,  // values: value, num_tokens (allocate: out of [0, num_tokens - 1])
  max_cached_tokens = 34,  // values: value (allocate: negative)
};

// Which invariant check_invariants found broken: the detail keys of
// pagedkv.errors.INVARIANT_DETAILS (names as in the Python reference).
enum class Invariant : int32_t {
  none = 0,
  pages_cover_tokens = 1,      // values: seq_id, num_tokens, len(page table), page_size
  page_in_range = 2,           // values: seq_id, page, num_pages or num_cpu_pages
  ref_count = 3,               // values: page, stored ref_count, page-table entries
  free_list_unique = 4,        // values: page
  free_page_unreferenced = 5,  // values: page, page-table entries
  conservation = 6,            // values: free pages, referenced pages, num_pages
  // C++ only (the reference's deque cannot break these):
  free_list_links = 7,         // values: page whose prev link does not point back
  free_list_size = 8,          // values: pages walked on a queue, stored queue size
  cpu_ref_count = 9,           // values: cpu page, stored cpu ref count, page-table entries
  free_queue_cached = 10,      // values: page, on the evictable queue (0/1), has hash, hash
  cpu_conservation = 11,       // values: free cpu pages, referenced cpu pages, num_cpu_pages
  hash_index = 12,             // values: node's hash, node (not on its hash chain)
  hash_index_size = 13,        // values: cached pages, pages on the nodes' page lists
  committed_tokens = 14,       // values: seq_id, committed tokens, num_tokens
  pending_tokens = 15,         // values: seq_id, num_tokens, pending token ids
  pending_pages = 16,          // values: seq_id, committed tokens, page index never offered
  node_pages = 17,             // values: page, the node it is cached under, the list's node
  node_dependents = 18,        // values: node, stored dependents, child nodes + sequences
  pinned_page = 19,            // values: page, pool (0: GPU free queues, 1: CPU free queue)
  cpu_cache = 20,              // values: node, its cpu page, the node that page holds
  cpu_lru = 21,                // values: cpu page, what it is (see pagedkv/_cpp.py)
};

// An expected failure, returned by value. `status == Status::ok` means success.
struct Failure {
  Status status = Status::ok;
  Arg argument = Arg::none;
  Invariant invariant = Invariant::none;
  int64_t values[4] = {0, 0, 0, 0};

  bool ok() const { return status == Status::ok; }
};

// An output array that the bindings hand to numpy without copying. Unlike std::vector it does
// not zero-fill on resize: every element is written once, by the batch call that fills it.
template <typename T>
class Buffer {
 public:
  // May throw std::bad_alloc; elements are uninitialised. Never null (numpy's owner needs a
  // pointer), so an empty buffer still holds one element.
  void resize(size_t n) {
    data_.reset(new T[n ? n : 1]);
    size_ = n;
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  size_t size() const { return size_; }
  T& operator[](size_t i) { return data_[i]; }
  T* release() {  // caller owns the array (delete[])
    size_ = 0;
    return data_.release();
  }

 private:
  std::unique_ptr<T[]> data_;
  size_t size_ = 0;
};

// Output of append_batch.
struct StepPlan {
  Buffer<int64_t> slot_mapping;  // [sum(num_tokens)]
  std::vector<int32_t> copies;   // [num_copies * 2], (src_page, dst_page) pairs
};

struct PageTables {
  Buffer<int32_t> page_table;  // [batch_size * width], row-major, padded with kNullPage
  Buffer<int32_t> seq_lens;    // [batch_size]
  Buffer<int32_t> first_page;  // [batch_size] with live_only: the page index of each row's first entry
  int64_t width = 0;
};

struct CSR {
  Buffer<int32_t> indptr;         // [batch_size + 1]
  Buffer<int32_t> indices;        // [indptr[-1]]
  Buffer<int32_t> last_page_len;  // [batch_size]
};

// Prefix-cache counters (ReferenceBlockManager._stats) and current sizes.
struct PrefixCacheStats {
  int64_t queries = 0;      // allocations that gave token ids (with prefix caching on)
  int64_t hits = 0;         // those that found at least one cached token
  int64_t query_tokens = 0;
  int64_t hit_tokens = 0;
  int64_t num_cached_pages = 0;     // hash index entries
  int64_t num_evictable_pages = 0;  // cached pages on the evictable queue
  int64_t num_pinned_prefix_pages = 0;  // distinct pages held by pin_prefix
  int64_t cpu_hit_tokens = 0;  // of hit_tokens, those promoted from the CPU tier
  int64_t demotions = 0;       // pages moved GPU -> CPU by the CPU tier
  int64_t promotions = 0;      // pages moved CPU -> GPU by the CPU tier
  int64_t num_cpu_cached_pages = 0;
};

// Complete observable state (ReferenceBlockManager.snapshot), sequences sorted by id.
struct Snapshot {
  std::vector<int32_t> free;           // free queue (uncached pages), head first
  std::vector<int32_t> evictable;      // evictable queue (cached pages), LRU first
  std::vector<int32_t> ref_count;      // [num_pages]
  std::vector<int32_t> cpu_free;       // CPU free queue, head first
  std::vector<int32_t> cpu_ref_count;  // [num_cpu_pages]
  std::vector<int64_t> seq_ids;        // ascending
  std::vector<int64_t> num_tokens;     // per seq_ids
  std::vector<int64_t> indptr;         // [num_sequences + 1] into pages
  std::vector<int32_t> pages;          // concatenated page tables
  std::vector<int64_t> swapped;        // ids of swapped-out sequences, ascending
  std::vector<int32_t> pinned;         // GPU pages pinned for this step's copies, pin order
  std::vector<int32_t> cpu_pinned;     // CPU pages pinned for this step's copies, pin order
  std::vector<int32_t> cpu_lru;        // cached CPU pages of the prefix cache's tier, LRU first
  std::vector<int32_t> demotions;      // pending (gpu, cpu) pairs, flattened
  std::vector<int32_t> promotions;     // pending (cpu, gpu) pairs, flattened
  std::vector<int64_t> prefix_pin_indptr;  // [num_pins + 1] into prefix_pin_pages
  std::vector<int32_t> prefix_pin_pages;   // pages of each pin_prefix, in pin order
  // Prefix index: every cached page (ascending) with its node and the node's hash ...
  std::vector<int32_t> cached_pages;
  std::vector<int32_t> cached_nodes;
  std::vector<uint64_t> cached_hashes;
  // ... and every live node (ascending id): hash, parent, dependents, pages in list order.
  std::vector<int32_t> node_ids;
  std::vector<uint64_t> node_hashes;
  std::vector<int32_t> node_parents;
  std::vector<int32_t> node_deps;
  std::vector<int64_t> node_indptr;    // [num_nodes + 1] into node_pages
  std::vector<int32_t> node_pages;
  std::vector<int32_t> node_cpu_pages;  // per node: its CPU page (kNullPage: none)
  std::vector<int64_t> events;          // pending KV-event records (flat)
  PrefixCacheStats stats;
};

// Token ids handed in from Python (int64, bounds-checked by the core before use); a null
// `data` means "not given" (None).
struct TokenIds {
  const int64_t* data = nullptr;
  size_t size = 0;
  bool given() const { return data != nullptr; }
};

// Token position -> (page index, offset) arithmetic; shifts and masks when page_size is a power
// of two (64-bit division costs tens of cycles on the decode path).
struct PageMath {
  int64_t size = 1;
  int shift = 0;  // log2(size) when size is a power of two, else -1

  explicit PageMath(int64_t page_size);
  int64_t index(int64_t pos) const { return shift >= 0 ? pos >> shift : pos / size; }
  int64_t offset(int64_t pos) const { return shift >= 0 ? pos & (size - 1) : pos % size; }
  // ceil(num_tokens / size) for num_tokens >= 0.
  int64_t pages_for(int64_t num_tokens) const {
    return index(num_tokens) + (offset(num_tokens) != 0);
  }
};

// Open-addressing hash map from seq_id (int64 >= 0) to a slot index; linear probing with
// backward-shift deletion, so there are no tombstones and lookups stay short under churn.
class SeqMap {
 public:
  SeqMap();
  int64_t find(int64_t key) const;  // slot, or -1 when absent (or key < 0)
  void reserve_one_more();          // may throw std::bad_alloc; call before insert
  void insert(int64_t key, int64_t value);  // key >= 0, absent, after reserve_one_more
  void erase(int64_t key);                  // key present
  size_t size() const { return size_; }

 private:
  void rehash(size_t capacity);
  size_t home(int64_t key) const;
  struct Entry {
    int64_t key;  // -1 = empty
    int64_t value;
  };
  std::vector<Entry> entries_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

// Open-addressing hash map from a page hash (any uint64) to the page that carries it; linear
// probing with backward-shift deletion, no tombstones. Keys are mixed again for the home slot,
// so truncated hashes (hash_bits < 64) still spread.
class HashIndex {
 public:
  HashIndex();
  int32_t find(uint64_t key) const {  // page, or kNullPage when absent
    for (size_t i = home(key);; i = (i + 1) & mask_) {
      const Entry& e = entries_[i];
      if (e.page == kNullPage) return kNullPage;
      if (e.key == key) return e.page;
    }
  }
  void reserve(size_t n);            // room for n entries in all; may throw std::bad_alloc
  void insert(uint64_t key, int32_t page);  // key absent, page >= 0, after reserve
  void erase(uint64_t key);                 // no-op when absent
  void clear();                             // keeps capacity
  size_t size() const { return size_; }
  template <typename F>
  void for_each(F&& f) const {  // f(hash, page) in table order
    for (const Entry& e : entries_)
      if (e.page != kNullPage) f(e.key, e.page);
  }

 private:
  void rehash(size_t capacity);
  size_t home(uint64_t key) const { return mix64(key) & mask_; }
  struct Entry {
    uint64_t key;
    int32_t page;  // kNullPage = empty
  };
  std::vector<Entry> entries_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

// The prefix index (prefix_index.cpp): cached pages found by their content prefix, the twin of
// pagedkv/_prefix_index.py with the same node ids, list orders and results.
//
// A node stands for one content prefix: one full page of token ids, the salt, and the node of the
// prefix before it (kRoot for a first page). The hash index maps the chained page hash of that
// content to a chain of nodes (collisions share a chain); a lookup confirms a node by its tokens,
// salt and parent node, and node ids are unique among live nodes, so a collision is a miss.
// Every physical page holding a node's content is on the node's page list, so duplicates are
// all findable, and a page stays findable until it is detached (evicted), whatever happens to
// the pages before it. A node lives while it has pages or dependents (child nodes, and sequences
// that chain after it); a node with dependents and no page is a ghost that keeps the chain.
class PrefixIndex {
 public:
  static constexpr int32_t kRoot = -1;
  static constexpr int32_t kNone = -1;

  PrefixIndex() = default;
  // May throw std::bad_alloc.
  PrefixIndex(int64_t num_pages, int64_t page_size, int64_t num_cpu_pages = 0);

  // The node of `block` (page_size ids) after `parent` under `salt`, whose hash is h; kNone.
  int32_t find(uint64_t h, int32_t parent, uint64_t salt, const int64_t* block) const;
  // A page of node's: referenced and, when pin_flags is given (a copy source), not a copy
  // destination of this step (flags & 2); else any page not such a destination; else the
  // first; kNone for a ghost.
  // With fresh (per page: the first offset written in this step, page_size when none), only
  // pages whose offset is at least min_offset are considered (kNone if there is none).
  int32_t pick_page(int32_t node, const std::vector<int32_t>& ref_count,
                    const std::vector<uint8_t>* pin_flags = nullptr,
                    const std::vector<int32_t>* fresh = nullptr, int32_t min_offset = 0) const;
  int32_t node_of(int32_t page) const { return page_node_[page]; }
  bool is_cached(int32_t page) const { return page_node_[page] != kNone; }
  uint64_t hash_of(int32_t node) const { return node == kRoot ? 0 : nodes_[node].hash; }
  int32_t parent_of(int32_t node) const { return nodes_[node].parent; }
  int64_t num_cached_pages() const { return num_cached_pages_; }
  // The CPU tier: a node holds at most one CPU page with its content (a page for its life).
  int32_t cpu_page_of(int32_t node) const { return nodes_[node].cpu_page; }
  bool is_cpu_cached(int32_t cpu) const { return cpu_node_[cpu] != kNone; }
  int64_t num_cpu_cached_pages() const { return num_cpu_cached_pages_; }
  void attach_cpu(int32_t cpu, int32_t node);  // node has no CPU page; cpu is uncached
  void detach_cpu(int32_t cpu);                // may delete the node (then its ancestors)

  // KV-event records (pagedkv/_prefix_index.py: NODE, DROP, STORED, REMOVED, CLEARED), flat:
  // kind, then medium, node, parent, hash, parent hash, page_size tokens (STORED); medium,
  // node, hash (REMOVED); nothing (CLEARED); with nodes, also node, parent, salt, hash,
  // page_size tokens (NODE) and node (DROP). Recorded only after record_events(true).
  static constexpr int64_t kEventNode = 0, kEventDrop = 1, kEventStored = 2, kEventRemoved = 3,
                           kEventCleared = 4;
  void record_events(bool on, bool nodes = false) {
    record_ = on;
    record_nodes_ = on && nodes;
  }
  bool recording() const { return record_; }
  // Room for the records of a call making n nodes and storing or removing up to `pages` pages.
  // May throw std::bad_alloc.
  void reserve_events(int64_t n, int64_t pages);
  void take_events(std::vector<int64_t>& out) { out.clear(); out.swap(events_); }
  const std::vector<int64_t>& events() const { return events_; }

  // Room for n more nodes (ids, token storage, hash-index entries). May throw std::bad_alloc;
  // call it before the first change, so that child() never allocates.
  void reserve(int64_t n);
  // find(), or a new node for that content (the parent gains a dependent). Needs reserve().
  int32_t child(uint64_t h, int32_t parent, uint64_t salt, const int64_t* block);
  void attach(int32_t page, int32_t node);  // an uncached page, at the head of node's list
  void detach(int32_t page);                // a cached page loses its content
  void acquire(int32_t node);               // a sequence chains after node (kRoot: no-op)
  void release(int32_t node);
  void clear_pages();  // detach every page, GPU then CPU, in page order (reset_prefix_cache)

  // Inspection (check_invariants, snapshot). seq_refs[node]: sequences that acquired node.
  Failure check(const std::vector<int64_t>& seq_refs) const;
  int32_t num_node_ids() const { return static_cast<int32_t>(nodes_.size()); }
  bool is_live(int32_t node) const { return nodes_[node].live; }
  uint64_t node_hash(int32_t node) const { return nodes_[node].hash; }
  int32_t node_deps(int32_t node) const { return nodes_[node].deps; }
  template <typename F>
  void for_each_page(int32_t node, F&& f) const {  // f(page), list order; bounded walk
    int64_t steps = 0;
    for (int32_t p = nodes_[node].first_page; p >= 0 && steps <= num_pages_; p = page_next_[p], ++steps)
      f(p);
  }

 private:
  struct Node {
    uint64_t hash = 0;
    uint64_t salt = 0;
    int32_t parent = kRoot;
    int32_t deps = 0;
    int32_t first_page = kNone;
    int32_t cpu_page = kNone;
    int32_t next_same_hash = kNone;
    bool live = false;
  };
  void collect(int32_t node);  // delete node, then its ancestors, while pageless and unneeded

  int64_t num_pages_ = 0;
  int64_t page_size_ = 1;
  std::vector<Node> nodes_;
  std::vector<int64_t> tokens_;       // page_size ids per node id
  std::vector<int32_t> free_nodes_;   // a stack; capacity kept >= nodes_.size()
  HashIndex chains_;                  // hash -> first node of its chain (newest first)
  std::vector<int32_t> page_node_;    // per page: its node, or kNone
  std::vector<int32_t> page_next_;    // per page: neighbours on its node's list
  std::vector<int32_t> page_prev_;
  int64_t num_cached_pages_ = 0;
  std::vector<int32_t> cpu_node_;     // per CPU page: the node whose content it holds, or kNone
  int64_t num_cpu_cached_pages_ = 0;
  bool record_ = false;
  bool record_nodes_ = false;
  bool quiet_ = false;                // clear_pages: no REMOVED records
  std::vector<int64_t> events_;
  void record_stored(int64_t medium, int32_t node);  // within reserve_events()
  void record_removed(int64_t medium, int32_t node) {
    events_.push_back(kEventRemoved);
    events_.push_back(medium);
    events_.push_back(node);
    events_.push_back(static_cast<int64_t>(nodes_[node].hash));
  }
};


class BlockManager {
 public:
  // Returns the failure a constructor call with these arguments would be (ok if valid):
  // 1 <= num_pages, page_size <= kMaxCount, 0 <= watermark_pages <= num_pages,
  // 0 <= num_cpu_pages <= kMaxCount and 1 <= hash_bits <= 64.
  // cpu_prefix_cache needs enable_prefix_caching and num_cpu_pages >= 1.
  static Failure check_config(int64_t num_pages, int64_t page_size, int64_t watermark_pages,
                              int64_t num_cpu_pages = 0, int64_t hash_bits = 64,
                              bool enable_prefix_caching = false, bool cpu_prefix_cache = false);
  // Precondition: check_config(...).ok(). May throw std::bad_alloc (the pool's arrays).
  BlockManager(int64_t num_pages, int64_t page_size, int64_t watermark_pages,
               bool enable_prefix_caching = false, int64_t num_cpu_pages = 0,
               int64_t hash_bits = 64, bool cpu_prefix_cache = false,
               bool enable_kv_events = false, bool kv_event_nodes = false);
  // Not copyable: a copy would duplicate the ownership of every page.
  BlockManager(const BlockManager&) = delete;
  BlockManager& operator=(const BlockManager&) = delete;

  // ------------------------------------------------------------------ queries
  int64_t num_pages() const { return num_pages_; }
  int64_t page_size() const { return page_size_; }
  int64_t watermark_pages() const { return watermark_pages_; }
  bool enable_prefix_caching() const { return enable_prefix_caching_; }
  int64_t num_cpu_pages() const { return num_cpu_pages_; }
  bool cpu_prefix_cache() const { return cpu_prefix_cache_; }
  bool enable_kv_events() const { return prefix_.recording(); }
  // The KV-event records since the last call (PrefixIndex's flat layout); forgets them.
  void take_events(std::vector<int64_t>& out) { prefix_.take_events(out); }
  // Both free queues: uncached and cached (evictable) pages.
  int64_t num_free_pages() const { return queues_[kFree].size + evictable_size_; }
  // The CPU free queue and the tier's cached CPU pages (a swap-out may take either).
  int64_t num_free_cpu_pages() const { return cpu_free_size_ + cpu_lru_.size; }
  // GPU pages only a pending copy of this step holds (pinned, with ref_count 0).
  int64_t num_pinned_pages() const;
  int64_t num_sequences() const { return static_cast<int64_t>(index_.size()); }
  bool has_sequence(int64_t seq_id) const { return index_.find(seq_id) >= 0; }
  Failure is_swapped(int64_t seq_id, bool& out) const;
  // Works for swapped-out sequences too (their entries are CPU page ids).
  Failure page_table(int64_t seq_id, std::vector<int32_t>& out) const;
  Failure num_tokens(int64_t seq_id, int64_t& out) const;
  Failure ref_count(int64_t page_id, int64_t& out) const;
  PrefixCacheStats prefix_cache_stats() const;
  // Counts prefix-cache hits like allocate (with prefix caching on and token ids given).
  // max_cached_tokens (-1: no cap) and release_before: as allocate.
  Failure can_allocate(int64_t num_tokens, TokenIds token_ids, uint64_t salt, bool& out,
                       int64_t max_cached_tokens = -1, int64_t release_before = 0);
  // Pages allocate(new id, ...) with these arguments would take from the free queues now.
  Failure pages_needed(int64_t num_tokens, TokenIds token_ids, uint64_t salt, int64_t& out,
                       int64_t max_cached_tokens = -1, int64_t release_before = 0);
  // Per full page of token_ids along the longest chain of content nodes found: 2 when a page
  // holding it can be hit (GPU, or the CPU tier when it is on), 1 for a ghost node. Appends
  // to out. May throw std::bad_alloc.
  Failure prefix_match(TokenIds token_ids, uint64_t salt, std::vector<int8_t>& out) const;
  Failure can_append(int64_t seq_id, int64_t num_tokens, bool& out);

  // ----------------------------------------------------------------- mutators
  // Every mutator checks everything, then reserves all memory it needs, then changes state:
  // a failure (or std::bad_alloc) leaves the manager exactly as it was.

  // num_computed_tokens in [0, num_tokens]: with prefix caching and token ids, only the full
  // pages wholly inside max(num_computed_tokens, num_cached) tokens are indexed now (the rest
  // at commit or an append). num_cached: prompt tokens found in the prefix cache; copies:
  // (src, dst) pairs.
  // priority in [0, 100]: the retention priority of the pages it holds (lower evicted first).
  // max_cached_tokens >= 0 caps the hit (-1: no cap). release_before in [0, num_tokens): the
  // pages wholly before that position are released entries from the start (as if a window had
  // released them); a hit then needs only the later pages cached (the nodes of the released
  // ones must still match, ghosts included).
  Failure allocate(int64_t seq_id, int64_t num_tokens, TokenIds token_ids, uint64_t salt,
                   int64_t num_computed_tokens, int64_t& num_cached,
                   std::vector<int32_t>& copies, int64_t priority = 35,
                   int64_t max_cached_tokens = -1, int64_t release_before = 0);
  Failure allocate(int64_t seq_id, int64_t num_tokens) {
    int64_t num_cached = 0;
    std::vector<int32_t> copies;
    return allocate(seq_id, num_tokens, TokenIds{}, 0, num_tokens, num_cached, copies);
  }
  // The first num_computed_tokens tokens of seq_id have their KV written: index each full page
  // wholly inside them not offered yet (prefix_cache.cpp). indexed: pages newly indexed.
  Failure commit(int64_t seq_id, int64_t num_computed_tokens, int64_t& indexed);
  Failure append(int64_t seq_id, int64_t num_tokens, TokenIds token_ids,
                 std::vector<int32_t>& copies);
  // token_ids: sum(num_tokens) ids in call order, or not given.
  Failure append_batch(const int64_t* seq_ids, size_t num_seq_ids, const int64_t* num_tokens,
                       size_t num_counts, TokenIds token_ids, StepPlan& out);
  Failure fork(int64_t parent_id, int64_t child_id);
  Failure free(int64_t seq_id);
  // Releases the pages wholly before the last `window` tokens (entries become kNullPage).
  Failure release_window(int64_t seq_id, int64_t window, int64_t& released);
  void reset_prefix_cache();
  // The copies returned so far have run: release the pages pinned for them, in pin order.
  void end_step();
  // Retention (prefix_cache.cpp): hold the cached full pages of a prefix; pinned: how many.
  // token_ids are checked here. May throw std::bad_alloc (before any change).
  // release_before >= 0: the pages wholly before it need only their nodes and are not held.
  Failure pin_prefix(TokenIds token_ids, uint64_t salt, int64_t& pinned, int64_t release_before = 0);
  // Releases the oldest pin of exactly these ids and salt; released: its pages.
  Failure unpin_prefix(TokenIds token_ids, uint64_t salt, int64_t& released);
  // The CPU tier's pending moves, flattened pairs: (gpu, cpu) demotions and (cpu, gpu)
  // promotions, in the order made; forgets them (the vectors are swapped out).
  void take_offload(std::vector<int32_t>& demotions, std::vector<int32_t>& promotions);

  // ----------------------------------------------------------------- CPU tier
  // copies: (gpu_page, cpu_page) pairs for swap_out, (cpu_page, gpu_page) for swap_in.
  Failure can_swap_out(const int64_t* seq_ids, size_t n, bool& out);
  Failure can_swap_in(const int64_t* seq_ids, size_t n, bool& out);
  Failure swap_out(const int64_t* seq_ids, size_t n, std::vector<int32_t>& copies);
  Failure swap_in(const int64_t* seq_ids, size_t n, std::vector<int32_t>& copies);

  // -------------------------------------------------------------- batch views
  Failure slots(int64_t seq_id, int64_t start, int64_t stop, std::vector<int64_t>& out) const;
  // has_max_pages == false: width is the longest page table of the batch (None in Python).
  // live_only (window_tables): each row holds the sequence's entries from its first live one
  // (a sliding window's released pages left out), and first_page its index in the full table.
  Failure page_tables(const int64_t* seq_ids, size_t n, int64_t max_pages, bool has_max_pages,
                      PageTables& out, bool live_only = false);
  Failure csr(const int64_t* seq_ids, size_t n, CSR& out);

  // ------------------------------------------------------ persistent page table
  // A caller-owned int32 [rows, width] table, and int32 [rows] token counts (or null), that
  // the manager keeps current for every sequence bound to a row: its page ids padded with -1
  // (all -1 while swapped out) and its token count, written by the call that changes them.
  // Binding a table clears both arrays and every row binding; a null table unbinds it. The
  // caller keeps the arrays alive while bound (the binding holds a reference).
  void bind_table(int32_t* table, int64_t rows, int64_t width, int32_t* lens);
  // Binds seq_id (live or swapped) to `row` in [0, rows) and writes it; row -1 unbinds (the
  // row is cleared). Freeing a sequence clears and unbinds its row.
  Failure set_row(int64_t seq_id, int64_t row);
  int64_t row_of(int64_t seq_id) const;  // -1: none (or unknown)

  // --------------------------------------------------------------- invariants
  Failure check_invariants() const;
  Snapshot snapshot() const;

  // Test hooks: corrupt state on purpose so that tests can see check_invariants catch it.
  // Every argument is bounds-checked (false when out of range: page ids in [0, num_pages),
  // or [0, num_cpu_pages) in a swapped-out sequence, ref counts in [0, 2**30]), so even a
  // corrupted manager never reads or writes out of bounds; its other results are meaningless
  // until it is discarded.
  bool debug_set_ref_count(int64_t page_id, int64_t value);
  bool debug_set_page(int64_t seq_id, int64_t index, int64_t page_id);

 private:
  // Prefix-caching state of a sequence allocated with token ids
  // (ReferenceBlockManager._seq_salt / _seq_hash / _seq_tail / _seq_committed).
  struct SequenceCache {
    uint64_t salt = 0;
    int32_t node = PrefixIndex::kRoot;  // node of the last page offered (held: acquire)
    int64_t committed = 0;    // tokens whose KV the engine reported written
    bool tail_known = true;   // until an append came without token ids
    // Pending token ids: tail[head, size) are the ids from the first page not yet offered to
    // the index to the end of the sequence (a whole uncommitted prompt, or less than a page).
    // NOTE: an offset rather than erasing offered pages from the front, so committing a long
    // prompt chunk by chunk moves no memory; compacted once fewer than a page remain.
    size_t head = 0;
    std::vector<int64_t> tail;
    int64_t pending() const { return static_cast<int64_t>(tail.size() - head); }
  };

  // NOTE: kept to 64 bytes (the decode step touches every sequence of the batch); the state
  // only prefix caching needs lives behind `cache`.
  struct Sequence {
    int64_t seq_id = -1;
    int64_t num_tokens = 0;
    uint64_t mark = 0;  // == epoch_ when already seen by the current batch call
    std::vector<int32_t> pages;
    std::unique_ptr<SequenceCache> cache;  // null unless allocated with token ids
    int32_t window_start = 0;  // entries before it are all kNullPage (sliding window)
    bool swapped = false;
    int8_t priority = 35;      // retention priority of the pages it takes (DEFAULT_PRIORITY)
  };

  // The two free queues: intrusive doubly linked lists over page ids (prev_/next_ arrays,
  // queue_of_ says which list a page is on).
  // NOTE: intrusive rather than a ring buffer so that a prefix-cache hit takes a cached page
  // out of the middle of the evictable queue in O(1) (queue_remove).
  static constexpr int kFree = 0;       // pages without cached content (_free)
  // Unreferenced cached pages (_evictable): one LRU queue per retention priority p, queue
  // kEvictable + p; the lowest non-empty one is found with evictable_mask_.
  static constexpr int kEvictable = 1;
  static constexpr int kNumPriorities = 101;  // MIN_PRIORITY 0 .. MAX_PRIORITY 100
  static constexpr int kNumQueues = kEvictable + kNumPriorities;
  struct PageQueue {
    int32_t head = kNullPage;
    int32_t tail = kNullPage;
    int64_t size = 0;
  };
  int32_t queue_pop_head(int queue);
  void queue_push_tail(int queue, int32_t page);
  void queue_remove(int32_t page);
  Failure check_queue(int queue, const std::vector<int64_t>& refs,
                      std::vector<char>& on_queue) const;
  Failure check_committed(const Sequence& seq) const;  // (ReferenceBlockManager._check_committed)

  bool is_cached(int32_t page) const { return enable_prefix_caching_ && prefix_.is_cached(page); }
  int32_t take_free_page();                 // ref_count 1; may evict the LRU cached page
  void take_cached_page(int32_t page);      // a prefix-cache hit
  void release(int32_t page);               // ref_count -= 1, to a queue tail at 0
  void release_cpu(int32_t page);
  int32_t cpu_pop_head();
  void cpu_push_tail(int32_t page);
  // The CPU tier (ReferenceBlockManager._take_cpu_page, _enqueue_cpu, _demote, _promote).
  int32_t take_cpu_page();           // a free CPU page, else the LRU cached one (detached)
  void enqueue_cpu(int32_t page);    // an unreferenced, unpinned CPU page to its queue's tail
  void demote(int32_t page);         // an evicted cached GPU page (still attached)
  void promote(int64_t num_cached);  // hits_ entries kNullPage, nodes in hit_nodes_
  // Room for the moves a call taking `pages` GPU pages may make. May throw std::bad_alloc.
  void reserve_moves(int64_t pages, int64_t promotions = 0);
  // Step-safe copies (ReferenceBlockManager._pin, _pin_cpu, _gpu_copy).
  void pin(int32_t page);
  void pin_cpu(int32_t page);
  void gpu_copy(int32_t src, int32_t dst, std::vector<int32_t>& copies);
  void enqueue(int32_t page) {
    queue_push_tail(is_cached(page) ? kEvictable + page_priority_[page] : kFree, page);
  }
  int32_t pop_evictable();  // the least recently freed page of the lowest priority; kNullPage
  void hold_priority(const std::vector<int32_t>& pages, int32_t priority);

  // Prefix caching (prefix_cache.cpp).
  struct AllocatePlan {
    int64_t need = 0;        // pages taken from the free queues
    int64_t num_cached = 0;  // tokens found cached
    bool copy = false;       // the last hit page is copied, not shared
  };
  // Appends a cached page for each full page of the longest cached prefix of token_ids
  // (num_full full pages) to `pages`; returns the last one's node (kRoot: none). May throw
  // std::bad_alloc.
  // With cpu, a node cached on the CPU tier only matches too, with page kNullPage; nodes (when
  // given) gets each hit's node.
  // The first `skip` pages need only their node (ghosts too) and get no entry in `pages`.
  int32_t match_prefix(const int64_t* token_ids, int64_t num_full, uint64_t salt,
                       std::vector<int32_t>& pages, bool cpu = false,
                       std::vector<int32_t>* nodes = nullptr, int64_t skip = 0) const;
  // Fills hits_ with the pages matched past the first `skip` (released) pages, in order, and
  // hit_nodes_ with their nodes; lead_node_ is the node of page skip - 1 (kRoot: none). May
  // throw std::bad_alloc.
  AllocatePlan plan_allocate(int64_t num_tokens, TokenIds token_ids, uint64_t salt,
                             int64_t max_cached_tokens = -1, int64_t skip = 0);
  // Offers page i of seq, whose page_size tokens are `block`, to the index: its node is found
  // or made after the sequence's last one, and the page joins it unless it is a released
  // entry or cached already. Needs prefix_.reserve(1). Returns whether the page was attached.
  bool index_page(Sequence& seq, size_t i, const int64_t* block);
  // Attaches a swapped-in sequence's new pages to the nodes of its indexed pages.
  void reattach(const Sequence& seq);
  // Offers to the index, in order, each full page of seq's pending token ids (which end at
  // position `end`) lying wholly before `stop`; returns the pages indexed. Needs
  // reserve_cache(pages_to_offer(seq, end, stop)). Never allocates.
  int64_t offer_pages(Sequence& seq, int64_t end, int64_t stop);
  int64_t pages_to_offer(const Sequence& seq, int64_t end, int64_t stop) const;
  // Room for n more prefix-index nodes (and their event records). May throw std::bad_alloc.
  void reserve_cache(int64_t n);
  // Room for the event records of a call making n nodes and storing or removing up to `pages`
  // pages. May throw std::bad_alloc.
  void reserve_events(int64_t n, int64_t pages);
  // Tracks appended token ids of seq (num_tokens before the append: start) and commits through
  // the new length: pending prompt pages first, then each page the new ids fill. Needs
  // reserve_cache(pages_filled) and tail capacity (reserve_tail).
  void extend_cached_tokens(Sequence& seq, int64_t start, const int64_t* token_ids,
                            int64_t n);
  int64_t pages_filled(const Sequence& seq, int64_t n, bool has_tokens) const;
  void reserve_tail(Sequence& seq, int64_t n, bool has_tokens);

  // Pages that appending num_tokens to seq takes from the free queues. batch: count planned
  // copy-on-write releases of the current append_batch (drop_*); copy_on_write is set when
  // the last page must be copied.
  int64_t pages_to_append(Sequence& seq, int64_t num_tokens, bool batch,
                          bool* copy_on_write = nullptr);
  // Adds num_tokens to seq, whose needs were checked and whose page table has room for
  // new_len = pages_for(seq.num_tokens + num_tokens) pages. Never allocates.
  void grow(Sequence& seq, int64_t num_tokens, int64_t new_len, std::vector<int32_t>& copies,
            const int64_t* token_ids);
  int64_t acquire_slot();  // may throw std::bad_alloc; returns a slot of seqs_ to fill
  // Fills batch_slots_ with the slots of resident sequences (UnknownSequence, then
  // SequenceSwapped, per id in order).
  Failure lookup_batch(const int64_t* seq_ids, size_t n);
  Failure resident(int64_t seq_id, int64_t& slot) const;
  // Distinct pages of seq_ids in first-seen order into moved_ (marked with epoch_ in
  // drop_epoch_ or cpu_mark_); checks ids and residence; fills batch_slots_.
  Failure pages_to_move(const int64_t* seq_ids, size_t n, bool to_cpu);
  // Free GPU pages swap_in takes for moved_ (CPU pages swapped out in this step take none).
  int64_t swap_in_need() const;

  static constexpr int32_t kNotQueued = -2;

  int64_t num_pages_;
  int64_t page_size_;
  PageMath page_math_;
  int64_t watermark_pages_;
  bool enable_prefix_caching_;
  int64_t num_cpu_pages_;
  bool cpu_prefix_cache_;
  uint64_t hash_mask_;

  std::vector<int32_t> ref_count_;
  std::vector<int32_t> prev_;  // kNullPage at a head, kNotQueued when not on a queue
  std::vector<int32_t> next_;  // kNullPage at a tail, kNotQueued when not on a queue
  std::vector<int8_t> queue_of_;  // kFree, kEvictable + priority, or -1
  PageQueue queues_[kNumQueues];
  int64_t evictable_size_ = 0;
  uint64_t evictable_mask_[2] = {0, 0};  // bit p: queue kEvictable + p is not empty
  std::vector<int8_t> page_priority_;    // retention priority of each page (_page_priority)

  // Copy-on-write releases planned by the current append_batch, per page (valid when
  // drop_epoch_[page] == epoch_): a page shared by two sequences of one batch is copied only
  // for the first of them. Epoch tags avoid clearing the arrays between calls. swap_out reuses
  // them: drop_epoch_ marks a page already moved, drop_count_ holds its CPU page.
  std::vector<uint64_t> drop_epoch_;
  std::vector<int32_t> drop_count_;
  uint64_t epoch_ = 0;

  // Prefix cache (empty when prefix caching is off). NOTE: token ids are stored as int64, like
  // the ids handed in, so that a hit compares them without conversion (8 bytes per cached token
  // is small next to the KV bytes a page stands for).
  PrefixIndex prefix_;
  PrefixCacheStats stats_;  // counters only; sizes are filled in by prefix_cache_stats()
  std::vector<int32_t> hits_;     // scratch for allocate: hit pages
  std::vector<int32_t> hit_nodes_;  // scratch for allocate: their nodes
  int32_t lead_node_ = -1;          // scratch for allocate: the node before the hits (skip)
  std::vector<int64_t> block_;    // scratch: one page of token ids, assembled from two parts

  // Step-safe copies: per GPU page, kPinned (a copy of this step reads or writes it) and
  // kCopyDst (one writes it); the pinned pages in pin order (capacity num_pages, reserved at
  // construction, so pinning never allocates). Per CPU page the same, and the GPU page a
  // swap-out of this step moved into it (kNullPage: none).
  static constexpr uint8_t kPinned = 1;
  static constexpr uint8_t kCopyDst = 2;
  // Per GPU page indexed in this step: the first in-page offset whose KV lands in this step's
  // forward pass (page_size: none), ReferenceBlockManager._fresh; such pages are listed in
  // fresh_ (capacity num_pages). Never demoted in the step; a whole-prompt hit's copy source
  // only if the offset is the last slot. written_from_: set by the caller of offer_pages.
  std::vector<int32_t> fresh_offset_;
  std::vector<int32_t> fresh_;
  int64_t written_from_ = 0;
  std::vector<uint8_t> pin_flags_;
  std::vector<int32_t> pinned_;
  std::vector<uint8_t> cpu_pinned_flag_;
  std::vector<int32_t> cpu_pinned_;
  std::vector<int32_t> cpu_swapped_from_;
  // Retention: each pin_prefix holds its pages like a sequence (ReferenceBlockManager._prefix_pins).
  struct PrefixPin {
    uint64_t salt = 0;
    std::vector<int64_t> tokens;
    std::vector<int32_t> pages;
  };
  std::vector<PrefixPin> prefix_pins_;

  // CPU tier: ref counts and a FIFO ring of free CPU pages.
  std::vector<int32_t> cpu_ref_count_;
  std::vector<int32_t> cpu_free_;
  int64_t cpu_free_head_ = 0;
  int64_t cpu_free_size_ = 0;
  std::vector<uint64_t> cpu_mark_;   // == epoch_ when moved by the current swap_in
  std::vector<int32_t> cpu_move_to_;  // its GPU page
  std::vector<int32_t> moved_;        // scratch for swaps: pages to move, first-seen order
  // The CPU tier of the prefix cache: unpinned cached CPU pages, LRU first, as an intrusive
  // list (a promotion takes its source out of the middle); pending moves, flattened pairs.
  std::vector<int32_t> cpu_lru_prev_;  // kNotQueued when not on the list
  std::vector<int32_t> cpu_lru_next_;
  PageQueue cpu_lru_;
  std::vector<int32_t> demotions_;
  std::vector<int32_t> promotions_;

  std::vector<Sequence> seqs_;     // dense slots, reused through free_slots_
  std::vector<int64_t> free_slots_;  // capacity kept >= seqs_.size() so free() never allocates
  SeqMap index_;                   // seq_id -> slot in seqs_
  std::vector<int64_t> batch_slots_;  // scratch for batch calls: slot of each seq_id
  std::vector<int64_t> batch_lens_;   // scratch for append_batch: page-table length after it

  // The persistent page table (bind_table): rows of slot_row_[slot] >= 0 are kept current.
  // NOTE: the row lives beside seqs_ rather than in Sequence, which stays 64 bytes.
  int32_t* table_ = nullptr;
  int32_t* table_lens_ = nullptr;
  int64_t table_rows_ = 0;
  int64_t table_width_ = 0;
  std::vector<int32_t> slot_row_;   // per slot of seqs_: its row, or -1
  std::vector<int64_t> row_slot_;   // per row: the slot bound to it, or -1
  void write_row(int64_t slot);     // the row of a bound slot, from its sequence
  // After an append: entries from `from` on (the row past the old pages already holds -1).
  void write_row_from(int64_t slot, size_t from);
  void clear_row(int64_t slot);     // unbinds the slot, clearing its row
  // Whether a bound sequence's row holds new_len pages (append: checked before any change).
  bool row_fits(int64_t slot, int64_t new_len) const {
    return slot_row_[static_cast<size_t>(slot)] < 0 || new_len <= table_width_;
  }
};

}  // namespace pagedkv
