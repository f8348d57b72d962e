"""Quantized KV pages on the torch side: formats, quantize/dequantize, PagedKVCache, sizing.

The Triton kernels on quantized pages are tested in tests/kernels/test_quant_kernels.py.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pagedkv import BlockManager  # noqa: E402
from pagedkv.cache import PagedKVCache  # noqa: E402
from pagedkv.commands import frag, size  # noqa: E402
from pagedkv.errors import InvalidArgument, InvalidType  # noqa: E402
from pagedkv.kernels import quant, reference  # noqa: E402
from pagedkv.spec import KVCacheSpec, default_kv_scales, model_preset  # noqa: E402

INT8, FP8 = quant.INT8, quant.FP8_E4M3


# ------------------------------------------------------------- quantize / dequantize
def test_int8_rounds_half_to_even_and_clamps():
    # max|x| = 127 -> scale 1, so q is x rounded: ties go to the even integer
    x = torch.tensor([[127.0, -63.5, 0.5, 1.5, 2.5, -2.5, -0.4, 3.49]])
    q, scale = quant.quantize_per_token_head(x, INT8)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.tolist() == [1.0]
    assert q.tolist() == [[127, -64, 0, 2, 2, -2, 0, 3]]
    # per tensor: x / 0.5, clamped to +-127 (no -128: the format is symmetric)
    q = quant.quantize_per_tensor(torch.tensor([10.25, -1000.0, 63.75, 0.25]), 0.5, INT8)
    assert q.tolist() == [20, -127, 127, 0]


def test_int8_scale_is_max_over_127_per_token_and_head():
    x = torch.tensor([[[2.54, -1.0, 0.0], [0.0, 0.0, 0.0]], [[-12.7, 6.35, 1.0], [1.0, 0.0, -0.5]]])
    q, scale = quant.quantize_per_token_head(x, INT8)
    assert scale.shape == (2, 2)
    want_scale = x.abs().amax(-1) / 127
    assert torch.equal(scale, want_scale)
    assert scale[0, 1] == 0 and q[0, 1].tolist() == [0, 0, 0]  # a zero vector: scale 0, zeros
    assert q[0, 0].tolist() == [127, -50, 0] and q[1, 0].tolist() == [-127, 64, 10]
    assert q[1, 1].tolist() == [127, 0, -64]  # -63.5 -> -64 (ties to even)


def test_fp8_e4m3_rounds_to_nearest_even_on_its_grid():
    # scale 1 (per tensor): values land on the e4m3 grid
    x = torch.tensor([17.0, 19.0, 448.0, 500.0, -1e6, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 0.3, -0.0, 1.0625])
    q = quant.quantize_per_tensor(x, 1.0, FP8)
    assert q.dtype == torch.float8_e4m3fn
    # [16, 32) has spacing 2: 17 ties to 16 (even mantissa), 19 to 20; beyond 448 clamps (no NaN);
    # subnormals have spacing 2**-9: 2**-10 ties to 0, 3 * 2**-10 to 2**-8; 0.3 -> 0.3125 (spacing 2**-5)
    assert q.float().tolist() == [16.0, 20.0, 448.0, 448.0, -448.0, 2.0**-9, 0.0, 2.0**-8, 0.3125, -0.0, 1.0]
    assert q.view(torch.uint8)[9] == 0x80  # -0.0 keeps its sign
    # per (token, head): max|x| maps to 448
    q, scale = quant.quantize_per_token_head(torch.tensor([[1.0, -0.5, 0.0, 0.25]]), FP8)
    assert torch.equal(scale, torch.tensor([1.0]) / 448) and q.float().tolist()[0] == [448.0, -224.0, 0.0, 112.0]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3), st.sampled_from(["int8", "fp8_e4m3"]))
def test_round_trip_error_is_within_half_a_step(seed, magnitude, name):
    fmt = quant.FORMATS[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 64, generator=gen) * magnitude
    x[0, 0] *= 100  # an outlier vector
    q, scale = quant.quantize_per_token_head(x, fmt)
    error = (quant.dequantize(q, scale) - x).abs()
    y = (x / scale[..., None]).abs()
    if fmt is INT8:
        step = scale[..., None].expand_as(x)  # a uniform grid of spacing `scale`
    else:
        # e4m3 spacing: 2**(floor(log2|y|) - 3) in the normal range, 2**-9 below 2**-6
        exponent = torch.floor(torch.log2(y.clamp_min(2.0**-6)))
        step = torch.exp2(exponent - 3) * scale[..., None]
    # half a step, plus fp32 rounding of the product q * scale (relative 2**-24 of |x|)
    assert torch.all(error <= step / 2 * (1 + 1e-6) + x.abs() * 2.0**-23)


def test_dequantize_per_tensor_and_calibration():
    q = torch.tensor([[-127, 0, 64]], dtype=torch.int8)
    assert quant.dequantize(q, 0.5).tolist() == [[-63.5, 0.0, 32.0]]
    x = torch.tensor([3.0, -896.0, 1.0])
    assert quant.tensor_scale(x, FP8) == 2.0 and quant.tensor_scale(torch.zeros(3), FP8) == 1.0


def test_format_names_and_unsupported_devices():
    assert quant.kv_format("fp8") is FP8 and quant.kv_format(torch.float8_e4m3fn) is FP8
    assert quant.kv_format("INT8") is INT8 and quant.kv_format(torch.float16) is None
    assert quant.kv_format("fp8_e5m2") is None
    assert quant.unsupported_reason(FP8, (9, 0), "cuda:0 (H100)") is None
    assert quant.unsupported_reason(FP8, (8, 9), "cuda:0 (L40S)") is None
    assert quant.unsupported_reason(INT8, (7, 5), "cuda:0 (T4)") is None
    assert quant.unsupported_reason(FP8, None, "cpu") is None
    reason = quant.unsupported_reason(FP8, (8, 0), "cuda:1 (NVIDIA A100-SXM4-80GB)")
    assert "fp8_e4m3 needs a GPU of compute capability >= 8.9" in reason
    assert "cuda:1 (NVIDIA A100-SXM4-80GB) has compute capability 8.0" in reason


def test_fp8_on_an_older_gpu_is_refused_with_what_was_found(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(InvalidArgument, match=r"kv_dtype must be a format this GPU supports: fp8_e4m3 needs a GPU "
                                              r"of compute capability >= 8.9 .* cuda:0 \(NVIDIA A100-SXM4-80GB\) "
                                              r"has compute capability 8.0.*got 'fp8_e4m3'"):
        quant.check_supported(FP8, torch.device("cuda", 0))
    quant.check_supported(INT8, torch.device("cuda", 0))  # int8 runs on sm_80


# ---------------------------------------------------------------------- PagedKVCache
def _cache(**overrides) -> PagedKVCache:
    args = dict(num_layers=2, num_pages=12, page_size=4, num_kv_heads=2, head_dim=16, dtype=torch.float16,
                device="cpu", kv_dtype="int8")
    args.update(overrides)
    return PagedKVCache(**args)


def test_storage_scales_and_bytes_per_token():
    cache = _cache()
    assert cache.kv.dtype == torch.int8 and cache.dtype == torch.float16 and cache.is_quantized
    assert cache.kv_scale == "per_token_head" and cache.tensor_scales is None
    assert cache.scales.shape == (2, 2, 12, 4, 2) and cache.scales.dtype == torch.float32
    assert cache.k_scale_cache(1).data_ptr() == cache.scales[1, 0].data_ptr()
    # per token: 2 layers x 2 (K, V) x 2 heads x (16 x 1 B + 4 B)
    assert cache.bytes_per_token == 2 * 2 * 2 * (16 + 4) == 160
    assert cache.page_nbytes == 4 * 160 and cache.nbytes == 12 * 4 * 160
    native = _cache(kv_dtype=None)
    assert native.bytes_per_token == 2 * 2 * 2 * 16 * 2 and native.scales is None and not native.is_quantized
    fp8 = _cache(kv_dtype="fp8_e4m3", k_scale=[0.5, 2.0])
    assert fp8.kv.dtype == torch.float8_e4m3fn and fp8.kv_scale == "per_tensor" and fp8.scales is None
    assert fp8.tensor_scales == ((0.5, 1.0), (2.0, 1.0)) and fp8.bytes_per_token == 2 * 2 * 2 * 16
    assert "kv_dtype='fp8_e4m3', kv_scale='per_tensor'" in repr(fp8)


def test_llama3_8b_memory_per_token_halves():
    # 32 layers, 8 KV heads, head_dim 128 (a cache of 1 page of 16 tokens)
    caches = {name: PagedKVCache(32, 1, 16, 8, 128, dtype=torch.bfloat16, device="cpu", kv_dtype=kv, kv_scale=scale)
              for name, kv, scale in [("bf16", None, None), ("int8", "int8", None), ("fp8", "fp8", None),
                                      ("fp8 per token", "fp8", "per_token_head")]}
    got = {name: cache.bytes_per_token for name, cache in caches.items()}
    assert got == {"bf16": 131_072, "int8": 65_536 + 2_048, "fp8": 65_536, "fp8 per token": 67_584}
    spec = model_preset("llama-3-8b").spec
    assert spec.with_dtype("int8", "per_token_head").bytes_per_token == got["int8"]
    assert spec.with_dtype("fp8", "per_tensor").bytes_per_token == got["fp8"]


@pytest.mark.parametrize("overrides, error, match", [
    (dict(kv_dtype="int4"), InvalidArgument, r"kv_dtype must be None \(the dtype, torch.float16\), 'int8' or "
                                             r"'fp8_e4m3', got 'int4'"),
    (dict(kv_dtype=torch.bfloat16), InvalidArgument, r"kv_dtype must be None"),
    (dict(kv_scale="per_tensor"), InvalidArgument,
     r"kv_scale must be 'per_token_head' \(the only layout of int8 pages\) or None"),
    (dict(kv_dtype=None, kv_scale="per_tensor"), InvalidArgument, r"kv_scale must be None for unquantized pages"),
    (dict(kv_dtype="fp8", kv_scale="per_token"), InvalidArgument, r"kv_scale must be one of 'per_tensor', "
                                                                  r"'per_token_head'"),
    (dict(k_scale=0.5), InvalidArgument, r"k_scale must be None unless kv_scale='per_tensor'"),
    (dict(kv_dtype="fp8", v_scale=0.0), InvalidArgument, r"v_scale must be a positive finite float"),
    (dict(kv_dtype="fp8", k_scale=[1.0]), InvalidArgument, r"k_scale must be one float or one per layer \(2\)"),
    (dict(kv_dtype="fp8", k_scale="1"), InvalidType, r"k_scale must be a positive float or 2 of them"),
])
def test_bad_quantization_arguments(overrides, error, match):
    with pytest.raises(error, match=match):
        _cache(**overrides)


def test_native_dtype_names_still_mean_unquantized():
    assert not _cache(kv_dtype="auto").is_quantized
    assert not _cache(kv_dtype="fp16").is_quantized and not _cache(kv_dtype=torch.float16).is_quantized


@pytest.mark.parametrize("kv_dtype, kv_scale", [("int8", None), ("fp8", None), ("fp8", "per_token_head")])
def test_write_then_attention_dequantizes(kv_dtype, kv_scale):
    gen = torch.Generator().manual_seed(0)
    mgr = BlockManager(num_pages=12, page_size=4, backend="python")
    cache = _cache(kv_dtype=kv_dtype, kv_scale=kv_scale, dtype=torch.float32, k_scale=0.01 if kv_scale is None
                   and kv_dtype == "fp8" else None)
    mgr.allocate(0, 7)
    plan = cache.plan(mgr.page_tables([0]), query_lens=7)
    k, v = torch.randn(7, 2, 16, generator=gen), torch.randn(7, 2, 16, generator=gen)
    cache.write(1, k, v, plan)
    fmt = quant.kv_format(kv_dtype)
    # the pages hold exactly what the torch quantizer produces
    slots = plan.slot_mapping
    stored = quant.byte_view(cache.k_cache(1)).view(-1, 2, 16)[slots].view(fmt.dtype)
    if cache.kv_scale == "per_token_head":
        want_q, want_scale = quant.quantize_per_token_head(k, fmt)
        assert torch.equal(cache.k_scale_cache(1).view(-1, 2)[slots], want_scale)
        keys = quant.dequantize(want_q, want_scale)
    else:
        want_q = quant.quantize_per_tensor(k, 0.01, fmt)
        keys = quant.dequantize(want_q, 0.01)
    assert torch.equal(stored.view(torch.uint8), want_q.view(torch.uint8))
    q = torch.randn(7, 4, 16, generator=gen)
    out = cache.prefill(1, q, plan)
    values = reference.gather_kv(cache.k_cache(1), cache.v_cache(1), plan.page_table[0], 7,
                                 **cache._scale_args(1))[1]
    torch.testing.assert_close(out, reference.attend(q, keys, values, torch.arange(7)))
    assert out.dtype == torch.float32


def test_copy_on_write_moves_scales_with_pages():
    mgr, cache = BlockManager(num_pages=12, page_size=4, backend="python"), _cache()
    mgr.allocate(0, 6)
    cache.kv.copy_(torch.randint(-127, 128, cache.kv.shape, dtype=torch.int8))
    cache.scales.copy_(torch.rand(cache.scales.shape))
    mgr.fork(0, 1)
    (src, dst), = mgr.append(1)
    before_kv, before_scales = cache.kv.clone(), cache.scales.clone()
    cache.copy([(src, dst)])
    assert torch.equal(cache.kv[:, :, dst], before_kv[:, :, src])
    assert torch.equal(cache.scales[:, :, dst], before_scales[:, :, src])
    others = [p for p in range(12) if p != dst]
    assert torch.equal(cache.scales[:, :, others], before_scales[:, :, others])


@pytest.mark.parametrize("kv_dtype, kv_scale", [("int8", None), ("fp8", "per_token_head"), ("fp8", "per_tensor")])
def test_swap_round_trip_moves_scales(kv_dtype, kv_scale):
    mgr = BlockManager(num_pages=12, page_size=4, num_cpu_pages=6, backend="python")
    cache = _cache(kv_dtype=kv_dtype, kv_scale=kv_scale, num_cpu_pages=6)
    assert cache.cpu_kv.dtype == cache.kv.dtype
    assert (cache.cpu_scales is None) == (cache.scales is None)
    mgr.allocate(0, 6)
    plan = cache.plan(mgr.page_tables([0]), query_lens=6)
    gen = torch.Generator().manual_seed(1)
    for layer in range(2):
        cache.write(layer, torch.randn(6, 2, 16, generator=gen).half(), torch.randn(6, 2, 16, generator=gen).half(),
                    plan)
    pages = mgr.page_table(0)
    before = quant.byte_view(cache.kv)[:, :, pages].clone()
    before_scales = None if cache.scales is None else cache.scales[:, :, pages].clone()
    cache.swap(mgr.swap_out([0]))
    mgr.end_step()  # a later step: the GPU pages may be reused (here: overwritten)
    cache.kv.zero_()
    if cache.scales is not None:
        cache.scales.zero_()
    cache.swap(mgr.swap_in([0]))
    pages = mgr.page_table(0)
    assert torch.equal(quant.byte_view(cache.kv)[:, :, pages], before)
    if before_scales is not None:
        assert torch.equal(cache.scales[:, :, pages], before_scales)


# ------------------------------------------------------------------------- sizing
def test_spec_counts_scales():
    spec = model_preset("llama-3-8b").spec
    assert spec.kv_scales == "none" and spec.scale_bytes_per_token == 0
    int8 = spec.with_dtype("int8", "default")
    assert int8.kv_scales == "per_token_head" and int8.scale_bytes_per_token == 32 * 2 * 8 * 4
    assert int8.bytes_per_token == 67_584 and int8.page_bytes(16) == 16 * 67_584
    assert spec.with_dtype("int8").bytes_per_token == 65_536  # no scales unless asked: the old meaning
    assert int8.with_dtype("bf16").kv_scales == "none" and int8.with_dtype("fp8").kv_scales == "per_token_head"
    assert int8.shard(4).bytes_per_token == 67_584 // 4
    mla = model_preset("deepseek-v3").spec.with_dtype("int8", "per_token_head")
    assert mla.scale_bytes_per_token == 61 * 4  # one latent per token and layer: one scale
    assert [default_kv_scales(d) for d in ("int8", "fp8", "bf16", "int4")] == [
        "per_token_head", "per_tensor", "none", "none"]
    with pytest.raises(InvalidArgument, match=r"kv_scales must be 'none' for a bf16 cache"):
        KVCacheSpec(2, 2, 64, "bf16", kv_scales="per_tensor")
    with pytest.raises(InvalidArgument, match=r"kv_scales must be one of"):
        KVCacheSpec(2, 2, 64, "int8", kv_scales="per_token")


def _size(capsys, *argv) -> dict:
    parser = argparse.ArgumentParser()
    size.add_arguments(parser)
    assert size.run(parser.parse_args([*argv, "--json"])) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_size_counts_scale_bytes(capsys):
    base = ("--model", "llama-3-8b", "--context", "8k")
    int8 = _size(capsys, *base, "--dtype", "int8")
    assert (int8["bytes_per_token"], int8["scale_bytes_per_token"], int8["kv_scales"]) == (67_584, 2_048,
                                                                                        "per_token_head")
    assert int8["kv_per_sequence_bytes"] == 8192 * 67_584
    fp8 = _size(capsys, *base, "--dtype", "fp8")
    assert (fp8["bytes_per_token"], fp8["kv_scales"]) == (65_536, "per_tensor")
    assert _size(capsys, *base, "--dtype", "fp8", "--kv-scales", "per_token_head")["bytes_per_token"] == 67_584
    assert _size(capsys, *base)["bytes_per_token"] == 131_072


def test_cli_size_text_shows_the_scale_term(capsys):
    parser = argparse.ArgumentParser()
    size.add_arguments(parser)
    assert size.run(parser.parse_args(["--model", "llama-3-8b", "--dtype", "int8", "--context", "8k"])) == 0
    out = capsys.readouterr().out
    assert "67,584 B (66 KiB) = 2 (K, V) x 32 layers x 8 KV heads x (128 x 1 B (int8) + 4 B fp32 scale)" in out
    assert "int8 with per-token-head scales" in out


def test_cli_frag_budget_uses_quantized_bytes(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    frag.add_arguments(parser)
    common = ["--model", "opt-13b", "--gpu", "a100-40gb", "--num-requests", "20", "--page-sizes", "16",
              "--policies", "", "--no-plot", "--json", "--out", str(tmp_path)]
    budgets = {}
    for dtype in (None, "int8", "fp8"):
        argv = common + ([] if dtype is None else ["--dtype", dtype])
        assert frag.run(parser.parse_args(argv)) == 0
        budgets[dtype] = json.loads(capsys.readouterr().out)["budget"]
    # OPT-13B: 40 layers x 40 heads x 128; int8 adds 2 x 40 x 40 x 4 B of scales per token
    assert budgets[None]["bytes_per_token"] == 819_200
    assert budgets["int8"]["bytes_per_token"] == 409_600 + 12_800
    assert budgets["fp8"]["bytes_per_token"] == 409_600
    budget = budgets[None]["budget_bytes"]
    assert budgets["int8"]["num_slots"] == budget // 422_400 and budgets["fp8"]["num_slots"] == budget // 409_600
    args = parser.parse_args(["--dtype", "int8", "--no-plot", "--out", str(tmp_path)])
    with pytest.raises(InvalidArgument, match="--dtype must be given with --model and --gpu"):
        frag.run(args)


def test_reference_ops_keep_working_on_byte_views():
    # the cache hands copy_pages a uint8 view of fp8 pages (torch lacks some fp8 copies on the CPU)
    pages = torch.randn(4, 3, 2, 8).to(torch.float8_e4m3fn)
    before = pages.clone()
    reference.copy_pages(quant.byte_view(pages)[None], torch.tensor([[0, 2]]))
    assert torch.equal(pages.view(torch.uint8)[2], before.view(torch.uint8)[0])
    assert np.array_equal(pages.view(torch.uint8)[1].numpy(), before.view(torch.uint8)[1].numpy())
