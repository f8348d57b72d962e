"""Sequence export / import (prefill/decode disaggregation): both backends alike, all or
nothing, and the pages moved between two processes over torch.distributed (gloo, loopback)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pagedkv import BlockManager, OutOfPages, SequenceExists, SequenceSwapped, UnknownSequence
from pagedkv.errors import InvalidArgument, InvalidType
from pagedkv.transfer import TransferDescriptor

BACKENDS = ["cpp", "python"]


@pytest.mark.parametrize("seed", range(3))
def test_both_backends_export_and_import_alike(seed):
    plans = {}
    for backend in BACKENDS:
        r = random.Random(seed)
        src = BlockManager(64, 4, enable_prefix_caching=True, backend=backend)
        dst = BlockManager(16, 4, enable_prefix_caching=True, backend=backend)
        out = []
        prompts = [[r.randrange(6) for _ in range(r.randint(1, 20))] for _ in range(12)]
        for i, prompt in enumerate(prompts):
            src.allocate(i, token_ids=prompt)
            if r.random() < 0.5 and (100 + i - 3) in dst:
                dst.free(100 + i - 3)  # an older prefix holder ends (its pages stay cached)
            if r.random() < 0.5:  # the importer already has a prefix of it
                try:
                    dst.allocate(100 + i, token_ids=prompt[:r.randint(1, len(prompt))])
                except OutOfPages:
                    pass
            with_ids = r.random() < 0.7
            d = src.export_sequence(i, token_ids=prompt if with_ids else None)
            try:
                plan = dst.import_sequence(i, d)
                if with_ids:
                    dst.commit(i, d.num_tokens)  # the pages arrived: matchable from now on
                out.append(("ok", plan.transfers.tolist(), plan.copies.tolist(), plan.num_cached_tokens,
                            dst.page_table(i), d.page_ids.tolist(), d.block_hashes))
            except OutOfPages as exc:
                out.append(("out", str(exc)))
            if r.random() < 0.4 and i in dst:
                dst.free(i)
        plans[backend] = out
    assert plans["cpp"] == plans["python"]
    assert sum(o[0] == "ok" and o[3] > 0 for o in plans["cpp"]) > 0, "no import found a cached prefix"
    assert any(o[0] == "out" for o in plans["cpp"]), "no import ran out of pages"


def test_the_plan_moves_only_pages_the_importer_lacks():
    src = BlockManager(32, 4, enable_prefix_caching=True)
    dst = BlockManager(32, 4, enable_prefix_caching=True)
    prompt = list(range(1, 15))
    src.allocate(0, token_ids=prompt)
    dst.allocate(9, token_ids=prompt[:9])  # two full pages of it
    d = src.export_sequence(0, token_ids=prompt)
    assert d.num_tokens == 14 and d.page_ids.tolist() == src.page_table(0) and len(d.block_hashes) == 3
    plan = dst.import_sequence(0, d)
    assert plan.num_cached_tokens == 8
    assert plan.transfers.tolist() == [[d.page_ids[2], dst.page_table(0)[2]], [d.page_ids[3], dst.page_table(0)[3]]]
    assert dst.page_table(0)[:2] == dst.page_table(9)[:2]
    # without token ids, every page moves
    plain = BlockManager(32, 4).import_sequence(0, src.export_sequence(0))
    assert plain.transfers[:, 0].tolist() == d.page_ids.tolist() and plain.num_cached_tokens == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_exports_and_imports_change_nothing(backend):
    src = BlockManager(16, 4, num_cpu_pages=8, backend=backend)
    dst = BlockManager(3, 4, backend=backend)
    src.allocate(0, 10)
    src.allocate(1, 5)
    with pytest.raises(UnknownSequence):
        src.export_sequence(7)
    with pytest.raises(InvalidArgument, match="token_ids"):
        src.export_sequence(0, token_ids=[1, 2])
    with pytest.raises(InvalidArgument, match="cache_salt"):
        src.export_sequence(0, cache_salt="t")
    d = src.export_sequence(0)
    src.swap_out([1])
    with pytest.raises(SequenceSwapped):
        src.export_sequence(1)
    small = BlockManager(2, 4, backend=backend)
    with pytest.raises(OutOfPages):
        small.import_sequence(0, d)
    assert small.snapshot() == BlockManager(2, 4, backend=backend).snapshot()
    dst.allocate(0, 1)
    before = dst.snapshot()
    with pytest.raises(SequenceExists):
        dst.import_sequence(0, d)
    assert dst.snapshot() == before
    dst.free(0)
    before = dst.snapshot()
    with pytest.raises(InvalidType, match="descriptor"):
        dst.import_sequence(1, {"num_tokens": 10})
    with pytest.raises(InvalidArgument, match="descriptor.page_size"):
        BlockManager(8, 2, backend=backend).import_sequence(1, d)
    with pytest.raises(InvalidArgument, match="descriptor.page_ids"):
        dst.import_sequence(1, d._replace(page_ids=d.page_ids[:2]))
    with pytest.raises(InvalidArgument, match="descriptor.token_ids"):
        dst.import_sequence(1, d._replace(token_ids=np.arange(3)))
    assert dst.snapshot() == before
    windowed = BlockManager(16, 4, backend=backend)
    windowed.allocate(0, 12)
    windowed.release_window(0, 4)
    with pytest.raises(InvalidArgument, match="window"):
        windowed.export_sequence(0)
    assert isinstance(d, TransferDescriptor)


WORKER = r"""
import sys, datetime
import numpy as np
import torch
import torch.distributed as dist
from pagedkv import BlockManager
from pagedkv.cache import PagedKVCache
from pagedkv.kernels import reference

