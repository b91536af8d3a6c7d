"""The devlog's bug report, as a test.

    1. Produce and consume 50k messages multiple times.
    2. Restart the server (loads saved offsets).
    3. Produce and consume another 50k messages -> crash occurs.
    (The offset was always reset to 0 before consuming.)

Here: 1 KB messages; two rounds of produce 50k + consume from 0 by the same
client id; SIGTERM and restart on the same data dir; then the same client
resumes with no SET (its stored offset must have been reloaded: it gets
exactly the third 50k), and with ``SET topic 0`` it gets all 150k, in order,
byte for byte.
"""

from __future__ import annotations

import uuid

import pytest

from v0client import consumer, make_message, message_index, produce

pytestmark = pytest.mark.integration

N = 50_000
SIZE = 1024


def _expect_range(c, topic, start, stop, timeout=120.0):
    """Read ``stop - start`` deliveries and compare them with messages start..stop-1."""
    got = c.read_deliveries(stop - start, timeout=timeout)
    for k, (t, m) in enumerate(got):
        i = start + k
        if t != topic or m != make_message(i, SIZE):
            raise AssertionError("delivery %d of %d..%d is wrong: topic %r, message %r (index %s)"
                                 % (k, start, stop, t, m[:24], _safe_index(m)))


def _safe_index(m):
    try:
        return message_index(m)
    except ValueError:
        return None


def test_devlog_produce_consume_restart_produce_consume(server):
    srv = server()
    topic = b"devlog"
    cid = str(uuid.uuid4())

    # Round 1 and round 2: produce 50k, then consume from 0 (SET topic 0).
    for rnd in range(2):
        produce(srv.port, topic, (make_message(i, SIZE) for i in range(rnd * N, (rnd + 1) * N)))
        with consumer(srv.port, topic, 0, client_id=cid) as c:
            _expect_range(c, topic, 0, (rnd + 1) * N)
            c.expect_silence(0.2)
            c.send_close_frame()
            c.wait_closed()

    # Restart on the same data dir: offsets and logs reload.
    srv.restart()

    # The client's stored offset survived: no SET, it waits at 2N.
    with consumer(srv.port, topic, offset=None, client_id=cid) as c:
        c.barrier()
        c.expect_silence(0.3)
        produce(srv.port, topic, (make_message(i, SIZE) for i in range(2 * N, 3 * N)))
        _expect_range(c, topic, 2 * N, 3 * N)
        c.expect_silence(0.2)
        c.send_close_frame()
        c.wait_closed()

    # And, as in the devlog, reset to 0 and consume everything: 150k in order.
    with consumer(srv.port, topic, 0, client_id=cid) as c:
        _expect_range(c, topic, 0, 3 * N)
        c.expect_silence(0.2)

    # Still alive and still correct after a second restart.
    srv.restart()
    with consumer(srv.port, topic, offset=None, client_id=cid) as c:
        c.barrier()
        c.expect_silence(0.3)
    srv.stop()
