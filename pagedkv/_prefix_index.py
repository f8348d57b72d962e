"""The prefix index of the reference block manager: cached pages found by their content prefix.

A *node* stands for one content prefix: the token ids of one full page, the salt, and the node
of the prefix before it (``ROOT`` for a first page). Its key in the hash index is the chained
page hash of that content; a lookup confirms a node by comparing its tokens, salt and parent
node, and node ids are unique among live nodes, so a hash collision is a miss, never a wrong hit.

Pages attach to nodes: every physical page whose KV holds a node's content is on that node's
page list, so duplicates (two prefills of one prompt computed at once, the private copy of a
whole-prompt hit, a swapped-in page) are all findable. A page stays findable until it is evicted
(``detach``), whatever happens to the pages before it: its node does not depend on any page.

With the CPU tier of the prefix cache, a node also has at most one *CPU page*: a page of the CPU
pool holding its content (demoted there when its last GPU page was evicted). A CPU copy counts
as a page for the node's life, and a node with a CPU page but no GPU page is found by a lookup
and promoted back (``ReferenceBlockManager``).

A node lives while it has pages or *dependents*: its child nodes and the sequences whose
last indexed page it is (``acquire``/``release``). A node without either is deleted, and its
parent may follow. A node with dependents but no pages is a *ghost*: it keeps the chain's
identity, so when an evicted prefix is computed again its new pages join the same nodes and the
pages cached after it are found again.

With ``events`` on, the index records what a KV-event consumer needs, in order (``take_events``):
``(STORED, medium, node, parent, hash, parent hash, tokens)`` when a node's content becomes
matchable in a tier (its first GPU page, or its CPU page), ``(REMOVED, medium, node, hash)`` when
it stops being so, and ``(CLEARED,)`` for ``clear_pages`` (which records no REMOVED of its own).
With ``nodes`` too (for hashes computed outside the index), ``(NODE, node, parent, salt, hash,
tokens)`` when a node is made and ``(DROP, node)`` when it is deleted.

``csrc/prefix_index.cpp`` is the C++ twin, with the same node ids (a free stack: the last id
freed is reused first), list orders and results. Must not import torch, triton or hypothesis.
"""

from __future__ import annotations

#: Parent of a first page's node.
ROOT = -1
#: No page / no node.
NONE = -1
#: Event record kinds (``PrefixIndex.events``) and media; the C++ core uses the same codes.
NODE, DROP, STORED, REMOVED, CLEARED = range(5)
GPU, CPU = 0, 1


