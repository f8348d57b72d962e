"""The serving path an engine calls every step: persistent plan buffers (fixed addresses, padding),
repeated slots, and no host synchronisation or allocation in the per-layer calls.

The no-sync test watches every torch op the calls issue (``TorchDispatchMode``): no ``item`` /
``_local_scalar_dense``, no copy to the host, and, with ``out=`` and a plan in buffers, no op
that returns new memory. On the CPU the Triton launches are replaced by a recorder (the
interpreter itself moves tensors around); on a GPU the same test also runs under
``torch.cuda.set_sync_debug_mode("error")`` with the real kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pagedkv import BlockManager  # noqa: E402
from pagedkv.cache import PagedKVCache  # noqa: E402
from pagedkv.errors import InvalidArgument, InvalidType  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402


def _setup(num_seqs=3, backend="torch", page_size=4, num_pages=24, dtype=torch.float32):
    mgr = BlockManager(num_pages, page_size)
    cache = PagedKVCache(2, num_pages, page_size, 2, 16, dtype=dtype, device="cpu", backend=backend)
    for seq_id in range(num_seqs):
        mgr.allocate(seq_id, 3 + 2 * seq_id)
    return mgr, cache


def _tensors(plan):
    return {name: getattr(plan, name) for name in ("page_table", "seq_lens", "qo_indptr", "slot_mapping")}


# -------------------------------------------------------------------------- plan buffers
def test_buffered_plans_reuse_the_same_memory_every_step():
    mgr, cache = _setup()
    buffers = cache.plan_buffers(max_num_seqs=8, max_num_tokens=16, max_pages=6)
    ids = [0, 1, 2]
    addresses = None
    for _ in range(5):
        step = mgr.append_batch(ids, 1)
        mgr.end_step()
        plan = cache.plan(mgr.page_tables(ids), slot_mapping=step.slot_mapping, buffers=buffers, pad_to=4)
        now = {name: t.data_ptr() for name, t in _tensors(plan).items()}
        addresses = addresses or now
        assert now == addresses, "a buffered plan moved"
        assert plan.page_table.shape == (4, 6) and plan.num_seqs == 4 and plan.is_decode
        # the same contents as an unbuffered plan, then the padding row
        fresh = cache.plan(mgr.page_tables(ids), slot_mapping=step.slot_mapping, max_pages=6)
        assert torch.equal(plan.page_table[:3], fresh.page_table)
        assert plan.page_table[3].eq(-1).all() and plan.seq_lens.tolist() == fresh.seq_lens.tolist() + [0]
        assert plan.slot_mapping.tolist() == step.slot_mapping.tolist() + [-1]
        assert plan.qo_indptr.tolist() == [0, 1, 2, 3, 4]
    assert addresses["page_table"] == buffers.page_table.data_ptr()


def test_padding_rows_write_nothing_and_yield_zeros():
    gen = torch.Generator().manual_seed(1)
    mgr, cache = _setup()
    buffers = cache.plan_buffers(8, 16, 6)
    ids = [0, 1, 2]
    step = mgr.append_batch(ids, 1)
    plain = cache.plan(mgr.page_tables(ids), slot_mapping=step.slot_mapping)
    padded = cache.plan(mgr.page_tables(ids), slot_mapping=step.slot_mapping, buffers=buffers, pad_to=5)
    k, v = torch.randn(5, 2, 16, generator=gen), torch.randn(5, 2, 16, generator=gen)
    before = cache.kv.clone()
    cache.write(0, k, v, padded)
    changed = (cache.kv != before).any(dim=(3, 4, 5))  # [layers, K/V, pages]: pages written
    cache.kv.copy_(before)
    cache.write(0, k[:3], v[:3], plain)
    assert torch.equal(changed, (cache.kv != before).any(dim=(3, 4, 5))), "padding rows wrote a page"
    q = torch.randn(5, 4, 16, generator=gen)
    out = cache.decode(0, q, padded)
    torch.testing.assert_close(out[:3], cache.decode(0, q[:3], plain))
    assert out[3:].eq(0).all()
    # a padded prefill batch: padding rows have no query row at all
    chunk = cache.plan(mgr.page_tables(ids), query_lens=[2, 1, 3], buffers=buffers, pad_to=4)
    assert chunk.num_seqs == 4 and chunk.num_tokens == 6 and chunk.qo_indptr.tolist() == [0, 2, 3, 6, 6]


def test_buffer_limits_are_typed_errors():
    mgr, cache = _setup()
    buffers = cache.plan_buffers(2, 4, 2)
    tables = mgr.page_tables([0, 1, 2])
    with pytest.raises(InvalidArgument, match="max_num_seqs = 2"):
        cache.plan(tables, buffers=buffers)
    with pytest.raises(InvalidArgument, match="pad_to"):
        cache.plan(mgr.page_tables([0]), buffers=buffers, pad_to=3)
    with pytest.raises(InvalidArgument, match="pad_to"):
        cache.plan(mgr.page_tables([0]), pad_to=1)
    mgr.allocate(5, 9)  # 3 pages of 4 tokens
    with pytest.raises(InvalidArgument, match="buffers' max_pages = 2"):
        cache.plan(mgr.page_tables([5]), buffers=buffers)
    with pytest.raises(InvalidArgument, match="max_num_tokens = 4"):
        cache.plan(mgr.page_tables([0, 1]), query_lens=3, buffers=buffers)
    with pytest.raises(InvalidArgument, match="buffers"):
        cache.plan(tables, buffers="not buffers")
    with pytest.raises(InvalidArgument, match="max_pages"):
        cache.plan_buffers(2**20, 1, 2**9)


def test_repeated_slots_are_refused():
    mgr, cache = _setup()
    tables = mgr.page_tables([0, 1])
    slots = mgr.slots(0, 2, 3)
    with pytest.raises(InvalidArgument, match=rf"slot_mapping .*appears more than once.*got {int(slots[0])}"):
        cache.plan(tables, slot_mapping=np.concatenate([slots, slots]))
    # -1 (skip) may repeat; forked sequences whose last page is shared collide
    cache.plan(tables, slot_mapping=[-1, -1])
    mgr.fork(0, 9)
    with pytest.raises(InvalidArgument, match="appears more than once"):
        cache.plan(mgr.page_tables([0, 9]))


def test_a_device_tensor_is_refused_by_plan():
    mgr, cache = _setup()
    meta = torch.zeros(2, dtype=torch.int64, device="meta")
    with pytest.raises(InvalidArgument, match="slot_mapping.*synchronise"):
        cache.plan(mgr.page_tables([0, 1]), slot_mapping=meta)


# ------------------------------------------------------------------ no sync, no allocation
class OpWatch(TorchDispatchMode):
    """Every aten op issued, and those that return memory none of their inputs own."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.allocating: list[str] = []
        self.to_host: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        self.ops.append(name)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        owned = {t.untyped_storage().data_ptr() for t in inputs}
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in owned:
                self.allocating.append(name)
        if any(t.device.type != "cpu" for t in inputs) and name in ("_to_copy", "copy_") and \
                any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_flatten(result)[0]):
            self.to_host.append(name)
        return result


