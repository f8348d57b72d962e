"""A vLLM-v1-like token-budget scheduler over the real ``BlockManager``, and a roofline step-time model.

``simulate_v1`` runs a workload the way vLLM's v1 scheduler does, with one token budget per
step (``max_num_batched_tokens``) shared by decodes and prefill chunks:

1. Arrivals join the waiting queue when the clock passes their arrival time. A request whose
   ``prompt + output`` exceeds ``max_len``, or whose pages exceed the empty pool, is rejected.
2. Running requests first, in arrival order. Each needs ``num_tokens - num_computed`` new
   tokens: 1 for a decode, the rest of its prompt for a prefill, capped by what is left of the
   budget (chunked prefill). A request that sampled a token in the last step needs one more
   slot: one ``append_batch`` gives them all, and when the pool is out of pages the
   latest-arrived running request is preempted and the append is retried. ``preemption=
   "recompute"`` frees it (recomputed later: prompt and output so far, from the prefix cache
   when it still holds them); ``"swap"`` moves its pages to the block manager's CPU tier when
   they fit there (else recompute), and swapped requests resume, oldest first, before any
   waiting request is admitted.
3. If nothing was preempted in this step, waiting requests are admitted first come, first
   served, while the budget, ``max_num_seqs`` and the pool allow: ``allocate`` takes the whole
   prompt (the prefix cache finds what it can) and the first chunk is scheduled.
4. The step takes ``StepTimeModel.step_time`` seconds (or ``step_time`` without a model). A
   request whose computed tokens reach its token count samples a token at the step's end: its
   first one is its TTFT; the last one finishes it, and its pages are freed.

Differences from vLLM, on purpose: admission allocates the whole prompt (vLLM allocates each
chunk's pages as it is scheduled) and there is no ``long_prefill_token_threshold``. vLLM v1
preempts by recompute only; ``"swap"`` is vLLM v0's other mode.

The step-time model is a roofline: a step reads every weight once and the K/V of every
scheduled token's context, so it takes at least ``bytes / bandwidth``; its matmuls take
``2 * active_params * num_tokens`` FLOPs, so at least ``flops / peak``; the step takes the
larger. A step that swaps pages adds their bytes over ``host_bytes_per_s`` (PCIe). Attention
FLOPs, kernel efficiency, communication and the host are left out.

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
        host_bytes_per_s: host link bandwidth for swaps (default 32 GB/s: PCIe 4.0 x16, one
            direction, theoretical).
        attn_flops_per_pair: attention FLOPs of one (query token, key token) pair over all
            layers: ``4 x layers x query heads x head_dim`` (QK^T and PV, a multiply-add each);
            0 leaves attention out of the compute bound.
    """

    weights_bytes: int
    active_params: int
    kv_bytes_per_token: int
    bandwidth_bytes_per_s: float
    peak_flops: float
    name: str = ""
    host_bytes_per_s: float = 32e9
    attn_flops_per_pair: int = 0

    def __post_init__(self):
        for field in ("weights_bytes", "active_params", "kv_bytes_per_token", "attn_flops_per_pair"):
            check.as_int(field, getattr(self, field), 0, 2**62)
        for field in ("bandwidth_bytes_per_s", "peak_flops", "host_bytes_per_s"):
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
        spec = m.spec
        # NOTE: every layer counted as full attention: an upper bound for hybrid models
        pair = 4 * spec.num_layers * (spec.num_q_heads or spec.num_kv_heads) * spec.head_dim
        return cls(weights_bytes(m.num_params, m.weights_dtype), m.num_active_params, spec.bytes_per_token,
                   g.bandwidth_bytes_per_s, g.peak_flops, f"{m.name} on {g.name}", attn_flops_per_pair=pair)

    def step_time(self, num_tokens: int, kv_tokens: int, attention_pairs: int = 0) -> float:
        """Seconds for a step that computes ``num_tokens`` new tokens whose attention reads
        ``kv_tokens`` tokens of K/V in all (each scheduled sequence's length after the step),
        and scores ``attention_pairs`` (query, key) pairs (``attention_pairs(...)``)."""
        memory = (self.weights_bytes + kv_tokens * self.kv_bytes_per_token) / self.bandwidth_bytes_per_s
        compute = (2.0 * self.active_params * num_tokens + self.attn_flops_per_pair * attention_pairs) / self.peak_flops
        return max(memory, compute)

    @staticmethod
    def attention_pairs(computed: int, num_tokens: int) -> int:
        """Causal (query, key) pairs of ``num_tokens`` new tokens after ``computed`` cached ones:
        the token at position ``p`` scores ``p + 1`` keys."""
        return num_tokens * computed + num_tokens * (num_tokens + 1) // 2

    def swap_time(self, num_tokens: int) -> float:
        """Seconds to move ``num_tokens`` tokens of K/V over the host link."""
        return num_tokens * self.kv_bytes_per_token / self.host_bytes_per_s


