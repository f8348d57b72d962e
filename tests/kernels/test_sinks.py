"""Attention sinks (gpt-oss): the reference against a closed form, and paged_decode /
paged_prefill against the reference (interpreter by default; see conftest.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from pagedkv.errors import InvalidArgument, InvalidType
from pagedkv.kernels import paged_decode, paged_prefill, reference


def test_reference_sink_scales_each_head_by_its_share_of_the_denominator():
    """A sink is a key with score s and a zero value: out = out_without * Z / (Z + e^s), with Z
    the sum of the real keys' exp(scores) (an oracle independent of the implementation)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 4, 16, generator=gen, dtype=torch.float64)
    keys = torch.randn(9, 2, 16, generator=gen, dtype=torch.float64)
    values = torch.randn(9, 2, 16, generator=gen, dtype=torch.float64)
    positions = torch.arange(4, 9)
    sinks = torch.tensor([0.5, -2.0, 3.0, 0.0], dtype=torch.float64)
    plain = reference.attend(q, keys, values, positions, sliding_window=3)
    got = reference.attend(q, keys, values, positions, sliding_window=3, sinks=sinks)
    scale = 16 ** -0.5
    k = keys.repeat_interleave(2, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    key_pos = torch.arange(9)
    mask = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - 3)
    z = (scores.exp() * mask[None]).sum(-1)  # [heads, queries]
    share = (z / (z + sinks.exp()[:, None])).T[..., None]  # [queries, heads, 1]
    torch.testing.assert_close(got, plain * share)
    assert (got.norm(dim=-1) < plain.norm(dim=-1)).all()


def _sinks(num_heads, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(num_heads, generator=gen)).to(device)


@pytest.mark.parametrize("num_splits, window, dtype", [
    (1, None, torch.float32),
    (3, None, torch.float16),
    (1, 8, torch.float32),
    (4, 20, torch.bfloat16),
    (2, 1, torch.float32),
])
def test_decode_with_sinks_matches_reference(paged_batch, device, assert_close, num_splits, window, dtype):
    batch = paged_batch([1, 37, 130, 0], page_size=16, num_kv_heads=2, head_dim=64, dtype=dtype)
    q = (2 * torch.randn(4, 8, 64, generator=batch.gen)).to(dtype).to(device)
    sinks = _sinks(8, device)
    got = paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, sinks=sinks,
                       sliding_window=window, num_splits=num_splits)
    want = reference.paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, sinks=sinks,
                                  sliding_window=window)
    assert_close(got, want)
    plain = paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, sliding_window=window,
                         num_splits=num_splits)
    assert not torch.allclose(got[1:3].float(), plain[1:3].float(), atol=1e-3)  # the sinks changed the output


@pytest.mark.parametrize("window, dtype", [(None, torch.float32), (5, torch.float16), (16, torch.bfloat16)])
def test_prefill_with_sinks_matches_reference(paged_batch, device, assert_close, window, dtype):
    seq_lens, query_lens = [40, 66, 9], [40, 25, 1]
    batch = paged_batch(seq_lens, page_size=16, num_kv_heads=2, head_dim=64, dtype=dtype)
    q = (2 * torch.randn(sum(query_lens), 8, 64, generator=batch.gen)).to(dtype).to(device)
    qo_indptr = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=device)
    sinks = _sinks(8, device, seed=2)
    got = paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, qo_indptr, sinks=sinks,
                        sliding_window=window)
    want = reference.paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, qo_indptr,
                                   sinks=sinks, sliding_window=window)
    assert_close(got, want)


def test_bad_sinks_are_named(paged_batch, device):
    batch = paged_batch([5], page_size=4, num_kv_heads=1, head_dim=64, dtype=torch.float32)
    q = torch.randn(1, 2, 64).to(device)
    for sinks, error in [(torch.zeros(3, device=device), InvalidArgument), ([0.0, 1.0], InvalidType),
                         (torch.zeros(2, dtype=torch.int32, device=device), InvalidArgument)]:
        with pytest.raises(error) as info:
            paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, sinks=sinks)
        assert "sinks" in str(info.value)


@pytest.mark.parametrize("soft_cap, window", [(None, None), (None, 6), (4.0, None)])
def test_torch_batched_path_with_sinks_matches_reference(paged_batch, soft_cap, window):
    """PagedKVCache's CPU backend (kernels.batched) against the reference, ragged prefill."""
    from pagedkv.kernels import batched

    seq_lens, query_lens = [40, 66, 9, 3], [40, 25, 1, 0]
    batch = paged_batch(seq_lens, page_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    q = 2 * torch.randn(sum(query_lens), 8, 64, generator=batch.gen)
    qo_indptr = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32)
    sinks = _sinks(8, "cpu", seed=4)
    got = batched.paged_attention(q, batch.k_cache.cpu(), batch.v_cache.cpu(), batch.page_table.cpu(),
                                  batch.seq_lens.cpu(), qo_indptr, max_q_len=40, max_seq_len=66, sinks=sinks,
                                  logits_soft_cap=soft_cap, sliding_window=window)
    want = reference.paged_prefill(q, batch.k_cache.cpu(), batch.v_cache.cpu(), batch.page_table.cpu(),
                                   batch.seq_lens.cpu(), qo_indptr, sinks=sinks, logits_soft_cap=soft_cap,
                                   sliding_window=window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
