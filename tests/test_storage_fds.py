"""Bounded resources: open files and in-memory indexes stay under their caps."""

from __future__ import annotations

import asyncio

import storage_helpers
from storage_helpers import (
    append, decoder, make_store, open_fds, publish, read_all, start_writer)

records_impl = storage_helpers.records_impl  # fixture: every test runs with both codecs

READ_CAP = 16
WRITE_CAP = 8


def test_many_topics_hold_bounded_descriptors(records_impl, tmp_path):
    n_topics = 400

    async def main():
        # No tail cache: every read goes through the read descriptors.
        store = make_store(tmp_path, max_open_segments=READ_CAP, max_open_writers=WRITE_CAP,
                           tail_cache_bytes=0)
        writer = await start_writer(store)
        await writer.flush()
        baseline = open_fds()
        topics = [store.get_or_create("topic-%04d" % i) for i in range(n_topics)]
        for rnd in range(3):
            for t in topics:
                publish(writer, t, [b"%s round %d" % (t.name_bytes, rnd)])
            await writer.flush()
            assert len(store.wcache) <= WRITE_CAP
            assert open_fds() - baseline <= 2 * WRITE_CAP
        for t in topics:
            assert [p for _o, _t, p in read_all(t)] == [b"%s round %d" % (t.name_bytes, r)
                                                       for r in range(3)]
            assert len(store.rcache) <= READ_CAP
        assert open_fds() - baseline <= 2 * WRITE_CAP + READ_CAP
        assert store.stats["write_fd_evictions"] > 0 and store.stats["read_fd_evictions"] > 0
        await writer.close()
        store.close()
        assert open_fds() < baseline

    asyncio.run(main())
    # And after a restart, opening 400 topics opens none of their files.
    before = open_fds()
    store = make_store(tmp_path, max_open_segments=READ_CAP, max_open_writers=WRITE_CAP)
    assert len(store.topics) == n_topics
    assert open_fds() - before <= 2  # the lock and the offsets journal
    store.close()


def test_many_segments_hold_bounded_descriptors_and_indexes(records_impl, tmp_path):
    store = make_store(tmp_path, segment_bytes=1024, index_interval_bytes=64,
                       max_open_segments=4, max_open_writers=1, tail_cache_bytes=0)
    topic = store.get_or_create("long")
    baseline = open_fds()
    msgs = [b"%06d" % i * 20 for i in range(6000)]  # ~880 segments of 7 records
    for i in range(0, len(msgs), 500):
        append(topic, msgs[i:i + 500])
    assert len(topic.segments) > 800
    assert open_fds() - baseline <= 2  # the active segment's log and index
    got = read_all(topic, 0, max_bytes=4096)
    assert [p for _o, _t, p in got] == msgs
    assert open_fds() - baseline <= 2 + 4
    assert sum(1 for s in topic.segments if s._index is not None) <= 4
    # Random access far apart: still bounded.
    convert = decoder()
    for off in range(0, 6000, 977):
        recs, _c, _n = topic.read(off, 1, convert)
        assert recs[0][2] == msgs[off]
        assert len(store.rcache) <= 4
    store.close()