SYNCING = {"item", "_local_scalar_dense", "nonzero", "tolist", "equal", "is_nonzero", "_assert_async"}


class Recorder:
    """A Triton kernel that records its launches instead of running."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
        return launch


@pytest.fixture
def stubbed_kernels(monkeypatch):
    pytest.importorskip("triton")
    import importlib

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton

    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    recorders = {}
    for module_name, kernels in (("write_kv", ["_write_kv_kernel"]),
                                 ("decode", ["_paged_decode_kernel", "_merge_splits_kernel"]),
                                 ("prefill", ["_paged_prefill_kernel"])):
        module = importlib.import_module(f"pagedkv.kernels.{module_name}")
        for kernel in kernels:
            recorders[kernel] = Recorder()
            monkeypatch.setattr(module, kernel, recorders[kernel])
    return recorders


@pytest.mark.parametrize("num_splits", [1, 3])
def test_per_layer_calls_issue_no_sync_and_no_allocation(stubbed_kernels, num_splits):
    mgr, cache = _setup(num_seqs=3, backend="triton", dtype=torch.float16)
    buffers = cache.plan_buffers(4, 8, 6)
    ids = [0, 1, 2]
    step = mgr.append_batch(ids, 1)
    plan = cache.plan(mgr.page_tables(ids), slot_mapping=step.slot_mapping, buffers=buffers, pad_to=4)
    q = torch.zeros(4, 4, 16, dtype=torch.float16)
    k = torch.zeros(4, 2, 16, dtype=torch.float16)
    out = torch.empty_like(q)
    prefill_out = torch.empty_like(q)
    cache.decode(0, q, plan, out=out, num_splits=num_splits)  # first call of this shape: its workspace
    watch = OpWatch()
    with watch:
        for layer in range(cache.num_layers):
            cache.write(layer, k, k, plan)
            cache.decode(layer, q, plan, out=out, num_splits=num_splits)
            cache.prefill(layer, q, plan, out=prefill_out)
    assert not SYNCING & set(watch.ops), watch.ops
    assert not watch.allocating, watch.allocating
    assert not watch.to_host
    with OpWatch() as without_out:  # the watch sees an allocation: the output of a call without out=
        cache.decode(0, q, plan, num_splits=num_splits)
    assert without_out.allocating
    launched = stubbed_kernels["_paged_decode_kernel"].launches
    assert len(launched) == 4 and all(grid == (4, 2, num_splits) for grid, _, _ in launched)
    assert len(stubbed_kernels["_merge_splits_kernel"].launches) == (4 if num_splits > 1 else 0)
    assert len(stubbed_kernels["_write_kv_kernel"].launches) == 2
    # the launches read the buffers themselves, and the split partials are one workspace
    assert all(args[3] is plan.page_table and args[4] is plan.seq_lens for _, args, _ in launched)
    assert len({args[7].data_ptr() for _, args, _ in launched[:3]}) == 1


def test_plan_issues_no_sync(stubbed_kernels):
    mgr, cache = _setup(num_seqs=3, backend="triton", dtype=torch.float16)
    buffers = cache.plan_buffers(4, 8, 6)
    watch = OpWatch()
    with watch:
        for _ in range(3):
            step = mgr.append_batch([0, 1, 2], 1)
            mgr.end_step()
            cache.plan(mgr.page_tables([0, 1, 2]), slot_mapping=step.slot_mapping, buffers=buffers, pad_to=4)
            cache.plan(mgr.page_tables([0, 1, 2]), query_lens=[1, 2, 1])
    assert not SYNCING & set(watch.ops), watch.ops
    assert not watch.to_host


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_per_layer_calls_do_not_sync_on_cuda():
    mgr = BlockManager(64, 16)
    cache = PagedKVCache(2, 64, 16, 2, 64, dtype=torch.float16, device="cuda")
    for seq_id in range(3):
        mgr.allocate(seq_id, 40 + seq_id)
    buffers = cache.plan_buffers(4, 8, 8)
    q = torch.randn(4, 8, 64, dtype=torch.float16, device="cuda")
    k = torch.randn(4, 2, 64, dtype=torch.float16, device="cuda")
    out = torch.empty_like(q)
    step = mgr.append_batch([0, 1, 2], 1)
    plan = cache.plan(mgr.page_tables([0, 1, 2]), slot_mapping=step.slot_mapping, buffers=buffers, pad_to=4)
    cache.decode(0, q, plan, out=out)  # compiles, and makes the workspace
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step = mgr.append_batch([0, 1, 2], 1)
            mgr.end_step()
            plan = cache.plan(mgr.page_tables([0, 1, 2]), slot_mapping=step.slot_mapping, buffers=buffers, pad_to=4)
            for layer in range(2):
                cache.write(layer, k, k, plan)
                cache.decode(layer, q, plan, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ------------------------------------------------------------------- C++ plan vs oracle
def _outcome(cache, buffers, fast, *args, **kwargs):
    cache._fast_plans = fast
    try:
        plan = cache.plan(*args, buffers=buffers, **kwargs)
    except Exception as exc:  # noqa: BLE001 - compared by type and message
        return ("raised", type(exc).__name__, str(exc))
    finally:
        cache._fast_plans = True
    tensors = {name: t.clone() for name, t in _tensors(plan).items()}
    tensors["first_page"] = None if plan.first_page is None else plan.first_page.clone()
    return ("returned", plan.num_seqs, plan.num_tokens, plan.max_seq_len, plan.max_q_len, plan.sliding_window,
            {k: None if v is None else v.tolist() for k, v in tensors.items()})


def test_the_core_plans_buffered_batches_as_the_oracle_does(monkeypatch):
    pytest.importorskip("pagedkv._core")
    import random

    import pagedkv._planning as planning

    taken = []
    fast_fill = planning.fast_fill
    monkeypatch.setattr(planning, "fast_fill", lambda *a, **k: taken.append(fast_fill(*a, **k)) or taken[-1])
    rng = random.Random(7)
    mgr, cache = BlockManager(40, 4), PagedKVCache(1, 40, 4, 1, 16, dtype=torch.float32, device="cpu")
    buffers = cache.plan_buffers(6, 24, 8)
    for seq_id in range(6):
        mgr.allocate(seq_id, rng.randint(1, 20))
    counts = {"returned": 0, "raised": 0}
    for _ in range(400):
        ids = rng.sample(range(6), rng.randint(0, 6))
        kind = rng.random()
        tables = mgr.window_tables(ids) if kind < 0.3 else mgr.page_tables(ids)
        if rng.random() < 0.15 and len(ids):  # hostile: a page id out of range, or a hole
            table = tables.page_table.copy()
            table[rng.randrange(len(ids)), 0] = rng.choice([-2, -1, 40, 2**31 - 1])
            tables = tables._replace(page_table=table)
        kwargs = {}
        r = rng.random()
        if r < 0.3:
            kwargs["query_lens"] = rng.choice([0, 1, 2, 30])
        elif r < 0.6:
            lens = tables.seq_lens.astype(np.int64)
            kwargs["query_lens"] = np.minimum(lens, np.array([rng.randint(0, 5) for _ in ids], dtype=np.int64))
        if rng.random() < 0.3:
            num = int(np.sum(kwargs.get("query_lens", 1) * np.ones(len(ids), dtype=np.int64)))
            slots = np.array([rng.randint(-1, 40 * 4) for _ in range(num + rng.choice([0, 0, 0, 1]))],
                             dtype=np.int64)
            kwargs["slot_mapping"] = slots
        if rng.random() < 0.4:
            kwargs["pad_to"] = rng.choice([len(ids), len(ids) + 1, 6, 7])
        if rng.random() < 0.2:
            kwargs["max_pages"] = rng.choice([tables.page_table.shape[1], 8, 9])
        if rng.random() < 0.3:
            kwargs["sliding_window"] = rng.choice([1, 3, 8])
        fast = _outcome(cache, buffers, True, tables, **kwargs)
        slow = _outcome(cache, buffers, False, tables, **kwargs)
        assert fast == slow, (ids, kwargs)
        counts[fast[0]] += 1
    assert counts["returned"] > 50 and counts["raised"] > 50, counts
    assert sum(plan is not None for plan in taken) > 150, "the C++ path was rarely taken"


# ------------------------------------------------------------------------ async swaps
class DelayedCopy:
    """A device-to-host copy still in flight: its bytes are zeros until ``synchronize``."""

    def __init__(self, source: torch.Tensor, log: list):
        self.source, self.host, self.log = source.clone(), torch.zeros_like(source), log

    def synchronize(self):
        self.log.append("waited")
        self.host.copy_(self.source)


def test_a_swap_out_lands_before_the_cpu_pool_is_read(monkeypatch):
    # The device-to-host copy of swap_out is made slow (its bytes arrive only when waited for);
    # the pool must not take them before that, and a swap_in of the same pages must wait.
    cache = PagedKVCache(2, 8, 4, 2, 16, dtype=torch.float32, device="cpu", num_cpu_pages=4)
    cache.kv.copy_(torch.randn(cache.kv.shape))
    log: list = []

    def delayed(gathered):
        copy = DelayedCopy(gathered, log)
        return copy.host, copy

    monkeypatch.setattr(cache, "_to_host", delayed)
    before = cache.kv[:, :, [2, 5]].clone()
    cache.swap_out([(2, 0), (5, 3)])
    assert not log and cache._cpu_kv[:, :, [0, 3]].eq(0).all(), "the pool took bytes still in flight"
    cache.kv[:, :, [2, 5]] = 0  # the step that follows reuses the device pages
    cache.swap_in([(3, 6), (0, 7)])
    assert log == ["waited"]
    assert torch.equal(cache.kv[:, :, 6], before[:, :, 1]) and torch.equal(cache.kv[:, :, 7], before[:, :, 0])
    # a second swap-out in flight lands through the cpu_kv property too
    cache.swap_out([(6, 1)])
    assert torch.equal(cache.cpu_kv[:, :, 1], before[:, :, 1]) and log == ["waited", "waited"]


# ------------------------------------------------------------------------------ warmup
def _variant(args, kwargs) -> tuple:
    """What Triton compiles a launch for: the constexprs, each tensor's dtype and 16-byte
    alignment, each int's specialization (1, a multiple of 16, or neither) and width."""
    def key(value):
        if isinstance(value, torch.Tensor):
            return (str(value.dtype), value.data_ptr() % 16 == 0)
        if isinstance(value, bool) or not isinstance(value, int):
            return type(value).__name__
        return ("1" if value == 1 else "16" if value % 16 == 0 else "i", abs(value) < 2**31)
    return tuple(key(a) for a in args) + tuple(sorted(kwargs.items()))


