"""Host cost of the serving path: what one decode step costs the CPU, kernels excluded.

An engine calls, every step, the block manager (``append_batch`` and the page tables), then
``cache.plan`` once, then ``cache.write`` + ``cache.decode`` once per layer. On a GPU the kernels
run asynchronously, so the host time of these calls is what bounds the step rate when the GPU
work is short. This benchmark runs the Triton path on CPU tensors with every Triton kernel launch
replaced by a no-op (so only the Python, numpy and torch host work is timed) and reports, per
batch size B and for 32 layers:

- ``allocator_us``: ``append_batch(ids, 1)`` + ``page_tables(ids)``;
- ``plan_us``: ``cache.plan(tables)`` (a decode plan);
- ``layer_us``: one layer's ``write`` + ``decode`` (with ``out=``);
- ``step_ms``: allocator + plan + 32 layers;

and the prefill plan of a 4-prompt chunked batch (``prefill_plan_us``), and the same decode step
through persistent plan buffers (``plan_buffers_us``, ``layer_buffers_us``, ``step_buffers_ms``:
planned in place by the C++ core, as a CUDA-graph engine runs) when the cache has them; and
with a persistent page table (``BlockManager.bind_table``): ``allocator_bound_us`` (the step's
``append_batch`` with no ``page_tables`` call) and ``step_persistent_ms``.

Targets (issue 12, on the 2-core development machine): step <= 1 ms at B=64, plan <= 150 us,
layer <= 15 us.

Usage: python benchmarks/host_overhead.py [--batch-sizes 8 64 256] [--layers 32] [--context 512]
       [--repeats 30] [--out results/host_overhead.jsonl]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton launchers accept CPU tensors (never launched)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402


class _NoLaunch:
    """A Triton kernel whose launches do nothing: ``kernel[grid](*args)`` returns at once."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


def stub_kernels() -> None:
    """Replace every Triton kernel of ``pagedkv.kernels`` by a no-op launcher."""
    import importlib

    for name in ("write_kv", "decode", "prefill", "copy_pages"):
        module = importlib.import_module(f"pagedkv.kernels.{name}")
        for attr in list(vars(module)):
            if attr.startswith("_") and attr.endswith("_kernel"):
                setattr(module, attr, _NoLaunch())


def _median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


