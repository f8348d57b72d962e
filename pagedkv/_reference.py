"""Pure-Python block manager: the executable specification of the C++ core.

This module owns the allocation semantics. The C++ core in ``csrc/`` must behave identically,
page id for page id and error for error; ``tests/test_parity.py`` drives both in lockstep.

Arguments reaching this class are already type-checked by the facade in ``block_manager.py``;
what is checked here is state (unknown or existing sequences, free pages, residence). Every
method checks everything before it changes anything, so a failing call leaves the manager as
it was.

Free pages live in two queues. ``_free`` holds pages without cached content; ``_evictable``
holds unreferenced pages whose content is still indexed by the prefix cache: one LRU queue per
retention priority, lowest priority and least recently freed first. New pages come from
``_free`` first and only then evict a cached page, in that order.

With prefix caching, a sequence's full pages enter the index only once their KV is written:
``allocate(..., num_computed_tokens=k)`` offers the pages wholly inside the first k tokens,
``commit(seq_id, n)`` those inside the first n, and an append everything up to the sequence's
new length. Until then a page is not matchable, and a sequence freed first leaves none behind.

With ``cpu_prefix_cache``, the CPU pool is a second tier of the prefix cache. A cached GPU page
evicted while its node has no CPU copy is *demoted*: its content goes to a CPU page (a free one,
else the least recently used cached CPU page, whose content is lost), and a later hit on it
*promotes* it back into a fresh GPU page. The tier is inclusive: a promoted node keeps its CPU
copy, so evicting it again copies nothing. Both moves are returned by ``take_offload``; a step
runs its demotions first, then its promotions, then its other copies. Swap-out outranks the
tier: it takes cached CPU pages like free ones, and a demotion never takes a swapped page.

Must not import torch, triton or hypothesis.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict, deque

import numpy as np

from ._hashing import page_hash
from ._prefix_index import NONE, ROOT, PrefixIndex
from .errors import DuplicateSequence, InvariantViolation, OutOfPages
from .errors import SequenceExists, SequenceSwapped, SequenceTooLong, UnknownSequence, invalid_argument

#: Page id written in padded page-table entries and in entries released by a sliding window.
NULL_PAGE = -1
#: Largest value of an int32 output (``seq_lens`` of ``page_tables``).
INT32_MAX = 2**31 - 1


#: Retention priorities (TensorRT-LLM's range and default): lower priorities are evicted first.
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 100, 35


class _PriorityLRU:
    """The evictable queue: one LRU queue per retention priority, the lowest evicted first.

    NOTE: O(1) removal from the middle (a prefix-cache hit) and O(distinct priorities) per
    eviction; the C++ core finds the lowest non-empty queue with a bitmap.
    """

    def __init__(self) -> None:
        self._queues: dict[int, OrderedDict[int, None]] = {}
        self._where: dict[int, int] = {}  # page -> its priority

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, page: int) -> bool:
        return page in self._where

    def __iter__(self):
        """Pages in eviction order: priority ascending, least recently freed first."""
        for priority in sorted(self._queues):
            yield from self._queues[priority]

    def push(self, page: int, priority: int) -> None:
        self._queues.setdefault(priority, OrderedDict())[page] = None
        self._where[page] = priority

    def remove(self, page: int) -> None:
        priority = self._where.pop(page)
        queue = self._queues[priority]
        del queue[page]
        if not queue:
            del self._queues[priority]

    def pop(self) -> int:
        priority = min(self._queues)
        queue = self._queues[priority]
        page, _ = queue.popitem(last=False)
        del self._where[page]
        if not queue:
            del self._queues[priority]
        return page

    def clear(self) -> None:
        self._queues.clear()
        self._where.clear()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _token_list(token_ids) -> list[int] | None:
    """Token ids (the facade passes an int64 numpy array) as a list of Python ints, or None."""
    if token_ids is None:
        return None
    return token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)


class ReferenceBlockManager:
    """Reference implementation; see ``pagedkv.BlockManager`` for the public documentation."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        watermark_pages: int = 0,
        enable_prefix_caching: bool = False,
        num_cpu_pages: int = 0,
        hash_bits: int = 64,
        cpu_prefix_cache: bool = False,
        enable_kv_events: bool = False,
        kv_event_nodes: bool = False,
    ):
        self.num_pages = num_pages
        self.page_size = page_size
        self.watermark_pages = watermark_pages
        self.enable_prefix_caching = enable_prefix_caching
        self.num_cpu_pages = num_cpu_pages
        self.cpu_prefix_cache = cpu_prefix_cache
        self.enable_kv_events = enable_kv_events
        # NOTE: hash_bits < 64 truncates page hashes; tests use it to force collisions.
        self._hash_mask = (1 << hash_bits) - 1
        # NOTE: queues hand out pages from their head and take freed pages at their tail, so the
        # least recently freed page is reused first. A new manager's queue is 0..N-1.
        self._free: deque[int] = deque(range(num_pages))
        self._evictable = _PriorityLRU()
        # NOTE: a page's retention priority is the highest priority of the sequences that held it
        # since it was last handed out; it picks its evictable queue when it is freed.
        self._page_priority = [0] * num_pages
        self._ref_count = [0] * num_pages
        # prefix cache: content-prefix nodes and the pages attached to them
        self._prefix = PrefixIndex(num_pages, num_cpu_pages, events=enable_kv_events and enable_prefix_caching,
                                   nodes=kv_event_nodes)
        self._stats = {"queries": 0, "hits": 0, "query_tokens": 0, "hit_tokens": 0,
                       "cpu_hit_tokens": 0, "demotions": 0, "promotions": 0}
        # NOTE: step-safe copies. Every page a returned copy reads or writes is pinned until
        # the next append_batch or end_step: a pinned page whose ref count drops to 0 stays off
        # the free queues (it is counted in num_pinned_pages), so no later call of the same step
        # can hand it out as another copy's destination. Pages in pin order, per pool.
        self._pinned: dict[int, None] = {}
        self._cpu_pinned: dict[int, None] = {}
        self._copy_dsts: set[int] = set()  # GPU pages this step's copies write
        # CPU pages written by this step's swap-outs -> the GPU page swapped out: a swap-in of
        # one in the same step takes that page back instead of copying.
        self._swapped_from: dict[int, int] = {}
        # Retention: each pin_prefix call holds a reference on the cached pages of its prefix
        # (never evicted while pinned; they count against capacity): (salt, tokens, pages).
        self._prefix_pins: list[tuple[int, tuple, list[int]]] = []
        # CPU tier
        self._cpu_free: deque[int] = deque(range(num_cpu_pages))
        self._cpu_ref_count = [0] * num_cpu_pages
        # CPU tier of the prefix cache: unpinned cached CPU pages, least recently used first;
        # the (gpu, cpu) demotions and (cpu, gpu) promotions not yet taken by take_offload
        self._cpu_lru: OrderedDict[int, None] = OrderedDict()
        self._demotions: list[tuple[int, int]] = []
        self._promotions: list[tuple[int, int]] = []
        # NOTE: the GPU pages indexed in this step, each with the first in-page offset whose KV
        # lands in this step's forward pass (after this step's copies run): such a page is never
        # demoted in the step, and is a whole-prompt hit's copy source only if that offset is its
        # last slot (the one the hitting prompt recomputes itself).
        self._fresh: dict[int, int] = {}
        # NOTE: page tables are array('i') rather than lists so that padded numpy page tables
        # are built from their bytes, not element by element (the batch path runs every step).
        self._tables: dict[int, array] = {}
        self._num_tokens: dict[int, int] = {}
        self._swapped: set[int] = set()
        # The persistent page table (bind_table): a caller-owned int32 [rows, width] array (and
        # int32 [rows] token counts) kept current for the sequences bound to a row.
        self._row_table: np.ndarray | None = None
        self._row_lens: np.ndarray | None = None
        self._row_of: dict[int, int] = {}  # seq_id -> row
        self._row_seq: dict[int, int] = {}  # row -> seq_id
        # per sequence allocated with token ids (prefix caching on): its salt; the node of the
        # last page offered to the index (ROOT before the first; the sequence holds it with
        # PrefixIndex.acquire); the token ids from the first page not yet offered to the end of
        # the sequence (None once an append came without token ids); and the tokens committed
        # so far (their KV is written: pages inside them may be indexed)
        self._seq_salt: dict[int, int] = {}
        self._seq_node: dict[int, int] = {}
        self._seq_tail: dict[int, list[int] | None] = {}
        self._seq_committed: dict[int, int] = {}
        self._seq_priority: dict[int, int] = {}
        self._window_start: dict[int, int] = {}  # seq -> entries before it are all released

    # ----------------------------------------------------------------- queries
    @property
    def num_free_pages(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_free_cpu_pages(self) -> int:
        """Free CPU pages, cached ones of the prefix cache's CPU tier included."""
        return len(self._cpu_free) + len(self._cpu_lru)

    @property
    def num_pinned_pages(self) -> int:
        """GPU pages only a pending copy of this step holds (off the free queues until it ends)."""
        return sum(1 for page in self._pinned if self._ref_count[page] == 0)

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def is_swapped(self, seq_id: int) -> bool:
        self._table(seq_id)
        return seq_id in self._swapped

    def page_table(self, seq_id: int) -> list[int]:
        return list(self._table(seq_id))

    def num_tokens(self, seq_id: int) -> int:
        self._table(seq_id)
        return self._num_tokens[seq_id]

    def ref_count(self, page_id: int) -> int:
        return self._ref_count[page_id]

    def prefix_cache_stats(self) -> dict:
        pinned = {page for _, _, pages in self._prefix_pins for page in pages}
        return dict(self._stats, num_cached_pages=self._prefix.num_cached_pages,
                    num_evictable_pages=len(self._evictable), num_pinned_prefix_pages=len(pinned),
                    num_cpu_cached_pages=self._prefix.num_cpu_cached_pages)

    def pin_prefix(self, token_ids: np.ndarray, salt: int = 0, release_before: int = 0) -> int:
        """Hold the cached full pages of a prefix (until unpin_prefix); returns how many. The
        pages wholly before ``release_before`` need only their nodes and are not held."""
        tokens = _token_list(token_ids)
        ps = self.page_size
        pages = self._match(tokens, salt, False, len(tokens) // ps, release_before // ps)[0] \
            if self.enable_prefix_caching else []
        for page in pages:
            self._take_cached_page(page)
        self._prefix_pins.append((salt, tuple(tokens), pages))
        return len(pages)

    def unpin_prefix(self, token_ids: np.ndarray, salt: int = 0) -> int:
        """Release the pages of the oldest pin_prefix of this prefix; returns how many."""
        key = tuple(_token_list(token_ids))
        for k, (pin_salt, tokens, pages) in enumerate(self._prefix_pins):
            if pin_salt == salt and tokens == key:
                del self._prefix_pins[k]
                for page in reversed(pages):
                    self._release(page)
                return len(pages)
        raise invalid_argument("token_ids", f"{len(key)} token ids", "pinned_prefix")

    def can_allocate(self, num_tokens: int, token_ids: np.ndarray | None = None, salt: int = 0,
                     max_cached_tokens: int | None = None, release_before: int = 0) -> bool:
        need = self._plan_allocate(num_tokens, _token_list(token_ids), salt, max_cached_tokens,
                                   release_before // self.page_size)[0]
        return need <= self.num_free_pages - self.watermark_pages

    def pages_needed(self, num_tokens: int, token_ids: np.ndarray | None = None, salt: int = 0,
                     max_cached_tokens: int | None = None, release_before: int = 0) -> int:
        return self._plan_allocate(num_tokens, _token_list(token_ids), salt, max_cached_tokens,
                                   release_before // self.page_size)[0]

    def prefix_match(self, token_ids: np.ndarray, salt: int = 0) -> np.ndarray:
        """Per full page of ``token_ids``, along the longest chain of content nodes found: 2 when
        a page holding it can be hit (on the GPU, or on the CPU tier when that is on), 1 for a
        ghost node (the chain goes on, no page holds it). int8, as long as the chain."""
        out: list[int] = []
        if self.enable_prefix_caching:
            tokens = _token_list(token_ids)
            ps = self.page_size
            h, parent = 0, ROOT
            for i in range(len(tokens) // ps):
                block = tuple(tokens[i * ps : (i + 1) * ps])
                h = page_hash(h, block, salt) & self._hash_mask
                node = self._prefix.find(h, parent, salt, block)
                if node == NONE:
                    break
                hit = self._prefix.pick_page(node, self._ref_count) != NONE or (
                    self.cpu_prefix_cache and self._prefix.cpu_page_of(node) != NONE)
                out.append(2 if hit else 1)
                parent = node
        return np.array(out, dtype=np.int8)

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        self._resident_table(seq_id)
        return self._pages_to_append(seq_id, num_tokens, {}) <= self.num_free_pages

    # --------------------------------------------------------------- mutators
    def allocate(
        self,
        seq_id: int,
        num_tokens: int,
        token_ids: np.ndarray | None = None,
        salt: int = 0,
        num_computed_tokens: int | None = None,
        priority: int = DEFAULT_PRIORITY,
        max_cached_tokens: int | None = None,
        release_before: int = 0,
    ):
        """Returns (tokens found cached, copy-on-write copies).

        ``max_cached_tokens`` caps the hit (None: no cap). ``release_before`` (checked to lie in
        ``[0, num_tokens)``): the pages wholly before that position are not allocated, as if a
        window had released them; a hit then needs only the pages from there on cached (their
        chain of content nodes, ghosts included, still has to match).

        ``num_computed_tokens`` (checked by the facade to lie in [0, num_tokens]; None = all):
        the prompt's full pages wholly inside the first ``max(num_computed_tokens, tokens found
        cached)`` tokens become matchable now, the others at ``commit`` or an append.
        """
        if seq_id in self._tables:
            raise SequenceExists(seq_id)
        token_ids = _token_list(token_ids)
        skip = release_before // self.page_size
        need, hits, nodes, num_cached = self._plan_allocate(num_tokens, token_ids, salt, max_cached_tokens, skip)
        available = self.num_free_pages - self.watermark_pages
        if need > available:
            raise OutOfPages(need, max(available, 0), self.num_pages)
        if token_ids is not None and self.enable_prefix_caching:
            self._stats["queries"] += 1
            self._stats["query_tokens"] += num_tokens
            if num_cached:
                self._stats["hits"] += 1
                self._stats["hit_tokens"] += num_cached
        lead = skip if num_cached else 0  # NULL entries before the hit pages
        caching = token_ids is not None and self.enable_prefix_caching
        if caching:
            # NOTE: the node the sequence chains after is held before any page is taken: when
            # the hit is released pages only (a chunk's start), it may be a ghost that an
            # eviction below would delete.
            last = lead + len(hits) - (1 if num_cached < (lead + len(hits)) * self.page_size else 0)
            node = nodes[last - 1] if last else ROOT
            self._prefix.acquire(node)
        for page in hits:
            if page != NONE:
                self._take_cached_page(page)
        if NONE in hits:
            self._promote(hits, nodes[lead:], num_cached - lead * self.page_size)
        table = array("i", [NULL_PAGE] * lead + hits)
        copies: list[tuple[int, int]] = []
        shared = len(table)  # hit pages shared as they are (and the released entries before them)
        if num_cached < len(table) * self.page_size:
            shared -= 1
            # NOTE: the whole prompt was cached, but the engine must still compute the last
            # token, which it writes into the last hit page: that page is copied, not shared.
            src = table[-1]
            dst = self._take_free_page()
            table[-1] = dst
            copies.append(self._gpu_copy(src, dst))
            self._release(src)
        if not lead:
            table.extend([NULL_PAGE] * skip)
        while len(table) < _cdiv(num_tokens, self.page_size):
            table.append(self._take_free_page())
        if skip:
            self._window_start[seq_id] = skip
        self._tables[seq_id] = table
        self._num_tokens[seq_id] = num_tokens
        self._seq_priority[seq_id] = priority
        self._hold_priority(table, priority)
        if token_ids is not None and self.enable_prefix_caching:
            ps = self.page_size
            committed = max(num_tokens if num_computed_tokens is None else num_computed_tokens, num_cached)
            # NOTE: shared hit pages are indexed already: the sequence chains after the last of
            # them. The prompt's own pages, the private copy of a whole-prompt hit's last page
            # included (it holds the same content once the engine writes its last token), are
            # offered up to the committed tokens only: the KV of the others is not written yet.
            self._seq_salt[seq_id] = salt
            self._seq_node[seq_id] = node
            self._seq_tail[seq_id] = list(token_ids[shared * ps :])
            self._seq_committed[seq_id] = committed
            self._offer_pages(seq_id, table, num_tokens, committed, num_cached)
        return num_cached, copies

    def append(self, seq_id: int, num_tokens: int, token_ids: np.ndarray | None = None) -> list[tuple[int, int]]:
        self._resident_table(seq_id)
        token_ids = _token_list(token_ids)
        self._check_row_fits(seq_id, num_tokens)
        need = self._pages_to_append(seq_id, num_tokens, {})
        if need > self.num_free_pages:
            raise OutOfPages(need, self.num_free_pages, self.num_pages)
        copies: list[tuple[int, int]] = []
        self._grow(seq_id, num_tokens, copies, token_ids)
        self._write_row(seq_id)
        return copies

    def append_batch(self, seq_ids: np.ndarray, num_tokens: np.ndarray, token_ids: np.ndarray | None = None):
        seq_ids, num_tokens = seq_ids.tolist(), num_tokens.tolist()
        seen: set[int] = set()
        cow_drops: dict[int, int] = {}
        need = 0
        for seq_id, n in zip(seq_ids, num_tokens):
            if seq_id in seen:
                raise DuplicateSequence("seq_ids", seq_id)
            seen.add(seq_id)
            self._resident_table(seq_id)
            self._check_row_fits(seq_id, n)
            need += self._pages_to_append(seq_id, n, cow_drops)
        # NOTE: a new step: the copies returned since the last one have run, so their pinned
        # pages are released first (and count as free for this call).
        available = self.num_free_pages + self.num_pinned_pages
        if need > available:
            raise OutOfPages(need, available, self.num_pages)
        self.end_step()
        slots = np.empty(sum(num_tokens), dtype=np.int64)
        copies: list[tuple[int, int]] = []
        tokens = token_ids.tolist() if token_ids is not None else None
        ps = self.page_size
        out = 0
        for seq_id, n in zip(seq_ids, num_tokens):
            start = self._num_tokens[seq_id]
            table = self._grow(seq_id, n, copies, tokens[out : out + n] if tokens is not None else None)
            for pos in range(start, start + n):
                slots[out] = table[pos // ps] * ps + pos % ps
                out += 1
            self._write_row(seq_id)
        return slots, np.array(copies, dtype=np.int32).reshape(-1, 2)

    def commit(self, seq_id: int, num_computed_tokens: int) -> int:
        """The first ``num_computed_tokens`` tokens have their KV written; returns pages indexed.

        Offers to the index, in order, each full page wholly inside them that was not offered
        yet. A value at or below the committed count is a no-op (commits are monotone), and so
        is a sequence without known token ids or without prefix caching.
        """
        table = self._resident_table(seq_id)
        num_tokens = self._num_tokens[seq_id]
        if num_computed_tokens > num_tokens:
            name = "num_computed_tokens"
            raise invalid_argument(name, num_computed_tokens, name, seq_id, num_tokens)
        if seq_id not in self._seq_committed or num_computed_tokens <= self._seq_committed[seq_id]:
            return 0
        written_from = self._seq_committed[seq_id]
        self._seq_committed[seq_id] = num_computed_tokens
        if self._seq_tail[seq_id] is None:
            return 0
        return self._offer_pages(seq_id, table, num_tokens, num_computed_tokens, written_from)

    def fork(self, parent_id: int, child_id: int) -> None:
        parent = self._resident_table(parent_id)
        if child_id in self._tables:
            raise SequenceExists(child_id)
        for page in parent:
            if page != NULL_PAGE:
                self._ref_count[page] += 1
        self._tables[child_id] = array("i", parent)
        self._num_tokens[child_id] = self._num_tokens[parent_id]
        self._seq_priority[child_id] = self._seq_priority[parent_id]
        if parent_id in self._window_start:
            self._window_start[child_id] = self._window_start[parent_id]
        if parent_id in self._seq_salt:
            self._seq_salt[child_id] = self._seq_salt[parent_id]
            self._seq_node[child_id] = self._seq_node[parent_id]
            self._prefix.acquire(self._seq_node[child_id])
            tail = self._seq_tail[parent_id]
            self._seq_tail[child_id] = None if tail is None else list(tail)
            self._seq_committed[child_id] = self._seq_committed[parent_id]

    def free(self, seq_id: int) -> None:
        table = self._table(seq_id)
        if seq_id in self._swapped:
            for page in reversed(table):
                if page != NULL_PAGE:
                    self._release_cpu(page)
            self._swapped.discard(seq_id)
        else:
            # NOTE: a sequence's pages are released last page first, so that when they are
            # reused in queue order the tail of a freed sequence goes before its head (the head
            # is the part most likely to be shared again by a prefix-cache hit).
            for page in reversed(table):
                if page != NULL_PAGE:
                    self._release(page)
        self._forget(seq_id)

    def release_window(self, seq_id: int, window: int) -> int:
        """Release pages wholly before the last ``window`` tokens; returns pages released."""
        table = self._resident_table(seq_id)
        keep_from = self._num_tokens[seq_id] - window  # first position inside the window
        end = max(keep_from, 0) // self.page_size
        start = self._window_start.get(seq_id, 0)
        released = 0
        # NOTE: released entries always form a prefix of the table, so the scan starts where the
        # previous release stopped (O(pages released), not O(table) per decode step).
        for i in range(start, end):
            if table[i] != NULL_PAGE:
                self._release(table[i])
                table[i] = NULL_PAGE
                released += 1
        if end > start:
            self._window_start[seq_id] = end
            self._write_row(seq_id)
        return released

    def reset_prefix_cache(self) -> None:
        # NOTE: nodes that sequences still chain after stay as ghosts, so the pages those
        # sequences commit later are found once their prefix is computed again.
        self._prefix.clear_pages()
        # NOTE: cached free pages become plain free pages, keeping their LRU order (both tiers).
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cpu_free.extend(self._cpu_lru)
        self._cpu_lru.clear()

    def take_events(self) -> list[tuple]:
        """The prefix index's event records since the last call (see ``_prefix_index``)."""
        events = self._prefix.events
        if not events:
            return []
        self._prefix.events = []
        return events

    def take_offload(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The prefix cache's CPU-tier moves since the last call: ((gpu, cpu) demotions,
        (cpu, gpu) promotions), each in the order made."""
        moves = self._demotions, self._promotions
        self._demotions, self._promotions = [], []
        return moves

    def end_step(self) -> None:
        """The copies returned so far have run: release the pages pinned for them, in pin order."""
        for page in self._pinned:
            if self._ref_count[page] == 0:
                self._enqueue(page)
        self._pinned.clear()
        for cpu in self._cpu_pinned:
            if self._cpu_ref_count[cpu] == 0:
                self._enqueue_cpu(cpu)
        self._cpu_pinned.clear()
        self._fresh.clear()
        self._swapped_from.clear()
        self._copy_dsts.clear()

    # ----------------------------------------------------------------- CPU tier
    def can_swap_out(self, seq_ids: np.ndarray) -> bool:
        return len(self._pages_to_move(seq_ids.tolist(), to_cpu=True)) <= self.num_free_cpu_pages

    def can_swap_in(self, seq_ids: np.ndarray) -> bool:
        moved = self._pages_to_move(seq_ids.tolist(), to_cpu=False)
        return self._swap_in_need(moved) <= self.num_free_pages - self.watermark_pages

    def _swap_in_need(self, moved: list[int]) -> int:
        """Free GPU pages a swap-in of ``moved`` CPU pages takes: none for a page swapped out in
        this step, whose GPU page (pinned) still holds its content and is reused."""
        return sum(1 for cpu in moved if cpu not in self._swapped_from)

    def swap_out(self, seq_ids: np.ndarray) -> np.ndarray:
        seq_ids = seq_ids.tolist()
        moved = self._pages_to_move(seq_ids, to_cpu=True)
        if len(moved) > self.num_free_cpu_pages:
            raise OutOfPages(len(moved), self.num_free_cpu_pages, self.num_cpu_pages, pool="cpu")
        # NOTE: swap-out outranks the CPU tier of the prefix cache: it takes cached CPU pages
        # (least recently used first) once no plain free one is left.
        mapping = {page: self._take_cpu_page() for page in moved}
        copies = []
        for page, cpu in mapping.items():
            self._cpu_ref_count[cpu] = 0
            self._pin(page)
            self._pin_cpu(cpu)
            self._swapped_from[cpu] = page
            copies.append((page, cpu))
        for seq_id in seq_ids:
            table = self._tables[seq_id]
            for i, page in enumerate(table):
                if page != NULL_PAGE:
                    table[i] = mapping[page]
                    self._cpu_ref_count[table[i]] += 1
            for page in reversed(self._old_pages(table, mapping)):
                self._release(page)
            self._swapped.add(seq_id)
            self._write_row(seq_id)
        return np.array(copies, dtype=np.int32).reshape(-1, 2)

    def swap_in(self, seq_ids: np.ndarray) -> np.ndarray:
        seq_ids = seq_ids.tolist()
        moved = self._pages_to_move(seq_ids, to_cpu=False)
        available = self.num_free_pages - self.watermark_pages
        need = self._swap_in_need(moved)
        if need > available:
            raise OutOfPages(need, max(available, 0), self.num_pages)
        mapping: dict[int, int] = {}
        copies = []
        for cpu in moved:
            reused = self._swapped_from.get(cpu)
            if reused is not None:
                # NOTE: swapped out in this step: its copy may not have run yet, but its GPU page
                # is pinned (never handed out again in this step) and holds the content once the
                # step's copies have run, so it is taken back as is.
                mapping[cpu] = reused
                continue
            page = self._take_free_page()
            self._ref_count[page] = 0
            self._pin_cpu(cpu)
            self._pin(page)
            self._copy_dsts.add(page)
            mapping[cpu] = page
            copies.append((cpu, page))
        for seq_id in seq_ids:
            table = self._tables[seq_id]
            # NOTE: not through an inverted mapping: two CPU pages (the same GPU page swapped out
            # twice in one step, for two sequences) can map back to one GPU page.
            old = [cpu for cpu in table if cpu != NULL_PAGE]
            for i, cpu in enumerate(table):
                if cpu != NULL_PAGE:
                    table[i] = mapping[cpu]
                    self._ref_count[table[i]] += 1
            for cpu in reversed(old):
                self._release_cpu(cpu)
            self._swapped.discard(seq_id)
            self._write_row(seq_id)
            self._hold_priority(table, self._seq_priority[seq_id])
            self._reattach(seq_id, table)
        return np.array(copies, dtype=np.int32).reshape(-1, 2)

    # --------------------------------------------------- persistent page table
    def bind_table(self, table: np.ndarray | None, lens: np.ndarray | None) -> None:
        """Keep ``table`` (int32 ``[rows, width]``) and ``lens`` (int32 ``[rows]`` or None)
        current for the sequences bound to a row; clears both and every binding."""
        self._row_of.clear()
        self._row_seq.clear()
        self._row_table, self._row_lens = table, (lens if table is not None else None)
        if table is not None:
            table.fill(NULL_PAGE)
            if lens is not None:
                lens.fill(0)

    def set_row(self, seq_id: int, row: int) -> None:
        """Bind ``seq_id`` to ``row`` and write it (-1: unbind, clearing its row)."""
        table = self._table(seq_id)
        if row < 0:
            self._clear_row(seq_id)
            return
        rows, width = (0, 0) if self._row_table is None else self._row_table.shape
        if row >= rows:
            raise invalid_argument("row", row, "row", rows)
        owner = self._row_seq.get(row)
        if owner is not None and owner != seq_id:
            raise invalid_argument("row", row, "row_taken", owner)
        if len(table) > width:
            raise invalid_argument("row", row, "row_pages", seq_id, len(table), width)
        if self._num_tokens[seq_id] > INT32_MAX:
            raise SequenceTooLong(seq_id, self._num_tokens[seq_id])
        self._clear_row(seq_id)
        self._row_of[seq_id] = row
        self._row_seq[row] = seq_id
        self._write_row(seq_id)

    def row_of(self, seq_id: int) -> int:
        return self._row_of.get(seq_id, -1)

    def _check_row_fits(self, seq_id: int, num_tokens: int) -> None:
        if seq_id in self._row_of:
            width = self._row_table.shape[1]
            total = self._num_tokens[seq_id] + num_tokens
            if _cdiv(total, self.page_size) > width:
                raise invalid_argument("num_tokens", num_tokens, "row_width", seq_id, width)
            if total > INT32_MAX:  # NOTE: its row's token count is an int32 entry
                raise SequenceTooLong(seq_id, total)

    def _write_row(self, seq_id: int) -> None:
        row = self._row_of.get(seq_id)
        if row is None:
            return
        out = self._row_table[row]
        out.fill(NULL_PAGE)
        if seq_id not in self._swapped:  # NOTE: a swapped-out sequence has no device page
            table = self._tables[seq_id]
            out[:len(table)] = table
        if self._row_lens is not None:
            self._row_lens[row] = self._num_tokens[seq_id]

    def _clear_row(self, seq_id: int) -> None:
        row = self._row_of.pop(seq_id, None)
        if row is None:
            return
        del self._row_seq[row]
        self._row_table[row].fill(NULL_PAGE)
        if self._row_lens is not None:
            self._row_lens[row] = 0

    # ------------------------------------------------------------ batch views
    def slots(self, seq_id: int, start: int, stop: int) -> np.ndarray:
        table = self._resident_table(seq_id)
        n = self._num_tokens[seq_id]
        if stop > n:
            raise invalid_argument("stop", stop, "stop", seq_id, n)
        if start > stop:
            raise invalid_argument("start", start, "start", stop)
        ps = self.page_size
        if start < stop and table[start // ps] == NULL_PAGE:
            raise invalid_argument("start", start, "start_released")
        return np.array([table[p // ps] * ps + p % ps for p in range(start, stop)], dtype=np.int64)

    def window_tables(self, seq_ids: np.ndarray, max_pages: int | None):
        """page_tables of the live entries only, and each row's first page index."""
        return self.page_tables(seq_ids, max_pages, live_only=True)

    def page_tables(self, seq_ids: np.ndarray, max_pages: int | None, live_only: bool = False):
        seq_ids = seq_ids.tolist()
        tables = [self._resident_table(s) for s in seq_ids]
        # NOTE: a sliding window's released entries form a prefix of the table: a live-only row
        # starts after them, so its cost does not grow with the sequence's length.
        first = [self._window_start.get(s, 0) if live_only else 0 for s in seq_ids]
        tables = [t[f:] if f else t for t, f in zip(tables, first)]
        width = max((len(t) for t in tables), default=0)
        if max_pages is not None:
            if max_pages < width:
                raise invalid_argument("max_pages", max_pages, "max_pages", width)
            width = max_pages
        lens = [self._num_tokens[s] for s in seq_ids]
        for s, n in zip(seq_ids, lens):
            if n > INT32_MAX:
                raise SequenceTooLong(s, n)
        pad = array("i", [NULL_PAGE]) * width
        rows = b"".join(t.tobytes() + pad[len(t):].tobytes() for t in tables)
        out = np.frombuffer(rows, dtype=np.int32).reshape(len(tables), width).copy()
        if live_only:
            return out, np.array(lens, dtype=np.int32), np.array(first, dtype=np.int32)
        return out, np.array(lens, dtype=np.int32)

    def csr(self, seq_ids: np.ndarray):
        seq_ids = seq_ids.tolist()
        # NOTE: a sliding window's released pages (a prefix of the table) are left out: a CSR
        # page id of -1 would be read as a page.
        tables = [self._resident_table(s)[self._window_start.get(s, 0):] for s in seq_ids]
        lens = np.array([len(t) for t in tables], dtype=np.int32)
        indptr = np.zeros(len(tables) + 1, dtype=np.int32)
        np.cumsum(lens, out=indptr[1:])
        indices = np.frombuffer(b"".join(t.tobytes() for t in tables), dtype=np.int32).copy()
        ps = self.page_size
        last = np.array([(self._num_tokens[s] - 1) % ps + 1 for s in seq_ids], dtype=np.int32)
        return indptr, indices, last

    # ------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        n = self.num_pages
        refs = [0] * n
        cpu_refs = [0] * self.num_cpu_pages
        for _, _, pages in self._prefix_pins:
            for page in pages:
                refs[page] += 1
        for seq_id, table in self._tables.items():
            tokens = self._num_tokens[seq_id]
            if len(table) != _cdiv(tokens, self.page_size):
                raise InvariantViolation.of("pages_cover_tokens", seq_id, tokens, len(table), self.page_size)
            on_cpu = seq_id in self._swapped
            limit, counts = (self.num_cpu_pages, cpu_refs) if on_cpu else (n, refs)
            for page in table:
                if page == NULL_PAGE:
                    continue
                if not 0 <= page < limit:
                    raise InvariantViolation.of("page_in_range", seq_id, page, limit)
                counts[page] += 1
            if seq_id in self._seq_committed:
                self._check_committed(seq_id)
        for name, want, have in (("ref_count", refs, self._ref_count), ("cpu_ref_count", cpu_refs, self._cpu_ref_count)):
            if want != have:
                bad = next(p for p in range(len(want)) if want[p] != have[p])
                raise InvariantViolation.of(name, bad, have[bad], want[bad])
        on_free = [False] * n
        for queue, cached in ((self._free, False), (self._evictable, True)):
            for page in queue:
                if not 0 <= page < n or on_free[page]:
                    raise InvariantViolation.of("free_list_unique", page)
                on_free[page] = True
                if refs[page]:
                    raise InvariantViolation.of("free_page_unreferenced", page, refs[page])
                if self._prefix.is_cached(page) != cached:
                    queue = "evictable" if cached else "free"
                    node = self._prefix.node_of(page)
                    raise InvariantViolation.of("free_queue_cached", page, queue,
                                                None if node == NONE else self._prefix.hash_of(node))
        for page in self._pinned:
            if on_free[page]:
                raise InvariantViolation.of("pinned_page", page, "free")
        used = sum(1 for r in refs if r)
        if used + self.num_free_pages + self.num_pinned_pages != n:
            raise InvariantViolation.of("conservation", self.num_free_pages + self.num_pinned_pages, used, n)
        cpu_used = sum(1 for r in cpu_refs if r)
        cpu_pinned = sum(1 for cpu in self._cpu_pinned if cpu_refs[cpu] == 0)
        cpu_free = set(self._cpu_free)
        if any(cpu in cpu_free or cpu in self._cpu_lru for cpu in self._cpu_pinned):
            raise InvariantViolation.of("pinned_page", next(c for c in self._cpu_pinned if c in cpu_free or c in self._cpu_lru), "cpu free")
        for cpu in self._cpu_lru:
            what = ("a free page" if cpu in cpu_free else "referenced" if cpu_refs[cpu]
                    else "not cached" if not self._prefix.is_cpu_cached(cpu) else None)
            if what is not None:
                raise InvariantViolation.of("cpu_lru", cpu, what)
        for cpu in range(self.num_cpu_pages):
            if (cpu in cpu_free or cpu_refs[cpu]) and self._prefix.is_cpu_cached(cpu):
                raise InvariantViolation.of("cpu_lru", cpu, "a free or referenced page holding cached content")
        free_total = len(self._cpu_free) + len(self._cpu_lru) + cpu_pinned
        if cpu_used + free_total != self.num_cpu_pages or len(cpu_free) != len(self._cpu_free):
            raise InvariantViolation.of("cpu_conservation", free_total, cpu_used, self.num_cpu_pages)
        refs_by_node: dict[int, int] = {}
        for node in self._seq_node.values():
            if node != ROOT:
                refs_by_node[node] = refs_by_node.get(node, 0) + 1
        broken = self._prefix.check(refs_by_node)
        if broken is not None:
            raise InvariantViolation.of(*broken[:1], *broken[1])

    def _check_committed(self, seq_id: int) -> None:
        """Committed tokens fit the sequence, and every full page inside them was offered."""
        tokens, committed = self._num_tokens[seq_id], self._seq_committed[seq_id]
        if committed > tokens:
            raise InvariantViolation.of("committed_tokens", seq_id, committed, tokens)
        tail = self._seq_tail[seq_id]
        if tail is None:
            return
        first = tokens - len(tail)  # position of the first token not yet offered
        if first < 0 or first % self.page_size:
            raise InvariantViolation.of("pending_tokens", seq_id, tokens, len(tail))
        if len(tail) >= self.page_size and first + self.page_size <= committed:
            raise InvariantViolation.of("pending_pages", seq_id, committed, first // self.page_size)

    def snapshot(self) -> dict:
        """Complete observable state, for parity and atomicity tests."""
        return {
            "free": list(self._free),
            "evictable": list(self._evictable),
            "ref_count": list(self._ref_count),
            "cpu_free": list(self._cpu_free),
            "cpu_ref_count": list(self._cpu_ref_count),
            "tables": {s: list(t) for s, t in sorted(self._tables.items())},
            "num_tokens": dict(sorted(self._num_tokens.items())),
            "swapped": sorted(self._swapped),
            "pinned": list(self._pinned),
            "prefix_pins": [list(pages) for _, _, pages in self._prefix_pins],
            "cpu_pinned": list(self._cpu_pinned),
            "cpu_lru": list(self._cpu_lru),
            "offload": (list(self._demotions), list(self._promotions)),
            "events": list(self._prefix.events or []),
            **dict(zip(("index", "nodes"), self._prefix.snapshot())),
            "stats": dict(self._stats),
        }

    # ---------------------------------------------------------------- helpers
    def _table(self, seq_id: int) -> array:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise UnknownSequence(seq_id) from None

    def _resident_table(self, seq_id: int) -> array:
        table = self._table(seq_id)
        if seq_id in self._swapped:
            raise SequenceSwapped(seq_id, True)
        return table

    def _forget(self, seq_id: int) -> None:
        self._clear_row(seq_id)
        del self._tables[seq_id]
        del self._num_tokens[seq_id]
        node = self._seq_node.pop(seq_id, None)
        if node is not None:
            self._prefix.release(node)
        for per_seq in (self._seq_salt, self._seq_tail, self._seq_committed, self._seq_priority, self._window_start):
            per_seq.pop(seq_id, None)

    def _plan_allocate(self, num_tokens: int, token_ids, salt: int, max_cached: int | None = None, skip: int = 0):
        """(pages taken from the free queues, hit pages (NONE: on the CPU tier only), the nodes
        of the first ``skip`` pages and of the hits, tokens cached) for a prompt whose first
        ``skip`` pages are released entries."""
        ps = self.page_size
        pages = _cdiv(num_tokens, ps)
        if token_ids is None or not self.enable_prefix_caching:
            return pages - skip, [], [], 0
        limit = len(token_ids) // ps if max_cached is None else min(len(token_ids) // ps, max_cached // ps)
        hits, nodes = self._match(token_ids, salt, self.cpu_prefix_cache, limit, skip)
        # NOTE: a hit needs the chain through the released pages, and then a page, unless the
        # released pages are the whole hit (a chunked group hit at its chunk's start).
        if len(nodes) < skip or not (skip or hits):
            return pages - skip, [], [], 0
        num_cached = min((skip + len(hits)) * ps, num_tokens - 1)
        copy = 1 if num_cached < len(hits) * ps else 0
        if copy and hits and hits[-1] != NONE:
            # NOTE: the last hit page is a copy source: prefer a page no copy of this step writes
            # (a copy from one would have to wait for that copy), and take only a page whose KV
            # is written before this step's copies run, but for its last slot, which this prompt
            # recomputes. Without one (a multi-token append or a prefill of this step filled
            # it), the hit stops a page earlier: that page is computed again.
            src = self._prefix.pick_page(nodes[-1], self._ref_count, self._copy_dsts, self._fresh, ps - 1)
            if src == NONE:
                hits.pop()
                nodes.pop()
                if not (skip or hits):
                    return pages - skip, [], [], 0
                num_cached, copy = (skip + len(hits)) * ps, 0
            else:
                hits[-1] = src
        # NOTE: a hit on a page only a pending copy pins takes no page from the free queues; a
        # hit on the CPU tier takes one (its promotion's destination).
        taken = sum(1 for page in hits if page == NONE or (self._ref_count[page] == 0 and page not in self._pinned))
        return pages - skip - len(hits) + copy + taken, hits, nodes, num_cached

    def _match(self, token_ids: list[int], salt: int, cpu: bool, limit: int, skip: int = 0) -> tuple[list[int], list[int]]:
        """(a cached page for each full page of the longest cached prefix (at most ``limit``
        pages) past the first ``skip`` ones, the nodes of all of them). With ``cpu``, a node
        cached on the CPU tier only matches too, with page NONE. The first ``skip`` pages need
        only their nodes (ghosts too)."""
        ps = self.page_size
        pages: list[int] = []
        nodes: list[int] = []
        h, parent = 0, ROOT
        for i in range(limit):
            # NOTE: one hash-chain probe per full page, confirmed by content (tokens, salt and
            # parent node); the match stops at the first page not cached.
            block = tuple(token_ids[i * ps : (i + 1) * ps])
            h = page_hash(h, block, salt) & self._hash_mask
            node = self._prefix.find(h, parent, salt, block)
            if node == NONE:
                break
            if i < skip:
                nodes.append(node)
                parent = node
                continue
            page = self._prefix.pick_page(node, self._ref_count)
            if page == NONE and not (cpu and self._prefix.cpu_page_of(node) != NONE):
                break
            pages.append(page)
            nodes.append(node)
            parent = node
        return pages, nodes

    def _promote(self, hits: list[int], nodes: list[int], num_cached: int) -> None:
        """Bring the hits found on the CPU tier only (page NONE) back into fresh GPU pages."""
        ps = self.page_size
        promoted = [i for i, page in enumerate(hits) if page == NONE]
        sources = [self._prefix.cpu_page_of(nodes[i]) for i in promoted]
        # NOTE: every source is pinned before the first GPU page is taken: an eviction that
        # page causes may demote, and a demotion must not take a CPU page read here.
        for cpu in sources:
            self._cpu_lru.pop(cpu, None)
            self._pin_cpu(cpu)
        for i, cpu in zip(promoted, sources):
            page = self._take_free_page()  # NOTE: held as a hit is (ref_count 1)
            self._prefix.attach(page, nodes[i])
            self._pin(page)
            self._copy_dsts.add(page)
            self._promotions.append((cpu, page))
            hits[i] = page
            self._stats["promotions"] += 1
            self._stats["cpu_hit_tokens"] += max(0, min(ps, num_cached - i * ps))

    def _demote(self, page: int) -> None:
        """An evicted cached GPU page: copy its content to the CPU tier when its node has no CPU
        copy, a CPU page is free or cached, and its KV was written before this step."""
        node = self._prefix.node_of(page)
        if page in self._fresh or self._prefix.cpu_page_of(node) != NONE or not self.num_free_cpu_pages:
            return
        cpu = self._take_cpu_page()
        self._prefix.attach_cpu(cpu, node)
        self._pin_cpu(cpu)  # NOTE: a destination: no other move of this step may write it
        self._demotions.append((page, cpu))
        self._stats["demotions"] += 1

    def _take_cpu_page(self) -> int:
        """A CPU page for a swap-out or a demotion: a free one, else the least recently used
        cached one (its content is lost). Its ref count is 0."""
        if self._cpu_free:
            return self._cpu_free.popleft()
        cpu, _ = self._cpu_lru.popitem(last=False)
        self._prefix.detach_cpu(cpu)
        return cpu

    def _enqueue_cpu(self, cpu: int) -> None:
        if self._prefix.is_cpu_cached(cpu):
            self._cpu_lru[cpu] = None
        else:
            self._cpu_free.append(cpu)

    def _index_page(self, seq_id: int, table: array, i: int, block: tuple, written_from: int) -> bool:
        """Offer page ``i`` of a sequence, whose tokens are ``block``, to the index: its node is
        found or made after the sequence's last one, and the page joins it unless it is a
        released (NULL) entry or cached already. Returns whether the page was attached."""
        prefix = self._prefix
        parent = self._seq_node[seq_id]
        salt = self._seq_salt[seq_id]
        h = page_hash(prefix.hash_of(parent), block, salt) & self._hash_mask
        node = prefix.child(h, parent, salt, block)
        prefix.acquire(node)
        prefix.release(parent)  # NOTE: after acquire: the parent is the new node's parent
        self._seq_node[seq_id] = node
        page = table[i]
        if page == NULL_PAGE or prefix.is_cached(page):
            return False
        prefix.attach(page, node)
        offset = max(written_from - i * self.page_size, 0)
        if offset < self.page_size:
            self._fresh[page] = min(self._fresh.get(page, offset), offset)
        return True

    def _reattach(self, seq_id: int, table: array) -> None:
        """Attach a swapped-in sequence's new pages to the nodes of its indexed pages."""
        node = self._seq_node.get(seq_id, ROOT)
        chain = []
        while node != ROOT:
            chain.append(node)
            node = self._prefix.parent_of(node)
        for i, node in enumerate(reversed(chain)):
            page = table[i]
            if page != NULL_PAGE and not self._prefix.is_cached(page):
                self._prefix.attach(page, node)

    def _take_free_page(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page = self._evictable.pop()
            if self.cpu_prefix_cache:
                self._demote(page)
            self._prefix.detach(page)  # NOTE: evicted: its node may be deleted, or stay a ghost
        self._ref_count[page] = 1
        self._page_priority[page] = 0  # NOTE: its holder sets it
        return page

    def _take_cached_page(self, page: int) -> None:
        if self._ref_count[page] == 0 and page not in self._pinned:
            self._evictable.remove(page)  # NOTE: O(1) removal from the middle of the LRU queue
        self._ref_count[page] += 1

    def _enqueue(self, page: int) -> None:
        """An unreferenced page to the tail of its free queue: evictable if cached."""
        if not self._prefix.is_cached(page):
            self._free.append(page)
        else:
            self._evictable.push(page, self._page_priority[page])

    def _release(self, page: int) -> None:
        self._ref_count[page] -= 1
        if self._ref_count[page] == 0 and page not in self._pinned:
            self._enqueue(page)

    def _release_cpu(self, page: int) -> None:
        self._cpu_ref_count[page] -= 1
        if self._cpu_ref_count[page] == 0 and page not in self._cpu_pinned:
            self._enqueue_cpu(page)

    def _hold_priority(self, table: array, priority: int) -> None:
        for page in table:
            if page != NULL_PAGE and self._page_priority[page] < priority:
                self._page_priority[page] = priority

    def _pin(self, page: int) -> None:
        self._pinned[page] = None

    def _gpu_copy(self, src: int, dst: int) -> tuple[int, int]:
        """A GPU page copy of this step: both pages are pinned until it ends."""
        self._pin(src)
        self._pin(dst)
        self._copy_dsts.add(dst)
        return src, dst

    def _pin_cpu(self, page: int) -> None:
        self._cpu_pinned[page] = None

    def _pages_to_move(self, seq_ids: list[int], to_cpu: bool) -> list[int]:
        """Distinct pages of ``seq_ids`` in first-seen order; checks ids and residence."""
        seen: set[int] = set()
        moved: dict[int, None] = {}
        for seq_id in seq_ids:
            if seq_id in seen:
                raise DuplicateSequence("seq_ids", seq_id)
            seen.add(seq_id)
            table = self._table(seq_id)
            if (seq_id in self._swapped) == to_cpu:
                raise SequenceSwapped(seq_id, to_cpu)
            for page in table:
                if page != NULL_PAGE:
                    moved[page] = None
        return list(moved)

    @staticmethod
    def _old_pages(table: array, mapping: dict[int, int]) -> list[int]:
        """The pre-move page of each (non-null) entry of a table already rewritten by ``mapping``."""
        back = {new: old for old, new in mapping.items()}
        return [back[p] for p in table if p != NULL_PAGE]

    def _pages_to_append(self, seq_id: int, num_tokens: int, cow_drops: dict[int, int]) -> int:
        """Pages that appending ``num_tokens`` to ``seq_id`` takes from the free queues.

        ``cow_drops`` counts copy-on-write releases planned earlier in the same batch, so that a
        page shared by two sequences of one batch is copied only for the first of them.
        """
        table = self._tables[seq_id]
        current = self._num_tokens[seq_id]
        need = _cdiv(current + num_tokens, self.page_size) - len(table)
        if current % self.page_size:
            last = table[-1]
            if self._ref_count[last] - cow_drops.get(last, 0) > 1:
                cow_drops[last] = cow_drops.get(last, 0) + 1
                need += 1
        return need

    def _grow(self, seq_id: int, num_tokens: int, copies: list[tuple[int, int]], token_ids) -> array:
        """Add ``num_tokens`` to a sequence whose page needs were already checked."""
        table = self._tables[seq_id]
        current = self._num_tokens[seq_id]
        if current % self.page_size and self._ref_count[table[-1]] > 1:
            # NOTE: copy-on-write. The shared, partly filled last page is never written: the
            # new tokens go to a fresh copy and the cache must copy src -> dst before writing.
            src = table[-1]
            dst = self._take_free_page()
            copies.append(self._gpu_copy(src, dst))
            self._release(src)
            table[-1] = dst
            self._page_priority[dst] = self._seq_priority[seq_id]
        priority = self._seq_priority[seq_id]
        for _ in range(_cdiv(current + num_tokens, self.page_size) - len(table)):
            page = self._take_free_page()
            self._page_priority[page] = priority
            table.append(page)
        self._num_tokens[seq_id] = current + num_tokens
        if seq_id in self._seq_tail:
            self._extend_cached_tokens(seq_id, table, current, token_ids)
        return table

    def _extend_cached_tokens(self, seq_id: int, table: array, start: int, token_ids) -> None:
        """Track appended token ids and commit through the new length (prefix caching only).

        NOTE: appended tokens are written in the step that appends them, and so is everything
        before them: the append commits the whole sequence, prompt pages still pending first.
        """
        end = self._num_tokens[seq_id]
        written_from = self._seq_committed[seq_id]  # NOTE: the rest is written in this step
        self._seq_committed[seq_id] = end
        tail = self._seq_tail[seq_id]
        if tail is None:
            return
        if token_ids is None:
            self._offer_pages(seq_id, table, start, start, written_from)
            self._seq_tail[seq_id] = None  # tokens unknown from here on: cache no more pages
            return
        tail.extend(token_ids)
        self._offer_pages(seq_id, table, end, end, written_from)

    def _offer_pages(self, seq_id: int, table: array, end: int, stop: int, written_from: int) -> int:
        """Offer to the index, in order, each full page of the sequence's pending token ids
        (which end at position ``end``) lying wholly before ``stop``; returns pages indexed.
        Positions from ``written_from`` on get their KV in this step's forward pass."""
        tail = self._seq_tail[seq_id]
        ps = self.page_size
        page = (end - len(tail)) // ps
        offered = indexed = 0
        while len(tail) - offered >= ps and (page + 1) * ps <= stop:
            indexed += self._index_page(seq_id, table, page, tuple(tail[offered : offered + ps]), written_from)
            offered += ps
            page += 1
        if offered:
            del tail[:offered]  # NOTE: once per call, not per page (a long prompt's tail)
        return indexed