def test_warmup_compiles_every_variant_serving_launches(stubbed_kernels):
    # A serving run through plan buffers, with batch sizes padded to the warmed-up sizes and
    # contexts growing across split and stride boundaries, launches only warmed-up variants.
    mgr, cache = BlockManager(200, 4), PagedKVCache(2, 200, 4, 2, 16, dtype=torch.float16, device="cpu",
                                                    backend="triton")
    buffers = cache.plan_buffers(8, 64, 256)  # 1024 tokens: split-KV at every batch size
    sizes = (1, 2, 4, 8)

    def variants():
        return {(name, _variant(a, k)) for name, rec in stubbed_kernels.items() for _, a, k in rec.launches}

    cache.warmup(buffers, 4, sizes)
    warmed = variants()
    assert {name for name, _ in warmed} == set(stubbed_kernels), "a kernel was not warmed up"
    for recorder in stubbed_kernels.values():
        recorder.launches.clear()
    q, kv = torch.zeros(8, 4, 16, dtype=torch.float16), torch.zeros(8, 2, 16, dtype=torch.float16)
    live = []
    for step in range(60):
        if len(live) < 7 and step % 5 == 0:
            mgr.allocate(step, 3 + step % 7)
            live.append(step)
            plan = cache.plan(mgr.page_tables([step]), query_lens=3 + step % 7, buffers=buffers)
            cache.prefill(0, torch.zeros(plan.num_tokens, 4, 16, dtype=torch.float16), plan)
        out = mgr.append_batch(live, 1)
        mgr.end_step()
        rows = next(size for size in sizes if size >= len(live))
        plan = cache.plan(mgr.page_tables(live), slot_mapping=out.slot_mapping, buffers=buffers, pad_to=rows)
        cache.write(1, kv[:rows], kv[:rows], plan)
        cache.decode(1, q[:rows], plan, out=torch.empty_like(q[:rows]))
    served = variants()
    assert served <= warmed, served - warmed
    # without buffers the table width (a specialised stride) follows the batch: new variants
    for recorder in stubbed_kernels.values():
        recorder.launches.clear()
    for width in (3, 16, 17):
        table = np.full((1, width), -1, dtype=np.int32)
        table[0, 0] = 0
        plan = cache.plan(table, [1])
        cache.decode(0, q[:1], plan)
    assert not variants() <= warmed


