"""The simulator: closed-form workloads, a hand-traced preemption, and a slow oracle that
recomputes every step's metrics from the allocator's own state."""

from collections import deque

import numpy as np
import pytest

from pagedkv import BlockManager, InvalidArgument, InvalidType, OutOfPages
from pagedkv import metrics
from pagedkv import workload as wl
from pagedkv._backend import resolve
from pagedkv.errors import BackendUnavailable
from pagedkv.simulate import DEFAULT_STEP_TIME, simulate
from pagedkv.static import StaticAllocator


def backends():
    names = ["python"]
    try:
        resolve("cpp")
        names.append("cpp")
    except BackendUnavailable:
        pass
    return names


# ------------------------------------------------------------- closed forms
@pytest.mark.parametrize("placement", ["first_fit", "best_fit", "buddy"])
def test_static_oracle_on_fixed_lengths(placement):
    # 12 requests of 10 + 6 tokens, 4 regions of 16 fit in 64 slots: three batches in lockstep.
    # Over a batch L runs 10..15, so tokens = (p + (o-1)/2) / F and reserved = ((o+1)/2) / F.
    p, o, k = 10, 6, 4
    res = simulate(wl.fixed(3 * k, p, o), StaticAllocator(k * (p + o), policy="oracle", placement=placement))
    F = p + o
    assert res.basis == "saturated" and res.counted_steps == 2 * o  # the last batch has no queue behind it
    assert res.breakdown == pytest.approx(((p + (o - 1) / 2) / F, ((o + 1) / 2) / F, 0.0, 0.0))
    assert res.completed == 3 * k and res.steps == 3 * o + 1 and res.generated_tokens == 3 * k * o
    assert res.mean_running == k and res.peak_running == k and res.preemptions == 0
    assert res.tail_waste == (0.0, 0.0, 0.0, 3 * k) and res.largest_hole_index == 0.0


def test_static_max_on_fixed_lengths():
    p, o, k, max_len = 10, 6, 4, 32
    res = simulate(wl.fixed(3 * k, p, o), StaticAllocator(k * max_len, policy="max", max_len=max_len),
                   max_len=max_len)
    C = k * max_len
    expected = (k * (p + (o - 1) / 2) / C, k * (o + 1) / 2 / C, k * (max_len - p - o) / C, 0.0)
    assert res.breakdown == pytest.approx(expected)
    assert res.tail_waste.mean == max_len - p - o


