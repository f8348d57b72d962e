"""paged_prefill against the torch reference (interpreter by default; see conftest.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from pagedkv.errors import InvalidArgument
from pagedkv.kernels import paged_decode, paged_prefill, reference

PAGE_SIZES = (1, 3, 16)
GROUPS = (1, 4, 8)
HEAD_DIMS = (64, 80, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _qo_indptr(query_lens, device):
    return torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=device)


def _run(batch, q, qo_indptr, **options):
    got = paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, qo_indptr, **options)
    options.pop("max_q_len", None)
    want = reference.paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, qo_indptr,
                                   **options)
    return got, want


# NOTE: every (page_size, group, head_dim) triple once (27 interpreter runs); the dtype rotates
# with the group and head-dim indices so that every dtype meets every head dim and group.
@pytest.mark.parametrize("page_size, group, head_dim, dtype", [
    pytest.param(ps, g, d, DTYPES[(b + c) % 3], id=f"ps{ps}-g{g}-d{d}-{str(DTYPES[(b + c) % 3])[6:]}")
    for ps, (b, g), (c, d) in itertools.product(PAGE_SIZES, enumerate(GROUPS), enumerate(HEAD_DIMS))
])
def test_matches_reference(paged_batch, device, assert_close, page_size, group, head_dim, dtype):
    # a whole prompt, a chunk after a cached prefix (chunked prefill / prefix-cache hit), a
    # decode-like single token, and a sequence with no new token, in one batch
    seq_lens = [23, 70, 9, 4]
    query_lens = [23, 18, 1, 0]
    batch = paged_batch(seq_lens, page_size=page_size, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    q = torch.randn(sum(query_lens), 2 * group, head_dim, generator=batch.gen).to(dtype).to(device)
    got, want = _run(batch, q, _qo_indptr(query_lens, device))
    assert_close(got, want)


@pytest.mark.parametrize("window, soft_cap, dtype", [
    (5, None, torch.float32),
    (1, None, torch.float16),
    (None, 4.0, torch.float32),
    (16, 3.0, torch.bfloat16),
])
def test_window_and_soft_cap(paged_batch, device, assert_close, window, soft_cap, dtype):
    seq_lens, query_lens = [40, 66], [40, 25]
    batch = paged_batch(seq_lens, page_size=16, num_kv_heads=2, head_dim=64, dtype=dtype)
    q = (3 * torch.randn(sum(query_lens), 8, 64, generator=batch.gen)).to(dtype).to(device)
    got, want = _run(batch, q, _qo_indptr(query_lens, device), sliding_window=window, logits_soft_cap=soft_cap)
    assert_close(got, want)


def test_pages_released_before_the_window_are_never_read(paged_batch, device, assert_close):
    window, seq_lens, query_lens = 6, [40, 30], [5, 12]
    batch = paged_batch(seq_lens, page_size=3, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    for i, (n, q_len) in enumerate(zip(seq_lens, query_lens)):
        released = max(n - q_len - window + 1, 0) // 3  # pages before the first query's window
        batch.v_cache[batch.page_table[i, :released].long()] = float("nan")
        batch.page_table[i, :released] = -1
    q = torch.randn(sum(query_lens), 4, 64, generator=batch.gen).to(device)
    got, want = _run(batch, q, _qo_indptr(query_lens, device), sliding_window=window)
    assert_close(got, want)


@pytest.mark.parametrize("head_dim, group", [(96, 16), (256, 1)])
def test_other_head_dims_and_mqa(paged_batch, device, assert_close, head_dim, group):
    seq_lens, query_lens = [12, 30], [5, 30]
    batch = paged_batch(seq_lens, page_size=3, num_kv_heads=1, head_dim=head_dim, dtype=torch.float16)
    q = torch.randn(sum(query_lens), group, head_dim, generator=batch.gen).half().to(device)
    got, want = _run(batch, q, _qo_indptr(query_lens, device), max_q_len=30)
    assert_close(got, want)


def test_single_token_chunks_equal_decode(paged_batch, device, assert_close):
    batch = paged_batch([1, 45, 17], page_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    q = torch.randn(3, 8, 64, generator=batch.gen).to(device)
    prefill_out = paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens,
                                _qo_indptr([1, 1, 1], device), max_q_len=1)
    decode_out = paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, num_splits=2)
    assert_close(prefill_out, decode_out)


def test_max_q_len_bounds_the_grid(paged_batch, device, assert_close):
    # max_q_len exactly the longest chunk gives the same result as the default bound
    seq_lens, query_lens = [20, 33], [20, 7]
    batch = paged_batch(seq_lens, page_size=3, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    q = torch.randn(27, 4, 64, generator=batch.gen).half().to(device)
    indptr = _qo_indptr(query_lens, device)
    exact = paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, indptr, max_q_len=20)
    default = paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, indptr)
    assert torch.equal(exact, default)


def test_validation_names_the_tensor(paged_batch, device):
    batch = paged_batch([4, 4], page_size=3, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    q = torch.zeros(5, 4, 64, dtype=torch.float16, device=device)
    with pytest.raises(InvalidArgument, match=r"qo_indptr must be of shape \[num_seqs \+ 1\] = \[3\], got \[2\]"):
        paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens,
                      torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(InvalidArgument, match=r"out must be of shape \[num_tokens, num_heads, head_dim\]"):
        paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens,
                      _qo_indptr([2, 3], device), out=torch.zeros(4, 4, 64, dtype=torch.float16, device=device))
    with pytest.raises(InvalidArgument, match=r"logits_soft_cap must be a positive finite float or None, got -1.0"):
        paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens,
                      _qo_indptr([2, 3], device), logits_soft_cap=-1.0)


def test_live_page_tables_with_a_first_page_offset(paged_batch, device, assert_close):
    window, seq_lens, query_lens = 6, [40, 30], [5, 12]
    batch = paged_batch(seq_lens, page_size=3, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    full = batch.page_table.clone()
    live = torch.full_like(full, -1)
    first = [max(n - q_len - window + 1, 0) // 3 for n, q_len in zip(seq_lens, query_lens)]
    for i, f in enumerate(first):
        batch.v_cache[full[i, :f].long()] = float("nan")
        live[i, : full.shape[1] - f] = full[i, f:]
    first_page = torch.tensor(first, dtype=torch.int32, device=device)
    q = torch.randn(sum(query_lens), 4, 64, generator=batch.gen).to(device)
    qo_indptr = _qo_indptr(query_lens, device)
    got = paged_prefill(q, batch.k_cache, batch.v_cache, live, batch.seq_lens, qo_indptr, sliding_window=window,
                        first_page=first_page)
    _, want = _run(batch, q, qo_indptr, sliding_window=window)
    assert_close(got, want)
    with pytest.raises(InvalidArgument, match="first_page"):
        paged_prefill(q, batch.k_cache, batch.v_cache, live, batch.seq_lens, qo_indptr,
                      first_page=first_page.to(torch.int64))


@pytest.mark.parametrize("head_dim, dtype", [(8, torch.float16), (24, torch.bfloat16), (72, torch.float32)])
def test_head_dims_that_are_multiples_of_8(paged_batch, device, assert_close, head_dim, dtype):
    seq_lens, query_lens = [9, 20], [9, 6]
    batch = paged_batch(seq_lens, page_size=4, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    q = torch.randn(sum(query_lens), 4, head_dim, generator=batch.gen).to(dtype).to(device)
    got, want = _run(batch, q, _qo_indptr(query_lens, device))
    assert_close(got, want)
