"""Fragmentation and utilisation metrics of a KV-cache pool, each defined once, here.

Notation, for a pool of ``C`` token slots and the live requests at one simulator step:
``L`` tokens a request stores now, ``F`` its final length (prompt + output), ``A`` the slots
allocated to it (its pages times the page size, or its static region). Averages over steps are
taken over the steps the simulator counts (see ``pagedkv.simulate``); because ``C`` is fixed, the
mean of a per-step fraction is the sum of its numerator over steps divided by ``C * steps``,
which is what the ``*_slots`` arguments below are: per-step sums, or sums over many steps.

Pure functions of numbers and numpy arrays; imports numpy only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import InvalidArgument


class Breakdown(NamedTuple):
    """Where the pool's slots go: the four parts of the vLLM paper's Figure 2 (fractions of C).

    Attributes:
        token_states: ``ΣL / C``: slots holding KV of live tokens.
        reserved: ``Σ(min(A, F) − L) / C``: allocated slots that the request will still fill.
        internal: ``Σ max(0, A − F) / C``: allocated slots the request will never fill.
        external: ``(C − ΣA) / C``: slots allocated to nobody (holes too small or unused,
            buddy round-up, the page-size remainder of ``C``); "external fragmentation & others".

    The four add up to 1.
    """

    token_states: float
    reserved: float
    internal: float
    external: float

    def as_percent(self) -> dict:
        return {k: 100.0 * v for k, v in self._asdict().items()}


class TailWaste(NamedTuple):
    """Slots a request held but never filled, measured when it completes (``A − F``), in tokens."""

    mean: float
    p50: float
    p99: float
    count: int


def breakdown(token_slots: float, allocated_slots: float, internal_slots: float,
              total_slots: float) -> Breakdown:
    """The Figure-2 breakdown from sums.

    Args:
        token_slots: ``ΣL`` (slots holding live tokens; shared pages counted once).
        allocated_slots: ``ΣA``.
        internal_slots: ``Σ max(0, A − F)``.
        total_slots: ``C`` (times the number of steps when the other sums run over steps).

    Returns:
        ``Breakdown``; ``reserved = (ΣA − ΣL − internal) / C``, which equals
        ``Σ(min(A, F) − L) / C`` because ``A − L = (min(A, F) − L) + max(0, A − F)`` per request.

    Raises:
        InvalidArgument: ``total_slots <= 0`` or sums that contradict each other.
    """
    if not total_slots > 0:
        raise InvalidArgument("total_slots", total_slots, "a positive number of slots")
    if not 0 <= token_slots + internal_slots <= allocated_slots <= total_slots:
        raise InvalidArgument(
            "allocated_slots", allocated_slots,
            f"between token_slots + internal_slots ({token_slots} + {internal_slots}) and total_slots ({total_slots})",
        )
    reserved = allocated_slots - token_slots - internal_slots
    return Breakdown(token_slots / total_slots, reserved / total_slots,
                     internal_slots / total_slots, (total_slots - allocated_slots) / total_slots)


def request_breakdown(num_tokens, allocated, final, num_slots: int) -> Breakdown:
    """The breakdown of one step, from per-request arrays (the definition, written out).

    Args:
        num_tokens: ``L`` per request, ints ``[R]``.
        allocated: ``A`` per request, ints ``[R]``, each ``>= L``.
        final: ``F`` per request, ints ``[R]``, each ``>= L``.
        num_slots: ``C``.

    Returns:
        ``Breakdown(ΣL/C, Σ(min(A,F) − L)/C, Σmax(0, A − F)/C, (C − ΣA)/C)``.
    """
    L, A, F = (np.asarray(x, dtype=np.int64) for x in (num_tokens, allocated, final))
    if L.shape != A.shape or L.shape != F.shape or L.ndim != 1:
        raise InvalidArgument("allocated", f"shapes {L.shape}, {A.shape}, {F.shape}", "three 1-D arrays of one length")
    for name, arr in (("allocated", A), ("final", F)):
        if np.any(arr < L):
            i = int(np.argmax(arr < L))
            raise InvalidArgument(f"{name}[{i}]", int(arr[i]), f"at least num_tokens[{i}] = {int(L[i])}")
    return breakdown(int(L.sum()), int(A.sum()), int(np.maximum(A - F, 0).sum()), num_slots)


def utilisation(token_slots: float, allocated_slots: float) -> float:
    """``ΣL / ΣA``: the fraction of allocated slots that hold live tokens (1.0 when ΣA = 0)."""
    return token_slots / allocated_slots if allocated_slots else 1.0


def usage(used_slots: float, pool_slots: float) -> float:
    """vLLM's KV-cache usage: ``1 − free / pool``, i.e. ``used / pool`` of the allocator's own pool.

    For a paged pool, ``pool = num_pages * page_size`` and ``used`` counts whole pages; for a
    static one, ``used`` counts whole blocks (buddy round-up included).
    """
    return used_slots / pool_slots


def largest_hole_index(largest_hole: int, free_slots: int) -> float:
    """``1 − largest free hole / total free slots`` (0 when nothing is free).

    0 means all free space is one hole; near 1 means it is shattered into small pieces. Defined
    for contiguous allocation only (any free page serves any request).
    """
    return 1.0 - largest_hole / free_slots if free_slots else 0.0


def tail_waste(wastes) -> TailWaste:
    """Mean, median and 99th percentile of per-request ``A − F`` at completion.

    For a paged allocator the waste is the unfilled part of the last page,
    ``ceil(F / page_size) * page_size − F``, expected to be about ``(page_size − 1) / 2`` when
    final lengths are spread evenly modulo the page size (see ``expected_page_tail``).
    """
    w = np.asarray(wastes, dtype=np.float64)
    if w.size == 0:
        return TailWaste(0.0, 0.0, 0.0, 0)
    return TailWaste(float(w.mean()), float(np.percentile(w, 50)), float(np.percentile(w, 99)), int(w.size))


def expected_page_tail(page_size: int) -> float:
    """``(page_size − 1) / 2``: mean page-tail waste when ``F mod page_size`` is uniform."""
    return (page_size - 1) / 2


def sharing_saving(saved_slots: float, used_slots: float) -> float:
    """Memory saved by sharing pages: ``saved / (used + saved)``.

    ``saved`` is the slots the shared pages would take again if every sequence held private
    copies, ``used`` the slots really taken; the ratio is the vLLM paper's "blocks saved by
    sharing over blocks without sharing".
    """
    total = used_slots + saved_slots
    return saved_slots / total if total else 0.0


__all__ = [
    "Breakdown", "TailWaste", "breakdown", "request_breakdown", "utilisation", "usage",
    "largest_hole_index", "tail_waste", "expected_page_tail", "sharing_saving",
]
