"""Walking record headers in buffers already known to hold valid records.

The codec (``broker.codec.records``) validates and converts whole buffers.
Storage sometimes needs one fact about one record: where the last record of
a recovered piece starts, or the time in a header. These helpers read
headers only (layout in ``broker/_pure/records.py``); they never check a
CRC, so they are used only on bytes the codec has already validated, and
they run a Python step per record only over short spans (at most one index
interval plus one record).
"""

from __future__ import annotations

import struct
import sys
from array import array

from ..codec import records

__all__ = ["HEADER", "read_header", "header_time", "last_record_start", "starts",
           "record_starts"]

HEADER = struct.Struct(">IIQQ")   # length, crc, offset, time (ms)
_TIME = struct.Struct(">Q")
_OFFSET = _TIME                   # the same u64, 8 bytes into a header
_LEN = struct.Struct(">I")


def read_header(buf, pos: int = 0) -> tuple[int, int, int, int]:
    """``(length, crc, offset, time_ms)`` of the record header at ``pos``."""
    return HEADER.unpack_from(buf, pos)


def header_time(buf, pos: int = 0) -> int:
    """The append time (ms) in the header of the record at ``pos``."""
    return _TIME.unpack_from(buf, pos + 16)[0]


def last_record_start(buf, start: int, end: int) -> int:
    """Start of the last record in ``buf[start:end]`` (valid records, ``start < end``)."""
    pos = start
    unpack = _LEN.unpack_from
    while True:
        nxt = pos + 4 + unpack(buf, pos)[0]
        if nxt >= end:
            return pos
        pos = nxt


def starts(entries) -> array:
    """Record start positions from index entries made with interval 1.

    ``records.index_entries(buf, 0, 0, 1, base)`` emits one 8-byte entry per
    record (every record is at least one byte long), in C when the codec
    is compiled; this unpacks their positions into an ``array('I')``
    without a Python step per record.
    """
    pairs = array("I")
    pairs.frombytes(entries)
    if sys.byteorder == "little":
        pairs.byteswap()
    return pairs[1::2]


def record_starts(buf) -> array:
    """Where each record of ``buf`` (valid records, offsets in place) starts.

    One walk over the record headers, in C when the codec is compiled:
    ``index_entries`` with interval 1, based at the first record's offset.
    """
    base = _OFFSET.unpack_from(buf, 8)[0] if buf else 0
    return starts(records.index_entries(buf, 0, 0, 1, base)[0])
