"""Typed errors of pagedkv: the only place where error messages are written.

Every exception stores its fields and builds its message in ``__str__`` so it pickles and so
both backends (the C++ core and the Python reference) produce the same text: the C++ core
returns failures as values and the Python facade raises these classes.

Must not import anything from pagedkv (it is the bottom of the dependency graph).
"""

from __future__ import annotations


class PagedKVError(Exception):
    """Base class of every error pagedkv raises on purpose."""

    def __reduce__(self):
        return (self.__class__, self._args())

    def _args(self) -> tuple:
        return self.args


class OutOfPages(PagedKVError, MemoryError):
    """Not enough free pages for the request.

    Fields: ``requested`` pages asked for, ``free`` pages available to this request (after the
    watermark, when one applies), ``total`` pages in the pool, and the ``pool`` name.
    """

    def __init__(self, requested: int, free: int, total: int, pool: str = "gpu"):
        super().__init__(requested, free, total, pool)
        self.requested = requested
        self.free = free
        self.total = total
        self.pool = pool

    def __str__(self) -> str:
        return (
            f"requested {self.requested} {self.pool} pages but only {self.free} of "
            f"{self.total} are free; free or preempt a sequence, or give the manager more pages"
        )


class NoContiguousSpace(OutOfPages):
    """A contiguous allocator found no hole large enough, however many slots are free in total.

    Fields: ``requested`` contiguous slots, ``free`` slots in the largest usable hole (the room
    this request could get), ``total`` slots in the pool, and ``num_free_slots`` free in all.
    """

    def __init__(self, requested: int, free: int, total: int, num_free_slots: int):
        PagedKVError.__init__(self, requested, free, total, num_free_slots)
        self.requested = requested
        self.free = free
        self.total = total
        self.pool = "slot"
        self.num_free_slots = num_free_slots

    def __str__(self) -> str:
        return (
            f"requested {self.requested} contiguous slots but the largest usable hole holds "
            f"{self.free} ({self.num_free_slots} of {self.total} slots are free, split into holes); "
            "free a sequence or reserve less"
        )


class UnknownSequence(PagedKVError, KeyError):
    """The sequence id is not live in this manager."""

    def __init__(self, seq_id: int):
        super().__init__(seq_id)
        self.seq_id = seq_id

    def __str__(self) -> str:
        return f"unknown sequence {self.seq_id!r}: it was never allocated or was already freed"


class SequenceExists(PagedKVError, ValueError):
    """A sequence with this id is already live."""

    def __init__(self, seq_id: int):
        super().__init__(seq_id)
        self.seq_id = seq_id

    def __str__(self) -> str:
        return f"sequence {self.seq_id!r} already exists; free it first or pick another id"


class SequenceSwapped(PagedKVError, ValueError):
    """The sequence is in the wrong tier for the call (``on_cpu`` says where it is)."""

    def __init__(self, seq_id: int, on_cpu: bool):
        super().__init__(seq_id, on_cpu)
        self.seq_id = seq_id
        self.on_cpu = on_cpu

    def __str__(self) -> str:
        if self.on_cpu:
            return f"sequence {self.seq_id!r} is swapped out to CPU pages; swap_in([{self.seq_id!r}]) before using it"
        return f"sequence {self.seq_id!r} is on the GPU, not swapped out; only swapped-out sequences can be swapped in"


class SequenceTooLong(PagedKVError, OverflowError):
    """A sequence holds more tokens than an int32 ``seq_lens`` entry can say (``page_tables``)."""

    def __init__(self, seq_id: int, num_tokens: int):
        super().__init__(seq_id, num_tokens)
        self.seq_id = seq_id
        self.num_tokens = num_tokens

    def __str__(self) -> str:
        return (f"sequence {self.seq_id!r} holds {self.num_tokens} tokens, more than the 2147483647 an int32 "
                "seq_lens entry (the kernels' metadata) holds; split it or use slots() and csr()")


class _ArgumentError(PagedKVError):
    """Fields shared by the bad-argument errors: ``name``, ``value`` and ``expected``."""

    def __init__(self, name: str, value: object, expected: str):
        super().__init__(name, value, expected)
        self.name = name
        self.value = value
        self.expected = expected


class InvalidArgument(_ArgumentError, ValueError):
    """An argument has a bad value. Names the argument, the value and what was expected."""

    def __str__(self) -> str:
        return f"{self.name} must be {self.expected}, got {self.value!r}"


class InvalidType(_ArgumentError, TypeError):
    """An argument has the wrong type. Names the argument, the type found and the one expected."""

    def __str__(self) -> str:
        return f"{self.name} must be {self.expected}, got {type(self.value).__name__} {self.value!r}"


class DuplicateSequence(InvalidArgument):
    """A batch call named the same sequence twice."""

    def __init__(self, name: str, seq_id: int):
        PagedKVError.__init__(self, name, seq_id)
        self.name = name
        self.value = seq_id
        self.expected = "a list of distinct sequence ids"

    def _args(self) -> tuple:
        return (self.name, self.value)

    def __str__(self) -> str:
        return f"{self.name} names sequence {self.value!r} more than once; each id may appear once per call"


