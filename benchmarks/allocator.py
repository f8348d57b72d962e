"""Block manager microbenchmarks for both backends; prints a table and writes JSON Lines.

Cases (issue 2):
  decode      B sequences with a 512-token prompt decode 256 steps, page 16, one new token
              each; every step calls append_batch (slot mapping + copies) and page_tables
              (padded int32 table + seq_lens), the arrays a kernel launch needs. Reported as
              ns per sequence-step.
  prefill     allocate one 512-token sequence (µs per call).
  free        free one 512-token sequence (µs per call).
  prefix      prefix caching on: allocate 512-token prompts that share a 384-token system
              prefix, free each after use (µs per sequence, hit rate).
  long_match  prefix caching on: the prefix match of a cached 100k-token prompt (ms per
              allocate, all but the last page hit).
  multi_turn  prefix caching on: conversations that resend prompt + answer every turn, several
              at once, in a pool too small to keep them all (so pages are evicted), with and
              without a sliding window; the hit rate next to the ideal cache's on the same pages
              (pagedkv.ideal_cache.IdealPrefixCache) and the µs per turn.
  prefix+ev   the prefix case with KV events on (taken after every call), with pagedkv's
              hash and with vLLM's sha256_cbor: the overhead of events.
  router      the router-side pagedkv.events.PrefixIndex: blocks applied per second from
              BlockStored events of 8 replicas, and matches per second on a 100k-token prompt.
  cpu_tier    the multi-turn workload again with the CPU tier of the prefix cache on (a CPU pool
              4x the GPU pool): the hit rate with and without it, and the part found on the CPU
              tier; and the allocator's own cost of a demotion and of a promotion, per page:
              evicting 1,024 cached pages with demotion minus without, and a 1,024-page hit
              promoted from the CPU tier minus the same hit on evictable GPU pages.
  windowed    B=64 sequences with a 4,096-token sliding window, decoded at 10k / 100k / 1M
              tokens each: a step is append_batch + release_window per sequence + the batch's
              tables (ms per step), once with window_tables (live pages only, with a first-page
              offset) and once with page_tables (released entries kept as -1, so that step grows
              with the length). The 1M point runs on the C++ core only.

Usage: python benchmarks/allocator.py [--backends cpp python] [--batch-sizes 64 256 1024]
       [--steps 256] [--out results/allocator.jsonl]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402

from pagedkv import BlockManager, OutOfPages  # noqa: E402
from pagedkv._backend import resolve  # noqa: E402
from pagedkv.errors import BackendUnavailable  # noqa: E402
from pagedkv.ideal_cache import IdealPrefixCache  # noqa: E402

PAGE_SIZE = 16


def bench_decode(backend: str, batch: int, prompt: int, steps: int, repeats: int) -> dict:
    pages = batch * (-(-(prompt + steps) // PAGE_SIZE)) + 16
    best = []
    for _ in range(repeats):
        mgr = BlockManager(pages, PAGE_SIZE, backend=backend)
        seq_ids = np.arange(batch, dtype=np.int64)
        for s in range(batch):
            mgr.allocate(s, prompt)
        start = time.perf_counter_ns()
        for _ in range(steps):
            plan = mgr.append_batch(seq_ids, 1)
            tables = mgr.page_tables(seq_ids)
        elapsed = time.perf_counter_ns() - start
        assert plan.slot_mapping.shape == (batch,) and tables.page_table.shape[0] == batch
        mgr.check_invariants()
        best.append(elapsed / (steps * batch))
    return {"case": "decode", "batch_size": batch, "prompt_len": prompt, "steps": steps,
            "ns_per_seq_step": min(best), "ns_per_seq_step_median": statistics.median(best)}


def bench_prefill_free(backend: str, prompt: int, count: int) -> list[dict]:
    pages = count * (-(-prompt // PAGE_SIZE))
    mgr = BlockManager(pages, PAGE_SIZE, backend=backend)
    start = time.perf_counter_ns()
    for s in range(count):
        mgr.allocate(s, prompt)
    alloc_ns = (time.perf_counter_ns() - start) / count
    start = time.perf_counter_ns()
    for s in range(count):
        mgr.free(s)
    free_ns = (time.perf_counter_ns() - start) / count
    mgr.check_invariants()
    return [
        {"case": "prefill", "prompt_len": prompt, "calls": count, "us_per_call": alloc_ns / 1e3},
        {"case": "free", "prompt_len": prompt, "calls": count, "us_per_call": free_ns / 1e3},
    ]


def bench_prefix(backend: str, count: int, prompt: int = 512, shared: int = 384, events: str | None = None) -> dict:
    """``events``: None (off), "pagedkv" or "sha256_cbor": KV events on, taken after every call
    (as an engine takes them every step) with that hash."""
    rng = np.random.default_rng(0)
    system = rng.integers(0, 32000, shared).tolist()
    prompts = [system + rng.integers(0, 32000, prompt - shared).tolist() for _ in range(count)]
    pages = 64 * (-(-prompt // PAGE_SIZE))
    mgr = BlockManager(pages, PAGE_SIZE, enable_prefix_caching=True, backend=backend, enable_kv_events=events is not None,
                       prefix_hash=events or "pagedkv")
    num_events = 0
    start = time.perf_counter_ns()
    for s, tokens in enumerate(prompts):
        mgr.allocate(s, token_ids=tokens)
        if s >= 32:
            mgr.free(s - 32)
        if events is not None:
            num_events += len(mgr.take_events())
    elapsed = time.perf_counter_ns() - start
    mgr.check_invariants()
    stats = mgr.prefix_cache_stats()
    return {"case": "prefix", "prompt_len": prompt, "shared_len": shared, "calls": count, "events": events,
            "num_events": num_events, "us_per_call": elapsed / count / 1e3, "hit_rate": stats.hit_rate}


def bench_router(num_replicas: int = 8, prompt: int = 100_000, block_size: int = PAGE_SIZE) -> dict:
    """The router-side PrefixIndex: events applied per second, and matches per second on
    100k-token prompts (hashes recomputed from tokens, and from precomputed hashes)."""
    from pagedkv.events import BlockStored, PrefixIndex, block_hashes

    rng = np.random.default_rng(3)
    index = PrefixIndex(block_size)
    tokens = rng.integers(0, 32000, prompt).tolist()
    hashes = block_hashes(tokens, block_size)
    # one BlockStored per 16-block chunk of the prompt, per replica (replica r holds a prefix
    # of r/num_replicas of it), then as many removes of the last chunk and re-stores
    batches = []
    for r in range(num_replicas):
        keep = len(hashes) * (r + 1) // num_replicas
        batches.append((r, [BlockStored(hashes[i:i + 16], hashes[i - 1] if i else None,
                                        tokens[i * block_size:(i + 16) * block_size], block_size)
                            for i in range(0, keep, 16)]))
    num = sum(len(events) for _, events in batches)
    start = time.perf_counter_ns()
    for replica, events in batches:
        index.apply(replica, events)
    apply_ns = time.perf_counter_ns() - start
    repeats = 3
    start = time.perf_counter_ns()
    for _ in range(repeats):
        got = index.match(tokens)
    match_ns = (time.perf_counter_ns() - start) / repeats
    start = time.perf_counter_ns()
    for _ in range(repeats):
        assert index.match_hashes(hashes) == got
    hashed_ns = (time.perf_counter_ns() - start) / repeats
    assert got[num_replicas - 1] == len(hashes) * block_size
    return {"case": "router", "replicas": num_replicas, "prompt_len": prompt, "events": num,
            "blocks": sum(len(e.block_hashes) for _, events in batches for e in events),
            "events_per_s": num / (apply_ns / 1e9), "blocks_per_s": sum(len(e.block_hashes) for _, ev in batches
                                                                        for e in ev) / (apply_ns / 1e9),
            "matches_per_s": 1e9 / match_ns, "matches_per_s_prehashed": 1e9 / hashed_ns}


def bench_long_match(backend: str, length: int = 100_000, repeats: int = 5) -> dict:
    tokens = np.random.default_rng(1).integers(0, 32000, length)
    pages = 2 * (-(-length // PAGE_SIZE)) + 2
    mgr = BlockManager(pages, PAGE_SIZE, enable_prefix_caching=True, backend=backend)
    mgr.allocate(0, token_ids=tokens)
    mgr.end_step()  # its KV is written: a whole-prompt hit may copy its last page
    times = []
    for r in range(1, repeats + 1):
        start = time.perf_counter_ns()
        got = mgr.allocate(r, token_ids=tokens)
        times.append(time.perf_counter_ns() - start)
        mgr.free(r)
        assert got.num_cached_tokens == length - 1
    mgr.check_invariants()
    return {"case": "long_match", "prompt_len": length, "calls": repeats, "ms_per_call": min(times) / 1e6}


def _multi_turn(mgr, window: int | None, conversations: int, turns: int, seed: int) -> int:
    """Multi-turn chat on ``mgr`` (a BlockManager or an IdealPrefixCache around one): each turn
    sends the whole history plus a new message, then decodes an answer token by token (appends
    with token ids; with ``window``, release_window every step). Returns the turns run."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 32000, 200).tolist()
    history = [list(system) for _ in range(conversations)]
    end_step = mgr.end_step
    if getattr(mgr, "cpu_prefix_cache", False):
        def end_step():  # NOTE: an engine executes the tier's moves every step
            mgr.take_offload()
            mgr.end_step()
    seq_id = done = 0
    for _ in range(turns):
        for c in range(conversations):
            prompt = history[c] + rng.integers(0, 32000, int(rng.integers(20, 120))).tolist()
            answer = rng.integers(0, 32000, int(rng.integers(20, 200))).tolist()
            seq_id += 1
            try:
                mgr.allocate(seq_id, token_ids=prompt)
            except OutOfPages:
                continue  # NOTE: a turn that does not fit is skipped; the history keeps its turn
            for token in answer:
                mgr.append(seq_id, token_ids=[token])
                if window is not None:
                    mgr.release_window(seq_id, window)
                end_step()
            mgr.free(seq_id)
            history[c] = prompt + answer
            done += 1
    return done


