"""The slow oracle of the prefix cache: the hits an ideal cache gives on the same pages.

``IdealPrefixCache(mgr)`` drives a ``BlockManager`` (any backend) through the same calls and
keeps its own, independent model of what an ideal prefix cache holds: *every* committed full
page, keyed by its exact content prefix (the salt and every token id up to the page's end, no
hashes), until the manager hands that physical page out again. The manager's own page ids and
evictions are the capacity and the eviction order, so the two see the same memory; what the
oracle adds is the rule "a page is findable while its content is in memory, whatever happened to
the pages before it". ``allocate`` returns the ``Allocation`` together with the number of tokens
the ideal cache would have found, so a test can assert they are equal, and a benchmark can report
the real hit rate next to the ideal one.

A page stops holding content when the manager takes it from its free queues for new use: the
pages of a new prompt after its hits, the pages an append adds, a copy-on-write destination,
the pages a swap-in brings back. The oracle reads those from the page tables before and after
each call. ``reset_prefix_cache`` forgets the pages that hold content at that moment: they stay
unfindable until they are handed out again, a sequence sharing one offers it for the first
time (it commits that page later), or a swap-in brings its sequence back (a swap-in offers all
of a sequence's committed pages); pages committed later are findable as ever.

One more rule makes a hit ideal but safe: a whole-prompt hit copies its last page, and the copy
runs before the step's forward pass, so it may only read a page whose KV was written before this
step but for its last slot. The oracle tracks, per page, the first offset committed in the
current step (until ``end_step`` or ``append_batch``); when every page holding a whole prompt's
last content was filled in this step by more than its last slot, the ideal hit stops a page
earlier. Pure Python; must not import torch, triton or hypothesis.
"""

from __future__ import annotations

from typing import NamedTuple

from ._reference import NULL_PAGE


class IdealAllocation(NamedTuple):
    """``allocate``'s result and the tokens an ideal cache would have found cached."""

    allocation: object
    ideal_cached_tokens: int


