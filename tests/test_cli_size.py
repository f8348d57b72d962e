"""``pagedkv size``: the printed and JSON figures, for presets and for a config.json file."""

from __future__ import annotations

import json
import math

import pytest

from pagedkv.cli import main
from pagedkv.commands.size import fmt_bytes, parse_count, parse_rate, parse_size, parse_tokens
from pagedkv.errors import InvalidArgument
from pagedkv.spec import GPU_PRESETS, MODEL_PRESETS

LLAMA_3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def size(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["size", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def size_json(capsys, *argv: str) -> dict:
    code, out, err = size(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


# ------------------------------------------------------------ the checks
def test_llama3_70b_bf16_128k(capsys):
    r = size_json(capsys, "--model", "llama-3-70b", "--dtype", "bf16", "--context", "128k")
    assert r["context"] == 131_072
    assert r["kv_per_sequence_bytes"] == 2 * 80 * 8 * 128 * 131_072 * 2 == 42_949_672_960
    code, out, _ = size(capsys, "--model", "llama-3-70b", "--dtype", "bf16", "--context", "128k")
    assert code == 0
    assert "42.95 GB (40.00 GiB)" in out


def test_llama3_8b_fp16_text(capsys):
    code, out, _ = size(capsys, "--model", "llama-3-8b", "--gpu", "h100", "--dtype", "fp16", "--context", "128k")
    assert code == 0
    assert "131,072 B (128 KiB)" in out
    assert "17.18 GB (16.00 GiB) at 131,072 tokens" in out
    assert "76.72" not in out  # the query-heads figure a popular tutorial prints
    assert "beyond the model's maximum context of 8,192" in out  # Llama 3 (not 3.1) is an 8K model


def test_llama3_70b_fp8_and_deepseek_mla(capsys):
    assert size_json(capsys, "--model", "llama-3-70b", "--dtype", "fp8")["bytes_per_token"] == 163_840
    r = size_json(capsys, "--model", "deepseek-v3", "--dtype", "bf16")
    assert r["bytes_per_token"] == 61 * (512 + 64) * 2 == 70_272
    assert r["model"]["attention"] == "mla"
    code, out, _ = size(capsys, "--model", "deepseek-v3", "--gpu", "h200", "--num-gpus", "8")
    assert "70,272 B (68.625 KiB) = 61 layers x (512 + 64) x 2 B (bf16)" in out
    assert "not split" in out


def test_config_file_gives_the_same_figures_as_the_preset(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_8B_CONFIG))
    common = ("--gpu", "h100", "--dtype", "fp16", "--context", "128k")
    from_file = size_json(capsys, "--config", str(tmp_path / "config.json"), *common)
    from_preset = size_json(capsys, "--model", "llama-3.1-8b", *common)
    for key in ("bytes_per_token", "kv_per_sequence_bytes", "weights_bytes", "kv_budget_bytes_per_gpu",
                "max_sequences", "table"):
        assert from_file[key] == from_preset[key], key
    assert from_file["bytes_per_token"] == 131_072
    code, out, _ = size(capsys, "--config", str(tmp_path), *common)
    assert code == 0 and "17.18 GB (16.00 GiB)" in out


# --------------------------------------------------------------- capacity
def test_concurrency_is_floor_of_budget_over_kv_per_sequence(capsys):
    r = size_json(capsys, "--model", "llama-3-8b", "--gpu", "h100", "--dtype", "fp16", "--context", "128k")
    usable = math.floor(0.9 * 80 * 2**30)
    weights = 8_030_261_248 * 2
    assert r["usable_bytes_per_gpu"] == usable
    assert r["weights_bytes"] == weights
    assert r["kv_budget_bytes_per_gpu"] == usable - weights
    assert r["max_sequences"] == (usable - weights) // (131_072 * 131_072) == 3


def test_reserve_and_mem_fraction_shrink_the_budget(capsys):
    base = size_json(capsys, "--model", "mistral-7b", "--gpu", "a100-80gb", "--context", "32k")
    reserved = size_json(capsys, "--model", "mistral-7b", "--gpu", "a100-80gb", "--context", "32k",
                         "--reserve", "2GiB", "--mem-fraction", "0.8")
    memory = GPU_PRESETS["a100-80gb"].memory_bytes
    assert base["kv_budget_bytes_per_gpu"] - reserved["kv_budget_bytes_per_gpu"] == (
        math.floor(0.9 * memory) - math.floor(0.8 * memory) + 2 * 2**30)
    assert reserved["max_sequences"] <= base["max_sequences"]


def test_weights_that_do_not_fit(capsys):
    code, out, _ = size(capsys, "--model", "llama-3-70b", "--gpu", "h100", "--dtype", "bf16", "--context", "8k")
    assert code == 0
    assert "the weights do not fit" in out
    assert "max sequences   0" in out
    r = size_json(capsys, "--model", "llama-3-70b", "--gpu", "h100", "--context", "8k")
    assert r["kv_budget_bytes_per_gpu"] < 0 and r["max_sequences"] == 0
    assert not any(any(row) for row in r["table"]["fits"])


def test_tensor_parallel_splits_weights_and_kv_heads(capsys):
    one = size_json(capsys, "--model", "llama-3.1-70b", "--gpu", "h100", "--dtype", "fp8", "--context", "32k")
    four = size_json(capsys, "--model", "llama-3.1-70b", "--gpu", "h100", "--dtype", "fp8", "--context", "32k",
                     "--num-gpus", "4")
    assert four["bytes_per_token_per_gpu"] * 4 == four["bytes_per_token"] == one["bytes_per_token"]
    assert four["weights_bytes_per_gpu"] == -(-one["weights_bytes"] // 4)
    assert one["max_sequences"] == 0 < four["max_sequences"]


def test_table_marks_out_of_memory_consistently(capsys):
    r = size_json(capsys, "--model", "llama-3.1-8b", "--gpu", "l40s", "--context", "32k")
    t = r["table"]
    assert t["contexts"] == [1024, 4096, 8192, 16384, 32768]
    budget = r["kv_budget_bytes_per_gpu"]
    for b, kv_row, fits_row in zip(t["batches"], t["kv_bytes_per_gpu"], t["fits"]):
        for c, kv, fits in zip(t["contexts"], kv_row, fits_row):
            assert kv == b * -(-c // 16) * 16 * r["bytes_per_token_per_gpu"]
            assert fits == (kv <= budget)
    # Fits for small batches, runs out for large ones, and agrees with max_sequences at the context.
    assert t["fits"][0][0] and not t["fits"][-1][-1]
    col = t["contexts"].index(r["context"])
    for b, fits_row in zip(t["batches"], t["fits"]):
        assert fits_row[col] == (b <= r["max_sequences"])
    code, out, _ = size(capsys, "--model", "llama-3.1-8b", "--gpu", "l40s", "--context", "32k")
    assert "OOM" in out and "32K" in out


def test_decode_lower_bound_is_kv_bytes_over_bandwidth(capsys):
    r = size_json(capsys, "--model", "qwen2.5-7b", "--gpu", "h200", "--context", "64k")
    bandwidth = 4.8e12
    assert r["gpu"]["bandwidth_bytes_per_s"] == bandwidth
    for d in r["decode"]:
        assert d["kv_bytes_read_per_gpu"] == d["batch"] * 65_536 * r["bytes_per_token"]
        assert d["kv_seconds"] == pytest.approx(d["kv_bytes_read_per_gpu"] / bandwidth)
        assert d["total_seconds"] == pytest.approx((d["kv_bytes_read_per_gpu"] + d["weights_bytes_read_per_gpu"])
                                                   / bandwidth)
    assert [d["batch"] for d in r["decode"]] == [1, r["max_sequences"]]
    one = r["decode"][0]
    # one Qwen2.5-7B sequence of 64K tokens: 28 layers x 2 x 4 heads x 128 x 2 B x 65,536 / 4.8 TB/s.
    assert one["kv_seconds"] == pytest.approx(28 * 2 * 4 * 128 * 2 * 65_536 / 4.8e12)


def test_custom_gpu_and_moe_active_weights(capsys):
    r = size_json(capsys, "--model", "mixtral-8x7b", "--gpu-memory", "96GiB", "--bandwidth", "1TB/s",
                  "--context", "8k")
    assert r["gpu"]["memory_bytes"] == 96 * 2**30 and r["gpu"]["bandwidth_bytes_per_s"] == 1e12
    preset = MODEL_PRESETS["mixtral-8x7b"]
    assert r["decode"][0]["weights_bytes_read_per_gpu"] == 2 * preset.num_active_params
    assert r["weights_bytes"] == 2 * preset.num_params


def test_config_without_param_estimate_needs_params(tmp_path, capsys):
    cfg = {"model_type": "gemma", "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
           "head_dim": 256, "hidden_size": 3072, "max_position_embeddings": 8192}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    r = size_json(capsys, "--config", str(path), "--gpu", "l40s")
    assert r["bytes_per_token"] == 28 * 2 * 16 * 256 * 2
    assert r["weights_bytes"] is None and r["max_sequences"] is None
    code, out, _ = size(capsys, "--config", str(path), "--gpu", "l40s")
    assert "pass --params" in out
    r = size_json(capsys, "--config", str(path), "--gpu", "l40s", "--params", "8.54B")
    assert r["weights_bytes"] == 2 * 8_540_000_000 and r["max_sequences"] >= 1


def test_without_gpu_only_the_model_figures(capsys):
    r = size_json(capsys, "--model", "opt-13b")
    assert r["context"] == 2048 and r["gpu"] is None and r["max_sequences"] is None
    assert r["kv_per_sequence_bytes"] == 2048 * 819_200


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv, fragment",
    [
        (("--model", "llama-9"), "llama-3-8b"),  # lists the valid names
        (("--model", "llama-3-8b", "--gpu", "tpu"), "h100"),
        (("--model", "llama-3-8b", "--context", "12q"), "--context"),
        (("--model", "llama-3-8b", "--dtype", "fp6"), "--dtype"),
        (("--model", "llama-3-8b", "--num-gpus", "0"), "--num-gpus"),
        (("--model", "llama-3-8b", "--gpu", "h100", "--num-gpus", "3"), "--num-gpus must"),
        (("--model", "llama-3-8b", "--gpu", "h100", "--reserve", "2 bananas"), "--reserve"),
        (("--model", "llama-3-8b", "--gpu", "h100", "--mem-fraction", "1.5"), "--mem-fraction must"),
        (("--model", "llama-3-8b", "--bandwidth", "1TB/s"), "--bandwidth"),
        (("--config", "/nonexistent/config.json"), "readable JSON"),
        ((), "--model"),
    ],
)
def test_bad_arguments_exit_2_with_a_typed_message(capsys, argv, fragment):
    code, out, err = size(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("pagedkv size: error: ") and fragment in err


def test_list_shows_every_preset_with_its_source(capsys):
    code, out, _ = size(capsys, "--list")
    assert code == 0
    for name in (*MODEL_PRESETS, *GPU_PRESETS):
        assert name in out
    assert "3.35 TB/s" in out and "4.8 TB/s" in out


# ----------------------------------------------------------------- parsing
def test_parsers():
    assert parse_tokens("128k") == parse_tokens("128K") == 131_072
    assert parse_tokens("131,072") == 131_072 and parse_tokens("1m") == 2**20 and parse_tokens("0.5k") == 512
    assert parse_size("80GiB", "x") == 80 * 2**30 and parse_size("1.5GB", "x") == 1_500_000_000
    assert parse_size("0", "x") == 0 and parse_size("1e9", "x") == 10**9
    assert parse_rate("3.35TB/s") == 3.35e12 and parse_rate("864 GB/s") == 864e9
    assert parse_count("70.6B") == 70_600_000_000 and parse_count("8030261248") == 8_030_261_248
    for bad in ("", "k", "1.5", "-3", "3x"):
        with pytest.raises(InvalidArgument):
            parse_tokens(bad)
    with pytest.raises(InvalidArgument):
        parse_size("3 GB/s", "--reserve")
    with pytest.raises(InvalidArgument):
        parse_rate("0TB/s")


def test_fmt_bytes_prints_decimal_and_binary():
    assert fmt_bytes(17_179_869_184) == "17.18 GB (16.00 GiB)"
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(-2 * 10**9) == "-2.00 GB (-1.86 GiB)"
