"""The disk thread: group commit, fsync policies, per-topic settings, rolling."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time

import pytest

from broker.storage import LogStore
import storage_helpers
from storage_helpers import (
    DiskFaults, append, make_store, publish, publish_records, read_all, segment_files,
    start_writer)

records_impl = storage_helpers.records_impl  # fixture: every test runs with both codecs
# ... and with both builds of the writer (writer.py as it is, and compiled): all of them.
pytestmark = pytest.mark.usefixtures("records_impl")


class FsyncSpy:
    """Records, per file path, the largest file size an fsync has covered."""

    def __init__(self, monkeypatch) -> None:
        self.synced: dict[str, int] = {}
        self.calls = 0
        real = os.fsync

        def fsync(fd):
            real(fd)
            path = os.readlink("/proc/self/fd/%d" % fd)
            size = os.fstat(fd).st_size
            self.synced[path] = max(self.synced.get(path, 0), size)
            if path.endswith(".log"):
                self.calls += 1

        monkeypatch.setattr(os, "fsync", fsync)


def test_group_commit_under_always(records_impl, tmp_path, monkeypatch):
    """50 producers, each waiting for its ack: data is visible and acked only
    after the fsync that covers it, and many publishes share one fsync."""
    spy = FsyncSpy(monkeypatch)
    problems = []

    async def main():
        store = make_store(tmp_path, fsync="always", segment_bytes=1 << 20)
        topic = store.get_or_create("t")

        def covered(where):
            seg = topic.segments[-1]
            if spy.synced.get(seg.log_path, -1) < seg.readable_size:
                problems.append("%s before fsync: %d > %d" % (
                    where, seg.readable_size, spy.synced.get(seg.log_path, -1)))

        writer = await start_writer(store, on_written=lambda t: covered("visible"))
        acked = 0

        async def producer(p):
            nonlocal acked
            for i in range(20):
                fut = asyncio.get_running_loop().create_future()

                def on_stored(base, count, error, fut=fut):
                    covered("acked")
                    fut.set_result((base, count, error))

                publish(writer, topic, [b"p%d-%d" % (p, i) * 20], on_stored)
                base, count, error = await fut
                assert error is None and count == 1
                acked += 1

        await asyncio.gather(*(producer(p) for p in range(50)))
        await writer.close()
        store.close()
        return acked, store.stats["fsyncs"]

    acked, fsyncs = asyncio.run(main())
    assert not problems, problems[:5]
    assert acked == 1000
    # One fsync per disk job; with 50 producers waiting, jobs carry many publishes.
    assert spy.calls <= acked / 5, (spy.calls, acked)
    assert fsyncs <= acked / 5


@pytest.mark.parametrize("policy", ["interval", "never"])
def test_interval_and_never_do_not_fsync_per_batch(records_impl, tmp_path, monkeypatch, policy):
    spy = FsyncSpy(monkeypatch)

    async def main():
        store = make_store(tmp_path, fsync=policy, fsync_interval_ms=3_600_000,
                           segment_bytes=1 << 20)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        for i in range(200):
            publish(writer, topic, [b"m%d" % i])
            if i % 10 == 0:
                await writer.flush()
        await writer.flush()
        during = spy.calls
        await writer.close()  # a clean stop fsyncs whatever the policy
        after = spy.synced.get(topic.active.log_path)
        store.close()
        return during, after, topic.active.size

    during, after, size = asyncio.run(main())
    assert during == 0
    assert after == size



def test_interval_fsyncs_run_beside_the_writes(tmp_path, monkeypatch):
    """Under fsync=interval a slow fsync runs on the syncer thread: the disk
    thread goes on writing (and does not spin on the deadline meanwhile),
    and the checkpoint claims only what an fsync covered."""
    import threading
    import time
    from broker.storage import checkpoint
    real_fsync = os.fsync
    slow = threading.Event()

    def fsync(fd):
        if threading.current_thread().name == "pylogstreams-sync" and not slow.is_set():
            slow.set()
            time.sleep(0.4)  # one fsync that takes 400 ms
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ticks = []

    async def main():
        store = make_store(tmp_path, fsync="interval", fsync_interval_ms=20,
                           checkpoint_interval_ms=50, segment_bytes=1 << 20)
        writer = await start_writer(store)
        real_timed = writer._timed_work

        def counting():  # on this writer (the compiled build's class cannot be patched)
            ticks.append(time.monotonic())
            real_timed()

        monkeypatch.setattr(writer, "_timed_work", counting)
        topic = store.get_or_create("t")
        publish(writer, topic, [b"first"])
        await writer.flush()
        while not slow.is_set():
            await asyncio.sleep(0.005)
        started = time.monotonic()
        # Writes complete while the fsync is stuck.
        for i in range(5):
            publish(writer, topic, [b"during %d" % i])
            await writer.flush()
        during = time.monotonic() - started
        await asyncio.sleep(0.5)  # the fsync ends, the next rounds run
        n_ticks = len([t for t in ticks if started <= t <= started + 0.4])
        await writer.close()
        store.close()
        return during, n_ticks

    during, n_ticks = asyncio.run(main())
    assert during < 0.3, "writes waited for the fsync (%.3f s)" % during
    assert n_ticks < 200, "the disk thread spun while the syncer was busy (%d wakeups)" % n_ticks
    # After the clean stop, the checkpoint is there and marked clean.
    clean, entries = checkpoint.read(str(tmp_path))
    assert clean and entries["t"].end_offset == 6



def test_second_job_queued_under_load_loses_nothing(records_impl, tmp_path):
    """Under a backlog a second job waits behind the one being written: every
    batch is stored once, in order, and acknowledged with its own offsets."""
    seen_two = []

    async def main():
        store = make_store(tmp_path, segment_bytes=8 << 20)
        writer = await start_writer(store)
        topics = [store.get_or_create("t%d" % i) for i in range(3)]
        acks = {t.name: [] for t in topics}
        loop = asyncio.get_running_loop()
        futs = []
        for rnd in range(40):
            for t in topics:
                msgs = [b"%s-%03d-%02d-" % (t.name_bytes, rnd, j) + b"x" * 20_000 for j in range(20)]
                fut = loop.create_future()
                futs.append(fut)

                def on_stored(base, count, exc, t=t, fut=fut, msgs=msgs):
                    acks[t.name].append((base, count, msgs))
                    fut.set_result(exc)

                publish(writer, t, msgs, on_stored)
            seen_two.append(writer._in_flight)
            await asyncio.sleep(0)
        assert all(exc is None for exc in await asyncio.wait_for(asyncio.gather(*futs), 30))
        await writer.flush()
        for t in topics:
            stored = [p for _o, _t, p in read_all(t)]
            expect = []
            for base, count, msgs in acks[t.name]:
                assert base == len(expect)  # contiguous, in publish order
                expect.extend(msgs)
            assert stored == expect and len(stored) == 40 * 20
        await writer.close()
        store.close()

    asyncio.run(main())
    assert max(seen_two) == 2, "no second job was ever queued (%r)" % sorted(set(seen_two))



def test_records_behind_a_failed_batch_close_the_gap(records_impl, tmp_path, monkeypatch,
                                                     caplog):
    """v1 batches get their offsets on the loop, as they arrive. One that
    arrives while the batch before it is being written, and that batch then
    fails, was made with offsets after the failed ones: it is stored right
    after the last stored record (re-encoded), so no gap opens, and the
    batches after it continue from there."""
    entered, release = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def pwrite(fd, data, pos):
        if os.readlink("/proc/self/fd/%d" % fd).endswith(".log") and bytes(data).find(b"FAIL") >= 0:
            entered.set()
            release.wait(10)
            raise OSError(errno.EIO, "Input/output error")
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", pwrite)

    async def main():
        store = make_store(tmp_path, segment_bytes=1 << 20)
        # F's write is held on the disk thread while the loop queues B.
        writer = await start_writer(store, inline_write_bytes=0)
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        results = {}

        def stored(name):
            fut = loop.create_future()
            results[name] = fut
            return lambda base, count, exc: fut.set_result((base, count, exc))

        publish_records(writer, topic, [b"A0", b"A1"], stored("A"))
        assert await asyncio.wait_for(results["A"], 10) == (0, 2, None)
        publish_records(writer, topic, [b"FAIL%d" % i for i in range(3)], stored("F"))
        assert await loop.run_in_executor(None, entered.wait, 10)  # F is being written
        publish_records(writer, topic, [b"B0", b"B1-longer"], stored("B"))  # offsets 5, 6
        release.set()
        base, count, exc = await asyncio.wait_for(results["F"], 10)
        assert (base, count, exc.errno) == (None, 3, errno.EIO)
        assert await asyncio.wait_for(results["B"], 10) == (2, 2, None)
        # Re-encoded, B's last record is where the segment says (time lookups read it).
        assert topic.active.size - topic.active.last_pos == 24 + len(b"B1-longer")
        publish_records(writer, topic, [b"C0"], stored("C"))  # offset 4 again
        assert await asyncio.wait_for(results["C"], 10) == (4, 1, None)
        assert (topic.next_offset, topic.unwritten) == (5, 0)
        await writer.close()
        store.close()

    with caplog.at_level("WARNING", logger="broker.storage.writer"):
        asyncio.run(main())
    assert caplog.text.count("records made with offsets") == 1  # B only
    assert "records made with offsets from 5 are stored from 2" in caplog.text
    store = make_store(tmp_path)  # as recovery reads the files: every CRC checked
    topic = store.get("t")
    assert [(o, p) for o, _t, p in read_all(topic)] == [
        (0, b"A0"), (1, b"A1"), (2, b"B0"), (3, b"B1-longer"), (4, b"C0")]
    assert [t for _o, t, _p in read_all(topic)] == sorted(t for _o, t, _p in read_all(topic))
    store.close()


async def _publish_records_and_wait(writer, topic, msgs):
    """A v1 batch published and stored (or refused): ``(base, count, error)``."""
    fut = asyncio.get_running_loop().create_future()
    publish_records(writer, topic, msgs, lambda b, c, e: fut.set_result((b, c, e)))
    return await asyncio.wait_for(fut, 10)


def test_loop_offsets_follow_the_disk_after_a_failed_batch(records_impl, tmp_path,
                                                           monkeypatch, caplog):
    """After a failed batch the loop's next offset is the topic's end on
    disk (plus what is on its way there), not a subtraction: here the
    cut-back of a batch whose fsync failed is made to leave it in place,
    and the batches after it still get the right offsets on the loop (no
    re-encoding)."""
    from broker.storage.log import TopicLog
    fail = DiskFaults(monkeypatch)
    monkeypatch.setattr(TopicLog, "undo", lambda self, result: None)  # a cut-back that failed

    async def main():
        store = make_store(tmp_path, fsync="always", segment_bytes=1 << 20)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        assert await _publish_records_and_wait(writer, topic, [b"A0", b"A1"]) == (0, 2, None)
        fail.fsync = 1
        base, count, exc = await _publish_records_and_wait(writer, topic, [b"F0", b"F1", b"F2"])
        assert (base, count, exc.errno) == (None, 3, errno.EIO)
        assert topic.next_offset == topic.active.end_offset == 5  # the disk's end
        for i in range(3):
            assert await _publish_records_and_wait(writer, topic, [b"B%d" % i]) == (5 + i, 1, None)
        assert topic.next_offset == topic.active.end_offset == 8
        await writer.close()
        store.close()

    with caplog.at_level("WARNING", logger="broker.storage.writer"):
        asyncio.run(main())
    assert "records made with offsets" not in caplog.text


def test_refused_batch_is_not_served_when_its_cut_back_fails(records_impl, tmp_path,
                                                              monkeypatch):
    """fsync=always: a batch whose fsync fails is refused and cut back; when
    the cut (ftruncate) fails too, it is still taken back in memory, so it
    is never served, and the next append cuts the file before it writes."""
    fail = DiskFaults(monkeypatch)

    async def main():
        store = make_store(tmp_path, fsync="always", segment_bytes=1 << 20)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        assert await _publish_records_and_wait(writer, topic, [b"A0", b"A1"]) == (0, 2, None)
        fail.fsync, fail.ftruncate = 1, 1
        base, count, exc = await _publish_records_and_wait(writer, topic, [b"F0", b"F1", b"F2"])
        assert (base, count, exc.errno) == (None, 3, errno.EIO)
        assert topic.end_offset == topic.next_offset == 2
        assert [p for _o, _t, p in read_all(topic)] == [b"A0", b"A1"]
        assert await _publish_records_and_wait(writer, topic, [b"B0"]) == (2, 1, None)
        assert [(o, p) for o, _t, p in read_all(topic)] == [(0, b"A0"), (1, b"A1"), (2, b"B0")]
        # The next append cut what the failed cut left, so nothing of F
        # follows B in the file for recovery to find after a crash.
        assert os.path.getsize(topic.active.log_path) == topic.active.size
        await writer.close()
        store.close()

    asyncio.run(main())


@pytest.mark.parametrize("then", ["shutdown", "roll"])
def test_refused_batch_stays_out_after_a_restart(records_impl, tmp_path, monkeypatch, then):
    """A refused batch whose cut-back failed is cut off the file before the
    segment is closed for good: at a clean shutdown (nothing appended after
    it), or when the next batch does not fit and the segment is sealed (no
    append to it comes first). After a restart recovery does not find it."""
    fail = DiskFaults(monkeypatch)

    async def main():
        store = make_store(tmp_path, fsync="always", segment_bytes=4096)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        assert await _publish_records_and_wait(writer, topic, [b"A" * 3000]) == (0, 1, None)
        fail.fsync, fail.ftruncate = 1, 1
        base, count, exc = await _publish_records_and_wait(writer, topic, [b"F" * 500])
        assert (base, count, exc.errno) == (None, 1, errno.EIO)
        if then == "roll":  # 2000 bytes do not fit the 1000-odd left
            assert await _publish_records_and_wait(writer, topic, [b"B" * 2000]) == (1, 1, None)
        await writer.close()
        store.close()

    asyncio.run(main())
    store = make_store(tmp_path, fsync="always", segment_bytes=4096)
    got = [(o, p[:1]) for o, _t, p in read_all(store.get("t"))]
    store.close()
    assert got == [(0, b"A")] + ([(1, b"B")] if then == "roll" else [])


def test_a_stored_batch_resets_the_loop_offset_to_the_disk(records_impl, tmp_path):
    """Each stored batch sets the loop's next offset from the topic's end on
    disk plus what is still on its way there, so a drift (here made by hand)
    does not outlive the next write."""

    async def main():
        store = make_store(tmp_path, segment_bytes=1 << 20)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        assert await _publish_records_and_wait(writer, topic, [b"A0", b"A1"]) == (0, 2, None)
        topic.next_offset += 7  # a drift
        assert await _publish_records_and_wait(writer, topic, [b"B0"]) == (2, 1, None)
        assert (topic.next_offset, topic.end_offset, topic.unwritten) == (3, 3, 0)
        await writer.close()
        store.close()

    asyncio.run(main())


def test_append_times_never_go_back_across_a_restart(records_impl, tmp_path):
    """Times are given on the loop as batches arrive. A job holding a v0
    list and a later v1 batch is written with the newer time as the
    segment's last, and after a restart with the clock stepped back, new
    batches are not stamped before it (time lookups binary-search)."""
    from storage_helpers import FakeClock
    clock = FakeClock()

    async def run(msgs_v0, msgs_v1):
        store = make_store(tmp_path, clock=clock, segment_bytes=1 << 20)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        futs = []
        for publish_fn, msgs in ((publish, msgs_v0), (publish_records, msgs_v1)):
            fut = loop.create_future()
            futs.append(fut)
            publish_fn(writer, topic, msgs, lambda b, c, e, fut=fut: fut.set_result(e))
            clock.advance(5)  # the second batch arrives 5 s later, in the same job
        assert await asyncio.wait_for(asyncio.gather(*futs), 10) == [None, None]
        await writer.close()
        times = [t for _o, t, _p in read_all(topic)]
        store.close()
        return times

    first = asyncio.run(run([b"a0", b"a1"], [b"b0"]))
    assert first == [first[0]] * 2 + [first[0] + 5000]
    clock.advance(-100)  # the wall clock steps back across the restart
    times = asyncio.run(run([b"c0"], [b"d0"]))
    assert times == sorted(times) and times[3] == first[2], times


def test_syncer_survives_an_unexpected_error(tmp_path, monkeypatch):
    """A bug in the syncer's round (here: the checkpoint raising ValueError)
    is logged and counted; the writer neither hangs nor loses writes."""
    from broker.storage import writer as writer_mod
    attempts = []

    def broken(*args):
        attempts.append(args)
        raise ValueError("boom")

    monkeypatch.setattr(writer_mod.checkpoint_file, "write", broken)

    async def main():
        store = make_store(tmp_path, fsync="interval", fsync_interval_ms=10,
                           checkpoint_interval_ms=20)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        for i in range(5):
            publish(writer, topic, [b"m%d" % i])
            await writer.flush()
            await asyncio.sleep(0.03)
        monkeypatch.undo()
        await asyncio.wait_for(writer.close(), 10)
        errors = writer.stats["checkpoint_errors"]
        assert [p for _o, _t, p in read_all(topic)] == [b"m%d" % i for i in range(5)]
        store.close()
        return errors

    errors = asyncio.run(main())
    assert attempts and errors == len(attempts)



def test_batch_broken_off_before_its_fsync_is_not_left_behind(records_impl, tmp_path):
    """fsync=always: if the job breaks off after the append (a bug, here the
    offsets journal raising ValueError), the batch is refused and taken
    back, so no later batch makes it readable."""

    async def main():
        store = make_store(tmp_path, fsync="always")
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        real_write = store.offsets.write

        def broken(changes):
            raise ValueError("boom")

        store.offsets.write = broken
        store.offsets.set(b"client", "t", 1)
        first = loop.create_future()
        publish(writer, topic, [b"A0", b"A1"], lambda b, c, e: first.set_result((b, c, e)))
        base, count, exc = await asyncio.wait_for(first, 10)
        assert base is None and count == 2 and exc is not None
        store.offsets.write = real_write
        second = loop.create_future()
        publish(writer, topic, [b"B0"], lambda b, c, e: second.set_result((b, c, e)))
        assert await asyncio.wait_for(second, 10) == (0, 1, None)
        await writer.flush()
        stored = [(o, p) for o, _t, p in read_all(topic)]
        await writer.close()
        store.close()
        return stored

    assert asyncio.run(main()) == [(0, b"B0")]


def test_per_topic_fsync_override(records_impl, tmp_path, monkeypatch):
    spy = FsyncSpy(monkeypatch)

    async def main():
        store = make_store(tmp_path, fsync="never", segment_bytes=1 << 20)
        writer = await start_writer(store)
        cfg = await writer.set_topic_config("safe", fsync="always")
        assert cfg.fsync == "always"
        safe = store.get("safe")
        fast = store.get_or_create("fast")
        for i in range(30):
            publish(writer, safe, [b"s%d" % i])
            publish(writer, fast, [b"f%d" % i])
            await writer.flush()
        synced = dict(spy.synced)
        await writer.close()
        store.close()
        return synced, safe.active.log_path, fast.active.log_path

    synced, safe_path, fast_path = asyncio.run(main())
    assert synced.get(safe_path) == os.path.getsize(safe_path)
    assert fast_path not in synced
    assert json.load(open(os.path.join(os.path.dirname(safe_path), "config.json"))) == {
        "fsync": "always"}


def test_topic_config_persists_and_resets(tmp_path):
    store = make_store(tmp_path, retention_ms=1000)
    assert store.topic_config("x").retention_ms == 1000
    cfg = store.set_topic_config("x", retention_ms=-1, retention_bytes=10_000, segment_bytes=2048)
    assert (cfg.retention_ms, cfg.retention_bytes, cfg.segment_bytes) == (-1, 10_000, 2048)
    with pytest.raises(ValueError):
        store.set_topic_config("x", retention_ms=-5)
    with pytest.raises(ValueError):
        store.set_topic_config("x", colour="blue")
    with pytest.raises(ValueError):
        store.set_topic_config("../evil", fsync="never")
    assert store.get("x").config == cfg  # a refused change changes nothing
    store.close()
    store = make_store(tmp_path, retention_ms=1000)
    assert store.get("x").config == cfg
    store.set_topic_config("x", retention_ms=None)  # back to the broker default
    assert store.get("x").config.retention_ms == 1000
    store.close()
    store = make_store(tmp_path, retention_ms=1000)
    assert store.get("x").overrides == {"retention_bytes": 10_000, "segment_bytes": 2048}
    store.close()


def test_new_topic_touches_no_file_until_first_append(records_impl, tmp_path):
    async def main():
        store = make_store(tmp_path)
        writer = await start_writer(store)
        topic = store.get_or_create("fresh")
        assert not os.path.exists(topic.directory)
        assert topic.read(0, 1000, lambda *a: None) is None
        assert topic.offset_for_time(0) == 0
        publish(writer, topic, [b"first"])
        await writer.flush()
        assert segment_files(topic.directory) == ["%020d.log" % 0]
        await writer.close()
        store.close()

    asyncio.run(main())
    store = make_store(tmp_path)
    assert [p for _o, _t, p in read_all(store.get("fresh"))] == [b"first"]
    store.close()


def test_big_batch_is_split_at_record_boundaries(records_impl, tmp_path):
    store = make_store(tmp_path, segment_bytes=2048)
    topic = store.get_or_create("t")
    msgs = [bytes([65 + i % 26]) * (100 + i % 50) for i in range(200)]
    append(topic, msgs)  # ~28 KB in one batch
    sizes = [os.path.getsize(os.path.join(topic.directory, f)) for f in segment_files(topic.directory)]
    assert len(sizes) > 10 and max(sizes) <= 2048
    # Filled to capacity: each sealed segment could not take the next record.
    assert all(s > 2048 - (24 + 150) for s in sizes[:-1])
    assert [p for _o, _t, p in read_all(topic)] == msgs
    assert [s.base_offset for s in topic.segments][:2] == [0, topic.segments[0].end_offset]
    assert store.stats["segments_rolled"] == len(sizes) - 1
    store.close()
    store = make_store(tmp_path, segment_bytes=2048)
    assert [p for _o, _t, p in read_all(store.get("t"))] == msgs
    store.close()


def test_record_bigger_than_a_segment_gets_its_own(records_impl, tmp_path):
    store = make_store(tmp_path, segment_bytes=1024)
    topic = store.get_or_create("t")
    msgs = [b"small", b"L" * 5000, b"tiny", b"M" * 3000, b"N" * 3000]
    append(topic, msgs[:1])
    append(topic, msgs[1:])
    sizes = [os.path.getsize(os.path.join(topic.directory, f)) for f in segment_files(topic.directory)]
    # "small" leaves no room for L: roll; L alone; "tiny" in a fresh one, M
    # does not fit after it: roll; M alone; N alone.
    assert sizes == [24 + 5, 24 + 5000, 24 + 4, 24 + 3000, 24 + 3000]
    assert [p for _o, _t, p in read_all(topic)] == msgs
    store.close()


def test_exact_fit_does_not_roll_early(records_impl, tmp_path):
    store = make_store(tmp_path, segment_bytes=1024)
    topic = store.get_or_create("t")
    append(topic, [b"x" * (512 - 24)] * 2)  # exactly 1024 bytes
    assert len(topic.segments) == 1 and topic.active.size == 1024
    append(topic, [b"y"])
    assert len(topic.segments) == 2 and topic.segments[1].base_offset == 2
    store.close()


def test_logstore_keeps_its_old_signature(tmp_path):
    store = LogStore(str(tmp_path), 8192, 512)
    store.open()
    assert (store.segment_bytes, store.interval) == (8192, 512)
    assert store.defaults.segment_bytes == 8192
    store.close()


class JobSpy:
    """Records each job the loop hands the disk thread, and when."""

    def __init__(self, writer) -> None:
        self.jobs = []
        self.arrived = asyncio.Event()
        loop = asyncio.get_running_loop()
        real = writer._submit

        def submit(job):
            self.jobs.append((loop.time(), job))
            self.arrived.set()
            real(job)

        writer._submit = submit


def _commit_then(tmp_path, offset: int, scenario):
    """Set client's committed offset on topic t, run ``scenario(store, writer,
    spy, loop)``, close; the offset must be in the journal when reopened."""
    async def main():
        store = make_store(tmp_path)
        writer = await start_writer(store)
        spy = JobSpy(writer)
        store.offsets.set(b"client", "t", offset)
        result = await scenario(store, writer, spy, asyncio.get_running_loop())
        await writer.close()
        store.close()
        return result

    result = asyncio.run(main())
    store = make_store(tmp_path)
    assert store.offsets.get(b"client", "t") == offset
    store.close()
    return result


def _long_offsets_delay(monkeypatch, writer, seconds: float = 30.0) -> None:
    """The writer's delay for an offsets-only job, made long: a test that checks
    what happens *before* it must not race a 5 ms timer (a VM can stall that long)."""
    import sys
    monkeypatch.setattr(sys.modules[type(writer).__module__], "_OFFSETS_DELAY", seconds)


def test_committed_offsets_ride_with_the_next_publish(tmp_path, monkeypatch):
    """A commit alone starts no job; the next publish's job carries it."""
    async def scenario(store, writer, spy, loop):
        _long_offsets_delay(monkeypatch, writer)
        writer.offsets_changed()
        for _ in range(5):
            await asyncio.sleep(0)  # loop iterations, far less than the delay
        assert spy.jobs == []
        publish(writer, store.get_or_create("t"), [b"a", b"b"])
        await spy.arrived.wait()
        (_, job), = spy.jobs
        assert job.offsets == {(b"client", "t"): 3} and job.appends[0][2] == 2
        assert writer._offsets_handle is None  # the timer went with it

    _commit_then(tmp_path, 3, scenario)


