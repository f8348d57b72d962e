"""Prefix caching: hits, copy-on-write of a partial hit, LRU eviction, salts, collisions."""

import os

import numpy as np
import pytest

from pagedkv import BlockManager, InvalidArgument, InvalidType, OutOfPages, SequenceSwapped, UnknownSequence
from pagedkv._hashing import page_hash, salt_hash


def _mgr(num_pages=16, page_size=4, **kw):
    return BlockManager(num_pages, page_size, enable_prefix_caching=True, **kw)


def test_second_prompt_reuses_full_pages_of_the_first():
    mgr = _mgr()
    alloc = mgr.allocate(0, token_ids=range(10))
    assert alloc.num_cached_tokens == 0 and alloc.copies.tolist() == []
    assert mgr.page_table(0) == [0, 1, 2]
    got = mgr.allocate(1, token_ids=[*range(8), 99, 98, 97])
    assert got.num_cached_tokens == 8 and got.copies.tolist() == []
    assert mgr.page_table(1)[:2] == [0, 1]
    assert mgr.ref_count(0) == mgr.ref_count(1) == 2
    stats = mgr.prefix_cache_stats()
    assert (stats.queries, stats.hits, stats.query_tokens, stats.hit_tokens) == (2, 1, 21, 8)
    assert stats.hit_rate == pytest.approx(8 / 21)
    mgr.check_invariants()


def test_partial_last_page_is_never_matchable():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(6))  # page 1 holds 2 of 4 tokens: not cached
    assert mgr.allocate(1, token_ids=range(6)).num_cached_tokens == 4
    assert mgr.prefix_cache_stats().num_cached_pages == 1


def test_whole_prompt_hit_copies_the_last_page_instead_of_sharing_it():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(8))
    mgr.end_step()  # its KV is written (a copy must not read KV this step's forward pass writes)
    got = mgr.allocate(1, token_ids=range(8))
    # the engine must compute the last token, which lands in page 1: copy it, do not share it
    assert got.num_cached_tokens == 7
    assert got.copies.dtype == np.int32 and got.copies.tolist() == [[1, 2]]
    assert mgr.page_table(1) == [0, 2]
    assert mgr.ref_count(1) == 1 and mgr.ref_count(0) == 2
    mgr.check_invariants()


def test_appends_with_token_ids_make_filled_pages_matchable():
    mgr = _mgr()
    mgr.allocate(0, token_ids=[1, 2, 3])
    mgr.append(0, token_ids=[4, 5])  # fills page 0, starts page 1
    assert mgr.prefix_cache_stats().num_cached_pages == 1
    assert mgr.allocate(1, token_ids=[1, 2, 3, 4, 9]).num_cached_tokens == 4
    mgr.append_batch([0], [3], token_ids=[6, 7, 8])  # fills page 1
    assert mgr.allocate(2, token_ids=[1, 2, 3, 4, 5, 6, 7, 8, 0]).num_cached_tokens == 8


def test_append_without_token_ids_stops_caching_that_sequence():
    mgr = _mgr()
    mgr.allocate(0, token_ids=[1, 2])
    mgr.append(0, 2)  # unknown tokens fill page 0
    mgr.append(0, token_ids=[5, 6, 7, 8])
    assert mgr.prefix_cache_stats().num_cached_pages == 0


def test_freed_cached_pages_stay_matchable_and_a_hit_takes_them_off_the_free_queue():
    mgr = _mgr(num_pages=4)
    mgr.allocate(0, token_ids=range(8))
    mgr.free(0)
    assert mgr.num_free_pages == 4
    assert mgr.prefix_cache_stats().num_evictable_pages == 2
    got = mgr.allocate(1, token_ids=[*range(8), 5])
    assert got.num_cached_tokens == 8 and mgr.page_table(1) == [0, 1, 2]
    assert mgr.num_free_pages == 1 and mgr.prefix_cache_stats().num_evictable_pages == 0
    mgr.check_invariants()


