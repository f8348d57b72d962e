"""Subscribe to a pagedkv engine's KV events and print what a router learns from them.

    python examples/kv_events_subscriber.py tcp://127.0.0.1:5557 &
    python examples/engine.py --kv-events 'tcp://*:5557'

(As with vLLM, a publisher endpoint with a wildcard binds and a concrete one connects.)

It listens (topic ``kv-events``, replay on the next port) until no batch arrives for
``--idle`` seconds, feeds every batch to ``pagedkv.events.PrefixIndex`` and prints each event
and, at the end, the blocks it knows. Needs ``pip install 'pagedkv[events]'``.
"""

from __future__ import annotations

import argparse
import sys
import time

from pagedkv.events import AllBlocksCleared, BlockStored, PrefixIndex, ZmqSubscriber


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("endpoint", help="the publisher's endpoint, e.g. tcp://127.0.0.1:5557")
    parser.add_argument("--page-size", type=int, default=4, help="the engine's page size (the demo's is 4)")
    parser.add_argument("--idle", type=float, default=5.0, help="stop after this many seconds without a batch")
    parser.add_argument("--timeout", type=float, default=120.0, help="stop after this many seconds in all")
    args = parser.parse_args(argv)
    base, _, port = args.endpoint.rpartition(":")
    replay = f"{base}:{int(port) + 1}" if port.isdigit() else None
    sub = ZmqSubscriber(args.endpoint, topic="kv-events", replay_endpoint=replay, from_seq=0)
    index = PrefixIndex(args.page_size, prefix_hash="sha256_cbor")
    start = last = time.monotonic()
    batches = events = 0
    while time.monotonic() - last < args.idle and time.monotonic() - start < args.timeout:
        for seq, ts, batch, _ in sub.poll(200):
            last = time.monotonic()
            batches += 1
            events += len(batch)
            index.apply("engine", batch)
            for event in batch:
                if isinstance(event, BlockStored):
                    print(f"#{seq} stored  {len(event.block_hashes)} blocks on {event.medium}, "
                          f"{len(event.token_ids)} tokens, parent {event.parent_block_hash}")
                elif isinstance(event, AllBlocksCleared):
                    print(f"#{seq} cleared")
                else:
                    print(f"#{seq} removed {len(event.block_hashes)} blocks from {event.medium}")
    sub.close()
    print(f"{batches} batches, {events} events ({sub.num_missed} batches missed); the router now knows "
          f"{len(index.blocks('engine', 'GPU'))} GPU blocks and {len(index.blocks('engine', 'CPU'))} CPU blocks")
    return 0 if batches else 1


if __name__ == "__main__":
    sys.exit(main())
