"""write_kv against the torch reference (interpreter by default; see conftest.py)."""

from __future__ import annotations

import pytest
import torch

from pagedkv.errors import InvalidArgument
from pagedkv.kernels import reference, write_kv


@pytest.mark.parametrize("page_size, num_kv_heads, head_dim, dtype, slot_dtype", [
    (1, 1, 64, torch.float32, torch.int64),
    (3, 8, 80, torch.float16, torch.int32),
    (16, 2, 128, torch.bfloat16, torch.int64),
    (16, 3, 256, torch.float16, torch.int64),
])
def test_matches_reference(device, page_size, num_kv_heads, head_dim, dtype, slot_dtype):
    gen = torch.Generator().manual_seed(1)
    num_pages, num_tokens = 12, 9
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens]
    slots[[2, 5]] = -1  # padding tokens: not written
    slots = slots.to(slot_dtype).to(device)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    write_kv(k, v, k_cache, v_cache, slots)
    reference.write_kv(k, v, want_k, want_v, slots)
    assert torch.equal(k_cache.nan_to_num(7.0), want_k.nan_to_num(7.0))  # bit-exact, untouched slots still NaN
    assert torch.equal(v_cache.nan_to_num(7.0), want_v.nan_to_num(7.0))
    assert int(k_cache.isnan().flatten(0, 1).all(dim=(1, 2)).sum()) == num_pages * page_size - (num_tokens - 2)


def test_strided_slice_of_fused_qkv(device):
    # k and v are head slices of one [num_tokens, heads, head_dim] projection output
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(5, 4 + 2 + 2, 64, generator=gen).half().to(device)
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    k_cache = torch.zeros(4, 3, 2, 64, dtype=torch.float16, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 4, 5, 11, -1], device=device)
    write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 2, 64)[slots[:4]], k[:4])
    assert torch.equal(v_cache.view(-1, 2, 64)[slots[:4]], v[:4])


def test_validation_names_the_tensor(device):
    cache = torch.zeros(4, 3, 2, 64, dtype=torch.float16, device=device)
    k = torch.zeros(5, 2, 64, dtype=torch.float16, device=device)
    slots = torch.zeros(5, dtype=torch.int64, device=device)
    with pytest.raises(InvalidArgument, match=r"k must be of shape \[num_tokens, num_kv_heads, head_dim\] = "
                                              r"\[num_tokens, 2, 64\], got \[5, 3, 64\]"):
        write_kv(torch.zeros(5, 3, 64, dtype=torch.float16, device=device), k, cache, cache.clone(), slots)
    with pytest.raises(InvalidArgument, match=r"v must be of shape .* = \[5, 2, 64\], got \[4, 2, 64\]"):
        write_kv(k, k[:4], cache, cache.clone(), slots)
    with pytest.raises(InvalidArgument, match=r"slot_mapping must be of dtype torch.int32 or torch.int64"):
        write_kv(k, k, cache, cache.clone(), slots.float())
    with pytest.raises(InvalidArgument, match=r"k must be contiguous in its last dimension"):
        write_kv(k.transpose(0, 2).contiguous().transpose(0, 2), k, cache, cache.clone(), slots)
