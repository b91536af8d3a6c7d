"""The broker's own work per batch at a low rate, counted rather than timed.

On a noisy VM the ``latency`` scenario's CPU seconds per million messages
move by a fifth between identical runs. This measures the same path, one
batch at a time, in a way that repeats: a producer and a consumer (the
client library, one process) and a broker started for the run; each
batch of ``--batch`` messages is published, acknowledged and delivered
before the next, with a 2 ms pause between batches, as at 10k msg/s in
1 ms ticks (a caught-up consumer, the loop writing each small batch
itself); ``--pause-ms 0`` runs them back to back, which shows what the
same work costs with warm caches. The broker runs twice, for
``--warmup`` batches and for ``--warmup + --batches``; the difference,
divided by ``--batches``, is the cost of one batch without the broker's
start and stop.

With ``--valgrind`` the broker runs under ``valgrind --tool=callgrind``
and the cost is instructions (all of its threads, user space only;
about 1% between runs). Without it, the broker's CPU time from
``/proc/<pid>/task/*/schedstat`` (every thread), as noisy as the
machine, and its split into user and system time from
``/proc/<pid>/stat`` (clock ticks: 10 ms each, so count a few thousand
batches for that column).

    python bench/batch_cost.py [--batches 500] [--warmup 50] [--batch 10]
                               [--size 1024] [--pause-ms 2] [--pure] [--valgrind]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from broker.bench.servers import OursServer, ServerError  # noqa: E402
from broker.client.aio import AsyncClient  # noqa: E402

_PAUSE_MS = 2.0  # ms between batches: the paced producer's 1 ms tick, and some


async def _drive(port: int, batches: int, batch: int, size: int, pause: float) -> None:
    producer = await AsyncClient("127.0.0.1", port, client_id="cost-p", reconnect=False).connect()
    consumer = await AsyncClient("127.0.0.1", port, client_id="cost-c", reconnect=False).connect()
    try:
        await producer.publish("cost", b"x" * size)  # the topic exists: PUBs take the fast path
        sub = await consumer.subscribe("cost", start="oldest", auto_commit=True)
        got, want = 0, 1
        values = [os.urandom(size) for _ in range(batch)]
        for i in range(batches + 1):
            if i:
                await producer.publish_batch("cost", values)
                want += batch
            while got < want:
                got += len(await sub.get_batch(10_000, 60))
            if pause:
                await asyncio.sleep(pause)
        await asyncio.sleep(0.2)  # the last auto commit goes out
    finally:
        await consumer.close()
        await producer.close()


def _cpu_seconds(pid: int) -> tuple[float, float, float]:
    """CPU time of ``pid``: ``(total, user, system)`` in seconds.

    The total from its live threads' ``schedstat`` (nanoseconds); the
    split from ``/proc/<pid>/stat`` (clock ticks: count enough batches).
    """
    total = 0
    for path in glob.glob("/proc/%d/task/*/schedstat" % pid):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that just ended
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return total / 1e9, int(fields[11]) / tick, int(fields[12]) / tick


def _one(batches: int, args, tmp: str):
    """Run a broker through ``batches`` batches: its instructions, or its CPU seconds
    ``(total, user, system)``."""
    out = os.path.join(tmp, "callgrind.%d" % batches)
    wrapper = ("valgrind", "--tool=callgrind", "--callgrind-out-file=" + out) if args.valgrind else ()
    try:
        server = OursServer(pure=args.pure, wrapper=wrapper, ready_timeout=300).start()
    except ServerError as exc:
        raise SystemExit(str(exc)) from None
    try:
        asyncio.run(_drive(server.port, batches, args.batch, args.size, args.pause_ms / 1000.0))
        cpu = (0.0, 0.0, 0.0) if args.valgrind else _cpu_seconds(server.proc.pid)
    finally:
        server.stop()
    if not args.valgrind:
        return cpu
    total = 0
    for path in glob.glob(out + "*"):  # one file per process (and thread, with --separate-threads)
        with open(path) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total += int(line.split()[1])
                    break
    if not total:
        raise SystemExit("callgrind wrote no totals")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=500, help="batches counted (default 500)")
    ap.add_argument("--warmup", type=int, default=50, help="batches of the baseline run (default 50)")
    ap.add_argument("--batch", type=int, default=10, help="messages per batch (default 10)")
    ap.add_argument("--size", type=int, default=1024, help="message size in bytes (default 1024)")
    ap.add_argument("--pause-ms", type=float, default=_PAUSE_MS,
                    help="pause between batches, ms (default 2: as at 10k msg/s in 1 ms ticks; "
                         "0: back to back, each batch still delivered before the next, so the "
                         "broker's caches stay warm)")
    ap.add_argument("--pure", action="store_true", help="the broker's pure-Python twin")
    ap.add_argument("--valgrind", action="store_true",
                    help="count instructions under callgrind (repeatable; about 20x slower)")
    args = ap.parse_args()
    if args.batches < 1 or args.warmup < 0 or args.batch < 1 or args.size < 8 or args.pause_ms < 0:
        ap.error("--batches >= 1, --warmup >= 0, --batch >= 1, --size >= 8, --pause-ms >= 0")
    if args.valgrind and shutil.which("valgrind") is None:
        raise SystemExit("--valgrind: valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="pls-cost-") as tmp:
        base = _one(args.warmup, args, tmp)
        full = _one(args.warmup + args.batches, args, tmp)
    codec = "pure" if args.pure else "cython"
    if args.valgrind:
        per_batch = (full - base) / args.batches
        print("| broker | batch | instructions per batch | per message |")
        print("| --- | ---: | ---: | ---: |")
        print("| %s | %d x %d B | %.0f | %.0f |" % (codec, args.batch, args.size, per_batch,
                                                    per_batch / args.batch))
    else:
        total, user, system = ((b - a) / args.batches * 1e6 for a, b in zip(base, full))
        print("| broker | batch | CPU us per batch | user | system | per message |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print("| %s | %d x %d B | %.1f | %.0f | %.0f | %.2f |" % (
            codec, args.batch, args.size, total, user, system, total / args.batch))


if __name__ == "__main__":
    main()
