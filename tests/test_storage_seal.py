"""Sealing in the background: what a roll leaves to the syncer, and what it may not.

Under ``fsync=interval`` and ``never`` a roll does not wait for the disk:
the sealed segment's fsyncs (its log, its index, and the directory for the
next one's names) run on the syncer thread. Three things keep that safe,
each tested here with both codecs and both writer builds:

- at most one seal waits per topic: a roll finishes the one before it first;
- the checkpoint never names a segment past one whose seal is not done, so
  recovery trusts what it names the way it always has;
- recovery scans the last two segments when the checkpoint does not name
  the last one, and a segment that follows a torn one is removed (the
  crash-fuzz cases for that are in test_storage_recovery.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import storage_helpers
from storage_helpers import append, make_store, publish, read_all, segment_files, start_writer

records_impl = storage_helpers.records_impl  # fixture: every test runs with both codecs
# ... and with both builds of the writer (writer.py as it is, and compiled): all of them.
pytestmark = pytest.mark.usefixtures("records_impl")

MSG = b"m" * 3000  # 3,024 bytes as a record: one per 4 KiB segment (make_store's default)


class FsyncLog:
    """Records every ``os.fsync``: (thread name, path of the file or directory)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, str]] = []
        real = os.fsync

        def fsync(fd):
            self.calls.append((threading.current_thread().name,
                               os.readlink("/proc/self/fd/%d" % fd)))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def of(self, path) -> list[str]:
        """The threads that fsynced ``path``, in order."""
        path = os.path.realpath(path)
        return [name for name, p in self.calls if p == path]


def _stored(loop):
    fut = loop.create_future()
    return fut, lambda base, count, exc: fut.set_result((base, count, exc))


def _one_synced_record(tmp_path):
    """A store, topic "t" holding one record an fsync covered, and its checkpoint entry."""
    store = make_store(tmp_path)
    topic = store.get_or_create("t")
    append(topic, [MSG])
    topic.active.fsync()
    topic.note_synced()
    entry = topic.checkpoint_entry()
    assert (entry.base_offset, entry.end_offset) == (0, 1)
    return store, topic, entry


async def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("policy", ["interval", "never"])
def test_a_roll_leaves_its_seal_to_the_syncer(tmp_path, monkeypatch, policy):
    """The batch that rolls is stored without an fsync on the disk thread; the
    syncer then fsyncs the sealed segment's log and index and the directory,
    and only then does what is durable move on to the new segment."""
    fsyncs = FsyncLog(monkeypatch)

    async def main():
        store = make_store(tmp_path, fsync=policy, fsync_interval_ms=60_000)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        done, on_stored = _stored(loop)
        publish(writer, topic, [MSG], on_stored)  # creates the files
        assert await asyncio.wait_for(done, 10) == (0, 1, None)
        first = topic.active
        await _until(lambda: not writer._disk_lock.locked(), "the disk thread")
        fsyncs.calls.clear()
        done, on_stored = _stored(loop)
        publish(writer, topic, [MSG], on_stored)  # does not fit: rolls
        assert await asyncio.wait_for(done, 10) == (1, 1, None)
        assert topic.active is not first and first.sealed
        await _until(lambda: topic.unsealed is None, "the seal")
        assert fsyncs.of(first.log_path) == ["pylogstreams-sync"]
        assert fsyncs.of(first.index_path) == ["pylogstreams-sync"]
        assert fsyncs.of(topic.directory) == ["pylogstreams-sync"]
        assert [name for name, _ in fsyncs.calls if name != "pylogstreams-sync"] == []
        if policy == "interval":
            # Durable now: everything before the new segment (of which no
            # fsync has covered anything yet).
            assert (topic.durable.base_offset, topic.durable.size) == (1, 0)
        assert topic.checkpoint_entry().base_offset == 1
        await writer.close()
        store.close()

    asyncio.run(main())


def test_under_fsync_always_the_roll_seals_before_the_ack(tmp_path, monkeypatch):
    """``always`` acknowledges a batch after the fsync covering it: a roll's
    seal is part of that, on the disk thread, before the report."""
    fsyncs = FsyncLog(monkeypatch)

    async def main():
        store = make_store(tmp_path, fsync="always")
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        done, on_stored = _stored(loop)
        publish(writer, topic, [MSG], on_stored)
        assert await asyncio.wait_for(done, 10) == (0, 1, None)
        first = topic.active
        seen = []
        fut = loop.create_future()

        def on_stored(base, count, exc):
            # What was fsynced when the batch was reported.
            seen.extend([fsyncs.of(first.log_path), fsyncs.of(first.index_path),
                         fsyncs.of(topic.directory)])
            fut.set_result((base, count, exc))

        fsyncs.calls.clear()
        publish(writer, topic, [MSG], on_stored)
        assert await asyncio.wait_for(fut, 10) == (1, 1, None)
        assert seen == [["pylogstreams-disk"]] * 3
        assert topic.unsealed is None
        await writer.close()
        store.close()

    asyncio.run(main())


