"""``copy_pages``: execute a copy plan, (src_page, dst_page) pairs, for every layer in one launch.

Copy-on-write plans from ``BlockManager.append`` / ``append_batch`` land here. The K and V
pools of every layer are one tensor ``[num_caches, num_pages, ...]`` (``PagedKVCache`` stacks
``[num_layers, 2, ...]`` and views it so), so one launch covers all of them.

Imports torch and triton; ``pagedkv/__init__.py`` never imports this module.
"""

from __future__ import annotations

from .._optional import require

torch = require("torch", __name__)
triton = require("triton", __name__)
tl = require("triton.language", __name__)

from ..errors import InvalidArgument  # noqa: E402
from . import _common as common  # noqa: E402

#: Elements each program copies per loop iteration.
_BLOCK = 2048
#: Programs along one page (each loops over its share), bounded by the grid's axis-2 limit.
_MAX_CHUNKS = 1024


@triton.jit
def _copy_pages_kernel(
    caches_ptr, copies_ptr,
    page_numel, chunk_numel, stride_cache, stride_page, stride_copy,
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0)
    cache = tl.program_id(1)
    chunk = tl.program_id(2)
    src = tl.load(copies_ptr + pair * stride_copy).to(tl.int64)
    dst = tl.load(copies_ptr + pair * stride_copy + 1).to(tl.int64)
    base = caches_ptr + cache.to(tl.int64) * stride_cache
    chunk_start = chunk * chunk_numel
    chunk_end = tl.minimum(chunk_start + chunk_numel, page_numel)
    for start in range(chunk_start, chunk_end, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < chunk_end
        values = tl.load(base + src * stride_page + offsets, mask=mask)
        tl.store(base + dst * stride_page + offsets, values, mask=mask)


def copy_pages(caches: torch.Tensor, copies: torch.Tensor) -> None:
    """Copy page ``src`` to page ``dst`` in every cache, for every ``(src, dst)`` row of ``copies``.

    All pairs and all caches are copied by one launch, concurrently: a page may not be the
    ``dst`` of two pairs nor both a ``src`` and a ``dst`` (copy-on-write plans from the block
    manager never are; ``PagedKVCache.copy`` checks it on the host). Page ids are not
    range-checked on the device.

    Args:
        caches: ``[num_caches, num_pages, ...]``, contiguous, any dtype (e.g. every layer's K
            and V pools stacked: ``[num_layers * 2, num_pages, page_size, num_kv_heads, head_dim]``).
        copies: int32 or int64 ``[num_copies, 2]`` on the same device, rows ``(src, dst)``.

    Raises:
        InvalidType / InvalidArgument: naming the tensor that is wrong.
    """
    common.check_tensor("caches", caches, "[num_caches, num_pages, ...]",
                        (None, None) + (None,) * max(0, getattr(caches, "ndim", 2) - 2), contiguous=True)
    common.check_device("caches", caches)
    common.check_tensor("copies", copies, "[num_copies, 2]", (None, 2), dtypes=common.INDEX_DTYPES,
                        device=caches.device)
    num_copies = copies.shape[0]
    num_caches, num_pages = caches.shape[0], caches.shape[1]
    if num_copies == 0 or num_caches == 0 or num_pages == 0:
        return
    page_numel = caches[0, 0].numel()
    if page_numel == 0:
        return
    chunks = min(triton.cdiv(page_numel, _BLOCK), _MAX_CHUNKS)
    chunk_numel = triton.cdiv(triton.cdiv(page_numel, chunks), _BLOCK) * _BLOCK
    chunks = triton.cdiv(page_numel, chunk_numel)
    if num_caches > 65535:
        raise InvalidArgument("caches", list(caches.shape), "at most 65535 caches in dimension 0")
    _copy_pages_kernel[(num_copies, num_caches, chunks)](
        caches, copies,
        page_numel, chunk_numel, caches.stride(0), caches.stride(1), copies.stride(0),
        BLOCK=_BLOCK, num_warps=4,
    )
