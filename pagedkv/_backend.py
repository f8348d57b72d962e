"""Chooses the block manager implementation: the C++ core or the pure-Python reference.

``PAGEDKV_IMPL=cpp`` demands the C++ core and fails loudly when it is not built;
``PAGEDKV_IMPL=python`` forces the reference; unset means the C++ core when built, else Python.
"""

from __future__ import annotations

import os

from .errors import BackendUnavailable

BACKENDS = ("cpp", "python")


def resolve(requested: str | None = None) -> str:
    """Name of the backend to use: ``requested``, else ``$PAGEDKV_IMPL``, else the best built."""
    choice = requested if requested is not None else os.environ.get("PAGEDKV_IMPL", "")
    if choice == "python":
        return "python"
    if choice not in ("cpp", ""):
        raise BackendUnavailable(choice, f"choose one of {BACKENDS}")
    try:
        from . import _core  # noqa: F401
    except ImportError as exc:
        if choice == "cpp":
            raise BackendUnavailable("cpp", f"the C++ extension pagedkv._core is not built ({exc})") from exc
        return "python"
    return "cpp"


def implementation(name: str):
    """The block manager class of backend ``name`` (already resolved)."""
    if name == "cpp":
        from ._cpp import CppBlockManager

        return CppBlockManager
    from ._reference import ReferenceBlockManager

    return ReferenceBlockManager
