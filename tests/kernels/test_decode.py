"""paged_decode against the torch reference (interpreter by default; see conftest.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from pagedkv.errors import InvalidArgument, InvalidType
from pagedkv.kernels import paged_decode, reference
from pagedkv.kernels import _common as common

PAGE_SIZES = (1, 3, 16)
GROUPS = (1, 4, 8)
HEAD_DIMS = (64, 80, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPLITS = (1, 3, None)  # no split, forced split, heuristic


def _matrix():
    # NOTE: every (page_size, group, head_dim) triple once (27 cases). dtype and split setting
    # rotate with the indices so that every dtype meets every head dim, group and split
    # setting; a full cartesian product would be 243 interpreter runs.
    for (a, page_size), (b, group), (c, head_dim) in itertools.product(
            enumerate(PAGE_SIZES), enumerate(GROUPS), enumerate(HEAD_DIMS)):
        dtype, num_splits = DTYPES[(b + c) % 3], SPLITS[(a + c) % 3]
        name = f"ps{page_size}-g{group}-d{head_dim}-{str(dtype)[6:]}-split{num_splits}"
        yield pytest.param(page_size, group, head_dim, dtype, num_splits, id=name)


def _run(batch, q, **options):
    got = paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, **options)
    options.pop("num_splits", None)
    options.pop("max_seq_len", None)
    want = reference.paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, **options)
    return got, want


@pytest.mark.parametrize("page_size, group, head_dim, dtype, num_splits", list(_matrix()))
def test_matches_reference(paged_batch, device, assert_close, page_size, group, head_dim, dtype, num_splits):
    num_kv_heads = 2
    # very different lengths in one batch: 1 token, a partial page, several tiles
    batch = paged_batch([1, 37, 130, 5], page_size=page_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        dtype=dtype)
    q = torch.randn(4, num_kv_heads * group, head_dim, generator=batch.gen).to(dtype).to(device)
    # with the heuristic, declare a long max_seq_len so that it does split (4 ways here)
    options = dict(num_splits=num_splits) if num_splits else dict(max_seq_len=2048)
    got, want = _run(batch, q, **options)
    assert_close(got, want)


@pytest.mark.parametrize("window, soft_cap, num_splits, dtype", [
    (8, None, 1, torch.float32),
    (8, None, 4, torch.float16),
    (1, None, 2, torch.float32),  # only the query's own token
    (None, 5.0, 1, torch.float16),
    (None, 5.0, 3, torch.float32),
    (20, 2.0, 2, torch.bfloat16),
    (500, None, 3, torch.float16),  # window longer than every sequence
])
def test_window_and_soft_cap(paged_batch, device, assert_close, window, soft_cap, num_splits, dtype):
    batch = paged_batch([3, 70, 129], page_size=16, num_kv_heads=2, head_dim=64, dtype=dtype)
    q = (3 * torch.randn(3, 8, 64, generator=batch.gen)).to(dtype).to(device)  # large logits
    got, want = _run(batch, q, sliding_window=window, logits_soft_cap=soft_cap, num_splits=num_splits)
    assert_close(got, want)


@pytest.mark.parametrize("page_size, num_splits", [(3, 1), (16, 3)])
def test_pages_released_before_the_window_are_never_read(paged_batch, device, assert_close, page_size, num_splits):
    # BlockManager.release_window turns pages wholly before the window into NULL_PAGE (-1)
    window, seq_lens = 10, [40, 9, 77]
    batch = paged_batch(seq_lens, page_size=page_size, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    for i, n in enumerate(seq_lens):
        released = max(n - window, 0) // page_size
        batch.k_cache[batch.page_table[i, :released].long()] = float("nan")
        batch.page_table[i, :released] = -1
    q = torch.randn(3, 4, 64, generator=batch.gen).half().to(device)
    got, want = _run(batch, q, sliding_window=window, num_splits=num_splits)
    assert_close(got, want)


@pytest.mark.parametrize("head_dim, group", [(96, 16), (256, 2)])
def test_other_head_dims_and_mqa(paged_batch, device, assert_close, head_dim, group):
    batch = paged_batch([19, 2], page_size=3, num_kv_heads=1, head_dim=head_dim, dtype=torch.float16)
    q = torch.randn(2, group, head_dim, generator=batch.gen).half().to(device)
    got, want = _run(batch, q, num_splits=2)
    assert_close(got, want)


def test_more_splits_than_tiles_and_empty_sequence(paged_batch, device, assert_close):
    # 7 splits of a 1-token sequence leave 6 empty; a 0-token sequence has nothing to attend
    # to and yields zeros (the reference's convention), never NaN.
    batch = paged_batch([1, 0, 40], page_size=3, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    q = torch.randn(3, 4, 64, generator=batch.gen).to(device)
    got, want = _run(batch, q, num_splits=7)
    assert_close(got, want)
    assert torch.count_nonzero(got[1]) == 0


def test_out_argument_and_strided_query(paged_batch, device, assert_close):
    batch = paged_batch([10, 33], page_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    fused = torch.randn(2, 12, 64, generator=batch.gen).half().to(device)  # q heads 0..7 of a fused qkv
    q = fused[:, :8]
    out = torch.empty(2, 8, 64, dtype=torch.float16, device=device)
    got = paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, out=out)
    assert got is out
    want = reference.paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens)
    assert_close(out, want)


def test_split_heuristic():
    # few (sequence, KV head) programs and a long context -> split; many programs -> no split
    assert common.choose_num_splits(1, 8, 65536, sms=132) > 1
    assert common.choose_num_splits(256, 8, 65536, sms=132) == 1
    assert common.choose_num_splits(1, 8, 100, sms=132) == 1  # too short to be worth it
    assert common.choose_num_splits(1, 1, 10**7, sms=132) == common.MAX_SPLITS
    assert common.choose_num_splits(16, 8, 4096, sms=132) <= 4096 // common.MIN_TOKENS_PER_SPLIT


def test_validation_names_the_tensor(paged_batch, device):
    batch = paged_batch([4, 4], page_size=3, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    q = torch.zeros(2, 4, 64, dtype=torch.float16, device=device)
    args = (batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens)
    with pytest.raises(InvalidArgument, match=r"q must be of shape \[num_seqs, num_heads, head_dim\].*got \[2, 4\]"):
        paged_decode(q[:, :, 0], *args)
    with pytest.raises(InvalidArgument, match=r"q must be of dtype torch.float16"):
        paged_decode(q.float(), *args)
    with pytest.raises(InvalidArgument, match=r"num_heads must be a multiple of num_kv_heads \(2\), got 3"):
        paged_decode(q[:, :3], *args)
    with pytest.raises(InvalidArgument, match=r"page_table must be of dtype torch.int32"):
        paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table.long(), batch.seq_lens)
    with pytest.raises(InvalidArgument, match=r"seq_lens must be of shape \[num_seqs\] = \[2\], got \[3\]"):
        paged_decode(q, batch.k_cache, batch.v_cache, batch.page_table, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(InvalidArgument, match=r"k_cache must be contiguous"):
        paged_decode(q, batch.k_cache.transpose(0, 1), batch.v_cache, batch.page_table, batch.seq_lens)
    with pytest.raises(InvalidArgument, match=r"v_cache must be of dtype torch.float16 \(the dtype of k_cache\)"):
        paged_decode(q, batch.k_cache, batch.v_cache.float(), batch.page_table, batch.seq_lens)
    with pytest.raises(InvalidType, match=r"q must be a torch.Tensor"):
        paged_decode(q.tolist(), *args)
    with pytest.raises(InvalidArgument, match=r"sliding_window must be an int >= 1 or None, got 0"):
        paged_decode(q, *args, sliding_window=0)
    with pytest.raises(InvalidArgument, match=r"num_splits must be an int in \[1, 64\], got 0"):
        paged_decode(q, *args, num_splits=0)
    cache = torch.zeros(4, 3, 2, 76, dtype=torch.float16, device=device)
    with pytest.raises(InvalidArgument, match=r"head_dim must be a multiple of 8 in \[8, 256\], got 76"):
        paged_decode(torch.zeros(2, 4, 76, dtype=torch.float16, device=device), cache, cache.clone(),
                     batch.page_table, batch.seq_lens)


@pytest.mark.parametrize("page_size, num_splits", [(3, 1), (16, 3)])
def test_live_page_tables_with_a_first_page_offset(paged_batch, device, assert_close, page_size, num_splits):
    # BlockManager.window_tables: each row holds only the live pages, from column first_page on.
    window, seq_lens = 10, [40, 9, 77]
    batch = paged_batch(seq_lens, page_size=page_size, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    full = batch.page_table.clone()
    first = [max(n - window, 0) // page_size for n in seq_lens]
    live = torch.full_like(full, -1)
    for i, f in enumerate(first):
        batch.k_cache[full[i, :f].long()] = float("nan")  # released: never read
        live[i, : full.shape[1] - f] = full[i, f:]
    first_page = torch.tensor(first, dtype=torch.int32, device=device)
    q = torch.randn(3, 4, 64, generator=batch.gen).half().to(device)
    got = paged_decode(q, batch.k_cache, batch.v_cache, live, batch.seq_lens, sliding_window=window,
                       num_splits=num_splits, first_page=first_page)
    batch.page_table = full
    _, want = _run(batch, q, sliding_window=window)  # the reference on the full table
    assert_close(got, want)
    oracle = reference.paged_decode(q, batch.k_cache, batch.v_cache, live, batch.seq_lens, sliding_window=window,
                                    first_page=first_page)
    assert_close(oracle, want)
    with pytest.raises(InvalidArgument, match="first_page"):
        paged_decode(q, batch.k_cache, batch.v_cache, live, batch.seq_lens, first_page=first_page[:2])


@pytest.mark.parametrize("head_dim, dtype, num_splits", [
    (8, torch.float16, 1), (24, torch.float32, 2), (40, torch.bfloat16, 1), (72, torch.float16, 3),
])
def test_head_dims_that_are_multiples_of_8(paged_batch, device, assert_close, head_dim, dtype, num_splits):
    # padded to a power of two of at least 16 inside the tiles, and masked
    batch = paged_batch([5, 33], page_size=4, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    q = torch.randn(2, 4, head_dim, generator=batch.gen).to(dtype).to(device)
    got, want = _run(batch, q, num_splits=num_splits)
    assert_close(got, want)
