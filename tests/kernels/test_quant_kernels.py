"""Triton kernels on quantized (int8 / fp8_e4m3) pages against the torch reference.

Runs in the interpreter by default (see conftest.py). ``write_kv`` rounds to the format's grid
in fp32 arithmetic before its cast, so even the interpreter (whose fp32 -> fp8 cast does not
round to nearest even) writes pages bit-identical to ``quant.quantize_*``; the attention tests
read pages produced by torch, so they test the kernels' dequantize path on its own.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pagedkv import BlockManager
from pagedkv.cache import PagedKVCache
from pagedkv.errors import InvalidArgument
from pagedkv.kernels import paged_decode, paged_prefill, quant, reference, write_kv

INT8, FP8 = quant.INT8, quant.FP8_E4M3
#: (format, scale layout) pairs the cache offers.
LAYOUTS = [(INT8, "per_token_head"), (FP8, "per_tensor"), (FP8, "per_token_head")]


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return quant.byte_view(tensor).cpu()


# ------------------------------------------------------------------------------ write_kv
@pytest.mark.parametrize("fmt, layout, dtype, page_size, num_kv_heads, head_dim", [
    (INT8, "per_token_head", torch.float16, 3, 8, 80),
    (INT8, "per_token_head", torch.bfloat16, 16, 2, 128),
    (INT8, "per_tensor", torch.float32, 1, 1, 64),
    (FP8, "per_tensor", torch.float16, 16, 3, 256),
    (FP8, "per_token_head", torch.float32, 3, 2, 64),
    (FP8, "per_token_head", torch.bfloat16, 1, 4, 96),
], ids=lambda p: getattr(p, "name", str(p).replace("torch.", "")))
def test_write_quantizes_bit_exactly_like_torch(device, fmt, layout, dtype, page_size, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(7)
    num_pages, num_tokens = 12, 11
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens]
    slots[[1, 6]] = -1  # padding tokens: not written
    slots = slots.to(device)
    k = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 5).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    k[0, 0] = 0.0  # a zero vector: scale 0
    k[2, 0, :6] = torch.tensor([0.5, 1.5, 2.5, -2.5, 6e4, -6e4])  # ties and values to clamp (per tensor)
    k[3] *= 1e-3  # tiny values: fp8 subnormals per tensor
    k, v = k.to(device), v.to(device)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    sentinel = torch.full(shape, 0x7F, dtype=torch.uint8).view(fmt.dtype)  # 127 / NaN: untouched slots keep it
    caches = [sentinel.clone().to(device) for _ in range(4)]  # kernel K, V; reference K, V
    if layout == "per_token_head":
        scale_caches = [torch.full(shape[:3], -1.0, device=device) for _ in range(4)]
        args = [dict(k_scale_cache=scale_caches[0], v_scale_cache=scale_caches[1]),
                dict(k_scale_cache=scale_caches[2], v_scale_cache=scale_caches[3])]
    else:
        args = [dict(k_scale=0.75, v_scale=0.02)] * 2
    write_kv(k, v, caches[0], caches[1], slots, **args[0])
    reference.write_kv(k, v, caches[2], caches[3], slots, **args[1])
    assert torch.equal(_bytes(caches[0]), _bytes(caches[2])) and torch.equal(_bytes(caches[1]), _bytes(caches[3]))
    if layout == "per_token_head":
        assert torch.equal(scale_caches[0], scale_caches[2]) and torch.equal(scale_caches[1], scale_caches[3])
        assert int(scale_caches[0].eq(-1.0).all(dim=-1).sum()) == num_pages * page_size - (num_tokens - 2)
    untouched = _bytes(caches[0]).flatten(0, 1).eq(0x7F).all(dim=(1, 2))
    assert int(untouched.sum()) == num_pages * page_size - (num_tokens - 2)


def test_write_int8_from_a_strided_fused_projection(device):
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(5, 4 + 2 + 2, 64, generator=gen).half().to(device)
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    k_cache = torch.zeros(4, 3, 2, 64, dtype=torch.int8, device=device)
    v_cache = torch.zeros_like(k_cache)
    k_scales, v_scales = torch.zeros(4, 3, 2, device=device), torch.zeros(4, 3, 2, device=device)
    slots = torch.tensor([0, 4, 5, 11, -1], device=device)
    write_kv(k, v, k_cache, v_cache, slots, k_scale_cache=k_scales, v_scale_cache=v_scales)
    want_q, want_scale = quant.quantize_per_token_head(k[:4].cpu(), INT8)
    assert torch.equal(k_cache.view(-1, 2, 64)[slots[:4]].cpu(), want_q)
    assert torch.equal(k_scales.view(-1, 2)[slots[:4]].cpu(), want_scale)


# --------------------------------------------------------------- attention on torch pages
def _quantized_batch(batch, fmt, layout, device):
    """Quantize ``paged_batch``'s float pages with torch; slots that were NaN get NaN scales."""
    scales = {}
    for name in ("k", "v"):
        pool = getattr(batch, f"{name}_cache").cpu().float()
        unused = pool.isnan().any(dim=-1)
        if layout == "per_token_head":
            pages, scale = quant.quantize_per_token_head(pool.nan_to_num(0.0), fmt)
            scales[f"{name}_scale_cache"] = scale.masked_fill(unused, float("nan")).to(device)
        else:
            scale = quant.tensor_scale(pool.nan_to_num(0.0), fmt)
            pages = quant.quantize_per_tensor(pool.nan_to_num(0.0), scale, fmt)
            scales[f"{name}_scale"] = scale
        if fmt is FP8:  # NaN in every unused slot: a kernel that reads past seq_len fails the test
            pages = pages.view(torch.uint8).masked_fill(unused[..., None], 0x7F).view(fmt.dtype)
        setattr(batch, f"{name}_cache", pages.to(device))
    return scales


