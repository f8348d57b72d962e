"""Chunked-local attention (Llama 4's ``attention_chunk_size``): a query at position ``p`` sees
``[p // C * C, p]``. The reference against a brute-force mask, paged_decode / paged_prefill and
the CPU batched path against the reference (interpreter by default; see conftest.py), with the
pages before each sequence's chunk released (-1, their data NaN), and PagedKVCache plans."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pagedkv.errors import InvalidArgument, InvalidType
from pagedkv.kernels import batched, paged_decode, paged_prefill, reference


def test_reference_chunk_mask_equals_attention_over_the_chunk_alone():
    """Each query's output equals plain causal attention over the keys of its own chunk only
    (an oracle that slices instead of masking)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(11, 4, 16, generator=gen, dtype=torch.float64)
    keys = torch.randn(23, 2, 16, generator=gen, dtype=torch.float64)
    values = torch.randn(23, 2, 16, generator=gen, dtype=torch.float64)
    positions = torch.arange(12, 23)
    got = reference.attend(q, keys, values, positions, attention_chunk_size=5)
    for j, p in enumerate(positions.tolist()):
        start = p // 5 * 5
        alone = reference.attend(q[j:j + 1], keys[start:p + 1], values[start:p + 1], torch.tensor([p]),
                                 key_start=start)
        torch.testing.assert_close(got[j:j + 1], alone, atol=1e-6, rtol=1e-6)  # attend runs in fp32


def _release_before(batch, starts, page_size):
    """Release (-1) every page wholly before ``starts[i]`` in row ``i``, NaN-ing its data."""
    table = batch.page_table.cpu()
    for row, start in enumerate(starts):
        for col in range(start // page_size):
            page = int(table[row, col])
            if page >= 0:
                batch.k_cache[page] = float("nan")
                batch.v_cache[page] = float("nan")
                table[row, col] = -1
    batch.page_table.copy_(table.to(batch.page_table.device))


@pytest.mark.parametrize("chunk, page_size, num_splits, dtype", [
    (8, 4, 1, torch.float32),
    (16, 16, 3, torch.float16),
    (6, 4, 2, torch.float32),  # a chunk that is not a multiple of the page size
    (3, 16, 1, torch.bfloat16),  # a chunk smaller than a page
    (64, 16, 4, torch.float32),
])
def test_decode_chunked_matches_reference(paged_batch, device, assert_close, chunk, page_size, num_splits, dtype):
    seq_lens = [1, 37, 130, 0, 16]
    batch = paged_batch(seq_lens, page_size=page_size, num_kv_heads=2, head_dim=64, dtype=dtype)
    _release_before(batch, [max(n - 1, 0) // chunk * chunk for n in seq_lens], page_size)
    q = (2 * torch.randn(len(seq_lens), 8, 64, generator=batch.gen)).to(dtype).to(device)
    got = paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens,
                       attention_chunk_size=chunk, num_splits=num_splits)
    want = reference.paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens,
                                  attention_chunk_size=chunk)
    assert torch.isfinite(got.float()).all()
    assert_close(got, want)


@pytest.mark.parametrize("chunk, page_size, dtype", [(8, 4, torch.float32), (16, 16, torch.float16),
                                                     (12, 4, torch.bfloat16), (5, 16, torch.float32)])
def test_prefill_chunked_matches_reference(paged_batch, device, assert_close, chunk, page_size, dtype):
    seq_lens, query_lens = [40, 66, 9, 33], [40, 25, 1, 14]
    batch = paged_batch(seq_lens, page_size=page_size, num_kv_heads=2, head_dim=64, dtype=dtype)
    _release_before(batch, [(n - q) // chunk * chunk for n, q in zip(seq_lens, query_lens)], page_size)
    q = (2 * torch.randn(sum(query_lens), 8, 64, generator=batch.gen)).to(dtype).to(device)
    qo_indptr = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=device)
    got = paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, qo_indptr,
                        attention_chunk_size=chunk)
    want = reference.paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, qo_indptr,
                                   attention_chunk_size=chunk)
    assert torch.isfinite(got.float()).all()
    assert_close(got, want)
    # a chunk changes the result wherever a query has keys before its chunk
    full = reference.paged_prefill(q, *(t.nan_to_num(0.0) for t in (batch.k_cache, batch.v_cache)),
                                   batch.page_table.clamp(min=0), batch.seq_lens, qo_indptr)
    assert not torch.allclose(want[:40].float(), full[:40].float(), atol=1e-3)


