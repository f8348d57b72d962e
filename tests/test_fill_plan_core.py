"""``pagedkv._core.fill_plan`` on hostile input: inconsistent extents, garbage values. It must
refuse (ok False) or succeed, never read or write out of bounds (CI runs this file under
AddressSanitizer). No torch: the agreement with the numpy oracle is tests/test_serving_path.py's."""

from __future__ import annotations

import numpy as np
import pytest

core = pytest.importorskip("pagedkv._core")


def _outs(rows: int, width: int, tokens: int, first: bool):
    return (np.zeros((rows, width), np.int32), np.zeros(rows, np.int32), np.zeros(rows + 1, np.int32),
            np.zeros(tokens, np.int64), np.zeros(rows, np.int32) if first else None)


def test_a_plain_decode_batch():
    table = np.array([[3, 4, -1], [7, -1, -1]], np.int32)
    lens = np.array([6, 2], np.int32)
    out = _outs(4, 5, 8, False)
    ok, tokens, max_len, max_q = core.fill_plan(table, lens, None, 1, None, None, 4, 10, 0, *out, 3)
    assert (ok, tokens, max_len, max_q) == (True, 3, 6, 1)
    out_table, out_lens, qo, slots, _ = out
    assert out_table[:3].tolist() == [[3, 4, -1, -1, -1], [7, -1, -1, -1, -1], [-1] * 5]
    assert out_lens[:3].tolist() == [6, 2, 0] and qo[:4].tolist() == [0, 1, 2, 3]
    assert slots[:3].tolist() == [4 * 4 + 1, 7 * 4 + 1, -1]


@pytest.mark.parametrize("seed", range(3))
def test_hostile_extents_never_crash(seed):
    rng = np.random.default_rng(seed)
    for _ in range(3000):
        n, width = int(rng.integers(0, 5)), int(rng.integers(0, 6))
        table = rng.integers(-3, 12, (n, width)).astype(np.int32)
        lens = rng.integers(-2, 30, int(rng.choice([n, n, n + 1, max(n - 1, 0)]))).astype(np.int32)
        q_lens = None if rng.random() < 0.5 else rng.integers(-1, 6, int(rng.choice([n, n + 1]))).astype(np.int64)
        slots = None if rng.random() < 0.6 else rng.integers(-2, 60, int(rng.integers(0, 12))).astype(np.int64)
        first = None if rng.random() < 0.7 else rng.integers(-1, 4, int(rng.choice([n, n + 2]))).astype(np.int32)
        rows = int(rng.integers(0, 7))
        outs = _outs(int(rng.integers(0, 7)), int(rng.integers(0, 7)), int(rng.integers(0, 20)),
                     rng.random() < 0.8)
        page_size = int(rng.choice([0, 1, 2, 4, -1]))
        num_pages = int(rng.choice([0, 10, 12, 2**62]))
        window = int(rng.choice([0, 0, 1, 3, -2]))
        ok, tokens, max_len, max_q = core.fill_plan(table, lens, q_lens, int(rng.integers(-1, 3)), slots, first,
                                                    page_size, num_pages, window, *outs, rows)
        if ok:
            assert 0 <= tokens <= outs[3].shape[0] and rows <= outs[0].shape[0]
            assert outs[2][0] == 0 and np.all(np.diff(outs[2][:rows + 1]) >= 0)


def test_inputs_sharing_memory_with_outputs_are_refused():
    # found in review: the core reads its inputs again after writing its outputs
    k, w = 64, 16
    buf = np.full(k + 1, w, np.int32)
    ok = core.fill_plan(np.zeros((k, w), np.int32), buf[:k], np.full(k, w, np.int64), 1, None, None, 1, 1, 0,
                        np.zeros((k, w), np.int32), np.zeros(k, np.int32), buf, np.zeros(k * w, np.int64), None, k)[0]
    assert not ok
    table = np.zeros((2, 3), np.int32)
    assert not core.fill_plan(table, np.array([1, 1], np.int32), None, 1, None, None, 4, 4, 0, table,
                              *_outs(2, 3, 4, False)[1:], 2)[0]


def test_a_huge_page_size_is_not_an_overflow():
    # found in review: cdiv(len, page_size) overflowed to 0 pages near INT64_MAX
    out = _outs(2, 1, 4, False)
    ok, *_ = core.fill_plan(np.array([[-1], [-1]], np.int32), np.array([5, 7], np.int32), None, 1, None, None,
                            2**63 - 1, 1, 0, *out, 2)
    assert not ok  # page -1 holds tokens the batch reads
    ok, tokens, _, _ = core.fill_plan(np.array([[0], [0]], np.int32), np.array([5, 7], np.int32), None, 0, None,
                                      None, 2**62, 1, 0, *_outs(2, 1, 4, False), 2)
    assert ok and tokens == 0
