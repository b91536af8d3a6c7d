"""Bad input: refused, logged, contained to the connection that sent it.

Nothing a client sends may crash the broker, disturb other clients, or make
it touch the file system outside its data dir.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

import pytest

from v0client import V0Client, consumer, frame, produce, pub_frame

pytestmark = pytest.mark.integration

MAX_FRAME = 4096


def _topic() -> bytes:
    return b"t-" + uuid.uuid4().hex[:10].encode()


def _still_serving(srv) -> None:
    """A fresh producer and consumer still work end to end."""
    t = _topic()
    produce(srv.port, t, [b"still", b"serving"])
    with consumer(srv.port, t, 0) as c:
        assert c.read_deliveries(2) == [(t, b"still"), (t, b"serving")]
    assert srv.running()


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 1 << 20, 0x7FFFFFFF, 0xFFFFFFFF],
                         ids=["limit+1", "1MiB", "2GiB", "4GiB"])
def test_oversize_length_prefix_closes_only_that_connection(server, length):
    srv = server("--max-frame-bytes", str(MAX_FRAME))
    t = _topic()
    with consumer(srv.port, t, 0) as bystander, V0Client(srv.port) as bad:
        bystander.barrier()
        bad.cid()
        bad.pub(t, b"before the bad frame")
        # Only the length prefix and a few bytes: the server must not wait to
        # buffer (or allocate) a body it will refuse anyway.
        bad.send_raw(struct.pack(">I", length) + b"PUB " + t + b" xxxx")
        bad.wait_closed(5)
        assert bystander.read_deliveries(1) == [(t, b"before the bad frame")]
        # The other client is undisturbed.
        produce(srv.port, t, [b"after"])
        assert bystander.read_deliveries(1) == [(t, b"after")]
        bystander.expect_silence(0.2)
    _still_serving(srv)


def test_frame_at_the_limit_is_accepted(server):
    srv = server("--max-frame-bytes", str(MAX_FRAME))
    t = _topic()
    msg = b"x" * (MAX_FRAME - len(b"PUB " + t + b" "))  # body is exactly MAX_FRAME bytes
    with V0Client(srv.port) as p:
        p.cid()
        p.send_raw(pub_frame(t, msg))
        p.barrier()
        assert p.is_open()
    with consumer(srv.port, t, 0) as c:
        assert c.read_deliveries(1) == [(t, msg)]
    # One byte more: refused, connection closed, nothing stored.
    with V0Client(srv.port) as p:
        p.cid()
        p.send_raw(pub_frame(t, msg + b"y"))
        p.wait_closed(5)
    with consumer(srv.port, t, 1) as c:
        c.barrier()
        c.expect_silence(0.3)


def test_bad_crc_not_stored_connection_stays(server):
    srv = server()
    t = _topic()
    with V0Client(srv.port) as p:
        p.cid()
        good = pub_frame(t, b"m1")
        bad = pub_frame(t, b"m2 corrupted", crc=0xDEADBEEF)
        flipped = bytearray(pub_frame(t, b"m3 flipped"))
        flipped[-5] ^= 0x01  # one bit of the message, CRC of the original
        p.send_raw(good + bad + bytes(flipped) + pub_frame(t, b"m4"))
        p.barrier()
        assert p.is_open()
        p.pub(t, b"m5")
        p.barrier()
    with consumer(srv.port, t, 0) as c:
        # m1, m4, m5 are consecutive offsets: the bad ones were never stored.
        assert c.read_deliveries(3) == [(t, b"m1"), (t, b"m4"), (t, b"m5")]
        c.expect_silence(0.3)


@pytest.mark.parametrize("body", [
    b"XYZ", b"XYZ hello world", b"HELLO", b"sub lowercase", b"POGO", b"SUBX t",
    b"\xff\xfe\x00\x01", b"S", b"AB",
], ids=lambda b: repr(b)[:20])
def test_unknown_command_ignored_connection_stays(server, body):
    srv = server()
    t = _topic()
    with V0Client(srv.port) as c:
        c.cid()
        c.raw_log = bytearray()
        c.send_raw(frame(body))
        c.sub(t)
        c.pub(t, b"still here")
        # No reply to the unknown command (v0 has no error frames); the
        # following commands on the same connection work.
        assert c.read_deliveries(1) == [(t, b"still here")]
        c.expect_silence(0.2)
        assert bytes(c.raw_log) == struct.pack(">I", len(t) + 11) + t + b" still here"
    _still_serving(srv)


@pytest.mark.parametrize("body", [b"CID", b"SUB", b"SUB ", b"SET t", b"SET t ", b"SET  5",
                                  b"SET t x", b"SET t 1.5", b"SET t -2", b"PUB t"],
                         ids=lambda b: repr(b)[:20])
def test_malformed_arguments_refused_connection_stays(server, body):
    srv = server()
    t = _topic()
    produce(srv.port, b"t", [b"zero", b"one"])
    with V0Client(srv.port) as c:
        c.cid()
        if body.startswith(b"PUB"):
            # A PUB frame always carries its CRC trailer; here with no message.
            c.send_raw(struct.pack(">I", len(body)) + body + b"\x00\x00\x00\x00")
        else:
            c.send_raw(frame(body))
        c.sub(t)
        c.pub(t, b"ok")
        assert c.read_deliveries(1, topic=t) == [(t, b"ok")]
    _still_serving(srv)


HOSTILE = [
    b"../x", b"..", b".", b"/etc/passwd", b"a/b", b"a\x00b", b"\x00", b"x" * 201,
    b"\xff\xfe", b"caf\xc3\xa9", b"../../../../tmp/pylogstreams-escape", b"..\\x", b"a\\b",
    b"~", b"$HOME", b"a*", b"%2e%2e", b"./x", b"x/..", b"\n", b"a\tb", b"",
]


def _tree(root: Path, skip: Path) -> set:
    """Every path under ``root`` (relative), except inside ``skip``."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if d == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = d / name
            if p != skip:
                out.add(str(p.relative_to(root)))
    return out


