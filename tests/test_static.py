"""StaticAllocator: reservation policies, real hole placement, coalescing, typed errors, atomicity."""

import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedkv import BlockManager, DuplicateSequence, InvalidArgument, InvalidType, OutOfPages
from pagedkv.errors import NoContiguousSpace
from pagedkv import SequenceExists, UnknownSequence
from pagedkv.static import Allocator, StaticAllocator, next_pow2, reservation


def layout(alloc: StaticAllocator, sizes: list[int]) -> None:
    for seq_id, size in enumerate(sizes):
        alloc.allocate(seq_id, size)


# ------------------------------------------------------------------ policies
@pytest.mark.parametrize("n, expected", [(0, 0), (1, 1), (2, 2), (3, 4), (338, 512), (512, 512), (513, 1024)])
def test_next_pow2(n, expected):
    assert next_pow2(n) == expected


@pytest.mark.parametrize(
    "policy, prompt, final, max_len, expected",
    [
        ("max", 100, 438, 2048, 2048),
        ("pow2", 100, 438, 2048, 100 + 512),  # output 338 -> 512
        ("pow2", 100, 612, 2048, 612),  # output 512 is a power of two already
        ("pow2", 1100, 2000, 2048, 2048),  # 1100 + 1024 > max_len: capped
        ("pow2", 10, 11, None, 11),
        ("oracle", 100, 438, 2048, 438),
    ],
)
def test_reservation_policies(policy, prompt, final, max_len, expected):
    assert reservation(policy, prompt, final, max_len) == expected
    alloc = StaticAllocator(4096, policy=policy, max_len=max_len)
    assert alloc.reservation(prompt, final) == expected
    alloc.allocate(7, prompt, final)
    assert alloc.region(7) == (0, expected, expected, prompt)


@given(prompt=st.integers(1, 3000), output=st.integers(0, 3000), max_len=st.integers(1, 6000))
def test_pow2_reserves_at_least_final_and_less_than_twice_the_output(prompt, output, max_len):
    final = prompt + output
    if final > max_len:
        return
    size = reservation("pow2", prompt, final, max_len)
    assert final <= size <= max_len
    assert size <= prompt + max(2 * output - 1, 0) or size == final


def test_allocator_without_final_tokens_reserves_exactly_the_tokens():
    alloc = StaticAllocator(100, policy="pow2")
    alloc.allocate(0, 10)
    assert alloc.region(0).size == 10


# ---------------------------------------------------------------- placement
def test_first_fit_takes_the_lowest_hole_and_best_fit_the_smallest():
    for placement, expected in (("first_fit", 10), ("best_fit", 50)):
        alloc = StaticAllocator(100, placement=placement)
        layout(alloc, [10, 30, 10, 20, 10])  # regions at 0, 10, 40, 50, 70; hole [80, 100)
        alloc.free(1)  # hole [10, 40) of 30
        alloc.free(3)  # hole [50, 70) of 20
        alloc.allocate(9, 15)
        assert alloc.region(9).start == expected, placement
        alloc.check_invariants()


def test_external_fragmentation_is_real():
    alloc = StaticAllocator(100)
    layout(alloc, [20] * 5)
    alloc.free(1)
    alloc.free(3)  # 40 slots free in two holes of 20
    assert alloc.num_free_slots == 40 and alloc.largest_hole == 20 and alloc.num_holes == 2
    assert not alloc.can_allocate(30)
    before = alloc.snapshot()
    with pytest.raises(OutOfPages) as info:
        alloc.allocate(9, 30)
    assert (info.value.requested, info.value.free, info.value.total) == (30, 20, 100)
    assert isinstance(info.value, NoContiguousSpace) and info.value.num_free_slots == 40
    assert alloc.snapshot() == before


def test_free_coalesces_with_both_neighbours():
    alloc = StaticAllocator(100)
    layout(alloc, [25, 25, 25, 25])
    for seq_id in (0, 2, 1):
        alloc.free(seq_id)
        alloc.check_invariants()
    assert alloc.snapshot()["holes"] == {0: 75}
    alloc.free(3)
    assert alloc.snapshot() == StaticAllocator(100).snapshot()