def bench_multi_turn(backend: str, window: int | None, conversations: int = 24, turns: int = 6,
                     num_pages: int = 640, seed: int = 0) -> dict:
    """The multi-turn workload twice: timed on the manager alone, then through the ideal-cache
    oracle (same seed, same calls) for the ideal hit rate; the hits must be equal."""
    mgr = BlockManager(num_pages, PAGE_SIZE, enable_prefix_caching=True, backend=backend)
    start = time.perf_counter_ns()
    turns_done = _multi_turn(mgr, window, conversations, turns, seed)
    elapsed = time.perf_counter_ns() - start
    mgr.check_invariants()
    stats = mgr.prefix_cache_stats()
    oracle = IdealPrefixCache(BlockManager(num_pages, PAGE_SIZE, enable_prefix_caching=True, backend=backend))
    _multi_turn(oracle, window, conversations, turns, seed)
    assert oracle.hit_tokens == oracle.ideal_hit_tokens == stats.hit_tokens, "a hit differs from the ideal"
    return {"case": "multi_turn", "window": window, "turns": turns_done, "num_pages": num_pages,
            "hit_rate": stats.hit_rate, "ideal_hit_rate": oracle.ideal_hit_tokens / oracle.query_tokens,
            "us_per_turn": elapsed / max(turns_done, 1) / 1e3}


