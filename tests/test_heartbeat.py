"""Heartbeat: a client silent for longer than --heartbeat-timeout is closed."""

from __future__ import annotations

import time
import uuid

import pytest

from v0client import V0Client, consumer, produce

pytestmark = pytest.mark.integration


def test_silent_connection_is_closed(server):
    srv = server("--heartbeat-timeout", "1")
    with V0Client(srv.port) as registered, V0Client(srv.port) as anonymous:
        registered.cid()
        t0 = time.monotonic()
        waited = registered.wait_closed(6)
        assert waited >= 0.8, "closed after %.2fs, before the 1 s timeout" % waited
        # A connection that never said anything at all is closed as well.
        anonymous.wait_closed(max(0.5, 6 - (time.monotonic() - t0)))


def test_pinging_connection_stays_open_then_times_out(server):
    srv = server("--heartbeat-timeout", "1")
    t = b"hb-" + uuid.uuid4().hex[:8].encode()
    with V0Client(srv.port) as c:
        c.cid()
        c.sub(t)
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            c.png()
            assert c.is_open(wait=0.3), "closed although it sent PNG every 0.3 s"
        # Still fully working after 2.5 s.
        produce(srv.port, t, [b"alive"])
        assert c.read_deliveries(1) == [(t, b"alive")]
        # Stop pinging: now it is closed.
        c.wait_closed(6)


def test_any_frame_counts_as_activity(server):
    """A producer that keeps publishing (no PNG) is not silent."""
    srv = server("--heartbeat-timeout", "1")
    t = b"hb-" + uuid.uuid4().hex[:8].encode()
    with V0Client(srv.port) as p:
        p.cid(p.reg())
        end = time.monotonic() + 2.5
        i = 0
        while time.monotonic() < end:
            p.pub(t, b"%d" % i)
            i += 1
            assert p.is_open(wait=0.3)
    with consumer(srv.port, t, 0) as c:
        assert len(c.read_deliveries(i)) == i