def test_committed_offsets_alone_are_written_after_the_delay(tmp_path):
    """With nothing published, the commit goes on its own, once the delay is over."""
    from broker.storage import writer as writer_mod

    async def scenario(store, writer, spy, loop):
        t0 = loop.time()
        writer.offsets_changed()
        writer.offsets_changed()  # a second commit does not re-arm the timer
        await asyncio.wait_for(spy.arrived.wait(), 10)
        (when, job), = spy.jobs
        assert job.offsets == {(b"client", "t"): 7} and not job.appends
        assert when - t0 >= writer_mod._OFFSETS_DELAY * 0.9  # loop clock granularity
        await writer.flush()
        assert len(spy.jobs) == 1

    _commit_then(tmp_path, 7, scenario)


def test_flush_writes_committed_offsets_at_once(tmp_path, monkeypatch):
    async def scenario(store, writer, spy, loop):
        _long_offsets_delay(monkeypatch, writer, 30.0)
        writer.offsets_changed()
        t0 = loop.time()
        await writer.flush()
        (when, job), = spy.jobs
        assert job.offsets == {(b"client", "t"): 9}
        assert not store.offsets.dirty and writer._offsets_handle is None
        return when - t0

    assert _commit_then(tmp_path, 9, scenario) < 10.0  # not after the (30 s) delay


