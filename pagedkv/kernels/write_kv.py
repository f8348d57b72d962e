"""``write_kv``: scatter new K/V tokens into their pages by slot mapping (Triton).

Float pages receive the tokens as they are; int8 / fp8_e4m3 pages receive them quantized
(``pagedkv.kernels.quant`` defines the arithmetic, and this kernel follows it bit for bit).

Imports torch and triton; ``pagedkv/__init__.py`` never imports this module.
"""

from __future__ import annotations

import functools

from .._optional import require

torch = require("torch", __name__)
triton = require("triton", __name__)
tl = require("triton.language", __name__)

from . import _common as common  # noqa: E402
from . import quant  # noqa: E402

#: ``1.5 * 2**23``: adding and subtracting it rounds an fp32 of magnitude < 2**22 to an integer,
#: ties to even (fp32 addition rounds to nearest even).
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _round_int(y):
    """Round fp32 ``y`` (|y| < 2**22) to the nearest integer, ties to even."""
    # NOTE: no libdevice rint (the interpreter cannot run it); LLVM does not fold (y + M) - M
    # without fast-math flags, which Triton does not set (checked in the sm_90 PTX: add, add).
    return (y + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def _round_e4m3(y):
    """Round fp32 ``y`` (|y| <= 448) to the nearest e4m3 value, ties to even (result in fp32)."""
    # NOTE: rounding here, in fp32 arithmetic, makes the cast to tl.float8e4nv exact on every
    # path: the sm_90 cvt, paths that convert through fp16 first (double rounding would break
    # ties), and the interpreter, whose fp32 -> fp8 cast does not round to nearest even.
    bits = y.to(tl.int32, bitcast=True)
    magnitude = tl.abs(y)
    exponent = (magnitude.to(tl.int32, bitcast=True) >> 23) - 127
    # e4m3 has 3 mantissa bits; below 2**-6 the subnormals keep the spacing 2**-9.
    ulp_exponent = tl.maximum(exponent, -6) - 3
    inv_ulp = ((127 - ulp_exponent) << 23).to(tl.float32, bitcast=True)
    ulp = ((127 + ulp_exponent) << 23).to(tl.float32, bitcast=True)
    rounded = _round_int(magnitude * inv_ulp) * ulp  # both products are exact (powers of two)
    return tl.where(bits < 0, -rounded, rounded)  # the sign bit, so -0.0 stays -0.0 as in torch


@triton.jit
def _quantize(x, tensor_scale, PER_TOKEN: tl.constexpr, IS_FP8: tl.constexpr, QMAX: tl.constexpr):
    """Quantize fp32 rows ``x`` ``[heads, D_PAD]`` (padding zeros): ``(values on the grid, scales)``."""
    if PER_TOKEN:
        scale = tl.div_rn(tl.max(tl.abs(x), 1), QMAX)
        y = tl.div_rn(x, tl.where(scale > 0.0, scale, 1.0)[:, None])
    else:
        scale = tensor_scale
        y = tl.div_rn(x, tensor_scale)
    # NOTE: IEEE division (div.rn); Triton's `/` on fp32 is div.full.f32 (approximate, 2 ulp),
    # which would make the GPU's pages differ from the torch reference near rounding ties.
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_FP8:
        y = _round_e4m3(y)
    else:
        y = _round_int(y)
    return y, scale


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_cache_ptr, v_scale_cache_ptr,
    num_kv_heads, k_scale, v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_slot, stride_cache_head, stride_scale_slot,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
    QUANTIZED: tl.constexpr, PER_TOKEN: tl.constexpr, IS_FP8: tl.constexpr, QMAX: tl.constexpr,
):
    token = tl.program_id(0)
    head_block = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # NOTE: slot -1 marks a padding token: nothing is written for it.
        heads = head_block * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
        dims = tl.arange(0, D_PAD)
        head_mask = heads < num_kv_heads
        mask = head_mask[:, None] & (dims[None, :] < HEAD_DIM)
        src_k = k_ptr + token.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + dims[None, :]
        src_v = v_ptr + token.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :]
        dst = slot * stride_cache_slot + heads[:, None] * stride_cache_head + dims[None, :]
        if QUANTIZED:
            k, k_scales = _quantize(tl.load(src_k, mask=mask, other=0.0).to(tl.float32), k_scale,
                                    PER_TOKEN, IS_FP8, QMAX)
            v, v_scales = _quantize(tl.load(src_v, mask=mask, other=0.0).to(tl.float32), v_scale,
                                    PER_TOKEN, IS_FP8, QMAX)
            tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
            if PER_TOKEN:
                # NOTE: the scale is written with its token, so appending never rescales older tokens.
                tl.store(k_scale_cache_ptr + slot * stride_scale_slot + heads, k_scales, mask=head_mask)
                tl.store(v_scale_cache_ptr + slot * stride_scale_slot + heads, v_scales, mask=head_mask)
        else:
            tl.store(k_cache_ptr + dst, tl.load(src_k, mask=mask), mask=mask)
            tl.store(v_cache_ptr + dst, tl.load(src_v, mask=mask), mask=mask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float | None = None,
    v_scale: float | None = None,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
) -> None:
    """Write each new token's K and V into the cache slot the block manager gave it.

    Into int8 / fp8_e4m3 pages the tokens are quantized as they are written (clamped to
    ±127 / ±448 and rounded to nearest even): with scale caches each (token, head) gets the
    scale ``max|x| / QMAX`` stored at its slot; without them ``x / k_scale`` (``v_scale``) is
    stored. See ``pagedkv.kernels.quant``.

    Args:
        k: ``[num_tokens, num_kv_heads, head_dim]``, the cache's dtype (any float dtype for
            quantized pages); token and head strides are free (a slice of a fused QKV
            projection works), the last dimension contiguous.
        v: like ``k``.
        k_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, contiguous; float16,
            bfloat16, float32, int8 or float8_e4m3fn.
        v_cache: like ``k_cache``.
        slot_mapping: int32 or int64 ``[num_tokens]``; ``page_id * page_size + offset`` per
            token, or -1 to skip the token (padding). Slots are not range-checked on the device
            (that would need a sync); ``PagedKVCache.plan`` checks them on the host.
        k_scale, v_scale: per-tensor scales of quantized pages without scale caches (default 1.0).
        k_scale_cache, v_scale_cache: fp32 ``[num_pages, page_size, num_kv_heads]``,
            contiguous: per-(token, head) scales of quantized pages, written here.

    Raises:
        InvalidType / InvalidArgument: a tensor with the wrong shape, dtype, device or layout,
            a scale that does not fit the pages, or fp8 pages on a GPU older than sm_89.
    """
    _, _, num_kv_heads, head_dim = common.check_cache_pair(k_cache, v_cache)
    names = "[num_tokens, num_kv_heads, head_dim]"
    common.check_query_dtype("k", k, names, (None, num_kv_heads, head_dim), k_cache)
    num_tokens = k.shape[0]
    common.check_tensor("v", v, names, (num_tokens, num_kv_heads, head_dim), like=("k", k), device=k_cache.device)
    common.check_tensor("slot_mapping", slot_mapping, "[num_tokens]", (num_tokens,), dtypes=common.INDEX_DTYPES,
                        device=k_cache.device, contiguous=True)
    qa = common.check_quant(k_cache, k_scale, v_scale, k_scale_cache, v_scale_cache)
    launch_write_kv(k, v, k_cache, v_cache, slot_mapping, qa)


