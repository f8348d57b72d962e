"""``paged_decode``: attention of one new query token per sequence over its paged K/V (Triton).

One program handles one (sequence, KV head, split) triple. The query heads that share the KV
head (GQA/MQA) form the rows of one tile, so every K/V byte is read once per KV head. Long
contexts with few programs are split along the keys (split-KV); a merge kernel combines the
partial results by their log-sum-exp. Keys are gathered token by token through the page
table, so any page size works and the loop tile does not have to match the page size.

Imports torch and triton; ``pagedkv/__init__.py`` never imports this module.
"""

from __future__ import annotations

import functools

from .._optional import require

torch = require("torch", __name__)
triton = require("triton", __name__)
tl = require("triton.language", __name__)

from . import _common as common  # noqa: E402


@triton.jit
def soft_cap(scores, cap):
    """``cap * tanh(scores / cap)``, with tanh written through exp (no libdevice needed)."""
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exp overflowing to inf gives exactly 1, underflow -1.
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * (scores / cap)) + 1.0))


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, page_table_ptr, seq_lens_ptr, first_page_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, k_scale_cache_ptr, v_scale_cache_ptr, sinks_ptr,
    sm_scale, soft_cap_value, out_scale, window, num_heads, num_splits,
    stride_qs, stride_qh,
    stride_cache_page, stride_cache_token, stride_cache_head,
    stride_scale_page, stride_scale_token,
    stride_table_seq,
    stride_os, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFT_CAP: tl.constexpr, IS_SPLIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CONVERT_KV: tl.constexpr, PER_TOKEN_SCALES: tl.constexpr, HAS_FIRST_PAGE: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    # Keys attended: positions [first, seq_len); the query is at position seq_len - 1. A window
    # W > 0 slides (the last W tokens); -C < 0 is chunked-local (the query's chunk of C tokens).
    span = tl.where(window < 0, -window, 1)
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0),
                     tl.where(window < 0, (tl.maximum(seq_len - 1, 0) // span) * span, 0))
    aligned = (first // BLOCK_N) * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(seq_len - aligned, num_splits), BLOCK_N) * BLOCK_N
    start = aligned + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    dims = tl.arange(0, D_PAD)
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table_row = page_table_ptr + seq.to(tl.int64) * stride_table_seq
    if HAS_FIRST_PAGE:
        # NOTE: a live-pages-only row (BlockManager.window_tables): column = page index - first.
        table_row -= tl.load(first_page_ptr + seq).to(tl.int64)
    head_offset = kv_head * stride_cache_head
    for block_start in range(start, end, BLOCK_N):
        positions = block_start + tl.arange(0, BLOCK_N)
        # NOTE: every load is masked to [first, end): the unused tail of the last page (which
        # may hold NaN from an earlier owner) and padding entries (-1) of the page table are
        # never read, so they cannot leak into the result.
        valid = (positions >= first) & (positions < end)
        pages = tl.load(table_row + positions // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        offsets = (pages[:, None] * stride_cache_page + (positions % PAGE_SIZE)[:, None] * stride_cache_token
                   + head_offset + dims[None, :])
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0)
        if PER_TOKEN_SCALES:
            scale_offsets = pages * stride_scale_page + (positions % PAGE_SIZE) * stride_scale_token + kv_head
            k_scales = tl.load(k_scale_cache_ptr + scale_offsets, mask=valid, other=0.0)
            v_scales = tl.load(v_scale_cache_ptr + scale_offsets, mask=valid, other=0.0)
            # NOTE: K's scales multiply the fp32 scores (one per key); V is dequantized in fp32
            # and then cast, so small values keep fp16's precision (scaling p instead could
            # underflow fp16 when a head's values are tiny).
            v = (v.to(tl.float32) * v_scales[:, None]).to(q.dtype)
        if CONVERT_KV:
            # NOTE: int8 and e4m3 values are exact in fp16, bf16 and fp32, so K enters the dot
            # in the query's dtype unchanged; per-tensor scales are folded into sm_scale and
            # out_scale by the launcher.
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        if PER_TOKEN_SCALES:
            scores = scores * k_scales[None, :]
        if HAS_SOFT_CAP:
            scores = soft_cap(scores, soft_cap_value)
        scores = tl.where(valid[None, :], scores * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if HAS_SINKS and not IS_SPLIT:
        # NOTE: each head's sink is one more softmax term with a zero value (its logit is in
        # the scaled-score domain, as gpt-oss trains it); the merge kernel adds it after a split.
        sink = tl.load(sinks_ptr + heads, mask=row_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        m_f = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_f)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.exp2(sink - m_f)
    # NOTE: a sequence with no key (seq_len 0, or an empty split) yields zeros, not NaN.
    result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None] * out_scale
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if IS_SPLIT:
        row = (seq * num_heads + heads) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], result, mask=out_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(part_lse_ptr + row, lse, mask=row_mask)
    else:
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + dims[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, sinks_ptr,
    num_heads, num_splits,
    stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_mask = splits < num_splits
    dims = tl.arange(0, D_PAD)
    dim_mask = dims < HEAD_DIM
    row = (seq * num_heads + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + row, mask=split_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp2(lse - m_safe)
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + dims[None, :],
                    mask=split_mask[:, None] & dim_mask[None, :], other=0.0)
    total = tl.sum(weights, 0)
    if HAS_SINKS:
        total += tl.exp2(sink - m_safe)
    merged = tl.sum(weights[:, None] * parts, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + dims, merged.to(out_ptr.dtype.element_ty), mask=dim_mask)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    attention_chunk_size: int | None = None,
    num_splits: int | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
    first_page: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: each sequence's single query token over its cached K/V.

    The query token of sequence ``i`` sits at position ``seq_lens[i] - 1`` and its own K/V must
    already be in the cache (``write_kv`` first). Launches one kernel (two with split-KV) and
    never synchronises with the host, so it can be captured in a CUDA graph.

    Int8 / fp8_e4m3 pages are dequantized as they are read (scores and the output accumulate
    in fp32): per-tensor scales are folded into ``sm_scale`` and the output; per-(token, head)
    scales multiply each key's score, and each value vector before its cast to ``q``'s dtype.

    Args:
        q: ``[num_seqs, num_heads, head_dim]``, the cache's dtype (any float dtype for
            quantized pages); query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, contiguous,
            float16 / bfloat16 / float32, or int8 / float8_e4m3fn (quantized).
        page_table: int32 ``[num_seqs, max_pages]``; entries past a sequence's pages may be
            anything (``NULL_PAGE`` = -1 from the block manager): they are never read.
        seq_lens: int32 ``[num_seqs]``; tokens in the cache for each sequence (query included).
        sm_scale: score scale; default ``1 / sqrt(head_dim)``.
        sliding_window: attend only to the last ``sliding_window`` tokens (query included),
            i.e. key positions ``> seq_len - 1 - sliding_window``; ``None`` for all tokens.
        attention_chunk_size: chunked-local attention (Llama 4): the query at position ``p``
            attends to key positions ``[p // C * C, p]`` of its own chunk of ``C`` tokens;
            ``None`` for all tokens. At most one of it and ``sliding_window``.
        logits_soft_cap: if set, scores become ``cap * tanh(scores / cap)`` (after scaling).
        out: optional ``[num_seqs, num_heads, head_dim]`` output tensor (same dtype).
        max_seq_len: host-side upper bound of ``seq_lens`` used to pick the split count;
            default ``max_pages * page_size``.
        num_splits: split-KV count; default chosen from the batch shape (``1`` = no split).
        k_scale, v_scale: per-tensor scales of quantized pages without scale caches (default 1.0).
        k_scale_cache, v_scale_cache: fp32 ``[num_pages, page_size, num_kv_heads]``: the
            per-(token, head) scales ``write_kv`` stored with quantized pages.
        first_page: int32 ``[num_seqs]``: ``page_table`` holds live pages only (as
            ``BlockManager.window_tables`` builds it), and position ``pos`` of sequence ``i`` is
            in column ``pos // page_size - first_page[i]``; ``None``: column ``pos // page_size``.
            The positions attention reads (those inside ``sliding_window`` or the query's
            chunk) must be in the row.
        sinks: float ``[num_heads]`` learned logits (gpt-oss's attention sinks), one per query
            head, in the scaled-score domain: each joins its head's softmax denominator as a
            key with a zero value. ``None``: no sinks.

    Returns:
        ``out``: ``[num_seqs, num_heads, head_dim]`` in ``q``'s dtype.

    Raises:
        InvalidType / InvalidArgument: naming the tensor or option that is wrong.
    """
    num_pages, page_size, num_kv_heads, head_dim = common.check_cache_pair(k_cache, v_cache)
    common.check_head_dim(head_dim)
    device = k_cache.device
    common.check_query_dtype("q", q, "[num_seqs, num_heads, head_dim]", (None, None, head_dim), k_cache)
    num_seqs, num_heads, _ = q.shape
    group = common.check_group(num_heads, num_kv_heads)
    common.check_tensor("page_table", page_table, "[num_seqs, max_pages]", (num_seqs, None),
                        dtypes=(torch.int32,), device=device)
    common.check_tensor("seq_lens", seq_lens, "[num_seqs]", (num_seqs,), dtypes=(torch.int32,), device=device,
                        contiguous=True)
    if first_page is not None:
        common.check_tensor("first_page", first_page, "[num_seqs]", (num_seqs,), dtypes=(torch.int32,),
                            device=device, contiguous=True)
    if out is None:
        out = torch.empty_like(q)
    else:
        common.check_tensor("out", out, "[num_seqs, num_heads, head_dim]", tuple(q.shape), like=("q", q),
                            device=device)
    sm_scale, window, cap = common.check_options(sm_scale, sliding_window, logits_soft_cap, head_dim,
                                                 attention_chunk_size)
    qa = common.check_quant(k_cache, k_scale, v_scale, k_scale_cache, v_scale_cache)
    common.check_sinks(sinks, num_heads, device)
    capacity = page_table.shape[1] * page_size
    if max_seq_len is None:
        max_seq_len = capacity
    common.check_int("max_seq_len", max_seq_len, 0, 2**31 - 1)
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, max_seq_len, window, head_dim, group, q.dtype, device)
    common.check_int("num_splits", num_splits, 1, common.MAX_SPLITS)
    return launch_decode(q, k_cache, v_cache, page_table, seq_lens, first_page, out, sm_scale, window, cap, qa,
                         num_splits, sinks=sinks)


@functools.lru_cache(maxsize=1024)
def _constants(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype, fmt, per_token: bool,
               has_soft_cap: bool, num_splits: int, has_first_page: bool, interpreting: bool,
               has_sinks: bool = False) -> tuple[dict, dict]:
    """The compile-time arguments of the decode and merge kernels for one launch shape."""
    group = num_heads // num_kv_heads
    config = common.decode_config(head_dim, group, dtype)
    upcast = interpreting and dtype == torch.bfloat16
    meta = dict(
        GROUP=group, GROUP_PAD=config.group_pad, HEAD_DIM=head_dim, D_PAD=config.d_pad,
        PAGE_SIZE=page_size, BLOCK_N=config.block_n,
        HAS_SOFT_CAP=has_soft_cap, IS_SPLIT=num_splits > 1,
        UPCAST=upcast,
        DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
        CONVERT_KV=upcast or fmt is not None, PER_TOKEN_SCALES=per_token,
        HAS_FIRST_PAGE=has_first_page, HAS_SINKS=has_sinks,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    merge_meta = dict(HEAD_DIM=head_dim, D_PAD=config.d_pad, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
                      HAS_SINKS=has_sinks, num_warps=4)
    return meta, merge_meta


def default_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, window: int, head_dim: int,
                       group: int, dtype: torch.dtype, device: torch.device) -> int:
    """The split-KV count ``paged_decode`` picks when none is given (host facts only)."""
    block_n = common.decode_config(head_dim, group, dtype).block_n
    keys = common.keys_per_query(window)
    span = min(max_seq_len, keys + block_n) if keys else max_seq_len
    return common.choose_num_splits(num_seqs, num_kv_heads, span, common.num_sms(device))


def launch_decode(q, k_cache, v_cache, page_table, seq_lens, first_page, out, sm_scale: float, window: int,
                  cap: float, qa: common.QuantArgs, num_splits: int, workspace=None, sinks=None) -> torch.Tensor:
    """``paged_decode`` after its checks (``PagedKVCache`` calls it with tensors it validated
    once). ``workspace``: optional contiguous fp32 ``(part_out [num_seqs, num_heads, num_splits,
    head_dim], part_lse [num_seqs, num_heads, num_splits])`` for the split-KV partials, so that
    a split launch allocates nothing; default: allocated here."""
    num_seqs, num_heads, head_dim = q.shape
    if num_seqs == 0:
        return out
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    is_split = num_splits > 1
    meta, merge_meta = _constants(num_heads, num_kv_heads, head_dim, page_size, q.dtype, qa.fmt, qa.per_token,
                                  cap > 0, num_splits, first_page is not None, common.is_interpreting(),
                                  sinks is not None)
    if not is_split:
        part_out = part_lse = out  # unused by the kernel when IS_SPLIT is false
    elif workspace is None:
        part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out, part_lse = workspace
    # unused pointers without scale caches: any tensor will do
    k_scales = qa.k_scale_cache if qa.per_token else seq_lens
    v_scales = qa.v_scale_cache if qa.per_token else seq_lens
    q_strides, cache_strides, out_strides = q.stride(), k_cache.stride(), out.stride()
    scale_strides = k_scales.stride() if qa.per_token else (0, 0)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, page_table, seq_lens, seq_lens if first_page is None else first_page,
        out, part_out, part_lse, k_scales, v_scales, seq_lens if sinks is None else sinks,
        sm_scale * qa.k_scale, cap, qa.v_scale, window, num_heads, num_splits,
        q_strides[0], q_strides[1],
        cache_strides[0], cache_strides[1], cache_strides[2],
        scale_strides[0], scale_strides[1],
        page_table.stride(0),
        out_strides[0], out_strides[1],
        **meta,
    )
    if is_split:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, seq_lens if sinks is None else sinks,
            num_heads, num_splits,
            out_strides[0], out_strides[1],
            **merge_meta,
        )
    return out
