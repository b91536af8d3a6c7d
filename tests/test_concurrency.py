"""200 concurrent clients: 100 producers and 100 consumers at once.

Every consumer gets every message of its topics exactly once, each
producer's messages in the order it sent them, and all consumers of a topic
see the same order (it is one log).
"""

from __future__ import annotations

import collections
import threading

import pytest

from v0client import V0Client, frame, pub_frame

pytestmark = pytest.mark.integration

PRODUCERS = 100
CONSUMERS = 100
PER_PRODUCER = 20
TOPICS = [b"load-%d" % k for k in range(4)]
TIMEOUT = 90.0


def _producer(port, p, start, errors):
    try:
        with V0Client(port, timeout=TIMEOUT) as c:
            c.cid(c.reg())
            topic = TOPICS[p % len(TOPICS)]
            start.wait(TIMEOUT)
            for i in range(0, PER_PRODUCER, 5):
                c.send_raw(b"".join(pub_frame(topic, b"p%03d-%02d pad pad" % (p, j))
                                    for j in range(i, i + 5)))
            c.send_close_frame()
            c.wait_closed(TIMEOUT)
    except BaseException as exc:
        errors.append(("producer %d" % p, repr(exc)))
        start.abort()  # don't leave everyone waiting for the full timeout


def _consumer(port, k, start, results, errors):
    try:
        with V0Client(port, timeout=TIMEOUT) as c:
            c.cid()
            mine = (TOPICS[k % len(TOPICS)], TOPICS[(k + 1) % len(TOPICS)])
            c.send_raw(b"".join(frame(b"SUB " + t) + frame(b"SET " + t + b" 0") for t in mine))
            c.barrier(TIMEOUT)
            start.wait(TIMEOUT)
            expected = 2 * (PRODUCERS // len(TOPICS)) * PER_PRODUCER
            got = c.read_deliveries(expected, timeout=TIMEOUT)
            c.expect_silence(0.3)
            results[k] = got
    except BaseException as exc:
        errors.append(("consumer %d" % k, repr(exc)))
        start.abort()


def test_100_producers_100_consumers(server):
    srv = server()
    start = threading.Barrier(PRODUCERS + CONSUMERS + 1)
    results: dict = {}
    errors: list = []
    threads = [threading.Thread(target=_consumer, args=(srv.port, k, start, results, errors),
                                daemon=True) for k in range(CONSUMERS)]
    threads += [threading.Thread(target=_producer, args=(srv.port, p, start, errors), daemon=True)
                for p in range(PRODUCERS)]
    for t in threads:
        t.start()
    try:
        start.wait(TIMEOUT)  # every client connected and set up; go
    except threading.BrokenBarrierError:
        pass  # a client failed; its error is reported below
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not any(t.is_alive() for t in threads), "client threads still running"
    assert errors == [], errors[:5]
    assert len(results) == CONSUMERS

    expected = {t: set() for t in TOPICS}
    for p in range(PRODUCERS):
        for j in range(PER_PRODUCER):
            expected[TOPICS[p % len(TOPICS)]].add(b"p%03d-%02d pad pad" % (p, j))

    topic_order: dict = {}
    for k, got in sorted(results.items()):
        mine = (TOPICS[k % len(TOPICS)], TOPICS[(k + 1) % len(TOPICS)])
        for t in mine:
            msgs = [m for tt, m in got if tt == t]
            # Exactly once each.
            dup = [m for m, n in collections.Counter(msgs).items() if n > 1]
            assert not dup, "consumer %d got duplicates on %r: %r" % (k, t, dup[:3])
            assert set(msgs) == expected[t], "consumer %d: wrong message set on %r" % (k, t)
            # Per-producer order.
            per = collections.defaultdict(list)
            for m in msgs:
                per[m[:4]].append(int(m[5:7]))
            for prod, seq in per.items():
                assert seq == list(range(PER_PRODUCER)), "consumer %d, %r out of order" % (k, prod)
            # One log: every consumer sees the same total order of a topic.
            if t in topic_order:
                assert msgs == topic_order[t], "consumer %d saw a different order of %r" % (k, t)
            else:
                topic_order[t] = msgs
        assert {t for t, _ in got} <= set(mine)
    assert srv.running()
