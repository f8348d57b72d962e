"""Behaviour of BlockManager on the default backend (PAGEDKV_IMPL picks it; CI runs both)."""

import pickle

import numpy as np
import pytest

import pagedkv
from pagedkv import (
    BlockManager,
    DuplicateSequence,
    InvalidArgument,
    InvalidType,
    InvariantViolation,
    OutOfPages,
    PagedKVError,
    SequenceExists,
    UnknownSequence,
)


def test_new_manager_hands_out_pages_in_order():
    mgr = BlockManager(num_pages=8, page_size=4)
    alloc = mgr.allocate(0, 9)  # no prefix cache: nothing cached, nothing copied
    assert alloc.num_cached_tokens == 0 and alloc.copies.shape == (0, 2) and alloc.copies.dtype == np.int32
    assert mgr.page_table(0) == [0, 1, 2]
    assert mgr.num_tokens(0) == 9
    assert mgr.num_free_pages == 5
    assert mgr.usage() == pytest.approx(3 / 8)
    mgr.check_invariants()


def test_free_returns_pages_to_queue_tail_last_page_first():
    mgr = BlockManager(num_pages=4, page_size=2)
    mgr.allocate(0, 4)  # pages 0, 1
    mgr.free(0)
    # queue was [2, 3]; the freed pages join at the tail, last page first: [2, 3, 1, 0]
    mgr.allocate(1, 8)
    assert mgr.page_table(1) == [2, 3, 1, 0]


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_append_fills_the_last_page_then_takes_new_ones(page_size):
    mgr = BlockManager(num_pages=20, page_size=page_size)
    mgr.allocate(7, 1)
    for n in range(2, 3 * page_size + 2):
        assert mgr.append(7).tolist() == []
        assert len(mgr.page_table(7)) == -(-n // page_size)
    mgr.check_invariants()


def test_copy_on_write_on_shared_partial_last_page():
    mgr = BlockManager(num_pages=8, page_size=4)
    mgr.allocate(0, 6)  # pages [0, 1], page 1 holds 2 tokens
    mgr.fork(0, 1)
    assert mgr.ref_count(0) == mgr.ref_count(1) == 2
    copies = mgr.append(1)
    assert copies.dtype == np.int32 and copies.tolist() == [[1, 2]]  # child copies the partly filled page, then writes there
    assert mgr.page_table(1) == [0, 2]
    assert mgr.page_table(0) == [0, 1]
    assert mgr.ref_count(1) == 1 and mgr.ref_count(0) == 2
    # the parent now owns page 1 alone: appending writes in place
    assert mgr.append(0).shape == (0, 2)
    mgr.check_invariants()


def test_full_shared_pages_are_never_copied():
    mgr = BlockManager(num_pages=8, page_size=4)
    mgr.allocate(0, 8)
    mgr.fork(0, 1)
    assert mgr.append(1).tolist() == []
    assert mgr.page_table(1) == [0, 1, 2]
    assert mgr.ref_count(0) == 2 and mgr.ref_count(2) == 1


def test_append_batch_slot_mapping_and_copies():
    mgr = BlockManager(num_pages=16, page_size=4)
    mgr.allocate(0, 5)  # [0, 1]
    mgr.allocate(1, 3)  # [2]
    mgr.fork(0, 2)
    plan = mgr.append_batch([0, 1, 2], [2, 2, 1])
    assert plan.slot_mapping.dtype == np.int64 and plan.copies.dtype == np.int32
    # seq 0 copies shared page 1 -> 3, writes positions 5, 6 there; seq 1 fills slot 11 then page 4;
    # seq 2 now owns page 1 alone and writes position 5 in place.
    assert plan.copies.tolist() == [[1, 3]]
    assert plan.slot_mapping.tolist() == [3 * 4 + 1, 3 * 4 + 2, 2 * 4 + 3, 4 * 4 + 0, 1 * 4 + 1]
    mgr.check_invariants()


def test_append_batch_counts_a_page_shared_in_the_batch_once():
    mgr = BlockManager(num_pages=3, page_size=4)
    mgr.allocate(0, 2)
    mgr.fork(0, 1)
    # only one copy is needed: the second sequence then owns the page alone
    plan = mgr.append_batch([0, 1], 1)
    assert plan.copies.tolist() == [[0, 1]]
    assert mgr.num_free_pages == 1


def test_append_batch_is_all_or_nothing():
    mgr = BlockManager(num_pages=4, page_size=2)
    mgr.allocate(0, 2)
    mgr.allocate(1, 2)
    before = mgr.snapshot()
    with pytest.raises(OutOfPages) as info:
        mgr.append_batch([0, 1], [2, 4])  # needs 1 + 2 pages, 2 free
    assert (info.value.requested, info.value.free, info.value.total) == (3, 2, 4)
    assert mgr.snapshot() == before
    with pytest.raises(UnknownSequence):
        mgr.append_batch([0, 99], 1)
    with pytest.raises(DuplicateSequence, match="more than once"):
        mgr.append_batch([0, 1, 0], 1)
    assert mgr.snapshot() == before


def test_page_tables_and_csr():
    mgr = BlockManager(num_pages=16, page_size=4)
    mgr.allocate(5, 9)
    mgr.allocate(6, 4)
    tables = mgr.page_tables([5, 6])
    assert tables.page_table.dtype == np.int32 and tables.seq_lens.dtype == np.int32
    assert tables.page_table.tolist() == [[0, 1, 2], [3, -1, -1]]
    assert tables.seq_lens.tolist() == [9, 4]
    assert mgr.page_tables([6], max_pages=4).page_table.tolist() == [[3, -1, -1, -1]]
    with pytest.raises(InvalidArgument, match="max_pages"):
        mgr.page_tables([5], max_pages=2)
    indptr, indices, last = mgr.csr([5, 6])
    assert indptr.tolist() == [0, 3, 4] and indices.tolist() == [0, 1, 2, 3] and last.tolist() == [1, 4]
    assert all(a.dtype == np.int32 for a in (indptr, indices, last))
    assert mgr.page_tables([]).page_table.shape == (0, 0)
    assert mgr.slots(5, 3, 6).tolist() == [3, 4, 5]
    assert mgr.slots(5).tolist() == list(range(9))


def test_watermark_applies_to_admission_only():
    mgr = BlockManager(num_pages=10, page_size=1, watermark=0.2)
    assert mgr.watermark_pages == 2
    assert mgr.can_allocate(8) and not mgr.can_allocate(9)
    with pytest.raises(OutOfPages):
        mgr.allocate(0, 9)
    mgr.allocate(0, 8)
    assert mgr.can_append(0, 2)
    mgr.append(0, 2)  # appends may eat into the watermark
    assert mgr.num_free_pages == 0


def test_out_of_pages_is_a_memory_error_with_numbers():
    mgr = BlockManager(num_pages=2, page_size=4)
    with pytest.raises(MemoryError) as info:
        mgr.allocate(0, 9)
    err = info.value
    assert isinstance(err, OutOfPages) and isinstance(err, PagedKVError)
    assert (err.requested, err.free, err.total) == (3, 2, 2)
    assert "requested 3" in str(err) and "2 of 2" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.requested == 3


def test_state_errors_are_typed_and_change_nothing():
    mgr = BlockManager(num_pages=8, page_size=4)
    mgr.allocate(1, 5)
    before = mgr.snapshot()
    with pytest.raises(KeyError):
        mgr.free(2)
    with pytest.raises(UnknownSequence, match="unknown sequence 2"):
        mgr.append(2)
    with pytest.raises(UnknownSequence):
        mgr.fork(2, 3)
    with pytest.raises(SequenceExists):
        mgr.allocate(1, 1)
    with pytest.raises(SequenceExists):
        mgr.fork(1, 1)
    with pytest.raises(UnknownSequence):
        mgr.page_table(2)
    with pytest.raises(OutOfPages):
        mgr.append(1, 100)
    assert mgr.snapshot() == before
    mgr.free(1)
    with pytest.raises(UnknownSequence):
        mgr.free(1)  # double free


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda m: m.allocate(0, 0), InvalidArgument, "num_tokens"),
        (lambda m: m.allocate(0, -3), InvalidArgument, "num_tokens"),
        (lambda m: m.allocate(-1, 3), InvalidArgument, "seq_id"),
        (lambda m: m.allocate(2**64, 3), InvalidArgument, "seq_id"),
        (lambda m: m.allocate(1.0, 3), InvalidType, "seq_id"),
        (lambda m: m.allocate(float("nan"), 3), InvalidType, "seq_id"),
        (lambda m: m.allocate("a", 3), InvalidType, "seq_id"),
        (lambda m: m.allocate(True, 3), InvalidType, "seq_id"),
        (lambda m: m.allocate(0, 2.5), InvalidType, "num_tokens"),
        (lambda m: m.append(0, 0), InvalidArgument, "num_tokens"),
        (lambda m: m.append_batch([0.5], 1), InvalidType, "seq_ids"),
        (lambda m: m.append_batch(np.zeros((2, 2), dtype=np.int64), 1), InvalidArgument, "seq_ids"),
        (lambda m: m.append_batch([0], [1, 2]), InvalidArgument, "num_tokens"),
        (lambda m: m.append_batch([0], [0]), InvalidArgument, "num_tokens"),
        (lambda m: m.append_batch([2**70], 1), InvalidArgument, "seq_ids"),
        (lambda m: m.append_batch("01", 1), InvalidType, "seq_ids"),
        (lambda m: m.fork(0, -2), InvalidArgument, "child_id"),
        (lambda m: m.ref_count(99), InvalidArgument, "page_id"),
        (lambda m: m.slots(0, 3, 2), InvalidArgument, "start"),
        (lambda m: m.slots(0, 0, 99), InvalidArgument, "stop"),
    ],
)
def test_bad_arguments_raise_value_or_type_errors_naming_the_argument(call, error, name):
    mgr = BlockManager(num_pages=8, page_size=4)
    mgr.allocate(0, 3)
    before = mgr.snapshot()
    with pytest.raises(error) as info:
        call(mgr)
    assert isinstance(info.value, (ValueError, TypeError))
    assert str(info.value).startswith(name)
    assert mgr.snapshot() == before
    mgr.check_invariants()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_pages=0, page_size=4), "num_pages"),
        (dict(num_pages=4, page_size=0), "page_size"),
        (dict(num_pages=4, page_size=-16), "page_size"),
        (dict(num_pages=4, page_size=4, watermark=1.0), "watermark"),
        (dict(num_pages=4, page_size=4, watermark=float("nan")), "watermark"),
        (dict(num_pages=4, page_size=4, watermark="0.1"), "watermark"),
        (dict(num_pages=4.0, page_size=4), "num_pages"),
    ],
)
def test_bad_construction(kwargs, name):
    with pytest.raises((InvalidArgument, InvalidType)) as info:
        BlockManager(**kwargs)
    assert str(info.value).startswith(name)