def test_warmup_with_a_chunk_compiles_what_chunked_serving_launches(stubbed_kernels):
    # A chunk bounds the keys a query reads, so it sets the split-KV count (and its mask value
    # is a specialised int): warmup must be told it, as it is told a sliding window.
    mgr, cache = BlockManager(200, 4), PagedKVCache(1, 200, 4, 2, 16, dtype=torch.float16, device="cpu",
                                                    backend="triton")
    buffers = cache.plan_buffers(4, 64, 256)
    q = torch.zeros(4, 4, 16, dtype=torch.float16)

    def serve():
        for recorder in stubbed_kernels.values():
            recorder.launches.clear()
        for seq in range(4):
            if seq not in mgr:
                mgr.allocate(seq, 40 + 30 * seq)
        plan = cache.plan(mgr.page_tables(range(4)), buffers=buffers, attention_chunk_size=8)
        cache.decode(0, q, plan, out=torch.empty_like(q), attention_chunk_size=8)
        return {(name, _variant(a, k)) for name, rec in stubbed_kernels.items() for _, a, k in rec.launches}

    def warm(**options):
        for recorder in stubbed_kernels.values():
            recorder.launches.clear()
        cache.warmup(buffers, 4, (4,), **options)
        return {(name, _variant(a, k)) for name, rec in stubbed_kernels.items() for _, a, k in rec.launches}

    assert not serve() <= warm()  # warmed without the chunk: another split count
    assert serve() <= warm(attention_chunk_size=8)


