"""A BlockManager driving a PagedKVCache: prefill, fork, copy-on-write, decode.

Runs the Triton kernels (interpreter by default) and the torch backend on the same steps;
both must match attention computed directly on the K/V each sequence should see.
"""

from __future__ import annotations

import pytest
import torch

from pagedkv import BlockManager
from pagedkv.cache import PagedKVCache
from pagedkv.kernels import reference

NUM_LAYERS, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, NUM_HEADS = 2, 4, 2, 64, 8


def _expected(q, keys, values):
    """Attention of one query token at the last position over ``keys``/``values`` ``[n, H, D]``."""
    return reference.attend(q[None], keys, values, torch.tensor([keys.shape[0] - 1]))[0]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fork_copy_on_write_then_decode(device, backend, assert_close):
    gen = torch.Generator().manual_seed(4)
    mgr = BlockManager(num_pages=16, page_size=PAGE_SIZE, backend="python")
    cache = PagedKVCache(NUM_LAYERS, 16, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=torch.float32, device=device,
                         backend=backend)
    cache.kv.fill_(float("nan"))  # nothing but written tokens may ever be read

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    # prompt of 6 tokens for sequence 0: 1.5 pages, so the last page is partly filled
    mgr.allocate(0, 6)
    plan = cache.plan(mgr.page_tables([0]), query_lens=6, slot_mapping=mgr.slots(0))
    truth = {}  # (seq_id, layer) -> (keys, values) the sequence must see
    for layer in range(NUM_LAYERS):
        k, v = rand(6, NUM_KV_HEADS, HEAD_DIM), rand(6, NUM_KV_HEADS, HEAD_DIM)
        cache.write(layer, k, v, plan)
        q = rand(6, NUM_HEADS, HEAD_DIM)
        want = reference.attend(q, k, v, torch.arange(6, device=device))
        assert_close(cache.prefill(layer, q, plan), want)
        truth[0, layer] = (k, v)

    mgr.fork(0, 1)
    for layer in range(NUM_LAYERS):
        truth[1, layer] = truth[0, layer]
    shared_last_page = mgr.page_table(0)[-1]

    for step in range(3):
        plan_step = mgr.append_batch([0, 1], 1)
        if step == 0:
            # the first append into the shared, partly filled page copies it for sequence 0
            assert plan_step.copies.tolist() == [[shared_last_page, mgr.page_table(0)[-1]]]
            assert mgr.page_table(1)[-1] == shared_last_page
        cache.copy(plan_step.copies)
        plan = cache.plan(mgr.page_tables([0, 1]), slot_mapping=plan_step.slot_mapping)
        assert plan.is_decode
        for layer in range(NUM_LAYERS):
            k, v = rand(2, NUM_KV_HEADS, HEAD_DIM), rand(2, NUM_KV_HEADS, HEAD_DIM)
            cache.write(layer, k, v, plan)
            for i, seq_id in enumerate((0, 1)):
                keys, values = truth[seq_id, layer]
                truth[seq_id, layer] = (torch.cat([keys, k[i:i + 1]]), torch.cat([values, v[i:i + 1]]))
            q = rand(2, NUM_HEADS, HEAD_DIM)
            out = cache.decode(layer, q, plan, num_splits=2 if step == 1 else None)
            for i, seq_id in enumerate((0, 1)):
                assert_close(out[i], _expected(q[i], *truth[seq_id, layer]))
    mgr.check_invariants()


def test_triton_and_torch_backends_agree(device):
    gen = torch.Generator().manual_seed(5)
    mgr = BlockManager(num_pages=32, page_size=3, backend="python")
    caches = [PagedKVCache(1, 32, 3, 2, 64, dtype=torch.float16, device=device, backend=b) for b in ("triton", "torch")]
    for seq_id, n in enumerate((7, 1, 12)):
        mgr.allocate(seq_id, n)
    plan_args = dict(page_tables=mgr.page_tables([0, 1, 2]), query_lens=[7, 1, 12])
    k = torch.randn(20, 2, 64, generator=gen).half().to(device)
    v = torch.randn(20, 2, 64, generator=gen).half().to(device)
    q = torch.randn(20, 4, 64, generator=gen).half().to(device)
    outs = []
    for cache in caches:
        plan = cache.plan(**plan_args)  # slots derived from the page tables
        cache.write(0, k, v, plan)
        outs.append(cache.prefill(0, q, plan, sliding_window=5, logits_soft_cap=10.0))
    assert torch.equal(caches[0].kv, caches[1].kv)
    torch.testing.assert_close(outs[0], outs[1], atol=4e-3, rtol=4e-3)
