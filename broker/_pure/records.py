"""Log record format, pure-Python twin of ``broker/_speedups/records.pyx``.

Every record in a segment file is::

    offset  size  field
    0       4     length   bytes that follow this field: 20 + len(payload)
    4       4     crc      CRC-32 (zlib) of the payload, continued over bytes 8 .. 24
    8       8     offset   logical offset in the topic (0, 1, 2, ...)
    16      8     time     append time, milliseconds since the Unix epoch
    24      n     payload  the message bytes

All integers are unsigned big-endian. The CRC is
``zlib.crc32(record[8:24], zlib.crc32(payload))``: the payload's CRC first,
then the offset and time, so the broker turns the CRC a client sent with
a message into the record's CRC by hashing 16 bytes, not the payload
again. A record is valid when its length is
at least 20, it fits in the buffer, its CRC matches and its offset is the one
expected; scanning stops at the first record that is not.

Functions here work on whole buffers (a batch to append, a chunk read from a
segment) so the caller runs Python once per batch; the Cython twin does the
per-record work in C.
"""

from __future__ import annotations

import operator
import struct
import zlib
from itertools import repeat

__all__ = [
    "HEADER_SIZE", "CorruptRecordError", "encode_records", "scan_records",
    "index_entries", "decode_records", "records_to_deliveries",
]

HEADER_SIZE = 24        # length + crc + offset + time
_MIN_LENGTH = 20        # crc + offset + time

_HDR = struct.Struct(">IIQQ")
_LEN = struct.Struct(">I")
_OFF_TIME = struct.Struct(">QQ")
_OFF = struct.Struct(">Q")
_INDEX_ENTRY = struct.Struct(">II")
_unpack_hdr = _HDR.unpack_from
_pack_len = _LEN.pack
_first = operator.itemgetter(0)


