"""Parity: the C++ core and the Python reference, driven in lockstep, behave identically.

Every operation (successful or failing) is run on a ``backend="cpp"`` and a ``backend="python"``
``BlockManager``; results are compared (values, dtypes and shapes of arrays), failures by
exception type, ``str()`` and fields, and after every operation the complete ``snapshot()``
(free and evictable queues, ref counts, CPU tier, tables, hash index, prefix-cache counters) and
``check_invariants()`` of both. Operation sequences come from seeded ``random`` and from
Hypothesis (``st.randoms``, so failing sequences shrink). Prefix-caching configurations draw
prompts from a tiny vocabulary with shared prefixes and salts, some with truncated hashes, so
hits, whole-prompt-hit copies, LRU evictions and hash collisions all happen; they also swap
sequences to the CPU tier, release sliding windows, and prefill in chunks (``allocate`` with
``num_computed_tokens``, then ``commit``), freeing, forking or swapping some mid-prefill.

Skipped when the extension is not built, unless ``PAGEDKV_IMPL=cpp`` demands it.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pagedkv
from pagedkv import BlockManager, InvalidArgument, InvariantViolation, OutOfPages, SequenceExists, SequenceSwapped
from pagedkv._hashing import page_hash
from pagedkv.errors import SequenceTooLong

try:
    from pagedkv import _core  # noqa: F401

    HAVE_CPP = True
except ImportError:
    HAVE_CPP = False

pytestmark = pytest.mark.skipif(
    not HAVE_CPP and os.environ.get("PAGEDKV_IMPL") != "cpp",
    reason="pagedkv._core is not built (pip install . builds it)",
)

CONFIGS = [  # (num_pages, page_size, watermark)
    (16, 1, 0.0),
    (24, 3, 0.0),
    (64, 16, 0.0),
    (32, 3, 0.25),
    (40, 16, 0.1),
    (7, 1, 0.5),
]

CACHE_CONFIGS = [  # (num_pages, page_size, watermark, num_cpu_pages, hash_bits), prefix caching on
    (24, 2, 0.0, 10, 64),
    (32, 3, 0.1, 12, 64),
    (20, 4, 0.0, 8, 2),  # 2-bit hashes: most lookups collide
    (16, 1, 0.0, 6, 1),  # one token per page, 1-bit hashes
    (40, 16, 0.0, 16, 64),
    (12, 3, 0.25, 0, 64),  # no CPU tier: every swap_out of a page is OutOfPages(pool="cpu")
]
VOCAB = (0, 1, 2)
SALTS = (None, "tenant-a", b"tenant-b")


# ------------------------------------------------------------------ lockstep driver
def _normal(value):
    """A comparable form of a result that keeps dtypes, shapes and Python types."""
    if isinstance(value, np.ndarray):
        return ("ndarray", str(value.dtype), value.shape, value.tolist())
    if isinstance(value, tuple):
        return (type(value).__name__, tuple(_normal(v) for v in value))
    if isinstance(value, list):
        return ("list", [_normal(v) for v in value])
    return (type(value).__name__, value)


def _outcome(mgr: BlockManager, op: str, args: tuple, kwargs: dict):
    try:
        attr = getattr(mgr, op)
        out = attr(*args, **kwargs) if callable(attr) else attr
    except Exception as exc:  # noqa: BLE001 - every failure is compared, type included
        return ("raised", type(exc), str(exc), exc.args)
    return ("returned", _normal(out))


class Lockstep:
    """Two managers with the same configuration, one per backend, driven together.

    ``events`` counts what the operations exercised (prefix-cache hits, whole-prompt-hit copies,
    evictions, CPU-pool OutOfPages, SequenceSwapped, ...), so tests can check their coverage.
    """

    def __init__(self, num_pages: int, page_size: int, watermark: float = 0.0, **options):
        self.cpp = BlockManager(num_pages, page_size, watermark=watermark, backend="cpp", **options)
        self.py = BlockManager(num_pages, page_size, watermark=watermark, backend="python", **options)
        self.config = (num_pages, page_size, watermark, options)
        self.ops: list[tuple[str, tuple, dict]] = []
        self.events: dict[str, int] = {}
        self.prompts: list[tuple[list[int], object]] = []  # (token ids, cache_salt) allocated
        self.side_rng = random.Random(num_pages * 31 + page_size)  # hit caps and released leads
        self.pins: list[tuple[list[int], object]] = []  # (token ids, cache_salt) pinned

    def do(self, op: str, *args, **kwargs):
        self.ops.append((op, args, kwargs))
        before = self.py.snapshot()
        got = _outcome(self.cpp, op, args, kwargs)
        want = _outcome(self.py, op, args, kwargs)
        where = f"BlockManager{self.config}, last ops: {self.ops[-20:]}"
        assert got == want, f"{op}{args}{kwargs}: cpp {got} != python {want}\n{where}"
        after = self.py.snapshot()
        assert self.cpp.snapshot() == after, f"state differs after {op}{args}{kwargs}\n{where}"
        self.cpp.check_invariants()
        self.py.check_invariants()
        self._count(op, want, before, after)
        return want

    def _count(self, op: str, outcome, before: dict, after: dict) -> None:
        def event(name: str) -> None:
            self.events[name] = self.events.get(name, 0) + 1

        if outcome[0] == "raised":
            event(outcome[1].__name__)
            if outcome[1] is OutOfPages and outcome[3][3] == "cpu":
                event("cpu_out_of_pages")
        elif op == "allocate":
            (_, ((_, num_cached), (_, _, copies_shape, _))) = outcome[1]
            if num_cached:
                event("hit")
            if copies_shape[0]:
                event("whole_prompt_copy")
        elif op in ("swap_out", "swap_in", "release_window", "reset_prefix_cache"):
            event(op)
        elif op == "take_offload":
            (_, ((_, _, demotions, _), (_, _, promotions, _))) = outcome[1]
            if demotions[0]:
                event("demotion")
            if promotions[0]:
                event("promotion")
        elif op == "commit" and outcome[1][1]:
            event("commit_indexed")
        if op != "reset_prefix_cache" and set(before["index"].items()) - set(after["index"].items()):
            event("eviction")  # a cached page lost its content
        if op == "append" and after["index"] != before["index"]:
            event("append_cached")

    def live(self) -> list[int]:
        return list(self.py.snapshot()["tables"])

    def swapped(self) -> list[int]:
        return self.py.snapshot()["swapped"]


def random_op(rng: random.Random, lock: Lockstep) -> None:
    """Run one random operation, often one that fails (unknown, duplicate, exists, no pages)."""
    num_pages, page_size = lock.py.num_pages, lock.py.page_size
    live = lock.live()

    def some_id() -> int:
        if live and rng.random() < 0.8:
            return rng.choice(live)
        return rng.choice([rng.randrange(40), 2**62 + rng.randrange(3)])

    def some_count() -> int:
        if rng.random() < 0.1:
            return rng.randint(1, num_pages * page_size + page_size)  # often out of pages
        return rng.randint(1, 2 * page_size + 1)

    op = rng.choices(
        ["allocate", "append", "append_batch", "fork", "free", "page_tables", "csr", "slots", "query", "commit",
         "end_step"],
        weights=[20, 15, 20, 12, 12, 8, 5, 5, 7, 3, 3],
    )[0]
    if op == "end_step":
        lock.do("end_step")
        lock.do("num_pinned_pages")
        return
    if op == "allocate":
        lock.do("allocate", some_id() if rng.random() < 0.3 else rng.randrange(80), some_count())
    elif op == "append":
        lock.do("append", some_id(), some_count() if rng.random() < 0.5 else 1)
    elif op == "append_batch":
        ids = rng.sample(live, rng.randint(0, len(live))) if live else []
        if ids and rng.random() < 0.15:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(ids))  # duplicate
        if rng.random() < 0.1:
            ids.insert(rng.randrange(len(ids) + 1), some_id())  # maybe unknown
        if rng.random() < 0.5:
            counts = rng.randint(1, 3)
        else:
            counts = [rng.randint(1, 2 * page_size) for _ in ids]
        if rng.random() < 0.5:
            ids = np.array(ids, dtype=np.int64)
        lock.do("append_batch", ids, counts)
    elif op == "fork":
        lock.do("fork", some_id(), some_id() if rng.random() < 0.3 else rng.randrange(40, 80))
    elif op == "commit":  # a no-op here (no token ids), but checked like any call
        seq_id = some_id()
        n = lock.py.num_tokens(seq_id) if seq_id in lock.py else 4
        lock.do("commit", seq_id, rng.randint(0, n + 1))
    elif op == "free":
        lock.do("free", some_id())
    elif op == "page_tables":
        ids = [some_id() for _ in range(rng.randint(0, 6))]
        lock.do("page_tables", ids, None if rng.random() < 0.6 else rng.randint(0, 12))
    elif op == "csr":
        lock.do("csr", [some_id() for _ in range(rng.randint(0, 6))])
    elif op == "slots":
        seq_id = some_id()
        n = lock.py.num_tokens(seq_id) if seq_id in lock.py else 4
        start = rng.randint(0, n + 2)
        lock.do("slots", seq_id, start, None if rng.random() < 0.3 else rng.randint(0, n + 2))
    else:
        query = rng.choice(
            ["num_tokens", "page_table", "can_append", "__contains__", "ref_count", "can_allocate", "usage"]
        )
        if query == "ref_count":
            lock.do("ref_count", rng.randint(-1, num_pages))
        elif query == "can_allocate":
            lock.do("can_allocate", some_count())
        elif query == "usage":
            lock.do("usage")
            lock.do("num_free_pages")
            lock.do("num_sequences")
        elif query == "can_append":
            lock.do("can_append", some_id(), some_count())
        else:
            lock.do(query, some_id())


def _tokens(rng: random.Random, n: int):
    """n token ids from the tiny vocabulary, as a list or an int64 array."""
    ids = [rng.choice(VOCAB) for _ in range(n)]
    return np.array(ids, dtype=np.int64) if rng.random() < 0.3 else ids


def _prompt(rng: random.Random, lock: Lockstep) -> tuple[list[int], object]:
    """A prompt that often shares a prefix (or all of it) with an earlier one, and its salt."""
    ps = lock.py.page_size
    tokens: list[int] = []
    salt = rng.choice(SALTS)
    if lock.prompts and rng.random() < 0.75:
        base, base_salt = rng.choice(lock.prompts)
        tokens = list(base) if rng.random() < 0.3 else base[: rng.randint(0, len(base))]
        salt = base_salt if rng.random() < 0.85 else salt
        if len(tokens) == len(base) and rng.random() < 0.7:
            return tokens, salt  # the whole prompt again: a hit that ends with a copy
    tokens += [rng.choice(VOCAB) for _ in range(rng.randint(0 if tokens else 1, 2 * ps + 2))]
    return tokens, salt


def random_cache_op(rng: random.Random, lock: Lockstep) -> None:
    """One random operation for a prefix-caching manager with a CPU tier (falls back to
    ``random_op`` for the rest), often one that fails."""
    ps = lock.py.page_size
    live = lock.live()
    swapped = lock.swapped()
    resident = [s for s in live if s not in swapped]

    def some_id(pool: list[int]) -> int:
        if pool and rng.random() < 0.85:
            return rng.choice(pool)
        return rng.choice(live) if live and rng.random() < 0.5 else rng.randrange(80, 90)

    def some_ids(pool: list[int]) -> list[int]:
        ids = rng.sample(pool, rng.randint(0, min(len(pool), 3))) if pool else []
        if rng.random() < 0.2:
            ids.insert(rng.randrange(len(ids) + 1), some_id(live))  # maybe resident, swapped, unknown
        if ids and rng.random() < 0.1:
            ids.append(ids[0])  # duplicate
        return ids

    op = rng.choices(
        ["prompt", "can_prompt", "commit", "append_ids", "batch_ids", "swap_out", "swap_in", "can_swap",
         "window", "reset", "query", "pin", "offload", "base"],
        weights=[22, 4, 12, 10, 8, 6, 6, 3, 5, 1, 4, 3, 4, 31],
    )[0]
    if op == "offload":
        lock.do("take_offload")
        lock.do("take_events")
        if rng.random() < 0.7:
            lock.do("end_step")
        return
    if op == "pin":
        if lock.prompts and rng.random() < 0.8:
            tokens, salt = rng.choice(lock.prompts)
        else:
            tokens, salt = _prompt(rng, lock)
        tokens = list(tokens)[: rng.randint(0, len(tokens))]
        op = "pin_prefix" if rng.random() < 0.55 else "unpin_prefix"
        if lock.do(op, tokens, cache_salt=salt)[0] == "returned":
            if op == "pin_prefix":
                lock.pins.append((tokens, salt))
            else:
                lock.pins.remove((tokens, salt))  # the oldest equal pin
        return
    if op == "prompt":
        tokens, salt = _prompt(rng, lock)
        seq_id = some_id(live) if rng.random() < 0.1 else rng.randrange(200)
        ids = np.array(tokens, dtype=np.int64) if rng.random() < 0.3 else tokens
        kwargs = {}
        if rng.random() < 0.5:  # chunked prefill: the first chunk only (sometimes out of range)
            kwargs["num_computed_tokens"] = rng.choice([rng.randint(0, len(tokens)), 0, len(tokens) + 1, -1])
        if rng.random() < 0.4:  # retention priority (sometimes out of range)
            kwargs["priority"] = rng.choice([0, 10, 35, 80, 100, 100, 101, -1])
        side = lock.side_rng  # NOTE: its own stream, so the draws above keep their coverage
        if side.random() < 0.25:  # a group's capped hit (sometimes out of range)
            kwargs["max_cached_tokens"] = side.choice([side.randint(0, len(tokens)), 0, ps, -1])
        if side.random() < 0.25:  # a sliding group's released lead (sometimes out of range)
            kwargs["release_before"] = side.choice([side.randint(0, len(tokens) - 1), ps, len(tokens), -1])
        if rng.random() < 0.15:
            outcome = lock.do(
                "allocate", seq_id, len(tokens) + rng.choice([0, 0, 1]), token_ids=ids, cache_salt=salt, **kwargs
            )
        else:
            outcome = lock.do("allocate", seq_id, token_ids=ids, cache_salt=salt, **kwargs)
        if outcome[0] == "returned":
            lock.prompts.append((tokens, salt))
    elif op == "commit":
        seq_id = some_id(resident) if rng.random() < 0.9 else some_id(live)
        n = lock.py.num_tokens(seq_id) if seq_id in lock.py else 4
        lock.do("commit", seq_id, rng.choice([rng.randint(0, n), n, rng.randint(0, n + 2)]))
    elif op == "can_prompt":
        tokens, salt = _prompt(rng, lock)
        lock.do("can_allocate", token_ids=tokens, cache_salt=salt)
        lock.do("prefix_match", tokens, cache_salt=salt)
        lock.do("pages_needed", token_ids=tokens, cache_salt=salt)
        side = lock.side_rng
        if side.random() < 0.5:
            lock.do("can_allocate", token_ids=tokens, cache_salt=salt,
                    max_cached_tokens=side.randint(0, len(tokens)), release_before=side.randint(0, len(tokens) - 1))
    elif op == "append_ids":
        n = rng.randint(1, 2 * ps + 1)
        if rng.random() < 0.2:
            lock.do("append", some_id(resident), n, token_ids=_tokens(rng, n))
        else:
            lock.do("append", some_id(resident), token_ids=_tokens(rng, n))
    elif op == "batch_ids":
        ids = rng.sample(resident, rng.randint(0, len(resident))) if resident else []
        if rng.random() < 0.15:
            ids.insert(rng.randrange(len(ids) + 1), some_id(live))  # maybe swapped or unknown
        counts = [rng.randint(1, ps + 1) for _ in ids]
        lock.do("append_batch", ids, counts, token_ids=_tokens(rng, sum(counts)))
    elif op == "swap_out":
        lock.do("swap_out", some_ids(resident))
    elif op == "swap_in":
        lock.do("swap_in", some_ids(swapped))
    elif op == "can_swap":
        lock.do("can_swap_out", some_ids(resident))
        lock.do("can_swap_in", some_ids(swapped))
    elif op == "window":
        lock.do("release_window", some_id(resident), rng.randint(1, 3 * ps))
        lock.do("window_tables", some_ids(resident), *([rng.randint(0, 6)] if rng.random() < 0.3 else []))
    elif op == "reset":
        lock.do("reset_prefix_cache")
    elif op == "query":
        lock.do("prefix_cache_stats")
        lock.do("is_swapped", some_id(live))
        lock.do("num_free_cpu_pages")
        if swapped:
            seq_id = rng.choice(swapped)
            query = rng.choice(["append", "fork", "slots", "page_tables", "csr", "can_append", "page_table"])
            args = {"fork": (seq_id, 300), "page_tables": ([seq_id],), "csr": ([seq_id],)}.get(query, (seq_id,))
            lock.do(query, *args)
    else:
        random_op(rng, lock)


def drain(lock: Lockstep) -> None:
    """Free every sequence: both managers return to a state equivalent to a new one."""
    for seq_id in lock.live():
        lock.do("free", seq_id)
    for tokens, salt in list(lock.pins):
        lock.do("unpin_prefix", tokens, cache_salt=salt)
    lock.pins.clear()
    lock.do("end_step")  # NOTE: pages only this step's copies held go back to the free queues
    assert lock.cpp.num_free_pages == lock.cpp.num_pages
    assert lock.cpp.num_sequences == 0
    assert lock.cpp.num_free_cpu_pages == lock.cpp.num_cpu_pages


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_pages,page_size,watermark", CONFIGS)
def test_random_operations_match(num_pages, page_size, watermark, seed):
    rng = random.Random(seed * 1000 + num_pages)
    lock = Lockstep(num_pages, page_size, watermark)
    for _ in range(150):
        random_op(rng, lock)
    assert any(op == "append_batch" for op, _, _ in lock.ops)
    drain(lock)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(CONFIGS),
    rng=st.randoms(use_true_random=False),
    num_ops=st.integers(1, 60),
)
def test_hypothesis_operations_match(config, rng, num_ops):
    lock = Lockstep(*config)
    for _ in range(num_ops):
        random_op(rng, lock)
    drain(lock)


def test_batch_copy_on_write_shared_by_many_forks():
    # Four sequences share a partly filled last page (ref_count 4): one append_batch copies it
    # for the first three in list order and lets the fourth, by then its only holder, write in
    # place.
    lock = Lockstep(16, 4)
    lock.do("allocate", 0, 5)
    for child in (1, 2, 3):
        lock.do("fork", 0, child)
    shared = lock.py.page_table(0)[-1]
    kind, (_, (_, copies)) = lock.do("append_batch", [3, 1, 0, 2], 1)
    assert kind == "returned"
    pairs = copies[3]
    assert len(pairs) == 3 and {src for src, _ in pairs} == {shared}
    tables = lock.py.snapshot()["tables"]
    assert [tables[s][-1] for s in (3, 1, 0)] == [dst for _, dst in pairs]
    assert tables[2][-1] == shared and lock.py.ref_count(shared) == 1
    drain(lock)


def test_many_sequences_with_churn_match():
    # Hundreds of scattered ids: the core's hash index grows and deletes under churn.
    rng = random.Random(11)
    lock = Lockstep(1200, 3, 0.1)
    ids = rng.sample(range(2**40), 300)
    for seq_id in ids:
        lock.do("allocate", seq_id, rng.randint(1, 7))
    for seq_id in rng.sample(ids, 150):
        lock.do("free", seq_id)
    for parent in rng.sample(lock.live(), 40):
        lock.do("fork", parent, rng.randrange(2**40, 2**41))
    live = lock.live()
    rng.shuffle(live)
    lock.do("append_batch", np.array(live, dtype=np.int64), [rng.randint(1, 4) for _ in live])
    lock.do("page_tables", live)
    lock.do("csr", live[::-1])
    drain(lock)


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_error_precedence_matches(page_size):
    from pagedkv import DuplicateSequence, UnknownSequence

    lock = Lockstep(8, page_size, watermark=0.25)
    lock.do("allocate", 1, page_size)
    lock.do("allocate", 2, page_size)
    huge = 10**6
    cases = [
        ("allocate", (1, huge), SequenceExists),  # exists before out of pages
        ("allocate", (3, 6 * page_size), OutOfPages),  # 6 pages free, 2 kept by the watermark
        ("fork", (9, 1), UnknownSequence),  # unknown parent before existing child
        ("fork", (1, 2), SequenceExists),
        ("append_batch", ([1, 7, 1], huge), UnknownSequence),  # first in list order wins
        ("append_batch", ([1, 2, 1, 7], 1), DuplicateSequence),
        ("append_batch", ([2, 1], huge), OutOfPages),  # after every id was checked
        ("slots", (9, 5, 1), UnknownSequence),
        ("slots", (1, 5, page_size + 1), InvalidArgument),  # stop > num_tokens before start > stop
        ("slots", (1, 1, 0), InvalidArgument),  # start > stop
        ("page_tables", ([1, 9], 0), UnknownSequence),  # unknown before max_pages
        ("page_tables", ([1, 2], 0), InvalidArgument),
        ("csr", ([2, 9, 8],), UnknownSequence),
    ]
    for op, args, error in cases:
        outcome = lock.do(op, *args)
        assert outcome[0] == "raised" and outcome[1] is error, (op, args, outcome)
    lock.do("allocate", 3, 4 * page_size)  # exactly the pages above the watermark
    drain(lock)


def test_seq_lens_int32_overflow_matches():
    # A sequence of 2**31 tokens does not fit int32 seq_lens: both raise SequenceTooLong (an
    # OverflowError) naming it, with the same text.
    lock = Lockstep(4, 2**30)
    lock.do("allocate", 0, 2**31 - 1)
    lock.do("append", 0, 1)
    outcome = lock.do("page_tables", [0])
    assert outcome[0] == "raised" and outcome[1] is SequenceTooLong and issubclass(outcome[1], OverflowError)
    lock.do("csr", [0])


def _corrupt(lock: Lockstep, tables: dict[tuple[int, int], int], refs: dict[int, int]) -> None:
    """Apply the same corruption to both backends' private state."""
    for (seq_id, index), page in tables.items():
        lock.py._impl._tables[seq_id][index] = page
        assert lock.cpp._impl._core.debug_set_page(seq_id, index, page)
    for page, count in refs.items():
        lock.py._impl._ref_count[page] = count
        assert lock.cpp._impl._core.debug_set_ref_count(page, count)


