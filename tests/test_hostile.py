"""Hostile input against a live broker, v0 and v1.

Every case checks four things: the documented answer (v1: an ERR frame
with the code of docs/protocol.md, the connection kept or closed as the
table there says; v0: ignored, or the connection closed, and counted), the
broker still up, nothing bad stored (no partial message, no message with a
bad CRC, no file outside the data dir), and a bystander client on its own
connections publishing and consuming undisturbed before, during (for the
long cases) and after.

One broker per implementation serves most cases (``hostile``); limits that
must be small get their own. test_bad_input.py (v0 suite) covers more v0
argument shapes; this file is the cross-protocol hostile suite.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
import uuid
import zlib
from pathlib import Path

import pytest

from reliability import (
    Bystander, expect_err, read_topic, rss_kb, sandbox_paths, start_server, stats,
    stop_quietly, topics)
from v0client import V0Client, frame as v0frame, pub_frame
from v1support import (
    BAD_CRC, BAD_FRAME, BAD_REQUEST, FRAME_TOO_LARGE, INVALID_OFFSET,
    INVALID_TOPIC, LATEST, NOT_SUBSCRIBED, OFFSET, OLDEST, TIME,
    UNKNOWN_COMMAND, UNSUPPORTED_VERSION, V1Conn, cmt, frame, hel, pub, s,
    spec)

pytestmark = pytest.mark.integration

LIMIT_EXCEEDED = 13
MAX_FRAME = 65536
READ_TIMEOUT = 1.0
CASES = {"tried": 0}  # hostile cases sent, reported at the end of the module


def u32(n: int) -> bytes:
    return struct.pack(">I", n & 0xFFFFFFFF)


def unique(prefix: str = "h") -> str:
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


@pytest.fixture(scope="module")
def hostile(impl, tmp_path_factory):
    srv = start_server(
        impl, tmp_path_factory.mktemp("hostile-" + impl), "hostile",
        "--max-frame-bytes", str(MAX_FRAME), "--read-timeout", str(READ_TIMEOUT),
        "--max-subscriptions", "10050", "--max-topics", "30000", "--heartbeat-timeout", "60")
    tried_before = CASES["tried"]
    yield srv
    alive = srv.running()
    paths = sandbox_paths(srv)
    stop_quietly(srv)
    print("\nhostile cases tried (%s): %d" % (impl, CASES["tried"] - tried_before))
    assert alive, "the broker died during the hostile suite\n%s" % srv.log_tail(60)
    # Nothing but the data dir in the server's working directory.
    assert all(p == "data" or p.startswith("data" + os.sep) for p in paths), paths


@pytest.fixture(scope="module")
def big(impl, tmp_path_factory):
    """For the 10,000-subscription cases: the default --read-timeout (30 s).

    With the hostile broker's 1 s, the pure codec spends long enough on one
    256 kB chunk of SUB frames that the chunk's trailing partial frame is
    older than 1 s when the liveness timer runs (timers run before reads
    in a loop iteration): the read timeout counts the broker's own
    processing time, so it must stay well above it (docs/security.md).
    """
    srv = start_server(impl, tmp_path_factory.mktemp("big-" + impl), "big",
                       "--max-subscriptions", "10050", "--max-topics", "30000")
    yield srv
    alive = srv.running()
    stop_quietly(srv)
    assert alive, "the broker died\n%s" % srv.log_tail(60)


@pytest.fixture(scope="module")
def bystander(hostile):
    with Bystander(hostile.port) as b:
        b.check()
        yield b
        b.check()


@pytest.fixture
def innocent(hostile, bystander):
    """The bystander works before and after each case; the broker is up."""
    bystander.check()
    yield bystander
    assert hostile.running(), hostile.log_tail(40)
    bystander.check()


# -- v1: malformed frames --------------------------------------------------------

# (id, bytes sent after a good HEL, error code, closes the connection)
V1_FRAMING = [
    ("len-1", u32(1) + b"P", BAD_FRAME, True),
    ("len-3", u32(3) + b"PNG", BAD_FRAME, True),
    ("len-6", u32(6) + b"PNG\x00\x00\x00", BAD_FRAME, True),
    ("len-limit+1", u32(MAX_FRAME + 1) + b"PUB\x00\x00\x00\x07", FRAME_TOO_LARGE, True),
    ("len-2GiB", u32(0x80000000) + b"PUB", FRAME_TOO_LARGE, True),
    ("len-0xFFFFFFFF", u32(0xFFFFFFFF) + b"PUB\x00\x00\x00\x07", FRAME_TOO_LARGE, True),
    ("len-0xFFFFFFFF-alone", u32(0xFFFFFFFF), FRAME_TOO_LARGE, True),
]

V1_REQUESTS = [
    ("unknown-XYZ", frame(b"XYZ", 7), UNKNOWN_COMMAND),
    ("unknown-lowercase", frame(b"pub", 7, pub("t", [b"x"])), UNKNOWN_COMMAND),
    ("unknown-NUL", frame(b"\x00\x00\x00", 7), UNKNOWN_COMMAND),
    ("server-kind-RES", frame(b"RES", 7), UNKNOWN_COMMAND),
    ("server-kind-ACK", frame(b"ACK", 7, b"\x00" * 12), UNKNOWN_COMMAND),
    ("server-kind-ERR", frame(b"ERR", 7, b"\x00\x01\x00\x00"), UNKNOWN_COMMAND),
    ("server-kind-MSG", frame(b"MSG", 7, s("t") + u32(0)), UNKNOWN_COMMAND),
    ("server-kind-POG", frame(b"POG", 7), UNKNOWN_COMMAND),
    ("second-HEL", frame(b"HEL", 7, hel(1, b"again")), BAD_REQUEST),
    ("PUB-empty", frame(b"PUB", 7), BAD_REQUEST),
    ("PUB-truncated-topic", frame(b"PUB", 7, b"\x00\x10ab"), BAD_REQUEST),
    ("PUB-no-count", frame(b"PUB", 7, s("t")), BAD_REQUEST),
    ("PUB-count-huge", frame(b"PUB", 7, s("t") + u32(0xFFFFFFFF)), BAD_REQUEST),
    ("PUB-count-short", frame(b"PUB", 7, pub("t", [b"a", b"b"])[:-1]), BAD_REQUEST),
    ("PUB-count-mismatch", frame(b"PUB", 7, s("t") + u32(3) + pub("t", [b"a"])[3 + 4:]),
     BAD_REQUEST),
    ("PUB-trailing", frame(b"PUB", 7, pub("t", [b"a"]) + b"junk"), BAD_REQUEST),
    ("PUB-item-len-huge", frame(b"PUB", 7, s("t") + u32(1) + u32(0xFFFFFFF0) + u32(0) + b"x"),
     BAD_REQUEST),
    ("SUB-no-spec", frame(b"SUB", 7, s("t")), BAD_REQUEST),
    ("SUB-short-spec", frame(b"SUB", 7, s("t") + b"\x03\x00"), BAD_REQUEST),
    ("SUB-mode-9", frame(b"SUB", 7, spec("t-mode", 9, 0)), INVALID_OFFSET),
    ("SUB-mode-255", frame(b"SUB", 7, spec("t-mode", 255, 0)), INVALID_OFFSET),
    ("SUB-offset--1", frame(b"SUB", 7, spec("t-neg", OFFSET, -1)), INVALID_OFFSET),
    ("SUB-offset-min-i64", frame(b"SUB", 7, spec("t-neg", OFFSET, -2**63)), INVALID_OFFSET),
    ("SEK-unsubscribed", frame(b"SEK", 7, spec("t-nosub", OFFSET, 0)), NOT_SUBSCRIBED),
    ("UNS-unsubscribed", frame(b"UNS", 7, s("t-nosub")), NOT_SUBSCRIBED),
    ("UNS-empty", frame(b"UNS", 7), BAD_REQUEST),
    ("CMT-beyond-end", frame(b"CMT", 7, cmt("t-cmt", 5)), INVALID_OFFSET),
    ("CMT-u64-max", frame(b"CMT", 7, cmt("t-cmt", 2**64 - 1)), INVALID_OFFSET),
    ("CMT-truncated", frame(b"CMT", 7, s("t-cmt") + b"\x00\x00"), BAD_REQUEST),
    ("OFS-truncated", frame(b"OFS", 7, b"\x00\x09ab"), BAD_REQUEST),
    ("AUT-truncated", frame(b"AUT", 7, b"\x00\x05al"), BAD_REQUEST),
]

HOSTILE_TOPICS = [
    b"", b".", b"..", b"../x", b"../../../../tmp/pylogstreams-escape", b"/tmp/pylogstreams-abs",
    b"/etc/passwd", b"a/b", b"a\\b", b"a\x00b", b"\x00", b"x" * 201, b"x" * 60000, b"\xff\xfe",
    "caf\u00e9".encode(), b"a b", b"\n", b"~", b"*", b"topics/../../x", b"%2e%2e", b"./x",
]


@pytest.mark.parametrize("name,data,code,closes", V1_FRAMING, ids=[c[0] for c in V1_FRAMING])
def test_v1_broken_framing_gets_error_and_close(hostile, innocent, name, data, code, closes):
    with V1Conn(hostile.port) as c:
        c.hello()
        c.send_raw(data)
        CASES["tried"] += 1
        frames = c.wait_closed(5)
    assert len(frames) == 1, frames
    kind, rid, payload = frames[0]
    assert (kind, rid) == (b"ERR", 0)
    assert struct.unpack_from(">H", payload)[0] == code


@pytest.mark.parametrize("name,data,code", V1_REQUESTS, ids=[c[0] for c in V1_REQUESTS])
def test_v1_bad_request_gets_error_connection_stays(hostile, innocent, name, data, code):
    with V1Conn(hostile.port) as c:
        c.hello()
        c.send_raw(data)
        CASES["tried"] += 1
        text = expect_err(c, 7, code)
        assert text
        c.ping()  # the connection is still served
        # ... and can still publish and read.
        t = unique()
        base, n = c.publish(t, [b"after " + name.encode()])
        assert n == 1
    assert read_topic(hostile.port, t) == [(base, b"after " + name.encode())]
    for bad in ("t", "t-cmt", "t-mode", "t-neg", "t-nosub"):
        info = topics(hostile.port).get(bad)
        assert info is None or info["messages"] == 0, "%s got messages: %r" % (bad, info)


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_v1_unsupported_version_closes(hostile, innocent, version):
    with V1Conn(hostile.port) as c:
        c.send_raw(frame(b"HEL", 1, hel(version, b"x")))
        CASES["tried"] += 1
        frames = c.wait_closed(5)
    assert [(k, r, struct.unpack_from(">H", p)[0]) for k, r, p in frames] == [
        (b"ERR", 1, UNSUPPORTED_VERSION)]


def test_v1_nothing_pipelined_after_a_fatal_error_is_executed(hostile, innocent):
    """HEL v2, then a good HEL and a PUB in the same segment: only the ERR happens."""
    t = unique("sneaky")
    for first in (frame(b"HEL", 1, hel(2)), frame(b"HEL", 1, b"\x00"), u32(3) + b"HEL"):
        with V1Conn(hostile.port) as c:
            c.send_raw(first + frame(b"HEL", 2, hel(1, b"y")) + frame(b"PUB", 3, pub(t, [b"m"])))
            CASES["tried"] += 1
            frames = c.wait_closed(5)
        assert [f[0] for f in frames] == [b"ERR"], frames
    assert t not in topics(hostile.port)


def test_v1_bad_hel_payloads(hostile, innocent):
    """An error in HEL closes the connection (docs/protocol.md)."""
    for payload, code in ((hel(1, b"y" * 256), BAD_REQUEST),   # client id over 255 bytes
                          (b"\x00", BAD_REQUEST),               # no version
                          (b"\x00\x01\x00\x09ab", BAD_REQUEST),  # truncated client id
                          (b"", BAD_REQUEST)):
        with V1Conn(hostile.port) as c:
            c.send_raw(frame(b"HEL", 1, payload) + frame(b"PNG", 2))
            frames = c.wait_closed(5)
            CASES["tried"] += 1
        assert [(k, r, struct.unpack_from(">H", p)[0]) for k, r, p in frames] == [(b"ERR", 1, code)]


def test_v1_bad_crc_batch_is_refused_whole(hostile, innocent):
    t = unique("crc")
    with V1Conn(hostile.port) as c:
        c.hello()
        for bad_index in (0, 1, 2):
            rid = c.send(b"PUB", pub(t, [b"a", b"b", b"c"], crcs={bad_index: 0xDEADBEEF}))
            text = expect_err(c, rid, BAD_CRC)
            assert str(bad_index) in text
            CASES["tried"] += 1
        # One flipped bit in the message body, CRC of the original.
        payload = bytearray(pub(t, [b"hello"]))
        payload[-1] ^= 0x01
        rid = c.send(b"PUB", bytes(payload))
        expect_err(c, rid, BAD_CRC)
        CASES["tried"] += 1
        # Checked before the topic is looked up: no topic for refused batches.
        assert t not in {row["topic"] for row in c.json(b"TOP")}
        base, n = c.publish(t, [b"good"])
    assert (base, n) == (0, 1), "a refused batch took offsets"
    assert read_topic(hostile.port, t) == [(0, b"good")]


def test_v1_hostile_topic_names(hostile, innocent):
    before = sandbox_paths(hostile)
    with V1Conn(hostile.port) as c:
        c.hello()
        for name in HOSTILE_TOPICS:
            for kind, payload in ((b"PUB", pub(name, [b"evil"])),
                                  (b"SUB", s(name) + struct.pack(">Bq", OLDEST, 0)),
                                  (b"CMT", s(name) + struct.pack(">Q", 0)),
                                  (b"SEK", s(name) + struct.pack(">Bq", OLDEST, 0)),
                                  (b"UNS", s(name))):
                rid = c.send(kind, payload)
                code = NOT_SUBSCRIBED if kind in (b"SEK", b"UNS") else INVALID_TOPIC
                expect_err(c, rid, code)
                CASES["tried"] += 1
        c.ping()
    after = sandbox_paths(hostile)
    new = [p for p in after if p not in before]
    topics_dir = os.path.join("data", "topics")
    for p in new:
        assert p.startswith(topics_dir + os.sep) and "evil" not in p, p
    assert not Path("/tmp/pylogstreams-escape").exists()
    assert not Path("/tmp/pylogstreams-abs").exists()
    for name in topics(hostile.port):
        assert all(ch.isalnum() or ch in "._-" for ch in name) and name not in (".", ".."), name


# -- v1: offsets -----------------------------------------------------------------

def test_v1_negative_and_huge_offsets(hostile, innocent):
    t = unique("off")
    with V1Conn(hostile.port) as c:
        c.hello()
        c.publish(t, [b"m0", b"m1", b"m2"])
        # SUB at the largest offset: clamped to the end, then new messages arrive.
        rid, start = c.subscribe(t, OFFSET, 2**63 - 1)
        assert start == 3
        c.publish(t, [b"m3"])
        assert [m[2] for m in c.read_messages(1, rid)] == [b"m3"]
        # SEK: -1 refused, 2**63-1 clamped, -2**63 refused, a time far in the future.
        rid2 = c.send(b"SEK", spec(t, OFFSET, -1))
        expect_err(c, rid2, INVALID_OFFSET)
        rid2 = c.send(b"SEK", spec(t, OFFSET, -2**63))
        expect_err(c, rid2, INVALID_OFFSET)
        assert struct.unpack(">Q", c.request(b"SEK", spec(t, OFFSET, 2**63 - 1)))[0] == 4
        assert struct.unpack(">Q", c.request(b"SEK", spec(t, TIME, 2**63 - 1)))[0] == 4
        assert struct.unpack(">Q", c.request(b"SEK", spec(t, TIME, -2**63)))[0] == 0
        assert [m[2] for m in c.read_messages(4, rid)] == [b"m0", b"m1", b"m2", b"m3"]
        rid2 = c.send(b"SEK", spec(t, 77, 0))
        expect_err(c, rid2, INVALID_OFFSET)
        # Back to 1: m1.. are delivered again, in order.
        assert struct.unpack(">Q", c.request(b"SEK", spec(t, OFFSET, 1)))[0] == 1
        assert [m[2] for m in c.read_messages(3, rid)] == [b"m1", b"m2", b"m3"]
        # Commit at the end is allowed, one past it is not.
        c.request(b"CMT", cmt(t, 4))
        rid2 = c.send(b"CMT", cmt(t, 5))
        expect_err(c, rid2, INVALID_OFFSET)
        CASES["tried"] += 9
    with V1Conn(hostile.port) as c:
        c.hello()
        rid = c.send(b"SUB", spec(t, OFFSET, -1))
        expect_err(c, rid, INVALID_OFFSET)
        rid, start = c.subscribe(t, LATEST)
        assert start == 4
        CASES["tried"] += 1


def test_v0_negative_and_huge_offsets(hostile, innocent):
    t = unique("off0").encode()
    with V0Client(hostile.port) as p:
        p.cid()
        p.pub_many(t, [b"m0", b"m1", b"m2"])
        p.barrier()
    before = stats(hostile.port)["malformed"]
    with V0Client(hostile.port) as c:
        c.cid()
        c.send_raw(v0frame(b"SUB " + t) + v0frame(b"SET " + t + b" 1"))
        assert [m for _, m in c.read_deliveries(2, topic=t)] == [b"m1", b"m2"]
        # Refused: ignored, the subscription goes on where it was.
        for bad in (b"-5", b"-2", b"99999999999999999999", b"9223372036854775808", b"abc",
                    b"1e9", b"0x10"):
            c.send_raw(v0frame(b"SET " + t + b" " + bad))
            CASES["tried"] += 1
        c.barrier()
        c.expect_silence(0.2)
        with V0Client(hostile.port) as p:
            p.cid()
            p.pub(t, b"m3")
            p.barrier()
        assert [m for _, m in c.read_deliveries(1, topic=t)] == [b"m3"]
        # A huge but valid offset is clamped to the end: only new messages.
        c.send_raw(v0frame(b"SET " + t + b" 9223372036854775807"))
        CASES["tried"] += 1
        c.barrier()
        c.expect_silence(0.2)
        with V0Client(hostile.port) as p:
            p.cid()
            p.pub(t, b"m4")
        assert [m for _, m in c.read_deliveries(1, topic=t)] == [b"m4"]
    assert stats(hostile.port)["malformed"] - before >= 7


# -- v0: malformed frames ----------------------------------------------------------

V0_CLOSING = [
    ("zero-length", u32(0)),
    ("len-limit+1", u32(MAX_FRAME + 1) + b"PUB t x"),
    ("len-0xFFFFFFFF", u32(0xFFFFFFFF) + b"PUB t x"),
    ("len-0xFFFFFFFF-alone", u32(0xFFFFFFFF)),
    ("len-2GiB", u32(0x80000000)),
]

V0_IGNORED = [
    ("unknown", v0frame(b"XYZ hello")),
    ("unknown-binary", v0frame(b"\xff\xfe\x00\x01")),
    ("no-space", v0frame(b"SUBtopic")),
    ("HEL-after-CID", v0frame(b"HEL \x00\x01\x00\x00")),
    ("CID-empty", v0frame(b"CID")),
    ("CID-too-long", v0frame(b"CID " + b"c" * 256)),
    ("SUB-empty", v0frame(b"SUB ")),
    ("SET-no-offset", v0frame(b"SET t")),
    ("PUB-no-message", u32(5) + b"PUB t" + u32(0)),
    ("PUB-empty-topic", u32(7) + b"PUB  xy" + u32(zlib.crc32(b"xy"))),
    ("PUB-bad-crc", pub_frame(b"crc-v0", b"payload", crc=0x12345678)),
    ("PUB-invalid-topic", pub_frame(b"../evil", b"payload")),
    ("SUB-invalid-topic", v0frame(b"SUB /etc/passwd")),
    ("SET-invalid-topic", v0frame(b"SET a\x00b 0")),
    ("PNG-with-args", v0frame(b"PNG extra")),
]


@pytest.mark.parametrize("name,data", V0_CLOSING, ids=[c[0] for c in V0_CLOSING])
def test_v0_framing_errors_close(hostile, innocent, name, data):
    with V0Client(hostile.port) as c:
        c.cid()
        c.send_raw(data)
        CASES["tried"] += 1
        c.wait_closed(5)
        assert not c.inbox and not c._buf, "a v0 client got bytes before the close"


@pytest.mark.parametrize("name,data", V0_IGNORED, ids=[c[0] for c in V0_IGNORED])
def test_v0_bad_commands_ignored_connection_stays(hostile, innocent, name, data):
    with V0Client(hostile.port) as c:
        c.cid()
        c.raw_log = bytearray()
        c.send_raw(data)
        CASES["tried"] += 1
        c.barrier()  # later commands on the same connection still work
        c.expect_silence(0.1)
        # Nothing but the barrier's own delivery came back: v0 has no errors.
        assert c.raw_log.count(b"barrier-") == 1, bytes(c.raw_log[:200])
    info = topics(hostile.port)
    assert info.get("crc-v0", {"messages": 0})["messages"] == 0


def test_v0_command_before_identification_closes(hostile, innocent):
    for body in (b"SUB t", b"SET t 0", b"PNG", b"XYZ"):
        with V0Client(hostile.port) as c:
            c.send_raw(v0frame(body))
            CASES["tried"] += 1
            c.wait_closed(5)
    with V0Client(hostile.port) as c:
        c.send_raw(pub_frame(b"unidentified", b"x"))
        CASES["tried"] += 1
        c.wait_closed(5)
    assert "unidentified" not in topics(hostile.port)


# -- truncated streams --------------------------------------------------------------

def _cut_everywhere(port: int, make_stream, n_cuts: int) -> None:
    """Connection ``cut`` sends ``make_stream(cut)[:cut]`` and closes.

    Odd cuts close with FIN, even ones with RST (the kernel may then drop
    what the broker had not read yet: for those, less may be stored).
    """
    for cut in range(n_cuts):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            sock.sendall(make_stream(cut)[:cut])
            if cut % 2 == 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            sock.close()
        CASES["tried"] += 1


def _check_cuts(port: int, topic: str, units, n_cuts: int, unit_ends) -> None:
    """Every cut stored a prefix of its whole units (all of them when closed by FIN).

    ``units(cut)`` are the message lists (one per frame) of connection
    ``cut``; ``unit_ends[i]`` is the stream position where frame ``i`` ends.
    """
    must = {m for cut in range(1, n_cuts, 2)
            for u, end in zip(units(cut), unit_ends) if end <= cut for m in u}
    deadline = time.monotonic() + 15
    while True:  # v0 has no acks: wait until what must be stored is
        stored = read_topic(port, topic)
        if must <= {v for _, v in stored} or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [off for off, _ in stored] == list(range(len(stored))), "offsets not contiguous"
    values = [v for _, v in stored]
    assert len(set(values)) == len(values), "a message stored twice"
    where = {v: i for i, v in enumerate(values)}
    for cut in range(n_cuts):
        complete = [u for u, end in zip(units(cut), unit_ends) if end <= cut]
        partial = [u for u, end in zip(units(cut), unit_ends) if end > cut]
        got = [[m in where for m in u] for u in complete]
        for u in partial:
            assert not any(m in where for m in u), "cut %d: a partial frame was stored" % cut
        for flags in got:
            assert all(flags) or not any(flags), "cut %d: part of a batch stored" % cut
        stored_units = [all(f) for f in got]
        assert stored_units == sorted(stored_units, reverse=True), (
            "cut %d: a later frame stored without an earlier one" % cut)
        if cut % 2:
            assert all(stored_units), "cut %d (FIN): a complete frame was not stored" % cut
        # In order within the connection.
        flat = [m for u, ok in zip(complete, stored_units) if ok for m in u]
        assert [where[m] for m in flat] == sorted(where[m] for m in flat), "cut %d: order" % cut


def test_v0_stream_cut_at_every_byte(hostile, innocent):
    """A producer's stream cut at each position: only whole PUB frames are stored."""
    t = unique("cut0").encode()
    head = v0frame(b"CID cutter")

    def units(cut):
        return [[b"first message %03d" % cut], [b"second, with spaces %03d" % cut],
                [b"3rd %03d" % cut]]

    def stream(cut):
        return head + b"".join(pub_frame(t, u[0]) for u in units(cut))

    ends, pos = [], len(head)
    for u in units(0):
        pos += len(pub_frame(t, u[0]))
        ends.append(pos)
    n = len(stream(0))
    _cut_everywhere(hostile.port, stream, n)
    _check_cuts(hostile.port, t.decode(), units, n, ends)