@dataclass(frozen=True, slots=True)
class ServeResult:
    """What ``simulate_v1`` measured.

    Attributes:
        num_requests, completed: requests in the workload / finished. rejected: reason -> count.
        steps: engine steps that ran. preemptions: preemptions in all; preemptions_per_request:
            over the admitted requests. recomputed_tokens: tokens computed again after them.
        swap_outs: preemptions that swapped to the CPU tier (``preemption="swap"``).
        prefix_hit_rate, prefill_tokens_saved: as in ``pagedkv.simulate`` (``None`` without
            prefix caching).
        duration_s: simulated time from the first arrival to the last completion.
        ttft_p50_s, ttft_p99_s: time to first token (arrival to the step that sampled it).
        tpot_p50_s, tpot_p99_s: time per output token after the first (requests of 2+ tokens).
        output_tokens_per_s: output tokens / ``duration_s``.
        mean_running, peak_running: running requests per step. peak_pages_used: pages held.
        group_pages_mean, group_pages_peak: with a ``HybridBlockManager``, the pages each KV cache
            group holds, sampled every 8th step (``None`` otherwise).
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
    swap_outs: int
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
    group_pages_mean: list | None
    group_pages_peak: list | None
    mean_batch_tokens: float
    ttft_s: np.ndarray
    finish_s: np.ndarray

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (the per-request arrays left out)."""
        return {k: getattr(self, k) for k in self.__slots__ if k not in ("ttft_s", "finish_s")}


def _percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def _check_options(allocator, workload, max_num_batched_tokens, max_num_seqs, prefix_caching, time_model, step_time,
                   max_len, preemption="recompute"):
    if not all(hasattr(allocator, a) for a in ("page_size", "num_pages", "append_batch", "commit")):
        raise InvalidType("allocator", allocator, "a BlockManager")
    if allocator.num_sequences:
        raise InvalidArgument("allocator", allocator, "an allocator holding no sequences")
    if not isinstance(workload, Workload):
        raise InvalidType("workload", workload, "a pagedkv.workload.Workload")
    budget = check.count("max_num_batched_tokens", max_num_batched_tokens)
    seqs = check.count("max_num_seqs", max_num_seqs)
    if seqs > budget:
        raise InvalidArgument("max_num_seqs", seqs, f"at most max_num_batched_tokens ({budget})")
    if not isinstance(prefix_caching, bool):
        raise InvalidType("prefix_caching", prefix_caching, "a bool")
    if prefix_caching and not getattr(allocator, "enable_prefix_caching", False):
        raise InvalidArgument("prefix_caching", True, "False unless the BlockManager has enable_prefix_caching=True")
    if time_model is not None and not isinstance(time_model, StepTimeModel):
        raise InvalidType("time_model", time_model, "a StepTimeModel or None")
    if isinstance(step_time, bool) or not isinstance(step_time, (int, float)) or not 0 < step_time < math.inf:
        raise InvalidArgument("step_time", step_time, "a positive number of seconds")
    if preemption not in ("recompute", "swap"):
        raise InvalidArgument("preemption", preemption, "'recompute' or 'swap'")
    if preemption == "swap" and not getattr(allocator, "num_cpu_pages", 0):
        raise InvalidArgument("preemption", preemption, "'recompute' unless the BlockManager has num_cpu_pages > 0")
    return budget, seqs, math.inf if max_len is None else check.count("max_len", max_len)


