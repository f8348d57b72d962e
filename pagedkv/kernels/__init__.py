"""Triton kernels of pagedkv, one op per module, each with a torch twin in ``reference``.

- ``write_kv``: scatter new K/V into pages by slot mapping (slot -1 skips a token).
- ``paged_decode``: one query token per sequence, GQA heads packed, split-KV + merge.
- ``paged_prefill``: ragged query chunks attending causally to their cached prefix.
- ``copy_pages``: a (src, dst) page copy plan over every layer in one launch.
- ``quant``: the int8 / fp8_e4m3 page formats and their torch quantize / dequantize.

Names are resolved lazily: ``import pagedkv.kernels`` imports neither torch nor triton, and
``pagedkv.kernels.reference`` and ``pagedkv.kernels.quant`` (torch only) work where triton is
not installed.
"""

from __future__ import annotations

import importlib
import sys
import types

#: Launcher name -> the module that defines it.
_LAUNCHERS = {
    "write_kv": "write_kv",
    "paged_decode": "decode",
    "paged_prefill": "prefill",
    "copy_pages": "copy_pages",
}

__all__ = [*_LAUNCHERS, "reference", "quant"]


def __getattr__(name: str):
    if name in _LAUNCHERS:
        module = importlib.import_module(f".{_LAUNCHERS[name]}", __name__)
        launcher = getattr(module, name)
        globals()[name] = launcher
        return launcher
    if name in ("reference", "quant"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    # NOTE: ``write_kv`` and ``copy_pages`` are both a module and the function it defines.
    # Importing a submodule makes the import system set it as an attribute of this package,
    # which would shadow the function; this keeps ``pagedkv.kernels.write_kv`` the function
    # (the module stays reachable through ``sys.modules``).
    def __setattr__(self, name, value):
        if name in _LAUNCHERS and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