@pytest.mark.parametrize(
    "tables,refs,invariant",
    [
        ({}, {5: 1}, "ref_count"),
        ({(0, 0): 4}, {4: 1, 0: 0}, "free_page_unreferenced"),
        ({(0, 0): 1}, {1: 2, 0: 0}, "conservation"),
    ],
)
def test_check_invariants_reports_the_same_violation(tables, refs, invariant):
    lock = Lockstep(8, 2)
    lock.do("allocate", 0, 2)  # page 0
    lock.do("allocate", 1, 2)  # page 1
    _corrupt(lock, tables, refs)
    errors = []
    for mgr in (lock.cpp, lock.py):
        with pytest.raises(InvariantViolation) as info:
            mgr.check_invariants()
        errors.append(info.value)
    assert errors[0].invariant == errors[1].invariant == invariant
    assert str(errors[0]) == str(errors[1])


def test_check_invariants_reports_the_same_cpu_violation():
    lock = Lockstep(8, 2, num_cpu_pages=4)
    lock.do("allocate", 0, 4)  # GPU pages 0, 1
    lock.do("swap_out", [0])  # CPU pages 0, 1
    _corrupt(lock, {(0, 1): 3}, {})  # a CPU page-table entry now names CPU page 3
    errors = []
    for mgr in (lock.cpp, lock.py):
        with pytest.raises(InvariantViolation) as info:
            mgr.check_invariants()
        errors.append(info.value)
    assert errors[0].invariant == errors[1].invariant == "cpu_ref_count"
    assert str(errors[0]) == str(errors[1])


