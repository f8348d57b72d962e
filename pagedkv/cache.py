"""``PagedKVCache``: the K/V page pools of every layer, and the plan/run entry points on them.

Storage is one tensor ``[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]`` (K is
index 0, V index 1; each layer's K or V pool is the NHD layout FlashInfer and vLLM use). An
engine calls ``plan`` once per batch (it validates the block manager's numpy arrays on the host
and uploads them as device int32 tensors) and then ``write`` / ``decode`` / ``prefill`` once per
layer. ``copy`` executes copy-on-write plans; ``swap_out`` / ``swap_in`` move pages to and from
an optional CPU pool.

Quantized pages (``kv_dtype="int8"`` or ``"fp8_e4m3"``) store 1-byte elements; their fp32
per-(token, head) scales live beside the pages in ``[num_layers, 2, num_pages, page_size,
num_kv_heads]`` (so copies and swaps move them with their pages), or, for fp8 per tensor, one
host-side float per layer for K and for V. ``write`` quantizes, ``decode`` / ``prefill``
dequantize; queries, new K/V and outputs stay in ``dtype``. See ``pagedkv.kernels.quant``.

On CUDA the Triton kernels of ``pagedkv.kernels`` run; elsewhere the vectorised torch path of
``pagedkv.kernels.batched`` (one gather and one attention per batch, tested against
``pagedkv.kernels.reference``, the per-sequence specification), so the same code works on a
laptop. This module imports torch (``pagedkv/__init__.py`` must import it lazily)
and sees page tables as arrays, never the block manager object.
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass

import numpy as np
from ._optional import require

torch = require("torch", __name__)

from . import _planning  # noqa: E402
from . import _validate as check  # noqa: E402
from .block_manager import CSR, PageTables, WindowTables  # noqa: E402
from .errors import InvalidArgument, InvalidType  # noqa: E402
from .kernels import _common as common  # noqa: E402
from .kernels import batched  # noqa: E402
from .kernels import quant  # noqa: E402

_DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_BACKENDS = ("triton", "torch")


def _core_module():
    """``pagedkv._core`` when the C++ core is built, else None."""
    try:
        from . import _core
    except ImportError:
        return None
    return _core

_Tensor = torch.Tensor
_NATIVE = (None, "auto", "native")


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Device metadata of one batch, built by ``PagedKVCache.plan`` and shared by every layer.

    Attributes:
        page_table: int32 ``[num_seqs, max_pages]`` on the cache's device (-1 padded).
        seq_lens: int32 ``[num_seqs]``; cached tokens per sequence, new tokens included.
        qo_indptr: int32 ``[num_seqs + 1]``; sequence ``i``'s query rows are
            ``qo_indptr[i]:qo_indptr[i+1]``.
        slot_mapping: int64 ``[num_tokens]``; the slot of each new token (-1 skips it).
        num_seqs, num_tokens: batch size and number of new (query) tokens.
        max_seq_len, max_q_len: host-side maxima, used to size launches without a device sync.
        sliding_window: the window the plan was validated for (page-table entries before it
            may be ``NULL_PAGE``), or ``None``: every entry below ``seq_len`` is a page.
        attention_chunk_size: the chunk of chunked-local attention the plan was validated for
            (entries before the chunk of a sequence's first new token may be ``NULL_PAGE``).
        first_page: int32 ``[num_seqs]`` when the page table holds live pages only
            (``BlockManager.window_tables``): position ``pos`` of sequence ``i`` is in column
            ``pos // page_size - first_page[i]``; ``None``: column ``pos // page_size``.
        owner: the cache that planned it (per-layer calls take only their own cache's plans).
        buffers: the ``PlanBuffers`` the tensors are views of, or ``None`` (tensors of their
            own). A plan in buffers is valid until the next ``plan`` into them, and its
            ``max_seq_len`` is the buffers' capacity (split counts follow the batch size only).
    """

    page_table: torch.Tensor
    seq_lens: torch.Tensor
    qo_indptr: torch.Tensor
    slot_mapping: torch.Tensor
    num_seqs: int
    num_tokens: int
    max_seq_len: int
    max_q_len: int
    sliding_window: int | None = None
    first_page: torch.Tensor | None = None
    buffers: object = None
    owner: object = None
    attention_chunk_size: int | None = None

    @property
    def is_decode(self) -> bool:
        """One new token per sequence."""
        return self.num_tokens == self.num_seqs and self.max_q_len <= 1


