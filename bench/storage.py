"""Storage throughput and restart time, Cython codec beside the pure twin.

Run: ``python bench/storage.py`` (about 2 minutes; ``--restart-gb 4`` adds a
4 GB restart measurement, ``--quick`` shortens everything). Prints markdown
tables with the targets of issue 3 next to the figures.

Every measurement goes through the real storage stack (``LogStore``,
``DiskWriter`` and its disk thread, on uvloop when installed), with 1 KB
records, one implementation per worker process (the codec is chosen at
import: ``PYLOGSTREAMS_NO_EXTENSIONS``).

- **append, pipelined**: one producer publishes batches of 1, 100 or 1000
  messages back to back; the writer's flow control pauses it above the
  high-water mark, as it pauses a socket. Records/s counts records stored
  (written, and fsynced when the policy says so), the final flush included.
- **append, 50 producers acked**: 50 producers each publish a batch and
  wait for its ``on_stored`` acknowledgement before the next one: what
  group commit has to work with under ``fsync=always``.
- **read**: a consumer reads a 256 MB topic from offset 0 to the end through
  ``TopicLog.read`` in 256 KiB chunks, converting to v0 delivery frames
  (``records_to_deliveries``, every CRC checked): the server's delivery path.
- **restart**: ``LogStore.open()`` on a 1 GB (and with ``--restart-gb``,
  bigger) log after a clean stop (clean checkpoint) and after a simulated
  ``kill -9`` (the files as a crash leaves them, checkpoint lost: the worst
  case, the whole active segment is scanned; the log is made so that the
  active segment is 1 MB short of full). The page cache of the data is
  dropped first (``posix_fadvise(DONTNEED)``), so the figure is a cold start.

Throughput cells run for about half a second each, on a fresh topic in
``--dir`` (default: a temporary directory under /var/tmp, on disk, so that
fsync costs what it costs); their files are deleted right after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECORD = 1000            # payload bytes; 1024 with the record header
POLICIES = ("never", "interval", "always")
BATCHES = (1, 100, 1000)
PRODUCERS = 50
SEGMENT_BYTES = 64 * 1024 * 1024
TARGETS = {
    "append": ">= 1 M rec/s batched append into the page cache (Cython)",
    "always": ">= 100 k rec/s with fsync=always across 50 concurrent producers",
    "read": ">= 1 M rec/s sequential read (Cython)",
    "restart": "< 1 s after a clean stop, whatever the log size",
}


# -- worker side -----------------------------------------------------------

class _Transport:
    """Stands in for a producer's socket: the writer pauses and resumes it."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.paused = False
        self.resumed: asyncio.Future | None = None

    def pause_reading(self) -> None:
        self.paused = True
        self.resumed = self.loop.create_future()

    def resume_reading(self) -> None:
        self.paused = False
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)

    def is_closing(self) -> bool:
        return False


def _new_store(path, fsync: str):
    from broker.config import Config
    from broker.storage import LogStore
    cfg = Config(data_dir=str(path), fsync=fsync, segment_bytes=SEGMENT_BYTES,
                 retention_check_interval_ms=0)
    store = LogStore(str(path), config=cfg)
    store.open()
    return store


def _new_writer(loop, store):
    from broker.storage import DiskWriter
    cfg = store.config
    writer = DiskWriter(loop, store.offsets, fsync=cfg.fsync,
                        fsync_interval_ms=cfg.fsync_interval_ms,
                        high_water=cfg.append_high_water, low_water=cfg.append_low_water,
                        on_written=lambda topic: None, store=store)
    writer.start()
    return writer


async def _append_pipelined(writer, topic, batch: int, seconds: float, cap: int) -> tuple:
    loop = asyncio.get_running_loop()
    transport = _Transport(loop)
    msgs = [b"p" * RECORD] * batch
    nbytes = RECORD * batch
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while sent < cap:
        if transport.paused:
            await transport.resumed
            if time.perf_counter() >= deadline:
                break
        topic.next_offset += batch
        writer.append(topic, msgs, nbytes, transport)
        sent += batch
        if sent % 4096 < batch and time.perf_counter() >= deadline:
            break
        if sent % (64 * batch) == 0:
            await asyncio.sleep(0)  # let the writer's callbacks run, as a server would
    await writer.flush()
    return sent, time.perf_counter() - t0


