// fill_plan: see plan.h. Mirrors host_plan (pagedkv/_planning.py) check for check.
#include "plan.h"

#include <algorithm>

namespace pagedkv {

namespace {

// NOTE: without a + b - 1, which overflows for a page size near INT64_MAX (a, b >= 0, b >= 1)
int64_t cdiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }

}  // namespace

PlanResult fill_plan(const PlanInput& in, const PlanOutput& out, std::vector<int64_t>& scratch) {
  PlanResult result;
  const int64_t ps = in.page_size;
  if (ps < 1 || in.num_seqs < 0 || in.width < 0 || in.width > out.max_pages || out.rows < in.num_seqs)
    return result;
  const int64_t max_slot = in.num_pages * ps - 1;
  // Pass 1: lengths, page ids, the pages attention reads, and the token count.
  int64_t tokens = 0;
  bool decode = true;
  for (int64_t i = 0; i < in.num_seqs; ++i) {
    const int64_t len = in.seq_lens[i];
    const int64_t q_len = in.query_lens ? in.query_lens[i] : in.query_len;
    const int64_t start = in.first_page ? in.first_page[i] : 0;
    if (len < 0 || q_len < 0 || q_len > len || start < 0) return result;
    const int64_t used = cdiv(len, ps);
    if (used - start > in.width) return result;
    const int32_t* row = in.table + i * in.width;
    for (int64_t c = 0; c < in.width; ++c)
      if (row[c] < -1 || row[c] >= in.num_pages) return result;
    // The first key the sequence's first new token sees: its window's, or its chunk's start.
    int64_t first_key_page = 0;
    if (in.window > 0) {
      first_key_page = std::max<int64_t>(len - q_len - in.window + 1, 0) / ps;
    } else if (in.window < 0) {
      const int64_t chunk = -in.window;
      first_key_page = (len - q_len) / chunk * chunk / ps;
    }
    if (in.first_page && first_key_page < start) return result;
    for (int64_t c = std::max<int64_t>(first_key_page - start, 0); c < used - start; ++c)
      if (row[c] < 0) return result;
    tokens += q_len;
    decode = decode && q_len == 1;
    result.max_seq_len = std::max(result.max_seq_len, len);
    result.max_q_len = std::max(result.max_q_len, q_len);
  }
  if (in.slots && in.num_slots != tokens) return result;
  const int64_t padded = tokens + (decode ? out.rows - in.num_seqs : 0);
  if (padded > out.max_tokens) return result;
  // Pass 2: write the rows, their query offsets and slots.
  int64_t token = 0;
  out.qo_indptr[0] = 0;
  for (int64_t i = 0; i < in.num_seqs; ++i) {
    const int32_t* row = in.table + i * in.width;
    int32_t* dst = out.table + i * out.max_pages;
    std::copy(row, row + in.width, dst);
    std::fill(dst + in.width, dst + out.max_pages, -1);
    const int64_t len = in.seq_lens[i];
    const int64_t q_len = in.query_lens ? in.query_lens[i] : in.query_len;
    const int64_t start = in.first_page ? in.first_page[i] : 0;
    out.seq_lens[i] = static_cast<int32_t>(len);
    if (out.first_page) out.first_page[i] = static_cast<int32_t>(start);
    for (int64_t pos = len - q_len; pos < len; ++pos, ++token) {
      int64_t slot;
      if (in.slots) {
        slot = in.slots[token];
        if (slot < -1 || slot > max_slot) return result;
      } else {
        slot = static_cast<int64_t>(row[pos / ps - start]) * ps + pos % ps;
      }
      out.slots[token] = slot;
    }
    out.qo_indptr[i + 1] = static_cast<int32_t>(token);
  }
  // Padding rows: no pages, no keys; in a decode batch one padding token each (slot -1).
  for (int64_t i = in.num_seqs; i < out.rows; ++i) {
    std::fill(out.table + i * out.max_pages, out.table + (i + 1) * out.max_pages, -1);
    out.seq_lens[i] = 0;
    if (out.first_page) out.first_page[i] = 0;
    if (decode) out.slots[token++] = -1;
    out.qo_indptr[i + 1] = static_cast<int32_t>(token);
  }
  // Repeated slots: two tokens written to one slot would race.
  scratch.clear();
  for (int64_t t = 0; t < tokens; ++t)
    if (out.slots[t] >= 0) scratch.push_back(out.slots[t]);
  std::sort(scratch.begin(), scratch.end());
  if (std::adjacent_find(scratch.begin(), scratch.end()) != scratch.end()) return result;
  result.ok = true;
  result.tokens = padded;
  return result;
}

}  // namespace pagedkv
