"""Slow, obvious torch implementations of every kernel: the specification the Triton kernels
are tested against, and the implementation ``PagedKVCache`` runs on the CPU.

Attention gathers each sequence's keys token by token through its page table (page
``page_table[i, pos // page_size]``, offset ``pos % page_size``), computes scores and softmax
in float32, and casts the result to the query's dtype. Only positions below ``seq_len`` are
gathered, so whatever sits in the unused tail of a last page never matters.

Same signatures as the Triton launchers (without the launch-tuning arguments ``max_seq_len``,
``max_q_len`` and ``num_splits``). Inputs are not validated here: the launchers and
``PagedKVCache`` do that. Quantized (int8 / fp8_e4m3) pages are quantized on write and
dequantized to fp32 on read with ``pagedkv.kernels.quant``; the scale arguments
(``k_scale``/``v_scale`` per tensor, or ``k_scale_cache``/``v_scale_cache`` per (token, head))
mean what they mean for the launchers. Imports torch only (never triton).
"""

from __future__ import annotations

import math

from .._optional import require

torch = require("torch", __name__)

from . import quant  # noqa: E402


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float | None = None,
    v_scale: float | None = None,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
) -> None:
    """Write token ``i``'s K/V to slot ``slot_mapping[i]`` (skip slot -1). See ``kernels.write_kv``."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    fmt = quant.format_of(k_cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for x, cache, scale, scale_cache in ((k, k_cache, k_scale, k_scale_cache), (v, v_cache, v_scale, v_scale_cache)):
        x = x[keep]
        if fmt is not None and scale_cache is not None:
            x, scales = quant.quantize_per_token_head(x, fmt)
            scale_cache.view(-1, num_kv_heads)[slots] = scales
        elif fmt is not None:
            x = quant.quantize_per_tensor(x, 1.0 if scale is None else scale, fmt)
        quant.byte_view(cache).view(-1, num_kv_heads, head_dim)[slots] = quant.byte_view(x)


def gather_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table_row: torch.Tensor,
    seq_len: int,
    start: int = 0,
    *,
    k_scale: float | None = None,
    v_scale: float | None = None,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
    first_page: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's tokens ``[start, seq_len)`` of K and V: two ``[seq_len - start, num_kv_heads, head_dim]``.

    ``first_page``: the row holds live pages only, position ``pos`` in entry ``pos // page_size - first_page``.

    In the cache's dtype for float pages; dequantized to fp32 for int8 / fp8_e4m3 pages.
    """
    page_size = k_cache.shape[1]
    positions = torch.arange(start, seq_len, device=k_cache.device)
    pages = page_table_row.long()[positions // page_size - first_page]
    offsets = positions % page_size
    fmt = quant.format_of(k_cache)
    if fmt is None:
        return k_cache[pages, offsets], v_cache[pages, offsets]
    out = []
    for cache, scale, scale_cache in ((k_cache, k_scale, k_scale_cache), (v_cache, v_scale, v_scale_cache)):
        values = quant.byte_view(cache)[pages, offsets].view(cache.dtype)
        if scale_cache is not None:
            out.append(quant.dequantize(values, scale_cache[pages, offsets]))
        else:
            out.append(quant.dequantize(values, 1.0 if scale is None else scale))
    return out[0], out[1]


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    q_positions: torch.Tensor,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    key_start: int = 0,
    sinks: torch.Tensor | None = None,
    attention_chunk_size: int | None = None,
) -> torch.Tensor:
    """Causal attention of queries at ``q_positions`` over keys at positions ``key_start, ...``.

    Args:
        q: ``[num_queries, num_heads, head_dim]``.
        keys, values: ``[num_keys, num_kv_heads, head_dim]``, positions ``key_start`` onwards.
        q_positions: int ``[num_queries]``; query ``j`` sees key positions ``p <= q_positions[j]``
            (and ``p > q_positions[j] - sliding_window`` with a window, or
            ``p >= q_positions[j] // C * C`` with an ``attention_chunk_size`` ``C``).
        sinks: ``[num_heads]`` learned logits (gpt-oss's attention sinks): each head's sink
            joins the softmax as one more key with that score and a zero value, so the weights
            of the real keys add up to less than one.

    Returns:
        ``[num_queries, num_heads, head_dim]`` in ``q``'s dtype; a query with no key gets zeros.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // keys.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    k = keys.float().repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
    v = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if logits_soft_cap is not None:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    key_positions = torch.arange(key_start, key_start + keys.shape[0], device=q.device)
    allowed = key_positions[None, :] <= q_positions[:, None]
    if sliding_window is not None:
        allowed &= key_positions[None, :] > q_positions[:, None] - sliding_window
    if attention_chunk_size is not None:
        allowed &= key_positions[None, :] >= q_positions[:, None] // attention_chunk_size * attention_chunk_size
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    if sinks is not None:
        sink = sinks.float()[:, None, None].expand(num_heads, scores.shape[1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key -> zeros
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


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
    k_scale: float | None = None,
    v_scale: float | None = None,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
    first_page: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    attention_chunk_size: int | None = None,
) -> torch.Tensor:
    """Decode attention; see ``kernels.paged_decode``. Returns ``[num_seqs, num_heads, head_dim]``.

    Decode is prefill with one query token per sequence; the scale arguments are those of
    quantized pages (see ``gather_kv``).
    """
    qo_indptr = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_prefill(q, k_cache, v_cache, page_table, seq_lens, qo_indptr, sm_scale=sm_scale,
                         sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, out=out, k_scale=k_scale,
                         v_scale=v_scale, k_scale_cache=k_scale_cache, v_scale_cache=v_scale_cache,
                         first_page=first_page, sinks=sinks, attention_chunk_size=attention_chunk_size)


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
    k_scale: float | None = None,
    v_scale: float | None = None,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
    first_page: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    attention_chunk_size: int | None = None,
) -> torch.Tensor:
    """Prefill/extend attention; see ``kernels.paged_prefill``. Returns ``[num_tokens, num_heads, head_dim]``.

    The scale arguments are those of quantized pages (see ``gather_kv``).
    """
    scales = dict(k_scale=k_scale, v_scale=v_scale, k_scale_cache=k_scale_cache, v_scale_cache=v_scale_cache)
    out = torch.empty_like(q) if out is None else out
    bounds = qo_indptr.tolist()
    firsts = [0] * seq_lens.shape[0] if first_page is None else first_page.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = bounds[i], bounds[i + 1]
        if hi == lo:
            continue
        # NOTE: only keys some query may see are gathered, so pages released before the window
        # or the first query's chunk (NULL_PAGE entries) are never touched.
        start = max(seq_len - (hi - lo) - sliding_window + 1, 0) if sliding_window else 0
        if attention_chunk_size:
            start = max(seq_len - (hi - lo), 0) // attention_chunk_size * attention_chunk_size
        keys, values = gather_kv(k_cache, v_cache, page_table[i], seq_len, start, first_page=firsts[i], **scales)
        q_positions = torch.arange(seq_len - (hi - lo), seq_len, device=q.device)
        out[lo:hi] = attend(q[lo:hi], keys, values, q_positions, sm_scale=sm_scale, sliding_window=sliding_window,
                            logits_soft_cap=logits_soft_cap, key_start=start, sinks=sinks,
                            attention_chunk_size=attention_chunk_size)
    return out


def copy_pages(caches: torch.Tensor, copies: torch.Tensor) -> None:
    """``caches[:, dst] = caches[:, src]`` for every ``(src, dst)`` row of ``copies``, in order.

    Args:
        caches: ``[num_caches, num_pages, ...]`` (e.g. every layer's K and V stacked).
        copies: int ``[num_copies, 2]``.
    """
    for src, dst in copies.tolist():
        caches[:, dst] = caches[:, src]