def test_a_roll_finishes_the_seal_before_it(tmp_path, monkeypatch):
    """At most one seal waits per topic: the second roll fsyncs the first
    sealed segment itself when the syncer has not (here there is none)."""
    fsyncs = FsyncLog(monkeypatch)
    store = make_store(tmp_path)
    topic = store.get_or_create("t")
    append(topic, [MSG])  # creates the files (fsyncing the directory)
    s0 = topic.active
    fsyncs.calls.clear()
    append(topic, [MSG])  # rolls: s0 waits for its seal
    s1 = topic.active
    assert topic.unsealed is s0
    assert fsyncs.of(s0.log_path) == []
    append(topic, [MSG])  # rolls again: s0's seal is done here first
    assert fsyncs.of(s0.log_path) == ["MainThread"]
    assert fsyncs.of(s0.index_path) == ["MainThread"]
    assert fsyncs.of(topic.directory) == ["MainThread"]
    assert topic.unsealed is s1
    assert fsyncs.of(s1.log_path) == []
    assert topic.durable.base_offset == s1.base_offset  # not past s1
    assert [p for _o, _t, p in read_all(topic)] == [MSG] * 3
    store.close()


def test_the_checkpoint_never_names_a_segment_past_a_waiting_seal(tmp_path):
    """An fsync of the new segment while the seal before it waits is held
    back, and counts once the seal is done."""
    store, topic, first = _one_synced_record(tmp_path)
    append(topic, [MSG])  # rolls: segment 0 waits for its seal
    s0 = topic.unsealed
    assert s0 is not None and s0.base_offset == 0
    topic.active.fsync()
    topic.note_synced()  # what the syncer's fsync of the active one reports
    assert topic.checkpoint_entry() == first  # recovery will scan both segments
    store.write_checkpoint()
    topic.finish_seal()
    entry = topic.checkpoint_entry()
    assert (entry.base_offset, entry.size, entry.end_offset) == (1, topic.active.size, 2)
    store.close(checkpoint=False)


def test_fsync_never_checkpoints_a_waiting_seal_as_its_whole_segment(tmp_path):
    """``never`` claims what is written (a crash of the process keeps the
    page cache), but not past a segment whose seal waits."""
    store = make_store(tmp_path, fsync="never")
    topic = store.get_or_create("t")
    append(topic, [MSG])
    append(topic, [MSG])
    s0 = topic.unsealed
    entry = topic.checkpoint_entry()
    assert (entry.base_offset, entry.size, entry.end_offset) == (0, s0.size, 1)
    topic.finish_seal()
    entry = topic.checkpoint_entry()
    assert (entry.base_offset, entry.size, entry.end_offset) == (1, topic.active.size, 2)
    store.close(checkpoint=False)


def test_a_checkpoint_before_the_last_segment_scans_the_last_two(tmp_path):
    """A crash while a seal waits: the checkpoint names the sealed segment,
    and recovery scans it (after the checkpointed prefix) and the last one."""
    store = make_store(tmp_path)
    topic = store.get_or_create("t")
    for _ in range(4):
        append(topic, [MSG])
    topic.finish_seal()
    topic.active.fsync()  # the syncer's interval fsync of the fourth segment
    topic.note_synced()
    append(topic, [MSG])  # rolls: the fourth segment waits for its seal
    assert topic.unsealed is not None
    store.write_checkpoint()
    entry = topic.checkpoint_entry()
    tdir = tmp_path / "topics" / "t"
    names = segment_files(tdir)
    assert entry.base_offset == int(names[-2][:20]) and entry.size == os.path.getsize(
        tdir / names[-2])
    store.close(checkpoint=False)  # as a crash leaves it
    store = make_store(tmp_path)
    # The named one's checkpointed prefix is trusted; the last one is read.
    assert store.stats["recovery_scanned_bytes"] == os.path.getsize(tdir / names[-1])
    assert store.stats.get("recovery_dropped_segments", 0) == 0
    assert [p for _o, _t, p in read_all(store.get("t"))] == [MSG] * 5
    store.close()


