"""``pagedkv.distributed`` over torch.distributed's gloo backend: 2 processes on loopback."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pagedkv.errors import InvalidArgument  # noqa: E402

WORKER = r"""
import sys
import torch.distributed as dist
from pagedkv.distributed import agree_num_pages, agree_num_pages_for_budget
from pagedkv.events import block_hashes

rank, port = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=__import__("datetime").timedelta(seconds=60))
agreed = agree_num_pages([1000, 640][rank])
spec = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
budget = agree_num_pages_for_budget(spec, [1 << 20, 3 << 20][rank], 16)
hashes = block_hashes(list(range(64)), 16, "tenant", "sha256_cbor")
print("RESULT", rank, agreed, budget, hashes[-1])
dist.destroy_process_group()
"""


def test_two_ranks_agree_on_the_smallest_pool(run_ranks):
    pytest.importorskip("cbor2")
    outs = [next(line for line in out.splitlines() if line.startswith("RESULT")).split() for out in run_ranks(WORKER)]
    (_, _, agreed0, budget0, hash0), (_, _, agreed1, budget1, hash1) = outs
    assert agreed0 == agreed1 == "640"
    # 2 layers x K/V x 2 KV heads x 16 dims x 2 bytes = 256 B/token, 4 KiB per page: rank 0's 1 MiB
    assert budget0 == budget1 == str((1 << 20) // (256 * 16))
    assert hash0 == hash1, "block hashes differ across processes"


def test_without_a_process_group_it_says_so():
    from pagedkv.distributed import agree_num_pages

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(InvalidArgument, match="init_process_group"):
        agree_num_pages(10)
    with pytest.raises(InvalidArgument, match="num_pages"):
        agree_num_pages(0)