def bench_multi_turn_tier(backend: str, conversations: int = 24, turns: int = 6, num_pages: int = 640,
                          seed: int = 0) -> dict:
    """The multi-turn workload with the CPU tier on and off (same seed, same calls)."""
    out = {}
    for tier in (False, True):
        mgr = BlockManager(num_pages, PAGE_SIZE, enable_prefix_caching=True, num_cpu_pages=4 * num_pages,
                           cpu_prefix_cache=tier, backend=backend)
        start = time.perf_counter_ns()
        turns_done = _multi_turn(mgr, None, conversations, turns, seed)
        elapsed = time.perf_counter_ns() - start
        mgr.check_invariants()
        out[tier] = (mgr.prefix_cache_stats(), turns_done, elapsed)
    (off, _, _), (on, turns_done, elapsed) = out[False], out[True]
    assert off.query_tokens == on.query_tokens, "the two runs asked for different prompts"
    return {"case": "cpu_tier", "what": "multi_turn", "num_pages": num_pages, "num_cpu_pages": 4 * num_pages,
            "turns": turns_done, "hit_rate_gpu_only": off.hit_rate, "hit_rate": on.hit_rate,
            "cpu_hit_share": on.cpu_hit_tokens / max(on.hit_tokens, 1), "demotions": on.demotions,
            "promotions": on.promotions, "us_per_turn": elapsed / max(turns_done, 1) / 1e3}


