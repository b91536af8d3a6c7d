"""Protocol v1 codec, pure-Python twin of ``broker/_speedups/wire1.pyx``.

Every v1 frame, in both directions, is::

    [u32 N][3-byte type][u32 request id][N - 7 bytes payload]

Strings in payloads are ``[u16 n][n bytes UTF-8]``; integers are
big-endian. The hot payloads have their own functions here so that the
per-message work (CRC-32, record framing) happens in one call per batch:

- ``PUB`` (client -> server): ``str topic, u32 count, count x
  ([u32 len][u32 crc32(message)][message])``; :func:`encode_publish`,
  :func:`parse_publish`.
- ``MSG`` (server -> client): ``str topic, u32 count, count x stored
  record`` (the log's own bytes, forwarded as stored; see records.py);
  :func:`message_frame` builds one from a chunk read from the log,
  :func:`parse_messages` decodes one, checking every record's CRC.

The full protocol is in docs/protocol.md.
"""

from __future__ import annotations

import operator
import struct
import zlib

from .records import HEADER_SIZE, CorruptRecordError, decode_records
from .stream import ChunkedReader

__all__ = [
    "V1Reader", "ProtocolError", "KINDS", "K_ERROR", "K_CLOSE", "K_UNKNOWN",
    "encode", "pack_str", "read_str", "encode_publish", "parse_publish", "publish_records",
    "message_frame", "parse_messages", "decode_messages",
]

# Frame kinds: the 3-byte type on the wire -> a small int in V1Reader events.
KINDS = {
    b"HEL": 1, b"PUB": 2, b"SUB": 3, b"UNS": 4, b"CMT": 5, b"SEK": 6, b"PNG": 7,
    b"TOP": 8, b"OFS": 9, b"STA": 10, b"AUT": 11, b"CFG": 12,
    b"RES": 20, b"ACK": 21, b"ERR": 22, b"MSG": 23, b"POG": 24,
}
K_CLOSE = 0      # (K_CLOSE, 0, b""): zero-length frame; the reader stops
K_UNKNOWN = 30   # (K_UNKNOWN, rid, type): a type this version doesn't know
K_ERROR = 31     # (K_ERROR, 0, reason: str): framing broken; the reader stops

FRAME_HEADER = 7  # type + request id, counted in N
_K_PUB, _K_MSG = KINDS[b"PUB"], KINDS[b"MSG"]  # the bulk kinds: payloads as views

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_HEAD = struct.Struct(">I3sI")
_PUB_ITEM = struct.Struct(">II")
_REC_HDR = struct.Struct(">IIQQ")  # a whole record header
_OFF_TIME = struct.Struct(">QQ")  # a record's offset and time, which its CRC covers last
_U64_MAX = (1 << 64) - 1
_unpack_u32 = _U32.unpack_from
_unpack_u16 = _U16.unpack_from


class ProtocolError(ValueError):
    """A v1 payload that does not match its type's layout."""


class V1Reader(ChunkedReader):
    """Incremental v1 frame splitter: ``feed(data)`` -> ``[(kind, rid, payload)]``.

    Like the v0 FrameReader: any chunking, linear cost, the length prefix
    checked against ``max_frame_bytes`` before anything is allocated, and
    no further output after a ``K_ERROR`` or ``K_CLOSE`` event.

    A payload is bytes, except for the bulk kinds, ``PUB`` and ``MSG``: a
    read-only memoryview of the (immutable) bytes the frame was found in,
    so that a batch is not copied before its handler reads it. (The
    compiled reader does the same for a frame lying whole in a ``bytes``
    chunk, and copies otherwise.) Every function taking a payload takes
    any bytes-like object.
    """

    __slots__ = ()

    def _scan(self, data: bytes, events: list) -> int:
        end = len(data)
        limit = self.max_frame_bytes
        kinds = KINDS
        pos = 0
        whole = None
        while end - pos >= 4:
            n = _unpack_u32(data, pos)[0]
            if n == 0:
                events.append((K_CLOSE, 0, b""))
                self._broken = True
                return pos + 4
            if n > limit:
                events.append((K_ERROR, 0, "frame length %d exceeds limit %d" % (n, limit)))
                self._broken = True
                return pos
            if n < FRAME_HEADER:
                events.append((K_ERROR, 0, "frame length %d is below the v1 minimum %d"
                               % (n, FRAME_HEADER)))
                self._broken = True
                return pos
            if end - pos < 4 + n:
                self._need = 4 + n
                return pos
            _, kind, rid = _HEAD.unpack_from(data, pos)
            code = kinds.get(kind)
            if code is None:
                events.append((K_UNKNOWN, rid, kind))
            elif code == _K_PUB or code == _K_MSG:
                if whole is None:
                    whole = memoryview(data)
                events.append((code, rid, whole[pos + 4 + FRAME_HEADER:pos + 4 + n]))
            else:
                events.append((code, rid, data[pos + 4 + FRAME_HEADER:pos + 4 + n]))
            pos += 4 + n
        self._need = 4
        return pos


