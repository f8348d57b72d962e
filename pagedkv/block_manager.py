"""The public block manager: maps each sequence's token positions to fixed-size pages.

``BlockManager`` validates arguments (once, for both backends) and dispatches to the C++ core
(``pagedkv._core`` through ``pagedkv._cpp``) or to the pure-Python reference
(``pagedkv._reference``), which is the executable specification. Both give the same page ids
and raise the same errors. Arrays are numpy; this module never imports torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _backend
from . import _validate as check
from ._reference import NULL_PAGE
from .errors import InvalidArgument, InvalidType


class StepPlan(NamedTuple):
    """What the cache must do for one batched append.

    Attributes:
        slot_mapping: int64 ``[num_new_tokens]``; the slot of every new token, sequence by
            sequence in call order, positions ascending.
        copies: int32 ``[num_copies, 2]``; (src_page, dst_page) copy-on-write copies to execute
            before the new tokens are written.
    """

    slot_mapping: np.ndarray
    copies: np.ndarray


class PageTables(NamedTuple):
    """Padded page tables for a batch.

    Attributes:
        page_table: int32 ``[batch_size, max_pages]``; row i is sequence i's page table, padded
            with ``NULL_PAGE`` (-1).
        seq_lens: int32 ``[batch_size]``; tokens held by each sequence.
    """

    page_table: np.ndarray
    seq_lens: np.ndarray


class CSR(NamedTuple):
    """FlashInfer's paged layout for a batch (all int32).

    Attributes:
        indptr: ``[batch_size + 1]``; sequence i's pages are ``indices[indptr[i]:indptr[i+1]]``.
        indices: ``[indptr[-1]]``; page ids, concatenated.
        last_page_len: ``[batch_size]``; tokens in each sequence's last page, in ``[1, page_size]``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    last_page_len: np.ndarray


