"""A small blocking v0 client for the integration tests.

It encodes frames itself, with ``struct`` and ``zlib.crc32``, straight from
PROTOCOL-v0.md and never imports the broker: the tests check the server
against the spec, not against its own codec.

Every socket has a timeout and every read has a deadline, so a misbehaving
server makes a test fail, never hang.
"""

from __future__ import annotations

import collections
import socket
import struct
import time
import uuid
import zlib

__all__ = [
    "HOST", "V0Client", "ConnectionClosed",
    "frame", "pub_frame", "close_frame", "delivery_frame", "make_message",
    "message_index", "consumer", "produce",
]

HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 10.0  # seconds any single wait may take before a test fails

_U32 = struct.Struct(">I")


def frame(body: bytes) -> bytes:
    """``[u32 BE len][body]``: every client command frame except PUB."""
    return _U32.pack(len(body)) + body


def pub_frame(topic: bytes, message: bytes, crc: int | None = None) -> bytes:
    """``[u32 BE len]["PUB topic message"][u32 BE crc32(message)]``.

    ``crc`` overrides the trailer (for bad-CRC tests).
    """
    body = b"PUB " + topic + b" " + message
    if crc is None:
        crc = zlib.crc32(message)
    return _U32.pack(len(body)) + body + _U32.pack(crc & 0xFFFFFFFF)


def close_frame() -> bytes:
    """The zero-length frame: the client is going away."""
    return b"\x00\x00\x00\x00"


def delivery_frame(topic: bytes, message: bytes) -> bytes:
    """What the server must send for one delivered message."""
    body = topic + b" " + message
    return _U32.pack(len(body)) + body


