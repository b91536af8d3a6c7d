"""Finding the first offset at or after a time."""

from __future__ import annotations

import asyncio
import bisect
import random

import storage_helpers
from storage_helpers import (
    FakeClock, append, make_store, publish, read_all, start_writer)

records_impl = storage_helpers.records_impl  # fixture: every test runs with both codecs


def _build(topic, rng, t0):
    times = []
    t = t0
    for _ in range(300):
        t += rng.choice([0, 0, 1, 5, 1000, 60_000])  # equal times are common
        n = rng.randrange(1, 5)
        append(topic, [rng.randbytes(rng.randrange(0, 120)) for _ in range(n)], t)
        times += [t] * n
    return times


def _queries(times, rng):
    qs = {times[0] - 10**6, times[-1] + 1, times[-1] + 10**6, 0}
    for t in set(times):
        qs.update((t - 1, t, t + 1))
    qs.update(rng.randrange(times[0], times[-1]) for _ in range(200))
    return sorted(qs)


def test_offset_for_time_matches_brute_force(records_impl, tmp_path):
    rng = random.Random(11)
    store = make_store(tmp_path, segment_bytes=1024, index_interval_bytes=128)
    topic = store.get_or_create("t")
    times = _build(topic, rng, 1_700_000_000_000)
    assert [t for _o, t, _p in read_all(topic)] == times
    assert len(topic.segments) > 20
    for ts in _queries(times, rng):
        assert topic.offset_for_time(ts) == bisect.bisect_left(times, ts), ts
    store.close()
    # After a restart (indexes and files opened lazily) and with a tiny file cache.
    store = make_store(tmp_path, segment_bytes=1024, index_interval_bytes=128,
                       max_open_segments=2)
    topic = store.get("t")
    for ts in _queries(times, rng)[::5]:
        assert topic.offset_for_time(ts) == bisect.bisect_left(times, ts), ts
    store.close()


def test_offset_for_time_after_retention(records_impl, tmp_path):
    rng = random.Random(12)
    clock = FakeClock()
    store = make_store(tmp_path, clock=clock, segment_bytes=1024, index_interval_bytes=128,
                       retention_bytes=4096)
    topic = store.get_or_create("t")
    times = _build(topic, rng, clock.ms)
    topic.drop_oldest(topic.expired_segments(clock.ms))
    start = topic.start_offset
    assert start > 0
    for ts in _queries(times, rng):
        assert topic.offset_for_time(ts) == max(start, bisect.bisect_left(times, ts)), ts
    store.close()


def test_append_times_never_go_backwards(records_impl, tmp_path):
    clock = FakeClock()

    async def main():
        store = make_store(tmp_path, clock=clock)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        publish(writer, topic, [b"a"])
        await writer.flush()
        clock.advance(-3600)  # the wall clock steps back an hour
        publish(writer, topic, [b"b"])
        await writer.flush()
        clock.advance(7200)
        publish(writer, topic, [b"c"])
        await writer.flush()
        await writer.close()
        store.close()

    start = clock.ms
    asyncio.run(main())
    store = make_store(tmp_path, clock=clock)
    times = [t for _o, t, _p in read_all(store.get("t"))]
    assert times == [start, start, start + 3600_000]
    assert store.get("t").offset_for_time(start) == 0
    assert store.get("t").offset_for_time(start + 1) == 2
    store.close()
