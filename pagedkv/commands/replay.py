"""``pagedkv replay TRACE``: re-execute a recorded block-manager trace and report divergence."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="file written by BlockManager(record=...) (.jsonl or .jsonl.gz)")
    parser.add_argument("--backend", choices=["cpp", "python"], default=None,
                        help="backend to replay against (default: $PAGEDKV_IMPL or the best built)")


def run(args: argparse.Namespace) -> int:
    from .._backend import resolve
    from .._recorder import replay

    backend = resolve(args.backend)
    result = replay(args.trace, backend)
    if result.divergence is None:
        print(f"replayed {result.num_calls} calls on the {backend} backend: no divergence")
        return 0
    print(f"replayed {result.num_calls} calls on the {backend} backend; first divergence at {result.divergence}")
    return 1
