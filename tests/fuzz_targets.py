"""Fuzz targets for the frame scanners and for command handling.

Shared by ``tests/test_fuzz.py`` (a short hypothesis run in CI) and
``scripts/fuzz_long.py`` (a long run under atheris, or hypothesis). One
input grammar, three sources of randomness:

- :class:`HypothesisSource` draws from a hypothesis ``data`` object (CI:
  shrinking, a reproducible failing example);
- :class:`RandomSource` from ``random.Random(seed)`` (the differential run
  that compares a Cython broker process with a pure one, example by
  example, needs the same inputs in two processes);
- :class:`FdpSource` from atheris' ``FuzzedDataProvider`` (coverage-guided).

The grammar writes valid v0 and v1 frames with hostile arguments (path
traversal, NUL bytes, overlong and non-UTF-8 topic names, negative and
huge offsets, bad CRCs, unknown and server-only frame types), mutates
them (bit flips, truncation, insertions, rewritten length prefixes up to
0xFFFFFFFF) and mixes in garbage, then cuts the stream into random chunks.

Targets (each raises AssertionError on a finding):

- :func:`check_frames`: v0 ``FrameReader`` of both implementations fed the
  same chunks must return identical events, ``buffered`` and ``broken``
  after every call, hold at most one partial frame, and give the same
  events (PUB coalescing aside) as one feed of the whole stream.
- :func:`check_v1_reader`: the same for the v1 ``V1Reader``.
- :func:`check_payloads`: ``parse_publish``, ``read_str``,
  ``message_frame`` and ``parse_messages`` of both implementations agree,
  result for result and exception type for exception type, on mutated
  input.
- :class:`CommandHarness`: a real :class:`broker.server.Broker` on a temp
  dir, fed the streams through :class:`FakeTransport` connections: no
  exception from a handler, replies well formed (v1: known kinds, known
  error codes, exactly one reply per request unless the broker closed the
  connection, MSG only after its SUB's RES and only with valid record
  CRCs; v0: only REG ids and deliveries of subscribed topics), every
  ACKed batch stored at its offsets, nothing stored that nobody sent with
  a valid CRC, no directory outside the data dir, no file under it with a
  name the topic rule forbids, and no connection state left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import uuid
import zlib

__all__ = [
    "HypothesisSource", "RandomSource", "FdpSource", "v0_stream", "v1_stream", "chunked",
    "check_frames", "check_v1_reader", "check_payloads", "CommandHarness", "FakeTransport",
    "codec_modules",
]

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


# -- sources of randomness ------------------------------------------------------

class _Source:
    def int(self, lo: int, hi: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def bytes(self, max_size: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def chance(self, num: int, den: int) -> bool:
        return self.int(0, den - 1) < num


class RandomSource(_Source):
    """Draws from ``random.Random``: the same seed gives the same stream anywhere."""

    def __init__(self, rng) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def bytes(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))


class HypothesisSource(_Source):
    """Draws from a hypothesis ``data`` object (``st.data()``)."""

    def __init__(self, data) -> None:
        from hypothesis import strategies as st
        self.data = data
        self.st = st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def bytes(self, max_size: int) -> bytes:
        return self.data.draw(self.st.binary(max_size=max_size))


class FdpSource(_Source):
    """Draws from an atheris ``FuzzedDataProvider``."""

    def __init__(self, fdp) -> None:
        self.fdp = fdp

    def int(self, lo: int, hi: int) -> int:
        return self.fdp.ConsumeIntInRange(lo, hi)

    def bytes(self, max_size: int) -> bytes:
        return self.fdp.ConsumeBytes(self.fdp.ConsumeIntInRange(0, max_size))


# -- the grammar ---------------------------------------------------------------

GOOD_TOPICS = [b"a", b"t1", b"chat.room_1", b"Z-9", b"x" * 200, b"..a", b"a..", b"-", b"_"]
BAD_TOPICS = [
    b"", b".", b"..", b"../x", b"../../etc/passwd", b"/tmp/pylogstreams-fuzz-abs", b"a/b",
    b"a\\b", b"a\x00b", b"\x00", b"x" * 201, b"\xff\xfe", "\u00e9t\u00e9".encode(), b"a b", b" ",
    b"%2e%2e", b"~", b"*", b"topics/../..", b"\n", b"con",
]
V0_OFFSETS = [b"0", b"-1", b"-5", b"99999999999999999999", b"12", b"3", b"abc", b"", b"1e3",
              b"+7", b" 1", b"9223372036854775807", b"9223372036854775808", b"-0", b"\xff"]
V1_KINDS = [b"PUB", b"SUB", b"UNS", b"CMT", b"SEK", b"PNG", b"TOP", b"OFS", b"STA", b"AUT",
            b"HEL"]
ODD_KINDS = [b"XYZ", b"RES", b"ACK", b"ERR", b"MSG", b"POG", b"\x00\x00\x00", b"pub", b"PU\x00"]
I64 = [0, 1, 5, -1, -5, 2**63 - 1, -2**63, 10**12, 1_700_000_000_000]
U64 = [0, 1, 3, 10, 2**63 - 1, 2**64 - 1]
MESSAGES = [b"", b"m", b"hello world", b"\x00\xff" * 8, b"x" * 300]


def u32(n: int) -> bytes:
    return _U32.pack(n & 0xFFFFFFFF)


def s16(b: bytes) -> bytes:
    return _U16.pack(len(b) & 0xFFFF) + b


def topic(src) -> bytes:
    r = src.int(0, 9)
    if r < 6:
        return src.pick(GOOD_TOPICS)
    if r < 9:
        return src.pick(BAD_TOPICS)
    return src.bytes(12)


def message(src) -> bytes:
    return src.pick(MESSAGES) if src.chance(2, 3) else src.bytes(64)


def mutate(src, data: bytes) -> bytes:
    """One random damage to an encoded frame."""
    if not data:
        return src.bytes(8)
    op = src.int(0, 6)
    i = src.int(0, len(data) - 1)
    if op == 0:  # flip bits of one byte
        return data[:i] + bytes([data[i] ^ src.int(1, 255)]) + data[i + 1:]
    if op == 1:  # truncate
        return data[:i]
    if op == 2:  # insert garbage
        return data[:i] + src.bytes(6) + data[i:]
    if op == 3:  # drop a byte
        return data[:i] + data[i + 1:]
    if op == 4:  # rewrite the length prefix
        n = src.pick([0, 1, 3, 6, 7, len(data) - 5, len(data) - 3, len(data) + 1, 1 << 20,
                      0x7FFFFFFF, 0xFFFFFFFF, src.int(0, 0xFFFFFFFF)])
        return u32(n) + data[4:]
    if op == 5:  # duplicate a region
        j = src.int(i, len(data))
        return data[:j] + data[i:j] + data[j:]
    return data + src.bytes(10)


def v0_pub(t: bytes, m: bytes, crc: int | None = None) -> bytes:
    body = b"PUB " + t + b" " + m
    return u32(len(body)) + body + u32(zlib.crc32(m) if crc is None else crc)


def v0_frame(src, client_ids, damaged: bool) -> bytes:
    k = src.int(0, 14 if damaged else 12)
    if k <= 4:
        crc = None if src.chance(5, 6) else src.int(0, 0xFFFFFFFF)
        data = v0_pub(topic(src), message(src), crc)
    elif k == 5:
        data = u32(3) + b"REG"
    elif k == 6:
        body = b"CID " + (src.pick(client_ids) if src.chance(3, 4) else src.bytes(300))
        data = u32(len(body)) + body
    elif k <= 8:
        body = b"SUB " + topic(src)
        data = u32(len(body)) + body
    elif k <= 10:
        body = b"SET " + topic(src) + b" " + src.pick(V0_OFFSETS)
        data = u32(len(body)) + body
    elif k == 11:
        data = u32(3) + b"PNG"
    elif k == 12:
        body = src.pick([b"HEL", b"XYZ", b"PUBX", b"CID", b"SUB", b"SET a", b"PUB a",
                         b"PUB", b"PU", b"", b"HEL \x00\x01"]) + src.bytes(4)
        data = u32(len(body)) + body
    elif k == 13:
        return src.bytes(24)  # garbage
    else:
        return u32(0) if src.chance(1, 3) else src.bytes(6)
    if damaged and src.chance(1, 6):
        data = mutate(src, data)
    return data


def v0_stream(src) -> bytes:
    """A v0 conversation, mostly well-formed, with hostile arguments and damage."""
    client_ids = [b"fuzz-client-1", b"fuzz-client-2", b"x" * 255]
    parts = []
    first = src.int(0, 5)
    if first <= 2:
        parts.append(u32(3) + b"REG")
    elif first <= 4:
        body = b"CID " + src.pick(client_ids)
        parts.append(u32(len(body)) + body)
    damaged = src.chance(1, 3)
    for _ in range(src.int(0, 16)):
        parts.append(v0_frame(src, client_ids, damaged))
    return b"".join(parts)


def v1_frame(kind: bytes, rid: int, payload: bytes) -> bytes:
    return u32(7 + len(payload)) + kind + u32(rid) + payload


def v1_payload(src, kind: bytes, damaged: bool = True) -> bytes:
    if damaged and src.chance(1, 10):
        return src.bytes(20)  # a payload that probably doesn't parse
    if kind == b"PUB":
        msgs = [message(src) for _ in range(src.int(0, 4))]
        bad = src.int(-1, len(msgs) - 1) if src.chance(1, 6) else -1
        count = len(msgs) if src.chance(9, 10) else src.pick([0, len(msgs) + 1, 0xFFFFFFFF])
        items = b"".join(
            u32(len(m)) + u32(zlib.crc32(m) ^ (1 if i == bad else 0)) + m
            for i, m in enumerate(msgs))
        return s16(topic(src)) + u32(count) + items
    if kind in (b"SUB", b"SEK"):
        value = src.pick(I64) if src.chance(4, 5) else src.int(-2**63, 2**63 - 1)
        return s16(topic(src)) + struct.pack(">Bq", src.int(0, 6), value)
    if kind == b"CMT":
        return s16(topic(src)) + struct.pack(">Q", src.pick(U64))
    if kind == b"UNS":
        return s16(topic(src))
    if kind == b"OFS":
        return s16(src.pick([b"", b"fuzz-client-1", b"nobody"])) if src.chance(3, 4) else b""
    if kind == b"AUT":
        secret = src.pick([b"alice-secret", b"wrong", b""]) if src.chance(3, 4) else src.bytes(8)
        return s16(src.pick([b"alice", b"alice", b"bob", b"", b"\xff"])) + s16(secret)
    if kind == b"HEL":
        return _U16.pack(src.pick([1, 1, 0, 2, 0xFFFF])) + s16(src.bytes(8))
    return b"" if src.chance(3, 4) else src.bytes(8)  # PNG, TOP, STA


def v1_stream(src) -> bytes:
    """A v1 conversation: HEL (usually good), then requests, some damaged."""
    parts = []
    r = src.int(0, 9)
    if r <= 7:
        cid = src.pick([b"", b"fuzz-client-1", b"fuzz-client-2"])
        parts.append(v1_frame(b"HEL", 1, _U16.pack(1) + s16(cid)))
    elif r == 8:
        parts.append(v1_frame(b"HEL", 1, _U16.pack(src.pick([0, 2, 0xFFFF])) + s16(b"")))
    elif src.chance(1, 2):
        parts.append(v1_frame(b"HEL", 1, src.bytes(6)))
    else:
        parts.append(v1_frame(b"HEL", 1, _U16.pack(1) + s16(b"y" * 256)))
    rid = 1
    damaged = src.chance(1, 3)
    for _ in range(src.int(0, 20)):
        rid += 1
        k = src.int(0, 19 if damaged else 17)
        if k < 16:
            kind = src.pick(V1_KINDS)
        elif k < 18:
            kind = src.pick(ODD_KINDS)
        else:
            parts.append(src.bytes(16) if src.chance(1, 2) else u32(src.int(0, 6)))
            continue
        this_rid = rid if src.chance(7, 8) else src.pick([0, 0xFFFFFFFF, 1])
        data = v1_frame(kind, this_rid, v1_payload(src, kind, damaged))
        if damaged and src.chance(1, 10):
            data = mutate(src, data)
        parts.append(data)
    if src.chance(1, 10):
        parts.append(u32(0))
    return b"".join(parts)


def chunked(src, data: bytes) -> list[bytes]:
    """``data`` cut at up to 8 random points (empty chunks included)."""
    cuts = sorted(src.int(0, len(data)) for _ in range(src.int(0, 8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def any_stream(src) -> bytes:
    r = src.int(0, 19)
    if r < 9:
        return v0_stream(src)
    if r < 18:
        return v1_stream(src)
    if r < 19:
        return src.bytes(200)
    return v1_stream(src)[:src.int(0, 60)]


# -- codec targets ---------------------------------------------------------------

def codec_modules():
    """``(cython, pure)`` namespaces of the codec modules (``None`` for a missing build)."""
    import types
    from broker._pure import frames as pf, records as pr, wire1 as pw
    pure = types.SimpleNamespace(frames=pf, records=pr, wire1=pw, name="python")
    try:
        from broker._speedups import frames as cf, records as cr, wire1 as cw
    except ImportError:
        return None, pure
    return types.SimpleNamespace(frames=cf, records=cr, wire1=cw, name="cython"), pure


def _outcome(fn, *args):
    """``("ok", result)`` or ``("raise", exception class name)``."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - comparing what each twin raises
        return ("raise", type(exc).__name__)


