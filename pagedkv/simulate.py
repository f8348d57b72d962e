"""Step-by-step continuous-batching simulator over a paged or a static allocator.

The same scheduler drives every allocator under one slot budget ``C``:

1. Arrivals join the waiting queue at ``floor(arrival / step_time)``; a request whose final
   length exceeds ``max_len``, or that cannot fit in the empty pool, is *rejected* (counted
   and listed, never silently dropped).
2. Every running sequence appends one token (``append_batch``). When the allocator runs out,
   the latest-arrived running request is preempted: its sequences are freed and it goes back
   to the head of the queue, to be recomputed later (prompt plus the tokens it had generated).
3. Requests whose sequences reached ``prompt + output`` tokens complete and are freed.
4. Waiting requests are admitted first come, first served, while the allocator accepts them
   (the head of the queue blocks the rest). An admitted request allocates its prompt; with
   ``parallel_samples = n`` it forks ``n`` sequences sharing the prompt's pages (paged) or
   reserves ``n`` regions (static).
5. The step's metrics are recorded (see ``pagedkv.metrics``).

Allocation decisions are the real ``BlockManager`` / ``StaticAllocator`` objects' answers; the
metrics read their occupancy and keep running sums, so a step costs the allocator's batch
append plus O(1) bookkeeping (events are scheduled per request, not scanned per step).

Imports numpy, the allocators and the metrics; never torch or matplotlib.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import _validate as check
from . import metrics
from .errors import InvalidArgument, InvalidType, OutOfPages
from .static import StaticAllocator
from .workload import Workload

#: Seconds per decode step used to turn arrival times into steps (a decode step of a
#: 13B model on one A100 is a few tens of milliseconds).
DEFAULT_STEP_TIME = 0.04


@dataclass(frozen=True, slots=True)
class Timeline:
    """Per-step record (one entry per recorded step), all numpy ``[S]``.

    Attributes:
        step: int64 step index. tokens: int64 ``ΣL`` (shared pages once). allocated: int64
        ``ΣA``. internal: int64 ``Σ max(0, A − F)``. running, waiting: int64 request counts.
    """

    step: np.ndarray
    tokens: np.ndarray
    allocated: np.ndarray
    internal: np.ndarray
    running: np.ndarray
    waiting: np.ndarray


@dataclass(frozen=True, slots=True)
class SimResult:
    """What one simulation measured.

    Attributes:
        allocator: the allocator's repr. kind: ``"paged"`` or ``"static"``. page_size: tokens
            per page (``None`` for static). num_slots: the budget ``C``.
        num_requests, completed: requests in the workload / finished.
        rejected: reason (``"too_long"``, ``"exceeds_pool"``) -> count; rejected_ids: their indices.
        steps: steps in which the engine held work; counted_steps: steps the averages cover;
            basis: ``"saturated"`` (steps with a non-empty waiting queue) or ``"busy"`` (all
            steps holding a request, used when the queue was never non-empty).
        breakdown: ``metrics.Breakdown`` averaged over the counted steps.
        utilisation: ``ΣL / ΣA`` over the counted steps. usage: mean vLLM-style usage.
        tail_waste: ``metrics.TailWaste`` of ``A − F`` at completion, one entry per sequence.
        largest_hole_index: mean over counted steps (static only, else ``None``).
        mean_running, peak_running: running requests per step (recorded steps).
        preemptions: requests preempted; preempted_tokens: tokens dropped by them (recomputed).
        generated_tokens: output tokens appended; throughput: generated tokens per step.
        sharing_saving: ``metrics.sharing_saving`` over counted steps (paged, n > 1), else ``None``.
        prefix_hit_rate: with ``prefix_caching``, prompt tokens found cached at each request's
            first admission / its prompt tokens, token-weighted; else ``None``.
        prefill_tokens_saved: with ``prefix_caching``, tokens found cached over every admission
            (recomputes after a preemption included); else ``None``.
        timeline: per-step record when asked for, else ``None``.
    """

    allocator: str
    kind: str
    page_size: int | None
    num_slots: int
    parallel_samples: int
    num_requests: int
    completed: int
    rejected: dict
    rejected_ids: tuple
    steps: int
    counted_steps: int
    basis: str
    breakdown: metrics.Breakdown
    utilisation: float
    usage: float
    tail_waste: metrics.TailWaste
    largest_hole_index: float | None
    mean_running: float
    peak_running: int
    preemptions: int
    preempted_tokens: int
    generated_tokens: int
    throughput: float
    sharing_saving: float | None
    prefix_hit_rate: float | None = None
    prefill_tokens_saved: int | None = None
    timeline: Timeline | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (the timeline and rejected ids left out)."""
        out = {k: getattr(self, k) for k in self.__slots__ if k not in ("timeline", "rejected_ids")}
        out["breakdown"] = self.breakdown._asdict()
        out["tail_waste"] = self.tail_waste._asdict()
        return out


