"""pagedkv: paged KV-cache management for LLM inference.

``import pagedkv`` imports numpy only: never torch, triton, hypothesis or matplotlib (a test
checks it). ``pagedkv.PagedKVCache`` is resolved lazily, on first use, and imports torch then.
"""

from . import _backend
from .block_manager import (
    CSR,
    NULL_PAGE,
    Allocation,
    BlockManager,
    OffloadPlan,
    PageTables,
    PrefixCacheStats,
    StepPlan,
    SwapPlan,
    WindowTables,
)
from .errors import (
    BackendUnavailable,
    DuplicateSequence,
    InvalidArgument,
    InvalidType,
    InvalidTrace,
    InvariantViolation,
    MissingDependency,
    NoContiguousSpace,
    OutOfPages,
    PagedKVError,
    SequenceExists,
    SequenceSwapped,
    SequenceTooLong,
    UnknownSequence,
)
from .hybrid import HybridAllocation, HybridBlockManager, HybridStepPlan, KVCacheGroup
from .simulate import SimResult, simulate
from .spec import (
    GPU_PRESETS,
    MODEL_PRESETS,
    KVCacheSpec,
    gpu_budget_bytes,
    gpu_preset,
    kv_budget_bytes,
    max_sequences,
    model_preset,
    num_pages_for_budget,
)
from .static import Allocator, Region, StaticAllocator
from .workload import Workload

__version__ = "0.1.0"

#: The block manager backend used by default: ``"cpp"`` or ``"python"`` (see ``PAGEDKV_IMPL``).
backend = _backend.resolve()

_LAZY = {"PagedKVCache": "pagedkv.cache", "BatchPlan": "pagedkv.cache"}


def __getattr__(name: str):
    # NOTE: torch-backed names load on first use so `import pagedkv` stays numpy-only.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pagedkv' has no attribute {name!r}")


__all__ = [
    "BlockManager",
    "Allocation",
    "StepPlan",
    "SwapPlan",
    "WindowTables",
    "OffloadPlan",
    "PrefixCacheStats",
    "PageTables",
    "CSR",
    "NULL_PAGE",
    "HybridBlockManager",
    "KVCacheGroup",
    "HybridAllocation",
    "HybridStepPlan",
    "StaticAllocator",
    "Allocator",
    "Region",
    "Workload",
    "simulate",
    "SimResult",
    "KVCacheSpec",
    "model_preset",
    "gpu_preset",
    "MODEL_PRESETS",
    "GPU_PRESETS",
    "num_pages_for_budget",
    "kv_budget_bytes",
    "max_sequences",
    "gpu_budget_bytes",
    "PagedKVCache",
    "BatchPlan",
    "PagedKVError",
    "OutOfPages",
    "NoContiguousSpace",
    "UnknownSequence",
    "SequenceExists",
    "SequenceSwapped",
    "DuplicateSequence",
    "InvalidArgument",
    "InvalidType",
    "InvariantViolation",
    "BackendUnavailable",
    "InvalidTrace",
    "MissingDependency",
    "SequenceTooLong",
    "backend",
]
