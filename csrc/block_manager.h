// C++17 core of the pagedkv block manager: free queue, ref counts, fork, copy-on-write and the
// batched decode path.
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

namespace pagedkv {

// Page id of padded page-table entries (NULL_PAGE in Python).
constexpr int32_t kNullPage = -1;
// Largest count of pages, tokens per page or tokens per call (MAX_COUNT in Python).
constexpr int64_t kMaxCount = 2147483647;

enum class Status : int32_t {
  ok = 0,
  out_of_pages = 1,        // values: requested, free, total
  unknown_sequence = 2,    // values: seq_id
  sequence_exists = 3,     // values: seq_id
  duplicate_sequence = 4,  // values: seq_id (argument: seq_ids)
  invalid_argument = 5,    // argument names which one; values depend on it (see Arg)
  int32_overflow = 6,      // values: the value that does not fit an int32 output
  invariant_violation = 7, // invariant names which one; values depend on it (see Invariant)
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
};

// Which invariant check_invariants found broken (names as in the Python reference).
enum class Invariant : int32_t {
  none = 0,
  pages_cover_tokens = 1,      // values: seq_id, num_tokens, len(page table), page_size
  page_in_range = 2,           // values: seq_id, page, num_pages
  ref_count = 3,               // values: page, stored ref_count, page-table entries
  free_list_unique = 4,        // values: page
  free_page_unreferenced = 5,  // values: page, page-table entries
  conservation = 6,            // values: free pages, referenced pages, num_pages
  // C++ only (the reference's deque cannot break these):
  free_list_links = 7,         // values: page whose prev link does not point back
  free_list_size = 8,          // values: pages walked on the queue, stored queue size
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
  int64_t width = 0;
};

struct CSR {
  Buffer<int32_t> indptr;         // [batch_size + 1]
  Buffer<int32_t> indices;        // [indptr[-1]]
  Buffer<int32_t> last_page_len;  // [batch_size]
};

// Complete observable state (ReferenceBlockManager.snapshot), sequences sorted by id.
struct Snapshot {
  std::vector<int32_t> free;       // free queue, head first
  std::vector<int32_t> ref_count;  // [num_pages]
  std::vector<int64_t> seq_ids;    // ascending
  std::vector<int64_t> num_tokens; // per seq_ids
  std::vector<int64_t> indptr;     // [num_sequences + 1] into pages
  std::vector<int32_t> pages;      // concatenated page tables
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

class BlockManager {
 public:
  // Returns the failure a constructor call with these arguments would be (ok if valid):
  // 1 <= num_pages, page_size <= kMaxCount and 0 <= watermark_pages <= num_pages.
  static Failure check_config(int64_t num_pages, int64_t page_size, int64_t watermark_pages);
  // Precondition: check_config(...).ok(). May throw std::bad_alloc (the pool's arrays).
  BlockManager(int64_t num_pages, int64_t page_size, int64_t watermark_pages);

  // ------------------------------------------------------------------ queries
  int64_t num_pages() const { return num_pages_; }
  int64_t page_size() const { return page_size_; }
  int64_t watermark_pages() const { return watermark_pages_; }
  int64_t num_free_pages() const { return free_size_; }
  int64_t num_sequences() const { return static_cast<int64_t>(index_.size()); }
  bool has_sequence(int64_t seq_id) const { return index_.find(seq_id) >= 0; }
  Failure page_table(int64_t seq_id, std::vector<int32_t>& out) const;
  Failure num_tokens(int64_t seq_id, int64_t& out) const;
  Failure ref_count(int64_t page_id, int64_t& out) const;
  bool can_allocate(int64_t num_tokens) const;
  Failure can_append(int64_t seq_id, int64_t num_tokens, bool& out);

  // ----------------------------------------------------------------- mutators
  // Every mutator checks everything, then reserves all memory it needs, then changes state:
  // a failure (or std::bad_alloc) leaves the manager exactly as it was.
  Failure allocate(int64_t seq_id, int64_t num_tokens);
  Failure append(int64_t seq_id, int64_t num_tokens, std::vector<int32_t>& copies);
  Failure append_batch(const int64_t* seq_ids, size_t num_seq_ids, const int64_t* num_tokens,
                       size_t num_counts, StepPlan& out);
  Failure fork(int64_t parent_id, int64_t child_id);
  Failure free(int64_t seq_id);

