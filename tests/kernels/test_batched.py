"""The vectorised torch path (``kernels.batched``, the CPU path of ``PagedKVCache``) against the
per-sequence reference, on fragmented NaN-poisoned pools: ragged chunks, decode, windows, soft
caps, live-pages-only tables, quantized pages and padding rows."""

from __future__ import annotations

import itertools

import pytest
import torch

from pagedkv.kernels import batched, quant, reference


def _indptr(query_lens, device):
    return torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=device)


CASES = [
    # seq_lens, query_lens, page_size, group, dtype, window, soft_cap
    ([23, 70, 9, 4], [23, 18, 1, 0], 4, 1, torch.float32, None, None),
    ([23, 70, 9, 4], [5, 18, 1, 2], 16, 4, torch.float32, 7, None),
    ([40, 66], [40, 25], 3, 2, torch.bfloat16, None, 4.0),
    ([1, 130, 17], [1, 1, 1], 8, 8, torch.float32, None, None),  # decode rows as chunks of 1
    ([0, 12, 0], [0, 3, 0], 4, 4, torch.float32, 5, 2.0),  # padding rows: no key
    ([33, 5], [2, 5], 1, 1, torch.float16, 1, None),
]


@pytest.mark.parametrize("seq_lens, query_lens, page_size, group, dtype, window, soft_cap", CASES)
def test_prefill_matches_the_reference(paged_batch, assert_close, seq_lens, query_lens, page_size, group, dtype,
                                       window, soft_cap):
    batch = paged_batch(seq_lens, page_size=page_size, num_kv_heads=2, head_dim=16, dtype=dtype)
    q = torch.randn(sum(query_lens), 2 * group, 16, generator=batch.gen).to(dtype)
    indptr = _indptr(query_lens, q.device)
    options = dict(sm_scale=0.3, sliding_window=window, logits_soft_cap=soft_cap)
    got = batched.paged_attention(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, indptr,
                                  max_q_len=max(query_lens), max_seq_len=max(seq_lens), **options)
    want = reference.paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, indptr,
                                   **options)
    assert_close(got, want)


@pytest.mark.parametrize("group, window, soft_cap", [(1, None, None), (4, 9, None), (2, None, 3.0)])
def test_decode_matches_the_reference(paged_batch, assert_close, group, window, soft_cap):
    seq_lens = [1, 37, 130, 5, 0]
    batch = paged_batch(seq_lens, page_size=16, num_kv_heads=2, head_dim=32, dtype=torch.float32)
    q = torch.randn(len(seq_lens), 2 * group, 32, generator=batch.gen)
    options = dict(sliding_window=window, logits_soft_cap=soft_cap)
    out = torch.full_like(q, float("nan"))
    got = batched.paged_attention(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, None,
                                  max_q_len=1, max_seq_len=130, out=out, **options)
    assert got is out
    want = reference.paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, **options)
    assert_close(got, want)
    assert got[-1].eq(0).all(), "a sequence with no key must give zeros"


def test_live_page_tables_match_the_reference(paged_batch, assert_close):
    # rows that start at first_page (window_tables): the released pages are simply not there
    seq_lens = [50, 21]
    batch = paged_batch(seq_lens, page_size=4, num_kv_heads=1, head_dim=16, dtype=torch.float32, extra_cols=0)
    first = torch.tensor([9, 2], dtype=torch.int32)
    live = torch.full_like(batch.page_table, -1)
    for i, start in enumerate(first.tolist()):
        row = batch.page_table[i, start:]
        live[i, :row.shape[0]] = row
    q = torch.randn(2, 2, 16, generator=batch.gen)
    got = batched.paged_attention(q, batch.k_cache, batch.v_cache, live, batch.seq_lens, None, max_q_len=1,
                                  max_seq_len=50, sliding_window=8, first_page=first)
    want = reference.paged_decode(q, batch.k_cache, batch.v_cache, live, batch.seq_lens, sliding_window=8,
                                  first_page=first)
    assert_close(got, want)


@pytest.mark.parametrize("fmt_name, per_token", [("int8", True), ("fp8_e4m3", False)])
def test_quantized_pages_match_the_reference(assert_close, fmt_name, per_token):
    gen = torch.Generator().manual_seed(3)
    fmt = quant.kv_format(fmt_name)
    num_pages, page_size, heads, dim = 10, 4, 2, 16
    k_cache = torch.zeros(num_pages, page_size, heads, dim, dtype=fmt.dtype)
    v_cache = torch.zeros_like(k_cache)
    scales = {}
    if per_token:
        scales = dict(k_scale_cache=torch.zeros(num_pages, page_size, heads), v_scale_cache=torch.zeros(num_pages,
                                                                                                       page_size, heads))
    else:
        scales = dict(k_scale=0.02, v_scale=0.03)
    table = torch.tensor([[3, 7, 1, -1], [5, 0, -1, -1]], dtype=torch.int32)
    lens = torch.tensor([11, 6], dtype=torch.int32)
    slots = torch.tensor([table[i, p // page_size] * page_size + p % page_size
                          for i, n in enumerate(lens.tolist()) for p in range(n)])
    k = torch.randn(slots.shape[0], heads, dim, generator=gen)
    v = torch.randn(slots.shape[0], heads, dim, generator=gen)
    reference.write_kv(k, v, k_cache, v_cache, slots, **scales)
    q = torch.randn(5, 4, dim, generator=gen)
    indptr = _indptr([3, 2], q.device)
    got = batched.paged_attention(q, k_cache, v_cache, table, lens, indptr, max_q_len=3, max_seq_len=11, **scales)
    want = reference.paged_prefill(q, k_cache, v_cache, table, lens, indptr, **scales)
    assert_close(got, want)
