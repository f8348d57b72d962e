"""Shared pieces of the Triton launchers: tensor checks, tile choices, split-KV heuristic.

Every launcher validates its tensors here so that a bad call raises a typed error from
``pagedkv.errors`` naming the tensor (``q must be of shape [num_seqs, num_heads, head_dim] =
[4, num_heads, 128], got [4, 32]``) instead of a Triton compile error or a silent wrong answer.

Imports torch only (``PagedKVCache`` validates with it on machines without triton);
``pagedkv/__init__.py`` never imports this module.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from .._optional import require

torch = require("torch", __name__)

from ..errors import InvalidArgument, InvalidType  # noqa: E402
from . import quant  # noqa: E402

#: Floating dtypes the KV cache and the attention kernels accept.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Dtypes of page pools: the float dtypes, and the quantized ones (int8, float8_e4m3fn).
CACHE_DTYPES = FLOAT_DTYPES + quant.QUANT_DTYPES
#: Index dtypes accepted for slot mappings and copy plans.
INDEX_DTYPES = (torch.int32, torch.int64)

# NOTE: every decode split handles at least this many tokens; below it the merge step and
# the extra partial-output traffic cost more than the parallelism gains.
MIN_TOKENS_PER_SPLIT = 256
#: Upper bound on the split-KV count (also bounds the merge kernel's tile).
MAX_SPLITS = 64
# NOTE: split-KV aims for about this many programs per SM so that enough loads are in flight
# to cover HBM latency. Untuned on hardware so far (see benchmarks/attention.py).
PROGRAMS_PER_SM = 4


def is_interpreting() -> bool:
    """Whether ``@triton.jit`` kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# --------------------------------------------------------------------------- checks
def _dims_text(names: str, shape: tuple) -> str:
    labels = [n.strip() for n in names.strip("[]").split(",")]
    known = ", ".join(label if size is None else str(size) for label, size in zip(labels, shape))
    return f"of shape {names} = [{known}]"


