"""Upgrade a data directory written in an older storage format, in place.

Format 1 differs from format 2 only in each record's CRC: format 1 hashed
bytes 8 .. 4 + length in one pass (offset, time, payload); format 2 hashes
the payload, then continues over offset and time (``records.py``), so the
broker derives a record's CRC from the CRC its publisher sent by hashing
16 bytes. The layout is the same, so upgrading rewrites CRC fields only.

Each segment that has a format-1 record is copied, with every such record
given its format-2 CRC, to ``<name>.log.tmp``; the copy is fsynced and
renamed over the segment, and the directory fsynced. So a crash leaves
each segment either as it was or wholly upgraded, never a torn CRC field.
Only then does ``meta.json`` say format 2 (``LogStore._check_meta``); an
upgrade that a crash interrupts runs again at the next start, and finds
the segments it did already valid under format 2.

A complete record that is valid under neither format (corrupt before the
upgrade) is copied as it is and logged, so it stays refused as it was,
and the records after it are still upgraded. An incomplete record at the
end of a segment (a torn tail) is copied as it is; recovery cuts it as
before. Memory use is bounded: the file is read in chunks of 4 MiB (a
record bigger than that is read whole, as reading it would need anyway).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib

from .fileio import write_replace_parts
from .segment import parse_segment_file

__all__ = ["upgrade_format1", "upgrade_segment", "TEMP_SUFFIX"]

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"     # <20 digits>.log.tmp: a copy being written (write_replace_parts)
_U32 = struct.Struct(">I")
_HEADER_SIZE = 24
_CHUNK = 4 << 20


def _walk(f, size: int):
    """``(complete, bytearray)`` for each record of segment file ``f``, in order.

    Complete records come whole (``True``). Whatever cannot be a complete
    record (a torn tail, or everything from a length below the minimum,
    after which no record boundary can be found) comes last, as ``False``.
    At most one chunk plus one record is held at a time.
    """
    buf = bytearray()
    pos = 0
    left = size  # bytes of the file not read yet
    while True:
        avail = len(buf) - pos
        need = _HEADER_SIZE
        if avail >= 4:
            length = _U32.unpack_from(buf, pos)[0]
            if length < _HEADER_SIZE - 4:
                need = -1  # no boundary after this: the rest goes as it is
            elif avail >= 4 + length:
                yield True, buf[pos:pos + 4 + length]
                pos += 4 + length
                continue
            else:
                need = 4 + length
        if need < 0 or not left:
            # need < 0: the rest of the file goes as it is
            rest = buf[pos:] + (f.read(left) if left else b"")
            if rest:
                yield False, rest
            return
        del buf[:pos]
        pos = 0
        piece = f.read(min(left, max(_CHUNK, need - len(buf))))
        if not piece:
            raise RuntimeError("%s shrank during the upgrade" % f.name)
        left -= len(piece)
        buf += piece


def _crcs(rec) -> tuple[int, int, int]:
    """(stored CRC, format-2 CRC, format-1 CRC) of a complete record."""
    view = memoryview(rec)
    return (_U32.unpack_from(rec, 4)[0],
            zlib.crc32(view[8:_HEADER_SIZE], zlib.crc32(view[_HEADER_SIZE:])),
            zlib.crc32(view[8:]))


def upgrade_segment(path: str) -> tuple[int, int]:
    """Give the format-1 records of one segment file their format-2 CRCs.

    Returns ``(upgraded, corrupt)``: records rewritten, and complete records
    valid under neither format (left as they were). The file is replaced
    (``fileio.write_replace_parts``: a fsynced copy renamed over it) only if
    a record changes.
    """
    counts = [0, 0]
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for complete, rec in _walk(f, size):
            if complete:
                stored, new, old = _crcs(rec)
                if stored != new and stored == old:
                    break
        else:
            return 0, 0  # nothing in format 1 (an upgrade already did it)
        f.seek(0)
        write_replace_parts(path, _upgraded(f, size, path, counts), durable=True)
    return counts[0], counts[1]


def _upgraded(f, size: int, path: str, counts: list):
    """The bytes of segment file ``f`` with format-2 CRCs, in chunks of about 4 MiB."""
    chunk = bytearray()
    written = 0
    for complete, rec in _walk(f, size):
        if complete:
            stored, new, old = _crcs(rec)
            if stored != new:
                if stored == old:
                    _U32.pack_into(rec, 4, new)
                    counts[0] += 1
                else:
                    counts[1] += 1
                    log.warning("%s: the record at byte %d is valid under neither storage "
                                "format; left as it is", path, written + len(chunk))
        chunk += rec
        if len(chunk) >= _CHUNK:
            written += len(chunk)
            yield chunk
            chunk = bytearray()
    written += len(chunk)
    if written != size:
        raise RuntimeError("upgrade of %s copied %d of %d bytes" % (path, written, size))
    yield chunk


def upgrade_format1(topic_dirs) -> tuple[int, int]:
    """Give every record in ``topic_dirs`` its format-2 CRC: ``(segments, records)``.

    ``topic_dirs`` are the topic directories ``LogStore.open`` reads
    (``LogStore._topic_dirs``); in each, only ``<20 digits>.log`` files are
    touched, after copies left by an interrupted upgrade (``*.log.tmp``)
    are removed. ``segments`` counts the segment files rewritten.
    """
    segments = records = 0
    for directory in topic_dirs:
        files = [(fname, parse_segment_file(fname)) for fname in sorted(os.listdir(directory))]
        for fname, parsed in files:
            if parsed is not None and parsed[1] == "log" + TEMP_SUFFIX:
                os.unlink(os.path.join(directory, fname))
        for fname, parsed in files:
            if parsed is not None and parsed[1] == "log":
                n, _corrupt = upgrade_segment(os.path.join(directory, fname))
                if n:
                    segments += 1
                    records += n
    return segments, records
