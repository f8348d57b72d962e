"""Validation against the vLLM paper's Figure 2 (OPT-13B, A100-40GB, ShareGPT, max_len 2048).

Sets up the paper's configuration: about 15.7K token slots of 800 KB (``--slots``), max_len
2048, ShareGPT-like lengths (``pagedkv.workload.SHAREGPT``), every request arriving at once so the
server is saturated; the Orca baselines reserve by policy and place regions with a buddy
allocator (the paper's reimplementation of Orca assumed one); vLLM is the paged block manager
with 16-token pages and a 1% watermark. Prints our breakdown next to the paper's token-state
shares and writes one JSON record per (configuration, seed), plus a summary record.

Paper, Figure 2, token states: Orca (Max) 20.4%, Orca (Pow2) 26.8%, Orca (Oracle) 38.2%,
vLLM 96.3%.

NOTE: what we measured (1000 requests x 3 seeds, buddy placement, python backend): Max 18.0%,
Pow2 25.5%, Oracle 38.9%, vLLM 96.9% token states. Why they differ from the paper:
- Max reserves 2048 slots, so exactly 7 requests run and the token share is 7 x the
  time-averaged length of a running request / C. That average is weighted by how long each
  request runs, i.e. by the upper tail of the lengths. Our ShareGPT-like log-normals match the
  published means only; their shapes are our choice (output capped at 1024) and were not fitted
  to the paper, and a lighter tail than real ShareGPT's is the likely reason Max is 2.4 points low.
- Pow2 and Oracle land within 1.5 points only because reservations are placed by a buddy
  allocator: rounding each region up to a power of two leaves 37-47% of the pool as external
  fragmentation. With ``--placement first_fit`` they reach about 40% and 51%.
- vLLM: each running sequence leaves about (16 - 1) / 2 slots unfilled in its last page (1.8%
  of the pool here) and the 1% watermark plus head-of-line blocking leave about 1.3% free.
- The paper served requests at a rate; we keep the server saturated (all arrive at once) and
  average over the steps with a waiting queue, which is what the breakdown measures.

Usage: python benchmarks/paper_opt13b.py [--num-requests 1000] [--seeds 0 1 2]
       [--slots 15700] [--placement buddy] [--out results/paper_opt13b.jsonl]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402

import pagedkv  # noqa: E402
from pagedkv import BlockManager  # noqa: E402
from pagedkv.simulate import simulate  # noqa: E402
from pagedkv.static import StaticAllocator  # noqa: E402
from pagedkv.workload import synthetic  # noqa: E402

#: Token-state shares of the vLLM paper's Figure 2 (percent of the KV-cache pool).
PAPER_TOKEN_STATES = {"Orca (Max)": 20.4, "Orca (Pow2)": 26.8, "Orca (Oracle)": 38.2, "vLLM": 96.3}
MAX_LEN = 2048


def configurations(slots: int, placement: str, page_size: int, watermark: float):
    """(name, allocator factory) of the four systems of Figure 2."""
    yield "Orca (Max)", lambda: StaticAllocator(slots, policy="max", max_len=MAX_LEN, placement=placement)
    yield "Orca (Pow2)", lambda: StaticAllocator(slots, policy="pow2", max_len=MAX_LEN, placement=placement)
    yield "Orca (Oracle)", lambda: StaticAllocator(slots, policy="oracle", max_len=MAX_LEN, placement=placement)
    yield "vLLM", lambda: BlockManager(slots // page_size, page_size, watermark=watermark)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--slots", type=int, default=15_700, help="token slots (paper: about 15.7K)")
    parser.add_argument("--placement", default="buddy", choices=("buddy", "first_fit", "best_fit"))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--watermark", type=float, default=0.01)
    parser.add_argument("--out", default="results/paper_opt13b.jsonl")
    args = parser.parse_args(argv)

    env = environment()
    records = []
    shares: dict[str, list[float]] = {name: [] for name in PAPER_TOKEN_STATES}
    for seed in args.seeds:
        work = synthetic("sharegpt", args.num_requests, seed=seed)
        for name, make in configurations(args.slots, args.placement, args.page_size, args.watermark):
            start = time.perf_counter()
            result = simulate(work, make(), max_len=MAX_LEN, num_slots=args.slots)
            elapsed = time.perf_counter() - start
            shares[name].append(100 * result.breakdown.token_states)
            records.append({"benchmark": "paper_opt13b", "system": name, "seed": seed,
                            "num_requests": args.num_requests, "slots": args.slots, "placement": args.placement,
                            "paper_token_states_pct": PAPER_TOKEN_STATES[name],
                            "breakdown_pct": result.breakdown.as_percent(), "elapsed_s": elapsed,
                            "backend": pagedkv.backend, **{k: v for k, v in result.to_dict().items()
                                                           if k not in ("breakdown",)}, "env": env})

    print(f"OPT-13B / A100-40GB setting: {args.slots:,} slots, max_len {MAX_LEN}, ShareGPT-like, "
          f"{args.num_requests} requests x seeds {args.seeds}, Orca placement {args.placement}")
    print(f"{'system':<15} {'paper':>7} {'ours':>7} {'min':>6} {'max':>6}   ours: reserved / internal / external")
    summary = {"benchmark": "paper_opt13b", "system": "summary", "env": env, "rows": {}}
    for name, paper in PAPER_TOKEN_STATES.items():
        ours = shares[name]
        mean = statistics.fmean(ours)
        parts = [r["breakdown_pct"] for r in records if r["system"] == name]
        rest = " / ".join(f"{statistics.fmean(p[k] for p in parts):5.1f}" for k in ("reserved", "internal", "external"))
        print(f"{name:<15} {paper:6.1f}% {mean:6.1f}% {min(ours):6.1f} {max(ours):6.1f}   {rest}")
        summary["rows"][name] = {"paper_token_states_pct": paper, "token_states_pct_mean": mean,
                                 "token_states_pct_min": min(ours), "token_states_pct_max": max(ours)}
    records.append(summary)
    write_records(args.out, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