def test_debug_hooks_refuse_out_of_range():
    core = BlockManager(4, 2, backend="cpp")._impl._core
    core.allocate(0, 3)
    assert not core.debug_set_page(0, 2, 0)  # index past the table
    assert not core.debug_set_page(0, 0, 4)  # page out of range
    assert not core.debug_set_page(5, 0, 0)  # unknown sequence
    assert not core.debug_set_ref_count(-1, 1)
    assert not core.debug_set_ref_count(0, -1)
    swapped = BlockManager(4, 2, num_cpu_pages=2, backend="cpp")
    swapped.allocate(0, 3)
    swapped.swap_out([0])
    core = swapped._impl._core
    assert not core.debug_set_page(0, 0, 2)  # a CPU page id past the CPU pool
    assert core.debug_set_page(0, 0, 1)


# ----------------------------------------------------- direct calls into the core
def test_direct_bad_arguments_raise_typed_errors():
    # The facade validates first; the core still refuses bad values with the facade's errors.
    from pagedkv._cpp import CppBlockManager
    from pagedkv._validate import MAX_COUNT

    for args in [(0, 4, 0), (4, 0, 0), (4, 4, 5), (4, 4, -1), (MAX_COUNT + 1, 4, 0)]:
        with pytest.raises(InvalidArgument):
            CppBlockManager(*args)
    with pytest.raises(ValueError):
        _core.BlockManager(0, 4, 0)
    mgr = CppBlockManager(4, 4)
    bad_calls = [
        (mgr.allocate, (-1, 4), "seq_id must be an int in [0, 9223372036854775807], got -1"),
        (mgr.allocate, (0, 0), "num_tokens must be an int in [1, 2147483647], got 0"),
        (mgr.ref_count, (4,), "page_id must be an int in [0, 3], got 4"),
    ]
    for call, args, message in bad_calls:
        with pytest.raises(InvalidArgument) as info:
            call(*args)
        assert str(info.value) == message
    mgr.allocate(0, 4)
    with pytest.raises(InvalidArgument, match="child_id"):
        mgr.fork(0, -3)
    with pytest.raises(InvalidArgument, match="one count per sequence"):
        mgr.append_batch(np.array([0], dtype=np.int64), np.array([1, 1], dtype=np.int64))
    with pytest.raises(InvalidArgument, match="num_tokens"):
        mgr.append_batch(np.array([0], dtype=np.int64), np.array([-5], dtype=np.int64))
    with pytest.raises(InvalidArgument, match="start"):
        mgr.slots(0, -1, 2)
    with pytest.raises(InvalidArgument, match="max_pages"):
        mgr.page_tables(np.array([0], dtype=np.int64), -1)
    facade = BlockManager(4, 4, backend="python")
    facade.allocate(0, 4)
    for direct, public in [
        (lambda: mgr.allocate(1, 3, None, 0, 4), lambda: facade.allocate(1, 3, num_computed_tokens=4)),
        (lambda: mgr.allocate(1, 3, None, 0, -2), lambda: facade.allocate(1, 3, num_computed_tokens=-2)),
        (lambda: mgr.commit(0, -1), lambda: facade.commit(0, -1)),
        (lambda: mgr.commit(0, 5), lambda: facade.commit(0, 5)),
    ]:
        with pytest.raises(InvalidArgument) as got:
            direct()
        with pytest.raises(InvalidArgument) as want:
            public()
        assert str(got.value) == str(want.value)
    assert mgr.commit(0, 4) == 0
    assert mgr.snapshot() == {
        "free": [1, 2, 3],
        "evictable": [],
        "ref_count": [1, 0, 0, 0],
        "cpu_free": [],
        "cpu_ref_count": [],
        "tables": {0: [0]},
        "num_tokens": {0: 4},
        "swapped": [],
        "pinned": [],
        "prefix_pins": [],
        "cpu_pinned": [],
        "cpu_lru": [],
        "offload": ([], []),
        "events": [],
        "index": {},
        "nodes": {},
        "stats": {"queries": 0, "hits": 0, "query_tokens": 0, "hit_tokens": 0, "cpu_hit_tokens": 0, "demotions": 0,
                  "promotions": 0},
    }
    mgr.check_invariants()


