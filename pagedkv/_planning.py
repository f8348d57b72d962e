"""Host side of ``PagedKVCache.plan``: batch validation in numpy, and persistent plan buffers.

``host_plan`` checks one batch's page tables, lengths and slots and returns them as host
arrays (``HostPlan``). ``PagedKVCache.plan`` then either uploads them as new device tensors or
writes them into a ``PlanBuffers``: device tensors made once, filled in place every step, so
that the ``BatchPlan`` views have the same addresses every step (what a CUDA graph replays).

On CUDA every upload is asynchronous from pinned host memory: ``plan`` never waits for the
device. Imports torch (``pagedkv/__init__.py`` never imports this module).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _validate as check
from ._optional import require
from .block_manager import CSR, MAX_TABLE_ENTRIES, PageTables, WindowTables
from .errors import InvalidArgument

torch = require("torch", __name__)

_NUMPY = {torch.int32: np.int32, torch.int64: np.int64}


class HostPlan(NamedTuple):
    """One batch, validated, as host arrays (int64 unless noted)."""

    table: np.ndarray  # [num_seqs, width]; -1 pads
    lens: np.ndarray  # [num_seqs]
    q_lens: np.ndarray  # [num_seqs]
    qo_indptr: np.ndarray  # [num_seqs + 1]
    slots: np.ndarray  # [num_tokens]; -1 skips a token
    first: np.ndarray | None  # [num_seqs]: page index of each row's first entry, or None
    max_seq_len: int
    max_q_len: int
    sliding_window: int | None
    attention_chunk_size: int | None = None


def host_array(name: str, value: object) -> object:
    """``value`` as something numpy reads without a device sync: a CUDA tensor is refused."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise InvalidArgument(name, f"a tensor on {value.device}",
                                  "a host array (numpy, a list or a CPU tensor): plan checks it on the host, "
                                  "and reading a device tensor there would synchronise with the device")
        return value.numpy()
    return value


def host_tables(page_tables: object, seq_lens: object, first_page: object, page_size: int):
    """``(table [num_seqs, width], seq_lens int64 [num_seqs], first page int64 [num_seqs] or None)``."""
    if isinstance(page_tables, (PageTables, WindowTables, CSR)):
        kind = type(page_tables).__name__
        if seq_lens is not None:
            raise InvalidArgument("seq_lens", "an array", f"None when page_tables is a {kind}")
        if first_page is not None:
            raise InvalidArgument("first_page", "an array", f"None when page_tables is a {kind}")
    if isinstance(page_tables, WindowTables):
        table, lens, _ = host_tables(page_tables.page_table, page_tables.seq_lens, None, page_size)
        return table, lens, _first_pages(page_tables.first_page, lens.shape[0])
    if isinstance(page_tables, PageTables):
        page_tables, seq_lens = page_tables.page_table, page_tables.seq_lens
    elif isinstance(page_tables, CSR):
        indptr = check.int_array("indptr", page_tables.indptr, 0, check.MAX_COUNT)
        indices = check.int_array("indices", page_tables.indices, -1, check.MAX_COUNT)
        last = check.int_array("last_page_len", page_tables.last_page_len, 0, page_size)
        counts = np.diff(indptr)
        if indptr.shape[0] != last.shape[0] + 1 or np.any(counts < 0) or indptr[-1] != indices.shape[0]:
            raise InvalidArgument("page_tables", "an inconsistent CSR", "indptr [B + 1] non-decreasing, "
                                  "ending at len(indices), and last_page_len [B]")
        width = int(counts.max()) if counts.size else 0
        table = np.full((counts.shape[0], width), -1, dtype=np.int64)
        cols = np.arange(width)[None, :]
        table[cols < counts[:, None]] = indices
        lens = np.where(counts > 0, (counts - 1) * page_size + last, 0)
        return table, lens, None
    elif seq_lens is None:
        raise InvalidArgument("seq_lens", None, "an int array [num_seqs] when page_tables is a plain array")
    table = np.asarray(host_array("page_tables", page_tables))
    if table.ndim != 2 or (table.size and table.dtype.kind not in "iu"):
        raise InvalidArgument("page_tables", f"array of shape {table.shape} and dtype {table.dtype}",
                              "an int array [num_seqs, max_pages]")
    lens = check.int_array("seq_lens", host_array("seq_lens", seq_lens), 0, check.MAX_COUNT)
    if lens.shape[0] != table.shape[0]:
        raise InvalidArgument("seq_lens", f"{lens.shape[0]} lengths", f"one per page-table row ({table.shape[0]})")
    return table, lens, None if first_page is None else _first_pages(first_page, lens.shape[0])


