"""``pagedkv.distributed`` over torch.distributed's gloo backend: 2 processes on loopback."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

from pagedkv.errors import InvalidArgument  # noqa: E402

WORKER = r"""
import sys
import torch.distributed as dist
import numpy as np
from pagedkv.distributed import agree_num_pages, agree_num_pages_for_budget, broadcast_arrays
from pagedkv.events import block_hashes

rank, port = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=__import__("datetime").timedelta(seconds=60))
agreed = agree_num_pages([1000, 640][rank])
spec = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
budget = agree_num_pages_for_budget(spec, [1 << 20, 3 << 20][rank], 16)
hashes = block_hashes(list(range(64)), 16, "tenant", "sha256_cbor")
print("RESULT", rank, agreed, budget, hashes[-1])
# a step's plan from rank 0: shapes and values as sent, including empty and 2-D arrays
sent = [np.arange(12, dtype=np.int32).reshape(3, 4), np.zeros((0, 2), np.int32), np.array([7, -1, 2**40])]
for got in (broadcast_arrays(sent if rank == 0 else None), broadcast_arrays([] if rank == 0 else None)):
    print("ARRAYS", rank, [(a.shape, a.tolist()) for a in got])
dist.destroy_process_group()
"""


def test_two_ranks_agree_on_the_smallest_pool(run_ranks):
    pytest.importorskip("cbor2")
    outs_raw = run_ranks(WORKER)
    outs = [next(line for line in out.splitlines() if line.startswith("RESULT")).split() for out in outs_raw]
    (_, _, agreed0, budget0, hash0), (_, _, agreed1, budget1, hash1) = outs
    assert agreed0 == agreed1 == "640"
    # 2 layers x K/V x 2 KV heads x 16 dims x 2 bytes = 256 B/token, 4 KiB per page: rank 0's 1 MiB
    assert budget0 == budget1 == str((1 << 20) // (256 * 16))
    assert hash0 == hash1, "block hashes differ across processes"
    arrays = [[line for line in out.splitlines() if line.startswith("ARRAYS")] for out in outs_raw]
    want = [str([((3, 4), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]), ((0, 2), []), ((3,), [7, -1, 2**40])]),
            "[]"]
    for rank, lines in enumerate(arrays):
        assert [line.split(" ", 2)[2] for line in lines] == want, (rank, lines)


def test_without_a_process_group_it_says_so():
    from pagedkv.distributed import agree_num_pages

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(InvalidArgument, match="init_process_group"):
        agree_num_pages(10)
    with pytest.raises(InvalidArgument, match="num_pages"):
        agree_num_pages(0)
    from pagedkv.distributed import broadcast_arrays

    with pytest.raises(InvalidArgument, match="init_process_group"):
        broadcast_arrays([np.zeros(2, np.int32)])


def test_pack_arrays_round_trips_and_names_a_bad_array():
    from pagedkv.distributed import pack_arrays, unpack_arrays

    arrays = [np.array([[1, 2], [3, 4]], np.int32), np.zeros(0, np.int64), np.array([True, False]),
              np.array([2**62, -5])]
    got = unpack_arrays(*pack_arrays(arrays))
    assert [a.shape for a in got] == [(2, 2), (0,), (2,), (2,)]
    assert all(np.array_equal(a, b) for a, b in zip(got, arrays)) and all(a.dtype == np.int64 for a in got)
    assert unpack_arrays(*pack_arrays([])) == []
    with pytest.raises(InvalidArgument, match=r"arrays\[1\].*float"):
        pack_arrays([np.zeros(2, np.int32), np.zeros(2)])
    with pytest.raises(InvalidArgument, match=r"arrays\[0\].*\(1, 1, 1\)"):
        pack_arrays([np.zeros((1, 1, 1), np.int32)])
    with pytest.raises(InvalidArgument, match="arrays"):
        pack_arrays(np.zeros(3, np.int32))
