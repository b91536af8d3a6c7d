"""Consumer offsets: (client id, topic) -> next offset to deliver.

The event loop keeps the live mapping in memory and marks what changed;
the disk thread appends the changes to a journal, ``offsets/offsets.log``,
as CRC-protected records::

    [u32 length][u32 crc of what follows]
    [u16 n][n bytes client id][u16 m][m bytes topic][u64 offset]

Loading replays the journal and stops at the first torn or corrupt record,
which is cut off: a crash mid-write loses at most the last unsynced
updates, never the file. The prototype crashed reloading its offsets; this
format cannot be half-read. When the journal holds far more records than
live entries it is compacted: a snapshot is written to a temporary file,
fsynced, renamed over the journal, and the directory fsynced.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib

from .fileio import atomic_write, write_all

__all__ = ["OffsetStore"]

log = logging.getLogger(__name__)

_HEAD = struct.Struct(">II")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_COMPACT_MIN = 10_000  # journal records before compaction is considered

Key = tuple  # (client_id: bytes, topic: str)


def _encode(key: Key, offset: int) -> bytes:
    cid, topic = key
    t = topic.encode("ascii")
    body = _U16.pack(len(cid)) + cid + _U16.pack(len(t)) + t + _U64.pack(offset)
    return _HEAD.pack(len(body) + 4, zlib.crc32(body)) + body


def _decode(data: bytes):
    """Yield (key, offset) from a journal; stop at the first bad record."""
    pos = 0
    end = len(data)
    while end - pos >= 8:
        length, crc = _HEAD.unpack_from(data, pos)
        if length < 4 + 12 or length > end - pos - 4:
            break
        body = data[pos + 8:pos + 4 + length]
        if zlib.crc32(body) != crc:
            break
        n = _U16.unpack_from(body, 0)[0]
        if 2 + n + 2 > len(body):
            break
        m = _U16.unpack_from(body, 2 + n)[0]
        if 2 + n + 2 + m + 8 != len(body):
            break
        cid = body[2:2 + n]
        try:
            topic = body[4 + n:4 + n + m].decode("ascii")
        except UnicodeDecodeError:
            break
        offset = _U64.unpack_from(body, 4 + n + m)[0]
        pos += 4 + length
        yield (cid, topic), offset, pos


class OffsetStore:
    """Durable consumer offsets with an in-memory mapping for the loop."""

    def __init__(self, directory: str) -> None:
        self.directory = directory                # <data>/offsets
        self.path = os.path.join(directory, "offsets.log")
        self._offsets: dict[Key, int] = {}        # live mapping (event loop)
        self._dirty: dict[Key, int] = {}          # changed since last handed over (event loop)
        self._persisted: dict[Key, int] = {}      # what the journal holds (disk thread)
        self._records = 0                         # records in the journal (disk thread)
        self._size = 0                            # bytes of whole records in it (disk thread)
        self._fd = -1                             # journal, append only (disk thread)

    def load(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        try:
            # A compaction cut short by a crash: the journal is still whole.
            os.unlink(self.path + ".tmp")
        except FileNotFoundError:
            pass
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        valid = 0
        for key, offset, valid in _decode(data):
            self._persisted[key] = offset
            self._records += 1
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        if valid < len(data):
            log.warning("offsets journal: dropping %d bytes of torn or corrupt tail", len(data) - valid)
            os.ftruncate(self._fd, valid)
            os.fsync(self._fd)
        self._size = valid
        self._offsets = dict(self._persisted)

    # -- event loop --------------------------------------------------------

    def get(self, client_id: bytes, topic: str) -> int | None:
        return self._offsets.get((client_id, topic))

    def set(self, client_id: bytes, topic: str, offset: int) -> None:
        key = (client_id, topic)
        if self._offsets.get(key) != offset:
            self._offsets[key] = offset
            self._dirty[key] = offset

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def take_dirty(self) -> dict[Key, int]:
        """Hand the changes to the disk thread."""
        dirty, self._dirty = self._dirty, {}
        return dirty

    def items(self):
        return self._offsets.items()

    # -- disk thread -------------------------------------------------------

    def write(self, changes: dict[Key, int]) -> None:
        """Append ``changes`` to the journal in one write; compact if due."""
        if not changes:
            return
        data = b"".join([_encode(k, v) for k, v in changes.items()])
        try:
            write_all(self._fd, data)
        except OSError:
            # ENOSPC/EIO part way: cut the partial record off, or every
            # later update would sit behind it, unreadable.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.exception("could not truncate the offsets journal after a failed write")
            raise
        self._size += len(data)
        self._persisted.update(changes)
        self._records += len(changes)
        if self.would_compact(0):
            try:
                self.compact()
            except OSError as exc:  # the journal is intact: compact another time
                log.error("offsets journal compaction failed: %s", exc)

    def would_compact(self, changes: int) -> bool:
        """Writing ``changes`` entries would compact the journal (an fsync)."""
        return self._records + changes > max(_COMPACT_MIN, 4 * len(self._persisted))

    def compact(self) -> None:
        """Replace the journal by a snapshot of the live entries.

        The snapshot goes to ``offsets.log.tmp``, is fsynced, renamed over
        the journal and the directory fsynced: a crash at any point leaves
        either the whole old journal or the whole snapshot.
        """
        data = b"".join([_encode(k, v) for k, v in self._persisted.items()])
        atomic_write(self.path, data)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._records = len(self._persisted)
        self._size = len(data)

    def fsync(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)

    def dup_fd(self) -> int:
        """A private descriptor of the journal for a background fsync, or -1."""
        return os.dup(self._fd) if self._fd >= 0 else -1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
