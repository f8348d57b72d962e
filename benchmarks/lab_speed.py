"""Speed of the fragmentation lab on a long-context trace with shared prefixes (issue 15's target).

Generates a multi-turn chat trace of 12,000 requests whose prompts average about 12,000 tokens
(``max_len`` 128K; conversations resend their history behind shared 4,096-token system
prompts; the longest prompt of the default trace is 65K) and
simulates it with prefix caching at page 16 on about 2M tokens of capacity, under both
schedulers: the simple one of ``pagedkv.simulate`` and the vLLM-v1-like one of
``pagedkv.scheduler``. Prints each run's wall time next to the target (60 s on the 2-core
development machine), the prefix hit rate and preemptions per request; writes JSON Lines.

Usage: python benchmarks/lab_speed.py [--requests 12000] [--slots 2000000] [--page-size 16]
       [--out results/lab_speed.jsonl]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402


def long_context_trace(num_requests: int, seed: int = 0):
    """Multi-turn conversations of 6 turns; user messages ~2,000 and answers ~600 tokens."""
    from pagedkv import workload as wl

    turns = 6
    work = wl.multi_turn(-(-num_requests // turns) + num_requests // 20, turns, seed=seed, system_prompt_len=4096,
                         user_len=2000.0, answer_len=600.0, rate=2.0, think_time=60.0, max_len=131072)
    return work.head(num_requests)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=12_000)
    parser.add_argument("--slots", type=int, default=2_000_000)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--out", default="results/lab_speed.jsonl")
    args = parser.parse_args(argv)

    from pagedkv import BlockManager
    from pagedkv.scheduler import simulate_v1
    from pagedkv.simulate import simulate

    start = time.perf_counter()
    work = long_context_trace(args.requests)
    made = time.perf_counter() - start
    d = work.describe()
    print(f"trace: {d['num_requests']} requests, prompt mean {d['prompt_mean']:,.0f} (p50 {d['prompt_p50']:,.0f}, "
          f"max {d['prompt_max']:,}), output mean {d['output_mean']:,.0f}; generated in {made:.1f} s")
    records = []
    pages = args.slots // args.page_size
    for name, run in (
        ("simple", lambda mgr: simulate(work, mgr, prefix_caching=True)),
        ("v1", lambda mgr: simulate_v1(work, mgr, prefix_caching=True)),
    ):
        mgr = BlockManager(pages, args.page_size, watermark=0.01, enable_prefix_caching=True)
        start = time.perf_counter()
        result = run(mgr)
        elapsed = time.perf_counter() - start
        admitted = result.num_requests - sum(result.rejected.values())
        per_request = (result.preemptions_per_request if name == "v1"
                       else result.preemptions / max(1, admitted))
        print(f"{name:>6} scheduler: {elapsed:6.1f} s (target < 60 s), {result.completed:,} completed, "
              f"hit rate {100 * result.prefix_hit_rate:.1f}%, {per_request:.3f} preemptions per request")
        records.append({"benchmark": "lab_speed", "scheduler": name, "elapsed_s": elapsed,
                        "num_requests": result.num_requests, "completed": result.completed,
                        "prompt_mean": d["prompt_mean"], "prompt_max": d["prompt_max"], "num_slots": args.slots,
                        "page_size": args.page_size, "prefix_hit_rate": result.prefix_hit_rate,
                        "preemptions_per_request": per_request, **environment()})
    write_records(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