@pytest.mark.parametrize("backend", backends())
def test_paged_fixed_lengths_step_by_step(backend):
    # 5 requests of 10 + 20 tokens in 100 pages of 8: all run at once, no queue (basis "busy").
    N, p, o, ps, C = 5, 10, 20, 8, 803  # 803 = 100 pages + 3 slots no page can use
    res = simulate(wl.fixed(N, p, o), BlockManager(100, ps, backend=backend), num_slots=C, record_timeline=True)
    L = p + np.arange(o)
    A = -(-L // ps) * ps
    F = p + o
    tl = res.timeline
    assert tl.step.tolist() == list(range(o))
    assert tl.tokens.tolist() == (N * L).tolist()
    assert tl.allocated.tolist() == (N * A).tolist()
    assert tl.internal.tolist() == (N * np.maximum(0, np.where(A >= F, A - F, 0))).tolist()
    assert res.basis == "busy"
    assert res.breakdown == pytest.approx(metrics.breakdown(tl.tokens.sum(), tl.allocated.sum(),
                                                            tl.internal.sum(), C * o))
    assert res.breakdown.external == pytest.approx(1 - (N * A).mean() / C)
    assert res.tail_waste.mean == -(-F // ps) * ps - F == 2
    assert res.usage == pytest.approx((N * A).mean() / 800)


def test_preemption_of_the_latest_arrival_traced_by_hand():
    # 8 slots of 1 token; two requests of 3 + 3. Step 0 admits both (6 slots); step 1 grows
    # them to 4 + 4; step 2 needs 2 slots, none free: request 1 (the later one) is preempted
    # with 4 tokens, request 0 grows to 5 and request 1 cannot come back (needs 4, 3 free);
    # step 3 completes request 0 and readmits request 1 with 4 tokens; it ends at step 5.
    res = simulate(wl.fixed(2, 3, 3), BlockManager(8, 1), record_timeline=True)
    tl = res.timeline
    assert tl.step.tolist() == [0, 1, 2, 3, 4]
    assert tl.tokens.tolist() == [6, 8, 5, 4, 5]
    assert tl.running.tolist() == [2, 2, 1, 1, 1] and tl.waiting.tolist() == [0, 0, 1, 0, 0]
    assert res.preemptions == 1 and res.preempted_tokens == 4
    assert res.completed == 2 and res.generated_tokens == 6 and res.steps == 6
    assert res.basis == "saturated" and res.counted_steps == 1


def test_rejections_are_reported_not_dropped():
    work = wl.Workload("mix", [10, 3000, 20, 5, 10], [10, 10, 5000, 5, 600])
    res = simulate(work, BlockManager(32, 16), max_len=2048)
    assert res.rejected == {"too_long": 2, "exceeds_pool": 1} and res.rejected_ids == (1, 2, 4)
    assert res.completed == 2
    res = simulate(work, StaticAllocator(100, policy="max", max_len=2048), max_len=2048)
    assert res.rejected == {"too_long": 2, "exceeds_pool": 3} and res.completed == 0
    res = simulate(work, StaticAllocator(100, policy="oracle"), max_len=2048)
    assert res.rejected == {"too_long": 2, "exceeds_pool": 1} and res.completed == 2


def test_parallel_sampling_shares_the_prompt_pages():
    # One request, prompt 20 (one full page of 16 + 4), 10 tokens out, 4 samples. Step 0: the
    # samples share both prompt pages (2 pages; 3 x 2 saved). After the first append each has
    # copied the partial page: 1 shared + 4 private pages (3 x 1 saved) for steps 1..9.
    p, o, ps, n = 20, 10, 16, 4
    res = simulate(wl.fixed(1, p, o), BlockManager(64, ps), parallel_samples=n, record_timeline=True)
    tl = res.timeline
    assert tl.allocated.tolist() == [2 * ps] + [5 * ps] * (o - 1)
    assert tl.tokens.tolist() == [p] + [n * (p + t) - (n - 1) * ps for t in range(1, o)]
    # the 2 slots past token 30 in the last page: once while shared, then in each copy
    assert tl.internal.tolist() == [2] + [n * 2] * (o - 1)
    saved = (n - 1) * 2 * ps + (o - 1) * (n - 1) * ps
    used = tl.allocated.sum()
    assert res.sharing_saving == pytest.approx(saved / (saved + used))
    assert res.tail_waste == (2.0, 2.0, 2.0, n) and res.generated_tokens == n * o


def test_sharing_saving_equals_the_memory_a_no_sharing_run_uses():
    work = wl.synthetic("alpaca", 40, seed=5)
    kw = dict(parallel_samples=3, record_timeline=True)
    shared = simulate(work, BlockManager(4000, 16), **kw)
    private = simulate(work, BlockManager(4000, 16), share_prompt=False, **kw)
    assert shared.preemptions == private.preemptions == 0 and private.sharing_saving is None
    assert shared.timeline.step.tolist() == private.timeline.step.tolist()
    expected = 1 - shared.timeline.allocated.sum() / private.timeline.allocated.sum()
    assert shared.sharing_saving == pytest.approx(expected)
    assert 0 < shared.sharing_saving < 1


# ------------------------------------------------------ slow oracle, every step
def naive(work, alloc, *, max_len=None, n=1, share=True, step_time=DEFAULT_STEP_TIME):
    """Same scheduling rules, written plainly; every step's metrics recomputed from the
    allocator's page tables or regions. Returns rows (step, tokens, allocated, internal,
    running, waiting)."""
    static = isinstance(alloc, StaticAllocator)
    ps = 1 if static else alloc.page_size
    P, F = work.prompt_lens.tolist(), work.final_lens.tolist()
    arrive = np.floor(work.arrivals / step_time).astype(int).tolist()
    limit = max_len or 10**9
    L, resume, rows = {}, {}, []
    waiting, running = deque(), []
    N, t, i = len(P), 0, 0

    def seqs(r):
        return list(range(r * n, r * n + n))

    def fits_empty(r):
        if static:
            return alloc.max_regions(alloc.reservation(P[r], F[r])) >= n
        full, last = P[r] // ps, -(-F[r] // ps)
        need = full + n * (last - full) if (n > 1 and share) else n * last
        return need <= alloc.num_pages - alloc.watermark_pages

    def admit(r):
        L0, made = resume.get(r, P[r]), []
        try:
            if static:
                for s in seqs(r):
                    alloc.allocate(s, L0, F[r])
                    made.append(s)
            elif n > 1 and share:
                s0, *rest = seqs(r)
                alloc.allocate(s0, P[r])
                made.append(s0)
                for s in rest:
                    alloc.fork(s0, s)
                    made.append(s)
                for s in seqs(r):
                    if L0 > P[r]:
                        alloc.append(s, L0 - P[r])
            else:
                for s in seqs(r):
                    alloc.allocate(s, L0)
                    made.append(s)
        except OutOfPages:
            for s in made:
                alloc.free(s)
            return False
        L[r] = L0
        return True

    def measure():
        if static:
            regions = [(alloc.region(s), F[r]) for r in running for s in seqs(r)]
            return (sum(g.num_tokens for g, _ in regions), sum(g.size for g, _ in regions),
                    sum(max(0, g.size - f) for g, f in regions))
        pages = {}
        for r in running:
            for s in seqs(r):
                table = alloc.page_table(s)
                assert alloc.num_tokens(s) == L[r]
                for j, page in enumerate(table):
                    tokens = min(ps, L[r] - j * ps)
                    internal = max(0, (j + 1) * ps - F[r]) if j == len(table) - 1 else 0
                    assert pages.setdefault(page, (tokens, internal)) == (tokens, internal)
        assert len(pages) == alloc.num_pages - alloc.num_free_pages
        return (sum(v[0] for v in pages.values()), len(pages) * ps, sum(v[1] for v in pages.values()))

    while i < N or running or waiting:
        if not running and not waiting and arrive[i] > t:
            t = arrive[i]
        while i < N and arrive[i] <= t:
            if F[i] <= limit and fits_empty(i):
                waiting.append(i)
            i += 1
        while running:
            try:
                alloc.append_batch([s for r in running for s in seqs(r)], 1)
                break
            except OutOfPages:
                r = running.pop()
                for s in seqs(r):
                    alloc.free(s)
                resume[r] = L.pop(r)
                waiting.appendleft(r)
        for r in running:
            L[r] += 1
        for r in [r for r in running if L[r] == F[r]]:
            for s in seqs(r):
                alloc.free(s)
            running.remove(r)
            del L[r]
        while waiting and admit(waiting[0]):
            running.append(waiting.popleft())
        if hasattr(alloc, "end_step"):
            alloc.end_step()  # the step's copies run: pages only they held are free again
        if running or waiting:
            rows.append((t, *measure(), len(running), len(waiting)))
        t += 1
    return np.array(rows, dtype=np.int64).reshape(-1, 6)


def paged(pages, ps, watermark=0.0):
    return lambda: BlockManager(pages, ps, watermark=watermark)


def static(slots, policy, placement, max_len=1024):
    return lambda: StaticAllocator(slots, policy=policy, max_len=max_len, placement=placement)


CASES = {
    "page1": (paged(300, 1), 1, True, None),
    "page4-watermark": (paged(80, 4, 0.05), 1, True, None),
    "page16": (paged(30, 16), 1, True, None),
    "page16-poisson": (paged(30, 16), 1, True, 3.0),
    "page4-share3": (paged(120, 4), 3, True, None),
    "page16-share3": (paged(40, 16), 3, True, None),
    "page8-noshare2": (paged(80, 8), 2, False, None),
    "max-buddy": (static(1024, "max", "buddy", 256), 1, True, None),
    "pow2-first": (static(700, "pow2", "first_fit"), 1, True, None),
    "oracle-best": (static(500, "oracle", "best_fit"), 2, True, None),
    "oracle-buddy-poisson": (static(500, "oracle", "buddy"), 1, True, 5.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_incremental_metrics_match_a_slow_oracle_every_step(case):
    make, n, share, rate = CASES[case]
    work = wl.synthetic("alpaca", 60, seed=11, rate=rate)
    res = simulate(work, make(), max_len=256, parallel_samples=n, share_prompt=share, record_timeline=True)
    rows = naive(work, make(), max_len=256, n=n, share=share)
    tl = res.timeline
    got = np.stack([tl.step, tl.tokens, tl.allocated, tl.internal, tl.running, tl.waiting], axis=1)
    assert got.shape == rows.shape and np.array_equal(got, rows)
    assert res.completed + sum(res.rejected.values()) == len(work)
    kept = np.setdiff1d(np.arange(len(work)), res.rejected_ids)
    assert res.generated_tokens == n * work.output_lens[kept].sum()
    assert sum(res.breakdown) == pytest.approx(1.0)
    sat = rows[rows[:, 5] > 0] if (rows[:, 5] > 0).any() else rows
    C = res.num_slots
    assert res.breakdown == pytest.approx(metrics.breakdown(sat[:, 1].sum(), sat[:, 2].sum(), sat[:, 3].sum(),
                                                            C * len(sat)))


def test_preemption_happens_in_the_oracle_cases():
    res = simulate(wl.synthetic("alpaca", 60, seed=11), BlockManager(30, 16), max_len=256)
    assert res.preemptions > 0 and res.preempted_tokens > 0


@pytest.mark.parametrize("backend", backends())
def test_backends_give_the_same_metrics(backend):
    work = wl.synthetic("sharegpt", 40, seed=2)
    a = simulate(work, BlockManager(200, 16, backend="python"), max_len=2048, parallel_samples=2)
    b = simulate(work, BlockManager(200, 16, backend=backend), max_len=2048, parallel_samples=2)
    assert a.to_dict() | {"allocator": ""} == b.to_dict() | {"allocator": ""}


# ------------------------------------------------------------------ arguments
def test_arguments_are_checked():
    work = wl.fixed(2, 3, 3)
    busy = BlockManager(8, 1)
    busy.allocate(0, 1)
    with pytest.raises(InvalidArgument, match="allocator"):
        simulate(work, busy)
    with pytest.raises(InvalidType, match="allocator"):
        simulate(work, object())
    with pytest.raises(InvalidType, match="workload"):
        simulate([1, 2], BlockManager(8, 1))
    with pytest.raises(InvalidArgument, match="parallel_samples"):
        simulate(work, BlockManager(8, 1), parallel_samples=0)
    with pytest.raises(InvalidArgument, match="num_slots"):
        simulate(work, BlockManager(8, 2), num_slots=15)  # less than the 16 slots of the pool
    with pytest.raises(InvalidArgument, match="step_time"):
        simulate(work, BlockManager(8, 1), step_time=0)


def test_progress_reports_every_request_once():
    seen = []
    work = wl.synthetic("alpaca", 300, seed=1)
    simulate(work, BlockManager(60, 16), max_len=64, progress=seen.append)
    assert sum(seen) == len(work) and all(x > 0 for x in seen)


def test_max_running_caps_concurrency():
    res = simulate(wl.fixed(10, 4, 4), BlockManager(100, 4), max_running=3)
    assert res.peak_running == 3 and res.completed == 10