async def _append_acked(writer, topic, batch: int, seconds: float, cap: int) -> tuple:
    loop = asyncio.get_running_loop()
    msgs = [b"a" * RECORD] * batch
    nbytes = RECORD * batch
    stored = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def producer() -> None:
        nonlocal stored
        while stored < cap and time.perf_counter() < deadline:
            fut = loop.create_future()
            topic.next_offset += batch
            writer.append(topic, msgs, nbytes, None,
                          lambda base, count, error, fut=fut: fut.set_result(error))
            error = await fut
            if error is not None:
                raise error
            stored += batch

    await asyncio.gather(*(producer() for _ in range(PRODUCERS)))
    await writer.flush()
    return stored, time.perf_counter() - t0


def _run_loop(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def worker_append(base: Path, seconds: float) -> list:
    out = []
    for policy in POLICIES:
        for batch in BATCHES:
            for mode, fn in (("pipelined", _append_pipelined), ("acked", _append_acked)):
                path = Path(tempfile.mkdtemp(prefix="append-", dir=base))

                async def cell():
                    store = _new_store(path, policy)
                    writer = _new_writer(asyncio.get_running_loop(), store)
                    topic = store.get_or_create("bench")
                    n, dt = await fn(writer, topic, batch, seconds, 600_000)
                    fsyncs = store.stats["fsyncs"]
                    await writer.close()
                    store.close()
                    return n, dt, fsyncs

                n, dt, fsyncs = _run_loop(cell())
                shutil.rmtree(path)
                out.append({"policy": policy, "batch": batch, "mode": mode, "records": n,
                            "seconds": dt, "fsyncs": fsyncs})
    return out


def _fill(store, topic_name: str, total_bytes: int) -> None:
    """Write ~total_bytes of 1 KB records straight through TopicLog (no loop)."""
    from broker.codec import records
    topic = store.get_or_create(topic_name)
    msgs = [b"r" * RECORD] * 1000
    now = int(time.time() * 1000)
    written = 0
    while written < total_bytes:
        buf = records.encode_records(msgs, topic.end_offset, now)
        topic.written(topic.append(buf, len(msgs), now, 24 + RECORD))
        written += len(buf)
    topic.next_offset = topic.end_offset


def worker_read(base: Path, mb: int) -> dict:
    from broker.codec import records
    path = Path(tempfile.mkdtemp(prefix="read-", dir=base))
    store = _new_store(path, "never")
    _fill(store, "bench", mb * 1024 * 1024)
    topic = store.get("bench")
    name = topic.name_bytes

    def convert(buf, from_offset, end_offset, max_bytes):
        return records.records_to_deliveries(buf, name, from_offset, end_offset, max_bytes)

    best = None
    for _ in range(3):
        offset = 0
        n = 0
        t0 = time.perf_counter()
        while True:
            got = topic.read(offset, 256 * 1024, convert)
            if got is None:
                break
            _out, count, offset = got
            n += count
        dt = time.perf_counter() - t0
        best = dt if best is None or dt < best else best
    store.close()
    shutil.rmtree(path)
    return {"records": n, "seconds": best}


def _drop_cache(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def worker_make_log(path: Path, gb: float) -> dict:
    store = _new_store(path, "never")
    # Whole segments, the last one 1 MB short of full: the worst case for a
    # crash restart, which scans the active segment.
    segments = max(1, -(-int(gb * 1024 ** 3) // SEGMENT_BYTES))
    _fill(store, "bench", segments * SEGMENT_BYTES - (1 << 20))
    topic = store.get("bench")
    info = {"segments": len(topic.segments), "active_bytes": topic.active.size,
            "records": topic.end_offset}
    store.close()  # clean: fsync + checkpoint
    return info


def worker_restart(path: Path, crash: bool) -> dict:
    from broker.storage import checkpoint
    from broker.storage.store import LogStore
    from broker.config import Config
    saved = None
    ck = path / checkpoint.CHECKPOINT_FILE
    if crash:
        saved = ck.read_bytes()
        ck.unlink()  # kill -9 before any checkpoint: the worst case
    _drop_cache(path)
    cfg = Config(data_dir=str(path), segment_bytes=SEGMENT_BYTES, retention_check_interval_ms=0)
    store = LogStore(str(path), config=cfg)
    t0 = time.perf_counter()
    store.open()
    dt = time.perf_counter() - t0
    scanned = store.stats["recovery_scanned_bytes"]
    end = store.get("bench").end_offset
    store.close(checkpoint=False)
    if saved is not None:
        ck.write_bytes(saved)  # leave the log as the clean stop left it
    return {"seconds": dt, "scanned": scanned, "end": end}


def worker_main(args) -> None:
    from broker import codec
    want = {"c": "cython", "py": "python"}[args.impl]
    if codec.IMPLEMENTATION != want:
        sys.exit("worker %s loaded codec %s" % (args.impl, codec.IMPLEMENTATION))
    base = Path(args.dir)
    if args.worker == "append":
        result = worker_append(base, args.seconds)
    elif args.worker == "read":
        result = worker_read(base, args.read_mb)
    elif args.worker == "make-log":
        result = worker_make_log(Path(args.log), args.gb)
    else:
        result = worker_restart(Path(args.log), args.worker == "restart-crash")
    print(json.dumps(result))


# -- driver side -----------------------------------------------------------

def raw_write_ceiling(base: Path, seconds: float) -> float:
    """MB/s of plain 1 MiB ``os.pwrite`` calls into a file in ``base``: the machine's limit."""
    buf = b"w" * (1 << 20)
    path = base / "ceiling.tmp"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            os.pwrite(fd, buf, pos)
            pos += len(buf)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return pos / dt / 1e6


def _impl_env(impl: str) -> dict:
    env = dict(os.environ)
    env.pop("PYLOGSTREAMS_NO_EXTENSIONS", None)
    if impl == "py":
        env["PYLOGSTREAMS_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _work(impl: str, *argv) -> object:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--impl", impl, *map(str, argv)]
    proc = subprocess.run(cmd, env=_impl_env(impl), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit("worker %s %s failed:\n%s" % (impl, argv, proc.stderr[-3000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _impls() -> list[str]:
    env = _impl_env("c")
    probe = subprocess.run([sys.executable, "-c", "import broker._speedups.records"],
                           env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        print("(the Cython codec does not import; pure only)\n", file=sys.stderr)
        return ["py"]
    return ["c", "py"]


def _rate(n, dt) -> str:
    r = n / dt
    return "%.2f M" % (r / 1e6) if r >= 1e6 else "%.0f k" % (r / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="where to write benchmark data (default: under /var/tmp)")
    ap.add_argument("--restart-gb", type=float, action="append", default=None,
                    help="log size for the restart measurement (repeatable; default 1)")
    ap.add_argument("--quick", action="store_true", help="shorter cells, 0.25 GB restart log")
    ap.add_argument("--seconds", type=float, default=0.5, help="time per throughput cell")
    ap.add_argument("--read-mb", type=int, default=256)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--gb", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)
    if args.quick:
        args.seconds = min(args.seconds, 0.2)
        args.read_mb = min(args.read_mb, 64)
    sizes = args.restart_gb or ([0.25] if args.quick else [1.0])
    own_dir = args.dir is None
    base = Path(args.dir or tempfile.mkdtemp(prefix="pylogstreams-bench-",
                                             dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    base.mkdir(parents=True, exist_ok=True)
    impls = _impls()
    t_start = time.perf_counter()
    try:
        ceiling = raw_write_ceiling(base, max(1.0, args.seconds * 2))
        appends = {impl: _work(impl, "--worker", "append", "--dir", base,
                               "--seconds", args.seconds) for impl in impls}
        reads = {impl: _work(impl, "--worker", "read", "--dir", base, "--read-mb", args.read_mb)
                 for impl in impls}
        restarts = []
        for gb in sizes:
            log_dir = base / ("log-%sgb" % gb)
            info = _work(impls[0], "--worker", "make-log", "--dir", base, "--log", log_dir,
                         "--gb", gb)
            for impl in impls:
                clean = _work(impl, "--worker", "restart-clean", "--dir", base, "--log", log_dir)
                crash = _work(impl, "--worker", "restart-crash", "--dir", base, "--log", log_dir)
                restarts.append((gb, impl, info, clean, crash))
            shutil.rmtree(log_dir)
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
    _print(impls, appends, reads, restarts, time.perf_counter() - t_start, args, ceiling, base)


def _print(impls, appends, reads, restarts, total, args, ceiling, base) -> None:
    import importlib.util
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    print("## pylogstreams storage benchmark\n")
    print("1 KB records (1000 B payload + 24 B header), %d MB segments, %s, %d CPUs, "
          "%.1f s per throughput cell. Rates are records stored per second.\n"
          % (SEGMENT_BYTES >> 20, loop, os.cpu_count() or 0, args.seconds))
    print("### Append\n")
    head = "| fsync | batch | " + " | ".join(
        "%s pipelined | %s 50 producers acked | %s fsyncs/s (acked)" % (i, i, i) for i in impls) + " |"
    print(head)
    print("|" + "---|" * (2 + 3 * len(impls)))
    by = {impl: {(r["policy"], r["batch"], r["mode"]): r for r in appends[impl]} for impl in impls}
    for policy in POLICIES:
        for batch in BATCHES:
            cells = []
            for impl in impls:
                p = by[impl][(policy, batch, "pipelined")]
                a = by[impl][(policy, batch, "acked")]
                cells += [_rate(p["records"], p["seconds"]) + " (%.0f MB/s)"
                          % (p["records"] * 1024 / p["seconds"] / 1e6),
                          _rate(a["records"], a["seconds"]),
                          "%.0f" % (a["fsyncs"] / a["seconds"])]
            print("| %s | %d | %s |" % (policy, batch, " | ".join(cells)))
    print("\nTargets: %s; %s.\n" % (TARGETS["append"], TARGETS["always"]))
    print("Machine ceiling: plain 1 MiB pwrite() calls into a file in %s run at %.0f MB/s, "
          "i.e. %.0f k records of 1 KB per second, before any encoding or CRC.\n"
          % (base.parent if base.name.startswith("pylogstreams-bench-") else base, ceiling,
             ceiling * 1e6 / 1024 / 1e3))
    print("### Read (sequential, v0 delivery frames, CRC checked)\n")
    print("| impl | records/s | MB/s |")
    print("|---|---|---|")
    for impl in impls:
        r = reads[impl]
        print("| %s | %s | %.0f |" % (impl, _rate(r["records"], r["seconds"]),
                                      r["records"] * 1024 / r["seconds"] / 1e6))
    print("\nTarget: %s.\n" % TARGETS["read"])
    print("### Restart (page cache dropped first)\n")
    print("| log | impl | segments | after clean stop | after kill -9 (no checkpoint) "
          "| bytes scanned after kill -9 |")
    print("|---|---|---|---|---|---|")
    for gb, impl, info, clean, crash in restarts:
        assert clean["end"] == crash["end"] == info["records"]
        print("| %g GB | %s | %d | %.1f ms | %.1f ms | %.1f MB (the active segment) |"
              % (gb, impl, info["segments"], clean["seconds"] * 1e3, crash["seconds"] * 1e3,
                 crash["scanned"] / 1e6))
    print("\nTarget: %s.\n" % TARGETS["restart"])
    print("(total benchmark time %.0f s)" % total)


if __name__ == "__main__":
    main()
