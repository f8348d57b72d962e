"""Hostile input for every ``pagedkv`` subcommand: one short line on stderr, exit 2, no traceback.

A bank of bad arguments and bad files (non-UTF-8, empty, huge, truncated, wrong types, a
directory instead of a file) runs through ``pagedkv.cli.main`` in process, where an exception
escaping ``main`` fails the test; a sample also runs through the installed console script, so
the real process is checked for tracebacks too. ``size`` gets a Hypothesis fuzz of random flag
values besides, since it is pure arithmetic and fast.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedkv.cli import main

HEADER = {"format": "pagedkv-trace/1", "config": {"num_pages": 8, "page_size": 4, "watermark_pages": 0,
                                                   "enable_prefix_caching": True, "num_cpu_pages": 0,
                                                   "hash_bits": 64}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Named hostile files."""
    d = tmp_path_factory.mktemp("hostile")

    def write(name: str, data: bytes):
        (d / name).write_bytes(data)
        return str(d / name)

    good_header = json.dumps(HEADER).encode() + b"\n"
    gz = gzip.compress(good_header + b'["allocate",[0,4,null,0,null],[0,[]]]\n')
    made = {
        "latin1": write("latin1.csv", "prompt_len,output_len\n\xe9t\xe9,3\n".encode("latin-1")),
        "binary": write("binary.bin", bytes(range(256)) * 64),
        "nul": write("nul.csv", b"prompt_len,output_len\n1\x00,2\n"),
        "empty": write("empty.csv", b""),
        "blank": write("blank.csv", b"\n\n\n"),
        "huge_line": write("huge.csv", b"prompt_len,output_len\n" + b"9" * 3_000_000 + b",1\n"),
        "huge_header": write("huge_header.csv", b"x," * 500_000 + b"\n1\n"),
        "truncated_csv": write("truncated.csv", b"prompt_len,output_len\n12,3\n7,"),
        "no_columns": write("nocols.csv", b"a,b,c\n1,2,3\n"),
        "negative": write("negative.csv", b"prompt_len,output_len\n-5,3\n"),
        "float": write("float.csv", b"prompt_len,output_len\n1.5,3\n"),
        "quote": write("quote.csv", b'prompt_len,output_len\n"12,3\n'),
        "not_json": write("not_json.jsonl", b"{this is not json\n"),
        "json_list": write("list.jsonl", b"[1, 2, 3]\n"),
        "wrong_format": write("wrong.jsonl", b'{"format": "other/1", "config": {}}\n'),
        "no_config": write("noconfig.jsonl", b'{"format": "pagedkv-trace/1"}\n'),
        "bad_config": write("badconfig.jsonl", json.dumps({**HEADER, "config": {**HEADER["config"],
                                                                                  "num_pages": "eight"}}).encode()),
        "huge_config": write("hugeconfig.jsonl", json.dumps({**HEADER, "config": {**HEADER["config"],
                                                                                   "num_pages": 2**31 - 1}}).encode()),
        "short_record": write("short.jsonl", good_header + b'["allocate",[0]]\n'),
        "unknown_call": write("unknown.jsonl", good_header + b'["__class__",[],null]\n'),
        "bad_args": write("badargs.jsonl", good_header + b'["allocate",[0,"x",null,0,null],null]\n'),
        "too_many_args": write("manyargs.jsonl", good_header + b'["free",[0,1,2,3,4,5],null]\n'),
        "truncated_record": write("truncrec.jsonl", good_header + b'["allocate",[0,4,nu'),
        "bad_error": write("baderror.jsonl", good_header + b'["free",[0],null,"oops"]\n'),
        "truncated_gz": write("trace.jsonl.gz", gz[: len(gz) // 2]),
        "not_gz": write("fake.jsonl.gz", b"plain text, not gzip\n"),
        "config_not_json": write("config.json", b"{not json"),
        "config_list": write("list_config.json", b"[1, 2]"),
        "config_wrong_types": write("types_config.json", json.dumps(
            {"num_hidden_layers": "32", "num_attention_heads": -1, "hidden_size": None}).encode()),
        "config_binary": write("binary_config.json", bytes(range(256))),
        "dir": str(d),
    }
    return made


def _argv_bank(files):
    """(subcommand argv) cases, each of which must be rejected."""
    f = files
    frag = [
        ["--page-sizes", "8,abc"], ["--page-sizes", "0"], ["--page-sizes", "-16"], ["--page-sizes", "2147483648"],
        ["--page-sizes", "", "--policies", ""], ["--policies", "max,bogus"], ["--num-requests", "0"],
        ["--num-requests", "-1"], ["--num-requests", "1e9"], ["--num-requests", "99999999999999999999"],
        ["--seed", "-1"], ["--seed", "x"], ["--rate", "0"], ["--rate", "nan"], ["--rate", "inf"], ["--rate", "-2"],
        ["--slots", "0"], ["--slots", "2147483647"], ["--slots", "99999999999999999999"], ["--slots", "1.5"],
        ["--max-len", "0"], ["--max-len", "-5"], ["--watermark", "1"], ["--watermark", "nan"],
        ["--watermark", "-0.1"], ["--parallel-samples", "0"], ["--parallel-samples", "1000000000"],
        ["--max-running", "0"], ["--step-time", "0"], ["--step-time", "nan"], ["--step-time", "-1"],
        ["--model", "opt-13b"], ["--gpu", "a100-40gb"], ["--model", "nope", "--gpu", "h100"],
        ["--model", "opt-13b", "--gpu", "nope"], ["--model", "opt-13b", "--gpu", "h100", "--mem-fraction", "7"],
        ["--model", "opt-13b", "--gpu", "h100", "--mem-fraction", "nan"],
        ["--model", "opt-13b", "--gpu", "h100", "--slots", "100"], ["--dtype", "fp8"], ["--kv-scales", "none"],
        ["--model", "opt-13b", "--gpu", "h100", "--dtype", "int3"], ["--workload", "nope"], ["--placement", "x"],
        ["--bogus-flag"], ["--num-requests"], ["positional"],
    ]
    for name in ("latin1", "binary", "nul", "empty", "blank", "huge_line", "huge_header", "truncated_csv",
                 "no_columns", "negative", "float", "quote", "dir", "truncated_gz", "not_gz"):
        frag.append(["--trace", f[name]])
    frag += [["--trace", "/nonexistent/trace.csv"], ["--trace", f["truncated_csv"], "--prompt-column", "nope"],
             ["--trace", f["no_columns"], "--prompt-column", "a", "--output-column", "zzz"],
             ["--trace", f["dir"], "--skip-bad-rows"], ["--out", f["binary"], "--num-requests", "2"]]
    size = [
        ["--model", "nope"], ["--model", "llama-3-8b", "--gpu", "nope"], ["--context", "abc"], ["--context", "0"],
        ["--context", "-4k"], ["--context", "1.5"], ["--context", "9" * 400], ["--page-size", "0"],
        ["--page-size", "x"], ["--num-gpus", "0"], ["--num-gpus", "3.5"], ["--mem-fraction", "0"],
        ["--mem-fraction", "nan"], ["--mem-fraction", "1.5"], ["--reserve", "lots"], ["--reserve", "-1GB"],
        ["--gpu-memory", "0"], ["--gpu-memory", "x"], ["--bandwidth", "fast"], ["--bandwidth", "0"],
        ["--params", "x"], ["--params", "0"], ["--batches", "1,x"], ["--batches", "0"], ["--contexts", "x"],
        ["--dtype", "int3"], ["--weights-dtype", "x"], ["--kv-scales", "bogus"], ["--model", "a", "--config", "b"],
        ["--model", "llama-3-8b", "--dtype", "fp16", "--kv-scales", "per_tensor"], ["--bogus"],
    ]
    for name in ("config_not_json", "config_list", "config_wrong_types", "config_binary", "empty", "binary", "dir",
                 "huge_line"):
        size.append(["--config", f[name]])
    size.append(["--config", "/nonexistent/config.json"])
    replay = [[f[name]] for name in ("not_json", "json_list", "wrong_format", "no_config", "bad_config",
                                     "huge_config", "short_record", "unknown_call", "bad_args", "too_many_args",
                                     "truncated_record", "bad_error", "truncated_gz", "not_gz", "latin1", "binary",
                                     "empty", "blank", "huge_line", "dir")]
    replay += [["/nonexistent/trace.jsonl"], [], [f["short_record"], "--backend", "rust"], [f["empty"], "extra"]]
    top = [["bogus"], ["--bogus"], ["frag", "--help-me"]]
    return ([("frag", a) for a in frag] + [("size", a) for a in size] + [("replay", a) for a in replay]
            + [(None, a) for a in top])


def _check(code: int, err: str, argv) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, argv
    assert code == 2, (argv, code, err)
    assert 1 <= len(lines) <= 3, (argv, err)


def test_every_hostile_case_is_one_short_error(files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # frag writes results/ under the working directory
    cases = _argv_bank(files)
    assert len(cases) > 120
    for command, argv in cases:
        full = ([command] if command else []) + argv
        code = main(full)
        out, err = capsys.readouterr()
        _check(code, err, full)


@pytest.mark.skipif(shutil.which("pagedkv") is None, reason="the console script is not installed")
def test_the_console_script_prints_no_traceback(files, tmp_path):
    sample = [["frag", "--page-sizes", "8,abc"], ["frag", "--trace", files["latin1"]],
              ["frag", "--trace", files["dir"]], ["size", "--config", files["config_binary"]],
              ["size", "--mem-fraction", "3", "--model", "llama-3-8b", "--gpu", "h100"],
              ["replay", "/nonexistent.jsonl"], ["replay", files["not_json"]], ["replay", files["short_record"]],
              ["replay", files["truncated_gz"]], ["bogus"]]
    for argv in sample:
        proc = subprocess.run([shutil.which("pagedkv"), *argv], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120)
        _check(proc.returncode, proc.stderr, argv)


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("pagedkv 0.")
    assert main(["frag", "--help"]) == 0
    assert "--page-sizes" in capsys.readouterr().out


def test_a_closed_pipe_ends_quietly(tmp_path):
    # NOTE: `pagedkv size --list | head -1`: the reader closes the pipe after one line.
    code = ("import subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-m', 'pagedkv.cli', 'size', '--model', 'llama-3-70b',"
            " '--gpu', 'h100', '--batches', ','.join(str(b) for b in range(1, 4000))], stdout=subprocess.PIPE,"
            " stderr=subprocess.PIPE)\n"
            "p.stdout.readline(); p.stdout.close()\n"
            "err = p.stderr.read().decode(); p.wait()\n"
            "print(p.returncode); print(repr(err))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    returncode, err = proc.stdout.splitlines()
    assert err == "''" and returncode in ("0", "141"), proc.stdout


_VALUES = st.one_of(st.sampled_from(["0", "-1", "1", "16", "nan", "inf", "1e400", "2GiB", "3.35TB/s", "128k", "x",
                                     "", " ", "1,2", "8.03B", "fp8", "int8", "llama-3-8b", "h100", "\xe9"]),
                    st.text(max_size=12))
_FLAGS = ["--model", "--gpu", "--num-gpus", "--dtype", "--kv-scales", "--weights-dtype", "--context", "--params",
          "--page-size", "--mem-fraction", "--reserve", "--gpu-memory", "--bandwidth", "--batches", "--contexts"]


# NOTE: capsys is read after every call, so sharing it across examples is safe.
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(_FLAGS), _VALUES), max_size=5), st.booleans())
def test_size_with_random_flag_values_succeeds_or_says_why(capsys, pairs, as_json):
    argv = ["size"] + [token for flag, value in pairs for token in (flag, value)] + (["--json"] if as_json else [])
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if code == 0:
        assert out and not err
    else:
        assert code == 2 and 1 <= len(err.splitlines()) <= 3, (argv, code, err)
