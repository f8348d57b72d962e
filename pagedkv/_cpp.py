"""C++ backend of the block manager: ``pagedkv._core`` behind the reference's interface.

``CppBlockManager`` has the constructor, properties and methods of
``pagedkv._reference.ReferenceBlockManager`` and gives the same page ids. The core returns
expected failures as ``_core.Failure`` values (a status code and its fields); this module turns
each into the same exception class, with the same fields, that the reference raises, so the
messages (written in ``pagedkv.errors``) are identical. Hot paths (``append_batch``,
``page_tables``, ``csr``) are one C++ call plus O(1) Python.

Arguments are assumed validated by the facade (``pagedkv.block_manager``); the core still
bounds-checks everything, so a bad direct call raises a typed error instead of crashing.
Must not import torch, triton or hypothesis.
"""

from __future__ import annotations

import numpy as np

from . import _core
from . import _validate as check
from .errors import DuplicateSequence, InvalidArgument, InvariantViolation, OutOfPages
from .errors import PagedKVError, SequenceExists, UnknownSequence

_Failure = _core.Failure
_STATUS = _core.STATUS
_ARGUMENT = {code: name for name, code in _core.ARGUMENT.items()}
_INVARIANT = {code: name for name, code in _core.INVARIANT.items()}

# NOTE: the details of InvariantViolation repeat the reference's text (pagedkv/_reference.py,
# check_invariants) so both backends report a broken invariant identically; the last two
# invariants exist only in the C++ core's linked free queue.
_INVARIANT_DETAIL = {
    "pages_cover_tokens": "sequence {0} holds {1} tokens in {2} pages of {3}",
    "page_in_range": "sequence {0} holds page {1} of {2}",
    "ref_count": "page {0} has ref_count {1} but {2} page-table entries",
    "free_list_unique": "page {0} is on the free list twice or out of range",
    "free_page_unreferenced": "free page {0} has ref_count {1}",
    "conservation": "{0} free + {1} referenced pages != {2} total",
    "free_list_links": "page {0}'s links on the free list do not point back to its neighbours",
    "free_list_size": "{0} pages are linked on the free list but its size says {1}",
}


def _invalid_argument(argument: str, values: tuple[int, ...]) -> Exception:
    """The error the facade or the reference raises for this bad argument."""
    v = values[0]
    if argument == "stop":
        return InvalidArgument("stop", v, f"at most num_tokens({values[1]}) = {values[2]}")
    if argument == "start":
        return InvalidArgument("start", v, f"at most stop = {values[1]}")
    if argument == "max_pages":
        return InvalidArgument("max_pages", v, f"at least the longest page table ({values[1]} pages)")
    if argument == "num_tokens_size":
        return InvalidArgument("num_tokens", f"{v} counts", f"one count per sequence ({values[1]})")
    # Range errors: let the facade's own check build the error, so the text is the facade's.
    ranges = {
        "num_pages": lambda: check.count("num_pages", v),
        "page_size": lambda: check.count("page_size", v),
        "num_tokens": lambda: check.count("num_tokens", v),
        "watermark_pages": lambda: check.as_int("watermark_pages", v, 0, values[1]),
        "seq_id": lambda: check.seq_id(v),
        "child_id": lambda: check.seq_id(v, "child_id"),
        "page_id": lambda: check.as_int("page_id", v, 0, values[1] - 1),
        "start_range": lambda: check.as_int("start", v, 0, check.MAX_COUNT),
        "max_pages_range": lambda: check.as_int("max_pages", v, 0, check.MAX_COUNT),
    }
    try:
        ranges[argument]()
    except PagedKVError as exc:
        return exc
    return InvariantViolation("backend_failure", f"pagedkv._core rejected {argument}={v!r}")


def _error(failure) -> Exception:
    """The typed exception for a ``_core.Failure``."""
    status, values = failure.status, failure.values
    if status == _STATUS["out_of_pages"]:
        return OutOfPages(values[0], values[1], values[2])
    if status == _STATUS["unknown_sequence"]:
        return UnknownSequence(values[0])
    if status == _STATUS["sequence_exists"]:
        return SequenceExists(values[0])
    if status == _STATUS["duplicate_sequence"]:
        return DuplicateSequence("seq_ids", values[0])
    if status == _STATUS["invalid_argument"]:
        return _invalid_argument(_ARGUMENT[failure.argument], values)
    if status == _STATUS["int32_overflow"]:
        # NOTE: the reference builds seq_lens with np.array(..., dtype=np.int32), which raises
        # numpy's OverflowError; let numpy raise its own for the same value.
        try:
            np.array([values[0]], dtype=np.int32)
        except OverflowError as exc:
            return exc
    if status == _STATUS["invariant_violation"]:
        name = _INVARIANT[failure.invariant]
        return InvariantViolation(name, _INVARIANT_DETAIL[name].format(*values))
    return InvariantViolation("backend_failure", f"pagedkv._core returned {failure!r}")


class CppBlockManager:
    """C++ implementation; see ``pagedkv.BlockManager`` for the public documentation."""

    __slots__ = ("_core",)

    def __init__(self, num_pages: int, page_size: int, watermark_pages: int = 0,
                 enable_prefix_caching: bool = False, num_cpu_pages: int = 0, hash_bits: int = 64):
        # TEMPORARY shim until the C++ core gains prefix caching / CPU tier (issue 3 port).
        if enable_prefix_caching or num_cpu_pages:
            from .errors import BackendUnavailable
            raise BackendUnavailable("cpp", "prefix caching and the CPU tier are not in the C++ core yet")
        failure = _core.check_config(num_pages, page_size, watermark_pages)
        if failure is not None:
            raise _error(failure)
        self._core = _core.BlockManager(num_pages, page_size, watermark_pages)

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
    def num_free_pages(self) -> int:
        return self._core.num_free_pages

    @property
    def num_sequences(self) -> int:
        return self._core.num_sequences

    def has_sequence(self, seq_id: int) -> bool:
        return self._core.has_sequence(seq_id)

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

    def can_allocate(self, num_tokens: int) -> bool:
        return self._core.can_allocate(num_tokens)

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        out = self._core.can_append(seq_id, num_tokens)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    # --------------------------------------------------------------- mutators
    def allocate(self, seq_id: int, num_tokens: int, token_ids=None, salt: int = 0):
        out = self._core.allocate(seq_id, num_tokens)
        if out.__class__ is _Failure:
            raise _error(out)
        return out, []

    def append(self, seq_id: int, num_tokens: int, token_ids=None) -> list[tuple[int, int]]:
        out = self._core.append(seq_id, num_tokens)
        if out.__class__ is _Failure:
            raise _error(out)
        return out

    def append_batch(self, seq_ids: np.ndarray, num_tokens: np.ndarray, token_ids=None):
        out = self._core.append_batch(seq_ids, num_tokens)
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
        free, ref_count, seq_ids, num_tokens, indptr, pages = self._core.snapshot()
        seq_ids, num_tokens, indptr, pages = seq_ids.tolist(), num_tokens.tolist(), indptr.tolist(), pages.tolist()
        return {
            "free": free.tolist(),
            "ref_count": ref_count.tolist(),
            "tables": {s: pages[indptr[i] : indptr[i + 1]] for i, s in enumerate(seq_ids)},
            "num_tokens": dict(zip(seq_ids, num_tokens)),
        }
