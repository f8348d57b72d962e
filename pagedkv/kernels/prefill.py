"""``paged_prefill``: variable-length query chunks attending causally to their paged K/V (Triton).

Covers prompt prefill, chunked prefill and prefix-cache hits alike: sequence ``i``'s
``q_len`` new tokens are the last ``q_len`` of its ``seq_len`` cached tokens (``write_kv`` has
already stored their K/V), so query ``j`` sits at position ``seq_len - q_len + j`` and sees every
key at or before it. One program handles one (query block, KV head, sequence); the rows of its
query tile are (token, query head) pairs of one GQA group, so each K/V tile loaded serves every
query head that shares it.

Imports torch and triton; ``pagedkv/__init__.py`` never imports this module.
"""

from __future__ import annotations

from .._optional import require

torch = require("torch", __name__)
triton = require("triton", __name__)
tl = require("triton.language", __name__)

from ..errors import InvalidArgument  # noqa: E402
from . import _common as common  # noqa: E402
from .decode import soft_cap  # noqa: E402


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, page_table_ptr, seq_lens_ptr, qo_indptr_ptr, first_page_ptr, out_ptr,
    k_scale_cache_ptr, v_scale_cache_ptr, sinks_ptr,
    sm_scale, soft_cap_value, out_scale, window,
    stride_qt, stride_qh,
    stride_cache_page, stride_cache_token, stride_cache_head,
    stride_scale_page, stride_scale_token,
    stride_table_seq,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOKENS_PER_BLOCK: tl.constexpr,
    HAS_SOFT_CAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CONVERT_KV: tl.constexpr, PER_TOKEN_SCALES: tl.constexpr, HAS_FIRST_PAGE: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(qo_indptr_ptr + seq)
    q_len = tl.load(qo_indptr_ptr + seq + 1) - q_start
    first_token = q_block * TOKENS_PER_BLOCK
    if first_token >= q_len:  # the grid is sized for the longest chunk of the batch
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tokens = first_token + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < TOKENS_PER_BLOCK * GROUP) & (tokens < q_len)
    dims = tl.arange(0, D_PAD)
    dim_mask = dims < HEAD_DIM
    token_offsets = (q_start + tokens).to(tl.int64)
    q = tl.load(q_ptr + token_offsets[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # NOTE: rows past the chunk get the position of its last token, so every row has at least
    # one visible key (itself) and the online softmax never sees a fully masked row of NaN.
    q_positions = prefix + tl.minimum(tokens, q_len - 1)
    last = prefix + tl.minimum(first_token + TOKENS_PER_BLOCK, q_len)  # keys [first, last)
    # A window W > 0 slides; -C < 0 is chunked-local: each query sees its own chunk of C tokens.
    span = tl.where(window < 0, -window, 1)
    first = tl.where(window > 0, tl.maximum(prefix + first_token - window + 1, 0),
                     tl.where(window < 0, ((prefix + first_token) // span) * span, 0))
    lowest = tl.where(window > 0, q_positions - window + 1,
                      tl.where(window < 0, (q_positions // span) * span, 0))  # each row's first key

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table_row = page_table_ptr + seq.to(tl.int64) * stride_table_seq
    if HAS_FIRST_PAGE:
        table_row -= tl.load(first_page_ptr + seq).to(tl.int64)  # a live-pages-only row
    head_offset = kv_head * stride_cache_head
    for block_start in range((first // BLOCK_N) * BLOCK_N, last, BLOCK_N):
        positions = block_start + tl.arange(0, BLOCK_N)
        valid = (positions >= first) & (positions < last)  # never read a page-tail or a -1 entry
        pages = tl.load(table_row + positions // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        offsets = (pages[:, None] * stride_cache_page + (positions % PAGE_SIZE)[:, None] * stride_cache_token
                   + head_offset + dims[None, :])
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0)
        if PER_TOKEN_SCALES:  # as in the decode kernel
            scale_offsets = pages * stride_scale_page + (positions % PAGE_SIZE) * stride_scale_token + kv_head
            k_scales = tl.load(k_scale_cache_ptr + scale_offsets, mask=valid, other=0.0)
            v_scales = tl.load(v_scale_cache_ptr + scale_offsets, mask=valid, other=0.0)
            v = (v.to(tl.float32) * v_scales[:, None]).to(q.dtype)
        if CONVERT_KV:  # exact for int8 / e4m3 pages (see the decode kernel)
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        if PER_TOKEN_SCALES:
            scores = scores * k_scales[None, :]
        if HAS_SOFT_CAP:
            scores = soft_cap(scores, soft_cap_value)
        visible = valid[None, :] & (positions[None, :] <= q_positions[:, None])
        visible = visible & (positions[None, :] >= lowest[:, None])
        scores = tl.where(visible, scores * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if HAS_SINKS:  # one more softmax term per head, with a zero value (see the decode kernel)
        sink = tl.load(sinks_ptr + heads, mask=row_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        m_f = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_f)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.exp2(sink - m_f)
    result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None] * out_scale
    tl.store(out_ptr + token_offsets[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             result.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    qo_indptr: torch.Tensor,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    max_q_len: int | None = None,
    attention_chunk_size: int | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
    first_page: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill / extend attention over paged K/V for a ragged batch of query chunks.

    Sequence ``i`` owns query rows ``qo_indptr[i]:qo_indptr[i+1]`` of ``q``; they are its last
    ``q_len`` tokens, whose K/V are already in the cache, so query ``j`` of the chunk attends
    causally to key positions ``<= seq_lens[i] - q_len + j``. A decode token is a chunk of
    length 1, so mixed prefill/decode batches work too. No host synchronisation. Int8 / fp8_e4m3
    pages are dequantized as they are read, as in ``paged_decode``.

    Args:
        q: ``[num_tokens, num_heads, head_dim]``, the cache's dtype (any float dtype for
            quantized pages).
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, contiguous,
            float16 / bfloat16 / float32, or int8 / float8_e4m3fn (quantized).
        page_table: int32 ``[num_seqs, max_pages]`` (padding entries are never read).
        seq_lens: int32 ``[num_seqs]``; cached tokens per sequence, new chunk included.
        qo_indptr: int32 ``[num_seqs + 1]``; ``qo_indptr[0] == 0``, non-decreasing,
            ``qo_indptr[-1] == num_tokens``, ``q_len <= seq_len`` (checked by
            ``PagedKVCache.plan``, not on the device).
        sm_scale, sliding_window, logits_soft_cap, attention_chunk_size: as in ``paged_decode``
            (a query at position ``p`` of a chunked-local layer sees ``[p // C * C, p]``).
        out: optional ``[num_tokens, num_heads, head_dim]`` output (same dtype).
        max_q_len: host-side bound on the longest chunk, sizes the grid; default
            ``num_tokens`` (always safe, launches idle programs for batches of many chunks).
        k_scale, v_scale, k_scale_cache, v_scale_cache: scales of quantized pages, as in
            ``paged_decode``.
        first_page: int32 ``[num_seqs]`` for live-pages-only tables, as in ``paged_decode``.
        sinks: float ``[num_heads]`` attention sinks, as in ``paged_decode``.

    Returns:
        ``out``: ``[num_tokens, num_heads, head_dim]`` in ``q``'s dtype.

    Raises:
        InvalidType / InvalidArgument: naming the tensor or option that is wrong.
    """
    _, page_size, num_kv_heads, head_dim = common.check_cache_pair(k_cache, v_cache)
    common.check_head_dim(head_dim)
    device = k_cache.device
    common.check_query_dtype("q", q, "[num_tokens, num_heads, head_dim]", (None, None, head_dim), k_cache)
    num_tokens, num_heads, _ = q.shape
    group = common.check_group(num_heads, num_kv_heads)
    common.check_tensor("page_table", page_table, "[num_seqs, max_pages]", (None, None), dtypes=(torch.int32,),
                        device=device)
    num_seqs = page_table.shape[0]
    if num_seqs > 65535:  # the grid's third axis
        raise InvalidArgument("page_table", list(page_table.shape), "at most 65535 sequences per launch")
    common.check_tensor("seq_lens", seq_lens, "[num_seqs]", (num_seqs,), dtypes=(torch.int32,), device=device,
                        contiguous=True)
    common.check_tensor("qo_indptr", qo_indptr, "[num_seqs + 1]", (num_seqs + 1,), dtypes=(torch.int32,),
                        device=device, contiguous=True)
    if first_page is not None:
        common.check_tensor("first_page", first_page, "[num_seqs]", (num_seqs,), dtypes=(torch.int32,),
                            device=device, contiguous=True)
    if out is None:
        out = torch.empty_like(q)
    else:
        common.check_tensor("out", out, "[num_tokens, num_heads, head_dim]", tuple(q.shape), like=("q", q),
                            device=device)
    sm_scale, window, cap = common.check_options(sm_scale, sliding_window, logits_soft_cap, head_dim,
                                                 attention_chunk_size)
    qa = common.check_quant(k_cache, k_scale, v_scale, k_scale_cache, v_scale_cache)
    common.check_sinks(sinks, num_heads, device)
    max_q_len = num_tokens if max_q_len is None else common.check_int("max_q_len", max_q_len, 0, 2**31 - 1)
    return launch_prefill(q, k_cache, v_cache, page_table, seq_lens, qo_indptr, first_page, out, sm_scale, window,
                          cap, qa, max_q_len, sinks=sinks)


def launch_prefill(q, k_cache, v_cache, page_table, seq_lens, qo_indptr, first_page, out, sm_scale: float,
                   window: int, cap: float, qa: common.QuantArgs, max_q_len: int, sinks=None) -> torch.Tensor:
    """``paged_prefill`` after its checks (``PagedKVCache`` calls it with tensors it validated once)."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = page_table.shape[0]
    if num_seqs == 0 or num_tokens == 0 or max_q_len == 0:
        return out
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    config = common.prefill_config(head_dim, group, q.dtype)
    tokens_per_block = config.block_m // group
    grid = (-(-max_q_len // tokens_per_block), num_kv_heads, num_seqs)
    upcast = common.is_interpreting() and q.dtype == torch.bfloat16
    # unused pointers without scale caches: any tensor will do
    k_scales = qa.k_scale_cache if qa.per_token else seq_lens
    v_scales = qa.v_scale_cache if qa.per_token else seq_lens
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, page_table, seq_lens, qo_indptr, seq_lens if first_page is None else first_page, out,
        k_scales, v_scales, seq_lens if sinks is None else sinks,
        sm_scale * qa.k_scale, cap, qa.v_scale, window,
        *q.stride()[:2],
        *k_cache.stride()[:3],
        *(k_scales.stride()[:2] if qa.per_token else (0, 0)),
        page_table.stride(0),
        *out.stride()[:2],
        GROUP=group, HEAD_DIM=head_dim, D_PAD=config.d_pad, PAGE_SIZE=page_size,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, TOKENS_PER_BLOCK=tokens_per_block,
        HAS_SOFT_CAP=cap > 0,
        UPCAST=upcast,
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        CONVERT_KV=upcast or qa.fmt is not None, PER_TOKEN_SCALES=qa.per_token,
        HAS_FIRST_PAGE=first_page is not None, HAS_SINKS=sinks is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
