"""KV cache groups over one page pool: full, sliding-window, chunked-local and state layers.

A hybrid model (gpt-oss, Gemma 3, Llama 4, Qwen3-Next) mixes layer types. ``HybridBlockManager``
serves each *group* of layers with its own attention type from one ``BlockManager``, so every
group draws from one free list and one prefix cache:

- ``full``: every token's page is kept;
- ``sliding`` (window ``W``): a token at position ``p`` attends to ``(p - W, p]``; pages wholly
  before the oldest position any new token can see are released as the sequence grows;
- ``chunked`` (chunk ``C``, a multiple of the page size): a token attends to the positions of its
  own chunk ``[p // C * C, p]``; the previous chunks' pages are released;
- ``state`` (``state_pages``): a constant number of pages per sequence (the recurrent state of a
  linear-attention or Mamba layer), copied, not shared, on ``fork``.

Layout and page size (see the README): every group uses the same page size in tokens, and each
group holds the same number of layers (``KVCacheSpec.hybrid_layout`` pads the smaller ones),
so one physical page has the same size in bytes whatever group holds it. The cache keeps
``layers_per_group`` K/V tensors of ``[num_pages, page_size, heads, head_dim]``: layer ``j`` of
every group uses tensor ``j``, through its group's page table. A state group's pages hold the
state in the same bytes (``state_pages`` pages per sequence).

Sequence ``s`` of group ``g`` is the inner manager's sequence ``s * num_groups + g``; with one
group the ids are the caller's own and every call goes straight through, so a single full group
is today's ``BlockManager``, id for id and error for error. Must not import torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _validate as check
from .block_manager import BlockManager, StepPlan, SwapPlan, _copy_plan
from .errors import (DuplicateSequence, InvalidArgument, InvalidType, OutOfPages, SequenceExists, SequenceSwapped,
                     SequenceTooLong, UnknownSequence)

KINDS = ("full", "sliding", "chunked", "state")


class KVCacheGroup(NamedTuple):
    """One group of layers with one attention type.

    Args:
        kind: ``"full"``, ``"sliding"``, ``"chunked"`` or ``"state"``.
        window: the sliding window ``W`` in tokens (``sliding`` only): position ``p`` sees
            ``(p - W, p]``, as Mistral's, Gemma 3's and gpt-oss's ``sliding_window``.
        chunk: the chunk ``C`` in tokens (``chunked`` only; Llama 4's ``attention_chunk_size``).
        state_pages: pages of state per sequence (``state`` only).
    """

    kind: str
    window: int = 0
    chunk: int = 0
    state_pages: int = 0

    @classmethod
    def full(cls) -> "KVCacheGroup":
        return cls("full")

    @classmethod
    def sliding(cls, window: int) -> "KVCacheGroup":
        return cls("sliding", window=window)

    @classmethod
    def chunked(cls, chunk: int) -> "KVCacheGroup":
        return cls("chunked", chunk=chunk)

    @classmethod
    def state(cls, state_pages: int) -> "KVCacheGroup":
        return cls("state", state_pages=state_pages)

    def first_needed(self, start: int) -> int:
        """The oldest position that a token computed from position ``start`` on attends to."""
        if self.kind == "sliding":
            return max(0, start - self.window + 1)
        if self.kind == "chunked":
            return start // self.chunk * self.chunk
        return 0


def _check_groups(groups, page_size: int) -> tuple[KVCacheGroup, ...]:
    if isinstance(groups, (str, bytes, KVCacheGroup)) or not hasattr(groups, "__iter__"):
        raise InvalidType("groups", groups, "a sequence of KVCacheGroup")
    out = []
    for i, group in enumerate(groups):
        name = f"groups[{i}]"
        if not isinstance(group, KVCacheGroup):
            raise InvalidType(name, group, "a KVCacheGroup")
        if group.kind not in KINDS:
            raise InvalidArgument(f"{name}.kind", group.kind, f"one of {KINDS}")
        fields = {"sliding": "window", "chunked": "chunk", "state": "state_pages"}
        for kind, field in fields.items():
            value = getattr(group, field)
            if group.kind == kind:
                check.count(f"{name}.{field}", value)
            elif value != 0:
                raise InvalidArgument(f"{name}.{field}", value, f"0 for a {group.kind!r} group")
        if group.kind == "chunked" and group.chunk % page_size:
            raise InvalidArgument(f"{name}.chunk", group.chunk, f"a multiple of page_size ({page_size})")
        out.append(group)
    if not out:
        raise InvalidArgument("groups", "[]", "at least one group")
    if all(g.kind == "state" for g in out):
        raise InvalidArgument("groups", [g.kind for g in out], "at least one group that holds tokens")
    return tuple(out)


class HybridAllocation(NamedTuple):
    """What ``HybridBlockManager.allocate`` did: every group holds the KV of the first
    ``num_cached_tokens`` prompt tokens (compute from there); ``copies``: int32 ``[K, 2]`` pairs
    to run before the forward pass."""

    num_cached_tokens: int
    copies: np.ndarray


class HybridStepPlan(NamedTuple):
    """One decode/extend step: ``slot_mapping`` int64 ``[num_groups, T]`` (a state group's row
    is all -1: it stores no tokens), ``copies`` int32 ``[K, 2]`` (copy-on-write, one pool),
    ``released``: pages the windows and chunks released in this step."""

    slot_mapping: np.ndarray
    copies: np.ndarray
    released: int


class HybridBlockManager:
    """Several KV cache groups over one page pool (see the module docstring).

    Args:
        groups: the ``KVCacheGroup`` of each layer group, in the order the model's layers map
            to them (``KVCacheSpec.kv_cache_groups`` builds them from a config).
        num_pages, page_size: the one pool, shared by every group.
        **options: as ``BlockManager`` (``enable_prefix_caching``, ``watermark``,
            ``num_cpu_pages``, ``cpu_prefix_cache``, ``backend``, ``record``, ...).

    Every call covers every group: ``allocate``, ``append_batch``, ``fork``, ``free``,
    ``swap_out``/``swap_in`` and ``commit`` take caller sequence ids and return one plan for the
    whole pool. A call that fails leaves the manager as it was.

    Prefix caching keeps each group's pages under its own salt (group ``g`` of tenant ``salt``
    never matches another group's pages). A full group needs every page before the hit, a
    sliding group only the pages its window covers at the hit point, a chunked group the pages
    of the hit's chunk, and a state group accepts no hit (its state is not snapshotted per
    page). The hit taken is the largest page-aligned length every group accepts, found by
    iterating to a fixed point as vLLM's hybrid coordinator does.
    """

    def __init__(self, groups, num_pages: int, page_size: int, **options):
        page_size = check.count("page_size", page_size)
        self.groups = _check_groups(groups, page_size)
        self._manager = BlockManager(num_pages, page_size, **options)
        g = len(self.groups)
        self._g = g
        self._single = g == 1 and self.groups[0].kind == "full"  # NOTE: today's BlockManager
        # NOTE: with several groups, the inner manager's errors name inner ids (seq * G + g):
        # the proxy names the caller's sequence instead.
        self._mgr = self._manager if self._single else _CallerIds(self._manager, g)
        self._token_groups = [i for i, grp in enumerate(self.groups) if grp.kind != "state"]
        self._windowed = [i for i, grp in enumerate(self.groups) if grp.kind in ("sliding", "chunked")]
        self._state_groups = [i for i, grp in enumerate(self.groups) if grp.kind == "state"]
        self._max_seq_id = (check.MAX_SEQ_ID - (g - 1)) // g  # NOTE: inner ids up to seq * G + G - 1
        self._num_tokens: dict[int, int] = {}
        self._start: dict[int, int] = {}  # seq -> first position its last allocate/append computes

    # ------------------------------------------------------------------ facts
    @property
    def manager(self) -> BlockManager:
        """The one ``BlockManager`` every group allocates from (read its stats, events, ...)."""
        return self._manager

    @property
    def num_groups(self) -> int:
        return self._g

    num_pages = property(lambda self: self._mgr.num_pages)
    num_cpu_pages = property(lambda self: self._mgr.num_cpu_pages)
    num_free_cpu_pages = property(lambda self: self._mgr.num_free_cpu_pages)
    cpu_prefix_cache = property(lambda self: self._mgr.cpu_prefix_cache)
    page_size = property(lambda self: self._mgr.page_size)
    num_free_pages = property(lambda self: self._mgr.num_free_pages)
    watermark_pages = property(lambda self: self._mgr.watermark_pages)
    enable_prefix_caching = property(lambda self: self._mgr.enable_prefix_caching)
    backend = property(lambda self: self._mgr.backend)

    def pages_for(self, num_tokens: int) -> int:
        """Pages a new sequence of ``num_tokens`` tokens takes when allocated whole, with no
        prefix hit: a page per ``page_size`` tokens in every token group, and the state pages."""
        n = -(-check.as_int("num_tokens", num_tokens, 0, 2**62) // self.page_size)
        return sum(g.state_pages if g.kind == "state" else n for g in self.groups)

    def usage(self) -> float:
        return self._mgr.usage()

    def prefix_cache_stats(self):
        return self._mgr.prefix_cache_stats()

    @property
    def num_sequences(self) -> int:
        return self._mgr.num_sequences if self._single else len(self._num_tokens)

    def __contains__(self, seq_id: object) -> bool:
        if self._single:
            return seq_id in self._mgr
        return seq_id in self._num_tokens

    def _id(self, seq_id, name: str = "seq_id") -> int:
        seq_id = check.seq_id(seq_id, name)
        if seq_id > self._max_seq_id:
            raise InvalidArgument(name, seq_id, f"an int in [0, {self._max_seq_id}] ({self._g} groups)")
        return seq_id

    def _live(self, seq_id) -> int:
        seq_id = self._id(seq_id)
        if seq_id not in self._num_tokens:
            raise UnknownSequence(seq_id)
        return seq_id

    def _inner(self, seq_id: int, group: int) -> int:
        return seq_id * self._g + group

    def _group(self, group) -> int:
        return check.as_int("group", group, 0, self._g - 1)

    def num_tokens(self, seq_id: int) -> int:
        if self._single:
            return self._mgr.num_tokens(seq_id)
        return self._num_tokens[self._live(seq_id)]

    def page_table(self, seq_id: int, group: int = 0) -> list[int]:
        """Group ``group``'s page table of ``seq_id`` (released entries read -1)."""
        if self._single:
            self._group(group)
            return self._mgr.page_table(seq_id)
        return self._mgr.page_table(self._inner(self._live(seq_id), self._group(group)))

    def is_swapped(self, seq_id: int) -> bool:
        if self._single:
            return self._mgr.is_swapped(seq_id)
        return self._mgr.is_swapped(self._inner(self._live(seq_id), 0))

    # ------------------------------------------------------------- prefix hits
    def _salt(self, group: int, cache_salt):
        """Group ``group``'s cache salt: the tenant's, tagged with the group (one group: as is)."""
        if self._single:
            return cache_salt
        cache_salt = check.cache_salt(cache_salt)
        tag = f"pagedkv.group.{group}\0"
        if cache_salt is None:
            return tag
        if isinstance(cache_salt, bytes):
            return tag.encode() + cache_salt
        return tag + cache_salt

    def _accepts(self, group: int, states: np.ndarray, pages: int) -> bool:
        """Whether group ``group`` can take a hit of ``pages`` full pages, given what the cache
        holds of its chain (``BlockManager.prefix_match``)."""
        if pages == 0:
            return True
        grp = self.groups[group]
        if grp.kind == "state" or states.shape[0] < pages:
            return False
        first = grp.first_needed(pages * self.page_size) // self.page_size
        return bool(np.all(states[first:pages] == 2))

    def find_hit(self, token_ids, cache_salt=None) -> int:
        """The prefix-cache hit in tokens every group accepts now (page-aligned, below the
        prompt's length), as ``allocate`` would take it. Changes nothing."""
        tokens = check.int_array("token_ids", token_ids, 0, check.MAX_TOKEN_ID)
        if not self._mgr.enable_prefix_caching or tokens.shape[0] == 0:
            return 0
        return self._hit_pages(tokens, cache_salt) * self.page_size

    def _hit_pages(self, tokens: np.ndarray, cache_salt) -> int:
        states = [self._mgr.prefix_match(tokens, self._salt(g, cache_salt)) for g in range(self._g)]
        pages = (tokens.shape[0] - 1) // self.page_size
        # NOTE: the fixed point: each group's largest acceptable hit at most the candidate; a
        # sliding group accepting L pages need not accept fewer, so go on until all agree.
        while True:
            candidate = pages
            for g in range(self._g):
                while candidate and not self._accepts(g, states[g], candidate):
                    candidate -= 1
            if candidate == pages:
                return pages
            pages = candidate

    # ---------------------------------------------------------------- mutators
    def _plans(self, num_tokens: int, tokens, cache_salt, hit: int):
        """Per group: (allocate keyword arguments, pages it takes)."""
        plans = []
        for g, grp in enumerate(self.groups):
            if grp.kind == "state":
                kwargs = dict(num_tokens=grp.state_pages * self.page_size)
                need = grp.state_pages
            else:
                kwargs = dict(num_tokens=num_tokens, release_before=grp.first_needed(hit))
                if tokens is not None:
                    kwargs.update(token_ids=tokens, cache_salt=self._salt(g, cache_salt), max_cached_tokens=hit)
                need = self._mgr.pages_needed(**kwargs)
            plans.append((kwargs, need))
        return plans

    def can_allocate(self, num_tokens: int | None = None, *, token_ids=None, cache_salt=None) -> bool:
        """Whether ``allocate(new_id, ...)`` would succeed now (every group's pages)."""
        if self._single:
            return self._mgr.can_allocate(num_tokens, token_ids=token_ids, cache_salt=cache_salt)
        num_tokens, tokens = self._prompt(num_tokens, token_ids)
        hit = self._hit_pages(tokens, cache_salt) * self.page_size if self._caching(tokens) else 0
        need = sum(n for _, n in self._plans(num_tokens, tokens, cache_salt, hit))
        return need <= self._mgr.num_free_pages - self._mgr.watermark_pages

    def _caching(self, tokens) -> bool:
        return tokens is not None and self._mgr.enable_prefix_caching

    def _prompt(self, num_tokens, token_ids):
        if token_ids is None:
            if num_tokens is None:
                raise InvalidArgument("num_tokens", None, "an int >= 1 when token_ids is not given")
            return check.count("num_tokens", num_tokens), None
        tokens = check.int_array("token_ids", token_ids, 0, check.MAX_TOKEN_ID)
        if tokens.shape[0] == 0:
            raise InvalidArgument("token_ids", "[]", "at least one token id")
        if num_tokens is not None and check.count("num_tokens", num_tokens) != tokens.shape[0]:
            raise InvalidArgument("num_tokens", num_tokens, f"len(token_ids) = {tokens.shape[0]}")
        return tokens.shape[0], tokens

    def allocate(self, seq_id: int, num_tokens: int | None = None, *, token_ids=None, cache_salt=None,
                 num_computed_tokens: int | None = None, priority: int | None = None) -> HybridAllocation:
        """Create ``seq_id`` in every group, as ``BlockManager.allocate`` (same arguments).

        Sliding and chunked groups never take the pages before the oldest position the
        prompt's computed tokens attend to. Raises ``OutOfPages`` naming the pages of all groups
        together when they do not fit above the watermark.
        """
        if self._single:
            a = self._mgr.allocate(seq_id, num_tokens, token_ids=token_ids, cache_salt=cache_salt,
                                   num_computed_tokens=num_computed_tokens, priority=priority)
            return HybridAllocation(a.num_cached_tokens, a.copies)
        seq_id = self._id(seq_id)
        num_tokens, tokens = self._prompt(num_tokens, token_ids)
        if num_computed_tokens is not None:
            num_computed_tokens = check.as_int("num_computed_tokens", num_computed_tokens, 0, num_tokens)
        if priority is not None:
            priority = check.as_int("priority", priority, 0, 100)
        if seq_id in self._num_tokens:
            raise SequenceExists(seq_id)
        hit = self._hit_pages(tokens, cache_salt) * self.page_size if self._caching(tokens) else 0
        target = num_tokens if num_computed_tokens is None else num_computed_tokens
        while True:
            plans = self._plans(num_tokens, tokens, cache_salt, hit)
            need = sum(n for _, n in plans)
            available = self._mgr.num_free_pages - self._mgr.watermark_pages
            if need > available:
                raise OutOfPages(need, max(available, 0), self._mgr.num_pages)
            # NOTE: first every group's hit pages are held (a pin takes no free page), so no
            # group's fresh pages can evict another group's hits; the pins go once all hold them.
            pins = []
            if hit:
                for g in self._token_groups:
                    pins.append((tokens[:hit], self._salt(g, cache_salt)))
                    self._mgr.pin_prefix(*pins[-1], release_before=self.groups[g].first_needed(hit))
            # NOTE: the pages of all groups fit, so each allocate below succeeds. A hit on the CPU
            # tier is not pinned: its promotion's page may evict another group's hit page, and
            # that group then takes a fresh page for it (the total stays the same) and a shorter
            # hit. Every group must agree on one (a sliding group released the pages before its
            # window at the longer hit): free them all and allocate again at the shorter one.
            # Nothing is indexed until every group has its hit (num_computed_tokens=0, then
            # commit), so freeing leaves no page indexed whose KV is not written.
            cached, copies = [], []
            for g, (kwargs, _) in enumerate(plans):
                if self.groups[g].kind == "state":
                    a = self._mgr.allocate(self._inner(seq_id, g), priority=priority, **kwargs)
                    cached.append(hit)
                else:
                    a = self._mgr.allocate(self._inner(seq_id, g), priority=priority, num_computed_tokens=0, **kwargs)
                    cached.append(a.num_cached_tokens)
                copies.append(a.copies)
            for pin in pins:
                self._mgr.unpin_prefix(*pin)
            if min(cached) == hit:
                break
            for g in range(self._g):
                self._mgr.free(self._inner(seq_id, g))
            hit = min(cached)
        if self._caching(tokens):
            for g in self._token_groups:
                self._mgr.commit(self._inner(seq_id, g), max(target, hit))
        self._num_tokens[seq_id] = num_tokens
        self._start[seq_id] = hit
        return HybridAllocation(hit, np.concatenate(copies).astype(np.int32, copy=False))

    def commit(self, seq_id: int, num_computed_tokens: int) -> int:
        """``BlockManager.commit`` for every group that holds tokens; returns pages indexed."""
        if self._single:
            return self._mgr.commit(seq_id, num_computed_tokens)
        seq_id = self._live(seq_id)
        num_computed_tokens = check.as_int("num_computed_tokens", num_computed_tokens, 0, self._num_tokens[seq_id])
        if self._mgr.is_swapped(self._inner(seq_id, 0)):
            self._mgr.commit(self._inner(seq_id, 0), num_computed_tokens)  # NOTE: raises SequenceSwapped
        return sum(self._mgr.commit(self._inner(seq_id, g), num_computed_tokens) for g in self._token_groups)

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        """Whether ``append(seq_id, num_tokens)`` would find its pages in every group now."""
        if self._single:
            return self._mgr.can_append(seq_id, num_tokens)
        return self._can_append(self._live(seq_id), num_tokens)

    def _can_append(self, seq_id: int, num_tokens: int) -> bool:
        num_tokens = check.count("num_tokens", num_tokens)
        ps = self.page_size
        need = 0
        for g in self._token_groups:
            inner = self._inner(seq_id, g)
            n = self._mgr.num_tokens(inner)
            table = self._mgr.page_table(inner)
            need += math.ceil((n + num_tokens) / ps) - len(table)
            last = table[-1] if table else -1
            if n % ps and last >= 0 and self._mgr.ref_count(last) > 1:
                need += 1  # copy-on-write of a shared last page
        return need <= self._mgr.num_free_pages

    def _batch(self, seq_ids: np.ndarray, num_tokens) -> tuple[np.ndarray, np.ndarray]:
        """Inner ids (group-major over the token groups) and their counts."""
        counts = check.counts("num_tokens", num_tokens, seq_ids.shape[0])
        g = self._g
        inner = np.concatenate([seq_ids * g + grp for grp in self._token_groups])
        return inner, np.tile(counts, len(self._token_groups))

    def append_batch(self, seq_ids, num_tokens=1, *, token_ids=None) -> HybridStepPlan:
        """One step for a batch: every group's slots for the new tokens, one copy plan.

        Then sliding and chunked groups release the pages no new token can see. ``token_ids``
        (with prefix caching) as ``BlockManager.append_batch``: the new tokens, batch order.
        """
        if self._single:
            plan = self._mgr.append_batch(seq_ids, num_tokens, token_ids=token_ids)
            return HybridStepPlan(plan.slot_mapping[None, :], plan.copies, 0)
        ids = check.seq_ids(seq_ids)
        for s in ids.tolist():
            self._live(s)
        inner, counts = self._batch(ids, num_tokens)
        if token_ids is not None:
            total = int(counts[: ids.shape[0]].sum())
            given = len(token_ids) if hasattr(token_ids, "__len__") else None
            if given is not None and given != total:  # NOTE: checked here so the counts are the caller's
                raise InvalidArgument("token_ids", f"{given} token ids", f"sum(num_tokens) = {total}")
            token_ids = np.tile(check.int_array("token_ids", token_ids, 0, check.MAX_TOKEN_ID), len(self._token_groups))
        starts = [self._num_tokens[s] for s in ids.tolist()]
        plan: StepPlan = self._mgr.append_batch(inner, counts, token_ids=token_ids)
        per = plan.slot_mapping.shape[0] // len(self._token_groups)
        slots = np.full((self._g, per), -1, dtype=np.int64)
        for row, g in enumerate(self._token_groups):
            slots[g] = plan.slot_mapping[row * per : (row + 1) * per]
        released = 0
        batch_counts = counts[: ids.shape[0]].tolist()
        for s, start, n in zip(ids.tolist(), starts, batch_counts):
            self._num_tokens[s] = start + n
            self._start[s] = start
            released += self._release(s, start)
        return HybridStepPlan(slots, plan.copies, released)

    def _release(self, seq_id: int, start: int) -> int:
        """Release, in the windowed groups, the pages no token from ``start`` on attends to."""
        released = 0
        end = self._num_tokens[seq_id]
        for g in self._windowed:
            keep = end - self.groups[g].first_needed(start)
            released += self._mgr.release_window(self._inner(seq_id, g), keep)
        return released

    def append(self, seq_id: int, num_tokens: int = 1, *, token_ids=None) -> HybridStepPlan:
        """``append_batch`` of one sequence."""
        return self.append_batch([seq_id], [num_tokens], token_ids=token_ids)

    def slots(self, seq_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Per group, the slots of positions ``[start, stop)``: int64 ``[num_groups, n]``.

        -1 where a group stores nothing for the position: one its window released, and every
        position of a state group.
        """
        if self._single:
            return self._mgr.slots(seq_id, start, stop)[None, :]
        seq_id = self._live(seq_id)
        n = self._num_tokens[seq_id]
        stop = n if stop is None else check.as_int("stop", stop, 0, n)
        start = check.as_int("start", start, 0, stop)
        out = np.full((self._g, stop - start), -1, dtype=np.int64)
        for g in self._token_groups:
            inner = self._inner(seq_id, g)
            first = min(max(start, self._mgr.page_table(inner).count(-1) * self.page_size), stop)
            out[g, first - start :] = self._mgr.slots(inner, first, stop)
        return out

    def fork(self, parent_id: int, child_id: int) -> np.ndarray:
        """``child_id`` shares the parent's token pages (copy-on-write) and gets its own copy of
        every state group's pages: returns those (src, dst) copies, int32 ``[K, 2]``."""
        if self._single:
            self._mgr.fork(parent_id, child_id)
            return _copy_plan([])
        parent_id = self._live(parent_id)
        child_id = self._id(child_id, "child_id")
        if child_id in self._num_tokens:
            raise SequenceExists(child_id)
        if self._mgr.is_swapped(self._inner(parent_id, 0)):
            self._mgr.fork(self._inner(parent_id, 0), self._inner(child_id, 0))  # NOTE: raises SequenceSwapped
        # NOTE: the children's state pages are allocations, so the watermark holds for them too
        need = sum(self.groups[g].state_pages for g in self._state_groups)
        usable = self._mgr.num_free_pages - self._mgr.watermark_pages
        if need and need > usable:
            raise OutOfPages(need, max(usable, 0), self._mgr.num_pages)
        pairs = []
        for g in self._state_groups:
            self._mgr.allocate(self._inner(child_id, g), self.groups[g].state_pages * self.page_size)
            pairs += zip(self._mgr.page_table(self._inner(parent_id, g)), self._mgr.page_table(self._inner(child_id, g)))
        for g in self._token_groups:
            self._mgr.fork(self._inner(parent_id, g), self._inner(child_id, g))
        self._num_tokens[child_id] = self._num_tokens[parent_id]
        self._start[child_id] = self._start[parent_id]
        return _copy_plan(pairs)

    def free(self, seq_id: int) -> None:
        """Drop ``seq_id`` from every group."""
        if self._single:
            self._mgr.free(seq_id)
            return
        seq_id = self._live(seq_id)
        for g in range(self._g):
            self._mgr.free(self._inner(seq_id, g))
        del self._num_tokens[seq_id]
        del self._start[seq_id]

    def _all(self, seq_ids) -> np.ndarray:
        ids = check.seq_ids(seq_ids)
        for s in ids.tolist():
            self._live(s)
        return np.concatenate([ids * self._g + g for g in range(self._g)]) if ids.shape[0] else ids

    def can_swap_out(self, seq_ids) -> bool:
        return self._mgr.can_swap_out(seq_ids if self._single else self._all(seq_ids))

    def can_swap_in(self, seq_ids) -> bool:
        return self._mgr.can_swap_in(seq_ids if self._single else self._all(seq_ids))

    def swap_out(self, seq_ids) -> SwapPlan:
        """Move every group's pages of these sequences to the CPU tier (one plan)."""
        return self._mgr.swap_out(seq_ids if self._single else self._all(seq_ids))

    def swap_in(self, seq_ids) -> SwapPlan:
        return self._mgr.swap_in(seq_ids if self._single else self._all(seq_ids))

    def end_step(self) -> None:
        self._mgr.end_step()

    def take_offload(self):
        """``BlockManager.take_offload`` of the one pool (every group's demotions and promotions)."""
        return self._mgr.take_offload()

    def take_events(self) -> list:
        """``BlockManager.take_events`` of the one pool. NOTE: with several groups, each group's
        blocks are hashed under its own salt, so a router sees one block per group per page of
        content (vLLM's events carry a group index instead)."""
        return self._mgr.take_events()

    # ------------------------------------------------------- persistent table
    def bind_table(self, page_table, seq_lens=None) -> None:
        """``BlockManager.bind_table`` for every group: row ``r`` of a caller's sequence in
        group ``g`` is row ``r * num_groups + g`` of ``page_table`` (so ``page_table[g::G]`` is
        group ``g``'s table); it needs ``num_groups`` rows per sequence row."""
        if self._single or page_table is None:
            self._mgr.bind_table(page_table, seq_lens)
            return
        rows = getattr(page_table, "shape", (0,))[0]
        if rows % self._g:
            raise InvalidArgument("page_table", f"{rows} rows", f"a multiple of num_groups ({self._g})")
        self._mgr.bind_table(page_table, seq_lens)

    def set_row(self, seq_id: int, row: int | None) -> None:
        """Bind ``seq_id`` to row ``row`` (its groups to rows ``row * num_groups + g``), or
        unbind it (``None``)."""
        if self._single:
            self._mgr.set_row(seq_id, row)
            return
        seq_id = self._live(seq_id)
        if row is not None:
            row = check.as_int("row", row, 0, check.MAX_COUNT)
        for g in range(self._g):
            self._mgr.set_row(self._inner(seq_id, g), None if row is None else row * self._g + g)

    # ------------------------------------------------------------ batch views
    def page_tables(self, seq_ids, group: int = 0, max_pages: int | None = None):
        """``BlockManager.page_tables`` of one group."""
        if self._single:
            self._group(group)
            return self._mgr.page_tables(seq_ids, max_pages)
        g = self._group(group)
        ids = check.seq_ids(seq_ids)
        for s in ids.tolist():
            self._live(s)
        return self._mgr.page_tables(ids * self._g + g, max_pages)

    def window_tables(self, seq_ids, group: int = 0, max_pages: int | None = None):
        """``BlockManager.window_tables`` of one group: a windowed group's live pages only."""
        if self._single:
            self._group(group)
            return self._mgr.window_tables(seq_ids, max_pages)
        g = self._group(group)
        ids = check.seq_ids(seq_ids)
        for s in ids.tolist():
            self._live(s)
        return self._mgr.window_tables(ids * self._g + g, max_pages)

    def group_pages(self) -> list[int]:
        """Pages each group's sequences hold now (a page shared by forks counts once per
        group); the per-group memory of ``pagedkv frag --model``."""
        out = [set() for _ in range(self._g)]
        for s in self._num_tokens:
            for g in range(self._g):
                out[g].update(p for p in self._mgr.page_table(self._inner(s, g)) if p >= 0)
        if self._single:
            return [self._mgr.num_pages - self._mgr.num_free_pages]
        return [len(pages) for pages in out]

    # ------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """The inner manager's invariants, and per sequence: every group lives, the token
        groups hold the same tokens, a state group its pages, a windowed group no live page
        wholly before what its newest token can see."""
        from .errors import InvariantViolation

        self._mgr.check_invariants()
        if self._single:
            return
        if self._mgr.num_sequences != self._g * len(self._num_tokens):
            raise InvariantViolation("groups", f"{self._mgr.num_sequences} inner sequences for "
                                     f"{len(self._num_tokens)} sequences of {self._g} groups")
        ps = self.page_size
        for s, n in self._num_tokens.items():
            for g, grp in enumerate(self.groups):
                inner = self._inner(s, g)
                if inner not in self._mgr:
                    raise InvariantViolation("groups", f"sequence {s} has no group {g}")
                held = self._mgr.num_tokens(inner)
                want = grp.state_pages * ps if grp.kind == "state" else n
                if held != want:
                    raise InvariantViolation("groups", f"sequence {s} group {g} holds {held} tokens, not {want}")
                if grp.kind in ("sliding", "chunked") and not self._mgr.is_swapped(inner):
                    table = self._mgr.page_table(inner)
                    live = [i for i, p in enumerate(table) if p >= 0]
                    if live and (live[0] + 1) * ps <= self.groups[g].first_needed(self._start[s]):
                        raise InvariantViolation("groups", f"sequence {s} group {g} keeps page {live[0]} "
                                                 f"wholly before position {self.groups[g].first_needed(self._start[s])}")

    def snapshot(self) -> dict:
        """The inner manager's snapshot plus the per-sequence token counts."""
        snap = self._mgr.snapshot()
        if not self._single:
            snap = dict(snap, hybrid_num_tokens=dict(sorted(self._num_tokens.items())))
        return snap

    def __repr__(self) -> str:
        kinds = ",".join(g.kind for g in self.groups)
        return (f"HybridBlockManager(groups=[{kinds}], num_pages={self.num_pages}, page_size={self.page_size}, "
                f"free={self.num_free_pages}, sequences={self.num_sequences}, backend={self.backend!r})")


class _CallerIds:
    """The inner ``BlockManager`` of a multi-group manager, whose sequence errors name the
    caller's sequence (inner id ``seq * G + g`` -> ``seq``) rather than the inner one."""

    __slots__ = ("_mgr", "_g", "_calls")

    def __init__(self, mgr: BlockManager, g: int):
        self._mgr = mgr
        self._g = g
        self._calls: dict = {}  # NOTE: each method wrapped once, not on every call

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._mgr

    def __getattr__(self, name: str):
        call = self._calls.get(name)
        if call is not None:
            return call
        value = getattr(self._mgr, name)
        if not callable(value):
            return value
        g = self._g

        def call(*args, **kwargs):
            try:
                return value(*args, **kwargs)
            except DuplicateSequence as error:
                raise DuplicateSequence(error.name, error.value // g) from None
            except (UnknownSequence, SequenceExists) as error:
                raise type(error)(error.seq_id // g) from None
            except SequenceSwapped as error:
                raise SequenceSwapped(error.seq_id // g, error.on_cpu) from None
            except SequenceTooLong as error:
                raise SequenceTooLong(error.seq_id // g, error.num_tokens) from None

        self._calls[name] = call
        return call
