"""pagedkv: paged KV-cache management for LLM inference.

``import pagedkv`` imports numpy only: never torch, triton or hypothesis (a test checks it).
"""

from . import _backend
from .block_manager import CSR, NULL_PAGE, Allocation, BlockManager, PageTables, PrefixCacheStats, StepPlan, SwapPlan
from .errors import (
    BackendUnavailable,
    DuplicateSequence,
    InvalidArgument,
    InvalidType,
    InvariantViolation,
    OutOfPages,
    PagedKVError,
    SequenceExists,
    SequenceSwapped,
    UnknownSequence,
)

__version__ = "0.1.0"

#: The block manager backend used by default: ``"cpp"`` or ``"python"`` (see ``PAGEDKV_IMPL``).
backend = _backend.resolve()

__all__ = [
    "BlockManager",
    "Allocation",
    "StepPlan",
    "SwapPlan",
    "PrefixCacheStats",
    "PageTables",
    "CSR",
    "NULL_PAGE",
    "PagedKVError",
    "OutOfPages",
    "UnknownSequence",
    "SequenceExists",
    "SequenceSwapped",
    "DuplicateSequence",
    "InvalidArgument",
    "InvalidType",
    "InvariantViolation",
    "BackendUnavailable",
    "backend",
]
