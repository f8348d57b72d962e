"""Argument checks shared by every public entry point of pagedkv.

Both backends see only arguments that passed these checks, so type errors and range errors
are raised once, here, with the same message whichever backend runs. Must not import torch.
"""

from __future__ import annotations

import operator

import numpy as np

from .errors import InvalidArgument, InvalidType

#: Largest sequence id (ids are stored as int64 in the C++ core).
MAX_SEQ_ID = 2**63 - 1
#: Largest count of pages, tokens per page or tokens per call (int32 in kernel metadata).
MAX_COUNT = 2**31 - 1
#: Largest token id accepted for prefix caching.
MAX_TOKEN_ID = 2**31 - 1


def as_int(name: str, value: object, lo: int, hi: int) -> int:
    """``value`` as a Python int in ``[lo, hi]``; bools, floats and strings are rejected."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidType(name, value, "an int")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidType(name, value, "an int") from None
    if not lo <= number <= hi:
        raise InvalidArgument(name, number, f"an int in [{lo}, {hi}]")
    return number


def seq_id(value: object, name: str = "seq_id") -> int:
    return as_int(name, value, 0, MAX_SEQ_ID)


def count(name: str, value: object) -> int:
    return as_int(name, value, 1, MAX_COUNT)


def cache_salt(value: object, name: str = "cache_salt") -> str | bytes | None:
    """The canonical form of a tenant salt: None, a non-empty str, or bytes that are not UTF-8.

    UTF-8 bytes become the str they encode, so that ``b"a"`` and ``"a"`` are one tenant under
    every hash (the pagedkv page hash reads the UTF-8 bytes; sha256_cbor hashes the object).
    An empty salt is rejected, as vLLM rejects it: it would be a tenant of its own under the
    page hash but no salt at all under vLLM's block hash.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    elif not isinstance(value, str):
        raise InvalidType(name, value, "a str, bytes or None")
    if not value:
        raise InvalidArgument(name, value, "a non-empty str or bytes, or None")
    return value


def int_array(name: str, value: object, lo: int, hi: int) -> np.ndarray:
    """A 1-D sequence of ints as a contiguous int64 array with every element in ``[lo, hi]``."""
    if isinstance(value, np.ndarray):
        arr = value
    else:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise InvalidType(name, value, "a 1-D sequence of ints")
        try:
            arr = np.asarray(value)
        except (OverflowError, ValueError):
            arr = np.asarray(value, dtype=object)
        if arr.size == 0:
            arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise InvalidArgument(name, f"array of shape {arr.shape}", "a 1-D sequence of ints")
    if arr.dtype.kind not in "iu":
        values = arr.tolist()
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int)]
        if arr.dtype.kind == "O" and not bad:  # Python ints beyond int64
            big = next(v for v in values if not lo <= v <= hi)
            raise InvalidArgument(name, big, f"a sequence of ints in [{lo}, {hi}]")
        raise InvalidType(name, bad[0] if bad else value, f"a 1-D sequence of ints (dtype {arr.dtype})")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > hi:
        raise InvalidArgument(name, int(arr.max()), f"a sequence of ints in [{lo}, {hi}]")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size:
        # NOTE: no int64 exceeds MAX_SEQ_ID, so seq_ids skip the second reduction (each one costs
        # about 2 us of numpy overhead, on the per-step path of append_batch and page_tables).
        low = int(arr.min())
        high = int(arr.max()) if hi < MAX_SEQ_ID else hi
        if low < lo or high > hi:
            raise InvalidArgument(name, low if low < lo else high, f"a sequence of ints in [{lo}, {hi}]")
    return arr


def seq_ids(value: object, name: str = "seq_ids") -> np.ndarray:
    return int_array(name, value, 0, MAX_SEQ_ID)


def counts(name: str, value: object, size: int) -> np.ndarray:
    """Per-sequence token counts: one int for all ``size`` sequences, or one per sequence."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return np.full(size, count(name, value), dtype=np.int64)
    arr = int_array(name, value, 1, MAX_COUNT)
    if arr.shape[0] != size:
        raise InvalidArgument(name, f"{arr.shape[0]} counts", f"one count per sequence ({size})")
    return arr