# -- small jobs written on the loop (inline_write_bytes) -------------------------


class WriterThreads:
    """Records which thread each ``pwrite`` to a segment log ran on."""

    def __init__(self, monkeypatch) -> None:
        self.names: list[str] = []
        real = os.pwrite

        def pwrite(fd, data, pos):
            if os.readlink("/proc/self/fd/%d" % fd).endswith(".log"):
                self.names.append(threading.current_thread().name)
            return real(fd, data, pos)

        monkeypatch.setattr(os, "pwrite", pwrite)


def _stored(loop):
    fut = loop.create_future()
    return fut, lambda base, count, exc: fut.set_result((base, count, exc))


async def _topic_on_disk(tmp_path, first: list):
    """A running writer, and topic "t" whose files the disk thread made with
    a first write of ``first``: ``(store, writer, topic, loop)``."""
    store = make_store(tmp_path, segment_bytes=1 << 20)
    writer = await start_writer(store)
    topic = store.get_or_create("t")
    loop = asyncio.get_running_loop()
    done, on_stored = _stored(loop)
    publish(writer, topic, first, on_stored)
    assert await asyncio.wait_for(done, 10) == (0, len(first), None)
    await _disk_thread_idle(writer)
    return store, writer, topic, loop


async def _disk_thread_idle(writer) -> None:
    """Until the disk thread lets go of its lock: a job's report reaches the
    loop before the thread has finished its timed work after it."""
    deadline = time.monotonic() + 10
    while writer._disk_lock.locked() and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