def test_direct_random_integers_never_crash():
    # Arbitrary int64 arguments straight into the core: typed errors or results, never a crash.
    from pagedkv._cpp import CppBlockManager

    rng = random.Random(7)
    edge = [-(2**63), -(2**31), -1, 0, 1, 2, 3, 2**31 - 1, 2**31, 2**62, 2**63 - 1]
    mgr = CppBlockManager(6, 3, 1)
    for mgr in (CppBlockManager(6, 3, 1), CppBlockManager(10, 2, 1, True, 4, 2)):
        for _ in range(1500):
            a, b, c = (rng.choice(edge) if rng.random() < 0.5 else rng.randint(-3, 12) for _ in range(3))
            tokens = np.array([rng.choice(edge) if rng.random() < 0.1 else rng.randint(0, 2) for _ in range(rng.randint(0, 9))], dtype=np.int64)
            salt = rng.choice([0, 1, 2**64 - 1])
            op = rng.choice(
                ["allocate", "append", "fork", "free", "slots", "ref_count", "num_tokens", "can_append", "release_window",
                 "is_swapped", "allocate_ids", "append_ids", "can_allocate_ids", "reset_prefix_cache", "commit"]
            )
            args = {
                "free": (a,), "ref_count": (a,), "num_tokens": (a,), "is_swapped": (a,), "reset_prefix_cache": (),
                "slots": (a, b, min(c, 100)), "allocate_ids": (a, b, tokens, salt, c if rng.random() < 0.5 else None),
                "append_ids": (a, b, tokens), "can_allocate_ids": (b, tokens, salt),
            }.get(op, (a, b))
            if op in ("append", "append_ids") and b > 100:
                args = (a, 100, *args[2:])  # keep outputs small; huge counts are covered by OutOfPages above
            method = getattr(mgr, op.removesuffix("_ids"))
            try:
                method(*args)
            except (pagedkv.PagedKVError, KeyError, ValueError, MemoryError):
                pass
            ids = np.array([rng.choice([a, b, c, 0, 1]) for _ in range(rng.randint(0, 3))], dtype=np.int64)
            counts = np.array([rng.randint(1, 4) for _ in ids], dtype=np.int64)
            calls = [
                lambda: mgr.page_tables(ids, None), lambda: mgr.csr(ids), lambda: mgr.swap_out(ids),
                lambda: mgr.swap_in(ids), lambda: mgr.can_swap_out(ids), lambda: mgr.can_swap_in(ids),
                lambda: mgr.append_batch(ids, counts, tokens if rng.random() < 0.5 else None),
            ]
            for call in calls:
                try:
                    call()
                except pagedkv.PagedKVError:
                    pass
            mgr.check_invariants()


