"""Paged decode attention on a CUDA GPU: latency and achieved HBM bandwidth; prints a table and
writes JSON Lines.

Decode attention must read every K/V byte of the batch once, so its time is bounded below by
``K/V bytes / HBM bandwidth``. Each point reports the latency and the achieved bandwidth
(K/V bytes read / time) as a fraction of the GPU's peak, for pagedkv's Triton ``paged_decode``
beside torch's ``scaled_dot_product_attention`` on the same K/V laid out contiguously, and
FlashInfer's paged decode when it is installed. Pages are assigned to sequences in a random
order (a fragmented pool), as a block manager would after some churn. The target is >= 80% of
peak at batch >= 16 and context >= 4k.

Default sweep (issue 5): batch {1, 16, 64, 256} x context {1k, 4k, 16k, 64k}, Llama-3-8B-like
heads (32 query, 8 KV, head dim 128), bf16, page sizes {16, 128}. Points whose K/V does not fit
in free GPU memory are skipped (and recorded as skipped).

Usage: python benchmarks/attention.py [--batch-sizes 1 16 64 256] [--contexts 1024 4096 16384 65536]
       [--page-sizes 16 128] [--peak-gbps 3350] [--no-sdpa] [--no-flashinfer]
       [--out results/attention.jsonl]

Without a CUDA GPU it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402

#: Peak HBM bandwidth in GB/s by device-name pattern (vendor datasheets), first match wins.
PEAK_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 3350.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB parts
    ("A800", 2039.0),
    ("L40S", 864.0),
    ("L40", 864.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("L4", 300.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def peak_bandwidth(torch, override: float | None) -> tuple[float | None, str]:
    """``(GB/s, source)`` for the current GPU."""
    if override:
        return override, "--peak-gbps"
    name = torch.cuda.get_device_name()
    for pattern, gbps in PEAK_GBPS:
        if pattern in name:
            return gbps, f"datasheet ({pattern})"
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock x bus width"
    return None, "unknown (pass --peak-gbps)"


def bench_ms(fn) -> float:
    """Median milliseconds of ``fn`` with the L2 cache flushed before each run (Triton's do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure(args, torch, batch: int, context: int, page_size: int, peak: float | None, gen, device) -> dict:
    """One sweep point: a fragmented page pool, then each implementation timed on it."""
    from pagedkv.kernels import _common, paged_decode

    dtype = getattr(torch, DTYPES[args.dtype])
    h, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
    element = torch.tensor([], dtype=dtype).element_size()
    kv_bytes = 2 * batch * context * hkv * d * element
    record = dict(batch_size=batch, context=context, page_size=page_size, num_heads=h, num_kv_heads=hkv,
                  head_dim=d, dtype=args.dtype, kv_bytes=kv_bytes, peak_gbps=peak)
    pages_per_seq = math.ceil(context / page_size)
    num_pages = batch * pages_per_seq
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
    # paged pool + (for SDPA) a contiguous copy + headroom for outputs and the L2 flush buffer
    needed = kv_bytes * (1 if args.no_sdpa else 2) + (1 << 30)
    if needed > free:
        record.update(skipped=f"needs {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        return record

    k_cache = torch.randn((num_pages, page_size, hkv, d), generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn((num_pages, page_size, hkv, d), generator=gen, device=device, dtype=dtype)
    order = torch.randperm(num_pages, generator=gen, device=device).to(torch.int32)
    page_table = order.view(batch, pages_per_seq).contiguous()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn((batch, h, d), generator=gen, device=device, dtype=dtype)
    out = torch.empty_like(q)

    def run_paged():
        paged_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, max_seq_len=context)

    run_paged()
    ms = bench_ms(run_paged)
    record.update(pagedkv_us=ms * 1e3, pagedkv_gbps=kv_bytes / (ms * 1e-3) / 1e9)
    record["pagedkv_num_splits"] = _common.choose_num_splits(batch, hkv, context, _common.num_sms(device))

    if not args.no_sdpa:
        # the same K/V, gathered once into contiguous [batch, kv_heads, context, head_dim]; one
        # sequence at a time, so the only extra memory is the contiguous copy itself
        def contiguous(cache):
            dense = torch.empty((batch, hkv, context, d), dtype=dtype, device=device)
            for i in range(batch):
                dense[i] = cache[page_table[i].long()].reshape(-1, hkv, d)[:context].transpose(0, 1)
            return dense

        k, v = contiguous(k_cache), contiguous(v_cache)
        q4 = q.unsqueeze(2)  # [batch, heads, 1, head_dim]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        try:
            want = sdpa(q4, k, v, enable_gqa=True).squeeze(2)
            ms = bench_ms(lambda: sdpa(q4, k, v, enable_gqa=True))
            record.update(sdpa_us=ms * 1e3, sdpa_gbps=kv_bytes / (ms * 1e-3) / 1e9,
                          max_abs_diff_vs_sdpa=float((out.float() - want.float()).abs().max()))
        except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
            record["sdpa_error"] = f"{type(error).__name__}: {error}"[:300]
        del k, v

    if not args.no_flashinfer:
        record.update(flashinfer(torch, q, k_cache, v_cache, page_table, context, page_size, kv_bytes))

    if peak:
        for name in ("pagedkv", "sdpa", "flashinfer"):
            if f"{name}_gbps" in record:
                record[f"{name}_fraction_of_peak"] = record[f"{name}_gbps"] / peak
    del k_cache, v_cache
    torch.cuda.empty_cache()
    return record


def flashinfer(torch, q, k_cache, v_cache, page_table, context, page_size, kv_bytes) -> dict:
    try:
        import flashinfer as fi
    except ImportError:
        return {}
    try:
        batch, pages_per_seq = page_table.shape
        device = q.device
        indptr = torch.arange(batch + 1, dtype=torch.int32, device=device) * pages_per_seq
        indices = page_table.reshape(-1)
        last_page_len = torch.full((batch,), context - (pages_per_seq - 1) * page_size, dtype=torch.int32,
                                   device=device)
        workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        common = (indptr, indices, last_page_len, q.shape[1], k_cache.shape[2], q.shape[2], page_size)
        try:
            wrapper.plan(*common, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
        except TypeError:  # older releases name it data_type
            wrapper.plan(*common, data_type=q.dtype)
        wrapper.run(q, (k_cache, v_cache))
        ms = bench_ms(lambda: wrapper.run(q, (k_cache, v_cache)))
        return dict(flashinfer_us=ms * 1e3, flashinfer_gbps=kv_bytes / (ms * 1e-3) / 1e9,
                    flashinfer_version=getattr(fi, "__version__", "?"))
    except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
        return dict(flashinfer_error=f"{type(error).__name__}: {error}"[:300])


def _cell(record: dict, name: str) -> str:
    if f"{name}_us" not in record:
        return f"{'-':>18}"
    fraction = record.get(f"{name}_fraction_of_peak")
    share = f"{100 * fraction:4.0f}%" if fraction is not None else "   ?"
    return f"{record[f'{name}_us']:9.1f}us {share:>6}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--peak-gbps", type=float, default=None, help="override the GPU's peak HBM bandwidth")
    parser.add_argument("--no-sdpa", action="store_true", help="skip torch scaled_dot_product_attention")
    parser.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer even when installed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/attention.jsonl")
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("benchmarks/attention.py needs torch and a CUDA GPU; torch is not installed. Nothing measured.")
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU (torch.cuda.is_available() is False). Nothing measured.")
        return 0
    import triton

    peak, peak_source = peak_bandwidth(torch, args.peak_gbps)
    gpu = torch.cuda.get_device_name()
    env = environment() | dict(torch=torch.__version__, triton=triton.__version__, gpu=gpu,
                               peak_gbps=peak, peak_source=peak_source, seed=args.seed)
    print(f"{gpu}: peak HBM {peak or '?'} GB/s ({peak_source}); {args.num_heads} query / {args.num_kv_heads} KV "
          f"heads, head dim {args.head_dim}, {args.dtype}")
    print(f"{'batch':>6}{'context':>8}{'page':>6}{'pagedkv':>18}{'sdpa (contiguous)':>19}{'flashinfer':>18}")
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(args.seed)
    records = []
    for page_size in args.page_sizes:
        for batch in args.batch_sizes:
            for context in args.contexts:
                record = measure(args, torch, batch, context, page_size, peak, gen, device) | env
                records.append(record)
                if "skipped" in record:
                    print(f"{batch:>6}{context:>8}{page_size:>6}  skipped: {record['skipped']}")
                    continue
                print(f"{batch:>6}{context:>8}{page_size:>6}{_cell(record, 'pagedkv')}{_cell(record, 'sdpa'):>19}"
                      f"{_cell(record, 'flashinfer')}")
    target = [r for r in records if "pagedkv_us" in r and r["batch_size"] >= 16 and r["context"] >= 4096]
    if peak and target:
        met = sum(r["pagedkv_fraction_of_peak"] >= 0.8 for r in target)
        worst = min(target, key=lambda r: r["pagedkv_fraction_of_peak"])
        print(f"target >= 80% of peak at batch >= 16, context >= 4k: met in {met}/{len(target)} points "
              f"(worst {100 * worst['pagedkv_fraction_of_peak']:.0f}% at batch {worst['batch_size']}, "
              f"context {worst['context']}, page {worst['page_size']})")
    write_records(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
