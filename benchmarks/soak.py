"""Soak test of the block manager: a seeded random workload over every feature.

Drives allocate (with and without token ids, salts), append, append_batch, fork, free,
swap_out/swap_in, release_window, reset_prefix_cache and deliberately failing calls (unknown
ids, duplicates, bad arguments, out of pages) against one backend. Every failure must be a
``PagedKVError``; ``check_invariants()`` runs every ``--check-every`` operations; at the end
every sequence is freed and the manager must be equivalent to a new one.

Usage: python benchmarks/soak.py [--ops 1000000] [--backends cpp python] [--seed 0]
Prints operations per second and error counts per backend, writes JSON Lines.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402

from pagedkv import BlockManager, PagedKVError  # noqa: E402
from pagedkv._backend import resolve  # noqa: E402
from pagedkv.errors import BackendUnavailable  # noqa: E402

_VOCAB = 4  # tiny, so prefix-cache hits are common
_PREFIXES = [[1, 2, 3, 0] * k for k in range(6)]


def soak(backend: str, num_ops: int, seed: int = 0, check_every: int = 1000,
         num_pages: int = 512, page_size: int = 4, num_cpu_pages: int = 128) -> dict:
    """Run ``num_ops`` random operations; returns counts and timings. Raises on any bug."""
    rng = random.Random(seed)
    mgr = BlockManager(num_pages, page_size, watermark=0.02, enable_prefix_caching=True,
                       num_cpu_pages=num_cpu_pages, backend=backend)
    live: list[int] = []  # resident sequences
    swapped: list[int] = []
    next_id = 0
    ops: Counter = Counter()
    errors: Counter = Counter()

    def tokens(n: int) -> list[int]:
        return [rng.randrange(_VOCAB) for _ in range(n)]

    start = time.perf_counter()
    for i in range(num_ops):
        r = rng.random()
        if len(live) + len(swapped) > 40 and r < 0.62:
            r = 0.7  # NOTE: keep the population bounded so that most calls can succeed
        try:
            if i % 16 == 15:
                op = "end_step"  # NOTE: an engine's step ends; pages pinned for its copies go free
                mgr.end_step()
            elif r < 0.18 or not live:
                op = "allocate"
                n = rng.randint(1, 40)
                if rng.random() < 0.6:
                    prompt = rng.choice(_PREFIXES) + tokens(n)
                    mgr.allocate(next_id, token_ids=prompt, cache_salt=rng.choice([None, "t1"]))
                else:
                    mgr.allocate(next_id, n)
                live.append(next_id)
                next_id += 1
            elif r < 0.38:
                op = "append"
                seq = rng.choice(live)
                n = rng.randint(1, 6)
                if rng.random() < 0.5:
                    mgr.append(seq, token_ids=tokens(n))
                else:
                    mgr.append(seq, n)
            elif r < 0.55:
                op = "append_batch"
                batch = rng.sample(live, min(len(live), rng.randint(1, 16)))
                mgr.append_batch(batch, [rng.randint(1, 3) for _ in batch])
            elif r < 0.62:
                op = "fork"
                mgr.fork(rng.choice(live), next_id)
                live.append(next_id)
                next_id += 1
            elif r < 0.78:
                op = "free"
                pool = swapped if swapped and rng.random() < 0.2 else live
                seq = pool.pop(rng.randrange(len(pool)))
                mgr.free(seq)
            elif r < 0.83:
                op = "swap_out"
                batch = rng.sample(live, min(len(live), rng.randint(1, 3)))
                mgr.swap_out(batch)
                for s in batch:
                    live.remove(s)
                swapped.extend(batch)
            elif r < 0.88:
                op = "swap_in"
                if not swapped:
                    continue
                batch = rng.sample(swapped, min(len(swapped), rng.randint(1, 3)))
                mgr.swap_in(batch)
                for s in batch:
                    swapped.remove(s)
                live.extend(batch)
            elif r < 0.91:
                op = "release_window"
                mgr.release_window(rng.choice(live), rng.randint(1, 24))
            elif r < 0.915:
                op = "reset_prefix_cache"
                mgr.reset_prefix_cache()
            else:
                op = "misuse"
                _misuse(mgr, rng, live, swapped, next_id)
            ops[op] += 1
        except PagedKVError as exc:
            ops[op] += 1
            errors[type(exc).__name__] += 1
        if check_every and i % check_every == 0:
            mgr.check_invariants()
    elapsed = time.perf_counter() - start
    mgr.check_invariants()
    for seq in live + swapped:
        mgr.free(seq)
    mgr.end_step()  # NOTE: pages only the last step's copies held go back to the free queues
    mgr.check_invariants()
    if mgr.num_free_pages != num_pages or mgr.num_free_cpu_pages != num_cpu_pages or mgr.num_sequences:
        raise AssertionError("freeing every sequence did not return the manager to a new-equivalent state")
    if any(mgr.ref_count(p) for p in range(num_pages)):
        raise AssertionError("a page kept a reference after every sequence was freed")
    return {
        "backend": backend, "ops": num_ops, "seconds": elapsed, "ops_per_second": num_ops / elapsed,
        "errors_raised": sum(errors.values()), "errors": dict(errors), "op_counts": dict(ops),
        "sequences_created": next_id, "final_state_equals_new": True, "crashes": 0,
    }


def _misuse(mgr, rng, live, swapped, next_id) -> None:
    """One call that must raise a PagedKVError and change nothing."""
    choice = rng.randrange(9)
    if choice == 0:
        mgr.free(next_id + 10**6)  # unknown
    elif choice == 1:
        mgr.allocate(rng.choice(live), 1)  # exists
    elif choice == 2:
        mgr.append_batch([live[0], live[0]], 1)  # duplicate
    elif choice == 3:
        mgr.append(rng.choice(live), rng.choice([0, -1, 2**40, 1.5, "x", b"1"]))
    elif choice == 4:
        mgr.allocate(rng.choice([-1, 2**64, float("nan"), "id", True]), 3)
    elif choice == 5:
        mgr.allocate(next_id + 10**6, 10**9)  # out of pages
    elif choice == 6 and swapped:
        mgr.append(rng.choice(swapped), 1)  # swapped out
    elif choice == 7:
        mgr.fork(rng.choice(live), rng.choice(live))  # child exists
    else:
        mgr.swap_in([rng.choice(live)])  # not swapped out
    raise AssertionError(f"misuse {choice} did not raise")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1_000_000)
    parser.add_argument("--backends", nargs="+", default=["cpp", "python"], choices=["cpp", "python"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-every", type=int, default=1000)
    parser.add_argument("--out", default="results/soak.jsonl")
    args = parser.parse_args(argv)
    records = []
    for backend in args.backends:
        try:
            resolve(backend)
        except BackendUnavailable as exc:
            print(f"skipping {backend}: {exc}", file=sys.stderr)
            continue
        rec = soak(backend, args.ops, args.seed, args.check_every)
        records.append(rec)
        print(f"{backend:7} {rec['ops']:>9,} ops in {rec['seconds']:.1f} s = {rec['ops_per_second']:,.0f} ops/s; "
              f"errors raised {rec['errors_raised']:,} {rec['errors']}; crashes 0; final state == new")
    write_records(args.out, [r | {"env": environment()} for r in records])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