# ------------------------------------------------ prefix caching, CPU tier, windows
@pytest.mark.parametrize("seed", range(1, 4))
@pytest.mark.parametrize("num_pages,page_size,watermark,num_cpu_pages,hash_bits", CACHE_CONFIGS)
def test_random_prefix_cache_operations_match(num_pages, page_size, watermark, num_cpu_pages, hash_bits, seed):
    rng = random.Random(seed * 7919 + num_pages * 31 + page_size)
    lock = Lockstep(num_pages, page_size, watermark, enable_prefix_caching=True, num_cpu_pages=num_cpu_pages,
                    enable_kv_events=seed % 2 == 1, _hash_bits=hash_bits)
    for _ in range(200):
        random_cache_op(rng, lock)
    assert lock.py.prefix_cache_stats().queries > 0
    drain(lock)


def test_random_operations_cover_every_feature():
    # One run per configuration; together they must exercise every path the parity covers.
    events: dict[str, int] = {}
    for num_pages, page_size, watermark, num_cpu_pages, hash_bits in CACHE_CONFIGS:
        rng = random.Random(num_pages * 1000 + page_size)
        lock = Lockstep(
            num_pages, page_size, watermark, enable_prefix_caching=True, num_cpu_pages=num_cpu_pages, _hash_bits=hash_bits
        )
        for _ in range(300):
            random_cache_op(rng, lock)
        drain(lock)
        for name, count in lock.events.items():
            events[name] = events.get(name, 0) + count
    wanted = [
        "hit", "whole_prompt_copy", "eviction", "append_cached", "commit_indexed", "swap_out", "swap_in", "release_window",
        "reset_prefix_cache", "cpu_out_of_pages", "OutOfPages", "SequenceSwapped", "SequenceExists",
        "UnknownSequence", "DuplicateSequence", "InvalidArgument",
    ]
    missing = [name for name in wanted if not events.get(name)]
    assert not missing, f"never exercised: {missing} (events: {events})"