def test_a_small_job_is_written_on_the_loop(records_impl, tmp_path, monkeypatch):
    """With the disk thread idle, a small batch to a topic already on disk is
    written by the loop itself: stored, acknowledged, readable, counted."""
    threads = WriterThreads(monkeypatch)

    async def main():
        store, writer, topic, loop = await _topic_on_disk(tmp_path, [b"a0", b"a1"])
        second, on_second = _stored(loop)
        publish_records(writer, topic, [b"b0", b"b1", b"b2"], on_second)
        assert await asyncio.wait_for(second, 10) == (2, 3, None)
        assert writer.stats["inline_writes"] == 1
        assert [r[2] for r in read_all(topic)] == [b"a0", b"a1", b"b0", b"b1", b"b2"]
        assert (topic.next_offset, topic.end_offset, topic.unwritten) == (5, 5, 0)
        await writer.close()
        store.close()

    asyncio.run(main())
    assert threads.names == ["pylogstreams-disk", "MainThread"]
    store = make_store(tmp_path, segment_bytes=1 << 20)
    assert [r[2] for r in read_all(store.get_or_create("t"))] == [b"a0", b"a1", b"b0", b"b1", b"b2"]
    store.close()


def test_a_job_written_on_the_loop_is_reported_at_once_and_schedules_nothing(records_impl,
                                                                             tmp_path):
    """The loop's own write is reported in the same turn (the batch's
    acknowledgement and deliveries do not wait for the next one), and a
    report that leaves nothing pending schedules no further turn."""

    async def main():
        store, writer, topic, loop = await _topic_on_disk(tmp_path, [b"a0"])
        seen = []
        real_write_here, real_done = writer._write_here, writer._done

        def write_here(job):
            wrote = real_write_here(job)
            seen.append(("written", wrote, list(reports)))
            return wrote

        def done(job):
            real_done(job)
            seen.append(("reported", writer._kick_handle))

        writer._write_here, writer._done = write_here, done
        reports = []
        stored, on_stored = _stored(loop)

        def report(base, count, exc):
            reports.append((base, count, exc))
            on_stored(base, count, exc)

        publish_records(writer, topic, [b"b0", b"b1"], report)
        assert await asyncio.wait_for(stored, 10) == (1, 2, None)
        assert seen == [("reported", None), ("written", True, [(1, 2, None)])]
        assert writer.stats["inline_writes"] == 1
        await writer.close()
        store.close()

    asyncio.run(main())