def test_uncached_pages_go_first_then_lru_evicts_tail_pages_before_head_pages():
    mgr = _mgr(num_pages=6, page_size=2)
    mgr.allocate(0, token_ids=[1, 2, 3, 4, 5, 6])  # pages 0 1 2, all cached
    mgr.free(0)  # evictable LRU order: 2, 1, 0 (tail first)
    mgr.allocate(1, 6)  # no token ids: takes the 3 uncached pages 3 4 5
    assert mgr.page_table(1) == [3, 4, 5]
    mgr.allocate(2, 2)  # must evict: the tail page 2 goes first
    assert mgr.page_table(2) == [2]
    # the head of the freed prompt is still matchable
    assert mgr.allocate(3, token_ids=[1, 2, 9]).num_cached_tokens == 2


def test_cache_salt_isolates_tenants():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(12), cache_salt="tenant-a")
    assert mgr.allocate(1, token_ids=range(12), cache_salt="tenant-b").num_cached_tokens == 0
    assert mgr.allocate(2, token_ids=range(12)).num_cached_tokens == 0
    mgr.end_step()
    assert mgr.allocate(3, token_ids=range(12), cache_salt="tenant-a").num_cached_tokens == 11
    assert not set(mgr.page_table(1)) & set(mgr.page_table(0))


def test_forced_hash_collisions_are_misses_not_wrong_hits():
    # with 1-bit hashes every page collides with every other
    mgr = _mgr(num_pages=32, page_size=2, _hash_bits=1)
    mgr.allocate(0, token_ids=[1, 2, 3, 4, 5, 6])
    cases = [([7, 8, 3, 4, 5, 6], 0), ([1, 2, 9, 9, 5, 6], 2), ([2, 1, 3, 4], 0), ([1, 2, 3, 5, 5, 6], 2)]
    for seq_id, (prompt, cached) in enumerate(cases, 1):
        assert mgr.allocate(seq_id, token_ids=prompt).num_cached_tokens == cached, prompt
    mgr.check_invariants()


def test_collisions_never_share_pages_with_a_different_prefix():
    mgr = _mgr(num_pages=128, page_size=1, _hash_bits=2)
    prompts = [[a, b, c] for a in range(3) for b in range(3) for c in range(3)]
    for seq_id, prompt in enumerate(prompts):
        got = mgr.allocate(seq_id, token_ids=prompt + [7])
        for earlier, other in enumerate(prompts[:seq_id]):
            shared = [p for p in mgr.page_table(seq_id)[: got.num_cached_tokens] if p in mgr.page_table(earlier)]
            for p in shared:
                pos = mgr.page_table(seq_id).index(p)
                assert other[: pos + 1] == prompt[: pos + 1], f"{prompt} got the KV of {other} at {pos}"
    mgr.check_invariants()


def test_can_allocate_counts_hits_and_taking_evictable_pages():
    mgr = _mgr(num_pages=3, page_size=2)
    mgr.allocate(0, token_ids=[1, 2, 3, 4])
    # a 6-token prompt needs 3 pages; 2 are hits on live pages, so 1 free page suffices
    assert mgr.can_allocate(token_ids=[1, 2, 3, 4, 5, 6])
    assert not mgr.can_allocate(6)
    mgr.free(0)
    assert mgr.can_allocate(token_ids=[1, 2, 3, 4, 5, 6])
    mgr.allocate(1, token_ids=[1, 2, 3, 4, 5, 6])
    with pytest.raises(OutOfPages):
        mgr.allocate(2, token_ids=[1, 2, 3, 4, 5, 6, 7])


def test_reset_prefix_cache_forgets_everything():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(8))
    mgr.allocate(1, token_ids=range(12))
    mgr.free(1)
    mgr.reset_prefix_cache()
    stats = mgr.prefix_cache_stats()
    assert stats.num_cached_pages == 0 and stats.num_evictable_pages == 0
    assert mgr.allocate(2, token_ids=range(12)).num_cached_tokens == 0
    mgr.check_invariants()