class CorruptRecordError(ValueError):
    """A record failed its CRC or offset check where a valid one must be."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__("corrupt record at byte %d: %s" % (position, reason))
        self.position = position  # byte position of the bad record in the buffer
        self.reason = reason      # what was wrong with it


def encode_records(messages, base_offset: int, timestamp_ms: int) -> bytes:
    """Encode ``messages`` as consecutive records starting at ``base_offset``."""
    parts = []
    append = parts.append
    off = base_offset
    for msg in messages:
        tail = _OFF_TIME.pack(off, timestamp_ms)
        crc = zlib.crc32(tail, zlib.crc32(msg))
        append(_HDR.pack(_MIN_LENGTH + len(msg), crc, off, timestamp_ms))
        append(msg)
        off += 1
    return b"".join(parts)


def _check_start(start: int) -> None:
    # struct.unpack_from reads a negative offset from the end of the buffer
    # and memoryview slices wrap too: refuse it rather than scan garbage.
    if start < 0:
        raise ValueError("start must be >= 0")


def _check(buf, pos: int, end: int, expected: int):
    """Return (length, offset, time) of a valid record at ``pos`` or None."""
    if end - pos < HEADER_SIZE:
        return None
    length, crc, off, ts = _unpack_hdr(buf, pos)
    if length < _MIN_LENGTH or length > end - pos - 4:
        return None
    if expected >= 0 and off != expected:
        return None
    view = memoryview(buf)
    if zlib.crc32(view[pos + 8:pos + HEADER_SIZE], zlib.crc32(view[pos + HEADER_SIZE:pos + 4 + length])) != crc:
        return None
    return length, off, ts


def scan_records(buf, expected_offset: int, start: int = 0):
    """Validate records from ``start``; stop at the first invalid one.

    Returns ``(count, valid_end)``: how many valid records follow ``start``
    with contiguous offsets from ``expected_offset``, and the byte position
    just after the last of them. Recovery truncates a segment to
    ``valid_end``: the longest valid prefix.
    """
    _check_start(start)
    if expected_offset < 0:
        raise ValueError("expected_offset must be >= 0")
    end = len(buf)
    pos = start
    count = 0
    expected = expected_offset
    while True:
        rec = _check(buf, pos, end, expected)
        if rec is None:
            return count, pos
        pos += 4 + rec[0]
        count += 1
        expected += 1


def index_entries(buf, base_position: int, next_index_position: int,
                  interval: int, segment_base_offset: int):
    """Sparse index entries for the records in ``buf`` (assumed valid).

    ``buf`` is appended to a segment at byte ``base_position``. An entry
    ``[u32 offset - segment_base_offset][u32 position]`` is emitted for each
    record starting at or after ``next_index_position``, after which the
    next one is due ``interval`` bytes later. Returns ``(entries, next)``.
    """
    base_position, due, interval, segment_base_offset = map(
        operator.index, (base_position, next_index_position, interval, segment_base_offset))
    end = len(buf)
    unpack_len, unpack_off = _LEN.unpack_from, _OFF.unpack_from
    stride = 4 + unpack_len(buf, 0)[0] if end >= HEADER_SIZE else 0
    if stride >= HEADER_SIZE and end >= _MANY * stride and end % stride == 0 \
            and _equal_sized(buf, stride, end):
        # Many equal-sized records (the common case): where each one starts
        # is known, so Python steps through none of them. (For a few, the
        # walk below costs less than the check.)
        first = max(0, -(-(due - base_position) // stride)) * stride  # the first at or after due
        if first >= end:
            return b"", due
        # After an entry, the next is due interval bytes on: so many records.
        step = max(1, -(-interval // stride)) * stride
        offsets = map(_first, map(unpack_off, repeat(buf), range(first + 8, end, step)))
        wheres = range(base_position + first, base_position + end, step)
        entries = b"".join(map(_INDEX_ENTRY.pack,
                               map(operator.sub, offsets, repeat(segment_base_offset)), wheres))
        return entries, wheres[-1] + interval
    pos = 0
    parts = []
    while end - pos >= HEADER_SIZE:
        if base_position + pos >= due:  # only the records indexed have their offset read
            where = base_position + pos
            parts.append(_INDEX_ENTRY.pack(unpack_off(buf, pos + 8)[0] - segment_base_offset,
                                           where))
            due = where + interval
        pos += 4 + unpack_len(buf, pos)[0]
    return b"".join(parts), due


_MANY = 32  # records in a batch from which index_entries checks for equal sizes


def _equal_sized(buf, stride: int, end: int) -> bool:
    """True if ``buf[:end]`` is records of ``stride`` bytes each.

    Each of the four bytes of the length field is compared, for every
    record at once, through a strided view: Python steps through no record.
    """
    view = memoryview(buf).cast("B")
    count = end // stride
    return all(view[i:end:stride].tobytes() == view[i:i + 1].tobytes() * count for i in range(4))


def decode_records(buf, from_offset: int, end_offset: int, start: int = 0):
    """Decode valid records with ``from_offset <= offset < end_offset``.

    ``buf[start:]`` must begin at a record boundary. Returns
    ``(records, position)`` where records is a list of
    ``(offset, time_ms, payload)`` and position is where decoding stopped
    (an incomplete record, ``end_offset`` reached, or the end of ``buf``).
    A complete record that fails its checks raises :class:`CorruptRecordError`.
    """
    _check_start(start)
    out = []
    pos = start
    end = len(buf)
    while end - pos >= HEADER_SIZE:
        length, _crc, off, ts = _unpack_hdr(buf, pos)
        if length < _MIN_LENGTH:
            raise CorruptRecordError(pos, "length %d below minimum" % length)
        if length > end - pos - 4:
            break
        if off >= end_offset:
            break
        if _check(buf, pos, end, -1) is None:
            raise CorruptRecordError(pos, "checksum mismatch")
        if off >= from_offset:
            out.append((off, ts, bytes(buf[pos + HEADER_SIZE:pos + 4 + length])))
        pos += 4 + length
    return out, pos


def records_to_deliveries(buf, topic, from_offset: int, end_offset: int,
                          max_bytes: int, start: int = 0, verify: bool = True):
    """Turn stored records into v0 delivery frames, verifying each CRC.

    ``verify=False`` skips the CRC check (never the length checks): only
    for records the broker encoded itself and kept in memory (the tail
    cache), which no disk has touched since their CRC was computed.

    Like :func:`decode_records`, but the output is the bytes to write to a
    v0 consumer: ``[u32 len]["topic payload"]`` per record with
    ``from_offset <= offset < end_offset``, stopping before the output
    would exceed ``max_bytes`` (at least one record is always taken).
    Returns ``(frames, count, next_offset, position)``: next_offset is the
    offset after the last record consumed (delivered or skipped) and
    ``from_offset`` when none was.
    """
    _check_start(start)
    prefix = bytes(topic) + b" "
    plen = len(prefix)
    parts = []
    size = 0
    count = 0
    nxt = from_offset
    pos = start
    end = len(buf)
    while end - pos >= HEADER_SIZE:
        length, _crc, off, _ts = _unpack_hdr(buf, pos)
        if length < _MIN_LENGTH:
            raise CorruptRecordError(pos, "length %d below minimum" % length)
        if length > end - pos - 4 or off >= end_offset:
            break
        if verify and _check(buf, pos, end, -1) is None:
            raise CorruptRecordError(pos, "checksum mismatch")
        if off >= from_offset:
            n = length - _MIN_LENGTH
            if count and size + 4 + plen + n > max_bytes:
                break
            parts.append(_pack_len(plen + n))
            parts.append(prefix)
            parts.append(buf[pos + HEADER_SIZE:pos + 4 + length])
            size += 4 + plen + n
            count += 1
        nxt = off + 1
        pos += 4 + length
    return b"".join(parts), count, max(nxt, from_offset), pos