@pytest.mark.parametrize("case", ["fsync_always", "too_big", "turned_off", "rolls"])
def test_jobs_that_may_wait_go_to_the_disk_thread(tmp_path, monkeypatch, case):
    """fsync=always, a job over inline_write_bytes, inline_write_bytes=0 and a
    write that would roll the segment are the disk thread's, even when idle."""
    threads = WriterThreads(monkeypatch)

    async def main():
        store = make_store(tmp_path, segment_bytes=64 << 10 if case == "rolls" else 1 << 20)
        writer = await start_writer(
            store, fsync="always" if case == "fsync_always" else None,
            inline_write_bytes={"too_big": 4096, "turned_off": 0}.get(case))
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        size = {"too_big": 5000, "rolls": 40_000}.get(case, 10)
        for i in range(2):
            done, on_stored = _stored(loop)
            publish(writer, topic, [bytes([65 + i]) * size], on_stored)
            assert (await asyncio.wait_for(done, 10))[2] is None
        if case == "turned_off":  # not even an offsets-only job
            store.offsets.set(b"client", "t", 1)
            writer.offsets_changed()
            await writer.flush()
        assert writer.stats["inline_writes"] == 0
        await writer.close()
        store.close()

    asyncio.run(main())
    assert threads.names and set(threads.names) == {"pylogstreams-disk"}