def _flatten_v0(events) -> list:
    out = []
    for ev in events:
        if ev[0] == 5:  # OP_PUB: coalescing depends on feed boundaries
            out.extend(("pub", ev[1], m) for m in ev[2])
        else:
            out.append(ev)
    return out


def check_frames(c, py, chunks: list[bytes], limit: int) -> None:
    """v0 FrameReader twins agree call for call; chunking doesn't change the events."""
    readers = [m.frames.FrameReader(limit) for m in (c, py) if m is not None]
    op_hel = py.frames.OP_HEL
    seen: list = []
    detached = False
    for chunk in chunks:
        results = [_outcome(r.feed, chunk) for r in readers]
        assert all(res == results[0] for res in results), (
            "v0 FrameReader twins diverge on %r: %r" % (chunk[:80], results))
        assert results[0][0] == "ok", "FrameReader.feed raised %s" % results[0][1]
        events = results[0][1]
        states = [(r.buffered, r.broken) for r in readers]
        assert all(s == states[0] for s in states), "buffered/broken diverge: %r" % states
        if any(ev[0] == op_hel for ev in events):
            detached = True
        if not detached:
            # Only the bytes of one incomplete frame are ever held.
            assert readers[-1].buffered <= limit + 8, (readers[-1].buffered, limit)
        seen.extend(events)
    if detached:
        rests = [_outcome(r.detach) for r in readers]
        assert all(x == rests[0] for x in rests), "detach() diverges: %r" % rests
    whole = py.frames.FrameReader(limit).feed(b"".join(chunks))
    assert _flatten_v0(seen) == _flatten_v0(whole), (
        "chunking changed the v0 events:\n%r\n%r" % (seen[:20], whole[:20]))


