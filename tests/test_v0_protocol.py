"""The exchanges of PROTOCOL-v0.md, byte for byte, against a real server.

Every test runs once per codec implementation (``c`` / ``py``).
"""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from v0client import (
    ConnectionClosed, V0Client, consumer, delivery_frame, frame, make_message, produce,
    pub_frame,
)

pytestmark = pytest.mark.integration


def _topic() -> bytes:
    return b"t-" + uuid.uuid4().hex[:10].encode()


def test_reg_replies_one_uuid4_frame(server):
    srv = server()
    with V0Client(srv.port) as c:
        c.raw_log = bytearray()
        first = c.reg()
        second = c.reg()
        assert first != second
        # Exactly two frames of [u32 36][36 ASCII bytes], nothing else.
        assert bytes(c.raw_log) == frame(first.encode()) + frame(second.encode())
        c.expect_silence(0.3)


def test_producer_then_consumer_sequences_byte_for_byte(server):
    """The two client sequences of PROTOCOL-v0.md, exactly as prototypes send them."""
    srv = server()
    topic = _topic()
    msgs = [b"hello %d from the producer" % i for i in range(200)]

    # Producer: REG (read id), CID, many PUBs back to back, a PNG, then close.
    with V0Client(srv.port) as p:
        p.raw_log = bytearray()
        cid = p.reg()
        p.send_raw(frame(b"CID " + cid.encode())
                   + b"".join(pub_frame(topic, m) for m in msgs[:150])
                   + frame(b"PNG")
                   + b"".join(pub_frame(topic, m) for m in msgs[150:]))
        p.send_close_frame()
        p.wait_closed()
        # The id frame is the only thing a producer ever receives.
        assert bytes(p.raw_log) == frame(cid.encode())

    # Consumer: CID, SUB, SET 0, PNG in one segment, then read delivery frames.
    expected = b"".join(delivery_frame(topic, m) for m in msgs)
    with V0Client(srv.port) as c:
        c.raw_log = bytearray()
        c.send_raw(frame(b"CID " + str(uuid.uuid4()).encode()) + frame(b"SUB " + topic)
                   + frame(b"SET " + topic + b" 0") + frame(b"PNG"))
        got = c.read_deliveries(len(msgs))
        assert got == [(topic, m) for m in msgs]
        c.expect_silence(0.3)  # no POG, no offsets, nothing extra
        assert bytes(c.raw_log) == expected


def test_png_gets_no_reply_and_keeps_connection(server):
    srv = server()
    topic = _topic()
    with V0Client(srv.port) as c:
        c.cid()
        c.send_raw(frame(b"PNG") * 3)
        c.expect_silence(0.5)
        # Still open and working.
        c.sub(topic)
        c.pub(topic, b"after png")
        assert c.read_deliveries(1) == [(topic, b"after png")]
        c.expect_silence(0.2)


@pytest.mark.parametrize("message", [
    b"hello big wide world",
    b" leading space",
    b"trailing space ",
    b"   ",
    b"two  spaces  inside",
    b"SUB x",          # looks like a command
    b"PUB t m",        # looks like a frame body
    b"tabs\tand\nnewlines\r\n",
    "unicode: h\u00e9llo \u2713 \u4e16\u754c".encode(),
    b"",
], ids=lambda m: repr(m)[:24])
def test_message_is_everything_after_the_second_space(server, message):
    srv = server()
    topic = _topic()
    produce(srv.port, topic, [b"before", message, b"after"])
    with consumer(srv.port, topic, 0) as c:
        c.raw_log = bytearray()
        got = c.read_deliveries(3)
        assert got == [(topic, b"before"), (topic, message), (topic, b"after")]
        assert bytes(c.raw_log) == b"".join(
            delivery_frame(topic, m) for m in (b"before", message, b"after"))


def test_several_topics_on_one_connection_interleaved(server):
    srv = server()
    topics = [_topic() for _ in range(3)]
    n = 300
    with V0Client(srv.port) as p:
        p.cid(p.reg())
        # One producer connection, topics interleaved frame by frame.
        p.send_raw(b"".join(pub_frame(topics[i % 3], b"%d" % i) for i in range(n)))
        p.barrier()
    with V0Client(srv.port) as c:
        c.cid()
        c.send_raw(b"".join(frame(b"SUB " + t) + frame(b"SET " + t + b" 0") for t in topics))
        got = c.read_deliveries(n)
        c.expect_silence(0.2)
    for k, t in enumerate(topics):
        # Per topic: exactly the messages of that topic, in publish order.
        assert [m for (tt, m) in got if tt == t] == [b"%d" % i for i in range(k, n, 3)]
    assert {t for t, _ in got} == set(topics)