def test_the_loop_wakes_the_idle_disk_thread_for_the_fsync(tmp_path, monkeypatch):
    """Data written on the loop is fsynced within the interval even though
    the disk thread, with nothing dirty, was waiting without a deadline."""
    spy = FsyncSpy(monkeypatch)

    async def main():
        store = make_store(tmp_path, segment_bytes=1 << 20, checkpoint_interval_ms=3_600_000)
        writer = await start_writer(store, fsync="interval", fsync_interval_ms=50)
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        first, on_first = _stored(loop)
        publish(writer, topic, [b"a"], on_first)
        await asyncio.wait_for(first, 10)
        log_path = topic.active.log_path
        deadline = loop.time() + 10
        while spy.synced.get(log_path, 0) < topic.active.size and loop.time() < deadline:
            await asyncio.sleep(0.01)  # the first fsync round (disk thread's timer)
        assert spy.synced[log_path] == topic.active.size
        def idle() -> bool:  # nothing dirty: the thread's next wake is the hourly checkpoint
            due = writer._thread_due
            return due is None or due > time.monotonic() + 60

        while not idle() and loop.time() < deadline:
            await asyncio.sleep(0.01)  # the round is applied
        assert idle()
        await _disk_thread_idle(writer)
        second, on_second = _stored(loop)
        publish(writer, topic, [b"b" * 100], on_second)
        await asyncio.wait_for(second, 10)
        assert writer.stats["inline_writes"] == 1
        written = loop.time()
        while spy.synced.get(log_path, 0) < topic.active.size and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert spy.synced[log_path] == topic.active.size, "written on the loop, never fsynced"
        assert loop.time() - written < 5
        await writer.close()
        store.close()

    asyncio.run(main())


