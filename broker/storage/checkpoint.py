"""The recovery checkpoint: how much of each topic's log is known good.

``<data-dir>/checkpoint`` lets a restart skip scanning logs. For each topic
it names one segment: the active one or, while the seal of the one before
the active one waits for the syncer, that one (``TopicLog.note_durable``).
Every segment before the one named is on disk whole. With it comes a
prefix of that segment known to hold valid records, and everything
recovery would otherwise compute by scanning that prefix. The file is
binary, all integers unsigned big-endian::

    header   8 bytes  magic b"PLSCKPT1"
             u32      flags: bit 0 = clean (written at shutdown, after a full fsync)
             u32      n, the number of topic entries
             u64      time the checkpoint was written, ms since the epoch
    n times  u16      length of the topic name, then the name (ASCII)
             u64      base offset of the segment (active, or the one before)
             u64      size: bytes of that segment covered (a record boundary)
             u64      end offset: the offset after the last covered record
             u64      start of the last covered record (0 when size is 0)
             u64      append time of that record, ms (0 when unknown)
             u64      bytes of the segment's .index file covering it
             u64      byte position where the next index entry is due
    trailer  u32      CRC-32 (zlib) of every byte before it

It is written atomically (``checkpoint.tmp``, fsync, rename, directory
fsync): by the syncer thread after its fsyncs, at most every
``checkpoint_interval_ms``, and by the disk thread when asked
(``DiskWriter.checkpoint``) and once more at a clean shutdown. Each
entry describes a state whose log bytes were fsynced before the
checkpoint was written (under ``fsync=never``, the state at that moment,
unsynced). A file that is missing, torn or fails its CRC is ignored:
recovery then scans the last two segments of each topic whole, which is
what it would do without one.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from typing import NamedTuple

from .fileio import atomic_write

__all__ = ["CheckpointEntry", "CHECKPOINT_FILE", "encode", "decode", "read", "write"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint"
MAGIC = b"PLSCKPT1"
FLAG_CLEAN = 1

_HEAD = struct.Struct(">8sIIQ")
_NAME_LEN = struct.Struct(">H")
_ENTRY = struct.Struct(">7Q")
_CRC = struct.Struct(">I")


class CheckpointEntry(NamedTuple):
    """A known-good prefix of one segment of a topic (see the module docstring)."""

    base_offset: int      # the segment's base offset (its file name)
    size: int             # bytes of valid records from the start of that segment
    end_offset: int       # offset after the last of them
    last_pos: int         # byte position of the last of them (0 if none)
    last_time: int        # its append time in ms (0 if unknown)
    index_size: int       # bytes of .index entries for those records
    next_index_pos: int   # where the next index entry is due


def encode(entries: dict, clean: bool, now_ms: int) -> bytes:
    parts = [_HEAD.pack(MAGIC, FLAG_CLEAN if clean else 0, len(entries), now_ms)]
    for name, entry in entries.items():
        raw = name.encode("ascii")
        parts.append(_NAME_LEN.pack(len(raw)))
        parts.append(raw)
        parts.append(_ENTRY.pack(*entry))
    data = b"".join(parts)
    return data + _CRC.pack(zlib.crc32(data))


def decode(data: bytes):
    """``(clean, {topic: CheckpointEntry})``, or None if the file is not valid."""
    if len(data) < _HEAD.size + _CRC.size:
        return None
    body = memoryview(data)[:-_CRC.size]
    if zlib.crc32(body) != _CRC.unpack_from(data, len(body))[0]:
        return None
    magic, flags, n, _when = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        return None
    pos = _HEAD.size
    entries = {}
    try:
        for _ in range(n):
            (k,) = _NAME_LEN.unpack_from(body, pos)
            name = bytes(body[pos + 2:pos + 2 + k]).decode("ascii")
            pos += 2 + k
            entries[name] = CheckpointEntry(*_ENTRY.unpack_from(body, pos))
            pos += _ENTRY.size
    except (struct.error, UnicodeDecodeError):
        return None
    if pos != len(body):
        return None
    return bool(flags & FLAG_CLEAN), entries


def read(data_dir: str):
    """The checkpoint in ``data_dir`` as :func:`decode` returns it, or None."""
    path = os.path.join(data_dir, CHECKPOINT_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    result = decode(data)
    if result is None:
        log.warning("%s is torn or corrupt; recovery will scan the last segments", path)
    return result


def write(data_dir: str, entries: dict, clean: bool, now_ms: int) -> None:
    atomic_write(os.path.join(data_dir, CHECKPOINT_FILE), encode(entries, clean, now_ms))
