// PrefixIndex: content-prefix nodes, their hash chains and their page lists. Mirrors
// pagedkv/_prefix_index.py (PrefixIndex) line for line: the same node ids (a free stack), the
// same list orders (newest first) and the same deletion cascade.
#include <algorithm>
#include <cstring>

#include "block_manager.h"
#include "internal.h"

namespace pagedkv {

PrefixIndex::PrefixIndex(int64_t num_pages, int64_t page_size, int64_t num_cpu_pages)
    : num_pages_(num_pages),
      page_size_(page_size),
      page_node_(static_cast<size_t>(num_pages), kNone),
      page_next_(static_cast<size_t>(num_pages), kNone),
      page_prev_(static_cast<size_t>(num_pages), kNone),
      cpu_node_(static_cast<size_t>(num_cpu_pages), kNone) {}

int32_t PrefixIndex::find(uint64_t h, int32_t parent, uint64_t salt, const int64_t* block) const {
  const size_t ps = static_cast<size_t>(page_size_);
  for (int32_t node = chains_.find(h); node != kNone; node = nodes_[node].next_same_hash) {
    const Node& n = nodes_[node];
    if (n.parent != parent || n.salt != salt) continue;
    const int64_t* stored = tokens_.data() + static_cast<size_t>(node) * ps;
    uint64_t diff = 0;  // branch-free, so the comparison vectorises
    for (size_t i = 0; i < ps; ++i) diff |= static_cast<uint64_t>(stored[i] ^ block[i]);
    if (diff == 0) return node;
  }
  return kNone;
}

int32_t PrefixIndex::pick_page(int32_t node, const std::vector<int32_t>& ref_count,
                               const std::vector<uint8_t>* pin_flags,
                               const std::vector<int32_t>* fresh, int32_t min_offset) const {
  constexpr uint8_t kCopyDst = 2;  // BlockManager::kCopyDst
  int32_t first = kNone;
  int32_t fallback = kNone;
  for (int32_t page = nodes_[node].first_page; page != kNone; page = page_next_[page]) {
    if (fresh && (*fresh)[page] < min_offset) continue;
    if (first == kNone) first = page;
    if (pin_flags && ((*pin_flags)[page] & kCopyDst)) continue;
    if (ref_count[page]) return page;
    if (fallback == kNone) fallback = page;
  }
  return fallback == kNone ? first : fallback;
}

void PrefixIndex::reserve(int64_t n) {
  if (n <= 0) return;
  const size_t spare = free_nodes_.size();
  const size_t live = nodes_.size() - spare;
  chains_.reserve(live + static_cast<size_t>(n));
  if (static_cast<size_t>(n) <= spare) return;
  const size_t want = nodes_.size() + (static_cast<size_t>(n) - spare);
  const size_t ps = static_cast<size_t>(page_size_);
  if (nodes_.capacity() < want) nodes_.reserve(std::max(want, 2 * nodes_.capacity()));
  if (tokens_.capacity() < want * ps) tokens_.reserve(std::max(want * ps, 2 * tokens_.capacity()));
  // NOTE: every id may be freed at once: the stack's capacity covers them all, so a deletion
  // (on an eviction, inside calls that must not allocate) never reallocates.
  if (free_nodes_.capacity() < want) free_nodes_.reserve(std::max(want, 2 * free_nodes_.capacity()));
}

int32_t PrefixIndex::child(uint64_t h, int32_t parent, uint64_t salt, const int64_t* block) {
  int32_t node = find(h, parent, salt, block);
  if (node != kNone) return node;
  const size_t ps = static_cast<size_t>(page_size_);
  if (!free_nodes_.empty()) {
    node = free_nodes_.back();
    free_nodes_.pop_back();
  } else {
    node = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();                     // within reserve()
    tokens_.resize(tokens_.size() + ps);       // within reserve()
  }
  Node& n = nodes_[node];
  n.hash = h;
  n.salt = salt;
  n.parent = parent;
  n.deps = 0;
  n.first_page = kNone;
  n.cpu_page = kNone;
  n.live = true;
  std::memcpy(tokens_.data() + static_cast<size_t>(node) * ps, block, ps * sizeof(int64_t));
  const int32_t head = chains_.find(h);
  n.next_same_hash = head;
  if (head != kNone) chains_.erase(h);
  chains_.insert(h, node);  // within reserve()
  if (parent != kRoot) ++nodes_[parent].deps;
  if (record_nodes_) {  // within reserve_events()
    events_.push_back(kEventNode);
    events_.push_back(node);
    events_.push_back(parent);
    events_.push_back(static_cast<int64_t>(salt));
    events_.push_back(static_cast<int64_t>(h));
    events_.insert(events_.end(), block, block + ps);
  }
  return node;
}

void PrefixIndex::attach(int32_t page, int32_t node) {
  const int32_t head = nodes_[node].first_page;
  page_node_[page] = node;
  page_prev_[page] = kNone;
  page_next_[page] = head;
  if (head != kNone) page_prev_[head] = page;
  else if (record_) record_stored(0, node);
  nodes_[node].first_page = page;
  ++num_cached_pages_;
}

void PrefixIndex::detach(int32_t page) {
  const int32_t node = page_node_[page];
  if (node == kNone) return;
  const int32_t prev = page_prev_[page];
  const int32_t next = page_next_[page];
  if (prev == kNone) nodes_[node].first_page = next; else page_next_[prev] = next;
  if (next != kNone) page_prev_[next] = prev;
  page_node_[page] = page_next_[page] = page_prev_[page] = kNone;
  --num_cached_pages_;
  if (record_ && nodes_[node].first_page == kNone && !quiet_) record_removed(0, node);
  collect(node);
}

void PrefixIndex::attach_cpu(int32_t cpu, int32_t node) {
  cpu_node_[cpu] = node;
  nodes_[node].cpu_page = cpu;
  ++num_cpu_cached_pages_;
  if (record_) record_stored(1, node);
}

void PrefixIndex::detach_cpu(int32_t cpu) {
  const int32_t node = cpu_node_[cpu];
  if (node == kNone) return;
  cpu_node_[cpu] = kNone;
  nodes_[node].cpu_page = kNone;
  --num_cpu_cached_pages_;
  if (record_ && !quiet_) record_removed(1, node);
  collect(node);
}

void PrefixIndex::acquire(int32_t node) {
  if (node != kRoot) ++nodes_[node].deps;
}

void PrefixIndex::release(int32_t node) {
  if (node == kRoot) return;
  --nodes_[node].deps;
  collect(node);
}

void PrefixIndex::clear_pages() {
  quiet_ = true;
  for (int64_t page = 0; page < num_pages_; ++page)
    if (page_node_[page] != kNone) detach(static_cast<int32_t>(page));
  for (size_t cpu = 0; cpu < cpu_node_.size(); ++cpu)
    if (cpu_node_[cpu] != kNone) detach_cpu(static_cast<int32_t>(cpu));
  quiet_ = false;
  if (record_) events_.push_back(kEventCleared);
}

void PrefixIndex::record_stored(int64_t medium, int32_t node) {
  const Node& n = nodes_[node];
  events_.push_back(kEventStored);
  events_.push_back(medium);
  events_.push_back(node);
  events_.push_back(n.parent);
  events_.push_back(static_cast<int64_t>(n.hash));
  events_.push_back(static_cast<int64_t>(hash_of(n.parent)));
  const int64_t* tokens = tokens_.data() + static_cast<size_t>(node) * static_cast<size_t>(page_size_);
  events_.insert(events_.end(), tokens, tokens + page_size_);
}

void PrefixIndex::reserve_events(int64_t n, int64_t pages) {
  if (!record_) return;
  // NOTE: per new node a NODE record; per page stored or removed a STORED and a REMOVED
  // record; per node (live or new) a DROP; and a CLEARED.
  const size_t ps = static_cast<size_t>(page_size_);
  const size_t new_nodes = static_cast<size_t>(std::max<int64_t>(n, 0));
  const size_t want = events_.size() + new_nodes * (5 + ps) + static_cast<size_t>(std::max<int64_t>(pages, 0)) * (10 + ps) +
                      2 * (nodes_.size() + new_nodes) + 1;
  if (events_.capacity() < want) events_.reserve(std::max(want, 2 * events_.capacity()));
}

void PrefixIndex::collect(int32_t node) {
  while (node != kRoot && nodes_[node].deps == 0 && nodes_[node].first_page == kNone &&
         nodes_[node].cpu_page == kNone) {
    Node& n = nodes_[node];
    const uint64_t h = n.hash;
    const int32_t parent = n.parent;
    const int32_t head = chains_.find(h);
    if (head == node) {
      chains_.erase(h);
      if (n.next_same_hash != kNone) chains_.insert(h, n.next_same_hash);  // the slot just freed
    } else {
      int32_t prev = head;
      while (nodes_[prev].next_same_hash != node) prev = nodes_[prev].next_same_hash;
      nodes_[prev].next_same_hash = n.next_same_hash;
    }
    n.live = false;
    n.parent = kRoot;
    n.next_same_hash = kNone;
    free_nodes_.push_back(node);  // within the capacity kept by reserve()
    if (record_nodes_) {
      events_.push_back(kEventDrop);  // within reserve_events()
      events_.push_back(node);
    }
    if (parent != kRoot) --nodes_[parent].deps;
    node = parent;
  }
}

Failure PrefixIndex::check(const std::vector<int64_t>& seq_refs) const {
  using internal::broken;
  const int32_t num_ids = num_node_ids();
  std::vector<int64_t> children(static_cast<size_t>(num_ids), 0);
  for (int32_t node = 0; node < num_ids; ++node)
    if (nodes_[node].live && nodes_[node].parent >= 0 && nodes_[node].parent < num_ids)
      ++children[nodes_[node].parent];
  int64_t on_lists = 0;
  for (int32_t node = 0; node < num_ids; ++node) {
    const Node& n = nodes_[node];
    if (!n.live) continue;
    int32_t chain = chains_.find(n.hash);
    for (int64_t steps = 0; chain != kNone && chain != node && steps <= num_ids; ++steps)
      chain = nodes_[chain].next_same_hash;
    if (chain != node) return broken(Invariant::hash_index, static_cast<int64_t>(n.hash), node);
    const int64_t want = children[node] + (static_cast<size_t>(node) < seq_refs.size() ? seq_refs[node] : 0);
    if (n.deps != want) return broken(Invariant::node_dependents, node, n.deps, want);
    const int32_t cpu = n.cpu_page;
    const int64_t num_cpu = static_cast<int64_t>(cpu_node_.size());
    if (want == 0 && n.first_page == kNone && cpu == kNone)
      return broken(Invariant::node_dependents, node, 0, 0);
    if (cpu != kNone && (cpu < 0 || cpu >= num_cpu || cpu_node_[cpu] != node))
      return broken(Invariant::cpu_cache, node, cpu, cpu < 0 || cpu >= num_cpu ? kNone : cpu_node_[cpu]);
    Failure bad;
    for_each_page(node, [&](int32_t page) {
      if (!bad.ok()) return;
      if (page_node_[page] != node) bad = broken(Invariant::node_pages, page, page_node_[page], node);
      ++on_lists;
    });
    if (!bad.ok()) return bad;
  }
  int64_t cached = 0;
  for (int64_t page = 0; page < num_pages_; ++page) cached += page_node_[page] != kNone;
  if (cached != on_lists || cached != num_cached_pages_)
    return broken(Invariant::hash_index_size, cached, on_lists);
  int64_t cpu_cached = 0;
  for (size_t cpu = 0; cpu < cpu_node_.size(); ++cpu) {
    const int32_t node = cpu_node_[cpu];
    if (node == kNone) continue;
    if (node < 0 || node >= num_ids || !nodes_[node].live || nodes_[node].cpu_page != static_cast<int32_t>(cpu))
      return broken(Invariant::cpu_cache, node, static_cast<int64_t>(cpu), node);
    ++cpu_cached;
  }
  if (cpu_cached != num_cpu_cached_pages_)
    return broken(Invariant::hash_index_size, cpu_cached, num_cpu_cached_pages_);
  return Failure{};
}

}  // namespace pagedkv
