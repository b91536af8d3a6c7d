"""One segment of a topic's log: a ``.log`` file of records and its index.

Segment files are named after the offset of their first record, zero-padded
to 20 digits, so a directory listing sorts them in log order::

    00000000000000000000.log    records (format: broker/_pure/records.py)
    00000000000000000000.index  sparse offset index (broker/storage/index.py)

Writes (``append``, ``truncate``, ``fsync``) happen only on the disk thread;
reads (``read``, ``lookup``) on the event loop, bounded by
``readable_size``, which the loop advances only after the disk thread has
written the bytes. A reader therefore never sees a partial record.
"""

from __future__ import annotations

import logging
import os

from ..codec import records
from .fileio import pwrite_all, write_all
from .index import SparseIndex

__all__ = ["Segment", "segment_name"]

log = logging.getLogger(__name__)

_SCAN_CHUNK = 8 * 1024 * 1024  # recovery reads the active segment in pieces this big


def segment_name(base_offset: int) -> str:
    return "%020d" % base_offset


class Segment:
    """A segment file, its index, and where its valid data ends."""

    __slots__ = (
        "base_offset", "log_path", "index_path", "fd", "index_fd",
        "size", "end_offset", "next_index_pos", "index_size", "readable_size",
        "interval", "_index",
    )

    def __init__(self, directory: str, base_offset: int, interval: int) -> None:
        name = os.path.join(directory, segment_name(base_offset))
        self.base_offset = base_offset         # offset of the first record
        self.log_path = name + ".log"
        self.index_path = name + ".index"
        self.fd = -1                           # log file, opened read-write
        self.index_fd = -1                     # index file, opened on first append
        self.size = 0                          # bytes of valid records (disk thread)
        self.end_offset = base_offset          # offset after the last record (disk thread)
        self.next_index_pos = 0                # byte position where the next entry is due
        self.index_size = 0                    # bytes in the .index file (disk thread)
        self.readable_size = 0                 # bytes readers may see (event loop)
        self.interval = interval               # log bytes between index entries
        self._index: SparseIndex | None = None  # loaded lazily on first lookup

    # -- opening -----------------------------------------------------------

    @classmethod
    def create(cls, directory: str, base_offset: int, interval: int) -> "Segment":
        seg = cls(directory, base_offset, interval)
        seg.fd = os.open(seg.log_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        seg.index_fd = os.open(seg.index_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        seg._index = SparseIndex()
        return seg

    @classmethod
    def open_sealed(cls, directory: str, base_offset: int, end_offset: int,
                    interval: int) -> "Segment":
        """Open a segment that is not the last one: its extent is trusted."""
        seg = cls(directory, base_offset, interval)
        seg.fd = os.open(seg.log_path, os.O_RDONLY | os.O_CLOEXEC)
        seg.size = seg.readable_size = os.fstat(seg.fd).st_size
        seg.end_offset = end_offset
        return seg

    @classmethod
    def recover(cls, directory: str, base_offset: int, interval: int) -> "Segment":
        """Open the active (last) segment, truncating a torn or corrupt tail.

        Every record is checked (length, CRC, contiguous offset); the file is
        cut after the longest valid prefix and its index rebuilt from it.
        """
        seg = cls(directory, base_offset, interval)
        seg.fd = os.open(seg.log_path, os.O_RDWR | os.O_CLOEXEC)
        file_size = os.fstat(seg.fd).st_size
        index = SparseIndex()
        entries = []
        pos = 0
        expected = base_offset
        due = 0
        chunk = _SCAN_CHUNK
        while pos < file_size:
            buf = os.pread(seg.fd, min(chunk, file_size - pos), pos)
            at_eof = pos + len(buf) == file_size
            count, valid = records.scan_records(buf, expected)
            if count:
                piece, due = records.index_entries(buf[:valid], pos, due, interval, base_offset)
                entries.append(piece)
                expected += count
                pos += valid
                chunk = _SCAN_CHUNK
            if valid == len(buf):
                continue
            if at_eof:
                break  # the rest of the file is not a valid record
            # The chunk ended before the file did: was the record at `valid`
            # merely cut by the chunk boundary? Then read again from it.
            rest = len(buf) - valid
            if rest < 4:
                continue
            span = _record_span(buf, valid)
            if span <= rest or span > file_size - pos:
                break  # complete but invalid, or claims more than the file holds
            if not count:
                chunk = span  # a record larger than the chunk: read it whole
        if pos < file_size:
            log.warning("segment %s: truncating %d bytes of torn or corrupt tail at byte %d",
                        seg.log_path, file_size - pos, pos)
            os.ftruncate(seg.fd, pos)
            os.fsync(seg.fd)
        seg.size = seg.readable_size = pos
        seg.end_offset = expected
        seg.next_index_pos = due
        data = b"".join(entries)
        index.extend(data)
        seg._index = index
        # The index is derived data: rewrite it to match what was recovered.
        seg.index_fd = os.open(seg.index_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        if data:
            write_all(seg.index_fd, data)
        seg.index_size = len(data)
        return seg

    # -- reading (event loop) ----------------------------------------------

    def lookup(self, offset: int) -> int:
        """Byte position of a record boundary at or before ``offset``."""
        index = self._index
        if index is None:
            index = self._index = self._load_index()
        return index.lookup(offset - self.base_offset)

    def read(self, position: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of readable log from ``position``."""
        n = min(max_bytes, self.readable_size - position)
        if n <= 0:
            return b""
        return os.pread(self.fd, n, position)

    def _load_index(self) -> SparseIndex:
        try:
            with open(self.index_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        index = SparseIndex.from_bytes(data)
        if len(index) and index.positions[-1] < self.size:
            return index
        if len(index) == 0 and self.size == 0:
            return index
        # Missing, empty or pointing past the log: rebuild from the records.
        log.info("rebuilding index of %s", self.log_path)
        buf = os.pread(self.fd, self.size, 0)
        count, valid = records.scan_records(buf, self.base_offset)
        entries, _ = records.index_entries(buf[:valid], 0, 0, self.interval, self.base_offset)
        return SparseIndex.from_bytes(entries)

    # -- writing (disk thread) ---------------------------------------------

    def append(self, buf: bytes, count: int) -> bytes:
        """Write encoded records at the end, then their index entries.

        Returns the new index entries; the loop adds them to the in-memory
        index with :meth:`add_index` when it makes the write visible.
        """
        entries, due = records.index_entries(buf, self.size, self.next_index_pos,
                                             self.interval, self.base_offset)
        pwrite_all(self.fd, buf, self.size)
        if entries:
            # The index is a cache rebuilt on recovery, so it is written after
            # the log and never fsynced on its own.
            pwrite_all(self.index_fd, entries, self.index_size)
        self.size += len(buf)
        self.end_offset += count
        self.next_index_pos = due
        self.index_size += len(entries)
        return entries

    def truncate(self) -> None:
        """Cut both files back to the last successful append."""
        os.ftruncate(self.fd, self.size)
        os.ftruncate(self.index_fd, self.index_size)

    def add_index(self, entries: bytes) -> None:
        """Event loop: extend the loaded index with entries now readable."""
        if self._index is not None:
            self._index.extend(entries)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def seal(self) -> None:
        """Called when the segment stops being the active one."""
        os.fsync(self.fd)
        if self.index_fd >= 0:
            os.close(self.index_fd)
            self.index_fd = -1

    def close(self) -> None:
        for attr in ("fd", "index_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)


def _record_span(buf: bytes, pos: int) -> int:
    """Total bytes of the record whose header starts at ``pos``."""
    return 4 + int.from_bytes(buf[pos:pos + 4], "big")