def test_prefix_caching_off_ignores_token_ids():
    mgr = BlockManager(8, 4)
    mgr.allocate(0, token_ids=range(8))
    assert mgr.allocate(1, token_ids=range(8)).num_cached_tokens == 0
    assert mgr.prefix_cache_stats().queries == 0


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(token_ids=[1, -2]), InvalidArgument, "token_ids"),
        (dict(token_ids=[]), InvalidArgument, "token_ids"),
        (dict(token_ids=[1.5]), InvalidType, "token_ids"),
        (dict(num_tokens=3, token_ids=[1, 2]), InvalidArgument, "num_tokens"),
        (dict(token_ids=[1], cache_salt=5), InvalidType, "cache_salt"),
        (dict(), InvalidArgument, "num_tokens"),
    ],
)
def test_bad_prompts(kwargs, error, name):
    mgr = _mgr()
    before = mgr.snapshot()
    with pytest.raises(error) as info:
        mgr.allocate(0, **kwargs)
    assert str(info.value).startswith(name)
    assert mgr.snapshot() == before


def test_page_hash_is_deterministic_across_processes(run_python):
    code = "from pagedkv._hashing import page_hash, salt_hash; print(page_hash(page_hash(0, [1, 2, 3], 0), [4], salt_hash('x')))"
    outs = {run_python(code, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert outs == {f"{page_hash(page_hash(0, [1, 2, 3], 0), [4], salt_hash('x'))}\n"}
    # pinned value: the hash is part of the format (identical in both backends, stable over releases)
    assert page_hash(0, [1, 2, 3], 0) == page_hash(0, (1, 2, 3), 0)
    assert page_hash(0, [1, 2, 3], 0) != page_hash(0, [1, 2, 3], salt_hash("x"))
    assert page_hash(0, [1, 2], 0) != page_hash(0, [2, 1], 0)


# ------------------------------------------------- deferred indexing (chunked prefill)
def test_uncommitted_prompt_pages_are_not_matchable():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(12), num_computed_tokens=6)  # first chunk: 6 of 12 tokens
    assert mgr.prefix_cache_stats().num_cached_pages == 1  # page 0 only: page 1 is half written
    got = mgr.allocate(1, token_ids=range(12))
    assert got.num_cached_tokens == 4 and mgr.page_table(1)[0] == mgr.page_table(0)[0]
    assert set(mgr.page_table(1)[1:]).isdisjoint(mgr.page_table(0))
    mgr.check_invariants()


def test_commit_makes_pages_matchable_in_order_and_is_monotone():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(12), num_computed_tokens=0)
    assert mgr.prefix_cache_stats().num_cached_pages == 0
    assert mgr.commit(0, 3) == 0  # no full page inside 3 tokens
    assert mgr.commit(0, 7) == 1  # page 0
    assert mgr.commit(0, 5) == 0 and mgr.commit(0, 7) == 0  # smaller or equal: no-op
    assert mgr.allocate(1, token_ids=[*range(4), 50, 51, 52, 53, 54]).num_cached_tokens == 4
    assert mgr.commit(0, 12) == 2  # pages 1 and 2
    # page 2's KV lands in this step's forward pass: a whole-prompt copy of it must wait a step
    assert mgr.allocate(2, token_ids=range(12)).num_cached_tokens == 8
    mgr.end_step()
    assert mgr.allocate(3, token_ids=range(12)).num_cached_tokens == 11  # whole prompt: last page copied
    mgr.check_invariants()