def test_v1_stream_cut_at_every_byte(hostile, innocent):
    """The same for v1: a batch is stored whole or not at all."""
    t = unique("cut1")
    head = frame(b"HEL", 1, hel(1, b"cutter"))

    def units(cut):
        return [[b"a1 %03d" % cut, b"a2 with more bytes %03d" % cut], [b"b1 %03d" % cut],
                [b"c1 %03d" % cut, b"c2 %03d" % cut, b"c3 %03d" % cut]]

    def stream(cut):
        return head + b"".join(frame(b"PUB", i + 2, pub(t, u)) for i, u in enumerate(units(cut)))

    ends, pos = [], len(head)
    for i, u in enumerate(units(0)):
        pos += len(frame(b"PUB", i + 2, pub(t, u)))
        ends.append(pos)
    n = len(stream(0))
    _cut_everywhere(hostile.port, stream, n)
    _check_cuts(hostile.port, t, units, n, ends)


# -- 10,000 subscriptions, limits ----------------------------------------------------

def test_v1_subscription_to_10000_topics(big):
    prefix = unique("many")
    names = ["%s.%05d" % (prefix, i) for i in range(10_000)]
    innocent = Bystander(big.port)
    base_subs = stats(big.port)["subscriptions"]
    with innocent, V1Conn(big.port, timeout=60) as c:
        c.hello()
        c.send_raw(b"".join(frame(b"SUB", 1000 + i, spec(n, OLDEST, 0))
                            for i, n in enumerate(names)))
        CASES["tried"] += 1
        for i in range(len(names)):
            k, rid, p = c.read_frame(60)
            assert (k, rid) == (b"RES", 1000 + i), (k, rid, p[:40])
        innocent.check()  # served while one connection holds 10,000 subscriptions
        assert stats(big.port)["subscriptions"] == base_subs + 10_000
        chosen = names[::997]
        with V1Conn(big.port) as p:
            p.hello()
            for n in chosen:
                p.publish(n, [n.encode()])
        got = {}
        while len(got) < len(chosen):
            k, rid, payload = c.read_frame(30)
            assert k == b"MSG"
            from v1support import parse_msg
            topic, recs = parse_msg(payload)
            got[topic.decode()] = [r[2] for r in recs]
            assert rid == 1000 + names.index(topic.decode())
        assert got == {n: [n.encode()] for n in chosen}
    deadline = time.monotonic() + 10
    while stats(big.port)["subscriptions"] != base_subs - 1:  # the bystander's is gone too
        assert time.monotonic() < deadline, "subscriptions not released after the close"
        time.sleep(0.05)


