// The CPU offload tier (swap_out / swap_in) and sliding-window release in the C++ core.
// Mirrors ReferenceBlockManager._pages_to_move, swap_out, swap_in and release_window
// (pagedkv/_reference.py).
#include <algorithm>

#include "block_manager.h"
#include "internal.h"

namespace pagedkv {
using internal::fail;
using internal::invalid;
using internal::is_count;

Failure BlockManager::is_swapped(int64_t seq_id, bool& out) const {
  const int64_t slot = index_.find(seq_id);
  if (slot < 0) return fail(Status::unknown_sequence, seq_id);
  out = seqs_[slot].swapped;
  return Failure{};
}

Failure BlockManager::pages_to_move(const int64_t* seq_ids, size_t n, bool to_cpu) {
  ++epoch_;  // new marks: sequences seen (duplicates) and pages already listed
  moved_.clear();
  batch_slots_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t seq_id = seq_ids[i];
    const int64_t slot = index_.find(seq_id);
    if (slot < 0) return fail(Status::unknown_sequence, seq_id);
    Sequence& seq = seqs_[slot];
    if (seq.mark == epoch_) return fail(Status::duplicate_sequence, seq_id);
    seq.mark = epoch_;
    if (seq.swapped == to_cpu) return fail(Status::sequence_swapped, seq_id, to_cpu ? 1 : 0);
    batch_slots_[i] = slot;
    // NOTE: a page shared by several of seq_ids is moved once (first-seen order).
    std::vector<uint64_t>& mark = to_cpu ? drop_epoch_ : cpu_mark_;
    for (int32_t page : seq.pages) {
      if (page == kNullPage || mark[page] == epoch_) continue;
      mark[page] = epoch_;
      moved_.push_back(page);
    }
  }
  return Failure{};
}

Failure BlockManager::can_swap_out(const int64_t* seq_ids, size_t n, bool& out) {
  Failure f = pages_to_move(seq_ids, n, true);
  if (!f.ok()) return f;
  out = static_cast<int64_t>(moved_.size()) <= num_free_cpu_pages();
  return Failure{};
}

int64_t BlockManager::swap_in_need() const {
  // NOTE: a page swapped out in this step takes no free GPU page: its GPU page (pinned) still
  // holds the content and is taken back.
  int64_t need = 0;
  for (int32_t cpu : moved_) need += cpu_swapped_from_[cpu] == kNullPage;
  return need;
}

Failure BlockManager::can_swap_in(const int64_t* seq_ids, size_t n, bool& out) {
  Failure f = pages_to_move(seq_ids, n, false);
  if (!f.ok()) return f;
  out = swap_in_need() <= num_free_pages() - watermark_pages_;
  return Failure{};
}

Failure BlockManager::swap_out(const int64_t* seq_ids, size_t n, std::vector<int32_t>& copies) {
  Failure f = pages_to_move(seq_ids, n, true);
  if (!f.ok()) return f;
  const int64_t num_moved = static_cast<int64_t>(moved_.size());
  if (num_moved > num_free_cpu_pages())
    return fail(Status::out_of_pages, num_moved, num_free_cpu_pages(), num_cpu_pages_, 1);
  copies.clear();
  copies.reserve(2 * moved_.size());
  reserve_events(0, num_moved);  // cached CPU pages it takes lose their content
  // Nothing below allocates. drop_count_ holds each moved GPU page's CPU page.
  for (int32_t page : moved_) {
    const int32_t cpu = take_cpu_page();  // NOTE: swap-out outranks the prefix cache's CPU tier
    drop_count_[page] = cpu;
    cpu_ref_count_[cpu] = 0;
    pin(page);
    pin_cpu(cpu);
    cpu_swapped_from_[cpu] = page;
    copies.push_back(page);
    copies.push_back(cpu);
  }
  for (size_t i = 0; i < n; ++i) {
    Sequence& seq = seqs_[batch_slots_[i]];
    // NOTE: last page first, as free() releases (a page also held by a sequence left on the
    // GPU stays there for it).
    for (size_t j = seq.pages.size(); j-- > 0;) {
      const int32_t page = seq.pages[j];
      if (page == kNullPage) continue;
      release(page);
      seq.pages[j] = drop_count_[page];
      ++cpu_ref_count_[seq.pages[j]];
    }
    seq.swapped = true;
    write_row(batch_slots_[i]);
  }
  return Failure{};
}