def test_a_failed_write_on_the_loop_is_refused_whole(records_impl, tmp_path, monkeypatch):
    """EIO in a write on the loop: the batch is refused and cut back, the
    next one takes its offsets, and nothing refused is ever read."""
    faults = DiskFaults(monkeypatch)
    threads = WriterThreads(monkeypatch)

    async def main():
        store, writer, topic, loop = await _topic_on_disk(tmp_path, [b"a"])
        faults.pwrite = 1
        failed, on_failed = _stored(loop)
        publish_records(writer, topic, [b"lost0", b"lost1"], on_failed)
        base, count, exc = await asyncio.wait_for(failed, 10)
        assert (base, count, exc.errno) == (None, 2, errno.EIO)
        last, on_last = _stored(loop)
        publish_records(writer, topic, [b"c"], on_last)
        assert await asyncio.wait_for(last, 10) == (1, 1, None)
        assert writer.stats["inline_writes"] == 2 and writer.stats["write_errors"] == 1
        assert [r[2] for r in read_all(topic)] == [b"a", b"c"]
        assert (topic.next_offset, topic.end_offset, topic.unwritten) == (2, 2, 0)
        await writer.close()
        store.close()

    asyncio.run(main())
    assert threads.names[1:] == ["MainThread", "MainThread"]
    store = make_store(tmp_path, segment_bytes=1 << 20)
    assert [r[2] for r in read_all(store.get_or_create("t"))] == [b"a", b"c"]
    store.close()


def test_a_job_undercounted_by_its_connection_is_measured(tmp_path, monkeypatch):
    """The size a connection counts for flow control is not what a batch
    takes on disk: the loop measures the records before writing them itself,
    and a batch that rolls the segment is the disk thread's (sealing fsyncs)."""
    threads = WriterThreads(monkeypatch)
    fsyncs = []
    real_fsync = os.fsync

    def fsync(fd):
        fsyncs.append(threading.current_thread().name)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    async def main():
        store = make_store(tmp_path, segment_bytes=64 << 10)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        first, on_first = _stored(loop)
        publish(writer, topic, [b"A" * 40_000], on_first)
        await asyncio.wait_for(first, 10)
        fsyncs.clear()
        second, on_second = _stored(loop)
        topic.next_offset += 1
        writer.append(topic, [b"B" * 40_000], 50, on_stored=on_second)  # counted 50 bytes
        assert (await asyncio.wait_for(second, 10))[2] is None
        assert len(topic.segments) == 2 and writer.stats["inline_writes"] == 0
        await writer.close()
        store.close()

    asyncio.run(main())
    assert fsyncs and "MainThread" not in fsyncs and "MainThread" not in threads.names


def test_files_are_opened_by_the_disk_thread(tmp_path, monkeypatch):
    """A segment whose descriptors the write cache closed is reopened (and
    another one evicted) by the disk thread, not by a write on the loop."""
    opened = []
    real_open = os.open

    def traced(path, *args, **kwargs):
        if str(path).endswith((".log", ".index")):
            opened.append(threading.current_thread().name)
        return real_open(path, *args, **kwargs)

    async def main():
        store = make_store(tmp_path, segment_bytes=1 << 20, max_open_writers=1)
        writer = await start_writer(store)
        a, b = store.get_or_create("a"), store.get_or_create("b")
        for topic in (a, b):
            publish(writer, topic, [b"x"])
            await writer.flush()
        monkeypatch.setattr(os, "open", traced)
        for topic in (a, b, a, b):
            publish(writer, topic, [b"y"])
            await writer.flush()
        await writer.close()
        store.close()

    asyncio.run(main())
    assert opened and "MainThread" not in opened


def test_the_disk_threads_queue_never_overflows(tmp_path):
    """Wake-ups are coalesced: whatever the syncer's rounds, the loop's
    writes and the double-buffered jobs, the disk thread's queue (two jobs,
    one syncer wake-up, one loop wake-up) never refuses an item."""
    import queue as queue_mod
    import random

    async def main():
        store = make_store(tmp_path, segment_bytes=256 << 20, checkpoint_interval_ms=1)
        writer = await start_writer(store, fsync="interval", fsync_interval_ms=1)
        refused = []
        real_put = writer._queue.put_nowait

        def put_nowait(item):
            try:
                real_put(item)
            except queue_mod.Full:
                refused.append(item)
                raise

        writer._queue.put_nowait = put_nowait
        topics = [store.get_or_create("t%d" % i) for i in range(8)]
        for topic in topics:
            publish(writer, topic, [b"x"])
        await writer.flush()
        rnd = random.Random(5)
        end = time.monotonic() + 4
        while time.monotonic() < end and not refused:
            if rnd.random() < 0.02:  # a backlog over 1 MiB: a second job queued
                for _ in range(12):
                    publish(writer, rnd.choice(topics), [b"B" * 100_000])
            else:
                publish(writer, rnd.choice(topics), [b"s" * 200])
            await asyncio.sleep(0)
            while writer.pending_bytes > (4 << 20):
                await asyncio.sleep(0.001)
        assert not refused
        await asyncio.wait_for(writer.flush(), 10)
        assert writer.stats["inline_writes"] > 0
        await writer.close()
        store.close()

    asyncio.run(main())


def test_the_syncers_wake_ups_are_coalesced(tmp_path):
    """However many rounds end before the disk thread takes their wake-up,
    one waits in its queue: the queue that jobs are put in without waiting
    (two jobs, one syncer wake-up, one loop wake-up) cannot fill up."""
    from broker.storage.writer import DiskWriter

    async def main():
        store = make_store(tmp_path)
        writer = DiskWriter(asyncio.get_running_loop(), store.offsets, fsync="interval",
                            fsync_interval_ms=1000, high_water=1 << 20, low_water=1 << 18,
                            on_written=lambda topic: None, store=store)  # not started
        for _ in range(5):
            writer._wake_for_results()
        assert writer._queue.qsize() == 1
        assert writer._work(writer._queue.get_nowait()) is False  # the disk thread takes it
        writer._wake_for_results()
        writer._wake_for_results()
        assert writer._queue.qsize() == 1
        store.close()

    asyncio.run(main())