def _bytes(value) -> bytes:
    # Bytes-like objects only: bytes(5) would be five zero bytes, bytes([1, 2]) two.
    return value if type(value) is bytes else bytes(memoryview(value))


def encode(kind: bytes, rid: int, payload=b"") -> bytes:
    """One v1 frame of ``kind`` (3 bytes) with request id ``rid``."""
    kind = _bytes(kind)
    payload = _bytes(payload)
    # struct's "3s" would pad or cut a wrong-sized kind: refuse it instead.
    if len(kind) != 3:
        raise ValueError("kind must be 3 bytes")
    if not 0 <= rid <= 0xFFFFFFFF or len(payload) + FRAME_HEADER > 0xFFFFFFFF:
        raise OverflowError("request id or payload out of range")
    return _HEAD.pack(FRAME_HEADER + len(payload), kind, rid) + payload


def pack_str(value) -> bytes:
    """``[u16 n][n bytes]``; ``value`` is str (UTF-8) or bytes."""
    value = value.encode("utf-8") if isinstance(value, str) else _bytes(value)
    if len(value) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return _U16.pack(len(value)) + value


def encode_publish(rid: int, topic, messages) -> bytes:
    """A whole ``PUB`` frame: ``messages`` to ``topic``, each with its CRC."""
    if isinstance(topic, str):
        topic = topic.encode("utf-8")
    parts = [b"", pack_str(topic), _U32.pack(len(messages))]
    if not 0 <= rid <= 0xFFFFFFFF:
        raise OverflowError("request id out of range")
    for msg in messages:
        # The size in bytes, not items (an array('I') or a cast memoryview).
        n = len(msg) if type(msg) is bytes else memoryview(msg).nbytes
        parts.append(_PUB_ITEM.pack(n, zlib.crc32(msg)))
        parts.append(msg)
    body = b"".join(parts)
    return _HEAD.pack(FRAME_HEADER + len(body), b"PUB", rid) + body


def read_str(payload, pos: int):
    """Read ``[u16 n][n bytes]`` at ``pos``: ``(bytes, position after)``."""
    # A negative pos would make struct read from the end of the buffer.
    if pos < 0 or len(payload) - pos < 2:
        raise ProtocolError("truncated string")
    n = _unpack_u16(payload, pos)[0]
    if len(payload) - pos - 2 < n:
        raise ProtocolError("truncated string")
    return bytes(payload[pos + 2:pos + 2 + n]), pos + 2 + n


def _pub_head(payload):
    """A ``PUB`` payload's topic and message count: ``(topic, count, position)``."""
    topic, pos = read_str(payload, 0)
    end = len(payload)
    if end - pos < 4:
        raise ProtocolError("PUB: missing message count")
    count = _unpack_u32(payload, pos)[0]
    pos += 4
    # Each message needs at least its 8-byte header: reject absurd counts
    # before building anything.
    if count > (end - pos) // 8:
        raise ProtocolError("PUB: count %d does not fit the frame" % count)
    return topic, count, pos


def parse_publish(payload):
    """Split a ``PUB`` payload: ``(topic, messages, bad_index)``.

    Every message's CRC is checked; ``bad_index`` is the index of the
    first message whose CRC does not match, or -1. A payload whose layout
    is wrong raises :class:`ProtocolError`.
    """
    topic, count, pos = _pub_head(payload)
    end = len(payload)
    messages = []
    bad = -1
    for i in range(count):
        if end - pos < 8:
            raise ProtocolError("PUB: truncated message header")
        n, crc = _PUB_ITEM.unpack_from(payload, pos)
        pos += 8
        if end - pos < n:
            raise ProtocolError("PUB: truncated message")
        msg = bytes(payload[pos:pos + n])
        pos += n
        if bad < 0 and zlib.crc32(msg) != crc:
            bad = i
        messages.append(msg)
    if pos != end:
        raise ProtocolError("PUB: %d trailing bytes" % (end - pos))
    return topic, messages, bad


