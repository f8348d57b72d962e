"""HybridBlockManager: KV cache groups over one pool, checked against slow oracles and across
backends. The oracles here are written from the contract (README "Hybrid models"), not from
``pagedkv/hybrid.py``: what each group must hold, and the largest hit every group accepts."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pagedkv import BlockManager, HybridBlockManager, KVCacheGroup
from pagedkv.errors import (DuplicateSequence, InvalidArgument, InvalidType, OutOfPages, PagedKVError, SequenceExists,
                            SequenceSwapped, UnknownSequence)

from test_parity import HAVE_CPP

BACKENDS = ["python"] + (["cpp"] if HAVE_CPP else [])
G = KVCacheGroup
MIXES = [
    [G.full(), G.sliding(6)],
    [G.sliding(9), G.full(), G.chunked(8)],
    [G.full(), G.sliding(5), G.state(2)],
    [G.chunked(4), G.sliding(3)],
]


def _outcome(fn, *args, **kwargs):
    try:
        out = fn(*args, **kwargs)
    except PagedKVError as exc:
        return ("raised", type(exc).__name__, str(exc))
    if isinstance(out, tuple):
        return ("returned", tuple(np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for v in out))
    if isinstance(out, np.ndarray):
        return ("returned", out.tolist())
    return ("returned", out)


def _prompt(rng: random.Random, prompts: list[list[int]]) -> list[int]:
    """A prompt that often extends an earlier one (so prefix hits happen)."""
    if prompts and rng.random() < 0.7:
        base = rng.choice(prompts)
        tokens = base[: rng.randint(1, len(base))]
    else:
        tokens = []
    return tokens + [rng.randrange(50) for _ in range(rng.randint(1 if tokens else 1, 14))]


def _random_ops(rng: random.Random, managers: list, steps: int, page_size: int, check=None):
    """Drive every manager through the same calls; return the outcomes of the first."""
    prompts: list[list[int]] = []
    live: set[int] = set()
    log = []
    for step in range(steps):
        op = rng.choice(["allocate", "allocate", "append", "append", "fork", "free", "swap", "commit", "can"])
        seq = rng.choice(sorted(live)) if live and rng.random() < 0.85 else rng.randrange(12)
        if op == "allocate":
            tokens = _prompt(rng, prompts)
            kwargs = {"num_computed_tokens": rng.randint(0, len(tokens))} if rng.random() < 0.2 else {}
            sid = rng.randrange(12)
            calls = [(m.allocate, (sid,), dict(token_ids=tokens, **kwargs)) for m in managers]
            prompts.append(tokens)
        elif op == "append":
            ids = rng.sample(sorted(live), rng.randint(1, len(live))) if live else [seq]
            counts = [rng.randint(1, page_size + 2) for _ in ids]
            tokens = [rng.randrange(50) for _ in range(sum(counts))]
            calls = [(m.append_batch, (ids, counts), dict(token_ids=tokens)) for m in managers]
        elif op == "fork":
            child = rng.randrange(12)
            calls = [(m.fork, (seq, child), {}) for m in managers]
        elif op == "free":
            calls = [(m.free, (seq,), {}) for m in managers]
        elif op == "swap":
            swapped = managers[0].is_swapped(seq) if seq in managers[0] else False
            fn = "swap_in" if swapped else "swap_out"
            calls = [(getattr(m, fn), ([seq],), {}) for m in managers]
        elif op == "commit":
            n = managers[0].num_tokens(seq) if seq in managers[0] else 3
            upto = rng.randint(0, n)
            calls = [(m.commit, (seq, upto), {}) for m in managers]
        else:
            tokens = _prompt(rng, prompts)
            calls = [(m.can_allocate, (), dict(token_ids=tokens)) for m in managers]
        outs = [_outcome(fn, *args, **kw) for fn, args, kw in calls]
        assert all(o == outs[0] for o in outs), (step, op, outs)
        snaps = [m.snapshot() for m in managers]
        assert all(s == snaps[0] for s in snaps), (step, op)
        for m in managers:
            m.check_invariants()
            if check is not None:
                check(m)
        live = {s for s in range(12) if s in managers[0]}
        if rng.random() < 0.3:
            for m in managers:
                m.end_step()
        log.append(outs[0])
    return log


@pytest.mark.parametrize("seed", range(6))
def test_a_single_full_group_is_todays_block_manager(seed):
    """Same ids, same results, same errors, same snapshots as a plain BlockManager."""
    rng = random.Random(seed)
    ps = rng.choice([2, 4])
    options = dict(enable_prefix_caching=True, num_cpu_pages=24)
    plain = BlockManager(28, ps, **options)
    hybrid = HybridBlockManager([G.full()], 28, ps, **options)

    class Adapter:  # the plain manager under the hybrid's names
        def __getattr__(self, name):
            return getattr(plain, name)

        def fork(self, parent, child):
            plain.fork(parent, child)
            return np.zeros((0, 2), dtype=np.int32)

        def allocate(self, *a, **kw):
            out = plain.allocate(*a, **kw)
            return (out.num_cached_tokens, out.copies)

        def append_batch(self, *a, **kw):
            out = plain.append_batch(*a, **kw)
            return (out.slot_mapping[None, :], out.copies, 0)

        def __contains__(self, s):
            return s in plain

    log = _random_ops(rng, [hybrid, Adapter()], 160, ps)
    assert any(o[0] == "raised" for o in log) and any(o[0] == "returned" for o in log)


def _group_oracle(mgr: HybridBlockManager):
    """Each windowed group holds exactly the pages from the oldest position its last computed
    tokens see to the end; a state group its pages; a full group all of them."""
    ps = mgr.page_size
    for s in range(12):
        if s not in mgr or mgr.is_swapped(s):
            continue
        n = mgr.num_tokens(s)
        start = mgr._start[s]  # the first position the last allocate/append computed
        for g, grp in enumerate(mgr.groups):
            table = mgr.page_table(s, g)
            if grp.kind == "state":
                assert len(table) == grp.state_pages and -1 not in table
                continue
            if grp.kind == "full":
                first = 0
            elif grp.kind == "sliding":
                first = max(0, start - grp.window + 1)
            else:
                first = start - start % grp.chunk
            assert len(table) == -(-n // ps)
            live_from = first // ps
            assert table[:live_from] == [-1] * live_from, (s, g, table, first)
            assert -1 not in table[live_from:], (s, g, table, first)


@pytest.mark.parametrize("groups", MIXES, ids=lambda gs: "+".join(g.kind for g in gs))
@pytest.mark.parametrize("seed", range(4))
def test_groups_match_across_backends_and_hold_what_their_attention_needs(groups, seed):
    if not HAVE_CPP:
        pytest.skip("the C++ core is not built")
    rng = random.Random(seed * 7 + len(groups))
    ps = 4 if any(g.kind == "chunked" for g in groups) else rng.choice([2, 3, 4])
    options = dict(enable_prefix_caching=True, num_cpu_pages=40)
    managers = [HybridBlockManager(groups, 48, ps, backend=b, **options) for b in ("python", "cpp")]
    log = _random_ops(rng, managers, 150, ps, check=_group_oracle)
    assert sum(o[0] == "returned" for o in log) > 40


def _accepted_hit_oracle(mgr: HybridBlockManager, tokens: list[int]) -> int:
    """The largest page-aligned hit below len(tokens) that every group accepts, by brute force
    over every length, from what the cache holds per group (prefix_match)."""
    ps = mgr.page_size
    states = [mgr.manager.prefix_match(tokens, cache_salt=mgr._salt(g, None)) for g in range(mgr.num_groups)]
    best = 0
    for pages in range(1, (len(tokens) - 1) // ps + 1):
        ok = True
        for g, grp in enumerate(mgr.groups):
            st = states[g]
            if grp.kind == "state" or len(st) < pages:
                ok = False
                break
            end = pages * ps
            first = {"full": 0, "sliding": max(0, end - grp.window + 1), "chunked": end - end % max(grp.chunk, 1)}[grp.kind]
            if any(st[i] != 2 for i in range(first // ps, pages)):
                ok = False
        if ok:
            best = pages * ps
    return best


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", MIXES[:2] + MIXES[3:], ids=lambda gs: "+".join(g.kind for g in gs))
def test_the_hit_is_the_largest_length_every_group_accepts(backend, groups):
    rng = random.Random(len(groups))
    ps = 4
    mgr = HybridBlockManager(groups, 80, ps, enable_prefix_caching=True, backend=backend)
    prompts: list[list[int]] = []
    seen_hit = 0
    for step in range(250):
        tokens = _prompt(rng, prompts)
        want = _accepted_hit_oracle(mgr, tokens)
        assert mgr.find_hit(tokens) == want
        seq = step % 6
        if seq in mgr:
            mgr.free(seq)
        try:
            got = mgr.allocate(seq, token_ids=tokens)
        except OutOfPages:
            continue
        assert got.num_cached_tokens == want
        seen_hit += want > 0
        prompts.append(tokens)
        for _ in range(rng.randint(0, 6)):
            if not mgr.can_append(seq):
                with pytest.raises(OutOfPages):
                    mgr.append_batch([seq], [1], token_ids=[rng.randrange(50)])
                break
            mgr.append_batch([seq], [1], token_ids=[rng.randrange(50)])
        mgr.check_invariants()
        mgr.end_step()
    print(seen_hit)
    assert seen_hit > 10


def test_a_sliding_group_hits_with_only_its_window_cached():
    """The pages a window released long ago are evicted first; the follow-up prompt still hits
    in full, since the sliding group needs only the pages its window covers at the hit."""
    ps, window = 4, 8
    for groups in ([G.sliding(window)], [G.full(), G.sliding(window)]):
        for backend in BACKENDS:
            mgr = HybridBlockManager(groups, 40, ps, enable_prefix_caching=True, backend=backend)
            prompt = list(range(40))  # 10 pages
            mgr.allocate(0, token_ids=prompt)
            mgr.append_batch([0], [1])  # the window releases the pages before position 33
            mgr.free(0)
            mgr.end_step()
            stats = mgr.prefix_cache_stats()
            plain_free = mgr.num_free_pages - stats.num_evictable_pages
            per_group = -(-(plain_free + 3) // len(groups))
            mgr.allocate(1, per_group * ps)  # evicts the 3 or 4 least recently freed pages
            follow_up = prompt + [99, 98]
            sliding = len(groups) - 1
            states = mgr.manager.prefix_match(follow_up, cache_salt=mgr._salt(sliding, None)).tolist()
            assert len(states) == 10 and states[:3] == [1, 1, 1] and states[-4:] == [2] * 4, states
            assert mgr.find_hit(follow_up) == 40
            got = mgr.allocate(2, token_ids=follow_up)
            assert got.num_cached_tokens == 40
            released = (40 - window + 1) // ps
            assert mgr.page_table(2, sliding)[:released] == [-1] * released
            mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_pages_are_copied_on_fork_and_constant(backend):
    mgr = HybridBlockManager([G.full(), G.state(3)], 30, 4, backend=backend)
    mgr.allocate(0, 9)
    parent_state = mgr.page_table(0, 1)
    copies = mgr.fork(0, 1)
    child_state = mgr.page_table(1, 1)
    assert copies.tolist() == [[p, c] for p, c in zip(parent_state, child_state)]
    assert not set(parent_state) & set(child_state)
    assert mgr.page_table(0, 0) == mgr.page_table(1, 0)  # token pages shared
    for _ in range(10):
        plan = mgr.append_batch([0, 1], [1, 1])
        assert (plan.slot_mapping[1] == -1).all()
    assert mgr.page_table(0, 1) == parent_state and len(mgr.page_table(1, 1)) == 3
    mgr.check_invariants()
    mgr.free(0)
    mgr.free(1)
    assert mgr.num_free_pages == 30


@pytest.mark.parametrize("backend", BACKENDS)
def test_failures_leave_the_manager_as_it_was(backend):
    mgr = HybridBlockManager([G.full(), G.sliding(4), G.state(1)], 12, 4, enable_prefix_caching=True,
                             backend=backend)
    mgr.allocate(0, token_ids=list(range(10)))
    before = mgr.snapshot()
    for fn, args, kwargs, error in [
        (mgr.allocate, (1,), dict(token_ids=list(range(30))), OutOfPages),
        (mgr.allocate, (0,), dict(token_ids=[1, 2]), SequenceExists),
        (mgr.allocate, (2**62,), dict(num_tokens=3), InvalidArgument),
        (mgr.allocate, (1,), dict(num_tokens=3, token_ids=[1]), InvalidArgument),
        (mgr.append_batch, ([0, 5], [1, 1]), {}, UnknownSequence),
        (mgr.append_batch, ([0], [40]), {}, OutOfPages),
        (mgr.fork, (0, 0), {}, SequenceExists),
        (mgr.fork, (7, 1), {}, UnknownSequence),
        (mgr.free, (3,), {}, UnknownSequence),
        (mgr.page_table, (0, 3), {}, InvalidArgument),
        (mgr.slots, (0, 5, 99), {}, InvalidArgument),
    ]:
        with pytest.raises(error) as info:
            fn(*args, **kwargs)
        assert str(info.value)
        assert mgr.snapshot() == before, fn.__name__
    assert not mgr.can_allocate(token_ids=list(range(30)))
    mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_largest_seq_id_fits_every_group(backend):
    """With G groups, seq s uses inner ids s * G .. s * G + G - 1: the largest id accepted must
    keep the last of them an int64; one more is refused before anything is taken."""
    for groups in ([G.full(), G.sliding(4), G.chunked(4)], [G.state(1), G.full(), G.sliding(4), G.full(), G.full()]):
        mgr = HybridBlockManager(groups, 40, 4, backend=backend)
        largest = (2**63 - 1 - (len(groups) - 1)) // len(groups)
        mgr.allocate(0, 5)
        before = mgr.snapshot()
        for fn, args in ((mgr.allocate, (largest + 1, 5)), (mgr.fork, (0, largest + 1))):
            with pytest.raises(InvalidArgument) as info:
                fn(*args)
            assert str(largest) in str(info.value)
            assert mgr.snapshot() == before
        mgr.allocate(largest, 5)
        mgr.fork(largest, 1)
        mgr.free(largest)
        mgr.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_with_state_groups_respects_the_watermark_and_takes_nothing_when_short(backend):
    mgr = HybridBlockManager([G.full(), G.state(1), G.state(2)], 10, 4, watermark=0.2, backend=backend)
    mgr.allocate(0, 12)  # 3 + 1 + 2 pages: 4 free, 2 of them the watermark's
    before = mgr.snapshot()
    with pytest.raises(OutOfPages):
        mgr.fork(0, 1)  # needs 3 state pages above the watermark
    assert mgr.snapshot() == before and 1 not in mgr
    mgr.check_invariants()
    mgr.free(0)
    assert mgr.num_free_pages == 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_callers_sequences_and_counts(backend):
    """The groups are inner sequences seq * G + g; an error must name the caller's sequence
    (and the caller's token counts), never an inner one."""
    mgr = HybridBlockManager([G.full(), G.sliding(4)], 40, 4, num_cpu_pages=20, backend=backend)
    mgr.allocate(3, 5)
    mgr.allocate(5, 5)
    mgr.swap_out([3])
    for fn, args, kwargs, error in [
        (mgr.swap_in, ([5],), {}, SequenceSwapped),
        (mgr.append_batch, ([5, 3],), {}, SequenceSwapped),
        (mgr.swap_out, ([3],), {}, SequenceSwapped),
        (mgr.fork, (3, 7), {}, SequenceSwapped),
        (mgr.slots, (3,), {}, SequenceSwapped),
        (mgr.append_batch, ([5, 5],), {}, DuplicateSequence),
    ]:
        with pytest.raises(error) as info:
            fn(*args, **kwargs)
        named = getattr(info.value, "seq_id", getattr(info.value, "value", None))
        assert named in (3, 5), (fn.__name__, str(info.value))
    with pytest.raises(InvalidArgument) as info:
        mgr.append_batch([5], 1, token_ids=[1, 2])
    assert "sum(num_tokens) = 1" in str(info.value) and "2 token ids" in str(info.value)


def test_bad_groups_are_named():
    cases = [
        ([], InvalidArgument, "groups"),
        ("full", InvalidType, "groups"),
        ([("full",)], InvalidType, "groups[0]"),
        ([G("dense")], InvalidArgument, "groups[0].kind"),
        ([G.sliding(0)], InvalidArgument, "groups[0].window"),
        ([G.full(), G.chunked(6)], InvalidArgument, "groups[1].chunk"),
        ([G("full", window=3)], InvalidArgument, "groups[0].window"),
        ([G.state(2)], InvalidArgument, "groups"),
    ]
    for groups, error, name in cases:
        with pytest.raises(error) as info:
            HybridBlockManager(groups, 8, 4)
        assert info.value.args[0] == name, (groups, info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_memory_stays_at_the_window(backend):
    """At long context a sliding group holds ceil(W / page) + 1 pages at most; a full group all."""
    ps, window = 16, 128
    mgr = HybridBlockManager([G.full(), G.sliding(window)], 4096, ps, backend=backend)
    mgr.allocate(0, 1000)
    for _ in range(3000):
        mgr.append_batch([0], [1])
    full, sliding = mgr.group_pages()
    assert full == -(-4000 // ps)
    assert sliding <= -(-window // ps) + 1
    assert mgr.num_pages - mgr.num_free_pages == full + sliding