def _check(got, want, dtype):
    assert not got.isnan().any(), "NaN in the kernel's output (an unused page tail or scale leaked?)"
    tolerance = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


# NOTE: every (format, layout) meets every query dtype once; page size, GQA group, head dim
# and split-KV rotate with them (9 interpreter runs per kernel).
ATTENTION_CASES = [
    pytest.param(fmt, layout, dtype, (1, 3, 16)[(i + j) % 3], (1, 4, 8)[i], (64, 128, 80)[j],
                 (1, 3, None)[(i + 2 * j) % 3], id=f"{fmt.name}-{layout}-{str(dtype)[6:]}")
    for (i, (fmt, layout)), (j, dtype) in itertools.product(enumerate(LAYOUTS),
                                                            enumerate((torch.float16, torch.bfloat16, torch.float32)))
]


@pytest.mark.parametrize("fmt, layout, dtype, page_size, group, head_dim, num_splits", ATTENTION_CASES)
def test_decode_reads_quantized_pages(paged_batch, device, fmt, layout, dtype, page_size, group, head_dim,
                                      num_splits):
    batch = paged_batch([1, 37, 130, 5], page_size=page_size, num_kv_heads=2, head_dim=head_dim,
                        dtype=torch.float32)
    scales = _quantized_batch(batch, fmt, layout, device)
    q = torch.randn(4, 2 * group, head_dim, generator=batch.gen).to(dtype).to(device)
    options = dict(num_splits=num_splits) if num_splits else dict(max_seq_len=2048)
    got = paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, **options, **scales)
    want = reference.paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, **scales)
    assert got.dtype == dtype
    _check(got, want, dtype)