def test_duplicates_computed_at_once_are_all_cached():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(12), num_computed_tokens=0)
    mgr.allocate(1, token_ids=range(12), num_computed_tokens=0)  # nothing to hit yet
    assert mgr.commit(1, 12) == 3
    assert mgr.commit(0, 12) == 3  # the same content computed twice: both copies are findable
    assert mgr.prefix_cache_stats().num_cached_pages == 6
    mgr.end_step()  # both prefills ran
    assert mgr.allocate(2, token_ids=range(12)).num_cached_tokens == 11
    assert mgr.page_table(2)[:2] in (mgr.page_table(0)[:2], mgr.page_table(1)[:2])
    mgr.free(0)
    mgr.free(2)  # sequence 1 keeps its copy; sequence 0's stays findable until evicted
    assert mgr.allocate(3, token_ids=range(12)).num_cached_tokens == 11
    mgr.check_invariants()


def test_free_mid_prefill_leaves_nothing_unwritten_matchable():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(12), num_computed_tokens=4)
    pages = mgr.page_table(0)
    mgr.free(0)
    snap = mgr.snapshot()
    assert snap["evictable"] == [pages[0]]  # the committed page stays matchable
    assert snap["free"][-2:] == [pages[2], pages[1]]  # the others were never indexed
    assert mgr.allocate(1, token_ids=range(12)).num_cached_tokens == 4
    mgr.check_invariants()


def test_appends_commit_pending_prompt_pages_first():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(10), num_computed_tokens=2)
    mgr.append(0, token_ids=[10, 11])  # the prompt's rest and the new tokens are written in this step
    assert mgr.prefix_cache_stats().num_cached_pages == 3
    assert mgr.allocate(1, token_ids=[*range(12), 7]).num_cached_tokens == 12
    mgr.allocate(2, token_ids=[9] * 10, num_computed_tokens=0)
    mgr.append_batch([2], 1, token_ids=[9])
    assert mgr.prefix_cache_stats().num_cached_pages == 5  # sequence 2's pages 0 and 1


def test_append_without_token_ids_commits_the_prompt_then_stops():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(10), num_computed_tokens=0)
    mgr.append_batch([0], 3)  # unknown tokens fill page 2: pages 0 and 1 are still indexed
    assert mgr.prefix_cache_stats().num_cached_pages == 2
    assert mgr.commit(0, 13) == 0
    assert mgr.allocate(1, token_ids=range(13)).num_cached_tokens == 8


def test_allocate_commits_at_least_the_cached_tokens():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(8))
    mgr.allocate(1, token_ids=[*range(8), 20, 21, 22, 23, 24], num_computed_tokens=0)  # 8 cached
    assert mgr.prefix_cache_stats().num_cached_pages == 2  # page 2 of sequence 1 waits
    assert mgr.commit(1, 8) == 0  # already committed by the hit
    assert mgr.commit(1, 12) == 1
    mgr.check_invariants()


def test_fork_copies_the_committed_state():
    mgr = _mgr()
    mgr.allocate(0, token_ids=range(12), num_computed_tokens=4)
    mgr.fork(0, 1)
    assert mgr.commit(1, 4) == 0
    assert mgr.commit(1, 12) == 2  # the shared pages 1 and 2
    assert mgr.commit(0, 12) == 0  # already indexed, through the child
    mgr.free(0)
    mgr.free(1)
    assert mgr.prefix_cache_stats().num_evictable_pages == 3
    mgr.check_invariants()


def test_window_released_and_swapped_pages_keep_the_chain():
    mgr = _mgr(num_cpu_pages=8)
    mgr.allocate(0, token_ids=range(12), num_computed_tokens=0)
    assert mgr.release_window(0, 5) == 1  # page 0 released before it was committed
    assert mgr.commit(0, 12) == 2  # pages 1 and 2 chain after page 0's content, not its page
    assert mgr.can_allocate(token_ids=range(12))
    mgr.allocate(1, token_ids=range(12), num_computed_tokens=4)  # page 0 is not cached: a miss
    assert mgr.snapshot()["stats"]["hit_tokens"] == 0
    mgr.swap_out([1])
    with pytest.raises(SequenceSwapped):
        mgr.commit(1, 8)
    mgr.swap_in([1])  # the page brought back holds committed content: it is indexed again
    assert mgr.commit(1, 12) == 2  # duplicates of sequence 0's pages 1 and 2
    mgr.end_step()  # their KV is written
    assert mgr.allocate(2, token_ids=range(12)).num_cached_tokens == 11  # the whole prompt again
    mgr.check_invariants()


