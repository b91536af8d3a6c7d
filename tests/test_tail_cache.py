"""The tail cache: caught-up consumers are served the batches just written,
from memory, within one broker-wide budget; everything else from the files,
CRC-checked."""

from __future__ import annotations

import asyncio
import collections
import types

import pytest

import storage_helpers
from broker.storage.tailcache import ENTRY_OVERHEAD, LOOKBACK, TailCache
from storage_helpers import make_store, publish, start_writer

records_impl = storage_helpers.records_impl  # fixture: every test runs with both codecs


def fake_topic():
    return types.SimpleNamespace(tail=collections.deque())


def test_budget_is_shared_and_oldest_batches_leave_first():
    o = ENTRY_OVERHEAD  # counted per batch besides its bytes
    budget = 120 + 3 * o
    cache = TailCache(budget)
    a, b = fake_topic(), fake_topic()
    cache.add(a, 0, 1, b"x" * 40)
    cache.add(b, 0, 1, b"y" * 40)
    cache.add(a, 1, 2, b"z" * 40)     # exactly the budget
    assert [e[0] for e in a.tail] == [0, 1] and len(b.tail) == 1 and cache.bytes == budget
    cache.add(b, 1, 3, b"w" * 60)     # a's first goes, then b's first, oldest first
    assert [e[0] for e in a.tail] == [1] and [e[0] for e in b.tail] == [1]
    assert cache.bytes == 100 + 2 * o
    cache.add(b, 3, 4, b"u" * 10)
    assert [e[0] for e in b.tail] == [1, 3] and cache.bytes == 110 + 3 * o
    cache.add(a, 2, 3, b"v" * budget)  # bigger than the whole budget: not kept
    assert [e[0] for e in a.tail] == [1] and cache.bytes == 110 + 3 * o
    cache.add(a, 3, 3, b"")           # nothing to keep
    assert [e[0] for e in a.tail] == [1]
    cache.clear()
    assert cache.bytes == 0 and not b.tail and not a.tail


def test_tiny_batches_count_their_overhead():
    cache = TailCache(100 * (ENTRY_OVERHEAD + 10))
    t = fake_topic()
    for i in range(1000):
        cache.add(t, i, i + 1, b"0123456789")
    assert len(t.tail) == 100  # not 10,000 bytes' worth of 10-byte batches


def test_off_keeps_nothing():
    cache = TailCache(0)
    t = fake_topic()
    cache.add(t, 0, 1, b"x")
    assert not t.tail and cache.bytes == 0


class Recorder:
    """A TopicLog.read converter that decodes and notes whether it was told to verify."""

    def __init__(self, rec) -> None:
        self.rec = rec
        self.verify = []

    def __call__(self, buf, from_offset, end_offset, max_bytes, verify):
        self.verify.append(verify)
        out, used = self.rec.decode_records(buf, from_offset, end_offset)
        nxt = out[-1][0] + 1 if out else from_offset
        return out, len(out), nxt, used


def _write(tmp_path, batches, **config):
    async def main():
        store = make_store(tmp_path, segment_bytes=1 << 20, **config)
        topic = store.get_or_create("t")
        writer = await start_writer(store)
        for msgs in batches:
            publish(writer, topic, msgs)
            await writer.flush()  # one job, one batch each
        await writer.close()
        return store, topic
    return asyncio.run(main())


def test_caught_up_reads_come_from_memory(records_impl, tmp_path):
    batches = [[b"a%d-%d" % (i, j) for j in range(5)] for i in range(LOOKBACK + 3)]
    store, topic = _write(tmp_path, batches, tail_cache_bytes=1 << 20)
    assert len(topic.tail) == len(batches)
    assert store.tail.bytes == sum(len(b) + ENTRY_OVERHEAD for _f, _e, b, _s in topic.tail)
    end = topic.end_offset
    conv = Recorder(records_impl)
    # In the newest batches: from memory, not CRC-checked again.
    got = topic.read(end - 3, 1 << 16, conv)
    assert [r[2] for r in got[0]] == batches[-1][2:] and conv.verify == [False]
    assert store.stats["tail_reads"] == 1
    # Further behind than LOOKBACK batches: from the file, checked.
    conv.verify.clear()
    got = topic.read(0, 1 << 16, conv)
    assert got[0][0][2] == b"a0-0" and conv.verify == [True]
    assert store.stats["tail_reads"] == 1
    # Memory and file agree byte for byte.
    first, last, buf, _starts = topic.tail[-1]
    with open(topic.active.log_path, "rb") as f:
        data = f.read()
    assert bytes(buf) == data[-len(buf):]
    store.close()


def _wire1_twin(records_impl):
    import importlib
    pure = records_impl.__name__.startswith("broker._pure")
    return importlib.import_module("broker._pure.wire1" if pure else "broker._speedups.wire1")


