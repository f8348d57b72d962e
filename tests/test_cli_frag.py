"""``pagedkv frag``: the table, the JSON report, the PNG, traces, budgets and errors."""

import json
from pathlib import Path

import pytest

from pagedkv.cli import main

AZURE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "azure_llm_inference_2023_conv.csv"
SMALL = ["--num-requests", "40", "--page-sizes", "16,64", "--policies", "max,oracle"]


def frag(tmp_path, *args):
    return main(["frag", *SMALL, "--out", str(tmp_path), *args])


def test_table_and_json_report(tmp_path, capsys):
    assert frag(tmp_path, "--no-plot") == 0
    out = capsys.readouterr().out
    for label in ("Max", "Oracle", "page 16", "page 64", "tokens%"):
        assert label in out
    report = json.loads((tmp_path / "frag.json").read_text())
    assert [p["label"] for p in report["points"]] == ["Max", "Oracle", "page 16", "page 64"]
    assert report["budget"]["num_slots"] == 15_700 and report["workload"]["num_requests"] == 40
    for point in report["points"]:
        assert sum(point["breakdown"].values()) == pytest.approx(1.0)
        assert point["completed"] == 40 and point["elapsed_s"] > 0
    paged = [p for p in report["points"] if p["kind"] == "paged"]
    assert paged[0]["tail_waste"]["mean"] < paged[1]["tail_waste"]["mean"]
    assert not (tmp_path / "frag.png").exists()