def test_per_layer_argument_checks_found_in_review():
    mgr, cache = _setup()
    plan = cache.plan(mgr.page_tables([0, 1]))
    q = torch.zeros(2, 4, 16)
    cache.decode(0, q, plan, sliding_window=1)
    for bad in (True, 1.0):  # equal to 1 as dict keys, and not ints
        with pytest.raises(InvalidType, match="sliding_window"):
            cache.decode(0, q, plan, sliding_window=bad)
    with pytest.raises(InvalidType, match="sm_scale"):
        cache.decode(0, q, plan, sm_scale=True)
    windowed = cache.plan(mgr.page_tables([0, 1]), sliding_window=2)
    with pytest.raises(InvalidType, match="sliding_window"):
        cache.decode(0, q, windowed, sliding_window="a")
    other = PagedKVCache(2, 64, 4, 2, 16, dtype=torch.float32, device="cpu")
    for call in (lambda: other.write(0, torch.zeros(2, 2, 16), torch.zeros(2, 2, 16), plan),
                 lambda: other.decode(0, q, plan), lambda: other.prefill(0, q, plan)):
        with pytest.raises(InvalidArgument, match="plan"):
            call()
    with pytest.raises(InvalidType, match="plan"):
        cache.decode(0, q, None)
    with pytest.raises(InvalidArgument, match="num_heads"):
        cache.decode(0, torch.zeros(2, 0, 16), plan)