class PagedKVCache:
    """K/V pages of every layer, with plan/run attention entry points.

    Args:
        num_layers: transformer layers (>= 1).
        num_pages: pages per layer; page ids match the block manager's.
        page_size: tokens per page (the block manager's ``page_size``).
        num_kv_heads: KV heads per layer.
        head_dim: dimension of each head (a multiple of 8 up to 256).
        dtype: ``torch.float16`` / ``torch.bfloat16`` / ``torch.float32`` or their names: the
            dtype of queries, new K/V and outputs (and of the pages unless ``kv_dtype`` says).
        kv_dtype: how pages store K/V: ``None`` (``"auto"``; as ``dtype``), ``"int8"`` or
            ``"fp8_e4m3"`` (``torch.int8`` / ``torch.float8_e4m3fn`` work too). fp8 on the
            Triton backend needs a GPU of compute capability >= 8.9.
        kv_scale: scales of quantized pages: ``"per_token_head"`` (int8's only layout; fp32
            scales beside the pages, 4 B per (token, layer, K/V, head)) or ``"per_tensor"``
            (fp8's default; one scale per layer for K and one for V, folded into the softmax
            scale and the output, 0 B per token). ``None``: the format's default.
        k_scale, v_scale: per-tensor scales (``kv_scale="per_tensor"``): one float for every
            layer or one per layer; default 1.0 (values beyond ±448 x scale are clamped; a
            calibrated scale is ``max|K| / 448``, see ``quant.tensor_scale``).
        device: any torch device; default ``"cuda"`` when available, else ``"cpu"``.
        backend: ``"triton"`` or ``"torch"``; default ``"triton"`` on CUDA, ``"torch"``
            elsewhere. ``"triton"`` on the CPU needs ``TRITON_INTERPRET=1`` (slow; for tests).
        num_cpu_pages: pages of the CPU offload pool used by ``swap_out`` / ``swap_in``
            (pinned memory when ``device`` is CUDA); 0 for none.

    Raises:
        InvalidArgument / InvalidType: a bad argument (named, with its value); also
            ``kv_dtype="fp8_e4m3"`` with the Triton backend on a GPU of compute capability
            < 8.9 (the message names the capability needed and the one found).
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype | str = torch.float16,
        device: torch.device | str | None = None,
        backend: str | None = None,
        num_cpu_pages: int = 0,
        kv_dtype: torch.dtype | str | None = None,
        kv_scale: str | None = None,
        k_scale: float | object = None,
        v_scale: float | object = None,
    ):
        self.num_layers = check.count("num_layers", num_layers)
        self.num_pages = check.count("num_pages", num_pages)
        self.page_size = check.count("page_size", page_size)
        self.num_kv_heads = check.count("num_kv_heads", num_kv_heads)
        self.head_dim = check.count("head_dim", head_dim)
        common.check_head_dim(self.head_dim)  # the attention kernels' limit, on every backend
        self.num_cpu_pages = check.as_int("num_cpu_pages", num_cpu_pages, 0, check.MAX_COUNT)
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise InvalidArgument("dtype", dtype, "one of " + ", ".join(sorted(_DTYPES)))
            dtype = _DTYPES[dtype]
        if dtype not in common.FLOAT_DTYPES:
            raise InvalidArgument("dtype", dtype, "torch.float16, torch.bfloat16 or torch.float32")
        self.dtype = dtype
        self._act = torch.empty(0, dtype=dtype)  # names the activation dtype in errors
        self.kv_format = self._kv_format(kv_dtype)
        self.kv_dtype = dtype if self.kv_format is None else self.kv_format.dtype
        self.kv_scale = self._kv_scale(kv_scale)
        self._tensor_scales = None
        if self.kv_scale == "per_tensor":
            self._tensor_scales = tuple(zip(self._layer_scales("k_scale", k_scale),
                                            self._layer_scales("v_scale", v_scale)))
        else:
            for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
                if value is not None:
                    raise InvalidArgument(name, value, "None unless kv_scale='per_tensor'")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidArgument("device", device, "a torch device such as 'cuda', 'cuda:1' or 'cpu'") from None
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise InvalidArgument("device", device, "a device this machine has: torch.cuda.is_available() is "
                                      f"False (no CUDA GPU, or torch {torch.__version__} is a CPU build); "
                                      "use device='cpu' or leave it None")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            elif self.device.index >= torch.cuda.device_count():
                raise InvalidArgument("device", device, f"one of the {torch.cuda.device_count()} CUDA devices "
                                      "(cuda:0 ...)")
        if backend is None:
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend not in _BACKENDS:
            raise InvalidArgument("backend", backend, "'triton', 'torch' or None")
        self.backend = backend
        if backend == "triton":
            quant.check_supported(self.kv_format, self.device)
        shape = (self.num_layers, 2, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        pin = self.device.type == "cuda"
        # NOTE: zero-filled so a fresh cache is deterministic; correctness never depends on it
        # (kernels mask every load at seq_len, so unused page tails are never read).
        self._kv = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self._scales = self._cpu_kv = self._cpu_scales = None
        if self.kv_scale == "per_token_head":
            self._scales = torch.zeros(shape[:-1], dtype=quant.SCALE_DTYPE, device=self.device)
        if self.num_cpu_pages:
            cpu_shape = (*shape[:2], self.num_cpu_pages, *shape[3:])
            self._cpu_kv = torch.zeros(cpu_shape, dtype=self.kv_dtype, pin_memory=pin)
            if self._scales is not None:
                self._cpu_scales = torch.zeros(cpu_shape[:-1], dtype=quant.SCALE_DTYPE, pin_memory=pin)
        # NOTE: what every per-layer call needs, made once: the layer's K and V pools (views),
        # its scale arguments, and (Triton) the launchers and checked quantization arguments.
        self._k_pools = tuple(self._kv[layer, 0] for layer in range(self.num_layers))
        self._v_pools = tuple(self._kv[layer, 1] for layer in range(self.num_layers))
        self._scale_kwargs = tuple(self._scale_args(layer) for layer in range(self.num_layers))
        self._launch = None  # (write, decode, prefill) inner launchers, resolved on first use
        self._quant_args = None
        self._options: dict = {}  # (sm_scale, sliding_window, logits_soft_cap) -> checked options
        self._workspaces: dict = {}  # (rows, num_heads, num_splits) -> split-KV partials
        self._splits: dict = {}  # (rows, max_seq_len, window, num_heads) -> default split-KV count
        self._landing: list = []  # swap-outs in flight: (event, CPU pool, page index, host bytes)
        self._fast_plans = True  # NOTE: the C++ plan of buffered batches (tests turn it off to compare)
        self._core = _core_module()

    def _kv_format(self, kv_dtype: object) -> quant.KVFormat | None:
        if isinstance(kv_dtype, (str, type(None))) and kv_dtype in _NATIVE:
            return None
        fmt = quant.kv_format(kv_dtype)
        if fmt is not None:
            return fmt
        native = _DTYPES.get(kv_dtype) if isinstance(kv_dtype, str) else kv_dtype
        if native == self.dtype:
            return None
        raise InvalidArgument("kv_dtype", kv_dtype, f"None (the dtype, {self.dtype}), "
                              + " or ".join(repr(name) for name in quant.FORMATS))

    def _kv_scale(self, kv_scale: object) -> str | None:
        fmt = self.kv_format
        if fmt is None:
            if kv_scale is not None:
                raise InvalidArgument("kv_scale", kv_scale, "None for unquantized pages (kv_dtype=None)")
            return None
        if kv_scale is None:
            return fmt.scale_layouts[0]
        if kv_scale not in fmt.scale_layouts:
            if len(fmt.scale_layouts) == 1:
                expected = f"{fmt.scale_layouts[0]!r} (the only layout of {fmt.name} pages) or None"
            else:
                expected = f"one of {', '.join(map(repr, fmt.scale_layouts))} for {fmt.name} pages, or None"
            raise InvalidArgument("kv_scale", kv_scale, expected)
        return kv_scale

    def _layer_scales(self, name: str, value: object) -> list[float]:
        if value is None:
            return [1.0] * self.num_layers
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return [quant.check_tensor_scale(name, value)] * self.num_layers
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().reshape(-1).tolist()
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise InvalidType(name, value, f"a positive float or {self.num_layers} of them (one per layer)")
        if len(value) != self.num_layers:
            raise InvalidArgument(name, f"{len(value)} scales", f"one float or one per layer ({self.num_layers})")
        return [quant.check_tensor_scale(f"{name}[{i}]", item) for i, item in enumerate(value)]

    # ------------------------------------------------------------------ storage
    @property
    def kv(self) -> torch.Tensor:
        """All pages: ``[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]`` of ``kv_dtype``."""
        return self._kv

    @property
    def cpu_kv(self) -> torch.Tensor | None:
        """The CPU offload pool ``[num_layers, 2, num_cpu_pages, ...]``, or ``None`` (once every
        swap-out in flight has landed in it)."""
        self.finish_swaps()
        return self._cpu_kv

    @property
    def is_quantized(self) -> bool:
        """Pages hold int8 / fp8_e4m3 values (``kv_format`` says which)."""
        return self.kv_format is not None

    @property
    def scales(self) -> torch.Tensor | None:
        """Per-(token, head) scales, fp32 ``[num_layers, 2, num_pages, page_size, num_kv_heads]``
        (``kv_scale="per_token_head"``), else ``None``."""
        return self._scales

    @property
    def cpu_scales(self) -> torch.Tensor | None:
        """The CPU offload pool's scales ``[num_layers, 2, num_cpu_pages, page_size, num_kv_heads]``, or ``None``."""
        self.finish_swaps()
        return self._cpu_scales

    @property
    def tensor_scales(self) -> tuple[tuple[float, float], ...] | None:
        """``(k_scale, v_scale)`` per layer (``kv_scale="per_tensor"``), else ``None``."""
        return self._tensor_scales

    def k_scale_cache(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s K scales ``[num_pages, page_size, num_kv_heads]`` (a view), or ``None``."""
        layer = self._layer(layer)
        return None if self._scales is None else self._scales[layer, 0]

    def v_scale_cache(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s V scales ``[num_pages, page_size, num_kv_heads]`` (a view), or ``None``."""
        layer = self._layer(layer)
        return None if self._scales is None else self._scales[layer, 1]

    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s K pages ``[num_pages, page_size, num_kv_heads, head_dim]`` (a view)."""
        return self._kv[self._layer(layer), 0]

    def v_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s V pages ``[num_pages, page_size, num_kv_heads, head_dim]`` (a view)."""
        return self._kv[self._layer(layer), 1]

    @property
    def page_nbytes(self) -> int:
        """Bytes of one page over every layer, K and V (scales included)."""
        scales = 0 if self._scales is None else self._scales[:, :, 0].numel() * self._scales.element_size()
        return self._kv[:, :, 0].numel() * self._kv.element_size() + scales

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes over every layer, K and V (scales included): ``page_nbytes / page_size``.

        ``2 x num_layers x num_kv_heads x (head_dim x element bytes + 4 B if per-(token, head)
        scales)``; e.g. Llama-3-8B: 131,072 B in bf16, 67,584 B in int8, 65,536 B in fp8 per tensor.
        """
        return self.page_nbytes // self.page_size

    @property
    def nbytes(self) -> int:
        """Bytes of the device pool (scales included)."""
        return self.page_nbytes * self.num_pages

    # --------------------------------------------------------------------- plan
    def plan(
        self,
        page_tables: PageTables | CSR | object,
        seq_lens: object = None,
        *,
        query_lens: object = None,
        slot_mapping: object = None,
        max_pages: int | None = None,
        sliding_window: int | None = None,
        first_page: object = None,
        buffers: _planning.PlanBuffers | None = None,
        pad_to: int | None = None,
        attention_chunk_size: int | None = None,
    ) -> BatchPlan:
        """Validate one batch's page tables on the host and upload them once for every layer.

        Call it after the block manager has grown the sequences (``append_batch`` or
        ``allocate``), so ``seq_lens`` include the new tokens.

        Args:
            page_tables: ``BlockManager.page_tables(...)`` (a ``PageTables``),
                ``BlockManager.window_tables(...)`` (a ``WindowTables``: live pages only, so
                a long windowed sequence costs its window, not its length),
                ``BlockManager.csr(...)`` (a ``CSR``), or an int ``[num_seqs, max_pages]``
                array padded with -1 (then ``seq_lens`` is required).
            seq_lens: int ``[num_seqs]``; only with a plain array.
            query_lens: new tokens per sequence: ``None`` for decode (1 each), one int for all,
                or ints ``[num_seqs]`` (0 allowed); each at most its ``seq_len``.
            slot_mapping: int ``[sum(query_lens)]`` from ``StepPlan.slot_mapping`` or
                ``BlockManager.slots`` (-1 skips a token, e.g. padding); default: each new
                token's slot is derived from the page table (the last ``query_len``
                positions of its sequence).
            max_pages: pad the page table to this width (a fixed shape for CUDA graphs).
            sliding_window: the window every attention call on this plan will use, when
                ``BlockManager.release_window`` has released pages: entries wholly before the
                window of a sequence's first new token may then be ``NULL_PAGE`` (-1), and
                ``decode`` / ``prefill`` refuse a larger window or none.
            attention_chunk_size: the same for chunked-local attention (a ``chunked`` KV cache
                group of ``HybridBlockManager``): entries wholly before the chunk of a
                sequence's first new token may be ``NULL_PAGE``, and ``decode`` / ``prefill``
                refuse any other mask. At most one of it and ``sliding_window``.
            first_page: int ``[num_seqs]`` with a plain array whose rows start at these page
                indices (as a ``WindowTables`` does); every page attention reads must be at or
                after it.
            buffers: ``plan_buffers(...)``: fill these persistent device tensors in place
                (fixed addresses, for CUDA graphs) instead of uploading new ones; the table is
                then ``buffers.max_pages`` wide.
            pad_to: with ``buffers``, pad the batch to this many sequences (a captured graph's
                batch size): padding rows have ``seq_len`` 0 and slot -1 (a decode plan gives
                them one query row each), write nothing and attend to nothing (zeros).

        Returns:
            A ``BatchPlan`` on this cache's device.

        Raises:
            InvalidArgument / InvalidType: inconsistent arrays, page ids outside
                ``[0, num_pages)`` for a used entry, too-long sequences, bad or repeated slots,
                a device tensor among the host arrays (reading it would synchronise).
        """
        if buffers is not None:
            if not isinstance(buffers, _planning.PlanBuffers) or buffers.device != self.device:
                raise InvalidArgument("buffers", buffers, f"PlanBuffers on {self.device} (from this cache's plan_buffers)")
            core = self._core if self._fast_plans else None
            if core is not None:
                # NOTE: the usual batch in one C++ pass straight into the staging; anything it
                # does not take (or refuses) goes the checked way below, which raises the error.
                fast = _planning.fast_fill(core, buffers, page_tables, seq_lens, query_lens, slot_mapping, max_pages,
                                           sliding_window, first_page, pad_to, self.num_pages, self.page_size,
                                           attention_chunk_size)
                if fast is not None:
                    return self._buffered_plan(buffers, *fast)
        host = _planning.host_plan(page_tables, seq_lens, query_lens, slot_mapping, max_pages, sliding_window,
                                   first_page, num_pages=self.num_pages, page_size=self.page_size,
                                   attention_chunk_size=attention_chunk_size)
        num_seqs, num_tokens = host.lens.shape[0], host.slots.shape[0]
        if buffers is None:
            if pad_to is not None:
                raise InvalidArgument("pad_to", pad_to, "None unless buffers= is given (padding fills plan buffers)")
            width = host.table.shape[1] if max_pages is None else max_pages
            table = host.table
            if width > table.shape[1]:
                table = np.pad(table, ((0, 0), (0, width - table.shape[1])), constant_values=-1)
            device = self.device
            return BatchPlan(
                page_table=_planning.upload(table, torch.int32, device),
                seq_lens=_planning.upload(host.lens, torch.int32, device),
                qo_indptr=_planning.upload(host.qo_indptr, torch.int32, device),
                slot_mapping=_planning.upload(host.slots, torch.int64, device),
                num_seqs=num_seqs, num_tokens=num_tokens, max_seq_len=host.max_seq_len, max_q_len=host.max_q_len,
                sliding_window=host.sliding_window, attention_chunk_size=host.attention_chunk_size,
                first_page=None if host.first is None else _planning.upload(host.first, torch.int32, device),
                owner=self,
            )
        if num_seqs > buffers.max_num_seqs:
            raise InvalidArgument("page_tables", f"{num_seqs} sequences", f"at most max_num_seqs = {buffers.max_num_seqs}")
        rows = num_seqs if pad_to is None else check.as_int("pad_to", pad_to, num_seqs, buffers.max_num_seqs)
        if host.table.shape[1] > buffers.max_pages or (max_pages is not None and max_pages > buffers.max_pages):
            raise InvalidArgument("max_pages", max(host.table.shape[1], max_pages or 0),
                                  f"at most the buffers' max_pages = {buffers.max_pages}")
        decode = num_tokens == num_seqs and host.max_q_len <= 1
        tokens = num_tokens + (rows - num_seqs if decode else 0)
        if tokens > buffers.max_num_tokens:
            raise InvalidArgument("query_lens", num_tokens, f"a total of at most max_num_tokens = {buffers.max_num_tokens}")
        views = buffers.fill(host, rows, tokens)
        return self._buffered_plan(buffers, views, tokens, host.max_seq_len, host.max_q_len, host.sliding_window,
                                   host.attention_chunk_size)

    def _buffered_plan(self, buffers, views: tuple, tokens: int, max_seq_len: int, max_q_len: int,
                       sliding_window: int | None, attention_chunk_size: int | None = None) -> BatchPlan:
        table, lens, qo_indptr, slots, first = views
        rows = table.shape[0]
        decode = tokens == rows and max_q_len <= 1
        return BatchPlan(
            page_table=table, seq_lens=lens, qo_indptr=qo_indptr, slot_mapping=slots, num_seqs=rows,
            num_tokens=tokens,
            max_seq_len=max_seq_len, max_q_len=max(max_q_len, 1 if decode and rows else 0),
            sliding_window=sliding_window, first_page=first, buffers=buffers, owner=self,
            attention_chunk_size=attention_chunk_size,
        )

    def plan_buffers(self, max_num_seqs: int, max_num_tokens: int, max_pages: int) -> _planning.PlanBuffers:
        """Persistent device buffers for ``plan(..., buffers=...)`` (see ``PlanBuffers``).

        Args:
            max_num_seqs: the largest batch (padded size included).
            max_num_tokens: the most new tokens per step (prefill chunks included).
            max_pages: page-table width: ``cdiv(max_model_len, page_size)``, or fewer with
                ``window_tables``.
        """
        return _planning.PlanBuffers(self.device, max_num_seqs, max_num_tokens, max_pages)

    # ---------------------------------------------------------------------- run
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: BatchPlan) -> None:
        """Store the batch's new K/V of layer ``layer`` at ``plan.slot_mapping``.

        Quantized pages receive the tokens quantized (and their scales, per (token, head)).
        Only ``layer`` and the shapes, dtype and device of ``k`` / ``v`` are checked here; the
        plan was checked by ``plan`` and the pools at construction.

        Args:
            k, v: ``[num_tokens, num_kv_heads, head_dim]`` in the cache's dtype, on its device
                (token and head strides free, the last dimension contiguous).
        """
        if layer.__class__ is not int or not 0 <= layer < self.num_layers:
            layer = self._layer(layer)
        if plan.__class__ is not BatchPlan or plan.owner is not self:
            self._check_plan(plan)
        shape = (plan.num_tokens, self.num_kv_heads, self.head_dim)
        if not (k.__class__ is _Tensor and v.__class__ is _Tensor and k.shape == shape and v.shape == shape
                and k.dtype == self.dtype and v.dtype == self.dtype and k.device == self.device
                and v.device == self.device and k.stride(-1) == 1 and v.stride(-1) == 1):
            names = "[num_tokens, num_kv_heads, head_dim]"
            common.check_tensor("k", k, names, shape, like=("the cache", self._act), device=self.device)
            common.check_tensor("v", v, names, shape, like=("the cache", self._act), device=self.device)
        if self.backend == "torch":
            batched.write_kv(k, v, self._k_pools[layer], self._v_pools[layer], plan.slot_mapping,
                               **self._scale_kwargs[layer])
            return
        launch = self._launch or self._launchers()
        launch[0](k, v, self._k_pools[layer], self._v_pools[layer], plan.slot_mapping, self._quant_args[layer])

    def decode(
        self,
        layer: int,
        q: torch.Tensor,
        plan: BatchPlan,
        *,
        sm_scale: float | None = None,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        out: torch.Tensor | None = None,
        num_splits: int | None = None,
        sinks: torch.Tensor | None = None,
        attention_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Decode attention of layer ``layer`` (write the new K/V first).

        Args:
            q: ``[num_seqs, num_heads, head_dim]``; ``num_heads`` a multiple of ``num_kv_heads``.
            plan: a decode plan (``query_lens`` 1 per sequence).
            sm_scale, sliding_window, logits_soft_cap, attention_chunk_size: see
                ``kernels.paged_decode``.
            out: optional output ``[num_seqs, num_heads, head_dim]``; with it, and a plan in
                ``PlanBuffers``, the call allocates nothing (after its first call for that
                batch size and head count, or ``warmup``).
            num_splits: split-KV count (Triton backend); default: chosen from the batch shape
                (with ``PlanBuffers``, from the padded batch size only: fixed per size).
            sinks: float ``[num_heads]`` attention sinks of this layer (gpt-oss), on the
                cache's device; see ``kernels.paged_decode``.

        Returns:
            ``[num_seqs, num_heads, head_dim]`` in the cache's dtype.
        """
        if layer.__class__ is not int or not 0 <= layer < self.num_layers:
            layer = self._layer(layer)
        if plan.__class__ is not BatchPlan or plan.owner is not self:
            self._check_plan(plan)
        if plan.num_tokens != plan.num_seqs or plan.max_q_len > 1:
            raise InvalidArgument("plan", f"a plan with {plan.num_tokens} tokens for {plan.num_seqs} sequences",
                                  "a decode plan (one new token per sequence); use prefill for chunks")
        sm_scale, window, cap = self._query_options(q, plan.num_seqs, out, sm_scale, sliding_window,
                                                    logits_soft_cap, plan, "[num_seqs, num_heads, head_dim]",
                                                    attention_chunk_size)
        if sinks is not None:
            common.check_sinks(sinks, q.shape[1], self.device)
        if out is None:
            out = torch.empty_like(q)
        if self.backend == "torch":
            return batched.paged_attention(q, self._k_pools[layer], self._v_pools[layer], plan.page_table,
                                           plan.seq_lens, None, max_q_len=1, max_seq_len=plan.max_seq_len,
                                           sm_scale=sm_scale, **common.mask_kwargs(window),
                                           logits_soft_cap=cap or None, out=out, first_page=plan.first_page,
                                           sinks=sinks, **self._scale_kwargs[layer])
        launch = self._launch or self._launchers()
        num_heads = q.shape[1]
        if num_splits is None:
            # NOTE: with plan buffers, from their capacity, not this batch's longest sequence:
            # split counts (and so kernel variants and graph shapes) follow the padded size only.
            span = plan.max_seq_len if plan.buffers is None else plan.buffers.max_pages * self.page_size
            num_splits = self._default_splits(plan.num_seqs, span, window, num_heads)
        else:
            common.check_int("num_splits", num_splits, 1, common.MAX_SPLITS)
        workspace = None
        if num_splits > 1 and plan.buffers is not None:
            workspace = self._workspace(plan.num_seqs, num_heads, num_splits)
        return launch[1](q, self._k_pools[layer], self._v_pools[layer], plan.page_table, plan.seq_lens,
                         plan.first_page, out, sm_scale, window, cap, self._quant_args[layer], num_splits, workspace,
                         sinks=sinks)

    def prefill(
        self,
        layer: int,
        q: torch.Tensor,
        plan: BatchPlan,
        *,
        sm_scale: float | None = None,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        out: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
        attention_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Prefill / extend attention of layer ``layer`` for a ragged batch (write K/V first).

        Args:
            q: ``[num_tokens, num_heads, head_dim]``; rows ordered as the plan's ``query_lens``.
            plan: any plan (decode plans work too: chunks of one token).
            sm_scale, sliding_window, logits_soft_cap, sinks, attention_chunk_size: see
                ``kernels.paged_prefill``.

        Returns:
            ``[num_tokens, num_heads, head_dim]`` in the cache's dtype.
        """
        if layer.__class__ is not int or not 0 <= layer < self.num_layers:
            layer = self._layer(layer)
        if plan.__class__ is not BatchPlan or plan.owner is not self:
            self._check_plan(plan)
        sm_scale, window, cap = self._query_options(q, plan.num_tokens, out, sm_scale, sliding_window,
                                                    logits_soft_cap, plan, "[num_tokens, num_heads, head_dim]",
                                                    attention_chunk_size)
        if sinks is not None:
            common.check_sinks(sinks, q.shape[1], self.device)
        if out is None:
            out = torch.empty_like(q)
        if self.backend == "torch":
            return batched.paged_attention(q, self._k_pools[layer], self._v_pools[layer], plan.page_table,
                                           plan.seq_lens, plan.qo_indptr, max_q_len=plan.max_q_len,
                                           max_seq_len=plan.max_seq_len, sm_scale=sm_scale,
                                           **common.mask_kwargs(window), logits_soft_cap=cap or None, out=out,
                                           first_page=plan.first_page, sinks=sinks, **self._scale_kwargs[layer])
        launch = self._launch or self._launchers()
        return launch[2](q, self._k_pools[layer], self._v_pools[layer], plan.page_table, plan.seq_lens,
                         plan.qo_indptr, plan.first_page, out, sm_scale, window, cap, self._quant_args[layer],
                         plan.max_q_len, sinks=sinks)

    def warmup(
        self,
        buffers: _planning.PlanBuffers,
        num_heads: int,
        batch_sizes,
        *,
        sm_scale: float | None = None,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        live_pages: bool = False,
        attention_chunk_size: int | None = None,
    ) -> None:
        """Compile every kernel variant serving through ``buffers`` can launch, before serving.

        For each batch size (the sizes an engine pads decode batches to, e.g. its CUDA-graph
        capture sizes), one ``write``, ``decode`` and ``prefill`` run on a batch of padding rows:
        they touch no page and return zeros. With ``buffers`` the page-table stride and the
        split-KV count of each size are fixed, so no other variant compiles later (a chunked
        prefill's variant does not depend on its length). Also makes the split-KV workspaces.

        Args:
            buffers: the ``plan_buffers`` serving will plan into.
            num_heads: query heads of the model.
            batch_sizes: the padded batch sizes (each at most ``buffers.max_num_seqs`` and
                ``buffers.max_num_tokens``).
            sm_scale, sliding_window, logits_soft_cap, attention_chunk_size: as serving will
                pass them (a soft cap is a variant of its own; a window or a chunk sets the
                split-KV count).
            live_pages: serving plans ``window_tables`` (rows that start at ``first_page``).
        """
        num_heads = check.count("num_heads", num_heads)
        common.check_group(num_heads, self.num_kv_heads)
        width = buffers.max_pages if isinstance(buffers, _planning.PlanBuffers) else 0
        empty = np.zeros((0, width), dtype=np.int32), np.zeros(0, dtype=np.int32)
        tables = WindowTables(*empty, np.zeros(0, dtype=np.int32)) if live_pages else PageTables(*empty)
        for size in batch_sizes:
            plan = self.plan(tables, buffers=buffers, pad_to=size, sliding_window=sliding_window,
                             attention_chunk_size=attention_chunk_size)
            kv = torch.zeros((plan.num_tokens, self.num_kv_heads, self.head_dim), dtype=self.dtype, device=self.device)
            q = torch.zeros((plan.num_tokens, num_heads, self.head_dim), dtype=self.dtype, device=self.device)
            options = dict(sm_scale=sm_scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                           attention_chunk_size=attention_chunk_size)
            self.write(0, kv, kv, plan)
            self.decode(0, q, plan, out=torch.empty_like(q), **options)
            self.prefill(0, q, plan, out=torch.empty_like(q), **options)

    # ------------------------------------------------------------------- copies
    def copy(self, copies: object) -> None:
        """Execute a copy-on-write plan on every layer, K and V (one launch on the Triton backend;
        a second one moves the per-(token, head) scales of quantized pages).

        Args:
            copies: int ``[num_copies, 2]`` rows ``(src_page, dst_page)``: ``StepPlan.copies``,
                the list ``BlockManager.append`` returns, or a device tensor (not re-checked).

        Raises:
            InvalidArgument: a page id out of range, a page copied to twice, or a page that is
                both a source and a destination.
        """
        pairs = self._device_copies(copies, self.num_pages, self.num_pages)
        if pairs is None:
            return
        caches = quant.byte_view(self._kv).view(self.num_layers * 2, self.num_pages, self.page_size,
                                                self.num_kv_heads, self.head_dim)
        self._ops().copy_pages(caches, pairs)
        if self._scales is not None:
            # NOTE: a page's scales travel with it; a copied page without them would dequantize wrong.
            self._ops().copy_pages(self._scales.view(self.num_layers * 2, self.num_pages, self.page_size,
                                                     self.num_kv_heads), pairs)

    def swap(self, swap_plan) -> None:
        """Execute a ``SwapPlan`` from ``BlockManager.swap_out`` / ``swap_in`` (every layer).

        Args:
            swap_plan: has ``copies`` (int ``[K, 2]``) and ``direction`` (``"out"``: rows are
                ``(device_page, cpu_page)``; ``"in"``: ``(cpu_page, device_page)``).
        """
        direction = getattr(swap_plan, "direction", None)
        if direction == "out":
            self.swap_out(swap_plan.copies)
        elif direction == "in":
            self.swap_in(swap_plan.copies)
        else:
            raise InvalidArgument("swap_plan.direction", direction, "'out' or 'in' (a BlockManager SwapPlan)")

    def offload(self, plan) -> None:
        """Execute an ``OffloadPlan`` from ``BlockManager.take_offload`` (every layer): the
        demotions (device -> CPU pool), then the promotions (CPU pool -> device).

        Call it before the step's other copies and swaps (``copy``, ``swap``) and before any
        KV write of the step: a demotion reads a device page the step hands out again, and a
        copy may read a promoted page.
        """
        if len(plan.demotions):
            self.swap_out(plan.demotions)
        if len(plan.promotions):
            self.swap_in(plan.promotions)

    def swap_out(self, copies: object) -> None:
        """Copy device pages (and their scales) to the CPU pool, rows ``(device_page, cpu_page)``, every layer."""
        self._require_cpu_pool()
        self._swap(copies, [(self._kv, self._cpu_kv), (self._scales, self._cpu_scales)], self.num_pages,
                   self.num_cpu_pages, out=True)

    def swap_in(self, copies: object) -> None:
        """Copy CPU-pool pages (and their scales) to the device, rows ``(cpu_page, device_page)``, every layer."""
        self._require_cpu_pool()
        self._swap(copies, [(self._cpu_kv, self._kv), (self._cpu_scales, self._scales)], self.num_cpu_pages,
                   self.num_pages, out=False)

    def _swap(self, copies, pools: list, num_src: int, num_dst: int, *, out: bool) -> None:
        pairs = _host_copies(copies, num_src, num_dst, same_pool=False)
        if pairs.shape[0] == 0:
            return
        # NOTE: the CPU pool is read (swap-in) or written (swap-out) only once every earlier
        # swap-out's bytes have arrived: a swap-in could otherwise restore stale K/V.
        self.finish_swaps()
        src_index, dst_index = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
        for src_pool, dst_pool in pools:
            if src_pool is None:  # no per-(token, head) scales
                continue
            src_pool, dst_pool = quant.byte_view(src_pool), quant.byte_view(dst_pool)
            src = src_index.to(src_pool.device, non_blocking=True) if src_pool.device.type != "cpu" else src_index
            dst = dst_index.to(dst_pool.device, non_blocking=True) if dst_pool.device.type != "cpu" else dst_index
            if out:
                # Out: one gather on the device, one copy into pinned host memory, and the
                # scatter into the CPU pool once that copy has completed (finish_swaps).
                moved, done = self._to_host(src_pool.index_select(2, src))
                if done is None:  # already complete (a CPU device)
                    dst_pool.index_copy_(2, dst, moved)
                else:
                    self._landing.append((done, dst_pool, dst, moved))
            else:
                # In: one gather from the CPU pool into pinned memory, one asynchronous copy,
                # one scatter on the device, ordered before later kernels by the stream.
                staged = torch.empty((*src_pool.shape[:2], pairs.shape[0], *src_pool.shape[3:]), dtype=src_pool.dtype,
                                     pin_memory=dst_pool.device.type == "cuda")
                torch.index_select(src_pool, 2, src, out=staged)
                dst_pool.index_copy_(2, dst, staged.to(dst_pool.device, non_blocking=True))

    def _to_host(self, gathered: torch.Tensor) -> tuple:
        """Start copying ``gathered`` to (pinned) host memory: ``(host tensor, completion event
        or None when already complete)``."""
        if gathered.device.type == "cpu":
            return gathered, None
        host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
        host.copy_(gathered, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def finish_swaps(self) -> None:
        """Wait for the swap-outs in flight and land them in the CPU pool.

        ``swap_out`` returns at once on CUDA: its device-to-host copies run asynchronously, and
        their bytes reach the CPU pool here. Every later swap, ``offload`` and the ``cpu_kv`` /
        ``cpu_scales`` properties call it first, so the pool is never read or written early;
        an engine may call it at a convenient point to keep that wait off the next swap.
        """
        landing, self._landing = self._landing, []
        for done, pool, index, moved in landing:
            if done is not None:
                done.synchronize()
            pool.index_copy_(2, index, moved)

    # --------------------------------------------------------- between processes
    def send_pages(self, plan, dst_rank: int, group=None) -> None:
        """Send the pages of a transfer plan, every layer (and their scales), to ``dst_rank``.

        Args:
            plan: an ``ImportPlan`` (its ``transfers``) or an int ``[K, 2]`` array; column 0 are
                this cache's pages. The receiver calls ``recv_pages`` with the same plan.
            dst_rank, group: the peer in ``torch.distributed`` (point-to-point ``send``).
        """
        pairs = self._transfer_pairs(plan, sending=True)
        if not pairs.shape[0]:
            return
        src = torch.from_numpy(pairs[:, 0]).to(self.device)
        for pool in (self._kv, self._scales):
            if pool is not None:
                torch.distributed.send(quant.byte_view(pool).index_select(2, src).contiguous(), dst_rank, group=group)

    def recv_pages(self, plan, src_rank: int, group=None) -> None:
        """Receive the pages ``send_pages`` sends into column 1 of the plan's rows (blocking)."""
        pairs = self._transfer_pairs(plan, sending=False)
        if not pairs.shape[0]:
            return
        dst = torch.from_numpy(pairs[:, 1]).to(self.device)
        for pool in (self._kv, self._scales):
            if pool is not None:
                view = quant.byte_view(pool)
                incoming = torch.empty((*view.shape[:2], pairs.shape[0], *view.shape[3:]), dtype=view.dtype,
                                       device=self.device)
                torch.distributed.recv(incoming, src_rank, group=group)
                view.index_copy_(2, dst, incoming)

    def _transfer_pairs(self, plan, *, sending: bool) -> np.ndarray:
        """A plan's rows, this side's column checked against this pool (the peer checks its own)."""
        transfers = getattr(plan, "transfers", plan)
        if sending:
            return _host_copies(transfers, self.num_pages, check.MAX_COUNT, same_pool=False)
        return _host_copies(transfers, check.MAX_COUNT, self.num_pages, same_pool=False)

    def _require_cpu_pool(self) -> torch.Tensor:
        if self._cpu_kv is None:
            raise InvalidArgument("num_cpu_pages", 0, "> 0 at construction to swap pages to the CPU")
        return self._cpu_kv

    def _device_copies(self, copies: object, num_src: int, num_dst: int) -> torch.Tensor | None:
        if isinstance(copies, torch.Tensor) and copies.device == self.device:
            common.check_tensor("copies", copies, "[num_copies, 2]", (None, 2), dtypes=common.INDEX_DTYPES)
            return copies.contiguous() if copies.shape[0] else None
        pairs = _host_copies(copies, num_src, num_dst, same_pool=True)
        if pairs.shape[0] == 0:
            return None
        return torch.from_numpy(pairs).to(self.device)

    # ------------------------------------------------------------------ helpers
    def _layer(self, layer: int) -> int:
        return check.as_int("layer", layer, 0, self.num_layers - 1)

    def _scale_args(self, layer: int) -> dict:
        """The scale arguments of the kernels for layer ``layer`` (none for float pages)."""
        if self._scales is not None:
            return dict(k_scale_cache=self._scales[layer, 0], v_scale_cache=self._scales[layer, 1])
        if self._tensor_scales is not None:
            k_scale, v_scale = self._tensor_scales[layer]
            return dict(k_scale=k_scale, v_scale=v_scale)
        return {}

    def _ops(self):
        if self.backend == "torch":
            from .kernels import reference

            return reference
        from . import kernels

        return kernels

    def _launchers(self) -> tuple:
        """The Triton launchers' unchecked entry points, and each layer's checked quantization
        arguments (resolved once: importing triton is not free)."""
        from .kernels import decode as decode_module
        from .kernels import prefill as prefill_module

        # NOTE: the module (``pagedkv.kernels.write_kv`` as an attribute is the function)
        write_module = importlib.import_module("pagedkv.kernels.write_kv")
        common.check_device("k_cache", self._kv)
        self._quant_args = tuple(common.check_quant(self._k_pools[layer], **self._scale_kwargs[layer])
                                 for layer in range(self.num_layers))
        self._launch = (write_module.launch_write_kv, decode_module.launch_decode, prefill_module.launch_prefill)
        self._decode_splits = decode_module.default_num_splits
        return self._launch

    def _query_options(self, q, rows: int, out, sm_scale, sliding_window, logits_soft_cap, plan: BatchPlan,
                       names: str, attention_chunk_size=None) -> tuple[float, int, float]:
        """Check a query (and ``out``) cheaply, and the options once per distinct value."""
        if not (q.__class__ is _Tensor and q.dim() == 3 and q.shape[0] == rows and q.shape[2] == self.head_dim
                and q.dtype == self.dtype and q.device == self.device and q.stride(-1) == 1
                and q.shape[1] >= self.num_kv_heads and q.shape[1] % self.num_kv_heads == 0):
            common.check_tensor("q", q, names, (rows, None, self.head_dim), like=("the cache", self._act),
                                device=self.device)
            common.check_group(q.shape[1], self.num_kv_heads)
        if out is not None and not (out.__class__ is _Tensor and out.shape == q.shape and out.dtype == q.dtype
                                    and out.device == q.device and out.stride(-1) == 1):
            common.check_tensor("out", out, names, tuple(q.shape), like=("q", q), device=self.device)
        # NOTE: keyed by type too: True == 1 == 1.0 hash alike, and only some of them are valid
        key = (sm_scale.__class__, sm_scale, sliding_window.__class__, sliding_window, logits_soft_cap.__class__,
               logits_soft_cap, attention_chunk_size.__class__, attention_chunk_size)
        try:
            options = self._options[key]
        except (KeyError, TypeError):  # NOTE: TypeError: an unhashable (bad) value, checked below
            options = common.check_options(sm_scale, sliding_window, logits_soft_cap, self.head_dim,
                                           attention_chunk_size)
            if len(self._options) < 64:
                self._options[key] = options
        if plan.sliding_window is not None and not 0 < options[1] <= plan.sliding_window:
            raise InvalidArgument("sliding_window", sliding_window,
                                  f"at most {plan.sliding_window}, the window the plan was built for")
        if plan.attention_chunk_size is not None and options[1] != -plan.attention_chunk_size:
            raise InvalidArgument("attention_chunk_size", attention_chunk_size,
                                  f"{plan.attention_chunk_size}, the chunk the plan was built for")
        return options

    def _check_plan(self, plan) -> None:
        """A plan this cache made: another cache's slots and pages may lie outside this one's
        pools, and the per-layer launches do not check them again."""
        if not isinstance(plan, BatchPlan):
            raise InvalidType("plan", plan, "a BatchPlan from this cache's plan()")
        if plan.owner is not self:
            raise InvalidArgument("plan", "a plan made by another cache (or by hand)", "a plan from this cache's plan()")

    def _default_splits(self, rows: int, max_seq_len: int, window: int, num_heads: int) -> int:
        key = (rows, max_seq_len, window, num_heads)
        splits = self._splits.get(key)
        if splits is None:
            splits = self._decode_splits(rows, self.num_kv_heads, max_seq_len, window, self.head_dim,
                                         num_heads // self.num_kv_heads, self.dtype, self.device)
            if len(self._splits) < 4096:  # NOTE: bounded: unbuffered plans vary max_seq_len every step
                self._splits[key] = splits
        return splits

    def _workspace(self, rows: int, num_heads: int, num_splits: int) -> tuple:
        """Split-KV partials of a decode of ``rows`` sequences, kept for the next call of that shape."""
        key = (rows, num_heads, num_splits)
        space = self._workspaces.get(key)
        if space is None:
            space = (torch.empty((rows, num_heads, num_splits, self.head_dim), dtype=torch.float32, device=self.device),
                     torch.empty((rows, num_heads, num_splits), dtype=torch.float32, device=self.device))
            self._workspaces[key] = space
        return space

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(num_layers={self.num_layers}, num_pages={self.num_pages}, page_size={self.page_size}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
            + (f"kv_dtype={self.kv_format.name!r}, kv_scale={self.kv_scale!r}, " if self.kv_format else "")
            + f"device={str(self.device)!r}, backend={self.backend!r})"
        )


def _host_copies(copies: object, num_src: int, num_dst: int, *, same_pool: bool) -> np.ndarray:
    """A copy plan as int64 ``[num_copies, 2]`` after checking ids, distinct dsts, no src/dst overlap."""
    if isinstance(copies, torch.Tensor):
        copies = copies.cpu().numpy()
    if isinstance(copies, (str, bytes)) or not hasattr(copies, "__len__"):
        raise InvalidType("copies", copies, "an int array [num_copies, 2] of (src_page, dst_page)")
    pairs = np.asarray(copies)
    if pairs.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
        raise InvalidArgument("copies", f"array of shape {pairs.shape} and dtype {pairs.dtype}",
                              "an int array [num_copies, 2] of (src_page, dst_page)")
    pairs = pairs.astype(np.int64)
    for column, name, limit in ((0, "src_page", num_src), (1, "dst_page", num_dst)):
        bad = (pairs[:, column] < 0) | (pairs[:, column] >= limit)
        if np.any(bad):
            raise InvalidArgument(f"copies {name}", int(pairs[bad, column][0]), f"a page id in [0, {limit})")
    dst = pairs[:, 1]
    if np.unique(dst).shape[0] != dst.shape[0]:
        raise InvalidArgument("copies", "a dst_page that appears twice", "distinct destination pages")
    if same_pool and np.intersect1d(pairs[:, 0], dst).size:
        raise InvalidArgument("copies", int(np.intersect1d(pairs[:, 0], dst)[0]),
                              "a plan where no page is both a source and a destination")
    return pairs


__all__ = ["PagedKVCache", "BatchPlan"]