def test_json_flag_prints_the_report(tmp_path, capsys):
    assert frag(tmp_path, "--no-plot", "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "frag.json").read_text())


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    assert frag(tmp_path) == 0
    assert (tmp_path / "frag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parallel_samples_report_the_memory_saved(tmp_path, capsys):
    assert main(["frag", "--workload", "alpaca", "--num-requests", "60", "--page-sizes", "16",
                 "--policies", "oracle", "--parallel-samples", "3", "--no-plot", "--out", str(tmp_path)]) == 0
    assert "saved%" in capsys.readouterr().out
    points = json.loads((tmp_path / "frag.json").read_text())["points"]
    assert points[0]["sharing_saving"] is None and 0 < points[1]["sharing_saving"] < 1


def test_trace_with_named_columns_and_bad_rows(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("a,b\n10,20\n30,oops\n15,5\n")
    args = ["frag", "--trace", str(trace), "--prompt-column", "a", "--output-column", "b",
            "--page-sizes", "16", "--policies", "", "--no-plot", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "'b'" in err and "oops" in err
    assert main(args + ["--skip-bad-rows"]) == 0
    assert "1 bad rows skipped" in capsys.readouterr().out
    report = json.loads((tmp_path / "frag.json").read_text())
    assert report["workload"]["num_skipped"] == 1 and report["points"][0]["completed"] == 2


def test_model_and_gpu_budget(tmp_path):
    spec = pytest.importorskip("pagedkv.spec")
    assert frag(tmp_path, "--no-plot", "--model", "opt-13b", "--gpu", "a100-40gb") == 0
    report = json.loads((tmp_path / "frag.json").read_text())
    model, gpu = spec.model_preset("opt-13b"), spec.gpu_preset("a100-40gb")
    budget = spec.kv_budget_bytes(gpu.memory_bytes, spec.weights_bytes(model.num_params, model.weights_dtype), 0.9)
    assert report["budget"]["num_slots"] == budget // model.spec.bytes_per_token


@pytest.mark.parametrize("args, message", [
    (["--policies", "greedy"], "--policies"),
    (["--model", "opt-13b"], "--model/--gpu"),
    (["--slots", "0"], "--slots"),
    (["--page-sizes", "", "--policies", ""], "at least one configuration"),
    (["--max-len", "0"], "--max-len"),
    (["--max-num-seqs", "9000"], "--max-num-seqs"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
])
def test_bad_options_are_typed_errors(tmp_path, capsys, args, message):
    assert main(["frag", "--num-requests", "5", "--no-plot", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not AZURE.exists(), reason="Azure trace not present at ../shared/traces")
def test_azure_trace_head(tmp_path):
    assert main(["frag", "--trace", str(AZURE), "--num-requests", "100", "--max-len", "16384",
                 "--page-sizes", "16", "--policies", "oracle", "--no-plot", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "frag.json").read_text())
    assert report["workload"]["name"] == AZURE.name
    assert all(p["completed"] + sum(p["rejected"].values()) == 100 for p in report["points"])


def test_v1_scheduler_table_next_to_the_simple_one(tmp_path, capsys):
    assert frag(tmp_path, "--no-plot", "--max-num-batched-tokens", "512", "--max-num-seqs", "32") == 0
    out = capsys.readouterr().out
    assert "vLLM-v1-like scheduler (512 tokens and 32 sequences per step" in out and "preempt/req" in out
    report = json.loads((tmp_path / "frag.json").read_text())
    assert report["config"]["scheduler"] == "v1" and [p["label"] for p in report["serving"]] == ["page 16", "page 64"]
    for point in report["serving"]:
        assert point["completed"] == 40 and point["mean_batch_tokens"] <= 512 and point["peak_running"] <= 32
        assert point["ttft_p50_s"] > 0 and point["prefix_hit_rate"] is None
    assert frag(tmp_path, "--no-plot", "--scheduler", "simple") == 0
    assert "vLLM-v1-like" not in capsys.readouterr().out
    assert "serving" not in json.loads((tmp_path / "frag.json").read_text())


def test_v1_with_a_time_model_reports_latencies(tmp_path, capsys):
    assert frag(tmp_path, "--no-plot", "--model", "llama-3-8b", "--gpu", "h100", "--rate", "5") == 0
    out = capsys.readouterr().out
    assert "roofline step time of llama-3-8b on h100" in out and "TTFT p50" in out
    (point, _) = json.loads((tmp_path / "frag.json").read_text())["serving"]
    # 16 GB of bf16 weights at 3.35 TB/s: no step is faster than 4.8 ms
    assert point["tpot_p50_s"] >= 16.06e9 / 3.35e12 and point["output_tokens_per_s"] > 0


def test_replicas_behind_each_router(tmp_path, capsys):
    assert main(["frag", "--workload", "multi-turn", "--num-requests", "60", "--prefix-caching", "--replicas", "3",
                 "--page-sizes", "16", "--policies", "", "--no-plot", "--out", str(tmp_path)]) == 0
    assert "3 replicas behind a router" in capsys.readouterr().out
    fleet = json.loads((tmp_path / "frag.json").read_text())["replicas"]
    assert [p["router"] for p in fleet] == ["round_robin", "least_loaded", "prefix_aware"]
    assert all(sum(p["requests_per_replica"]) + sum(p["rejected"].values()) == 60 for p in fleet)


@pytest.mark.parametrize("args, message", [
    (["--router", "round_robin"], "--router"),
    (["--replicas", "2", "--router", "prefix_aware"], "--prefix-caching"),
    (["--replicas", "2", "--router", "random"], "--router"),
    (["--replicas", "2", "--scheduler", "simple"], "--replicas"),
    (["--replicas", "0"], "--replicas"),
    (["--jobs", "0"], "--jobs"),
])
def test_bad_replica_options(tmp_path, capsys, args, message):
    assert main(["frag", "--num-requests", "5", "--no-plot", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_jobs_give_the_same_report_as_one_process(tmp_path):
    reports = []
    for jobs in ("1", "2"):
        out = tmp_path / jobs
        assert main(["frag", *SMALL, "--workload", "multi-turn", "--prefix-caching", "--capacities", "20000",
                     "--replicas", "2", "--jobs", jobs, "--no-plot", "--out", str(out)]) == 0
        report = json.loads((out / "frag.json").read_text())
        for key in ("points", "serving", "replicas"):
            for point in report[key]:
                point.pop("elapsed_s")
        reports.append(report)
    assert reports[0] == reports[1] and len(reports[0]["replicas"]) == 6 and reports[0]["capacity_sweep"]


def test_v1_swap_preemption(tmp_path, capsys):
    assert frag(tmp_path, "--no-plot", "--slots", "3000", "--preemption", "swap", "--cpu-slots", "20000") == 0
    serving = json.loads((tmp_path / "frag.json").read_text())["serving"]
    assert all(p["swap_outs"] == p["preemptions"] and p["recomputed_tokens"] == 0 for p in serving)
    assert any(p["swap_outs"] > 0 for p in serving)
    for args in (["--preemption", "swap"], ["--cpu-slots", "100"]):
        assert frag(tmp_path, "--no-plot", *args) == 2
        assert args[0] in capsys.readouterr().err


def test_cpu_tier_is_a_second_capacity_axis(tmp_path, capsys):
    assert main(["frag", "--workload", "multi-turn", "--num-requests", "200", "--prefix-caching", "--page-sizes", "16",
                 "--policies", "", "--capacities", "20000", "--cpu-capacities", "0,60000", "--max-len", "16384",
                 "--slots", "20000", "--scheduler", "simple", "--no-plot", "--out", str(tmp_path)]) == 0
    assert "rows per page size and CPU-tier slots" in capsys.readouterr().out
    sweep = {p["cpu_slots"]: p for p in json.loads((tmp_path / "frag.json").read_text())["capacity_sweep"]}
    assert set(sweep) == {0, 60000}
    assert sweep[60000]["prefix_hit_rate"] > sweep[0]["prefix_hit_rate"]  # demoted pages found again
    assert main(["frag", "--num-requests", "5", "--prefix-caching", "--cpu-capacities", "100", "--no-plot",
                 "--out", str(tmp_path)]) == 2
    assert "--cpu-capacities" in capsys.readouterr().err