def bench_tier_cost(backend: str, pages: int = 1024, repeats: int = 5) -> dict:
    """Allocator cost of a demotion and of a promotion, per page (fresh managers, best of N).

    The GPU pool holds one prompt of ``pages`` full pages, the CPU pool exactly ``pages``.
    Demotion: allocating prompt B evicts prompt A's cached pages, tier on minus tier off.
    Promotion: a hit on A found on the CPU tier only (its promotions take GPU pages, evicting
    B's cached pages, which find no CPU page left) minus the same hit on A's evictable GPU pages.
    """
    rng = np.random.default_rng(2)
    prompt_a = rng.integers(0, 32000, pages * PAGE_SIZE + 1)
    prompt_b = rng.integers(0, 32000, pages * PAGE_SIZE + 1)

    def cached(tier: bool) -> BlockManager:
        """A's pages cached on the GPU (evictable, written before this step)."""
        mgr = BlockManager(pages + 1, PAGE_SIZE, enable_prefix_caching=True, num_cpu_pages=pages,
                           cpu_prefix_cache=tier, backend=backend)
        mgr.allocate(0, token_ids=prompt_a)
        mgr.free(0)
        mgr.end_step()
        return mgr

    def a_on_cpu() -> BlockManager:
        mgr = cached(True)
        mgr.allocate(1, token_ids=prompt_b)  # demotes every page of A
        assert len(mgr.take_offload().demotions) == pages
        mgr.free(1)
        mgr.end_step()
        return mgr

    def timed(setup, call) -> float:
        best = float("inf")
        for _ in range(repeats):
            mgr = setup()
            start = time.perf_counter_ns()
            call(mgr)
            best = min(best, time.perf_counter_ns() - start)
        return best

    evict_on = timed(lambda: cached(True), lambda mgr: mgr.allocate(1, token_ids=prompt_b))
    evict_off = timed(lambda: cached(False), lambda mgr: mgr.allocate(1, token_ids=prompt_b))
    promoted = timed(a_on_cpu, lambda mgr: mgr.allocate(2, token_ids=prompt_a))
    on_gpu = timed(lambda: cached(True), lambda mgr: mgr.allocate(2, token_ids=prompt_a))
    check = a_on_cpu()
    assert check.allocate(2, token_ids=prompt_a).num_cached_tokens == pages * PAGE_SIZE
    assert len(check.take_offload().promotions) == pages
    return {"case": "cpu_tier", "what": "cost", "pages": pages, "ns_per_demotion": (evict_on - evict_off) / pages,
            "ns_per_promotion": (promoted - on_gpu) / pages, "us_evict_with_demotion": evict_on / 1e3,
            "us_evict_without": evict_off / 1e3, "us_hit_promoted": promoted / 1e3, "us_hit_on_gpu": on_gpu / 1e3}