def test_hostile_topic_names(server, tmp_path):
    srv = server()
    outside_before = _tree(tmp_path, srv.data_dir)
    etc_before = set(os.listdir("/etc"))
    tmp_before = set(os.listdir("/tmp"))
    good = _topic()
    with V0Client(srv.port) as c:
        c.cid()
        c.sub(good)
        for name in HOSTILE:
            c.send_raw(frame(b"SUB " + name) + frame(b"SET " + name + b" 0")
                       + pub_frame(name, b"evil"))
        c.pub(good, b"good")
        # Invalid names are refused without closing the connection; nothing
        # is delivered for them, and the valid topic still works.
        assert c.read_deliveries(1) == [(good, b"good")]
        c.barrier()
        c.expect_silence(0.3)
    # Another connection subscribing to them gets nothing either.
    with V0Client(srv.port) as c:
        c.cid()
        for name in HOSTILE:
            c.send_raw(frame(b"SUB " + name))
        c.barrier()
        c.expect_silence(0.3)
    _still_serving(srv)
    srv.stop()
    srv.start()  # a restart finds nothing odd in its data dir
    _still_serving(srv)
    srv.stop()

    outside_after = _tree(tmp_path, srv.data_dir)
    new = {p for p in outside_after - outside_before if not p.startswith("logs")}
    assert new == set(), "files created outside the data dir: %r" % sorted(new)
    assert set(os.listdir("/etc")) == etc_before
    assert {n for n in set(os.listdir("/tmp")) - tmp_before if "pylogstreams-escape" in n} == set()
    assert not Path("/tmp/pylogstreams-escape").exists()
    # Inside the data dir, no entry is named after a hostile topic.
    for p in srv.data_dir.rglob("*"):
        assert "evil" not in p.name and "passwd" not in p.name and "\x00" not in p.name, p


VALID_EDGE = [b"a", b"x" * 200, b"...", b".x", b"-", b"_", b"a.b_c-D9", b"UPPER", b"0"]


def test_valid_edge_topic_names_work(server):
    srv = server()
    for name in VALID_EDGE:
        produce(srv.port, name, [b"hello " + name[:10]])
    srv.restart()
    with V0Client(srv.port) as c:
        c.cid()
        c.send_raw(b"".join(frame(b"SUB " + n) + frame(b"SET " + n + b" 0") for n in VALID_EDGE))
        got = c.read_deliveries(len(VALID_EDGE))
        c.expect_silence(0.2)
    assert sorted(got) == sorted((n, b"hello " + n[:10]) for n in VALID_EDGE)
    for p in srv.data_dir.rglob("*"):
        assert srv.data_dir in p.parents


def test_garbage_stream_does_not_disturb_others(server):
    """Random bytes on one connection: it may be closed; the broker is unaffected."""
    import random
    srv = server("--max-frame-bytes", str(MAX_FRAME))
    rng = random.Random(1234)
    t = _topic()
    with consumer(srv.port, t, 0) as bystander:
        bystander.barrier()
        for k in range(20):
            with V0Client(srv.port, timeout=5) as g:
                if k % 2:
                    g.cid()
                try:
                    g.send_raw(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 3000))))
                except OSError:
                    pass  # closed by the server: fine
            produce(srv.port, t, [b"m%d" % k])
            assert bystander.read_deliveries(1, topic=t) == [(t, b"m%d" % k)]
    _still_serving(srv)