def check_v1_reader(c, py, chunks: list[bytes], limit: int) -> None:
    """V1Reader twins agree call for call; chunking doesn't change the events."""
    readers = [m.wire1.V1Reader(limit) for m in (c, py) if m is not None]
    seen: list = []
    for chunk in chunks:
        results = [_outcome(r.feed, chunk) for r in readers]
        assert all(res == results[0] for res in results), (
            "V1Reader twins diverge on %r: %r" % (chunk[:80], results))
        assert results[0][0] == "ok", "V1Reader.feed raised %s" % results[0][1]
        states = [(r.buffered, r.broken) for r in readers]
        assert all(s == states[0] for s in states), "buffered/broken diverge: %r" % states
        assert readers[-1].buffered <= limit + 4, (readers[-1].buffered, limit)
        seen.extend(results[0][1])
    whole = py.wire1.V1Reader(limit).feed(b"".join(chunks))
    assert seen == whole, "chunking changed the v1 events:\n%r\n%r" % (seen[:20], whole[:20])


def _agree(name: str, mods, *args):
    results = [_outcome(getattr(m.wire1, name), *args) for m in mods]
    assert all(r == results[0] for r in results), (
        "%s twins diverge on %r: %r" % (name, [repr(a)[:100] for a in args], results))
    return results[0]