def test_v0_subscription_to_10000_topics(big):
    prefix = unique("many0")
    names = [("%s.%05d" % (prefix, i)).encode() for i in range(10_000)]
    with Bystander(big.port) as innocent, V0Client(big.port, timeout=60) as c:
        c.cid()
        c.send_raw(b"".join(v0frame(b"SUB " + n) for n in names))
        CASES["tried"] += 1
        c.barrier(timeout=60)
        chosen = names[::1999]
        with V0Client(big.port) as p:
            p.cid()
            for n in chosen:
                p.pub(n, b"hello " + n)
        got = c.read_deliveries(len(chosen), timeout=30)
        assert sorted(got) == sorted((n, b"hello " + n) for n in chosen)
        innocent.check()


def test_subscription_limit_refused(server):
    limited = server("--max-subscriptions", "100")
    prefix = unique("lim")
    with Bystander(limited.port) as by, V1Conn(limited.port) as c:
        c.hello()
        for i in range(100):
            c.request(b"SUB", spec("%s.%d" % (prefix, i), OLDEST, 0))
        rid = c.send(b"SUB", spec(prefix + ".over", OLDEST, 0))
        text = expect_err(c, rid, LIMIT_EXCEEDED)
        assert "max-subscriptions" in text
        CASES["tried"] += 1
        by.check()
        # UNS frees a slot.
        c.request(b"UNS", s(prefix + ".0"))
        c.request(b"SUB", spec(prefix + ".over", OLDEST, 0))
    # v0: the 101st SUB is ignored (and counted): nothing is delivered for it.
    before = stats(limited.port).get("refused_subscriptions", 0)
    names = [b"%s.v0.%d" % (prefix.encode(), i) for i in range(101)]
    with V0Client(limited.port) as c:
        c.cid()
        c.send_raw(b"".join(v0frame(b"SUB " + n) for n in names))
        CASES["tried"] += 1
        with V1Conn(limited.port) as p:
            p.hello()
            p.publish(names[99].decode(), [b"in"])
            p.publish(names[100].decode(), [b"over"])
        assert c.read_deliveries(1) == [(names[99], b"in")]
        c.expect_silence(0.3)
    assert stats(limited.port)["refused_subscriptions"] - before == 1
    assert "max-subscriptions" in limited.log_text()


