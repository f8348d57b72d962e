"""PagedKVCache on the CPU (torch backend): construction, plan, write/attention, copies, swaps.

The Triton backend of the same class is exercised in tests/kernels/test_cache_end_to_end.py.
"""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pagedkv import BlockManager  # noqa: E402
from pagedkv.cache import BatchPlan, PagedKVCache  # noqa: E402
from pagedkv.errors import InvalidArgument, InvalidType  # noqa: E402
from pagedkv.kernels import reference  # noqa: E402


def _cache(**overrides) -> PagedKVCache:
    args = dict(num_layers=2, num_pages=12, page_size=4, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                device="cpu")
    args.update(overrides)
    return PagedKVCache(**args)


# ------------------------------------------------------------------------- construction
def test_storage_layout_and_views():
    cache = _cache(dtype="bf16")
    assert cache.backend == "torch" and cache.device == torch.device("cpu") and cache.dtype == torch.bfloat16
    assert cache.kv.shape == (2, 2, 12, 4, 2, 16)
    assert cache.k_cache(1).shape == (12, 4, 2, 16) and cache.k_cache(1).is_contiguous()
    assert cache.k_cache(1).data_ptr() == cache.kv[1, 0].data_ptr()
    assert cache.v_cache(0).data_ptr() == cache.kv[0, 1].data_ptr()
    assert cache.page_nbytes == 2 * 2 * 4 * 2 * 16 * 2
    assert cache.nbytes == 12 * cache.page_nbytes
    assert "num_pages=12" in repr(cache)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(dtype="float8"), InvalidArgument, r"dtype must be one of"),
    (dict(dtype=torch.int32), InvalidArgument, r"dtype must be torch.float16, torch.bfloat16 or torch.float32"),
    (dict(head_dim=76), InvalidArgument, r"head_dim must be a multiple of 8 in \[8, 256\], got 76"),
    (dict(num_pages=0), InvalidArgument, r"num_pages must be an int in \[1, "),
    (dict(page_size=2.0), InvalidType, r"page_size must be an int"),
    (dict(backend="cuda"), InvalidArgument, r"backend must be 'triton', 'torch' or None"),
    (dict(device="gpu0"), InvalidArgument, r"device must be a torch device"),
])
def test_bad_construction_arguments(overrides, error, match):
    with pytest.raises(error, match=match):
        _cache(**overrides)


def test_layer_is_checked():
    with pytest.raises(InvalidArgument, match=r"layer must be an int in \[0, 1\], got 2"):
        _cache().k_cache(2)


def test_importing_the_cache_does_not_import_triton(run_python):
    code = "import sys, pagedkv.cache; assert 'triton' not in sys.modules, 'triton imported'"
    run_python(code)


# --------------------------------------------------------------------------------- plan
def _manager_with_sequences() -> BlockManager:
    mgr = BlockManager(num_pages=12, page_size=4, backend="python")
    mgr.allocate(7, 9)  # 3 pages, last one partly filled
    mgr.allocate(3, 4)  # exactly one page
    mgr.allocate(5, 1)
    return mgr


def test_plan_from_page_tables_csr_and_arrays_agree():
    mgr, cache = _manager_with_sequences(), _cache()
    ids = [7, 3, 5]
    tables = mgr.page_tables(ids)
    from_tables = cache.plan(tables, query_lens=[2, 4, 1])
    from_csr = cache.plan(mgr.csr(ids), query_lens=[2, 4, 1])
    from_arrays = cache.plan(tables.page_table.tolist(), tables.seq_lens.tolist(), query_lens=[2, 4, 1])
    for plan in (from_csr, from_arrays):
        for field in ("page_table", "seq_lens", "qo_indptr", "slot_mapping"):
            assert torch.equal(getattr(plan, field), getattr(from_tables, field)), field
    assert from_tables.page_table.dtype == torch.int32 and from_tables.seq_lens.tolist() == [9, 4, 1]
    assert from_tables.qo_indptr.tolist() == [0, 2, 6, 7]
    plan = from_tables
    assert (plan.num_seqs, plan.num_tokens, plan.max_seq_len, plan.max_q_len) == (3, 7, 9, 4)
    assert not from_tables.is_decode


def test_plan_derives_the_block_managers_slots():
    mgr, cache = _manager_with_sequences(), _cache()
    plan = cache.plan(mgr.page_tables([7, 3]), query_lens=[9, 2])
    want = np.concatenate([mgr.slots(7), mgr.slots(3, 2, 4)])
    assert plan.slot_mapping.tolist() == want.tolist()
    decode = cache.plan(mgr.page_tables([7, 3]))
    assert decode.is_decode and decode.slot_mapping.tolist() == [mgr.slots(7, 8)[0], mgr.slots(3, 3)[0]]


