"""``examples/engine.py --tp 2`` and ``--disagg``: two processes over gloo on loopback.

Each run compares its tokens with a single-process engine on the same prompts, under
preemption (swap and recompute) and prefix caching with a CPU tier, and exits non-zero when
they differ. A third run breaks one rank on purpose, to show that the comparison catches it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT = 300  # seconds; each run takes ~12 s here


def _run(*args, script: Path | None = None, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "CUDA_VISIBLE_DEVICES": ""}  # NOTE: gloo on the CPU, as in CI
    return subprocess.run([sys.executable, str(script or EXAMPLES / "engine.py"), *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env)


def test_tp2_gives_tp1_tokens_under_preemption_and_prefix_caching():
    proc = _run("--tp", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^TP=2 ([^:]+): .*$", proc.stdout, re.M)}
    assert set(lines) == {"preemption by swap", "preemption by recompute", "prefix caching with a CPU tier, tight pool"}
    assert all(line.endswith("tokens identical to TP=1") for line in lines.values()), lines

    def count(title, what):
        return int(re.search(rf"(\d+) {what}", lines[title]).group(1))

    assert count("preemption by swap", "swapped out") > 0 and count("preemption by swap", "swap in") > 0
    assert count("preemption by recompute", "recomputed") > 0
    assert count("prefix caching with a CPU tier, tight pool", "prompt tokens found cached") > 0
    assert count("prefix caching with a CPU tier, tight pool", "preemptions") > 0
    assert "every run's tokens are identical to TP=1" in proc.stdout


BROKEN_RANK = r"""
import os, sys
rank, port = int(sys.argv[1]), sys.argv[2]
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
sys.path.insert(0, sys.argv[3])
import engine, engine_dist
if rank == 1:  # rank 1 drops every swap-in: its shard of a resumed sequence's K/V is stale
    engine.PagedKVCache.swap_in = lambda self, copies: None
sys.exit(engine_dist.main("tp", 2))
"""


def test_a_rank_that_skips_the_broadcast_swaps_is_caught(tmp_path):
    import socket

    script = tmp_path / "broken.py"
    script.write_text(BROKEN_RANK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port, str(EXAMPLES)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for rank in range(2)]
    (out0, err0), (_, err1) = (p.communicate(timeout=TIMEOUT) for p in procs)
    assert procs[1].returncode == 0, err1
    assert procs[0].returncode == 1, out0 + err0
    assert "TP=2 preemption by swap: " in out0 and "DIFFER from TP=1" in out0
    assert "runs DIFFER from TP=1" in out0


def test_disagg_gives_a_single_engines_tokens():
    proc = _run("--disagg")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"disaggregated: 7 prompts .*; (\d+) of their (\d+) pages sent \((\d+) prompt tokens found in the "
                  r"decode side's prefix cache\) over gloo -> tokens identical to a single engine", proc.stdout)
    assert m, proc.stdout
    sent, pages, cached = map(int, m.groups())
    assert 0 < sent < pages and cached > 0  # the shared system prompt's pages moved once


def test_tp_and_disagg_refuse_bad_flags():
    proc = _run("--tp", "3")
    assert proc.returncode != 0 and "--tp 3" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    proc = _run("--tp", "2", "--disagg")
    assert proc.returncode == 2 and "--tp and --disagg" in proc.stderr