Failure BlockManager::swap_in(const int64_t* seq_ids, size_t n, std::vector<int32_t>& copies) {
  Failure f = pages_to_move(seq_ids, n, false);
  if (!f.ok()) return f;
  const int64_t need = swap_in_need();
  const int64_t available = num_free_pages() - watermark_pages_;
  if (need > available)
    return fail(Status::out_of_pages, need, std::max<int64_t>(available, 0), num_pages_);
  copies.clear();
  copies.reserve(2 * moved_.size());
  reserve_moves(need);
  // NOTE: its pages may evict (and demote) cached pages, and are attached again (reattach)
  reserve_events(0, 2 * need + 2 * static_cast<int64_t>(moved_.size()));
  // Nothing below allocates.
  for (int32_t cpu : moved_) {
    const int32_t reused = cpu_swapped_from_[cpu];
    if (reused != kNullPage) {
      // NOTE: swapped out in this step: its copy may not have run yet, but its GPU page is
      // pinned (never handed out again in this step) and holds the content once the step's
      // copies have run, so it is taken back as is.
      cpu_move_to_[cpu] = reused;
      continue;
    }
    const int32_t page = take_free_page();
    ref_count_[page] = 0;
    pin_cpu(cpu);
    pin(page);
    pin_flags_[page] |= kCopyDst;
    cpu_move_to_[cpu] = page;
    copies.push_back(cpu);
    copies.push_back(page);
  }
  for (size_t i = 0; i < n; ++i) {
    Sequence& seq = seqs_[batch_slots_[i]];
    for (size_t j = seq.pages.size(); j-- > 0;) {
      const int32_t cpu = seq.pages[j];
      if (cpu == kNullPage) continue;
      release_cpu(cpu);
      seq.pages[j] = cpu_move_to_[cpu];
      ++ref_count_[seq.pages[j]];
    }
    seq.swapped = false;
    write_row(batch_slots_[i]);
    hold_priority(seq.pages, seq.priority);
    // NOTE: the pages brought back hold committed content again: they join their nodes.
    if (enable_prefix_caching_) reattach(seq);
  }
  return Failure{};
}

Failure BlockManager::release_window(int64_t seq_id, int64_t window, int64_t& released) {
  int64_t slot = -1;
  Failure f = resident(seq_id, slot);
  if (!f.ok()) return f;
  if (!is_count(window)) return invalid(Arg::window, window);
  Sequence& seq = seqs_[slot];
  const int64_t keep_from = seq.num_tokens - window;  // first position inside the window
  const int64_t end = std::min<int64_t>(keep_from > 0 ? page_math_.index(keep_from) : 0,
                                        static_cast<int64_t>(seq.pages.size()));
  released = 0;
  // NOTE: released entries always form a prefix of the table, so the scan starts where the
  // previous release stopped (O(pages released), not O(table) per decode step).
  for (int64_t i = seq.window_start; i < end; ++i) {
    if (seq.pages[i] == kNullPage) continue;
    release(seq.pages[i]);
    seq.pages[i] = kNullPage;
    ++released;
  }
  const int32_t row = slot_row_[static_cast<size_t>(slot)];
  if (row >= 0 && end > seq.window_start) {
    int32_t* out = table_ + static_cast<int64_t>(row) * table_width_;
    std::fill(out + seq.window_start, out + end, kNullPage);
  }
  if (end > seq.window_start) seq.window_start = static_cast<int32_t>(end);  // end <= kMaxCount
  return Failure{};
}

}  // namespace pagedkv
