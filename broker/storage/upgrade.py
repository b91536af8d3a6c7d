"""Upgrade a data directory written in an older storage format, in place.

Format 1 differs from format 2 only in each record's CRC: format 1 hashed
bytes 8 .. 4 + length in one pass (offset, time, payload); format 2 hashes
the payload, then continues over offset and time (``records.py``), so the
broker derives a record's CRC from the CRC its publisher sent by hashing
16 bytes. The layout is the same, so upgrading rewrites CRC fields only.

Each segment is read whole, every record that is valid under format 1 gets
its format-2 CRC, the file is written back over itself and fsynced; then
``meta.json`` says format 2. An upgrade that a crash interrupts is simply
run again at the next start: a record already valid under format 2 is left
as it is. Scanning a segment stops at the first record valid under
neither (a torn tail, which recovery then cuts off, as it would have).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib

from ..topics import InvalidTopic, validate_topic
from .fileio import pwrite_all

__all__ = ["upgrade_format1"]

log = logging.getLogger(__name__)

_HEAD = struct.Struct(">II")
_CRC = struct.Struct(">I")
_HEADER_SIZE = 24


def upgrade_segment(path: str) -> int:
    """Rewrite format-1 record CRCs of one segment file; returns how many."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        view = memoryview(data)
        pos = changed = 0
        end = len(data)
        while end - pos >= _HEADER_SIZE:
            length, crc = _HEAD.unpack_from(data, pos)
            nxt = pos + 4 + length
            if length < _HEADER_SIZE - 4 or nxt > end:
                break
            new = zlib.crc32(view[pos + 8:pos + _HEADER_SIZE],
                             zlib.crc32(view[pos + _HEADER_SIZE:nxt]))
            if new != crc:
                if zlib.crc32(view[pos + 8:nxt]) != crc:
                    break  # valid under neither: a torn or corrupt tail
                _CRC.pack_into(data, pos + 4, new)
                changed += 1
            pos = nxt
        if changed:
            pwrite_all(f.fileno(), view[:pos], 0)
            os.fsync(f.fileno())
        view.release()
    return changed


def upgrade_format1(topics_dir: str) -> tuple[int, int]:
    """Give every record under ``topics_dir`` its format-2 CRC: ``(segments, records)``.

    Only what ``LogStore.open`` would read is touched: valid topic
    directories and their ``<20 digits>.log`` files.
    """
    segments = records = 0
    for name in sorted(os.listdir(topics_dir)):
        try:
            validate_topic(name.encode("utf-8", "surrogateescape"))
        except InvalidTopic:
            continue
        directory = os.path.join(topics_dir, name)
        if not os.path.isdir(directory):
            continue
        for fname in sorted(os.listdir(directory)):
            if len(fname) == 24 and fname.endswith(".log") and fname[:20].isdigit():
                n = upgrade_segment(os.path.join(directory, fname))
                segments += 1
                records += n
    return segments, records
