"""Trace formats beyond CSV: Mooncake and generic JSON Lines, BurstGPT CSV, format detection,
and clean errors on bad files (wrong keys, not UTF-8, truncated lines)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedkv import workload as wl
from pagedkv.cli import main
from pagedkv.errors import InvalidArgument, InvalidTrace

AZURE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "azure_llm_inference_2023_conv.csv"


def _write(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


MOONCAKE = [
    {"timestamp": 0, "input_length": 1200, "output_length": 12, "hash_ids": [0, 1, 2]},
    {"timestamp": 2500, "input_length": 1100, "output_length": 7, "hash_ids": [0, 1, 3]},
    {"timestamp": 1000, "input_length": 300, "output_length": 30, "hash_ids": [4]},
]


def test_mooncake_jsonl_keeps_hash_ids_and_reads_milliseconds(tmp_path):
    path = _write(tmp_path, "mooncake.jsonl", "\n".join(json.dumps(r) for r in MOONCAKE) + "\n")
    work = wl.load_trace(path)
    # sorted by time: 0 ms, 1000 ms, 2500 ms
    assert work.prompt_lens.tolist() == [1200, 300, 1100] and work.output_lens.tolist() == [12, 30, 7]
    assert work.arrivals.tolist() == [0.0, 1.0, 2.5]
    assert [h.tolist() for h in work.hash_ids] == [[0, 1, 2], [4], [0, 1, 3]]
    assert work.hash_block_size == 512
    head = work.head(2)
    assert [h.tolist() for h in head.hash_ids] == [[0, 1, 2], [4]]


def test_generic_jsonl_and_burstgpt_csv(tmp_path):
    generic = _write(tmp_path, "g.jsonl", '{"prompt_len": 5, "output_len": 2, "arrival": 1.5}\n\n'
                                          '{"prompt_len": 7, "output_len": 1, "arrival": 0.5}\n')
    work = wl.load_trace(generic)
    assert work.prompt_lens.tolist() == [7, 5] and work.arrivals.tolist() == [0.0, 1.0] and work.hash_ids is None
    burst = _write(tmp_path, "BurstGPT_1.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                                               "5,ChatGPT,472,18,490,Conversation log\n"
                                               "45,GPT-4,1087,230,1317,Conversation log\n")
    work = wl.load_trace(burst)
    assert work.prompt_lens.tolist() == [472, 1087] and work.output_lens.tolist() == [18, 230]
    assert work.arrivals.tolist() == [0.0, 40.0]


@pytest.mark.skipif(not AZURE.exists(), reason="Azure trace not present at ../shared/traces")
def test_the_azure_trace_loads_through_detection():
    work = wl.load_trace(AZURE)
    assert len(work) == 19366 and work.hash_ids is None


@pytest.mark.parametrize("text, error, match", [
    ('{"foo": 1, "bar": 2}\n', InvalidTrace, r"line 1: no prompt length key among its keys \['foo', 'bar'\]"),
    ('{"prompt_len": 5, "output_len": 2}\n{"prompt_len": 5, "outp', InvalidTrace,
     r"line 2: not a JSON object .*truncated"),
    ('{"prompt_len": 5, "output_len": 2}\n[1, 2]\n', InvalidTrace, r"line 2: a JSON list, not an object"),
    ('{"prompt_len": 5, "output_len": 0}\n', InvalidArgument, r"line 1 key 'output_len' must be a whole number"),
    ('{"prompt_len": "5", "output_len": 2}\n', InvalidArgument, r"line 1 key 'prompt_len'"),
    ('{"input_length": 5, "output_length": 2, "timestamp": 0, "hash_ids": "x"}\n', InvalidArgument,
     r"key 'hash_ids' must be a list of ints"),
    (b'{"prompt_len": 5, "output_len": 2}\n\xff\xfe\n', InvalidArgument, r"UTF-8"),
])
def test_bad_jsonl_files_get_one_line_errors(tmp_path, text, error, match):
    path = _write(tmp_path, "bad.jsonl", text)
    with pytest.raises(error, match=match):
        wl.load_trace(path)


def test_bad_rows_can_be_skipped_and_counted(tmp_path):
    path = _write(tmp_path, "t.jsonl", '{"prompt_len": 5, "output_len": 2}\n{"prompt_len": 5, "ou\n'
                                       '{"prompt_len": 0, "output_len": 2}\n{"prompt_len": 3, "output_len": 4}\n')
    work = wl.load_trace(path, skip_bad_rows=True)
    assert work.prompt_lens.tolist() == [5, 3] and work.num_skipped == 2


def test_named_keys_and_unknown_ones(tmp_path):
    path = _write(tmp_path, "t.jsonl", '{"a": 5, "b": 2, "t": 3}\n{"a": 6, "b": 1, "t": 1}\n')
    work = wl.load_trace(path, prompt_column="a", output_column="b", arrival_column="t")
    assert work.prompt_lens.tolist() == [6, 5]
    with pytest.raises(InvalidArgument, match=r"prompt_key must be one of the trace's keys \['a', 'b', 't'\], got 'x'"):
        wl.load_trace(path, prompt_column="x", output_column="b")


def test_the_frag_cli_reads_jsonl_and_reports_bad_files_without_a_traceback(tmp_path, capsys):
    good = _write(tmp_path, "m.jsonl", "\n".join(json.dumps(r) for r in MOONCAKE))
    assert main(["frag", "--trace", str(good), "--page-sizes", "16", "--policies", "", "--no-plot",
                 "--out", str(tmp_path / "out")]) == 0
    bad = _write(tmp_path, "bad.jsonl", '{"foo": 1}\n')
    capsys.readouterr()
    assert main(["frag", "--trace", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no prompt length key" in err
    assert main(["frag", "--trace", str(good), "--prompt-column", "nope"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--prompt-column" in err, err
