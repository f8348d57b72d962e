"""A Hypothesis rule-based state machine for any object with ``BlockManager``'s API.

Invariants checked after every step:

* ``check_invariants()`` holds;
* conservation: free pages + distinct referenced pages == ``num_pages``, and (when the manager
  has ``ref_count``) the sum of ref counts == the number of page-table entries;
* ``can_allocate`` / ``can_append`` / ``can_swap_*`` agree with whether the call then succeeds,
  and a call that fails leaves every page table and the free counts as they were;
* a **shadow KV store**: every token written gets a value at its slot, after the copies
  returned by the call are executed; reading every live sequence back through its page table
  yields exactly that sequence's history. Tokens with known ids get the value
  ``(salt, prefix up to and including the token)`` — what a real KV entry depends on — so a
  prefix-cache hit must read back exactly the prompt it claims to match, under its own salt;
  other tokens get unique ints;
* **chunked prefill** (managers with ``commit``): a prompt is sometimes allocated with
  ``num_computed_tokens=k`` and only its first k values are written; the slots of the others
  hold a poison value until ``commit_prefill`` writes the next chunk and calls ``commit`` (an
  append first writes the rest, as an engine finishing the prefill in that step would). Only
  written positions are read back, so a prefix-cache hit on a page whose KV is not written yet
  reads poison and fails the shadow-store check;
* **step-safe copies** (managers with ``end_step``): the copies returned since the last
  ``append_batch`` or ``end_step`` could run as one batched launch in any order: no copy's
  destination is another pending copy's source or destination, in either pool;
* **the CPU tier of the prefix cache** (managers with ``cpu_prefix_cache``): after each call
  its ``take_offload`` moves run on the shadow stores before the call's copies, demotions
  (GPU -> CPU) then promotions (CPU -> GPU), so a promoted hit reads back only if the content
  really travelled. Each move is checked safe for an engine that batches a step: tier moves
  first, then the step's copies, then its KV writes. A demotion reads a page no copy or KV
  write of the step touched; no two moves write one page; a promotion writes no page an
  earlier copy of the step read or wrote and reads no CPU page a swap-out of the step wrote;
* freeing every sequence (and ending the step) returns the manager to a state equivalent to a
  new one.

Managers with ``enable_prefix_caching``, ``num_cpu_pages > 0`` or ``release_window`` also get
rules for prompts from a tiny vocabulary (so hits happen), swaps, and sliding windows.
"""

from __future__ import annotations

from typing import Callable

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ..errors import OutOfPages, PagedKVError, SequenceExists, SequenceSwapped, UnknownSequence

_RELEASED = object()  # history entry of a position whose page a sliding window released