def test_commit_is_a_no_op_without_token_ids_or_prefix_caching():
    mgr = _mgr()
    mgr.allocate(0, 8)
    assert mgr.commit(0, 8) == 0
    plain = BlockManager(8, 4)
    plain.allocate(0, token_ids=range(8), num_computed_tokens=3)
    assert plain.commit(0, 8) == 0
    assert mgr.prefix_cache_stats().num_cached_pages == plain.prefix_cache_stats().num_cached_pages == 0


@pytest.mark.parametrize(
    "value, error, text",
    [
        (-1, InvalidArgument, "num_computed_tokens must be an int in [0, 6], got -1"),
        (7, InvalidArgument, "num_computed_tokens must be an int in [0, 6], got 7"),
        (2.0, InvalidType, "num_computed_tokens must be an int"),
        (True, InvalidType, "num_computed_tokens must be an int"),
    ],
)
@pytest.mark.parametrize("caching", [True, False])
def test_bad_num_computed_tokens(value, error, text, caching):
    mgr = BlockManager(16, 4, enable_prefix_caching=caching)
    before = mgr.snapshot()
    for kwargs in (dict(token_ids=range(6)), dict(num_tokens=6)):  # validated even where ignored
        with pytest.raises(error) as info:
            mgr.allocate(0, **kwargs, num_computed_tokens=value)
        assert str(info.value).startswith(text)
    assert mgr.snapshot() == before


def test_commit_errors_change_nothing():
    mgr = _mgr(num_cpu_pages=4)
    mgr.allocate(0, token_ids=range(6), num_computed_tokens=0)
    mgr.allocate(1, 3)
    mgr.swap_out([1])
    before = mgr.snapshot()
    cases = [
        ((5, 0), UnknownSequence, "unknown sequence 5"),
        ((1, 0), SequenceSwapped, "sequence 1 is swapped out"),
        ((0, 7), InvalidArgument, "num_computed_tokens must be at most num_tokens(0) = 6, got 7"),
        ((0, -1), InvalidArgument, "num_computed_tokens must be an int in [0, "),
        ((0, 1.5), InvalidType, "num_computed_tokens must be an int"),
    ]
    for args, error, text in cases:
        with pytest.raises(error) as info:
            mgr.commit(*args)
        assert str(info.value).startswith(text), str(info.value)
    assert mgr.snapshot() == before
    mgr.check_invariants()


def test_chunked_prefill_trace_replays_on_every_backend(tmp_path):
    from pagedkv._backend import resolve
    from pagedkv._recorder import replay

    path = tmp_path / "trace.jsonl"
    mgr = _mgr(record=path)
    mgr.allocate(0, token_ids=range(12), num_computed_tokens=4)
    mgr.allocate(1, token_ids=range(12))
    assert mgr.commit(0, 12) == 2  # duplicates of sequence 1's pages 1 and 2
    with pytest.raises(InvalidArgument):
        mgr.commit(0, 13)
    mgr.free(1)
    mgr.close_trace()
    assert '"commit"' in path.read_text()
    for backend in ["python"] + (["cpp"] if resolve() == "cpp" else []):
        result = replay(path, backend)
        assert result.divergence is None and result.num_calls == 5