def random_tier_op(rng: random.Random, lock: Lockstep) -> None:
    """``random_cache_op`` with frees and step ends mixed in, so cached pages are evicted (demoted)
    and their prompts come back (promoted), as in a serving loop."""
    live = lock.live()
    if live and rng.random() < 0.3:
        lock.do("free", rng.choice(live))
    elif rng.random() < 0.1:
        lock.do("take_offload")
        lock.do("end_step")
    else:
        random_cache_op(rng, lock)


TIER_CONFIGS = [  # (num_pages, page_size, watermark, num_cpu_pages, hash_bits): the CPU tier on
    (10, 2, 0.0, 6, 64),
    (16, 3, 0.1, 4, 64),
    (12, 2, 0.0, 20, 2),  # more CPU than GPU pages; colliding hashes
    (8, 1, 0.0, 3, 64),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_pages,page_size,watermark,num_cpu_pages,hash_bits", TIER_CONFIGS)
def test_random_cpu_tier_operations_match(num_pages, page_size, watermark, num_cpu_pages, hash_bits, seed):
    rng = random.Random(seed * 104729 + num_pages * 31 + page_size)
    lock = Lockstep(num_pages, page_size, watermark, enable_prefix_caching=True, num_cpu_pages=num_cpu_pages,
                    cpu_prefix_cache=True, enable_kv_events=True, _hash_bits=hash_bits)
    for _ in range(250):
        random_tier_op(rng, lock)
    drain(lock)


def test_random_cpu_tier_operations_cover_demotion_and_promotion():
    events: dict[str, int] = {}
    for num_pages, page_size, watermark, num_cpu_pages, hash_bits in TIER_CONFIGS:
        rng = random.Random(num_pages * 77 + page_size)
        lock = Lockstep(num_pages, page_size, watermark, enable_prefix_caching=True, num_cpu_pages=num_cpu_pages,
                        cpu_prefix_cache=True, enable_kv_events=True, _hash_bits=hash_bits)
        for _ in range(300):
            random_tier_op(rng, lock)
        drain(lock)
        for name, count in lock.events.items():
            events[name] = events.get(name, 0) + count
    missing = [name for name in ("demotion", "promotion", "hit", "eviction", "swap_out", "cpu_out_of_pages")
               if not events.get(name)]
    assert not missing, f"never exercised: {missing} (events: {events})"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(TIER_CONFIGS),
    rng=st.randoms(use_true_random=False),
    num_ops=st.integers(1, 80),
)
def test_hypothesis_cpu_tier_operations_match(config, rng, num_ops):
    num_pages, page_size, watermark, num_cpu_pages, hash_bits = config
    lock = Lockstep(num_pages, page_size, watermark, enable_prefix_caching=True, num_cpu_pages=num_cpu_pages,
                    cpu_prefix_cache=True, enable_kv_events=True, _hash_bits=hash_bits)
    for _ in range(num_ops):
        random_tier_op(rng, lock)
    drain(lock)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(CACHE_CONFIGS),
    rng=st.randoms(use_true_random=False),
    num_ops=st.integers(1, 80),
)
def test_hypothesis_prefix_cache_operations_match(config, rng, num_ops):
    num_pages, page_size, watermark, num_cpu_pages, hash_bits = config
    lock = Lockstep(num_pages, page_size, watermark, enable_prefix_caching=True, num_cpu_pages=num_cpu_pages, _hash_bits=hash_bits)
    for _ in range(num_ops):
        random_cache_op(rng, lock)
    drain(lock)


