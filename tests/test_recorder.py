"""Trace recorder and ``pagedkv replay``."""

import json

import pytest

from pagedkv import BlockManager, OutOfPages
from pagedkv._backend import resolve
from pagedkv._recorder import replay
from pagedkv.cli import main

BACKENDS = ["python"] + (["cpp"] if resolve() == "cpp" else [])


def _workload(mgr):
    mgr.allocate(0, token_ids=[1, 2, 3, 4, 5, 6, 7])
    mgr.allocate(1, token_ids=[1, 2, 3, 4, 9])
    mgr.fork(0, 2)
    mgr.append_batch([0, 1, 2], [1, 2, 3])
    mgr.page_tables([0, 1, 2])
    mgr.csr([0, 2])
    with pytest.raises(OutOfPages):
        mgr.allocate(3, 1000)
    mgr.swap_out([1])
    mgr.release_window(0, 2)
    mgr.free(2)
    mgr.swap_in([1])
    mgr.free(0)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("recorded_on", BACKENDS)
def test_recorded_trace_replays_without_divergence_on_every_backend(tmp_path, suffix, recorded_on):
    path = tmp_path / f"trace{suffix}"
    mgr = BlockManager(16, 4, enable_prefix_caching=True, num_cpu_pages=8, record=path, backend=recorded_on)
    _workload(mgr)
    mgr.close_trace()
    for backend in BACKENDS:
        result = replay(path, backend)
        assert result.divergence is None and result.num_calls >= 12


def test_replay_reports_the_first_divergence(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    mgr = BlockManager(16, 4, enable_prefix_caching=True, num_cpu_pages=8, record=path)
    _workload(mgr)
    mgr.close_trace()
    lines = path.read_text().splitlines()
    call = json.loads(lines[4])  # the 4th call: append_batch
    assert call[0] == "append_batch"
    call[2][0][0] += 1  # corrupt the first recorded slot
    lines[4] = json.dumps(call)
    path.write_text("\n".join(lines) + "\n")
    result = replay(path)
    assert result.divergence is not None and result.divergence.index == 3
    assert result.divergence.method == "append_batch"
    assert main(["replay", str(path)]) == 1
    assert "first divergence at call #3: append_batch" in capsys.readouterr().out


def test_replay_cli_success_and_bad_file(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    mgr = BlockManager(8, 2, record=path)
    mgr.allocate(5, 3)
    mgr.free(5)
    mgr.close_trace()
    assert main(["replay", str(path)]) == 0
    assert "no divergence" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "other"}\n')
    with pytest.raises(ValueError, match="not a pagedkv trace"):
        replay(bad)