def publish_records(payload, base_offset: int, timestamp_ms: int):
    """A ``PUB`` payload as finished log records: ``(topic, records, count, bad, last_len)``.

    The broker's publish path: where :func:`parse_publish` builds one bytes
    object per message, this builds one ``bytearray`` holding ``count``
    finished records in the segment format (``broker/_pure/records.py``):
    offsets ``base_offset`` onwards, time ``timestamp_ms``, and each
    record's CRC made from the message's CRC-32 as the client sent it and
    this function checked it, continued over offset and time, so each
    message is hashed once. The caller gives the offsets the topic will
    assign (the loop keeps a topic's next offset); ``last_len`` is the size
    of the last record, header included (0 when there are none).

    ``bad`` is the index of the first message whose CRC does not match (then
    ``records`` is None: the batch is refused whole), else -1. A payload
    that does not parse raises :class:`ProtocolError`, as
    :func:`parse_publish` does; offsets past ``2**64 - 1`` or a negative
    offset or time raise ValueError, and ones that are not integers
    TypeError.
    """
    topic, count, pos = _pub_head(payload)
    base_offset, timestamp_ms = operator.index(base_offset), operator.index(timestamp_ms)
    if not (0 <= base_offset <= _U64_MAX and 0 <= timestamp_ms <= _U64_MAX) \
            or base_offset + count > _U64_MAX + 1:
        raise ValueError("publish_records: offset or time out of range")
    # The fewest Python steps per message for a well-formed batch whose
    # every CRC matches; one copy (the join).
    view = memoryview(payload)
    unpack_item, pack_head, pack_tail, crc32 = (
        _PUB_ITEM.unpack_from, _REC_HDR.pack, _OFF_TIME.pack, zlib.crc32)
    parts: list = []
    append = parts.append
    n = -HEADER_SIZE
    try:
        for off in range(base_offset, base_offset + count):
            n, crc = unpack_item(view, pos)
            start = pos + 8
            pos = start + n
            msg = view[start:pos]
            if crc32(msg) != crc:
                break
            append(pack_head(n + HEADER_SIZE - 4, crc32(pack_tail(off, timestamp_ms), crc),
                             off, timestamp_ms))
            append(msg)
        else:
            if pos == len(payload):
                return topic, bytearray().join(parts), count, -1, n + HEADER_SIZE
    except struct.error:  # a header past the end
        pass
    # A bad CRC, or a message past the end, or trailing bytes: parse_publish
    # raises what the layout breaks, as before a CRC is reported, and
    # finds the first bad CRC.
    _topic, _messages, bad = parse_publish(payload)
    if bad < 0:
        raise RuntimeError("publish_records: a valid batch was refused")  # cannot happen
    return topic, None, count, bad, 0


def message_frame(buf, rid: int, topic, from_offset: int, end_offset: int, max_bytes: int,
                  verify: bool = True):
    """A ``MSG`` frame of stored records, forwarded without re-encoding.

    ``buf`` is a chunk read from the log at a record boundary. Records with
    ``from_offset <= offset < end_offset`` are checked (CRC, length) and
    copied as they are, up to ``max_bytes`` (at least one is taken).
    ``verify=False`` skips the CRC check, as in
    ``records.records_to_deliveries`` (records the broker holds in memory).
    Returns ``(frame, count, next_offset, used)`` like
    ``records.records_to_deliveries`` (frame is ``b""`` when count is 0).
    """
    if from_offset < 0 or end_offset < 0:
        raise ValueError("offsets must be >= 0")
    end = len(buf)
    pos = 0
    first = -1
    count = 0
    nxt = from_offset
    unpack_hdr, crc32 = _REC_HDR.unpack_from, zlib.crc32
    view = memoryview(buf)
    while end - pos >= HEADER_SIZE:
        length, crc, off, _ts = unpack_hdr(view, pos)
        if length < HEADER_SIZE - 4:
            raise CorruptRecordError(pos, "length %d below minimum" % length)
        if length > end - pos - 4 or off >= end_offset:
            break
        if verify and crc32(view[pos + 8:pos + HEADER_SIZE],
                            crc32(view[pos + HEADER_SIZE:pos + 4 + length])) != crc:
            raise CorruptRecordError(pos, "checksum mismatch")
        if off >= from_offset:
            if first < 0:
                first = pos
            elif pos + 4 + length - first > max_bytes:
                break
            count += 1
        nxt = off + 1
        pos += 4 + length
    if not count:
        return b"", 0, max(nxt, from_offset), pos
    name = pack_str(topic)
    size = FRAME_HEADER + len(name) + 4 + pos - first
    frame = b"".join((_HEAD.pack(size, b"MSG", rid), name, _U32.pack(count), view[first:pos]))
    return frame, count, nxt, pos


def parse_messages(payload):
    """Decode a ``MSG`` payload: ``(topic, [(offset, time_ms, value), ...])``.

    Every record's CRC is checked; a bad one raises CorruptRecordError.
    """
    topic, pos = read_str(payload, 0)
    if len(payload) - pos < 4:
        raise ProtocolError("MSG: missing record count")
    count = _unpack_u32(payload, pos)[0]
    pos += 4
    out, stop = decode_records(payload, 0, (1 << 63) - 1, pos)
    if len(out) != count or stop != len(payload):
        raise CorruptRecordError(stop, "MSG: %d of %d records decoded" % (len(out), count))
    return topic, out


def decode_messages(payload, topic, min_offset: int, factory):
    """Decode a ``MSG`` payload straight into message objects.

    For each record with ``offset >= min_offset`` (older ones are stale:
    a seek or a resubscription moved past them) builds
    ``factory(topic, offset, time_ms, value)``; every record's CRC is
    checked (by :func:`parse_messages`). Returns ``(messages, next_offset)``,
    next_offset being one past the last message built, or ``min_offset`` if
    none was.
    """
    if min_offset < 0:
        raise ValueError("min_offset must be >= 0")
    _, records = parse_messages(payload)
    out = []
    nxt = min_offset
    for off, ts, value in records:
        if off >= nxt:
            out.append(factory(topic, off, ts, value))
            nxt = off + 1
    return out, nxt