def check_payloads(c, py, src) -> None:
    """Payload parsers and the MSG builder agree between the twins on damaged input."""
    mods = [m for m in (c, py) if m is not None]
    # PUB payloads, as clients send them (usually) and damaged (sometimes).
    payload = v1_payload(src, b"PUB")
    if src.chance(1, 3):
        payload = mutate(src, payload)
    _agree("parse_publish", mods, payload)
    _agree("read_str", mods, payload, src.int(0, len(payload) + 2))
    # Stored records -> MSG frame -> parse, with damage at either step.
    msgs = [message(src) for _ in range(src.int(0, 6))]
    base = src.pick([0, 1, 10**6, 2**63 - 8])
    buf = py.records.encode_records(msgs, base, 1_700_000_000_000)
    if src.chance(1, 3):
        buf = mutate(src, buf)
    frm = src.int(0, len(msgs) + 1) + base
    end = src.pick([base + len(msgs), base + src.int(0, len(msgs)), 2**63 - 1])
    max_bytes = src.pick([1, 30, 100, 1 << 20])
    ok, res = _agree("message_frame", mods, buf, 7, b"topic", frm, end, max_bytes)
    if ok == "ok" and res[0]:
        payload = bytes(res[0][11:])
        if src.chance(1, 2):
            payload = mutate(src, payload)
        _agree("parse_messages", mods, payload)


