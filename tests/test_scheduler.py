"""The vLLM-v1-like scheduler (``pagedkv.scheduler.simulate_v1``) and its step-time model.

A slow oracle re-implements the policy with page arithmetic only (no ``BlockManager``) and
must agree request by request: when each got its first token, when it finished, and how many
preemptions there were.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from pagedkv import BlockManager
from pagedkv import workload as wl
from pagedkv.errors import InvalidArgument, InvalidType
from pagedkv.scheduler import StepTimeModel, simulate_v1
from pagedkv.simulate import simulate


def oracle(work, num_pages: int, ps: int, budget: int, max_seqs: int):
    """Step-indexed (step_time 1) first-token and finish times, and preemptions."""
    N = len(work)
    p, o, arr = work.prompt_lens.tolist(), work.output_lens.tolist(), work.arrivals.tolist()
    gen, comp, held = [0] * N, [0] * N, [0] * N
    first, done_at = [math.nan] * N, [math.nan] * N
    running, waiting = [], deque()
    clock, nxt, preemptions = arr[0], 0, 0

    def pages(n):
        return -(-n // ps)

    def used():
        return sum(pages(held[r]) for r in running)

    while nxt < N or running or waiting:
        if not running and not waiting and arr[nxt] > clock:
            clock = arr[nxt]
        while nxt < N and arr[nxt] <= clock:
            if pages(p[nxt] + o[nxt]) <= num_pages:
                waiting.append(nxt)
            nxt += 1
        preempted = False
        while True:
            grow = [r for r in running if held[r] < p[r] + gen[r]]
            extra = sum(pages(held[r] + 1) - pages(held[r]) for r in grow)
            if extra <= num_pages - used():
                for r in grow:
                    held[r] += 1
                break
            victim = running.pop()
            comp[victim] = held[victim] = 0
            waiting.appendleft(victim)
            preemptions += 1
            preempted = True
        left, work_list = budget, []
        for r in running:
            if left:
                n = min(p[r] + gen[r] - comp[r], left)
                work_list.append((r, n))
                left -= n
        while not preempted and waiting and left and len(running) < max_seqs:
            r = waiting[0]
            need = p[r] + gen[r]
            if pages(need) > num_pages - used():
                break
            waiting.popleft()
            running.append(r)
            held[r], comp[r] = need, 0
            work_list.append((r, min(need, left)))
            left -= work_list[-1][1]
        if not work_list:
            continue
        clock += 1
        for r, n in work_list:
            comp[r] += n
            if comp[r] == p[r] + gen[r]:
                gen[r] += 1
                if gen[r] == 1:
                    first[r] = clock - arr[r]
                if gen[r] == o[r]:
                    running.remove(r)
                    done_at[r] = clock
    return np.array(first), np.array(done_at), preemptions


CASES = [  # (workload, pages, page size, budget, max seqs)
    (lambda: wl.synthetic("alpaca", 80, seed=3, rate=40.0), 40, 16, 64, 16),
    (lambda: wl.synthetic("sharegpt", 60, seed=5, rate=10.0), 120, 16, 256, 32),
    (lambda: wl.fixed(30, 40, 30, rate=100.0), 25, 8, 32, 8),
    (lambda: wl.synthetic("alpaca", 50, seed=9), 200, 4, 16, 16),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_the_slow_oracle_request_by_request(case):
    make, pages, ps, budget, seqs = CASES[case]
    work = make().with_arrivals(np.floor(make().arrivals))  # whole steps: the oracle counts them
    res = simulate_v1(work, BlockManager(pages, ps), max_num_batched_tokens=budget, max_num_seqs=seqs, step_time=1.0)
    first, done, preemptions = oracle(work, pages, ps, budget, seqs)
    np.testing.assert_array_equal(res.ttft_s, first)
    np.testing.assert_array_equal(res.finish_s, done)
    assert res.preemptions == preemptions
    assert res.completed == int(np.count_nonzero(~np.isnan(done)))


def test_the_oracle_cases_preempt_and_chunk():
    make, pages, ps, budget, seqs = CASES[0]
    res = simulate_v1(make(), BlockManager(pages, ps), max_num_batched_tokens=budget, max_num_seqs=seqs)
    assert res.preemptions > 0 and res.recomputed_tokens > 0
    assert res.mean_batch_tokens <= budget


def test_a_token_budget_preempts_less_than_the_simple_scheduler():
    work = wl.synthetic("sharegpt", 300, seed=0)
    simple = simulate(work, BlockManager(2000, 16), max_len=2048)
    v1 = simulate_v1(work, BlockManager(2000, 16), max_num_batched_tokens=2048, max_num_seqs=64, max_len=2048)
    assert simple.completed == v1.completed == 300
    assert v1.preemptions < simple.preemptions


def test_step_time_model_closed_forms():
    m = StepTimeModel(weights_bytes=16 * 10**9, active_params=8 * 10**9, kv_bytes_per_token=131072,
                      bandwidth_bytes_per_s=2e12, peak_flops=1e15)
    # decode: 64 sequences of 1000 tokens: (16 GB + 64,000 x 128 KiB) / 2 TB/s, memory bound
    assert m.step_time(64, 64 * 1000) == pytest.approx((16e9 + 64000 * 131072) / 2e12)
    # a 4096-token prefill chunk: 2 x 8e9 x 4096 FLOPs / 1 PFLOP/s = 65.5 ms > the bytes' 8.3 ms
    assert m.step_time(4096, 4096) == pytest.approx(2 * 8e9 * 4096 / 1e15)
    # the crossover: compute = weights time at num_tokens = weights * peak / (2 * params * bw)
    crossover = 16e9 * 1e15 / (2 * 8e9 * 2e12)
    assert m.step_time(int(crossover), 0) == pytest.approx(16e9 / 2e12)
    h100 = StepTimeModel.from_presets("llama-3-8b", "h100")
    assert h100.peak_flops == 989.5e12 and h100.kv_bytes_per_token == 131072
    # Llama-3-8B: 4 x 32 layers x 32 query heads x 128 = 524,288 FLOPs per (query, key) pair
    assert h100.attn_flops_per_pair == 4 * 32 * 32 * 128
    with pytest.raises(InvalidArgument, match="peak_flops"):
        StepTimeModel(1, 1, 1, 1.0, 0.0)
    with pytest.raises(InvalidArgument, match="gpu"):
        StepTimeModel.from_presets("llama-3-8b", "h1000")


def test_attention_flops_of_a_long_prefill():
    """A 32k-token prompt in 8k chunks: chunk k (after 8k x k cached tokens) scores
    8192 x 8192k + 8192 x 8193 / 2 pairs, counted by hand; attention nearly doubles the
    last chunk's time (Llama-3-8B's shape: 0.254 s against 0.131 s for the projections)."""
    assert StepTimeModel.attention_pairs(0, 4) == 1 + 2 + 3 + 4
    assert StepTimeModel.attention_pairs(10, 3) == 11 + 12 + 13
    m = StepTimeModel(16 * 10**9, 8 * 10**9, 131072, 2e12, 1e15, attn_flops_per_pair=4 * 32 * 32 * 128)
    n = 8192
    for k in range(4):
        pairs = n * n * k + n * (n + 1) // 2
        assert StepTimeModel.attention_pairs(n * k, n) == pairs
        want = (2 * 8e9 * n + 4 * 32 * 32 * 128 * pairs) / 1e15
        assert m.step_time(n, n * (k + 1), pairs) == pytest.approx(want)
    assert m.step_time(n, 4 * n, StepTimeModel.attention_pairs(3 * n, n)) > 1.9 * m.step_time(n, 4 * n)
    # the simulator charges them: one request alone, prompt in one step
    work = wl.fixed(1, 4000, 2)
    res = simulate_v1(work, BlockManager(1024, 16), time_model=m)
    want = max((16e9 + 4000 * 131072) / 2e12, (2 * 8e9 * 4000 + m.attn_flops_per_pair * 4000 * 4001 // 2) / 1e15)
    assert res.ttft_p50_s == pytest.approx(want)


def test_latencies_follow_the_time_model():
    # one request alone: a 100-token prompt in one step, then 9 decode steps of a known cost
    work = wl.fixed(1, 100, 10)
    m = StepTimeModel(10**9, 10**9, 1000, 1e12, 1e15)
    res = simulate_v1(work, BlockManager(64, 16), time_model=m)
    prefill = m.step_time(100, 100)
    decodes = [m.step_time(1, 100 + k) for k in range(1, 10)]
    assert res.ttft_p50_s == pytest.approx(prefill)
    assert res.tpot_p50_s == pytest.approx(sum(decodes) / 9)
    assert res.output_tokens_per_s == pytest.approx(10 / (prefill + sum(decodes)))


def test_prefix_caching_hits_shared_prompts():
    work = wl.multi_turn(40, 4, seed=1)
    res = simulate_v1(work, BlockManager(20000, 16, enable_prefix_caching=True), prefix_caching=True)
    assert res.completed == len(work) and res.prefix_hit_rate > 0.3
    assert res.prefill_tokens_saved >= res.prefix_hit_rate * work.prompt_lens.sum() * 0.99


def test_bad_arguments_are_named():
    work = wl.fixed(2, 10, 2)
    with pytest.raises(InvalidArgument, match="max_num_seqs"):
        simulate_v1(work, BlockManager(8, 16), max_num_batched_tokens=8, max_num_seqs=9)
    with pytest.raises(InvalidArgument, match="max_num_batched_tokens"):
        simulate_v1(work, BlockManager(8, 16), max_num_batched_tokens=0)
    with pytest.raises(InvalidArgument, match="prefix_caching"):
        simulate_v1(work, BlockManager(8, 16), prefix_caching=True)
    with pytest.raises(InvalidType, match="time_model"):
        simulate_v1(work, BlockManager(8, 16), time_model="h100")
    with pytest.raises(InvalidType, match="workload"):
        simulate_v1([1, 2], BlockManager(8, 16))
    res = simulate_v1(wl.fixed(2, 100, 100), BlockManager(8, 16))
    assert res.rejected == {"exceeds_pool": 2} and res.completed == 0


# ------------------------------------------------------------------ replicas and routers
from pagedkv.scheduler import ROUTERS, simulate_replicas  # noqa: E402


@pytest.mark.parametrize("router", ROUTERS)
def test_one_replica_is_the_single_scheduler(router):
    work = wl.multi_turn(12, 3, seed=2, rate=2.0)
    make = lambda: BlockManager(300, 16, enable_prefix_caching=True, enable_kv_events=True)  # noqa: E731
    single = simulate_v1(work, make(), max_num_batched_tokens=512, max_num_seqs=8, prefix_caching=True)
    fleet = simulate_replicas(work, make, 1, router, max_num_batched_tokens=512, max_num_seqs=8, prefix_caching=True)
    np.testing.assert_array_equal(fleet.result.ttft_s, single.ttft_s)
    np.testing.assert_array_equal(fleet.result.finish_s, single.finish_s)
    assert fleet.result.prefix_hit_rate == single.prefix_hit_rate and fleet.imbalance == 1.0


def test_round_robin_splits_evenly_and_least_loaded_balances():
    work = wl.synthetic("alpaca", 101, seed=4, rate=50.0)
    rr = simulate_replicas(work, lambda: BlockManager(400, 16), 4, "round_robin")
    assert rr.requests == (26, 25, 25, 25) and rr.result.completed == 101
    ll = simulate_replicas(work, lambda: BlockManager(400, 16), 4, "least_loaded")
    assert sum(ll.requests) == 101 and ll.result.completed == 101


def test_prefix_aware_routing_finds_more_cached_prefixes():
    # 201 conversations starting over ~200 s with a 30 s think time: turns of one conversation
    # land anywhere under round robin (with 200 starting at once, each wave of turns would keep
    # its order and round robin would be sticky by accident).
    work = wl.multi_turn(201, 6, seed=0, rate=1.0)

    def make():
        return BlockManager(50_000 // 16, 16, enable_prefix_caching=True, enable_kv_events=True)

    got = {r: simulate_replicas(work, make, 4, r, prefix_caching=True) for r in ROUTERS}
    assert got["prefix_aware"].result.prefix_hit_rate > got["round_robin"].result.prefix_hit_rate + 0.05
    assert got["prefix_aware"].result.prefix_hit_rate > got["least_loaded"].result.prefix_hit_rate + 0.05
    assert all(f.result.completed == len(work) for f in got.values())


def test_prefix_aware_needs_kv_events_and_names_bad_routers():
    work = wl.fixed(4, 32, 4)
    with pytest.raises(InvalidArgument, match="enable_kv_events"):
        simulate_replicas(work, lambda: BlockManager(64, 16, enable_prefix_caching=True), 2, "prefix_aware",
                          prefix_caching=True)
    with pytest.raises(InvalidArgument, match="router"):
        simulate_replicas(work, lambda: BlockManager(64, 16), 2, "random")
    with pytest.raises(InvalidArgument, match="num_replicas"):
        simulate_replicas(work, lambda: BlockManager(64, 16), 0, "round_robin")
    with pytest.raises(InvalidArgument, match="options"):
        simulate_replicas(work, lambda: BlockManager(64, 16), 2, "round_robin", max_num_tokens=5)


def test_swap_preemption_moves_pages_instead_of_recomputing():
    make, pages, ps, budget, seqs = CASES[0]
    work = make()
    recompute = simulate_v1(work, BlockManager(pages, ps), max_num_batched_tokens=budget, max_num_seqs=seqs)
    mgr = BlockManager(pages, ps, num_cpu_pages=400)
    swap = simulate_v1(work, mgr, max_num_batched_tokens=budget, max_num_seqs=seqs, preemption="swap")
    assert swap.completed == recompute.completed == len(work)
    assert swap.swap_outs == swap.preemptions > 0 and swap.recomputed_tokens == 0
    assert recompute.swap_outs == 0 and recompute.recomputed_tokens > 0
    assert mgr.num_sequences == 0 and mgr.num_free_cpu_pages == 400
    # too small a CPU tier falls back to recompute for the sequences that do not fit there
    tiny = simulate_v1(work, BlockManager(pages, ps, num_cpu_pages=2), max_num_batched_tokens=budget,
                       max_num_seqs=seqs, preemption="swap")
    assert tiny.completed == len(work) and tiny.recomputed_tokens > 0
    with pytest.raises(InvalidArgument, match="num_cpu_pages"):
        simulate_v1(work, BlockManager(pages, ps), preemption="swap")
    with pytest.raises(InvalidArgument, match="preemption"):
        simulate_v1(work, BlockManager(pages, ps), preemption="evict")


def test_swaps_cost_host_link_time():
    m = StepTimeModel(10**9, 10**9, 1000, 1e12, 1e15, host_bytes_per_s=1e9)
    assert m.swap_time(500) == pytest.approx(500 * 1000 / 1e9)