@pytest.mark.parametrize("ntopics", [2, 9, 40])
def test_every_subscribed_topic_is_delivered(server, ntopics):
    """One connection subscribed to many topics with a backlog each gets all of them.

    (Delivery is shared between a connection's subscriptions; none may be
    starved because the others were served first.)
    """
    srv = server()
    topics = [_topic() for _ in range(ntopics)]
    for t in topics:
        produce(srv.port, t, [b"only " + t])
    with V0Client(srv.port) as c:
        c.cid()
        c.send_raw(b"".join(frame(b"SUB " + t) + frame(b"SET " + t + b" 0") for t in topics))
        got = c.read_deliveries(ntopics, timeout=5)
        c.expect_silence(0.2)
    assert sorted(got) == sorted((t, b"only " + t) for t in topics)


def test_live_delivery_interleaves_topics(server):
    """A subscriber of several topics gets new messages of each as they come."""
    srv = server()
    a, b = _topic(), _topic()
    with V0Client(srv.port) as c, V0Client(srv.port) as p:
        c.cid()
        c.send_raw(frame(b"SUB " + a) + frame(b"SUB " + b))
        c.barrier()
        p.cid(p.reg())
        for i in range(20):
            p.pub(a if i % 2 == 0 else b, b"live-%d" % i)
            # Each message is pushed without waiting for more (no polling sleep).
            assert c.read_deliveries(1, timeout=5) == [(a if i % 2 == 0 else b, b"live-%d" % i)]


def test_frames_in_one_segment_are_applied_in_order(server):
    """CID, PUB m1, SUB, SET -1, PUB m2 in one segment: SET -1 comes after m1."""
    srv = server()
    t = _topic()
    with V0Client(srv.port) as c:
        c.send_raw(frame(b"CID " + str(uuid.uuid4()).encode())
                   + pub_frame(t, b"m1")
                   + frame(b"SUB " + t)
                   + frame(b"SET " + t + b" -1")
                   + pub_frame(t, b"m2")
                   + pub_frame(t, b"m3"))
        assert c.read_deliveries(2) == [(t, b"m2"), (t, b"m3")]
        c.expect_silence(0.3)


def test_frames_split_byte_by_byte(server):
    """A command sequence dribbled one byte per segment is handled identically.

    (No SET here on purpose: SUB starts delivery from the stored offset at
    once, so a SET arriving in a later segment legitimately rewinds and
    repeats; with SUB and SET in one segment there is no such window.)
    """
    srv = server()
    t = _topic()
    produce(srv.port, t, [b"zero"])
    data = (frame(b"CID " + str(uuid.uuid4()).encode()) + frame(b"SUB " + t)
            + frame(b"PNG") + pub_frame(t, b"one two") + pub_frame(t, b"three  four"))
    with V0Client(srv.port) as c:
        for i in range(len(data)):
            c.send_raw(data[i:i + 1])
            time.sleep(0.001)  # let each byte leave as its own segment
        assert c.read_deliveries(3) == [(t, b"zero"), (t, b"one two"), (t, b"three  four")]
        c.expect_silence(0.2)


def test_set_after_sub_in_a_later_segment_rewinds(server):
    """SET 0 is a rewind: sent after deliveries began, they start over from the oldest."""
    srv = server()
    t = _topic()
    produce(srv.port, t, [b"a", b"b"])
    with V0Client(srv.port) as c:
        c.cid()
        c.sub(t)
        assert c.read_deliveries(2) == [(t, b"a"), (t, b"b")]
        c.set_offset(t, 0)
        assert c.read_deliveries(2) == [(t, b"a"), (t, b"b")]
        c.set_offset(t, 1)
        assert c.read_deliveries(1) == [(t, b"b")]
        c.expect_silence(0.2)


def test_set_minus_one_gets_only_new_messages(server):
    srv = server()
    t = _topic()
    produce(srv.port, t, [b"old-%d" % i for i in range(5)])
    with consumer(srv.port, t, -1) as c:
        c.barrier()  # SET -1 is applied before anything new is published
        c.expect_silence(0.3)
        produce(srv.port, t, [b"new-0", b"new-1"])
        assert c.read_deliveries(2) == [(t, b"new-0"), (t, b"new-1")]
        c.expect_silence(0.2)


def test_set_n_starts_at_n(server):
    srv = server()
    t = _topic()
    produce(srv.port, t, [b"m%d" % i for i in range(10)])
    with consumer(srv.port, t, 7) as c:
        assert c.read_deliveries(3) == [(t, b"m7"), (t, b"m8"), (t, b"m9")]
        c.expect_silence(0.3)


