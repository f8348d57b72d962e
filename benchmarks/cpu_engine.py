"""The example engine on the CPU against Hugging Face ``model.generate``, side by side in one run.

Both decode the same prompts greedily on the same random Llama (default: 4 layers, hidden 512,
head dim 64, 8 query and 2 KV heads), on one CPU thread: ``generate`` as one padded-free batch
with its dynamic cache, the engine through ``BlockManager`` + ``PagedKVCache`` (the vectorised
torch path, ``kernels.batched``). Reports output tokens per second of each, their ratio (the
target of issue 12 is >= 0.8), and whether the tokens are identical; writes JSON Lines.

Usage: python benchmarks/cpu_engine.py [--prompts 16] [--prompt-len 128] [--new-tokens 32]
       [--layers 4] [--hidden 512] [--head-dim 64] [--repeats 3] [--out results/cpu_engine.jsonl]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402
from serve import load_engine  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/cpu_engine.jsonl")
    args = parser.parse_args(argv)
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"needs torch and transformers ({exc}); pip install '.[examples]'", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    eng = load_engine()
    heads = args.hidden // args.head_dim
    model = eng.tiny_llama(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                           num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                           max_positions=args.prompt_len + args.new_tokens + 8)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab, (args.prompts, args.prompt_len), generator=gen)
    total = args.prompts * args.new_tokens

    def run_generate():
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False)
        return out[:, args.prompt_len:].tolist()

    pages = args.prompts * -(-(args.prompt_len + args.new_tokens) // 16) + 8
    config = eng.EngineConfig(num_pages=pages, page_size=16, max_num_seqs=args.prompts,
                              max_num_batched_tokens=args.prompts * args.prompt_len, chunk_size=args.prompt_len)

    def run_engine():
        engine = eng.Engine(model, config)
        outputs = engine.generate(prompts.tolist(), eng.SamplingParams(max_new_tokens=args.new_tokens))
        return [o.output_ids[0] for o in outputs]

    timings = {"generate": [], "engine": []}
    tokens = {}
    for _ in range(args.repeats):
        for name, fn in (("generate", run_generate), ("engine", run_engine)):
            start = time.perf_counter()
            tokens[name] = fn()
            timings[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in timings.items()}
    record = {
        "bench": "cpu_engine", "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "layers": args.layers, "hidden": args.hidden, "head_dim": args.head_dim, "kv_heads": args.kv_heads,
        "threads": args.threads,
        "generate_tokens_per_s": total / best["generate"], "engine_tokens_per_s": total / best["engine"],
        "ratio": best["generate"] / best["engine"], "identical": tokens["generate"] == tokens["engine"],
        "seconds": timings, "env": environment(),
    }
    print(f"generate {record['generate_tokens_per_s']:.0f} tok/s, engine {record['engine_tokens_per_s']:.0f} tok/s, "
          f"ratio {record['ratio']:.2f} (target >= 0.8), tokens identical: {record['identical']}")
    write_records(args.out, [record])
    return 0 if record["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