class _EagerIndexing:
    """A manager that ignores ``num_computed_tokens`` and ``commit``: it indexes every full page
    of a prompt at ``allocate``, before its KV is written (the bug deferred indexing fixes)."""

    def __init__(self):
        self._mgr = BlockManager(num_pages=16, page_size=2, enable_prefix_caching=True, backend="python")

    def __getattr__(self, name):
        return getattr(self._mgr, name)

    def allocate(self, seq_id, num_tokens=None, *, num_computed_tokens=None, **kwargs):
        return self._mgr.allocate(seq_id, num_tokens, **kwargs)

    def commit(self, seq_id, num_computed_tokens):
        return self._mgr.commit(seq_id, 0)  # checks the sequence, indexes nothing


def test_shipped_machine_catches_hits_on_unwritten_pages():
    from hypothesis import Phase, settings

    from pagedkv.testing import block_manager_machine

    machine = block_manager_machine(_EagerIndexing)
    machine.TestCase.settings = settings(
        max_examples=200, stateful_step_count=20, deadline=None, derandomize=True, phases=[Phase.generate]
    )
    with pytest.raises(AssertionError, match="reads back .*'unwritten'"):
        machine.TestCase().runTest()


def test_a_pending_copy_source_is_never_another_copy_destination():
    # The copy hazard: a whole-prompt hit copies its last page and lets it go. Until the step's
    # copies have run (the next append_batch, or end_step), that page must not become the
    # destination of another copy of the same step, so all of them can run as one launch.
    mgr = _mgr(num_pages=7, page_size=2)
    prompt_a, prompt_x = [1, 2, 3, 4], [5, 6, 7, 8]
    mgr.allocate(0, token_ids=prompt_a)  # pages 0 1
    mgr.allocate(1, token_ids=prompt_x)  # pages 2 3
    mgr.free(0)
    mgr.free(1)
    mgr.end_step()  # their KV is written
    mgr.allocate(9, 4)  # pages 4 5: one free page (6) is left
    hit = mgr.allocate(2, token_ids=prompt_a)
    assert hit.copies.tolist() == [[1, 6]]
    assert mgr.num_pinned_pages == 1  # page 1: only the pending copy holds it
    with pytest.raises(OutOfPages):  # its own copy would need page 1 as its destination
        mgr.allocate(3, token_ids=prompt_x)
    mgr.end_step()  # the engine ran the copies
    assert mgr.num_pinned_pages == 0
    assert mgr.allocate(3, token_ids=prompt_x).copies.tolist() == [[3, 1]]
    mgr.check_invariants()


def test_a_hit_prefers_a_page_no_pending_copy_writes():
    mgr = _mgr(num_pages=8, page_size=2)
    prompt = [1, 2, 3, 4]
    mgr.allocate(0, token_ids=prompt)  # pages 0 1
    mgr.free(0)
    mgr.end_step()  # its KV is written
    first = mgr.allocate(1, token_ids=prompt)  # whole prompt: page 1 copied to page 2
    second = mgr.allocate(2, token_ids=prompt)  # page 2 holds it too, but its copy is pending
    assert first.copies.tolist() == [[1, 2]] and second.copies[0, 0] == 1
    mgr.check_invariants()


@pytest.mark.parametrize("backend", ["python"] + (["cpp"] if os.environ.get("PAGEDKV_IMPL") != "python" else []))
def test_a_pinned_prefix_is_never_evicted_and_counts_against_capacity(backend):
    mgr = BlockManager(6, 2, enable_prefix_caching=True, backend=backend)
    system = [7, 7, 8, 8]
    mgr.allocate(0, token_ids=system + [1])
    mgr.free(0)
    assert mgr.pin_prefix(system) == 2
    stats = mgr.prefix_cache_stats()
    assert stats.num_pinned_prefix_pages == 2 and mgr.num_free_pages == 4
    mgr.allocate(1, 8)  # takes every free page: the pinned pages are not evicted
    with pytest.raises(OutOfPages):
        mgr.allocate(2, 1)
    mgr.free(1)
    assert mgr.allocate(3, token_ids=system + [2]).num_cached_tokens == 4
    mgr.free(3)
    with pytest.raises(InvalidArgument, match="pin_prefix"):
        mgr.unpin_prefix(system, cache_salt="other")  # pins are per salt
    assert mgr.unpin_prefix(system) == 2
    assert mgr.prefix_cache_stats().num_pinned_prefix_pages == 0 and mgr.num_free_pages == 6
    with pytest.raises(InvalidArgument, match="pin_prefix"):
        mgr.unpin_prefix(system)
    assert mgr.pin_prefix([9, 9, 9]) == 0  # nothing of it is cached
    assert mgr.unpin_prefix([9, 9, 9]) == 0
    mgr.check_invariants()


