"""A Hypothesis rule-based state machine for any object with ``BlockManager``'s API.

Invariants checked after every step:

* ``check_invariants()`` holds;
* conservation: free pages + distinct referenced pages == ``num_pages``, and (when the manager
  has ``ref_count``) the sum of ref counts == the number of page-table entries;
* ``can_allocate`` / ``can_append`` agree with whether the call then succeeds, and a call that
  fails leaves every page table and the free count as they were;
* a **shadow KV store**: every token written gets a unique value at its slot, after the copy-on-
  write copies returned by the call are executed; reading every live sequence back through its
  page table yields exactly that sequence's token history;
* freeing every sequence returns the manager to a state equivalent to a new one.
"""

from __future__ import annotations

from typing import Callable

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ..errors import OutOfPages, PagedKVError, SequenceExists, UnknownSequence


class BlockManagerMachine(RuleBasedStateMachine):
    """Base machine; use ``block_manager_machine(factory)`` to bind the manager under test."""

    factory: Callable[[], object] | None = None
    max_seqs = 8
    max_tokens = 40

    def __init__(self) -> None:
        super().__init__()
        if self.factory is None:
            raise TypeError("bind a factory with block_manager_machine(factory)")
        self.mgr = self.factory()
        self.page_size = self.mgr.page_size
        self.num_pages = self.mgr.num_pages
        self.history: dict[int, list[int]] = {}  # seq_id -> value of each token, in order
        self.store: dict[int, int] = {}  # slot -> value (the shadow KV cache)
        self.next_value = 0
        self.next_seq = 0

    # ------------------------------------------------------------- helpers
    def _live(self, index: int) -> int:
        ids = sorted(self.history)
        return ids[index % len(ids)]

    def _fresh_values(self, n: int) -> list[int]:
        values = list(range(self.next_value, self.next_value + n))
        self.next_value += n
        return values

    def _slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.page_size] * self.page_size + pos % self.page_size

    def _copy_pages(self, copies) -> None:
        ps = self.page_size
        for src, dst in copies:
            for i in range(ps):
                if src * ps + i in self.store:
                    self.store[dst * ps + i] = self.store[src * ps + i]

    def _write(self, seq_id: int, slots, values: list[int]) -> None:
        assert len(slots) == len(values), f"{len(slots)} slots for {len(values)} new tokens"
        for slot, value in zip(slots, values):
            self.store[int(slot)] = value
        self.history[seq_id].extend(values)

    def _state(self):
        return (self.mgr.num_free_pages, {s: self.mgr.page_table(s) for s in self.history})

    def _expect_out_of_pages(self, call) -> None:
        before = self._state()
        try:
            call()
        except OutOfPages:
            pass
        else:
            raise AssertionError("the can_* check said no, but the call succeeded")
        assert self._state() == before, "a failed call changed the manager"

    # --------------------------------------------------------------- rules
    @precondition(lambda self: len(self.history) < self.max_seqs)
    @rule(num_tokens=st.integers(1, 40))
    def allocate(self, num_tokens: int) -> None:
        seq_id = self.next_seq
        if not self.mgr.can_allocate(num_tokens):
            self._expect_out_of_pages(lambda: self.mgr.allocate(seq_id, num_tokens))
            return
        self.mgr.allocate(seq_id, num_tokens)
        self.next_seq += 1
        self.history[seq_id] = []
        table = self.mgr.page_table(seq_id)
        assert self.mgr.num_tokens(seq_id) == num_tokens
        self._write(seq_id, [self._slot(table, p) for p in range(num_tokens)], self._fresh_values(num_tokens))

    @precondition(lambda self: self.history)
    @rule(index=st.integers(0, 64), num_tokens=st.integers(1, 8))
    def append(self, index: int, num_tokens: int) -> None:
        seq_id = self._live(index)
        if not self.mgr.can_append(seq_id, num_tokens):
            self._expect_out_of_pages(lambda: self.mgr.append(seq_id, num_tokens))
            return
        start = self.mgr.num_tokens(seq_id)
        copies = self.mgr.append(seq_id, num_tokens)
        self._copy_pages(copies)
        table = self.mgr.page_table(seq_id)
        slots = [self._slot(table, p) for p in range(start, start + num_tokens)]
        self._write(seq_id, slots, self._fresh_values(num_tokens))

    @precondition(lambda self: self.history)
    @rule(indices=st.lists(st.integers(0, 64), min_size=1, max_size=6), counts=st.lists(st.integers(1, 4), min_size=6, max_size=6))
    def append_batch(self, indices: list[int], counts: list[int]) -> None:
        seq_ids = list(dict.fromkeys(self._live(i) for i in indices))
        counts = counts[: len(seq_ids)]
        before = self._state()
        try:
            plan = self.mgr.append_batch(seq_ids, counts)
        except OutOfPages:
            assert self._state() == before, "a failed append_batch changed the manager"
            return
        self._copy_pages(plan.copies.tolist())
        slots = plan.slot_mapping.tolist()
        assert len(slots) == sum(counts)
        offset = 0
        for seq_id, n in zip(seq_ids, counts):
            self._write(seq_id, slots[offset : offset + n], self._fresh_values(n))
            offset += n

    @precondition(lambda self: self.history and len(self.history) < self.max_seqs)
    @rule(index=st.integers(0, 64))
    def fork(self, index: int) -> None:
        parent = self._live(index)
        child = self.next_seq
        self.next_seq += 1
        self.mgr.fork(parent, child)
        self.history[child] = list(self.history[parent])
        assert self.mgr.page_table(child) == self.mgr.page_table(parent)

    @precondition(lambda self: self.history)
    @rule(index=st.integers(0, 64))
    def free(self, index: int) -> None:
        seq_id = self._live(index)
        self.mgr.free(seq_id)
        del self.history[seq_id]

    @rule(data=st.data())
    def misuse(self, data) -> None:
        """Calls that must fail with a typed error and change nothing."""
        before = self._state()
        unknown = self.next_seq + 1000
        choice = data.draw(st.sampled_from(["free", "append", "fork_unknown", "allocate_existing", "fork_existing"]))
        expected: type[PagedKVError] = UnknownSequence
        if choice == "free":
            call = lambda: self.mgr.free(unknown)  # noqa: E731
        elif choice == "append":
            call = lambda: self.mgr.append(unknown, 1)  # noqa: E731
        elif choice == "fork_unknown":
            call = lambda: self.mgr.fork(unknown, unknown + 1)  # noqa: E731
        elif self.history:
            existing = min(self.history)
            expected = SequenceExists
            if choice == "allocate_existing":
                call = lambda: self.mgr.allocate(existing, 1)  # noqa: E731
            else:
                call = lambda: self.mgr.fork(existing, existing)  # noqa: E731
        else:
            return
        try:
            call()
        except expected:
            pass
        else:
            raise AssertionError(f"{choice} did not raise {expected.__name__}")
        assert self._state() == before, f"a failed {choice} changed the manager"

    @rule()
    def free_all(self) -> None:
        for seq_id in list(self.history):
            self.mgr.free(seq_id)
        self.history.clear()
        self.store.clear()
        assert self.mgr.num_free_pages == self.num_pages, "freeing every sequence leaked pages"
        if hasattr(self.mgr, "ref_count"):
            assert all(self.mgr.ref_count(p) == 0 for p in range(self.num_pages))
        whole = self.num_pages * self.page_size
        # equivalent to new: the whole pool above the watermark can be admitted again
        watermark_pages = getattr(self.mgr, "watermark_pages", 0)
        assert self.mgr.can_allocate(whole - watermark_pages * self.page_size) or watermark_pages == self.num_pages

    # ----------------------------------------------------------- invariants
    @invariant()
    def manager_invariants_hold(self) -> None:
        self.mgr.check_invariants()

    @invariant()
    def pages_are_conserved(self) -> None:
        tables = [self.mgr.page_table(s) for s in self.history]
        referenced = {p for t in tables for p in t}
        assert self.mgr.num_free_pages + len(referenced) == self.num_pages, (
            f"{self.mgr.num_free_pages} free + {len(referenced)} referenced != {self.num_pages}"
        )
        if hasattr(self.mgr, "ref_count"):
            total_refs = sum(self.mgr.ref_count(p) for p in referenced)
            assert total_refs == sum(len(t) for t in tables), "sum of ref counts != page-table entries"

    @invariant()
    def shadow_store_reads_back_each_history(self) -> None:
        for seq_id, values in self.history.items():
            table = self.mgr.page_table(seq_id)
            assert self.mgr.num_tokens(seq_id) == len(values)
            got = [self.store.get(self._slot(table, p)) for p in range(len(values))]
            assert got == values, f"sequence {seq_id} reads back {got}, wrote {values}"


def block_manager_machine(factory: Callable[[], object], *, max_seqs: int = 8) -> type[BlockManagerMachine]:
    """A ``BlockManagerMachine`` subclass bound to ``factory`` (called once per test case).

    Args:
        factory: returns a fresh, empty manager with ``BlockManager``'s API.
        max_seqs: most live sequences at once.

    Returns:
        The machine class; its ``.TestCase`` is a unittest/pytest test.
    """
    name = f"BlockManagerMachine_{getattr(factory, '__name__', 'factory')}"
    return type(name, (BlockManagerMachine,), {"factory": staticmethod(factory), "max_seqs": max_seqs})
