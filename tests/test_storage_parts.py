"""A topic's parts of a disk job, written one after the other without joining.

The disk thread used to join every publish a job holds for a topic into one
buffer before writing it: one more copy of every published byte. Parts of
64 KiB or more now go to the file as they are (``pwritev``), runs of
smaller ones are still joined. What is on disk, in the index, in the tail
cache and what readers get must be exactly what the joined write gave.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from array import array

import pytest

import storage_helpers
from broker.storage import fileio
from broker.storage import writer as pure_writer
from storage_helpers import DiskFaults, make_store, publish, read_all, start_writer

records_impl = storage_helpers.records_impl  # fixture: both codecs, both writer builds

TS = 1_700_000_000_000
BIG = pure_writer._OWN_PART_BYTES


# -- fileio.pwritev_all -----------------------------------------------------------


def _bufs():
    return [b"abc", bytearray(b"defgh"), b"", memoryview(b"ijklmnop")[2:],
            array("I", [1, 2, 3]), b"", b"q" * 50]


def _joined(bufs) -> bytes:
    return b"".join(bytes(memoryview(b).cast("B")) for b in bufs)


def test_pwritev_all_writes_every_buffer_in_order(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"0123456789", 0)
        fileio.pwritev_all(fd, _bufs(), 4)  # over the middle of what is there
    finally:
        os.close(fd)
    assert path.read_bytes() == b"0123" + _joined(_bufs())


def test_pwritev_all_resumes_short_writes_and_keeps_to_iov_max(tmp_path, monkeypatch):
    """The kernel may write less than asked, and takes at most IOV_MAX
    buffers a call: every byte still lands once, in place."""
    real = os.pwritev
    calls = []

    def short(fd, bufs, pos):
        bufs = list(bufs)
        calls.append(len(bufs))
        assert len(bufs) <= 2
        assert len(calls) < 1000, "pwritev_all makes no progress"  # fail, don't hang
        out, room = [], 7  # at most 7 bytes a call, cut anywhere
        for b in bufs:
            b = memoryview(b)[:room]
            out.append(b)
            room -= b.nbytes
        return real(fd, out, pos)

    monkeypatch.setattr(os, "pwritev", short)
    monkeypatch.setattr(fileio, "IOV_MAX", 2)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fileio.pwritev_all(fd, _bufs(), 0)
        fileio.pwritev_all(fd, [], 3)           # nothing: no call needed
        fileio.pwritev_all(fd, [b"", b""], 3)   # nothing but empty buffers
    finally:
        os.close(fd)
    assert path.read_bytes() == _joined(_bufs())
    assert len(calls) >= len(_joined(_bufs())) // 7


def test_pwritev_all_without_pwritev_joins_and_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "_PWRITEV", None)  # an os module without pwritev
    monkeypatch.delattr(os, "pwritev")
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fileio.pwritev_all(fd, [b"ab", bytearray(b"cd"), b"", b"e"], 1)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0abcde"


def test_pwritev_all_passes_errors_on(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as err:
            fileio.pwritev_all(fd, [b"x"], 0)
    finally:
        os.close(fd)
    assert err.value.errno == errno.EBADF


# -- Segment and TopicLog: parts land exactly as the joined records would ----------


def _parts(rec, sizes, base=0):
    """Records in parts of ``sizes`` messages each (message sizes vary), from ``base``."""
    out, off = [], base
    for k, n in enumerate(sizes):
        msgs = [b"%d-%d-" % (k, j) + b"m" * ((j * 37 + k * 101) % 300) for j in range(n)]
        out.append((rec.encode_records(msgs, off, TS + off), n, msgs, TS + off))
        off += n
    return out


def _append(topic, parts, joined: bool):
    pairs = [(buf, n) for buf, n, _m, _ts in parts]
    count = sum(n for _b, n in pairs)
    arg = b"".join(b for b, _n in pairs) if joined else pairs
    result = topic.append(arg, count, parts[-1][3], 24 + len(parts[-1][2][-1]))
    topic.written(result)
    topic.next_offset = topic.end_offset
    return result


def _files(directory) -> dict:
    return {f: open(os.path.join(directory, f), "rb").read()
            for f in sorted(os.listdir(directory)) if f.endswith((".log", ".index"))}


def _state(topic) -> list:
    return [(s.base_offset, s.size, s.index_size, s.end_offset, s.next_index_pos, s.last_pos,
             s.last_time) for s in topic.segments]


@pytest.mark.parametrize("segment_bytes, sizes", [
    (1 << 20, [3, 40, 1, 17, 60]),  # all in the active segment: one pwritev
    (4096, [3, 40, 1, 17, 60]),     # rolls as it goes: joined, split where it falls
    (4096, [1]),                    # one part: written as it is
])
def test_parts_are_stored_as_the_joined_records_would_be(records_impl, tmp_path, segment_bytes,
                                                         sizes):
    rec = records_impl
    got = {}
    for joined in (True, False):
        store = make_store(tmp_path / str(joined), segment_bytes=segment_bytes,
                           index_interval_bytes=512)
        topic = store.get_or_create("t")
        _append(topic, _parts(rec, [2]), joined)  # something there first
        result = _append(topic, _parts(rec, sizes, base=2), joined)
        assert result.count == sum(sizes) and result.end_offset == 2 + sum(sizes)
        got[joined] = (_files(topic.directory), _state(topic), read_all(topic))
        store.close()
        store = make_store(tmp_path / str(joined), segment_bytes=segment_bytes)
        assert read_all(store.get("t")) == got[joined][2]  # from the files, every CRC checked
        store.close()
    assert got[False] == got[True]
    msgs = [m for _b, _n, ms, _t in _parts(rec, [2]) + _parts(rec, sizes, base=2) for m in ms]
    assert [p for _o, _t, p in got[False][2]] == msgs
    if segment_bytes == 4096 and len(sizes) > 1:
        assert len(got[False][1]) > 2  # the case did roll


# -- the disk thread ---------------------------------------------------------------


def _writer_module(records_impl):
    cls = storage_helpers.load_writer("py" if records_impl is storage_helpers.pure_records else "c")
    import sys
    return sys.modules[cls.__module__]


def test_records_keeps_big_parts_apart_and_joins_the_small_ones_between(records_impl):
    rec = records_impl
    mod = _writer_module(records_impl)
    small = [b"s" * 100] * 3                       # 3 records, well under BIG
    big = [b"b" * 1000] * (BIG // 1000 + 1)        # one part of BIG or more
    layout = [small, small, big, small, big, big, small]
    parts, off = [], 10
    for k, msgs in enumerate(layout):
        buf = bytearray(rec.encode_records(msgs, off, TS + k))  # as wire1.publish_records makes
        parts.append((buf, len(msgs), TS + k, 24 + len(msgs[-1])))
        off += len(msgs)
    out, nbytes, last_len, ts = mod._records(parts, 10)
    sizes = [len(b) for b, _n in out]
    counts = [n for _b, n in out]
    assert counts == [6, len(big), 3, len(big), len(big), 3]
    assert out[1][0] is parts[2][0] and out[3][0] is parts[4][0]  # big ones: not copied
    assert sizes[0] == 2 * len(parts[0][0]) and all(s >= BIG for s in sizes[1:5:2])
    assert nbytes == sum(len(p[0]) for p in parts) == sum(sizes)
    assert (last_len, ts) == (124, TS + 6)
    joined = b"".join(b for b, _n in out)
    decoded, _used = rec.decode_records(joined, 10, off)
    assert [o for o, _t, _m in decoded] == list(range(10, off))
    assert [m for _o, _t, m in decoded] == [m for msgs in layout for m in msgs]


def test_a_job_of_big_parts_is_written_with_one_pwritev(records_impl, tmp_path, monkeypatch):
    """Publishes queued while the disk thread is busy become one job: its big
    parts go to the file in one ``pwritev``, each is its own tail-cache
    batch, and readers get every message, from memory and from the files."""
    held, release = threading.Event(), threading.Event()
    real_pwrite, real_pwritev = os.pwrite, os.pwritev
    vectored = []

    def pwrite(fd, data, pos):
        if os.readlink("/proc/self/fd/%d" % fd).endswith(".log") and bytes(data).find(b"HOLD") >= 0:
            held.set()
            release.wait(10)
        return real_pwrite(fd, data, pos)

    def pwritev(fd, bufs, pos):
        if os.readlink("/proc/self/fd/%d" % fd).endswith(".log"):
            vectored.append([memoryview(b).nbytes for b in bufs])
        return real_pwritev(fd, bufs, pos)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "pwritev", pwritev)
    batches = [[b"%d-%03d-" % (k, j) + b"p" * 900 for j in range(80 + k)] for k in range(3)]
    batches.insert(1, [b"small-%d" % j for j in range(5)])

    async def main():
        store = make_store(tmp_path, segment_bytes=8 << 20, tail_cache_bytes=8 << 20)
        writer = await start_writer(store, inline_write_bytes=0)
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        futs = []

        def stored():
            fut = loop.create_future()
            futs.append(fut)
            return lambda base, count, exc: fut.set_result((base, count, exc))

        publish(writer, topic, [b"HOLD"], stored())
        assert await loop.run_in_executor(None, held.wait, 10)  # the disk thread is busy
        for msgs in batches:
            publish(writer, topic, msgs, stored())
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert [r[2] for r in results] == [None] * 5
        assert [(r[0], r[1]) for r in results[1:]] == [
            (1, 80), (81, 5), (86, 81), (167, 82)]
        # One pwritev: the first big part, the small one joined with nothing, two big.
        assert len(vectored) == 1 and len(vectored[0]) == 4
        assert vectored[0][1] < BIG <= min(vectored[0][0], vectored[0][2], vectored[0][3])
        assert [(e[0], e[1]) for e in topic.tail] == [(0, 1), (1, 81), (81, 86), (86, 167),
                                                       (167, 249)]
        expect = [b"HOLD"] + [m for msgs in batches for m in msgs]
        assert [p for _o, _t, p in read_all(topic)] == expect   # caught up: the tail cache
        assert [p for _o, _t, p in read_all(topic, 100)] == expect[100:]
        assert writer.stats["bytes"] == topic.active.size
        await writer.close()
        store.close()
        return expect

    expect = asyncio.run(main())
    store = make_store(tmp_path, segment_bytes=8 << 20)  # from the files: index and CRCs
    topic = store.get("t")
    for start in (0, 1, 90, 170, 248):
        assert [p for _o, _t, p in read_all(topic, start)] == expect[start:]
    store.close()


def test_a_failed_pwritev_refuses_the_whole_job(records_impl, tmp_path, monkeypatch):
    """EIO from the vectored write (after half of it reached the file): every
    publish in that job is refused, nothing of it is served, before or after
    a restart, and the next publish takes its offsets."""
    faults = DiskFaults(monkeypatch)
    held, release = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def pwrite(fd, data, pos):
        n = real_pwrite(fd, data, pos)  # written before the fault below is armed
        if os.readlink("/proc/self/fd/%d" % fd).endswith(".log") and bytes(data).find(b"HOLD") >= 0:
            held.set()
            release.wait(10)
        return n

    async def main():
        store = make_store(tmp_path, segment_bytes=8 << 20)
        writer = await start_writer(store, inline_write_bytes=0)
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()

        def stored():
            fut = loop.create_future()
            return fut, lambda base, count, exc: fut.set_result((base, count, exc))

        first, on_first = stored()
        monkeypatch.setattr(os, "pwrite", pwrite)  # over DiskFaults' (no fault armed yet)
        publish(writer, topic, [b"HOLD"], on_first)
        assert await loop.run_in_executor(None, held.wait, 10)
        faults.pwrite = 1  # the next segment write: the job's pwritev
        lost = []
        for k in range(2):
            fut, cb = stored()
            lost.append(fut)
            publish(writer, topic, [b"lost-%d-" % k + b"x" * 1000] * 70, cb)
        release.set()
        assert await asyncio.wait_for(first, 10) == (0, 1, None)
        for fut in lost:
            base, count, exc = await asyncio.wait_for(fut, 10)
            assert (base, count, exc.errno) == (None, 70, errno.EIO)
        assert faults.pwrite == 0  # the fault was taken, by the pwritev
        after, on_after = stored()
        publish(writer, topic, [b"after"], on_after)
        assert await asyncio.wait_for(after, 10) == (1, 1, None)
        assert [p for _o, _t, p in read_all(topic)] == [b"HOLD", b"after"]
        await writer.close()
        store.close()

    asyncio.run(main())
    store = make_store(tmp_path, segment_bytes=8 << 20)
    assert [p for _o, _t, p in read_all(store.get("t"))] == [b"HOLD", b"after"]
    store.close()
