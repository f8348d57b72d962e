"""``pagedkv frag``: fragmentation of paged vs static contiguous allocation on one workload.

Sweeps page sizes (paged ``BlockManager``) and reservation policies (``StaticAllocator``) under
one slot budget, runs ``pagedkv.simulate`` on each, prints a table (the Figure-2 breakdown,
utilisation, concurrency, preemptions, a throughput proxy), writes ``frag.json`` and draws
``frag.png`` (with ``pagedkv.plot``; matplotlib is imported only then).

NOTE: defaults reproduce the vLLM paper's Figure-2 setting: OPT-13B on an A100-40GB leaves
about 15.7K token slots of 800 KB; max_len 2048; ShareGPT-like lengths; the Orca baselines place
reservations with a buddy allocator, as the paper's reimplementation of Orca assumed.
All requests arrive at once (a saturated server) unless ``--rate`` or a trace's times say
otherwise; the paged runs keep vLLM's default 1% watermark free at admission.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .. import _validate as check
from ..errors import InvalidArgument

#: Internal argument names that errors may carry -> the flag (``pagedkv.cli`` renames them).
ARGUMENT_FLAGS = {"path": "--trace", "num_slots": "--slots", "prompt_key": "--prompt-column",
                  "output_key": "--output-column", "arrival_key": "--arrival-column"}

DEFAULT_PAGE_SIZES = (1, 8, 16, 32, 64, 128, 256)
DEFAULT_POLICIES = ("max", "pow2", "oracle")
DEFAULT_SLOTS = 15_700
DEFAULT_MAX_LEN = 2048
DEFAULT_NUM_REQUESTS = 1000
POLICY_LABELS = {"max": "Max", "pow2": "Pow2", "oracle": "Oracle"}
# NOTE: bounds on what one run may ask of the host, so a typo ("--slots 2147483647") is an error
# instead of tens of GB of page state or a day of simulation. Each paged point's BlockManager
# takes about 25 bytes per page: 2**25 pages are 0.8 GB.
MAX_PAGES = 2**25
MAX_REQUESTS = 10_000_000
MAX_PARALLEL_SAMPLES = 1024


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


_int_list.__name__ = "comma-separated int"  # argparse names the type in its error message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pagedkv frag``."""
    wl = parser.add_argument_group("workload")
    wl.add_argument("--workload", choices=("sharegpt", "alpaca", "multi-turn"), default="sharegpt",
                    help="built-in synthetic workload (default sharegpt; multi-turn: chat conversations resending "
                    "their history behind shared system prompts, with hash ids for --prefix-caching)")
    wl.add_argument("--num-requests", type=int, default=None,
                    help=f"requests to simulate (default {DEFAULT_NUM_REQUESTS}; a trace: all of its rows)")
    wl.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload (default 0)")
    wl.add_argument("--rate", type=float, default=None,
                    help="Poisson arrivals at this many requests/s (default: all at once, or a trace's own times)")
    wl.add_argument("--trace", metavar="FILE", help="a trace, CSV or JSON Lines, its format detected from its content: "
                    "Azure LLM inference, BurstGPT, Mooncake, or generic prompt/output length columns or keys")
    wl.add_argument("--prompt-column", help="prompt length column of --trace (default: auto, e.g. ContextTokens)")
    wl.add_argument("--output-column", help="output length column of --trace (default: auto, e.g. GeneratedTokens)")
    wl.add_argument("--arrival-column", help="arrival time column of --trace (default: auto, e.g. TIMESTAMP)")
    wl.add_argument("--all-at-once", action="store_true", help="ignore a trace's arrival times")
    wl.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) bad trace rows instead of failing")

    budget = parser.add_argument_group("budget")
    budget.add_argument("--slots", type=int, default=None,
                        help=f"token slots in the pool, for every allocator (default {DEFAULT_SLOTS:,})")
    budget.add_argument("--model", help="model preset (with --gpu): the budget is what its KV cache gets")
    budget.add_argument("--gpu", help="GPU preset (with --model)")
    budget.add_argument("--mem-fraction", type=float, default=0.9,
                        help="share of GPU memory for weights + KV cache (default 0.9)")
    budget.add_argument("--dtype", help="KV cache dtype with --model/--gpu: fp16, bf16, fp8, int8, ... "
                        "(default: the model's); quantized dtypes count their scales")
    budget.add_argument("--kv-scales", choices=("none", "per_tensor", "per_token_head"),
                        help="scales of a quantized --dtype (default: int8 per_token_head, fp8 per_tensor)")

    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--page-sizes", type=_int_list, default=list(DEFAULT_PAGE_SIZES),
                       help="paged page sizes, e.g. 1,8,16 (default 1,8,16,32,64,128,256; '' for none)")
    sweep.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                       help="static policies among max,pow2,oracle (default all; '' for none)")
    sweep.add_argument("--placement", choices=("buddy", "first_fit", "best_fit"), default="buddy",
                       help="hole placement of the static allocator (default buddy, as the paper's Orca)")
    sweep.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                       help=f"longest prompt + output; longer requests are rejected (default {DEFAULT_MAX_LEN})")
    sweep.add_argument("--watermark", type=float, default=0.01,
                       help="fraction of pages the paged allocator keeps free at admission (default 0.01)")
    sweep.add_argument("--max-running", type=int, default=None, help="cap on running requests (default none)")
    sweep.add_argument("--parallel-samples", type=int, default=1,
                       help="sequences per request sharing the prompt's pages (default 1)")
    sweep.add_argument("--step-time", type=float, default=None, help="seconds per decode step (default 0.04)")
    sweep.add_argument("--prefix-caching", action="store_true",
                       help="paged points run the block manager's prefix cache on the prompts' token ids (equal "
                       "hash ids of a Mooncake trace are equal content) and report the prefix hit rate")
    sweep.add_argument("--scheduler", choices=("v1", "simple"), default="v1",
                       help="v1 (default): also run every page size under a vLLM-v1-like scheduler (a per-step token "
                       "budget shared by decodes and chunked prefills) and report preemptions per request, the "
                       "prefix hit rate and, with --model/--gpu, TTFT, TPOT and tokens/s from a roofline step-time "
                       "model; simple: only the fragmentation sweep (whole-prompt admission, one token per step), "
                       "whose accounting the breakdown table always uses")
    sweep.add_argument("--max-num-batched-tokens", type=int, default=8192,
                       help="v1 scheduler: tokens per step, decodes + prefill chunks (default 8192, as vLLM)")
    sweep.add_argument("--max-num-seqs", type=int, default=256,
                       help="v1 scheduler: running requests at most (default 256, as vLLM)")
    sweep.add_argument("--preemption", choices=("recompute", "swap"), default="recompute",
                       help="v1 scheduler: preempt by recompute (default, as vLLM v1) or swap to --cpu-slots")
    sweep.add_argument("--cpu-slots", type=int, default=0,
                       help="v1 scheduler: token slots of the CPU tier that --preemption swap moves pages to")
    sweep.add_argument("--replicas", type=int, default=1,
                       help="v1 scheduler: also run this many replicas (each with the whole budget) behind each "
                       "--router, and report hit rate, load imbalance and TTFT per router (default 1: none)")
    sweep.add_argument("--router", default=None,
                       help="routers for --replicas, among round_robin,least_loaded,prefix_aware (default: all; "
                       "prefix_aware needs --prefix-caching and reads the replicas' KV events)")
    sweep.add_argument("--capacities", type=_int_list, default=None,
                       help="with --prefix-caching: also sweep the pool size, e.g. 50000,200000 token slots, for "
                       "every page size (the hit rate against capacity; drawn in prefix.png)")

    sweep.add_argument("--cpu-capacities", type=_int_list, default=None,
                       help="with --capacities: a second axis, CPU-tier token slots of the prefix cache (evicted "
                       "cached pages are demoted there and promoted back on a hit), e.g. 0,200000")
    sweep.add_argument("--jobs", type=int, default=1,
                       help="simulate the sweep's points in this many processes (default 1)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", default="results/frag",
                     help="directory for frag.json and frag.png (default results/frag)")
    out.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    out.add_argument("--no-plot", action="store_true", help="do not draw frag.png")


