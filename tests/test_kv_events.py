"""KV events: they follow the prefix index exactly, in vLLM's wire format and hashes."""

import hashlib
import random
import struct
import sys
from pathlib import Path

import pytest

msgspec = pytest.importorskip("msgspec")
cbor2 = pytest.importorskip("cbor2")

from pagedkv import BlockManager, InvalidArgument  # noqa: E402
from pagedkv.events import (  # noqa: E402
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    block_hashes,
    decode_batch,
    encode_batch,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_parity import Lockstep, drain, random_tier_op  # noqa: E402

BACKENDS = ["cpp", "python"]


class Replica:
    """What a router learns from one manager's events: the set of (hash, medium) matchable."""

    def __init__(self):
        self.held: set[tuple[int, str]] = set()

    def apply(self, events) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                assert len(event.token_ids) == len(event.block_hashes) * event.block_size
                for h in event.block_hashes:
                    assert (h, event.medium) not in self.held, f"{h:#x} stored twice in {event.medium}"
                    self.held.add((h, event.medium))
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    assert (h, event.medium) in self.held, f"{h:#x} removed from {event.medium} but never stored"
                    self.held.discard((h, event.medium))
            else:
                self.held.clear()


def manager_index(mgr: BlockManager) -> set[tuple[int, str]]:
    """The manager's own view: every node with a GPU page, and every node with a CPU page."""
    held = set()
    for h, _, _, pages, cpu in mgr.snapshot()["nodes"].values():
        if pages:
            held.add((h, "GPU"))
        if cpu != -1:
            held.add((h, "CPU"))
    return held


@pytest.mark.parametrize("seed", range(3))
def test_events_follow_the_index_after_every_operation(seed):
    # Both backends in lockstep (identical events: the snapshot holds the pending records), the
    # CPU tier on, random serving operations; after each, the replayed events equal the index.
    rng = random.Random(seed)
    lock = Lockstep(12, 2, enable_prefix_caching=True, num_cpu_pages=6, cpu_prefix_cache=True, enable_kv_events=True)
    replicas = {"cpp": Replica(), "py": Replica()}
    counts = {"stored": 0, "removed": 0, "cleared": 0}
    for _ in range(300):
        random_tier_op(rng, lock)
        got = {name: getattr(lock, name).take_events() for name in replicas}
        assert got["cpp"] == got["py"]
        for name, replica in replicas.items():
            replica.apply(got[name])
            assert replica.held == manager_index(getattr(lock, name))
        for event in got["cpp"]:
            counts["stored" if isinstance(event, BlockStored) else
                   "removed" if isinstance(event, BlockRemoved) else "cleared"] += 1
    drain(lock)
    assert counts["stored"] and counts["removed"], counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_chain_is_one_event_and_duplicates_are_stored_once(backend):
    mgr = BlockManager(16, 2, enable_prefix_caching=True, enable_kv_events=True, backend=backend)
    mgr.allocate(0, token_ids=[1, 2, 3, 4, 5])
    mgr.allocate(1, token_ids=[1, 2, 3, 4, 6], num_computed_tokens=0)  # hits both pages
    (stored,) = mgr.take_events()
    assert stored == BlockStored(block_hashes(range(1, 5), 2), None, [1, 2, 3, 4], 2, None, "GPU", None)
    mgr.free(0)
    mgr.free(1)
    mgr.allocate(2, token_ids=[1, 2, 3, 4, 5, 6], num_computed_tokens=0)  # a hit: nothing new
    mgr.commit(2, 6)
    (more,) = mgr.take_events()
    assert more.parent_block_hash == block_hashes([1, 2, 3, 4], 2)[-1] and more.token_ids == [5, 6]
    mgr.reset_prefix_cache()
    assert mgr.take_events() == [AllBlocksCleared()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sha256_cbor_hashes_are_vllms(backend):
    # vLLM: NONE_HASH = sha256(cbor("vllm-none-hash")); a block is sha256(cbor((parent digest,
    # tuple(tokens), extra_keys))), extra_keys = (cache_salt,) on a salted prompt's first block;
    # the event int is the digest's low 64 bits, big-endian. Computed here from those facts.
    def sha(value) -> bytes:
        return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()

    def expected(tokens, size, salt=None):
        parent, out = sha("vllm-none-hash"), []
        for i in range(len(tokens) // size):
            parent = sha((parent, tuple(tokens[i * size:(i + 1) * size]), (salt,) if salt and i == 0 else None))
            out.append(int.from_bytes(parent[-8:], "big"))
        return out

    prompt = [7, 3000, 151644, 0, 12, 65535, 1 << 20, 9]
    mgr = BlockManager(16, 4, enable_prefix_caching=True, enable_kv_events=True, prefix_hash="sha256_cbor",
                       backend=backend)
    mgr.allocate(0, token_ids=prompt + [1])
    mgr.allocate(1, token_ids=prompt + [1], cache_salt="tenant-a")
    plain, salted = mgr.take_events()
    assert plain.block_hashes == expected(prompt, 4) == block_hashes(prompt, 4, prefix_hash="sha256_cbor")
    assert salted.block_hashes == expected(prompt, 4, "tenant-a") == block_hashes(prompt, 4, "tenant-a", "sha256_cbor")
    assert plain.block_hashes != salted.block_hashes
    # pinned vectors (computed once, December 2026, with cbor2 6.3): a change of the formula,
    # of cbor2's canonical encoding or of the code shows here
    assert sha("vllm-none-hash").hex() == "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0"
    assert block_hashes(range(1, 9), 4, prefix_hash="sha256_cbor") == [9561501211280363793, 15292913576410714033]
    assert block_hashes(range(1, 5), 4, "tenant-a", "sha256_cbor") == [14973694308966003349]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_swapped_in_chain_is_stored_root_first(backend):
    # swap_in attaches the new pages to the prompt's nodes; a router must see each parent before
    # its child, so the chain is one event from the root (the C++ core once attached leaf first)
    mgr = BlockManager(8, 2, enable_prefix_caching=True, num_cpu_pages=8, enable_kv_events=True, backend=backend)
    mgr.allocate(0, token_ids=[1, 2, 3, 4, 5, 6, 7])
    hashes = block_hashes([1, 2, 3, 4, 5, 6], 2)
    mgr.swap_out([0])
    mgr.end_step()
    mgr.allocate(1, num_tokens=16)  # every GPU page: the prompt's cached pages are evicted
    assert mgr.take_events()[-1] == BlockRemoved(hashes, "GPU")
    mgr.free(1)
    mgr.swap_in([0])
    assert mgr.take_events() == [BlockStored(hashes, None, [1, 2, 3, 4, 5, 6], 2, None, "GPU", None)]


@pytest.mark.parametrize("prefix_hash", ["pagedkv", "sha256_cbor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_salt_is_one_tenant_in_every_form(backend, prefix_hash):
    # "a" and b"a" are one tenant under both hashes (UTF-8 bytes become the str); an empty salt
    # is rejected (vLLM rejects it), naming cache_salt and changing nothing
    mgr = BlockManager(16, 2, enable_prefix_caching=True, enable_kv_events=True, prefix_hash=prefix_hash,
                       backend=backend)
    mgr.allocate(0, token_ids=[1, 2, 3, 4, 5], cache_salt=b"tenant")
    (stored,) = mgr.take_events()
    assert stored.block_hashes == block_hashes([1, 2, 3, 4], 2, "tenant", prefix_hash)
    assert stored.block_hashes == block_hashes([1, 2, 3, 4], 2, b"tenant", prefix_hash)
    assert stored.block_hashes != block_hashes([1, 2, 3, 4], 2, None, prefix_hash)
    hit = mgr.allocate(1, token_ids=[1, 2, 3, 4, 6], cache_salt="tenant", num_computed_tokens=0)
    assert hit.num_cached_tokens == 4
    before = mgr.snapshot()
    for empty in ("", b""):
        with pytest.raises(InvalidArgument, match="cache_salt"):
            mgr.allocate(2, token_ids=[1, 2, 3, 4, 5], cache_salt=empty)
        with pytest.raises(InvalidArgument, match="cache_salt"):
            block_hashes([1, 2], 2, empty, prefix_hash)
        with pytest.raises(InvalidArgument, match="cache_salt"):
            mgr.pin_prefix([1, 2], cache_salt=empty)
    assert mgr.snapshot() == before
    # bytes that are not UTF-8 stay bytes: a tenant of their own, hashed as bytes
    mgr.allocate(3, token_ids=[1, 2, 3, 4, 5], cache_salt=b"\xff")
    (other,) = mgr.take_events()
    assert other.block_hashes == block_hashes([1, 2, 3, 4], 2, b"\xff", prefix_hash) != stored.block_hashes


def test_block_hashes_fast_path_equals_the_python_chain(monkeypatch):
    import pagedkv.events as events

    rng = random.Random(4)
    tokens = [rng.randrange(2**31) for _ in range(203)]
    fast = [block_hashes(tokens, size, salt) for size in (1, 3, 16) for salt in (None, "t")]
    monkeypatch.setattr(events, "_core_module", lambda: None)  # the pure-Python chain
    assert fast == [block_hashes(tokens, size, salt) for size in (1, 3, 16) for salt in (None, "t")]
    mgr = BlockManager(64, 3, enable_prefix_caching=True, enable_kv_events=True)
    mgr.allocate(0, token_ids=tokens[:40], cache_salt="t")
    assert mgr.take_events()[0].block_hashes == block_hashes(tokens[:40], 3, "t")
    with pytest.raises(InvalidArgument, match="block_size"):
        block_hashes(tokens, 0)


def test_none_hash_follows_pythonhashseed(monkeypatch):
    from pagedkv.events import none_hash

    default = none_hash()
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    assert none_hash() == hashlib.sha256(cbor2.dumps("0", canonical=True)).digest() != default


# ----------------------------------------------------------------------------- wire format
def _mp(value) -> bytes:
    """A minimal msgpack writer, from the spec, for the golden bytes (independent of msgspec)."""
    if value is None:
        return b"\xc0"
    if isinstance(value, float):
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, int):
        if 0 <= value < 128:
            return bytes([value])
        return b"\xcf" + struct.pack(">Q", value)
    if isinstance(value, str):
        data = value.encode()
        assert len(data) < 32
        return bytes([0xA0 | len(data)]) + data
    if isinstance(value, list):
        assert len(value) < 16
        return bytes([0x90 | len(value)]) + b"".join(_mp(v) for v in value)
    if isinstance(value, dict):
        assert len(value) < 16
        return bytes([0x80 | len(value)]) + b"".join(_mp(k) + _mp(v) for k, v in value.items())
    raise TypeError(value)


EVENTS = [BlockStored([1, 2**64 - 1], None, [5, 6, 7, 8], 2, None, "GPU", None), BlockRemoved([1], "CPU"),
          AllBlocksCleared()]


def test_golden_bytes_array_layout():
    # vLLM's array_like tagged structs: [tag, fields in declaration order]; BlockStored declares
    # block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name,
    # extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window; BlockRemoved
    # block_hashes, medium, group_idx. The batch is [ts, events, data_parallel_rank].
    want = _mp([1.5, [
        ["BlockStored", [1, 2**64 - 1], None, [5, 6, 7, 8], 2, None, "GPU", None, None, None, None, None],
        ["BlockRemoved", [1], "CPU", None],
        ["AllBlocksCleared"],
    ], 0])
    assert encode_batch(EVENTS, 1.5, 0) == want


def test_golden_bytes_map_layout():
    # vLLM after its PR #42892: events are maps, the tag under "type", unset defaults omitted.
    want = _mp([1.5, [
        {"type": "BlockStored", "block_hashes": [1, 2**64 - 1], "parent_block_hash": None, "token_ids": [5, 6, 7, 8],
         "block_size": 2, "lora_id": None, "medium": "GPU", "lora_name": None},
        {"type": "BlockRemoved", "block_hashes": [1], "medium": "CPU"},
        {"type": "AllBlocksCleared"},
    ], 0])
    assert encode_batch(EVENTS, 1.5, 0, event_format="map") == want


def test_vllms_decoder_reads_the_payload():
    # vLLM's schema declared here as vLLM declares it (msgspec, array_like, tagged).
    class Event(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStoredV(Event, tag="BlockStored"):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class BlockRemovedV(Event, tag="BlockRemoved"):
        block_hashes: list[int]
        medium: str | None
        group_idx: int | None = None

    class AllBlocksClearedV(Event, tag="AllBlocksCleared"):
        pass

    class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[BlockStoredV | BlockRemovedV | AllBlocksClearedV]
        data_parallel_rank: int | None = None

    batch = msgspec.msgpack.decode(encode_batch(EVENTS, 3.25, 2), type=KVEventBatch)
    assert batch.ts == 3.25 and batch.data_parallel_rank == 2
    stored, removed, cleared = batch.events
    assert (stored.block_hashes, stored.token_ids, stored.block_size, stored.medium) == ([1, 2**64 - 1], [5, 6, 7, 8],
                                                                                          2, "GPU")
    assert (removed.block_hashes, removed.medium) == ([1], "CPU") and isinstance(cleared, AllBlocksClearedV)


@pytest.mark.parametrize("event_format", ["array", "map"])
def test_round_trip(event_format):
    ts, events, rank = decode_batch(encode_batch(EVENTS, 7.0, None, event_format=event_format), event_format)
    assert (ts, events, rank) == (7.0, EVENTS, None)


def test_bad_arguments_are_typed_errors():
    with pytest.raises(InvalidArgument, match="event_format"):
        encode_batch(EVENTS, 1.0, event_format="json")
    with pytest.raises(InvalidArgument, match="events"):
        encode_batch([("BlockStored",)], 1.0)
    with pytest.raises(InvalidArgument, match="enable_kv_events"):
        BlockManager(4, 2, enable_kv_events=True)
    with pytest.raises(InvalidArgument, match="prefix_hash"):
        BlockManager(4, 2, enable_prefix_caching=True, enable_kv_events=True, prefix_hash="md5")
    assert BlockManager(4, 2, enable_prefix_caching=True).take_events() == []


# ------------------------------------------------------------------------ state machine
from pagedkv.testing import BlockManagerMachine  # noqa: E402
from hypothesis import settings  # noqa: E402
from hypothesis.stateful import invariant  # noqa: E402


class EventsMachine(BlockManagerMachine):
    """The shipped state machine, plus: after every step, the events replayed into a router's
    view equal the manager's own index (both tiers)."""

    def __init__(self):
        super().__init__()
        self.replica = Replica()

    @invariant()
    def events_follow_the_index(self):
        self.replica.apply(self.mgr.take_events())
        assert self.replica.held == manager_index(self.mgr)


def _events_manager():
    return BlockManager(10, 2, enable_prefix_caching=True, num_cpu_pages=5, cpu_prefix_cache=True,
                        enable_kv_events=True)


EventsMachine.factory = staticmethod(_events_manager)
TestEventsMachine = EventsMachine.TestCase
TestEventsMachine.settings = settings(settings.default, stateful_step_count=30)