class InvalidTrace(PagedKVError, ValueError):
    """A file that should be a trace is not one: ``path``, the 1-based ``line`` (0: the whole
    file) and what is wrong with it (``reason``)."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(path, line, reason)
        self.path = path
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        where = f"{self.path} line {self.line}" if self.line else str(self.path)
        return f"{where}: {self.reason}"


class MissingDependency(PagedKVError, ModuleNotFoundError):
    """An optional dependency is not installed; names the extra that brings it."""

    def __init__(self, module: str, feature: str, extra: str):
        super().__init__(module, feature, extra)
        self.module = module
        self.feature = feature
        self.extra = extra
        self.name = module  # ModuleNotFoundError's own field

    def __str__(self) -> str:
        return (f"{self.feature} needs {self.module}, which is not installed; "
                f"install it with: pip install 'pagedkv[{self.extra}]'")


#: The detail of each broken invariant ``check_invariants`` reports, by key: (invariant name,
#: format of the detail filled with the fields in order). Both backends build their
#: InvariantViolation through ``InvariantViolation.of``, so each text is written once.
INVARIANT_DETAILS: dict[str, tuple[str, str]] = {
    "pages_cover_tokens": ("pages_cover_tokens", "sequence {0} holds {1} tokens in {2} pages of {3}"),
    "page_in_range": ("page_in_range", "sequence {0} holds page {1} of {2}"),
    "ref_count": ("ref_count", "page {0} has ref_count {1} but {2} page-table entries"),
    "cpu_ref_count": ("cpu_ref_count", "page {0} has cpu_ref_count {1} but {2} page-table entries"),
    "free_list_unique": ("free_list_unique", "page {0} is on a free queue twice or out of range"),
    "free_page_unreferenced": ("free_page_unreferenced", "free page {0} has ref_count {1}"),
    "free_queue_cached": ("free_queue_cached", "page {0} on the {1} queue has hash {2}"),
    "conservation": ("conservation", "{0} free (or pinned) + {1} referenced pages != {2} total"),
    "pinned_page": ("pinned_page", "page {0}, pinned for a copy of this step, is on the {1} queue"),
    "cpu_conservation": ("cpu_conservation", "{0} free (or pinned) + {1} referenced cpu pages != {2}"),
    "hash_index": ("hash_index", "node {1} (hash {0:#x}) is not on the index's chain for its hash"),
    "hash_index_size": ("hash_index", "{0} pages are cached but the nodes' page lists hold {1}"),
    "node_pages": ("hash_index", "page {0} is on the page list of node {2} but is cached under node {1}"),
    "cpu_cache": ("hash_index", "node {0} and cpu page {1} do not point to each other (the page holds node {2})"),
    "cpu_lru": ("cpu_conservation", "cpu page {0} on the cpu prefix-cache queue is {1}"),
    "node_dependents": ("node_dependents", "node {0} counts {1} dependents but {2} child nodes and sequences "
                        "chain after it (a node with neither and no page must be deleted)"),
    "committed_tokens": ("committed_tokens", "sequence {0} has {1} committed tokens but holds {2}"),
    "pending_tokens": ("committed_tokens", "sequence {0} holds {1} tokens but its {2} token ids not yet offered to "
                       "the prefix cache do not start at a page boundary"),
    "pending_pages": ("committed_tokens", "sequence {0} has {1} committed tokens but its page {2}, wholly inside "
                      "them, was never offered to the prefix cache"),
    # Only the C++ core's intrusive free queues can break these two.
    "free_list_links": ("free_list_links", "page {0}'s links on its free queue do not point back to its neighbours"),
    "free_list_size": ("free_list_size", "{0} pages are linked on a free queue but its size says {1}"),
}

#: ``expected`` text of each InvalidArgument whose bound depends on state or on another
#: argument, by key, filled with the fields in order (used by the facade and both backends).
EXPECTED: dict[str, str] = {
    "stop": "at most num_tokens({0}) = {1}",
    "start": "at most stop = {0}",
    "start_released": "a position whose page was not released by the window",
    "max_pages": "at least the longest page table ({0} pages)",
    "max_pages_size": "at most {0} for {1} sequences (a [batch_size, max_pages] int32 table holds at most "
                      "{2:,} entries)",
    "num_tokens_len": "len(token_ids) = {0}",
    "token_ids_len": "one token id per new token ({0})",
    "token_ids_sum": "sum(num_tokens) = {0}",
    "num_computed_tokens": "at most num_tokens({0}) = {1}",
    "release_before": "an int in [0, num_tokens) = [0, {0})",
    "pinned_prefix": "a prefix pinned with pin_prefix (under this cache_salt) and not unpinned since",
    "row": "a row of the table bound with bind_table (it has {0} rows)",
    "row_taken": "a row no other live sequence is bound to (sequence {0} is)",
    "row_pages": "a row for sequence {0} only if its {1} pages fit the table's width ({2})",
    "row_width": "at most what fits in sequence {0}'s table row ({1} pages wide)",
}


def invalid_argument(name: str, value: object, expected: str, *fields) -> InvalidArgument:
    """``InvalidArgument(name, value, EXPECTED[expected] filled with fields)``."""
    return InvalidArgument(name, value, EXPECTED[expected].format(*fields))


class InvariantViolation(PagedKVError, RuntimeError):
    """``check_invariants()`` found a broken invariant; ``invariant`` names it."""

    def __init__(self, invariant: str, detail: str):
        super().__init__(invariant, detail)
        self.invariant = invariant
        self.detail = detail

    @classmethod
    def of(cls, key: str, *fields) -> "InvariantViolation":
        """The violation ``INVARIANT_DETAILS[key]`` with its detail filled with ``fields``."""
        invariant, detail = INVARIANT_DETAILS[key]
        return cls(invariant, detail.format(*fields))

    def __str__(self) -> str:
        return f"invariant {self.invariant!r} broken: {self.detail}"


class BackendUnavailable(PagedKVError, ImportError):
    """``PAGEDKV_IMPL`` asked for a backend that is not built or not known."""

    def __init__(self, requested: str, reason: str):
        super().__init__(requested, reason)
        self.requested = requested
        self.reason = reason

    def __str__(self) -> str:
        return f"pagedkv backend {self.requested!r} is unavailable: {self.reason}"
