"""Quantized KV pages: the formats, and their torch quantize / dequantize (the specification).

A quantized cache stores K and V as 1-byte elements plus fp32 scales:

- ``int8``: symmetric, one scale per (token, head) for K and for V. The scale is written with
  the token, so appending never rescales tokens already stored.
- ``fp8_e4m3`` (``torch.float8_e4m3fn``, Triton's ``tl.float8e4nv``): either one scale per
  layer for K and one for V (``per_tensor``; folded into the softmax scale and the output, so
  it costs nothing per element or per token), or one per (token, head) like int8.

Quantization of a vector ``x`` (fp32 arithmetic, IEEE division):
``scale = max|x| / QMAX`` (per (token, head); a given constant per tensor),
``q = round_to_nearest_even(clamp(x / scale, -QMAX, QMAX))`` with ``QMAX`` = 127 for int8 and
448 for e4m3 (its largest finite value; rounding is to the e4m3 grid). A zero vector gets
scale 0 and zeros. Dequantization is ``q * scale``. The Triton ``write_kv`` performs exactly
these operations, so its pages are bit-identical to ``quantize_per_token_head`` /
``quantize_per_tensor`` (tests compare them).

Memory per token (``SCALE_BYTES`` = 4, fp32 scales), per layer:
``2 (K, V) x num_kv_heads x (head_dim x 1 B + 4 B)`` with per-(token, head) scales, and
``2 x num_kv_heads x head_dim x 1 B`` with per-tensor scales. Llama-3-8B (32 layers, 8 KV
heads, head_dim 128): 67,584 B per token for int8 (65,536 B of elements + 2,048 B of scales),
65,536 B for fp8 per-tensor, against 131,072 B for bf16.

Imports torch only (never triton); ``pagedkv/__init__.py`` never imports this module.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

from .._optional import require

torch = require("torch", __name__)

from ..errors import InvalidArgument, InvalidType  # noqa: E402


class KVFormat(NamedTuple):
    """A quantized storage format of KV pages.

    Attributes:
        name: ``"int8"`` or ``"fp8_e4m3"``.
        dtype: the torch storage dtype (``torch.int8``, ``torch.float8_e4m3fn``).
        max_value: ``QMAX``, the largest magnitude stored (127.0, 448.0); inputs are clamped to it.
        min_capability: the CUDA compute capability the Triton kernels need, or ``None``.
        scale_layouts: the scale layouts ``PagedKVCache`` offers for it; the first is its default.
    """

    name: str
    dtype: torch.dtype
    max_value: float
    min_capability: tuple[int, int] | None
    scale_layouts: tuple[str, ...]


INT8 = KVFormat("int8", torch.int8, 127.0, None, ("per_token_head",))
# NOTE: e4m3 conversions (cvt ... e4m3x2) exist from sm_89 (Ada, Hopper) on; Triton refuses
# tl.float8e4nv for older targets ("type fp8e4nv not supported in this architecture").
# Per-tensor is fp8's default, as in vLLM and FlashInfer: a calibrated (or 1.0) scale per layer.
FP8_E4M3 = KVFormat("fp8_e4m3", torch.float8_e4m3fn, 448.0, (8, 9), ("per_tensor", "per_token_head"))
#: name -> format.
FORMATS = {f.name: f for f in (INT8, FP8_E4M3)}
_ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3", "fp8e4nv": "fp8_e4m3"}
#: Scale layouts: one scale per (token, head) stored beside the pages, or one per layer for K and V.
SCALE_LAYOUTS = ("per_token_head", "per_tensor")
#: Scales are fp32: 4 bytes per (token, layer, K or V, head) with ``per_token_head``.
SCALE_DTYPE = torch.float32
SCALE_BYTES = 4
#: Storage dtypes of quantized pages.
QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)


def kv_format(value: object) -> KVFormat | None:
    """The quantized format a name or torch dtype denotes, or ``None`` if it is not one.

    Accepts ``"int8"``, ``"fp8_e4m3"`` (aliases ``"fp8"``, ``"e4m3"``, ``"float8_e4m3fn"``),
    ``torch.int8`` and ``torch.float8_e4m3fn``.
    """
    if isinstance(value, torch.dtype):
        return next((f for f in FORMATS.values() if f.dtype == value), None)
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        return FORMATS.get(_ALIASES.get(key, key))
    return None


def format_of(cache: torch.Tensor) -> KVFormat | None:
    """The format of a page pool tensor (``None`` for float16 / bfloat16 / float32 pages)."""
    return kv_format(cache.dtype)


# ------------------------------------------------------------------ support
def unsupported_reason(fmt: KVFormat, capability: tuple[int, int] | None, device_text: str) -> str | None:
    """Why ``fmt`` cannot run on a device, or ``None`` when it can.

    Args:
        fmt: the format.
        capability: the device's CUDA compute capability ``(major, minor)``; ``None`` for a
            non-CUDA device (torch kernels and the Triton interpreter handle every format).
        device_text: how to name the device in the message, e.g. ``"cuda:0 (NVIDIA A100)"``.
    """
    if capability is None or fmt.min_capability is None or tuple(capability) >= fmt.min_capability:
        return None
    need = ".".join(map(str, fmt.min_capability))
    found = ".".join(map(str, capability))
    return (f"a format this GPU supports: {fmt.name} needs a GPU of compute capability >= {need} "
            f"(Ada Lovelace, Hopper or newer) but {device_text} has compute capability {found}; "
            f"use kv_dtype='int8' or the model's dtype there")


def check_supported(fmt: KVFormat | None, device: torch.device, name: str = "kv_dtype") -> None:
    """Raise if the Triton kernels cannot handle ``fmt`` on ``device``.

    Raises:
        InvalidArgument: ``fmt`` needs a newer GPU; the message names the capability needed and
            the one found (e.g. fp8_e4m3 needs >= 8.9; an A100 has 8.0).
    """
    if fmt is None or fmt.min_capability is None or device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = tuple(torch.cuda.get_device_capability(index))  # cached by torch: no sync, cheap per launch
    if capability >= fmt.min_capability:
        return
    raise InvalidArgument(name, fmt.name, unsupported_reason(fmt, capability,
                                                             f"cuda:{index} ({torch.cuda.get_device_name(index)})"))


def check_tensor_scale(name: str, value: object) -> float:
    """A per-tensor scale as the fp32 value the kernels use (positive and finite).

    Raises:
        InvalidType / InvalidArgument: not a positive finite number.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidType(name, value, "a positive float")
    scale = float(torch.tensor(float(value), dtype=SCALE_DTYPE))
    if not (0.0 < scale < float("inf")):
        raise InvalidArgument(name, value, "a positive finite float (representable in fp32)")
    return scale


