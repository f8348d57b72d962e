"""``torch.distributed`` helpers: one KV-cache configuration for every rank.

Tensor-parallel ranks follow one page table, so they must all have the same ``num_pages``.
Each rank computes what its own memory allows, and ``agree_num_pages`` takes the minimum over
the group with one ``all_reduce(MIN)``, as vLLM unifies its workers' KV-cache configs. The
gloo backend (CPU tensors) and NCCL (the current CUDA device) take the same call.

Block hashes are a pure function of the token ids and the salt, in both backends and in
``pagedkv.events.block_hashes``. No per-process seed is involved (``sha256_cbor``'s root follows
``PYTHONHASHSEED`` only when it is set, as vLLM's does), so ranks and replicas agree on them.

Tensor-parallel ranks also execute one schedule: ``broadcast_arrays`` sends a step's integer
arrays (slot mappings, page-table rows, copies, swap plans) from the scheduling rank to all
others in two broadcasts, whatever their number and shapes.

Imports torch when called (``import pagedkv.distributed`` does not).
"""

from __future__ import annotations

import numpy as np

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
    torch = _initialised(group)
    dist = torch.distributed
    value = torch.tensor([num_pages], dtype=torch.int64, device=_device(torch, group))
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return int(value.item())


def _initialised(group):
    torch = require("torch", "pagedkv.distributed")
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgument("group", group, "an initialised torch.distributed process group "
                              "(torch.distributed.init_process_group first)")
    return torch


def _device(torch, group):
    """Where the group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pack_arrays(arrays) -> tuple[np.ndarray, np.ndarray]:
    """``arrays`` (integer, 1-D or 2-D) as one int64 header and one int64 payload.

    The header is ``[count, then per array: ndim, its dims]``; the payload is every array's
    values in order. ``unpack_arrays`` inverts it.

    Raises:
        InvalidArgument: ``arrays`` is not a list or tuple, or one of them is not an integer
            array of 1 or 2 dimensions (named by its index).
    """
    if not isinstance(arrays, (list, tuple)):
        raise InvalidArgument("arrays", type(arrays).__name__, "a list of integer arrays")
    header, values = [len(arrays)], []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.dtype.kind not in "iub" or a.ndim not in (1, 2):
            raise InvalidArgument(f"arrays[{i}]", f"{a.dtype} array of shape {a.shape}",
                                  "an integer array of 1 or 2 dimensions")
        header += [a.ndim, *a.shape]
        values.append(a.astype(np.int64, copy=False).ravel())
    payload = np.concatenate(values) if values else np.zeros(0, np.int64)
    return np.asarray(header, dtype=np.int64), payload


def unpack_arrays(header: np.ndarray, payload: np.ndarray) -> list[np.ndarray]:
    """The int64 arrays ``pack_arrays`` packed (views of ``payload``)."""
    out, pos, at = [], 1, 0
    for _ in range(int(header[0])):
        ndim = int(header[pos])
        shape = tuple(int(d) for d in header[pos + 1:pos + 1 + ndim])
        pos += 1 + ndim
        size = int(np.prod(shape))
        out.append(payload[at:at + size].reshape(shape))
        at += size
    return out


def broadcast_arrays(arrays, src: int = 0, group=None) -> list[np.ndarray]:
    """Broadcast a list of integer arrays from rank ``src``; every rank returns them as int64.

    Two broadcasts, whatever the number and shapes of the arrays: the header and payload
    sizes, then header and payload in one tensor. Ranks other than ``src`` pass ``None``.
    This is how a tensor-parallel engine's scheduling rank gives every rank the step's plan
    inputs (page-table rows, slot mapping, copies, swap plans; ``examples/engine_dist.py``).

    Args:
        arrays: on ``src``, integer arrays of 1 or 2 dimensions; elsewhere ignored.
        src: the sending rank (a global rank, as ``torch.distributed.broadcast`` takes).
        group: a process group, or ``None`` for the default one.

    Raises:
        InvalidArgument: ``torch.distributed`` is not initialised, or (on ``src``) a bad array.
    """
    torch = _initialised(group)
    dist = torch.distributed
    device = _device(torch, group)
    sending = dist.get_rank() == src
    if sending:
        header, payload = pack_arrays(arrays)
        sizes = torch.tensor([header.shape[0], payload.shape[0]], dtype=torch.int64, device=device)
    else:
        sizes = torch.empty(2, dtype=torch.int64, device=device)
    dist.broadcast(sizes, src, group=group)
    num_header, num_payload = (int(v) for v in sizes.tolist())
    if sending:
        flat = torch.from_numpy(np.concatenate([header, payload])).to(device)
    else:
        flat = torch.empty(num_header + num_payload, dtype=torch.int64, device=device)
    dist.broadcast(flat, src, group=group)
    flat = flat.cpu().numpy()
    return unpack_arrays(flat[:num_header], flat[num_header:])


def agree_num_pages_for_budget(spec, budget_bytes: int, page_size: int, group=None) -> int:
    """``agree_num_pages`` of what ``budget_bytes`` of this rank holds (``spec.num_pages_for_budget``)."""
    from .spec import num_pages_for_budget

    return agree_num_pages(num_pages_for_budget(spec, budget_bytes, page_size), group)


__all__ = ["agree_num_pages", "agree_num_pages_for_budget", "broadcast_arrays", "pack_arrays", "unpack_arrays"]