def test_plan_pads_for_cuda_graphs():
    mgr, cache = _manager_with_sequences(), _cache()
    plan = cache.plan(mgr.page_tables([3, 5]), max_pages=6)
    assert plan.page_table.shape == (2, 6) and plan.page_table[:, 1:].eq(-1).all()


@pytest.mark.parametrize("call, match", [
    (lambda c, t: c.plan(t.page_table), r"seq_lens must be an int array \[num_seqs\]"),
    (lambda c, t: c.plan(t, t.seq_lens), r"seq_lens must be None when page_tables is a PageTables"),
    (lambda c, t: c.plan(t, query_lens=[1, 5]), r"query_lens must be at most seq_lens\[1\] = 4, got 5"),
    (lambda c, t: c.plan(t, query_lens=[1, 1, 1]), r"query_lens must be one per sequence \(2\)"),
    (lambda c, t: c.plan(t, slot_mapping=[0, 1, 2]), r"slot_mapping must be one per new token \(2\)"),
    (lambda c, t: c.plan(t, slot_mapping=[0, 48]), r"slot_mapping must be a sequence of ints in \[-1, 47\], got 48"),
    (lambda c, t: c.plan(np.array([[0, -1, 1], [2, -1, -1]]), [9, 4]),
     r"page_table\[0\] must be a page id for every page attention reads \(the first 3 entries.*got \[0, -1, 1\]"),
    (lambda c, t: c.plan(np.array([[0, 12]]), [5]),
     r"page_table must be page ids in \[0, 12\) or -1 \(NULL_PAGE\), got 12"),
    (lambda c, t: c.plan(np.array([[0, 1]]), [9]), r"seq_lens must be at most max_pages \* page_size = 8, got 9"),
    (lambda c, t: c.plan(t, max_pages=2), r"max_pages must be an int in \[3, "),
])
def test_plan_rejects_inconsistent_batches(call, match):
    mgr, cache = _manager_with_sequences(), _cache()
    with pytest.raises(InvalidArgument, match=match):
        call(cache, mgr.page_tables([7, 3]))


def test_plan_for_a_released_window():
    mgr, cache = BlockManager(num_pages=12, page_size=4, backend="python"), _cache()
    mgr.allocate(0, 14)  # 4 pages
    cache.kv.copy_(torch.randn(cache.kv.shape))
    assert mgr.release_window(0, 6) == 2  # positions 8.. are kept; pages for 0..7 released
    step = mgr.append_batch([0], 1)
    tables = mgr.page_tables([0])
    assert tables.page_table[0, :2].tolist() == [-1, -1]
    with pytest.raises(InvalidArgument, match=r"page_table\[0\] must be a page id for every page attention reads"):
        cache.plan(tables, slot_mapping=step.slot_mapping)
    with pytest.raises(InvalidArgument, match=r"page_table\[0\]"):
        cache.plan(tables, slot_mapping=step.slot_mapping, sliding_window=9)  # would need position 6
    plan = cache.plan(tables, slot_mapping=step.slot_mapping, sliding_window=7)
    q = torch.randn(1, 4, 16)
    out = cache.decode(0, q, plan, sliding_window=7)
    keys, values = reference.gather_kv(cache.k_cache(0), cache.v_cache(0), plan.page_table[0], 15, start=8)
    torch.testing.assert_close(out, reference.attend(q, keys, values, torch.tensor([14]), key_start=8))
    with pytest.raises(InvalidArgument, match=r"sliding_window must be at most 7, the window the plan was built for"):
        cache.decode(0, q, plan)


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_plan_for_live_page_tables(backend):
    # window_tables: rows of live pages only, with first_page; the same attention as page_tables.
    mgr, cache = BlockManager(num_pages=12, page_size=4, backend=backend), _cache()
    mgr.allocate(0, 14)
    mgr.allocate(1, 3)
    cache.kv.copy_(torch.randn(cache.kv.shape))
    mgr.release_window(0, 6)
    step = mgr.append_batch([0, 1], 1)
    live = mgr.window_tables([0, 1])
    assert live.page_table.shape == (2, 2) and live.first_page.tolist() == [2, 0]
    full = cache.plan(mgr.page_tables([0, 1]), slot_mapping=step.slot_mapping, sliding_window=7)
    plan = cache.plan(live, sliding_window=7)  # the new tokens' slots derived through first_page
    assert plan.slot_mapping.tolist() == step.slot_mapping.tolist()
    assert plan.first_page.tolist() == [2, 0] and full.first_page is None
    q = torch.randn(2, 4, 16)
    torch.testing.assert_close(cache.decode(0, q, plan, sliding_window=7), cache.decode(0, q, full, sliding_window=7))
    torch.testing.assert_close(cache.prefill(1, q, plan, sliding_window=7), cache.prefill(1, q, full, sliding_window=7))
    with pytest.raises(InvalidArgument, match=r"first_page must be at most the first page attention reads for row 0"):
        cache.plan(live)  # no window: attention would read the released pages
    with pytest.raises(InvalidArgument, match="first_page"):
        cache.plan(live.page_table, live.seq_lens, first_page=[2], sliding_window=7)
    with pytest.raises(InvalidArgument, match="first_page must be None when page_tables is a WindowTables"):
        cache.plan(live, first_page=[2, 0], sliding_window=7)
    again = cache.plan(live.page_table, live.seq_lens, first_page=live.first_page, sliding_window=7)
    assert again.first_page.tolist() == [2, 0]