class BlockManagerMachine(RuleBasedStateMachine):
    """Base machine; use ``block_manager_machine(factory)`` to bind the manager under test."""

    factory: Callable[[], object] | None = None
    max_seqs = 8

    def __init__(self) -> None:
        super().__init__()
        if self.factory is None:
            raise TypeError("bind a factory with block_manager_machine(factory)")
        self.mgr = self.factory()
        self.page_size = self.mgr.page_size
        self.num_pages = self.mgr.num_pages
        self.caching = bool(getattr(self.mgr, "enable_prefix_caching", False))
        self.has_cpu = getattr(self.mgr, "num_cpu_pages", 0) > 0
        self.history: dict[int, list] = {}  # seq_id -> value of each token, in order
        self.written: dict[int, int] = {}  # seq_id -> positions [0, written) hold their KV
        self.chunked = self.caching and callable(getattr(self.mgr, "commit", None))
        self.prompt: dict[int, tuple | None] = {}  # seq_id -> (salt, token ids) while known
        self.swapped: set[int] = set()
        self.store: dict[int, object] = {}  # GPU slot -> value (the shadow KV cache)
        self.cpu_store: dict[int, object] = {}  # CPU slot -> value
        self.next_value = 0
        self.next_seq = 0
        self.steps = callable(getattr(self.mgr, "end_step", None))
        self.tier = bool(getattr(self.mgr, "cpu_prefix_cache", False))
        # pages read / written by the copies returned in the current step, per pool; by its
        # CPU-tier moves, per pool; GPU pages its KV writes touched
        self.pending = {"gpu": (set(), set()), "cpu": (set(), set())}
        self.tier_pending = {"gpu": (set(), set()), "cpu": (set(), set())}
        self.written_pages: set[int] = set()

    # ------------------------------------------------------------- helpers
    def _resident(self) -> list[int]:
        return sorted(s for s in self.history if s not in self.swapped)

    def _done(self) -> list[int]:
        """Resident sequences whose every token is written (not in the middle of a prefill)."""
        return [s for s in self._resident() if self.written[s] == len(self.history[s])]

    def _prefilling(self) -> list[int]:
        return [s for s in self._resident() if self.written[s] < len(self.history[s])]

    def _write_positions(self, seq_id: int, start: int, stop: int) -> None:
        """Write the KV of positions ``[start, stop)`` of a sequence (its history's values)."""
        table = self.mgr.page_table(seq_id)
        values = self.history[seq_id]
        for pos in range(start, stop):
            self.store[self._slot(table, pos)] = values[pos]
            self.written_pages.add(table[pos // self.page_size])
        self.written[seq_id] = max(self.written[seq_id], stop)

    def _finish_prefill(self, seq_id: int) -> None:
        """Before an append (which commits the whole sequence): write the rest of the prompt."""
        self._write_positions(seq_id, self.written[seq_id], len(self.history[seq_id]))

    def _pick(self, ids: list[int], index: int) -> int:
        return ids[index % len(ids)]

    def _fresh_values(self, n: int) -> list[int]:
        values = list(range(self.next_value, self.next_value + n))
        self.next_value += n
        return values

    def _slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.page_size] * self.page_size + pos % self.page_size

    def _new_step(self) -> None:
        for reads, writes in (*self.pending.values(), *self.tier_pending.values()):
            reads.clear()
            writes.clear()
        self.written_pages.clear()

    def _run_offload(self) -> None:
        """Run the CPU-tier moves of the last call (before its copies), checking each is safe
        for an engine that runs a step's tier moves first, then its copies, then its writes."""
        if not self.tier:
            return
        demotions, promotions = (m.tolist() for m in self.mgr.take_offload())
        gpu_reads, gpu_writes = self.pending["gpu"]
        cpu_reads, cpu_writes = self.pending["cpu"]
        tier_gpu_reads, tier_gpu_writes = self.tier_pending["gpu"]
        tier_cpu_reads, tier_cpu_writes = self.tier_pending["cpu"]
        ps = self.page_size
        for gpu, cpu in demotions:
            event("demotion")
            assert gpu not in gpu_writes and gpu not in tier_gpu_writes and gpu not in self.written_pages, (
                f"demotion ({gpu}, {cpu}) reads GPU page {gpu}, which this step wrote before the demotion runs")
            assert cpu not in tier_cpu_writes and cpu not in tier_cpu_reads and cpu not in cpu_reads and cpu not in cpu_writes, (
                f"demotion ({gpu}, {cpu}) writes CPU page {cpu}, which another move or copy of this step reads or writes")
            tier_gpu_reads.add(gpu)
            tier_cpu_writes.add(cpu)
            for i in range(ps):
                value = self.store.get(gpu * ps + i)
                self.cpu_store.pop(cpu * ps + i, None) if value is None else self.cpu_store.__setitem__(cpu * ps + i, value)
        for cpu, gpu in promotions:
            event("promotion")
            assert cpu not in cpu_writes, f"promotion ({cpu}, {gpu}) reads CPU page {cpu}, which a swap-out of this step wrote"
            assert gpu not in tier_gpu_writes and gpu not in gpu_reads and gpu not in gpu_writes, (
                f"promotion ({cpu}, {gpu}) writes GPU page {gpu}, which another move or copy of this step reads or writes")
            tier_cpu_reads.add(cpu)
            tier_gpu_writes.add(gpu)
            for i in range(ps):
                value = self.cpu_store.get(cpu * ps + i)
                self.store.pop(gpu * ps + i, None) if value is None else self.store.__setitem__(gpu * ps + i, value)

    def _check_step_safe(self, copies, src_pool: str, dst_pool: str) -> None:
        """No copy of this step writes a page that another copy of the step reads or writes.

        NOTE: a copy may read a page an earlier copy of the same step wrote (a copy-on-write,
        a whole-prompt hit or a swap-out of a page that is itself a destination of this step):
        that pair must run in the order returned, as it does when each call's copies run
        before the next call (what this machine models).
        """
        if not self.steps:
            return
        for src, dst in copies:
            src_reads = self.pending[src_pool][0]
            dst_reads, dst_writes = self.pending[dst_pool]
            assert dst not in dst_reads and dst not in dst_writes, (
                f"copy ({src}, {dst}) writes {dst_pool} page {dst}, which another copy of this step reads or writes")
            src_reads.add(src)
            dst_writes.add(dst)

    def _copy_pages(self, copies, src_store=None, dst_store=None) -> None:
        pools = {id(self.store): "gpu", id(self.cpu_store): "cpu"}
        src_store = self.store if src_store is None else src_store
        dst_store = self.store if dst_store is None else dst_store
        self._check_step_safe(copies, pools[id(src_store)], pools[id(dst_store)])
        ps = self.page_size
        for src, dst in copies:
            for i in range(ps):
                if src * ps + i in src_store:
                    dst_store[dst * ps + i] = src_store[src * ps + i]
                else:
                    dst_store.pop(dst * ps + i, None)

    def _write(self, seq_id: int, slots, values: list) -> None:
        assert len(slots) == len(values), f"{len(slots)} slots for {len(values)} new tokens"
        for slot, value in zip(slots, values):
            self.store[int(slot)] = value
            self.written_pages.add(int(slot) // self.page_size)
        self.history[seq_id].extend(values)
        self.written[seq_id] = len(self.history[seq_id])

    def _new_values(self, seq_id: int, token_ids: list[int] | None, n: int) -> list:
        """Values of ``n`` appended tokens; prefix-keyed while the sequence's ids are known."""
        known = self.prompt.get(seq_id)
        if token_ids is None or known is None:
            self.prompt[seq_id] = None
            return self._fresh_values(n)
        salt, prefix = known
        values = []
        for token in token_ids:
            prefix = prefix + (token,)
            values.append((salt, prefix))
        self.prompt[seq_id] = (salt, prefix)
        return values

    def _state(self):
        free_cpu = getattr(self.mgr, "num_free_cpu_pages", 0)
        pinned = getattr(self.mgr, "num_pinned_pages", 0)
        return (self.mgr.num_free_pages, free_cpu, pinned, {s: self.mgr.page_table(s) for s in self.history})

    def _expect_out_of_pages(self, call) -> None:
        before = self._state()
        try:
            call()
        except OutOfPages:
            pass
        else:
            raise AssertionError("the can_* check said no, but the call succeeded")
        assert self._state() == before, "a failed call changed the manager"
        if self.tier:
            assert not any(len(m) for m in self.mgr.take_offload()), "a failed call moved pages between tiers"

    # --------------------------------------------------------------- rules
    @precondition(lambda self: len(self.history) < self.max_seqs)
    @rule(num_tokens=st.integers(1, 40))
    def allocate(self, num_tokens: int) -> None:
        seq_id = self.next_seq
        if not self.mgr.can_allocate(num_tokens):
            self._expect_out_of_pages(lambda: self.mgr.allocate(seq_id, num_tokens))
            return
        self.mgr.allocate(seq_id, num_tokens)
        self._run_offload()
        self.next_seq += 1
        self.history[seq_id] = []
        self.written[seq_id] = 0
        self.prompt[seq_id] = None
        table = self.mgr.page_table(seq_id)
        assert self.mgr.num_tokens(seq_id) == num_tokens
        self._write(seq_id, [self._slot(table, p) for p in range(num_tokens)], self._fresh_values(num_tokens))

    @precondition(lambda self: self.caching and len(self.history) < self.max_seqs)
    @rule(
        prefix=st.sampled_from([(), (1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 3, 4, 5, 6, 7, 9, 1, 1, 1, 1)]),
        suffix=st.lists(st.integers(0, 2), max_size=12),
        salt=st.sampled_from([None, "tenant-b"]),
        first_chunk=st.one_of(st.none(), st.integers(0, 24)),
    )
    def allocate_prompt(self, prefix, suffix, salt, first_chunk) -> None:
        """Prompts over a tiny vocabulary and shared prefixes, so prefix-cache hits happen.

        With ``first_chunk`` (and a manager with ``commit``), a chunked prefill: only the first
        ``first_chunk`` prompt tokens are computed in this step.
        """
        tokens = list(prefix) + suffix or [0]
        seq_id = self.next_seq
        computed = None if first_chunk is None or not self.chunked else min(first_chunk, len(tokens))
        kwargs = dict(token_ids=tokens, cache_salt=salt)
        if computed is not None:
            kwargs["num_computed_tokens"] = computed
        if not self.mgr.can_allocate(token_ids=tokens, cache_salt=salt):
            self._expect_out_of_pages(lambda: self.mgr.allocate(seq_id, **kwargs))
            return
        cached, copies = self.mgr.allocate(seq_id, **kwargs)
        self._run_offload()
        event("prefix cache hit" if cached else "prefix cache miss")
        self.next_seq += 1
        assert 0 <= cached < len(tokens) and cached % self.page_size in (0, self.page_size - 1)
        self._copy_pages(copies)
        self.prompt[seq_id] = (salt, ())
        self.history[seq_id] = self._new_values(seq_id, tokens, len(tokens))
        table = self.mgr.page_table(seq_id)
        # the cached positions are not written: they must already hold this prompt's values
        self.written[seq_id] = cached
        written = len(tokens) if computed is None else max(computed, cached)
        if written < len(tokens):
            event("chunked prefill")
            # NOTE: not computed yet, so these slots hold garbage: a poison value that no
            # history holds, so that a hit on them fails the read-back check.
            for pos in range(written, len(tokens)):
                self.store[self._slot(table, pos)] = ("unwritten", seq_id, pos)
        self._write_positions(seq_id, cached, written)

    @precondition(lambda self: self.chunked and self._prefilling())
    @rule(index=st.integers(0, 64), chunk=st.integers(1, 12))
    def commit_prefill(self, index: int, chunk: int) -> None:
        """The next chunk of a prefill: write its KV, then ``commit`` through its end."""
        seq_id = self._pick(self._prefilling(), index)
        stop = min(self.written[seq_id] + chunk, len(self.history[seq_id]))
        self._write_positions(seq_id, self.written[seq_id], stop)
        indexed = self.mgr.commit(seq_id, stop)
        assert 0 <= indexed <= stop // self.page_size
        if indexed:
            event("commit indexed pages")

    @precondition(lambda self: self._resident())
    @rule(index=st.integers(0, 64), num_tokens=st.integers(1, 8), with_ids=st.booleans())
    def append(self, index: int, num_tokens: int, with_ids: bool) -> None:
        seq_id = self._pick(self._resident(), index)
        if not self.mgr.can_append(seq_id, num_tokens):
            self._expect_out_of_pages(lambda: self.mgr.append(seq_id, num_tokens))
            return
        start = self.mgr.num_tokens(seq_id)
        token_ids = [(start + i) % 3 for i in range(num_tokens)] if with_ids and self.caching else None
        self._finish_prefill(seq_id)  # an append commits the whole sequence
        copies = self.mgr.append(seq_id, num_tokens, token_ids=token_ids) if token_ids else self.mgr.append(seq_id, num_tokens)
        self._run_offload()
        if len(copies):
            event("copy-on-write in append")
        self._copy_pages(copies)
        table = self.mgr.page_table(seq_id)
        slots = [self._slot(table, p) for p in range(start, start + num_tokens)]
        self._write(seq_id, slots, self._new_values(seq_id, token_ids, num_tokens))

    @precondition(lambda self: self._resident())
    @rule(indices=st.lists(st.integers(0, 64), min_size=1, max_size=6), counts=st.lists(st.integers(1, 4), min_size=6, max_size=6))
    def append_batch(self, indices: list[int], counts: list[int]) -> None:
        resident = self._resident()
        seq_ids = list(dict.fromkeys(self._pick(resident, i) for i in indices))
        counts = counts[: len(seq_ids)]
        before = self._state()
        try:
            plan = self.mgr.append_batch(seq_ids, counts)
        except OutOfPages:
            assert self._state() == before, "a failed append_batch changed the manager"
            return
        self._new_step()  # NOTE: an append_batch begins a step: the earlier copies have run
        self._run_offload()
        for seq_id in seq_ids:
            self._finish_prefill(seq_id)  # an append commits the whole sequence
        self._copy_pages(plan.copies.tolist())
        slots = plan.slot_mapping.tolist()
        assert len(slots) == sum(counts)
        offset = 0
        for seq_id, n in zip(seq_ids, counts):
            self._write(seq_id, slots[offset : offset + n], self._new_values(seq_id, None, n))
            offset += n

    @precondition(lambda self: self._done() and len(self.history) < self.max_seqs)
    @rule(index=st.integers(0, 64))
    def fork(self, index: int) -> None:
        # NOTE: only sequences whose prefill is done, as an engine forks (parallel sampling)
        parent = self._pick(self._done(), index)
        child = self.next_seq
        self.next_seq += 1
        self.mgr.fork(parent, child)
        self.history[child] = list(self.history[parent])
        self.written[child] = self.written[parent]
        self.prompt[child] = self.prompt[parent]
        assert self.mgr.page_table(child) == self.mgr.page_table(parent)

    @precondition(lambda self: self.history)
    @rule(index=st.integers(0, 64))
    def free(self, index: int) -> None:
        seq_id = self._pick(sorted(self.history), index)
        self.mgr.free(seq_id)
        del self.history[seq_id]
        del self.written[seq_id]
        self.prompt.pop(seq_id, None)
        self.swapped.discard(seq_id)

    @precondition(lambda self: self.has_cpu and self._resident())
    @rule(indices=st.lists(st.integers(0, 64), min_size=1, max_size=3))
    def swap_out(self, indices: list[int]) -> None:
        resident = self._resident()
        seq_ids = list(dict.fromkeys(self._pick(resident, i) for i in indices))
        if not self.mgr.can_swap_out(seq_ids):
            self._expect_out_of_pages(lambda: self.mgr.swap_out(seq_ids))
            return
        plan = self.mgr.swap_out(seq_ids)
        event("swap_out")
        assert plan.direction == "out"
        self._copy_pages(plan.copies.tolist(), self.store, self.cpu_store)
        self.swapped.update(seq_ids)

    @precondition(lambda self: self.has_cpu and self.swapped)
    @rule(indices=st.lists(st.integers(0, 64), min_size=1, max_size=3))
    def swap_in(self, indices: list[int]) -> None:
        out = sorted(self.swapped)
        seq_ids = list(dict.fromkeys(self._pick(out, i) for i in indices))
        if not self.mgr.can_swap_in(seq_ids):
            self._expect_out_of_pages(lambda: self.mgr.swap_in(seq_ids))
            return
        plan = self.mgr.swap_in(seq_ids)
        self._run_offload()
        assert plan.direction == "in"
        self._copy_pages(plan.copies.tolist(), self.cpu_store, self.store)
        self.swapped.difference_update(seq_ids)

    @precondition(lambda self: hasattr(self.mgr, "release_window") and self._done())
    @rule(index=st.integers(0, 64), window=st.integers(1, 12))
    def release_window(self, index: int, window: int) -> None:
        seq_id = self._pick(self._done(), index)
        self.mgr.release_window(seq_id, window)
        table = self.mgr.page_table(seq_id)
        history = self.history[seq_id]
        ps = self.page_size
        keep_from = len(history) - window
        for j, page in enumerate(table):
            if (j + 1) * ps <= keep_from:
                assert page == -1, f"page {j} lies wholly outside the window but was kept"
            elif page == -1:
                assert history[j * ps] is _RELEASED, f"page {j} holds a token inside the window but was released"
            if page == -1:
                history[j * ps : (j + 1) * ps] = [_RELEASED] * len(history[j * ps : (j + 1) * ps])
        if callable(getattr(self.mgr, "window_tables", None)):
            # live pages only: the row starts after the released entries (a prefix of the table)
            live = self.mgr.window_tables([seq_id])
            first = int(live.first_page[0])
            released = next((j for j, page in enumerate(table) if page != -1), len(table))
            assert first == released, f"window_tables starts at page {first}, the first live page is {released}"
            assert live.page_table[0].tolist() == table[first:], "window_tables row != the live page-table entries"

    @rule(data=st.data())
    def misuse(self, data) -> None:
        """Calls that must fail with a typed error and change nothing."""
        before = self._state()
        unknown = self.next_seq + 1000
        choices = ["free", "append", "fork_unknown", "allocate_existing", "fork_existing"]
        if self.swapped:
            choices.append("append_swapped")
        if self.chunked:
            choices += ["commit_unknown", "commit_swapped"] if self.swapped else ["commit_unknown"]
        choice = data.draw(st.sampled_from(choices))
        expected: type[PagedKVError] = UnknownSequence
        if choice == "free":
            call = lambda: self.mgr.free(unknown)  # noqa: E731
        elif choice == "append":
            call = lambda: self.mgr.append(unknown, 1)  # noqa: E731
        elif choice == "fork_unknown":
            call = lambda: self.mgr.fork(unknown, unknown + 1)  # noqa: E731
        elif choice == "append_swapped":
            expected = SequenceSwapped
            call = lambda: self.mgr.append(min(self.swapped), 1)  # noqa: E731
        elif choice == "commit_unknown":
            call = lambda: self.mgr.commit(unknown, 0)  # noqa: E731
        elif choice == "commit_swapped":
            expected = SequenceSwapped
            call = lambda: self.mgr.commit(min(self.swapped), 0)  # noqa: E731
        elif choice == "allocate_existing" and self.history:
            expected = SequenceExists
            call = lambda: self.mgr.allocate(min(self.history), 1)  # noqa: E731
        elif choice == "fork_existing" and self._resident():
            expected = SequenceExists
            call = lambda: self.mgr.fork(self._resident()[0], self._resident()[0])  # noqa: E731
        else:
            return
        try:
            call()
        except expected:
            pass
        else:
            raise AssertionError(f"{choice} did not raise {expected.__name__}")
        assert self._state() == before, f"a failed {choice} changed the manager"

    @precondition(lambda self: self.steps)
    @rule()
    def end_step(self) -> None:
        self.mgr.end_step()
        self._new_step()
        assert getattr(self.mgr, "num_pinned_pages", 0) == 0, "end_step left pages pinned"

    @rule()
    def free_all(self) -> None:
        for seq_id in list(self.history):
            self.mgr.free(seq_id)
        if self.steps:
            self.mgr.end_step()  # NOTE: a copy of this step may still pin pages nobody holds
            self._new_step()
        self.history.clear()
        self.written.clear()
        self.prompt.clear()
        self.swapped.clear()
        assert self.mgr.num_free_pages == self.num_pages, "freeing every sequence leaked pages"
        if self.has_cpu:
            assert self.mgr.num_free_cpu_pages == self.mgr.num_cpu_pages, "freeing every sequence leaked CPU pages"
        if hasattr(self.mgr, "ref_count"):
            assert all(self.mgr.ref_count(p) == 0 for p in range(self.num_pages))
        # equivalent to new: the whole pool above the watermark can be admitted again
        watermark_pages = getattr(self.mgr, "watermark_pages", 0)
        if watermark_pages < self.num_pages:
            assert self.mgr.can_allocate((self.num_pages - watermark_pages) * self.page_size)

    # ----------------------------------------------------------- invariants
    @invariant()
    def manager_invariants_hold(self) -> None:
        self.mgr.check_invariants()

    @invariant()
    def pages_are_conserved(self) -> None:
        tables = [[p for p in self.mgr.page_table(s) if p != -1] for s in self._resident()]
        referenced = {p for t in tables for p in t}
        pinned = getattr(self.mgr, "num_pinned_pages", 0)
        assert self.mgr.num_free_pages + pinned + len(referenced) == self.num_pages, (
            f"{self.mgr.num_free_pages} free + {pinned} pinned + {len(referenced)} referenced != {self.num_pages}"
        )
        if hasattr(self.mgr, "ref_count"):
            total_refs = sum(self.mgr.ref_count(p) for p in referenced)
            assert total_refs == sum(len(t) for t in tables), "sum of ref counts != page-table entries"

    @invariant()
    def shadow_store_reads_back_each_history(self) -> None:
        # NOTE: only written positions: the rest of a chunked prefill holds no KV yet.
        for seq_id, values in self.history.items():
            table = self.mgr.page_table(seq_id)
            store = self.cpu_store if seq_id in self.swapped else self.store
            assert self.mgr.num_tokens(seq_id) == len(values)
            written = range(self.written[seq_id])
            want = [values[p] for p in written if values[p] is not _RELEASED]
            got = [store.get(self._slot(table, p)) for p in written if values[p] is not _RELEASED]
            assert got == want, f"sequence {seq_id} reads back {got}, wrote {want}"


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
