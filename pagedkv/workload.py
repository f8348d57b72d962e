"""Request workloads for the simulator: built-in synthetic ones and a CSV trace loader.

A ``Workload`` is three aligned arrays: prompt length, output length (tokens) and arrival time
(seconds). The built-in generators are seeded and match published mean lengths:

* ``sharegpt``: prompt mean 161.31, output mean 337.99 tokens (the vLLM paper's ShareGPT).
* ``alpaca``: prompt mean 19.31, output mean 58.45 tokens (the vLLM paper's Alpaca).

Only the means are published facts. The shapes are choices, documented in ``LogNormalLengths``
and in ``SHAREGPT`` / ``ALPACA``. Imports numpy only.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from os import PathLike
from pathlib import Path

import numpy as np

from . import _validate as check
from .errors import InvalidArgument, InvalidTrace, InvalidType


#: Prompt tokens one Mooncake hash id names.
HASH_BLOCK_SIZE = 512


@dataclass(frozen=True, slots=True)
class LogNormalLengths:
    """Token lengths ``ceil(X)``, ``X`` log-normal with shape ``sigma`` and ``X <= cap`` (redrawn above).

    The log-scale location ``mu`` is solved so that the mean of the integer lengths is ``mean``:
    ``E[X | X <= cap] + 0.5 = mean``, with
    ``E[X | X <= b] = exp(mu + sigma²/2) Φ((ln b − mu − sigma²)/sigma) / Φ((ln b − mu)/sigma)``
    (the ``+ 0.5`` is the mean effect of rounding up).
    """

    mean: float
    sigma: float
    cap: int

    def __post_init__(self):
        if not (isinstance(self.mean, (int, float)) and 1.5 <= self.mean < self.cap):
            raise InvalidArgument("mean", self.mean, f"a number in [1.5, cap = {self.cap})")
        if not (isinstance(self.sigma, (int, float)) and 0 < self.sigma <= 4):
            raise InvalidArgument("sigma", self.sigma, "a number in (0, 4]")

    @property
    def mu(self) -> float:
        s, log_cap = self.sigma, math.log(self.cap)

        def phi(z: float) -> float:
            return 0.5 * math.erfc(-z / math.sqrt(2.0))

        def mean_of(mu: float) -> float:
            return math.exp(mu + s * s / 2) * phi((log_cap - mu - s * s) / s) / phi((log_cap - mu) / s) + 0.5

        lo, hi = -10.0, log_cap + 10.0 * s
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_of(mid) < self.mean else (lo, mid)
        return (lo + hi) / 2

    def sample(self, rng: np.random.Generator, num: int) -> np.ndarray:
        """``num`` lengths, int64 ``[num]``, each in ``[1, cap]``."""
        mu = self.mu
        x = rng.lognormal(mu, self.sigma, num)
        bad = x > self.cap
        while bad.any():  # NOTE: redraw (not clip) so the cap leaves no spike at cap
            x[bad] = rng.lognormal(mu, self.sigma, int(bad.sum()))
            bad = x > self.cap
        return np.maximum(np.ceil(x), 1).astype(np.int64)


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """A named synthetic workload: independent prompt and output length distributions."""

    name: str
    prompt: LogNormalLengths
    output: LogNormalLengths


# NOTE: ShareGPT conversations are heavy-tailed in both prompt and output; the shapes (sigma)
# are our choice, not published. The caps follow the common ShareGPT filtering for 2048-token
# models (prompt <= 1024, prompt + output <= 2048), so every request fits max_len = 2048.
SHAREGPT = SyntheticSpec(
    "sharegpt",
    prompt=LogNormalLengths(mean=161.31, sigma=1.2, cap=1024),
    output=LogNormalLengths(mean=337.99, sigma=1.0, cap=1024),
)
# NOTE: Alpaca instructions are short and their answers moderately spread: smaller sigmas.
ALPACA = SyntheticSpec(
    "alpaca",
    prompt=LogNormalLengths(mean=19.31, sigma=0.6, cap=1024),
    output=LogNormalLengths(mean=58.45, sigma=0.9, cap=1024),
)
BUILTIN = {spec.name: spec for spec in (SHAREGPT, ALPACA)}


@dataclass(frozen=True, slots=True, eq=False)
class Workload:
    """A list of requests.

    Attributes:
        name: where it came from (built-in name or file name).
        prompt_lens: int64 ``[N]``, each >= 1.
        output_lens: int64 ``[N]``, each >= 1 (tokens to generate).
        arrivals: float64 ``[N]``, seconds from the start, non-decreasing, >= 0.
        num_skipped: bad trace rows skipped while loading (0 for synthetic workloads).
        hash_ids: per request, the ids of its prompt's content blocks (int64 arrays), or None:
            equal ids are equal content, so requests sharing leading ids share that prefix
            (Mooncake traces).
        hash_block_size: prompt tokens one hash id names (Mooncake: 512).
    """

    name: str
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    arrivals: np.ndarray = field(default=None)
    num_skipped: int = 0
    hash_ids: tuple | None = None
    hash_block_size: int = HASH_BLOCK_SIZE

    def __post_init__(self):
        p = _lengths("prompt_lens", self.prompt_lens)
        o = _lengths("output_lens", self.output_lens)
        if p.shape != o.shape:
            raise InvalidArgument("output_lens", f"{o.shape[0]} lengths", f"one per prompt ({p.shape[0]})")
        a = np.zeros(p.shape[0]) if self.arrivals is None else np.asarray(self.arrivals, dtype=np.float64)
        if a.shape != p.shape:
            raise InvalidArgument("arrivals", f"{a.shape[0]} times", f"one per request ({p.shape[0]})")
        if a.size and (not np.all(np.isfinite(a)) or a.min() < 0 or np.any(np.diff(a) < 0)):
            raise InvalidArgument("arrivals", "unsorted, negative or non-finite times", "non-decreasing seconds >= 0")
        if self.hash_ids is not None:
            if len(self.hash_ids) != p.shape[0]:
                raise InvalidArgument("hash_ids", f"{len(self.hash_ids)} lists", f"one per request ({p.shape[0]})")
            object.__setattr__(self, "hash_ids", tuple(np.asarray(h, dtype=np.int64) for h in self.hash_ids))
        check.count("hash_block_size", self.hash_block_size)
        object.__setattr__(self, "prompt_lens", p)
        object.__setattr__(self, "output_lens", o)
        object.__setattr__(self, "arrivals", a)

    def __len__(self) -> int:
        return int(self.prompt_lens.shape[0])

    @property
    def final_lens(self) -> np.ndarray:
        """``prompt + output`` per request, int64 ``[N]``."""
        return self.prompt_lens + self.output_lens

    def with_arrivals(self, arrivals) -> Workload:
        """The same requests arriving at ``arrivals`` (float64 seconds ``[N]``)."""
        return Workload(self.name, self.prompt_lens, self.output_lens, arrivals, self.num_skipped, self.hash_ids,
                        self.hash_block_size)

    def head(self, num_requests: int) -> Workload:
        """The first ``num_requests`` requests (all of them when fewer)."""
        n = check.as_int("num_requests", num_requests, 1, check.MAX_COUNT)
        return Workload(self.name, self.prompt_lens[:n], self.output_lens[:n], self.arrivals[:n], self.num_skipped,
                        None if self.hash_ids is None else self.hash_ids[:n], self.hash_block_size)

    def prompt_token_ids(self, i: int) -> np.ndarray:
        """Token ids for request ``i``'s prompt, for simulating a prefix cache: hash id ``h``
        names the ``hash_block_size`` ids ``h * hash_block_size + j`` (mod 2**30), so equal ids
        are equal content; the rest of the prompt (all of it without hash ids) is random ids
        from ``[2**30, 2**31)`` seeded by ``i``, unique to the request in practice."""
        i = check.as_int("i", i, 0, len(self) - 1)
        n = int(self.prompt_lens[i])
        block = self.hash_block_size
        blocks = np.zeros(0, dtype=np.int64) if self.hash_ids is None else self.hash_ids[i]
        ids = ((blocks[:, None] * block + np.arange(block)[None, :]) % 2**30).reshape(-1)[:n]
        if ids.shape[0] < n:
            tail = np.random.default_rng([i, 0x7A11]).integers(2**30, 2**31, n - ids.shape[0], dtype=np.int64)
            ids = np.concatenate([ids, tail])
        return ids

    def describe(self) -> dict:
        """Summary statistics (count, means, medians, maxima, span of arrivals) as plain numbers."""
        p, o = self.prompt_lens, self.output_lens
        return {
            "name": self.name, "num_requests": len(self), "num_skipped": self.num_skipped,
            "prompt_mean": float(p.mean()), "prompt_p50": float(np.median(p)), "prompt_max": int(p.max()),
            "output_mean": float(o.mean()), "output_p50": float(np.median(o)), "output_max": int(o.max()),
            "arrival_span_s": float(self.arrivals[-1] - self.arrivals[0]),
        }

    def __repr__(self) -> str:
        return f"Workload({self.name!r}, {len(self)} requests)"


def _lengths(name: str, value) -> np.ndarray:
    arr = check.int_array(name, value, 1, check.MAX_COUNT)
    if arr.size == 0:
        raise InvalidArgument(name, "an empty array", "at least one request")
    return arr


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> np.ndarray:
    """Arrival times of a Poisson process: float64 ``[N]`` seconds, the first at 0.

    Args:
        rate: requests per second, > 0.
        seed: the arrival stream is independent of the length stream of the same seed.
    """
    n = check.count("num_requests", num_requests)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < math.inf:
        raise InvalidArgument("rate", rate, "a positive number of requests per second")
    gaps = np.random.default_rng([check.as_int("seed", seed, 0, 2**63 - 1), 1]).exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def synthetic(name: str = "sharegpt", num_requests: int = 1000, *, seed: int = 0,
              rate: float | None = None) -> Workload:
    """A built-in synthetic workload.

    Args:
        name: ``"sharegpt"`` or ``"alpaca"`` (see ``SHAREGPT``, ``ALPACA``).
        num_requests: requests to draw, >= 1.
        seed: lengths are a pure function of (name, seed, num_requests); any seed >= 0.
        rate: Poisson arrivals at this many requests per second; ``None``: all arrive at 0.

    Raises:
        InvalidArgument: unknown name or bad numbers.
    """
    if name not in BUILTIN:
        raise InvalidArgument("workload", name, f"one of {tuple(BUILTIN)}")
    spec = BUILTIN[name]
    n = check.count("num_requests", num_requests)
    rng = np.random.default_rng([check.as_int("seed", seed, 0, 2**63 - 1), 0])
    prompts = spec.prompt.sample(rng, n)
    outputs = spec.output.sample(rng, n)
    arrivals = None if rate is None else poisson_arrivals(n, rate, seed)
    return Workload(name, prompts, outputs, arrivals)


def multi_turn(num_conversations: int = 200, turns: int = 6, *, seed: int = 0, num_system_prompts: int = 4,
               system_prompt_len: int = 1024, user_len: float = 120.0, answer_len: float = 240.0,
               rate: float = 1.0, think_time: float = 30.0, max_len: int = 16384) -> Workload:
    """Multi-turn chat with shared system prompts, as a Mooncake-style trace with hash ids.

    Each conversation opens with one of ``num_system_prompts`` system prompts, then alternates
    user messages and answers (lognormal lengths with these means); turn ``k``'s prompt is the
    whole history so far plus its new message, so it resends every earlier turn. The history is
    cut into ``HASH_BLOCK_SIZE``-token blocks: blocks wholly inside the system prompt are shared
    by the conversations that use it, every other block is its conversation's own. Conversations
    start as a Poisson process of ``rate`` per second; turns follow ``think_time`` seconds after
    the previous answer began (a fixed think time). A conversation ends early once a prompt plus
    its answer would pass ``max_len``.

    Every length and id is a pure function of the arguments (``seed``).
    """
    convs = check.count("num_conversations", num_conversations)
    turns = check.count("turns", turns)
    systems = check.count("num_system_prompts", num_system_prompts)
    sys_len = check.count("system_prompt_len", system_prompt_len)
    max_len = check.count("max_len", max_len)
    rng = np.random.default_rng([check.as_int("seed", seed, 0, 2**63 - 1), 0x3A17])
    users = LogNormalLengths(float(user_len), 1.0, max_len).sample(rng, convs * turns).reshape(convs, turns)
    answers = LogNormalLengths(float(answer_len), 1.0, max_len).sample(rng, convs * turns).reshape(convs, turns)
    systems_of = rng.integers(systems, size=convs)
    starts = poisson_arrivals(convs, rate, seed)
    block = HASH_BLOCK_SIZE
    shared_blocks = sys_len // block  # blocks wholly inside a system prompt
    prompts, outputs, arrivals, hashes = [], [], [], []
    for c in range(convs):
        system = int(systems_of[c])
        history = sys_len
        for k in range(turns):
            prompt = history + int(users[c, k])
            out = int(answers[c, k])
            if prompt + out > max_len:
                break
            ids = [system * 1_000_003 + b if b < shared_blocks else (systems + c) * 1_000_003 + b
                   for b in range(-(-prompt // block))]
            prompts.append(prompt)
            outputs.append(out)
            arrivals.append(float(starts[c]) + k * think_time)
            hashes.append(ids)
            history = prompt + out
    order = np.argsort(np.asarray(arrivals), kind="stable")
    return Workload(f"multi-turn-{convs}x{turns}", np.asarray(prompts)[order], np.asarray(outputs)[order],
                    np.asarray(arrivals)[order], hash_ids=tuple(hashes[i] for i in order))


def fixed(num_requests: int, prompt_len: int, output_len: int, *, rate: float | None = None,
          seed: int = 0) -> Workload:
    """``num_requests`` identical requests (for analytic checks)."""
    n = check.count("num_requests", num_requests)
    p = np.full(n, check.count("prompt_len", prompt_len), dtype=np.int64)
    o = np.full(n, check.count("output_len", output_len), dtype=np.int64)
    return Workload(f"fixed-{prompt_len}+{output_len}", p, o, None if rate is None else poisson_arrivals(n, rate, seed))


#: Column names recognised without being told (case-insensitive), in order of preference:
#: generic names, Azure's (``ContextTokens``), BurstGPT's (``Request tokens``) and Mooncake's
#: (``input_length``).
PROMPT_COLUMNS = ("prompt_len", "prompt_tokens", "input_len", "input_tokens", "num_prompt_tokens",
                  "ContextTokens", "context_tokens", "Request tokens", "input_length", "prompt_length")
OUTPUT_COLUMNS = ("output_len", "output_tokens", "num_output_tokens", "completion_tokens",
                  "GeneratedTokens", "generated_tokens", "Response tokens", "output_length")
ARRIVAL_COLUMNS = ("arrival", "arrival_time", "timestamp", "time")

_FRACTION = re.compile(r"(\.\d{6})\d+")


def load_csv(path: str | PathLike, *, prompt_column: str | None = None, output_column: str | None = None,
             arrival_column: str | None = None, skip_bad_rows: bool = False) -> Workload:
    """Load a trace with one request per row.

    Args:
        path: a CSV file with a header row.
        prompt_column, output_column: names of the prompt and output length columns; default
            the first header found in ``PROMPT_COLUMNS`` / ``OUTPUT_COLUMNS`` (case-insensitive),
            so the Azure LLM inference trace (``ContextTokens``, ``GeneratedTokens``) loads as is.
        arrival_column: arrival times, in seconds or as ISO datetimes; default the first header
            in ``ARRIVAL_COLUMNS`` (Azure's ``TIMESTAMP``), else every request arrives at 0.
            Times are shifted to start at 0; rows are stably sorted by time.
        skip_bad_rows: skip rows whose lengths are missing, non-numeric, fractional or < 1 (or
            whose time does not parse) and count them in ``Workload.num_skipped``; default raise.

    Returns:
        A ``Workload`` named after the file.

    Raises:
        InvalidArgument: no such column (lists the headers), a bad row (names its line, column
            and value), or no usable rows.
        OSError: the file cannot be read.
    """
    path = Path(path)
    try:
        prompts, outputs, times, skipped = _read_csv(path, prompt_column, output_column, arrival_column,
                                                     skip_bad_rows)
    except UnicodeDecodeError as exc:
        raise InvalidArgument("path", str(path), f"a UTF-8 text CSV file (byte {exc.start} is not UTF-8)") from None
    except csv.Error as exc:
        raise InvalidArgument("path", str(path), f"a CSV file ({exc})") from None
    if not prompts:
        raise InvalidArgument("path", str(path), f"a CSV with at least one usable request row ({skipped} skipped)")
    t = np.asarray(times, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t = t[order] - t.min()
    return Workload(path.name, np.asarray(prompts, dtype=np.int64)[order],
                    np.asarray(outputs, dtype=np.int64)[order], t, skipped)


def load_trace(path: str | PathLike, *, prompt_column: str | None = None, output_column: str | None = None,
               arrival_column: str | None = None, skip_bad_rows: bool = False) -> Workload:
    """Load a trace, its format detected from its content.

    - **CSV** with a header row (``load_csv``): the Azure LLM inference traces, BurstGPT
      (``Timestamp``, ``Request tokens``, ``Response tokens``) and any generic one.
    - **JSON Lines** (``load_jsonl``), one object per request: Mooncake's traces
      (``timestamp`` in ms, ``input_length``, ``output_length``, ``hash_ids``) and generic ones
      with length keys from ``PROMPT_COLUMNS`` / ``OUTPUT_COLUMNS`` and optional arrival seconds.

    The column options name CSV columns or JSON keys. Raises as ``load_csv`` / ``load_jsonl``.
    """
    path = Path(path)
    with path.open("rb") as f:
        start = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if start.startswith(b"{"):
        return load_jsonl(path, prompt_key=prompt_column, output_key=output_column, arrival_key=arrival_column,
                          skip_bad_rows=skip_bad_rows)
    return load_csv(path, prompt_column=prompt_column, output_column=output_column, arrival_column=arrival_column,
                    skip_bad_rows=skip_bad_rows)


def load_jsonl(path: str | PathLike, *, prompt_key: str | None = None, output_key: str | None = None,
               arrival_key: str | None = None, skip_bad_rows: bool = False) -> Workload:
    """Load a JSON Lines trace: one object per line, one request per object.

    A Mooncake trace is recognised by its ``hash_ids`` key: ``timestamp`` is then in
    milliseconds, and each request keeps its hash ids (``Workload.hash_ids``, 512 tokens each).
    Otherwise the lengths are read from the first keys found in ``PROMPT_COLUMNS`` /
    ``OUTPUT_COLUMNS`` (or the ones named), and arrivals, in seconds, from ``ARRIVAL_COLUMNS``.

    Raises:
        InvalidTrace: a line that is not a JSON object (truncated), or an object without the
            length keys (the message lists the keys found).
        InvalidArgument: a bad value (names the line and key), not UTF-8, or no usable request.
    """
    import json

    path = Path(path)
    prompts, outputs, times, hashes = [], [], [], []
    skipped = 0
    keys = None
    try:
        with path.open(encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    if skip_bad_rows:
                        skipped += 1
                        continue
                    raise InvalidTrace(str(path), number, f"not a JSON object ({exc.msg}; a truncated line?)") from None
                if not isinstance(record, dict):
                    raise InvalidTrace(str(path), number, f"a JSON {type(record).__name__}, not an object")
                if keys is None:
                    keys = _jsonl_keys(path, number, record, prompt_key, output_key, arrival_key)
                ip, io, ia, mooncake = keys
                try:
                    p = _count_value(record, ip, path, number)
                    o = _count_value(record, io, path, number)
                    t = _time_value(record, ia, path, number) if ia is not None else 0.0
                    h = _hash_ids(record, path, number) if mooncake else None
                except InvalidArgument:
                    if not skip_bad_rows:
                        raise
                    skipped += 1
                    continue
                prompts.append(p)
                outputs.append(o)
                times.append(t / 1000.0 if mooncake else t)
                hashes.append(h)
    except UnicodeDecodeError as exc:
        raise InvalidArgument("path", str(path), f"a UTF-8 text file (byte {exc.start} is not UTF-8)") from None
    if not prompts:
        raise InvalidArgument("path", str(path), f"a JSON Lines trace with at least one usable request ({skipped} skipped)")
    t = np.asarray(times, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t = t[order] - t.min()
    mooncake = keys[3]
    return Workload(path.name, np.asarray(prompts, dtype=np.int64)[order], np.asarray(outputs, dtype=np.int64)[order],
                    t, skipped, tuple(hashes[i] for i in order) if mooncake else None)


def _jsonl_keys(path: Path, line: int, record: dict, prompt_key, output_key, arrival_key):
    """(prompt key, output key, arrival key or None, is Mooncake) from a trace's first object."""
    header = list(record)

    def pick(name, known, arg, required):
        index = _column(path, header, name, known, arg, required, kind="key", line=line)
        return None if index is None else header[index]

    return (pick(prompt_key, PROMPT_COLUMNS, "prompt_key", True), pick(output_key, OUTPUT_COLUMNS, "output_key", True),
            pick(arrival_key, ARRIVAL_COLUMNS, "arrival_key", False), "hash_ids" in record)


def _count_value(record: dict, key: str, path: Path, line: int) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 1:
        raise InvalidArgument(f"{path.name} line {line} key {key!r}", value, "a whole number of tokens >= 1")
    return int(value)


def _time_value(record: dict, key: str, path: Path, line: int) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{path.name} line {line} key {key!r}", value, "a time (a number)")
    return float(value)


def _hash_ids(record: dict, path: Path, line: int) -> np.ndarray:
    ids = record.get("hash_ids")
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise InvalidArgument(f"{path.name} line {line} key 'hash_ids'", str(ids)[:40], "a list of ints")
    return np.asarray(ids, dtype=np.int64)


def _read_csv(path: Path, prompt_column, output_column, arrival_column, skip_bad_rows: bool):
    """(prompt lengths, output lengths, times, rows skipped) of a CSV trace."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # NOTE: -sig drops a leading BOM
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise InvalidArgument("path", str(path), "a CSV file with a header row")
        header = [h.strip() for h in header]
        cols = {
            "prompt_column": _column(path, header, prompt_column, PROMPT_COLUMNS, "prompt_column", True),
            "output_column": _column(path, header, output_column, OUTPUT_COLUMNS, "output_column", True),
            "arrival_column": _column(path, header, arrival_column, ARRIVAL_COLUMNS, "arrival_column", False),
        }
        ip, io, ia = cols["prompt_column"], cols["output_column"], cols["arrival_column"]
        prompts, outputs, times = [], [], []
        skipped = 0
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            try:
                p = _count_cell(row, ip, header, path, reader.line_num)
                o = _count_cell(row, io, header, path, reader.line_num)
                t = _time_cell(row, ia, header, path, reader.line_num) if ia is not None else 0.0
            except InvalidArgument:
                if not skip_bad_rows:
                    raise
                skipped += 1
                continue
            prompts.append(p)
            outputs.append(o)
            times.append(t)
    return prompts, outputs, times, skipped


def _column(path: Path, header: list[str], name: str | None, known: tuple[str, ...], arg: str,
            required: bool, kind: str = "column", line: int = 1) -> int | None:
    """Index in ``header`` of the column (or JSON key: ``kind``) named, else of the first known one."""
    lower = [h.lower() for h in header]
    if name is not None:
        if not isinstance(name, str):
            raise InvalidType(arg, name, f"a {kind} name")
        if name.lower() in lower:
            return lower.index(name.lower())
        where = "CSV columns" if kind == "column" else "trace's keys"
        raise InvalidArgument(arg, name, f"one of the {where} {_columns(header)}")
    for candidate in known:
        if candidate.lower() in lower:
            return lower.index(candidate.lower())
    if required:
        what = arg.removesuffix(f"_{kind}")
        flag = f"{arg}= (--{what}-column on the command line)" if kind == "column" else f"--{what}-column"
        raise InvalidTrace(str(path), line, f"no {what} length {kind} among its {kind}s {_columns(header)} (known "
                           f"names: {', '.join(known)}); name it with {flag}")
    return None


def _columns(header: list[str]) -> str:
    """The header as a short list for messages (a binary file's 'header' can be huge)."""
    shown = [h if len(h) <= 40 else h[:37] + "..." for h in header[:8]]
    return repr(shown)[:-1] + (f", ... {len(header) - 8} more]" if len(header) > 8 else "]")


def _cell(row: list[str], index: int, header: list[str], path: Path, line: int) -> str:
    if index >= len(row) or not row[index].strip():
        raise InvalidArgument(f"{path.name} line {line} column {header[index]!r}", "", "a value (it is missing)")
    return row[index].strip()


def _count_cell(row: list[str], index: int, header: list[str], path: Path, line: int) -> int:
    raw = _cell(row, index, header, path, line)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value == int(value) and value >= 1):
        raise InvalidArgument(f"{path.name} line {line} column {header[index]!r}", raw, "a whole number of tokens >= 1")
    return int(value)


def _time_cell(row: list[str], index: int, header: list[str], path: Path, line: int) -> float:
    raw = _cell(row, index, header, path, line)
    try:
        value = float(raw)
    except ValueError:
        try:  # NOTE: Azure writes 7 fractional digits, which datetime parses only from 3.11 on
            value = datetime.fromisoformat(_FRACTION.sub(r"\1", raw)).timestamp()
        except ValueError:
            value = math.nan
    if not math.isfinite(value):
        raise InvalidArgument(f"{path.name} line {line} column {header[index]!r}", raw,
                              "a time in seconds or an ISO date-time")
    return value


__all__ = ["Workload", "LogNormalLengths", "SyntheticSpec", "SHAREGPT", "ALPACA", "BUILTIN",
           "synthetic", "fixed", "multi_turn", "poisson_arrivals", "load_csv", "load_jsonl", "load_trace",
           "HASH_BLOCK_SIZE"]