def test_topic_creation_flood_vs_max_topics(server):
    limited = server("--max-topics", "60")
    prefix = unique("flood")
    with Bystander(limited.port) as by:
        room = 60 - len(topics(limited.port))
        with V1Conn(limited.port) as c:
            c.hello()
            acked = refused = 0
            for i in range(room + 30):
                rid = c.send(b"PUB", pub("%s.%d" % (prefix, i), [b"x"]))
                k, r, p = c.reply(rid)
                if k == b"ACK":
                    acked += 1
                else:
                    assert k == b"ERR" and struct.unpack_from(">H", p)[0] == LIMIT_EXCEEDED
                    refused += 1
                CASES["tried"] += 1
            assert (acked, refused) == (room, 30)
            # SUB to a new topic is refused the same way.
            rid = c.send(b"SUB", spec(prefix + ".sub", OLDEST, 0))
            expect_err(c, rid, LIMIT_EXCEEDED)
            # Existing topics still take messages.
            c.publish("%s.0" % prefix, [b"more"])
        with V0Client(limited.port) as p:
            p.cid()
            p.send_raw(b"".join(pub_frame(b"%s.v0.%d" % (prefix.encode(), i), b"x")
                                for i in range(20)))
            CASES["tried"] += 20
            p.pub(b"%s.1" % prefix.encode(), b"existing")
            p.send_close_frame()
            p.wait_closed(5)
        by.check()
    names = topics(limited.port)
    assert len(names) == 60
    assert not any(".v0." in n for n in names)
    assert [v for _, v in read_topic(limited.port, "%s.1" % prefix)] == [b"x", b"existing"]
    assert stats(limited.port)["refused_topics"] == 30 + 1 + 20
    assert "max-topics" in limited.log_text()


