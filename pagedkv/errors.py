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


class InvalidArgument(PagedKVError, ValueError):
    """An argument has a bad value. Names the argument, the value and what was expected."""

    def __init__(self, name: str, value: object, expected: str):
        super().__init__(name, value, expected)
        self.name = name
        self.value = value
        self.expected = expected

    def __str__(self) -> str:
        return f"{self.name} must be {self.expected}, got {self.value!r}"


class InvalidType(PagedKVError, TypeError):
    """An argument has the wrong type. Names the argument, the type found and the one expected."""

    def __init__(self, name: str, value: object, expected: str):
        super().__init__(name, value, expected)
        self.name = name
        self.value = value
        self.expected = expected

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


class InvariantViolation(PagedKVError, RuntimeError):
    """``check_invariants()`` found a broken invariant; ``invariant`` names it."""

    def __init__(self, invariant: str, detail: str):
        super().__init__(invariant, detail)
        self.invariant = invariant
        self.detail = detail

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