@pytest.mark.parametrize("fmt, layout, dtype, page_size, group, head_dim, num_splits", ATTENTION_CASES)
def test_prefill_reads_quantized_pages(paged_batch, device, fmt, layout, dtype, page_size, group, head_dim,
                                       num_splits):
    seq_lens, query_lens = [23, 70, 9, 4], [23, 18, 1, 0]
    batch = paged_batch(seq_lens, page_size=page_size, num_kv_heads=2, head_dim=head_dim, dtype=torch.float32)
    scales = _quantized_batch(batch, fmt, layout, device)
    q = torch.randn(sum(query_lens), 2 * group, head_dim, generator=batch.gen).to(dtype).to(device)
    qo_indptr = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=device)
    window = 16 if num_splits == 3 else None  # the sliding window path too, now and then
    got = paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, qo_indptr,
                        sliding_window=window, **scales)
    want = reference.paged_prefill(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, qo_indptr,
                                   sliding_window=window, **scales)
    _check(got, want, dtype)


@pytest.mark.parametrize("fmt", [INT8, FP8], ids=lambda f: f.name)
def test_small_values_keep_fp16_precision(paged_batch, device, fmt):
    # values ~1e-3: their scales (~2e-5 for int8) times softmax weights would be fp16
    # subnormals, so V is dequantized before its cast to fp16
    batch = paged_batch([40, 7], page_size=16, num_kv_heads=1, head_dim=64, dtype=torch.float32)
    batch.v_cache = batch.v_cache * 1e-3
    scales = _quantized_batch(batch, fmt, "per_token_head", device)
    q = torch.randn(2, 4, 64, generator=batch.gen).half().to(device)
    got = paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, **scales)
    want = reference.paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, **scales)
    torch.testing.assert_close(got, want, atol=4e-3 * 1e-3, rtol=4e-3)


def test_quantized_launch_arguments_are_checked(paged_batch, device):
    batch = paged_batch([4, 4], page_size=3, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    q = torch.zeros(2, 4, 64, dtype=torch.float16, device=device)
    args = (batch.page_table, batch.seq_lens)
    int8 = torch.zeros(batch.k_cache.shape, dtype=torch.int8, device=device)
    scale = torch.ones(batch.k_cache.shape[:3], device=device)
    with pytest.raises(InvalidArgument, match=r"k_scale_cache must be None for torch.float16 pages"):
        paged_decode(q, batch.k_cache, batch.v_cache, *args, k_scale_cache=scale, v_scale_cache=scale)
    with pytest.raises(InvalidArgument, match=r"v_scale_cache must be a tensor when the other scale cache is given"):
        paged_decode(q, int8, int8.clone(), *args, k_scale_cache=scale)
    with pytest.raises(InvalidArgument, match=r"k_scale must be None when scale caches are given"):
        paged_decode(q, int8, int8.clone(), *args, k_scale=2.0, k_scale_cache=scale, v_scale_cache=scale)
    with pytest.raises(InvalidArgument, match=r"k_scale_cache must be of shape \[num_pages, page_size, num_kv_heads\]"):
        paged_decode(q, int8, int8.clone(), *args, k_scale_cache=scale[:, :, :1], v_scale_cache=scale)
    with pytest.raises(InvalidArgument, match=r"v_scale_cache must be of dtype torch.float32"):
        paged_decode(q, int8, int8.clone(), *args, k_scale_cache=scale, v_scale_cache=scale.half())
    with pytest.raises(InvalidArgument, match=r"v_scale must be a positive finite float"):
        paged_decode(q, int8, int8.clone(), *args, v_scale=float("inf"))
    with pytest.raises(InvalidArgument, match=r"q must be of dtype torch.float16 or torch.bfloat16 or torch.float32"):
        paged_decode(q.to(torch.int8), int8, int8.clone(), *args)
    with pytest.raises(InvalidArgument, match=r"v_cache must be of dtype torch.int8 \(the dtype of k_cache\)"):
        paged_decode(q, int8, batch.v_cache, *args)
    slots = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(InvalidArgument, match=r"v must be of dtype torch.float16 \(the dtype of k\)"):
        write_kv(q[:, :2], q[:, :2].float(), int8, int8.clone(), slots)


# ------------------------------------------------------------------------ through the cache
@pytest.mark.parametrize("kv_dtype, kv_scale", [("int8", None), ("fp8_e4m3", None), ("fp8_e4m3", "per_token_head")])
def test_cache_backends_agree_through_fork_copy_on_write_and_decode(device, kv_dtype, kv_scale):
    """The Triton backend writes the same bytes as the torch backend and attends alike."""
    gen = torch.Generator().manual_seed(9)
    mgr = BlockManager(num_pages=16, page_size=4, backend="python")
    extra = dict(k_scale=0.02, v_scale=[0.01, 0.03]) if kv_scale is None and kv_dtype == "fp8_e4m3" else {}
    caches = [PagedKVCache(2, 16, 4, 2, 64, dtype=torch.float16, device=device, backend=backend, kv_dtype=kv_dtype,
                           kv_scale=kv_scale, **extra) for backend in ("triton", "torch")]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).half().to(device)

    mgr.allocate(0, 6)
    steps = [(mgr.page_tables([0]), dict(query_lens=6, slot_mapping=mgr.slots(0)), [], 6)]
    mgr.fork(0, 1)
    for _ in range(2):
        step = mgr.append_batch([0, 1], 1)
        steps.append((mgr.page_tables([0, 1]), dict(slot_mapping=step.slot_mapping), step.copies, 2))
    for tables, plan_args, copies, num_tokens in steps:
        k, v = rand(num_tokens, 2, 64), rand(num_tokens, 2, 64)
        q = rand(num_tokens, 8, 64)
        outs = []
        for cache in caches:
            cache.copy(copies)
            plan = cache.plan(tables, **plan_args)
            for layer in range(2):
                cache.write(layer, k, v, plan)
            outs.append(cache.decode(1, q, plan) if plan.is_decode else cache.prefill(1, q, plan))
        assert torch.equal(_bytes(caches[0].kv), _bytes(caches[1].kv))
        if caches[0].scales is not None:
            assert torch.equal(caches[0].scales.cpu(), caches[1].scales.cpu())
        _check(outs[0], outs[1], torch.float16)


