"""KV events in vLLM's wire format: what a KV-aware router learns from a pagedkv engine.

``BlockManager(..., enable_kv_events=True)`` records, in order, every change of what its prefix
cache can match; ``mgr.take_events()`` returns them as the three event types of vLLM's
``vllm.distributed.kv_events`` (same names, fields and field order):

* ``BlockStored``: full pages whose content became matchable in a tier, chained (each block's
  parent is the block before it; ``parent_block_hash`` is the first one's parent, ``None`` for
  a prompt's first page), with their token ids, the page size and the medium ``"GPU"`` (or
  ``"CPU"`` for the CPU tier of the prefix cache);
* ``BlockRemoved``: content no longer matchable in that tier (evicted, demoted, reset);
* ``AllBlocksCleared``: ``reset_prefix_cache``.

Events are per content, not per physical page: a prompt computed twice at once (two pages with
one content) is stored once, and removed once its last page goes. So a consumer that keeps the
set of (hash, medium) it was told about holds exactly what the manager can match.

Block hashes are pagedkv's own 64-bit chained page hash by default, or vLLM's reproducible
``sha256_cbor`` with ``BlockManager(..., prefix_hash="sha256_cbor")`` (``block_hashes`` computes
either from token ids, as a router does). ``encode_batch`` writes vLLM's msgpack payload,
``ZmqPublisher`` sends it as vLLM's ``ZmqEventPublisher`` does, and ``PrefixIndex`` is the
router side: it consumes batches from many replicas and answers prefix matches.

``import pagedkv.events`` needs nothing beyond numpy; ``encode_batch``/``decode_batch`` need
msgspec, ``prefix_hash="sha256_cbor"`` needs cbor2 and ``ZmqPublisher`` pyzmq
(``pip install 'pagedkv[events]'``).
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

from ._hashing import MASK64, page_hash, salt_hash
from ._optional import require
from ._prefix_index import CLEARED, CPU, DROP, NODE, REMOVED, ROOT, STORED
from .errors import InvalidArgument

#: Hash algorithms of ``BlockManager(prefix_hash=...)`` and ``block_hashes``.
PREFIX_HASHES = ("pagedkv", "sha256_cbor")
#: Wire layouts of ``encode_batch``: positional arrays (vLLM before its PR #42892, and
#: consumers written for it) or named-field maps (vLLM after it).
EVENT_FORMATS = ("array", "map")
MEDIA = ("GPU", "CPU")
#: vLLM's seed of the first block's parent hash when PYTHONHASHSEED is unset.
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"


class BlockStored(NamedTuple):
    """Blocks that became matchable (vLLM's ``BlockStored``, same fields in the same order)."""

    block_hashes: list
    parent_block_hash: int | None
    token_ids: list
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None


class BlockRemoved(NamedTuple):
    """Blocks no longer matchable in ``medium`` (vLLM's ``BlockRemoved``)."""

    block_hashes: list
    medium: str | None = "GPU"


class AllBlocksCleared(NamedTuple):
    """Every block forgotten (vLLM's ``AllBlocksCleared``)."""


# ------------------------------------------------------------------------------ hashes
def _sha256_cbor(value) -> bytes:
    cbor2 = require("cbor2", "prefix_hash='sha256_cbor'")
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def none_hash() -> bytes:
    """vLLM's parent of a first block under sha256_cbor: the hash of PYTHONHASHSEED if set, else
    of ``"vllm-none-hash"``."""
    seed = os.environ.get("PYTHONHASHSEED")
    return _sha256_cbor(DEFAULT_NONE_HASH_SEED if seed is None else seed)


def _sha256_block(parent: bytes, tokens, salt) -> bytes:
    """One block's sha256_cbor digest. NOTE: vLLM's extra keys of a block are None, or for the
    first block of a salted prompt the tuple ``(cache_salt,)`` (no LoRA or multimodal keys)."""
    return _sha256_cbor((parent, tuple(tokens), (salt,) if salt else None))


def external_hash(digest: bytes) -> int:
    """The int form of a sha256_cbor block hash in events: its low 64 bits, read big-endian."""
    return int.from_bytes(digest, "big") & MASK64


def block_hashes(token_ids, block_size: int, cache_salt=None, prefix_hash: str = "pagedkv") -> list[int]:
    """The event hash of each full block of a prompt, as the engine reports them.

    Args:
        token_ids: the prompt's token ids; block_size: the engine's page size.
        cache_salt: the tenant salt the prompt was allocated under.
        prefix_hash: ``"pagedkv"`` (the manager's 64-bit chained page hash) or ``"sha256_cbor"``.
    """
    if prefix_hash not in PREFIX_HASHES:
        raise InvalidArgument("prefix_hash", prefix_hash, f"one of {PREFIX_HASHES}")
    tokens = [int(t) for t in token_ids]
    out = []
    if prefix_hash == "pagedkv":
        salt, h = salt_hash(cache_salt), 0
        for i in range(len(tokens) // block_size):
            h = page_hash(h, tokens[i * block_size:(i + 1) * block_size], salt)
            out.append(h)
        return out
    parent = none_hash()
    for i in range(len(tokens) // block_size):
        parent = _sha256_block(parent, tokens[i * block_size:(i + 1) * block_size], cache_salt if i == 0 else None)
        out.append(external_hash(parent))
    return out


# ------------------------------------------------------------------------- the builder
class EventBuilder:
    """Turns a manager's event records (``_prefix_index``) into vLLM event objects.

    It follows the records' nodes (their hash, parent and tokens) from creation to deletion, so
    a block's hash and its parent's are known whenever the block is stored or removed.
    """

    def __init__(self, page_size: int, prefix_hash: str = "pagedkv"):
        if prefix_hash not in PREFIX_HASHES:
            raise InvalidArgument("prefix_hash", prefix_hash, f"one of {PREFIX_HASHES}")
        self.page_size = page_size
        self.prefix_hash = prefix_hash
        self.salts: dict[int, object] = {0: None}  # salt_hash(cache_salt) -> cache_salt
        self._nodes: dict[int, tuple] = {}  # node -> (event hash, parent node, tokens, digest)
        self._none = none_hash() if prefix_hash == "sha256_cbor" else None

    def remember_salt(self, cache_salt) -> None:
        if cache_salt is not None:
            self.salts[salt_hash(cache_salt)] = cache_salt

    def build(self, records) -> list:
        events: list = []
        last_stored = ROOT  # node of the last block of events[-1] when it is a BlockStored
        for record in records:
            kind = record[0]
            if kind == NODE:
                _, node, parent, salt, h, tokens = record
                if self._none is None:
                    self._nodes[node] = (h, parent, tuple(tokens), None)
                else:
                    base = self._none if parent == ROOT else self._nodes[parent][3]
                    digest = _sha256_block(base, tokens, self.salts.get(salt, salt) if parent == ROOT else None)
                    self._nodes[node] = (external_hash(digest), parent, tuple(tokens), digest)
            elif kind == DROP:
                del self._nodes[record[1]]
            elif kind == STORED:
                _, node, medium = record
                h, parent, tokens, _ = self._nodes[node]
                name = "CPU" if medium == CPU else "GPU"
                last = events[-1] if events else None
                # NOTE: a chain stored in one go is one event, as vLLM sends a request's blocks.
                if isinstance(last, BlockStored) and last.medium == name and parent == last_stored and parent != ROOT:
                    last.block_hashes.append(h)
                    last.token_ids.extend(tokens)
                else:
                    parent_hash = None if parent == ROOT else self._nodes[parent][0]
                    events.append(BlockStored([h], parent_hash, list(tokens), self.page_size, None, name, None))
                last_stored = node
            elif kind == REMOVED:
                _, node, medium = record
                name = "CPU" if medium == CPU else "GPU"
                h = self._nodes[node][0]
                last = events[-1] if events else None
                if isinstance(last, BlockRemoved) and last.medium == name:
                    last.block_hashes.append(h)
                else:
                    events.append(BlockRemoved([h], name))
            elif kind == CLEARED:
                events.append(AllBlocksCleared())
        return events


# ---------------------------------------------------------------------------- encoding
_SCHEMA: dict = {}


def _schema(event_format: str):
    """msgspec structs with vLLM's schema (field names, order, tags, defaults) for a layout."""
    if event_format not in EVENT_FORMATS:
        raise InvalidArgument("event_format", event_format, f"one of {EVENT_FORMATS}")
    if event_format in _SCHEMA:
        return _SCHEMA[event_format]
    msgspec = require("msgspec", "KV event encoding")
    array_like = event_format == "array"
    options = dict(array_like=array_like, omit_defaults=True, gc=False, tag=True)

    # NOTE: vLLM's field order and defaults, so the trailing optional fields (extra_keys,
    # group_idx, ...) are omitted as vLLM omits them when unset; the tag is the class name.
    stored = msgspec.defstruct("BlockStored", [
        ("block_hashes", list[int]), ("parent_block_hash", int | None), ("token_ids", list[int]),
        ("block_size", int), ("lora_id", int | None), ("medium", str | None), ("lora_name", str | None),
        ("extra_keys", list | None, None), ("group_idx", int | None, None),
        ("kv_cache_spec_kind", str | None, None), ("kv_cache_spec_sliding_window", int | None, None),
    ], **options)
    removed = msgspec.defstruct("BlockRemoved", [
        ("block_hashes", list[int]), ("medium", str | None), ("group_idx", int | None, None),
    ], **options)
    cleared = msgspec.defstruct("AllBlocksCleared", [], **options)
    # NOTE: the batch stays positional in both layouts ([ts, events, data_parallel_rank]), as
    # vLLM's stream is after #42892 too.
    batch = msgspec.defstruct("KVEventBatch", [
        ("ts", float), ("events", list[stored | removed | cleared]), ("data_parallel_rank", int | None, None),
    ], array_like=True, omit_defaults=True, gc=False)
    _SCHEMA[event_format] = (msgspec, stored, removed, cleared, batch)
    return _SCHEMA[event_format]


def encode_batch(events, ts: float, data_parallel_rank: int | None = None, event_format: str = "array") -> bytes:
    """vLLM's msgpack ``KVEventBatch`` payload for ``events`` (from ``take_events``).

    Args:
        events: ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` objects.
        ts: the batch's timestamp (seconds); data_parallel_rank: omitted when None.
        event_format: ``"array"`` (positional tagged arrays: ``["BlockStored", hashes, ...]``)
            or ``"map"`` (named fields with the tag under ``"type"``).
    """
    msgspec, stored, removed, cleared, batch = _schema(event_format)
    out = []
    for event in events:
        if isinstance(event, BlockStored):
            out.append(stored(*event))
        elif isinstance(event, BlockRemoved):
            out.append(removed(*event))
        elif isinstance(event, AllBlocksCleared):
            out.append(cleared())
        else:
            raise InvalidArgument("events", type(event).__name__, "BlockStored, BlockRemoved or AllBlocksCleared")
    return msgspec.msgpack.encode(batch(float(ts), out, data_parallel_rank))


def decode_batch(payload: bytes, event_format: str = "array") -> tuple[float, list, int | None]:
    """``(ts, events, data_parallel_rank)`` of a payload ``encode_batch`` (or vLLM) wrote."""
    msgspec, stored, removed, cleared, batch = _schema(event_format)
    decoded = msgspec.msgpack.decode(payload, type=batch)
    events = []
    for event in decoded.events:
        if isinstance(event, stored):
            events.append(BlockStored(list(event.block_hashes), event.parent_block_hash, list(event.token_ids),
                                      event.block_size, event.lora_id, event.medium, event.lora_name))
        elif isinstance(event, removed):
            events.append(BlockRemoved(list(event.block_hashes), event.medium))
        else:
            events.append(AllBlocksCleared())
    return decoded.ts, events, decoded.data_parallel_rank
