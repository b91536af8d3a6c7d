"""The latency floor of this machine, for reading the ``latency`` scenario.

Three processes, as in ``pylogstreams bench --scenarios latency``: a
producer publishing 1 KB messages at 10,000/s in 1 ms ticks, each stamped
with ``time.time_ns()``; a relay (a bare uvloop ``asyncio.Protocol`` that
forwards every byte to the consumer, nothing else); a consumer that reads
the stamps back. No broker logic, no disk, no threads: whatever tail
latency this shows is the operating system's and the VM's, and the broker's
own figure can only be read on top of it.

    python bench/latency_floor.py [--rate 10000] [--seconds 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import multiprocessing
import os
import socket
import struct
import time

_TS = struct.Struct(">q")
_SIZE = 1024


def _run(coro):
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


async def _relay(port: int, seconds: float) -> None:
    out = {}

    class Relay(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            if "c" not in out and data[:1] == b"C":
                out["c"] = self.transport
                data = data[1:]
            consumer = out.get("c")
            if consumer is not None and data:
                consumer.write(data)

    server = await asyncio.get_running_loop().create_server(Relay, "127.0.0.1", port)
    await asyncio.sleep(seconds + 5)
    server.close()


async def _consumer(port: int, seconds: float, q) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"C")
    lat = array.array("q")
    buf = b""
    end = time.monotonic() + seconds + 3
    while time.monotonic() < end:
        try:
            data = await asyncio.wait_for(reader.read(1 << 20), 2)
        except asyncio.TimeoutError:
            break
        if not data:
            break
        now = time.time_ns()
        buf += data
        n = len(buf) // _SIZE
        lat.extend(now - _TS.unpack_from(buf, i * _SIZE)[0] for i in range(n))
        buf = buf[n * _SIZE:]
    q.put(lat.tobytes())


async def _producer(port: int, rate: float, seconds: float) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pad = os.urandom(_SIZE - 8)
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < seconds:
        now = time.monotonic()
        due = min(int((now - t0) * rate) - sent, 100)
        if due > 0:
            writer.write((_TS.pack(time.time_ns()) + pad) * due)
            sent += due
        await asyncio.sleep(max(0.0, max(t0 + (sent + 1) / rate, now + 0.001) - time.monotonic()))
    await writer.drain()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(rate: float, seconds: float) -> list[float]:
    """Latencies in ms of one run (every message)."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    q = ctx.Queue()
    relay = ctx.Process(target=_run_relay, args=(port, seconds))
    relay.start()
    time.sleep(0.5)
    consumer = ctx.Process(target=_run_consumer, args=(port, seconds, q))
    consumer.start()
    time.sleep(0.3)
    producer = ctx.Process(target=_run_producer, args=(port, rate, seconds))
    producer.start()
    lat = array.array("q")
    lat.frombytes(q.get(timeout=seconds + 30))
    for p in (producer, consumer):
        p.join(10)
    relay.terminate()
    relay.join(5)
    return sorted(x / 1e6 for x in lat)


def _run_relay(port, seconds):
    _run(_relay(port, seconds))


def _run_consumer(port, seconds, q):
    _run(_consumer(port, seconds, q))


def _run_producer(port, rate, seconds):
    _run(_producer(port, rate, seconds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=10_000, help="messages/s (default 10000)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    args = ap.parse_args()
    print("| run | messages | p50 ms | p99 ms | p99.9 ms | max ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for i in range(args.runs):
        ls = one_run(args.rate, args.seconds)
        n = len(ls)
        if not n:
            print("| %d | 0 | - | - | - | - |" % (i + 1))
            continue
        print("| %d | %d | %.2f | %.2f | %.2f | %.2f |" % (
            i + 1, n, ls[n // 2], ls[int(n * 0.99)], ls[int(n * 0.999)], ls[-1]))


if __name__ == "__main__":
    main()
