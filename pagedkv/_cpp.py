"""C++ backend of the block manager: ``pagedkv._core`` behind the reference's interface.

``CppBlockManager`` has the constructor, properties and methods of
``pagedkv._reference.ReferenceBlockManager`` and gives the same page ids. The core returns
expected failures as ``_core.Failure`` values (a status code and its fields); this module turns
each into the same exception class, with the same fields, that the reference raises, so the
messages (written in ``pagedkv.errors``) are identical. Hot paths (``append_batch``,
``page_tables``, ``csr``, and ``allocate`` with a long prompt's token ids, an int64 array read
in place) are one C++ call plus O(1) Python.

Arguments are assumed validated by the facade (``pagedkv.block_manager``); the core still
bounds-checks everything, so a bad direct call raises a typed error instead of crashing.
Must not import torch, triton or hypothesis.
"""

from __future__ import annotations

import numpy as np

from . import _core
from . import _validate as check
from ._reference import MAX_PRIORITY, MIN_PRIORITY
from .errors import DuplicateSequence, InvalidArgument, InvariantViolation, OutOfPages, PagedKVError
from .errors import SequenceExists, SequenceSwapped, SequenceTooLong, UnknownSequence, invalid_argument

_Failure = _core.Failure
_STATUS = _core.STATUS
_ARGUMENT = {code: name for name, code in _core.ARGUMENT.items()}
_INVARIANT = {code: name for name, code in _core.INVARIANT.items()}
_MASK64 = (1 << 64) - 1


def _ids(token_ids):
    """Token ids as the core takes them: an int64 array (what the facade passes) or None."""
    if token_ids is None or token_ids.__class__ is np.ndarray:
        return token_ids
    return np.asarray(token_ids, dtype=np.int64)  # NOTE: a direct caller's list, as the reference accepts


def _invalid_argument(argument: str, values: tuple[int, ...]) -> Exception:
    """The error the facade or the reference raises for this bad argument."""
    v = values[0]
    if argument == "stop":
        return invalid_argument("stop", v, "stop", values[1], values[2])
    if argument == "start":
        return invalid_argument("start", v, "start", values[1])
    if argument == "start_released":
        return invalid_argument("start", v, "start_released")
    if argument == "max_pages":
        return invalid_argument("max_pages", v, "max_pages", values[1])
    if argument == "num_tokens_len":
        return invalid_argument("num_tokens", v, "num_tokens_len", values[1])
    if argument == "token_ids_len":
        return invalid_argument("token_ids", f"{v} token ids", "token_ids_len", values[1])
    if argument == "token_ids_sum":
        return invalid_argument("token_ids", f"{v} token ids", "token_ids_sum", values[1])
    if argument == "pinned_prefix":
        return invalid_argument("token_ids", f"{v} token ids", "pinned_prefix")
    if argument == "cpu_prefix_cache":
        return InvalidArgument("cpu_prefix_cache", True, "False unless enable_prefix_caching=True and num_cpu_pages >= 1")
    if argument == "row":
        return invalid_argument("row", v, "row", values[1])
    if argument == "row_taken":
        return invalid_argument("row", v, "row_taken", values[1])
    if argument == "row_width":
        return invalid_argument("num_tokens", v, "row_width", values[1], values[2])
    if argument == "release_before":
        return invalid_argument("release_before", v, "release_before", values[1])
    if argument == "num_computed_tokens_stop":
        return invalid_argument("num_computed_tokens", v, "num_computed_tokens", values[1], values[2])
    # Range errors: let the facade's own check build the error, so the text is the facade's.
    ranges = {
        "num_pages": lambda: check.count("num_pages", v),
        "page_size": lambda: check.count("page_size", v),
        "num_tokens": lambda: check.count("num_tokens", v),
        "num_tokens_size": lambda: check.counts("num_tokens", np.zeros(v, dtype=np.int64) + 1, values[1]),
        "watermark_pages": lambda: check.as_int("watermark_pages", v, 0, values[1]),
        "num_cpu_pages": lambda: check.as_int("num_cpu_pages", v, 0, check.MAX_COUNT),
        "hash_bits": lambda: check.as_int("_hash_bits", v, 1, 64),
        "seq_id": lambda: check.seq_id(v),
        "seq_ids": lambda: check.seq_ids(np.array([v], dtype=np.int64)),
        "child_id": lambda: check.seq_id(v, "child_id"),
        "page_id": lambda: check.as_int("page_id", v, 0, values[1] - 1),
        "start_range": lambda: check.as_int("start", v, 0, check.MAX_SEQ_ID),
        "max_pages_range": lambda: check.as_int("max_pages", v, 0, check.MAX_COUNT),
        "token_ids": lambda: check.int_array("token_ids", np.array([v], dtype=np.int64), 0, check.MAX_TOKEN_ID),
        "window": lambda: check.count("window", v),
        "num_computed_tokens": lambda: check.as_int("num_computed_tokens", v, 0, values[1]),
        "num_computed_tokens_range": lambda: check.as_int("num_computed_tokens", v, 0, check.MAX_SEQ_ID),
        "priority": lambda: check.as_int("priority", v, MIN_PRIORITY, MAX_PRIORITY),
        "max_cached_tokens": lambda: check.as_int("max_cached_tokens", v, 0, check.MAX_SEQ_ID),
    }
    try:
        ranges[argument]()
    except PagedKVError as exc:
        return exc
    return InvariantViolation("backend_failure", f"pagedkv._core rejected {argument}={v!r}")