def simulate(workload: Workload, allocator, *, max_len: int | None = None, num_slots: int | None = None,
             parallel_samples: int = 1, share_prompt: bool = True, step_time: float = DEFAULT_STEP_TIME,
             max_running: int | None = None, record_timeline: bool = False,
             progress: Callable[[int], None] | None = None, prefix_caching: bool = False) -> SimResult:
    """Run ``workload`` through ``allocator`` until every request completed or was rejected.

    Args:
        workload: the requests (``pagedkv.workload``).
        allocator: an empty ``BlockManager`` or ``StaticAllocator``; it is used up.
        max_len: longest allowed ``prompt + output``; longer requests are rejected. ``None``: no
            limit besides the pool.
        num_slots: the budget ``C`` the breakdown divides by; default the allocator's capacity
            (``num_pages * page_size`` or ``num_slots``). Give the common budget when comparing
            page sizes that do not divide it: the remainder counts as external.
        parallel_samples: sequences per request (``n`` of parallel sampling), >= 1.
        share_prompt: paged only; children fork the parent's prompt pages (else each
            allocates its own copy).
        step_time: seconds per step, to place arrivals.
        max_running: cap on running requests (vLLM's ``max_num_seqs``); ``None``: no cap.
        record_timeline: keep the per-step ``Timeline``.
        progress: called now and then with the number of requests finished since the last call.
        prefix_caching: allocate prompts with their token ids (``Workload.prompt_token_ids``:
            equal hash ids are equal content) on a ``BlockManager`` built with
            ``enable_prefix_caching``, so its prefix cache runs with its real eviction; a hit's
            pages are shared, and the breakdown counts a shared page's tokens once. Cached pages
            no sequence holds count as free. Needs ``parallel_samples=1``. A manager with
            ``cpu_prefix_cache`` demotes evicted cached pages to its CPU tier and finds hits
            there too (they count as hits).

    Returns:
        ``SimResult``.

    Raises:
        InvalidType / InvalidArgument: a bad argument, or an allocator that is not empty.
    """
    static = isinstance(allocator, StaticAllocator)
    if not static and not all(hasattr(allocator, a) for a in ("page_size", "num_pages", "fork", "page_table")):
        raise InvalidType("allocator", allocator, "a BlockManager or a StaticAllocator")
    if allocator.num_sequences:
        raise InvalidArgument("allocator", allocator, "an allocator holding no sequences")
    if not isinstance(workload, Workload):
        raise InvalidType("workload", workload, "a pagedkv.workload.Workload")
    n = check.count("parallel_samples", parallel_samples)
    max_len = math.inf if max_len is None else check.count("max_len", max_len)
    max_running = math.inf if max_running is None else check.count("max_running", max_running)
    if isinstance(step_time, bool) or not isinstance(step_time, (int, float)) or not 0 < step_time < math.inf:
        raise InvalidArgument("step_time", step_time, "a positive number of seconds")
    ps = 1 if static else allocator.page_size
    capacity = allocator.num_slots if static else allocator.num_pages * ps
    C = capacity if num_slots is None else check.as_int("num_slots", num_slots, capacity, check.MAX_COUNT)
    sharing = not static and n > 1 and share_prompt
    if not isinstance(prefix_caching, bool):
        raise InvalidType("prefix_caching", prefix_caching, "a bool")
    if prefix_caching and (static or not getattr(allocator, "enable_prefix_caching", False)):
        raise InvalidArgument("prefix_caching", True, "False unless the allocator is a BlockManager built with "
                              "enable_prefix_caching=True")
    if prefix_caching and n > 1:
        raise InvalidArgument("parallel_samples", n, "1 with prefix_caching")
    prefix_hits = prefix_queried = prefix_saved = 0
    offloading = not static and bool(getattr(allocator, "cpu_prefix_cache", False))

    prompts = workload.prompt_lens.tolist()
    finals = workload.final_lens.tolist()
    arrival_steps = np.floor(workload.arrivals / step_time).astype(np.int64).tolist()
    N = len(prompts)

    # per-request state
    resume = [0] * N  # tokens per sequence at the next admission (0: never admitted)
    admitted_at = [0] * N
    start_len = [0] * N
    epoch = [0] * N
    applied_internal = [0] * N
    shared_tokens = [0] * N  # token slots counted twice in ΣL because pages are shared
    saved_slots = [0] * N  # slots the shared pages would take again without sharing

    completions: dict[int, list] = {}
    internal_events: dict[int, list] = {}
    running: list[int] = []  # request ids in arrival order
    waiting: deque[int] = deque()
    fresh: list[int] = []  # sharing groups admitted this step, still sharing a partial page
    rejected: dict[str, int] = {}
    rejected_ids: list[int] = []
    tail_wastes: list[int] = []

    sum_L = sum_internal = sum_shared = sum_saved = 0
    preemptions = preempted_tokens = generated = completed = 0
    steps = 0
    peak_running = 0
    acc_sat = [0] * 7  # steps, tokens, allocated, internal, used, hole index, running
    acc_busy = [0] * 7
    saved_acc = [0, 0]  # saturated, busy
    timeline = [[] for _ in range(6)] if record_timeline else None
    finished_reported = 0

    def seq_ids(r: int) -> range:
        return range(r * n, r * n + n)

    def rejection(r: int) -> str | None:
        p, F = prompts[r], finals[r]
        if F > max_len:
            return "too_long"
        if static:
            if allocator.max_len is not None and F > allocator.max_len:
                return "too_long"
            return None if allocator.max_regions(allocator.reservation(p, F)) >= n else "exceeds_pool"
        full, last = p // ps, -(-F // ps)
        need = full + n * (last - full) if sharing else n * last
        return None if need <= allocator.num_pages - allocator.watermark_pages else "exceeds_pool"

    def admit(r: int, t: int) -> bool:
        nonlocal sum_L, sum_internal, sum_shared, sum_saved, prefix_hits, prefix_queried, prefix_saved
        hit = 0
        p, F = prompts[r], finals[r]
        L0 = resume[r] or p
        ids = seq_ids(r)
        made = []
        try:
            if static:
                for s in ids:
                    allocator.allocate(s, L0, F)
                    made.append(s)
            elif sharing:
                if not allocator.can_allocate(p):
                    return False
                allocator.allocate(ids[0], p)
                made.append(ids[0])
                for s in ids[1:]:
                    allocator.fork(ids[0], s)
                    made.append(s)
                if L0 > p:
                    for s in ids:
                        allocator.append(s, L0 - p)
            elif prefix_caching:
                tokens = workload.prompt_token_ids(r)
                if not allocator.can_allocate(token_ids=tokens):
                    return False
                hit = allocator.allocate(ids[0], token_ids=tokens).num_cached_tokens
                made.append(ids[0])
                if L0 > p:
                    allocator.append(ids[0], L0 - p)
            else:
                if not allocator.can_allocate(L0):
                    return False
                for s in ids:
                    allocator.allocate(s, L0)
                    made.append(s)
        except OutOfPages:
            for s in made:
                allocator.free(s)
            return False
        if prefix_caching:
            prefix_saved += hit
            if not resume[r]:  # its first admission
                prefix_hits += hit
                prefix_queried += p
        epoch[r] += 1
        admitted_at[r], start_len[r] = t, L0
        sum_L += n * L0
        completions.setdefault(t + F - L0, []).append((r, epoch[r]))
        if static:
            waste = n * max(0, allocator.region(ids[0]).size - F)
            if waste:
                applied_internal[r] = waste
                sum_internal += waste
        else:
            # NOTE: a sequence's last page (the one holding token F) is allocated when it
            # reaches (ceil(F / ps) - 1) * ps + 1 tokens; from then on its unfillable tail,
            # ceil(F / ps) * ps - F, is internal fragmentation. One event per request.
            waste = -(-F // ps) * ps - F
            at = t + max(0, (-(-F // ps) - 1) * ps + 1 - L0)
            now = n
            if sharing:
                full = (p // ps) * ps
                is_fresh = L0 == p
                shared_tokens[r] = (n - 1) * (p if is_fresh else full)
                saved_slots[r] = (n - 1) * (-(-p // ps) * ps if is_fresh else full)
                sum_shared += shared_tokens[r]
                sum_saved += saved_slots[r]
                if is_fresh:
                    fresh.append(r)
                    if at == t and waste:
                        # NOTE: the prompt's partial page is already every child's last page but
                        # is shared until their first append copies it (copy-on-write).
                        internal_events.setdefault(t + 1, []).append((r, epoch[r], (n - 1) * waste))
                        now = 1
            if waste and at == t:
                applied_internal[r] = now * waste
                sum_internal += now * waste
            elif waste:
                internal_events.setdefault(at, []).append((r, epoch[r], n * waste))
        return True

    def release(r: int, tokens: int) -> None:
        nonlocal sum_L, sum_internal, sum_shared, sum_saved
        for s in seq_ids(r):
            allocator.free(s)
        sum_L -= n * tokens
        sum_internal -= applied_internal[r]
        sum_shared -= shared_tokens[r]
        sum_saved -= saved_slots[r]
        applied_internal[r] = shared_tokens[r] = saved_slots[r] = 0
        epoch[r] += 1  # cancels its pending events
        if r in fresh:
            fresh.remove(r)

    ids_array = np.zeros(0, dtype=np.int64)
    dirty = True
    t = 0
    i = 0
    appended_through = -1
    blocked_free = None
    while i < N or running or waiting:
        if not running and not waiting and arrival_steps[i] > t:
            t = arrival_steps[i]  # idle: jump to the next arrival
        while i < N and arrival_steps[i] <= t:
            reason = rejection(i)
            if reason is None:
                waiting.append(i)
            else:
                rejected[reason] = rejected.get(reason, 0) + 1
                rejected_ids.append(i)
            i += 1
        worked = bool(running)

        # 1. one new token per running sequence; preempt the latest arrival when out of memory
        while running:
            if dirty:
                ids_array = np.fromiter((s for r in running for s in seq_ids(r)), np.int64, n * len(running))
                dirty = False
            try:
                allocator.append_batch(ids_array, 1)
                break
            except OutOfPages:
                r = running.pop()
                tokens = start_len[r] + appended_through - admitted_at[r]
                release(r, tokens)
                resume[r] = tokens
                waiting.appendleft(r)
                blocked_free = None  # a new head of the queue
                preemptions += 1
                preempted_tokens += n * tokens
                dirty = True
        appended_through = t
        num_seqs = n * len(running)
        sum_L += num_seqs
        generated += num_seqs
        for r in fresh:
            sum_shared -= (n - 1) * (prompts[r] % ps)
            shared_tokens[r] -= (n - 1) * (prompts[r] % ps)
            sum_saved -= (n - 1) * ps if prompts[r] % ps else 0
            saved_slots[r] -= (n - 1) * ps if prompts[r] % ps else 0
        fresh.clear()

        # 2. completions and page-tail events of this step
        for r, e, amount in internal_events.pop(t, ()):
            if e == epoch[r]:
                applied_internal[r] += amount
                sum_internal += amount
        for r, e in completions.pop(t, ()):
            if e != epoch[r]:
                continue
            if static:
                tail = allocator.region(r * n).size - finals[r]
            else:
                tail = len(allocator.page_table(r * n)) * ps - finals[r]
            tail_wastes.extend([tail] * n)
            release(r, finals[r])
            running.remove(r)
            completed += 1
            dirty = True

        # 3. first come, first served admission
        while waiting and len(running) < max_running:
            free_now = allocator.num_free_slots if static else allocator.num_free_pages
            if blocked_free is not None and free_now <= blocked_free:
                break
            r = waiting[0]
            if not admit(r, t):
                blocked_free = free_now
                break
            blocked_free = None
            waiting.popleft()
            running.append(r)
            dirty = worked = True

        # 4. the step's copies run (a BlockManager keeps their pages pinned until then), then record
        if not static:
            if offloading:
                allocator.take_offload()  # NOTE: no bytes to move here; the moves only count as hits
            allocator.end_step()
        if worked:
            steps += 1
        if running or waiting:
            if static:
                allocated, used = allocator.num_reserved_slots, capacity - allocator.num_free_slots
                hole_index = metrics.largest_hole_index(allocator.largest_hole, allocator.num_free_slots)
            else:
                used = allocated = (allocator.num_pages - allocator.num_free_pages) * ps
                hole_index = 0.0
            tokens = sum_L - sum_shared
            if prefix_caching:
                # NOTE: a prefix hit shares full pages only: each page-table entry beyond the
                # distinct pages in use is a page of ps tokens counted twice in sum_L.
                entries = sum(-(-(start_len[r] + t - admitted_at[r]) // ps) for r in running)
                tokens -= (entries - allocated // ps) * ps
            row = (1, tokens, allocated, sum_internal, used, hole_index, len(running))
            for acc in (acc_sat, acc_busy) if waiting else (acc_busy,):
                for k in range(7):
                    acc[k] += row[k]
            saved_acc[1] += sum_saved
            if waiting:
                saved_acc[0] += sum_saved
            peak_running = max(peak_running, len(running))
            if timeline is not None:
                for col, v in zip(timeline, (t, tokens, allocated, sum_internal, len(running), len(waiting))):
                    col.append(v)
        if progress is not None and ((t & 255) == 0 or not (i < N or running or waiting)):
            finished = completed + len(rejected_ids)
            if finished > finished_reported:
                progress(finished - finished_reported)
                finished_reported = finished
        t += 1

    basis, acc, saved = ("saturated", acc_sat, saved_acc[0]) if acc_sat[0] else ("busy", acc_busy, saved_acc[1])
    counted = acc[0]
    if counted:
        bd = metrics.breakdown(acc[1], acc[2], acc[3], C * counted)
        util = metrics.utilisation(acc[1], acc[2])
        use = metrics.usage(acc[4], capacity * counted)
        hole = acc[5] / counted if static else None
        mean_running = acc_busy[6] / acc_busy[0]
    else:
        bd, util, use, hole, mean_running = metrics.Breakdown(0.0, 0.0, 0.0, 1.0), 1.0, 0.0, None, 0.0
    return SimResult(
        allocator=repr(allocator), kind="static" if static else "paged", page_size=None if static else ps,
        num_slots=C, parallel_samples=n, num_requests=N, completed=completed, rejected=dict(rejected),
        rejected_ids=tuple(rejected_ids), steps=steps, counted_steps=counted, basis=basis, breakdown=bd,
        utilisation=util, usage=use, tail_waste=metrics.tail_waste(tail_wastes), largest_hole_index=hole,
        mean_running=mean_running, peak_running=peak_running, preemptions=preemptions,
        preempted_tokens=preempted_tokens, generated_tokens=generated,
        throughput=generated / steps if steps else 0.0,
        sharing_saving=metrics.sharing_saving(saved, acc[4] if counted else 0) if sharing else None,
        prefix_hit_rate=(prefix_hits / prefix_queried if prefix_queried else 0.0) if prefix_caching else None,
        prefill_tokens_saved=prefix_saved if prefix_caching else None,
        timeline=None if timeline is None else Timeline(*(np.asarray(c, dtype=np.int64) for c in timeline)),
    )


__all__ = ["simulate", "SimResult", "Timeline", "DEFAULT_STEP_TIME"]
