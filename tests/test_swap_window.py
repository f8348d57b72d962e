"""CPU offload tier (swap_out / swap_in) and sliding-window release."""

import numpy as np
import pytest

from pagedkv import NULL_PAGE, BlockManager, DuplicateSequence, OutOfPages, SequenceSwapped


def test_swap_out_and_in_round_trip():
    mgr = BlockManager(num_pages=8, page_size=4, num_cpu_pages=4)
    mgr.allocate(0, 9)  # pages 0 1 2
    plan = mgr.swap_out([0])
    assert plan.direction == "out" and plan.copies.dtype == np.int32
    assert plan.copies.tolist() == [[0, 0], [1, 1], [2, 2]]
    assert mgr.is_swapped(0) and mgr.page_table(0) == [0, 1, 2]  # now CPU page ids
    # NOTE: the GPU pages stay pinned until the step's copies have run (end_step or the next
    # append_batch), so no other copy of this step can overwrite them first.
    assert mgr.num_free_pages == 5 and mgr.num_pinned_pages == 3 and mgr.num_free_cpu_pages == 1
    mgr.end_step()
    assert mgr.num_free_pages == 8
    with pytest.raises(SequenceSwapped, match="swap_in"):
        mgr.append(0)
    with pytest.raises(SequenceSwapped):
        mgr.page_tables([0])
    mgr.allocate(1, 4)  # takes GPU page 3 (queue: 3..7, 2, 1, 0)
    plan = mgr.swap_in([0])
    assert plan.direction == "in"
    assert plan.copies.tolist() == [[0, 4], [1, 5], [2, 6]]
    assert not mgr.is_swapped(0) and mgr.page_table(0) == [4, 5, 6]
    assert mgr.num_free_cpu_pages == 1  # the CPU pages are read by the pending swap-in copies
    mgr.end_step()
    assert mgr.num_free_cpu_pages == 4
    mgr.append(0)
    mgr.check_invariants()


def test_shared_pages_move_once_and_stay_shared():
    mgr = BlockManager(num_pages=8, page_size=4, num_cpu_pages=8)
    mgr.allocate(0, 6)
    mgr.fork(0, 1)
    mgr.append(1, 3)  # copy-on-write: 1 now has [0, 2, 3]
    plan = mgr.swap_out([0, 1])
    assert plan.copies.shape == (4, 2)  # pages 0, 1, 2, 3 each moved once
    assert mgr.page_table(0)[0] == mgr.page_table(1)[0]
    mgr.swap_in([1, 0])
    assert mgr.page_table(0)[0] == mgr.page_table(1)[0]
    assert mgr.ref_count(mgr.page_table(0)[0]) == 2
    mgr.check_invariants()


def test_a_swap_in_in_the_step_of_its_swap_out_takes_the_gpu_pages_back():
    mgr = BlockManager(num_pages=4, page_size=4, num_cpu_pages=4)
    mgr.allocate(0, 8)  # pages 0 1
    mgr.allocate(1, 8)  # pages 2 3: the pool is full
    assert mgr.swap_out([0]).copies.tolist() == [[0, 0], [1, 1]]
    assert mgr.num_free_pages == 0  # pinned: the swap-out copies have not run yet
    plan = mgr.swap_in([0])  # preempted and resumed in one step: no copy, no free page needed
    assert plan.copies.shape == (0, 2) and mgr.page_table(0) == [0, 1]
    mgr.end_step()
    assert mgr.num_free_cpu_pages == 4 and mgr.num_free_pages == 0
    mgr.check_invariants()


def test_page_shared_with_a_sequence_left_on_the_gpu_is_copied():
    mgr = BlockManager(num_pages=8, page_size=4, num_cpu_pages=8)
    mgr.allocate(0, 8)
    mgr.fork(0, 1)
    mgr.swap_out([1])
    assert mgr.page_table(0) == [0, 1] and mgr.ref_count(0) == 1
    assert mgr.num_free_pages == 6
    mgr.check_invariants()


