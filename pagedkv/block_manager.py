"""The public block manager: maps each sequence's token positions to fixed-size pages.

``BlockManager`` validates arguments (once, for both backends) and dispatches to the C++ core
(``pagedkv._core`` through ``pagedkv._cpp``) or to the pure-Python reference
(``pagedkv._reference``), which is the executable specification. Both give the same page ids
and raise the same errors. Arrays are numpy; this module never imports torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _backend
from . import _validate as check
from ._reference import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, NULL_PAGE
from ._hashing import salt_hash
from .events import PREFIX_HASHES, EventBuilder
from .errors import InvalidArgument, InvalidType, invalid_argument


#: Most entries ``page_tables`` builds in one ``[batch_size, max_pages]`` int32 table (1 GiB).
MAX_TABLE_ENTRIES = 2**28


class Allocation(NamedTuple):
    """Result of ``allocate``.

    Attributes:
        num_cached_tokens: prompt tokens whose KV is already in the cache (prefix-cache hit);
            the engine computes only positions ``[num_cached_tokens, num_tokens)``.
        copies: int32 ``[num_copies, 2]``; (src_page, dst_page) copies to execute before writing
            (a whole-prompt hit copies its last page rather than sharing it). The same type as
            ``StepPlan.copies``, ``SwapPlan.copies`` and what ``append`` returns.
    """

    num_cached_tokens: int
    copies: np.ndarray


_NO_COPIES = np.zeros((0, 2), dtype=np.int32)
_NO_COPIES.flags.writeable = False


def _copy_plan(pairs) -> np.ndarray:
    """A backend's list of (src_page, dst_page) pairs as the int32 ``[K, 2]`` array callers get."""
    if not len(pairs):
        return _NO_COPIES
    return np.array(pairs, dtype=np.int32).reshape(-1, 2)


def _check_out_array(name: str, value: object, ndim: int) -> None:
    """An int32 C-contiguous writable numpy array of ``ndim`` dimensions, that the manager writes."""
    if not isinstance(value, np.ndarray):
        raise InvalidType(name, value, f"a numpy int32 array of {ndim} dimensions")
    if value.dtype != np.int32 or value.ndim != ndim or not value.flags.c_contiguous or not value.flags.writeable:
        raise InvalidArgument(name, f"array of shape {value.shape} and dtype {value.dtype}",
                              f"a writable C-contiguous int32 array of {ndim} dimensions")
    if ndim == 2 and value.shape[0] * value.shape[1] > MAX_TABLE_ENTRIES:
        raise InvalidArgument(name, f"array of shape {value.shape}", f"at most {MAX_TABLE_ENTRIES:,} entries")


def _table_args(seq_ids, max_pages):
    """Checked ``(seq_ids, max_pages)`` of ``page_tables`` / ``window_tables``."""
    ids = check.seq_ids(seq_ids)
    if max_pages is not None:
        max_pages = check.as_int("max_pages", max_pages, 0, check.MAX_COUNT)
        if ids.shape[0] * max_pages > MAX_TABLE_ENTRIES:
            raise invalid_argument("max_pages", max_pages, "max_pages_size", MAX_TABLE_ENTRIES // ids.shape[0],
                                   ids.shape[0], MAX_TABLE_ENTRIES)
    return ids, max_pages


class SwapPlan(NamedTuple):
    """Page copies for ``swap_out`` / ``swap_in``.

    Attributes:
        copies: int32 ``[num_pages_moved, 2]``; (src_page, dst_page) pairs. For ``"out"`` src is a
            GPU page and dst a CPU page; for ``"in"`` the reverse.
        direction: ``"out"`` (GPU -> CPU) or ``"in"`` (CPU -> GPU).
    """

    copies: np.ndarray
    direction: str


class OffloadPlan(NamedTuple):
    """The prefix cache's CPU-tier moves (``take_offload``), all int32 ``[K, 2]``.

    Attributes:
        demotions: (gpu_page, cpu_page) pairs: evicted cached GPU pages whose content moves to
            the CPU tier. Run them first in a step, before any other copy or KV write: the GPU
            page was handed out again.
        promotions: (cpu_page, gpu_page) pairs: prefix-cache hits on the CPU tier, brought back
            into the GPU pages now in the hitting sequence's page table. Run them after the
            demotions and before the step's other copies (a copy may read a promoted page).
    """

    demotions: np.ndarray
    promotions: np.ndarray


class PrefixCacheStats(NamedTuple):
    """Prefix-cache counters since construction (``reset_prefix_cache`` keeps them).

    Attributes:
        queries: allocations that gave token ids; hits: those that found >= 1 cached token.
        query_tokens / hit_tokens: prompt tokens asked for / found cached (both tiers).
        num_cached_pages: GPU pages indexed now; num_evictable_pages: cached GPU pages with no
            owner.
        num_pinned_prefix_pages: distinct pages held by ``pin_prefix`` (never evicted while
            pinned; they count against capacity like any referenced page).
        cpu_hit_tokens: of ``hit_tokens``, those found on the CPU tier only (promoted).
        demotions / promotions: pages moved GPU -> CPU / CPU -> GPU by the CPU tier.
        num_cpu_cached_pages: CPU pages holding cached content now (all of them evictable).
    """

    queries: int
    hits: int
    query_tokens: int
    hit_tokens: int
    num_cached_pages: int
    num_evictable_pages: int
    num_pinned_prefix_pages: int = 0
    cpu_hit_tokens: int = 0
    demotions: int = 0
    promotions: int = 0
    num_cpu_cached_pages: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of queried prompt tokens found cached (0.0 before any query)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class StepPlan(NamedTuple):
    """What the cache must do for one batched append.

    Attributes:
        slot_mapping: int64 ``[num_new_tokens]``; the slot of every new token, sequence by
            sequence in call order, positions ascending.
        copies: int32 ``[num_copies, 2]``; (src_page, dst_page) copy-on-write copies to execute
            before the new tokens are written.
    """

    slot_mapping: np.ndarray
    copies: np.ndarray


