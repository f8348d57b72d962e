"""Vectorised torch paged attention: the CPU path of ``PagedKVCache`` (backend ``"torch"``).

``reference`` loops over sequences and spells every step out; it is the specification. This
module computes the same thing for a whole batch at once, so a CPU engine is not bound by
Python loops:

1. one gather of every sequence's pages, ``k_cache[page_table[:, :cols]]`` (the pool is indexed
   once per batch; GQA heads are never repeated);
2. the ragged query rows padded to ``[num_seqs, max_q_len]`` by one index;
3. one ``scaled_dot_product_attention`` with ``enable_gqa`` and a boolean mask (key inside the
   sequence, causal, inside the window), or, with a soft cap, the same in explicit matmuls on a
   ``[num_kv_heads, group]`` view of the query heads;
4. the padded output rows scattered back.

Keys outside a sequence (padding entries, the unused tail of its last page) are zeroed before
the product, so whatever bytes sit there never reach the result; a query with no key gets
zeros. Scores and softmax are in float32. Tested against ``reference`` (tests/test_batched.py).
Imports torch only.
"""

from __future__ import annotations

import math

from .._optional import require

torch = require("torch", __name__)

from . import quant  # noqa: E402
from .reference import write_kv  # noqa: E402,F401  (writes are already one vectorised scatter)


def _gather(cache: torch.Tensor, pages: torch.Tensor, scale, scale_cache) -> torch.Tensor:
    """``[num_seqs, cols * page_size, num_kv_heads, head_dim]`` in float32 (dequantized)."""
    num_seqs, cols = pages.shape
    fmt = quant.format_of(cache)
    if fmt is None:
        values = cache[pages].float()
    else:
        raw = quant.byte_view(cache)[pages].view(cache.dtype)
        if scale_cache is not None:
            values = quant.dequantize(raw, scale_cache[pages])
        else:
            values = quant.dequantize(raw, 1.0 if scale is None else scale)
    return values.reshape(num_seqs, cols * cache.shape[1], cache.shape[2], cache.shape[3])


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    qo_indptr: torch.Tensor | None,
    *,
    max_q_len: int,
    max_seq_len: int,
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
    """Prefill / decode attention over paged K/V for a ragged batch (see ``kernels.paged_prefill``).

    ``qo_indptr`` ``None`` means one query row per sequence (decode). ``max_q_len`` and
    ``max_seq_len`` are host-side bounds of the batch (``BatchPlan``'s); the gather covers
    ``max_seq_len`` positions per sequence.

    Returns:
        ``out``: ``[num_tokens, num_heads, head_dim]`` in ``q``'s dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = page_table.shape[0]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0:
        return out
    if num_seqs == 0 or max_seq_len == 0:
        return out.zero_()
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    device = q.device
    # --- keys: the columns every sequence may read, gathered once
    cols = page_table.shape[1] if first_page is not None else min(page_table.shape[1], -(-max_seq_len // page_size))
    entries = page_table[:, :cols].long()
    keys = _gather(k_cache, entries.clamp(min=0), k_scale, k_scale_cache)
    values = _gather(v_cache, entries.clamp(min=0), v_scale, v_scale_cache)
    start = 0 if first_page is None else first_page.long()[:, None] * page_size
    key_pos = torch.arange(cols * page_size, device=device)[None, :] + start  # [B, Lk]
    lens = seq_lens.long()[:, None]
    key_ok = (key_pos < lens) & (entries >= 0).repeat_interleave(page_size, dim=1)
    keys = keys.masked_fill(~key_ok[:, :, None, None], 0.0)
    values = values.masked_fill(~key_ok[:, :, None, None], 0.0)
    # --- queries: ragged rows padded to [B, Q]
    if qo_indptr is None:
        q_pad = q.float().reshape(num_seqs, 1, num_heads, head_dim)
        q_lens = torch.ones(num_seqs, 1, dtype=torch.long, device=device)
        rows = None
        width = 1
    else:
        width = max(max_q_len, 1)
        indptr = qo_indptr.long()
        q_lens = (indptr[1:] - indptr[:-1])[:, None]
        offset = torch.arange(width, device=device)[None, :]
        rows = offset < q_lens  # [B, Q]: a real query row
        index = (indptr[:-1, None] + offset).clamp(max=num_tokens - 1)
        q_pad = q.float()[index]  # [B, Q, H, D]
    q_pos = lens - q_lens + torch.arange(width, device=device)[None, :]  # [B, Q]
    allowed = key_ok[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])  # [B, Q, Lk]
    if sliding_window is not None:
        allowed &= key_pos[:, None, :] > q_pos[:, :, None] - sliding_window
    if attention_chunk_size is not None:
        allowed &= key_pos[:, None, :] >= q_pos[:, :, None] // attention_chunk_size * attention_chunk_size
    # --- attention: [B, H, Q, D] x [B, Hkv, Lk, D]
    qh = q_pad.transpose(1, 2)
    kh, vh = keys.transpose(1, 2), values.transpose(1, 2)
    if logits_soft_cap is None and sinks is None:
        result = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed[:, None], scale=scale,
                                                                  enable_gqa=num_heads != num_kv_heads)
    else:
        group = num_heads // num_kv_heads
        grouped = qh.reshape(num_seqs, num_kv_heads, group * width, head_dim)
        scores = grouped @ kh.transpose(-1, -2) * scale  # [B, Hkv, G * Q, Lk]
        if logits_soft_cap is not None:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        mask = allowed[:, None, None].expand(num_seqs, 1, group, width, allowed.shape[-1])
        scores = scores.masked_fill(~mask.reshape(num_seqs, 1, group * width, -1), float("-inf"))
        if sinks is None:
            probs = torch.softmax(scores, dim=-1)
        else:
            # NOTE: each head's sink is one more key with that score and a zero value
            sink = sinks.float().reshape(num_kv_heads, group, 1).expand(num_kv_heads, group, width)
            sink = sink.reshape(1, num_kv_heads, group * width, 1).expand(num_seqs, -1, -1, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        result = (probs @ vh).reshape(num_seqs, num_heads, width, head_dim)
    # NOTE: a query with no key (padding rows, q_len 0 rows) gets zeros, not NaN
    result = result.masked_fill(~allowed.any(-1)[:, None, :, None], 0.0).transpose(1, 2)  # [B, Q, H, D]
    if rows is None:
        out.copy_(result.reshape(num_tokens, num_heads, head_dim))
    else:
        out.copy_(result[rows])
    return out