def check_tensor(
    name: str,
    value: object,
    names: str,
    shape: tuple,
    *,
    dtypes: tuple | None = None,
    like: tuple[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check one tensor argument and return it.

    Args:
        name: the argument's name, used in the error.
        value: the argument.
        names: dimension names, e.g. ``"[num_seqs, num_heads, head_dim]"``.
        shape: expected sizes, ``None`` for a free dimension; its length is the expected ndim.
        dtypes: allowed dtypes (ignored when ``like`` is given).
        like: ``(other_name, other)``; the tensor must have ``other``'s dtype.
        device: the device the tensor must be on.
        contiguous: require a contiguous tensor; otherwise only the last dimension must have
            stride 1.

    Raises:
        InvalidType: not a tensor.
        InvalidArgument: wrong shape, dtype, device or memory layout.
    """
    if not isinstance(value, torch.Tensor):
        raise InvalidType(name, value, f"a torch.Tensor {_dims_text(names, shape)}")
    if value.ndim != len(shape) or any(e is not None and e != s for e, s in zip(shape, value.shape)):
        raise InvalidArgument(name, list(value.shape), _dims_text(names, shape))
    if like is not None:
        other_name, other = like
        if value.dtype != other.dtype:
            raise InvalidArgument(name, value.dtype, f"of dtype {other.dtype} (the dtype of {other_name})")
    elif dtypes is not None and value.dtype not in dtypes:
        raise InvalidArgument(name, value.dtype, "of dtype " + " or ".join(str(d) for d in dtypes))
    if device is not None and value.device != device:
        raise InvalidArgument(name, value.device, f"on device {device}")
    if contiguous and not value.is_contiguous():
        raise InvalidArgument(name, f"strides {tuple(value.stride())}", "contiguous")
    if value.ndim and value.shape[-1] > 1 and value.stride(-1) != 1:
        raise InvalidArgument(name, f"strides {tuple(value.stride())}", "contiguous in its last dimension")
    return value


def check_cache_pair(k_cache: object, v_cache: object) -> tuple[int, int, int, int]:
    """Check the K and V page pools; return ``(num_pages, page_size, num_kv_heads, head_dim)``.

    Raises:
        InvalidType / InvalidArgument: as ``check_tensor``; also a CPU tensor outside the
            interpreter (Triton kernels run on CUDA, or on the CPU with ``TRITON_INTERPRET=1``).
    """
    names = "[num_pages, page_size, num_kv_heads, head_dim]"
    check_tensor("k_cache", k_cache, names, (None,) * 4, dtypes=CACHE_DTYPES, contiguous=True)
    check_tensor("v_cache", v_cache, names, tuple(k_cache.shape), like=("k_cache", k_cache), device=k_cache.device,
                 contiguous=True)
    check_device("k_cache", k_cache)
    return tuple(k_cache.shape)


class QuantArgs(NamedTuple):
    """How a launch reads or writes its pages (checked by ``check_quant``).

    Attributes:
        fmt: the pages' quantized format, or ``None`` for float pages.
        per_token: one scale per (token, head) in ``k_scale_cache`` / ``v_scale_cache``.
        k_scale, v_scale: per-tensor scales (1.0 unless the pages are quantized per tensor).
        k_scale_cache, v_scale_cache: fp32 ``[num_pages, page_size, num_kv_heads]`` or ``None``.
    """

    fmt: quant.KVFormat | None
    per_token: bool
    k_scale: float
    v_scale: float
    k_scale_cache: torch.Tensor | None
    v_scale_cache: torch.Tensor | None


def check_quant(k_cache: torch.Tensor, k_scale=None, v_scale=None, k_scale_cache=None,
                v_scale_cache=None) -> QuantArgs:
    """Check the scale arguments of a launch on ``k_cache`` (already checked by ``check_cache_pair``).

    Float pages take no scale. Quantized pages take either both scale caches
    (``[num_pages, page_size, num_kv_heads]`` fp32, contiguous, on the cache's device) or
    per-tensor ``k_scale`` / ``v_scale`` (default 1.0), not both.

    Raises:
        InvalidType / InvalidArgument: naming the argument; also fp8 pages on a CUDA GPU of
            compute capability < 8.9 (the message says what was found).
    """
    fmt = quant.format_of(k_cache)
    given = {"k_scale": k_scale, "v_scale": v_scale, "k_scale_cache": k_scale_cache, "v_scale_cache": v_scale_cache}
    if fmt is None:
        for name, value in given.items():
            if value is not None:
                raise InvalidArgument(name, type(value).__name__,
                                      f"None for {k_cache.dtype} pages (scales go with int8 / fp8_e4m3 pages)")
        return QuantArgs(None, False, 1.0, 1.0, None, None)
    if k_cache.device.type == "cuda":
        quant.check_supported(fmt, k_cache.device, "k_cache")
    if k_scale_cache is None and v_scale_cache is None:
        k = 1.0 if k_scale is None else quant.check_tensor_scale("k_scale", k_scale)
        v = 1.0 if v_scale is None else quant.check_tensor_scale("v_scale", v_scale)
        return QuantArgs(fmt, False, k, v, None, None)
    for name in ("k_scale", "v_scale"):
        if given[name] is not None:
            raise InvalidArgument(name, given[name], "None when scale caches are given (per-(token, head) scales)")
    names = "[num_pages, page_size, num_kv_heads]"
    shape = tuple(k_cache.shape[:3])
    for name in ("k_scale_cache", "v_scale_cache"):
        if given[name] is None:
            raise InvalidArgument(name, None, "a tensor when the other scale cache is given")
        check_tensor(name, given[name], names, shape, dtypes=(quant.SCALE_DTYPE,), device=k_cache.device,
                     contiguous=True)
    return QuantArgs(fmt, True, 1.0, 1.0, k_scale_cache, v_scale_cache)


def check_query_dtype(name: str, q: object, names: str, shape: tuple, k_cache: torch.Tensor) -> None:
    """``q`` (or ``k``/``v``) of ``k_cache``'s dtype, or of any float dtype when the pages are quantized."""
    if quant.format_of(k_cache) is None:
        check_tensor(name, q, names, shape, like=("k_cache", k_cache), device=k_cache.device)
    else:
        check_tensor(name, q, names, shape, dtypes=FLOAT_DTYPES, device=k_cache.device)


def check_device(name: str, tensor: torch.Tensor) -> None:
    """A Triton launch needs CUDA tensors, or CPU tensors when interpreting."""
    if tensor.device.type != "cuda" and not is_interpreting():
        raise InvalidArgument(
            name, tensor.device, "on a CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
        )


def check_head_dim(head_dim: int) -> None:
    # NOTE: tiles pad the head dim to a power of two of at least 16 (tl.dot's smallest reduction
    # for 16-bit inputs) and mask the padding, so any multiple of 8 up to 256 works; 8 keeps
    # rows 16-byte aligned in fp16 (8, 24, 40, 64, 72, 80, 96, 128, 256 are the tested ones).
    if head_dim % 8 or not 8 <= head_dim <= 256:
        raise InvalidArgument("head_dim", head_dim, "a multiple of 8 in [8, 256]")


def padded_head_dim(head_dim: int) -> int:
    """The head dim of an attention tile: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(head_dim))


def check_group(num_heads: int, num_kv_heads: int) -> int:
    """Query heads per KV head (GQA/MQA ratio)."""
    if num_heads < 1 or num_heads % num_kv_heads:
        raise InvalidArgument("num_heads", num_heads, f"a multiple of num_kv_heads ({num_kv_heads})")
    return num_heads // num_kv_heads


def check_sinks(sinks, num_heads: int, device) -> None:
    """Attention sinks: ``None`` or a float ``[num_heads]`` contiguous tensor on ``device``."""
    if sinks is not None:
        check_tensor("sinks", sinks, "[num_heads]", (num_heads,), dtypes=(torch.float32, torch.float16, torch.bfloat16),
                     device=device, contiguous=True)


def check_options(sm_scale, sliding_window, logits_soft_cap, head_dim: int,
                  attention_chunk_size=None) -> tuple[float, int, float]:
    """Normalise the attention options: ``(sm_scale, window, soft_cap or 0.0)``.

    ``window`` is the kernels' one mask code: ``W > 0`` a sliding window of ``W`` tokens,
    ``-C < 0`` chunked-local attention of chunk ``C`` (Llama 4), ``0`` neither.
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise InvalidType("sm_scale", sm_scale, "a positive float")
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        raise InvalidArgument("sm_scale", sm_scale, "a positive finite float")
    window = 0
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise InvalidType("sliding_window", sliding_window, "an int >= 1 or None")
        if sliding_window < 1:
            raise InvalidArgument("sliding_window", sliding_window, "an int >= 1 or None")
        window = sliding_window
    if attention_chunk_size is not None:
        if isinstance(attention_chunk_size, bool) or not isinstance(attention_chunk_size, int):
            raise InvalidType("attention_chunk_size", attention_chunk_size, "an int >= 1 or None")
        if not 1 <= attention_chunk_size <= 2**31 - 1:  # NOTE: as plan bounds it (an int32 position)
            raise InvalidArgument("attention_chunk_size", attention_chunk_size, "an int in [1, 2**31 - 1] or None")
        if window:
            raise InvalidArgument("attention_chunk_size", attention_chunk_size,
                                  "None with a sliding_window (a layer has one mask or the other)")
        window = -attention_chunk_size
    cap = 0.0
    if logits_soft_cap is not None:
        if isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, (int, float)):
            raise InvalidType("logits_soft_cap", logits_soft_cap, "a positive float or None")
        if not (math.isfinite(logits_soft_cap) and logits_soft_cap > 0):
            raise InvalidArgument("logits_soft_cap", logits_soft_cap, "a positive finite float or None")
        cap = float(logits_soft_cap)
    return float(sm_scale), window, cap


def mask_kwargs(window: int) -> dict:
    """The public options of a mask code of ``check_options`` (for the torch paths)."""
    return dict(sliding_window=window if window > 0 else None, attention_chunk_size=-window if window < 0 else None)


def keys_per_query(window: int) -> int:
    """At most how many keys one query of a mask code reads (0: all of them)."""
    return abs(window)


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidType(name, value, "an int")
    if not lo <= value <= hi:
        raise InvalidArgument(name, value, f"an int in [{lo}, {hi}]")
    return value


# --------------------------------------------------------------------------- tile choices
class DecodeConfig(NamedTuple):
    """Tile sizes of the decode kernel (chosen from shapes; no autotuning)."""

    block_n: int  # key tokens per loop iteration
    group_pad: int  # query heads per KV head, padded to a power of two >= 16 (tl.dot's minimum)
    d_pad: int  # head_dim padded to a power of two
    num_warps: int
    num_stages: int


class PrefillConfig(NamedTuple):
    """Tile sizes of the prefill kernel."""

    block_m: int  # rows of the query tile: (query token, query head of the group) pairs
    block_n: int  # key tokens per loop iteration
    d_pad: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def decode_config(head_dim: int, group_size: int, dtype: torch.dtype) -> DecodeConfig:
    d_pad = padded_head_dim(head_dim)
    group_pad = max(16, next_power_of_2(group_size))
    # NOTE: keep each K and V tile (block_n x d_pad) near 16 KB so both stay in registers
    # with 4 warps and the loads of the next tile can be in flight (num_stages=2); decode is
    # bound by HBM bandwidth, not by the tensor cores.
    elements = 16384 // torch.tensor([], dtype=dtype).element_size()
    block_n = max(16, min(64, elements // d_pad))
    if group_pad > 16:
        block_n = max(16, block_n // 2)
    return DecodeConfig(block_n, group_pad, d_pad, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=None)
def prefill_config(head_dim: int, group_size: int, dtype: torch.dtype) -> PrefillConfig:
    d_pad = padded_head_dim(head_dim)
    if dtype == torch.float32:
        # NOTE: fp32 tiles are twice the bytes and fp32 dots need more registers: halve both
        # tile dimensions, or shared memory exceeds sm_80's 163 KB at head_dim 256.
        block_m = max(32, next_power_of_2(group_size))
        block_n = 32 if d_pad <= 128 else 16
    else:
        block_m = max(64, next_power_of_2(group_size))
        block_n = 64 if d_pad <= 128 else 32
    num_warps = 4 if d_pad <= 64 else 8
    return PrefillConfig(block_m, block_n, d_pad, num_warps=num_warps, num_stages=2)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 8 for the CPU interpreter (keeps tests small)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(index)


def choose_num_splits(batch_size: int, num_kv_heads: int, max_seq_len: int, sms: int) -> int:
    """Split-KV count for a decode batch, from host-side shape facts only (no device sync).

    One program handles one (sequence, KV head) pair. When there are too few of those to keep
    every SM busy, each sequence's keys are split into chunks of at least
    ``MIN_TOKENS_PER_SPLIT`` tokens handled by separate programs, and a merge kernel combines
    the partial results. The answer depends only on ``batch_size``, ``num_kv_heads`` and the
    longest context, so a CUDA graph captured for a padded batch shape stays valid.
    """
    programs = batch_size * num_kv_heads
    wanted = cdiv(PROGRAMS_PER_SM * sms, max(programs, 1))
    useful = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    return int(max(1, min(wanted, useful, MAX_SPLITS)))
