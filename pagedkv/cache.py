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

On CUDA the Triton kernels of ``pagedkv.kernels`` run; elsewhere the torch implementations of
``pagedkv.kernels.reference`` (the ones the kernel tests compare against), so the same code
works on a laptop. This module imports torch (``pagedkv/__init__.py`` must import it lazily)
and sees page tables as arrays, never the block manager object.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
from ._optional import require

torch = require("torch", __name__)

from . import _validate as check  # noqa: E402
from .block_manager import CSR, PageTables, WindowTables  # noqa: E402
from .errors import InvalidArgument, InvalidType  # noqa: E402
from .kernels import _common as common  # noqa: E402
from .kernels import quant  # noqa: E402

_DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_BACKENDS = ("triton", "torch")
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
        first_page: int32 ``[num_seqs]`` when the page table holds live pages only
            (``BlockManager.window_tables``): position ``pos`` of sequence ``i`` is in column
            ``pos // page_size - first_page[i]``; ``None``: column ``pos // page_size``.
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
        head_dim: dimension of each head (a multiple of 16 up to 256 for attention).
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
        """The CPU offload pool ``[num_layers, 2, num_cpu_pages, ...]``, or ``None``."""
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
            first_page: int ``[num_seqs]`` with a plain array whose rows start at these page
                indices (as a ``WindowTables`` does); every page attention reads must be at or
                after it.

        Returns:
            A ``BatchPlan`` on this cache's device.

        Raises:
            InvalidArgument / InvalidType: inconsistent arrays, page ids outside
                ``[0, num_pages)`` for a used entry, too-long sequences, bad slots.
        """
        table, lens, first = self._host_tables(page_tables, seq_lens, first_page)
        num_seqs = lens.shape[0]
        if max_pages is not None:
            max_pages = check.as_int("max_pages", max_pages, table.shape[1], check.MAX_COUNT)
            table = np.pad(table, ((0, 0), (0, max_pages - table.shape[1])), constant_values=-1)
        used_pages = -(-lens // self.page_size)
        start = np.zeros_like(lens) if first is None else first  # page index of each row's first entry
        if num_seqs and np.any(used_pages - start > table.shape[1]):
            row = int(np.argmax(used_pages - start > table.shape[1]))
            bound = "max_pages * page_size" if first is None else "(first_page + max_pages) * page_size"
            raise InvalidArgument("seq_lens", int(lens[row]),
                                  f"at most {bound} = {(int(start[row]) + table.shape[1]) * self.page_size}")
        if np.any(table < -1) or np.any(table >= self.num_pages):
            bad = int(table[(table < -1) | (table >= self.num_pages)][0])
            raise InvalidArgument("page_table", bad, f"page ids in [0, {self.num_pages}) or -1 (NULL_PAGE)")

        if query_lens is None:
            q_lens = np.ones(num_seqs, dtype=np.int64)
        elif isinstance(query_lens, (int, np.integer)) and not isinstance(query_lens, (bool, np.bool_)):
            q_lens = np.full(num_seqs, check.as_int("query_lens", query_lens, 0, check.MAX_COUNT), dtype=np.int64)
        else:
            q_lens = check.int_array("query_lens", query_lens, 0, check.MAX_COUNT)
            if q_lens.shape[0] != num_seqs:
                raise InvalidArgument("query_lens", f"{q_lens.shape[0]} lengths", f"one per sequence ({num_seqs})")
        if np.any(q_lens > lens):
            row = int(np.argmax(q_lens > lens))
            raise InvalidArgument("query_lens", int(q_lens[row]), f"at most seq_lens[{row}] = {int(lens[row])}")
        # Every page an attention call may read must be a real page: from the page holding the
        # first key the sequence's first new token sees (position 0 without a window).
        if sliding_window is not None:
            sliding_window = check.count("sliding_window", sliding_window)
            first_key = np.maximum(lens - q_lens - sliding_window + 1, 0)
        else:
            first_key = np.zeros_like(lens)
        if np.any(first_key // self.page_size < start):
            row = int(np.argmax(first_key // self.page_size < start))
            raise InvalidArgument("first_page", int(start[row]),
                                  f"at most the first page attention reads for row {row} "
                                  f"({int(first_key[row] // self.page_size)}; pass the sliding_window)")
        cols = np.arange(table.shape[1])[None, :] + start[:, None]
        needed = (cols >= (first_key // self.page_size)[:, None]) & (cols < used_pages[:, None])
        if np.any(needed & (table < 0)):
            row = int(np.argmax(np.any(needed & (table < 0), axis=1)))
            raise InvalidArgument(f"page_table[{row}]", table[row].tolist(),
                                  f"a page id for every page attention reads (the first {int(used_pages[row])} "
                                  "entries, or those inside sliding_window)")
        qo_indptr = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qo_indptr[1:])
        num_tokens = int(qo_indptr[-1])
        if num_tokens > check.MAX_COUNT:
            raise InvalidArgument("query_lens", num_tokens, f"a total of at most {check.MAX_COUNT} tokens")

        if slot_mapping is None:
            # Every new token goes to its own position: the last q_len of its sequence.
            owner = np.repeat(np.arange(num_seqs), q_lens)
            positions = np.arange(num_tokens) - qo_indptr[owner] + (lens - q_lens)[owner]
            columns = positions // self.page_size - start[owner]
            slots = table[owner, columns] * self.page_size + positions % self.page_size
        else:
            if isinstance(slot_mapping, torch.Tensor):
                slot_mapping = slot_mapping.cpu().numpy()
            slots = check.int_array("slot_mapping", slot_mapping, -1, self.num_pages * self.page_size - 1)
            if slots.shape[0] != num_tokens:
                raise InvalidArgument("slot_mapping", f"{slots.shape[0]} slots", f"one per new token ({num_tokens})")

        # NOTE: one small host-to-device copy per array per batch; every layer reuses them.
        def upload(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device=self.device, dtype=dtype)

        return BatchPlan(
            page_table=upload(table, torch.int32),
            seq_lens=upload(lens, torch.int32),
            qo_indptr=upload(qo_indptr, torch.int32),
            slot_mapping=upload(slots, torch.int64),
            num_seqs=num_seqs,
            num_tokens=num_tokens,
            max_seq_len=int(lens.max()) if num_seqs else 0,
            max_q_len=int(q_lens.max()) if num_seqs else 0,
            sliding_window=sliding_window,
            first_page=None if first is None else upload(first, torch.int32),
        )

    def _host_tables(self, page_tables: object, seq_lens: object, first_page: object = None):
        """``(table int64 [num_seqs, width], seq_lens int64 [num_seqs], first page int64
        [num_seqs] or None)`` from any accepted form."""
        if isinstance(page_tables, (PageTables, WindowTables, CSR)):
            kind = type(page_tables).__name__
            if seq_lens is not None:
                raise InvalidArgument("seq_lens", "an array", f"None when page_tables is a {kind}")
            if first_page is not None:
                raise InvalidArgument("first_page", "an array", f"None when page_tables is a {kind}")
        if isinstance(page_tables, WindowTables):
            table, lens, _ = self._host_tables(page_tables.page_table, page_tables.seq_lens)
            return table, lens, self._first_pages(page_tables.first_page, lens.shape[0])
        if isinstance(page_tables, PageTables):
            page_tables, seq_lens = page_tables.page_table, page_tables.seq_lens
        elif isinstance(page_tables, CSR):
            indptr = check.int_array("indptr", page_tables.indptr, 0, check.MAX_COUNT)
            indices = check.int_array("indices", page_tables.indices, -1, check.MAX_COUNT)
            last = check.int_array("last_page_len", page_tables.last_page_len, 0, self.page_size)
            counts = np.diff(indptr)
            if indptr.shape[0] != last.shape[0] + 1 or np.any(counts < 0) or indptr[-1] != indices.shape[0]:
                raise InvalidArgument("page_tables", "an inconsistent CSR", "indptr [B + 1] non-decreasing, "
                                      "ending at len(indices), and last_page_len [B]")
            width = int(counts.max()) if counts.size else 0
            table = np.full((counts.shape[0], width), -1, dtype=np.int64)
            cols = np.arange(width)[None, :]
            table[cols < counts[:, None]] = indices
            lens = np.where(counts > 0, (counts - 1) * self.page_size + last, 0)
            return table, lens, None
        elif seq_lens is None:
            raise InvalidArgument("seq_lens", None, "an int array [num_seqs] when page_tables is a plain array")
        if isinstance(page_tables, torch.Tensor):
            page_tables = page_tables.cpu().numpy()
        table = np.asarray(page_tables)
        if table.ndim != 2 or (table.size and table.dtype.kind not in "iu"):
            raise InvalidArgument("page_tables", f"array of shape {table.shape} and dtype {table.dtype}",
                                  "an int array [num_seqs, max_pages]")
        table = table.astype(np.int64, copy=False)
        if isinstance(seq_lens, torch.Tensor):
            seq_lens = seq_lens.cpu().numpy()
        lens = check.int_array("seq_lens", seq_lens, 0, check.MAX_COUNT)
        if lens.shape[0] != table.shape[0]:
            raise InvalidArgument("seq_lens", f"{lens.shape[0]} lengths", f"one per page-table row ({table.shape[0]})")
        return table, lens, None if first_page is None else self._first_pages(first_page, lens.shape[0])

    @staticmethod
    def _first_pages(first_page: object, num_seqs: int) -> np.ndarray:
        if isinstance(first_page, torch.Tensor):
            first_page = first_page.cpu().numpy()
        first = check.int_array("first_page", first_page, 0, check.MAX_COUNT)
        if first.shape[0] != num_seqs:
            raise InvalidArgument("first_page", f"{first.shape[0]} page indices", f"one per sequence ({num_seqs})")
        return first

    # ---------------------------------------------------------------------- run
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: BatchPlan) -> None:
        """Store the batch's new K/V of layer ``layer`` at ``plan.slot_mapping``.

        Quantized pages receive the tokens quantized (and their scales, per (token, head)).

        Args:
            k, v: ``[num_tokens, num_kv_heads, head_dim]`` in the cache's dtype, on its device.
        """
        layer = self._layer(layer)
        names = "[num_tokens, num_kv_heads, head_dim]"
        shape = (plan.num_tokens, self.num_kv_heads, self.head_dim)
        common.check_tensor("k", k, names, shape, like=("the cache", self._act), device=self.device)
        common.check_tensor("v", v, names, shape, like=("the cache", self._act), device=self.device)
        self._ops().write_kv(k, v, self._kv[layer, 0], self._kv[layer, 1], plan.slot_mapping,
                             **self._scale_args(layer))

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
    ) -> torch.Tensor:
        """Decode attention of layer ``layer`` (write the new K/V first).

        Args:
            q: ``[num_seqs, num_heads, head_dim]``; ``num_heads`` a multiple of ``num_kv_heads``.
            plan: a decode plan (``query_lens`` 1 per sequence).
            sm_scale, sliding_window, logits_soft_cap: see ``kernels.paged_decode``.
            out: optional output ``[num_seqs, num_heads, head_dim]``.
            num_splits: split-KV count (Triton backend); fix it when capturing a CUDA graph,
                otherwise it is chosen from the batch shape.

        Returns:
            ``[num_seqs, num_heads, head_dim]`` in the cache's dtype.
        """
        layer = self._layer(layer)
        if not plan.is_decode:
            raise InvalidArgument("plan", f"a plan with {plan.num_tokens} tokens for {plan.num_seqs} sequences",
                                  "a decode plan (one new token per sequence); use prefill for chunks")
        self._check_query(q, "[num_seqs, num_heads, head_dim]", plan.num_seqs, out, sm_scale, sliding_window,
                          logits_soft_cap, plan)
        options = dict(sm_scale=sm_scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, out=out,
                       **self._scale_args(layer))
        if self.backend == "triton":
            options.update(max_seq_len=plan.max_seq_len, num_splits=num_splits)
        if plan.first_page is not None:
            options["first_page"] = plan.first_page
        return self._ops().paged_decode(q, self._kv[layer, 0], self._kv[layer, 1], plan.page_table, plan.seq_lens,
                                        **options)

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
    ) -> torch.Tensor:
        """Prefill / extend attention of layer ``layer`` for a ragged batch (write K/V first).

        Args:
            q: ``[num_tokens, num_heads, head_dim]``; rows ordered as the plan's ``query_lens``.
            plan: any plan (decode plans work too: chunks of one token).
            sm_scale, sliding_window, logits_soft_cap: see ``kernels.paged_prefill``.

        Returns:
            ``[num_tokens, num_heads, head_dim]`` in the cache's dtype.
        """
        layer = self._layer(layer)
        self._check_query(q, "[num_tokens, num_heads, head_dim]", plan.num_tokens, out, sm_scale, sliding_window,
                          logits_soft_cap, plan)
        options = dict(sm_scale=sm_scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, out=out,
                       **self._scale_args(layer))
        if self.backend == "triton":
            options.update(max_q_len=plan.max_q_len)
        if plan.first_page is not None:
            options["first_page"] = plan.first_page
        return self._ops().paged_prefill(q, self._kv[layer, 0], self._kv[layer, 1], plan.page_table, plan.seq_lens,
                                         plan.qo_indptr, **options)

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
                   self.num_cpu_pages)

    def swap_in(self, copies: object) -> None:
        """Copy CPU-pool pages (and their scales) to the device, rows ``(cpu_page, device_page)``, every layer."""
        self._require_cpu_pool()
        self._swap(copies, [(self._cpu_kv, self._kv), (self._cpu_scales, self._scales)], self.num_cpu_pages,
                   self.num_pages)

    def _swap(self, copies, pools: list, num_src: int, num_dst: int) -> None:
        pairs = _host_copies(copies, num_src, num_dst, same_pool=False)
        if pairs.shape[0] == 0:
            return
        for src_pool, dst_pool in pools:
            if src_pool is None:  # no per-(token, head) scales
                continue
            src_pool, dst_pool = quant.byte_view(src_pool), quant.byte_view(dst_pool)
            src = torch.from_numpy(pairs[:, 0]).to(src_pool.device)
            dst = torch.from_numpy(pairs[:, 1]).to(dst_pool.device)
            # NOTE: one gather, one transfer, one scatter over every layer. To the device it is
            # non-blocking (the caller orders it against later kernels by stream semantics); to
            # the CPU pool it is blocking, because the scatter runs on the host at once and must
            # not read bytes still in flight.
            to_device = dst_pool.device.type != "cpu"
            moved = src_pool.index_select(2, src).to(dst_pool.device, non_blocking=to_device)
            dst_pool.index_copy_(2, dst, moved)

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

    def _check_query(self, q, names: str, rows: int, out, sm_scale, sliding_window, logits_soft_cap,
                     plan: BatchPlan) -> None:
        if plan.sliding_window is not None and (sliding_window is None or sliding_window > plan.sliding_window):
            raise InvalidArgument("sliding_window", sliding_window,
                                  f"at most {plan.sliding_window}, the window the plan was built for")
        common.check_tensor("q", q, names, (rows, None, self.head_dim), like=("the cache", self._act),
                            device=self.device)
        common.check_group(q.shape[1], self.num_kv_heads)
        common.check_options(sm_scale, sliding_window, logits_soft_cap, self.head_dim)
        if out is not None:
            common.check_tensor("out", out, names, tuple(q.shape), like=("q", q), device=self.device)

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
