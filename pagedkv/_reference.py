"""Pure-Python block manager: the executable specification of the C++ core.

This module owns the allocation semantics. The C++ core in ``csrc/`` must behave identically,
page id for page id and error for error; ``tests/test_parity.py`` drives both in lockstep.

Arguments reaching this class are already type-checked by the facade in ``block_manager.py``;
what is checked here is state (unknown or existing sequences, free pages). Every method checks
everything before it changes anything, so a failing call leaves the manager as it was.

Must not import torch, triton or hypothesis.
"""

from __future__ import annotations

from array import array
from collections import deque

import numpy as np

from .errors import DuplicateSequence, InvalidArgument, InvariantViolation, OutOfPages
from .errors import SequenceExists, UnknownSequence

#: Page id written in padded page-table entries (and, later, in released window entries).
NULL_PAGE = -1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class ReferenceBlockManager:
    """Reference implementation; see ``pagedkv.BlockManager`` for the public documentation."""

    def __init__(self, num_pages: int, page_size: int, watermark_pages: int = 0):
        self.num_pages = num_pages
        self.page_size = page_size
        self.watermark_pages = watermark_pages
        # NOTE: the free queue hands out pages from its head and takes freed pages at its tail,
        # so the least recently freed page is reused first. A new manager's queue is 0..N-1.
        self._free: deque[int] = deque(range(num_pages))
        self._ref_count = [0] * num_pages
        # NOTE: page tables are array('i') rather than lists so that padded numpy page tables
        # are built from their bytes, not element by element (the batch path runs every step).
        self._tables: dict[int, array] = {}
        self._num_tokens: dict[int, int] = {}

    # ----------------------------------------------------------------- queries
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def page_table(self, seq_id: int) -> list[int]:
        return list(self._table(seq_id))

    def num_tokens(self, seq_id: int) -> int:
        self._table(seq_id)
        return self._num_tokens[seq_id]

    def ref_count(self, page_id: int) -> int:
        return self._ref_count[page_id]

    def can_allocate(self, num_tokens: int) -> bool:
        return _cdiv(num_tokens, self.page_size) <= len(self._free) - self.watermark_pages

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        return self._pages_to_append(seq_id, num_tokens, {}) <= len(self._free)

    # --------------------------------------------------------------- mutators
    def allocate(self, seq_id: int, num_tokens: int) -> int:
        if seq_id in self._tables:
            raise SequenceExists(seq_id)
        need = _cdiv(num_tokens, self.page_size)
        available = len(self._free) - self.watermark_pages
        if need > available:
            raise OutOfPages(need, max(available, 0), self.num_pages)
        table = array("i", (self._take_free_page() for _ in range(need)))
        self._tables[seq_id] = table
        self._num_tokens[seq_id] = num_tokens
        return 0  # tokens found in the prefix cache (always 0 without prefix caching)

    def append(self, seq_id: int, num_tokens: int) -> list[tuple[int, int]]:
        need = self._pages_to_append(seq_id, num_tokens, {})
        if need > len(self._free):
            raise OutOfPages(need, len(self._free), self.num_pages)
        copies: list[tuple[int, int]] = []
        self._grow(seq_id, num_tokens, copies)
        return copies

    def append_batch(self, seq_ids: np.ndarray, num_tokens: np.ndarray):
        seq_ids, num_tokens = seq_ids.tolist(), num_tokens.tolist()
        seen: set[int] = set()
        cow_drops: dict[int, int] = {}
        need = 0
        for seq_id, n in zip(seq_ids, num_tokens):
            if seq_id in seen:
                raise DuplicateSequence("seq_ids", seq_id)
            seen.add(seq_id)
            need += self._pages_to_append(seq_id, n, cow_drops)
        if need > len(self._free):
            raise OutOfPages(need, len(self._free), self.num_pages)
        slots = np.empty(sum(num_tokens), dtype=np.int64)
        copies: list[tuple[int, int]] = []
        ps = self.page_size
        out = 0
        for seq_id, n in zip(seq_ids, num_tokens):
            start = self._num_tokens[seq_id]
            table = self._grow(seq_id, n, copies)
            for pos in range(start, start + n):
                slots[out] = table[pos // ps] * ps + pos % ps
                out += 1
        return slots, np.array(copies, dtype=np.int32).reshape(-1, 2)

    def fork(self, parent_id: int, child_id: int) -> None:
        parent = self._table(parent_id)
        if child_id in self._tables:
            raise SequenceExists(child_id)
        for page in parent:
            self._ref_count[page] += 1
        self._tables[child_id] = array("i", parent)
        self._num_tokens[child_id] = self._num_tokens[parent_id]

    def free(self, seq_id: int) -> None:
        table = self._table(seq_id)
        # NOTE: a sequence's pages are released last page first, so that when they are reused
        # in queue order the tail of a freed sequence goes before its head (the head is the
        # part most likely to be shared again, which matters once pages are cached).
        for page in reversed(table):
            self._ref_count[page] -= 1
            if self._ref_count[page] == 0:
                self._free.append(page)
        del self._tables[seq_id]
        del self._num_tokens[seq_id]

    # ------------------------------------------------------------ batch views
    def slots(self, seq_id: int, start: int, stop: int) -> np.ndarray:
        table = self._table(seq_id)
        n = self._num_tokens[seq_id]
        if stop > n:
            raise InvalidArgument("stop", stop, f"at most num_tokens({seq_id}) = {n}")
        if start > stop:
            raise InvalidArgument("start", start, f"at most stop = {stop}")
        ps = self.page_size
        return np.array([table[p // ps] * ps + p % ps for p in range(start, stop)], dtype=np.int64)

    def page_tables(self, seq_ids: np.ndarray, max_pages: int | None):
        seq_ids = seq_ids.tolist()
        tables = [self._table(s) for s in seq_ids]
        width = max((len(t) for t in tables), default=0)
        if max_pages is not None:
            if max_pages < width:
                raise InvalidArgument("max_pages", max_pages, f"at least the longest page table ({width} pages)")
            width = max_pages
        pad = array("i", [NULL_PAGE]) * width
        rows = b"".join(t.tobytes() + pad[len(t):].tobytes() for t in tables)
        out = np.frombuffer(rows, dtype=np.int32).reshape(len(tables), width).copy()
        seq_lens = np.array([self._num_tokens[s] for s in seq_ids], dtype=np.int32)
        return out, seq_lens

    def csr(self, seq_ids: np.ndarray):
        seq_ids = seq_ids.tolist()
        tables = [self._table(s) for s in seq_ids]
        lens = np.array([len(t) for t in tables], dtype=np.int32)
        indptr = np.zeros(len(tables) + 1, dtype=np.int32)
        np.cumsum(lens, out=indptr[1:])
        indices = np.frombuffer(b"".join(t.tobytes() for t in tables), dtype=np.int32).copy()
        ps = self.page_size
        last = np.array([(self._num_tokens[s] - 1) % ps + 1 for s in seq_ids], dtype=np.int32)
        return indptr, indices, last

    # ------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        n = self.num_pages
        refs = [0] * n
        for seq_id, table in self._tables.items():
            tokens = self._num_tokens[seq_id]
            if len(table) != _cdiv(tokens, self.page_size):
                raise InvariantViolation(
                    "pages_cover_tokens",
                    f"sequence {seq_id} holds {tokens} tokens in {len(table)} pages of {self.page_size}",
                )
            for page in table:
                if not 0 <= page < n:
                    raise InvariantViolation("page_in_range", f"sequence {seq_id} holds page {page} of {n}")
                refs[page] += 1
        if refs != self._ref_count:
            bad = next(p for p in range(n) if refs[p] != self._ref_count[p])
            raise InvariantViolation(
                "ref_count",
                f"page {bad} has ref_count {self._ref_count[bad]} but {refs[bad]} page-table entries",
            )
        on_free = [False] * n
        for page in self._free:
            if not 0 <= page < n or on_free[page]:
                raise InvariantViolation("free_list_unique", f"page {page} is on the free list twice or out of range")
            on_free[page] = True
            if refs[page]:
                raise InvariantViolation("free_page_unreferenced", f"free page {page} has ref_count {refs[page]}")
        used = sum(1 for r in refs if r)
        if used + len(self._free) != n:
            raise InvariantViolation(
                "conservation", f"{len(self._free)} free + {used} referenced pages != {n} total"
            )

    def snapshot(self) -> dict:
        """Complete observable state, for parity and atomicity tests."""
        return {
            "free": list(self._free),
            "ref_count": list(self._ref_count),
            "tables": {s: list(t) for s, t in sorted(self._tables.items())},
            "num_tokens": dict(sorted(self._num_tokens.items())),
        }

    # ---------------------------------------------------------------- helpers
    def _table(self, seq_id: int) -> array:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise UnknownSequence(seq_id) from None

    def _pages_to_append(self, seq_id: int, num_tokens: int, cow_drops: dict[int, int]) -> int:
        """Pages that appending ``num_tokens`` to ``seq_id`` takes from the free queue.

        ``cow_drops`` counts copy-on-write releases planned earlier in the same batch, so that a
        page shared by two sequences of one batch is copied only for the first of them.
        """
        table = self._table(seq_id)
        current = self._num_tokens[seq_id]
        need = _cdiv(current + num_tokens, self.page_size) - len(table)
        if current % self.page_size:
            last = table[-1]
            if self._ref_count[last] - cow_drops.get(last, 0) > 1:
                cow_drops[last] = cow_drops.get(last, 0) + 1
                need += 1
        return need

    def _take_free_page(self) -> int:
        page = self._free.popleft()
        self._ref_count[page] = 1
        return page

    def _grow(self, seq_id: int, num_tokens: int, copies: list[tuple[int, int]]) -> array:
        """Add ``num_tokens`` to a sequence whose page needs were already checked."""
        table = self._tables[seq_id]
        current = self._num_tokens[seq_id]
        if current % self.page_size and self._ref_count[table[-1]] > 1:
            # NOTE: copy-on-write. The shared, partly filled last page is never written: the
            # new tokens go to a fresh copy and the cache must copy src -> dst before writing.
            src = table[-1]
            dst = self._take_free_page()
            self._ref_count[src] -= 1
            table[-1] = dst
            copies.append((src, dst))
        for _ in range(_cdiv(current + num_tokens, self.page_size) - len(table)):
            table.append(self._take_free_page())
        self._num_tokens[seq_id] = current + num_tokens
        return table