class PrefixIndex:
    """Nodes, their hash chains and their page lists (see the module docstring)."""

    def __init__(self, num_pages: int, num_cpu_pages: int = 0, events: bool = False, nodes: bool = False):
        # per node (index = node id); a freed id is pushed on _free_nodes
        self._hash: list[int] = []
        self._salt: list[int] = []
        self._parent: list[int] = []
        self._tokens: list[tuple | None] = []
        self._deps: list[int] = []
        self._first_page: list[int] = []
        self._cpu_page: list[int] = []
        self._next_same_hash: list[int] = []
        self._free_nodes: list[int] = []
        # hash -> first node of its chain (nodes with equal hashes, newest first)
        self._chains: dict[int, int] = {}
        # per page: its node and its neighbours on the node's page list (newest first)
        self._page_node = [NONE] * num_pages
        self._page_next = [NONE] * num_pages
        self._page_prev = [NONE] * num_pages
        self.num_cached_pages = 0
        # per CPU page: the node whose content it holds
        self._cpu_node = [NONE] * num_cpu_pages
        self.num_cpu_cached_pages = 0
        self.events: list[tuple] | None = [] if events else None
        self._record_nodes = events and nodes
        self._quiet = False  # clear_pages: no REMOVED records

    # ---------------------------------------------------------------- lookups
    def find(self, h: int, parent: int, salt: int, block: tuple) -> int:
        """The node of ``block`` after ``parent`` under ``salt`` (its hash is ``h``), or NONE."""
        node = self._chains.get(h, NONE)
        while node != NONE:
            if self._parent[node] == parent and self._salt[node] == salt and self._tokens[node] == block:
                return node
            node = self._next_same_hash[node]
        return NONE

    def pick_page(self, node: int, ref_count: list[int], copy_dsts=(), fresh=None, min_offset: int = 0) -> int:
        """A page holding ``node``'s content, in this order of preference: referenced (taking it
        costs no free page) and not in ``copy_dsts`` (for a copy source: the destinations of
        this step's copies, which a copy from would have to wait for), then any page not in
        ``copy_dsts``, then the first page; NONE for a ghost. With ``fresh`` (page -> first
        offset written in this step), only pages not in it or with that offset at least
        ``min_offset`` are considered (NONE if there is none)."""
        first = fallback = NONE
        page = self._first_page[node]
        while page != NONE:
            if fresh is None or fresh.get(page, min_offset) >= min_offset:
                if first == NONE:
                    first = page
                if page not in copy_dsts:
                    if ref_count[page]:
                        return page
                    if fallback == NONE:
                        fallback = page
            page = self._page_next[page]
        return first if fallback == NONE else fallback

    def node_of(self, page: int) -> int:
        return self._page_node[page]

    def is_cached(self, page: int) -> bool:
        return self._page_node[page] != NONE

    def cpu_page_of(self, node: int) -> int:
        """The CPU page holding ``node``'s content, or NONE."""
        return self._cpu_page[node]

    def is_cpu_cached(self, cpu: int) -> bool:
        return self._cpu_node[cpu] != NONE

    def hash_of(self, node: int) -> int:
        """The chained hash a child of ``node`` starts from (0 for ROOT)."""
        return 0 if node == ROOT else self._hash[node]

    def parent_of(self, node: int) -> int:
        return self._parent[node]

    # ------------------------------------------------------------- mutations
    def child(self, h: int, parent: int, salt: int, block: tuple) -> int:
        """``find``, or a new node for that content (the parent gains a dependent)."""
        node = self.find(h, parent, salt, block)
        if node != NONE:
            return node
        if self._free_nodes:
            node = self._free_nodes.pop()
            self._hash[node], self._salt[node], self._parent[node] = h, salt, parent
            self._tokens[node], self._deps[node], self._first_page[node] = block, 0, NONE
            self._cpu_page[node] = NONE
        else:
            node = len(self._hash)
            for column, value in ((self._hash, h), (self._salt, salt), (self._parent, parent),
                                  (self._tokens, block), (self._deps, 0), (self._first_page, NONE),
                                  (self._cpu_page, NONE), (self._next_same_hash, NONE)):
                column.append(value)
        self._next_same_hash[node] = self._chains.get(h, NONE)
        self._chains[h] = node
        if parent != ROOT:
            self._deps[parent] += 1
        if self._record_nodes:
            self.events.append((NODE, node, parent, salt, h, block))
        return node

    def attach(self, page: int, node: int) -> None:
        """Put an uncached ``page`` on ``node``'s page list (at its head)."""
        head = self._first_page[node]
        self._page_node[page] = node
        self._page_prev[page] = NONE
        self._page_next[page] = head
        if head != NONE:
            self._page_prev[head] = page
        elif self.events is not None:
            self._stored(GPU, node)
        self._first_page[node] = page
        self.num_cached_pages += 1

    def detach(self, page: int) -> None:
        """``page`` no longer holds its node's content (evicted or reset)."""
        node = self._page_node[page]
        prev, nxt = self._page_prev[page], self._page_next[page]
        if prev == NONE:
            self._first_page[node] = nxt
        else:
            self._page_next[prev] = nxt
        if nxt != NONE:
            self._page_prev[nxt] = prev
        self._page_node[page] = self._page_next[page] = self._page_prev[page] = NONE
        self.num_cached_pages -= 1
        if self.events is not None and self._first_page[node] == NONE and not self._quiet:
            self.events.append((REMOVED, GPU, node, self._hash[node]))
        self._collect(node)

    def attach_cpu(self, cpu: int, node: int) -> None:
        """``cpu`` (an uncached CPU page) now holds the content of ``node``, which has none."""
        self._cpu_node[cpu] = node
        self._cpu_page[node] = cpu
        self.num_cpu_cached_pages += 1
        if self.events is not None:
            self._stored(CPU, node)

    def detach_cpu(self, cpu: int) -> None:
        """``cpu`` no longer holds its node's content (evicted from the CPU tier or reset)."""
        node = self._cpu_node[cpu]
        self._cpu_node[cpu] = NONE
        self._cpu_page[node] = NONE
        self.num_cpu_cached_pages -= 1
        if self.events is not None and not self._quiet:
            self.events.append((REMOVED, CPU, node, self._hash[node]))
        self._collect(node)

    def _stored(self, medium: int, node: int) -> None:
        parent = self._parent[node]
        self.events.append((STORED, medium, node, parent, self._hash[node], self.hash_of(parent), self._tokens[node]))

    def acquire(self, node: int) -> None:
        """A sequence chains its next pages after ``node`` (ROOT: nothing to hold)."""
        if node != ROOT:
            self._deps[node] += 1

    def release(self, node: int) -> None:
        """The counterpart of ``acquire``."""
        if node != ROOT:
            self._deps[node] -= 1
            self._collect(node)

    def clear_pages(self) -> None:
        """Detach every page (``reset_prefix_cache``), GPU then CPU pages, in page order; ghosts
        with dependents stay."""
        self._quiet = True
        for page, node in enumerate(self._page_node):
            if node != NONE:
                self.detach(page)
        for cpu, node in enumerate(self._cpu_node):
            if node != NONE:
                self.detach_cpu(cpu)
        self._quiet = False
        if self.events is not None:
            self.events.append((CLEARED,))

    def _collect(self, node: int) -> None:
        """Delete ``node`` and then its ancestors while they have neither pages nor dependents."""
        while node != ROOT and self._deps[node] == 0 and self._first_page[node] == NONE and self._cpu_page[node] == NONE:
            h, parent = self._hash[node], self._parent[node]
            if self._chains[h] == node:
                nxt = self._next_same_hash[node]
                if nxt == NONE:
                    del self._chains[h]
                else:
                    self._chains[h] = nxt
            else:
                prev = self._chains[h]
                while self._next_same_hash[prev] != node:
                    prev = self._next_same_hash[prev]
                self._next_same_hash[prev] = self._next_same_hash[node]
            self._tokens[node] = None
            self._parent[node] = ROOT
            self._next_same_hash[node] = NONE
            self._free_nodes.append(node)
            if self._record_nodes:
                self.events.append((DROP, node))
            if parent != ROOT:
                self._deps[parent] -= 1
            node = parent

    # ----------------------------------------------------------- inspection
    def live_nodes(self) -> list[int]:
        free = set(self._free_nodes)
        return [n for n in range(len(self._hash)) if n not in free]

    def pages_of(self, node: int) -> list[int]:
        pages, page = [], self._first_page[node]
        while page != NONE:
            pages.append(page)
            page = self._page_next[page]
        return pages

    def snapshot(self) -> tuple[dict, dict]:
        """(page -> (node, hash) for every cached page, node -> (hash, parent, dependents,
        pages in list order, CPU page) for every live node), both sorted."""
        pages = {p: (n, self._hash[n]) for p, n in enumerate(self._page_node) if n != NONE}
        nodes = {n: (self._hash[n], self._parent[n], self._deps[n], tuple(self.pages_of(n)), self._cpu_page[n])
                 for n in self.live_nodes()}
        return pages, nodes

    def check(self, sequence_refs: dict[int, int]) -> tuple[str, tuple] | None:
        """The first broken invariant as (key of ``INVARIANT_DETAILS``, fields), or None.

        ``sequence_refs``: node -> number of sequences that ``acquire``-d it.
        """
        live = self.live_nodes()
        children: dict[int, int] = {}
        for node in live:
            if self._parent[node] != ROOT:
                children[self._parent[node]] = children.get(self._parent[node], 0) + 1
        on_list = 0
        for node in live:
            chain = self._chains.get(self._hash[node], NONE)
            while chain != NONE and chain != node:
                chain = self._next_same_hash[chain]
            if chain != node:
                return "hash_index", (self._hash[node], node)
            want = children.get(node, 0) + sequence_refs.get(node, 0)
            if self._deps[node] != want:
                return "node_dependents", (node, self._deps[node], want)
            cpu = self._cpu_page[node]
            if want == 0 and self._first_page[node] == NONE and cpu == NONE:
                return "node_dependents", (node, 0, 0)
            if cpu != NONE and (not 0 <= cpu < len(self._cpu_node) or self._cpu_node[cpu] != node):
                return "cpu_cache", (node, cpu, NONE if not 0 <= cpu < len(self._cpu_node) else self._cpu_node[cpu])
            for page in self.pages_of(node):
                if self._page_node[page] != node:
                    return "node_pages", (page, self._page_node[page], node)
                on_list += 1
        cached = sum(1 for n in self._page_node if n != NONE)
        if not on_list == cached == self.num_cached_pages:
            return "hash_index_size", (cached, on_list)
        live_set = set(live)
        cpu_cached = 0
        for cpu, node in enumerate(self._cpu_node):
            if node != NONE:
                if node not in live_set or self._cpu_page[node] != cpu:
                    return "cpu_cache", (node, cpu, node)
                cpu_cached += 1
        if cpu_cached != self.num_cpu_cached_pages:
            return "hash_index_size", (cpu_cached, self.num_cpu_cached_pages)
        return None
