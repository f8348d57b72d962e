"""The CPU tier of the prefix cache (``cpu_prefix_cache=True``): demotion, promotion, swap priority.

A tiny engine model keeps real per-slot "KV" (the token id and position each slot was written
for) in a GPU and a CPU array and executes every plan in the documented order; a hit must then
read back exactly its prompt. Both backends run every test.
"""

import random

import numpy as np
import pytest

from pagedkv import BlockManager, InvalidArgument, InvalidType, OutOfPages

BACKENDS = ["cpp", "python"]


class Engine:
    """Executes a step's plans as an engine batching them would: demotions, promotions, the
    step's copies, then the KV writes of the forward pass."""

    def __init__(self, mgr: BlockManager):
        self.mgr = mgr
        ps = mgr.page_size
        self.gpu = np.full(mgr.num_pages * ps, -1, dtype=np.int64)
        self.cpu = np.full(max(mgr.num_cpu_pages, 1) * ps, -1, dtype=np.int64)
        self.copies: list[tuple[str, np.ndarray]] = []
        self.writes: list[tuple[int, int]] = []  # (slot, value)

    def _move(self, pairs, src, dst):
        ps = self.mgr.page_size
        for s, d in np.asarray(pairs).reshape(-1, 2).tolist():
            dst[d * ps:(d + 1) * ps] = src[s * ps:(s + 1) * ps]

    def step(self):
        plan = self.mgr.take_offload()
        self._move(plan.demotions, self.gpu, self.cpu)
        self._move(plan.promotions, self.cpu, self.gpu)
        for kind, pairs in self.copies:
            src, dst = {"gpu": (self.gpu, self.gpu), "out": (self.gpu, self.cpu), "in": (self.cpu, self.gpu)}[kind]
            self._move(pairs, src, dst)
        for slot, value in self.writes:
            self.gpu[slot] = value
        self.copies.clear()
        self.writes.clear()
        self.mgr.end_step()
        return plan

    def prefill(self, seq_id: int, prompt: list[int]) -> int:
        """Allocate a prompt and queue the writes of its uncached tokens; returns tokens cached."""
        alloc = self.mgr.allocate(seq_id, token_ids=prompt)
        self.copies.append(("gpu", alloc.copies))
        slots = self.mgr.slots(seq_id)
        for pos in range(alloc.num_cached_tokens, len(prompt)):
            self.writes.append((int(slots[pos]), prompt[pos] * 1000 + pos))
        return alloc.num_cached_tokens

    def check(self, seq_id: int, prompt: list[int]) -> None:
        """After the step: every position of the sequence reads back its own token."""
        slots = self.mgr.slots(seq_id)
        got = self.gpu[slots].tolist()
        want = [t * 1000 + p for p, t in enumerate(prompt)]
        assert got == want, f"sequence {seq_id} reads {got}, wrote {want}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_evicted_prefix_is_demoted_and_promoted_back(backend):
    mgr = BlockManager(4, 2, enable_prefix_caching=True, num_cpu_pages=4, cpu_prefix_cache=True, backend=backend)
    engine = Engine(mgr)
    prompt = [1, 2, 3, 4, 5]
    assert engine.prefill(0, prompt) == 0
    engine.step()
    engine.check(0, prompt)
    mgr.free(0)  # pages 0 and 1 stay cached on the GPU
    engine.step()
    other = [7, 7, 8, 8, 9, 9, 6]
    engine.prefill(1, other)  # takes every GPU page: evicts both cached pages
    plan = engine.step()
    assert plan.demotions.tolist() == [[1, 0], [0, 1]]  # last page first: the LRU order of free()
    assert plan.promotions.shape == (0, 2)
    mgr.free(1)
    engine.step()
    assert engine.prefill(2, prompt) == 4  # both full pages found on the CPU tier
    plan = engine.step()
    assert sorted(plan.promotions[:, 0].tolist()) == [0, 1]
    engine.check(2, prompt)
    stats = mgr.prefix_cache_stats()
    # the promotions' GPU pages evicted two of `other`'s three cached pages: demoted too
    assert (stats.demotions, stats.promotions, stats.cpu_hit_tokens, stats.hit_tokens) == (4, 2, 4, 4)
    # NOTE: inclusive: the CPU copies stay, so evicting the promoted pages again copies nothing.
    assert stats.num_cpu_cached_pages == 4
    promoted = mgr.page_table(2)[:2]
    mgr.free(2)
    engine.step()
    engine.prefill(3, other)  # evicts the promoted pages again
    plan = engine.step()
    assert not set(promoted) & set(plan.demotions[:, 0].tolist())
    assert mgr.prefix_cache_stats().num_cached_pages == 0 or set(promoted) & set(mgr.page_table(3))
    mgr.free(3)
    engine.step()
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_whole_prompt_hit_on_the_cpu_tier_is_promoted_then_copied(backend):
    mgr = BlockManager(3, 2, enable_prefix_caching=True, num_cpu_pages=4, cpu_prefix_cache=True, backend=backend)
    engine = Engine(mgr)
    prompt = [1, 2, 3, 4]
    engine.prefill(0, prompt)
    engine.step()
    mgr.free(0)
    engine.step()
    engine.prefill(1, [5, 5, 6, 6, 7])  # evicts both cached pages
    engine.step()
    mgr.free(1)
    engine.step()
    assert engine.prefill(2, prompt) == 3  # the last token is recomputed into a private copy
    plan = engine.step()
    assert len(plan.promotions) == 2
    engine.check(2, prompt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pages_indexed_in_this_step_are_not_demoted_in_it(backend):
    # Their KV is written by this step's forward pass, after a demotion would run.
    mgr = BlockManager(2, 2, enable_prefix_caching=True, num_cpu_pages=4, cpu_prefix_cache=True, backend=backend)
    mgr.allocate(0, token_ids=[1, 2, 3, 4])
    mgr.free(0)
    mgr.allocate(1, token_ids=[5, 6, 7, 8])  # evicts pages indexed in this very step
    assert mgr.take_offload().demotions.shape == (0, 2)
    mgr.free(1)
    mgr.end_step()
    mgr.allocate(2, token_ids=[9, 9, 9, 9])  # the pages of [5, 6, 7, 8] were written last step
    assert len(mgr.take_offload().demotions) == 2
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_swap_out_outranks_the_tier(backend):
    mgr = BlockManager(4, 2, enable_prefix_caching=True, num_cpu_pages=2, cpu_prefix_cache=True, backend=backend)
    mgr.allocate(0, token_ids=[1, 2, 3, 4])
    mgr.free(0)
    mgr.end_step()
    mgr.allocate(1, token_ids=[5, 6, 7, 8, 9, 9, 9, 9])  # demotes both cached pages: CPU pool full
    assert len(mgr.take_offload().demotions) == 2
    mgr.free(1)
    mgr.end_step()
    assert mgr.num_free_cpu_pages == 2  # cached CPU pages count as free for a swap-out
    assert mgr.prefix_cache_stats().num_cpu_cached_pages == 2
    mgr.allocate(2, 2)  # evicts one of seq 1's pages: its demotion replaces the LRU CPU page
    assert len(mgr.take_offload().demotions) == 1
    mgr.end_step()
    out = mgr.swap_out([2])  # no plain free CPU page: takes the LRU cached one
    (cpu,) = out.copies[:, 1].tolist()
    assert mgr.prefix_cache_stats().num_cpu_cached_pages == 1
    mgr.end_step()
    mgr.allocate(3, 4)
    with pytest.raises(OutOfPages) as info:
        mgr.swap_out([3])  # 2 pages, 1 CPU page left (a cached one)
    assert info.value.pool == "cpu"
    mgr.free(3)
    # A demotion never takes the swapped-out sequence's CPU page.
    for seq_id, token in ((4, 11), (5, 12), (6, 13)):
        mgr.allocate(seq_id, token_ids=[token] * 2)
        mgr.free(seq_id)
        mgr.end_step()
        dst = {d for _, d in mgr.take_offload().demotions.tolist()}
        assert cpu not in dst
        mgr.end_step()
    assert mgr.page_table(2) == [cpu]
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_forgets_both_tiers(backend):
    mgr = BlockManager(2, 2, enable_prefix_caching=True, num_cpu_pages=2, cpu_prefix_cache=True, backend=backend)
    mgr.allocate(0, token_ids=[1, 2, 3, 4])
    mgr.free(0)
    mgr.end_step()
    mgr.allocate(1, token_ids=[5, 6, 7, 8])
    mgr.take_offload()
    mgr.free(1)
    mgr.end_step()
    assert mgr.prefix_cache_stats().num_cpu_cached_pages == 2
    mgr.reset_prefix_cache()
    stats = mgr.prefix_cache_stats()
    assert (stats.num_cached_pages, stats.num_cpu_cached_pages) == (0, 0)
    assert mgr.num_free_cpu_pages == 2
    assert mgr.allocate(2, token_ids=[1, 2, 3, 4]).num_cached_tokens == 0
    assert mgr.take_offload().promotions.shape == (0, 2)
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_configuration_is_a_typed_error(backend):
    with pytest.raises(InvalidArgument, match="cpu_prefix_cache"):
        BlockManager(4, 2, num_cpu_pages=4, cpu_prefix_cache=True, backend=backend)
    with pytest.raises(InvalidArgument, match="cpu_prefix_cache"):
        BlockManager(4, 2, enable_prefix_caching=True, cpu_prefix_cache=True, backend=backend)
    with pytest.raises(InvalidType, match="cpu_prefix_cache"):
        BlockManager(4, 2, enable_prefix_caching=True, num_cpu_pages=2, cpu_prefix_cache="yes", backend=backend)
    mgr = BlockManager(4, 2, enable_prefix_caching=True, num_cpu_pages=2, backend=backend)
    assert not mgr.cpu_prefix_cache
    mgr.allocate(0, token_ids=[1, 2, 3, 4])
    plan = mgr.take_offload()
    assert plan.demotions.shape == plan.promotions.shape == (0, 2)


def _serve(backend: str, tier: bool, seed: int = 0):
    """Multi-turn conversations on a pool that holds about a third of them: returns (hit tokens,
    prompt tokens, stats), checking every hit's KV through the engine model."""
    rng = random.Random(seed)
    mgr = BlockManager(24, 4, enable_prefix_caching=True, num_cpu_pages=64, cpu_prefix_cache=tier, backend=backend)
    engine = Engine(mgr)
    histories = {c: [100 + c] * 4 + [rng.randrange(50) for _ in range(8)] for c in range(8)}
    hits = total = 0
    seq_id = 0
    for _ in range(60):
        conv = rng.randrange(8)
        prompt = histories[conv]
        if not mgr.can_allocate(token_ids=prompt):
            break
        hits += engine.prefill(seq_id, prompt)
        total += len(prompt)
        engine.step()
        engine.check(seq_id, prompt)
        answer = [rng.randrange(50) for _ in range(3)]
        mgr.free(seq_id)
        histories[conv] = prompt + answer if len(prompt) + 3 <= 40 else prompt[:12]
        seq_id += 1
        engine.step()
    mgr.check_invariants()
    return hits, total, mgr.prefix_cache_stats()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_tier_keeps_hits_a_small_gpu_pool_loses(backend):
    with_tier = _serve(backend, True)
    without = _serve(backend, False)
    assert with_tier[1] == without[1]  # the same prompts
    assert with_tier[2].promotions > 0 and with_tier[2].cpu_hit_tokens > 0
    assert with_tier[0] > without[0], (with_tier, without)


def test_backends_serve_identically():
    assert _serve("cpp", True, seed=3) == _serve("python", True, seed=3)
