"""Workloads: seeded synthetic generators matching published means, the CSV trace loader."""

import csv
from pathlib import Path

import numpy as np
import pytest

from pagedkv import InvalidArgument
from pagedkv.errors import InvalidTrace
from pagedkv import workload as wl

AZURE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "azure_llm_inference_2023_conv.csv"


@pytest.mark.parametrize("name, prompt_mean, output_mean", [("sharegpt", 161.31, 337.99), ("alpaca", 19.31, 58.45)])
def test_synthetic_means_match_the_published_statistics(name, prompt_mean, output_mean):
    work = wl.synthetic(name, 40_000, seed=0)
    assert work.prompt_lens.mean() == pytest.approx(prompt_mean, rel=0.02)
    assert work.output_lens.mean() == pytest.approx(output_mean, rel=0.02)
    spec = wl.BUILTIN[name]
    assert work.prompt_lens.min() >= 1 and work.prompt_lens.max() <= spec.prompt.cap
    assert work.output_lens.min() >= 1 and work.output_lens.max() <= spec.output.cap
    assert np.all(work.arrivals == 0)


def test_synthetic_is_seeded():
    a, b, c = (wl.synthetic("sharegpt", 200, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.prompt_lens, b.prompt_lens) and np.array_equal(a.output_lens, b.output_lens)
    assert not np.array_equal(a.output_lens, c.output_lens)
    # Arrivals come from their own stream: asking for a rate does not change the lengths.
    d = wl.synthetic("sharegpt", 200, seed=1, rate=3.0)
    assert np.array_equal(a.output_lens, d.output_lens)


def test_poisson_arrivals():
    t = wl.poisson_arrivals(20_000, rate=4.0, seed=3)
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert np.diff(t).mean() == pytest.approx(0.25, rel=0.03)
    with pytest.raises(InvalidArgument, match="rate"):
        wl.poisson_arrivals(10, rate=0)


def test_fixed_and_validation():
    work = wl.fixed(5, 7, 3)
    assert len(work) == 5 and work.final_lens.tolist() == [10] * 5
    with pytest.raises(InvalidArgument, match="output_lens"):
        wl.Workload("x", [1, 2], [1])
    with pytest.raises(InvalidArgument, match="prompt_lens"):
        wl.Workload("x", [0], [1])
    with pytest.raises(InvalidArgument, match="arrivals"):
        wl.Workload("x", [1, 1], [1, 1], [2.0, 1.0])
    with pytest.raises(InvalidArgument, match="workload"):
        wl.synthetic("lmsys", 3)
    with pytest.raises(InvalidArgument, match="sigma"):
        wl.LogNormalLengths(mean=10, sigma=0, cap=100)
    assert wl.synthetic("alpaca", 50).head(10).describe()["num_requests"] == 10


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_csv_with_configured_column_names(tmp_path):
    path = write(tmp_path, "id,in,out\n1,5,7\n2,6,8\n")
    work = wl.load_csv(path, prompt_column="in", output_column="out")
    assert work.prompt_lens.tolist() == [5, 6] and work.output_lens.tolist() == [7, 8]
    assert work.arrivals.tolist() == [0.0, 0.0] and work.name == "trace.csv"


def test_csv_detects_known_names_and_sorts_by_time(tmp_path):
    path = write(tmp_path, "prompt_tokens,output_tokens,timestamp\n5,7,12.5\n6,8,10.0\n")
    work = wl.load_csv(path)
    assert work.prompt_lens.tolist() == [6, 5] and work.arrivals.tolist() == [0.0, 2.5]


def test_csv_iso_times_with_seven_fraction_digits(tmp_path):
    path = write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                           "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n")
    work = wl.load_csv(path)
    assert work.arrivals[1] == pytest.approx(4.314579, abs=1e-6)


@pytest.mark.parametrize("row, what", [("x,abc,3", "abc"), ("x,-4,3", "-4"), ("x,4", "missing"),
                                       ("x,,3", "missing"), ("x,2.5,3", "2.5"), ("x,0,3", "0")])
def test_csv_bad_rows_name_the_row_or_are_skipped(tmp_path, row, what):
    path = write(tmp_path, f"id,prompt_len,output_len\na,10,20\n{row}\nb,11,21\n")
    with pytest.raises(InvalidArgument, match="line 3") as info:
        wl.load_csv(path)
    assert what in str(info.value)
    work = wl.load_csv(path, skip_bad_rows=True)
    assert work.num_skipped == 1 and work.prompt_lens.tolist() == [10, 11]


def test_csv_missing_columns_and_empty_files(tmp_path):
    path = write(tmp_path, "a,b\n1,2\n")
    with pytest.raises(InvalidTrace, match="prompt_column") as info:
        wl.load_csv(path)
    assert "['a', 'b']" in str(info.value) and "line 1" in str(info.value)
    with pytest.raises(InvalidArgument, match="output_column"):
        wl.load_csv(path, prompt_column="a", output_column="c")
    with pytest.raises(InvalidArgument, match="header"):
        wl.load_csv(write(tmp_path, ""))
    with pytest.raises(InvalidArgument, match="usable"):
        wl.load_csv(write(tmp_path, "prompt_len,output_len\nx,y\n"), skip_bad_rows=True)


def test_csv_that_is_not_utf8_text_is_a_typed_error(tmp_path):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("prompt_len,output_len\n\xe9,3\n".encode("latin-1"))
    with pytest.raises(InvalidArgument, match="UTF-8") as info:
        wl.load_csv(latin1)
    assert info.value.name == "path"
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"prompt_len,output_len\n1\x00,2\n")
    with pytest.raises(InvalidArgument, match="line 2"):
        wl.load_csv(nul)


@pytest.mark.skipif(not AZURE.exists(), reason="Azure trace not present at ../shared/traces")
def test_azure_trace_loads_with_its_own_column_names():
    work = wl.load_csv(AZURE)
    with AZURE.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(work) == len(rows) == 19_366 and work.num_skipped == 0
    assert work.prompt_lens.sum() == sum(int(r["ContextTokens"]) for r in rows)
    assert work.output_lens.sum() == sum(int(r["GeneratedTokens"]) for r in rows)
    assert work.arrivals[0] == 0 and 3400 < work.arrivals[-1] < 3600  # one hour of traffic
