"""The persistent page table (``bind_table`` / ``set_row``): both backends keep a caller-owned
table identical, and equal to the tables they would build, after every operation."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

from pagedkv import BlockManager, InvalidArgument, InvalidType, UnknownSequence
from pagedkv.block_manager import NULL_PAGE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_parity import Lockstep, drain, random_tier_op  # noqa: E402

ROWS, WIDTH = 6, 5


def _expected(mgr: BlockManager) -> tuple[np.ndarray, np.ndarray]:
    """The table a bound manager must hold: each bound sequence's page table (none while
    swapped out) and token count, every other row empty."""
    table = np.full((ROWS, WIDTH), NULL_PAGE, dtype=np.int32)
    lens = np.zeros(ROWS, dtype=np.int32)
    for seq_id in mgr.snapshot()["tables"]:
        row = mgr.row_of(seq_id)
        if row is None:
            continue
        if not mgr.is_swapped(seq_id):
            pages = mgr.page_table(seq_id)
            table[row, :len(pages)] = pages
        lens[row] = mgr.num_tokens(seq_id)
    return table, lens


@pytest.mark.parametrize("seed", range(4))
def test_both_backends_keep_the_bound_table_current(seed):
    rng = random.Random(seed)
    lock = Lockstep(14, 2, num_cpu_pages=6, enable_prefix_caching=seed % 2 == 0)
    arrays = {}
    for name in ("cpp", "py"):
        arrays[name] = (np.zeros((ROWS, WIDTH), dtype=np.int32), np.zeros(ROWS, dtype=np.int32))
        getattr(lock, name).bind_table(*arrays[name])
    counts = {"bound": 0, "row_taken": 0}
    next_id = 1000
    for _ in range(400):
        live = sorted(lock.py.snapshot()["tables"])
        r = rng.random()
        if r < 0.2 and len(live) < 6:
            lock.do("allocate", next_id, rng.randint(1, 9))
            next_id += 1
        elif live and r < 0.55:
            seq_id = rng.choice(live + [999])
            row = rng.choice([None, rng.randrange(ROWS + 1)])
            outcome = lock.do("set_row", seq_id, row)
            if outcome[0] == "returned" and row is not None:
                counts["bound"] += 1
            elif outcome[0] == "raised" and "is bound to" in outcome[2]:
                counts["row_taken"] += 1
        elif live and r < 0.75:
            # the calls that change a bound sequence's row, on a random bound one
            bound = [s for s in live if lock.py.row_of(s) is not None] or live
            seq_id = rng.choice(bound)
            op = rng.choice(["swap_out", "swap_in", "append", "append", "release_window", "free"])
            if op in ("swap_out", "swap_in"):
                lock.do(op, [seq_id])
                lock.do("end_step")
            elif op == "append":
                lock.do("append_batch", [seq_id], rng.randint(1, 4))
            elif op == "release_window":
                lock.do("release_window", seq_id, rng.randint(1, 6))
            else:
                lock.do("free", seq_id)
            counts[op] = counts.get(op, 0) + 1
        else:
            random_tier_op(rng, lock)
        for name in ("cpp", "py"):
            table, lens = arrays[name]
            want_table, want_lens = _expected(getattr(lock, name))
            assert np.array_equal(table, want_table), (name, table, want_table, lock.ops[-3:])
            assert np.array_equal(lens, want_lens), (name, lens, want_lens, lock.ops[-3:])
    drain(lock)
    assert counts["bound"] > 20 and counts["row_taken"] > 0, counts
    assert np.array_equal(arrays["cpp"][0], np.full((ROWS, WIDTH), NULL_PAGE))  # drained: rows cleared


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_an_append_past_the_row_changes_nothing(backend):
    mgr = BlockManager(32, 4, backend=backend)
    table, lens = np.zeros((2, 3), dtype=np.int32), np.zeros(2, dtype=np.int32)
    mgr.bind_table(table, lens)
    mgr.allocate(0, 10)
    mgr.allocate(1, 2)
    mgr.set_row(0, 1)
    mgr.set_row(1, 0)
    before = (mgr.snapshot(), table.copy(), lens.copy())
    with pytest.raises(InvalidArgument, match=r"num_tokens must be at most what fits in sequence 0's table row "
                                              r"\(3 pages wide\), got 3"):
        mgr.append_batch([1, 0], [1, 3])
    with pytest.raises(InvalidArgument, match="num_tokens"):
        mgr.append(0, 3)
    assert (mgr.snapshot(), table.tolist(), lens.tolist()) == (before[0], before[1].tolist(), before[2].tolist())
    mgr.append_batch([1, 0], [1, 2])  # 12 tokens: exactly 3 pages
    assert lens.tolist() == [3, 12] and table[1].tolist() == mgr.page_table(0)
    with pytest.raises(InvalidArgument, match=r"row must be a row for sequence 0 only if its 3 pages fit"):
        mgr.bind_table(np.zeros((2, 2), dtype=np.int32)) or mgr.set_row(0, 0)


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_bad_tables_and_rows_are_typed_errors(backend):
    mgr = BlockManager(8, 4, backend=backend)
    mgr.allocate(0, 4)
    with pytest.raises(InvalidArgument, match="row must be a row of the table bound with bind_table"):
        mgr.set_row(0, 0)  # no table bound
    for bad in (np.zeros((2, 3), dtype=np.int64), np.zeros(3, dtype=np.int32), np.zeros((3, 2), dtype=np.int32).T,
                np.zeros((2, 2), dtype=np.int32)[:, :1]):
        with pytest.raises(InvalidArgument, match="page_table"):
            mgr.bind_table(bad)
    frozen = np.zeros((2, 2), dtype=np.int32)
    frozen.flags.writeable = False
    with pytest.raises(InvalidArgument, match="page_table"):
        mgr.bind_table(frozen)
    with pytest.raises(InvalidType, match="page_table"):
        mgr.bind_table([[0, 1]])
    with pytest.raises(InvalidArgument, match="seq_lens"):
        mgr.bind_table(np.zeros((2, 2), dtype=np.int32), np.zeros(3, dtype=np.int32))
    mgr.bind_table(np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(InvalidArgument, match=r"row must be a row of the table bound with bind_table \(it has 2 rows\)"):
        mgr.set_row(0, 2)
    with pytest.raises(InvalidArgument, match="row must be an int"):
        mgr.set_row(0, -1)
    with pytest.raises(UnknownSequence):
        mgr.set_row(7, 0)
    mgr.set_row(0, 1)
    assert mgr.row_of(0) == 1
    mgr.set_row(0, None)
    assert mgr.row_of(0) is None
    mgr.bind_table(None)
    with pytest.raises(InvalidArgument, match="row"):
        mgr.set_row(0, 0)


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_a_bound_sequence_stays_within_an_int32_token_count(backend):
    # found in review: the row's token count is int32, as page_tables' seq_lens
    from pagedkv import SequenceTooLong

    mgr = BlockManager(8, 2**30, backend=backend)
    table, lens = np.full((2, 4), -1, np.int32), np.zeros(2, np.int32)
    mgr.bind_table(table, lens)
    mgr.allocate(0, 2**31 - 1)
    mgr.set_row(0, 0)
    before = (mgr.snapshot(), table.tolist(), lens.tolist())
    for call in (lambda: mgr.append(0, 10), lambda: mgr.append_batch([0], 10)):
        with pytest.raises(SequenceTooLong):
            call()
    assert (mgr.snapshot(), table.tolist(), lens.tolist()) == before
    mgr.set_row(0, None)
    mgr.append(0, 10)
    with pytest.raises(SequenceTooLong):
        mgr.set_row(0, 1)
    assert mgr.row_of(0) is None and table.tolist() == [[-1] * 4] * 2


def test_append_batch_errors_do_not_depend_on_the_backend_or_the_recorder(tmp_path):
    # found in review: the C++ path once checked num_tokens before the ids
    errors = []
    for backend, record in (("cpp", None), ("cpp", tmp_path / "t.jsonl"), ("python", None)):
        mgr = BlockManager(8, 4, backend=backend, record=record)
        mgr.allocate(0, 3)
        got = []
        for ids, n in ((np.array([-1, 0]), 0), (np.array([-1, 0]), 1), (np.array([0, -3, -7]), [1, 1])):
            with pytest.raises(InvalidArgument) as info:
                mgr.append_batch(ids, n)
            got.append(str(info.value))
        errors.append(got)
    assert errors[0] == errors[1] == errors[2]
    assert "seq_ids" in errors[0][0] and "got -7" in errors[0][2]