def test_buddy_rounds_up_splits_and_merges_back():
    alloc = StaticAllocator(15700, placement="buddy")
    # 15700 = 8192 + 4096 + 2048 + 1024 + 256 + 64 + 16 + 4
    assert sorted(alloc.snapshot()["holes"].values()) == [4, 16, 64, 256, 1024, 2048, 4096, 8192]
    fresh = alloc.snapshot()
    alloc.allocate(0, 100)  # the smallest free block that fits, 256 at 15360, is split in two
    alloc.allocate(1, 100)
    assert alloc.region(0) == (15360, 100, 128, 100) and alloc.region(1).start == 15360 + 128
    assert alloc.num_reserved_slots == 200 and alloc.num_free_slots == 15700 - 256
    alloc.check_invariants()
    alloc.free(0)
    alloc.free(1)
    alloc.check_invariants()
    assert alloc.snapshot() == fresh


def test_buddy_does_not_merge_across_top_blocks():
    alloc = StaticAllocator(12, placement="buddy")  # tops 8 + 4
    assert alloc.largest_hole == 8
    assert not alloc.can_allocate(9)
    assert alloc.max_regions(4) == 3 and alloc.max_regions(3) == 3 and alloc.max_regions(5) == 1


def test_max_regions_first_fit():
    assert StaticAllocator(100).max_regions(30) == 3


# ------------------------------------------------------------------ appends
def test_append_within_the_reservation_and_slot_mapping():
    alloc = StaticAllocator(64, policy="oracle")
    alloc.allocate(3, 5, 9)
    alloc.allocate(4, 2, 4)
    plan = alloc.append_batch([3, 4], [2, 1])
    assert plan.slot_mapping.tolist() == [5, 6, 9 + 2]
    assert plan.copies.shape == (0, 2) and plan.copies.dtype == np.int32
    assert alloc.num_tokens(3) == 7 and alloc.slots(4).tolist() == [9, 10, 11]
    assert alloc.append(3, 2).tolist() == []
    alloc.check_invariants()


def test_append_beyond_the_reservation_grows_in_place_or_fails_atomically():
    alloc = StaticAllocator(30)
    layout(alloc, [10, 10])
    assert alloc.can_append(1, 10)  # the tail hole [20, 30) follows region 1
    alloc.append(1, 10)
    assert alloc.region(1) == (10, 20, 20, 20) and alloc.num_free_slots == 0
    before = alloc.snapshot()
    assert not alloc.can_append(0)
    with pytest.raises(OutOfPages):
        alloc.append(0)
    with pytest.raises(OutOfPages):
        alloc.append_batch([1, 0], 1)
    assert alloc.snapshot() == before
    alloc.check_invariants()


def test_buddy_grows_only_inside_its_block():
    alloc = StaticAllocator(64, placement="buddy")
    alloc.allocate(0, 5)  # block of 8
    alloc.append(0, 3)
    assert alloc.region(0) == (0, 8, 8, 8)
    assert not alloc.can_append(0)


# ---------------------------------------------------------- errors, protocol
def test_typed_errors_name_the_argument():
    with pytest.raises(InvalidArgument, match="policy"):
        StaticAllocator(10, policy="greedy")
    with pytest.raises(InvalidArgument, match="placement"):
        StaticAllocator(10, placement="worst_fit")
    with pytest.raises(InvalidArgument, match="max_len"):
        StaticAllocator(10, policy="max")
    with pytest.raises(InvalidArgument, match="num_slots"):
        StaticAllocator(0)
    alloc = StaticAllocator(100, policy="oracle", max_len=50)
    with pytest.raises(InvalidArgument, match="final_tokens"):
        alloc.allocate(0, 10, 5)
    with pytest.raises(InvalidArgument, match="final_tokens"):
        alloc.allocate(0, 10, 51)
    with pytest.raises(InvalidType, match="seq_id"):
        alloc.allocate(True, 1)
    alloc.allocate(0, 10, 20)
    with pytest.raises(SequenceExists):
        alloc.allocate(0, 1)
    with pytest.raises(UnknownSequence):
        alloc.free(1)
    with pytest.raises(UnknownSequence):
        alloc.append_batch([0, 1], 1)
    with pytest.raises(DuplicateSequence):
        alloc.append_batch([0, 0], 1)
    assert alloc.num_tokens(0) == 10
    err = NoContiguousSpace(3, 1, 8, 5)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.num_free_slots == 5 and isinstance(again, OutOfPages)
    assert "largest usable hole holds 1 (5 of 8 slots are free" in str(err)