def test_hits_copies_evictions_and_reset_match():
    lock = Lockstep(6, 2, enable_prefix_caching=True)
    lock.do("allocate", 0, token_ids=[1, 2, 3, 4])  # pages 0 1, both cached
    lock.do("end_step")  # the step that computed them ran
    outcome = lock.do("allocate", 1, token_ids=[1, 2, 3, 4])  # whole prompt cached: page 1 copied
    assert outcome[1] == ("Allocation", (("int", 3), ("ndarray", "int32", (1, 2), [[1, 2]])))
    lock.do("end_step")  # the engine ran the copy
    lock.do("free", 0)
    lock.do("free", 1)  # evictable LRU: 1, then 2 (the private copy of page 1 is cached too), 0
    assert lock.py.snapshot()["evictable"] == [1, 2, 0]
    lock.do("allocate", 2, 10)  # the 3 uncached pages, then evicts pages 1 and 2
    assert lock.py.snapshot()["evictable"] == [0]
    lock.do("free", 2)
    outcome = lock.do("allocate", 3, token_ids=[1, 2, 9])  # the head page is still a hit
    assert outcome[1][1][0] == ("int", 2)
    lock.do("append", 3, token_ids=[5])
    lock.do("reset_prefix_cache")
    assert lock.py.snapshot()["index"] == {}
    lock.do("prefix_cache_stats")
    drain(lock)


def test_a_child_is_found_again_once_its_evicted_parent_is_recomputed():
    # A child page is keyed by its parent's content, not its page: once the parent page is
    # evicted and the same tokens are computed again, the old child is a hit again.
    lock = Lockstep(8, 1, enable_prefix_caching=True)
    lock.do("allocate", 0, token_ids=[5, 6, 7])  # pages 0 1 2; page 1's parent is page 0
    lock.do("release_window", 0, 2)  # page 0 -> evictable, page 1 stays cached and held
    lock.do("allocate", 1, 6)  # the 5 uncached pages, then evicts page 0
    lock.do("free", 1)  # free queue: 0 7 6 5 4 3
    lock.do("allocate", 2, token_ids=[5, 6, 4])  # [5] is cached again, in page 0
    outcome = lock.do("allocate", 3, token_ids=[5, 6, 9])
    assert outcome[1][1][0] == ("int", 2)  # page 0 hits, and so does [5, 6] after it
    drain(lock)


def test_chunked_prefill_matches():
    # Deferred indexing in lockstep: commits in chunks, a duplicate prompt that commits first,
    # a free, a fork, a window and a swap in the middle of prefills, appends that commit.
    lock = Lockstep(40, 2, enable_prefix_caching=True, num_cpu_pages=8, _hash_bits=3)
    prompt = [1, 2, 1, 2, 0, 0, 1, 1, 2, 2, 0]
    lock.do("allocate", 0, token_ids=prompt, num_computed_tokens=3)
    lock.do("allocate", 1, token_ids=prompt, num_computed_tokens=0)  # hits page 0 only
    for n in (5, 4, 9, 11):
        lock.do("commit", 1, n)
    for n in (6, 11):
        assert lock.do("commit", 0, n)[1][1] > 0  # duplicates of sequence 1's pages are cached too
    lock.do("allocate", 2, token_ids=prompt + [2, 2], num_computed_tokens=1)
    lock.do("fork", 2, 3)
    lock.do("commit", 3, 13)
    lock.do("commit", 2, 13)
    lock.do("allocate", 4, token_ids=[0, 1] * 6, num_computed_tokens=2)
    lock.do("release_window", 4, 3)
    lock.do("commit", 4, 12)
    lock.do("allocate", 5, token_ids=[2, 1] * 6, num_computed_tokens=4)
    lock.do("swap_out", [5])
    lock.do("commit", 5, 6)
    lock.do("swap_in", [5])
    lock.do("commit", 5, 12)
    lock.do("allocate", 6, token_ids=[0, 2] * 5, num_computed_tokens=0)
    lock.do("append", 6, token_ids=[1])
    lock.do("allocate", 7, token_ids=[2, 0] * 5, num_computed_tokens=0)
    lock.do("append_batch", [7, 6], [3, 1])
    lock.do("free", 0)
    lock.do("allocate", 8, token_ids=[1, 1] * 5, num_computed_tokens=3)
    lock.do("free", 8)
    lock.do("reset_prefix_cache")
    lock.do("commit", 2, 13)
    drain(lock)


def test_long_prompt_committed_in_chunks_matches():
    rng = np.random.default_rng(6)
    lock = Lockstep(1300, 16, enable_prefix_caching=True)
    prompt = rng.integers(0, 32000, 10_000)
    lock.do("allocate", 0, token_ids=prompt, num_computed_tokens=512)
    for n in range(1000, 10_001, 1000):
        assert lock.do("commit", 0, n)[1][1] > 0
    outcome = lock.do("allocate", 1, token_ids=np.concatenate([prompt[:6_000], rng.integers(0, 32000, 100)]))
    assert outcome[1][1][0] == ("int", 6_000)
    drain(lock)


def test_long_prompt_matches_page_for_page():
    rng = np.random.default_rng(5)
    lock = Lockstep(1300, 16, enable_prefix_caching=True)
    prompt = rng.integers(0, 32000, 10_000)
    lock.do("allocate", 0, token_ids=prompt)
    outcome = lock.do("allocate", 1, token_ids=np.concatenate([prompt[:6_000], rng.integers(0, 32000, 100)]))
    assert outcome[1][1][0] == ("int", 6_000)
    lock.do("allocate", 2, token_ids=prompt, cache_salt="other tenant")
    drain(lock)