def test_pins_match_across_backends():
    if os.environ.get("PAGEDKV_IMPL") == "python":
        pytest.skip("the C++ core is not under test")
    results = []
    for backend in ("python", "cpp"):
        mgr = BlockManager(10, 2, enable_prefix_caching=True, backend=backend)
        out = []
        mgr.allocate(0, token_ids=[1, 2, 3, 4, 5, 6])
        out.append(mgr.pin_prefix([1, 2, 3, 4, 5, 6], cache_salt=None))
        out.append(mgr.pin_prefix([1, 2, 3]))
        mgr.free(0)
        out.append(mgr.unpin_prefix([1, 2, 3, 4, 5, 6]))
        try:
            mgr.unpin_prefix([1, 2])
        except InvalidArgument as exc:
            out.append(str(exc))
        out.append(mgr.snapshot())
        out.append(mgr.prefix_cache_stats())
        mgr.check_invariants()
        results.append(out)
    assert results[0] == results[1]


@pytest.mark.parametrize("backend", ["python"] + (["cpp"] if os.environ.get("PAGEDKV_IMPL") != "python" else []))
def test_lower_priority_pages_are_evicted_first(backend):
    mgr = BlockManager(6, 2, enable_prefix_caching=True, backend=backend)
    low, high, mid = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    mgr.allocate(0, token_ids=high + [0], priority=90)  # pages 0 1 (2 is the partial last page)
    mgr.allocate(1, token_ids=low + [0], priority=10)  # pages 3 4 (5)
    mgr.free(0)
    mgr.free(1)
    assert mgr.snapshot()["evictable"] == [4, 3, 1, 0]  # priority 10 first, then 90; LRU within
    mgr.allocate(2, 8)  # the 2 uncached pages, then evicts the two low-priority ones
    mgr.free(2)
    assert mgr.allocate(3, token_ids=high + [5]).num_cached_tokens == 4
    assert mgr.allocate(4, token_ids=low + [5]).num_cached_tokens == 0
    mgr.free(3)
    mgr.free(4)
    # A page keeps the highest priority of the sequences that held it: a low-priority hit on a
    # high-priority prefix does not demote it, and fork children inherit their parent's.
    mgr.allocate(5, token_ids=high + [7], priority=0)
    mgr.fork(5, 6)
    mgr.allocate(7, token_ids=mid + [7], priority=50)
    for seq in (5, 6, 7):
        mgr.free(seq)
    order = mgr.snapshot()["evictable"]
    assert len(order) == 4 and order[-2:] == [1, 0]  # the priority-50 pages go before the high prefix
    with pytest.raises(InvalidArgument, match="priority"):
        mgr.allocate(8, 3, priority=101)
    mgr.check_invariants()


def test_priorities_match_across_backends():
    if os.environ.get("PAGEDKV_IMPL") == "python":
        pytest.skip("the C++ core is not under test")
    snaps = []
    for backend in ("python", "cpp"):
        r = __import__("random").Random(5)
        mgr = BlockManager(24, 2, enable_prefix_caching=True, backend=backend)
        live, out = [], []
        for i in range(300):
            try:
                if r.random() < 0.5 or not live:
                    prompt = [r.randrange(3) for _ in range(r.randint(1, 9))]
                    out.append(mgr.allocate(i, token_ids=prompt, priority=r.choice([0, 35, 35, 70, 100])).num_cached_tokens)
                    live.append(i)
                elif r.random() < 0.2:
                    out.append(mgr.fork(r.choice(live), i))
                    live.append(i)
                else:
                    seq = r.choice(live)
                    mgr.free(seq)
                    live.remove(seq)
            except OutOfPages:
                out.append("oop")
            if i % 10 == 0:
                mgr.end_step()
                out.append(mgr.snapshot())
        mgr.check_invariants()
        snaps.append(out)
    assert snaps[0] == snaps[1]