# ---------------------------------------------------------------------- accuracy budget
def _realistic_kv(gen, num_tokens, num_kv_heads, head_dim):
    """Random K/V with the outliers of real models: a few key channels ~10x larger than the rest
    (the same channels in every token), an attention-sink first token 4x larger, and 1% of the
    value vectors 8x larger."""
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    k[:, :, torch.randperm(head_dim, generator=gen)[:2]] *= 10
    k[0] *= 4
    v[0] *= 4
    v[torch.rand(num_tokens, generator=gen) < 0.01] *= 8
    return k, v


def _steps(x: torch.Tensor, fmt: quant.KVFormat, scale) -> torch.Tensor:
    """The quantization step around each element of ``x`` (its rounding error is within half of it)."""
    scale = scale[..., None] if isinstance(scale, torch.Tensor) else torch.tensor(scale)
    if fmt is INT8:
        return scale.expand_as(x)
    y = (x / torch.where(scale > 0, scale, torch.ones_like(scale))).abs().clamp(max=fmt.max_value)
    return torch.exp2(torch.floor(torch.log2(y.clamp_min(2.0**-6))) - 3) * scale  # e4m3: 3 mantissa bits


def _predicted_sigma(q, k, v, k_steps, v_steps, out, sm_scale):
    """First-order standard deviation of each output element when every K/V element carries an
    independent rounding error uniform over its step (variance step**2 / 12).

    For one query: ``out = sum_j p_j v_j``. An error ``dv_j`` moves it by ``sum_j p_j dv_j``; an
    error ``dk_j`` moves score ``s_j`` by ``sm_scale * q . dk_j`` and the output by
    ``sum_j p_j ds_j (v_j - out)`` (the softmax's derivative). Independent terms add variances.
    """
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [n, num_heads, head_dim]
    k_steps, v_steps = k_steps.repeat_interleave(group, 1), v_steps.repeat_interleave(group, 1)
    p = torch.softmax(torch.einsum("hd,nhd->hn", q, k) * sm_scale, dim=-1)
    score_var = sm_scale**2 * torch.einsum("hd,nhd->hn", q**2, k_steps**2 / 12)
    var_from_k = torch.einsum("hn,hn,nhd->hd", p**2, score_var, (v - out[None]) ** 2)
    var_from_v = torch.einsum("hn,nhd->hd", p**2, v_steps**2 / 12)
    return torch.sqrt(var_from_k + var_from_v)


