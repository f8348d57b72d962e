"""KV events over ZeroMQ on loopback: publisher -> subscriber (with replay) -> router index."""

import random
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgspec")

from pagedkv import BlockManager, InvalidArgument  # noqa: E402
from pagedkv.events import PrefixIndex, ZmqPublisher, ZmqSubscriber, block_hashes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_kv_events import manager_index  # noqa: E402

LOOPBACK = "tcp://127.0.0.1:*"


def _collect(sub: ZmqSubscriber, want: int, seconds: float = 10.0) -> list:
    """Poll until ``want`` batches arrived (bounded)."""
    got, deadline = [], time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        got.extend(sub.poll(50))
    return got


def test_events_round_trip_into_the_router_index():
    rng = random.Random(0)
    mgr = BlockManager(24, 4, enable_prefix_caching=True, num_cpu_pages=16, cpu_prefix_cache=True,
                       enable_kv_events=True)
    router = PrefixIndex(4)
    prompts = [[rng.randrange(50) for _ in range(rng.randrange(4, 30))] for _ in range(6)]
    with ZmqPublisher(LOOPBACK, replay_endpoint=LOOPBACK, data_parallel_rank=0) as pub:
        # NOTE: from_seq=0: the batches sent before the subscription took effect are replayed.
        sub = ZmqSubscriber(pub.endpoint, replay_endpoint=pub.replay_endpoint, from_seq=0)
        live, sent = [], 0
        for step in range(120):
            if live and rng.random() < 0.4:
                mgr.free(live.pop(rng.randrange(len(live))))
            else:
                prompt = rng.choice(prompts)
                if mgr.can_allocate(token_ids=prompt):
                    mgr.allocate(step, token_ids=prompt)
                    live.append(step)
            mgr.take_offload()
            mgr.end_step()
            assert pub.publish(mgr.take_events()) == sent
            sent += 1
        batches = _collect(sub, sent)
        sub.close()
    assert [b[0] for b in batches] == list(range(sent)) and sub.num_missed == 0
    assert all(rank == 0 for _, _, _, rank in batches)
    for _, _, events, _ in batches:
        router.apply("replica-0", events)
    want = manager_index(mgr)
    assert router.blocks("replica-0", "GPU") == {h for h, m in want if m == "GPU"}
    assert router.blocks("replica-0", "CPU") == {h for h, m in want if m == "CPU"}
    assert any(m == "CPU" for _, m in want), "the run never demoted: weaken the pool"


def test_router_matches_the_replica_holding_the_prefix():
    managers = {name: BlockManager(64, 4, enable_prefix_caching=True, enable_kv_events=True,
                                   prefix_hash="sha256_cbor") for name in ("a", "b")}
    shared, tail_a = list(range(100, 116)), list(range(40))
    managers["a"].allocate(0, token_ids=shared + tail_a)
    managers["b"].allocate(0, token_ids=shared + [7] * 9, cache_salt="tenant-b")
    managers["b"].allocate(1, token_ids=shared[:8] + [1])
    router = PrefixIndex(4, prefix_hash="sha256_cbor")
    with ZmqPublisher(LOOPBACK, replay_endpoint=LOOPBACK) as pub_a, ZmqPublisher(LOOPBACK, replay_endpoint=LOOPBACK) as pub_b:
        subs = {"a": ZmqSubscriber(pub_a.endpoint, replay_endpoint=pub_a.replay_endpoint, from_seq=0),
                "b": ZmqSubscriber(pub_b.endpoint, replay_endpoint=pub_b.replay_endpoint, from_seq=0)}
        pub_a.publish(managers["a"].take_events())
        pub_b.publish(managers["b"].take_events())
        for name, sub in subs.items():
            (batch,) = _collect(sub, 1)
            router.apply(name, batch[2])
            sub.close()
    assert router.match(shared + tail_a + [5]) == {"a": 56, "b": 8}
    assert router.match(shared + [7] * 8, cache_salt="tenant-b") == {"b": 24}
    assert router.match([9] * 12) == {}
    assert router.match_hashes(block_hashes(shared, 4, prefix_hash="sha256_cbor")) == {"a": 16, "b": 8}


def test_publish_never_blocks_and_counts_what_it_drops():
    with ZmqPublisher(LOOPBACK, max_queue_size=4) as pub:
        start = time.monotonic()
        results = [pub.publish([]) for _ in range(20_000)]
        elapsed = time.monotonic() - start
    assert pub.num_dropped == results.count(None) > 0
    assert pub.num_sent + pub.num_dropped == 20_000
    assert elapsed < 10.0  # NOTE: a bound against hanging, not a speed target


def test_bad_publisher_arguments_are_typed_errors():
    with pytest.raises(InvalidArgument, match="endpoint"):
        ZmqPublisher("nonsense://x")
    with pytest.raises(InvalidArgument, match="buffer_steps"):
        ZmqPublisher(LOOPBACK, buffer_steps=0)
    with pytest.raises(InvalidArgument, match="event_format"):
        ZmqPublisher(LOOPBACK, event_format="xml")
    pub = ZmqPublisher(LOOPBACK)
    pub.close()
    with pytest.raises(InvalidArgument, match="publisher"):
        pub.publish([])
    with pytest.raises(InvalidArgument, match="block_size"):
        PrefixIndex(0)
    with pytest.raises(InvalidArgument, match="medium"):
        PrefixIndex(4).match([1, 2, 3, 4], medium="disk")