def test_torch_batched_path_chunked_matches_reference(paged_batch):
    seq_lens, query_lens = [40, 66, 9, 3], [40, 25, 1, 0]
    batch = paged_batch(seq_lens, page_size=4, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    _release_before(batch, [(n - q) // 8 * 8 for n, q in zip(seq_lens, query_lens)], 4)
    q = 2 * torch.randn(sum(query_lens), 8, 64, generator=batch.gen)
    qo_indptr = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32)
    args = (q, batch.k_cache.cpu(), batch.v_cache.cpu(), batch.page_table.cpu(), batch.seq_lens.cpu(), qo_indptr)
    got = batched.paged_attention(*args, max_q_len=40, max_seq_len=66, attention_chunk_size=8)
    want = reference.paged_prefill(*args, attention_chunk_size=8)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_bad_chunk_options_are_named(paged_batch, device):
    batch = paged_batch([5], page_size=4, num_kv_heads=1, head_dim=64, dtype=torch.float32)
    q = torch.randn(1, 2, 64).to(device)
    for options, error in [(dict(attention_chunk_size=0), InvalidArgument), (dict(attention_chunk_size=2.0), InvalidType),
                           (dict(attention_chunk_size=True), InvalidType),
                           (dict(attention_chunk_size=2**31), InvalidArgument),  # plan's int32 bound
                           (dict(attention_chunk_size=8, sliding_window=4), InvalidArgument)]:
        with pytest.raises(error) as info:
            paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, **options)
        assert "attention_chunk_size" in str(info.value)


@pytest.mark.parametrize("buffered", [False, True])
def test_cache_plans_a_chunked_group_with_released_pages(buffered):
    """``PagedKVCache.plan(attention_chunk_size=C)`` accepts -1 entries before each sequence's
    chunk (host and C++ paths), refuses one inside it, and its plan takes only that chunk."""
    from pagedkv import PageTables
    from pagedkv.cache import PagedKVCache

    cache = PagedKVCache(1, 16, 4, 2, 64, dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(0)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=gen))
    # position 21 is in chunk [16, 24): pages 0..3 (positions 0..15) may be released
    table = np.array([[-1, -1, -1, -1, 4, 5]], dtype=np.int32)
    tables = PageTables(table, np.array([22], dtype=np.int32))
    buffers = cache.plan_buffers(4, 16, 8) if buffered else None
    plan = cache.plan(tables, buffers=buffers, attention_chunk_size=8)
    q = torch.randn(1, 4, 64, generator=gen)
    got = cache.decode(0, q, plan, attention_chunk_size=8)
    keys = cache.kv[0, 0, [4, 5]].reshape(8, 2, 64)[:6]
    values = cache.kv[0, 1, [4, 5]].reshape(8, 2, 64)[:6]
    want = reference.attend(q, keys, values, torch.tensor([21]), key_start=16)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for options in (dict(), dict(attention_chunk_size=16), dict(sliding_window=4)):
        with pytest.raises(InvalidArgument) as info:
            cache.decode(0, q, plan, **options)
        assert "the chunk the plan was built for" in str(info.value)
    for bad, chunk in ((np.array([[-1, -1, -1, -1, -1, 5]], dtype=np.int32), 8),  # a page inside the chunk
                       (table, 32)):  # chunk [0, 32): every page is read
        with pytest.raises(InvalidArgument) as info:
            cache.plan(PageTables(bad, np.array([22], dtype=np.int32)), buffers=buffers, attention_chunk_size=chunk)
        assert "page_table[0]" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        cache.plan(tables, buffers=buffers, attention_chunk_size=8, sliding_window=4)
    assert "attention_chunk_size" in str(info.value)