# A fixed, printable filler (it contains spaces on purpose: messages may).
_FILLER = (b"the quick brown fox jumps over the lazy dog 0123456789 "
           b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_.,;:!?") * 64


def make_message(i: int, size: int = 1024, tag: bytes = b"m") -> bytes:
    """Deterministic message number ``i``, exactly ``size`` bytes (>= 24).

    The content varies with ``i`` so a message delivered in the wrong place or
    partly overwritten is detected by byte comparison.
    """
    head = b"%s%010d|" % (tag, i)
    rest = size - len(head)
    start = (i * 7) % 1000
    return head + _FILLER[start:start + rest]


def message_index(message: bytes) -> int:
    """Inverse of :func:`make_message` for the index (any tag of one byte)."""
    return int(message[1:11])


def _describe(deliveries) -> str:
    """Short summary of deliveries for failure messages."""
    items = list(deliveries)
    if not items:
        return "none"
    show = items[:3] + ([("...", b"")] if len(items) > 4 else []) + items[3:][-1:]
    return ", ".join("%s:%r" % (t if isinstance(t, str) else t.decode("latin-1")[:20], m[:24])
                     for t, m in show)


class ConnectionClosed(Exception):
    """The server closed the connection (EOF or reset)."""


class V0Client:
    """One raw TCP connection speaking protocol v0, blocking, with deadlines.

    Deliveries read while waiting for something else (for example during
    :meth:`barrier`) are kept in an inbox, in arrival order, and returned by
    the next reads.
    """

    def __init__(self, port: int, host: str = HOST, timeout: float = DEFAULT_TIMEOUT,
                 rcvbuf: int | None = None, nodelay: bool = True) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Must be set before connect() to limit the advertised window.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self._buf = bytearray()           # received bytes not yet parsed into frames
        self.inbox = collections.deque()  # parsed deliveries not yet returned
        self.raw_log: bytearray | None = None  # when set, every received byte is kept here
        self.eof = False                  # the server closed its side
        self.client_id: str | None = None

    # -- sending -----------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reg(self) -> str:
        """Send REG and return the id from the reply frame (checked: UUID4 text)."""
        self.send_raw(frame(b"REG"))
        body = self.read_frame()
        assert len(body) == 36, "REG reply must be a 36-byte UUID text, got %r" % (body,)
        text = body.decode("ascii")
        parsed = uuid.UUID(text)
        assert parsed.version == 4, "REG id is not a UUID4: %r" % text
        assert str(parsed) == text, "REG id is not canonical UUID text: %r" % text
        return text

    def cid(self, client_id: str | bytes | None = None) -> str | bytes:
        if client_id is None:
            client_id = str(uuid.uuid4())
        raw = client_id.encode() if isinstance(client_id, str) else client_id
        self.send_raw(frame(b"CID " + raw))
        self.client_id = client_id
        return client_id

    def sub(self, topic: bytes) -> None:
        self.send_raw(frame(b"SUB " + topic))

    def set_offset(self, topic: bytes, offset: int | bytes) -> None:
        off = offset if isinstance(offset, bytes) else str(offset).encode()
        self.send_raw(frame(b"SET " + topic + b" " + off))

    def pub(self, topic: bytes, message: bytes) -> None:
        self.send_raw(pub_frame(topic, message))

    def pub_many(self, topic: bytes, messages) -> None:
        """All the PUB frames in one sendall (pipelined, as prototype producers do)."""
        self.send_raw(b"".join(pub_frame(topic, m) for m in messages))

    def png(self) -> None:
        self.send_raw(frame(b"PNG"))

    def send_close_frame(self) -> None:
        self.send_raw(close_frame())

    def close(self) -> None:
        """Close the socket the ordinary way (FIN)."""
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Close the socket abruptly: SO_LINGER 0 makes the kernel send RST."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def __enter__(self) -> "V0Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- receiving ---------------------------------------------------------

    def _recv_some(self, deadline: float) -> bool:
        """Receive one chunk into the buffer. False on EOF; raises on timeout."""
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
        if self.raw_log is not None:
            self.raw_log += data
        self._buf += data
        return True

    def _take_frame(self) -> bytes | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        n = _U32.unpack_from(buf, 0)[0]
        if len(buf) < 4 + n:
            return None
        body = bytes(buf[4:4 + n])
        del buf[:4 + n]
        return body

    def read_frame(self, timeout: float | None = None) -> bytes:
        """Read one raw frame body (the REG reply, or a delivery not yet parsed)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            body = self._take_frame()
            if body is not None:
                return body
            if not self._recv_some(deadline):
                raise ConnectionClosed("server closed the connection mid-read "
                                       "(%d bytes buffered)" % len(self._buf))

    def _parse_deliveries(self) -> None:
        while True:
            body = self._take_frame()
            if body is None:
                return
            sp = body.find(b" ")
            assert sp > 0, "delivery frame without '<topic> ': %r" % body[:80]
            self.inbox.append((body[:sp], body[sp + 1:]))

    def read_deliveries(self, n: int, timeout: float | None = None, topic: bytes | None = None):
        """Return the next ``n`` deliveries as ``(topic, message)`` bytes pairs.

        With ``topic``, deliveries of other topics are skipped over and left in
        the inbox. Fails (socket.timeout / ConnectionClosed) if fewer arrive
        before the deadline.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out = []
        while True:
            self._parse_deliveries()
            if topic is None:
                while self.inbox and len(out) < n:
                    out.append(self.inbox.popleft())
            else:
                keep = collections.deque()
                while self.inbox:
                    d = self.inbox.popleft()
                    if d[0] == topic and len(out) < n:
                        out.append(d)
                    else:
                        keep.append(d)
                self.inbox = keep
            if len(out) >= n:
                return out
            try:
                more = self._recv_some(deadline)
            except socket.timeout:
                raise socket.timeout("got %d of %d deliveries before the deadline; last: %r"
                                     % (len(out), n, out[-1][1][:40] if out else None))
            if not more:
                raise ConnectionClosed("server closed the connection after %d of %d deliveries"
                                       % (len(out), n))

    def read_until(self, predicate, timeout: float | None = None, max_items: int = 10_000_000):
        """Read deliveries until ``predicate((topic, msg))`` is true for one.

        Returns every delivery read, including the matching one.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out = []
        while len(out) < max_items:
            self._parse_deliveries()
            while self.inbox:
                d = self.inbox.popleft()
                out.append(d)
                if predicate(d):
                    return out
            if not self._recv_some(deadline):
                raise ConnectionClosed("server closed the connection after %d deliveries" % len(out))
        raise AssertionError("no matching delivery among %d" % len(out))

    def read_available(self, quiet: float) -> list:
        """Read deliveries until none arrives for ``quiet`` seconds, or EOF."""
        out = []
        while True:
            self._parse_deliveries()
            while self.inbox:
                out.append(self.inbox.popleft())
            try:
                if not self._recv_some(time.monotonic() + quiet):
                    self._parse_deliveries()
                    out.extend(self.inbox)
                    self.inbox.clear()
                    return out
            except socket.timeout:
                return out

    def expect_silence(self, duration: float) -> None:
        """Assert nothing at all arrives for ``duration`` seconds (EOF is not silence)."""
        assert not self.inbox, "expected silence, but %d deliveries are pending: %s" % (
            len(self.inbox), _describe(self.inbox))
        assert not self._buf, "unexpected bytes pending: %r" % bytes(self._buf[:80])
        deadline = time.monotonic() + duration
        try:
            got = self._recv_some(deadline)
        except socket.timeout:
            return
        if got:
            self._parse_deliveries()
            raise AssertionError("expected silence, got %d deliveries (%s) and %d more bytes"
                                 % (len(self.inbox), _describe(self.inbox), len(self._buf)))
        raise ConnectionClosed("expected silence, but the server closed the connection")

    def wait_closed(self, timeout: float | None = None) -> float:
        """Wait until the server closes the connection; return seconds waited.

        Any bytes received meanwhile are parsed into the inbox.
        """
        start = time.monotonic()
        deadline = start + (self.timeout if timeout is None else timeout)
        while True:
            try:
                if not self._recv_some(deadline):
                    return time.monotonic() - start
            except socket.timeout:
                raise AssertionError("server did not close the connection within %.1fs"
                                     % (deadline - start))

    def is_open(self, wait: float = 0.2) -> bool:
        """True if the server has not closed the connection within ``wait`` seconds.

        Bytes that arrive meanwhile are kept (parsed later as deliveries).
        """
        try:
            return self._recv_some(time.monotonic() + wait) or not self.eof
        except socket.timeout:
            return True

    # -- synchronisation ---------------------------------------------------

    def barrier(self, timeout: float | None = None) -> None:
        """Wait until the server has processed every frame sent so far.

        v0 has no acknowledgements, so: subscribe to a private topic and
        publish a token on it from this connection; frames of one connection
        are applied in order, so the token coming back proves everything sent
        before it was handled. Other deliveries read meanwhile stay in the
        inbox. The connection must already have sent CID or REG.
        """
        token = uuid.uuid4().hex.encode()
        topic = b"barrier-" + token[:12]
        self.send_raw(frame(b"SUB " + topic) + pub_frame(topic, token))
        got = self.read_deliveries(1, timeout=timeout, topic=topic)
        assert got == [(topic, token)], got


def consumer(port: int, topic: bytes, offset: int | None = 0, client_id: str | None = None,
             **kw) -> V0Client:
    """A prototype consumer: CID, SUB topic, SET topic offset, all in one segment."""
    c = V0Client(port, **kw)
    cid = client_id or str(uuid.uuid4())
    data = frame(b"CID " + cid.encode()) + frame(b"SUB " + topic)
    if offset is not None:
        data += frame(b"SET " + topic + b" " + str(offset).encode())
    c.send_raw(data)
    c.client_id = cid
    return c


def produce(port: int, topic: bytes, messages, batch: int = 1000, close: bool = True,
            timeout: float = 60.0) -> str:
    """A prototype producer: REG, CID, pipelined PUBs, zero-length close.

    With ``close`` it waits until the server has closed the connection, which
    proves every PUB before the close frame was read and handled.
    Returns the client id.
    """
    with V0Client(port, timeout=timeout) as p:
        cid = p.reg()
        p.cid(cid)
        messages = list(messages)
        for i in range(0, len(messages), batch):
            p.pub_many(topic, messages[i:i + batch])
        if close:
            p.send_close_frame()
            p.wait_closed(timeout)
        return cid