@pytest.mark.parametrize("hash_bits", [1, 3])
def test_colliding_hashes_match(hash_bits):
    lock = Lockstep(64, 2, enable_prefix_caching=True, _hash_bits=hash_bits)
    prompts = [[a, b, c, d] for a in range(2) for b in range(2) for c in range(2) for d in range(2)]
    for seq_id, prompt in enumerate(prompts):
        lock.do("allocate", seq_id, token_ids=prompt + [7])
    for seq_id, prompt in enumerate(prompts):
        lock.do("allocate", 100 + seq_id, token_ids=prompt[::-1] + [7])
    drain(lock)


def test_swap_and_window_errors_match():
    from pagedkv import DuplicateSequence, UnknownSequence

    lock = Lockstep(10, 2, 0.2, enable_prefix_caching=True, num_cpu_pages=3)
    lock.do("allocate", 1, 4)
    lock.do("allocate", 2, 4)
    lock.do("swap_out", [2])
    cases = [
        ("swap_out", ([1, 2],), SequenceSwapped),  # 2 is out already
        ("swap_out", ([1, 9],), UnknownSequence),
        ("swap_out", ([1, 1],), DuplicateSequence),
        ("swap_in", ([1],), SequenceSwapped),  # 1 is on the GPU
        ("can_swap_in", ([2, 2],), DuplicateSequence),
        ("swap_out", ([1],), OutOfPages),  # 2 pages, 1 free CPU page
        ("append", (2,), SequenceSwapped),
        ("append_batch", ([1, 2], 1), SequenceSwapped),
        ("append_batch", ([9, 2], 1), UnknownSequence),
        ("fork", (2, 3), SequenceSwapped),
        ("page_tables", ([1, 2],), SequenceSwapped),
        ("csr", ([2],), SequenceSwapped),
        ("slots", (2,), SequenceSwapped),
        ("release_window", (2, 1), SequenceSwapped),
        ("release_window", (9, 1), UnknownSequence),
        ("release_window", (1, 0), InvalidArgument),
        ("is_swapped", (9,), UnknownSequence),
    ]
    for op, args, error in cases:
        outcome = lock.do(op, *args)
        assert outcome[0] == "raised" and outcome[1] is error, (op, args, outcome)
    assert lock.do("is_swapped", 2)[1] == ("bool", True)
    lock.do("end_step")  # the swap-out copies ran: a swap-in needs free GPU pages again
    lock.do("allocate", 3, 9)  # 5 pages: 1 left above the 2-page watermark
    outcome = lock.do("swap_in", [2])
    assert outcome[0] == "raised" and outcome[1] is OutOfPages and outcome[3][3] == "gpu"
    lock.do("free", 3)
    lock.do("swap_in", [2])
    assert lock.do("release_window", 1, 1)[1] == ("int", 1)
    outcome = lock.do("slots", 1, 0, 4)  # position 0's page was released
    assert outcome[0] == "raised" and outcome[1] is InvalidArgument
    lock.do("slots", 1, 2, 4)
    lock.do("page_tables", [1, 2])
    lock.do("swap_out", [1])  # a released entry stays NULL_PAGE on the CPU
    assert lock.py.page_table(1)[0] == -1
    drain(lock)


@settings(max_examples=200, deadline=None)
@given(
    parent=st.integers(0, 2**64 - 1),
    tokens=st.lists(st.one_of(st.integers(0, 2**31 - 1), st.integers(-(2**63), 2**63 - 1)), max_size=40),
    salt=st.integers(0, 2**64 - 1),
)
def test_page_hash_is_bit_identical(parent, tokens, salt):
    assert _core.page_hash(parent, np.array(tokens, dtype=np.int64), salt) == page_hash(parent, tokens, salt)


def test_page_hash_matches_on_random_pages():
    rng = random.Random(3)
    for _ in range(500):
        parent, salt = rng.getrandbits(64), rng.choice([0, rng.getrandbits(64)])
        tokens = [rng.randrange(2**31) for _ in range(rng.choice([1, 2, 16, 128, 1000]))]
        assert _core.page_hash(parent, np.array(tokens, dtype=np.int64), salt) == page_hash(parent, tokens, salt)


def test_direct_bad_token_ids_raise_the_facades_errors():
    # Direct calls into the C++ backend with bad token ids raise exactly what the facade raises.
    from pagedkv._cpp import CppBlockManager

    core = CppBlockManager(8, 2, 0, True, 2)
    core.allocate(0, 3, np.array([1, 2, 3], dtype=np.int64), 0)
    facade = BlockManager(8, 2, enable_prefix_caching=True, num_cpu_pages=2, backend="python")
    facade.allocate(0, token_ids=[1, 2, 3])
    cases = [
        (lambda: core.allocate(1, 3, np.array([1, 2], dtype=np.int64), 0), lambda: facade.allocate(1, 3, token_ids=[1, 2])),
        (lambda: core.allocate(1, 2, np.array([1, -5], dtype=np.int64), 0), lambda: facade.allocate(1, token_ids=[1, -5])),
        (lambda: core.allocate(1, 2, np.array([2**40, 1], dtype=np.int64), 0), lambda: facade.allocate(1, token_ids=[2**40, 1])),
        (lambda: core.can_allocate(3, np.array([1], dtype=np.int64), 0), lambda: facade.can_allocate(3, token_ids=[1])),
        (lambda: core.append(0, 2, np.array([1], dtype=np.int64)), lambda: facade.append(0, 2, token_ids=[1])),
        (
            lambda: core.append_batch(np.array([0], dtype=np.int64), np.array([2], dtype=np.int64), np.array([1], dtype=np.int64)),
            lambda: facade.append_batch([0], [2], token_ids=[1]),
        ),
        (lambda: core.release_window(0, 0), lambda: facade.release_window(0, 0)),
    ]
    for direct, public in cases:
        with pytest.raises(InvalidArgument) as got:
            direct()
        with pytest.raises(InvalidArgument) as want:
            public()
        assert (type(got.value), str(got.value)) == (type(want.value), str(want.value))
    assert core.snapshot() == facade.snapshot()
    with pytest.raises(InvalidArgument, match="num_cpu_pages"):
        CppBlockManager(4, 4, 0, False, -1)
    with pytest.raises(InvalidArgument, match="_hash_bits"):
        CppBlockManager(4, 4, 0, True, 0, 65)