# -- slowloris ------------------------------------------------------------------------

SLOW = [
    ("v0-half-frame", b"", v0frame(b"CID slow") + u32(100) + b"PUB t half"),
    ("v0-half-prefix", b"", v0frame(b"CID slow") + b"\x00\x00"),
    ("v1-half-frame", frame(b"HEL", 1, hel(1, b"slow1")), u32(100) + b"PUB\x00\x00\x00\x02"),
    ("v1-half-prefix", frame(b"HEL", 1, hel(1, b"slow2")), b"\x00"),
    ("first-frame-half", b"", u32(20) + b"HE"),
]


def test_slowloris_connections_are_closed(hostile, innocent):
    """Connections holding part of a frame are closed after --read-timeout;
    a silent connection holding nothing is not (heartbeat timeout is 60 s)."""
    socks = []
    for name, hello, part in SLOW:
        sock = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
        sock.sendall(hello + part)
        socks.append((name, sock, time.monotonic()))
        CASES["tried"] += 1
    created = {name: t0 for name, _, t0 in socks}
    # A slow drip: one byte of a big frame every 0.25 s keeps it busy but
    # never completes the frame.
    drip = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
    drip_data = v0frame(b"CID drip") + pub_frame(b"drip", b"d" * 200)
    drip.sendall(drip_data[:12])  # the whole CID frame: nothing partial yet
    # 100 more half-frame connections, to check many at once.
    crowd = []
    for i in range(100):
        s_ = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
        s_.sendall(v0frame(b"CID crowd%d" % i) + u32(50) + b"SUB")
        crowd.append(s_)
    CASES["tried"] += 101
    idle = V1Conn(hostile.port)
    idle.hello()
    start = time.monotonic()
    closed_at = {}
    drip_pos = 12
    pending = {name: sock for name, sock, _ in socks}
    pending["drip"] = drip
    while pending and time.monotonic() - start < 6:
        innocent.check()  # the bystander is served meanwhile
        r, _, _ = select.select(list(pending.values()), [], [], 0.25)
        for name in [n for n, sk in pending.items() if sk in r]:
            sk = pending[name]
            try:
                data = sk.recv(100)
            except ConnectionError:
                data = b""
            if data:
                # Only a v1 connection's HEL gets an answer; nothing else does.
                assert name.startswith("v1") and data[4:7] == b"RES", (name, data)
                continue
            closed_at[name] = time.monotonic() - created[name]
            del pending[name]
        if "drip" in pending and drip_pos < len(drip_data):
            try:
                drip.sendall(drip_data[drip_pos:drip_pos + 1])
                created.setdefault("drip", time.monotonic())  # the first partial byte
                drip_pos += 1
            except OSError:
                pass
    assert not pending, "still open after 6 s: %r" % sorted(pending)
    for name, t in closed_at.items():
        # Closed for holding a partial frame --read-timeout seconds, not before.
        assert READ_TIMEOUT * 0.9 <= t < READ_TIMEOUT * 2 + 1.5, (name, t)
    for s_ in crowd:
        s_.settimeout(5)
        try:
            assert s_.recv(10) == b""
        except ConnectionError:
            pass
        s_.close()
    idle.ping()  # nothing partial: still open
    idle.close()
    for _, sock, _ in socks:
        sock.close()
    drip.close()
    assert stats(hostile.port)["read_timeouts"] >= len(SLOW) + 101
    log = hostile.log_text()
    assert "incomplete for" in log