def test_swaps_are_all_or_nothing():
    mgr = BlockManager(num_pages=8, page_size=2, num_cpu_pages=3)
    mgr.allocate(0, 4)
    mgr.allocate(1, 4)
    before = mgr.snapshot()
    assert not mgr.can_swap_out([0, 1])
    with pytest.raises(OutOfPages) as info:
        mgr.swap_out([0, 1])
    assert info.value.pool == "cpu" and (info.value.requested, info.value.free) == (4, 3)
    with pytest.raises(DuplicateSequence):
        mgr.swap_out([0, 0])
    with pytest.raises(SequenceSwapped):
        mgr.swap_in([0])
    assert mgr.snapshot() == before
    mgr.swap_out([0])
    mgr.end_step()
    mgr.allocate(2, 12)  # GPU now full but for 2 pages... 8 - 2 - 6 = 0 free
    assert not mgr.can_swap_in([0])
    with pytest.raises(OutOfPages):
        mgr.swap_in([0])
    mgr.free(0)  # freeing a swapped-out sequence returns its CPU pages
    assert mgr.num_free_cpu_pages == 3
    mgr.check_invariants()


def test_release_window_keeps_positions_with_null_pages():
    mgr = BlockManager(num_pages=8, page_size=4)
    mgr.allocate(0, 14)  # pages 0 1 2 3
    assert mgr.release_window(0, 5) == 2  # positions < 9 outside; pages 0, 1 lie wholly there
    assert mgr.page_table(0) == [NULL_PAGE, NULL_PAGE, 2, 3]
    assert mgr.num_free_pages == 6 and mgr.num_tokens(0) == 14
    assert mgr.release_window(0, 5) == 0
    assert mgr.page_tables([0]).page_table.tolist() == [[-1, -1, 2, 3]]
    mgr.append(0, 3)
    mgr.fork(0, 1)
    mgr.free(0)
    mgr.free(1)
    assert mgr.num_free_pages == 8
    mgr.check_invariants()


@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_one_gpu_page_swapped_out_twice_in_a_step_comes_back_once(backend):
    # Found by review: two sequences sharing a page, swapped out in separate calls, so two CPU
    # pages come from one GPU page; swapped in together in the same step, both take it back.
    mgr = BlockManager(8, 2, num_cpu_pages=8, enable_prefix_caching=True, backend=backend)
    mgr.allocate(0, 4)
    mgr.fork(0, 1)
    mgr.fork(0, 2)
    mgr.swap_out([1])
    mgr.swap_out([2])
    mgr.swap_in([1, 2])
    mgr.check_invariants()
    assert mgr.page_table(1) == mgr.page_table(2) == mgr.page_table(0)
    for seq_id in (0, 1, 2):
        mgr.free(seq_id)
    mgr.end_step()
    assert mgr.num_free_pages == 8 and mgr.num_free_cpu_pages == 8


@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_csr_never_lists_a_page_the_window_released(backend):
    mgr = BlockManager(num_pages=16, page_size=4, backend=backend)
    mgr.allocate(0, 18)  # pages 0-4
    mgr.allocate(1, 5)
    assert mgr.release_window(0, 6) == 3  # positions 12.. stay: pages 0 1 2 go
    assert mgr.release_window(0, 6) == 0  # incremental: nothing more to release
    indptr, indices, last = mgr.csr([0, 1])
    assert -1 not in indices.tolist()
    assert indices[indptr[0]:indptr[1]].tolist() == mgr.page_table(0)[3:]
    # the CSR describes the live pages: (pages - 1) * page_size + last_page_len tokens from page 3
    assert (indptr[1] - indptr[0] - 1) * 4 + last[0] == 18 - 3 * 4
    mgr.fork(0, 2)
    mgr.append(2, 8)
    assert mgr.release_window(2, 4) == 2  # the child continues from the parent's window start
    assert -1 not in mgr.csr([0, 1, 2]).indices.tolist()
    mgr.check_invariants()
