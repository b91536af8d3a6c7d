"""Shared pieces of the storage tests (tests/test_storage_*.py).

- :func:`records_impl`: a fixture running a test once per implementation
  (ids ``py`` and ``c``). It points every storage module's ``records`` at
  the codec under test and makes ``DiskWriter`` (here and in the broker)
  the writer built the same way (writer.py as it is, or compiled), so one
  process tests both. ``c`` fails when ``broker._speedups.records`` or
  ``broker._speedups.writer`` cannot be imported, unless
  ``PYLOGSTREAMS_NO_EXTENSIONS`` is set (a pure build), where it skips and
  says why.
- :class:`FakeClock`: an injectable wall clock (seconds), so retention and
  append times are tested without sleeping.
- Helpers that play the disk thread's part synchronously (:func:`append`)
  and read a topic back (:func:`read_all`).
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import os
import pkgutil
import sys

import pytest

import broker.server.broker
import broker.storage
from broker import codec
from broker._pure import records as pure_records
from broker.storage import writer as pure_writer
from broker.storage import DiskWriter, LogStore

IMPL_IDS = ["py", "c"]
RECORD_OVERHEAD = 24


def load_records(impl_id: str):
    """The record codec module for ``impl_id`` (``py`` or ``c``)."""
    if impl_id == "py":
        return pure_records
    return _compiled("records", "codec")


def _compiled(name: str, what: str):
    """``broker._speedups.<name>``: skipped (with the reason) in a pure build,
    a failure in any other that cannot import it."""
    try:
        return importlib.import_module("broker._speedups." + name)
    except ImportError as exc:
        if codec.NO_EXTENSIONS:
            pytest.skip("PYLOGSTREAMS_NO_EXTENSIONS is set: a pure build has no compiled %s "
                        "(%s)" % (what, exc))
        pytest.fail("the compiled %s broker._speedups.%s does not import: %s" % (what, name, exc))


def storage_modules():
    """Every broker.storage module that uses the record codec."""
    out = []
    for info in pkgutil.iter_modules(broker.storage.__path__):
        mod = importlib.import_module("broker.storage." + info.name)
        if hasattr(mod, "records") and hasattr(mod.records, "encode_records"):
            out.append(mod)
    return out


def load_writer(impl_id: str):
    """The ``DiskWriter`` for ``impl_id``: writer.py as it is (``py``), or its
    compiled build, ``broker._speedups.writer`` (``c``)."""
    if impl_id == "py":
        return pure_writer.DiskWriter
    return _compiled("writer", "writer").DiskWriter


@pytest.fixture(params=IMPL_IDS)
def records_impl(request, monkeypatch):
    """Run the test with storage using one implementation (the record codec, and the
    writer built the same way: ``DiskWriter`` for :func:`start_writer` and the
    broker); returns the codec module."""
    mod = load_records(request.param)
    writer_cls = load_writer(request.param)
    modules = storage_modules()
    if "broker._speedups.writer" in sys.modules:
        modules.append(sys.modules["broker._speedups.writer"])
    for m in modules:
        monkeypatch.setattr(m, "records", mod)
    for m in (sys.modules[__name__], broker.storage, broker.server.broker):
        monkeypatch.setattr(m, "DiskWriter", writer_cls)
    return mod


class FakeClock:
    """A wall clock (seconds since the epoch) that moves only when told."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def ms(self) -> int:
        return int(self.now * 1000)


def records_module():
    """The codec the storage modules use right now (possibly patched)."""
    return broker.storage.log.records


def append(topic, messages, ts_ms: int = 1_700_000_000_000) -> int:
    """Append ``messages`` as the disk thread and publish them as the loop; the base offset."""
    rec = records_module()
    base = topic.end_offset
    ts = max(ts_ms, topic.last_time)
    buf = rec.encode_records(messages, base, ts)
    result = topic.append(buf, len(messages), ts, RECORD_OVERHEAD + len(messages[-1]))
    topic.written(result)
    topic.next_offset = topic.end_offset
    return base


def decoder(rec=None):
    """A ``TopicLog.read`` converter yielding ``[(offset, time_ms, payload)]``."""
    rec = rec or records_module()

    def convert(buf, from_offset, end_offset, max_bytes, verify=True):
        recs, used = rec.decode_records(buf, from_offset, end_offset)
        nxt = recs[-1][0] + 1 if recs else from_offset
        return recs, len(recs), nxt, used

    return convert