def run(args: argparse.Namespace) -> int:
    """Run the sweep. Returns 0; bad input raises a typed error (``pagedkv.cli`` prints it as
    one line naming the flag and exits 2)."""
    report = sweep(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frag.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2), flush=True)
    else:
        print(render(report), flush=True)
    written = [out / "frag.json"]
    if not args.no_plot:
        from ..plot import plot_frag

        written.append(plot_frag(report, out / "frag.png"))
        if report.get("capacity_sweep"):
            from ..plot import plot_prefix

            written.append(plot_prefix(report, out / "prefix.png"))
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


def load_workload(args: argparse.Namespace):
    """The workload the options describe."""
    from .. import workload as wl

    if args.trace:
        work = wl.load_trace(args.trace, prompt_column=args.prompt_column, output_column=args.output_column,
                             arrival_column=args.arrival_column, skip_bad_rows=args.skip_bad_rows)
        if args.num_requests is not None:
            work = work.head(args.num_requests)
        if args.rate is not None:
            work = work.with_arrivals(wl.poisson_arrivals(len(work), args.rate, args.seed))
        elif args.all_at_once:
            work = work.with_arrivals(None)
        return work
    n = DEFAULT_NUM_REQUESTS if args.num_requests is None else args.num_requests
    if args.workload == "multi-turn":
        turns = 6
        work = wl.multi_turn(-(-n // turns), turns, seed=args.seed, rate=1.0 if args.rate is None else args.rate)
        return work.head(n)
    return wl.synthetic(args.workload, n, seed=args.seed, rate=args.rate)


def resolve_budget(args: argparse.Namespace) -> dict:
    """The slot budget: ``{"num_slots": C, "source": ..., "pages": fn(page_size) -> num_pages}``."""
    if args.model or args.gpu:
        if not (args.model and args.gpu):
            raise InvalidArgument("--model/--gpu", args.model or args.gpu, "both a model and a GPU preset")
        if args.slots is not None:
            raise InvalidArgument("--slots", args.slots, "left out when --model and --gpu give the budget")
        from .. import spec

        model, gpu = spec.model_preset(args.model), spec.gpu_preset(args.gpu)
        kv = _kv_spec(model.spec, getattr(args, "dtype", None), getattr(args, "kv_scales", None))
        weights = spec.weights_bytes(model.num_params, model.weights_dtype)
        budget = spec.kv_budget_bytes(gpu.memory_bytes, weights, args.mem_fraction)
        if budget < kv.bytes_per_token:
            raise InvalidArgument("--gpu", args.gpu, f"a GPU whose memory x {args.mem_fraction} holds the "
                                  f"{weights:,} bytes of {model.name} weights and a KV cache")
        slots = budget // kv.bytes_per_token
        out = {"num_slots": slots, "bytes_per_token": kv.bytes_per_token, "budget_bytes": budget,
               "kv_dtype": kv.dtype, "kv_scales": kv.kv_scales,
               "source": f"{model.name} ({kv.dtype}) on {gpu.name} at mem_fraction {args.mem_fraction}",
               "pages": lambda ps: spec.num_pages_for_budget(kv, budget, ps)}
        if kv.is_hybrid:
            # NOTE: the same bytes as pages of the hybrid pool (a page of every layer of a group)
            out["layers"] = kv.describe_layers()
            out["hybrid"] = lambda ps: (budget // kv.group_page_bytes(ps), kv.kv_cache_groups(ps),
                                        kv.group_page_bytes(ps))
        return out
    for option in ("--dtype", "--kv-scales"):
        value = getattr(args, option[2:].replace("-", "_"), None)
        if value is not None:
            raise InvalidArgument(option, value, "given with --model and --gpu (it sets the bytes per token)")
    slots = check.count("--slots", DEFAULT_SLOTS if args.slots is None else args.slots)
    return {"num_slots": slots, "source": "--slots" if args.slots is not None else "default (OPT-13B, A100-40GB)",
            "pages": lambda ps: slots // ps}


def _kv_spec(model_spec, dtype: str | None, kv_scales: str | None):
    """The model's KV spec stored as ``dtype`` with ``kv_scales`` (defaults: the model's dtype,
    and the scales ``PagedKVCache`` stores with it)."""
    from .. import spec

    if dtype is None and kv_scales is None:
        return model_spec
    dtype = model_spec.dtype if dtype is None else spec.canonical_dtype(dtype, "--dtype")
    scales = spec.default_kv_scales(dtype) if kv_scales is None else kv_scales
    if scales != "none" and dtype not in spec.QUANTIZED_DTYPES:
        raise InvalidArgument("--kv-scales", scales,
                              f"'none' for a {dtype} cache (scales go with {', '.join(spec.QUANTIZED_DTYPES)})")
    return model_spec.with_dtype(dtype, scales)


def sweep(args: argparse.Namespace) -> dict:
    """Simulate every configuration; returns the JSON-ready report."""
    from ..simulate import DEFAULT_STEP_TIME
    from ..static import POLICIES

    policies = [p for p in args.policies.replace(",", " ").split() if p != "none"]
    for p in policies:
        if p not in POLICIES:
            raise InvalidArgument("--policies", p, f"a list of {', '.join(POLICIES)}")
    page_sizes = [check.count("--page-sizes", ps) for ps in args.page_sizes]
    if not policies and not page_sizes:
        raise InvalidArgument("--page-sizes/--policies", "nothing", "at least one configuration to simulate")
    max_len = check.count("--max-len", args.max_len)
    n = check.as_int("--parallel-samples", args.parallel_samples, 1, MAX_PARALLEL_SAMPLES)
    if args.num_requests is not None:
        check.as_int("--num-requests", args.num_requests, 1, MAX_REQUESTS)
    step_time = DEFAULT_STEP_TIME if args.step_time is None else args.step_time
    prefix = bool(getattr(args, "prefix_caching", False))
    if prefix and n > 1:
        raise InvalidArgument("--parallel-samples", n, "1 with --prefix-caching")
    work = load_workload(args)
    budget = resolve_budget(args)
    C = budget["num_slots"]
    for ps in page_sizes:
        if budget["pages"](ps) < 1:
            raise InvalidArgument("--page-sizes", ps, f"at most the budget of {C} slots")
        if budget["pages"](ps) > MAX_PAGES:
            raise InvalidArgument("--page-sizes", ps, f"a page size that splits the {C:,} slots into at most "
                                  f"{MAX_PAGES:,} pages (the simulator's bound on host memory); use larger pages "
                                  "or fewer --slots")

    capacities = []
    if getattr(args, "capacities", None) is not None:
        if not prefix:
            raise InvalidArgument("--capacities", ",".join(map(str, args.capacities)), "given only with --prefix-caching")
        capacities = [check.count("--capacities", c) for c in args.capacities]
    cpu_capacities = [0]
    if getattr(args, "cpu_capacities", None) is not None:
        if not capacities:
            raise InvalidArgument("--cpu-capacities", ",".join(map(str, args.cpu_capacities)),
                                  "given only with --capacities")
        cpu_capacities = [check.as_int("--cpu-capacities", c, 0, check.MAX_COUNT) for c in args.cpu_capacities]
        for c in capacities:
            if c // min(page_sizes or [1]) > MAX_PAGES:
                raise InvalidArgument("--capacities", c, f"at most {MAX_PAGES:,} pages of the smallest page size")
    v1 = getattr(args, "scheduler", "simple") == "v1"
    time_model = None
    if v1:
        budget_tokens = check.as_int("--max-num-batched-tokens", args.max_num_batched_tokens, 1, check.MAX_COUNT)
        max_seqs = check.as_int("--max-num-seqs", args.max_num_seqs, 1, budget_tokens)
        if args.model:
            from ..scheduler import StepTimeModel

            time_model = StepTimeModel.from_presets(args.model, args.gpu)
    preemption = getattr(args, "preemption", "recompute")
    cpu_slots = check.as_int("--cpu-slots", getattr(args, "cpu_slots", 0), 0, check.MAX_COUNT)
    if preemption == "swap" and (not v1 or not cpu_slots):
        raise InvalidArgument("--preemption", preemption, "'recompute' unless --scheduler v1 and --cpu-slots > 0")
    if cpu_slots and preemption != "swap":
        raise InvalidArgument("--cpu-slots", cpu_slots, "given with --preemption swap")
    replicas = check.as_int("--replicas", getattr(args, "replicas", 1), 1, 1024)
    routers = []
    if replicas > 1:
        from ..scheduler import ROUTERS

        if not v1:
            raise InvalidArgument("--replicas", replicas, "1 with --scheduler simple (replicas run the v1 scheduler)")
        given = getattr(args, "router", None)
        routers = [r for r in (given or ",".join(ROUTERS)).replace(",", " ").split()]
        for r in routers:
            if r not in ROUTERS:
                raise InvalidArgument("--router", r, f"a list of {', '.join(ROUTERS)}")
        if not prefix:
            if given and "prefix_aware" in routers:
                raise InvalidArgument("--router", "prefix_aware", "given with --prefix-caching (it routes on cached "
                                      "prefixes)")
            routers = [r for r in routers if r != "prefix_aware"]
    elif getattr(args, "router", None):
        raise InvalidArgument("--router", args.router, "given with --replicas N > 1")
    jobs = check.as_int("--jobs", getattr(args, "jobs", 1), 1, 256)
    tasks = ([("point", "static", p) for p in policies] + [("point", "paged", ps) for ps in page_sizes]
             + [("capacity", c, ps, cpu) for c in capacities for ps in page_sizes for cpu in cpu_capacities
                if c // ps >= 1]
             + ([("serving", ps) for ps in page_sizes] if v1 else [])
             + ([("serving", ps, "groups") for ps in page_sizes] if v1 and "hybrid" in budget else [])
             + [("fleet", ps, router) for ps in page_sizes for router in routers])
    context = {"work": work, "C": C, "max_len": max_len, "n": n, "step_time": step_time,
               "max_running": args.max_running, "prefix": prefix, "watermark": args.watermark,
               "placement": args.placement, "pages": {ps: budget["pages"](ps) for ps in page_sizes},
               "budget_tokens": budget_tokens if v1 else None, "max_seqs": max_seqs if v1 else None,
               "time_model": time_model, "replicas": replicas, "preemption": preemption, "cpu_slots": cpu_slots,
               "hybrid": {ps: budget["hybrid"](ps) for ps in page_sizes} if v1 and "hybrid" in budget else {}}
    bar = _progress(len(tasks) * len(work))
    try:
        if jobs == 1:
            results = []
            for task in tasks:
                if bar is not None:
                    bar.set_postfix_str(" ".join(map(str, task[1:])))
                results.append(_execute(task, context, None if bar is None else bar.update))
        else:
            from concurrent.futures import ProcessPoolExecutor

            # NOTE: every task is independent (its own allocator); the bar moves per finished task.
            with ProcessPoolExecutor(max_workers=jobs, initializer=_set_context, initargs=(context,)) as pool:
                futures = [pool.submit(_execute_in_worker, task) for task in tasks]
                results = []
                for future in futures:
                    results.append(future.result())
                    if bar is not None:
                        bar.update(len(work))
    finally:
        if bar is not None:
            bar.close()
    by_kind = {kind: [r for t, r in zip(tasks, results) if t[0] == kind]
               for kind in ("point", "capacity", "serving", "fleet")}
    points, capacity_sweep, serving, fleet = (by_kind[k] for k in ("point", "capacity", "serving", "fleet"))
    grouped = [entry for entry in serving if "groups" in entry]
    serving = [entry for entry in serving if "groups" not in entry]
    for entry in grouped:
        entry["label"] += " groups"
        full = next(p for p in serving if p["page_size"] == entry["page_size"])
        entry["all_full_pages"] = context["pages"][entry["page_size"]]
        entry["all_full_peak_running"] = full["peak_running"]
    for entry in serving + grouped:
        simple = next(p for p in points if p["page_size"] == entry["page_size"])
        entry["simple_preemptions_per_request"] = (
            simple["preemptions"] / max(1, simple["num_requests"] - sum(simple["rejected"].values())))

    from .. import backend

    return {
        "command": "pagedkv frag",
        "workload": work.describe(),
        "budget": {k: v for k, v in budget.items() if k not in ("pages", "hybrid")},
        "config": {"max_len": max_len, "parallel_samples": n, "step_time": step_time, "watermark": args.watermark,
                   "placement": args.placement, "max_running": args.max_running, "seed": args.seed,
                   "rate": args.rate, "page_sizes": page_sizes, "policies": policies, "backend": backend,
                   "prefix_caching": prefix, "scheduler": "v1" if v1 else "simple",
                   **({"max_num_batched_tokens": budget_tokens, "max_num_seqs": max_seqs, "preemption": preemption,
                       "cpu_slots": cpu_slots,
                       "time_model": None if time_model is None else time_model.name} if v1 else {})},
        "points": points,
        **({"serving": serving + grouped} if v1 else {}),
        **({"replicas": fleet} if routers else {}),
        **({"capacity_sweep": capacity_sweep} if capacities else {}),
    }


_CONTEXT: dict = {}


def _set_context(context: dict) -> None:
    _CONTEXT.update(context)


def _execute_in_worker(task: tuple) -> dict:
    return _execute(task, _CONTEXT, None)


def _execute(task: tuple, ctx: dict, progress) -> dict:
    """One simulation of the sweep: a breakdown point, a capacity point, a v1 point or a fleet."""
    from .. import BlockManager
    from ..simulate import simulate
    from ..static import StaticAllocator

    work, prefix = ctx["work"], ctx["prefix"]
    start = time.perf_counter()
    if task[0] == "point":
        kind, value = task[1], task[2]
        if kind == "static":
            alloc = StaticAllocator(ctx["C"], policy=value, max_len=ctx["max_len"], placement=ctx["placement"])
        else:
            alloc = BlockManager(ctx["pages"][value], value, watermark=ctx["watermark"], enable_prefix_caching=prefix)
        result = simulate(work, alloc, max_len=ctx["max_len"], num_slots=ctx["C"], parallel_samples=ctx["n"],
                          step_time=ctx["step_time"], max_running=ctx["max_running"], progress=progress,
                          prefix_caching=prefix and kind == "paged")
        return {"label": POLICY_LABELS[value] if kind == "static" else f"page {value}",
                "policy": value if kind == "static" else None,
                "placement": ctx["placement"] if kind == "static" else None,
                "elapsed_s": time.perf_counter() - start, **result.to_dict()}
    if task[0] == "capacity":
        capacity, ps, cpu = task[1], task[2], task[3]
        alloc = BlockManager(capacity // ps, ps, watermark=ctx["watermark"], enable_prefix_caching=True,
                             num_cpu_pages=cpu // ps, cpu_prefix_cache=cpu // ps > 0)
        result = simulate(work, alloc, max_len=ctx["max_len"], step_time=ctx["step_time"],
                          max_running=ctx["max_running"], progress=progress, prefix_caching=True)
        return {"page_size": ps, "num_slots": capacity, "cpu_slots": cpu, "prefix_hit_rate": result.prefix_hit_rate,
                "prefill_tokens_saved": result.prefill_tokens_saved, "preemptions": result.preemptions,
                "completed": result.completed, "rejected": result.rejected, "mean_running": result.mean_running}
    from ..scheduler import simulate_replicas, simulate_v1

    ps = task[1]
    options = dict(max_num_batched_tokens=ctx["budget_tokens"], max_num_seqs=ctx["max_seqs"], prefix_caching=prefix,
                   time_model=ctx["time_model"], step_time=ctx["step_time"], max_len=ctx["max_len"], progress=progress,
                   preemption=ctx["preemption"])
    cpu_pages = ctx["cpu_slots"] // ps
    if task[0] == "serving" and len(task) == 3:  # a hybrid model's KV cache groups over the same bytes
        from ..hybrid import HybridBlockManager

        pages, groups, page_bytes = ctx["hybrid"][ps]
        alloc = HybridBlockManager(groups, pages, ps, watermark=ctx["watermark"], enable_prefix_caching=prefix,
                                   num_cpu_pages=cpu_pages * ctx["pages"][ps] // max(pages, 1))
        result = simulate_v1(work, alloc, **options)
        return {"label": f"page {ps}", "page_size": ps, "groups": [g.kind for g in groups], "group_page_bytes": page_bytes,
                "num_pages": pages, "elapsed_s": time.perf_counter() - start, **result.to_dict()}
    if task[0] == "serving":
        alloc = BlockManager(ctx["pages"][ps], ps, watermark=ctx["watermark"], enable_prefix_caching=prefix,
                             num_cpu_pages=cpu_pages)
        result = simulate_v1(work, alloc, **options)
        return {"label": f"page {ps}", "page_size": ps, "elapsed_s": time.perf_counter() - start, **result.to_dict()}
    result = simulate_replicas(
        work, lambda: BlockManager(ctx["pages"][ps], ps, watermark=ctx["watermark"], enable_prefix_caching=prefix,
                                   enable_kv_events=prefix, num_cpu_pages=cpu_pages),
        ctx["replicas"], task[2], **options)
    return {"label": f"page {ps}", "page_size": ps, "replicas": ctx["replicas"],
            "elapsed_s": time.perf_counter() - start, **result.to_dict()}


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # NOTE: disable=None turns the bar off when stderr is not a terminal (CI logs stay clean).
    return tqdm(total=total, unit="req", desc="frag", disable=None, leave=False, file=sys.stderr)


def render(report: dict) -> str:
    """The report as a text table."""
    w, b, c = report["workload"], report["budget"], report["config"]
    lines = [
        f"workload {w['name']}: {w['num_requests']} requests, prompt mean {w['prompt_mean']:.1f}, "
        f"output mean {w['output_mean']:.1f} tokens"
        + (f", {w['num_skipped']} bad rows skipped" if w["num_skipped"] else ""),
        f"budget {b['num_slots']:,} token slots ({b['source']}); max_len {c['max_len']}; "
        f"parallel samples {c['parallel_samples']}; static placement {c['placement']}; backend {c['backend']}",
        "",
    ]
    sharing = any(p["sharing_saving"] is not None for p in report["points"])
    prefix = any(p.get("prefix_hit_rate") is not None for p in report["points"])
    head = (f"{'allocator':<10} {'tokens%':>7} {'reserv%':>7} {'intern%':>7} {'extern%':>7} {'util%':>6} "
            f"{'usage%':>6} {'tail':>6} {'hole':>5} {'run':>6} {'peak':>5} {'preempt':>7} {'tok/step':>8} "
            f"{'rejected':>8} {'basis':>9}" + (f" {'saved%':>6}" if sharing else "")
            + (f" {'hit%':>6}" if prefix else ""))
    lines += [head, "-" * len(head)]
    for p in report["points"]:
        bd = p["breakdown"]
        hole = "-" if p["largest_hole_index"] is None else f"{p['largest_hole_index']:.2f}"
        row = (f"{p['label']:<10} {100 * bd['token_states']:7.1f} {100 * bd['reserved']:7.1f} "
               f"{100 * bd['internal']:7.1f} {100 * bd['external']:7.1f} {100 * p['utilisation']:6.1f} "
               f"{100 * p['usage']:6.1f} {p['tail_waste']['mean']:6.1f} {hole:>5} {p['mean_running']:6.1f} "
               f"{p['peak_running']:5d} {p['preemptions']:7d} {p['throughput']:8.2f} "
               f"{sum(p['rejected'].values()):8d} {p['basis']:>9}")
        if sharing:
            row += " " + ("-" if p["sharing_saving"] is None else f"{100 * p['sharing_saving']:6.1f}").rjust(6)
        if prefix:
            hit = p.get("prefix_hit_rate")
            row += " " + ("-" if hit is None else f"{100 * hit:6.1f}").rjust(6)
        lines.append(row)
    for p in report["points"]:
        if p["rejected"]:
            reasons = ", ".join(f"{n:,} {why.replace('_', ' ')}" for why, n in sorted(p["rejected"].items()))
            lines.append(f"note: {p['label']} rejected {sum(p['rejected'].values()):,} of {w['num_requests']:,} "
                         f"requests ({reasons}); they are left out of its figures")
    sweep_points = report.get("capacity_sweep") or []
    if sweep_points:
        sizes = sorted({p["page_size"] for p in sweep_points})
        caps = sorted({p["num_slots"] for p in sweep_points})
        cpus = sorted({p.get("cpu_slots", 0) for p in sweep_points})
        table = {(p["page_size"], p.get("cpu_slots", 0), p["num_slots"]): p for p in sweep_points}
        lines += ["", "prefix hit rate (%) against capacity (token slots)"
                  + (", rows per page size and CPU-tier slots:" if len(cpus) > 1 else ":"),
                  f"{'page':>6} " + (f"{'CPU':>10} " if len(cpus) > 1 else "") + " ".join(f"{c:>10,}" for c in caps)]
        for ps in sizes:
            for cpu in cpus:
                lines.append(f"{ps:>6} " + (f"{cpu:>10,} " if len(cpus) > 1 else "") + " ".join(
                    f"{100 * table[(ps, cpu, c)]['prefix_hit_rate']:>10.1f}" if (ps, cpu, c) in table else f"{'-':>10}"
                    for c in caps))
    serving = report.get("serving") or []
    if serving:
        timed = c.get("time_model") is not None
        lines += ["", f"serving under the vLLM-v1-like scheduler ({c['max_num_batched_tokens']} tokens and "
                  f"{c['max_num_seqs']} sequences per step; "
                  + (f"roofline step time of {c['time_model']})" if timed else f"{c['step_time']} s per step)")]
        head = (f"{'allocator':<14} {'preempt/req':>11} {'simple':>7} {'steps':>7} {'run':>6} {'tok/step':>8}"
                + (f" {'hit%':>6}" if prefix else "")
                + (f" {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>8} {'tok/s':>9}" if timed else ""))
        lines += [head, "-" * len(head)]
        for p in serving:
            row = (f"{p['label']:<14} {p['preemptions_per_request']:11.3f} {p['simple_preemptions_per_request']:7.3f} "
                   f"{p['steps']:7d} {p['mean_running']:6.1f} {p['mean_batch_tokens']:8.1f}")
            if prefix:
                row += f" {100 * p['prefix_hit_rate']:6.1f}"
            if timed:
                row += (f" {p['ttft_p50_s']:8.3f}s {p['ttft_p99_s']:7.3f}s {1000 * p['tpot_p50_s']:7.2f}ms "
                        f"{1000 * p['tpot_p99_s']:6.2f}ms {p['output_tokens_per_s']:9.0f}")
            lines.append(row)
        grouped = [p for p in serving if p.get("groups")]
        if grouped:
            budget = report["budget"]
            lines += ["", f"KV cache groups ({budget.get('layers', '')}), one pool of the same "
                      f"{budget.get('budget_bytes', 0):,} bytes; '<page> groups' rows above:"]
            for p in grouped:
                kinds = p["groups"]
                mean = p.get("group_pages_mean") or [0.0] * len(kinds)
                peak = p.get("group_pages_peak") or [0] * len(kinds)
                per_kind = {}
                for k, m, x in zip(kinds, mean, peak):
                    n, total, top = per_kind.get(k, (0, 0.0, 0))
                    per_kind[k] = (n + 1, total + m, max(top, x))
                per = ", ".join(f"{k}{f' ({n} groups)' if n > 1 else ''} {m:,.0f} (peak {x:,} per group)"
                                for k, (n, m, x) in per_kind.items())
                lines.append(f"  page {p['page_size']}: {p['num_pages']:,} pages of {p['group_page_bytes']:,} B "
                             f"(all-full: {p['all_full_pages']:,} pages of the same bytes per token); pages held per "
                             f"kind, mean over steps: {per}; peak running {p['peak_running']} vs "
                             f"{p['all_full_peak_running']} all-full")
        lines.append("preempt/req: preemptions per admitted request, v1 and (simple) the simple scheduler of the "
                     "table above; run = running requests, tok/step = tokens computed per step"
                     + ("; TTFT/TPOT from arrival times and the roofline model (attention FLOPs as if every "
                        "layer were full; no kernel efficiency or host overhead)" if timed else "") + ".")
    fleet = report.get("replicas") or []
    if fleet:
        timed = c.get("time_model") is not None
        unit = "s" if timed else " s"
        lines += ["", f"{fleet[0]['replicas']} replicas behind a router (v1 scheduler, each replica with the whole "
                  "budget):"]
        head = (f"{'allocator':<10} {'router':<13} {'hit%':>6} {'imbalance':>9} {'TTFT p50':>9} {'p99':>8} "
                f"{'preempt/req':>11} {'requests per replica'}")
        lines += [head, "-" * len(head)]
        for p in fleet:
            hit = "-" if p["prefix_hit_rate"] is None else f"{100 * p['prefix_hit_rate']:.1f}"
            lines.append(f"{p['label']:<10} {p['router']:<13} {hit:>6} {p['imbalance']:9.2f} "
                         f"{p['ttft_p50_s']:8.3f}{unit[-1]} {p['ttft_p99_s']:7.3f}{unit[-1]} "
                         f"{p['preemptions_per_request']:11.3f} {p['requests_per_replica']}")
        lines.append("imbalance = max / mean of the tokens each replica computed; prefix_aware scores replicas by "
                     "Dynamo's cost (overlap weight 1 x prompt blocks not cached there + active blocks), knowing "
                     "their caches only from their KV events.")
    lines += ["", "tokens/reserv/intern/extern: the Figure-2 breakdown of the pool (sums to 100%), averaged over "
              "steps with a non-empty queue (basis); util = tokens / allocated; usage = vLLM's KV-cache usage; "
              "tail = mean slots left unfilled at completion; hole = 1 - largest hole / free (static); "
              "run/peak = running requests; tok/step = generated tokens per step."
              + (" hit = prompt tokens found in the prefix cache at first admission / prompt tokens (cached "
                 "pages no sequence holds count as free)." if prefix else "")]
    return "\n".join(lines)
