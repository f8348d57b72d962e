"""``pagedkv size``: how much KV cache a model needs, and how many sequences fit on some GPUs.

Prints the KV bytes per token, the KV of one sequence at the context, a weights estimate, the
KV budget per GPU and the maximum number of concurrent sequences, a batch x context table that
marks where memory runs out, and the bandwidth lower bound on one decode step. ``--json``
prints the same numbers (exact bytes as ints). Pure Python: never imports torch.

NOTE: the memory model is vLLM's: usable = ``--mem-fraction`` (default 0.9, like
``gpu_memory_utilization``) x capacity, minus the weights, minus ``--reserve``; what remains
holds KV pages. The weights estimate is parameters x bytes per weight: it ignores activations,
CUDA graphs and allocator overhead, which the 10% left by the default fraction (and
``--reserve``) must cover. ``--num-gpus N`` means tensor parallelism: weights and KV heads are
split N ways (MLA's latent is not split; see ``KVCacheSpec.shard``).

NOTE: a quantized ``--dtype`` counts the scales ``PagedKVCache`` stores with it by default
(``spec.default_kv_scales``): int8 adds 4 B (an fp32 scale) per token, layer, K/V and KV head;
fp8 uses per-tensor scales (0 B per token). ``--kv-scales`` picks another layout.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from fractions import Fraction

from .. import _validate as check
from ..errors import InvalidArgument
from ..spec import (
    GPU_PRESETS,
    KV_SCALES,
    MODEL_PRESETS,
    QUANTIZED_DTYPES,
    SCALE_BYTES,
    KVCacheSpec,
    canonical_dtype,
    default_kv_scales,
    estimate_num_params,
    gpu_preset,
    kv_budget_bytes,
    load_hf_config,
    max_sequences,
    model_preset,
    text_config,
    weights_bytes,
)

#: Internal argument names that errors may carry -> the flag (``pagedkv.cli`` renames them).
ARGUMENT_FLAGS = {"path_or_dict": "--config", "num_params": "--params"}

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_CONTEXTS = tuple(k * 1024 for k in (1, 4, 8, 16, 32, 64, 128))
_DECIMAL = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pagedkv size``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help=f"model preset: {', '.join(MODEL_PRESETS)} (or a Hugging Face id of one)")
    which.add_argument("--config", metavar="PATH", help="a Hugging Face config.json, or the model directory")
    parser.add_argument("--gpu", help=f"GPU preset: {', '.join(GPU_PRESETS)}")
    parser.add_argument("--num-gpus", default="1", metavar="N", help="GPUs, tensor parallel (default 1)")
    parser.add_argument("--dtype", help="KV cache dtype: fp32, fp16, bf16, fp8, int8, int4 (default: the model's)")
    parser.add_argument("--kv-scales", choices=KV_SCALES,
                        help="scales of a quantized cache: per_token_head adds 4 B per token, layer, K/V and KV "
                        "head (default: int8 per_token_head, fp8 per_tensor, as PagedKVCache stores them)")
    parser.add_argument("--weights-dtype", help="weights dtype (default: the released weights')")
    parser.add_argument("--context", help="tokens per sequence, e.g. 8192, 32k, 128k (k = 1024; "
                        "default: the model's maximum context)")
    parser.add_argument("--params", help="parameter count, e.g. 70.6B (default: the preset's, or "
                        "estimated from a Llama-style config.json)")
    parser.add_argument("--page-size", default="16", metavar="TOKENS", help="tokens per page (default 16)")
    parser.add_argument("--mem-fraction", default="0.9", metavar="F",
                        help="share of GPU memory usable for weights + KV cache (default 0.9)")
    parser.add_argument("--reserve", default="0", metavar="SIZE",
                        help="more memory per GPU to keep free, e.g. 2GiB or 1.5GB (default 0)")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="override or give the capacity per GPU, e.g. 24GiB")
    parser.add_argument("--bandwidth", metavar="RATE", help="override or give the bandwidth, e.g. 3.35TB/s")
    parser.add_argument("--batches", help=f"batch sizes of the table (default {','.join(map(str, DEFAULT_BATCHES))})")
    parser.add_argument("--contexts", help="contexts of the table (default 1k..128k up to --context)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--list", action="store_true", help="list the model and GPU presets, then exit")


def run(args: argparse.Namespace) -> int:
    """Print the sizing report. Returns 0; bad input raises a typed error (``pagedkv.cli``
    prints it as one line naming the flag and exits 2)."""
    if args.list:
        print(render_presets())
        return 0
    report = build_report(args)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0


# ------------------------------------------------------------------ parsing
def _number(text: str) -> Fraction | None:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def parse_tokens(text: str, name: str = "--context") -> int:
    """``"128k"`` -> 131072 (k = 1024, m = 1024**2); plain integers as they are."""
    expected = "a token count such as 4096, 32k or 128k (k = 1024)"
    match = re.fullmatch(r"([0-9.]+)([km]?)", str(text).strip().lower().replace(",", "").replace("_", ""))
    value = _number(match[1]) if match else None
    if value is None:
        raise InvalidArgument(name, text, expected)
    value *= {"": 1, "k": 1024, "m": 1024**2}[match[2]]
    if value.denominator != 1 or value < 1:
        raise InvalidArgument(name, text, expected)
    return int(value)


def parse_size(text: str, name: str) -> int:
    """``"80GiB"`` -> 85899345920, ``"1.5GB"`` -> 1500000000; a bare number is bytes."""
    match = re.fullmatch(r"([0-9.e+]+)\s*([a-z]*)", str(text).strip().lower().replace(",", "").replace("_", ""))
    value = _number(match[1]) if match else None
    unit = match[2] if match else ""
    scale = _DECIMAL.get(unit, _BINARY.get(unit))
    if value is None or scale is None or value < 0:
        raise InvalidArgument(name, text, "a size such as 2GiB, 1.5GB or 500000000 (bytes)")
    return math.floor(value * scale)


def parse_rate(text: str, name: str = "--bandwidth") -> float:
    """``"3.35TB/s"`` -> 3.35e12 bytes per second (decimal units, as datasheets quote them)."""
    body = str(text).strip().lower().removesuffix("/s").removesuffix("ps")
    try:
        value = parse_size(body, name)
    except InvalidArgument:
        raise InvalidArgument(name, text, "a bandwidth such as 3.35TB/s or 864GB/s") from None
    if value <= 0:
        raise InvalidArgument(name, text, "a bandwidth such as 3.35TB/s or 864GB/s")
    return float(value)


def parse_count(text: str, name: str = "--params") -> int:
    """``"70.6B"`` -> 70600000000 (k, M, B, T are decimal)."""
    match = re.fullmatch(r"([0-9.e+]+)([kmbt]?)", str(text).strip().lower().replace(",", "").replace("_", ""))
    value = _number(match[1]) if match else None
    if value is None or value < 1:
        raise InvalidArgument(name, text, "a parameter count such as 8030261248, 8.03B or 70.6B")
    return math.floor(value * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}[match[2]])


def _parse_float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(name, text, "a number") from None


def _parse_int(text: str, name: str) -> int:
    value = _number(str(text).strip())
    if value is None or value.denominator != 1:
        raise InvalidArgument(name, text, "an int >= 1")
    return check.count(name, int(value))


# ------------------------------------------------------------------- report
def _model(args) -> dict:
    """Spec, parameter counts, dtypes, context limit and provenance of the chosen model."""
    if args.model:
        p = model_preset(args.model)
        model = dict(name=p.name, hf_id=p.hf_id, source=p.source, spec=p.spec, num_params=p.num_params,
                     num_active_params=p.num_active_params, weights_dtype=p.weights_dtype, max_context=p.max_context)
    elif args.config:
        cfg = load_hf_config(args.config)
        spec = KVCacheSpec.from_hf_config(cfg)
        estimate = estimate_num_params(cfg)
        max_pos = text_config(cfg).get("max_position_embeddings")
        model = dict(name=str(cfg.get("_name_or_path") or args.config), hf_id=cfg.get("_name_or_path"),
                     source=f"config.json: {args.config}", spec=spec,
                     num_params=estimate[0] if estimate else None,
                     num_active_params=estimate[1] if estimate else None, weights_dtype=spec.dtype,
                     max_context=max_pos if isinstance(max_pos, int) and not isinstance(max_pos, bool) else None)
    else:
        raise InvalidArgument("--model", None, "a preset name, or --config PATH (see --list)")
    if args.params is not None:
        model["num_params"] = model["num_active_params"] = parse_count(args.params)
    kv_scales = getattr(args, "kv_scales", None)
    if args.dtype is not None or kv_scales is not None:
        dtype = model["spec"].dtype if args.dtype is None else canonical_dtype(args.dtype, "--dtype")
        scales = default_kv_scales(dtype) if kv_scales is None else kv_scales
        if scales != "none" and dtype not in QUANTIZED_DTYPES:
            raise InvalidArgument("--kv-scales", scales,
                                  f"'none' for a {dtype} cache (scales go with {', '.join(QUANTIZED_DTYPES)})")
        model["spec"] = model["spec"].with_dtype(dtype, scales)
    if args.weights_dtype is not None:
        model["weights_dtype"] = canonical_dtype(args.weights_dtype, "--weights-dtype")
    return model


def _gpu(args) -> dict | None:
    gpu = None
    if args.gpu:
        g = gpu_preset(args.gpu)
        gpu = dict(name=g.name, display_name=g.display_name, memory_bytes=g.memory_bytes,
                   bandwidth_bytes_per_s=g.bandwidth_bytes_per_s, source=g.source)
    if args.gpu_memory is not None:
        gpu = gpu or dict(name="custom", display_name="custom GPU", bandwidth_bytes_per_s=None, source="command line")
        gpu["memory_bytes"] = parse_size(args.gpu_memory, "--gpu-memory")
        check.as_int("--gpu-memory", gpu["memory_bytes"], 1, 2**62)
    if args.bandwidth is not None:
        if gpu is None:
            raise InvalidArgument("--bandwidth", args.bandwidth, "given with --gpu or --gpu-memory")
        gpu["bandwidth_bytes_per_s"] = parse_rate(args.bandwidth)
    return gpu


def build_report(args: argparse.Namespace) -> dict:
    """Every number ``pagedkv size`` prints, as a JSON-ready dict (bytes are exact ints).

    Raises:
        PagedKVError subclasses for bad arguments (naming the option and the value).
    """
    model, gpu = _model(args), _gpu(args)
    spec: KVCacheSpec = model["spec"]
    num_gpus = _parse_int(args.num_gpus, "--num-gpus")
    page_size = _parse_int(args.page_size, "--page-size")
    mem_fraction = _parse_float(args.mem_fraction, "--mem-fraction")
    reserve = parse_size(args.reserve, "--reserve")
    if args.context is not None:
        context = parse_tokens(args.context)
    elif model["max_context"]:
        context = model["max_context"]
    else:
        raise InvalidArgument("--context", None, "a token count (the config has no max_position_embeddings)")
    shard = spec.shard(num_gpus)

    report = {
        "model": dict(name=model["name"], hf_id=model["hf_id"], source=model["source"], attention=spec.attention,
                      num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, num_q_heads=spec.num_q_heads,
                      head_dim=spec.head_dim, kv_lora_rank=spec.kv_lora_rank, rope_head_dim=spec.rope_head_dim,
                      num_params=model["num_params"], num_active_params=model["num_active_params"],
                      max_context=model["max_context"]),
        "gpu": None if gpu is None else dict(gpu, num_gpus=num_gpus),
        "kv_dtype": spec.dtype, "kv_scales": spec.kv_scales, "scale_bytes_per_token": spec.scale_bytes_per_token,
        "weights_dtype": model["weights_dtype"], "context": context,
        "page_size": page_size, "num_gpus": num_gpus, "mem_fraction": mem_fraction, "reserve_bytes": reserve,
        "bytes_per_token": spec.bytes_per_token, "bytes_per_token_per_gpu": shard.bytes_per_token,
        "kv_per_sequence_bytes": spec.bytes_for(context),
        "kv_per_sequence_bytes_per_gpu": shard.bytes_for(context),
        "pages_per_sequence": spec.pages_for(context, page_size),
        "weights_bytes": None, "weights_bytes_per_gpu": None,
        "usable_bytes_per_gpu": None, "kv_budget_bytes_per_gpu": None, "num_pages_per_gpu": None,
        "max_sequences": None, "decode": None, "table": None,
    }
    report["hybrid"] = _hybrid(shard, context, page_size) if spec.is_hybrid else None
    if model["num_params"] is not None:
        report["weights_bytes"] = weights_bytes(model["num_params"], model["weights_dtype"])
        report["weights_bytes_per_gpu"] = -(-report["weights_bytes"] // num_gpus)
    if gpu is None or report["weights_bytes"] is None:
        return report

    memory = gpu["memory_bytes"]
    budget = kv_budget_bytes(memory, report["weights_bytes_per_gpu"], mem_fraction, reserve)
    report["usable_bytes_per_gpu"] = math.floor(mem_fraction * memory)
    report["kv_budget_bytes_per_gpu"] = budget
    report["num_pages_per_gpu"] = max(0, budget) // shard.page_bytes(page_size)
    report["max_sequences"] = max_sequences(shard, budget, context, page_size)
    if report["hybrid"] is not None:
        h = report["hybrid"]
        h["max_sequences"] = max(0, budget) // h["kv_per_sequence_bytes_per_gpu"]
        h["max_sequences_all_full"] = max(0, budget) // h["all_full_bytes_per_gpu"]

    bandwidth = gpu["bandwidth_bytes_per_s"]
    active_weights = -(-weights_bytes(model["num_active_params"], model["weights_dtype"]) // num_gpus)
    if bandwidth:
        report["decode"] = [_decode(shard, batch, context, active_weights, bandwidth)
                            for batch in sorted({1, max(1, report["max_sequences"])})]

    batches = _parse_list(args.batches, _parse_int, "--batches") if args.batches else list(DEFAULT_BATCHES)
    if args.contexts:
        contexts = _parse_list(args.contexts, parse_tokens, "--contexts")
    else:
        contexts = sorted({c for c in DEFAULT_CONTEXTS if c <= context} | {context})
    rows = [[batch * shard.bytes_for(c, page_size) for c in contexts] for batch in batches]
    report["table"] = {
        "batches": batches, "contexts": contexts,
        "kv_bytes_per_gpu": rows,
        "memory_bytes_per_gpu": [[report["weights_bytes_per_gpu"] + reserve + kv for kv in row] for row in rows],
        "fits": [[kv <= budget for kv in row] for row in rows],
        "decode_seconds_kv": None if not bandwidth else
        [[b * shard.bytes_for(c) / bandwidth for c in contexts] for b in batches],
    }
    return report


def _hybrid(shard: KVCacheSpec, context: int, page_size: int) -> dict:
    """The hybrid allocation of one sequence per GPU: groups, their pages, bytes, and the same
    sequence with every attention layer treated as full (page-rounded, plus any state)."""
    layout = shard.hybrid_layout()
    pages = shard.hybrid_pages_for(context, page_size)
    hybrid = shard.hybrid_bytes_for(context, page_size)
    full = shard.all_full_bytes_for(context, page_size)
    return dict(layers=shard.describe_layers(), layers_per_group=layout.layers_per_group,
                groups=[kind for kind, _ in layout.groups], padded_slots=layout.padded_slots,
                group_page_bytes_per_gpu=shard.group_page_bytes(page_size), pages_per_group=pages,
                kv_per_sequence_bytes_per_gpu=hybrid, all_full_bytes_per_gpu=full,
                bytes_per_token_per_gpu=hybrid / context, all_full_bytes_per_token_per_gpu=full / context,
                saving=full / hybrid, max_sequences=None, max_sequences_all_full=None)


def _render_hybrid(r: dict, with_max: bool = False) -> list[str]:
    h = r["hybrid"]
    kinds = {}
    for kind, n in zip(h["groups"], h["pages_per_group"]):
        kinds.setdefault(kind, []).append(n)
    pages = ", ".join(f"{len(v)} {k} x {v[0]:,}" for k, v in kinds.items())
    pad = f", {h['padded_slots']} padded layer slots" if h["padded_slots"] else ""
    lines = [
        f"hybrid groups   {h['layers']}: {len(h['groups'])} groups of {h['layers_per_group']} layers{pad}; one "
        f"page = {fmt_exact(h['group_page_bytes_per_gpu'])} per GPU",
        f"  per sequence  {fmt_bytes(h['kv_per_sequence_bytes_per_gpu'])} per GPU at {r['context']:,} tokens with "
        f"groups (pages per group: {pages}), {h['bytes_per_token_per_gpu']:,.0f} B per token",
        f"  all full      {fmt_bytes(h['all_full_bytes_per_gpu'])} per GPU treating every attention layer as full, "
        f"{h['all_full_bytes_per_token_per_gpu']:,.0f} B per token: groups need {h['saving']:.2f}x less",
    ]
    if h["max_sequences"] is not None and with_max:
        lines.append(f"  max sequences {h['max_sequences']:,} with groups vs {h['max_sequences_all_full']:,} all full "
                     f"at {r['context']:,} tokens (decoding; a one-step prefill holds the whole prompt)")
    return lines


def _decode(shard: KVCacheSpec, batch: int, context: int, active_weights: int, bandwidth: float) -> dict:
    """Lower bound on one decode step: every KV byte (and every active weight) read once per GPU."""
    kv = batch * shard.bytes_for(context)
    return dict(batch=batch, context=context, kv_bytes_read_per_gpu=kv, kv_seconds=kv / bandwidth,
                weights_bytes_read_per_gpu=active_weights, total_seconds=(kv + active_weights) / bandwidth)


def _parse_list(text: str, parse, name: str) -> list[int]:
    items = [item for item in str(text).split(",") if item.strip()]
    if not items:
        raise InvalidArgument(name, text, "a comma-separated list")
    return sorted({parse(item, name) for item in items})


# ---------------------------------------------------------------- rendering
def fmt_bytes(n: int) -> str:
    """Decimal and binary side by side where ambiguity bites: ``17.18 GB (16.00 GiB)``."""
    size = abs(n)
    for dec, dec_name, binary, bin_name in ((10**12, "TB", 2**40, "TiB"), (10**9, "GB", 2**30, "GiB"),
                                            (10**6, "MB", 2**20, "MiB"), (10**3, "kB", 2**10, "KiB")):
        if size >= dec:
            return f"{n / dec:.2f} {dec_name} ({n / binary:.2f} {bin_name})"
    return f"{n:,} B"


def fmt_exact(n: int) -> str:
    """``131,072 B (128 KiB)``."""
    return f"{n:,} B ({n / 1024:g} KiB)" if n >= 1024 else f"{n:,} B"


def fmt_tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def fmt_seconds(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t >= 1e-4 else f"{t * 1e6:.3g} us"


def _kv_formula(r: dict) -> str:
    m = r["model"]
    elem = f"{DTYPE_BITS_TEXT.get(r['kv_dtype'], '?')} ({r['kv_dtype']})"
    per_token = r.get("kv_scales") == "per_token_head"
    if m["attention"] == "mla":
        latent = f"({m['kv_lora_rank']} + {m['rope_head_dim']}) x {elem}"
        if per_token:
            return f"{m['num_layers']} layers x ({latent} + {SCALE_BYTES} B fp32 scale)"
        return f"{m['num_layers']} layers x {latent}"
    if per_token:
        return (f"2 (K, V) x {m['num_layers']} layers x {m['num_kv_heads']} KV heads x ({m['head_dim']} x {elem} "
                f"+ {SCALE_BYTES} B fp32 scale)")
    text = f"2 (K, V) x {m['num_layers']} layers x {m['num_kv_heads']} KV heads x {m['head_dim']} x {elem}"
    return text + (" (per-tensor scales: 0 B per token)" if r.get("kv_scales") == "per_tensor" else "")


DTYPE_BITS_TEXT = {"fp32": "4 B", "fp16": "2 B", "bf16": "2 B", "fp8": "1 B", "int8": "1 B", "int4": "0.5 B"}


def render_text(r: dict) -> str:
    """The human-readable report."""
    m, gpu, n = r["model"], r["gpu"], r["num_gpus"]
    spec = KVCacheSpec(m["num_layers"], m["num_kv_heads"], m["head_dim"], r["kv_dtype"], m["attention"],
                       m["num_q_heads"], m["kv_lora_rank"], m["rope_head_dim"], r.get("kv_scales", "none"))
    on = f" on {n} x {gpu['display_name']}" if gpu else ""
    lines = [f"pagedkv size: {m['name']}{on}", f"  model source: {m['source']}"]
    if gpu:
        lines.append(f"  GPU source:   {gpu['source']}")
    per_gpu = f"; per GPU {fmt_exact(r['bytes_per_token_per_gpu'])}" if n > 1 else ""
    if n > 1 and m["attention"] == "mla":
        per_gpu += " (the MLA latent is not split: every GPU keeps all of it)"
    lines += [
        "",
        f"KV cache        {spec.describe()}, {r['kv_dtype']}"
        + ("" if spec.kv_scales == "none" else f" with {spec.kv_scales.replace('_', '-')} scales"),
        f"per token       {fmt_exact(r['bytes_per_token'])} = {_kv_formula(r)}{per_gpu}",
        f"per sequence    {fmt_bytes(r['kv_per_sequence_bytes'])} at {r['context']:,} tokens "
        f"({r['pages_per_sequence']:,} pages of {r['page_size']})",
    ]
    if m["max_context"] and r["context"] > m["max_context"]:
        lines.append(f"                note: beyond the model's maximum context of {m['max_context']:,} tokens")
    if r.get("hybrid"):
        lines += _render_hybrid(r)
    if r["weights_bytes"] is None:
        lines.append("weights         unknown for this config: pass --params to size memory and concurrency")
        return "\n".join(lines)
    active = ""
    if m["num_active_params"] != m["num_params"]:
        active = f" ({m['num_active_params'] / 1e9:.1f}B active per token)"
    lines.append(f"weights         {fmt_bytes(r['weights_bytes'])} = {m['num_params'] / 1e9:.2f}B params{active} x "
                 f"{DTYPE_BITS_TEXT[r['weights_dtype']]} ({r['weights_dtype']}); excludes activations and "
                 "runtime overhead")
    if n > 1:
        lines.append(f"                per GPU {fmt_bytes(r['weights_bytes_per_gpu'])} (tensor parallel over {n})")
    if gpu is None:
        lines.append("capacity        pass --gpu (or --gpu-memory) for the KV budget and concurrency")
        return "\n".join(lines)
    budget = r["kv_budget_bytes_per_gpu"]
    reserve = f" - reserve {fmt_bytes(r['reserve_bytes'])}" if r["reserve_bytes"] else ""
    lines += [
        f"GPU memory      {fmt_bytes(gpu['memory_bytes'])} per GPU; usable {fmt_bytes(r['usable_bytes_per_gpu'])}"
        f" = {r['mem_fraction']:g} x capacity",
        f"KV budget       {fmt_bytes(budget)} per GPU = usable - weights{reserve}"
        + ("" if budget > 0 else "; the weights do not fit: add GPUs (--num-gpus) or use a smaller --weights-dtype"),
        f"max sequences   {r['max_sequences']:,} at {r['context']:,} tokens "
        f"({r['num_pages_per_gpu']:,} pages of {r['page_size']} tokens per GPU)",
    ]
    for d in r["decode"] or []:
        label = "one sequence" if d["batch"] == 1 else f"{d['batch']:,} sequences (max)"
        label += "" if r["max_sequences"] else " (does not fit)"
        lines.append(f"decode bound    {label}: >= {fmt_seconds(d['kv_seconds'])} per step reading "
                     f"{fmt_bytes(d['kv_bytes_read_per_gpu'])} of KV per GPU at {gpu['bandwidth_bytes_per_s'] / 1e12:g}"
                     f" TB/s; >= {fmt_seconds(d['total_seconds'])} with the active weights")
    if r.get("hybrid") and r["hybrid"]["max_sequences"] is not None:
        lines += _render_hybrid(r, with_max=True)[-1:]
    lines += ["", *_render_table(r)]
    return "\n".join(lines)


def _render_table(r: dict) -> list[str]:
    t = r["table"]
    width = 10
    head = "batch".rjust(7) + "".join(fmt_tokens(c).rjust(width) for c in t["contexts"])
    out = [f"GB per GPU for weights + KV (pages of {r['page_size']}); usable "
           f"{r['usable_bytes_per_gpu'] / 1e9:.2f} GB; OOM = out of memory", head]
    for b, row, fits in zip(t["batches"], t["memory_bytes_per_gpu"], t["fits"]):
        out.append(str(b).rjust(7) + "".join(
            (f"{v / 1e9:.1f}" if ok else "OOM").rjust(width) for v, ok in zip(row, fits)))
    if t["decode_seconds_kv"] is not None:
        out += ["", "decode lower bound per step, KV reads only (ms)", head]
        for b, row, fits in zip(t["batches"], t["decode_seconds_kv"], t["fits"]):
            out.append(str(b).rjust(7) + "".join(
                (f"{s * 1e3:.3g}" if ok else "OOM").rjust(width) for s, ok in zip(row, fits)))
    return out


def render_presets() -> str:
    """The model and GPU presets with their sources."""
    lines = ["models:"]
    for p in MODEL_PRESETS.values():
        lines.append(f"  {p.name:<15} {p.spec.describe()}, {p.num_params / 1e9:.2f}B params, "
                     f"{p.max_context:,} tokens  [{p.hf_id}]")
    lines.append("GPUs:")
    for g in GPU_PRESETS.values():
        lines.append(f"  {g.name:<15} {g.display_name}: {g.memory_bytes / 2**30:g} GiB, "
                     f"{g.bandwidth_bytes_per_s / 1e12:g} TB/s  [{g.source}]")
    return "\n".join(lines)
