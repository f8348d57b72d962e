"""KV-cache sizing: ``KVCacheSpec``, model and GPU presets, and the capacity math.

Owns: bytes per token for MHA/GQA/MQA and MLA caches, pages for a token count, pages for a
memory budget, reading a Hugging Face ``config.json``, a parameter-count estimate for the
weights, and the presets that ``pagedkv size`` and ``pagedkv frag`` look up by name.

Pure Python: must not import torch, triton or numpy-heavy modules at import time, and nothing
from pagedkv except ``errors`` and ``_validate``. ``gpu_budget_bytes`` imports torch lazily.

Units (NOTE: chosen deliberately, because "GB" is ambiguous):
- bytes are exact Python ints everywhere;
- token counts written "128K" mean 131,072 (K = 1024), as model cards use them;
- GPU memory capacities are binary: a vendor's "80 GB" HBM is 80 GiB (5 stacks of 16 GiB;
  nvidia-smi reports 81,559 MiB for an H100 80GB HBM3, AMD's ROCm tables list the MI300X's
  192 GB as 192 GiB); bandwidths are decimal (3.35 TB/s = 3.35e12 B/s), as vendors quote them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

from . import _validate as check
from .errors import BackendUnavailable, InvalidArgument, InvalidType

#: Bits per stored element. ``int4`` is for planning only (no kernel stores it).
DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4}
_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
    "fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
}
ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")
#: Layer kinds of a hybrid model (``KVCacheSpec.layer_types``): full attention, sliding-window
#: attention, chunked local attention, and layers that keep a fixed-size state per sequence
#: (linear attention, Mamba) instead of a KV cache.
LAYER_KINDS = ("full", "sliding", "chunked", "state")
#: Hugging Face ``layer_types`` values -> LAYER_KINDS.
HF_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "chunked",
                  "linear_attention": "state", "mamba": "state", "mamba2": "state", "conv": "state"}
#: Scale layouts of quantized caches: no scales, one fp32 scale per layer for K and for V
#: (nothing per token), or one fp32 scale per (token, layer, K/V, head) stored beside the pages.
KV_SCALES = ("none", "per_tensor", "per_token_head")
#: Bytes of one scale (fp32, as ``PagedKVCache`` stores them).
SCALE_BYTES = 4
#: Dtypes that store scales; the others must use ``kv_scales="none"``.
QUANTIZED_DTYPES = ("fp8", "int8", "int4")


def canonical_dtype(dtype: object, name: str = "dtype") -> str:
    """``dtype`` as one of ``DTYPE_BITS`` (accepts torch-style names such as ``bfloat16``)."""
    if not isinstance(dtype, str):
        raise InvalidType(name, dtype, f"a dtype name ({', '.join(DTYPE_BITS)})")
    key = dtype.strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BITS:
        raise InvalidArgument(name, dtype, f"one of {', '.join(DTYPE_BITS)}")
    return key


def default_kv_scales(dtype: str) -> str:
    """The scale layout ``PagedKVCache`` uses by default for ``dtype``: ``per_token_head`` for
    int8, ``per_tensor`` for fp8 (vLLM's and FlashInfer's convention), ``none`` otherwise
    (int4 is for planning only and counts no scales)."""
    return {"int8": "per_token_head", "fp8": "per_tensor"}.get(canonical_dtype(dtype), "none")


def dtype_bytes(num_elements: int, dtype: str) -> int:
    """Bytes to store ``num_elements`` elements of ``dtype`` (rounded up to a whole byte)."""
    return -(-num_elements * DTYPE_BITS[canonical_dtype(dtype)] // 8)


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Shape of a model's KV cache: what one token costs, in every layer.

    Args:
        num_layers: attention layers that keep a cache.
        num_kv_heads: K/V heads per layer (1 for MQA and for MLA's shared latent).
        head_dim: elements per head (for MLA: ``kv_lora_rank + rope_head_dim``).
        dtype: element type of the cache, one of ``DTYPE_BITS`` (default ``"bf16"``).
        attention: ``"mha"``, ``"gqa"``, ``"mqa"`` or ``"mla"``; inferred when None.
        num_q_heads: query heads, if known (used to check and label the attention kind).
        kv_lora_rank, rope_head_dim: MLA only; build MLA specs with ``KVCacheSpec.mla``.
        kv_scales: scales of a quantized cache, one of ``KV_SCALES``: ``"none"`` (default; the
            spec counts elements only), ``"per_tensor"`` (0 B per token) or ``"per_token_head"``
            (``SCALE_BYTES`` per token, layer, K/V and head). Only for fp8 / int8 / int4.
            ``default_kv_scales(dtype)`` is what ``PagedKVCache`` stores by default.

    Raises:
        InvalidArgument / InvalidType: a bad field, or fields that contradict each other.

    MHA/GQA/MQA store K and V (factor 2); MLA stores one compressed latent plus the decoupled
    RoPE key per token and layer (no factor 2).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bf16"
    attention: str | None = None
    num_q_heads: int | None = None
    kv_lora_rank: int = 0
    rope_head_dim: int = 0
    kv_scales: str = "none"
    layer_types: tuple = ()
    sliding_window: int = 0
    attention_chunk_size: int = 0
    state_bytes: int = 0

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "num_layers", check.count("num_layers", self.num_layers))
        put(self, "num_kv_heads", check.count("num_kv_heads", self.num_kv_heads))
        put(self, "head_dim", check.count("head_dim", self.head_dim))
        put(self, "dtype", canonical_dtype(self.dtype))
        if self.num_q_heads is not None:
            put(self, "num_q_heads", check.count("num_q_heads", self.num_q_heads))
        put(self, "kv_lora_rank", check.as_int("kv_lora_rank", self.kv_lora_rank, 0, check.MAX_COUNT))
        put(self, "rope_head_dim", check.as_int("rope_head_dim", self.rope_head_dim, 0, check.MAX_COUNT))
        put(self, "attention", self._checked_attention())
        if self.kv_scales not in KV_SCALES:
            raise InvalidArgument("kv_scales", self.kv_scales, f"one of {', '.join(map(repr, KV_SCALES))}")
        if self.kv_scales != "none" and self.dtype not in QUANTIZED_DTYPES:
            raise InvalidArgument("kv_scales", self.kv_scales,
                                  f"'none' for a {self.dtype} cache (scales go with {', '.join(QUANTIZED_DTYPES)})")
        self._check_layer_types()

    def _check_layer_types(self) -> None:
        put = object.__setattr__
        types = self.layer_types
        if isinstance(types, (str, bytes)) or not hasattr(types, "__iter__"):
            raise InvalidType("layer_types", types, f"a sequence of {', '.join(LAYER_KINDS)}")
        types = tuple(types)
        put(self, "layer_types", types)
        for i, kind in enumerate(types):
            if kind not in LAYER_KINDS:
                raise InvalidArgument(f"layer_types[{i}]", kind, f"one of {', '.join(LAYER_KINDS)}")
        put(self, "sliding_window", check.as_int("sliding_window", self.sliding_window, 0, check.MAX_COUNT))
        put(self, "attention_chunk_size", check.as_int("attention_chunk_size", self.attention_chunk_size, 0,
                                                       check.MAX_COUNT))
        put(self, "state_bytes", check.as_int("state_bytes", self.state_bytes, 0, 2**62))
        if not types:
            return
        attention = sum(kind != "state" for kind in types)
        if attention != self.num_layers:
            raise InvalidArgument("layer_types", f"{attention} attention layers",
                                  f"num_layers ({self.num_layers}) entries other than 'state'")
        for kind, field in (("sliding", "sliding_window"), ("chunked", "attention_chunk_size"), ("state", "state_bytes")):
            if kind in types and not getattr(self, field):
                raise InvalidArgument(field, getattr(self, field), f"an int >= 1 with {kind!r} layers")

    def _checked_attention(self) -> str:
        kind, kv, q = self.attention, self.num_kv_heads, self.num_q_heads
        if kind is None:
            if self.kv_lora_rank:
                kind = "mla"
            elif kv == 1:
                kind = "mqa"
            else:
                kind = "mha" if q == kv else "gqa"
        if not isinstance(kind, str) or kind.lower() not in ATTENTION_KINDS:
            raise InvalidArgument("attention", kind, f"one of {', '.join(ATTENTION_KINDS)}")
        kind = kind.lower()
        heads = f"num_kv_heads={kv}, num_q_heads={q}"
        if kind == "mla":
            if self.kv_lora_rank < 1:
                raise InvalidArgument("kv_lora_rank", self.kv_lora_rank, "an int >= 1 for MLA")
            if kv != 1 or self.head_dim != self.kv_lora_rank + self.rope_head_dim:
                raise InvalidArgument(
                    "head_dim", self.head_dim,
                    f"kv_lora_rank + rope_head_dim = {self.kv_lora_rank + self.rope_head_dim} with "
                    f"num_kv_heads=1 for MLA (got num_kv_heads={kv}); use KVCacheSpec.mla(...)",
                )
            return kind
        if self.kv_lora_rank or self.rope_head_dim:
            raise InvalidArgument("attention", kind, "'mla' when kv_lora_rank or rope_head_dim is set")
        if q is not None and (q < kv or q % kv):
            raise InvalidArgument("num_q_heads", q, f"a multiple of num_kv_heads ({kv})")
        if kind == "mqa" and kv != 1:
            raise InvalidArgument("attention", kind, f"consistent with {heads} (MQA has 1 KV head)")
        if kind == "mha" and q is not None and q != kv:
            raise InvalidArgument("attention", kind, f"consistent with {heads} (MHA has one KV head per query head)")
        if kind == "gqa" and q is not None and q == kv:
            raise InvalidArgument("attention", kind, f"consistent with {heads} (equal counts are MHA)")
        return kind

    @classmethod
    def mla(cls, num_layers: int, kv_lora_rank: int, rope_head_dim: int, dtype: str = "bf16",
            num_q_heads: int | None = None) -> "KVCacheSpec":
        """A multi-head latent attention cache (DeepSeek-V2/V3): one latent of
        ``kv_lora_rank + rope_head_dim`` elements per token and layer."""
        rank = check.count("kv_lora_rank", kv_lora_rank)
        rope = check.as_int("rope_head_dim", rope_head_dim, 0, check.MAX_COUNT)
        return cls(num_layers, 1, rank + rope, dtype, "mla", num_q_heads, rank, rope)

    # ---------------------------------------------------------------- sizes
    @property
    def kv_factor(self) -> int:
        """2 (a K and a V vector) except for MLA's single latent (1)."""
        return 1 if self.attention == "mla" else 2

    @property
    def elements_per_token(self) -> int:
        """Stored elements per token over all layers."""
        return self.num_layers * self.kv_factor * self.num_kv_heads * self.head_dim

    @property
    def scale_bytes_per_token(self) -> int:
        """Bytes of scales per token over all layers: layers x factor x KV heads x ``SCALE_BYTES``
        with ``per_token_head`` scales, else 0."""
        if self.kv_scales != "per_token_head":
            return 0
        return self.num_layers * self.kv_factor * self.num_kv_heads * SCALE_BYTES

    @property
    def bytes_per_token(self) -> int:
        """Bytes per token over all layers: layers x factor x KV heads x head_dim x element bytes,
        plus ``scale_bytes_per_token``.

        E.g. Llama-3-8B (32 layers, 8 KV heads, head_dim 128): 131,072 B in bf16; 65,536 B in
        fp8 per tensor; 65,536 + 2,048 = 67,584 B in int8 with per-(token, head) scales.
        """
        return dtype_bytes(self.elements_per_token, self.dtype) + self.scale_bytes_per_token

    def bytes_for(self, num_tokens: int, page_size: int | None = None) -> int:
        """Bytes for ``num_tokens`` tokens of one sequence; rounded up to whole pages when
        ``page_size`` is given (what a paged allocator actually reserves)."""
        num_tokens = check.as_int("num_tokens", num_tokens, 0, 2**62)
        if page_size is None:
            return num_tokens * self.bytes_per_token
        return self.pages_for(num_tokens, page_size) * self.page_bytes(page_size)

    def pages_for(self, num_tokens: int, page_size: int) -> int:
        """Pages that hold ``num_tokens`` tokens: ``ceil(num_tokens / page_size)``."""
        num_tokens = check.as_int("num_tokens", num_tokens, 0, 2**62)
        return -(-num_tokens // check.count("page_size", page_size))

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page over all layers (K and V): ``page_size * bytes_per_token``."""
        return check.count("page_size", page_size) * self.bytes_per_token

    def with_dtype(self, dtype: str, kv_scales: str | None = None) -> "KVCacheSpec":
        """The same cache stored as ``dtype``, with ``kv_scales`` (default: the current layout
        when ``dtype`` takes scales, else ``"none"``; ``"default"``: ``default_kv_scales(dtype)``)."""
        dtype = canonical_dtype(dtype)
        if kv_scales == "default":
            kv_scales = default_kv_scales(dtype)
        elif kv_scales is None:
            kv_scales = self.kv_scales if dtype in QUANTIZED_DTYPES else "none"
        return dataclasses.replace(self, dtype=dtype, kv_scales=kv_scales)

    def shard(self, num_gpus: int) -> "KVCacheSpec":
        """The cache one rank holds under tensor parallelism over ``num_gpus`` GPUs.

        NOTE: KV heads are split across ranks; when there are fewer KV heads than ranks each
        rank keeps one (heads are replicated), and MLA's latent is not split by head, so every
        rank keeps all of it. This is how vLLM shards KV caches; it is why MLA's capacity does
        not grow with the tensor-parallel size.

        Raises:
            InvalidArgument: ``num_gpus`` neither divides nor is a multiple of ``num_kv_heads``.
        """
        num_gpus = check.count("num_gpus", num_gpus)
        if self.attention == "mla" or num_gpus == 1:
            return self
        kv = self.num_kv_heads
        if kv % num_gpus and num_gpus % kv:
            raise InvalidArgument("num_gpus", num_gpus, f"a divisor or a multiple of num_kv_heads ({kv})")
        return dataclasses.replace(self, num_kv_heads=max(1, kv // num_gpus), num_q_heads=None,
                                   state_bytes=-(-self.state_bytes // num_gpus))

    def describe(self) -> str:
        """One line, e.g. ``GQA: 80 layers x 8 KV heads x 128 head dim (64 query heads)``."""
        if self.attention == "mla":
            text = (f"MLA: {self.num_layers} layers x (latent {self.kv_lora_rank} + "
                    f"rope {self.rope_head_dim})")
        else:
            text = (f"{self.attention.upper()}: {self.num_layers} layers x {self.num_kv_heads} KV heads"
                    f" x {self.head_dim} head dim")
        text = text if self.num_q_heads is None else f"{text} ({self.num_q_heads} query heads)"
        if self.is_hybrid:
            text += f"; {self.describe_layers()}"
        return text

    # ------------------------------------------------------------ hybrid models
    @property
    def is_hybrid(self) -> bool:
        """Whether some layer is not full attention (``layer_types``)."""
        return any(kind != "full" for kind in self.layer_types)

    def describe_layers(self) -> str:
        """E.g. ``layers: 12 sliding (window 128) + 12 full``."""
        parts = []
        for kind in LAYER_KINDS:
            n = self.layer_types.count(kind)
            if n:
                extra = {"sliding": f" (window {self.sliding_window:,})",
                         "chunked": f" (chunk {self.attention_chunk_size:,})",
                         "state": f" ({self.state_bytes:,} B each per sequence)"}.get(kind, "")
                parts.append(f"{n} {kind}{extra}")
        return "layers: " + " + ".join(parts) if parts else f"layers: {self.num_layers} full"

    @property
    def layer_bytes_per_token(self) -> int:
        """Bytes per token of one attention layer (K and V, and its scales)."""
        scales = self.kv_factor * self.num_kv_heads * SCALE_BYTES if self.kv_scales == "per_token_head" else 0
        return dtype_bytes(self.kv_factor * self.num_kv_heads * self.head_dim, self.dtype) + scales

    def hybrid_layout(self) -> "HybridLayout":
        """The KV cache groups of ``HybridBlockManager`` for this model (see ``HybridLayout``)."""
        types = self.layer_types or ("full",) * self.num_layers
        by_kind = {kind: [i for i, k in enumerate(types) if k == kind] for kind in LAYER_KINDS}
        by_kind = {kind: layers for kind, layers in by_kind.items() if layers}
        # NOTE: vLLM's rule: every group holds as many layers as the rarest kind has, so that one
        # physical page has the same bytes in every group; the other kinds are split into groups
        # of that size, the last one padded (its missing layers' slots are allocated, unused).
        size = min(len(layers) for layers in by_kind.values())
        groups = []
        for kind, layers in by_kind.items():
            for start in range(0, len(layers), size):
                groups.append((kind, tuple(layers[start : start + size])))
        return HybridLayout(size, tuple(groups))

    def kv_cache_groups(self, page_size: int) -> list:
        """``KVCacheGroup`` per group of ``hybrid_layout()``, for ``HybridBlockManager``.

        A state group gets ``ceil(state_bytes / page bytes of one layer)`` pages per sequence
        (the sector scheme: a layer's state spans whole pages of its tensor).

        Raises:
            InvalidArgument: a chunk that is not a multiple of ``page_size``.
        """
        from .hybrid import KVCacheGroup

        page_size = check.count("page_size", page_size)
        out = []
        for kind, _ in self.hybrid_layout().groups:
            if kind == "full":
                out.append(KVCacheGroup.full())
            elif kind == "sliding":
                out.append(KVCacheGroup.sliding(self.sliding_window))
            elif kind == "chunked":
                if self.attention_chunk_size % page_size:
                    raise InvalidArgument("page_size", page_size,
                                          f"a divisor of attention_chunk_size ({self.attention_chunk_size})")
                out.append(KVCacheGroup.chunked(self.attention_chunk_size))
            else:
                out.append(KVCacheGroup.state(self.state_pages(page_size)))
        return out

    def state_pages(self, page_size: int) -> int:
        """Pages of one layer's tensor that hold one sequence's state of a state layer."""
        return -(-self.state_bytes // (check.count("page_size", page_size) * self.layer_bytes_per_token))

    def group_page_bytes(self, page_size: int) -> int:
        """Bytes of one physical page of the hybrid pool: a page of every layer of a group."""
        return self.hybrid_layout().layers_per_group * check.count("page_size", page_size) * self.layer_bytes_per_token

    def hybrid_pages_for(self, num_tokens: int, page_size: int) -> list[int]:
        """Pages each group holds for one sequence of ``num_tokens`` tokens, decoding: a sliding
        group the pages from the oldest position its newest token sees, a chunked group those of
        the newest token's chunk, a state group its state pages, a full group all of them.

        NOTE: a prompt prefilled in one step holds every page in every group until its next
        step; an engine that prefills in chunks (allocate the first chunk, append the rest)
        holds ``window + chunk`` tokens at most in a sliding group.
        """
        n = check.as_int("num_tokens", num_tokens, 0, 2**62)
        p = check.count("page_size", page_size)
        total = -(-n // p)
        out = []
        for kind, _ in self.hybrid_layout().groups:
            if kind == "full":
                out.append(total)
            elif kind == "sliding":
                out.append(total - max(0, n - self.sliding_window) // p if n else 0)
            elif kind == "chunked":
                out.append(total - (max(n - 1, 0) // self.attention_chunk_size * self.attention_chunk_size) // p)
            else:
                out.append(self.state_pages(p))
        return out

    def hybrid_bytes_for(self, num_tokens: int, page_size: int) -> int:
        """Bytes one sequence of ``num_tokens`` tokens holds with hybrid allocation
        (``hybrid_pages_for`` x ``group_page_bytes``)."""
        return sum(self.hybrid_pages_for(num_tokens, page_size)) * self.group_page_bytes(page_size)

    def all_full_bytes_for(self, num_tokens: int, page_size: int) -> int:
        """Bytes one sequence holds when every attention layer is treated as full (what an
        engine without groups allocates), plus the state layers' state."""
        states = self.layer_types.count("state") * self.state_bytes
        return self.bytes_for(num_tokens, page_size) + states

    # ----------------------------------------------------- Hugging Face configs
    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | Mapping[str, Any],
                       dtype: str | None = None) -> "KVCacheSpec":
        """Read a Hugging Face ``config.json`` (a path, a model directory, or the parsed dict).

        Reads ``num_hidden_layers``; ``kv_lora_rank`` + ``qk_rope_head_dim`` for MLA;
        otherwise ``num_attention_heads``, ``num_key_value_heads`` (absent or null: MHA) and
        ``head_dim`` (absent or null: ``hidden_size / num_attention_heads``). A multimodal
        config's ``text_config`` is used when the top level has no ``num_hidden_layers``.
        ``dtype`` defaults to the config's ``torch_dtype`` (``dtype`` in newer files), else bf16.

        Hybrid models (``layer_types``): the kind of every decoder layer comes from the config's
        ``layer_types`` (``full_attention``, ``sliding_attention``, ``chunked_attention``,
        ``linear_attention``, ``mamba``), else from ``sliding_window_pattern`` (Gemma 3: every
        N-th layer full), ``no_rope_layers`` with ``attention_chunk_size`` (Llama 4: the NoPE
        layers are full, the others chunked), ``full_attention_interval`` (Qwen3-Next: every
        N-th layer full, the others linear attention), or a ``sliding_window`` alone (Mistral:
        every layer; ignored when ``use_sliding_window`` is false, as Qwen2 configs set). The
        state of a Gated DeltaNet layer is its recurrent state (value heads x key dim x value
        dim) plus its convolution state (``linear_conv_kernel_dim - 1`` steps of the q/k/v
        channels), in the cache dtype. ``bytes_per_token`` still counts every attention layer
        as full; ``hybrid_bytes_for`` is what groups hold.

        Raises:
            InvalidArgument / InvalidType: naming the missing, malformed or contradictory field
                (e.g. ``config.json field 'num_key_value_heads'``), or an unreadable file.
        """
        cfg = text_config(load_hf_config(path_or_dict))
        if dtype is None:
            raw = cfg.get("torch_dtype", cfg.get("dtype"))
            dtype = "bf16" if raw is None else canonical_dtype(raw, _field("torch_dtype"))
        layers = _int_field(cfg, "num_hidden_layers")
        q_heads = _int_field(cfg, "num_attention_heads", required=False)
        if cfg.get("kv_lora_rank") is not None:
            rank = _int_field(cfg, "kv_lora_rank")
            rope = _int_field(cfg, "qk_rope_head_dim", lo=0)
            return cls.mla(layers, rank, rope, dtype, q_heads)
        if cfg.get("qk_rope_head_dim") is not None:
            raise InvalidArgument(_field("kv_lora_rank"), _MISSING, "set alongside qk_rope_head_dim (MLA)")
        if q_heads is None:
            raise InvalidArgument(_field("num_attention_heads"), _MISSING, f"a positive int{_alias_hint(cfg)}")
        if cfg.get("num_key_value_heads") is None:
            for key in _OTHER_KV_FIELDS:  # NOTE: refuse rather than size these as MHA, silently too big
                if cfg.get(key) not in (None, False):
                    raise InvalidArgument(_field(key), cfg[key], "absent (this reader takes the KV head count "
                                          "from num_key_value_heads; pass a dict that sets it)")
        kv_heads = _int_field(cfg, "num_key_value_heads", required=False) or q_heads
        if kv_heads > q_heads or q_heads % kv_heads:
            raise InvalidArgument(_field("num_key_value_heads"), kv_heads,
                                  f"a divisor of num_attention_heads ({q_heads})")
        head_dim = _int_field(cfg, "head_dim", required=False)
        if head_dim is None:
            hidden = _int_field(cfg, "hidden_size")
            if hidden % q_heads:
                raise InvalidArgument(_field("hidden_size"), hidden,
                                      f"a multiple of num_attention_heads ({q_heads}) when head_dim is absent")
            head_dim = hidden // q_heads
        types, window, chunk, state_elements = _layer_kinds(cfg, layers)
        if not types:
            return cls(layers, kv_heads, head_dim, dtype, None, q_heads)
        return cls(sum(k != "state" for k in types), kv_heads, head_dim, dtype, None, q_heads,
                   layer_types=types, sliding_window=window, attention_chunk_size=chunk,
                   state_bytes=dtype_bytes(state_elements, dtype))


@dataclass(frozen=True, slots=True)
class HybridLayout:
    """How a hybrid model's layers map to KV cache groups.

    ``layers_per_group``: layers in each group (the same for all, so a page has the same bytes
    whatever group holds it). ``groups``: ``(kind, layer indices)`` per group, in order; the
    cache keeps ``layers_per_group`` K/V tensors and layer ``groups[g][1][j]`` uses tensor ``j``
    through group ``g``'s page table.
    """

    layers_per_group: int
    groups: tuple

    def group_of(self, layer: int) -> tuple[int, int]:
        """``(group, slot)`` of decoder layer ``layer``."""
        for g, (_, layers) in enumerate(self.groups):
            if layer in layers:
                return g, layers.index(layer)
        raise InvalidArgument("layer", layer, "a layer of the model")

    @property
    def padded_slots(self) -> int:
        """Slots allocated for no layer (the last group of a kind that does not fill it)."""
        return sum(self.layers_per_group - len(layers) for _, layers in self.groups)


#: Model types whose ``sliding_window`` alone means every layer slides. Other types with a bare
#: ``sliding_window`` (Gemma 2's older configs alternate) are sized as full attention: an upper
#: bound, never an undercount.
_ALL_SLIDING_MODEL_TYPES = ("mistral", "mixtral", "qwen2", "qwen2_moe", "phi3", "starcoder2")


def _layer_kinds(cfg: Mapping[str, Any], num_layers: int) -> tuple[tuple, int, int, int]:
    """``(layer kinds, sliding window, chunk, state elements per layer)`` of a config; kinds
    empty when every layer is full attention (see ``KVCacheSpec.from_hf_config``)."""
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:
        window = None
    chunk = cfg.get("attention_chunk_size")
    raw = cfg.get("layer_types")
    if raw is not None:
        if not isinstance(raw, list) or len(raw) != num_layers:
            raise InvalidArgument(_field("layer_types"), raw, f"a list of {num_layers} layer types (num_hidden_layers)")
        kinds = []
        for i, value in enumerate(raw):
            if value not in HF_LAYER_TYPES:
                raise InvalidArgument(_field(f"layer_types[{i}]"), value, f"one of {', '.join(HF_LAYER_TYPES)}")
            kinds.append(HF_LAYER_TYPES[value])
    elif cfg.get("sliding_window_pattern") is not None and window is not None:
        every = _int_field(cfg, "sliding_window_pattern")
        kinds = ["full" if (i + 1) % every == 0 else "sliding" for i in range(num_layers)]
    elif cfg.get("no_rope_layers") is not None and chunk is not None:
        flags = cfg["no_rope_layers"]
        if not isinstance(flags, list) or len(flags) != num_layers:
            raise InvalidArgument(_field("no_rope_layers"), flags, f"a list of {num_layers} 0/1 flags")
        kinds = ["chunked" if flag else "full" for flag in flags]
    elif cfg.get("full_attention_interval") is not None:
        every = _int_field(cfg, "full_attention_interval")
        kinds = ["full" if (i + 1) % every == 0 else "state" for i in range(num_layers)]
    elif window is not None and cfg.get("model_type") in _ALL_SLIDING_MODEL_TYPES:
        kinds = ["sliding"] * num_layers
    else:
        kinds = []
    if "full" in kinds and all(k == "full" for k in kinds):
        kinds = []
    window = _int_field(cfg, "sliding_window") if "sliding" in kinds else 0
    chunk = _int_field(cfg, "attention_chunk_size") if "chunked" in kinds else 0
    state = 0
    if "state" in kinds:
        v_heads = _int_field(cfg, "linear_num_value_heads")
        k_heads = _int_field(cfg, "linear_num_key_heads")
        k_dim = _int_field(cfg, "linear_key_head_dim")
        v_dim = _int_field(cfg, "linear_value_head_dim")
        conv = _int_field(cfg, "linear_conv_kernel_dim")
        state = v_heads * k_dim * v_dim + (2 * k_heads * k_dim + v_heads * v_dim) * (conv - 1)
    return tuple(kinds), window, chunk, state


class _Missing:
    """Stands for an absent config field in error messages."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
#: KV-head fields of other dialects (Falcon, ChatGLM) that would change the cache if honoured.
_OTHER_KV_FIELDS = ("multi_query", "num_kv_heads", "n_head_kv", "multi_query_group_num")
#: Fields of other config dialects that this reader does not interpret (asked for by name).
_OTHER_DIALECT_FIELDS = ("n_layer", "n_head", "num_layers", "num_kv_heads", "n_head_kv", "multi_query",
                         "multi_query_group_num", "kv_channels")


def _field(name: str) -> str:
    return f"config.json field {name!r}"


def _alias_hint(cfg: Mapping[str, Any]) -> str:
    found = [f for f in _OTHER_DIALECT_FIELDS if f in cfg]
    if not found:
        return ""
    return (f" (the config has {', '.join(found)}, which this reader does not interpret; "
            f"pass a dict with the Hugging Face names)")


def _int_field(cfg: Mapping[str, Any], key: str, *, required: bool = True, lo: int = 1) -> int | None:
    value = cfg.get(key)
    if value is None:
        if required:
            raise InvalidArgument(_field(key), _MISSING, f"a positive int{_alias_hint(cfg)}")
        return None
    return check.as_int(_field(key), value, lo, check.MAX_COUNT)


def load_hf_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict:
    """The config as a dict: ``path_or_dict`` is a dict, a ``config.json`` path or its directory."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise InvalidType("path_or_dict", path_or_dict, "a path to config.json or a dict")
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise InvalidArgument("path_or_dict", path, f"a readable JSON config.json ({exc})") from exc
    if not isinstance(data, dict):
        raise InvalidArgument("path_or_dict", path, "a JSON object at the top of config.json")
    return data


def text_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language-model part of a config (``text_config`` of a multimodal model, else itself)."""
    inner = cfg.get("text_config")
    if "num_hidden_layers" not in cfg and isinstance(inner, Mapping):
        return inner
    return cfg


#: Model types whose decoder layers are attention + SwiGLU MLP (optionally mixture-of-experts).
_SWIGLU_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2")


def estimate_num_params(config: str | os.PathLike | Mapping[str, Any]) -> tuple[int, int] | None:
    """Parameter count ``(total, active per token)`` of a Llama-style decoder, from its config.

    Counts embeddings (twice unless tied), q/k/v/o projections (+ biases for Qwen2 or
    ``attention_bias``), gate/up/down MLPs per expert, the MoE router and the RMSNorm weights.

    Returns:
        None for model types it does not know (``model_type`` not in llama, mistral, mixtral,
        qwen2): pass a parameter count explicitly instead.
    """
    cfg = text_config(load_hf_config(config))
    model_type = cfg.get("model_type")
    if model_type not in _SWIGLU_MODEL_TYPES:
        return None
    hidden = _int_field(cfg, "hidden_size")
    spec = KVCacheSpec.from_hf_config(cfg, dtype="bf16")
    q_dim, kv_dim = spec.num_q_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    attn = 2 * hidden * q_dim + 2 * hidden * kv_dim
    if cfg.get("attention_bias", model_type == "qwen2"):
        attn += q_dim + 2 * kv_dim
    inter = _int_field(cfg, "intermediate_size")
    mlp = 3 * hidden * inter + ((2 * inter + hidden) if cfg.get("mlp_bias") else 0)
    experts = _int_field(cfg, "num_local_experts", required=False) or 1
    active = (_int_field(cfg, "num_experts_per_tok", required=False) or 1) if experts > 1 else 1
    router = hidden * experts if experts > 1 else 0
    embed = _int_field(cfg, "vocab_size") * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    per_layer = attn + router + 2 * hidden
    layers = spec.num_layers
    return (layers * (per_layer + experts * mlp) + embed + hidden,
            layers * (per_layer + active * mlp) + embed + hidden)


# ------------------------------------------------------------------ budgets
def weights_bytes(num_params: int, dtype: str) -> int:
    """Bytes of ``num_params`` weights stored as ``dtype`` (no activations, no runtime overhead)."""
    return dtype_bytes(check.as_int("num_params", num_params, 0, 2**62), dtype)


def kv_budget_bytes(memory_bytes: int, weights_bytes: int = 0, mem_fraction: float = 0.9,
                    reserve_bytes: int = 0) -> int:
    """Bytes left for the KV cache on one GPU: ``floor(mem_fraction * memory) - weights - reserve``.

    ``mem_fraction`` plays the role of vLLM's ``gpu_memory_utilization`` (default 0.9): the rest
    is left to the CUDA context, activations and fragmentation; ``reserve_bytes`` sets aside
    more. The result is negative when the weights do not fit.
    """
    memory_bytes = check.as_int("memory_bytes", memory_bytes, 1, 2**62)
    weights_bytes = check.as_int("weights_bytes", weights_bytes, 0, 2**62)
    reserve_bytes = check.as_int("reserve_bytes", reserve_bytes, 0, 2**62)
    fraction = _fraction("mem_fraction", mem_fraction)
    return math.floor(fraction * memory_bytes) - weights_bytes - reserve_bytes


def as_kv_spec(value, name: str = "spec") -> KVCacheSpec:
    """A ``KVCacheSpec`` from what a user has at hand.

    Args:
        value: a ``KVCacheSpec``; a ``ModelPreset`` (its ``spec``); a preset name such as
            ``"llama-3-8b"`` or a Hugging Face id of one; a Hugging Face ``config.json`` path,
            its model directory, or the parsed dict.

    Raises:
        InvalidType: none of these. InvalidArgument: an unknown preset name or a bad config.
    """
    if isinstance(value, KVCacheSpec):
        return value
    if isinstance(value, ModelPreset):
        return value.spec
    if isinstance(value, Mapping):
        return KVCacheSpec.from_hf_config(value)
    if isinstance(value, (str, os.PathLike)):
        if os.path.exists(os.fspath(value)):
            return KVCacheSpec.from_hf_config(value)
        if isinstance(value, str):
            return model_preset(value).spec
    raise InvalidType(name, value, "a KVCacheSpec, a ModelPreset, a preset name, or a Hugging Face config.json "
                      "path or dict (KVCacheSpec.from_hf_config)")


def num_pages_for_budget(spec, budget_bytes: int, page_size: int) -> int:
    """Pages of ``page_size`` tokens (all layers, K and V) that fit in ``budget_bytes``.

    Args:
        spec: anything ``as_kv_spec`` takes: a ``KVCacheSpec``, a ``ModelPreset``, a preset
            name, or a Hugging Face config path or dict.

    Returns:
        ``budget_bytes // spec.page_bytes(page_size)`` (>= 1).

    Raises:
        InvalidType: ``spec`` is none of those.
        InvalidArgument: the budget holds less than one page, an unknown preset, a bad config.
    """
    spec = as_kv_spec(spec)
    page = spec.page_bytes(page_size)
    budget_bytes = check.as_int("budget_bytes", budget_bytes, 0, 2**62)
    if budget_bytes < page:
        raise InvalidArgument("budget_bytes", budget_bytes,
                              f"at least one page ({page:,} bytes for page_size={page_size})")
    return min(budget_bytes // page, check.MAX_COUNT)


def max_sequences(spec: KVCacheSpec, budget_bytes: int, num_tokens: int, page_size: int) -> int:
    """Sequences of ``num_tokens`` tokens that fit at once in ``budget_bytes`` of pages
    (``floor(pages in budget / pages per sequence)``; 0 when the budget is negative or small)."""
    pages_per_seq = spec.pages_for(num_tokens, page_size)
    budget_bytes = check.as_int("budget_bytes", budget_bytes, -(2**62), 2**62)
    if budget_bytes <= 0 or pages_per_seq == 0:
        return 0
    return (budget_bytes // spec.page_bytes(page_size)) // pages_per_seq


def gpu_budget_bytes(fraction: float, device: object = None) -> int:
    """``floor(fraction * free bytes)`` of a CUDA device, from ``torch.cuda.mem_get_info``.

    Call it after the model weights are loaded, then give the result to
    ``num_pages_for_budget`` or ``BlockManager.for_budget``.

    Args:
        fraction: share of the currently free memory to use, in ``(0, 1]``.
        device: a CUDA device (index, ``"cuda:1"`` or ``torch.device``); default the current one.

    Raises:
        InvalidArgument: ``fraction`` out of range.
        BackendUnavailable: torch is not installed or CUDA is unavailable.
    """
    fraction = _fraction("fraction", fraction)
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("cuda", "torch is not installed (pip install 'pagedkv[kernels]')") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("cuda", "torch.cuda.is_available() is False; pass a budget in bytes instead")
    free, _total = torch.cuda.mem_get_info(device)
    return math.floor(fraction * int(free))


def _fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidType(name, value, "a float in (0, 1]")
    if not 0.0 < float(value) <= 1.0:  # NaN fails this too
        raise InvalidArgument(name, value, "a float in (0, 1]")
    return float(value)


# ------------------------------------------------------------------ presets
@dataclass(frozen=True, slots=True)
class ModelPreset:
    """A model's KV shape and weights, with where the numbers come from.

    Attributes:
        name: lookup name (``"llama-3-70b"``). hf_id: Hugging Face repository.
        spec: KV cache in the model's native activation dtype.
        num_params / num_active_params: parameters in total / used per token (MoE: fewer).
        weights_dtype: dtype of the released weights. max_context: trained context (tokens).
        source: where every number was checked.
    """

    name: str
    hf_id: str
    spec: KVCacheSpec
    num_params: int
    num_active_params: int
    weights_dtype: str
    max_context: int
    source: str


@dataclass(frozen=True, slots=True)
class GPUPreset:
    """A GPU's memory capacity (bytes), peak memory bandwidth (bytes/s) and dense 16-bit
    tensor-core peak (FLOP/s, no sparsity), with its source."""

    name: str
    display_name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    source: str
    peak_flops: float = 0.0


_GiB = 2**30


def _llama_config(hidden, inter, layers, heads, kv_heads, vocab, max_pos, model_type="llama", **extra):
    return dict(model_type=model_type, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                max_position_embeddings=max_pos, tie_word_embeddings=False, torch_dtype="bfloat16", **extra)


# Each entry: (hf_id, config.json excerpt, explicit (total, active) params or None, weights dtype, source).
# The KV shape always comes from the config through from_hf_config; params are estimated from
# it unless given. Every number was checked against the cited source.
_MODEL_TABLE = {
    # hf.co/meta-llama/Meta-Llama-3-8B config.json; model card 8.03B params (estimate: 8,030,261,248).
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", _llama_config(4096, 14336, 32, 32, 8, 128256, 8192), None,
                   "bf16", "hf.co/meta-llama/Meta-Llama-3-8B config.json; model card: 8.03B params, 8K context"),
    # Llama 3.1 keeps Llama 3's shapes and raises the context to 128K.
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", _llama_config(4096, 14336, 32, 32, 8, 128256, 131072), None,
                     "bf16", "hf.co/meta-llama/Llama-3.1-8B config.json; model card: 8.03B params, 128K context"),
    # hf.co/meta-llama/Meta-Llama-3-70B config.json; model card 70.6B (estimate: 70,553,706,496).
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B", _llama_config(8192, 28672, 80, 64, 8, 128256, 8192), None,
                    "bf16", "hf.co/meta-llama/Meta-Llama-3-70B config.json; model card: 70.6B params, 8K context"),
    "llama-3.1-70b": ("meta-llama/Llama-3.1-70B", _llama_config(8192, 28672, 80, 64, 8, 128256, 131072), None,
                      "bf16", "hf.co/meta-llama/Llama-3.1-70B config.json; model card: 70.6B params, 128K context"),
    # Llama 3 paper (arXiv 2407.21783) Table 3: 126 layers, model dim 16,384, FFN 53,248, 128 heads, 8 KV
    # heads; model card 405B (estimate: 405,853,388,800).
    "llama-3.1-405b": ("meta-llama/Llama-3.1-405B", _llama_config(16384, 53248, 126, 128, 8, 128256, 131072),
                       None, "bf16", "hf.co/meta-llama/Llama-3.1-405B config.json; Llama 3 paper Table 3"),
    # v0.3 (no sliding window, 32K context); model card 7.25B (estimate: 7,248,023,552).
    "mistral-7b": ("mistralai/Mistral-7B-v0.3",
                   _llama_config(4096, 14336, 32, 32, 8, 32768, 32768, "mistral", head_dim=128), None, "bf16",
                   "hf.co/mistralai/Mistral-7B-v0.3 config.json; model card: 7.25B params"),
    # 8 experts, 2 per token; Mistral's release: 46.7B total, 12.9B active (estimate: 46,702,792,704 / 12,879,925,248).
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1",
                     _llama_config(4096, 14336, 32, 32, 8, 32000, 32768, "mixtral", head_dim=128,
                                   num_local_experts=8, num_experts_per_tok=2), None, "bf16",
                     "hf.co/mistralai/Mixtral-8x7B-v0.1 config.json; mistral.ai/news/mixtral-of-experts: 46.7B/12.9B"),
    # Model card: 7.61B params, 28 layers, 28 Q / 4 KV heads, QKV bias (estimate: 7,615,616,512).
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", _llama_config(3584, 18944, 28, 28, 4, 152064, 131072, "qwen2"), None,
                   "bf16", "hf.co/Qwen/Qwen2.5-7B config.json and model card: 7.61B params, 28 Q / 4 KV heads"),
    # Model card: 72.7B params, 80 layers, 64 Q / 8 KV heads (estimate: 72,706,203,648).
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B", _llama_config(8192, 29568, 80, 64, 8, 152064, 131072, "qwen2"), None,
                    "bf16", "hf.co/Qwen/Qwen2.5-72B config.json and model card: 72.7B params, 64 Q / 8 KV heads"),
    # MLA: kv_lora_rank 512, qk_rope_head_dim 64, 61 layers; 671B total / 37B active (the 14B
    # multi-token-prediction module is not counted); weights released in FP8.
    "deepseek-v3": ("deepseek-ai/DeepSeek-V3",
                    dict(model_type="deepseek_v3", num_hidden_layers=61, num_attention_heads=128,
                         num_key_value_heads=128, hidden_size=7168, kv_lora_rank=512, qk_rope_head_dim=64,
                         max_position_embeddings=163840, torch_dtype="bfloat16"),
                    (671 * 10**9, 37 * 10**9), "fp8",
                    "hf.co/deepseek-ai/DeepSeek-V3 config.json; DeepSeek-V3 report (arXiv 2412.19437): 671B/37B"),
    # Hybrid models (issue 14). gpt-oss: model card (arXiv 2508.10925): alternating 128-token banded
    # and dense layers, GQA 64 Q / 8 KV heads of 64, learned attention sinks; 21B total / 3.6B active
    # (20b), 117B / 5.1B (120b). The MoE weights are MXFP4 (4.25 bits) and attention bf16: sized as
    # int4, about 10% under the real checkpoints.
    "gpt-oss-20b": ("openai/gpt-oss-20b",
                    dict(model_type="gpt_oss", num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
                         head_dim=64, hidden_size=2880, sliding_window=128, max_position_embeddings=131072,
                         layer_types=["sliding_attention", "full_attention"] * 12, torch_dtype="bfloat16"),
                    (21 * 10**9, 3_600_000_000), "int4",
                    "hf.co/openai/gpt-oss-20b config.json; gpt-oss model card (arXiv 2508.10925): 21B/3.6B, "
                    "alternating 128-token sliding and full layers, attention sinks"),
    "gpt-oss-120b": ("openai/gpt-oss-120b",
                     dict(model_type="gpt_oss", num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8,
                          head_dim=64, hidden_size=2880, sliding_window=128, max_position_embeddings=131072,
                          layer_types=["sliding_attention", "full_attention"] * 18, torch_dtype="bfloat16"),
                     (117 * 10**9, 5_100_000_000), "int4",
                     "hf.co/openai/gpt-oss-120b config.json; gpt-oss model card (arXiv 2508.10925): 117B/5.1B, "
                     "alternating 128-token sliding and full layers, attention sinks"),
    # Gemma 3 report (arXiv 2503.19786): 5 local layers per global one, 1024-token window, 128K
    # context; text config: 62 layers, 32 Q / 16 KV heads of 128. 27B text parameters.
    "gemma-3-27b": ("google/gemma-3-27b-it",
                    dict(model_type="gemma3_text", num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16,
                         head_dim=128, hidden_size=5376, sliding_window=1024, sliding_window_pattern=6,
                         max_position_embeddings=131072, torch_dtype="bfloat16"),
                    (27 * 10**9, 27 * 10**9), "bf16",
                    "hf.co/google/gemma-3-27b-it config.json (text_config); Gemma 3 report (arXiv 2503.19786): 5:1 "
                    "local/global, window 1024, 128K context"),
    # Llama 4 Scout: 48 layers, 40 Q / 8 KV heads of 128; chunked attention (8192) in 3 of every 4
    # layers, every 4th a global NoPE layer (no_rope_layers 0); 109B total / 17B active, 10M context.
    "llama-4-scout": ("meta-llama/Llama-4-Scout-17B-16E",
                      dict(model_type="llama4_text", num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                           head_dim=128, hidden_size=5120, attention_chunk_size=8192,
                           no_rope_layers=[int((i + 1) % 4 != 0) for i in range(48)],
                           max_position_embeddings=10485760, torch_dtype="bfloat16"),
                      (109 * 10**9, 17 * 10**9), "bf16",
                      "hf.co/meta-llama/Llama-4-Scout-17B-16E config.json (text_config); Meta's Llama 4 model card: "
                      "109B total / 17B active, 10M context"),
    # Qwen3-Next-80B-A3B: 48 layers, every 4th full attention (16 Q / 2 KV heads of 256), the rest
    # Gated DeltaNet (32 value / 16 key heads of 128, conv kernel 4); 80B total / 3B active, 256K.
    "qwen3-next-80b": ("Qwen/Qwen3-Next-80B-A3B-Instruct",
                       dict(model_type="qwen3_next", num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
                            head_dim=256, hidden_size=2048, full_attention_interval=4, linear_num_value_heads=32,
                            linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                            linear_conv_kernel_dim=4, max_position_embeddings=262144, torch_dtype="bfloat16"),
                       (80 * 10**9, 3 * 10**9), "bf16",
                       "hf.co/Qwen/Qwen3-Next-80B-A3B-Instruct config.json and model card: 80B total / 3B active, "
                       "3 Gated DeltaNet layers per full-attention layer"),
    # vLLM paper's example model: 2 x 5120 x 40 x 2 B = 800 KB per token. Params counted from the
    # config (hidden 5120, ffn 20480, 40 layers, vocab 50272, 2050 learned positions, tied, biases).
    "opt-13b": ("facebook/opt-13b",
                dict(model_type="opt", num_hidden_layers=40, num_attention_heads=40, hidden_size=5120,
                     ffn_dim=20480, vocab_size=50272, max_position_embeddings=2048, torch_dtype="float16"),
                (12_853_473_280, 12_853_473_280), "fp16",
                "hf.co/facebook/opt-13b config.json; vLLM paper (arXiv 2309.06180) section 3: 800 KB per token"),
}


def _build_model(name: str, hf_id: str, config: dict, params, weights_dtype: str, source: str) -> ModelPreset:
    spec = KVCacheSpec.from_hf_config(config)
    total, active = params if params is not None else estimate_num_params(config)
    return ModelPreset(name, hf_id, spec, total, active, weights_dtype, config["max_position_embeddings"], source)


#: name -> ModelPreset.
MODEL_PRESETS: dict[str, ModelPreset] = {name: _build_model(name, *row) for name, row in _MODEL_TABLE.items()}

#: name -> GPUPreset. Capacities in GiB (see the module docstring), bandwidths as datasheets quote them.
GPU_PRESETS: dict[str, GPUPreset] = {
    # NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): 40GB HBM2, 1,555 GB/s.
    "a100-40gb": GPUPreset("a100-40gb", "NVIDIA A100 40GB", 40 * _GiB, 1.555e12,
                           "NVIDIA A100 datasheet: 40GB HBM2, 1,555 GB/s; BF16 tensor 312 TFLOPS dense", 312e12),
    # Same datasheet: A100 80GB SXM 2,039 GB/s (the 80GB PCIe card: 1,935 GB/s).
    "a100-80gb": GPUPreset("a100-80gb", "NVIDIA A100 80GB SXM", 80 * _GiB, 2.039e12,
                           "NVIDIA A100 datasheet: 80GB HBM2e, 2,039 GB/s (SXM); BF16 tensor 312 TFLOPS dense", 312e12),
    # NVIDIA H100 datasheet: H100 SXM 80GB, 3.35 TB/s.
    "h100": GPUPreset("h100", "NVIDIA H100 SXM 80GB", 80 * _GiB, 3.35e12,
                      "NVIDIA H100 datasheet: H100 SXM 80GB HBM3, 3.35 TB/s; BF16 tensor 1,979 TFLOPS with sparsity "
                      "(989.5 dense)", 989.5e12),
    # NVIDIA H100 PCIe product brief (PB-11133) and datasheet: 80GB HBM2e, 2 TB/s.
    "h100-pcie": GPUPreset("h100-pcie", "NVIDIA H100 PCIe 80GB", 80 * _GiB, 2.0e12,
                           "NVIDIA H100 datasheet / PCIe product brief PB-11133: 80GB HBM2e, 2 TB/s; BF16 tensor "
                           "1,513 TFLOPS with sparsity (756.5 dense)", 756.5e12),
    # NVIDIA H200 datasheet: 141GB HBM3e, 4.8 TB/s (nvidia-smi shows 143,771 MiB = 140.4 GiB).
    "h200": GPUPreset("h200", "NVIDIA H200 141GB", 141 * _GiB, 4.8e12,
                      "NVIDIA H200 datasheet: 141GB HBM3e, 4.8 TB/s; BF16 tensor 1,979 TFLOPS with sparsity "
                      "(989.5 dense)", 989.5e12),
    # AMD Instinct MI300X data sheet: 192 GB HBM3, 5.3 TB/s; ROCm GPU-specs table: 192 GiB VRAM.
    "mi300x": GPUPreset("mi300x", "AMD Instinct MI300X", 192 * _GiB, 5.3e12,
                        "AMD Instinct MI300X data sheet: 192 GB HBM3, 5.3 TB/s, BF16 1,307.4 TFLOPS dense; "
                        "rocm.docs.amd.com gpu-specs", 1307.4e12),
    # NVIDIA L40S datasheet: 48GB GDDR6 with ECC, 864 GB/s.
    "l40s": GPUPreset("l40s", "NVIDIA L40S", 48 * _GiB, 864e9,
                      "NVIDIA L40S datasheet: 48GB GDDR6 with ECC, 864 GB/s; BF16 tensor 733 TFLOPS with "
                      "sparsity (362.05 dense)", 362.05e12),
}

_MODEL_ALIASES = {
    "llama3-8b": "llama-3-8b", "llama3-70b": "llama-3-70b",
    "llama3.1-8b": "llama-3.1-8b", "llama3.1-70b": "llama-3.1-70b", "llama3.1-405b": "llama-3.1-405b",
    "mistral-7b-v0.3": "mistral-7b", "mixtral-8x7b-v0.1": "mixtral-8x7b",
    "deepseek-v3-671b": "deepseek-v3", "opt13b": "opt-13b",
    **{p.hf_id.lower(): name for name, p in MODEL_PRESETS.items()},
}
_GPU_ALIASES = {
    "a100": "a100-80gb", "a100-40g": "a100-40gb", "a100-80g": "a100-80gb", "h100-sxm": "h100",
    "h100-80gb": "h100", "h100-sxm5": "h100", "h200-141gb": "h200", "h200-sxm": "h200", "mi300": "mi300x",
    "l40-s": "l40s",
}


def _lookup(kind: str, name: object, table: dict, aliases: dict):
    if not isinstance(name, str):
        raise InvalidType(kind, name, f"a preset name ({', '.join(table)})")
    key = "-".join(name.strip().lower().replace("_", "-").split())
    key = aliases.get(key, key)
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table) + list(aliases), n=1)
    hint = f" (did you mean {aliases.get(close[0], close[0])!r}?)" if close else ""
    raise InvalidArgument(kind, name, f"one of {', '.join(table)}{hint}")


def model_preset(name: str) -> ModelPreset:
    """The model preset called ``name`` (case-insensitive; Hugging Face ids work too).

    Raises:
        InvalidArgument: unknown name; the message lists the valid names.
    """
    return _lookup("model", name, MODEL_PRESETS, _MODEL_ALIASES)


def gpu_preset(name: str) -> GPUPreset:
    """The GPU preset called ``name`` (case-insensitive; ``h100`` is the SXM part).

    Raises:
        InvalidArgument: unknown name; the message lists the valid names.
    """
    return _lookup("gpu", name, GPU_PRESETS, _GPU_ALIASES)


__all__ = [
    "KVCacheSpec", "ModelPreset", "GPUPreset", "MODEL_PRESETS", "GPU_PRESETS", "DTYPE_BITS", "ATTENTION_KINDS",
    "model_preset", "gpu_preset", "num_pages_for_budget", "max_sequences", "kv_budget_bytes", "weights_bytes",
    "gpu_budget_bytes", "estimate_num_params", "load_hf_config", "canonical_dtype", "dtype_bytes",
    "KV_SCALES", "SCALE_BYTES", "QUANTIZED_DTYPES", "default_kv_scales",
]
