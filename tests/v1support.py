"""Helpers for the protocol v1, client library and CLI tests.

- A raw blocking v1 connection (:class:`V1Conn`) that encodes frames with
  ``struct`` and ``zlib.crc32`` straight from the layouts in
  ``broker/_pure/wire1.py``'s docstring: the server is checked against the
  spec, not against its own codec. Every socket has a timeout and every read
  a deadline.
- ``shared_server``: one broker per module and implementation, for tests
  that only need a running broker (each uses its own topics). Tests that
  need special options or restarts use conftest's ``server`` factory.
- ``free_port()``: a port nothing listens on (for "broker down" tests and
  restarts on a fixed port).
- A subprocess consumer (``python v1support.py consume ...``) the tests can
  kill -9 at a known point.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
import uuid
import zlib

import pytest

HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 10.0  # seconds any single wait may take before a test fails

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HEAD = struct.Struct(">I3sI")
_REC = struct.Struct(">IIQQ")

# Error codes, written out from broker/errors.py's table (the stable contract).
BAD_FRAME, FRAME_TOO_LARGE, UNKNOWN_COMMAND, BAD_REQUEST, UNSUPPORTED_VERSION = 1, 2, 3, 4, 5
NOT_IDENTIFIED, INVALID_TOPIC, BAD_CRC, STORAGE_ERROR, INVALID_OFFSET = 6, 7, 8, 9, 10
NOT_SUBSCRIBED, ALREADY_SUBSCRIBED = 11, 12

# From modes of SUB / SEK.
COMMITTED, OLDEST, LATEST, OFFSET, TIME = 0, 1, 2, 3, 4


def unique(prefix: str = "t") -> str:
    """A fresh topic name (tests on a shared broker never share topics)."""
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


def free_port() -> int:
    """A loopback port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# -- encoding (from the spec) ----------------------------------------------------

def frame(kind: bytes, rid: int, payload: bytes = b"") -> bytes:
    """``[u32 N][3-byte type][u32 rid][payload]`` with N = 7 + len(payload)."""
    return _HEAD.pack(7 + len(payload), kind, rid) + payload


def s(value) -> bytes:
    """``[u16 n][n bytes]``."""
    if isinstance(value, str):
        value = value.encode()
    return _U16.pack(len(value)) + value


def hel(version: int = 1, client_id: bytes | str = b"") -> bytes:
    return _U16.pack(version) + s(client_id)


def pub(topic, messages, crcs=None) -> bytes:
    """A PUB payload; ``crcs`` overrides individual CRCs ({index: crc})."""
    parts = [s(topic), _U32.pack(len(messages))]
    for i, m in enumerate(messages):
        crc = zlib.crc32(m)
        if crcs and i in crcs:
            crc = crcs[i]
        parts.append(struct.pack(">II", len(m), crc) + m)
    return b"".join(parts)


def spec(topic, mode: int, value: int = 0) -> bytes:
    """SUB / SEK payload: ``str topic, u8 mode, i64 value``."""
    return s(topic) + struct.pack(">Bq", mode, value)


def cmt(topic, offset: int) -> bytes:
    return s(topic) + struct.pack(">Q", offset)


# -- decoding --------------------------------------------------------------------

def read_s(payload: bytes, pos: int) -> tuple[bytes, int]:
    n = _U16.unpack_from(payload, pos)[0]
    assert len(payload) >= pos + 2 + n, "truncated string in %r" % payload[:80]
    return payload[pos + 2:pos + 2 + n], pos + 2 + n


def parse_err(payload: bytes) -> tuple[int, str]:
    """ERR payload: ``u16 code, str text`` -> (code, text)."""
    code = _U16.unpack_from(payload, 0)[0]
    text, end = read_s(payload, 2)
    assert end == len(payload), "trailing bytes in ERR %r" % payload
    return code, text.decode("utf-8")


def parse_msg(payload: bytes) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """MSG payload -> (topic, [(offset, time_ms, value)]), checking every CRC."""
    topic, pos = read_s(payload, 0)
    count = _U32.unpack_from(payload, pos)[0]
    pos += 4
    out = []
    while pos < len(payload):
        length, crc, off, ts = _REC.unpack_from(payload, pos)
        assert length >= 20, "record length %d" % length
        body = payload[pos + 8:pos + 4 + length]
        assert len(body) == length - 4, "truncated record"
        assert zlib.crc32(body[:16], zlib.crc32(body[16:])) == crc, "bad CRC on delivered record at offset %d" % off
        out.append((off, ts, payload[pos + 24:pos + 4 + length]))
        pos += 4 + length
    assert pos == len(payload)
    assert len(out) == count, "MSG says %d records, carries %d" % (count, len(out))
    return topic, out