class _Replica:
    """One engine under the v1 policy: its block manager, queues and clock (see the module doc)."""

    def __init__(self, work: Workload, mgr, budget: int, max_seqs: int, prefix_caching: bool, time_model, step_time,
                 state: dict, preemption: str = "recompute"):
        self.work, self.mgr, self.budget, self.max_seqs = work, mgr, budget, max_seqs
        self.prefix_caching, self.time_model, self.fixed_step = prefix_caching, time_model, step_time
        self.prompts, self.outputs, self.arrivals = state["prompts"], state["outputs"], state["arrivals"]
        self.generated, self.computed, self.held = state["generated"], state["computed"], state["held"]
        self.ttft, self.finish, self.admitted_once = state["ttft"], state["finish"], state["admitted_once"]
        self.running: list[int] = []  # arrival order
        self.waiting: deque[int] = deque()
        self.swapped: list[int] = []  # arrival order
        self.swap = preemption == "swap"
        self.offloading = bool(getattr(mgr, "cpu_prefix_cache", False))
        self.swapped_tokens = 0  # this step's tokens moved over the host link
        self.swap_outs = 0
        self.clock = 0.0
        self.waiting_blocks = 0  # pages the waiting prompts will need (a router's load signal)
        self.preemptions = self.recomputed = self.hits = self.queried = self.saved = 0
        self.steps = self.sum_running = self.sum_tokens = self.peak_running = self.peak_pages = 0
        self.tokens_computed = self.num_requests = 0
        # NOTE: per-group memory of a hybrid pool, sampled (group_pages walks the page tables)
        self.track_groups = getattr(mgr, "num_groups", 1) > 1
        self.group_samples = 0
        self.group_sum = self.group_peak = None

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting or self.swapped)

    @property
    def active_blocks(self) -> int:
        """Pages in use plus pages the queued prompts will take."""
        return self.mgr.num_pages - self.mgr.num_free_pages + self.waiting_blocks

    def enqueue(self, r: int) -> None:
        if not self.busy:
            self.clock = max(self.clock, self.arrivals[r])
        self.waiting.append(r)
        self.waiting_blocks += -(-self.prompts[r] // self.mgr.page_size)
        self.num_requests += 1

    def _preempt(self, r: int) -> None:
        self.running.remove(r)
        self.preemptions += 1
        if self.swap and self.mgr.can_swap_out([r]):
            self.mgr.swap_out([r])
            self.swapped.append(r)
            self.swapped.sort()
            self.swapped_tokens += self.held[r]
            self.swap_outs += 1
            return
        self.mgr.free(r)
        self.recomputed += self.computed[r]
        self.computed[r] = self.held[r] = 0
        self.waiting.appendleft(r)  # NOTE: victims go latest first, so the queue keeps arrival order
        self.waiting_blocks += -(-self.prompts[r] // self.mgr.page_size)

    def step(self) -> list[int]:
        """One step at this replica's clock; returns the requests it finished."""
        mgr, prompts, generated, computed, held = self.mgr, self.prompts, self.generated, self.computed, self.held
        running, waiting = self.running, self.waiting
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
                self._preempt(running[-1])
                preempted = True
        for r in growers:
            held[r] += 1
        budget = self.budget
        scheduled: list[tuple[int, int]] = []
        for r in running:
            if budget == 0:
                break
            n = min(prompts[r] + generated[r] - computed[r], budget)
            scheduled.append((r, n))
            budget -= n

        # 2. swapped requests resume, oldest first, then admissions, first come, first served
        # (none in a step that preempted; none while a request is swapped out)
        while not preempted and self.swapped and budget > 0 and len(running) < self.max_seqs:
            r = self.swapped[0]
            if not mgr.can_swap_in([r]):
                break
            mgr.swap_in([r])
            self.swapped.pop(0)
            self.swapped_tokens += held[r]
            running.append(r)  # NOTE: it grows and computes from the next step
        while not preempted and not self.swapped and waiting and budget > 0 and len(running) < self.max_seqs:
            r = waiting[0]
            num_tokens = prompts[r] + generated[r]
            if self.prefix_caching:
                tokens = self.work.prompt_token_ids(r)
                if not mgr.can_allocate(token_ids=tokens):
                    break
                hit = mgr.allocate(r, token_ids=tokens, num_computed_tokens=0).num_cached_tokens
                if generated[r]:
                    try:
                        mgr.append(r, generated[r])  # NOTE: a recompute: its output so far as well
                    except OutOfPages:
                        mgr.free(r)  # the prompt fit, its output does not: wait, as can_allocate would
                        break
                self.saved += hit
                if not self.admitted_once[r]:
                    self.hits, self.queried = self.hits + hit, self.queried + prompts[r]
            else:
                if not mgr.can_allocate(num_tokens):
                    break
                mgr.allocate(r, num_tokens)
                hit = 0
            self.admitted_once[r] = True
            waiting.popleft()
            self.waiting_blocks -= -(-prompts[r] // mgr.page_size)
            held[r], computed[r] = num_tokens, hit
            running.append(r)
            n = min(num_tokens - hit, budget)
            scheduled.append((r, n))
            budget -= n

        # 3. the step runs
        if not scheduled:
            if (waiting or self.swapped) and not running and not preempted:  # NOTE: rejected at arrival instead
                raise AssertionError(f"request {(self.swapped or waiting)[0]} does not fit an empty pool")
            mgr.end_step()
            return []
        num_tokens_step = sum(n for _, n in scheduled)
        kv = sum(computed[r] + n for r, n in scheduled)
        if self.time_model is not None:
            model = self.time_model
            pairs = sum(model.attention_pairs(computed[r], n) for r, n in scheduled) if model.attn_flops_per_pair else 0
            self.clock += model.step_time(num_tokens_step, kv, pairs) + model.swap_time(self.swapped_tokens)
        else:
            self.clock += self.fixed_step
        self.swapped_tokens = 0
        self.steps += 1
        self.sum_running += len(running)
        self.sum_tokens += num_tokens_step
        self.tokens_computed += num_tokens_step
        self.peak_running = max(self.peak_running, len(running))
        self.peak_pages = max(self.peak_pages, mgr.num_pages - mgr.num_free_pages)
        if self.track_groups and self.steps % 8 == 1:
            held = mgr.group_pages()
            if self.group_sum is None:
                self.group_sum, self.group_peak = [0] * len(held), [0] * len(held)
            self.group_samples += 1
            self.group_sum = [a + b for a, b in zip(self.group_sum, held)]
            self.group_peak = [max(a, b) for a, b in zip(self.group_peak, held)]
        done = []
        for r, n in scheduled:
            computed[r] += n
            if self.prefix_caching and computed[r] - n < prompts[r]:
                mgr.commit(r, min(computed[r], prompts[r]))
            if computed[r] == prompts[r] + generated[r]:  # sampled a token at the step's end
                generated[r] += 1
                if generated[r] == 1:
                    self.ttft[r] = self.clock - self.arrivals[r]
                if generated[r] == self.outputs[r]:
                    done.append(r)
        for r in done:
            running.remove(r)
            mgr.free(r)
            self.finish[r] = self.clock
        if self.offloading:
            mgr.take_offload()  # NOTE: the prefix cache's CPU-tier moves carry no bytes here
        mgr.end_step()
        return done


ROUTERS = ("round_robin", "least_loaded", "prefix_aware")


def _run(work: Workload, replicas: list[_Replica], state: dict, max_len, route, progress, after_step) -> dict:
    """Arrivals (rejected or routed to a replica) and steps, in time order, until all is done."""
    prompts, outputs, arrivals = state["prompts"], state["outputs"], state["arrivals"]
    N, i = len(prompts), 0
    usable = min(r.mgr.num_pages - r.mgr.watermark_pages for r in replicas)
    ps = replicas[0].mgr.page_size
    rejected: dict[str, int] = {}
    while True:
        busy = [rep for rep in replicas if rep.busy]
        first = min(busy, key=lambda rep: rep.clock) if busy else None
        if i < N and (first is None or arrivals[i] <= first.clock):
            total = prompts[i] + outputs[i]
            # NOTE: a hybrid pool allocates a whole prompt in every group at admission
            pages = replicas[0].mgr.pages_for(total) if hasattr(replicas[0].mgr, "pages_for") else -(-total // ps)
            reason = "too_long" if total > max_len else "exceeds_pool" if pages > usable else None
            if reason is None:
                replicas[route(i)].enqueue(i)
            else:
                rejected[reason] = rejected.get(reason, 0) + 1
            i += 1
            continue
        if first is None:
            return rejected
        done = first.step()
        after_step(first)
        if progress is not None and done:
            progress(len(done))


def _result(work: Workload, replicas: list[_Replica], state: dict, rejected: dict, prefix_caching: bool) -> ServeResult:
    prompts, outputs, arrivals = state["prompts"], np.asarray(state["outputs"]), np.asarray(state["arrivals"])
    ttft, finish = state["ttft"], state["finish"]
    N = len(prompts)
    total = {k: sum(getattr(rep, k) for rep in replicas)
             for k in ("preemptions", "recomputed", "hits", "queried", "saved", "steps", "sum_running", "sum_tokens",
                       "swap_outs")}
    ok = ~np.isnan(finish)
    completed = int(np.count_nonzero(ok))
    multi = ok & (outputs > 1) if N else ok
    tpot = (finish[multi] - (arrivals[multi] + ttft[multi])) / (outputs[multi] - 1)
    duration = float(np.nanmax(finish) - arrivals[0]) if completed else 0.0
    admitted = sum(state["admitted_once"])
    steps = total["steps"]
    return ServeResult(
        num_requests=N, completed=completed, rejected=dict(rejected), steps=steps, preemptions=total["preemptions"],
        preemptions_per_request=total["preemptions"] / admitted if admitted else 0.0,
        recomputed_tokens=total["recomputed"], swap_outs=total["swap_outs"],
        prefix_hit_rate=(total["hits"] / total["queried"] if total["queried"] else 0.0) if prefix_caching else None,
        prefill_tokens_saved=total["saved"] if prefix_caching else None, duration_s=duration,
        ttft_p50_s=_percentile(ttft[ok], 50), ttft_p99_s=_percentile(ttft[ok], 99),
        tpot_p50_s=_percentile(tpot, 50), tpot_p99_s=_percentile(tpot, 99),
        output_tokens_per_s=float(outputs[ok].sum()) / duration if duration > 0 else 0.0,
        mean_running=total["sum_running"] / steps if steps else 0.0,
        peak_running=max(rep.peak_running for rep in replicas), peak_pages_used=max(rep.peak_pages for rep in replicas),
        mean_batch_tokens=total["sum_tokens"] / steps if steps else 0.0, ttft_s=ttft, finish_s=finish,
        **_group_memory(replicas),
    )


def _group_memory(replicas) -> dict:
    """Per-group pages of the hybrid pools (the first replica's sampling, mean and peak)."""
    rep = replicas[0]
    if not rep.track_groups or not rep.group_samples:
        return {"group_pages_mean": None, "group_pages_peak": None}
    return {"group_pages_mean": [s / rep.group_samples for s in rep.group_sum], "group_pages_peak": rep.group_peak}


def _state(work: Workload) -> dict:
    N = len(work)
    return {"prompts": work.prompt_lens.tolist(), "outputs": work.output_lens.tolist(),
            "arrivals": work.arrivals.tolist(), "generated": [0] * N, "computed": [0] * N, "held": [0] * N,
            "ttft": np.full(N, np.nan), "finish": np.full(N, np.nan), "admitted_once": [False] * N}


def simulate_v1(workload: Workload, allocator, *, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
                prefix_caching: bool = False, time_model: StepTimeModel | None = None,
                step_time: float = DEFAULT_STEP_TIME, max_len: int | None = None,
                progress: Callable[[int], None] | None = None, preemption: str = "recompute") -> ServeResult:
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
        preemption: ``"recompute"`` or ``"swap"`` (needs a BlockManager with ``num_cpu_pages``).

    Raises:
        InvalidType / InvalidArgument: a bad argument, or an allocator that is not empty.
    """
    budget, seqs, max_len = _check_options(allocator, workload, max_num_batched_tokens, max_num_seqs, prefix_caching,
                                           time_model, step_time, max_len, preemption)
    state = _state(workload)
    replica = _Replica(workload, allocator, budget, seqs, prefix_caching, time_model, step_time, state, preemption)
    if len(workload):
        replica.clock = state["arrivals"][0]
    rejected = _run(workload, [replica], state, max_len, lambda r: 0, progress, lambda rep: None)
    return _result(workload, [replica], state, rejected, prefix_caching)


@dataclass(frozen=True, slots=True)
class FleetResult:
    """What ``simulate_replicas`` measured.

    Attributes:
        router: its name. result: the whole fleet's ``ServeResult`` (hit rate over all prompts).
        requests: requests routed to each replica. tokens: tokens each computed (prefill + decode).
        imbalance: ``max(tokens) / mean(tokens)`` (1.0 is perfectly even).
        hit_rates: each replica's prefix hit rate (``None`` without prefix caching).
    """

    router: str
    result: ServeResult
    requests: tuple
    tokens: tuple
    imbalance: float
    hit_rates: tuple | None

    def to_dict(self) -> dict:
        return {"router": self.router, **self.result.to_dict(), "requests_per_replica": list(self.requests),
                "tokens_per_replica": list(self.tokens), "imbalance": self.imbalance,
                "hit_rate_per_replica": None if self.hit_rates is None else list(self.hit_rates)}


def simulate_replicas(workload: Workload, make_allocator: Callable[[], object], num_replicas: int,
                      router: str = "prefix_aware", *, overlap_weight: float = 1.0, **options) -> FleetResult:
    """Several v1 replicas behind a router, each with its own ``BlockManager``.

    Routers, deciding at each request's arrival:

    - ``round_robin``: replica ``i mod N``.
    - ``least_loaded``: the fewest requests running or waiting (ties: the lowest index).
    - ``prefix_aware``: the lowest ``overlap_weight * prefill_blocks + decode_blocks``, the cost
      NVIDIA Dynamo's KV router documents: ``prefill_blocks`` are the prompt's blocks the
      replica does not hold as a cached prefix, ``decode_blocks`` the blocks it has active
      (pages in use, plus the queued prompts' pages). The router knows each replica's cache
      only from that replica's KV events (``take_events`` after each step, applied to a
      ``pagedkv.events.PrefixIndex``), never by reading the managers.

    Args:
        make_allocator: returns an empty ``BlockManager`` per replica (with prefix caching for
            ``prefix_aware``: ``enable_prefix_caching=True, enable_kv_events=True``).
        num_replicas: >= 1. router: one of ``ROUTERS``. overlap_weight: > 0 (Dynamo's default 1).
        options: as ``simulate_v1`` (``prefix_caching``, ``time_model``, ...).
    """
    n = check.count("num_replicas", num_replicas)
    if router not in ROUTERS:
        raise InvalidArgument("router", router, f"one of {', '.join(ROUTERS)}")
    if isinstance(overlap_weight, bool) or not isinstance(overlap_weight, (int, float)) or not 0 < overlap_weight < math.inf:
        raise InvalidArgument("overlap_weight", overlap_weight, "a positive number")
    allocators = [make_allocator() for _ in range(n)]
    keys = ("max_num_batched_tokens", "max_num_seqs", "prefix_caching", "time_model", "step_time", "max_len",
            "preemption")
    unknown = set(options) - set(keys) - {"progress"}
    if unknown:
        raise InvalidArgument("options", sorted(unknown)[0], f"one of {', '.join(keys)}, progress")
    defaults = dict(max_num_batched_tokens=8192, max_num_seqs=256, prefix_caching=False, time_model=None,
                    step_time=DEFAULT_STEP_TIME, max_len=None, preemption="recompute")
    opts = {**defaults, **{k: v for k, v in options.items() if k != "progress"}}
    for alloc in allocators:
        budget, seqs, max_len = _check_options(alloc, workload, *(opts[k] for k in keys))
    prefix = opts["prefix_caching"]
    if router == "prefix_aware":
        if not prefix or not all(getattr(a, "enable_kv_events", False) for a in allocators):
            raise InvalidArgument("router", router, "round_robin or least_loaded unless prefix_caching=True and "
                                  "every BlockManager has enable_kv_events=True (the router reads KV events)")
        from .events import PrefixIndex

        index = PrefixIndex(allocators[0].page_size, allocators[0].prefix_hash)
    state = _state(workload)
    replicas = [_Replica(workload, a, budget, seqs, prefix, opts["time_model"], opts["step_time"], state,
                         opts["preemption"]) for a in allocators]
    if len(workload):
        for rep in replicas:
            rep.clock = state["arrivals"][0]
    ps = allocators[0].page_size

    def route(r: int) -> int:
        if router == "round_robin":
            return r % n
        if router == "least_loaded":
            return min(range(n), key=lambda k: (len(replicas[k].running) + len(replicas[k].waiting), k))
        cached = index.match(workload.prompt_token_ids(r))
        blocks = -(-state["prompts"][r] // ps)
        return min(range(n), key=lambda k: (overlap_weight * (blocks - cached.get(k, 0) // ps)
                                            + replicas[k].active_blocks, k))

    def after_step(rep: _Replica) -> None:
        if router == "prefix_aware":
            index.apply(replicas.index(rep), rep.mgr.take_events())
        elif getattr(rep.mgr, "enable_kv_events", False):
            rep.mgr.take_events()  # NOTE: nobody reads them; do not let them pile up

    rejected = _run(workload, replicas, state, max_len, route, options.get("progress"), after_step)
    result = _result(workload, replicas, state, rejected, prefix)
    tokens = tuple(rep.tokens_computed for rep in replicas)
    mean = sum(tokens) / n
    return FleetResult(router, result, tuple(rep.num_requests for rep in replicas), tokens,
                       max(tokens) / mean if mean else 1.0,
                       tuple(rep.hits / rep.queried if rep.queried else 0.0 for rep in replicas) if prefix else None)


__all__ = ["simulate_v1", "simulate_replicas", "ServeResult", "FleetResult", "StepTimeModel", "ROUTERS", "DEFAULT_STEP_TIME"]