def test_set_n_across_many_segments(server):
    """Reading from offset N lands on N when the topic spans many segments."""
    srv = server("--segment-bytes", "4096")
    t = _topic()
    n = 3000
    msgs = [make_message(i, 100) for i in range(n)]
    produce(srv.port, t, msgs)
    for start in (0, 1, 39, 40, 1234, 2999):
        with consumer(srv.port, t, start) as c:
            got = c.read_deliveries(n - start, timeout=20)
            assert got[0] == (t, msgs[start]), "SET %d delivered %r" % (start, got[0][1][:12])
            assert [m for _, m in got] == msgs[start:]
            c.expect_silence(0.1)
    # The restarted server rebuilds whatever index it keeps and still agrees.
    srv.restart()
    with consumer(srv.port, t, 2500) as c:
        assert [m for _, m in c.read_deliveries(500, timeout=20)] == msgs[2500:]
        c.expect_silence(0.1)


def test_no_stored_offset_starts_at_oldest(server):
    srv = server()
    t = _topic()
    produce(srv.port, t, [b"a", b"b", b"c"])
    with consumer(srv.port, t, offset=None) as c:  # CID, SUB, no SET
        assert c.read_deliveries(3) == [(t, b"a"), (t, b"b"), (t, b"c")]
        c.expect_silence(0.2)


def test_sub_before_topic_exists_gets_first_messages(server):
    srv = server()
    t = _topic()
    with consumer(srv.port, t, offset=None) as c:
        c.barrier()
        produce(srv.port, t, [b"first", b"second"])
        assert c.read_deliveries(2) == [(t, b"first"), (t, b"second")]


def test_reconnect_with_same_cid_resumes_after_what_was_delivered(server):
    srv = server()
    t = _topic()
    produce(srv.port, t, [b"m%d" % i for i in range(10)])
    cid = str(uuid.uuid4())
    with consumer(srv.port, t, 0, client_id=cid) as c:
        assert [m for _, m in c.read_deliveries(10)] == [b"m%d" % i for i in range(10)]
        c.expect_silence(0.2)
        c.send_close_frame()
        c.wait_closed()
    produce(srv.port, t, [b"m%d" % i for i in range(10, 15)])
    with consumer(srv.port, t, offset=None, client_id=cid) as c:
        assert [m for _, m in c.read_deliveries(5)] == [b"m%d" % i for i in range(10, 15)]
        c.expect_silence(0.2)
    # Also after an abrupt disconnect (no close frame) of an idle consumer.
    with consumer(srv.port, t, offset=None, client_id=cid) as c:
        c.barrier()
        c.abort()
    produce(srv.port, t, [b"m15"])
    with consumer(srv.port, t, offset=None, client_id=cid) as c:
        assert c.read_deliveries(1) == [(t, b"m15")]
        c.expect_silence(0.2)


@pytest.mark.parametrize("leave", ["close_frame", "idle_then_reset"])
def test_resume_exact_after_reading_a_large_backlog(server, leave):
    """A consumer that received everything resumes after everything.

    With a tiny receive buffer, most of the backlog waits in the server's
    transport buffer when its delivery step ends: offsets must still catch
    up once those bytes have gone out, not stay where that last delivery
    step left them. v0 allows redelivering what was in flight
    when a connection died; here nothing was in flight.
    """
    srv = server()
    t = _topic()
    n = 20_000  # 20 MB through a 4 KB window: the kernel buffers are full at the end
    produce(srv.port, t, (make_message(i) for i in range(n)))
    cid = str(uuid.uuid4())
    with consumer(srv.port, t, 0, client_id=cid, rcvbuf=4096) as c:
        time.sleep(0.3)  # the server writes it all; most waits in its transport buffer
        got = c.read_deliveries(n, timeout=30)
        assert [m for _, m in got] == [make_message(i) for i in range(n)]
        c.expect_silence(0.5)  # idle: every byte written long ago reached us
        if leave == "close_frame":
            c.send_close_frame()
            c.wait_closed()
        else:
            c.abort()
    with consumer(srv.port, t, offset=None, client_id=cid) as c:
        c.barrier()
        c.expect_silence(0.3)
        produce(srv.port, t, [b"next"])
        assert c.read_deliveries(1) == [(t, b"next")]


