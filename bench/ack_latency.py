"""A publisher that awaits each acknowledgement, with N subscribers on its topic.

The ``latency`` scenario of ``pylogstreams bench`` measures producer to
consumer; this measures what a synchronous producer sees: ``publish``
one message, await its ``ACK``, again, ``--count`` times, while
``--subscribers`` consumers (each its own connection, through the
client library) are served the same topic. With many subscribers the
broker's loop spends a send per subscriber on each batch, and the order
in which it answers the producer and serves them shows here.

    python bench/ack_latency.py [--subscribers 1,20] [--count 2000] [--size 1024] [--pure]

One broker per subscriber count, started for the run; prints a table
of the publish-to-ACK time (p50, p99) and the subscribers' messages.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from broker.bench.servers import OursServer, ServerError  # noqa: E402
from broker.client.aio import AsyncClient  # noqa: E402


async def _measure(port: int, subscribers: int, count: int, size: int) -> tuple[list, int]:
    producer = await AsyncClient("127.0.0.1", port, client_id="ack-p", reconnect=False).connect()
    consumers = []
    received = [0]

    async def drain(sub):
        while True:
            batch = await sub.get_batch(10_000)
            if not batch:
                return
            received[0] += len(batch)

    try:
        await producer.publish("acks", b"x")  # the topic exists: PUBs take the fast path
        for i in range(subscribers):
            c = await AsyncClient("127.0.0.1", port, client_id="ack-c%d" % i,
                                  reconnect=False).connect()
            consumers.append((c, await c.subscribe("acks", start="latest", auto_commit=True)))
        tasks = [asyncio.ensure_future(drain(sub)) for _c, sub in consumers]
        value = os.urandom(size)
        times = []
        ns = time.perf_counter_ns
        for _ in range(count):
            t = ns()
            await producer.publish("acks", value)
            times.append(ns() - t)
        deadline = time.monotonic() + 30
        while received[0] < count * subscribers and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for c, sub in consumers:
            await sub.close()
        await asyncio.gather(*tasks)
        return times, received[0]
    finally:
        for c, _sub in consumers:
            await c.close()
        await producer.close()


def _run(subscribers: int, args) -> tuple[list, int]:
    try:
        server = OursServer(pure=args.pure).start()
    except ServerError as exc:
        raise SystemExit(str(exc)) from None
    try:
        coro = _measure(server.port, subscribers, args.count, args.size)
        try:
            import uvloop
        except ImportError:
            return asyncio.run(coro)
        return uvloop.run(coro)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", default="1,20",
                    help="comma-separated subscriber counts, one broker each (default 1,20)")
    ap.add_argument("--count", type=int, default=2000, help="publishes per run (default 2000)")
    ap.add_argument("--size", type=int, default=1024, help="message size in bytes (default 1024)")
    ap.add_argument("--pure", action="store_true", help="the broker's pure-Python twin")
    args = ap.parse_args()
    try:
        counts = [int(n) for n in args.subscribers.split(",")]
    except ValueError:
        ap.error("--subscribers: comma-separated integers")
    if any(n < 0 for n in counts) or args.count < 1 or args.size < 1:
        ap.error("--subscribers >= 0, --count >= 1, --size >= 1")
    print("| broker | subscribers | publishes | p50 us | p99 us | messages delivered |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n in counts:
        times, received = _run(n, args)
        times.sort()
        print("| %s | %d | %d | %.0f | %.0f | %d of %d |" % (
            "pure" if args.pure else "cython", n, len(times), times[len(times) // 2] / 1e3,
            times[min(len(times) - 1, int(len(times) * 0.99))] / 1e3, received, n * len(times)))


if __name__ == "__main__":
    main()
