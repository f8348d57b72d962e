"""KVCacheSpec, the presets, config.json reading and the budget math (pagedkv.spec)."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedkv import BlockManager, InvalidArgument, InvalidType
from pagedkv.errors import BackendUnavailable
from pagedkv.spec import (
    GPU_PRESETS,
    MODEL_PRESETS,
    KVCacheSpec,
    estimate_num_params,
    gpu_budget_bytes,
    gpu_preset,
    kv_budget_bytes,
    max_sequences,
    model_preset,
    num_pages_for_budget,
    weights_bytes,
)

K128 = 128 * 1024  # "128K tokens" as model cards mean it


# ------------------------------------------------------------ the checks
def test_llama3_70b_bf16_128k_one_sequence():
    spec = model_preset("llama-3-70b").spec.with_dtype("bf16")
    assert spec.bytes_for(K128) == 2 * 80 * 8 * 128 * 131_072 * 2 == 42_949_672_960
    assert round(spec.bytes_for(K128) / 1e9) == 43


def test_llama3_8b_fp16_per_token_and_128k():
    spec = model_preset("llama-3-8b").spec.with_dtype("fp16")
    assert spec.bytes_per_token == 131_072 == 128 * 1024
    one_seq = spec.bytes_for(K128)
    assert round(one_seq / 1e9, 2) == 17.18
    assert one_seq == 16 * 2**30
    # Counting the 32 query heads instead of the 8 KV heads is the classic 4x error; the spec
    # must use the KV heads.
    assert (spec.num_q_heads, spec.num_kv_heads) == (32, 8)
    wrong = 2 * spec.num_layers * spec.num_q_heads * spec.head_dim * 2 * K128
    assert one_seq * 4 == wrong


def test_llama3_70b_fp8_per_token():
    assert model_preset("llama-3-70b").spec.with_dtype("fp8").bytes_per_token == 163_840 == 160 * 1024


def test_deepseek_v3_mla_bf16_per_token_has_no_factor_two():
    spec = model_preset("deepseek-v3").spec
    assert spec.attention == "mla" and spec.dtype == "bf16"
    assert spec.bytes_per_token == 61 * (512 + 64) * 2 == 70_272
    assert spec.kv_factor == 1


def test_opt_13b_matches_the_vllm_paper():
    # vLLM paper: 2 (K and V) x 5120 (hidden) x 40 (layers) x 2 (FP16 bytes) = 800 KB per token.
    assert model_preset("opt-13b").spec.bytes_per_token == 2 * 5120 * 40 * 2 == 819_200


# --------------------------------------------------------------------- spec
def test_dtypes_scale_bytes_and_int4_is_half_of_int8():
    spec = model_preset("llama-3-8b").spec
    sizes = {d: spec.with_dtype(d).bytes_per_token for d in ("fp32", "fp16", "bf16", "fp8", "int8", "int4")}
    assert sizes["fp32"] == 2 * sizes["fp16"] == 2 * sizes["bf16"] == 4 * sizes["fp8"] == 4 * sizes["int8"]
    assert sizes["int4"] * 2 == sizes["int8"]
    assert spec.with_dtype("bfloat16").dtype == "bf16"
    assert spec.with_dtype("torch.float16").dtype == "fp16"


def test_attention_kind_is_inferred():
    assert KVCacheSpec(2, 4, 64, num_q_heads=4).attention == "mha"
    assert KVCacheSpec(2, 2, 64, num_q_heads=8).attention == "gqa"
    assert KVCacheSpec(2, 1, 64, num_q_heads=8).attention == "mqa"
    assert KVCacheSpec.mla(2, 8, 4).attention == "mla"
    mqa = KVCacheSpec(3, 1, 64, "fp16")
    assert mqa.bytes_per_token == 3 * 2 * 1 * 64 * 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_layers=0, num_kv_heads=1, head_dim=8), "num_layers"),
        (dict(num_layers=1, num_kv_heads=3, head_dim=8, num_q_heads=8), "num_q_heads"),
        (dict(num_layers=1, num_kv_heads=8, head_dim=8, num_q_heads=4), "num_q_heads"),
        (dict(num_layers=1, num_kv_heads=2, head_dim=8, attention="mqa"), "attention"),
        (dict(num_layers=1, num_kv_heads=2, head_dim=8, num_q_heads=8, attention="mha"), "attention"),
        (dict(num_layers=1, num_kv_heads=8, head_dim=8, num_q_heads=8, attention="gqa"), "attention"),
        (dict(num_layers=1, num_kv_heads=1, head_dim=8, attention="sparse"), "attention"),
        (dict(num_layers=1, num_kv_heads=1, head_dim=8, attention="mqa", kv_lora_rank=4), "attention"),
        (dict(num_layers=1, num_kv_heads=1, head_dim=8, kv_lora_rank=4), "head_dim"),
        (dict(num_layers=1, num_kv_heads=2, head_dim=12, attention="mla", kv_lora_rank=8, rope_head_dim=4),
         "head_dim"),
        (dict(num_layers=1, num_kv_heads=1, head_dim=8, dtype="fp6"), "dtype"),
    ],
)
def test_contradictory_or_bad_fields_are_rejected_by_name(kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        KVCacheSpec(**kwargs)
    assert info.value.name == field
    assert field in str(info.value)


def test_bad_types_are_typed_errors():
    with pytest.raises(InvalidType):
        KVCacheSpec(2.0, 1, 8)
    with pytest.raises(InvalidType):
        KVCacheSpec(True, 1, 8)
    with pytest.raises(InvalidType):
        KVCacheSpec(2, 1, 8, dtype=16)


def test_spec_is_frozen_hashable_and_pickles():
    spec = model_preset("qwen2.5-7b").spec
    with pytest.raises(AttributeError):
        spec.num_layers = 3
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert hash(spec) == hash(KVCacheSpec(28, 4, 128, "bf16", "gqa", 28))


def test_pages_and_page_rounding():
    spec = KVCacheSpec(2, 2, 4, "fp16")  # 2 * 2 * 2 * 4 * 2 = 64 bytes per token
    assert spec.bytes_per_token == 64
    assert spec.pages_for(0, 16) == 0
    assert spec.pages_for(1, 16) == spec.pages_for(16, 16) == 1
    assert spec.pages_for(17, 16) == 2
    assert spec.page_bytes(16) == 16 * 64
    assert spec.bytes_for(17) == 17 * 64
    assert spec.bytes_for(17, page_size=16) == 2 * 16 * 64
    with pytest.raises(InvalidArgument):
        spec.pages_for(5, 0)


def test_shard_splits_kv_heads_replicates_small_groups_and_keeps_mla_whole():
    spec = model_preset("llama-3-70b").spec  # 8 KV heads
    assert spec.shard(1) is spec
    assert spec.shard(4).num_kv_heads == 2
    assert spec.shard(4).bytes_per_token * 4 == spec.bytes_per_token
    assert spec.shard(16).num_kv_heads == 1  # replicated: 16 ranks x 1 head > 8 heads
    with pytest.raises(InvalidArgument) as info:
        spec.shard(3)
    assert info.value.name == "num_gpus"
    mla = model_preset("deepseek-v3").spec
    assert mla.shard(8) == mla


@given(st.integers(1, 8), st.sampled_from([1, 2, 4, 8]), st.sampled_from([64, 128]),
       st.sampled_from(["fp16", "fp8", "int4"]), st.integers(0, 10**6), st.integers(0, 10**6))
def test_bytes_are_linear_in_tokens(layers, kv_heads, head_dim, dtype, a, b):
    spec = KVCacheSpec(layers, kv_heads, head_dim, dtype)
    assert spec.bytes_for(a + b) == spec.bytes_for(a) + spec.bytes_for(b)


@given(st.integers(0, 10**7), st.integers(1, 300))
def test_pages_cover_exactly(num_tokens, page_size):
    pages = KVCacheSpec(1, 1, 64).pages_for(num_tokens, page_size)
    assert pages * page_size >= num_tokens > (pages - 1) * page_size


# ------------------------------------------------------------------- config.json
LLAMA_3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "rope_theta": 500000.0,
}
DEEPSEEK_V3_CONFIG = {
    "model_type": "deepseek_v3", "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "hidden_size": 7168, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128, "v_head_dim": 128, "torch_dtype": "bfloat16",
}


def test_from_hf_config_dict_file_and_directory(tmp_path):
    expected = model_preset("llama-3-8b").spec
    assert KVCacheSpec.from_hf_config(LLAMA_3_8B_CONFIG) == expected
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_8B_CONFIG))
    assert KVCacheSpec.from_hf_config(tmp_path / "config.json") == expected
    assert KVCacheSpec.from_hf_config(str(tmp_path)) == expected
    assert KVCacheSpec.from_hf_config(LLAMA_3_8B_CONFIG, dtype="fp8").bytes_per_token == 65_536


def test_from_hf_config_mla_ignores_num_key_value_heads():
    spec = KVCacheSpec.from_hf_config(DEEPSEEK_V3_CONFIG)
    assert spec == model_preset("deepseek-v3").spec
    assert spec.bytes_per_token == 70_272


def test_from_hf_config_defaults():
    mha = KVCacheSpec.from_hf_config({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256})
    assert (mha.attention, mha.num_kv_heads, mha.head_dim, mha.dtype) == ("mha", 4, 64, "bf16")
    null_kv = KVCacheSpec.from_hf_config({"num_hidden_layers": 2, "num_attention_heads": 4,
                                          "num_key_value_heads": None, "head_dim": 32, "torch_dtype": "float32"})
    assert (null_kv.num_kv_heads, null_kv.head_dim, null_kv.dtype) == (4, 32, "fp32")
    # head_dim need not equal hidden_size / heads (Gemma-style): head_dim wins.
    gemma = KVCacheSpec.from_hf_config({"num_hidden_layers": 28, "num_attention_heads": 16, "head_dim": 256,
                                        "hidden_size": 3072})
    assert gemma.head_dim == 256
    multimodal = {"model_type": "llava", "text_config": dict(LLAMA_3_8B_CONFIG)}
    assert KVCacheSpec.from_hf_config(multimodal) == model_preset("llama-3-8b").spec


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_hidden_layers": None}, "num_hidden_layers"),
        ({"num_attention_heads": None}, "num_attention_heads"),
        ({"num_key_value_heads": 64}, "num_key_value_heads"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"hidden_size": 4100}, "hidden_size"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"torch_dtype": "float6"}, "torch_dtype"),
        ({"qk_rope_head_dim": 64}, "kv_lora_rank"),
    ],
)
def test_from_hf_config_errors_name_the_field(change, field):
    cfg = {k: v for k, v in {**LLAMA_3_8B_CONFIG, **change}.items() if v is not None}
    with pytest.raises(InvalidArgument) as info:
        KVCacheSpec.from_hf_config(cfg)
    assert info.value.name == f"config.json field {field!r}"
    assert repr(field) in str(info.value)


def test_from_hf_config_mla_needs_rope_dim_and_types_are_checked():
    cfg = {k: v for k, v in DEEPSEEK_V3_CONFIG.items() if k != "qk_rope_head_dim"}
    with pytest.raises(InvalidArgument, match="qk_rope_head_dim"):
        KVCacheSpec.from_hf_config(cfg)
    with pytest.raises(InvalidType, match="num_hidden_layers"):
        KVCacheSpec.from_hf_config({**LLAMA_3_8B_CONFIG, "num_hidden_layers": "32"})
    with pytest.raises(InvalidType, match="num_key_value_heads"):
        KVCacheSpec.from_hf_config({**LLAMA_3_8B_CONFIG, "num_key_value_heads": 8.5})


def test_from_hf_config_names_other_dialects_fields():
    falcon_style = {"n_layer": 32, "n_head": 71, "multi_query": True, "hidden_size": 4544}
    with pytest.raises(InvalidArgument) as info:
        KVCacheSpec.from_hf_config(falcon_style)
    assert "num_hidden_layers" in str(info.value) and "n_layer" in str(info.value)
    # Standard names present, but the KV heads given in another dialect's field: refuse, naming it.
    with pytest.raises(InvalidArgument) as info:
        KVCacheSpec.from_hf_config({"num_hidden_layers": 32, "num_attention_heads": 71, "hidden_size": 4544,
                                    "multi_query": True})
    assert info.value.name == "config.json field 'multi_query'"
    ok = KVCacheSpec.from_hf_config({"num_hidden_layers": 32, "num_attention_heads": 71, "hidden_size": 4544,
                                     "multi_query": True, "num_key_value_heads": 1})
    assert ok.attention == "mqa" and ok.head_dim == 64


def test_from_hf_config_unreadable_inputs(tmp_path):
    with pytest.raises(InvalidArgument, match="readable JSON"):
        KVCacheSpec.from_hf_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidArgument, match="readable JSON"):
        KVCacheSpec.from_hf_config(bad)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InvalidArgument, match="JSON object"):
        KVCacheSpec.from_hf_config(tmp_path / "list.json")
    with pytest.raises(InvalidType):
        KVCacheSpec.from_hf_config(42)


# ------------------------------------------------------------------- presets
# Published parameter counts (model cards / papers), in billions, and active counts for MoE.
PUBLISHED_PARAMS_B = {
    "llama-3-8b": 8.03, "llama-3.1-8b": 8.03, "llama-3-70b": 70.6, "llama-3.1-70b": 70.6, "llama-3.1-405b": 405,
    "mistral-7b": 7.25, "mixtral-8x7b": 46.7, "qwen2.5-7b": 7.61, "qwen2.5-72b": 72.7, "deepseek-v3": 671,
    "opt-13b": 13, "gpt-oss-20b": 21, "gpt-oss-120b": 117, "gemma-3-27b": 27, "llama-4-scout": 109,
    "qwen3-next-80b": 80,
}


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_preset_param_counts_match_published_figures(name):
    preset = MODEL_PRESETS[name]
    published = PUBLISHED_PARAMS_B[name] * 1e9
    assert abs(preset.num_params - published) / published < 0.012
    assert preset.num_active_params <= preset.num_params
    assert preset.source and preset.hf_id


def test_moe_active_params():
    assert abs(model_preset("mixtral-8x7b").num_active_params - 12.9e9) / 12.9e9 < 0.005
    assert model_preset("deepseek-v3").num_active_params == 37 * 10**9


def test_estimate_num_params_from_config():
    assert estimate_num_params(LLAMA_3_8B_CONFIG) == (8_030_261_248, 8_030_261_248)
    assert estimate_num_params(DEEPSEEK_V3_CONFIG) is None
    tied = estimate_num_params({**LLAMA_3_8B_CONFIG, "tie_word_embeddings": True})
    assert tied[0] == 8_030_261_248 - 128256 * 4096


def test_preset_lookup_is_forgiving_and_errors_list_names():
    assert model_preset("Llama-3-70B") is MODEL_PRESETS["llama-3-70b"]
    assert model_preset("meta-llama/Meta-Llama-3-70B") is MODEL_PRESETS["llama-3-70b"]
    assert model_preset("llama_3_8b") is MODEL_PRESETS["llama-3-8b"]
    assert gpu_preset("H100-SXM") is GPU_PRESETS["h100"]
    with pytest.raises(InvalidArgument) as info:
        model_preset("llama-2-7b")
    assert info.value.name == "model"
    assert all(name in str(info.value) for name in MODEL_PRESETS)
    with pytest.raises(InvalidArgument) as info:
        gpu_preset("tpu-v5")
    assert all(name in str(info.value) for name in GPU_PRESETS)
    with pytest.raises(InvalidType):
        gpu_preset(None)


def test_gpu_presets_match_datasheets():
    # (capacity in GiB as vendors' binary "GB", bandwidth in TB/s) from each datasheet.
    datasheet = {"a100-40gb": (40, 1.555), "a100-80gb": (80, 2.039), "h100": (80, 3.35), "h100-pcie": (80, 2.0),
                 "h200": (141, 4.8), "mi300x": (192, 5.3), "l40s": (48, 0.864)}
    assert set(datasheet) == set(GPU_PRESETS)
    for name, (gib, tbps) in datasheet.items():
        gpu = GPU_PRESETS[name]
        assert gpu.memory_bytes == gib * 2**30
        assert gpu.bandwidth_bytes_per_s == pytest.approx(tbps * 1e12)


# ------------------------------------------------------------------- budgets
def test_num_pages_for_budget_is_floor_of_whole_pages():
    spec = model_preset("llama-3-8b").spec.with_dtype("fp16")
    page = spec.page_bytes(16)
    assert page == 16 * 131_072
    assert num_pages_for_budget(spec, 10 * page, 16) == 10
    assert num_pages_for_budget(spec, 10 * page - 1, 16) == 9
    assert num_pages_for_budget(spec, page, 16) == 1
    with pytest.raises(InvalidArgument) as info:
        num_pages_for_budget(spec, page - 1, 16)
    assert info.value.name == "budget_bytes"
    with pytest.raises(InvalidArgument, match="llama-3-8b"):  # a name is a preset lookup, listing the presets
        num_pages_for_budget("llama", page, 16)
    with pytest.raises(InvalidType):
        num_pages_for_budget(42, page, 16)
    with pytest.raises(InvalidType):
        num_pages_for_budget(spec, float(page), 16)


@given(st.integers(1, 10**6), st.integers(0, 10**6), st.sampled_from([1, 16, 256]))
def test_num_pages_for_budget_property(num_pages, remainder, page_size):
    spec = KVCacheSpec(2, 2, 64, "fp8")
    page = spec.page_bytes(page_size)
    assert num_pages_for_budget(spec, num_pages * page + remainder % page, page_size) == num_pages


def test_max_sequences_and_kv_budget():
    spec = model_preset("llama-3-8b").spec.with_dtype("fp16")
    memory = GPU_PRESETS["h100"].memory_bytes
    weights = weights_bytes(model_preset("llama-3-8b").num_params, "bf16")
    assert weights == 2 * 8_030_261_248
    budget = kv_budget_bytes(memory, weights, 0.9)
    assert budget == int(0.9 * 80 * 2**30) - weights
    assert max_sequences(spec, budget, K128, 16) == budget // spec.bytes_for(K128) == 3
    assert max_sequences(spec, -5, K128, 16) == 0
    assert kv_budget_bytes(memory, 10**12) < 0
    with pytest.raises(InvalidArgument):
        kv_budget_bytes(memory, weights, 1.5)
    with pytest.raises(InvalidType):
        kv_budget_bytes(memory, weights, "0.9")


def test_block_manager_for_budget():
    spec = KVCacheSpec(2, 2, 64, "fp16")
    page = spec.page_bytes(16)
    mgr = BlockManager.for_budget(spec, 100 * page + 7, 16, watermark=0.1)
    assert (mgr.num_pages, mgr.page_size, mgr.watermark_pages) == (100, 16, 10)
    mgr.allocate(0, 16 * 50)
    assert mgr.num_free_pages == 50
    with pytest.raises(InvalidArgument):
        BlockManager.for_budget(spec, page - 1, 16)


def test_gpu_budget_bytes_without_cuda_is_a_typed_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the arithmetic test below covers it")
    with pytest.raises(BackendUnavailable) as info:
        gpu_budget_bytes(0.9)
    assert "cuda" in str(info.value)


def test_gpu_budget_bytes_takes_a_fraction_of_free_memory(monkeypatch):
    torch = pytest.importorskip("torch")
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: calls.append(device) or (10_000, 80_000))
    assert gpu_budget_bytes(0.5, device=1) == 5_000
    assert gpu_budget_bytes(1.0) == 10_000
    assert calls == [1, None]
    for bad in (0.0, 1.01, float("nan")):
        with pytest.raises(InvalidArgument):
            gpu_budget_bytes(bad)
    with pytest.raises(InvalidType):
        gpu_budget_bytes(True)


def test_importing_spec_does_not_import_torch(run_python):
    code = "import sys, pagedkv.spec, pagedkv.commands.size; print('torch' in sys.modules)"
    out = run_python(code)
    assert out.stdout.strip() == "False"