# ---------------------------------------------------------------------------- write/run
def test_write_prefill_decode_match_direct_attention():
    gen = torch.Generator().manual_seed(0)
    mgr, cache = BlockManager(num_pages=12, page_size=4, backend="python"), _cache()
    mgr.allocate(0, 5)
    mgr.allocate(1, 3)
    plan = cache.plan(mgr.page_tables([0, 1]), query_lens=[5, 3])
    k, v = torch.randn(8, 2, 16, generator=gen), torch.randn(8, 2, 16, generator=gen)
    cache.write(1, k, v, plan)
    q = torch.randn(8, 4, 16, generator=gen)
    out = cache.prefill(1, q, plan)
    torch.testing.assert_close(out[:5], reference.attend(q[:5], k[:5], v[:5], torch.arange(5)))
    torch.testing.assert_close(out[5:], reference.attend(q[5:], k[5:], v[5:], torch.arange(3)))
    assert cache.k_cache(0).abs().sum() == 0, "layer 0 was written"

    step = mgr.append_batch([0, 1], 1)
    plan = cache.plan(mgr.page_tables([0, 1]), slot_mapping=step.slot_mapping)
    k2, v2 = torch.randn(2, 2, 16, generator=gen), torch.randn(2, 2, 16, generator=gen)
    cache.write(1, k2, v2, plan)
    q2 = torch.randn(2, 4, 16, generator=gen)
    out = cache.decode(1, q2, plan, sm_scale=0.3)
    keys0, values0 = torch.cat([k[:5], k2[:1]]), torch.cat([v[:5], v2[:1]])
    torch.testing.assert_close(out[0], reference.attend(q2[:1], keys0, values0, torch.tensor([5]), sm_scale=0.3)[0])


def test_run_arguments_are_checked():
    mgr, cache = _manager_with_sequences(), _cache()
    prefill_plan = cache.plan(mgr.page_tables([7, 3]), query_lens=2)
    decode_plan = cache.plan(mgr.page_tables([7, 3]))
    assert isinstance(decode_plan, BatchPlan)
    with pytest.raises(InvalidArgument, match=r"plan must be a decode plan"):
        cache.decode(0, torch.zeros(2, 4, 16), prefill_plan)
    with pytest.raises(InvalidArgument, match=r"q must be of shape \[num_seqs, num_heads, head_dim\] = "
                                              r"\[2, num_heads, 16\], got \[3, 4, 16\]"):
        cache.decode(0, torch.zeros(3, 4, 16), decode_plan)
    with pytest.raises(InvalidArgument, match=r"q must be of dtype torch.float32 \(the dtype of the cache\)"):
        cache.prefill(0, torch.zeros(4, 4, 16, dtype=torch.float16), prefill_plan)
    with pytest.raises(InvalidArgument, match=r"num_heads must be a multiple of num_kv_heads \(2\), got 3"):
        cache.decode(0, torch.zeros(2, 3, 16), decode_plan)
    with pytest.raises(InvalidArgument, match=r"k must be of shape \[num_tokens, num_kv_heads, head_dim\]"):
        cache.write(0, torch.zeros(3, 2, 16), torch.zeros(3, 2, 16), prefill_plan)