def read_all(topic, offset: int = 0, max_bytes: int = 64 * 1024) -> list:
    """Every record from ``offset`` to the end, as ``(offset, time_ms, payload)``."""
    convert = decoder()
    out = []
    while True:
        got = topic.read(offset, max_bytes, convert)
        if got is None:
            return out
        recs, count, offset = got
        out.extend(recs)


def make_store(path, clock=None, **config) -> LogStore:
    """An opened LogStore on ``path`` with Config overrides (small segments by default)."""
    from broker.config import Config
    config.setdefault("segment_bytes", 4096)
    config.setdefault("index_interval_bytes", 256)
    config.setdefault("retention_check_interval_ms", 0)  # tests run retention themselves
    store = LogStore(str(path), config=Config(**config), clock=clock or FakeClock())
    store.open()
    return store


async def start_writer(store, *, fsync: str | None = None, fsync_interval_ms: int | None = None,
                       on_written=None, high_water: int = 64 << 20,
                       low_water: int = 16 << 20, inline_write_bytes: int | None = None) -> DiskWriter:
    """A running DiskWriter for ``store`` on the current loop.

    ``inline_write_bytes=0`` sends every job to the disk thread (tests that
    hold a write there while the loop goes on).
    """
    cfg = store.config
    writer = DiskWriter(
        asyncio.get_running_loop(), store.offsets, fsync=fsync or cfg.fsync,
        fsync_interval_ms=fsync_interval_ms or cfg.fsync_interval_ms, high_water=high_water,
        low_water=low_water, on_written=on_written or (lambda topic: None), store=store,
        inline_write_bytes=inline_write_bytes)
    writer.start()
    return writer


def publish(writer, topic, messages, on_stored=None) -> None:
    """What Broker.publish does: reserve offsets and queue the batch."""
    topic.next_offset += len(messages)
    writer.append(topic, messages, sum(map(len, messages)), on_stored=on_stored)


def publish_records(writer, topic, messages, on_stored=None) -> None:
    """What a v1 ``PUB`` does: finished records from ``wire1.publish_records``, queued."""
    wire1 = importlib.import_module(
        "broker._pure.wire1" if records_module() is pure_records else "broker._speedups.wire1")
    payload = wire1.encode_publish(0, topic.name, messages)[11:]  # the frame's payload
    base, ts = writer.next_stamp(topic)
    _name, recs, count, bad, last_len = wire1.publish_records(payload, base, ts)
    assert bad == -1
    topic.next_offset += count
    writer.append(topic, recs, len(payload), None, on_stored, count, ts, last_len)


class DiskFaults:
    """Makes the next calls to fail of ``os.pwrite`` / ``os.fsync`` on segment
    logs, and of ``os.ftruncate``, raise EIO: set ``pwrite``, ``fsync`` or
    ``ftruncate`` to how many (``ALWAYS``: until set back to 0). A failing
    ``pwrite`` writes half of its data first. ``pwrite`` counts
    ``os.pwritev`` calls too (a job's parts written without joining), which
    fail the same way."""

    ALWAYS = 1 << 62

    def __init__(self, monkeypatch) -> None:
        self.pwrite = self.fsync = self.ftruncate = 0
        real_pwrite, real_fsync, real_ftruncate = os.pwrite, os.fsync, os.ftruncate
        real_pwritev = os.pwritev

        def failing(name: str, fd=None) -> bool:
            if not getattr(self, name) or (
                    fd is not None and not os.readlink("/proc/self/fd/%d" % fd).endswith(".log")):
                return False
            setattr(self, name, getattr(self, name) - 1)
            return True

        def pwrite(fd, data, pos):
            if failing("pwrite", fd):
                real_pwrite(fd, bytes(data)[:len(data) // 2], pos)  # a partial write first
                raise OSError(errno.EIO, "Input/output error")
            return real_pwrite(fd, data, pos)

        def pwritev(fd, bufs, pos):
            if failing("pwrite", fd):
                data = b"".join(bytes(b) for b in bufs)
                real_pwrite(fd, data[:len(data) // 2], pos)  # a partial write first
                raise OSError(errno.EIO, "Input/output error")
            return real_pwritev(fd, bufs, pos)

        def fsync(fd):
            if failing("fsync", fd):
                raise OSError(errno.EIO, "Input/output error")
            return real_fsync(fd)

        def ftruncate(fd, size):
            if failing("ftruncate"):
                raise OSError(errno.EIO, "Input/output error")
            return real_ftruncate(fd, size)

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "ftruncate", ftruncate)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def segment_files(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".log"))