rank, port = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
prompt = list(range(100, 123))
mgr = BlockManager(16, 4, enable_prefix_caching=True)
cache = PagedKVCache(2, 16, 4, 2, 8, dtype=torch.float32, device="cpu", kv_dtype="int8")
gen = torch.Generator().manual_seed(5)
if rank == 0:  # prefill: compute the prompt's KV (here: random) and export it
    mgr.allocate(0, token_ids=prompt)
    plan = cache.plan(mgr.page_tables([0]), query_lens=len(prompt))
    for layer in range(2):
        cache.write(layer, torch.randn(23, 2, 8, generator=gen), torch.randn(23, 2, 8, generator=gen), plan)
    objects = [mgr.export_sequence(0, token_ids=prompt)]
    dist.broadcast_object_list(objects, src=0)
    plan = [None]
    dist.broadcast_object_list(plan, src=1)
    cache.send_pages(plan[0], 1)
    q = torch.randn(1, 4, 8, generator=gen)
    out = cache.decode(1, q, cache.plan(mgr.page_tables([0])))
else:  # decode: it already holds the first 8 tokens, imports the rest
    mgr.allocate(9, token_ids=prompt[:9])
    objects = [None]
    dist.broadcast_object_list(objects, src=0)
    plan = mgr.import_sequence(0, objects[0])
    cache.copy(plan.copies)
    dist.broadcast_object_list([plan], src=1)
    cache.recv_pages(plan, 0)
    mgr.commit(0, 23)
    print("MOVED", len(plan.transfers), plan.num_cached_tokens)
    out = None
dist.barrier()
# rank 0 sends its whole prompt KV once more, for the comparison of every page
table = torch.tensor(mgr.page_table(0))
data = cache.kv[:, :, table].contiguous()
scales = cache.scales[:, :, table].contiguous()
if rank == 0:
    dist.send(data, 1); dist.send(scales, 1)
else:
    theirs, their_scales = torch.empty_like(data), torch.empty_like(scales)
    dist.recv(theirs, 0); dist.recv(their_scales, 0)
    moved = slice(plan.num_cached_tokens // 4, None)
    same = torch.equal(theirs[:, :, moved], data[:, :, moved]) and torch.equal(their_scales[:, :, moved], scales[:, :, moved])
    print("EQUAL", same)
dist.destroy_process_group()
"""


def test_pages_move_between_two_processes(run_ranks):
    outs = run_ranks(WORKER)
    assert "MOVED 4 8" in outs[1] and "EQUAL True" in outs[1], outs