def launch_write_kv(k, v, k_cache, v_cache, slot_mapping, qa: common.QuantArgs) -> None:
    """``write_kv`` after its checks: arguments as ``write_kv`` checks them, ``qa`` from
    ``common.check_quant``. ``PagedKVCache`` calls it with tensors it validated once."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    heads_per_program, meta = _constants(num_kv_heads, head_dim, qa.fmt, qa.per_token)
    grid = (num_tokens, -(-num_kv_heads // heads_per_program))
    # unused pointers when there are no scale caches: any tensor will do
    k_scales = qa.k_scale_cache if qa.per_token else slot_mapping
    v_scales = qa.v_scale_cache if qa.per_token else slot_mapping
    k_strides, v_strides, cache_strides = k.stride(), v.stride(), k_cache.stride()
    _write_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, k_scales, v_scales,
        num_kv_heads, qa.k_scale, qa.v_scale,
        k_strides[0], k_strides[1], v_strides[0], v_strides[1],
        cache_strides[1], cache_strides[2], num_kv_heads,
        **meta,
    )


@functools.lru_cache(maxsize=None)
def _constants(num_kv_heads: int, head_dim: int, fmt, per_token: bool) -> tuple[int, dict]:
    """KV heads per program, and the kernel's compile-time arguments, for one page format."""
    d_pad = triton.next_power_of_2(head_dim)
    heads_per_program = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // d_pad))
    meta = dict(HEAD_DIM=head_dim, D_PAD=d_pad, HEADS_PER_PROGRAM=heads_per_program,
                QUANTIZED=fmt is not None, PER_TOKEN=per_token, IS_FP8=fmt == quant.FP8_E4M3,
                QMAX=fmt.max_value if fmt is not None else 1.0, num_warps=4)
    return heads_per_program, meta