class BlockManager:
    """Paged KV-cache block manager: free list, ref counts, fork, copy-on-write, batched steps.

    Args:
        num_pages: physical pages in the pool (>= 1).
        page_size: tokens per page (any int >= 1).
        watermark: fraction of pages in ``[0, 1)`` kept free when admitting *new* sequences
            (``allocate``); appends to running sequences may use them. The number of reserved
            pages is ``floor(watermark * num_pages)``.
        backend: ``"cpp"`` or ``"python"``; default ``$PAGEDKV_IMPL`` or the best one built.

    Raises:
        InvalidArgument / InvalidType: a bad argument (names it and the value).
        BackendUnavailable: ``backend="cpp"`` when the extension is not built.

    Every method that fails leaves the manager exactly as it was.
    """

    def __init__(self, num_pages: int, page_size: int, *, watermark: float = 0.0, backend: str | None = None):
        num_pages = check.count("num_pages", num_pages)
        page_size = check.count("page_size", page_size)
        if isinstance(watermark, bool) or not isinstance(watermark, (int, float, np.floating, np.integer)):
            raise InvalidType("watermark", watermark, "a float in [0, 1)")
        if not 0.0 <= float(watermark) < 1.0:  # NaN fails this too
            raise InvalidArgument("watermark", watermark, "a float in [0, 1)")
        self._backend = _backend.resolve(backend)
        self.watermark = float(watermark)
        self._impl = _backend.implementation(self._backend)(
            num_pages, page_size, math.floor(self.watermark * num_pages)
        )

    # ------------------------------------------------------------------ facts
    @property
    def backend(self) -> str:
        """``"cpp"`` or ``"python"``."""
        return self._backend

    @property
    def num_pages(self) -> int:
        return self._impl.num_pages

    @property
    def page_size(self) -> int:
        return self._impl.page_size

    @property
    def watermark_pages(self) -> int:
        """Pages that ``allocate`` leaves free (``floor(watermark * num_pages)``)."""
        return self._impl.watermark_pages

    @property
    def num_free_pages(self) -> int:
        return self._impl.num_free_pages

    @property
    def num_sequences(self) -> int:
        return self._impl.num_sequences

    def __contains__(self, seq_id: object) -> bool:
        return self._impl.has_sequence(check.seq_id(seq_id))

    def usage(self) -> float:
        """Fraction of pages not on the free list, in ``[0, 1]`` (vLLM's KV-cache usage)."""
        return 1.0 - self._impl.num_free_pages / self._impl.num_pages

    def page_table(self, seq_id: int) -> list[int]:
        """Sequence ``seq_id``'s page ids, in token order. Raises UnknownSequence."""
        return self._impl.page_table(check.seq_id(seq_id))

    def num_tokens(self, seq_id: int) -> int:
        """Tokens held by ``seq_id``. Raises UnknownSequence."""
        return self._impl.num_tokens(check.seq_id(seq_id))

    def ref_count(self, page_id: int) -> int:
        """Number of page tables that hold ``page_id``."""
        return self._impl.ref_count(check.as_int("page_id", page_id, 0, self._impl.num_pages - 1))

    # ------------------------------------------------------------- admission
    def can_allocate(self, num_tokens: int) -> bool:
        """Whether ``allocate(new_id, num_tokens)`` would succeed now (watermark included)."""
        return self._impl.can_allocate(check.count("num_tokens", num_tokens))

    def allocate(self, seq_id: int, num_tokens: int) -> int:
        """Create sequence ``seq_id`` holding ``num_tokens`` tokens.

        Returns:
            Tokens found in the prefix cache (0 without prefix caching).

        Raises:
            SequenceExists: ``seq_id`` is live.
            OutOfPages: fewer than ``ceil(num_tokens / page_size)`` pages free above the
                watermark.
        """
        return self._impl.allocate(check.seq_id(seq_id), check.count("num_tokens", num_tokens))

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        """Whether ``append(seq_id, num_tokens)`` would succeed now (copy-on-write included)."""
        return self._impl.can_append(check.seq_id(seq_id), check.count("num_tokens", num_tokens))

    def append(self, seq_id: int, num_tokens: int = 1) -> list[tuple[int, int]]:
        """Grow ``seq_id`` by ``num_tokens`` tokens.

        Returns:
            Copy-on-write copies ``[(src_page, dst_page)]`` the cache must execute before writing
            the new tokens: non-empty when the last page was shared and partly filled.

        Raises:
            UnknownSequence, OutOfPages.
        """
        return self._impl.append(check.seq_id(seq_id), check.count("num_tokens", num_tokens))

    def append_batch(self, seq_ids, num_tokens=1) -> StepPlan:
        """Grow every sequence of a decode or chunked-prefill step, all or nothing.

        Args:
            seq_ids: 1-D ints (list or numpy array), distinct.
            num_tokens: one int for all, or one int >= 1 per sequence.

        Returns:
            ``StepPlan(slot_mapping int64 [sum(num_tokens)], copies int32 [K, 2])``.

        Raises:
            DuplicateSequence, UnknownSequence, OutOfPages (nothing changed).
        """
        ids = check.seq_ids(seq_ids)
        slots, copies = self._impl.append_batch(ids, check.counts("num_tokens", num_tokens, ids.shape[0]))
        return StepPlan(slots, copies)

    def fork(self, parent_id: int, child_id: int) -> None:
        """Make ``child_id`` share every page of ``parent_id`` (each page's ref_count += 1).

        Raises:
            UnknownSequence: the parent is not live. SequenceExists: the child is live.
        """
        self._impl.fork(check.seq_id(parent_id, "parent_id"), check.seq_id(child_id, "child_id"))

    def free(self, seq_id: int) -> None:
        """Drop ``seq_id``; pages whose ref_count reaches 0 return to the free queue tail."""
        self._impl.free(check.seq_id(seq_id))

    # ------------------------------------------------------------ batch views
    def slots(self, seq_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Slots (``page_id * page_size + pos % page_size``) of positions ``[start, stop)``.

        Returns:
            int64 ``[stop - start]``. Use it for the prompt tokens of a new sequence.
        """
        seq_id = check.seq_id(seq_id)
        stop = self._impl.num_tokens(seq_id) if stop is None else check.as_int("stop", stop, 0, check.MAX_COUNT)
        return self._impl.slots(seq_id, check.as_int("start", start, 0, check.MAX_COUNT), stop)

    def page_tables(self, seq_ids, max_pages: int | None = None) -> PageTables:
        """Padded page tables of a batch.

        Args:
            seq_ids: 1-D ints.
            max_pages: width to pad to (e.g. fixed for CUDA graphs); default the longest table.

        Returns:
            ``PageTables(page_table int32 [B, max_pages], seq_lens int32 [B])``.
        """
        if max_pages is not None:
            max_pages = check.as_int("max_pages", max_pages, 0, check.MAX_COUNT)
        return PageTables(*self._impl.page_tables(check.seq_ids(seq_ids), max_pages))

    def csr(self, seq_ids) -> CSR:
        """FlashInfer's ``(indptr, indices, last_page_len)`` for a batch (int32 arrays)."""
        return CSR(*self._impl.csr(check.seq_ids(seq_ids)))

    # ------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Check every invariant in O(num_pages + page-table entries).

        Raises:
            InvariantViolation: naming the broken invariant (``ref_count``, ``conservation``,
                ``free_list_unique``, ``free_page_unreferenced``, ``pages_cover_tokens``, ...).
        """
        self._impl.check_invariants()

    def snapshot(self) -> dict:
        """The whole observable state (free queue order, ref counts, tables), for tests."""
        return self._impl.snapshot()

    def __repr__(self) -> str:
        return (
            f"BlockManager(num_pages={self.num_pages}, page_size={self.page_size}, "
            f"watermark={self.watermark}, backend={self.backend!r})"
        )

    @classmethod
    def for_budget(cls, spec, budget_bytes: int, page_size: int, **kwargs) -> "BlockManager":
        """A manager with as many pages as ``budget_bytes`` of KV cache holds.

        Args:
            spec: ``pagedkv.spec.KVCacheSpec`` of the model (one page = ``page_size`` tokens of
                K and V in every layer, ``spec.page_bytes(page_size)`` bytes).
            budget_bytes: bytes for the KV cache, e.g. ``pagedkv.spec.gpu_budget_bytes(0.9)``
                (a fraction of the GPU's free memory) or ``kv_budget_bytes(...)``.
            page_size: tokens per page.
            **kwargs: passed to ``BlockManager`` (``watermark``, ``backend``).

        Returns:
            ``BlockManager(num_pages_for_budget(spec, budget_bytes, page_size), page_size, ...)``.

        Raises:
            InvalidArgument: the budget holds less than one page, or a bad argument.
        """
        from .spec import num_pages_for_budget  # NOTE: lazy, so the facade's import stays minimal

        return cls(num_pages_for_budget(spec, budget_bytes, page_size), page_size, **kwargs)


__all__ = ["BlockManager", "StepPlan", "PageTables", "CSR", "NULL_PAGE"]
