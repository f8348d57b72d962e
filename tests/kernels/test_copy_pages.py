"""copy_pages against the torch reference (interpreter by default; see conftest.py)."""

from __future__ import annotations

import pytest
import torch

from pagedkv.errors import InvalidArgument
from pagedkv.kernels import copy_pages, reference


@pytest.mark.parametrize("page_shape, dtype, copy_dtype", [
    ((3, 2, 64), torch.float16, torch.int32),
    ((16, 1, 80), torch.bfloat16, torch.int64),
    ((1, 4, 128), torch.float32, torch.int64),
    ((16, 8, 128), torch.float16, torch.int32),  # 16384 elements: several chunks per page
])
def test_matches_reference(device, page_shape, dtype, copy_dtype):
    gen = torch.Generator().manual_seed(3)
    num_caches, num_pages = 6, 9  # 3 layers x (K, V)
    caches = torch.randn(num_caches, num_pages, *page_shape, generator=gen).to(dtype).to(device)
    copies = torch.tensor([[0, 5], [3, 1], [7, 8]], dtype=copy_dtype, device=device)
    want = caches.clone()
    copy_pages(caches, copies)
    reference.copy_pages(want, copies)
    assert torch.equal(caches, want)
    assert torch.equal(caches[:, 5], caches[:, 0]) and not torch.equal(caches[:, 5], caches[:, 6])


def test_empty_plan_is_a_no_op(device):
    caches = torch.randn(2, 3, 4, 1, 16).to(device)
    before = caches.clone()
    copy_pages(caches, torch.zeros((0, 2), dtype=torch.int64, device=device))
    assert torch.equal(caches, before)


def test_validation_names_the_tensor(device):
    caches = torch.zeros(2, 3, 4, 1, 16, device=device)
    with pytest.raises(InvalidArgument, match=r"copies must be of shape \[num_copies, 2\] = \[num_copies, 2\], "
                                              r"got \[3\]"):
        copy_pages(caches, torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(InvalidArgument, match=r"caches must be contiguous"):
        copy_pages(caches.transpose(0, 1), torch.zeros((1, 2), dtype=torch.int64, device=device))