@pytest.mark.parametrize("kv_dtype, kv_scale", [("int8", "per_token_head"), ("fp8_e4m3", "per_tensor"),
                                                 ("fp8_e4m3", "per_token_head")])
def test_accuracy_budget_against_fp32(device, kv_dtype, kv_scale, record_property, request):
    """Decode through a quantized cache vs fp32 attention on the unquantized K/V.

    Budget, from the error model of ``_predicted_sigma`` (rounding errors uniform within a step,
    propagated to first order): the mean absolute error is at most 2x the model's
    ``sqrt(2 / pi) * sigma`` (over 26 seeds it measured 0.64x-1.56x: second-order terms matter
    where attention is peaky; 2x would still catch error beyond rounding, e.g. a wrong scale or
    an extra lossy cast), and every element's error is within 6 sigma (measured: at most 4.4
    sigma; a Gaussian passes 6 sigma once in 5e8 elements).
    """
    gen = torch.Generator().manual_seed(11)
    fmt = quant.kv_format(kv_dtype)
    seq_lens, num_kv_heads, group, head_dim = [150, 37, 2], 2, 4, 128
    kvs = [_realistic_kv(gen, n, num_kv_heads, head_dim) for n in seq_lens]
    k_all, v_all = torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs])
    extra = {}
    if kv_scale == "per_tensor":  # calibrated on the data, as from a checkpoint's k_scale / v_scale
        extra = dict(k_scale=quant.tensor_scale(k_all, fmt), v_scale=quant.tensor_scale(v_all, fmt))
    mgr = BlockManager(num_pages=64, page_size=16, backend="python")
    cache = PagedKVCache(1, 64, 16, num_kv_heads, head_dim, dtype=torch.float32, device=device, backend="triton",
                         kv_dtype=kv_dtype, kv_scale=kv_scale, **extra)
    for seq_id, n in enumerate(seq_lens):
        mgr.allocate(seq_id, n)
    ids = list(range(len(seq_lens)))
    cache.write(0, k_all.to(device), v_all.to(device), cache.plan(mgr.page_tables(ids), query_lens=seq_lens))
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen)
    got = cache.decode(0, q.to(device), cache.plan(mgr.page_tables(ids))).cpu()

    sm_scale = head_dim**-0.5
    errors, sigmas = [], []
    for i, (k, v) in enumerate(kvs):
        want = reference.attend(q[i:i + 1], k, v, torch.tensor([len(k) - 1]))[0]
        if kv_scale == "per_token_head":
            k_steps = _steps(k, fmt, quant.quantize_per_token_head(k, fmt)[1])
            v_steps = _steps(v, fmt, quant.quantize_per_token_head(v, fmt)[1])
        else:
            k_steps, v_steps = _steps(k, fmt, extra["k_scale"]), _steps(v, fmt, extra["v_scale"])
        errors.append((got[i] - want).abs().flatten())
        sigmas.append(_predicted_sigma(q[i], k, v, k_steps, v_steps, want, sm_scale).flatten())
    error, sigma = torch.cat(errors), torch.cat(sigmas)
    predicted_mean = float((2 / torch.pi) ** 0.5 * sigma.mean())
    figures = dict(max_abs_error=float(error.max()), mean_abs_error=float(error.mean()),
                   predicted_mean_abs_error=predicted_mean, max_error_in_sigmas=float((error / sigma).max()))
    for name, value in figures.items():
        record_property(name, value)
    request.config.__dict__.setdefault("pagedkv_accuracy_report", []).append(
        f"{kv_dtype} {kv_scale}: " + ", ".join(f"{n} {v:.4g}" for n, v in figures.items()))
    assert figures["mean_abs_error"] <= 2.0 * predicted_mean
    assert figures["max_error_in_sigmas"] <= 6.0
