"""Retention by age and by size, per topic, with an injectable clock (no sleeps)."""

from __future__ import annotations

import asyncio
import os

from broker.storage import fileio
import storage_helpers
from storage_helpers import (
    FakeClock, append, decoder, make_store, publish, read_all, segment_files, start_writer)

records_impl = storage_helpers.records_impl  # fixture: every test runs with both codecs

HOUR = 3600.0
DAY = 24 * HOUR


def _fill(writer, topic, n, size=200, tag=b"m"):
    for i in range(n):
        publish(writer, topic, [tag + b"%05d" % i + b"." * size])


def test_retention_by_age(records_impl, tmp_path, monkeypatch):
    advised = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        advised.append((os.readlink("/proc/self/fd/%d" % fd), advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    clock = FakeClock()

    async def main():
        store = make_store(tmp_path, clock=clock, segment_bytes=2048)  # default: 7 days
        writer = await start_writer(store)
        topic = store.get_or_create("chat")
        _fill(writer, topic, 40, tag=b"old")
        await writer.flush()
        old_segments = list(topic.segments[:-1])
        clock.advance(6 * DAY)
        _fill(writer, topic, 40, tag=b"new")
        await writer.flush()
        assert writer.enforce_retention() == 0  # nothing is 7 days old yet
        clock.advance(1 * DAY + 1)
        dropped = writer.enforce_retention()
        await writer.flush()
        # Every segment whose newest record is older than 7 days: the "old"
        # ones, except one that also holds "new" records.
        assert dropped >= len(old_segments) - 1 and dropped > 0
        for seg in topic.segments:
            assert os.path.exists(seg.log_path)
        first = read_all(topic)[0]
        assert topic.start_offset == first[0] > 0
        for seg in old_segments[:dropped]:
            assert not os.path.exists(seg.log_path) and not os.path.exists(seg.index_path)
            assert (seg.log_path, fileio.FADV_DONTNEED) in advised
        # A consumer still at offset 0 reads from the oldest kept offset, counted.
        resets = store.stats["offset_resets"]
        recs, _count, _nxt = topic.read(0, 1 << 20, decoder())
        assert recs[0][0] == topic.start_offset
        assert store.stats["offset_resets"] == resets + 1
        assert store.stats["segments_deleted"] == dropped
        # Much later: everything but the active segment goes; it never does.
        clock.advance(30 * DAY)
        writer.enforce_retention()
        await writer.flush()
        assert len(topic.segments) == 1 and os.path.exists(topic.active.log_path)
        assert read_all(topic)[-1][2].startswith(b"new00039")
        await writer.close()
        store.close()

    asyncio.run(main())
    # After a restart the log starts where retention left it.
    store = make_store(tmp_path, clock=clock, segment_bytes=2048)
    topic = store.get("chat")
    assert len(segment_files(topic.directory)) == 1
    assert read_all(topic)[-1][2].startswith(b"new00039")
    store.close()


def test_retention_by_size_and_per_topic_overrides(records_impl, tmp_path):
    clock = FakeClock()

    async def main():
        store = make_store(tmp_path, clock=clock, segment_bytes=2048, retention_bytes=8192)
        writer = await start_writer(store)
        capped = store.get_or_create("capped")
        await writer.set_topic_config("keep", retention_bytes=-1)
        keep = store.get("keep")
        await writer.set_topic_config("tiny", retention_bytes=0)
        tiny = store.get("tiny")
        for topic in (capped, keep, tiny):
            _fill(writer, topic, 100)  # ~23 KB each
        await writer.flush()
        sizes_before = {t.name: t.size_bytes for t in (capped, keep, tiny)}
        writer.enforce_retention()
        await writer.flush()
        assert capped.size_bytes <= 8192 < sizes_before["capped"]
        assert capped.size_bytes > 8192 - 2048  # only as much as needed went
        assert keep.size_bytes == sizes_before["keep"]
        assert len(tiny.segments) == 1  # the active segment stays, whatever the limit
        for topic in (capped, keep, tiny):
            on_disk = sum(os.path.getsize(os.path.join(topic.directory, f))
                          for f in segment_files(topic.directory))
            assert on_disk == topic.size_bytes
            got = read_all(topic)
            assert [o for o, _t, _p in got] == list(range(topic.start_offset, 100))
        await writer.close()
        store.close()

    asyncio.run(main())


def test_retention_forever_keeps_everything(records_impl, tmp_path):
    clock = FakeClock()
    store = make_store(tmp_path, clock=clock, segment_bytes=1024, retention_ms=-1)
    topic = store.get_or_create("t")
    for i in range(50):
        append(topic, [b"r%d" % i * 20], clock.ms)
    clock.advance(3650 * DAY)
    assert topic.expired_segments(clock.ms) == 0
    store.close()


def test_retention_timer_checks_topics_in_slices(records_impl, tmp_path):
    """The timer never walks 600 topics in one loop callback."""
    clock = FakeClock()

    async def main():
        store = make_store(tmp_path, clock=clock, segment_bytes=1024, retention_ms=1000,
                           retention_check_interval_ms=60_000)
        for i in range(600):
            topic = store.get_or_create("t%03d" % i)
            if i % 100 == 0:
                append(topic, [b"x" * 600, b"y" * 600], clock.ms)
        clock.advance(10)
        writer = await start_writer(store)  # schedules the first pass at once
        assert store.stats["retention_runs"] == 0
        await asyncio.sleep(0)  # one loop iteration: the first slice
        assert store.stats["retention_runs"] == 1
        first = writer._retention_handle
        assert isinstance(first, asyncio.Handle) and not isinstance(first, asyncio.TimerHandle)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        handle = writer._retention_handle  # all 600 done: the next run is a minute away
        assert isinstance(handle, asyncio.TimerHandle)
        assert 59 < handle.when() - asyncio.get_running_loop().time() <= 60
        await writer.flush()
        assert store.stats["segments_deleted"] == 6
        await writer.close()
        assert writer._retention_handle is None
        store.close()

    asyncio.run(main())


def test_the_directory_fsync_after_a_deletion_is_the_syncers(records_impl, tmp_path,
                                                              monkeypatch):
    """Retention's files are deleted by the disk thread; the fsync of their
    directory (on ext4 a journal commit: 100 ms and more under load) runs on
    the syncer thread, so the writes behind it do not wait for it."""
    import threading
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append((threading.current_thread().name, os.readlink("/proc/self/fd/%d" % fd)))
        return real(fd)

    clock = FakeClock()

    async def main():
        store = make_store(tmp_path, clock=clock, segment_bytes=2048)
        writer = await start_writer(store, fsync_interval_ms=60_000)
        topic = store.get_or_create("chat")
        _fill(writer, topic, 40)
        await writer.flush()
        await writer.checkpoint()  # every seal done, nothing left to fsync
        monkeypatch.setattr(os, "fsync", fsync)
        clock.advance(8 * DAY)
        dropped = writer.enforce_retention()
        assert dropped > 0
        await writer.flush()
        directory = os.path.realpath(topic.directory)
        for _ in range(1000):  # until the syncer's round is done
            if (("pylogstreams-sync", directory) in calls):
                break
            await asyncio.sleep(0.005)
        assert [name for name, path in calls if path == directory] == ["pylogstreams-sync"]
        assert store.stats["segments_deleted"] == dropped
        await writer.close()
        store.close()

    asyncio.run(main())