# -- command handling -------------------------------------------------------------

class FakeTransport:
    """Enough of an ``asyncio.Transport`` for a broker Connection, in memory."""

    def __init__(self, loop, protocol, peer) -> None:
        self.loop = loop
        self.protocol = protocol
        self.peer = peer
        self.out = bytearray()        # everything the broker wrote before closing
        self.closing = False          # close() or abort() called (by anyone)
        self.closed_by_broker = False  # ... by the broker
        self.paused = False           # pause_reading() in effect
        self.lost = False             # connection_lost delivered

    def write(self, data) -> None:
        if not self.closing:
            self.out += data

    def _close(self) -> None:
        if not self.closing:
            self.closing = True
            self.closed_by_broker = True
            self.loop.call_soon(self._deliver_lost)

    close = abort = _close

    def _deliver_lost(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def peer_closes(self) -> None:
        self.closing = True
        self._deliver_lost()

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name, default=None):
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


_VALID_TOPIC = re.compile(rb"[A-Za-z0-9._-]{1,200}\Z")
_ERR_CODES = range(1, 15)
_REPLY_KINDS = {b"RES", b"ACK", b"ERR", b"MSG", b"POG"}


def _v1_requests(stream: bytes, limit: int) -> list[tuple[bytes, int, bytes]]:
    """The complete v1 requests in ``stream``, per docs/protocol.md (not the codec)."""
    out = []
    pos = 0
    while len(stream) - pos >= 4:
        n = _U32.unpack_from(stream, pos)[0]
        if n == 0 or n > limit or n < 7:
            break
        if len(stream) - pos < 4 + n:
            break
        out.append((stream[pos + 4:pos + 7], _U32.unpack_from(stream, pos + 7)[0],
                    stream[pos + 11:pos + 4 + n]))
        pos += 4 + n
    return out


def _pub_request(payload: bytes):
    """``(topic, [messages], crcs_ok)`` of a well-formed PUB payload, else None."""
    try:
        if len(payload) < 2:
            return None
        n = _U16.unpack_from(payload, 0)[0]
        t = payload[2:2 + n]
        if len(t) != n:
            return None
        pos = 2 + n
        count = _U32.unpack_from(payload, pos)[0]
        pos += 4
        msgs, ok = [], True
        for _ in range(count):
            ln, crc = struct.unpack_from(">II", payload, pos)
            m = payload[pos + 8:pos + 8 + ln]
            if len(m) != ln:
                return None
            ok = ok and zlib.crc32(m) == crc
            msgs.append(m)
            pos += 8 + ln
        if pos != len(payload):
            return None
        return t, msgs, ok
    except struct.error:
        return None


def _v0_sent_messages(stream: bytes) -> list[tuple[bytes, bytes]]:
    """(topic, message) of every v0 PUB frame with a valid CRC in ``stream``."""
    out = []
    pos = 0
    while len(stream) - pos >= 4:
        n = _U32.unpack_from(stream, pos)[0]
        if n == 0:
            break
        body = stream[pos + 4:pos + 4 + n]
        if len(body) < n:
            break
        if body[:3] == b"PUB":
            # Any body that starts with PUB carries the CRC trailer, even a
            # malformed one ("PUBx"): the v0 framing knows PUB by its first
            # three bytes (broker/_pure/frames.py).
            crc = stream[pos + 4 + n:pos + 8 + n]
            if len(crc) < 4:
                break
            sp = body.find(b" ", 4)
            if body[3:4] == b" " and sp > 4 and zlib.crc32(body[sp + 1:]) == _U32.unpack(crc)[0]:
                out.append((body[4:sp], body[sp + 1:]))
            pos += 8 + n
        else:
            pos += 4 + n
    return out


