"""Trace recorder and replayer for the block manager: reproducers of allocator problems.

``BlockManager(..., record="trace.jsonl")`` wraps the backend in a ``Recorder`` that writes
every call that reached the backend and its result (or its error's type and message) as one
JSON line; the first line holds the manager's configuration. ``replay(path, backend)`` rebuilds
a manager with that configuration, re-executes every call and returns the first call whose
result or error differs. ``pagedkv replay TRACE`` is the command-line front end.

Calls rejected by the facade's argument checks never reach the backend and are not recorded;
they cannot change state. A path ending in ``.gz`` is gzip-compressed. Must not import torch.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import PagedKVError

FORMAT = "pagedkv-trace/1"

#: Backend methods that are recorded; everything else (properties, snapshot) passes through.
RECORDED = frozenset({
    "allocate", "append", "append_batch", "commit", "fork", "free", "release_window", "reset_prefix_cache",
    "swap_out", "swap_in", "can_allocate", "can_append", "can_swap_out", "can_swap_in",
    "page_table", "num_tokens", "page_tables", "csr", "slots", "is_swapped", "prefix_cache_stats",
})
#: Positional arguments that are int64 arrays (decoded back to numpy on replay).
_ARRAY_ARGS = {"allocate": (2,), "append": (2,), "can_allocate": (1,), "append_batch": (0, 1, 2), "swap_out": (0,), "swap_in": (0,), "can_swap_out": (0,),
               "can_swap_in": (0,), "page_tables": (0,), "csr": (0,)}


def _encode(value):
    """JSON-ready form of arguments and results (arrays and tuples become lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open(target, mode: str):
    if isinstance(target, io.IOBase) or hasattr(target, "write" if "w" in mode else "read"):
        return target
    path = Path(target)
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t")
    return open(path, mode, buffering=1 if "w" in mode else -1)  # NOTE: line-buffered: a crash loses at most one call


class Recorder:
    """Wraps a backend implementation and writes each recorded call to ``sink``."""

    def __init__(self, impl, sink, config: dict):
        self._impl = impl
        self._out = _open(sink, "w")
        self._write({"format": FORMAT, "config": config})

    def _write(self, record) -> None:
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._out.close()

    def __getattr__(self, name: str):
        attr = getattr(self._impl, name)
        if name not in RECORDED:
            return attr

        def recorded(*args):
            try:
                result = attr(*args)
            except PagedKVError as exc:
                self._write([name, _encode(args), None, [type(exc).__name__, str(exc)]])
                raise
            self._write([name, _encode(args), _encode(result)])
            return result

        return recorded


class Divergence(NamedTuple):
    """The first call whose replay differs from the recording (``index`` counts calls from 0)."""

    index: int
    method: str
    args: list
    expected: object
    got: object

    def __str__(self) -> str:
        return (f"call #{self.index}: {self.method}({', '.join(map(repr, self.args))})\n"
                f"  recorded: {self.expected!r}\n  replayed: {self.got!r}")


class ReplayResult(NamedTuple):
    num_calls: int
    divergence: Divergence | None


def replay(path, backend: str | None = None) -> ReplayResult:
    """Re-execute a recorded trace against ``backend``; stop at the first divergence."""
    from ._backend import implementation, resolve

    with _open(path, "r") as f:
        header = json.loads(f.readline())
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a pagedkv trace (first line must carry format {FORMAT!r})")
        cfg = header["config"]
        impl = implementation(resolve(backend))(
            cfg["num_pages"], cfg["page_size"], cfg["watermark_pages"], cfg["enable_prefix_caching"],
            cfg["num_cpu_pages"], cfg["hash_bits"],
        )
        count = 0
        for index, line in enumerate(f):
            method, args, expected, *error = json.loads(line)
            call_args = [np.asarray(a, dtype=np.int64) if i in _ARRAY_ARGS.get(method, ()) and a is not None else a
                         for i, a in enumerate(args)]
            try:
                got = _encode(getattr(impl, method)(*call_args))
                got_error = None
            except PagedKVError as exc:
                got, got_error = None, [type(exc).__name__, str(exc)]
            want_error = error[0] if error else None
            if (got, got_error) != (expected, want_error):
                return ReplayResult(index, Divergence(index, method, args, want_error or expected, got_error or got))
            count += 1
    return ReplayResult(count, None)