def test_numpy_ids_and_counts_are_accepted():
    mgr = BlockManager(num_pages=8, page_size=4)
    mgr.allocate(np.int64(3), np.int32(2))
    plan = mgr.append_batch(np.array([3], dtype=np.uint32), np.array([2]))
    assert plan.slot_mapping.tolist() == [2, 3]


def test_check_invariants_detects_corruption():
    mgr = BlockManager(num_pages=4, page_size=2, backend="python")
    mgr.allocate(0, 3)
    mgr._impl._ref_count[0] = 5
    with pytest.raises(InvariantViolation, match="ref_count"):
        mgr.check_invariants()


def test_freeing_everything_restores_a_new_equivalent_state():
    mgr = BlockManager(num_pages=6, page_size=3)
    mgr.allocate(0, 7)
    mgr.fork(0, 1)
    mgr.append(1, 4)
    mgr.free(0)
    mgr.free(1)
    assert mgr.num_pinned_pages == 2  # the copy-on-write copy's pages, until the step ends
    mgr.end_step()
    assert mgr.num_free_pages == 6 and mgr.num_sequences == 0
    assert all(mgr.ref_count(p) == 0 for p in range(6))
    assert sorted(mgr.snapshot()["free"]) == list(range(6))
    mgr.allocate(2, 18)
    mgr.check_invariants()


def test_backend_default_follows_environment():
    assert BlockManager(2, 2).backend == pagedkv.backend