def test_partial_frame_after_a_quiet_period_times_out(hostile, innocent):
    """A client that behaves, stays quiet past a liveness check, then sends
    half a frame is closed within the read timeout (not the heartbeat's 60 s)."""
    socks = []
    for hello, part in ((v0frame(b"CID late"), u32(40) + b"SUB x"),
                        (frame(b"HEL", 1, hel(1, b"late")), u32(40) + b"PNG")):
        sock = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
        sock.sendall(hello)
        socks.append((sock, part))
    time.sleep(READ_TIMEOUT * 1.2)
    t0 = time.monotonic()
    for sock, part in socks:
        sock.sendall(part)
    took = []
    for sock, _part in socks:
        sock.settimeout(READ_TIMEOUT * 3 + 2)
        try:
            while sock.recv(100):  # v1: the HEL's answer, then EOF
                pass
        except ConnectionError:
            pass
        took.append(time.monotonic() - t0)
        sock.close()
        CASES["tried"] += 1
    for t in took:
        assert READ_TIMEOUT * 0.9 <= t < READ_TIMEOUT * 2 + 1, took


_FLOODER = r"""
import select, socket, struct, sys, time
port, kind, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
sock = socket.create_connection(("127.0.0.1", port))
if kind == "v1":
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    cid = b"flooder"
    hel = b"HEL" + struct.pack(">IH", 1, 1) + struct.pack(">H", len(cid)) + cid
    sock.sendall(struct.pack(">I", len(hel)) + hel)
    one = struct.pack(">I3sI", 7, b"PNG", 2)
else:
    sock.sendall(struct.pack(">I", 11) + b"CID flooder")
    one = struct.pack(">I", 3) + b"PNG"
chunk = memoryview(one * 20000)
sock.setblocking(False)
sent, pos, blocked_since, blocked = 0, 0, None, False
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        n = sock.send(chunk[pos:])
        sent += n
        pos = (pos + n) % len(chunk)
        blocked_since = None
    except BlockingIOError:
        now = time.monotonic()
        if blocked_since is None:
            blocked_since = now
        elif now - blocked_since > 1.0:
            blocked = True
            break
        select.select([], [sock], [], 0.05)
    except OSError:
        break
print(sent, int(blocked), flush=True)
if not blocked:
    sock.setblocking(True)
    sock.sendall(chunk[pos:]) if pos else None
    sock.sendall(struct.pack(">I", 0))  # v0 and v1: the zero-length goodbye
    sock.settimeout(30)
    while sock.recv(1 << 16):  # v0: no replies; wait for the close
        pass
sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
sock.close()
"""


