"""Prefix caching in the simulator: with a pool large enough that nothing is evicted, the hit
rate is the one computed directly from the hash ids (the longest run of leading blocks seen
before, capped at the prompt)."""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv import BlockManager, StaticAllocator
from pagedkv.errors import InvalidArgument
from pagedkv.simulate import simulate
from pagedkv.workload import HASH_BLOCK_SIZE, Workload


def _multi_turn(num_requests: int = 60, seed: int = 0) -> Workload:
    """Conversations that resend their history (shared leading blocks), each prompt ending in a
    tail of its own; arrivals spread out so that prompts overlap in time."""
    rng = np.random.default_rng(seed)
    histories = [[int(rng.integers(10**6))] for _ in range(8)]
    hash_ids, prompts = [], []
    for _ in range(num_requests):
        history = histories[int(rng.integers(len(histories)))]
        history.append(int(rng.integers(10**6, 2 * 10**6)))  # this turn's new block
        ids = list(history) if rng.random() < 0.8 else [int(rng.integers(2 * 10**6, 3 * 10**6))]
        hash_ids.append(ids)
        prompts.append(HASH_BLOCK_SIZE * len(ids) + int(rng.integers(1, 100)))
    arrivals = np.sort(rng.uniform(0, 20, num_requests))
    return Workload("multi-turn", np.array(prompts), np.full(num_requests, 8), arrivals, hash_ids=hash_ids)


def _direct_hit_rate(work: Workload) -> float:
    seen: set[tuple] = set()
    hits = 0
    for ids, prompt in zip(work.hash_ids, work.prompt_lens.tolist()):
        ids = tuple(ids.tolist())
        run = 0
        while run < len(ids) and ids[:run + 1] in seen:
            run += 1
        hits += min(run * HASH_BLOCK_SIZE, prompt)
        seen.update(ids[:k] for k in range(1, len(ids) + 1))
    return hits / int(work.prompt_lens.sum())


@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_the_hit_rate_without_eviction_is_the_direct_one(page_size):
    work = _multi_turn()
    pool = int(work.final_lens.sum()) // page_size + len(work) + 8  # every page ever made stays cached
    mgr = BlockManager(pool, page_size, enable_prefix_caching=True)
    result = simulate(work, mgr, prefix_caching=True)
    expected = _direct_hit_rate(work)
    assert expected > 0.3
    # NOTE: page sizes dividing the 512-token block: no rounding at all
    assert result.prefix_hit_rate == pytest.approx(expected, abs=1e-12)
    assert result.prefill_tokens_saved == round(expected * int(work.prompt_lens.sum()))
    assert result.completed == len(work) and result.preemptions == 0
    assert 0 < result.utilisation <= 1.0  # a shared prefix page's tokens are counted once


def test_eviction_lowers_the_hit_rate_and_plain_runs_report_none():
    work = _multi_turn(seed=1)
    small = simulate(work, BlockManager(200, 16, enable_prefix_caching=True), prefix_caching=True)
    large = simulate(work, BlockManager(20000, 16, enable_prefix_caching=True), prefix_caching=True)
    assert small.prefix_hit_rate < large.prefix_hit_rate == pytest.approx(_direct_hit_rate(work))
    plain = simulate(work, BlockManager(20000, 16))
    assert plain.prefix_hit_rate is None and plain.prefill_tokens_saved is None


def test_bad_prefix_caching_arguments():
    work = _multi_turn(10)
    with pytest.raises(InvalidArgument, match="prefix_caching"):
        simulate(work, BlockManager(2000, 16), prefix_caching=True)
    with pytest.raises(InvalidArgument, match="prefix_caching"):
        simulate(work, StaticAllocator(20000), prefix_caching=True)
    with pytest.raises(InvalidArgument, match="parallel_samples"):
        simulate(work, BlockManager(2000, 16, enable_prefix_caching=True), prefix_caching=True, parallel_samples=2)


def test_prompt_token_ids_follow_the_hash_ids():
    work = _multi_turn(10)
    a, b = work.prompt_token_ids(0), work.prompt_token_ids(1)
    assert a.shape[0] == work.prompt_lens[0] and a.min() >= 0 and a.max() < 2**31
    blocks = min(len(work.hash_ids[0]), len(work.hash_ids[1]))
    for k in range(blocks):
        same = work.hash_ids[0][k] == work.hash_ids[1][k]
        assert np.array_equal(a[k * 512:(k + 1) * 512], b[k * 512:(k + 1) * 512]) == same


def test_the_frag_cli_reports_the_hit_rate(tmp_path, capsys):
    import json

    from pagedkv.cli import main

    work = _multi_turn(40, seed=2)
    path = tmp_path / "mooncake.jsonl"
    with path.open("w") as f:
        for i in range(len(work)):
            f.write(json.dumps({"timestamp": float(work.arrivals[i]) * 1000, "input_length": int(work.prompt_lens[i]),
                                "output_length": int(work.output_lens[i]),
                                "hash_ids": work.hash_ids[i].tolist()}) + "\n")
    assert main(["frag", "--trace", str(path), "--prefix-caching", "--page-sizes", "16,64", "--policies", "max",
                 "--slots", "400000", "--max-len", "8192", "--no-plot", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "hit%" in out
    report = json.loads((tmp_path / "out" / "frag.json").read_text())
    hits = {p["label"]: p["prefix_hit_rate"] for p in report["points"]}
    assert hits["Max"] is None and hits["page 16"] == pytest.approx(_direct_hit_rate(work)) == hits["page 64"]


def test_the_capacity_sweep_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from pagedkv.cli import main

    out = tmp_path / "out"
    assert main(["frag", "--workload", "multi-turn", "--num-requests", "120", "--prefix-caching", "--page-sizes",
                 "16,256", "--policies", "", "--capacities", "20000,400000", "--max-len", "16384", "--out",
                 str(out)]) == 0
    text = capsys.readouterr().out
    assert "prefix hit rate (%) against capacity" in text
    assert (out / "prefix.png").stat().st_size > 10_000
    import json

    sweep = json.loads((out / "frag.json").read_text())["capacity_sweep"]
    rates = {(p["page_size"], p["num_slots"]): p["prefix_hit_rate"] for p in sweep}
    assert rates[(16, 20000)] < rates[(16, 400000)] and rates[(256, 400000)] <= rates[(16, 400000)]
    assert main(["frag", "--capacities", "1000", "--no-plot", "--out", str(out)]) == 2
    assert "--capacities" in capsys.readouterr().err


def test_the_multi_turn_workload_resends_its_history():
    from pagedkv.workload import multi_turn

    work = multi_turn(20, 4, seed=3, think_time=1000.0)  # turns far apart: arrival order is turn order
    assert work.hash_ids is not None and len(work) <= 80
    # a later turn's blocks start with the earlier turn's full blocks (its history), and
    # conversations share only their system prompt's blocks (2 here)
    earlier = [ids.tolist() for ids in work.hash_ids[:20]]
    later = [ids.tolist() for ids in work.hash_ids[20:40]]
    extended = sum(any(b[:len(a) - 1] == a[:-1] for a in earlier) for b in later)
    assert extended == len(later) > 0
    shared = {tuple(a[:3]) for a in earlier}
    assert len(shared) == len(earlier), "a block past the system prompt was shared between conversations"
    assert multi_turn(20, 4, seed=3, think_time=1000.0).prompt_lens.tolist() == work.prompt_lens.tolist()