class PageTables(NamedTuple):
    """Padded page tables for a batch.

    Attributes:
        page_table: int32 ``[batch_size, max_pages]``; row i is sequence i's page table, padded
            with ``NULL_PAGE`` (-1).
        seq_lens: int32 ``[batch_size]``; tokens held by each sequence.
    """

    page_table: np.ndarray
    seq_lens: np.ndarray


class WindowTables(NamedTuple):
    """Page tables of a batch's live pages (``window_tables``): sliding windows stay small.

    Attributes:
        page_table: int32 ``[batch_size, max_pages]``; row i holds sequence i's page-table
            entries from its first live one (the pages a sliding window released are left
            out), padded with ``NULL_PAGE`` (-1).
        seq_lens: int32 ``[batch_size]``; tokens held by each sequence (all of them, released
            ones included: positions keep their meaning).
        first_page: int32 ``[batch_size]``; the page index of row i's first entry, so position
            ``pos`` lives in ``page_table[i, pos // page_size - first_page[i]]``. 0 for a
            sequence without a window.
    """

    page_table: np.ndarray
    seq_lens: np.ndarray
    first_page: np.ndarray


class CSR(NamedTuple):
    """FlashInfer's paged layout for a batch (all int32).

    Attributes:
        indptr: ``[batch_size + 1]``; sequence i's pages are ``indices[indptr[i]:indptr[i+1]]``.
        indices: ``[indptr[-1]]``; page ids, concatenated.
        last_page_len: ``[batch_size]``; tokens in each sequence's last page, in ``[1, page_size]``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    last_page_len: np.ndarray


class BlockManager:
    """Paged KV-cache block manager: free list, ref counts, fork, copy-on-write, batched steps.

    Args:
        num_pages: physical pages in the pool (>= 1).
        page_size: tokens per page (any int >= 1).
        watermark: fraction of pages in ``[0, 1)`` kept free when admitting *new* sequences
            (``allocate``, ``swap_in``); appends to running sequences may use them. The number
            of reserved pages is ``floor(watermark * num_pages)``.
        enable_prefix_caching: index full pages by a chained hash of their token ids so later
            prompts with the same prefix reuse them (see the README's prefix-caching contract).
        num_cpu_pages: pages in the CPU offload tier (``swap_out`` / ``swap_in``); 0 = none.
        cpu_prefix_cache: make the CPU pool a second tier of the prefix cache (needs
            ``enable_prefix_caching`` and ``num_cpu_pages >= 1``): an evicted cached page is
            demoted to a CPU page rather than lost, and a later hit promotes it back. The moves
            come from ``take_offload``, which an engine calls once per step (see the README).
        enable_kv_events: record KV events (needs ``enable_prefix_caching``): ``take_events``
            returns vLLM's ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` (see
            ``pagedkv.events``). Off, the hot path pays nothing.
        prefix_hash: the block hashes of events: ``"pagedkv"`` (the index's own 64-bit chained
            hash) or ``"sha256_cbor"`` (vLLM's reproducible hash; needs cbor2), which routers
            that recompute hashes from prompt tokens expect. Prefix matching itself keeps the
            64-bit key and confirms by tokens either way.
        backend: ``"cpp"`` or ``"python"``; default ``$PAGEDKV_IMPL`` or the best one built.
        record: a path (``.gz`` compresses) or text file: write every call and its result there
            as JSON Lines, for ``pagedkv replay`` (see ``pagedkv/_recorder.py``).

    Raises:
        InvalidArgument / InvalidType: a bad argument (names it and the value).
        BackendUnavailable: ``backend="cpp"`` when the extension is not built.

    Every method that fails leaves the manager exactly as it was.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        *,
        watermark: float = 0.0,
        enable_prefix_caching: bool = False,
        num_cpu_pages: int = 0,
        cpu_prefix_cache: bool = False,
        enable_kv_events: bool = False,
        prefix_hash: str = "pagedkv",
        backend: str | None = None,
        record=None,
        _hash_bits: int = 64,
    ):
        num_pages = check.count("num_pages", num_pages)
        page_size = check.count("page_size", page_size)
        if isinstance(watermark, bool) or not isinstance(watermark, (int, float, np.floating, np.integer)):
            raise InvalidType("watermark", watermark, "a float in [0, 1)")
        if not 0.0 <= float(watermark) < 1.0:  # NaN fails this too
            raise InvalidArgument("watermark", watermark, "a float in [0, 1)")
        if not isinstance(enable_prefix_caching, (bool, np.bool_)):
            raise InvalidType("enable_prefix_caching", enable_prefix_caching, "a bool")
        num_cpu_pages = check.as_int("num_cpu_pages", num_cpu_pages, 0, check.MAX_COUNT)
        if not isinstance(cpu_prefix_cache, (bool, np.bool_)):
            raise InvalidType("cpu_prefix_cache", cpu_prefix_cache, "a bool")
        if cpu_prefix_cache and not (enable_prefix_caching and num_cpu_pages):
            raise InvalidArgument("cpu_prefix_cache", cpu_prefix_cache,
                                  "False unless enable_prefix_caching=True and num_cpu_pages >= 1")
        hash_bits = check.as_int("_hash_bits", _hash_bits, 1, 64)
        if not isinstance(enable_kv_events, (bool, np.bool_)):
            raise InvalidType("enable_kv_events", enable_kv_events, "a bool")
        if enable_kv_events and not enable_prefix_caching:
            raise InvalidArgument("enable_kv_events", enable_kv_events, "False unless enable_prefix_caching=True")
        if prefix_hash not in PREFIX_HASHES:
            raise InvalidArgument("prefix_hash", prefix_hash, f"one of {PREFIX_HASHES}")
        # NOTE: built first: a missing cbor2 fails before anything is made.
        self._events = EventBuilder(page_size, prefix_hash) if enable_kv_events else None
        self._prefix_hash = prefix_hash
        self._backend = _backend.resolve(backend)
        self.watermark = float(watermark)
        self._impl = _backend.implementation(self._backend)(
            num_pages, page_size, math.floor(self.watermark * num_pages), bool(enable_prefix_caching), num_cpu_pages,
            hash_bits, bool(cpu_prefix_cache), bool(enable_kv_events), prefix_hash == "sha256_cbor"
        )
        self._fast_events = (enable_kv_events and prefix_hash == "pagedkv" and self._backend == "cpp"
                             and record is None)
        # NOTE: the C++ core, unrecorded, takes int64 id arrays unchecked (it checks them itself)
        self._lean = self._backend == "cpp" and record is None
        self._counts: dict[int, np.ndarray] = {}  # count -> a read-only array of it (append_batch)
        if record is not None:
            from ._recorder import Recorder

            config = dict(num_pages=num_pages, page_size=page_size, watermark_pages=math.floor(self.watermark * num_pages),
                          enable_prefix_caching=bool(enable_prefix_caching), num_cpu_pages=num_cpu_pages,
                          hash_bits=hash_bits, cpu_prefix_cache=bool(cpu_prefix_cache),
                          enable_kv_events=bool(enable_kv_events), kv_event_nodes=prefix_hash == "sha256_cbor",
                          backend=self._backend)
            self._impl = Recorder(self._impl, record, config)

    # ------------------------------------------------------------------ facts
    @property
    def backend(self) -> str:
        """``"cpp"`` or ``"python"``."""
        return self._backend

    @property
    def num_pages(self) -> int:
        return self._impl.num_pages

    @property
    def page_size(self) -> int:
        return self._impl.page_size

    @property
    def watermark_pages(self) -> int:
        """Pages that ``allocate`` leaves free (``floor(watermark * num_pages)``)."""
        return self._impl.watermark_pages

    @property
    def num_free_pages(self) -> int:
        return self._impl.num_free_pages

    @property
    def num_sequences(self) -> int:
        return self._impl.num_sequences

    @property
    def num_pinned_pages(self) -> int:
        """GPU pages that no sequence holds but a copy returned in this step still reads or writes:
        off the free queues until the next ``append_batch`` or ``end_step`` (see ``end_step``)."""
        return self._impl.num_pinned_pages

    @property
    def enable_prefix_caching(self) -> bool:
        return self._impl.enable_prefix_caching

    @property
    def num_cpu_pages(self) -> int:
        return self._impl.num_cpu_pages

    @property
    def cpu_prefix_cache(self) -> bool:
        """Whether the CPU pool is a second tier of the prefix cache."""
        return self._impl.cpu_prefix_cache

    @property
    def num_free_cpu_pages(self) -> int:
        return self._impl.num_free_cpu_pages

    def is_swapped(self, seq_id: int) -> bool:
        """Whether ``seq_id`` is swapped out to the CPU tier. Raises UnknownSequence."""
        return self._impl.is_swapped(check.seq_id(seq_id))

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Hit counters and the number of cached / evictable pages."""
        st = self._impl.prefix_cache_stats()
        return PrefixCacheStats(
            st["queries"], st["hits"], st["query_tokens"], st["hit_tokens"], st["num_cached_pages"],
            st["num_evictable_pages"], st["num_pinned_prefix_pages"], st["cpu_hit_tokens"], st["demotions"],
            st["promotions"], st["num_cpu_cached_pages"],
        )

    def __contains__(self, seq_id: object) -> bool:
        """Whether ``seq_id`` is live (on the GPU or swapped out); False for anything that is
        not a valid sequence id, as for any container."""
        try:
            seq_id = check.seq_id(seq_id)
        except (InvalidArgument, InvalidType):
            return False
        return self._impl.has_sequence(seq_id)

    def usage(self) -> float:
        """Fraction of pages not on the free list, in ``[0, 1]`` (vLLM's KV-cache usage)."""
        return 1.0 - self._impl.num_free_pages / self._impl.num_pages

    def page_table(self, seq_id: int) -> list[int]:
        """Sequence ``seq_id``'s page ids, in token order. Raises UnknownSequence."""
        return self._impl.page_table(check.seq_id(seq_id))

    def num_tokens(self, seq_id: int) -> int:
        """Tokens held by ``seq_id``. Raises UnknownSequence."""
        return self._impl.num_tokens(check.seq_id(seq_id))

    def ref_count(self, page_id: int) -> int:
        """Number of page tables that hold ``page_id``."""
        return self._impl.ref_count(check.as_int("page_id", page_id, 0, self._impl.num_pages - 1))

    # ------------------------------------------------------------- admission
    def _prompt(self, num_tokens, token_ids, cache_salt):
        """Checked (num_tokens, token_ids int64 array or None, salt hash) of an allocation."""
        cache_salt = check.cache_salt(cache_salt)
        if token_ids is None:
            if num_tokens is None:
                raise InvalidArgument("num_tokens", None, "an int >= 1 when token_ids is not given")
            return check.count("num_tokens", num_tokens), None, salt_hash(cache_salt)
        tokens = check.int_array("token_ids", token_ids, 0, check.MAX_TOKEN_ID)
        if tokens.shape[0] == 0:
            raise InvalidArgument("token_ids", "[]", "at least one token id")
        if num_tokens is not None and check.count("num_tokens", num_tokens) != tokens.shape[0]:
            raise invalid_argument("num_tokens", num_tokens, "num_tokens_len", tokens.shape[0])
        if self._events is not None:
            self._events.remember_salt(cache_salt)  # NOTE: sha256_cbor hashes the salt itself
        # NOTE: the int64 array goes to the backend as is: the C++ core reads it without any
        # per-token Python work (a 100k-token prompt), the reference converts it itself.
        return tokens.shape[0], tokens, salt_hash(cache_salt)

    @staticmethod
    def _hit_shape(num_tokens: int, max_cached_tokens, release_before) -> tuple[int | None, int]:
        """Checked ``(max_cached_tokens, release_before)`` of an allocation."""
        if max_cached_tokens is not None:
            max_cached_tokens = check.as_int("max_cached_tokens", max_cached_tokens, 0, check.MAX_SEQ_ID)
        release_before = check.as_int("release_before", release_before, 0, check.MAX_SEQ_ID)
        if release_before and release_before >= num_tokens:
            raise invalid_argument("release_before", release_before, "release_before", num_tokens)
        return max_cached_tokens, release_before

    def can_allocate(self, num_tokens: int | None = None, *, token_ids=None, cache_salt=None,
                     max_cached_tokens: int | None = None, release_before: int = 0) -> bool:
        """Whether ``allocate(new_id, ...)`` with these arguments would succeed now.

        Counts prefix-cache hits the same way ``allocate`` does, and the watermark.
        """
        prompt = self._prompt(num_tokens, token_ids, cache_salt)
        if max_cached_tokens is None and not release_before:
            return self._impl.can_allocate(*prompt)
        return self._impl.can_allocate(*prompt, *self._hit_shape(prompt[0], max_cached_tokens, release_before))

    def pages_needed(self, num_tokens: int | None = None, *, token_ids=None, cache_salt=None,
                     max_cached_tokens: int | None = None, release_before: int = 0) -> int:
        """Pages ``allocate(new_id, ...)`` with these arguments would take from the free
        queues now: its fresh pages, plus its hits on cached pages nothing holds (they leave
        the evictable queue) and on the CPU tier (each promotion takes one). ``can_allocate``
        is ``pages_needed(...) <= num_free_pages - watermark_pages``.
        """
        prompt = self._prompt(num_tokens, token_ids, cache_salt)
        return self._impl.pages_needed(*prompt, *self._hit_shape(prompt[0], max_cached_tokens, release_before))

    def prefix_match(self, token_ids, cache_salt=None) -> np.ndarray:
        """What the prefix cache holds of a prompt, page by page: ``int8 [n]``, one entry per
        full page along the longest chain of content prefixes the index knows (``n`` at most
        ``len(token_ids) // page_size``): 2 when a page holding it can be hit now (on the GPU,
        or on the CPU tier of the prefix cache), 1 when the prefix is known but no page holds it
        (evicted while a later page is still cached). Empty without prefix caching. Changes
        nothing. ``HybridBlockManager`` uses it to find the hit every group accepts.
        """
        tokens = check.int_array("token_ids", token_ids, 0, check.MAX_TOKEN_ID)
        return self._impl.prefix_match(tokens, salt_hash(check.cache_salt(cache_salt)))

    def allocate(
        self,
        seq_id: int,
        num_tokens: int | None = None,
        *,
        token_ids=None,
        cache_salt=None,
        num_computed_tokens: int | None = None,
        priority: int | None = None,
        max_cached_tokens: int | None = None,
        release_before: int = 0,
    ) -> Allocation:
        """Create sequence ``seq_id`` holding a prompt of ``num_tokens`` tokens.

        Args:
            seq_id: new sequence id (int >= 0).
            num_tokens: prompt length; may be omitted when ``token_ids`` is given.
            token_ids: the prompt's token ids (ints in ``[0, 2**31)``); with prefix caching on,
                the longest run of cached full pages matching the prompt is reused and the
                prompt's own full pages become matchable once their KV is written (see
                ``num_computed_tokens``).
            cache_salt: tenant key (str/bytes): prompts under different salts share nothing.
            num_computed_tokens: prompt tokens whose KV exists once this step's writes land
                (an int in ``[0, num_tokens]``; ``None``: the whole prompt). With chunked
                prefill, pass the end of the first chunk and ``commit`` the next ones: only full
                pages wholly inside ``max(num_computed_tokens, num_cached_tokens)`` tokens
                become matchable now. Ignored without token ids or prefix caching.
            priority: retention priority in ``[0, 100]`` (default 35, as TensorRT-LLM): once no
                sequence holds them, the pages of lower-priority sequences are evicted first
                (least recently freed first within a priority). A page keeps the highest
                priority of the sequences that held it since it was last handed out; ``fork``
                children inherit it.
            max_cached_tokens: take at most this many prompt tokens from the prefix cache
                (``None``: as many as match); a hybrid model's groups agree on one hit with it.
            release_before: a position in ``[0, num_tokens)``: the pages wholly before it are
                never allocated, as if ``release_window`` had released them (a sliding-window
                layer group whose computed tokens all lie past the window). A prefix-cache hit
                then needs only the pages from there on to be cached (``prefix_match`` 2); the
                released ones need only be known (1).

        Returns:
            ``Allocation(num_cached_tokens, copies)``; ``num_cached_tokens`` is at most
            ``num_tokens - 1`` so the engine always computes the last prompt token.

        Raises:
            SequenceExists: ``seq_id`` is live.
            OutOfPages: not enough free pages above the watermark (hits on cached free pages
                count as taken).
            InvalidArgument: ``num_computed_tokens`` outside ``[0, num_tokens]``.
        """
        seq_id = check.seq_id(seq_id)
        num_tokens, tokens, salt = self._prompt(num_tokens, token_ids, cache_salt)
        if num_computed_tokens is not None:
            num_computed_tokens = check.as_int("num_computed_tokens", num_computed_tokens, 0, num_tokens)
        priority = DEFAULT_PRIORITY if priority is None else check.as_int("priority", priority, MIN_PRIORITY,
                                                                          MAX_PRIORITY)
        if max_cached_tokens is None and not release_before:
            cached, copies = self._impl.allocate(seq_id, num_tokens, tokens, salt, num_computed_tokens, priority)
        else:
            cached, copies = self._impl.allocate(seq_id, num_tokens, tokens, salt, num_computed_tokens, priority,
                                                 *self._hit_shape(num_tokens, max_cached_tokens, release_before))
        return Allocation(cached, _copy_plan(copies))

    def commit(self, seq_id: int, num_computed_tokens: int) -> int:
        """Report that the first ``num_computed_tokens`` tokens of ``seq_id`` have their KV written.

        With prefix caching, each full page wholly inside them that is not matchable yet
        becomes matchable, in order, under its content prefix (whatever became of the pages
        before it; a duplicate of a cached page is findable too). Call it after each prefill
        chunk's writes are issued, with the number of tokens computed so far; appends commit by
        themselves.

        Args:
            seq_id: a sequence on the GPU.
            num_computed_tokens: int in ``[0, num_tokens(seq_id)]``. A value at or below an
                earlier commit is a no-op (commits are monotone); so is a sequence without
                known token ids or a manager without prefix caching.

        Returns:
            Pages newly indexed by this call.

        Raises:
            UnknownSequence, SequenceSwapped, InvalidArgument (``num_computed_tokens`` negative
            or above ``num_tokens(seq_id)``).
        """
        seq_id = check.seq_id(seq_id)
        return self._impl.commit(seq_id, check.as_int("num_computed_tokens", num_computed_tokens, 0, check.MAX_SEQ_ID))

    def _appended(self, num_tokens, token_ids):
        if token_ids is None:
            return check.count("num_tokens", 1 if num_tokens is None else num_tokens), None
        tokens = check.int_array("token_ids", token_ids, 0, check.MAX_TOKEN_ID)
        n = tokens.shape[0] if num_tokens is None else check.count("num_tokens", num_tokens)
        if n != tokens.shape[0] or n == 0:
            raise invalid_argument("token_ids", f"{tokens.shape[0]} token ids", "token_ids_len", n)
        return n, tokens

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        """Whether ``append(seq_id, num_tokens)`` would succeed now (copy-on-write included)."""
        return self._impl.can_append(check.seq_id(seq_id), check.count("num_tokens", num_tokens))

    def append(self, seq_id: int, num_tokens: int | None = None, *, token_ids=None) -> np.ndarray:
        """Grow ``seq_id`` by ``num_tokens`` tokens (default 1, or ``len(token_ids)``).

        Args:
            token_ids: the new tokens' ids; with prefix caching, each page they fill becomes
                matchable. Without them the sequence's later pages are never cached. Either
                way the append commits the whole sequence (see ``commit``): the new tokens'
                KV, and everything before it, is written in this step.

        Returns:
            int32 ``[num_copies, 2]``: the (src_page, dst_page) copy-on-write copies the cache
            must execute before writing the new tokens; one row when the last page was shared
            and partly filled, else none.

        Raises:
            UnknownSequence, SequenceSwapped, OutOfPages.
        """
        seq_id = check.seq_id(seq_id)
        return _copy_plan(self._impl.append(seq_id, *self._appended(num_tokens, token_ids)))

    def append_batch(self, seq_ids, num_tokens=1, *, token_ids=None) -> StepPlan:
        """Grow every sequence of a decode or chunked-prefill step, all or nothing.

        Args:
            seq_ids: 1-D ints (list or numpy array), distinct.
            num_tokens: one int for all, or one int >= 1 per sequence.
            token_ids: optional ``[sum(num_tokens)]`` ints, the new tokens in call order (for
                prefix caching).

        Returns:
            ``StepPlan(slot_mapping int64 [sum(num_tokens)], copies int32 [K, 2])``.

        Raises:
            DuplicateSequence, UnknownSequence, SequenceSwapped, OutOfPages (nothing changed).
        """
        same = num_tokens.__class__ is int and 1 <= num_tokens <= check.MAX_COUNT
        if self._lean and same and token_ids is None and seq_ids.__class__ is np.ndarray \
                and seq_ids.dtype == np.int64 and seq_ids.ndim == 1 and seq_ids.flags.c_contiguous:
            # NOTE: a decode step's usual call: nothing else here can fail, and the C++ core
            # range-checks the ids first itself, with this check's error
            ids = seq_ids
        else:
            ids = check.seq_ids(seq_ids)
        counts = self._same_counts(ids.shape[0], num_tokens) if same else \
            check.counts("num_tokens", num_tokens, ids.shape[0])
        tokens = None
        if token_ids is not None:
            tokens = check.int_array("token_ids", token_ids, 0, check.MAX_TOKEN_ID)
            if tokens.shape[0] != int(counts.sum()):
                raise invalid_argument("token_ids", f"{tokens.shape[0]} token ids", "token_ids_sum", int(counts.sum()))
        slots, copies = self._impl.append_batch(ids, counts, tokens)
        return StepPlan(slots, copies)

    def _same_counts(self, size: int, count: int) -> np.ndarray:
        """A read-only int64 array of ``size`` times ``count`` (a view of a kept one: a decode
        step's counts cost no new array)."""
        full = self._counts.get(count)
        if full is None or full.shape[0] < size:
            full = np.full(max(size, 2 * (0 if full is None else full.shape[0]), 64), count, dtype=np.int64)
            full.flags.writeable = False
            if len(self._counts) < 8:
                self._counts[count] = full
        return full[:size]

    def fork(self, parent_id: int, child_id: int) -> None:
        """Make ``child_id`` share every page of ``parent_id`` (each page's ref_count += 1).

        Raises:
            UnknownSequence: the parent is not live. SequenceExists: the child is live.
        """
        self._impl.fork(check.seq_id(parent_id, "parent_id"), check.seq_id(child_id, "child_id"))

    def free(self, seq_id: int) -> None:
        """Drop ``seq_id`` (on the GPU or swapped out).

        Pages whose ref_count reaches 0 return to a free queue tail, last page first: cached
        pages to the evictable LRU queue (still matchable until evicted), others to the free
        queue.
        """
        self._impl.free(check.seq_id(seq_id))

    def release_window(self, seq_id: int, window: int) -> int:
        """Sliding window: release the pages that lie wholly before the last ``window`` tokens.

        Released entries keep their position in the page table and read ``NULL_PAGE`` (-1).

        Returns:
            Pages released by this call.
        """
        seq_id = check.seq_id(seq_id)
        return self._impl.release_window(seq_id, check.count("window", window))

    def pin_prefix(self, token_ids, cache_salt=None, *, release_before: int = 0) -> int:
        """Retention: keep the cached pages of a prefix (a system prompt, say) from eviction.

        Holds a reference on each cached full page of ``token_ids``'s longest cached prefix, as
        a sequence would: they are never evicted until ``unpin_prefix``, count against capacity
        (they are not free) and are reported in ``prefix_cache_stats().num_pinned_prefix_pages``.
        Pin the prefix once it is cached (after its first request commits it); pinning twice
        holds twice, and each ``unpin_prefix`` releases one pin (the oldest).
        ``release_before``: the pages wholly before that position are not held, and need only
        be known to the index (as ``allocate(release_before=...)`` takes a hit).

        Returns:
            Pages pinned (0 without prefix caching or when nothing of the prefix is cached).
        """
        tokens = check.int_array("token_ids", token_ids, 0, check.MAX_TOKEN_ID)
        cache_salt = check.cache_salt(cache_salt)
        release_before = check.as_int("release_before", release_before, 0, check.MAX_SEQ_ID)
        if release_before:
            return self._impl.pin_prefix(tokens, salt_hash(cache_salt), release_before)
        return self._impl.pin_prefix(tokens, salt_hash(cache_salt))

    def unpin_prefix(self, token_ids, cache_salt=None) -> int:
        """Release the oldest ``pin_prefix`` of exactly these token ids and salt.

        Returns:
            Pages released by the pin (they stay cached: evictable once nothing holds them).

        Raises:
            InvalidArgument: no such pin.
        """
        tokens = check.int_array("token_ids", token_ids, 0, check.MAX_TOKEN_ID)
        cache_salt = check.cache_salt(cache_salt)
        return self._impl.unpin_prefix(tokens, salt_hash(cache_salt))

    def end_step(self) -> None:
        """Say that every copy returned so far has been executed.

        NOTE: step-safe copies. The copies returned since the last ``append_batch`` or
        ``end_step`` (by ``allocate``, ``append``, ``append_batch``, ``swap_out`` and
        ``swap_in``) can be executed together, as one batched launch: every copy's destination
        is a page no other copy of the step reads or writes. A copy may read the destination of
        a copy returned earlier in the step only when the engine appends to, hits, or swaps out
        such a page in the same step (see the README): run those pairs in the order returned.
        Every page a copy reads or writes is pinned; one that no sequence holds any more
        (freed, preempted, copied away) stays off the free queues (``num_pinned_pages``) until
        this call or the next ``append_batch``, which begins a new step and releases them first.
        Execute a step's copies before that call. An engine that calls ``append_batch`` every
        step need not call this; one that does not must, once per step.
        """
        self._impl.end_step()

    # ------------------------------------------------------- export / import
    def export_sequence(self, seq_id: int, *, token_ids=None, cache_salt=None):
        """Describe a resident sequence for another manager (prefill/decode disaggregation).

        Args:
            token_ids: the sequence's token ids, when the engine wants the importer's prefix
                cache to find what it already holds (and the descriptor to carry block hashes).
            cache_salt: the salt it was allocated under (with ``token_ids``).

        Returns:
            ``pagedkv.transfer.TransferDescriptor``.

        Raises:
            UnknownSequence; SequenceSwapped; InvalidArgument: pages released by a window, or
                ``token_ids`` that are not one per token.
        """
        from . import transfer

        return transfer.export_sequence(self, seq_id, token_ids, cache_salt, self._prefix_hash)

    def import_sequence(self, seq_id: int, descriptor):
        """Register ``seq_id`` here with the KV a descriptor describes (all or nothing).

        Pages are allocated as ``allocate`` does (a descriptor with token ids first takes every
        full page this manager's prefix cache holds). Execute ``plan.copies``, move
        ``plan.transfers`` (``PagedKVCache.send_pages`` / ``recv_pages``), then
        ``commit(seq_id, descriptor.num_tokens)``: only then do the moved pages become matchable.

        Returns:
            ``pagedkv.transfer.ImportPlan``.

        Raises:
            SequenceExists, OutOfPages (nothing changed); InvalidType / InvalidArgument: a bad
                descriptor, or one of another page size.
        """
        from . import transfer

        return transfer.import_sequence(self, seq_id, descriptor)

    # ----------------------------------------------------- persistent page table
    def bind_table(self, page_table: np.ndarray | None, seq_lens: np.ndarray | None = None) -> None:
        """Keep a caller-owned page table current, as vLLM's persistent block table is.

        Rows are the engine's: ``set_row(seq_id, row)`` binds a sequence to one, and from then
        on every call that changes the sequence (``append``, ``append_batch``, ``swap_out``,
        ``swap_in``, ``release_window``, ``free``) writes its page ids into the row, padded with
        ``NULL_PAGE`` (all ``NULL_PAGE`` while swapped out), and its token count into
        ``seq_lens[row]``. An engine that keeps its running batch in rows ``0..B-1`` plans
        ``PageTables(page_table[:B], seq_lens[:B])`` without rebuilding a table.

        Binding clears both arrays and every row binding; ``None`` unbinds. Neither call is
        recorded by ``record=``.

        Args:
            page_table: int32 ``[rows, width]``, C-contiguous, writable; ``width`` bounds the
                pages of a bound sequence (an ``append`` past it raises ``InvalidArgument``
                naming ``num_tokens``, and changes nothing).
            seq_lens: int32 ``[rows]``, C-contiguous, writable, or ``None``.
        """
        if page_table is None:
            if seq_lens is not None:
                raise InvalidArgument("seq_lens", "an array", "None when page_table is None")
            self._impl.bind_table(None, None)
            return
        _check_out_array("page_table", page_table, 2)
        if seq_lens is not None:
            _check_out_array("seq_lens", seq_lens, 1)
            if seq_lens.shape[0] != page_table.shape[0]:
                raise InvalidArgument("seq_lens", f"{seq_lens.shape[0]} entries",
                                      f"one per page_table row ({page_table.shape[0]})")
        self._impl.bind_table(page_table, seq_lens)

    def set_row(self, seq_id: int, row: int | None) -> None:
        """Bind ``seq_id`` (live or swapped out) to ``row`` of the bound table and write it
        there; ``None`` unbinds it and clears its row. A freed sequence's row is cleared.

        Raises:
            UnknownSequence; InvalidArgument: ``row`` outside the table, bound to another
                sequence, or narrower than the sequence's page table.
        """
        seq_id = check.seq_id(seq_id)
        self._impl.set_row(seq_id, -1 if row is None else check.as_int("row", row, 0, check.MAX_COUNT))

    def row_of(self, seq_id: int) -> int | None:
        """The row ``seq_id`` is bound to, or ``None``."""
        row = self._impl.row_of(check.seq_id(seq_id))
        return None if row < 0 else row

    def reset_prefix_cache(self) -> None:
        """Forget every cached page (both tiers); cached free pages become plain free pages (LRU
        order kept). Moves already returned, or pending for ``take_offload``, must still run."""
        self._impl.reset_prefix_cache()

    @property
    def enable_kv_events(self) -> bool:
        return self._events is not None

    @property
    def prefix_hash(self) -> str:
        """The hash of its events' block hashes (``"pagedkv"`` or ``"sha256_cbor"``): a router's
        ``PrefixIndex`` must use the same."""
        return self._prefix_hash

    def take_events(self) -> list:
        """The KV events since the last call, in order, and forget them.

        Returns:
            A list of ``pagedkv.events.BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``
            (vLLM's field names and order; ``encode_batch`` writes vLLM's wire format). Empty
            without ``enable_kv_events``.
        """
        if self._events is None:
            return []
        if self._fast_events:
            # NOTE: the C++ core merges its records into events itself (one tuple per event)
            return self._events.wrap(self._impl.take_merged_events())
        return self._events.build(self._impl.take_events())

    def take_offload(self) -> OffloadPlan:
        """The CPU-tier moves of the prefix cache made since the last call, and forget them.

        With ``cpu_prefix_cache``, any call that takes a GPU page (``allocate``, ``append``,
        ``append_batch``, ``swap_in``) may evict a cached page and demote it, and ``allocate``
        may promote hits found on the CPU tier. An engine calls this once per step after its
        scheduling calls and runs, in this order: the demotions, the promotions, then the
        step's other copies and swaps, then the forward pass. (An engine that executes each
        call's copies at once calls this after each call and runs its moves first.) Always
        empty without ``cpu_prefix_cache``.
        """
        demotions, promotions = self._impl.take_offload()
        return OffloadPlan(_copy_plan(demotions), _copy_plan(promotions))

    # --------------------------------------------------------------- CPU tier
    def can_swap_out(self, seq_ids) -> bool:
        """Whether ``swap_out(seq_ids)`` would succeed (enough free CPU pages)."""
        return self._impl.can_swap_out(check.seq_ids(seq_ids))

    def can_swap_in(self, seq_ids) -> bool:
        """Whether ``swap_in(seq_ids)`` would succeed (enough GPU pages above the watermark)."""
        return self._impl.can_swap_in(check.seq_ids(seq_ids))

    def swap_out(self, seq_ids) -> SwapPlan:
        """Move sequences' pages to CPU pages, all or nothing.

        With ``cpu_prefix_cache``, swap-out outranks the prefix cache's CPU tier: once no plain
        free CPU page is left, it takes cached CPU pages, least recently used first (their
        content is lost). A demotion never takes a swapped-out sequence's page.

        A page shared by several of ``seq_ids`` is moved once and stays shared; a page also held
        by a sequence left on the GPU is copied and stays there for it.

        Returns:
            ``SwapPlan(copies int32 [K, 2] (gpu_page, cpu_page), "out")``.

        Raises:
            DuplicateSequence, UnknownSequence, SequenceSwapped (already out), OutOfPages
            (``pool="cpu"``).
        """
        return SwapPlan(self._impl.swap_out(check.seq_ids(seq_ids)), "out")

    def swap_in(self, seq_ids) -> SwapPlan:
        """Bring swapped-out sequences back to GPU pages, all or nothing.

        Returns:
            ``SwapPlan(copies int32 [K, 2] (cpu_page, gpu_page), "in")``.
        """
        return SwapPlan(self._impl.swap_in(check.seq_ids(seq_ids)), "in")

    # ------------------------------------------------------------ batch views
    def slots(self, seq_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Slots (``page_id * page_size + pos % page_size``) of positions ``[start, stop)``.

        Returns:
            int64 ``[stop - start]``. Use it for the prompt tokens of a new sequence.
        """
        seq_id = check.seq_id(seq_id)
        # NOTE: positions are int64, like num_tokens: a windowed sequence may pass 2**31 tokens.
        stop = self._impl.num_tokens(seq_id) if stop is None else check.as_int("stop", stop, 0, check.MAX_SEQ_ID)
        return self._impl.slots(seq_id, check.as_int("start", start, 0, check.MAX_SEQ_ID), stop)

    def page_tables(self, seq_ids, max_pages: int | None = None) -> PageTables:
        """Padded page tables of a batch.

        Args:
            seq_ids: 1-D ints.
            max_pages: width to pad to (e.g. fixed for CUDA graphs); default the longest table.

        Returns:
            ``PageTables(page_table int32 [B, max_pages], seq_lens int32 [B])``.

        Raises:
            InvalidArgument: ``max_pages`` below the longest table, or so large that the table
                would pass ``MAX_TABLE_ENTRIES`` entries.
            SequenceTooLong: a sequence holds more than 2**31 - 1 tokens (int32 ``seq_lens``).
        """
        return PageTables(*self._impl.page_tables(*_table_args(seq_ids, max_pages)))

    def window_tables(self, seq_ids, max_pages: int | None = None) -> WindowTables:
        """Padded page tables of a batch's live pages, with each row's first page index.

        For sequences with a sliding window (``release_window``), the cost and the width stay
        at the window's pages however long the sequences grow. ``PagedKVCache.plan`` accepts
        the result, and the kernels read position ``pos`` at column ``pos // page_size -
        first_page``.

        Args / Raises: as ``page_tables`` (``max_pages`` bounds the live width).
        """
        return WindowTables(*self._impl.window_tables(*_table_args(seq_ids, max_pages)))

    def csr(self, seq_ids) -> CSR:
        """FlashInfer's ``(indptr, indices, last_page_len)`` for a batch (int32 arrays).

        NOTE: only live pages are listed. For a sequence a sliding window has released pages
        from, the CSR starts at its first live page, so it describes the tokens from that page's
        start (a shifted view, self-consistent for windowed attention: the released tokens lie
        outside every query's window); ``page_tables`` keeps the positions, with -1 entries.
        """
        return CSR(*self._impl.csr(check.seq_ids(seq_ids)))

    # ------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Check every invariant in O(num_pages + page-table entries).

        Raises:
            InvariantViolation: naming the broken invariant (``ref_count``, ``conservation``,
                ``free_list_unique``, ``free_page_unreferenced``, ``pages_cover_tokens``,
                ``cpu_ref_count``, ``free_queue_cached``, ``hash_index``, ...; the list and the
                detail texts are ``pagedkv.errors.INVARIANT_DETAILS``).
        """
        self._impl.check_invariants()

    def close_trace(self) -> None:
        """Flush and close the trace file of ``record=`` (a no-op when not recording)."""
        close = getattr(self._impl, "close", None) if type(self._impl).__name__ == "Recorder" else None
        if close is not None:
            close()

    def snapshot(self) -> dict:
        """The whole observable state, for tests: both free queues in order, ref counts, the CPU
        tier, page tables, swapped sequences, the hash index and the prefix-cache counters."""
        return self._impl.snapshot()

    def __repr__(self) -> str:
        return (
            f"BlockManager(num_pages={self.num_pages}, page_size={self.page_size}, "
            f"watermark={self.watermark}, backend={self.backend!r})"
        )


    @classmethod
    def for_budget(cls, spec, budget_bytes: int, page_size: int, **kwargs) -> "BlockManager":
        """A manager with as many pages as ``budget_bytes`` of KV cache holds.

        Args:
            spec: the model's KV shape: a ``pagedkv.spec.KVCacheSpec``, a ``ModelPreset``, a
                preset name (``"llama-3-8b"``), or a Hugging Face ``config.json`` path or dict
                (see ``pagedkv.spec.as_kv_spec``). One page is ``page_size`` tokens of K and V
                in every layer, ``spec.page_bytes(page_size)`` bytes.
            budget_bytes: bytes for the KV cache, e.g. ``pagedkv.spec.gpu_budget_bytes(0.9)``
                (a fraction of the GPU's free memory) or ``kv_budget_bytes(...)``.
            page_size: tokens per page.
            **kwargs: passed to ``BlockManager`` (``watermark``, ``backend``).

        Returns:
            ``BlockManager(num_pages_for_budget(spec, budget_bytes, page_size), page_size, ...)``.

        Raises:
            InvalidArgument: the budget holds less than one page, or a bad argument.
        """
        from .spec import num_pages_for_budget  # NOTE: lazy, so the facade's import stays minimal

        return cls(num_pages_for_budget(spec, budget_bytes, page_size), page_size, **kwargs)


__all__ = ["BlockManager", "Allocation", "StepPlan", "SwapPlan", "PageTables", "CSR", "PrefixCacheStats", "NULL_PAGE"]