def test_both_allocators_satisfy_the_protocol():
    assert isinstance(StaticAllocator(8), Allocator)
    assert isinstance(BlockManager(8, 4), Allocator)
    for alloc in (StaticAllocator(8), BlockManager(8, 1)):
        assert alloc.can_allocate(4)
        alloc.allocate(1, 4)
        alloc.append(1)
        alloc.append_batch([1], 1)
        assert alloc.num_tokens(1) == 6 and 0 < alloc.usage() <= 1
        alloc.free(1)
        alloc.check_invariants()
        assert alloc.num_sequences == 0


# ------------------------------------------------- against a brute-force model
def brute_force_place(occupied: np.ndarray, size: int, placement: str) -> int | None:
    """Start chosen by scanning every slot: the reference for first and best fit."""
    holes, start = [], None
    for slot, used in enumerate(list(occupied) + [True]):
        if not used and start is None:
            start = slot
        elif used and start is not None:
            holes.append((start, slot - start))
            start = None
    fits = [(s, n) for s, n in holes if n >= size]
    if not fits:
        return None
    if placement == "first_fit":
        return fits[0][0]
    return min(fits, key=lambda h: (h[1], h[0]))[0]


ops = st.lists(st.tuples(st.sampled_from(["alloc", "free", "append"]), st.integers(1, 24), st.integers(0, 9)),
               max_size=60)


@pytest.mark.parametrize("placement", ["first_fit", "best_fit"])
@given(ops=ops)
def test_placement_matches_a_brute_force_model(placement, ops):
    C = 64
    alloc = StaticAllocator(C, placement=placement)
    occupied = np.zeros(C, dtype=bool)
    live: dict[int, tuple[int, int]] = {}
    for op, size, seq_id in ops:
        if op == "alloc" and seq_id not in live:
            expected = brute_force_place(occupied, size, placement)
            assert alloc.can_allocate(size) == (expected is not None)
            if expected is None:
                with pytest.raises(OutOfPages):
                    alloc.allocate(seq_id, size)
                continue
            alloc.allocate(seq_id, size)
            assert alloc.region(seq_id).start == expected
            occupied[expected:expected + size] = True
            live[seq_id] = (expected, size)
        elif op == "free" and seq_id in live:
            start, n = live.pop(seq_id)
            alloc.free(seq_id)
            occupied[start:start + n] = False
        elif op == "append" and seq_id in live:
            start, n = live[seq_id]
            extra = size
            after = occupied[start + n:start + n + extra]
            ok = start + n + extra <= C and not after.any()
            assert alloc.can_append(seq_id, extra) == ok
            if ok:
                alloc.append(seq_id, extra)
                occupied[start + n:start + n + extra] = True
                live[seq_id] = (start, n + extra)
        alloc.check_invariants()
        assert alloc.num_free_slots == C - occupied.sum()
        free = ~occupied
        runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], free.astype(int), [0]]))))[::2]
        assert alloc.largest_hole == (runs.max() if runs.size else 0)


@given(ops=ops)
def test_buddy_keeps_its_invariants_and_returns_to_new(ops):
    alloc = StaticAllocator(100, placement="buddy")
    fresh = alloc.snapshot()
    live = set()
    for op, size, seq_id in ops:
        if op == "alloc" and seq_id not in live:
            if alloc.can_allocate(size):
                alloc.allocate(seq_id, size)
                live.add(seq_id)
            else:
                before = alloc.snapshot()
                with pytest.raises(OutOfPages):
                    alloc.allocate(seq_id, size)
                assert alloc.snapshot() == before
        elif op == "free" and seq_id in live:
            alloc.free(seq_id)
            live.discard(seq_id)
        elif op == "append" and seq_id in live and alloc.can_append(seq_id, size):
            alloc.append(seq_id, size)
        alloc.check_invariants()
    for seq_id in live:
        alloc.free(seq_id)
    assert alloc.snapshot() == fresh