def test_a_segment_after_a_torn_one_is_removed(tmp_path):
    """Power lost while a seal waited: the sealed segment lost its tail but
    the next one's name and records reached the disk. The log ends at the
    last valid record: the torn segment is cut there, the one after it is
    removed (its records would follow a gap), and appends go on from there."""
    store = make_store(tmp_path)
    topic = store.get_or_create("t")
    for i in range(3):  # two records per segment
        append(topic, [b"%d" % i + b"a" * 1599, b"%d" % i + b"b" * 1599])
    store.close(checkpoint=False)
    tdir = tmp_path / "topics" / "t"
    names = segment_files(tdir)
    assert len(names) == 3
    torn = tdir / names[-2]
    first_record = 24 + 1600
    os.truncate(torn, first_record + 100)  # the second record is cut
    store = make_store(tmp_path)
    assert store.stats["recovery_dropped_segments"] == 1
    assert segment_files(tdir) == names[:2]
    assert not os.path.exists(tdir / (names[-1][:-4] + ".index"))
    assert os.path.getsize(torn) == first_record
    topic = store.get("t")
    assert [p[:2] for _o, _t, p in read_all(topic)] == [b"0a", b"0b", b"1a"]
    assert topic.end_offset == 3 and topic.active.base_offset == 2
    append(topic, [b"after"])
    assert [(o, p) for o, _t, p in read_all(topic, 3)] == [(3, b"after")]
    store.close()
    store = make_store(tmp_path)  # and that state is what the next start finds
    assert [p[:2] for _o, _t, p in read_all(store.get("t"))] == [b"0a", b"0b", b"1a", b"af"]
    store.close()


def test_a_clean_stop_finishes_a_waiting_seal(tmp_path, monkeypatch):
    """A seal the syncer could not do (its fsync failed) stays waiting; the
    clean stop does it, and the clean checkpoint lets the next start read
    nothing."""
    import errno

    from broker.storage.log import TopicLog
    real = TopicLog.sync_seal

    def sync_seal(self, seg):
        if threading.current_thread().name == "pylogstreams-sync":
            raise OSError(errno.EIO, "injected")
        return real(self, seg)

    monkeypatch.setattr(TopicLog, "sync_seal", sync_seal)

    async def main():
        store = make_store(tmp_path, fsync_interval_ms=60_000)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        for i in range(5):
            done, on_stored = _stored(loop)
            publish(writer, topic, [MSG], on_stored)
            assert await asyncio.wait_for(done, 10) == (i, 1, None)
        # The syncer's attempt at the last seal failed (counted), and the
        # seal still waits: nothing claims the last segment yet.
        await _until(lambda: writer.stats["fsync_errors"] >= 1, "the syncer's attempt")
        assert topic.unsealed is not None
        assert topic.checkpoint_entry().base_offset < topic.active.base_offset
        await writer.close()
        assert topic.unsealed is None
        store.close()

    asyncio.run(main())
    store = make_store(tmp_path)
    assert store.stats["recovery_scanned_bytes"] == 0
    assert [p for _o, _t, p in read_all(store.get("t"))] == [MSG] * 5
    store.close()


def test_a_failed_append_that_rolled_takes_back_what_its_seals_made_durable(tmp_path,
                                                                             monkeypatch):
    """A batch that rolls twice finishes the first roll's seal on the way
    (the bound of one waiting seal), which moves what is durable on to the
    segment after it. If the batch then fails, that segment is removed: what
    is durable must go back to where it was, or a checkpoint would name a
    segment that is gone, and later claim more than any fsync covered."""
    import errno

    from broker.storage.segment import Segment
    store, topic, before = _one_synced_record(tmp_path)
    real = Segment.create_files
    created = []

    def create_files(seg):
        created.append(seg.base_offset)
        if len(created) == 2:  # the second roll's new segment
            raise OSError(errno.ENOSPC, "injected")
        return real(seg)

    monkeypatch.setattr(Segment, "create_files", create_files)
    with pytest.raises(OSError):
        append(topic, [MSG, MSG, MSG])
    monkeypatch.undo()
    assert created == [1, 2]
    assert topic.active.base_offset == 0 and topic.end_offset == 1
    assert segment_files(topic.directory) == ["%020d.log" % 0]
    assert topic.checkpoint_entry() == before
    assert topic.unsealed is None
    # It goes on from there: the next roll leaves segment 0 waiting for its
    # seal, and the checkpoint keeps naming it until that is done.
    append(topic, [MSG])
    assert topic.unsealed is not None and topic.unsealed.base_offset == 0
    assert topic.checkpoint_entry() == before
    topic.finish_seal()
    assert topic.checkpoint_entry().base_offset == 1
    store.close()


def test_recovery_makes_the_last_segments_name_durable(tmp_path, monkeypatch):
    """A crash while a seal waited: the last segment's name may not have
    reached the directory fsync the seal does last. Recovery, finding the
    one before it whole, fsyncs the directory before a checkpoint names
    the last one."""
    store = make_store(tmp_path)
    topic = store.get_or_create("t")
    for _ in range(3):
        append(topic, [MSG])
    assert topic.unsealed is not None
    directory = topic.directory
    store.close(checkpoint=False)  # as a crash leaves it
    fsyncs = FsyncLog(monkeypatch)
    store = make_store(tmp_path)
    assert fsyncs.of(directory) == ["MainThread"]
    entry = store.get("t").checkpoint_entry()
    assert entry.base_offset == 2  # the checkpoint written after recovery names it
    assert [p for _o, _t, p in read_all(store.get("t"))] == [MSG] * 3
    store.close()