def test_offsets_are_per_client_and_topic(server):
    srv = server()
    t1, t2 = _topic(), _topic()
    produce(srv.port, t1, [b"a0", b"a1", b"a2"])
    produce(srv.port, t2, [b"b0", b"b1"])
    x, y = str(uuid.uuid4()), str(uuid.uuid4())
    with consumer(srv.port, t1, 0, client_id=x) as c:
        assert len(c.read_deliveries(3)) == 3
        c.barrier()
    # x has consumed t1 but not t2; y has consumed nothing.
    with consumer(srv.port, t2, offset=None, client_id=x) as c:
        assert c.read_deliveries(2) == [(t2, b"b0"), (t2, b"b1")]
    with consumer(srv.port, t1, offset=None, client_id=y) as c:
        assert [m for _, m in c.read_deliveries(3)] == [b"a0", b"a1", b"a2"]


def test_cid_supersedes_older_connection(server):
    srv = server()
    t = _topic()
    produce(srv.port, t, [b"m0", b"m1", b"m2"])
    cid = str(uuid.uuid4())
    first = consumer(srv.port, t, 0, client_id=cid)
    try:
        assert [m for _, m in first.read_deliveries(3)] == [b"m0", b"m1", b"m2"]
        first.barrier()
        with consumer(srv.port, t, offset=None, client_id=cid) as second:
            second.barrier()  # the supersession has happened
            produce(srv.port, t, [b"m3", b"m4", b"m5"])
            # The new connection resumes where the old one stopped...
            assert [m for _, m in second.read_deliveries(3)] == [b"m3", b"m4", b"m5"]
            # ...and the old one gets nothing more (it may be closed or left idle).
            try:
                late = first.read_available(quiet=0.5)
            except ConnectionClosed:
                late = []
            assert [d for d in late if d[0] == t] == []
    finally:
        first.close()


@pytest.mark.parametrize("body", [
    b"SUB t-early", b"SET t-early 0", b"PNG", b"PUB",
], ids=["SUB", "SET", "PNG", "PUB"])
def test_command_before_reg_or_cid_closes_connection(server, body):
    srv = server()
    with V0Client(srv.port) as c:
        if body == b"PUB":
            c.send_raw(pub_frame(b"t-early", b"must not be stored"))
        else:
            c.send_raw(frame(body))
        c.wait_closed(5)
        assert not c.inbox
    # A PUB sent before CID is not stored.
    with consumer(srv.port, b"t-early", 0) as c:
        c.barrier()
        produce(srv.port, b"t-early", [b"sentinel"])
        assert c.read_deliveries(1) == [(b"t-early", b"sentinel")]
    # The server is unaffected.
    with V0Client(srv.port) as c:
        c.reg()


def test_zero_length_frame_closes_connection(server):
    srv = server()
    t = _topic()
    with V0Client(srv.port) as c:
        c.cid()
        c.pub(t, b"kept")
        # Anything after the close frame, even in the same segment, is ignored.
        c.send_raw(b"\x00\x00\x00\x00" + pub_frame(t, b"after close"))
        c.wait_closed(5)
    with V0Client(srv.port) as c:
        c.send_raw(b"\x00\x00\x00\x00")  # also before REG/CID
        c.wait_closed(5)
    with consumer(srv.port, t, 0) as c:
        assert c.read_deliveries(1) == [(t, b"kept")]
        c.barrier()
        produce(srv.port, t, [b"sentinel"])
        assert c.read_deliveries(1) == [(t, b"sentinel")]


def test_client_closing_without_close_frame(server):
    """A producer that just closes its socket: what it sent is still stored."""
    srv = server()
    t = _topic()
    with V0Client(srv.port) as p:
        p.cid(p.reg())
        p.pub_many(t, [b"x%d" % i for i in range(100)])
    with consumer(srv.port, t, 0) as c:
        assert [m for _, m in c.read_deliveries(100)] == [b"x%d" % i for i in range(100)]


def test_many_consumers_of_one_topic(server):
    srv = server()
    t = _topic()
    cs = [consumer(srv.port, t, 0) for _ in range(20)]
    try:
        for c in cs:
            c.barrier()
        produce(srv.port, t, [b"x%d" % i for i in range(50)])
        for c in cs:
            assert [m for _, m in c.read_deliveries(50)] == [b"x%d" % i for i in range(50)]
    finally:
        for c in cs:
            c.close()


def test_pure_flag_forces_the_pure_codec(server, impl):
    """``--pure`` forces the pure codec whatever the build."""
    if impl != "c":
        pytest.skip("only meaningful for the compiled build")
    srv = server("--pure", start=False)
    srv.expect_codec = "python"  # same environment as `c`, but --pure
    srv.start()
    with V0Client(srv.port) as c:
        c.reg()


def test_ready_line_port_is_really_listening(server):
    srv = server()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    s.close()
    assert srv.stdout_lines == [] or all(not line.strip() for line in srv.stdout_lines)
