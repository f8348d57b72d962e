"""``write_kv``: scatter new K/V tokens into their pages by slot mapping (Triton).

Imports torch and triton; ``pagedkv/__init__.py`` never imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as common


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_slot, stride_cache_head,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
):
    token = tl.program_id(0)
    head_block = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # NOTE: slot -1 marks a padding token: nothing is written for it.
        heads = head_block * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
        dims = tl.arange(0, D_PAD)
        mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < HEAD_DIM)
        src_k = k_ptr + token.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + dims[None, :]
        src_v = v_ptr + token.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :]
        dst = slot * stride_cache_slot + heads[:, None] * stride_cache_head + dims[None, :]
        tl.store(k_cache_ptr + dst, tl.load(src_k, mask=mask), mask=mask)
        tl.store(v_cache_ptr + dst, tl.load(src_v, mask=mask), mask=mask)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write each new token's K and V into the cache slot the block manager gave it.

    Args:
        k: ``[num_tokens, num_kv_heads, head_dim]``, the cache's dtype; token and head strides
            are free (a slice of a fused QKV projection works), the last dimension contiguous.
        v: like ``k``.
        k_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, contiguous.
        v_cache: like ``k_cache``.
        slot_mapping: int32 or int64 ``[num_tokens]``; ``page_id * page_size + offset`` per
            token, or -1 to skip the token (padding). Slots are not range-checked on the device
            (that would need a sync); ``PagedKVCache.plan`` checks them on the host.

    Raises:
        InvalidType / InvalidArgument: a tensor with the wrong shape, dtype, device or layout.
    """
    _, _, num_kv_heads, head_dim = common.check_cache_pair(k_cache, v_cache)
    names = "[num_tokens, num_kv_heads, head_dim]"
    common.check_tensor("k", k, names, (None, num_kv_heads, head_dim), like=("k_cache", k_cache),
                        device=k_cache.device)
    num_tokens = k.shape[0]
    common.check_tensor("v", v, names, (num_tokens, num_kv_heads, head_dim), like=("k_cache", k_cache),
                        device=k_cache.device)
    common.check_tensor("slot_mapping", slot_mapping, "[num_tokens]", (num_tokens,), dtypes=common.INDEX_DTYPES,
                        device=k_cache.device, contiguous=True)
    if num_tokens == 0:
        return
    d_pad = triton.next_power_of_2(head_dim)
    heads_per_program = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // d_pad))
    grid = (num_tokens, triton.cdiv(num_kv_heads, heads_per_program))
    _write_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        num_kv_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, D_PAD=d_pad, HEADS_PER_PROGRAM=heads_per_program,
        num_warps=4,
    )