def measure(batch: int, layers: int, context: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from pagedkv import BlockManager
    from pagedkv.cache import PagedKVCache

    page_size, heads, kv_heads, head_dim = 16, 32, 8, 128  # Llama-3-8B-like heads
    context -= context % page_size
    step_repeats = max(3, repeats // 5)
    growth = 1 + 2 * repeats + 2 * step_repeats  # tokens each sequence gains during the measurement
    prefill_len = 512  # 4 prompts of 512 tokens, planned as 256-token chunks
    num_pages = context // page_size + batch * (-(-growth // page_size) + 1) + 4 * prefill_len // page_size
    mgr = BlockManager(num_pages, page_size)
    cache = PagedKVCache(layers, num_pages, page_size, kv_heads, head_dim, dtype=torch.float16, device="cpu",
                         backend="triton")
    ids = np.arange(batch, dtype=np.int64)
    # NOTE: every sequence forks one prompt of whole pages (n=B sampling), so the pool stays
    # small at B=256 while each page table is as long as the context; the launches never read it.
    mgr.allocate(0, context)
    for seq_id in ids[1:]:
        mgr.fork(0, int(seq_id))
    q = torch.zeros(batch, heads, head_dim, dtype=torch.float16)
    k = torch.zeros(batch, kv_heads, head_dim, dtype=torch.float16)
    out = torch.empty_like(q)

    def allocator():
        mgr.append_batch(ids, 1)
        mgr.end_step()
        return mgr.page_tables(ids)

    tables = allocator()
    plan = cache.plan(tables)

    def one_layer(layer=0):
        cache.write(layer, k, k, plan)
        cache.decode(layer, q, plan, out=out)

    def step():
        p = cache.plan(allocator())
        for layer in range(layers):
            cache.write(layer, k, k, p)
            cache.decode(layer, q, p, out=out)

    one_layer()  # warm caches (kernel configs, lazy imports)
    record = {
        "batch": batch, "layers": layers, "context": context,
        "allocator_us": _median_us(allocator, repeats),
        "plan_us": _median_us(lambda: cache.plan(tables), repeats),
        "layer_us": _median_us(one_layer, repeats),
        "step_ms": _median_us(step, step_repeats) / 1e3,
    }
    buffers = getattr(cache, "plan_buffers", None)
    if buffers is not None:
        # persistent plan buffers, as a CUDA-graph engine runs: planned in place, in the C++ core
        buffers = cache.plan_buffers(batch, 8192, tables.page_table.shape[1] + 8)
        plan = cache.plan(tables, buffers=buffers)
        one_layer()

        def buffered_step():
            p = cache.plan(allocator(), buffers=buffers)
            for layer in range(layers):
                cache.write(layer, k, k, p)
                cache.decode(layer, q, p, out=out)

        record.update({
            "plan_buffers_us": _median_us(lambda: cache.plan(tables, buffers=buffers), repeats),
            "layer_buffers_us": _median_us(one_layer, repeats),
            "step_buffers_ms": _median_us(buffered_step, step_repeats) / 1e3,
        })
    if hasattr(mgr, "bind_table") and buffers is not None:
        # and a persistent page table: the manager keeps rows 0..B-1 current, so the step has
        # no page_tables call and plans straight from the rows
        from pagedkv.block_manager import PageTables

        rows = np.full((batch, buffers.max_pages), -1, dtype=np.int32)
        lens = np.zeros(batch, dtype=np.int32)
        mgr.bind_table(rows, lens)
        for seq_id in ids:
            mgr.set_row(int(seq_id), int(seq_id))
        bound = PageTables(rows, lens)

        def bound_allocator():
            mgr.append_batch(ids, 1)
            mgr.end_step()

        def persistent_step():
            bound_allocator()
            p = cache.plan(bound, buffers=buffers)
            for layer in range(layers):
                cache.write(layer, k, k, p)
                cache.decode(layer, q, p, out=out)

        record.update({
            "allocator_bound_us": _median_us(bound_allocator, repeats),
            "step_persistent_ms": _median_us(persistent_step, step_repeats) / 1e3,
        })
    # a chunked prefill batch: 4 prompts, their second 256-token chunks
    pre_ids = np.arange(batch, batch + 4)
    for seq_id in pre_ids:
        mgr.allocate(int(seq_id), prefill_len)
    pre_tables = mgr.page_tables(pre_ids)
    record["prefill_plan_us"] = _median_us(lambda: cache.plan(pre_tables, query_lens=prefill_len // 2), repeats)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="results/host_overhead.jsonl")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"needs torch and triton ({exc}); pip install '.[triton]'", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    stub_kernels()
    env = environment()
    records = []
    print(f"{'B':>5} {'allocator us':>13} {'plan us':>9} {'layer us':>9} {'step ms':>8} {'prefill plan us':>16}"
          f" | buffers: {'plan us':>8} {'layer us':>9} {'step ms':>8}")
    for batch in args.batch_sizes:
        record = measure(batch, args.layers, args.context, args.repeats)
        buffered = "  (no plan buffers)"
        if "plan_buffers_us" in record:
            buffered = (f"{record['plan_buffers_us']:>18.1f} {record['layer_buffers_us']:>9.1f} "
                        f"{record['step_buffers_ms']:>8.2f}")
        if "allocator_bound_us" in record:
            buffered += (f" | persistent table: allocator {record['allocator_bound_us']:.1f} us, "
                         f"step {record['step_persistent_ms']:.2f} ms")
        print(f"{batch:>5} {record['allocator_us']:>13.1f} {record['plan_us']:>9.1f} {record['layer_us']:>9.1f} "
              f"{record['step_ms']:>8.2f} {record['prefill_plan_us']:>16.1f}" + buffered)
        records.append({**record, "env": env})
    write_records(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