# ------------------------------------------------------------------------ copies/swaps
def test_copy_on_write_plan_copies_every_layer():
    mgr, cache = BlockManager(num_pages=12, page_size=4, backend="python"), _cache()
    mgr.allocate(0, 6)
    cache.kv.copy_(torch.randn(cache.kv.shape))
    mgr.fork(0, 1)
    copies = mgr.append(1)  # the int32 [K, 2] array BlockManager.append returns
    assert len(copies) == 1
    src, dst = copies[0]
    before = cache.kv.clone()
    cache.copy(copies)
    assert torch.equal(cache.kv[:, :, dst], before[:, :, src])
    others = [p for p in range(12) if p != dst]
    assert torch.equal(cache.kv[:, :, others], before[:, :, others])
    cache.copy(np.zeros((0, 2), dtype=np.int32))  # an empty plan is fine


@pytest.mark.parametrize("copies, match", [
    ([(0, 12)], r"copies dst_page must be a page id in \[0, 12\), got 12"),
    ([(0, 3), (1, 3)], r"copies must be distinct destination pages"),
    ([(0, 3), (3, 4)], r"copies must be a plan where no page is both a source and a destination, got 3"),
    ([1, 2], r"copies must be an int array \[num_copies, 2\]"),
])
def test_bad_copy_plans(copies, match):
    with pytest.raises(InvalidArgument, match=match):
        _cache().copy(copies)


def test_swap_out_and_in_round_trip():
    cache = _cache(num_cpu_pages=5)
    cache.kv.copy_(torch.randn(cache.kv.shape))
    before = cache.kv.clone()
    cache.swap_out([(3, 0), (7, 4)])
    assert torch.equal(cache.cpu_kv[:, :, 0], before[:, :, 3]) and torch.equal(cache.cpu_kv[:, :, 4], before[:, :, 7])
    cache.kv[:, :, [3, 7]] = 0
    cache.swap_in([(0, 9), (4, 10)])
    assert torch.equal(cache.kv[:, :, 9], before[:, :, 3]) and torch.equal(cache.kv[:, :, 10], before[:, :, 7])
    with pytest.raises(InvalidArgument, match=r"copies dst_page must be a page id in \[0, 5\), got 5"):
        cache.swap_out([(0, 5)])
    with pytest.raises(InvalidArgument, match=r"num_cpu_pages must be > 0 at construction"):
        _cache().swap_out([(0, 0)])


def test_block_manager_swap_plans_round_trip():
    mgr = BlockManager(num_pages=12, page_size=4, num_cpu_pages=6, backend="python")
    cache = _cache(num_cpu_pages=6)
    mgr.allocate(0, 6)
    cache.kv.copy_(torch.randn(cache.kv.shape))
    before = cache.kv[:, :, mgr.page_table(0)].clone()
    cache.swap(mgr.swap_out([0]))
    mgr.end_step()  # a later step: the GPU pages may be reused (here: overwritten)
    cache.kv.zero_()
    cache.swap(mgr.swap_in([0]))
    assert torch.equal(cache.kv[:, :, mgr.page_table(0)], before)
    with pytest.raises(InvalidArgument, match=r"swap_plan.direction must be 'out' or 'in'"):
        cache.swap(np.zeros((0, 2)))


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_offload_plans_keep_a_demoted_prefix(backend):
    # An evicted cached prefix goes to the CPU pool and comes back bit for bit on a later hit.
    mgr = BlockManager(num_pages=3, page_size=4, enable_prefix_caching=True, num_cpu_pages=4, cpu_prefix_cache=True,
                       backend=backend)
    cache = _cache(num_pages=3, num_cpu_pages=4)
    prompt = list(range(9))
    mgr.allocate(0, token_ids=prompt)
    cache.kv.copy_(torch.randn(cache.kv.shape))  # "the prefill wrote the prompt's KV"
    kv = cache.kv[:, :, mgr.page_table(0)[:2]].clone()
    mgr.free(0)
    mgr.end_step()
    mgr.allocate(1, token_ids=[50 + t for t in range(12)])  # every page: both cached pages evicted
    plan = mgr.take_offload()
    assert len(plan.demotions) == 2
    cache.offload(plan)  # before the step's writes
    cache.kv.zero_()  # "the step's prefill overwrote the pages"
    mgr.free(1)
    mgr.end_step()
    assert mgr.allocate(2, token_ids=prompt).num_cached_tokens == 8
    plan = mgr.take_offload()
    assert len(plan.promotions) == 2
    cache.offload(plan)
    assert torch.equal(cache.kv[:, :, mgr.page_table(2)[:2]], kv)