def test_forwarded_records_are_what_message_frame_takes(records_impl, tmp_path):
    """A v1 read from a cached batch (whole, or the part that fits, found by
    bisecting the record positions) sends exactly the frame message_frame
    would make by walking the batch, for every start and size limit."""
    from broker.server.v1 import batch_frame
    wire1 = _wire1_twin(records_impl)
    batches = [[b"v%d-%d" % (i, j) + b"x" * (7 * j + i) for j in range(6)] for i in range(3)]
    store, topic = _write(tmp_path, batches, tail_cache_bytes=1 << 20)
    head = wire1.pack_str(b"t")
    forwarded = []

    def forward(recs, count):
        forwarded.append(count)
        # The whole batch as it is, a view of a part of at least a quarter
        # of it, or a copy (a congested transport holds what it is given:
        # a view pins the whole batch).
        assert type(recs) is not memoryview or len(recs.obj) <= 4 * len(recs)
        return b"".join(batch_frame(5, head, recs, count))

    def unused(*args):
        raise AssertionError("a cached batch was walked")

    end = topic.end_offset
    for first, last, buf, _starts in list(topic.tail):
        bounds = records_impl.index_entries(buf, 0, 0, 1, first)[0]
        ends = [int.from_bytes(bounds[k + 4:k + 8], "big") for k in range(8, len(bounds), 8)]
        ends.append(len(buf))  # where each record ends
        for offset in range(first, last):
            here = 0 if offset == first else ends[offset - first - 1]
            # Every record end as a limit, one byte either side, and beyond.
            limits = {x - here + e for x in ends if x > here for e in (-1, 0, 1)}
            for max_bytes in sorted(limits | {1, 1 << 16}):
                frame, count, nxt, _used = wire1.message_frame(buf, 5, b"t", offset, end,
                                                               max_bytes, False)
                assert topic.read(offset, max_bytes, unused, forward) == (frame, count, nxt)
    assert len(forwarded) == store.stats["tail_reads"] > 0
    # Positions were computed once per batch and are counted in the budget.
    assert all(s is not None and len(s) == e - f for f, e, _b, s in topic.tail)
    assert store.tail.bytes == sum(len(b) + ENTRY_OVERHEAD + 4 * len(s)
                                   for _f, _e, b, s in topic.tail)
    # Without a forward function (v0 subscriptions) the batch is walked.
    conv = Recorder(records_impl)
    first, last, buf, _starts = topic.tail[-1]
    got = topic.read(first, 1 << 16, conv)
    assert got[1] == last - first and conv.verify == [False]
    # A topic not kept by a LogStore's cache walks a partial read as well.
    topic.tail_cache = None
    got = topic.read(first + 1, 1 << 16, conv, forward)
    assert got[1] == last - first - 1 and conv.verify == [False, False]
    store.close()


def test_positions_count_against_the_budget(records_impl, tmp_path):
    """Computing a batch's record positions can push older batches out."""
    batches = [[b"p%d-%d" % (i, j) for j in range(50)] for i in range(3)]
    store, topic = _write(tmp_path, batches, tail_cache_bytes=1 << 20)
    sizes = [len(b) + ENTRY_OVERHEAD for _f, _e, b, _s in topic.tail]
    store.tail.max_bytes = sum(sizes) + 4 * 50 - 1  # room for one batch's positions, minus 1
    entry = topic.tail[-1]
    store.tail.starts(entry)
    assert len(topic.tail) == 2 and topic.tail[-1] is entry
    assert store.tail.bytes == sizes[1] + sizes[2] + 4 * 50
    store.close()


def test_without_the_cache_a_corrupt_record_is_refused(records_impl, tmp_path):
    batches = [[b"m%d" % i] * 3 for i in range(3)]
    store, topic = _write(tmp_path, batches, tail_cache_bytes=0)
    assert not topic.tail
    with open(topic.active.log_path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))  # flip the last payload byte on disk
    conv = Recorder(records_impl)
    with pytest.raises(records_impl.CorruptRecordError):
        topic.read(topic.end_offset - 1, 1 << 16, conv)
    assert conv.verify == [True]
    store.close()


def test_cache_serves_what_was_written_not_what_the_disk_now_holds(records_impl, tmp_path):
    """A record the disk corrupted after the write is still served intact
    from the batch in memory (and refused once it must come from the disk)."""
    batches = [[b"m%d" % i] * 3 for i in range(3)]
    store, topic = _write(tmp_path, batches, tail_cache_bytes=1 << 20)
    with open(topic.active.log_path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    conv = Recorder(records_impl)
    got = topic.read(topic.end_offset - 1, 1 << 16, conv)
    assert got[0][0][2] == b"m2"
    store.tail.clear()
    with pytest.raises(records_impl.CorruptRecordError):
        topic.read(topic.end_offset - 1, 1 << 16, conv)
    store.close()