class IdealPrefixCache:
    """A ``BlockManager`` wrapper that knows the ideal prefix-cache hit of every allocation.

    Args:
        mgr: a ``BlockManager`` with prefix caching on.

    Attributes:
        ideal_hit_tokens / hit_tokens / query_tokens: totals over the allocations with token ids.
    """

    def __init__(self, mgr):
        self.mgr = mgr
        self.page_size = mgr.page_size
        self._content: dict[int, int] = {}  # page -> content id of the prefix it holds
        self._holders: dict[int, int] = {}  # content id -> number of pages holding it
        self._ids: dict[tuple, int] = {}  # (parent content id, salt, block) -> content id
        self._tokens: dict[int, list[int]] = {}  # seq -> its known token ids (a prefix)
        self._known: dict[int, bool] = {}  # seq -> whether its later token ids are still known
        self._salt: dict[int, object] = {}
        self._committed: dict[int, int] = {}
        self._offered: dict[int, int] = {}  # seq -> its full pages offered to the cache so far
        self._forgotten: set[int] = set()  # pages whose content reset_prefix_cache forgot
        self._fresh: dict[int, int] = {}  # page -> first offset whose KV lands in this step
        self.ideal_hit_tokens = self.hit_tokens = self.query_tokens = 0

    # ---------------------------------------------------------------- the model
    def _content_ids(self, tokens: list[int], salt, num_pages: int, create: bool) -> list[int]:
        ps, ids, parent = self.page_size, [], -1
        for i in range(num_pages):
            key = (parent, salt, tuple(tokens[i * ps:(i + 1) * ps]))
            cid = self._ids.get(key)
            if cid is None:
                if not create:
                    break
                cid = self._ids[key] = len(self._ids)
            ids.append(cid)
            parent = cid
        return ids

    def ideal_hit(self, token_ids, cache_salt=None) -> int:
        """Tokens of ``token_ids`` an ideal cache holds now (at most ``len - 1``)."""
        tokens = [int(t) for t in token_ids]
        ps, found, last = self.page_size, 0, None
        for cid in self._content_ids(tokens, cache_salt, len(tokens) // ps, create=False):
            if not self._holders.get(cid):
                break
            found, last = found + 1, cid
        if found and found * ps >= len(tokens):
            # the last page is copied: some page holding it must be written but for its last slot
            if not any(c == last and self._fresh.get(p, ps) >= ps - 1 for p, c in self._content.items()):
                found -= 1
        return min(found * ps, len(tokens) - 1)

    def _drop(self, page: int) -> None:
        self._forgotten.discard(page)  # handed out again: new content from here on
        cid = self._content.pop(page, None)
        if cid is not None:
            self._holders[cid] -= 1

    def _hold(self, page: int, cid: int, offered_now: bool = False, offset: int | None = None) -> None:
        """``page`` holds content ``cid``; ``offset``: its first slot written in this step."""
        if offered_now:
            self._forgotten.discard(page)  # a sequence offers it for the first time
        if self._content.get(page) == cid or page in self._forgotten:
            return
        self._drop(page)
        self._content[page] = cid
        self._holders[cid] = self._holders.get(cid, 0) + 1
        if offset is not None and offset < self.page_size:
            self._fresh[page] = min(self._fresh.get(page, offset), offset)

    def _taken(self, before: list[int] | None, after: list[int], kept: int = 0) -> None:
        """Pages of ``after`` that the call took from the free queues (beyond the first ``kept``)."""
        for i, page in enumerate(after):
            if page == NULL_PAGE or i < kept:
                continue
            if before is None or i >= len(before) or before[i] != page:
                self._drop(page)

    def _commit_pages(self, seq_id: int, written_from: int | None = None) -> None:
        """Every committed full page with known tokens holds its content (positions from
        ``written_from`` on are written in this step; None: all before it)."""
        if seq_id not in self._tokens or self.mgr.is_swapped(seq_id):
            return
        tokens = self._tokens[seq_id]
        upto = min(self._committed[seq_id], len(tokens))
        table = self.mgr.page_table(seq_id)
        offered = self._offered[seq_id]
        ps = self.page_size
        for i, cid in enumerate(self._content_ids(tokens, self._salt[seq_id], upto // ps, create=True)):
            if table[i] != NULL_PAGE:
                offset = None if written_from is None else max(written_from - i * ps, 0)
                self._hold(table[i], cid, offered_now=i >= offered, offset=offset)
        self._offered[seq_id] = max(offered, upto // self.page_size)

    def _grow_tokens(self, seq_id: int, token_ids, num_tokens: int) -> None:
        if seq_id not in self._tokens:
            return
        if token_ids is None or not self._known[seq_id]:
            self._known[seq_id] = False
        else:
            self._tokens[seq_id].extend(int(t) for t in token_ids)
        self._committed[seq_id] = self.mgr.num_tokens(seq_id)

    def _forget(self, seq_id: int) -> None:
        for per_seq in (self._tokens, self._known, self._salt, self._committed, self._offered):
            per_seq.pop(seq_id, None)

    # ------------------------------------------------------- the manager's calls
    def allocate(self, seq_id: int, num_tokens: int | None = None, *, token_ids=None, cache_salt=None,
                 num_computed_tokens: int | None = None, priority: int | None = None) -> IdealAllocation:
        ideal = None if token_ids is None else self.ideal_hit(token_ids, cache_salt)
        alloc = self.mgr.allocate(seq_id, num_tokens, token_ids=token_ids, cache_salt=cache_salt,
                                  num_computed_tokens=num_computed_tokens, priority=priority)
        table = self.mgr.page_table(seq_id)
        shared = len(table) if token_ids is None else alloc.num_cached_tokens // self.page_size
        self._taken(None, table, kept=0 if token_ids is None else shared)
        if token_ids is not None:
            tokens = [int(t) for t in token_ids]
            n = len(tokens)
            self._tokens[seq_id], self._known[seq_id], self._salt[seq_id] = tokens, True, cache_salt
            self._committed[seq_id] = max(n if num_computed_tokens is None else num_computed_tokens,
                                          alloc.num_cached_tokens)
            self._offered[seq_id] = 0
            self._commit_pages(seq_id, alloc.num_cached_tokens)
            self.query_tokens += n
            self.hit_tokens += alloc.num_cached_tokens
            self.ideal_hit_tokens += ideal
        return IdealAllocation(alloc, ideal)

    def commit(self, seq_id: int, num_computed_tokens: int) -> int:
        out = self.mgr.commit(seq_id, num_computed_tokens)
        if seq_id in self._committed:
            written_from = self._committed[seq_id]
            self._committed[seq_id] = max(self._committed[seq_id], num_computed_tokens)
            self._commit_pages(seq_id, written_from)
        return out

    def append(self, seq_id: int, num_tokens: int | None = None, *, token_ids=None):
        before = self.mgr.page_table(seq_id)
        out = self.mgr.append(seq_id, num_tokens, token_ids=token_ids)
        self._taken(before, self.mgr.page_table(seq_id))
        written_from = self._committed.get(seq_id)
        self._grow_tokens(seq_id, token_ids, num_tokens)
        self._commit_pages(seq_id, written_from)
        return out

    def append_batch(self, seq_ids, num_tokens=1, *, token_ids=None):
        ids = [int(s) for s in seq_ids]
        counts = [int(num_tokens)] * len(ids) if isinstance(num_tokens, int) else [int(n) for n in num_tokens]
        before = {s: self.mgr.page_table(s) for s in ids}
        out = self.mgr.append_batch(ids, counts, token_ids=token_ids)
        self._fresh.clear()  # NOTE: a new step (append_batch ends the last one first)
        written_from = {s: self._committed.get(s) for s in ids}
        at = 0
        for s, n in zip(ids, counts):
            self._taken(before[s], self.mgr.page_table(s))
            self._grow_tokens(s, None if token_ids is None else list(token_ids)[at:at + n], n)
            at += n
        for s in ids:
            self._commit_pages(s, written_from[s])
        return out

    def end_step(self) -> None:
        self.mgr.end_step()
        self._fresh.clear()

    def fork(self, parent_id: int, child_id: int) -> None:
        self.mgr.fork(parent_id, child_id)
        if parent_id in self._tokens:
            self._tokens[child_id] = list(self._tokens[parent_id])
            self._known[child_id] = self._known[parent_id]
            self._salt[child_id] = self._salt[parent_id]
            self._committed[child_id] = self._committed[parent_id]
            self._offered[child_id] = self._offered[parent_id]

    def free(self, seq_id: int) -> None:
        self.mgr.free(seq_id)
        self._forget(seq_id)

    def release_window(self, seq_id: int, window: int) -> int:
        return self.mgr.release_window(seq_id, window)

    def swap_out(self, seq_ids):
        return self.mgr.swap_out(seq_ids)

    def swap_in(self, seq_ids):
        plan = self.mgr.swap_in(seq_ids)
        for gpu_page in plan.copies[:, 1].tolist():
            self._drop(gpu_page)
        for s in seq_ids:
            # NOTE: a swap-in offers the sequence's committed pages again, even pages it takes
            # back without a copy and pages a reset forgot.
            self._forgotten.difference_update(self.mgr.page_table(int(s)))
            self._commit_pages(int(s))
        return plan

    def reset_prefix_cache(self) -> None:
        self.mgr.reset_prefix_cache()
        # NOTE: the pages holding content now are forgotten for good (a sequence that keeps one
        # does not offer it again); pages committed from now on are findable as ever.
        self._forgotten.update(self._content)
        self._content.clear()
        self._holders.clear()