@pytest.mark.parametrize("backend", ["python"] + (["cpp"] if os.environ.get("PAGEDKV_IMPL") != "python" else []))
def test_a_shared_hit_takes_the_referenced_duplicate_even_if_a_copy_writes_it(backend):
    # Found by review: only a copy source avoids pending copy destinations; a shared hit reads
    # nothing early, so it takes the referenced duplicate (no free page, no eviction).
    mgr = BlockManager(5, 2, num_cpu_pages=4, enable_prefix_caching=True, backend=backend)
    mgr.allocate(0, token_ids=[1, 2, 3], num_computed_tokens=0)  # pages 0 1
    mgr.allocate(1, token_ids=[1, 2, 3], num_computed_tokens=0)  # pages 2 3: a duplicate
    mgr.commit(0, 2)
    mgr.commit(1, 2)
    mgr.swap_out([0])
    mgr.end_step()
    mgr.allocate(9, 4)
    mgr.free(1)  # page 2 (a cached duplicate) is evictable
    assert mgr.swap_in([0]).copies.tolist() == [[0, 3], [1, 0]]  # page 3 is a pending destination
    hit = mgr.allocate(2, token_ids=[1, 2, 7])
    assert hit.num_cached_tokens == 2 and mgr.page_table(2)[0] == 3
    mgr.check_invariants()


@pytest.mark.parametrize("backend", ["python"] + (["cpp"] if os.environ.get("PAGEDKV_IMPL") != "python" else []))
@pytest.mark.parametrize("appended", [1, 2])
def test_a_whole_prompt_copy_never_reads_kv_this_step_writes(backend, appended):
    # A whole-prompt hit's copy runs before the step's forward pass. A page an append of this
    # step filled with 2+ tokens still lacks KV then (found in review): the hit stops a page
    # earlier. Filled by one decode token, its only missing slot is the prompt's last, which the
    # prompt recomputes: the copy is taken. Checked by running the plans in the documented order.
    ps = 4
    mgr = BlockManager(8, ps, enable_prefix_caching=True, backend=backend)
    kv = np.full(8 * ps, -1)
    value = lambda tokens: [hash(tuple(tokens[:i + 1])) for i in range(len(tokens))]  # noqa: E731
    seq = list(range(1, 9 - appended))
    mgr.allocate(0, token_ids=seq)
    kv[mgr.slots(0)] = value(seq)
    mgr.end_step()
    step = mgr.append_batch([0], appended, token_ids=list(range(50, 50 + appended)))
    seq += list(range(50, 50 + appended))
    hit = mgr.allocate(1, token_ids=seq)  # the same 8 tokens, admitted in this step
    assert hit.num_cached_tokens == (7 if appended == 1 else 4)
    for src, dst in hit.copies.tolist():  # the step's copies ...
        kv[dst * ps:(dst + 1) * ps] = kv[src * ps:(src + 1) * ps]
    kv[step.slot_mapping] = value(seq)[-appended:]  # ... then the forward pass
    slots = mgr.slots(1)
    kv[slots[hit.num_cached_tokens:]] = value(seq)[hit.num_cached_tokens:]
    assert kv[slots].tolist() == value(seq)
    mgr.end_step()
    mgr.free(1)
    assert mgr.allocate(2, token_ids=seq).num_cached_tokens == 7  # a step later: the whole prompt
    mgr.check_invariants()