class ConnectionClosed(Exception):
    """The server closed the connection (EOF or reset)."""


class V1Conn:
    """One raw TCP connection speaking protocol v1, blocking, with deadlines."""

    def __init__(self, port: int, host: str = HOST, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self.eof = False
        self.rid = 100                    # request ids handed out by next_rid()
        self.client_id: bytes | None = None
        self.inbox: list = []             # frames read while waiting for another

    def __enter__(self) -> "V1Conn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, kind: bytes, payload: bytes = b"", rid: int | None = None) -> int:
        rid = self.next_rid() if rid is None else rid
        self.send_raw(frame(kind, rid, payload))
        return rid

    # -- receiving -------------------------------------------------------------

    def _recv_some(self, deadline: float) -> bool:
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline passed")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            self.eof = True
            return False
        self._buf += data
        return True

    def _take(self):
        buf = self._buf
        if len(buf) < 4:
            return None
        n = _U32.unpack_from(buf, 0)[0]
        assert n >= 7, "server sent a frame of length %d" % n
        if len(buf) < 4 + n:
            return None
        kind = bytes(buf[4:7])
        rid = _U32.unpack_from(buf, 7)[0]
        payload = bytes(buf[11:4 + n])
        del buf[:4 + n]
        return kind, rid, payload

    def read_frame(self, timeout: float | None = None):
        """The next frame from the server: ``(kind, rid, payload)``."""
        if self.inbox:
            return self.inbox.pop(0)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            f = self._take()
            if f is not None:
                return f
            if not self._recv_some(deadline):
                raise ConnectionClosed("server closed the connection (%d bytes buffered)"
                                       % len(self._buf))

    def reply(self, rid: int, timeout: float | None = None):
        """The reply to request ``rid`` (MSG frames read meanwhile stay in the inbox)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        skipped = []
        try:
            while True:
                f = self.read_frame(max(0.001, deadline - time.monotonic()))
                if f[0] != b"MSG" and f[1] == rid:
                    return f
                assert f[0] == b"MSG", "unexpected frame %r while waiting for %d" % (f[:2], rid)
                skipped.append(f)
        finally:
            self.inbox = skipped + self.inbox

    def request(self, kind: bytes, payload: bytes = b"", expect: bytes = b"RES") -> bytes:
        rid = self.send(kind, payload)
        k, r, p = self.reply(rid)
        if k == b"ERR" and expect != b"ERR":
            raise AssertionError("%s refused: %r" % (kind, parse_err(p)))
        assert k == expect, "expected %s to %s, got %s %r" % (expect, kind, k, p[:80])
        return p

    def expect_error(self, rid: int, code: int, timeout: float | None = None) -> str:
        k, r, p = self.reply(rid, timeout)
        assert k == b"ERR", "expected ERR %d, got %s %r" % (code, k, p[:80])
        got, text = parse_err(p)
        assert got == code, "expected error code %d, got %d (%s)" % (code, got, text)
        assert text, "ERR %d without a text" % code
        return text

    def hello(self, client_id: bytes | str = b"") -> bytes:
        """HEL version 1; returns the client id the broker confirmed."""
        p = self.request(b"HEL", hel(1, client_id))
        version = _U16.unpack_from(p, 0)[0]
        assert version == 1
        cid, pos = read_s(p, 2)
        server_version, pos = read_s(p, pos)
        assert pos == len(p)
        self.client_id = cid
        return cid

    def ping(self) -> None:
        rid = self.send(b"PNG")
        k, r, p = self.reply(rid)
        assert (k, r, p) == (b"POG", rid, b""), (k, r, p)

    def publish(self, topic, messages) -> tuple[int, int]:
        """PUB and wait for its ACK: ``(base offset, count)``."""
        p = self.request(b"PUB", pub(topic, messages), expect=b"ACK")
        return struct.unpack(">QI", p)

    def subscribe(self, topic, mode: int = OLDEST, value: int = 0) -> tuple[int, int]:
        """SUB; returns ``(rid, start offset)`` (MSG frames carry the rid)."""
        rid = self.send(b"SUB", spec(topic, mode, value))
        k, r, p = self.reply(rid)
        assert k == b"RES", "SUB refused: %r" % (parse_err(p) if k == b"ERR" else p,)
        return rid, struct.unpack(">Q", p)[0]

    def json(self, kind: bytes, payload: bytes = b""):
        return json.loads(self.request(kind, payload))

    def read_messages(self, n: int, rid: int | None = None, timeout: float | None = None):
        """The next ``n`` delivered records ``(offset, time_ms, value)``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out = []
        while len(out) < n:
            try:
                k, r, p = self.read_frame(max(0.001, deadline - time.monotonic()))
            except socket.timeout:
                raise socket.timeout("got %d of %d messages" % (len(out), n)) from None
            assert k == b"MSG", "expected MSG, got %s %r" % (k, p[:80])
            if rid is not None:
                assert r == rid, "MSG tagged %d, SUB was %d" % (r, rid)
            _topic, recs = parse_msg(p)
            assert recs, "empty MSG frame"
            out.extend(recs)
        assert len(out) == n, "got %d messages, expected %d" % (len(out), n)
        return out

    def expect_silence(self, duration: float) -> None:
        assert not self.inbox, "unexpected frames pending: %r" % self.inbox[:2]
        deadline = time.monotonic() + duration
        try:
            got = self._recv_some(deadline)
        except socket.timeout:
            return
        if got:
            raise AssertionError("expected silence, got %r" % bytes(self._buf[:80]))
        raise ConnectionClosed("expected silence, but the server closed the connection")

    def wait_closed(self, timeout: float | None = None) -> list:
        """Wait for EOF; returns the frames that arrived before it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        frames = list(self.inbox)
        self.inbox.clear()
        while True:
            f = self._take()
            if f is not None:
                frames.append(f)
                continue
            try:
                if not self._recv_some(deadline):
                    assert not self._buf, "partial frame before EOF: %r" % bytes(self._buf[:40])
                    return frames
            except socket.timeout:
                raise AssertionError("server did not close the connection") from None


def assert_broker_up(port: int) -> None:
    """A fresh connection can say HEL and get POG for PNG."""
    with V1Conn(port) as c:
        c.hello()
        c.ping()


# -- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_server(impl, tmp_path_factory):
    """One broker per module and implementation (tests use unique topics)."""
    from conftest import ServerProcess

    base = tmp_path_factory.mktemp("shared-%s" % impl)
    sandbox = base / "sandbox"
    sandbox.mkdir()
    logs = base / "logs"
    logs.mkdir()
    srv = ServerProcess(impl, sandbox, [], logs, "shared")
    srv.start()
    yield srv
    alive = srv.running()
    srv.kill()
    if srv.proc is not None and srv.proc.stdout is not None:
        srv.proc.stdout.close()
    assert alive, "the shared broker died during the module\n%s" % srv.log_tail(80)


# -- a consumer process the tests can kill -9 ----------------------------------

def _consume_main(argv: list[str]) -> None:
    """``consume PORT TOPIC CLIENT_ID KIND N COMMIT``: read N, maybe commit, then block.

    Prints ``OFFSETS o1,o2,...`` once it holds N messages (after committing
    them with COMMIT=yes), then waits on stdin until it is killed.
    """
    port, topic, client_id, kind, n, commit = argv
    port, n = int(port), int(n)
    if kind == "sync":
        from broker import Client
        c = Client(HOST, port, client_id=client_id, reconnect=False)
        sub = c.subscribe(topic, "committed", auto_commit=False)
        got = [next(sub) for _ in range(n)]
        if commit == "yes":
            sub.commit()
    else:
        import asyncio
        from broker import AsyncClient

        async def go():
            c = AsyncClient(HOST, port, client_id=client_id, reconnect=False)
            await c.connect()
            sub = await c.subscribe(topic, "committed", auto_commit=False)
            out = [await sub.__anext__() for _ in range(n)]
            if commit == "yes":
                await sub.commit()
            return c, out

        loop = asyncio.new_event_loop()
        c, got = loop.run_until_complete(go())
    print("OFFSETS " + ",".join(str(m.offset) for m in got), flush=True)
    sys.stdin.read()  # killed here


if __name__ == "__main__":
    if sys.argv[1] == "consume":
        _consume_main(sys.argv[2:])