@pytest.mark.parametrize("case", ["topic_always", "compaction"])
def test_more_jobs_that_may_wait_go_to_the_disk_thread(tmp_path, monkeypatch, case):
    """A topic set to fsync=always and a write of the offsets journal that
    compacts it (an fsync) are the disk thread's, even when it is idle and
    the job small."""
    threads = WriterThreads(monkeypatch)

    async def main():
        store = make_store(tmp_path, segment_bytes=64 << 20)
        writer = await start_writer(store)
        if case == "topic_always":
            await writer.set_topic_config("t", fsync="always")
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        done, on_stored = _stored(loop)
        publish(writer, topic, [b"a"], on_stored)  # the topic's first write: disk thread
        await asyncio.wait_for(done, 10)
        if case == "compaction":
            store.offsets.set(b"client", "t", 1)
            store.offsets._records = 1 << 20  # the journal is due for compaction
            writer.offsets_changed()
        threads.names.clear()
        done, on_stored = _stored(loop)
        publish(writer, topic, [b"b" * 40_000], on_stored)
        assert (await asyncio.wait_for(done, 10))[2] is None
        assert writer.stats["inline_writes"] == 0
        await writer.close()
        store.close()

    asyncio.run(main())
    assert threads.names == ["pylogstreams-disk"]


def test_the_writeback_is_started_by_the_syncer_not_the_write(tmp_path, monkeypatch):
    """A small write that takes a segment past a writeback mark (every
    ``WRITEBACK_BYTES``) is still written on the loop; the syncer thread
    starts the kernel's writeback (``sync_file_range``) of everything
    written so far, on a descriptor of its own that it closes after.

    Before, such a write went to the disk thread and waited for the
    ``sync_file_range`` (which can block on a busy disk), and so did
    every batch that arrived meanwhile."""
    import sys

    from broker.storage.segment import WRITEBACK_BYTES

    threads = WriterThreads(monkeypatch)
    calls = []
    closed = []
    called = threading.Event()

    async def main():
        store = make_store(tmp_path, segment_bytes=64 << 20)
        writer = await start_writer(store)
        module = sys.modules[type(writer).__module__]
        real = module.start_writeback

        def start_writeback(fd, offset, nbytes):
            calls.append((threading.current_thread().name, fd,
                          os.readlink("/proc/self/fd/%d" % fd), offset, nbytes))
            real(fd, offset, nbytes)
            called.set()  # the close follows; writer.close() below waits for it

        monkeypatch.setattr(module, "start_writeback", start_writeback)
        real_close = os.close

        def close(fd):
            closed.append((threading.current_thread().name, fd))
            real_close(fd)

        monkeypatch.setattr(os, "close", close)
        topic = store.get_or_create("t")
        loop = asyncio.get_running_loop()
        done, on_stored = _stored(loop)
        publish(writer, topic, [b"a" * (WRITEBACK_BYTES - 30_000)], on_stored)  # disk thread
        await asyncio.wait_for(done, 10)
        await _disk_thread_idle(writer)
        assert calls == []  # not due yet
        threads.names.clear()
        done, on_stored = _stored(loop)
        publish(writer, topic, [b"b" * 40_000], on_stored)
        assert (await asyncio.wait_for(done, 10)) == (1, 1, None)
        assert writer.stats["inline_writes"] == 1
        assert await loop.run_in_executor(None, called.wait, 10)
        seg = topic.active
        [(name, fd, path, offset, nbytes)] = calls
        assert name == "pylogstreams-sync"
        assert path == os.path.realpath(seg.log_path) and fd != seg.fd
        assert (offset, nbytes) == (0, seg.size) and seg.written_back == seg.size
        await writer.close()  # waits for the syncer
        assert ("pylogstreams-sync", fd) in closed
        store.close()

    asyncio.run(main())
    assert threads.names == ["MainThread"]


def test_the_loop_never_waits_for_the_disk_threads_lock(tmp_path, monkeypatch):
    """While the disk thread holds its lock (timed work, a stop), a small job
    is handed to it instead of written on the loop, and the loop goes on."""
    threads = WriterThreads(monkeypatch)

    async def main():
        store, writer, topic, loop = await _topic_on_disk(tmp_path, [b"a"])
        threads.names.clear()
        writer._disk_lock.acquire()  # as if the disk thread were at work
        try:
            done, on_stored = _stored(loop)
            publish(writer, topic, [b"b"], on_stored)
            for _ in range(20):
                await asyncio.sleep(0)  # the loop runs on: the job waits for the thread
            assert not done.done() and writer.stats["inline_writes"] == 0
        finally:
            writer._disk_lock.release()
        assert await asyncio.wait_for(done, 10) == (1, 1, None)
        await writer.close()
        store.close()

    asyncio.run(main())
    assert threads.names == ["pylogstreams-disk"]


def test_the_cut_after_a_failed_cut_back_is_the_disk_threads(records_impl, tmp_path,
                                                              monkeypatch):
    """A write on the loop fails and so does its cut-back: the batch is
    refused and taken back in memory, and the next write, which must cut
    the file first, goes to the disk thread."""
    faults = DiskFaults(monkeypatch)
    threads = WriterThreads(monkeypatch)

    async def main():
        store, writer, topic, loop = await _topic_on_disk(tmp_path, [b"a"])
        faults.pwrite, faults.ftruncate = 1, 1
        failed, on_failed = _stored(loop)
        publish_records(writer, topic, [b"lost"], on_failed)
        base, count, exc = await asyncio.wait_for(failed, 10)
        assert (base, count, exc.errno) == (None, 1, errno.EIO)
        assert writer.stats["inline_writes"] == 1 and topic.active.uncut
        await _disk_thread_idle(writer)
        threads.names.clear()
        last, on_last = _stored(loop)
        publish_records(writer, topic, [b"b"], on_last)
        assert await asyncio.wait_for(last, 10) == (1, 1, None)
        assert writer.stats["inline_writes"] == 1
        assert [r[2] for r in read_all(topic)] == [b"a", b"b"]
        assert os.path.getsize(topic.active.log_path) == topic.active.size
        await writer.close()
        store.close()

    asyncio.run(main())
    assert threads.names == ["pylogstreams-disk"]
