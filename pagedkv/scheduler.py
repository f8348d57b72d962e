"""A vLLM-v1-like token-budget scheduler over the real ``BlockManager``, and a roofline step-time model.

``simulate_v1`` runs a workload the way vLLM's v1 scheduler does, with one token budget per
step (``max_num_batched_tokens``) shared by decodes and prefill chunks:

1. Arrivals join the waiting queue when the clock passes their arrival time. A request whose
   ``prompt + output`` exceeds ``max_len``, or whose pages exceed the empty pool, is rejected.
2. Running requests first, in arrival order. Each needs ``num_tokens - num_computed`` new
   tokens: 1 for a decode, the rest of its prompt for a prefill, capped by what is left of the
   budget (chunked prefill). A request that sampled a token in the last step needs one more
   slot: one ``append_batch`` gives them all, and when the pool is out of pages the
   latest-arrived running request is preempted (freed, recomputed later: prompt and output so
   far, from the prefix cache when it still holds them) and the append is retried.
3. If nothing was preempted in this step, waiting requests are admitted first come, first
   served, while the budget, ``max_num_seqs`` and the pool allow: ``allocate`` takes the whole
   prompt (the prefix cache finds what it can) and the first chunk is scheduled.
4. The step takes ``StepTimeModel.step_time`` seconds (or ``step_time`` without a model). A
   request whose computed tokens reach its token count samples a token at the step's end: its
   first one is its TTFT; the last one finishes it, and its pages are freed.

Differences from vLLM, on purpose: admission allocates the whole prompt (vLLM allocates each
chunk's pages as it is scheduled), there is no ``long_prefill_token_threshold``, and
preemption is by recompute only.

The step-time model is a roofline: a step reads every weight once and the K/V of every
scheduled token's context, so it takes at least ``bytes / bandwidth``; its matmuls take
``2 * active_params * num_tokens`` FLOPs, so at least ``flops / peak``; the step takes the
larger. Attention FLOPs, kernel efficiency, communication and the host are left out.

Imports numpy and pagedkv; never torch.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import _validate as check
from .errors import InvalidArgument, InvalidType, OutOfPages
from .workload import Workload

#: Seconds per step without a time model (as ``pagedkv.simulate``).
DEFAULT_STEP_TIME = 0.04


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    """Roofline cost of one engine step.

    Attributes:
        weights_bytes: bytes of weights read per step (all of them: a batch of MoE tokens
            touches most experts).
        active_params: parameters used per token (MoE: the active ones), for the FLOPs.
        kv_bytes_per_token: K/V bytes of one token over all layers (``KVCacheSpec.bytes_per_token``).
        bandwidth_bytes_per_s, peak_flops: the GPU's memory bandwidth and dense 16-bit peak.
        name: what it models, for reports.
    """

    weights_bytes: int
    active_params: int
    kv_bytes_per_token: int
    bandwidth_bytes_per_s: float
    peak_flops: float
    name: str = ""

    def __post_init__(self):
        for field in ("weights_bytes", "active_params", "kv_bytes_per_token"):
            check.as_int(field, getattr(self, field), 0, 2**62)
        for field in ("bandwidth_bytes_per_s", "peak_flops"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise InvalidArgument(field, value, "a positive number")

    @classmethod
    def from_presets(cls, model, gpu) -> "StepTimeModel":
        """From a model preset (``pagedkv.spec.model_preset`` name or object) and a GPU preset.

        Raises:
            InvalidArgument: an unknown preset (the message lists the known ones).
        """
        from .spec import GPUPreset, ModelPreset, gpu_preset, model_preset, weights_bytes

        m = model if isinstance(model, ModelPreset) else model_preset(model)
        g = gpu if isinstance(gpu, GPUPreset) else gpu_preset(gpu)
        return cls(weights_bytes(m.num_params, m.weights_dtype), m.num_active_params, m.spec.bytes_per_token,
                   g.bandwidth_bytes_per_s, g.peak_flops, f"{m.name} on {g.name}")

    def step_time(self, num_tokens: int, kv_tokens: int) -> float:
        """Seconds for a step that computes ``num_tokens`` new tokens whose attention reads
        ``kv_tokens`` tokens of K/V in all (each scheduled sequence's length after the step)."""
        memory = (self.weights_bytes + kv_tokens * self.kv_bytes_per_token) / self.bandwidth_bytes_per_s
        compute = 2.0 * self.active_params * num_tokens / self.peak_flops
        return max(memory, compute)


@dataclass(frozen=True, slots=True)
class ServeResult:
    """What ``simulate_v1`` measured.

    Attributes:
        num_requests, completed: requests in the workload / finished. rejected: reason -> count.
        steps: engine steps that ran. preemptions: preemptions in all; preemptions_per_request:
            over the admitted requests. recomputed_tokens: tokens computed again after them.
        prefix_hit_rate, prefill_tokens_saved: as in ``pagedkv.simulate`` (``None`` without
            prefix caching).
        duration_s: simulated time from the first arrival to the last completion.
        ttft_p50_s, ttft_p99_s: time to first token (arrival to the step that sampled it).
        tpot_p50_s, tpot_p99_s: time per output token after the first (requests of 2+ tokens).
        output_tokens_per_s: output tokens / ``duration_s``.
        mean_running, peak_running: running requests per step. peak_pages_used: pages held.
        mean_batch_tokens: tokens per step.
        ttft_s, finish_s: per request (``nan`` if rejected), for routers and tests.
    """

    num_requests: int
    completed: int
    rejected: dict
    steps: int
    preemptions: int
    preemptions_per_request: float
    recomputed_tokens: int
    prefix_hit_rate: float | None
    prefill_tokens_saved: int | None
    duration_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    output_tokens_per_s: float
    mean_running: float
    peak_running: int
    peak_pages_used: int
    mean_batch_tokens: float
    ttft_s: np.ndarray
    finish_s: np.ndarray

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (the per-request arrays left out)."""
        return {k: getattr(self, k) for k in self.__slots__ if k not in ("ttft_s", "finish_s")}


def _percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def simulate_v1(workload: Workload, allocator, *, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
                prefix_caching: bool = False, time_model: StepTimeModel | None = None,
                step_time: float = DEFAULT_STEP_TIME, max_len: int | None = None,
                progress: Callable[[int], None] | None = None) -> ServeResult:
    """Run ``workload`` through a vLLM-v1-like scheduler over ``allocator`` (see the module doc).

    Args:
        workload: the requests (arrival order is priority order).
        allocator: an empty ``BlockManager`` (built with ``enable_prefix_caching`` for
            ``prefix_caching``); it is used up. Request ``i`` is sequence ``i``.
        max_num_batched_tokens: the per-step token budget (vLLM's default 8192).
        max_num_seqs: running requests at most (vLLM's default 256); <= the budget.
        prefix_caching: allocate prompts with their token ids (``Workload.prompt_token_ids``)
            and commit each chunk as it is computed, so later prompts find them.
        time_model: a ``StepTimeModel``; ``None``: every step takes ``step_time`` seconds.
        max_len: longest allowed ``prompt + output`` (``None``: the pool is the limit).
        progress: called now and then with the number of requests finished since the last call.

    Raises:
        InvalidType / InvalidArgument: a bad argument, or an allocator that is not empty.
    """
    if not all(hasattr(allocator, a) for a in ("page_size", "num_pages", "append_batch", "commit")):
        raise InvalidType("allocator", allocator, "a BlockManager")
    if allocator.num_sequences:
        raise InvalidArgument("allocator", allocator, "an allocator holding no sequences")
    if not isinstance(workload, Workload):
        raise InvalidType("workload", workload, "a pagedkv.workload.Workload")
    budget_max = check.count("max_num_batched_tokens", max_num_batched_tokens)
    seqs_max = check.count("max_num_seqs", max_num_seqs)
    if seqs_max > budget_max:
        raise InvalidArgument("max_num_seqs", seqs_max, f"at most max_num_batched_tokens ({budget_max})")
    if not isinstance(prefix_caching, bool):
        raise InvalidType("prefix_caching", prefix_caching, "a bool")
    if prefix_caching and not getattr(allocator, "enable_prefix_caching", False):
        raise InvalidArgument("prefix_caching", True, "False unless the BlockManager has enable_prefix_caching=True")
    if time_model is not None and not isinstance(time_model, StepTimeModel):
        raise InvalidType("time_model", time_model, "a StepTimeModel or None")
    if isinstance(step_time, bool) or not isinstance(step_time, (int, float)) or not 0 < step_time < math.inf:
        raise InvalidArgument("step_time", step_time, "a positive number of seconds")
    max_len = math.inf if max_len is None else check.count("max_len", max_len)

    mgr, ps = allocator, allocator.page_size
    prompts = workload.prompt_lens.tolist()
    outputs = workload.output_lens.tolist()
    arrivals = workload.arrivals.tolist()
    N = len(prompts)
    usable = mgr.num_pages - mgr.watermark_pages

    generated = [0] * N  # output tokens sampled
    computed = [0] * N  # tokens whose K/V is computed (this admission)
    held = [0] * N  # tokens the block manager holds for it
    ttft = np.full(N, np.nan)
    finish = np.full(N, np.nan)
    admitted_once = [False] * N
    running: list[int] = []  # arrival order
    waiting: deque[int] = deque()
    rejected: dict[str, int] = {}
    preemptions = recomputed = hits = queried = saved = 0
    steps = sum_running = sum_tokens = peak_running = peak_pages = 0
    finished_reported = 0
    clock = arrivals[0] if N else 0.0
    i = 0

    def preempt(r: int) -> None:
        nonlocal preemptions, recomputed
        running.remove(r)
        mgr.free(r)
        recomputed += computed[r]
        computed[r] = held[r] = 0
        waiting.appendleft(r)  # NOTE: victims go latest first, so the queue keeps arrival order
        preemptions += 1

    while i < N or running or waiting:
        if not running and not waiting and arrivals[i] > clock:
            clock = arrivals[i]  # idle until the next arrival
        while i < N and arrivals[i] <= clock:
            p, total = prompts[i], prompts[i] + outputs[i]
            reason = "too_long" if total > max_len else "exceeds_pool" if -(-total // ps) > usable else None
            if reason is None:
                waiting.append(i)
            else:
                rejected[reason] = rejected.get(reason, 0) + 1
            i += 1

        # 1. running requests: one slot for each that sampled a token last step, preempting the
        # latest arrival until it fits; then each one's share of the budget.
        preempted = False
        while True:
            growers = [r for r in running if held[r] < prompts[r] + generated[r]]
            if not growers:
                break
            try:
                mgr.append_batch(np.asarray(growers, dtype=np.int64), 1)
                break
            except OutOfPages:
                preempt(running[-1])
                preempted = True
        for r in growers:
            held[r] += 1
        budget = budget_max
        scheduled: list[tuple[int, int]] = []
        for r in running:
            if budget == 0:
                break
            n = min(prompts[r] + generated[r] - computed[r], budget)
            scheduled.append((r, n))
            budget -= n

        # 2. admissions, first come, first served (none in a step that preempted)
        while not preempted and waiting and budget > 0 and len(running) < seqs_max:
            r = waiting[0]
            num_tokens = prompts[r] + generated[r]
            if prefix_caching:
                tokens = workload.prompt_token_ids(r)
                if not mgr.can_allocate(token_ids=tokens):
                    break
                hit = mgr.allocate(r, token_ids=tokens, num_computed_tokens=0).num_cached_tokens
                if generated[r]:
                    mgr.append(r, generated[r])  # NOTE: a recompute: its output so far as well
                saved += hit
                if not admitted_once[r]:
                    hits, queried = hits + hit, queried + prompts[r]
            else:
                if not mgr.can_allocate(num_tokens):
                    break
                mgr.allocate(r, num_tokens)
                hit = 0
            admitted_once[r] = True
            waiting.popleft()
            held[r], computed[r] = num_tokens, hit
            running.append(r)
            n = min(num_tokens - hit, budget)
            scheduled.append((r, n))
            budget -= n

        # 3. the step runs
        num_tokens_step = sum(n for _, n in scheduled)
        if not scheduled:
            if waiting and not running and not preempted:  # NOTE: cannot happen: rejected at arrival
                raise AssertionError(f"request {waiting[0]} does not fit an empty pool")
            continue
        kv = sum(computed[r] + n for r, n in scheduled)
        clock += time_model.step_time(num_tokens_step, kv) if time_model is not None else step_time
        steps += 1
        sum_running += len(running)
        sum_tokens += num_tokens_step
        peak_running = max(peak_running, len(running))
        peak_pages = max(peak_pages, mgr.num_pages - mgr.num_free_pages)
        done = []
        for r, n in scheduled:
            computed[r] += n
            if prefix_caching and computed[r] - n < prompts[r]:
                mgr.commit(r, min(computed[r], prompts[r]))
            if computed[r] == prompts[r] + generated[r]:  # sampled a token at the step's end
                generated[r] += 1
                if generated[r] == 1:
                    ttft[r] = clock - arrivals[r]
                if generated[r] == outputs[r]:
                    done.append(r)
        for r in done:
            running.remove(r)
            mgr.free(r)
            finish[r] = clock
        mgr.end_step()
        if progress is not None and done:
            progress(len(done))
            finished_reported += len(done)

    completed = int(np.count_nonzero(~np.isnan(finish)))
    ok = ~np.isnan(finish)
    multi = ok & (np.asarray(outputs) > 1) if N else ok
    tpot = (finish[multi] - (np.asarray(arrivals)[multi] + ttft[multi])) / (np.asarray(outputs)[multi] - 1)
    duration = float(np.nanmax(finish) - arrivals[0]) if completed else 0.0
    admitted = sum(admitted_once)
    return ServeResult(
        num_requests=N, completed=completed, rejected=dict(rejected), steps=steps, preemptions=preemptions,
        preemptions_per_request=preemptions / admitted if admitted else 0.0, recomputed_tokens=recomputed,
        prefix_hit_rate=(hits / queried if queried else 0.0) if prefix_caching else None,
        prefill_tokens_saved=saved if prefix_caching else None, duration_s=duration,
        ttft_p50_s=_percentile(ttft[ok], 50), ttft_p99_s=_percentile(ttft[ok], 99),
        tpot_p50_s=_percentile(tpot, 50), tpot_p99_s=_percentile(tpot, 99),
        output_tokens_per_s=float(np.asarray(outputs)[ok].sum()) / duration if duration > 0 else 0.0,
        mean_running=sum_running / steps if steps else 0.0, peak_running=peak_running, peak_pages_used=peak_pages,
        mean_batch_tokens=sum_tokens / steps if steps else 0.0, ttft_s=ttft, finish_s=finish,
    )


__all__ = ["simulate_v1", "ServeResult", "StepTimeModel", "DEFAULT_STEP_TIME"]
