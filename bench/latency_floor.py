"""The latency floor of this machine, for reading the ``latency`` scenario.

Three processes, as in ``pylogstreams bench --scenarios latency``: a
producer publishing 1 KB messages at 10,000/s in 1 ms ticks, each stamped
with ``time.time_ns()``; a relay (a bare uvloop ``asyncio.Protocol`` that
forwards every byte to the consumer, nothing else); a consumer that reads
the stamps back. No broker logic, no disk, no threads: whatever tail
latency this shows is the operating system's and the VM's, and the broker's
own figure can only be read on top of it.

Options add the broker's shape piece by piece: ``--hop thread`` hands
each chunk to a writer thread that ``pwrite``s it to a file and gives it
back to the loop (``call_soon_threadsafe``), as the disk thread does;
``--hop inline`` writes it on the loop; ``--ack`` answers the producer
for each chunk; ``--work-us N`` spends N microseconds of Python (holding
the GIL) per chunk on the loop and again on the writer thread, standing
in for the broker's own work per batch: with ``--work-kind wall`` (the
default) a spin until N microseconds have passed, which a stalled CPU
cannot make longer; with ``--work-kind cpu`` a fixed count of loop
iterations (N microseconds' worth on this machine, calibrated when the
relay starts), which a slowed CPU stretches as it stretches the
broker's own work.

Several ``--work-us`` values (``--work-us 0,50,100,150``) take turns in
each run, so that a slow stretch of the machine falls on all of them: a
curve of p99 against the work per chunk, to set the broker's own CPU per
batch against (``bench/hiccups.py`` shows why the curve is steep on a VM).

    python bench/latency_floor.py [--rate 10000] [--seconds 5] [--runs 3]
                                  [--hop none|thread|inline] [--ack]
                                  [--work-us N[,N...]] [--work-kind wall|cpu]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import multiprocessing
import os
import queue
import socket
import struct
import tempfile
import threading
import time

_TS = struct.Struct(">q")
_SIZE = 1024


def _run(coro):
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def _calibrate() -> float:
    """Loop iterations per second of this process, the best of a few tries."""
    best = 0.0
    n = 200_000
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            pass
        best = max(best, n / (time.perf_counter() - t))
    return best


def _spin(seconds: float, loops_per_s: float = 0.0) -> None:
    """Python work holding the GIL (a stand-in for the broker's own).

    Without ``loops_per_s`` (``--work-kind wall``) it spins until
    ``seconds`` of wall time pass, so a stalled CPU does not make it
    longer; with it (``--work-kind cpu``) it runs a fixed number of loop
    iterations (``seconds`` of them on an unloaded CPU), which a slowed
    CPU stretches as it stretches the broker's own work.
    """
    if not seconds:
        return
    if loops_per_s:
        for _ in range(int(seconds * loops_per_s)):
            pass
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def _relay(port: int, seconds: float, hop: str, ack: bool, work: float,
                 loops_per_s: float = 0.0) -> None:
    out = {}
    loop = asyncio.get_running_loop()
    fd, path = tempfile.mkstemp(prefix="latency-floor-")
    os.unlink(path)
    end = [0]
    jobs: queue.Queue = queue.Queue(maxsize=10_000)  # a few ms of chunks at most

    def store(data) -> None:
        os.pwrite(fd, data, end[0])
        end[0] += len(data)

    def forward(data, producer) -> None:
        consumer = out.get("c")
        if consumer is not None:
            consumer.write(data)
        if ack:
            producer.write(b"A")

    def writer() -> None:
        while True:
            data, producer = jobs.get()
            _spin(work, loops_per_s)
            store(data)
            loop.call_soon_threadsafe(forward, data, producer)

    if hop == "thread":
        threading.Thread(target=writer, daemon=True).start()

    class Relay(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            if "c" not in out and data[:1] == b"C":
                out["c"] = self.transport
                data = data[1:]
            if not data or "c" not in out:
                return
            _spin(work, loops_per_s)
            if hop == "thread":
                jobs.put_nowait((data, self.transport))
                return
            if hop == "inline":
                store(data)
            forward(data, self.transport)

    server = await loop.create_server(Relay, "127.0.0.1", port)
    await asyncio.sleep(seconds + 5)
    server.close()
    os.close(fd)


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
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def read_acks() -> None:  # --ack: read them as a client reads its ACKs
        while await reader.read(1 << 16):
            pass

    acks = asyncio.get_running_loop().create_task(read_acks())
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
    acks.cancel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(rate: float, seconds: float, hop: str = "none", ack: bool = False,
            work_us: float = 0.0, work_kind: str = "wall") -> list[float]:
    """Latencies in ms of one run (every message)."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    q = ctx.Queue()
    relay = ctx.Process(target=_run_relay,
                        args=(port, seconds, hop, ack, work_us / 1e6, work_kind))
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


def _run_relay(port, seconds, hop, ack, work, kind="wall"):
    loops_per_s = _calibrate() if kind == "cpu" and work else 0.0
    _run(_relay(port, seconds, hop, ack, work, loops_per_s))


def _run_consumer(port, seconds, q):
    _run(_consumer(port, seconds, q))


def _run_producer(port, rate, seconds):
    _run(_producer(port, rate, seconds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=10_000, help="messages/s (default 10000)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    ap.add_argument("--hop", choices=("none", "thread", "inline"), default="none",
                    help="write each chunk to a file: on a writer thread and back, or on "
                         "the loop (default: none, a bare relay)")
    ap.add_argument("--ack", action="store_true", help="answer the producer for each chunk")
    ap.add_argument("--work-us", default="0",
                    help="microseconds of Python per chunk on the loop and on the writer "
                         "thread; a comma-separated list runs each in turn, one row per "
                         "run (default 0)")
    ap.add_argument("--work-kind", choices=("wall", "cpu"), default="wall",
                    help="wall: spin until the time has passed (a stalled CPU does not "
                         "stretch it); cpu: a fixed number of loop iterations, calibrated "
                         "when the relay starts (a slowed CPU stretches it, as it does the "
                         "broker's work) (default: wall)")
    args = ap.parse_args()
    try:
        works = [float(w) for w in args.work_us.split(",")]
    except ValueError:
        ap.error("--work-us: numbers separated by commas, not %r" % args.work_us)
    if any(w < 0 for w in works):
        ap.error("--work-us: no negative work")
    print("| work us | run | messages | p50 ms | p99 ms | p99.9 ms | max ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i in range(args.runs):
        for work in works:
            ls = one_run(args.rate, args.seconds, args.hop, args.ack, work, args.work_kind)
            n = len(ls)
            if not n:
                print("| %g | %d | 0 | - | - | - | - |" % (work, i + 1))
                continue
            print("| %g | %d | %d | %.2f | %.2f | %.2f | %.2f |" % (
                work, i + 1, n, ls[n // 2], ls[int(n * 0.99)], ls[int(n * 0.999)], ls[-1]),
                flush=True)


if __name__ == "__main__":
    main()