  // -------------------------------------------------------------- batch views
  Failure slots(int64_t seq_id, int64_t start, int64_t stop, std::vector<int64_t>& out) const;
  // has_max_pages == false: width is the longest page table of the batch (None in Python).
  Failure page_tables(const int64_t* seq_ids, size_t n, int64_t max_pages, bool has_max_pages,
                      PageTables& out);
  Failure csr(const int64_t* seq_ids, size_t n, CSR& out);

  // --------------------------------------------------------------- invariants
  Failure check_invariants() const;
  Snapshot snapshot() const;

  // Test hooks: corrupt state on purpose so that tests can see check_invariants catch it.
  // Every argument is bounds-checked (false when out of range: page ids in [0, num_pages),
  // ref counts in [0, 2**30]), so even a corrupted manager never reads or writes out of
  // bounds; its other results are meaningless until it is discarded.
  bool debug_set_ref_count(int64_t page_id, int64_t value);
  bool debug_set_page(int64_t seq_id, int64_t index, int64_t page_id);

 private:
  struct Sequence {
    int64_t seq_id = -1;
    int64_t num_tokens = 0;
    uint64_t mark = 0;  // == epoch_ when already seen by the current append_batch
    std::vector<int32_t> pages;
  };

  // Free queue: an intrusive doubly linked list over page ids (prev_/next_ arrays).
  // NOTE: intrusive rather than a ring buffer so that prefix caching can take a cached page out
  // of the middle of the queue in O(1) on a hit (free_queue_remove).
  bool on_free_queue(int32_t page) const { return prev_[page] != kNotQueued; }
  int32_t free_queue_pop_head();
  void free_queue_push_tail(int32_t page);
  void free_queue_remove(int32_t page);

  // Pages that appending num_tokens to seq takes from the free queue. batch: count planned
  // copy-on-write releases of the current append_batch (drop_*); copy_on_write is set when
  // the last page must be copied.
  int64_t pages_to_append(Sequence& seq, int64_t num_tokens, bool batch,
                          bool* copy_on_write = nullptr);
  int32_t take_free_page();
  // Adds num_tokens to seq, whose needs were checked and whose page table has room for
  // new_len = pages_for(seq.num_tokens + num_tokens) pages. Never allocates.
  void grow(Sequence& seq, int64_t num_tokens, int64_t new_len, std::vector<int32_t>& copies);
  int64_t acquire_slot();  // may throw std::bad_alloc; returns a slot of seqs_ to fill
  Failure lookup_batch(const int64_t* seq_ids, size_t n);  // fills batch_slots_

  static constexpr int32_t kNotQueued = -2;

  int64_t num_pages_;
  int64_t page_size_;
  PageMath page_math_;
  int64_t watermark_pages_;

  std::vector<int32_t> ref_count_;
  std::vector<int32_t> prev_;  // kNullPage at the head, kNotQueued when not on the queue
  std::vector<int32_t> next_;  // kNullPage at the tail, kNotQueued when not on the queue
  int32_t head_ = kNullPage;
  int32_t tail_ = kNullPage;
  int64_t free_size_ = 0;

  // Copy-on-write releases planned by the current append_batch, per page (valid when
  // drop_epoch_[page] == epoch_): a page shared by two sequences of one batch is copied only
  // for the first of them. Epoch tags avoid clearing the arrays between calls.
  std::vector<uint64_t> drop_epoch_;
  std::vector<int32_t> drop_count_;
  uint64_t epoch_ = 0;

  std::vector<Sequence> seqs_;     // dense slots, reused through free_slots_
  std::vector<int64_t> free_slots_;  // capacity kept >= seqs_.size() so free() never allocates
  SeqMap index_;                   // seq_id -> slot in seqs_
  std::vector<int64_t> batch_slots_;  // scratch for batch calls: slot of each seq_id
  std::vector<int64_t> batch_lens_;   // scratch for append_batch: page-table length after it
};

}  // namespace pagedkv