def _flood(port: int, kind: str, seconds: float, bystander) -> tuple[int, bool, list]:
    """Flood from another process (a thread here would starve the bystander of
    the GIL); returns ``(bytes sent, blocked for 1 s, bystander latencies)``."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", _FLOODER, str(port), kind, str(seconds)],
                            stdout=subprocess.PIPE)
    lat = []
    deadline = time.monotonic() + seconds + 60
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the flooder did not finish"
            lat.append(bystander.check(timeout=5))
            time.sleep(0.02)
        out = proc.stdout.read().split()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == 0 and len(out) == 2, out
    return int(out[0]), bool(int(out[1])), lat


def _responsive(lat: list) -> None:
    """The bystander was served all along: every round trip within 5 s (else
    check() failed), typically fast, never stalled for long. Generous bounds:
    CI machines are shared; the figures are printed for the record."""
    assert len(lat) >= 3, lat
    assert sorted(lat)[len(lat) // 2] < 0.5, "median bystander round trip %.2f s" % sorted(lat)[len(lat) // 2]
    assert max(lat) < 2.5, "bystander waited %.2f s during the flood" % max(lat)


def test_v1_heartbeat_flood_from_a_client_that_never_reads(hostile, innocent):
    """PNG spam whose POG answers are never read: the broker stops reading that
    client (reply back-pressure), its memory stays bounded, others are served."""
    rss_before = rss_kb(hostile.proc.pid)
    sent, blocked, lat = _flood(hostile.port, "v1", 20.0, innocent)
    rss_after = rss_kb(hostile.proc.pid)
    CASES["tried"] += 1
    assert blocked, "the broker kept reading a client that never reads its replies"
    # What was read before the pause: about the write buffer's high-water
    # mark (1 MiB) of POGs plus socket buffers, in 11-byte PNGs.
    assert sent < 64 * 1024 * 1024, sent
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    _responsive(lat)
    print("\nv1 PNG flood: %.1f MB sent before the broker stopped reading; RSS %d -> %d kB; "
          "bystander max %.0f ms" % (sent / 1e6, rss_before, rss_after, max(lat) * 1e3))


def test_v0_heartbeat_flood(hostile, innocent):
    """v0 PNG spam (no replies in v0): read and dropped, memory flat, others served."""
    rss_before = rss_kb(hostile.proc.pid)
    sent, blocked, lat = _flood(hostile.port, "v0", 2.0, innocent)
    rss_after = rss_kb(hostile.proc.pid)
    CASES["tried"] += 1
    assert not blocked and sent > 1_000_000, (sent, blocked)
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    _responsive(lat)
    print("\nv0 PNG flood: %.1f MB read and dropped; RSS %d -> %d kB; bystander max %.0f ms"
          % (sent / 1e6, rss_before, rss_after, max(lat) * 1e3))