def _invariant_violation(name: str, values: tuple[int, ...]) -> InvariantViolation:
    """The reference's InvariantViolation for the core's fields (hashes come back as int64)."""
    if name == "free_queue_cached":
        page, evictable, has_hash, h = values
        return InvariantViolation.of(name, page, "evictable" if evictable else "free", h & _MASK64 if has_hash else None)
    if name == "hash_index":
        return InvariantViolation.of(name, values[0] & _MASK64, values[1])
    if name == "pinned_page":
        return InvariantViolation.of(name, values[0], "cpu free" if values[1] else "free")
    if name == "cpu_lru":
        what = ("a free page", "referenced", "not cached", "pinned", "a free or referenced page holding cached content")
        return InvariantViolation.of(name, values[0], what[values[1]])
    return InvariantViolation.of(name, *values)


def _error(failure) -> Exception:
    """The typed exception for a ``_core.Failure``."""
    status, values = failure.status, failure.values
    if status == _STATUS["out_of_pages"]:
        return OutOfPages(values[0], values[1], values[2], pool="cpu" if values[3] else "gpu")
    if status == _STATUS["unknown_sequence"]:
        return UnknownSequence(values[0])
    if status == _STATUS["sequence_exists"]:
        return SequenceExists(values[0])
    if status == _STATUS["sequence_swapped"]:
        return SequenceSwapped(values[0], bool(values[1]))
    if status == _STATUS["duplicate_sequence"]:
        return DuplicateSequence("seq_ids", values[0])
    if status == _STATUS["invalid_argument"]:
        return _invalid_argument(_ARGUMENT[failure.argument], values)
    if status == _STATUS["int32_overflow"]:
        return SequenceTooLong(values[0], values[1])
    if status == _STATUS["invariant_violation"]:
        return _invariant_violation(_INVARIANT[failure.invariant], values)
    return InvariantViolation("backend_failure", f"pagedkv._core returned {failure!r}")


