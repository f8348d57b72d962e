// Host planning of one batch into persistent plan buffers: the fast path of
// PagedKVCache.plan(..., buffers=...) (pagedkv/_planning.py's host_plan is the oracle).
//
// fill_plan checks a batch exactly as host_plan does and writes it, padded, into the caller's
// staging arrays in one pass. It never reports why a batch is bad: on any failure it returns
// ok = false, and the caller runs the oracle, which raises the typed error naming the value.
#pragma once

#include <cstdint>
#include <vector>

namespace pagedkv {

struct PlanInput {
  const int32_t* table = nullptr;  // [num_seqs, width], row-major
  int64_t num_seqs = 0;
  int64_t width = 0;
  const int32_t* seq_lens = nullptr;  // [num_seqs]
  const int64_t* query_lens = nullptr;  // [num_seqs], or nullptr: query_len for every sequence
  int64_t query_len = 1;
  const int64_t* slots = nullptr;  // [num_slots], or nullptr: derived from the table
  int64_t num_slots = 0;
  const int32_t* first_page = nullptr;  // [num_seqs], or nullptr: rows start at page 0
  int64_t page_size = 1;
  int64_t num_pages = 0;
  int64_t window = 0;  // W > 0: a sliding window of W tokens; -C < 0: chunked-local of C; 0: neither
};

struct PlanOutput {
  int32_t* table = nullptr;  // [rows, max_pages]
  int64_t max_pages = 0;
  int32_t* seq_lens = nullptr;  // [rows]
  int32_t* qo_indptr = nullptr;  // [rows + 1]
  int64_t* slots = nullptr;  // [max_tokens]
  int64_t max_tokens = 0;
  int32_t* first_page = nullptr;  // [rows] when the input has first pages
  int64_t rows = 0;  // >= num_seqs: the padded batch size
};

struct PlanResult {
  bool ok = false;
  int64_t tokens = 0;  // new tokens, padding tokens of a decode batch included
  int64_t max_seq_len = 0;
  int64_t max_q_len = 0;
};

// `scratch` holds the sorted slots of the repeated-slot check between calls.
PlanResult fill_plan(const PlanInput& in, const PlanOutput& out, std::vector<int64_t>& scratch);

}  // namespace pagedkv
