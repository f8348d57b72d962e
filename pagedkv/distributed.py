"""``torch.distributed`` helpers: one KV-cache configuration for every rank.

Tensor-parallel ranks follow one page table, so they must all have the same ``num_pages``.
Each rank computes what its own memory allows, and ``agree_num_pages`` takes the minimum over
the group with one ``all_reduce(MIN)``, as vLLM unifies its workers' KV-cache configs. The
gloo backend (CPU tensors) and NCCL (the current CUDA device) take the same call.

Block hashes are a pure function of the token ids and the salt, in both backends and in
``pagedkv.events.block_hashes``. No per-process seed is involved (``sha256_cbor``'s root follows
``PYTHONHASHSEED`` only when it is set, as vLLM's does), so ranks and replicas agree on them.

Imports torch when called (``import pagedkv.distributed`` does not).
"""

from __future__ import annotations

from . import _validate as check
from ._optional import require
from .errors import InvalidArgument


def agree_num_pages(num_pages: int, group=None) -> int:
    """The smallest ``num_pages`` over every rank of ``group`` (default: the world).

    Args:
        num_pages: what this rank's memory allows (e.g. ``spec.num_pages_for_budget(...)``).
        group: a ``torch.distributed`` process group, or ``None`` for the default one.

    Raises:
        InvalidArgument: ``torch.distributed`` is not initialised, or a bad ``num_pages``.
    """
    num_pages = check.count("num_pages", num_pages)
    torch = require("torch", "pagedkv.distributed")
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgument("group", group, "an initialised torch.distributed process group "
                              "(torch.distributed.init_process_group first)")
    device = "cpu"
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([num_pages], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return int(value.item())


def agree_num_pages_for_budget(spec, budget_bytes: int, page_size: int, group=None) -> int:
    """``agree_num_pages`` of what ``budget_bytes`` of this rank holds (``spec.num_pages_for_budget``)."""
    from .spec import num_pages_for_budget

    return agree_num_pages(num_pages_for_budget(spec, budget_bytes, page_size), group)


__all__ = ["agree_num_pages", "agree_num_pages_for_budget"]