class CppBlockManager:
    """C++ implementation; see ``pagedkv.BlockManager`` for the public documentation."""

    __slots__ = ("_core", "_page_size", "_bound")

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        watermark_pages: int = 0,
        enable_prefix_caching: bool = False,
        num_cpu_pages: int = 0,
        hash_bits: int = 64,
        cpu_prefix_cache: bool = False,
        enable_kv_events: bool = False,
        kv_event_nodes: bool = False,
    ):
        failure = _core.check_config(num_pages, page_size, watermark_pages, num_cpu_pages, hash_bits,
                                     bool(enable_prefix_caching), bool(cpu_prefix_cache))
        if failure is not None:
            raise _error(failure)
        self._core = _core.BlockManager(
            num_pages, page_size, watermark_pages, bool(enable_prefix_caching), num_cpu_pages, hash_bits,
            bool(cpu_prefix_cache), bool(enable_kv_events), bool(kv_event_nodes)
        )
        self._page_size = page_size
        self._bound = (None, None)

    # ----------------------------------------------------------------- queries
    @property
    def num_pages(self) -> int:
        return self._core.num_pages

    @property
    def page_size(self) -> int:
        return self._core.page_size

    @property
    def watermark_pages(self) -> int:
        return self._core.watermark_pages

    @property
    def enable_prefix_caching(self) -> bool:
        return self._core.enable_prefix_caching

    @property
    def num_cpu_pages(self) -> int:
        return self._core.num_cpu_pages

    @property
    def cpu_prefix_cache(self) -> bool:
        return self._core.cpu_prefix_cache

    @property
    def num_free_pages(self) -> int:
        return self._core.num_free_pages

    @property
    def num_free_cpu_pages(self) -> int:
        return self._core.num_free_cpu_pages

    @property
    def num_pinned_pages(self) -> int:
        return self._core.num_pinned_pages

    @property
    def num_sequences(self) -> int:
        return self._core.num_sequences

    def has_sequence(self, seq_id: int) -> bool:
        return self._core.has_sequence(seq_id)

    def is_swapped(self, seq_id: int) -> bool:
        out = self._core.is_swapped(seq_id)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def page_table(self, seq_id: int) -> list[int]:
        out = self._core.page_table(seq_id)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def num_tokens(self, seq_id: int) -> int:
        out = self._core.num_tokens(seq_id)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def ref_count(self, page_id: int) -> int:
        out = self._core.ref_count(page_id)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def prefix_cache_stats(self) -> dict:
        (queries, hits, query_tokens, hit_tokens, cached, evictable, pinned, cpu_hit_tokens, demotions, promotions,
         cpu_cached) = self._core.prefix_cache_stats()
        return {
            "queries": queries,
            "hits": hits,
            "query_tokens": query_tokens,
            "hit_tokens": hit_tokens,
            "num_cached_pages": cached,
            "num_evictable_pages": evictable,
            "num_pinned_prefix_pages": pinned,
            "cpu_hit_tokens": cpu_hit_tokens,
            "demotions": demotions,
            "promotions": promotions,
            "num_cpu_cached_pages": cpu_cached,
        }

    def can_allocate(self, num_tokens: int, token_ids: np.ndarray | None = None, salt: int = 0,
                     max_cached_tokens: int | None = None, release_before: int = 0) -> bool:
        out = self._core.can_allocate(num_tokens, _ids(token_ids), salt,
                                      -1 if max_cached_tokens is None else max_cached_tokens, release_before)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def pages_needed(self, num_tokens: int, token_ids: np.ndarray | None = None, salt: int = 0,
                     max_cached_tokens: int | None = None, release_before: int = 0) -> int:
        out = self._core.pages_needed(num_tokens, _ids(token_ids), salt,
                                      -1 if max_cached_tokens is None else max_cached_tokens, release_before)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def prefix_match(self, token_ids: np.ndarray, salt: int = 0) -> np.ndarray:
        out = self._core.prefix_match(_ids(token_ids), salt)
        if out.__class__ is _Failure:
            raise _error(out)
        return np.frombuffer(out, dtype=np.int8).copy()

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        out = self._core.can_append(seq_id, num_tokens)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    # --------------------------------------------------------------- mutators
    def allocate(
        self,
        seq_id: int,
        num_tokens: int,
        token_ids: np.ndarray | None = None,
        salt: int = 0,
        num_computed_tokens: int | None = None,
        priority: int = 35,
        max_cached_tokens: int | None = None,
        release_before: int = 0,
    ):
        """Returns (tokens found cached, copy-on-write copies); token_ids: int64 array or None."""
        out = self._core.allocate(seq_id, num_tokens, _ids(token_ids), salt, num_computed_tokens, priority,
                                  -1 if max_cached_tokens is None else max_cached_tokens, release_before)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def commit(self, seq_id: int, num_computed_tokens: int) -> int:
        """Returns the pages newly indexed."""
        out = self._core.commit(seq_id, num_computed_tokens)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def append(self, seq_id: int, num_tokens: int, token_ids: np.ndarray | None = None) -> list[tuple[int, int]]:
        out = self._core.append(seq_id, num_tokens, _ids(token_ids))
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def append_batch(self, seq_ids: np.ndarray, num_tokens: np.ndarray, token_ids: np.ndarray | None = None):
        out = self._core.append_batch(seq_ids, num_tokens, _ids(token_ids))
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def fork(self, parent_id: int, child_id: int) -> None:
        out = self._core.fork(parent_id, child_id)
        if out is not None:
            raise _error(out)

    def free(self, seq_id: int) -> None:
        out = self._core.free(seq_id)
        if out is not None:
            raise _error(out)

    def bind_table(self, table: np.ndarray | None, lens: np.ndarray | None) -> None:
        self._core.bind_table(table, lens)
        self._bound = (table, lens)  # NOTE: the core writes into them: keep them alive

    def set_row(self, seq_id: int, row: int) -> None:
        out = self._core.set_row(seq_id, row)
        if out is not None:
            if _ARGUMENT.get(out.argument) == "row_pages":  # NOTE: the core does not echo the row
                raise invalid_argument("row", row, "row_pages", *out.values[:3])
            raise _error(out)

    def row_of(self, seq_id: int) -> int:
        return self._core.row_of(seq_id)

    def release_window(self, seq_id: int, window: int) -> int:
        out = self._core.release_window(seq_id, window)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def reset_prefix_cache(self) -> None:
        self._core.reset_prefix_cache()

    def end_step(self) -> None:
        self._core.end_step()

    def take_offload(self):
        return self._core.take_offload()

    @property
    def enable_kv_events(self) -> bool:
        return self._core.enable_kv_events

    def take_events(self) -> list[tuple]:
        return self._core.take_events(self._page_size)

    def take_merged_events(self) -> list[tuple]:
        """take_events merged into one tuple per event in C++ (see EventBuilder.wrap)."""
        return self._core.take_merged_events(self._page_size)

    def pin_prefix(self, token_ids: np.ndarray, salt: int = 0, release_before: int = 0) -> int:
        out = self._core.pin_prefix(_ids(token_ids), salt, release_before)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def unpin_prefix(self, token_ids: np.ndarray, salt: int = 0) -> int:
        out = self._core.unpin_prefix(_ids(token_ids), salt)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    # ----------------------------------------------------------------- CPU tier
    def can_swap_out(self, seq_ids: np.ndarray) -> bool:
        out = self._core.can_swap_out(seq_ids)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def can_swap_in(self, seq_ids: np.ndarray) -> bool:
        out = self._core.can_swap_in(seq_ids)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def swap_out(self, seq_ids: np.ndarray) -> np.ndarray:
        out = self._core.swap_out(seq_ids)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def swap_in(self, seq_ids: np.ndarray) -> np.ndarray:
        out = self._core.swap_in(seq_ids)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    # ------------------------------------------------------------ batch views
    def slots(self, seq_id: int, start: int, stop: int) -> np.ndarray:
        out = self._core.slots(seq_id, start, stop)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def page_tables(self, seq_ids: np.ndarray, max_pages: int | None):
        out = self._core.page_tables(seq_ids, max_pages)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def window_tables(self, seq_ids: np.ndarray, max_pages: int | None):
        out = self._core.window_tables(seq_ids, max_pages)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def csr(self, seq_ids: np.ndarray):
        out = self._core.csr(seq_ids)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    # ------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        out = self._core.check_invariants()
        if out is not None:
            raise _error(out)

    def snapshot(self) -> dict:
        """Complete observable state, for parity and atomicity tests (as the reference's)."""
        (free, evictable, ref_count, cpu_free, cpu_ref_count, seq_ids, num_tokens, indptr, pages, swapped,
         cached, nodes, pinned, cpu_pinned, pin_indptr, pin_pages, stats, tier, events) = self._core.snapshot()
        pin_indptr, pin_pages = pin_indptr.tolist(), pin_pages.tolist()
        cached_pages, cached_nodes, cached_hashes = (a.tolist() for a in cached)
        node_ids, node_hashes, node_parents, node_deps, node_indptr, node_pages, node_cpu = (a.tolist() for a in nodes)
        cpu_lru, demotions, promotions = tier
        seq_ids, num_tokens, indptr, pages = seq_ids.tolist(), num_tokens.tolist(), indptr.tolist(), pages.tolist()
        queries, hits, query_tokens, hit_tokens, cpu_hit_tokens, num_demotions, num_promotions = stats
        return {
            "free": free.tolist(),
            "evictable": evictable.tolist(),
            "ref_count": ref_count.tolist(),
            "cpu_free": cpu_free.tolist(),
            "cpu_ref_count": cpu_ref_count.tolist(),
            "tables": {s: pages[indptr[i] : indptr[i + 1]] for i, s in enumerate(seq_ids)},
            "num_tokens": dict(zip(seq_ids, num_tokens)),
            "swapped": swapped.tolist(),
            "pinned": pinned.tolist(),
            "prefix_pins": [pin_pages[pin_indptr[i]:pin_indptr[i + 1]] for i in range(len(pin_indptr) - 1)],
            "cpu_pinned": cpu_pinned.tolist(),
            "cpu_lru": cpu_lru.tolist(),
            "offload": ([tuple(p) for p in demotions.tolist()], [tuple(p) for p in promotions.tolist()]),
            "events": events,
            "index": {p: (n, h) for p, n, h in zip(cached_pages, cached_nodes, cached_hashes)},
            "nodes": {n: (h, parent, deps, tuple(node_pages[node_indptr[i]:node_indptr[i + 1]]), cpu)
                      for i, (n, h, parent, deps, cpu) in enumerate(zip(node_ids, node_hashes, node_parents, node_deps,
                                                                        node_cpu))},
            "stats": {"queries": queries, "hits": hits, "query_tokens": query_tokens, "hit_tokens": hit_tokens,
                      "cpu_hit_tokens": cpu_hit_tokens, "demotions": num_demotions, "promotions": num_promotions},
        }