class CommandHarness:
    """An in-process broker fed fuzzed byte streams through fake transports."""

    MAX_FRAME = 4096

    def __init__(self, root: str, *, auth_file: str | None = None) -> None:
        from broker.config import Config
        import logging
        from broker.server import Broker
        # Refusals are logged at WARNING by design; only errors matter here.
        logging.getLogger("broker").setLevel(logging.ERROR)
        self.root = root
        self.data_dir = os.path.join(root, "data")
        self.loop = asyncio.new_event_loop()
        cfg = Config(host="127.0.0.1", port=0, data_dir=self.data_dir,
                     max_frame_bytes=self.MAX_FRAME, fsync="never", max_topics=2000,
                     max_subscriptions=50, auth_file=auth_file)
        self.broker = Broker(cfg)
        self.loop.run_until_complete(self.broker.start())
        self.executions = 0
        self.sent: dict[bytes, set] = {}       # wire topic -> messages sent with a good CRC
        self.acked: list = []                  # (topic, base, [messages])
        self.transcript: list = []             # normalised outcome per example (differential)
        self.peer_n = 0

    def close(self) -> None:
        self.loop.run_until_complete(self.broker.stop())
        self.loop.close()

    # -- one example --------------------------------------------------------

    def run(self, chunks: list[bytes]) -> None:
        self.executions += 1
        self.loop.run_until_complete(asyncio.wait_for(self._run(chunks), 30))

    async def _run(self, chunks: list[bytes]) -> None:
        from broker.server.connection import Connection
        broker = self.broker
        self.peer_n += 1
        conn = Connection(broker)
        t = FakeTransport(self.loop, conn, ("127.0.0.1", 40000 + self.peer_n % 20000))
        conn.connection_made(t)
        stream = b"".join(chunks)
        for m_topic, m in _v0_sent_messages(stream):
            self.sent.setdefault(m_topic, set()).add(m)
        for kind, _rid, payload in _v1_requests(stream, self.MAX_FRAME):
            if kind == b"PUB":
                p = _pub_request(payload)
                if p is not None and p[2]:
                    self.sent.setdefault(p[0], set()).update(p[1])
        for chunk in chunks:
            if t.closing:
                break
            deadline = self.loop.time() + 5
            while t.paused and not t.closing:
                # Paused for back-pressure: a real transport would not read.
                assert self.loop.time() < deadline, "reading paused for 5 s"
                await asyncio.sleep(0.001)
            if t.closing:
                break
            conn.data_received(chunk)       # an exception here is a finding
            await asyncio.sleep(0)
        await self._settle(conn)
        t.peer_closes()
        await asyncio.sleep(0)
        self._check_connection_gone(conn)
        self._check_output(conn, t, stream)

    async def _settle(self, conn) -> None:
        """Let every reply this input causes be written (acks, AUT checks, deliveries)."""
        for _ in range(3):
            await self.broker.writer.flush()
            # Tasks the connection owns (AUT checks run the hash in a thread).
            tasks = [t for t in getattr(conn, "_tasks", ()) if not t.done()]
            if getattr(conn, "_auth_task", None) is not None:
                tasks.append(conn._auth_task)
            if tasks:
                await asyncio.wait(tasks, timeout=10)
            for _ in range(20):
                if conn._pump_handle is None:
                    break
                await asyncio.sleep(0)
            await asyncio.sleep(0)

    def _check_connection_gone(self, conn) -> None:
        broker = self.broker
        assert conn not in broker.connections, "connection still registered after it closed"
        assert conn.closed
        for topic in broker.store.topics.values():
            for sub in topic.subscribers:
                assert sub.conn is not conn, "a subscription outlived its connection"
        assert conn._pump_handle is None and conn._timer is None

    # -- output checks ------------------------------------------------------

    def _check_output(self, conn, t: FakeTransport, stream: bytes) -> None:
        out = bytes(t.out)
        if conn.version == 1:
            self.transcript.append(self._check_v1(t, out, stream))
        else:
            self.transcript.append(self._check_v0(t, out, stream))

    def _check_v0(self, t: FakeTransport, out: bytes, stream: bytes):
        from broker._pure.frames import FrameReader
        # What the client subscribed to, as the spec reads the stream.
        subs = set()
        regs = 0
        for ev in FrameReader(self.MAX_FRAME).feed(stream):
            if ev[0] == 3:
                subs.add(ev[1])
            elif ev[0] == 1:
                regs += 1
        pos, replies, deliveries = 0, 0, 0
        while pos < len(out):
            assert len(out) - pos >= 4, "partial frame sent to a v0 client"
            n = _U32.unpack_from(out, pos)[0]
            body = out[pos + 4:pos + 4 + n]
            assert len(body) == n, "partial frame sent to a v0 client"
            pos += 4 + n
            sp = body.find(b" ")
            if sp > 0 and body[:sp] in subs:
                deliveries += 1
                continue
            assert n == 36 and str(uuid.UUID(body.decode("ascii"))) == body.decode(), (
                "v0 client got a frame that is neither a REG id nor a delivery: %r" % body[:80])
            replies += 1
        assert replies <= regs, "%d REG replies for %d REG frames" % (replies, regs)
        # How many deliveries go out is a matter of timing when a SET moves
        # a subscription after the disk thread wrote (redelivery), or when
        # the broker closes the connection: not part of the transcript.
        return ("v0", replies, t.closed_by_broker)

    def _check_v1(self, t: FakeTransport, out: bytes, stream: bytes):
        from broker._pure.wire1 import parse_messages
        requests = _v1_requests(stream, self.MAX_FRAME)
        replies: list = []   # (kind, rid, payload) in order
        pos = 0
        while pos < len(out):
            n = _U32.unpack_from(out, pos)[0]
            assert n >= 7 and len(out) - pos >= 4 + n, "malformed frame from the broker"
            kind = out[pos + 4:pos + 7]
            rid = _U32.unpack_from(out, pos + 7)[0]
            payload = out[pos + 11:pos + 4 + n]
            pos += 4 + n
            assert kind in _REPLY_KINDS, "broker sent frame type %r" % kind
            if kind == b"ERR":
                code = _U16.unpack_from(payload, 0)[0]
                tl = _U16.unpack_from(payload, 2)[0]
                assert len(payload) == 4 + tl, "ERR payload length"
                payload[4:].decode("utf-8")
                assert code in _ERR_CODES, "unknown error code %d" % code
            elif kind == b"ACK":
                assert len(payload) == 12, "ACK payload %r" % payload
            elif kind == b"POG":
                assert payload == b""
            elif kind == b"MSG":
                parse_messages(payload)  # checks every record's CRC
            replies.append((kind, rid, payload))
        # Exactly one reply per request, in request order (ACKs may come
        # later); framing errors are answered with request id 0.
        rids = [rid for _k, rid, _p in requests]
        # AUT is answered when the hash check finishes, so (like ACK) its
        # reply may come after replies to later requests.
        auts = {rid for kind, rid, _p in requests if kind == b"AUT"}
        answered: dict[int, int] = {}
        sub_rids = set()
        order = []
        for kind, rid, payload in replies:
            if kind == b"MSG":
                assert rid in sub_rids, "MSG for request %d before (or without) its SUB's RES" % rid
                continue
            if kind == b"ERR" and rid == 0 and _U16.unpack_from(payload, 0)[0] in (1, 2):
                continue  # framing error: answered with request id 0
            answered[rid] = answered.get(rid, 0) + 1
            assert answered[rid] <= rids.count(rid), "more replies than requests for rid %d" % rid
            if kind == b"RES" and len(payload) == 8:
                sub_rids.add(rid)
            if kind != b"ACK" and rid not in auts:
                order.append(rid)
        unanswered = [r for r in rids if answered.get(r, 0) < rids.count(r)]
        pubs = {rid for kind, rid, _p in requests if kind == b"PUB"}
        if not t.closed_by_broker:
            assert not unanswered, "requests without a reply: %r" % unanswered[:10]
        else:
            # Closed by the broker: after the closing request nothing is
            # answered; a PUB's ACK may be lost with the connection.
            pass
        non_pub = [r for r in rids if r not in pubs and r not in auts]
        it = iter(non_pub)
        assert all(any(r == x for x in it) for r in order if r not in pubs), (
            "replies out of request order: %r vs %r" % (order[:20], non_pub[:20]))
        # Every ACKed batch is remembered, to be found in the log later.
        by_rid = {}
        for kind, rid, payload in requests:
            if kind == b"PUB":
                by_rid.setdefault(rid, []).append(payload)
        for kind, rid, payload in replies:
            if kind == b"ACK" and len(by_rid.get(rid, ())) == 1:
                p = _pub_request(by_rid[rid][0])
                assert p is not None and p[2], "ACK for a PUB that was malformed or had a bad CRC"
                base, count = struct.unpack(">QI", payload)
                assert count == len(p[1]), "ACK count %d for %d messages" % (count, len(p[1]))
                if count:
                    self.acked.append((p[0].decode("ascii"), base, p[1]))
        # The differential transcript: no ids or times, and nothing whose
        # position depends on the disk thread's timing (ACKs, MSG splits).
        norm, acks, delivered = [], [], 0
        for kind, rid, payload in replies:
            if kind == b"ERR":
                norm.append(("ERR", _U16.unpack_from(payload, 0)[0]))
            elif kind == b"MSG":
                delivered += len(parse_messages(payload)[1])
            elif kind == b"ACK":
                acks.append(struct.unpack(">QI", payload)[1])
            elif kind == b"RES" and len(payload) == 8:
                norm.append(("RES8",))
            else:
                norm.append((kind.decode(),))
        if not t.closed_by_broker:
            # Once the broker closes, whether an ACK or a MSG still made it
            # out depends on the disk thread's timing; so does the number of
            # redeliveries after a SEK or an UNS.
            norm.append(("ACKS", tuple(sorted(acks))))
            if not any(kind in (b"SEK", b"UNS") for kind, _r, _p in requests):
                norm.append(("DELIVERED", delivered))
        return ("v1", tuple(norm), t.closed_by_broker)

    # -- whole-store checks ---------------------------------------------------

    def check_store(self) -> int:
        """Everything stored was sent; every ACKed batch is where its ACK said.

        Returns the number of stored messages checked.
        """
        from broker._pure.wire1 import message_frame, parse_messages
        self.loop.run_until_complete(self.broker.writer.flush())
        data_dir = self.data_dir
        assert sorted(os.listdir(self.root)) == ["data"], (
            "files outside the data dir: %r" % os.listdir(self.root))
        topics_dir = os.path.join(data_dir, "topics")
        if os.path.isdir(topics_dir):
            for name in os.listdir(topics_dir):
                assert _VALID_TOPIC.match(name.encode()) and name not in (".", ".."), (
                    "a topic directory with a forbidden name: %r" % name)
        assert not os.path.exists("/tmp/pylogstreams-fuzz-abs")
        checked = 0
        stored: dict[str, dict[int, bytes]] = {}
        self.broker.store.tail.clear()  # check what the files hold, not the memory copy
        for name, topic in self.broker.store.topics.items():
            got = stored[name] = {}
            offset = topic.start_offset

            def convert(buf, frm, end, max_bytes, verify=True):
                return message_frame(buf, 0, b"t", frm, end, max_bytes)

            while True:
                res = topic.read(offset, 1 << 20, convert)
                if res is None:
                    break
                frame, count, nxt = res
                _t, recs = parse_messages(frame[11:])
                for off, _ts, value in recs:
                    assert off == offset, "offset %d where %d was due" % (off, offset)
                    assert value in self.sent.get(name.encode(), ()), (
                        "topic %s holds a message nobody sent with a good CRC: %r"
                        % (name, value[:60]))
                    got[off] = value
                    offset += 1
                    checked += 1
                assert offset == nxt
            assert offset == topic.end_offset
        for name, base, msgs in self.acked:
            for i, m in enumerate(msgs):
                assert stored.get(name, {}).get(base + i) == m, (
                    "ACKed message %s@%d is not stored as sent" % (name, base + i))
        st = self.broker.stats()
        for gauge in ("connections", "subscriptions", "pending_pumps", "timers"):
            assert st[gauge] == 0, "%s = %d with no connection open" % (gauge, st[gauge])
        assert self.broker.healthy()
        return checked