def bench_windowed(backend: str, length: int, batch: int = 64, window: int = 4096, steps: int = 16,
                   tables: str = "window_tables") -> dict:
    live = window // PAGE_SIZE + 2
    pages = batch * (live + window // PAGE_SIZE + 2)
    mgr = BlockManager(pages, PAGE_SIZE, backend=backend)
    ids = np.arange(batch, dtype=np.int64)
    for s in range(batch):
        mgr.allocate(s, window)
    grown = window
    while grown < length:  # grow in window-sized chunks, releasing as a decode loop would
        chunk = min(window, length - grown)
        mgr.append_batch(ids, chunk)
        for s in range(batch):
            mgr.release_window(s, window)
        grown += chunk
    times = []
    for _ in range(steps):
        start = time.perf_counter_ns()
        mgr.append_batch(ids, 1)
        for s in range(batch):
            mgr.release_window(s, window)
        out = getattr(mgr, tables)(ids)
        times.append(time.perf_counter_ns() - start)
    assert out.page_table.shape[0] == batch
    mgr.check_invariants()
    return {"case": "windowed", "tables": tables, "batch_size": batch, "num_tokens": length, "window": window,
            "table_width": int(out.page_table.shape[1]), "ms_per_step": statistics.median(times) / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["cpp", "python"], choices=["cpp", "python"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs per decode point")
    parser.add_argument("--out", default="results/allocator.jsonl")
    args = parser.parse_args(argv)

    env = environment()
    records = []
    for backend in args.backends:
        try:
            resolve(backend)
        except BackendUnavailable as exc:
            print(f"skipping {backend}: {exc}", file=sys.stderr)
            continue
        for batch in args.batch_sizes:
            records.append(bench_decode(backend, batch, args.prompt_len, args.steps, args.repeats) | {"backend": backend})
        for rec in bench_prefill_free(backend, args.prompt_len, 2000):
            records.append(rec | {"backend": backend})
        for events in (None, "pagedkv", "sha256_cbor"):
            records.append(bench_prefix(backend, 500, events=events) | {"backend": backend})
        records.append(bench_long_match(backend) | {"backend": backend})
        for window in (None, 256):
            records.append(bench_multi_turn(backend, window) | {"backend": backend})
        records.append(bench_multi_turn_tier(backend) | {"backend": backend})
        records.append(bench_tier_cost(backend) | {"backend": backend})
        for tables in ("window_tables", "page_tables"):
            for length in (10_000, 100_000) + ((1_000_000,) if backend == "cpp" else ()):
                records.append(bench_windowed(backend, length, tables=tables) | {"backend": backend})

    records.append(bench_router() | {"backend": "python"})

    print(f"{'backend':8} {'case':10} {'B':>6} {'figure':>60}")
    for r in records:
        if r["case"] == "decode":
            figure = f"{r['ns_per_seq_step']:.1f} ns/seq-step"
        elif r["case"] == "long_match":
            figure = f"{r['ms_per_call']:.2f} ms/call"
        elif r["case"] == "prefix":
            label = "events off" if r["events"] is None else f"events {r['events']}"
            figure = f"{label}: {r['us_per_call']:.2f} us/call, hit rate {r['hit_rate']:.3f}"
        elif r["case"] == "router":
            figure = (f"{r['blocks_per_s']:,.0f} blocks/s applied, {r['matches_per_s']:.1f} matches/s "
                      f"({r['matches_per_s_prehashed']:.0f} prehashed) on {r['prompt_len']:,} tokens")
        elif r["case"] == "windowed":
            figure = (f"{r['tables']} {r['num_tokens']:,} tokens: {r['ms_per_step']:.2f} ms/step "
                      f"(width {r['table_width']:,})")
        elif r["case"] == "cpu_tier" and r["what"] == "multi_turn":
            figure = (f"multi-turn hit rate {r['hit_rate']:.3f} (GPU only {r['hit_rate_gpu_only']:.3f}), "
                      f"{r['cpu_hit_share']:.0%} from CPU, {r['us_per_turn']:.0f} us/turn")
        elif r["case"] == "cpu_tier":
            figure = f"demotion {r['ns_per_demotion']:.0f} ns/page, promotion {r['ns_per_promotion']:.0f} ns/page"
        elif r["case"] == "multi_turn":
            label = "no window" if r["window"] is None else f"window {r['window']}"
            figure = (f"{label}: hit rate {r['hit_rate']:.3f} (ideal {r['ideal_hit_rate']:.3f}), "
                      f"{r['us_per_turn']:.0f} us/turn")
        else:
            figure = f"{r['us_per_call']:.2f} us/call"
        print(f"{r['backend']:8} {r['case']:10} {r.get('batch_size', ''):>6} {figure:>60}")
    write_records(args.out, [r | {"env": env} for r in records])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