# ----------------------------------------------------------- quantize (torch)
def round_to_format(y: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Clamp fp32 ``y`` to ``[-QMAX, QMAX]`` and round to nearest even in ``fmt``'s storage dtype."""
    y = y.clamp(-fmt.max_value, fmt.max_value)
    if fmt.dtype == torch.int8:
        return torch.round(y).to(torch.int8)  # torch.round rounds half to even
    return y.to(fmt.dtype)  # float -> float8_e4m3fn rounds to nearest even


def quantize_per_token_head(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize vectors along the last dimension, one scale each.

    Args:
        x: float ``[..., head_dim]`` (e.g. ``[num_tokens, num_kv_heads, head_dim]``).
        fmt: the target format.

    Returns:
        ``(q, scale)``: ``q`` of ``fmt.dtype`` ``[..., head_dim]`` and fp32 ``scale`` ``[...]``
        with ``x ~= q * scale[..., None]``; ``|x - q * scale| <= scale / 2`` for int8.
    """
    x = x.to(torch.float32)
    scale = x.abs().amax(dim=-1) / fmt.max_value
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    return round_to_format(x / divisor[..., None], fmt), scale


def quantize_per_tensor(x: torch.Tensor, scale: float, fmt: KVFormat) -> torch.Tensor:
    """Quantize ``x / scale`` elementwise (``scale`` > 0, used as an fp32 value); returns ``fmt.dtype``."""
    divisor = torch.tensor(scale, dtype=torch.float32, device=x.device)
    return round_to_format(x.to(torch.float32) / divisor, fmt)


def dequantize(q: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``q * scale`` in fp32.

    Args:
        q: quantized ``[..., head_dim]`` (int8 or float8_e4m3fn; any float works too).
        scale: fp32 ``[...]`` (one per vector) or a float (per tensor).
    """
    values = q.to(torch.float32)
    if isinstance(scale, torch.Tensor):
        return values * scale.to(torch.float32)[..., None]
    return values * torch.tensor(scale, dtype=torch.float32, device=q.device)


def tensor_scale(x: torch.Tensor, fmt: KVFormat) -> float:
    """A per-tensor scale that maps ``max|x|`` to ``QMAX`` (calibration on sample activations)."""
    amax = float(x.detach().abs().max().to(torch.float32)) if x.numel() else 0.0
    return amax / fmt.max_value if amax > 0 else 1.0


def byte_view(pool: torch.Tensor) -> torch.Tensor:
    """A quantized pool viewed as ``uint8`` (torch lacks some copies for float8 on the CPU);
    other pools unchanged. Copies and swaps move bytes, so the view is exact."""
    return pool.view(torch.uint8) if pool.dtype in QUANT_DTYPES else pool


__all__ = [
    "KVFormat", "INT8", "FP8_E4M3", "FORMATS", "SCALE_LAYOUTS", "SCALE_DTYPE", "SCALE_BYTES", "QUANT_DTYPES",
    "kv_format", "format_of", "unsupported_reason", "check_supported", "check_tensor_scale", "round_to_format",
    "quantize_per_token_head", "quantize_per_tensor", "dequantize", "tensor_scale", "byte_view",
]
