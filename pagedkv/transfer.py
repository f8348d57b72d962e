"""Sequence export and import between block managers: prefill/decode disaggregation.

A prefill instance computes a prompt's KV and ``export_sequence`` describes it: its token count,
its page ids in order, and, when the engine gives them, its token ids and their block hashes.
A decode instance's ``import_sequence`` allocates the sequence there, taking every full page its
own prefix cache already holds, and returns the transfer plan: ``(page on the exporter, page
here)`` for the pages still to move. ``PagedKVCache.send_pages`` / ``recv_pages`` move them
over ``torch.distributed``.

The descriptor maps onto the memory descriptors of NIXL or Mooncake's transfer engine: a page
``p`` of layer ``l`` (K or V) lives at ``base + ((l * 2 + kv) * num_pages + p) * page_bytes`` of
the exporter's pool, ``page_bytes = page_size * num_kv_heads * head_dim * itemsize``, so each
plan row is one block per (layer, K/V) on both sides, and a transfer is the list of those
(address, length) pairs. Both libraries batch such lists; neither is a dependency.

Imports numpy only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _validate as check
from .errors import InvalidArgument, InvalidType, SequenceSwapped


class TransferDescriptor(NamedTuple):
    """What another manager needs to take a sequence over (``BlockManager.export_sequence``).

    Attributes:
        num_tokens: tokens whose KV the pages hold.
        page_size: tokens per page of the exporter (the importer's must be equal).
        page_ids: int32 ``[ceil(num_tokens / page_size)]``: the exporter's pages, in token order.
        token_ids: int64 ``[num_tokens]`` when the exporter was given them, else ``None``.
        cache_salt: the tenant salt the sequence was allocated under (with ``token_ids``).
        block_hashes: the event hash of each full page (``pagedkv.events.block_hashes`` with
            the exporter's ``prefix_hash``), empty without ``token_ids``: what a KV-aware router
            or a remote prefix index knows the pages by.
    """

    num_tokens: int
    page_size: int
    page_ids: np.ndarray
    token_ids: np.ndarray | None = None
    cache_salt: str | bytes | None = None
    block_hashes: tuple = ()


class ImportPlan(NamedTuple):
    """What ``BlockManager.import_sequence`` needs done before the sequence's KV is whole.

    Attributes:
        transfers: int32 ``[K, 2]``: ``(page on the exporter, page here)`` for the pages to move.
        copies: int32 ``[M, 2]``: local copies to execute first (a whole-sequence prefix hit
            copies its last page, which the transfer then overwrites).
        num_cached_tokens: tokens found in this manager's prefix cache (not transferred).
    """

    transfers: np.ndarray
    copies: np.ndarray
    num_cached_tokens: int


def export_sequence(mgr, seq_id: int, token_ids=None, cache_salt=None, prefix_hash: str = "pagedkv"):
    """See ``BlockManager.export_sequence``."""
    seq_id = check.seq_id(seq_id)
    num_tokens = mgr.num_tokens(seq_id)  # NOTE: UnknownSequence first
    if mgr.is_swapped(seq_id):
        raise SequenceSwapped(seq_id, True)
    pages = np.asarray(mgr.page_table(seq_id), dtype=np.int32)
    if np.any(pages < 0):
        raise InvalidArgument("seq_id", seq_id, "a sequence that holds all its pages (a sliding window released "
                              "some; their KV cannot be exported)")
    hashes: tuple = ()
    if token_ids is not None:
        token_ids = check.int_array("token_ids", token_ids, 0, check.MAX_TOKEN_ID)
        if token_ids.shape[0] != num_tokens:
            raise InvalidArgument("token_ids", f"{token_ids.shape[0]} token ids",
                                  f"one per token of sequence {seq_id} ({num_tokens})")
        cache_salt = check.cache_salt(cache_salt)
        from .events import block_hashes

        hashes = tuple(block_hashes(token_ids, mgr.page_size, cache_salt, prefix_hash))
    elif cache_salt is not None:
        raise InvalidArgument("cache_salt", cache_salt, "None unless token_ids are given")
    return TransferDescriptor(num_tokens, mgr.page_size, pages, token_ids, cache_salt, hashes)


def import_sequence(mgr, seq_id: int, descriptor) -> ImportPlan:
    """See ``BlockManager.import_sequence``."""
    if not isinstance(descriptor, TransferDescriptor):
        raise InvalidType("descriptor", descriptor, "a TransferDescriptor from export_sequence")
    num_tokens = check.count("descriptor.num_tokens", descriptor.num_tokens)
    if descriptor.page_size != mgr.page_size:
        raise InvalidArgument("descriptor.page_size", descriptor.page_size,
                              f"this manager's page_size ({mgr.page_size})")
    src = check.int_array("descriptor.page_ids", descriptor.page_ids, 0, check.MAX_COUNT)
    if src.shape[0] != -(-num_tokens // mgr.page_size):
        raise InvalidArgument("descriptor.page_ids", f"{src.shape[0]} pages",
                              f"one per page of its {num_tokens} tokens ({-(-num_tokens // mgr.page_size)})")
    if descriptor.token_ids is not None:
        tokens = check.int_array("descriptor.token_ids", descriptor.token_ids, 0, check.MAX_TOKEN_ID)
        if tokens.shape[0] != num_tokens:
            raise InvalidArgument("descriptor.token_ids", f"{tokens.shape[0]} token ids",
                                  f"one per token ({num_tokens})")
    if descriptor.token_ids is not None and mgr.enable_prefix_caching:
        # NOTE: nothing counts as computed but what the prefix cache already holds: the pages to
        # transfer become matchable only when the caller commits them, once they have arrived.
        allocation = mgr.allocate(seq_id, token_ids=descriptor.token_ids, cache_salt=descriptor.cache_salt,
                                  num_computed_tokens=0)
    else:
        allocation = mgr.allocate(seq_id, num_tokens)
    here = np.asarray(mgr.page_table(seq_id), dtype=np.int32)
    first = allocation.num_cached_tokens // mgr.page_size  # pages wholly found cached stay
    transfers = np.stack([src[first:].astype(np.int32), here[first:]], axis=1) if here.shape[0] > first \
        else np.zeros((0, 2), dtype=np.int32)
    return ImportPlan(transfers, allocation.copies, allocation.num_cached_tokens)


__all__ = ["TransferDescriptor", "ImportPlan", "export_sequence", "import_sequence"]
