// nanobind bindings of the block manager core: the module pagedkv._core.
//
// The only file of csrc/ that sees Python. Every fallible method returns either its result or a
// `Failure` object (status code + fields); pagedkv/_cpp.py turns a Failure into the typed error
// of pagedkv/errors.py, so no message is written here. Batch inputs are numpy int64 arrays
// (validated by the facade); batch outputs are numpy arrays that own the C++ buffers they wrap
// (no copy). Token ids are int64 numpy arrays or None (no per-token Python work). The GIL stays
// held: the core has no locks, so calls from Python threads are serialised by it.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#include "block_manager.h"
#include "page_hash.h"
#include "plan.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using pagedkv::BlockManager;
using pagedkv::Failure;

// 1-D contiguous int64 on the CPU (what pagedkv._validate.int_array produces).
using Int64Array = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
// The arrays of a plan: page tables and lengths from the block manager, staging buffers.
using Int32Array = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Int32Table = nb::ndarray<const int32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Int32Out = nb::ndarray<int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Int32TableOut = nb::ndarray<int32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Int64Out = nb::ndarray<int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// An Int64Array argument declared with .none(): None arrives as an invalid array.
pagedkv::TokenIds token_ids_of(const Int64Array& a) {
  pagedkv::TokenIds t;
  if (a.is_valid()) {
    t.size = a.shape(0);
    // NOTE: an empty array still counts as given; data() may be null for it.
    static const int64_t kNoTokens = 0;
    t.data = t.size ? a.data() : &kNoTokens;
  }
  return t;
}

// (src, dst) pairs as a list of tuples (allocate, append).
nb::list copy_list(const std::vector<int32_t>& copies) {
  nb::list out;
  for (size_t i = 0; i + 1 < copies.size(); i += 2)
    out.append(nb::make_tuple(copies[i], copies[i + 1]));
  return out;
}

// A numpy array that takes ownership of `values` (no copy); `shape` must match its size.
template <typename T>
nb::object to_numpy(std::vector<T>&& values, std::initializer_list<size_t> shape) {
  auto heap = std::make_unique<std::vector<T>>(std::move(values));
  T* data = heap->data();
  nb::capsule owner(heap.get(), [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  heap.release();
  return nb::cast(nb::ndarray<nb::numpy, T>(data, shape, owner));
}

template <typename T>
nb::object to_numpy(pagedkv::Buffer<T>&& values, std::initializer_list<size_t> shape) {
  std::unique_ptr<T[]> data(values.release());
  nb::capsule owner(data.get(), [](void* p) noexcept { delete[] static_cast<T*>(p); });
  T* ptr = data.release();
  return nb::cast(nb::ndarray<nb::numpy, T>(ptr, shape, owner));
}

nb::object failure(const Failure& f) { return nb::cast(f); }

}  // namespace

// KV-event records (PrefixIndex's flat int64 layout) as the reference's tuples: built here, so
// the Python side does no per-record decoding (take_events runs every step with events on).
static nb::object int_list(const int64_t* values, size_t n, bool as_uint64) {
  nb::list out = nb::steal<nb::list>(PyList_New(static_cast<Py_ssize_t>(n)));
  for (size_t k = 0; k < n; ++k)
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(k),
                    as_uint64 ? PyLong_FromUnsignedLongLong(static_cast<uint64_t>(values[k]))
                              : PyLong_FromLongLong(values[k]));
  return out;
}

static nb::object int_tuple(const int64_t* values, size_t n) {
  nb::tuple out = nb::steal<nb::tuple>(PyTuple_New(static_cast<Py_ssize_t>(n)));
  for (size_t k = 0; k < n; ++k)
    PyTuple_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(k), PyLong_FromLongLong(values[k]));
  return out;
}

static nb::list event_records(const std::vector<int64_t>& flat, int64_t page_size) {
  using pagedkv::PrefixIndex;
  nb::list out;
  const size_t ps = static_cast<size_t>(page_size);
  size_t i = 0;
  while (i < flat.size()) {
    const int64_t kind = flat[i];
    const int64_t* v = flat.data() + i;
    if (kind == PrefixIndex::kEventStored) {
      out.append(nb::make_tuple(kind, v[1], v[2], v[3], static_cast<uint64_t>(v[4]), static_cast<uint64_t>(v[5]),
                                int_tuple(v + 6, ps)));
      i += 6 + ps;
    } else if (kind == PrefixIndex::kEventRemoved) {
      out.append(nb::make_tuple(kind, v[1], v[2], static_cast<uint64_t>(v[3])));
      i += 4;
    } else if (kind == PrefixIndex::kEventNode) {
      out.append(nb::make_tuple(kind, v[1], v[2], static_cast<uint64_t>(v[3]), static_cast<uint64_t>(v[4]),
                                int_tuple(v + 5, ps)));
      i += 5 + ps;
    } else if (kind == PrefixIndex::kEventDrop) {
      out.append(nb::make_tuple(kind, v[1]));
      i += 2;
    } else {
      out.append(nb::make_tuple(kind));
      i += 1;
    }
  }
  return out;
}

