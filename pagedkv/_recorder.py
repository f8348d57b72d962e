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
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import InvalidTrace, PagedKVError

FORMAT = "pagedkv-trace/1"

#: Backend methods that are recorded; everything else (properties, snapshot) passes through.
RECORDED = frozenset({
    "allocate", "append", "append_batch", "commit", "fork", "free", "release_window", "reset_prefix_cache", "end_step", "pin_prefix", "unpin_prefix", "take_offload", "take_events",
    "swap_out", "swap_in", "can_allocate", "can_append", "can_swap_out", "can_swap_in",
    "page_table", "num_tokens", "prefix_match", "pages_needed", "page_tables", "window_tables", "csr", "slots", "is_swapped", "prefix_cache_stats",
})
#: Positional arguments that are int64 arrays (decoded back to numpy on replay).
_ARRAY_ARGS = {"pin_prefix": (0,), "unpin_prefix": (0,), "allocate": (2,), "append": (2,), "can_allocate": (1,), "prefix_match": (0,), "pages_needed": (1,), "append_batch": (0, 1, 2), "swap_out": (0,), "swap_in": (0,), "can_swap_out": (0,),
               "can_swap_in": (0,), "page_tables": (0,), "window_tables": (0,), "csr": (0,)}


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


#: Largest pool (GPU + CPU pages) a replay builds from a trace header: a forged header must not
#: make ``pagedkv replay`` allocate tens of GB of page state.
MAX_REPLAY_PAGES = 2**27
#: Header fields of a trace and their bounds (what ``BlockManager`` accepts).
_CONFIG = {"num_pages": (1, 2**31 - 1), "page_size": (1, 2**31 - 1), "watermark_pages": (0, 2**31 - 1),
           "enable_prefix_caching": (0, 1), "num_cpu_pages": (0, 2**31 - 1), "hash_bits": (1, 64)}


def _config(path, header) -> dict:
    """The manager configuration of a trace header, checked (``InvalidTrace`` names the field)."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InvalidTrace(str(path), 1, f"not a pagedkv trace (the first line must be a JSON object with "
                           f"format {FORMAT!r}, as BlockManager(record=...) writes)")
    cfg = header.get("config")
    if not isinstance(cfg, dict):
        raise InvalidTrace(str(path), 1, "the header has no config object")
    for key, (lo, hi) in _CONFIG.items():
        value = cfg.get(key)
        if not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidTrace(str(path), 1, f"config field {key!r} must be an int in [{lo}, {hi}], got {value!r}")
    # NOTE: optional (traces written before the CPU tier of the prefix cache and KV events lack them).
    events = cfg.setdefault("enable_kv_events", False)
    if not isinstance(events, bool) or (events and not cfg["enable_prefix_caching"]):
        raise InvalidTrace(str(path), 1, f"config field 'enable_kv_events' must be a bool, True only with prefix "
                           f"caching, got {events!r}")
    if not isinstance(cfg.setdefault("kv_event_nodes", False), bool):
        raise InvalidTrace(str(path), 1, f"config field 'kv_event_nodes' must be a bool, got {cfg['kv_event_nodes']!r}")
    tier = cfg.setdefault("cpu_prefix_cache", False)
    if not isinstance(tier, bool) or (tier and not (cfg["enable_prefix_caching"] and cfg["num_cpu_pages"])):
        raise InvalidTrace(str(path), 1, f"config field 'cpu_prefix_cache' must be a bool, True only with prefix "
                           f"caching and CPU pages, got {tier!r}")
    if cfg["num_pages"] + cfg["num_cpu_pages"] > MAX_REPLAY_PAGES:
        raise InvalidTrace(str(path), 1, f"config asks for {cfg['num_pages'] + cfg['num_cpu_pages']:,} pages; "
                           f"replay builds at most {MAX_REPLAY_PAGES:,} (about 25 bytes of host memory each)")
    if cfg["watermark_pages"] >= cfg["num_pages"]:
        raise InvalidTrace(str(path), 1, f"config field 'watermark_pages' must be below num_pages, "
                           f"got {cfg['watermark_pages']!r}")
    return cfg


def _record(path, line_no: int, line: str) -> tuple[str, list, object, object]:
    """One call record ``[method, args, result]`` or ``[method, args, null, [error, message]]``."""
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise InvalidTrace(str(path), line_no, f"not JSON ({exc})") from None
    if not isinstance(record, list) or len(record) not in (3, 4):
        raise InvalidTrace(str(path), line_no, "a call record must be [method, args, result] or "
                           "[method, args, null, [error, message]]")
    method, args, expected = record[:3]
    if method not in RECORDED or not isinstance(args, list):
        raise InvalidTrace(str(path), line_no, f"unknown call {method!r} (or its arguments are not a list)")
    error = record[3] if len(record) == 4 else None
    if error is not None and not (isinstance(error, list) and len(error) == 2):
        raise InvalidTrace(str(path), line_no, "the error of a call record must be [error type, message]")
    return method, args, expected, error


def replay(path, backend: str | None = None) -> ReplayResult:
    """Re-execute a recorded trace against ``backend``; stop at the first divergence.

    Raises:
        InvalidTrace: the file is not a pagedkv trace (names the line and what is wrong).
        OSError: the file cannot be read (missing, a directory, not gzip).
    """
    from ._backend import implementation, resolve

    impl_class = implementation(resolve(backend))
    try:
        with _open(path, "r") as f:
            header_line = f.readline()
            try:
                header = json.loads(header_line) if header_line.strip() else None
            except ValueError:
                header = None
            cfg = _config(path, header)
            impl = impl_class(cfg["num_pages"], cfg["page_size"], cfg["watermark_pages"],
                              bool(cfg["enable_prefix_caching"]), cfg["num_cpu_pages"], cfg["hash_bits"],
                              cfg["cpu_prefix_cache"], cfg["enable_kv_events"], cfg["kv_event_nodes"])
            count = 0
            for index, line in enumerate(f):
                if not line.strip():
                    continue
                method, args, expected, error = _record(path, index + 2, line)
                try:
                    call_args = [np.asarray(a, dtype=np.int64) if i in _ARRAY_ARGS.get(method, ()) and a is not None
                                 else a for i, a in enumerate(args)]
                    got = _encode(getattr(impl, method)(*call_args))
                    got_error = None
                except PagedKVError as exc:
                    got, got_error = None, [type(exc).__name__, str(exc)]
                except (TypeError, ValueError, OverflowError, IndexError, KeyError, AttributeError) as exc:
                    raise InvalidTrace(str(path), index + 2, f"the arguments of {method} are not ones "
                                       f"BlockManager records ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
                if (got, got_error) != (expected, error):
                    return ReplayResult(count, Divergence(count, method, args, error or expected, got_error or got))
                count += 1
    except UnicodeDecodeError as exc:
        raise InvalidTrace(str(path), 0, f"not a text file (byte {exc.start} is not UTF-8)") from None
    except (EOFError, zlib.error) as exc:
        raise InvalidTrace(str(path), 0, f"a truncated or corrupt gzip file ({exc})") from None
    return ReplayResult(count, None)