def _first_pages(first_page: object, num_seqs: int) -> np.ndarray:
    first = check.int_array("first_page", host_array("first_page", first_page), 0, check.MAX_COUNT)
    if first.shape[0] != num_seqs:
        raise InvalidArgument("first_page", f"{first.shape[0]} page indices", f"one per sequence ({num_seqs})")
    return first


def _query_lens(query_lens: object, num_seqs: int) -> np.ndarray:
    if query_lens is None:
        return np.ones(num_seqs, dtype=np.int64)
    if isinstance(query_lens, (int, np.integer)) and not isinstance(query_lens, (bool, np.bool_)):
        return np.full(num_seqs, check.as_int("query_lens", query_lens, 0, check.MAX_COUNT), dtype=np.int64)
    q_lens = check.int_array("query_lens", host_array("query_lens", query_lens), 0, check.MAX_COUNT)
    if q_lens.shape[0] != num_seqs:
        raise InvalidArgument("query_lens", f"{q_lens.shape[0]} lengths", f"one per sequence ({num_seqs})")
    return q_lens


def host_plan(page_tables, seq_lens, query_lens, slot_mapping, max_pages, sliding_window, first_page, *,
              num_pages: int, page_size: int, attention_chunk_size=None) -> HostPlan:
    """Check one batch (the arguments of ``PagedKVCache.plan``) and return it as host arrays."""
    table, lens, first = host_tables(page_tables, seq_lens, first_page, page_size)
    num_seqs = lens.shape[0]
    width = table.shape[1]
    if max_pages is not None:
        width = check.as_int("max_pages", max_pages, width, check.MAX_COUNT)
    used_pages = -(-lens // page_size)
    start = np.zeros_like(lens) if first is None else first  # page index of each row's first entry
    over = used_pages - start > width
    if num_seqs and over.any():
        row = int(np.argmax(over))
        bound = "max_pages * page_size" if first is None else "(first_page + max_pages) * page_size"
        raise InvalidArgument("seq_lens", int(lens[row]), f"at most {bound} = {(int(start[row]) + width) * page_size}")
    if table.size and (table.min() < -1 or table.max() >= num_pages):
        bad = int(table[(table < -1) | (table >= num_pages)][0])
        raise InvalidArgument("page_table", bad, f"page ids in [0, {num_pages}) or -1 (NULL_PAGE)")
    q_lens = _query_lens(query_lens, num_seqs)
    if num_seqs and (q_lens > lens).any():
        row = int(np.argmax(q_lens > lens))
        raise InvalidArgument("query_lens", int(q_lens[row]), f"at most seq_lens[{row}] = {int(lens[row])}")
    # Every page an attention call may read must be a real page: from the page holding the
    # first key the sequence's first new token sees (position 0 without a window).
    if sliding_window is not None and attention_chunk_size is not None:
        raise InvalidArgument("attention_chunk_size", attention_chunk_size,
                              "None with a sliding_window (a layer has one mask or the other)")
    if sliding_window is not None:
        sliding_window = check.count("sliding_window", sliding_window)
        first_key_page = np.maximum(lens - q_lens - sliding_window + 1, 0) // page_size
    elif attention_chunk_size is not None:
        chunk = attention_chunk_size = check.count("attention_chunk_size", attention_chunk_size)
        first_key_page = (lens - q_lens) // chunk * chunk // page_size
    else:
        first_key_page = np.zeros_like(lens)
    if first is not None and (first_key_page < start).any():
        row = int(np.argmax(first_key_page < start))
        raise InvalidArgument("first_page", int(start[row]),
                              f"at most the first page attention reads for row {row} "
                              f"({int(first_key_page[row])}; pass the sliding_window or attention_chunk_size)")
    if num_seqs:
        beyond = used_pages - start > table.shape[1]  # pages past the given columns (max_pages pads them)
        if beyond.any():
            row = int(np.argmax(beyond))
            raise InvalidArgument(f"page_table[{row}]", table[row].tolist() + [-1] * (width - table.shape[1]),
                                  f"a page id for every page attention reads (the first {int(used_pages[row])} "
                                  "entries, or those inside sliding_window or the chunk)")
        cols = np.arange(table.shape[1])[None, :] + start[:, None]
        needed = (cols >= first_key_page[:, None]) & (cols < used_pages[:, None])
        missing = needed & (table < 0)
        if missing.any():
            row = int(np.argmax(missing.any(axis=1)))
            raise InvalidArgument(f"page_table[{row}]", table[row].tolist(),
                                  f"a page id for every page attention reads (the first {int(used_pages[row])} "
                                  "entries, or those inside sliding_window or the chunk)")
    qo_indptr = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(q_lens, out=qo_indptr[1:])
    num_tokens = int(qo_indptr[-1])
    if num_tokens > check.MAX_COUNT:
        raise InvalidArgument("query_lens", num_tokens, f"a total of at most {check.MAX_COUNT} tokens")
    if slot_mapping is None:
        # Every new token goes to its own position: the last q_len of its sequence.
        if num_tokens == num_seqs and (first is None) and np.all(q_lens == 1):
            positions = lens - 1
            slots = table[np.arange(num_seqs), positions // page_size] * page_size + positions % page_size
        else:
            owner = np.repeat(np.arange(num_seqs), q_lens)
            positions = np.arange(num_tokens) - qo_indptr[owner] + (lens - q_lens)[owner]
            columns = positions // page_size - start[owner]
            slots = table[owner, columns] * page_size + positions % page_size
        slots = slots.astype(np.int64, copy=False)
    else:
        slots = check.int_array("slot_mapping", host_array("slot_mapping", slot_mapping), -1,
                                num_pages * page_size - 1)
        if slots.shape[0] != num_tokens:
            raise InvalidArgument("slot_mapping", f"{slots.shape[0]} slots", f"one per new token ({num_tokens})")
    _check_distinct_slots(slots)
    return HostPlan(table, lens, q_lens, qo_indptr, slots, first,
                    int(lens.max()) if num_seqs else 0, int(q_lens.max()) if num_seqs else 0, sliding_window,
                    attention_chunk_size)


def _check_distinct_slots(slots: np.ndarray) -> None:
    """Two tokens written to one slot would race (and one K/V would be lost): refuse them."""
    if slots.shape[0] < 2:
        return
    ordered = np.sort(slots)
    same = ordered[1:] == ordered[:-1]
    same &= ordered[1:] >= 0
    if same.any():
        slot = int(ordered[1:][same][0])
        raise InvalidArgument("slot_mapping", slot, "distinct slots for the new tokens (this slot appears "
                              "more than once; -1 skips a token)")


class PlanBuffers:
    """Device tensors that ``PagedKVCache.plan(..., buffers=...)`` fills in place every step.

    Made once (``PagedKVCache.plan_buffers``) with the largest batch the engine runs. Every
    ``BatchPlan`` planned into them is a set of views with fixed addresses: ``page_table`` is
    always ``max_pages`` wide, and a plan padded to ``pad_to`` rows has the same tensors as any
    other plan of that many rows, so a CUDA graph captured on one replays on the next.

    A batch is checked and written into host staging first, and reaches the device tensors
    only once it is whole, so a refused batch leaves the previous plan as it was. On CUDA the
    staging is pinned and the uploads are ``non_blocking`` on the current stream; two staging
    areas alternate, each reused only once the upload that last read it has completed (an
    event recorded after it; in any real step it completed long before).

    Attributes:
        max_num_seqs, max_num_tokens, max_pages: the capacity.
        page_table, seq_lens, qo_indptr, slot_mapping, first_page: the device tensors (int32,
            int32, int32, int64, int32), of shapes ``[max_num_seqs, max_pages]``,
            ``[max_num_seqs]``, ``[max_num_seqs + 1]``, ``[max_num_tokens]``, ``[max_num_seqs]``.
    """

    def __init__(self, device: torch.device, max_num_seqs: int, max_num_tokens: int, max_pages: int):
        self.max_num_seqs = check.count("max_num_seqs", max_num_seqs)
        self.max_num_tokens = check.count("max_num_tokens", max_num_tokens)
        self.max_pages = check.count("max_pages", max_pages)
        if self.max_num_seqs * self.max_pages > MAX_TABLE_ENTRIES:
            raise InvalidArgument("max_pages", self.max_pages,
                                  f"at most {MAX_TABLE_ENTRIES // self.max_num_seqs} "
                                  f"(max_num_seqs x max_pages <= {MAX_TABLE_ENTRIES})")
        self.device = device
        s, t, p = self.max_num_seqs, self.max_num_tokens, self.max_pages
        shapes = {"page_table": ((s, p), torch.int32), "seq_lens": ((s,), torch.int32),
                  "qo_indptr": ((s + 1,), torch.int32), "slot_mapping": ((t,), torch.int64),
                  "first_page": ((s,), torch.int32)}
        self._device = {name: torch.zeros(shape, dtype=dtype, device=device) for name, (shape, dtype) in shapes.items()}
        self.page_table = self._device["page_table"]
        self.seq_lens = self._device["seq_lens"]
        self.qo_indptr = self._device["qo_indptr"]
        self.slot_mapping = self._device["slot_mapping"]
        self.first_page = self._device["first_page"]
        pinned = device.type == "cuda"
        self._stages = [{name: torch.zeros(shape, dtype=dtype, pin_memory=pinned)
                         for name, (shape, dtype) in shapes.items()} for _ in range(2 if pinned else 1)]
        self._events: list = [None] * len(self._stages)
        self._arrays = [{name: t.numpy() for name, t in stage.items()} for stage in self._stages]
        self._turn = 0
        self._views: dict = {}  # (rows, tokens, has first page) -> the plan's views

    def staging(self) -> dict:
        """The host arrays the next plan is written into (once their last upload completed)."""
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()  # NOTE: waits for this staging area's previous upload only
        return self._arrays[self._turn]

    def commit(self, rows: int, tokens: int, has_first: bool) -> tuple:
        """Upload the staged plan; return its device views ``(page_table, seq_lens, qo_indptr,
        slot_mapping, first_page or None)``."""
        turn = self._turn
        key = (turn, rows, tokens, has_first)
        entry = self._views.get(key)
        if entry is None:
            entry = self._slices(turn, rows, tokens, has_first)
            if len(self._views) < 1024:  # NOTE: decode shapes repeat; prefill token counts may not
                self._views[key] = entry
        views, pairs = entry
        cuda = self.device.type == "cuda"
        for dst, src in pairs:
            dst.copy_(src, non_blocking=cuda)
        if cuda:
            if self._events[turn] is None:
                self._events[turn] = torch.cuda.Event()
            self._events[turn].record()
        self._turn = (turn + 1) % len(self._stages)
        return views

    def _slices(self, turn: int, rows: int, tokens: int, has_first: bool) -> tuple:
        """The views of a plan of this shape, and the (device, staging) slices its upload copies."""
        stage, device = self._stages[turn], self._device
        extents = {"page_table": rows, "seq_lens": rows, "qo_indptr": rows + 1, "slot_mapping": tokens}
        if has_first:
            extents["first_page"] = rows
        pairs = tuple((device[name][:n], stage[name][:n]) for name, n in extents.items())
        views = tuple(dst for dst, _ in pairs) + ((None,) if not has_first else ())
        return views, pairs

    def fill(self, plan: HostPlan, rows: int, tokens: int) -> tuple:
        """Stage ``plan`` (checked by ``host_plan``) padded to ``rows`` sequences and ``tokens``
        new tokens, and commit it."""
        host = self.staging()
        b, t, width = plan.lens.shape[0], plan.slots.shape[0], plan.table.shape[1]
        table = host["page_table"]
        table[:b, :width] = plan.table
        table[:b, width:] = -1
        table[b:rows] = -1
        host["seq_lens"][:b] = plan.lens
        host["seq_lens"][b:rows] = 0
        qo = host["qo_indptr"]
        qo[:b + 1] = plan.qo_indptr
        # NOTE: padding rows own the padding tokens, one each while they last (a padded decode
        # batch stays a decode batch); their slots are -1, so nothing is written for them.
        qo[b + 1:rows + 1] = np.minimum(t + np.arange(1, rows - b + 1), tokens)
        host["slot_mapping"][:t] = plan.slots
        host["slot_mapping"][t:tokens] = -1
        has_first = plan.first is not None
        if has_first:
            host["first_page"][:b] = plan.first
            host["first_page"][b:rows] = 0
        return self.commit(rows, tokens, has_first)

    def __repr__(self) -> str:
        return (f"PlanBuffers(max_num_seqs={self.max_num_seqs}, max_num_tokens={self.max_num_tokens}, "
                f"max_pages={self.max_pages}, device={str(self.device)!r})")


def _int32_array(value: object, ndim: int) -> bool:
    return (isinstance(value, np.ndarray) and value.dtype == np.int32 and value.ndim == ndim
            and value.flags.c_contiguous)


def fast_fill(core, buffers: PlanBuffers, page_tables, seq_lens, query_lens, slot_mapping, max_pages,
              sliding_window, first_page, pad_to, num_pages: int, page_size: int, attention_chunk_size=None):
    """The C++ core's plan of a batch of the usual kinds (``PageTables`` / ``WindowTables`` from
    the block manager, decode or one chunk length or int64 lengths, int64 slots) into
    ``buffers``: ``(views, tokens, max_seq_len, max_q_len, window, chunk)``, or ``None`` for anything else
    or anything it refuses; the caller then runs ``host_plan``, which raises the typed error."""
    if seq_lens is not None or first_page is not None or not isinstance(page_tables, (PageTables, WindowTables)):
        return None
    table, lens = page_tables.page_table, page_tables.seq_lens
    first = page_tables.first_page if isinstance(page_tables, WindowTables) else None
    if not (_int32_array(table, 2) and _int32_array(lens, 1) and (first is None or _int32_array(first, 1))):
        return None
    num_seqs = table.shape[0]
    if num_seqs > buffers.max_num_seqs or table.shape[1] > buffers.max_pages:
        return None
    if max_pages is not None and not (type(max_pages) is int and table.shape[1] <= max_pages <= buffers.max_pages):
        return None
    rows = num_seqs
    if pad_to is not None:
        if not (type(pad_to) is int and num_seqs <= pad_to <= buffers.max_num_seqs):
            return None
        rows = pad_to
    q_array, q_len = None, 1
    if query_lens is not None:
        if type(query_lens) is int:
            if not 0 <= query_lens <= check.MAX_COUNT:
                return None
            q_len = query_lens
        elif isinstance(query_lens, np.ndarray) and query_lens.dtype == np.int64 and query_lens.ndim == 1 \
                and query_lens.flags.c_contiguous:
            q_array = query_lens
        else:
            return None
    if slot_mapping is not None and not (isinstance(slot_mapping, np.ndarray) and slot_mapping.dtype == np.int64
                                         and slot_mapping.ndim == 1 and slot_mapping.flags.c_contiguous):
        return None
    window = 0
    if sliding_window is not None:
        if not (type(sliding_window) is int and 1 <= sliding_window <= check.MAX_COUNT):
            return None
        window = sliding_window
    if attention_chunk_size is not None:
        if window or not (type(attention_chunk_size) is int and 1 <= attention_chunk_size <= check.MAX_COUNT):
            return None
        window = -attention_chunk_size  # NOTE: the core's mask code: -C is a chunk
    host = buffers.staging()
    ok, tokens, max_seq_len, max_q_len = core.fill_plan(
        table, lens, q_array, q_len, slot_mapping, first, page_size, num_pages, window, host["page_table"],
        host["seq_lens"], host["qo_indptr"], host["slot_mapping"], host["first_page"], rows)
    if not ok:
        return None
    return (buffers.commit(rows, tokens, first is not None), tokens, max_seq_len, max_q_len, sliding_window,
            attention_chunk_size)


def upload(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new device tensor of ``array``: on CUDA from pinned memory, without waiting for the
    device (torch's pinned-memory allocator keeps the host block alive until the copy is done)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=_NUMPY[dtype]))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor if device.type == "cpu" else tensor.to(device)