// The same records merged into events as pagedkv.events.EventBuilder merges them (with the
// index's own hashes): (STORED, medium, parent hash or None, [hashes], [tokens]), (REMOVED,
// medium, [hashes]), (CLEARED,). NOTE: the fast path of take_events: one tuple per event.
static nb::list merged_events(const std::vector<int64_t>& flat, int64_t page_size) {
  using pagedkv::PrefixIndex;
  nb::list out;
  const size_t ps = static_cast<size_t>(page_size);
  std::vector<int64_t> hashes, tokens;
  int64_t open_kind = -1, open_medium = -1, open_node = PrefixIndex::kRoot, open_parent_hash = 0;
  bool open_has_parent = false;
  auto flush = [&]() {
    if (open_kind == PrefixIndex::kEventStored) {
      nb::object parent = open_has_parent ? nb::cast(static_cast<uint64_t>(open_parent_hash)) : nb::none();
      out.append(nb::make_tuple(open_kind, open_medium, parent, int_list(hashes.data(), hashes.size(), true),
                                int_list(tokens.data(), tokens.size(), false)));
    } else if (open_kind == PrefixIndex::kEventRemoved) {
      out.append(nb::make_tuple(open_kind, open_medium, int_list(hashes.data(), hashes.size(), true)));
    }
    hashes.clear();
    tokens.clear();
    open_kind = -1;
  };
  size_t i = 0;
  while (i < flat.size()) {
    const int64_t kind = flat[i];
    const int64_t* v = flat.data() + i;
    if (kind == PrefixIndex::kEventStored) {
      const int64_t medium = v[1], node = v[2], parent = v[3];
      if (!(open_kind == kind && open_medium == medium && parent == open_node && parent != PrefixIndex::kRoot)) {
        flush();
        open_kind = kind;
        open_medium = medium;
        open_has_parent = parent != PrefixIndex::kRoot;
        open_parent_hash = v[5];
      }
      hashes.push_back(v[4]);
      tokens.insert(tokens.end(), v + 6, v + 6 + ps);
      open_node = node;
      i += 6 + ps;
    } else if (kind == PrefixIndex::kEventRemoved) {
      if (!(open_kind == kind && open_medium == v[1])) {
        flush();
        open_kind = kind;
        open_medium = v[1];
      }
      hashes.push_back(v[3]);
      i += 4;
    } else if (kind == PrefixIndex::kEventCleared) {
      flush();
      out.append(nb::make_tuple(kind));
      i += 1;
    } else {
      i += kind == PrefixIndex::kEventNode ? 5 + ps : 2;  // node records: not needed here
    }
  }
  flush();
  return out;
}

