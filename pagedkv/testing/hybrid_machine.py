"""A Hypothesis state machine for ``HybridBlockManager``: KV cache groups over one pool.

The shadow KV store is the pool itself: one value per slot, whatever group holds the page, so
two groups aliasing one page, a copy run in the wrong place or a window that released a page
some token still needs all show up as a wrong read. Each token of each group gets the value
``(group, salt, prefix up to and including the token)`` when its id is known (prompts and
appends with ids), else ``(group, unique int)``; a state group's pages hold
``(group, "state", version)`` of their sequence.

Checked after every step:

* ``check_invariants()`` holds;
* every live sequence reads back, in every token group, each position that group must keep:
  all of them for a full group, those from the oldest position its last computed tokens see
  for a sliding or chunked group (``KVCacheGroup.first_needed``); a state group's pages read
  back the sequence's current state (its own, or its parent's copy right after ``fork``);
* a call that fails leaves ``snapshot()`` exactly as it was;
* freeing every sequence and ending the step returns every page.

Bind a factory with ``hybrid_block_manager_machine(factory)``.
"""

from __future__ import annotations

from typing import Callable

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ..errors import OutOfPages, PagedKVError

_VOCAB = 3  # a tiny vocabulary: prompts share prefixes, so hits happen


class HybridBlockManagerMachine(RuleBasedStateMachine):
    """Base machine; use ``hybrid_block_manager_machine(factory)`` to bind the manager."""

    factory: Callable[[], object] | None = None
    max_seqs = 6

    def __init__(self) -> None:
        super().__init__()
        if self.factory is None:
            raise TypeError("bind a factory with hybrid_block_manager_machine(factory)")
        self.mgr = self.factory()
        self.groups = self.mgr.groups
        self.ps = self.mgr.page_size
        self.has_cpu = getattr(self.mgr, "num_cpu_pages", 0) > 0
        self.history: dict[int, list] = {}  # seq -> value (without the group) of each token
        self.start: dict[int, int] = {}  # seq -> first position its last allocate/append computed
        self.state: dict[int, int] = {}  # seq -> version of its state (state groups)
        self.swapped: set[int] = set()
        self.store: dict[int, object] = {}  # GPU slot -> value
        self.cpu_store: dict[int, object] = {}
        self.next_id = self.next_value = 0
        self.prompts: dict[int, tuple] = {}  # seq -> (salt, its token ids so far)

    # ----------------------------------------------------------------- helpers
    def _live(self) -> list[int]:
        return sorted(s for s in self.history if s not in self.swapped)

    def _pick(self, ids: list[int], index: int) -> int:
        return ids[index % len(ids)]

    def _copy(self, copies, src: dict, dst: dict) -> None:
        for a, b in [tuple(map(int, row)) for row in copies]:
            for i in range(self.ps):
                if a * self.ps + i in src:
                    dst[b * self.ps + i] = src[a * self.ps + i]
                else:
                    dst.pop(b * self.ps + i, None)

    def _write(self, slots, start: int, seq: int) -> None:
        """Write positions ``start, ...`` of ``seq`` at ``slots`` ``[num_groups, n]``."""
        history = self.history[seq]
        for g, row in enumerate(slots):
            for j, slot in enumerate(row.tolist()):
                if slot >= 0:
                    self.store[slot] = (g, history[start + j])

    def _write_state(self, seq: int) -> None:
        self.next_value += 1
        self.state[seq] = self.next_value
        for g, grp in enumerate(self.groups):
            if grp.kind == "state":
                for page in self.mgr.page_table(seq, g):
                    for i in range(self.ps):
                        self.store[page * self.ps + i] = (g, "state", self.next_value)

    def _values(self, salt, prefix: list, ids) -> list:
        out = []
        for i in range(len(ids)):
            out.append((salt, tuple(prefix) + tuple(ids[: i + 1])))
        return out

    def _failing(self, call) -> None:
        before = self.mgr.snapshot()
        try:
            call()
        except PagedKVError:
            assert self.mgr.snapshot() == before, "a failed call changed the manager"
            return
        raise AssertionError("expected the call to fail")

    # ------------------------------------------------------------------- rules
    @precondition(lambda self: len(self.history) < self.max_seqs)
    @rule(prefix=st.lists(st.integers(0, _VOCAB - 1), min_size=1, max_size=24),
          salt=st.sampled_from([None, "a"]), chunk=st.one_of(st.none(), st.integers(0, 20)))
    def allocate(self, prefix, salt, chunk) -> None:
        seq = self.next_id
        computed = None if chunk is None else min(chunk, len(prefix))
        if not self.mgr.can_allocate(token_ids=prefix, cache_salt=salt):
            self._failing(lambda: self.mgr.allocate(seq, token_ids=prefix, cache_salt=salt))
            return
        alloc = self.mgr.allocate(seq, token_ids=prefix, cache_salt=salt, num_computed_tokens=computed)
        self.next_id += 1
        self._copy(alloc.copies, self.store, self.store)
        self.history[seq] = self._values(salt, [], prefix)
        self.prompts[seq] = (salt, list(prefix))
        hit = alloc.num_cached_tokens
        self.start[seq] = hit
        # NOTE: the whole prompt is written now (an engine computes it in this step), so the
        # chunk only shifts what becomes matchable; commit the rest at once
        self._write(self.mgr.slots(seq, hit), hit, seq)
        if computed is not None:
            self.mgr.commit(seq, len(prefix))
        self._write_state(seq)

    @precondition(lambda self: self._live())
    @rule(indices=st.lists(st.integers(0, 64), min_size=1, max_size=4, unique=True),
          counts=st.lists(st.integers(1, 3), min_size=4, max_size=4))
    def append_batch(self, indices, counts) -> None:
        ids = sorted({self._pick(self._live(), i) for i in indices})
        counts = counts[: len(ids)]
        tokens = []
        news = {}
        for seq, n in zip(ids, counts):
            news[seq] = [(self.next_value + k) % _VOCAB for k in range(n)]
            self.next_value += n
            tokens += news[seq]
        before = self.mgr.snapshot()
        try:
            plan = self.mgr.append_batch(ids, counts, token_ids=tokens)
        except OutOfPages:
            assert self.mgr.snapshot() == before, "a failed append_batch changed the manager"
            return
        self._copy(plan.copies, self.store, self.store)
        offset = 0
        for seq, n in zip(ids, counts):
            start = len(self.history[seq])
            salt, prompt = self.prompts[seq]
            prompt += news[seq]
            self.history[seq] += [(salt, tuple(prompt[: start + k + 1])) for k in range(n)]
            self.start[seq] = start
            self._write(plan.slot_mapping[:, offset : offset + n], start, seq)
            offset += n

    @precondition(lambda self: self._live() and len(self.history) < self.max_seqs)
    @rule(index=st.integers(0, 64))
    def fork(self, index) -> None:
        parent = self._pick(self._live(), index)
        child = self.next_id
        before = self.mgr.snapshot()
        try:
            copies = self.mgr.fork(parent, child)
        except OutOfPages:
            assert self.mgr.snapshot() == before
            return
        self.next_id += 1
        self._copy(copies, self.store, self.store)
        self.history[child] = list(self.history[parent])
        self.start[child] = self.start[parent]
        self.state[child] = self.state[parent]
        salt, prompt = self.prompts[parent]
        self.prompts[child] = (salt, list(prompt))

    @precondition(lambda self: self.history)
    @rule(index=st.integers(0, 64))
    def free(self, index) -> None:
        seq = self._pick(sorted(self.history), index)
        self.mgr.free(seq)
        for d in (self.history, self.start, self.state, self.prompts):
            d.pop(seq, None)
        self.swapped.discard(seq)

    @precondition(lambda self: self.has_cpu and self._live())
    @rule(index=st.integers(0, 64))
    def swap_out(self, index) -> None:
        seq = self._pick(self._live(), index)
        if not self.mgr.can_swap_out([seq]):
            self._failing(lambda: self.mgr.swap_out([seq]))
            return
        plan = self.mgr.swap_out([seq])
        self._copy(plan.copies, self.store, self.cpu_store)
        self.swapped.add(seq)

    @precondition(lambda self: self.swapped)
    @rule(index=st.integers(0, 64))
    def swap_in(self, index) -> None:
        seq = self._pick(sorted(self.swapped), index)
        if not self.mgr.can_swap_in([seq]):
            self._failing(lambda: self.mgr.swap_in([seq]))
            return
        plan = self.mgr.swap_in([seq])
        self._copy(plan.copies, self.cpu_store, self.store)
        self.swapped.discard(seq)

    @rule()
    def end_step(self) -> None:
        self.mgr.end_step()

    @rule()
    def free_all(self) -> None:
        for seq in sorted(self.history):
            self.mgr.free(seq)
        for d in (self.history, self.start, self.state, self.prompts):
            d.clear()
        self.swapped.clear()
        self.mgr.end_step()
        assert self.mgr.num_free_pages == self.mgr.num_pages, "pages leaked"
        self.mgr.check_invariants()

    # -------------------------------------------------------------- invariants
    @invariant()
    def manager_invariants_hold(self) -> None:
        self.mgr.check_invariants()

    @invariant()
    def every_group_reads_back_what_it_must_keep(self) -> None:
        ps = self.ps
        for seq in self._live():
            history = self.history[seq]
            for g, grp in enumerate(self.groups):
                table = self.mgr.page_table(seq, g)
                if grp.kind == "state":
                    for page in table:
                        got = self.store.get(page * ps)
                        assert got == (g, "state", self.state[seq]), f"seq {seq} group {g}: state reads {got}"
                    continue
                for pos in range(grp.first_needed(self.start[seq]), len(history)):
                    page = table[pos // ps]
                    assert page >= 0, f"seq {seq} group {g}: position {pos} released but still needed"
                    got = self.store.get(page * ps + pos % ps)
                    assert got == (g, history[pos]), f"seq {seq} group {g} position {pos}: read {got}"


def hybrid_block_manager_machine(factory: Callable[[], object], *,
                                 max_seqs: int = 6) -> type[HybridBlockManagerMachine]:
    """A ``HybridBlockManagerMachine`` subclass bound to ``factory`` (called once per test
    case); its ``TestCase`` runs under pytest or unittest."""
    return type("BoundHybridBlockManagerMachine", (HybridBlockManagerMachine,),
                {"factory": staticmethod(factory), "max_seqs": max_seqs})