def write_auth_file(path: str, allow_anonymous: bool) -> str:
    """A users file for the harness: alice (cheap scrypt: fuzzing, not security)."""
    from broker.auth import hash_secret
    with open(path, "w") as f:
        f.write("allow_anonymous = %s\n\n[anonymous]\npublish = [\"a\"]\nsubscribe = [\"a\", \"t1\"]\n\n"
                % ("true" if allow_anonymous else "false"))
        f.write("[users.alice]\nsecret = \"%s\"\npublish = [\"chat.*\", \"a\", \"x*\"]\n"
                "subscribe = [\"*\"]\n" % hash_secret("alice-secret", n=16, r=1, p=1))
    return path


def transcript_digest(transcript) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(transcript).encode()).hexdigest()


def differential_run(root: str, seed: int, examples: int) -> dict:
    """Feed ``examples`` seeded streams to an in-process broker of this process's codec.

    Returns the normalised transcript (one entry per example) and counts;
    two processes with different codecs given the same seed must return
    the same transcript.
    """
    import random
    from broker import codec
    rng = random.Random(seed)
    src = RandomSource(rng)
    harness = CommandHarness(root)
    try:
        for _ in range(examples):
            harness.run(chunked(src, any_stream(src)))
        checked = harness.check_store()
    finally:
        harness.close()
    return {"codec": codec.IMPLEMENTATION, "executions": harness.executions,
            "stored_checked": checked, "acked_batches": len(harness.acked),
            "transcript": harness.transcript}


def _main(argv: list[str]) -> None:
    import argparse
    import tempfile
    ap = argparse.ArgumentParser(prog="fuzz_targets.py")
    ap.add_argument("command", choices=["differential"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--examples", type=int, default=300)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pls-fuzz-") as root:
        print(json.dumps(differential_run(root, args.seed, args.examples)))


if __name__ == "__main__":
    import sys
    _main(sys.argv[1:])