NB_MODULE(_core, m) {
  m.doc() = "C++ core of the pagedkv block manager (use pagedkv.BlockManager, not this module).";

  // Codes of Failure.status / .argument / .invariant, by name, for pagedkv/_cpp.py.
  nb::dict status, argument, invariant;
  status["ok"] = int(pagedkv::Status::ok);
  status["out_of_pages"] = int(pagedkv::Status::out_of_pages);
  status["unknown_sequence"] = int(pagedkv::Status::unknown_sequence);
  status["sequence_exists"] = int(pagedkv::Status::sequence_exists);
  status["duplicate_sequence"] = int(pagedkv::Status::duplicate_sequence);
  status["invalid_argument"] = int(pagedkv::Status::invalid_argument);
  status["int32_overflow"] = int(pagedkv::Status::int32_overflow);
  status["invariant_violation"] = int(pagedkv::Status::invariant_violation);
  status["sequence_swapped"] = int(pagedkv::Status::sequence_swapped);
  using pagedkv::Arg;
  argument["num_pages"] = int(Arg::num_pages);
  argument["page_size"] = int(Arg::page_size);
  argument["watermark_pages"] = int(Arg::watermark_pages);
  argument["seq_id"] = int(Arg::seq_id);
  argument["num_tokens"] = int(Arg::num_tokens);
  argument["num_tokens_size"] = int(Arg::num_tokens_size);
  argument["page_id"] = int(Arg::page_id);
  argument["start"] = int(Arg::start);
  argument["start_range"] = int(Arg::start_range);
  argument["stop"] = int(Arg::stop);
  argument["max_pages"] = int(Arg::max_pages);
  argument["max_pages_range"] = int(Arg::max_pages_range);
  argument["child_id"] = int(Arg::child_id);
  argument["num_cpu_pages"] = int(Arg::num_cpu_pages);
  argument["hash_bits"] = int(Arg::hash_bits);
  argument["num_tokens_len"] = int(Arg::num_tokens_len);
  argument["token_ids"] = int(Arg::token_ids);
  argument["token_ids_len"] = int(Arg::token_ids_len);
  argument["token_ids_sum"] = int(Arg::token_ids_sum);
  argument["window"] = int(Arg::window);
  argument["start_released"] = int(Arg::start_released);
  argument["num_computed_tokens"] = int(Arg::num_computed_tokens);
  argument["num_computed_tokens_range"] = int(Arg::num_computed_tokens_range);
  argument["num_computed_tokens_stop"] = int(Arg::num_computed_tokens_stop);
  argument["pinned_prefix"] = int(Arg::pinned_prefix);
  argument["priority"] = int(Arg::priority);
  argument["cpu_prefix_cache"] = int(Arg::cpu_prefix_cache);
  argument["row_taken"] = int(Arg::row_taken);
  argument["row_pages"] = int(Arg::row_pages);
  argument["row_width"] = int(Arg::row_width);
  argument["row"] = int(Arg::row);
  argument["seq_ids"] = int(Arg::seq_ids);
  argument["release_before"] = int(Arg::release_before);
  argument["max_cached_tokens"] = int(Arg::max_cached_tokens);
  using pagedkv::Invariant;
  invariant["pages_cover_tokens"] = int(Invariant::pages_cover_tokens);
  invariant["page_in_range"] = int(Invariant::page_in_range);
  invariant["ref_count"] = int(Invariant::ref_count);
  invariant["free_list_unique"] = int(Invariant::free_list_unique);
  invariant["free_page_unreferenced"] = int(Invariant::free_page_unreferenced);
  invariant["conservation"] = int(Invariant::conservation);
  invariant["free_list_links"] = int(Invariant::free_list_links);
  invariant["free_list_size"] = int(Invariant::free_list_size);
  invariant["cpu_ref_count"] = int(Invariant::cpu_ref_count);
  invariant["free_queue_cached"] = int(Invariant::free_queue_cached);
  invariant["cpu_conservation"] = int(Invariant::cpu_conservation);
  invariant["hash_index"] = int(Invariant::hash_index);
  invariant["hash_index_size"] = int(Invariant::hash_index_size);
  invariant["committed_tokens"] = int(Invariant::committed_tokens);
  invariant["pending_tokens"] = int(Invariant::pending_tokens);
  invariant["pending_pages"] = int(Invariant::pending_pages);
  invariant["node_pages"] = int(Invariant::node_pages);
  invariant["node_dependents"] = int(Invariant::node_dependents);
  invariant["pinned_page"] = int(Invariant::pinned_page);
  invariant["cpu_cache"] = int(Invariant::cpu_cache);
  invariant["cpu_lru"] = int(Invariant::cpu_lru);
  m.attr("STATUS") = status;
  m.attr("ARGUMENT") = argument;
  m.attr("INVARIANT") = invariant;
  m.attr("MAX_COUNT") = pagedkv::kMaxCount;

  m.def(
      "page_hash",
      [](uint64_t parent, Int64Array tokens, uint64_t salt) {
        return pagedkv::page_hash(parent, tokens.data(), tokens.shape(0), salt);
      },
      "parent"_a, "tokens"_a, "salt"_a,
      "pagedkv._hashing.page_hash computed by the core (tokens: int64 array), for parity tests.");
  m.def(
      "chain_hashes",
      [](Int64Array tokens, int64_t page_size, uint64_t salt) -> nb::object {
        if (page_size < 1) throw nb::value_error("page_size must be >= 1");
        const size_t ps = static_cast<size_t>(page_size);
        const size_t n = tokens.shape(0) / ps;
        std::vector<uint64_t> out(n);
        uint64_t h = 0;
        for (size_t i = 0; i < n; ++i) out[i] = h = pagedkv::page_hash(h, tokens.data() + i * ps, ps, salt);
        return to_numpy(std::move(out), {n});
      },
      "tokens"_a.noconvert(), "page_size"_a, "salt"_a,
      "The chained page hash of every full page of tokens (int64 array), as the prefix index "
      "keys them: pagedkv.events.block_hashes' fast path.");

  m.def(
      "fill_plan",
      [](Int32Table table, Int32Array seq_lens, Int64Array query_lens, int64_t query_len, Int64Array slots,
         Int32Array first_page, int64_t page_size, int64_t num_pages, int64_t window, Int32TableOut out_table,
         Int32Out out_seq_lens, Int32Out out_qo_indptr, Int64Out out_slots, Int32Out out_first_page,
         int64_t rows) -> nb::tuple {
        const auto refused = [] { return nb::make_tuple(false, 0, 0, 0); };
        const int64_t n = static_cast<int64_t>(table.shape(0));
        // NOTE: every extent is checked here, so no input can make the core read or write
        // out of bounds; a refusal sends the caller to the checked Python path.
        if (rows < n || static_cast<int64_t>(seq_lens.shape(0)) != n ||
            static_cast<int64_t>(out_table.shape(0)) < rows ||
            static_cast<int64_t>(out_seq_lens.shape(0)) < rows ||
            static_cast<int64_t>(out_qo_indptr.shape(0)) < rows + 1 ||
            (query_lens.is_valid() && static_cast<int64_t>(query_lens.shape(0)) != n) ||
            (first_page.is_valid() && (static_cast<int64_t>(first_page.shape(0)) != n ||
                                       !out_first_page.is_valid() ||
                                       static_cast<int64_t>(out_first_page.shape(0)) < rows)))
          return refused();
        pagedkv::PlanInput in;
        in.table = table.data();
        in.num_seqs = n;
        in.width = static_cast<int64_t>(table.shape(1));
        in.seq_lens = seq_lens.data();
        in.query_lens = query_lens.is_valid() ? query_lens.data() : nullptr;
        in.query_len = query_len;
        in.slots = slots.is_valid() ? slots.data() : nullptr;
        in.num_slots = slots.is_valid() ? static_cast<int64_t>(slots.shape(0)) : 0;
        in.first_page = first_page.is_valid() ? first_page.data() : nullptr;
        in.page_size = page_size;
        in.num_pages = num_pages;
        in.window = window;
        pagedkv::PlanOutput out;
        out.table = out_table.data();
        out.max_pages = static_cast<int64_t>(out_table.shape(1));
        out.seq_lens = out_seq_lens.data();
        out.qo_indptr = out_qo_indptr.data();
        out.slots = out_slots.data();
        out.max_tokens = static_cast<int64_t>(out_slots.shape(0));
        out.first_page = first_page.is_valid() ? out_first_page.data() : nullptr;
        out.rows = rows;
        // NOTE: window < 0 is a chunk (-C); bounded so that negating it cannot overflow
        if (page_size < 1 || num_pages < 0 || window < -(INT64_C(1) << 62) || num_pages > (INT64_MAX / page_size))
          return refused();
        // NOTE: the core reads its inputs again after writing outputs: an input sharing memory
        // with an output would be read back changed (and could send reads out of bounds).
        const auto span = [](const void* p, size_t bytes) {
          const auto b = reinterpret_cast<uintptr_t>(p);
          return std::pair<uintptr_t, uintptr_t>(b, b + bytes);
        };
        const std::pair<uintptr_t, uintptr_t> inputs[] = {
            span(table.data(), table.size() * 4), span(seq_lens.data(), seq_lens.size() * 4),
            query_lens.is_valid() ? span(query_lens.data(), query_lens.size() * 8) : span(nullptr, 0),
            slots.is_valid() ? span(slots.data(), slots.size() * 8) : span(nullptr, 0),
            first_page.is_valid() ? span(first_page.data(), first_page.size() * 4) : span(nullptr, 0)};
        const std::pair<uintptr_t, uintptr_t> outputs[] = {
            span(out_table.data(), out_table.size() * 4), span(out_seq_lens.data(), out_seq_lens.size() * 4),
            span(out_qo_indptr.data(), out_qo_indptr.size() * 4), span(out_slots.data(), out_slots.size() * 8),
            out_first_page.is_valid() ? span(out_first_page.data(), out_first_page.size() * 4) : span(nullptr, 0)};
        for (const auto& o : outputs)
          for (const auto& i : inputs)
            if (o.first < o.second && i.first < i.second && o.first < i.second && i.first < o.second)
              return refused();
        for (size_t a = 0; a < 5; ++a)
          for (size_t b = a + 1; b < 5; ++b)
            if (outputs[a].first < outputs[a].second && outputs[b].first < outputs[b].second &&
                outputs[a].first < outputs[b].second && outputs[b].first < outputs[a].second)
              return refused();
        thread_local std::vector<int64_t> scratch;
        const pagedkv::PlanResult r = pagedkv::fill_plan(in, out, scratch);
        if (!r.ok) return refused();
        return nb::make_tuple(true, r.tokens, r.max_seq_len, r.max_q_len);
      },
      "table"_a.noconvert(), "seq_lens"_a.noconvert(), "query_lens"_a.noconvert().none(), "query_len"_a,
      "slots"_a.noconvert().none(), "first_page"_a.noconvert().none(), "page_size"_a, "num_pages"_a,
      "window"_a, "out_table"_a.noconvert(), "out_seq_lens"_a.noconvert(), "out_qo_indptr"_a.noconvert(),
      "out_slots"_a.noconvert(), "out_first_page"_a.noconvert().none(), "rows"_a,
      "Check one batch and write it, padded to `rows`, into plan staging arrays: "
      "(ok, tokens, max_seq_len, max_q_len); ok is False for any batch the checked Python path "
      "(pagedkv._planning.host_plan) would refuse, or arrays that do not fit.");

  nb::class_<Failure>(m, "Failure", "An expected failure: a status code and its fields.")
      .def_prop_ro("status", [](const Failure& f) { return int(f.status); })
      .def_prop_ro("argument", [](const Failure& f) { return int(f.argument); })
      .def_prop_ro("invariant", [](const Failure& f) { return int(f.invariant); })
      .def_prop_ro("values",
                   [](const Failure& f) {
                     return nb::make_tuple(f.values[0], f.values[1], f.values[2], f.values[3]);
                   })
      .def("__repr__", [](const Failure& f) {
        return nb::str("Failure(status={}, argument={}, invariant={}, values=({}, {}, {}, {}))")
            .format(int(f.status), int(f.argument), int(f.invariant), f.values[0], f.values[1],
                    f.values[2], f.values[3]);
      });

  m.def(
      "check_config",
      [](int64_t num_pages, int64_t page_size, int64_t watermark_pages, int64_t num_cpu_pages,
         int64_t hash_bits, bool enable_prefix_caching, bool cpu_prefix_cache) -> nb::object {
        Failure f = BlockManager::check_config(num_pages, page_size, watermark_pages,
                                               num_cpu_pages, hash_bits, enable_prefix_caching,
                                               cpu_prefix_cache);
        return f.ok() ? nb::none() : failure(f);
      },
      "num_pages"_a, "page_size"_a, "watermark_pages"_a, "num_cpu_pages"_a = 0,
      "hash_bits"_a = 64, "enable_prefix_caching"_a = false, "cpu_prefix_cache"_a = false,
      "None when BlockManager(num_pages, page_size, watermark_pages, ..., num_cpu_pages, "
      "hash_bits) is valid, else a Failure.");

  nb::class_<BlockManager>(m, "BlockManager")
      .def(
          "__init__",
          [](BlockManager* self, int64_t num_pages, int64_t page_size, int64_t watermark_pages,
             bool enable_prefix_caching, int64_t num_cpu_pages, int64_t hash_bits,
             bool cpu_prefix_cache, bool enable_kv_events, bool kv_event_nodes) {
            // Last line of defence for direct use of _core; pagedkv/_cpp.py calls check_config
            // first and raises the typed error.
            if (!BlockManager::check_config(num_pages, page_size, watermark_pages, num_cpu_pages,
                                            hash_bits, enable_prefix_caching, cpu_prefix_cache)
                     .ok())
              throw std::invalid_argument("invalid BlockManager configuration (see check_config)");
            new (self) BlockManager(num_pages, page_size, watermark_pages, enable_prefix_caching,
                                    num_cpu_pages, hash_bits, cpu_prefix_cache, enable_kv_events,
                                    kv_event_nodes);
          },
          "num_pages"_a, "page_size"_a, "watermark_pages"_a, "enable_prefix_caching"_a = false,
          "num_cpu_pages"_a = 0, "hash_bits"_a = 64, "cpu_prefix_cache"_a = false,
          "enable_kv_events"_a = false, "kv_event_nodes"_a = false)
      .def_prop_ro("num_pages", &BlockManager::num_pages)
      .def_prop_ro("page_size", &BlockManager::page_size)
      .def_prop_ro("watermark_pages", &BlockManager::watermark_pages)
      .def_prop_ro("enable_prefix_caching", &BlockManager::enable_prefix_caching)
      .def_prop_ro("num_cpu_pages", &BlockManager::num_cpu_pages)
      .def_prop_ro("cpu_prefix_cache", &BlockManager::cpu_prefix_cache)
      .def_prop_ro("enable_kv_events", &BlockManager::enable_kv_events)
      .def(
          "take_merged_events",
          [](BlockManager& self, int64_t page_size) {
            std::vector<int64_t> records;
            self.take_events(records);
            return merged_events(records, page_size);
          },
          "page_size"_a,
          "The KV events since the last call, merged (see merged_events); forgets them.")
      .def(
          "take_events",
          [](BlockManager& self, int64_t page_size) {
            std::vector<int64_t> records;
            self.take_events(records);
            return event_records(records, page_size);
          },
          "page_size"_a,
          "The KV-event records since the last call as the reference's tuples (see "
          "pagedkv/_prefix_index.py); forgets them.")
      .def_prop_ro("num_free_pages", &BlockManager::num_free_pages)
      .def_prop_ro("num_free_cpu_pages", &BlockManager::num_free_cpu_pages)
      .def_prop_ro("num_pinned_pages", &BlockManager::num_pinned_pages)
      .def_prop_ro("num_sequences", &BlockManager::num_sequences)
      .def("has_sequence", &BlockManager::has_sequence, "seq_id"_a)
      .def(
          "is_swapped",
          [](const BlockManager& self, int64_t seq_id) -> nb::object {
            bool out = false;
            Failure f = self.is_swapped(seq_id, out);
            return f.ok() ? nb::bool_(out) : failure(f);
          },
          "seq_id"_a)
      .def(
          "prefix_cache_stats",
          [](const BlockManager& self) {
            const pagedkv::PrefixCacheStats s = self.prefix_cache_stats();
            return nb::make_tuple(s.queries, s.hits, s.query_tokens, s.hit_tokens,
                                  s.num_cached_pages, s.num_evictable_pages, s.num_pinned_prefix_pages,
                                  s.cpu_hit_tokens, s.demotions, s.promotions, s.num_cpu_cached_pages);
          },
          "(queries, hits, query_tokens, hit_tokens, num_cached_pages, num_evictable_pages, "
          "num_pinned_prefix_pages, cpu_hit_tokens, demotions, promotions, num_cpu_cached_pages).")
      .def(
          "page_table",
          [](const BlockManager& self, int64_t seq_id) -> nb::object {
            std::vector<int32_t> pages;
            Failure f = self.page_table(seq_id, pages);
            if (!f.ok()) return failure(f);
            nb::list out;
            for (int32_t page : pages) out.append(page);
            return std::move(out);
          },
          "seq_id"_a)
      .def(
          "num_tokens",
          [](const BlockManager& self, int64_t seq_id) -> nb::object {
            int64_t n = 0;
            Failure f = self.num_tokens(seq_id, n);
            return f.ok() ? nb::int_(n) : failure(f);
          },
          "seq_id"_a)
      .def(
          "ref_count",
          [](const BlockManager& self, int64_t page_id) -> nb::object {
            int64_t n = 0;
            Failure f = self.ref_count(page_id, n);
            return f.ok() ? nb::int_(n) : failure(f);
          },
          "page_id"_a)
      .def(
          "can_allocate",
          [](BlockManager& self, int64_t num_tokens, Int64Array token_ids,
             uint64_t salt, int64_t max_cached_tokens, int64_t release_before) -> nb::object {
            bool ok = false;
            Failure f = self.can_allocate(num_tokens, token_ids_of(token_ids), salt, ok,
                                          max_cached_tokens, release_before);
            return f.ok() ? nb::bool_(ok) : failure(f);
          },
          "num_tokens"_a, "token_ids"_a.none() = nb::none(), "salt"_a = 0,
          "max_cached_tokens"_a = -1, "release_before"_a = 0)
      .def(
          "pages_needed",
          [](BlockManager& self, int64_t num_tokens, Int64Array token_ids, uint64_t salt,
             int64_t max_cached_tokens, int64_t release_before) -> nb::object {
            int64_t need = 0;
            Failure f = self.pages_needed(num_tokens, token_ids_of(token_ids), salt, need,
                                          max_cached_tokens, release_before);
            return f.ok() ? nb::int_(need) : failure(f);
          },
          "num_tokens"_a, "token_ids"_a.none() = nb::none(), "salt"_a = 0,
          "max_cached_tokens"_a = -1, "release_before"_a = 0)
      .def(
          "prefix_match",
          [](const BlockManager& self, Int64Array token_ids, uint64_t salt) -> nb::object {
            std::vector<int8_t> out;
            Failure f = self.prefix_match(token_ids_of(token_ids), salt, out);
            if (!f.ok()) return failure(f);
            nb::bytes raw(reinterpret_cast<const char*>(out.data()), out.size());
            return raw;
          },
          "token_ids"_a, "salt"_a = 0, "int8 states as bytes (see block_manager.h), or a Failure.")
      .def(
          "can_append",
          [](BlockManager& self, int64_t seq_id, int64_t num_tokens) -> nb::object {
            bool ok = false;
            Failure f = self.can_append(seq_id, num_tokens, ok);
            return f.ok() ? nb::bool_(ok) : failure(f);
          },
          "seq_id"_a, "num_tokens"_a)
      .def(
          "allocate",
          [](BlockManager& self, int64_t seq_id, int64_t num_tokens, Int64Array token_ids,
             uint64_t salt, nb::handle num_computed_tokens, int64_t priority,
             int64_t max_cached_tokens, int64_t release_before) -> nb::object {
            // NOTE: a handle rather than std::optional<int64_t> (see page_tables); None means
            // the whole prompt.
            int64_t computed = num_tokens;
            if (!num_computed_tokens.is_none() && !nb::try_cast<int64_t>(num_computed_tokens, computed))
              throw nb::type_error("num_computed_tokens must be an int in the int64 range or None");
            int64_t num_cached = 0;
            std::vector<int32_t> copies;
            Failure f = self.allocate(seq_id, num_tokens, token_ids_of(token_ids), salt, computed,
                                      num_cached, copies, priority, max_cached_tokens, release_before);
            if (!f.ok()) return failure(f);
            return nb::make_tuple(num_cached, copy_list(copies));
          },
          "seq_id"_a, "num_tokens"_a, "token_ids"_a.none() = nb::none(), "salt"_a = 0,
          "num_computed_tokens"_a.none() = nb::none(), "priority"_a = 35,
          "max_cached_tokens"_a = -1, "release_before"_a = 0,
          "(tokens found in the prefix cache, [(src_page, dst_page)]) or a Failure.")
      .def(
          "commit",
          [](BlockManager& self, int64_t seq_id, int64_t num_computed_tokens) -> nb::object {
            int64_t indexed = 0;
            Failure f = self.commit(seq_id, num_computed_tokens, indexed);
            return f.ok() ? nb::int_(indexed) : failure(f);
          },
          "seq_id"_a, "num_computed_tokens"_a, "Pages newly indexed, or a Failure.")
      .def(
          "append",
          [](BlockManager& self, int64_t seq_id, int64_t num_tokens,
             Int64Array token_ids) -> nb::object {
            std::vector<int32_t> copies;
            Failure f = self.append(seq_id, num_tokens, token_ids_of(token_ids), copies);
            if (!f.ok()) return failure(f);
            return copy_list(copies);
          },
          "seq_id"_a, "num_tokens"_a, "token_ids"_a.none() = nb::none())
      .def(
          "append_batch",
          [](BlockManager& self, Int64Array seq_ids, Int64Array num_tokens,
             Int64Array token_ids) -> nb::object {
            pagedkv::StepPlan plan;
            Failure f = self.append_batch(seq_ids.data(), seq_ids.shape(0), num_tokens.data(),
                                          num_tokens.shape(0), token_ids_of(token_ids), plan);
            if (!f.ok()) return failure(f);
            const size_t num_slots = plan.slot_mapping.size();
            const size_t num_copies = plan.copies.size() / 2;
            nb::object slots = to_numpy(std::move(plan.slot_mapping), {num_slots});
            nb::object copies = to_numpy(std::move(plan.copies), {num_copies, 2});
            return nb::make_tuple(slots, copies);
          },
          "seq_ids"_a.noconvert(), "num_tokens"_a.noconvert(), "token_ids"_a.none() = nb::none())
      .def(
          "fork",
          [](BlockManager& self, int64_t parent_id, int64_t child_id) -> nb::object {
            Failure f = self.fork(parent_id, child_id);
            return f.ok() ? nb::none() : failure(f);
          },
          "parent_id"_a, "child_id"_a)
      .def(
          "free",
          [](BlockManager& self, int64_t seq_id) -> nb::object {
            Failure f = self.free(seq_id);
            return f.ok() ? nb::none() : failure(f);
          },
          "seq_id"_a)
      .def(
          "release_window",
          [](BlockManager& self, int64_t seq_id, int64_t window) -> nb::object {
            int64_t released = 0;
            Failure f = self.release_window(seq_id, window, released);
            return f.ok() ? nb::int_(released) : failure(f);
          },
          "seq_id"_a, "window"_a)
      .def("reset_prefix_cache", &BlockManager::reset_prefix_cache)
      .def("end_step", &BlockManager::end_step)
      .def(
          "bind_table",
          [](BlockManager& self, Int32TableOut table, Int32Out lens) {
            // NOTE: the caller (pagedkv._cpp) keeps both arrays alive while they are bound
            // and checks that lens has one entry per row.
            if (!table.is_valid()) {
              self.bind_table(nullptr, 0, 0, nullptr);
              return;
            }
            if (lens.is_valid() && lens.shape(0) != table.shape(0))
              throw nb::value_error("lens must have one entry per table row");
            self.bind_table(table.data(), static_cast<int64_t>(table.shape(0)), static_cast<int64_t>(table.shape(1)),
                            lens.is_valid() ? lens.data() : nullptr);
          },
          "table"_a.noconvert().none(), "lens"_a.noconvert().none())
      .def(
          "set_row",
          [](BlockManager& self, int64_t seq_id, int64_t row) -> nb::object {
            Failure f = self.set_row(seq_id, row);
            return f.ok() ? nb::none() : failure(f);
          },
          "seq_id"_a, "row"_a, "row in [0, rows) (checked by the caller), or -1 to unbind.")
      .def("row_of", &BlockManager::row_of, "seq_id"_a)
      .def(
          "take_offload",
          [](BlockManager& self) {
            std::vector<int32_t> demotions, promotions;
            self.take_offload(demotions, promotions);
            const size_t num_demotions = demotions.size() / 2, num_promotions = promotions.size() / 2;
            return nb::make_tuple(to_numpy(std::move(demotions), {num_demotions, 2}),
                                  to_numpy(std::move(promotions), {num_promotions, 2}));
          },
          "((gpu, cpu) demotions, (cpu, gpu) promotions) as int32 [K, 2] arrays; forgets them.")
      .def(
          "pin_prefix",
          [](BlockManager& self, Int64Array token_ids, uint64_t salt, int64_t release_before) -> nb::object {
            int64_t pinned = 0;
            Failure f = self.pin_prefix(token_ids_of(token_ids), salt, pinned, release_before);
            return f.ok() ? nb::int_(pinned) : failure(f);
          },
          "token_ids"_a, "salt"_a = 0, "release_before"_a = 0)
      .def(
          "unpin_prefix",
          [](BlockManager& self, Int64Array token_ids, uint64_t salt) -> nb::object {
            int64_t released = 0;
            Failure f = self.unpin_prefix(token_ids_of(token_ids), salt, released);
            return f.ok() ? nb::int_(released) : failure(f);
          },
          "token_ids"_a, "salt"_a = 0)
      .def(
          "can_swap_out",
          [](BlockManager& self, Int64Array seq_ids) -> nb::object {
            bool ok = false;
            Failure f = self.can_swap_out(seq_ids.data(), seq_ids.shape(0), ok);
            return f.ok() ? nb::bool_(ok) : failure(f);
          },
          "seq_ids"_a.noconvert())
      .def(
          "can_swap_in",
          [](BlockManager& self, Int64Array seq_ids) -> nb::object {
            bool ok = false;
            Failure f = self.can_swap_in(seq_ids.data(), seq_ids.shape(0), ok);
            return f.ok() ? nb::bool_(ok) : failure(f);
          },
          "seq_ids"_a.noconvert())
      .def(
          "swap_out",
          [](BlockManager& self, Int64Array seq_ids) -> nb::object {
            std::vector<int32_t> copies;
            Failure f = self.swap_out(seq_ids.data(), seq_ids.shape(0), copies);
            if (!f.ok()) return failure(f);
            const size_t num_copies = copies.size() / 2;
            return to_numpy(std::move(copies), {num_copies, 2});
          },
          "seq_ids"_a.noconvert(), "(gpu_page, cpu_page) pairs as an int32 [K, 2] array, or a Failure.")
      .def(
          "swap_in",
          [](BlockManager& self, Int64Array seq_ids) -> nb::object {
            std::vector<int32_t> copies;
            Failure f = self.swap_in(seq_ids.data(), seq_ids.shape(0), copies);
            if (!f.ok()) return failure(f);
            const size_t num_copies = copies.size() / 2;
            return to_numpy(std::move(copies), {num_copies, 2});
          },
          "seq_ids"_a.noconvert(), "(cpu_page, gpu_page) pairs as an int32 [K, 2] array, or a Failure.")
      .def(
          "slots",
          [](const BlockManager& self, int64_t seq_id, int64_t start, int64_t stop) -> nb::object {
            std::vector<int64_t> out;
            Failure f = self.slots(seq_id, start, stop, out);
            if (!f.ok()) return failure(f);
            const size_t n = out.size();
            return to_numpy(std::move(out), {n});
          },
          "seq_id"_a, "start"_a, "stop"_a)
      .def(
          "page_tables",
          [](BlockManager& self, Int64Array seq_ids, nb::handle max_pages) -> nb::object {
            // NOTE: a handle rather than std::optional<int64_t>: nanobind's optional caster
            // costs about a microsecond per call for None, on a per-step path.
            const bool has_max_pages = !max_pages.is_none();
            int64_t width = 0;
            if (has_max_pages && !nb::try_cast<int64_t>(max_pages, width))
              throw nb::type_error("max_pages must be an int in the int64 range or None");
            pagedkv::PageTables out;
            Failure f = self.page_tables(seq_ids.data(), seq_ids.shape(0), width, has_max_pages,
                                         out);
            if (!f.ok()) return failure(f);
            const size_t batch = out.seq_lens.size();
            nb::object table = to_numpy(std::move(out.page_table),
                                        {batch, static_cast<size_t>(out.width)});
            nb::object lens = to_numpy(std::move(out.seq_lens), {batch});
            return nb::make_tuple(table, lens);
          },
          "seq_ids"_a.noconvert(), "max_pages"_a.none())
      .def(
          "window_tables",
          [](BlockManager& self, Int64Array seq_ids, nb::handle max_pages) -> nb::object {
            const bool has_max_pages = !max_pages.is_none();
            int64_t width = 0;
            if (has_max_pages && !nb::try_cast<int64_t>(max_pages, width))
              throw nb::type_error("max_pages must be an int in the int64 range or None");
            pagedkv::PageTables out;
            Failure f = self.page_tables(seq_ids.data(), seq_ids.shape(0), width, has_max_pages,
                                         out, true);
            if (!f.ok()) return failure(f);
            const size_t batch = out.seq_lens.size();
            nb::object table = to_numpy(std::move(out.page_table),
                                        {batch, static_cast<size_t>(out.width)});
            nb::object lens = to_numpy(std::move(out.seq_lens), {batch});
            nb::object first = to_numpy(std::move(out.first_page), {batch});
            return nb::make_tuple(table, lens, first);
          },
          "seq_ids"_a.noconvert(), "max_pages"_a.none(),
          "(page_table [B, width] of live entries, seq_lens [B], first_page [B]) int32, or a Failure.")
      .def(
          "csr",
          [](BlockManager& self, Int64Array seq_ids) -> nb::object {
            pagedkv::CSR out;
            Failure f = self.csr(seq_ids.data(), seq_ids.shape(0), out);
            if (!f.ok()) return failure(f);
            const size_t batch = out.last_page_len.size();
            const size_t total = out.indices.size();
            nb::object indptr = to_numpy(std::move(out.indptr), {batch + 1});
            nb::object indices = to_numpy(std::move(out.indices), {total});
            nb::object last = to_numpy(std::move(out.last_page_len), {batch});
            return nb::make_tuple(indptr, indices, last);
          },
          "seq_ids"_a.noconvert())
      .def("check_invariants",
           [](const BlockManager& self) -> nb::object {
             Failure f = self.check_invariants();
             return f.ok() ? nb::none() : failure(f);
           })
      .def(
          "snapshot",
          [](const BlockManager& self) {
            pagedkv::Snapshot s = self.snapshot();
            auto arr = [](auto&& v) {
              const size_t n = v.size();
              return to_numpy(std::move(v), {n});
            };
            const pagedkv::PrefixCacheStats& st = s.stats;
            nb::object stats = nb::make_tuple(st.queries, st.hits, st.query_tokens, st.hit_tokens,
                                              st.cpu_hit_tokens, st.demotions, st.promotions);
            nb::object cached = nb::make_tuple(arr(std::move(s.cached_pages)), arr(std::move(s.cached_nodes)),
                                               arr(std::move(s.cached_hashes)));
            nb::object nodes = nb::make_tuple(arr(std::move(s.node_ids)), arr(std::move(s.node_hashes)),
                                              arr(std::move(s.node_parents)), arr(std::move(s.node_deps)),
                                              arr(std::move(s.node_indptr)), arr(std::move(s.node_pages)),
                                              arr(std::move(s.node_cpu_pages)));
            const size_t num_demotions = s.demotions.size() / 2, num_promotions = s.promotions.size() / 2;
            nb::object events = event_records(s.events, self.page_size());
            nb::object tier = nb::make_tuple(arr(std::move(s.cpu_lru)),
                                             to_numpy(std::move(s.demotions), {num_demotions, 2}),
                                             to_numpy(std::move(s.promotions), {num_promotions, 2}));
            return nb::make_tuple(arr(std::move(s.free)), arr(std::move(s.evictable)),
                                  arr(std::move(s.ref_count)), arr(std::move(s.cpu_free)),
                                  arr(std::move(s.cpu_ref_count)), arr(std::move(s.seq_ids)),
                                  arr(std::move(s.num_tokens)), arr(std::move(s.indptr)),
                                  arr(std::move(s.pages)), arr(std::move(s.swapped)), cached, nodes,
                                  arr(std::move(s.pinned)), arr(std::move(s.cpu_pinned)),
                                  arr(std::move(s.prefix_pin_indptr)), arr(std::move(s.prefix_pin_pages)), stats,
                                  tier, events);
          },
          "(free, evictable, ref_count, cpu_free, cpu_ref_count, seq_ids, num_tokens, indptr, "
          "pages, swapped) as numpy arrays, then the cached pages (pages, nodes, hashes), the live "
          "nodes (ids, hashes, parents, dependents, indptr, pages), the pinned GPU and CPU pages, and "
          "(queries, hits, query_tokens, hit_tokens, cpu_hit_tokens, demotions, promotions), and the "
          "CPU tier (LRU pages, pending demotions, pending promotions).")
      .def("debug_set_ref_count", &BlockManager::debug_set_ref_count, "page_id"_a, "value"_a)
      .def("debug_set_page", &BlockManager::debug_set_page, "seq_id"_a, "index"_a, "page_id"_a);
}
