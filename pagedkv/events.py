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

import numpy as np

from . import _validate as check
from ._hashing import MASK64, page_hash, salt_hash
from ._validate import MAX_TOKEN_ID
from ._optional import require
from ._prefix_index import CLEARED, DROP, NODE, REMOVED, ROOT, STORED
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
    return _sha256_cbor((parent, tuple(tokens), None if salt is None else (salt,)))


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
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InvalidArgument("block_size", block_size, "an int >= 1")
    cache_salt = check.cache_salt(cache_salt)
    if prefix_hash == "pagedkv":
        salt = salt_hash(cache_salt)
        core = _core_module()
        if core is not None:
            # NOTE: the C++ core's chain (the same function; tests compare them), 100x faster
            array = np.asarray(token_ids, dtype=np.int64)
            if array.ndim == 1 and (array.size == 0 or (array.min() >= 0 and array.max() <= MAX_TOKEN_ID)):
                return core.chain_hashes(np.ascontiguousarray(array), block_size, salt).tolist()
        tokens = [int(t) for t in token_ids]
        out, h = [], 0
        for i in range(len(tokens) // block_size):
            h = page_hash(h, tokens[i * block_size:(i + 1) * block_size], salt)
            out.append(h)
        return out
    tokens = [int(t) for t in token_ids]
    out = []
    parent = none_hash()
    for i in range(len(tokens) // block_size):
        parent = _sha256_block(parent, tokens[i * block_size:(i + 1) * block_size], cache_salt if i == 0 else None)
        out.append(external_hash(parent))
    return out


def _core_module():
    """``pagedkv._core`` when the C++ core is built, else None."""
    try:
        from . import _core
    except ImportError:
        return None
    return _core


# ------------------------------------------------------------------------- the builder
class EventBuilder:
    """Turns a manager's event records (``_prefix_index``) into vLLM event objects.

    Stored and removed records carry the index's own hashes; for ``sha256_cbor`` the builder
    also follows node records (creation to deletion) and chains vLLM's hashes over them.
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
        """Keep a (canonical, ``_validate.cache_salt``) salt to hash it into a first block."""
        if cache_salt is not None:
            self.salts[salt_hash(cache_salt)] = cache_salt

    def wrap(self, merged) -> list:
        """Events from the C++ core's already merged tuples (its fast path, pagedkv hashes)."""
        ps = self.page_size
        out = []
        for event in merged:
            kind = event[0]
            if kind == STORED:
                out.append(BlockStored(event[3], event[2], event[4], ps, None, MEDIA[event[1]], None))
            elif kind == REMOVED:
                out.append(BlockRemoved(event[2], MEDIA[event[1]]))
            else:
                out.append(AllBlocksCleared())
        return out

    def build(self, records) -> list:
        events: list = []
        nodes = self._nodes
        sha = self._none is not None
        # NOTE: the event being extended (a chain stored in one go is one event, as vLLM sends a
        # request's blocks; consecutive removals of one medium are one event), and for a
        # BlockStored the node of its last block. Hot with events on: kept to plain locals.
        open_kind, open_medium, open_node, open_event = None, None, ROOT, None
        for record in records:
            kind = record[0]
            if kind == STORED:
                _, medium, node, parent, h, parent_hash, tokens = record
                if sha:
                    h = nodes[node][0]
                    parent_hash = nodes[parent][0] if parent != ROOT else None
                elif parent == ROOT:
                    parent_hash = None
                if open_kind == STORED and open_medium == medium and parent == open_node and parent != ROOT:
                    open_event.block_hashes.append(h)
                    open_event.token_ids.extend(tokens)
                else:
                    open_event = BlockStored([h], parent_hash, list(tokens), self.page_size, None, MEDIA[medium], None)
                    events.append(open_event)
                    open_kind, open_medium = STORED, medium
                open_node = node
            elif kind == REMOVED:
                _, medium, node, h = record
                if sha:
                    h = nodes[node][0]
                if open_kind == REMOVED and open_medium == medium:
                    open_event.block_hashes.append(h)
                else:
                    open_event = BlockRemoved([h], MEDIA[medium])
                    events.append(open_event)
                    open_kind, open_medium = REMOVED, medium
            elif kind == NODE:  # NOTE: recorded only for sha256_cbor, whose hashes chain here
                _, node, parent, salt, _, tokens = record
                base = self._none if parent == ROOT else nodes[parent][3]
                digest = _sha256_block(base, tokens, self.salts.get(salt, salt) if parent == ROOT else None)
                nodes[node] = (external_hash(digest), parent, tokens, digest)
            elif kind == DROP:
                del nodes[record[1]]
            elif kind == CLEARED:
                events.append(AllBlocksCleared())
                open_kind = None
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


# ---------------------------------------------------------------------------- transport
#: Replay reply that ends a replay (vLLM's ``END_SEQ``): sequence number -1, empty payload.
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def _binds(endpoint: str) -> bool:
    """vLLM's convention: a wildcard or a local transport binds, a concrete address connects."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class ZmqPublisher:
    """Publishes event batches as vLLM's ``ZmqEventPublisher`` does, from a background thread.

    Each message is three frames: ``[topic, sequence number (8 bytes, big-endian), payload]``
    (``encode_batch``). The last ``buffer_steps`` payloads are kept for replay: a subscriber
    that missed messages sends ``[b"", start sequence (8 bytes)]`` to the ROUTER socket at
    ``replay_endpoint`` and gets back ``[b"", seq, payload]`` for each buffered batch from
    there, then ``[b"", END_SEQ, b""]``.

    ``publish`` never blocks the scheduler: it numbers the batch and queues it; when the queue
    (``max_queue_size`` batches) is full the batch is dropped and counted in ``num_dropped``,
    so subscribers see the gap in the sequence numbers (and cannot replay it: resynchronize).

    Args:
        endpoint: PUB address; ``tcp://*:5557`` (or ``tcp://127.0.0.1:*`` for a free port) binds,
            ``tcp://host:port`` connects.
        topic: first frame of every message; replay_endpoint: ROUTER address (binds), or None.
        data_parallel_rank: written into every batch (``None``: omitted).
        event_format: ``"array"`` or ``"map"`` (see ``encode_batch``).
    """

    def __init__(self, endpoint: str = "tcp://*:5557", topic: str = "kv-events", replay_endpoint: str | None = None,
                 *, buffer_steps: int = 10_000, max_queue_size: int = 100_000, hwm: int = 100_000,
                 data_parallel_rank: int | None = None, event_format: str = "array"):
        import collections
        import queue
        import threading

        zmq = require("zmq", "pagedkv.events.ZmqPublisher")
        _schema(event_format)  # NOTE: fails here (bad format, no msgspec), not in the thread
        for name, value in (("buffer_steps", buffer_steps), ("max_queue_size", max_queue_size), ("hwm", hwm)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(name, value, "an int >= 1")
        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay = None
        name, value = "endpoint", endpoint
        try:
            if _binds(endpoint):
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
            if replay_endpoint is not None:
                name, value = "replay_endpoint", replay_endpoint
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(replay_endpoint)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise InvalidArgument(name, value, f"an address ZeroMQ can use ({exc})") from None
        #: the PUB socket's resolved address (a bound wildcard port filled in)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self.replay_endpoint = (self._replay.getsockopt_string(zmq.LAST_ENDPOINT) if self._replay is not None
                                else None)
        self._topic = topic.encode()
        self._format = event_format
        self._rank = data_parallel_rank
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue_size)
        self._buffer: collections.deque = collections.deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self._next_seq = 0
        self.num_dropped = 0
        self.num_sent = 0
        self._running = True
        self._thread = threading.Thread(target=self._run, name="pagedkv-kv-events", daemon=True)
        self._thread.start()

    def publish(self, events, ts: float | None = None) -> int | None:
        """Queue one batch (a ``take_events`` list); returns its sequence number, or None when
        the queue was full and it was dropped. Never blocks."""
        import queue
        import time

        if not self._running:
            raise InvalidArgument("publisher", "closed", "an open ZmqPublisher")
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        try:
            self._queue.put_nowait((seq, time.time() if ts is None else ts, list(events)))
        except queue.Full:
            self.num_dropped += 1
            return None
        return seq

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (within ``timeout`` seconds), stop the thread, close the sockets."""
        if not self._running:
            return
        self._running = False
        self._thread.join(timeout)
        self._close_sockets()

    def __enter__(self) -> "ZmqPublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None and not sock.closed:
                sock.close(linger=0)

    def _run(self) -> None:
        import queue

        while self._running or not self._queue.empty():
            if self._replay is not None and self._replay.poll(0):
                self._serve_replay()
            try:
                seq, ts, events = self._queue.get(timeout=0.02)
            except queue.Empty:
                continue
            payload = encode_batch(events, ts, self._rank, self._format)
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
            self._buffer.append((seq, payload))
            self.num_sent += 1

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            return  # NOTE: a malformed request is ignored, as vLLM's publisher does
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= first:
                self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", END_SEQ, b""))


class ZmqSubscriber:
    """The consumer side (as a KV-aware router runs it): SUB to a publisher, replay on gaps.

    ``poll`` returns the batches received, in sequence order, as ``(seq, ts, events, rank)``;
    with ``replay_endpoint``, a gap in the sequence numbers (including the batches sent before
    this subscriber joined, with ``from_seq=0``) is filled from the publisher's replay buffer
    first. ``num_missed`` counts batches that could not be recovered.
    """

    def __init__(self, endpoint: str, topic: str = "kv-events", replay_endpoint: str | None = None,
                 event_format: str = "array", from_seq: int | None = None):
        zmq = require("zmq", "pagedkv.events.ZmqSubscriber")
        self._zmq = zmq
        ctx = zmq.Context.instance()
        self._sub = ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sub.connect(endpoint)
        self._replay = None
        if replay_endpoint is not None:
            self._replay = ctx.socket(zmq.DEALER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.connect(replay_endpoint)
        self._format = event_format
        # the sequence number expected next: from_seq (e.g. 0: everything the publisher sent,
        # recovered by replay), or None: whatever arrives first
        self.next_seq: int | None = from_seq
        self._catch_up = from_seq is not None and self._replay is not None
        self.num_missed = 0

    def poll(self, timeout_ms: int = 100, max_batches: int = 1000) -> list[tuple]:
        out: list[tuple] = []
        if self._catch_up:
            # NOTE: once, at the start: what was sent before the subscription took effect (a
            # SUB socket misses it) comes from the replay buffer; later duplicates are skipped.
            self._catch_up = False
            out.extend(self._replay_from(self.next_seq))
            if out:
                self.next_seq = out[-1][0] + 1
        timeout = timeout_ms
        while len(out) < max_batches and self._sub.poll(timeout):
            _, seq_bytes, payload = self._sub.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big")
            if self.next_seq is not None and seq > self.next_seq:
                out.extend(self._recover(self.next_seq, seq))
            if self.next_seq is None or seq >= self.next_seq:
                out.append((seq, *decode_batch(payload, self._format)))
                self.next_seq = seq + 1
            timeout = 0
        return out

    def _recover(self, first: int, upto: int) -> list[tuple]:
        got = [b for b in self._replay_from(first) if b[0] < upto]
        self.num_missed += (upto - first) - len(got)
        return got

    def _replay_from(self, first: int) -> list[tuple]:
        """The publisher's buffered batches from ``first`` on (bounded wait; [] without replay)."""
        got: list[tuple] = []
        if self._replay is None:
            return got
        self._replay.send_multipart((b"", first.to_bytes(8, "big")))
        while self._replay.poll(2000):
            _, seq_bytes, payload = self._replay.recv_multipart()
            if seq_bytes == END_SEQ:
                break
            seq = int.from_bytes(seq_bytes, "big")
            if seq >= first:
                got.append((seq, *decode_batch(payload, self._format)))
        return got

    def close(self) -> None:
        for sock in (self._sub, self._replay):
            if sock is not None:
                sock.close(linger=0)


# ------------------------------------------------------------------------ router index
class PrefixIndex:
    """What a KV-aware router knows: for each replica, the blocks it can match, per medium.

    Feed it every replica's event batches (``apply``/``apply_payload``) and ask
    ``match(token_ids)``: the prompt tokens each replica holds as a cached prefix. Hashes are
    recomputed from token ids with the engines' ``prefix_hash`` and ``block_size``.
    """

    def __init__(self, block_size: int, prefix_hash: str = "pagedkv"):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise InvalidArgument("block_size", block_size, "an int >= 1")
        if prefix_hash not in PREFIX_HASHES:
            raise InvalidArgument("prefix_hash", prefix_hash, f"one of {PREFIX_HASHES}")
        self.block_size = block_size
        self.prefix_hash = prefix_hash
        self._where: dict[str, dict[int, set]] = {medium: {} for medium in MEDIA}
        self._held: dict[object, set[tuple[int, str]]] = {}
        self.num_events = 0

    def apply(self, replica, events) -> None:
        """Apply one replica's events, in order."""
        held = self._held.setdefault(replica, set())
        for event in events:
            self.num_events += 1
            if isinstance(event, BlockStored):
                where = self._where.setdefault(event.medium or "GPU", {})
                for h in event.block_hashes:
                    where.setdefault(h, set()).add(replica)
                    held.add((h, event.medium or "GPU"))
            elif isinstance(event, BlockRemoved):
                where = self._where.setdefault(event.medium or "GPU", {})
                for h in event.block_hashes:
                    holders = where.get(h)
                    if holders is not None:
                        holders.discard(replica)
                        if not holders:
                            del where[h]
                    held.discard((h, event.medium or "GPU"))
            else:
                for h, medium in held:
                    holders = self._where[medium].get(h)
                    if holders is not None:
                        holders.discard(replica)
                        if not holders:
                            del self._where[medium][h]
                held.clear()

    def apply_payload(self, replica, payload: bytes, event_format: str = "array") -> None:
        """Apply one encoded batch (a ZMQ message's payload)."""
        self.apply(replica, decode_batch(payload, event_format)[1])

    def blocks(self, replica, medium: str = "GPU") -> set[int]:
        """The block hashes ``replica`` holds in ``medium``."""
        return {h for h, m in self._held.get(replica, ()) if m == medium}

    def match(self, token_ids, cache_salt=None, medium: str | None = "GPU") -> dict:
        """``{replica: cached prompt tokens}`` for every replica holding the prompt's first block.

        ``medium``: ``"GPU"``, ``"CPU"`` or ``None`` (a block held in either tier counts).
        """
        return self.match_hashes(block_hashes(token_ids, self.block_size, cache_salt, self.prefix_hash), medium)

    def match_hashes(self, hashes, medium: str | None = "GPU") -> dict:
        """``match`` for block hashes already computed (``block_hashes``)."""
        if medium is not None and medium not in MEDIA:
            raise InvalidArgument("medium", medium, f"one of {MEDIA} or None")
        tables = [self._where[m] for m in (MEDIA if medium is None else (medium,))]
        out: dict = {}
        alive: set | None = None
        for i, h in enumerate(hashes):
            holders = set().union(*(t.get(h, ()) for t in tables)) if len(tables) > 1 else tables[0].get(h)
            if not holders:
                break
            alive = set(holders) if alive is None else alive & holders
            if not alive:
                break
            for replica in alive:
                out[replica] = (i + 1) * self.block_size
        return out
