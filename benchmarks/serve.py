"""Serving throughput and peak KV memory: the example engine on paged vs static contiguous KV; prints a
table and writes JSON Lines.

A batch of requests from a built-in workload (``pagedkv.workload``; every request arrives at
time 0, greedy decoding of exactly its output length) runs through ``examples/engine.py`` on a
tiny random Llama, twice with the same KV slot budget:

* ``paged``: pages of ``--page-size`` tokens, handed out as sequences grow;
* ``static``: one contiguous region of ``--max-len`` tokens reserved per sequence at admission
  (Orca-Max in the vLLM paper), expressed as a ``BlockManager`` whose page holds ``max_len``
  tokens, so both runs share the same scheduler, kernels and model and differ only in how KV
  memory is reserved.

Each point reports output tokens per second, total (prompt + output) tokens per second, the
peak number of KV pages in use and the slots they reserve, the mean KV utilisation (tokens held
by live sequences / slots their pages reserve, after each step), the peak number of running
sequences, preemptions and steps. Both runs must produce the same tokens (checked and
recorded as ``outputs_match``).

On the CPU (torch reference kernels) with the tiny model, time per step is mostly host-side
Python, so tokens per second mostly measures batch size: how many requests the KV budget lets
run together. With CUDA available, the same points also run on the GPU (Triton kernels).

Defaults: 64 ShareGPT-like requests with every length scaled by 0.25 (so the CPU run takes about a
minute), a static reservation of max_len = 2048 x scale (the workload's cap on prompt + output)
and a KV budget of 8 x max_len slots.

Usage: python benchmarks/serve.py [--workload sharegpt] [--num-requests 64] [--scale 0.25]
       [--kv-tokens N] [--page-size 16] [--max-len N] [--devices cpu cuda] [--model tiny|small]
       [--threads 1] [--seed 0] [--out results/serve.jsonl]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402

MODELS = {
    # NOTE: "tiny" is the test model; "small" (~40M parameters, head_dim 128) gives the GPU
    # kernels real work. Both random, built locally.
    "tiny": dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16),
    "small": dict(vocab_size=8192, hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=128),
}


def load_engine():
    """``examples/engine.py`` as a module (loaded by path; it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("pagedkv_example_engine", ROOT / "examples" / "engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def requests(args):
    """``[(prompt token ids, output length)]`` from the built-in workload, lengths times ``--scale``."""
    import numpy as np

    from pagedkv import workload

    w = workload.synthetic(args.workload, args.num_requests, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    out = []
    for prompt_len, output_len in zip(w.prompt_lens.tolist(), w.output_lens.tolist()):
        p = max(1, math.ceil(prompt_len * args.scale))
        o = max(1, math.ceil(output_len * args.scale))
        if p + o > args.max_len:  # NOTE: the built-in workloads cap prompt + output at 2048
            o = max(1, args.max_len - p)
            p = min(p, args.max_len - o)
        out.append((rng.integers(0, MODELS[args.model]["vocab_size"], p).tolist(), o))
    return out


def run_point(eng_mod, model, reqs, args, allocator: str, device: str) -> tuple[dict, list]:
    """One engine run over ``reqs``; returns its record and the generated tokens."""
    import torch

    page_size = args.page_size if allocator == "paged" else args.max_len
    num_pages = args.kv_tokens // page_size
    config = eng_mod.EngineConfig(num_pages=num_pages, page_size=page_size, max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens, chunk_size=args.chunk_size)
    engine = eng_mod.Engine(model, config)
    ids = [engine.add_request(prompt, eng_mod.SamplingParams(max_new_tokens=n)) for prompt, n in reqs]
    done = {}
    seconds, peak_stored, utilisation = 0.0, 0, []
    while engine.has_unfinished():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        finished = engine.step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start  # NOTE: the bookkeeping below is not timed
        done.update((o.request_id, o) for o in finished)
        # K/V tokens held by live sequences vs the slots their pages reserve, after the step
        stored = sum(engine.mgr.num_tokens(s.seq_id) for s in engine.running)
        reserved = (engine.mgr.num_pages - engine.mgr.num_free_pages) * page_size
        peak_stored = max(peak_stored, stored)
        if reserved:
            utilisation.append(stored / reserved)
    outputs = [done[i].output_ids[0] for i in ids]
    s = engine.stats
    num_output = sum(len(o) for o in outputs)
    num_prompt = sum(len(p) for p, _ in reqs)
    record = {
        "bench": "serve", "device": device, "allocator": allocator, "backend": engine.cache.backend,
        "block_manager": engine.mgr.backend, "model": args.model, "workload": args.workload,
        "num_requests": len(reqs), "scale": args.scale, "seed": args.seed, "max_len": args.max_len,
        "page_size": page_size, "num_pages": num_pages, "kv_tokens": num_pages * page_size,
        "kv_bytes": engine.cache.nbytes, "prompt_tokens": num_prompt, "output_tokens": num_output,
        "seconds": seconds, "output_tokens_per_s": num_output / seconds,
        "total_tokens_per_s": (num_prompt + num_output) / seconds,
        "peak_pages_in_use": s.peak_pages_in_use, "peak_kv_tokens_reserved": s.peak_pages_in_use * page_size,
        "peak_kv_tokens_stored": peak_stored,
        "mean_kv_utilisation": sum(utilisation) / max(len(utilisation), 1),
        "peak_running": s.peak_running, "preemptions": s.num_preemptions, "steps": s.num_steps,
        "prefill_tokens_run": s.num_prefill_tokens,
    }
    return record, outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="sharegpt", choices=("sharegpt", "alpaca"))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--scale", type=float, default=0.25,
                        help="multiply every prompt and output length (1.0: the workload as published)")
    parser.add_argument("--kv-tokens", type=int, default=None,
                        help="KV slot budget, the same for both allocators (default 8 x max-len)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=None,
                        help="static reservation per sequence (default 2048 x scale: the workload's cap)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--model", default="tiny", choices=tuple(MODELS))
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny matmuls gain nothing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/serve.jsonl")
    args = parser.parse_args(argv)
    args.max_len = args.max_len or math.ceil(2048 * args.scale)
    args.kv_tokens = args.kv_tokens or 8 * args.max_len
    if args.kv_tokens < args.max_len:
        parser.error(f"--kv-tokens ({args.kv_tokens}) must hold at least one --max-len ({args.max_len}) region")

    import torch

    torch.set_num_threads(args.threads)
    eng_mod = load_engine()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    reqs = requests(args)
    env = environment()
    env["torch"] = torch.__version__
    env["torch_threads"] = args.threads
    records = []
    print(f"{args.workload} x {len(reqs)} requests (scale {args.scale}), KV budget {args.kv_tokens} tokens, "
          f"model {args.model}")
    print(f"{'device':<7}{'allocator':<10}{'page':>5}{'out tok/s':>10}{'all tok/s':>10}{'peak pages':>11}"
          f"{'peak slots':>11}{'util':>6}{'running':>8}{'preempt':>8}{'steps':>6}{'s':>7}")
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: no CUDA device, skipped")
            continue
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model = eng_mod.tiny_llama(**MODELS[args.model], max_positions=args.max_len, seed=args.seed, dtype=dtype,
                                   device=device)
        outputs = {}
        for allocator in ("paged", "static"):
            record, outputs[allocator] = run_point(eng_mod, model, reqs, args, allocator, device)
            record["dtype"] = str(dtype).removeprefix("torch.")
            record["env"] = env
            records.append(record)
            print(f"{device:<7}{allocator:<10}{record['page_size']:>5}{record['output_tokens_per_s']:>10.1f}"
                  f"{record['total_tokens_per_s']:>10.1f}{record['peak_pages_in_use']:>11}"
                  f"{record['peak_kv_tokens_reserved']:>11}{record['mean_kv_utilisation']:>6.0%}"
                  f"{record['peak_running']:>8}{record['preemptions']:>8}{record['steps']:>6}{record['seconds']:>7.2f}")
        same = outputs["paged"] == outputs["static"]
        for record in records[-2:]:
            record["outputs_match"] = same
        paged, static = records[-2], records[-1]
        print(f"{device}: paged / static output tokens per second = "
              f"{paged['output_tokens_per_s'] / static['output_tokens_per_s']:.2f}x; same tokens: {same}")
    write_records(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
