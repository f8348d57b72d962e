"""Static contiguous allocation: the baseline that paged allocation is compared against.

``StaticAllocator`` owns a pool of ``num_slots`` token slots and gives each sequence one
contiguous *region* of slots, reserved at admission by a policy (``max``: max_len; ``pow2``:
prompt + next power of two of the output; ``oracle``: prompt + true output). Regions are placed
in real holes (first-fit, best-fit or a buddy allocator) and coalesced on free, so external
fragmentation is what the placement produces, not an assumed figure.

It speaks the same small protocol as ``BlockManager`` (``Allocator`` below), so the simulator
drives either. Imports numpy and pagedkv's errors and checks only; never torch.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from . import _validate as check
from .block_manager import _NO_COPIES, Allocation, StepPlan
from .errors import DuplicateSequence, InvalidArgument, InvariantViolation, NoContiguousSpace
from .errors import SequenceExists, UnknownSequence

#: Reservation policies (see ``reservation``).
POLICIES = ("max", "pow2", "oracle")
#: Hole placement strategies.
PLACEMENTS = ("first_fit", "best_fit", "buddy")

_NO_COPIES = np.zeros((0, 2), dtype=np.int32)


@runtime_checkable
class Allocator(Protocol):
    """What the simulator asks of an allocator; ``BlockManager`` and ``StaticAllocator`` both are one.

    ``allocate``/``can_allocate`` may take more keywords in a given allocator (the static one
    takes ``final_tokens``), but calling them with these arguments alone always works.
    """

    @property
    def num_sequences(self) -> int: ...

    def can_allocate(self, num_tokens: int) -> bool: ...

    def allocate(self, seq_id: int, num_tokens: int) -> Allocation: ...

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool: ...

    def append(self, seq_id: int, num_tokens: int = 1) -> list: ...

    def append_batch(self, seq_ids, num_tokens=1) -> StepPlan: ...

    def free(self, seq_id: int) -> None: ...

    def num_tokens(self, seq_id: int) -> int: ...

    def usage(self) -> float: ...

    def check_invariants(self) -> None: ...


class Region(NamedTuple):
    """One sequence's contiguous reservation.

    Attributes:
        start: first slot of the region.
        size: slots reserved for the sequence (``A`` in the fragmentation metrics).
        block_size: slots taken from the pool (``size`` rounded up to a power of two by the
            buddy placement; equal to ``size`` otherwise).
        num_tokens: tokens stored, always ``<= size``; token ``pos`` lives in slot ``start + pos``.
    """

    start: int
    size: int
    block_size: int
    num_tokens: int


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (``0`` for ``n == 0``)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def reservation(policy: str, num_tokens: int, final_tokens: int, max_len: int | None) -> int:
    """Slots a policy reserves for a sequence holding ``num_tokens`` that will reach ``final_tokens``.

    ``max``: ``max_len``. ``pow2``: ``num_tokens + next_pow2(final_tokens - num_tokens)``, capped
    at ``max_len`` but never below ``final_tokens``. ``oracle``: ``final_tokens``.
    """
    if policy == "max":
        return max_len
    if policy == "pow2":
        # NOTE: a sequence never grows past max_len, so Orca-Pow2 reserving more than max_len
        # would only be waste no engine would choose; the cap keeps Pow2 <= Max.
        size = num_tokens + next_pow2(final_tokens - num_tokens)
        return max(final_tokens, min(size, max_len)) if max_len is not None else size
    return final_tokens


class StaticAllocator:
    """Contiguous per-sequence reservations over a pool of token slots.

    Args:
        num_slots: token slots in the pool (the budget ``C``), >= 1.
        policy: ``"max"``, ``"pow2"`` or ``"oracle"`` (see ``reservation``).
        max_len: longest sequence, in tokens; required by ``"max"``, caps ``"pow2"`` and bounds
            ``final_tokens`` for every policy when given.
        placement: ``"first_fit"`` (lowest-address hole that fits), ``"best_fit"`` (smallest
            hole that fits, lowest address on ties) or ``"buddy"`` (power-of-two blocks split
            and merged with their buddies; the pool is cut into aligned power-of-two top blocks).

    Raises:
        InvalidArgument / InvalidType: a bad argument (names it and the value).

    Every method that fails leaves the allocator exactly as it was. Holes are always maximal
    (coalesced) for first/best fit, and free buddies always merged for buddy.
    """

    def __init__(self, num_slots: int, *, policy: str = "oracle", max_len: int | None = None,
                 placement: str = "first_fit"):
        self._num_slots = check.count("num_slots", num_slots)
        if policy not in POLICIES:
            raise InvalidArgument("policy", policy, f"one of {POLICIES}")
        if placement not in PLACEMENTS:
            raise InvalidArgument("placement", placement, f"one of {PLACEMENTS}")
        if max_len is not None:
            max_len = check.count("max_len", max_len)
        elif policy == "max":
            raise InvalidArgument("max_len", max_len, "an int >= 1 when policy='max'")
        self.policy = policy
        self.max_len = max_len
        self.placement = placement
        self._buddy = placement == "buddy"
        # seq_id -> [start, size, block_size, num_tokens]; lists so the hot path mutates in place.
        self._regions: dict[int, list[int]] = {}
        self._num_reserved = 0  # sum of region sizes
        self._num_blocked = 0  # sum of block sizes
        if self._buddy:
            # NOTE: the pool is cut into aligned power-of-two top blocks, largest first
            # (15700 = 8192 + 4096 + 2048 + 1024 + 256 + 64 + 16 + 4); a block merges with its
            # buddy only inside its top block, so no block ever straddles two of them.
            self._tops: list[tuple[int, int]] = []  # (base, size)
            base = 0
            for bit in reversed(range(self._num_slots.bit_length())):
                if self._num_slots >> bit & 1:
                    self._tops.append((base, 1 << bit))
                    base += 1 << bit
            self._top_bases = [b for b, _ in self._tops]
            self._free_blocks: dict[int, list[int]] = {}  # size -> sorted starts
            self._free_size: dict[int, int] = {}  # start -> size of a free block
            for b, s in self._tops:
                self._add_block(b, s)
        else:
            self._starts: list[int] = [0]  # hole starts, ascending
            self._hole: dict[int, int] = {0: self._num_slots}  # start -> size
            self._by_size: list[tuple[int, int]] = [(self._num_slots, 0)]  # (size, start)

    # ------------------------------------------------------------------ facts
    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def num_free_slots(self) -> int:
        """Slots in no region's block (buddy round-up counts as taken)."""
        return self._num_slots - self._num_blocked

    @property
    def num_reserved_slots(self) -> int:
        """Sum of region sizes: the slots reserved for sequences (``ΣA``)."""
        return self._num_reserved

    @property
    def num_sequences(self) -> int:
        return len(self._regions)

    @property
    def largest_hole(self) -> int:
        """Slots in the largest region that one allocation could get now."""
        if self._buddy:
            return max(self._free_blocks, default=0)
        return self._by_size[-1][0] if self._by_size else 0

    @property
    def num_holes(self) -> int:
        return len(self._free_size) if self._buddy else len(self._starts)

    def __contains__(self, seq_id: object) -> bool:
        return check.seq_id(seq_id) in self._regions

    def usage(self) -> float:
        """Fraction of slots taken from the pool, in ``[0, 1]`` (as ``BlockManager.usage``)."""
        return self._num_blocked / self._num_slots

    def region(self, seq_id: int) -> Region:
        """Sequence ``seq_id``'s region. Raises UnknownSequence."""
        return Region(*self._region(check.seq_id(seq_id)))

    def num_tokens(self, seq_id: int) -> int:
        return self._region(check.seq_id(seq_id))[3]

    def reservation(self, num_tokens: int, final_tokens: int | None = None) -> int:
        """Slots this allocator's policy reserves for such a sequence (validates like ``allocate``)."""
        num_tokens, final_tokens = self._lengths(num_tokens, final_tokens)
        return reservation(self.policy, num_tokens, final_tokens, self.max_len)

    def max_regions(self, size: int) -> int:
        """How many regions of ``size`` slots an empty pool holds (buddy round-up included)."""
        size = check.count("size", size)
        if self._buddy:
            block = next_pow2(size)
            return sum(s // block for _, s in self._tops)
        return self._num_slots // size

    # ------------------------------------------------------------- admission
    def can_allocate(self, num_tokens: int, final_tokens: int | None = None) -> bool:
        """Whether ``allocate(new_id, num_tokens, final_tokens)`` would succeed now."""
        size = self.reservation(num_tokens, final_tokens)
        return self._find(self._block_size(size)) is not None

    def allocate(self, seq_id: int, num_tokens: int, final_tokens: int | None = None) -> Allocation:
        """Reserve a region for ``seq_id`` and store ``num_tokens`` tokens in it.

        Args:
            seq_id: a new sequence id.
            num_tokens: tokens stored now (the prompt), >= 1.
            final_tokens: length the sequence will reach (prompt + output); default
                ``num_tokens``. Used by ``pow2`` and ``oracle``; at most ``max_len`` when set.

        Returns:
            ``Allocation(0, int32 [0, 2] copies)``, as ``BlockManager``: no prefix cache, nothing to copy.

        Raises:
            SequenceExists: ``seq_id`` is live.
            InvalidArgument: ``final_tokens < num_tokens`` or a length above ``max_len``.
            NoContiguousSpace (an OutOfPages): no hole holds the reservation (``requested`` slots; ``free`` is the
                largest hole, ``total`` the pool), even when the free slots add up to enough.
        """
        seq_id = check.seq_id(seq_id)
        num_tokens, final_tokens = self._lengths(num_tokens, final_tokens)
        size = reservation(self.policy, num_tokens, final_tokens, self.max_len)
        if seq_id in self._regions:
            raise SequenceExists(seq_id)
        block = self._block_size(size)
        start = self._find(block)
        if start is None:
            raise NoContiguousSpace(block, self.largest_hole, self._num_slots, self.num_free_slots)
        self._take(start, block)
        self._regions[seq_id] = [start, size, block, num_tokens]
        self._num_reserved += size
        self._num_blocked += block
        return Allocation(0, _NO_COPIES)

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        """Whether ``append(seq_id, num_tokens)`` would succeed now."""
        region = self._region(check.seq_id(seq_id))
        return self._growth(region, check.count("num_tokens", num_tokens)) is not None

    def append(self, seq_id: int, num_tokens: int = 1) -> np.ndarray:
        """Store ``num_tokens`` more tokens of ``seq_id`` in its region.

        A region that is full grows in place into the hole right after it (first/best fit) or
        into the rest of its buddy block; regions never move.

        Returns:
            int32 ``[0, 2]``: contiguous regions are never shared, so there is nothing to copy.

        Raises:
            UnknownSequence. NoContiguousSpace (an OutOfPages): the region is full and cannot grow in place.
        """
        region = self._region(check.seq_id(seq_id))
        num_tokens = check.count("num_tokens", num_tokens)
        extra = self._growth(region, num_tokens)
        if extra is None:
            raise NoContiguousSpace(region[3] + num_tokens - region[1], self._room_after(region),
                                    self._num_slots, self.num_free_slots)
        self._grow(region, num_tokens, extra)
        return _NO_COPIES

    def append_batch(self, seq_ids, num_tokens=1) -> StepPlan:
        """Grow every sequence of a step, all or nothing (see ``BlockManager.append_batch``).

        Returns:
            ``StepPlan(slot_mapping int64 [sum(num_tokens)], copies int32 [0, 2])``.

        Raises:
            DuplicateSequence, UnknownSequence, OutOfPages (nothing changed).
        """
        ids = check.seq_ids(seq_ids).tolist()
        counts = check.counts("num_tokens", num_tokens, len(ids)).tolist()
        regions = self._regions
        plan = []
        seen: set[int] = set()
        for seq_id, n in zip(ids, counts):
            if seq_id in seen:
                raise DuplicateSequence("seq_ids", seq_id)
            seen.add(seq_id)
            region = regions.get(seq_id)
            if region is None:
                raise UnknownSequence(seq_id)
            if region[3] + n > region[1]:
                extra = self._growth(region, n)
                if extra is None:
                    raise NoContiguousSpace(region[3] + n - region[1], self._room_after(region),
                                            self._num_slots, self.num_free_slots)
                plan.append((region, n, extra))
            else:
                plan.append((region, n, 0))
        slots: list[int] = []
        for region, n, extra in plan:
            first = region[0] + region[3]
            slots.extend(range(first, first + n))
            if extra:
                self._grow(region, n, extra)
            else:
                region[3] += n
        return StepPlan(np.array(slots, dtype=np.int64), _NO_COPIES.copy())

    def free(self, seq_id: int) -> None:
        """Drop ``seq_id`` and return its block to the pool, merged with free neighbours."""
        seq_id = check.seq_id(seq_id)
        start, size, block, _ = self._region(seq_id)
        del self._regions[seq_id]
        self._num_reserved -= size
        self._num_blocked -= block
        if self._buddy:
            self._release_buddy(start, block)
        else:
            self._release_hole(start, block)

    def slots(self, seq_id: int) -> np.ndarray:
        """Slots of the tokens ``seq_id`` holds: int64 ``[num_tokens]``, ``start + pos``."""
        start, _, _, n = self._region(check.seq_id(seq_id))
        return np.arange(start, start + n, dtype=np.int64)

    # ------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Check every invariant in O(regions + holes).

        Raises:
            InvariantViolation: ``tokens_fit`` (tokens <= size <= block), ``cover`` (blocks and
                holes tile the pool exactly), ``coalesced`` (no two adjacent holes, or two free
                buddies), ``accounting`` (cached sums), ``index`` (hole indexes agree).
        """
        pieces = []
        reserved = blocked = 0
        for seq_id, (start, size, block, n) in self._regions.items():
            if not 1 <= n <= size <= block:
                raise InvariantViolation("tokens_fit", f"sequence {seq_id} holds {n} tokens in a "
                                         f"region of {size} in a block of {block}")
            pieces.append((start, block, "region"))
            reserved += size
            blocked += block
        if (reserved, blocked) != (self._num_reserved, self._num_blocked):
            raise InvariantViolation("accounting", f"regions sum to {reserved} reserved / {blocked} blocked, "
                                     f"cached {self._num_reserved} / {self._num_blocked}")
        holes = self._free_size.items() if self._buddy else self._hole.items()
        pieces += [(start, size, "hole") for start, size in holes]
        pieces.sort()
        at = 0
        prev = None
        for start, size, kind in pieces:
            if start != at or size < 1:
                raise InvariantViolation("cover", f"{kind} [{start}, {start + size}) does not start at slot {at}")
            if kind == "hole" and prev == "hole" and not self._buddy:
                raise InvariantViolation("coalesced", f"hole at {start} follows another hole")
            at, prev = start + size, kind
        if at != self._num_slots:
            raise InvariantViolation("cover", f"blocks and holes end at slot {at}, pool has {self._num_slots}")
        if self._buddy:
            self._check_buddies()
        elif (sorted(self._hole) != self._starts
              or sorted((s, b) for b, s in self._hole.items()) != self._by_size):
            raise InvariantViolation("index", "hole start and size indexes disagree with the holes")

    def snapshot(self) -> dict:
        """The whole observable state (regions and holes), for tests."""
        holes = self._free_size if self._buddy else self._hole
        return {"regions": {s: tuple(r) for s, r in sorted(self._regions.items())},
                "holes": dict(sorted(holes.items()))}

    def __repr__(self) -> str:
        return (f"StaticAllocator(num_slots={self._num_slots}, policy={self.policy!r}, "
                f"max_len={self.max_len}, placement={self.placement!r})")

    # ---------------------------------------------------------------- helpers
    def _region(self, seq_id: int) -> list[int]:
        try:
            return self._regions[seq_id]
        except KeyError:
            raise UnknownSequence(seq_id) from None

    def _lengths(self, num_tokens: object, final_tokens: object) -> tuple[int, int]:
        num_tokens = check.count("num_tokens", num_tokens)
        final_tokens = num_tokens if final_tokens is None else check.count("final_tokens", final_tokens)
        if final_tokens < num_tokens:
            raise InvalidArgument("final_tokens", final_tokens, f"at least num_tokens = {num_tokens}")
        if self.max_len is not None and final_tokens > self.max_len:
            raise InvalidArgument("final_tokens", final_tokens, f"at most max_len = {self.max_len}")
        return num_tokens, final_tokens

    def _block_size(self, size: int) -> int:
        return next_pow2(size) if self._buddy else size

    def _find(self, block: int) -> int | None:
        """Start of the hole a block of ``block`` slots goes to, or None."""
        if self._buddy:
            size = next((s for s in sorted(self._free_blocks) if s >= block), None)
            return None if size is None else self._free_blocks[size][0]
        by_size = self._by_size
        if not by_size or by_size[-1][0] < block:
            return None
        if self.placement == "best_fit":
            return by_size[bisect_left(by_size, (block, -1))][1]
        hole = self._hole
        return next(start for start in self._starts if hole[start] >= block)

    def _take(self, start: int, block: int) -> None:
        if self._buddy:
            size = self._free_size[start]
            self._remove_block(start, size)
            while size > block:  # split, keeping the lower half
                size //= 2
                self._add_block(start + size, size)
            return
        size = self._remove_hole(start)
        if size > block:
            self._add_hole(start + block, size - block)

    def _room_after(self, region: list[int]) -> int:
        """Slots a region can grow by in place: rest of its block, plus the hole after it."""
        start, size, block, _ = region
        room = block - size
        if not self._buddy:
            room += self._hole.get(start + block, 0)
        return room

    def _growth(self, region: list[int], num_tokens: int) -> int | None:
        """Slots the region must grow by to take ``num_tokens`` more (0: none), or None if it cannot."""
        extra = region[3] + num_tokens - region[1]
        if extra <= 0:
            return 0
        return extra if extra <= self._room_after(region) else None

    def _grow(self, region: list[int], num_tokens: int, extra: int) -> None:
        start, size, block, _ = region
        from_hole = extra - (block - size)
        if from_hole > 0:  # first/best fit only: eat the front of the following hole
            hole_start = start + block
            hole_size = self._remove_hole(hole_start)
            if hole_size > from_hole:
                self._add_hole(hole_start + from_hole, hole_size - from_hole)
            region[2] = block + from_hole
            self._num_blocked += from_hole
        region[1] = size + extra
        region[3] += num_tokens
        self._num_reserved += extra

    # first/best fit holes
    def _add_hole(self, start: int, size: int) -> None:
        insort(self._starts, start)
        self._hole[start] = size
        insort(self._by_size, (size, start))

    def _remove_hole(self, start: int) -> int:
        size = self._hole.pop(start)
        del self._starts[bisect_left(self._starts, start)]
        del self._by_size[bisect_left(self._by_size, (size, start))]
        return size

    def _release_hole(self, start: int, size: int) -> None:
        i = bisect_right(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start + size:  # merge with the next hole
            size += self._remove_hole(start + size)
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._hole[prev] == start:  # merge with the previous hole
                start, size = prev, self._remove_hole(prev) + size
        self._add_hole(start, size)

    # buddy blocks
    def _add_block(self, start: int, size: int) -> None:
        insort(self._free_blocks.setdefault(size, []), start)
        self._free_size[start] = size

    def _remove_block(self, start: int, size: int) -> None:
        starts = self._free_blocks[size]
        del starts[bisect_left(starts, start)]
        if not starts:
            del self._free_blocks[size]
        del self._free_size[start]

    def _top(self, start: int) -> tuple[int, int]:
        return self._tops[bisect_right(self._top_bases, start) - 1]

    def _release_buddy(self, start: int, size: int) -> None:
        base, top_size = self._top(start)
        while size < top_size:
            buddy = base + ((start - base) ^ size)
            if self._free_size.get(buddy) != size:
                break
            self._remove_block(buddy, size)
            start, size = min(start, buddy), size * 2
        self._add_block(start, size)

    def _check_buddies(self) -> None:
        for start, size in self._free_size.items():
            base, top_size = self._top(start)
            if size & (size - 1) or (start - base) % size or size > top_size:
                raise InvariantViolation("cover", f"free block [{start}, {start + size}) is not an aligned "
                                         "power of two")
            buddy = base + ((start - base) ^ size)
            if size < top_size and self._free_size.get(buddy) == size:
                raise InvariantViolation("coalesced", f"free buddies at {start} and {buddy} of size {size}")
        listed = sorted((s, b) for b, starts in self._free_blocks.items() for s in starts)
        if listed != sorted(self._free_size.items()):
            raise InvariantViolation("index", "buddy free lists disagree with the free blocks")


__all__ = ["StaticAllocator", "Region", "Allocator", "POLICIES", "PLACEMENTS", "reservation", "next_pow2"]
