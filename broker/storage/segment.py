"""One segment of a topic's log: a ``.log`` file of records and its index.

Segment files are named after the offset of their first record, zero-padded
to 20 digits, so a directory listing sorts them in log order::

    00000000000000000000.log    records (format: broker/_pure/records.py)
    00000000000000000000.index  sparse offset index (broker/storage/index.py)

Two threads use a segment, each through its own descriptors:

- the **disk thread** appends, truncates, fsyncs and seals, through a
  read-write log descriptor and an index descriptor held in the write
  :class:`~broker.storage.filecache.FileCache` (only the active segment
  of a topic ever has them);
- the **event loop** reads (``read``, ``lookup``, the time helpers) through
  a read-only descriptor held in the read cache, bounded by
  ``readable_size``, which it advances only after the disk thread has
  written the bytes. A reader therefore never sees a partial record.

Nothing is opened before it is used: a sealed segment found at startup is
a name, a size and an end offset until someone reads it.
"""

from __future__ import annotations

import logging
import os

from ..codec import records
from .fileio import (
    FADV_DONTNEED, FADV_SEQUENTIAL, advise, fsync_path, pwrite_all, pwritev_all,
    write_replace,
)
from .index import ENTRY_SIZE, SparseIndex
from .recordwalk import header_time, last_record_start

__all__ = ["Segment", "segment_name", "HEADER_SIZE"]

log = logging.getLogger(__name__)

HEADER_SIZE = 24                # record header: length, crc, offset, time
_SCAN_CHUNK = 8 * 1024 * 1024   # recovery reads the active segment in pieces this big
_TIME_SCAN_CHUNK = 64 * 1024    # time lookups read forward this much at a time
_NO_END = 1 << 63               # "no upper bound" for offset-bounded decoding
WRITEBACK_BYTES = 4 * 1024 * 1024  # start writeback of a segment every this many bytes


def segment_name(base_offset: int) -> str:
    return "%020d" % base_offset


def parse_segment_file(fname: str) -> tuple[int, str] | None:
    """``(base offset, extension)`` of a file named ``<20 digits>.<ext>``, else None.

    The extension is everything after the first dot: ``log``, ``index``,
    or ``log.tmp`` for a copy being written (``fileio.write_replace``).
    """
    stem, _dot, ext = fname.partition(".")
    if len(stem) != 20 or not (stem.isascii() and stem.isdigit()):
        return None
    return int(stem), ext


class Segment:
    """A segment file, its index, and where its valid data ends."""

    __slots__ = (
        "base_offset", "log_path", "index_path", "interval", "rcache", "wcache",
        # disk thread
        "fd", "index_fd", "size", "end_offset", "next_index_pos", "index_size",
        "last_pos", "last_time", "sealed", "written_back", "uncut",
        # event loop
        "rfd", "readable_size", "_index", "_first_time", "_max_time",
    )

    def __init__(self, directory: str, base_offset: int, interval: int, rcache, wcache) -> None:
        name = os.path.join(directory, segment_name(base_offset))
        self.base_offset = base_offset         # offset of the first record
        self.log_path = name + ".log"
        self.index_path = name + ".index"
        self.interval = interval               # log bytes between index entries
        self.rcache = rcache                   # read FileCache (event loop)
        self.wcache = wcache                   # write FileCache (disk thread)
        self.fd = -1                           # log, read-write (disk thread; write cache)
        self.index_fd = -1                     # index, read-write (disk thread; write cache)
        self.size = 0                          # bytes of valid records (disk thread)
        self.written_back = 0                  # writeback started up to here (disk thread)
        self.uncut = False                     # a failed cut-back may have left bytes past size
        self.end_offset = base_offset          # offset after the last record (disk thread)
        self.next_index_pos = 0                # byte position where the next entry is due
        self.index_size = 0                    # bytes of entries in the .index file
        self.last_pos = 0                      # start of the last record (disk thread)
        self.last_time = 0                     # its append time, ms (0: unknown)
        self.sealed = False                    # no more appends (set by the disk thread)
        self.rfd = -1                          # log, read-only (event loop; read cache)
        self.readable_size = 0                 # bytes readers may see (event loop)
        self._index: SparseIndex | None = None  # loaded on first lookup, dropped on eviction
        self._first_time: int | None = None    # append time of the first record (cached)
        self._max_time: int | None = None      # of the last record, once sealed (cached)

    def __repr__(self) -> str:
        return "<Segment %s size=%d>" % (self.log_path, self.size)

    # -- opening -----------------------------------------------------------

    def create_files(self) -> None:
        """Disk thread: create the (empty) files of a new segment and open them.

        The caller fsyncs the directory. ``O_TRUNC``, not ``O_EXCL``: a file
        of this name can only be left over from a roll that was undone.
        """
        fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            self.index_fd = os.open(self.index_path,
                                    os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.wcache.add(self)

    @classmethod
    def sealed_at(cls, directory: str, base_offset: int, end_offset: int, size: int,
                  interval: int, rcache, wcache) -> "Segment":
        """A segment that is not the last one: its extent is trusted, nothing is opened.

        Every segment but the last two is fsynced (log and index): a roll
        waits for the seal of the segment before it (``TopicLog._roll``), so
        a crash cannot have damaged them. The one before the last is
        trusted only when the checkpoint says its seal was done
        (``TopicLog.open``).
        """
        seg = cls(directory, base_offset, interval, rcache, wcache)
        seg.size = seg.readable_size = seg.written_back = size
        seg.end_offset = end_offset
        seg.sealed = True
        return seg

    @classmethod
    def recover(cls, directory: str, base_offset: int, interval: int, rcache, wcache,
                entry=None, clean: bool = False, stats: dict | None = None) -> "Segment":
        """Open a segment a crash may have cut (the last, or the one before it),
        keeping exactly its longest valid prefix.

        ``entry`` is this topic's :class:`~broker.storage.checkpoint.CheckpointEntry`
        (or None). When it covers this segment and still matches the file,
        the covered prefix is trusted and only the bytes after it are
        scanned; after a clean shutdown there are none and the files are not
        even opened. Otherwise every record is checked (length, CRC,
        contiguous offset). The file is cut after the last valid record and
        the index made to match.
        """
        seg = cls(directory, base_offset, interval, rcache, wcache)
        stats = stats if stats is not None else {}
        file_size = os.stat(seg.log_path).st_size
        try:
            index_file_size = os.stat(seg.index_path).st_size
        except FileNotFoundError:
            index_file_size = -1
        usable = (entry is not None and entry.base_offset == base_offset
                  and entry.size <= file_size and entry.index_size <= index_file_size
                  and entry.end_offset >= base_offset)
        if usable and clean and entry.size == file_size:
            # Clean shutdown: nothing was written after the checkpoint.
            seg._adopt(entry)
            if index_file_size != entry.index_size:
                os.truncate(seg.index_path, entry.index_size)
            seg.readable_size = seg.size
            return seg
        fd = os.open(seg.log_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if usable and not seg._verify_last(fd, entry):
                log.warning("segment %s does not match the checkpoint; scanning it whole",
                            seg.log_path)
                usable = False
            if usable:
                seg._adopt(entry)
            seg._scan_tail(fd, file_size, stats)
        finally:
            os.close(fd)
        seg.readable_size = seg.size
        return seg

    def _adopt(self, entry) -> None:
        self.size = self.written_back = entry.size
        self.end_offset = entry.end_offset
        self.last_pos = entry.last_pos
        self.last_time = entry.last_time
        self.index_size = entry.index_size
        self.next_index_pos = entry.next_index_pos

    def _verify_last(self, fd: int, entry) -> bool:
        """Is the last record the checkpoint names there, whole and valid?"""
        if entry.size == 0:
            return entry.end_offset == self.base_offset and entry.index_size == 0
        if entry.last_pos >= entry.size or entry.end_offset <= self.base_offset:
            return False
        buf = os.pread(fd, entry.size - entry.last_pos, entry.last_pos)
        count, valid = records.scan_records(buf, entry.end_offset - 1)
        return count == 1 and valid == len(buf)

    def _scan_tail(self, fd: int, file_size: int, stats: dict) -> None:
        """Validate from ``self.size`` to the end of the file; cut what is not valid."""
        pos = start = self.size
        expected = self.end_offset
        due = self.next_index_pos
        interval = self.interval
        base = self.base_offset
        entries = []
        chunk = _SCAN_CHUNK
        while pos < file_size:
            buf = os.pread(fd, min(chunk, file_size - pos), pos)
            at_eof = pos + len(buf) == file_size
            count, valid = records.scan_records(buf, expected)
            if count:
                piece, due = records.index_entries(memoryview(buf)[:valid], pos, due,
                                                   interval, base)
                entries.append(piece)
                # The last record of the piece: walk headers from its last
                # index entry (at most about one interval of records).
                walk = int.from_bytes(piece[-4:], "big") - pos if piece else 0
                last = last_record_start(buf, walk, valid)
                self.last_pos = pos + last
                self.last_time = header_time(buf, last)
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
            span = 4 + int.from_bytes(buf[valid:valid + 4], "big")
            if span <= rest or span > file_size - pos:
                break  # complete but invalid, or claims more than the file holds
            if not count:
                chunk = span  # a record larger than the chunk: read it whole
        stats["recovery_scanned_bytes"] = stats.get("recovery_scanned_bytes", 0) + file_size - start
        if pos > start:
            # What a crashed process left may still be only in the page
            # cache: make it durable before a checkpoint can claim it.
            os.fsync(fd)
        if pos < file_size:
            log.warning("segment %s: truncating %d bytes of torn or corrupt tail at byte %d",
                        self.log_path, file_size - pos, pos)
            os.ftruncate(fd, pos)
            os.fsync(fd)
            stats["recovery_truncated_bytes"] = (stats.get("recovery_truncated_bytes", 0)
                                                 + file_size - pos)
        self.size = self.written_back = pos
        self.end_offset = expected
        self.next_index_pos = due
        # The index is derived data: make the file match what was recovered.
        data = b"".join(entries)
        ifd = os.open(self.index_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if data:
                pwrite_all(ifd, data, self.index_size)
            self.index_size += len(data)
            os.ftruncate(ifd, self.index_size)
        finally:
            os.close(ifd)

    # -- reading (event loop) ----------------------------------------------

    def _rfd(self) -> int:
        fd = self.rfd
        if fd >= 0:
            self.rcache.touch(self)
            return fd
        fd = os.open(self.log_path, os.O_RDONLY | os.O_CLOEXEC)
        # Readers go forward (catch-up reads of old segments above all):
        # let the kernel read ahead aggressively.
        advise(fd, FADV_SEQUENTIAL)
        self.rfd = fd
        self.rcache.add(self)
        return fd

    def release_reader(self) -> None:
        """Close the read descriptor and drop the index (read cache eviction)."""
        fd, self.rfd = self.rfd, -1
        self._index = None
        if fd >= 0:
            os.close(fd)

    def lookup(self, offset: int) -> int:
        """Byte position of a record boundary at or before ``offset``."""
        index = self._index
        if index is None or self.rfd < 0:
            index = self._ensure_index()
        else:
            self.rcache.touch(self)
        return index.lookup(offset - self.base_offset)

    def read(self, position: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of readable log from ``position``."""
        n = min(max_bytes, self.readable_size - position)
        if n <= 0:
            return b""
        return os.pread(self._rfd(), n, position)

    def add_index(self, entries: bytes) -> None:
        """Event loop: extend the loaded index with entries now readable."""
        if self._index is not None and entries:
            self._index.extend(entries)

    def _ensure_index(self) -> SparseIndex:
        self._rfd()  # the index lives as long as the read descriptor
        index = self._index
        if index is None:
            index = self._index = self._load_index()
        return index

    def _load_index(self) -> SparseIndex:
        size = self.readable_size
        try:
            with open(self.index_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        index = SparseIndex.from_bytes(data)
        # Entries at or past readable_size belong to writes the loop has not
        # been told about yet (or to a torn tail): leave them out.
        kept = index.valid_prefix(size, 1 << 32)
        if kept or size == 0:
            if self.sealed and kept < len(data) // ENTRY_SIZE:
                log.info("index of %s: ignoring %d bad trailing entries",
                         self.log_path, len(data) // ENTRY_SIZE - kept)
            return index
        # Missing, empty or unusable: rebuild from the records.
        log.info("rebuilding index of %s", self.log_path)
        buf = os.pread(self._rfd(), size, 0)
        count, valid = records.scan_records(buf, self.base_offset)
        entries, _ = records.index_entries(memoryview(buf)[:valid], 0, 0, self.interval,
                                           self.base_offset)
        index = SparseIndex.from_bytes(entries)
        stats = self.rcache.stats
        stats["index_rebuilds"] = stats.get("index_rebuilds", 0) + 1
        if self.sealed and valid == size == self.size:
            # Only sealed segments the loop sees whole: the disk thread owns
            # the active one's index file. No fsync: the file is a cache,
            # checked on load.
            try:
                write_replace(self.index_path, entries, durable=False)
            except OSError as exc:
                log.warning("could not save the rebuilt index of %s: %s", self.log_path, exc)
        return index

    def _read_records(self, position: int, end_offset: int, chunk: int):
        """Decode the records from ``position`` (a record boundary) in one read.

        Returns ``(records, next_position)``; reads a record larger than
        ``chunk`` whole. Raises ``CorruptRecordError`` on a bad record.
        """
        want = chunk
        while True:
            buf = self.read(position, want)
            recs, used = records.decode_records(buf, 0, end_offset)
            if recs or used or len(buf) < HEADER_SIZE:
                return recs, position + used
            span = 4 + int.from_bytes(buf[:4], "big")
            if span <= len(buf):
                return recs, position  # a whole record, at or past end_offset
            if span > self.readable_size - position:
                raise records.CorruptRecordError(position, "record in %s cannot be read"
                                                 % self.log_path)
            want = span

    def first_time(self) -> int | None:
        """Append time of the first record (None while the segment is empty)."""
        t = self._first_time
        if t is None and self.readable_size >= HEADER_SIZE:
            t = self._first_time = header_time(os.pread(self._rfd(), HEADER_SIZE, 0))
        return t

    def max_time(self) -> int | None:
        """Append time of the last record of a sealed segment (cached).

        Reads from the last index entry to the end: about one interval.
        None when the segment is empty or its last records cannot be read.
        """
        t = self._max_time
        if t is None and self.readable_size >= HEADER_SIZE:
            pos = self._ensure_index().last_position()
            try:
                while pos < self.readable_size:
                    recs, pos = self._read_records(pos, _NO_END, self.readable_size - pos)
                    if not recs:
                        break
                    t = recs[-1][1]
            except records.CorruptRecordError as exc:
                log.error("segment %s: %s", self.log_path, exc)
                return None
            self._max_time = t
        return t

    def offset_for_time(self, ts_ms: int, end_offset: int) -> int | None:
        """First offset in this segment whose append time is >= ``ts_ms``.

        A binary search over the index entries, reading one record header
        per step, then a forward scan of about one interval. Assumes
        non-decreasing times (the writer guarantees it). None if no record
        here is that recent.
        """
        positions = self._ensure_index().positions
        fd = self._rfd()
        lo, hi = 0, len(positions)
        while lo < hi:  # first entry whose record time is >= ts_ms
            mid = (lo + hi) // 2
            if header_time(os.pread(fd, HEADER_SIZE, positions[mid])) >= ts_ms:
                hi = mid
            else:
                lo = mid + 1
        pos = positions[lo - 1] if lo else 0
        while pos < self.readable_size:
            recs, pos = self._read_records(pos, end_offset, _TIME_SCAN_CHUNK)
            if not recs:
                break  # end_offset reached
            if recs[-1][1] >= ts_ms:
                for off, t, _ in recs:  # at most about one interval of records
                    if t >= ts_ms:
                        return off
        return None

    # -- writing (disk thread) ---------------------------------------------

    def _wfds(self) -> None:
        if self.fd >= 0:
            self.wcache.touch(self)
            return
        fd = os.open(self.log_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.index_fd = os.open(self.index_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.wcache.add(self)

    def release_writer(self) -> None:
        """Close the write descriptors (write cache eviction, sealing, shutdown)."""
        for attr in ("fd", "index_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)

    def state(self) -> tuple:
        """What :meth:`restore` needs to undo the appends made after this call."""
        return (self.size, self.index_size, self.end_offset, self.next_index_pos,
                self.last_pos, self.last_time)

    def append(self, buf, count: int, last_len: int, ts_ms: int) -> bytes:
        """Write encoded records at the end, then their index entries.

        ``buf`` is the records, or a list of ``(records, count)`` parts
        that follow one another, written with one ``pwritev`` and never
        joined. ``last_len`` is the size of the last record (header
        included), ``ts_ms`` its append time. Returns the new index entries;
        the loop adds them to the in-memory index with :meth:`add_index`
        when it makes the write visible.
        """
        self._wfds()
        self.cut_tail()
        # Two paths on purpose: one buffer (the latency path, every small
        # batch) as a list of one part costs 4% more instructions per batch
        # (python bench/batch_cost.py --valgrind: 158,727 against 152,729).
        if type(buf) is list:
            pos = self.size
            due = self.next_index_pos
            found = []
            for part, _n in buf:
                more, due = records.index_entries(part, pos, due, self.interval, self.base_offset)
                if more:
                    found.append(more)
                pos += len(part)
            entries = b"".join(found)
            pwritev_all(self.fd, [part for part, _n in buf], self.size)
            nbytes = pos - self.size
        else:
            entries, due = records.index_entries(buf, self.size, self.next_index_pos,
                                                 self.interval, self.base_offset)
            pwrite_all(self.fd, buf, self.size)
            nbytes = len(buf)
        if entries:
            # The index is a cache rebuilt on recovery, so it is written after
            # the log and fsynced only when the segment is sealed.
            pwrite_all(self.index_fd, entries, self.index_size)
        self.size += nbytes
        self.end_offset += count
        self.next_index_pos = due
        self.index_size += len(entries)
        self.last_pos = self.size - last_len
        self.last_time = ts_ms
        return entries

    def cut_tail(self) -> None:
        """Disk thread: cut what a failed cut-back left past our end (OSError if it fails).

        Before anything is appended after it or the segment is sealed, and
        at shutdown, so that recovery never finds a refused batch's records.
        """
        if self.uncut:
            self._wfds()
            os.ftruncate(self.fd, self.size)
            os.ftruncate(self.index_fd, self.index_size)
            self.uncut = False

    def restore(self, state: tuple) -> None:
        """Cut both files back to ``state`` (from :meth:`state`): undo appends."""
        size, index_size = state[0], state[1]
        self.uncut = True
        try:
            self._wfds()
            os.ftruncate(self.fd, size)
            os.ftruncate(self.index_fd, index_size)
            self.uncut = False
        finally:
            # Even when a file could not be cut (the error goes on up), the
            # appends are taken back: nothing past the old end is served,
            # and the next append cuts the files first (or is refused).
            (self.size, self.index_size, self.end_offset, self.next_index_pos,
             self.last_pos, self.last_time) = state
            self.written_back = min(self.written_back, self.size)

    def fsync(self) -> None:
        self._wfds()
        os.fsync(self.fd)

    def writeback_due(self) -> bool:
        """Has ``WRITEBACK_BYTES`` been written since the last writeback started?"""
        return self.size - self.written_back >= WRITEBACK_BYTES

    def take_writeback(self) -> tuple[int, int, int] | None:
        """Disk thread: ``(fd, offset, nbytes)`` of what to start writing back, or None.

        ``fd`` is a private duplicate (the caller closes it), so that the
        kernel call can run on another thread; the range is marked started.
        None for a sealed segment (its seal fsyncs it) or when nothing is due.
        """
        if self.sealed or self.size <= self.written_back:
            return None
        fd = self.dup_fd()
        start, self.written_back = self.written_back, self.size
        return fd, start, self.size - start

    def dup_fd(self) -> int:
        """Disk thread: a private descriptor of the log file, for a background fsync."""
        self._wfds()
        return os.dup(self.fd)

    def seal(self, durable: bool = True) -> None:
        """Disk thread: the segment stops being the active one.

        With ``durable``, log and index are fsynced here. Without, that is
        left to :meth:`sync_sealed`, which the syncer thread calls
        (``TopicLog.sync_seal``; see ``TopicLog._roll``): at most one sealed
        segment per topic waits for it, so recovery can trust every segment
        but the last two without reading them.
        """
        self._wfds()
        self.cut_tail()
        if durable:
            os.fsync(self.fd)
            os.fsync(self.index_fd)
        self.sealed = True
        self.wcache.discard(self)
        self.release_writer()

    def sync_sealed(self) -> None:
        """Any thread: fsync a sealed segment's log and index (a seal left for later).

        Through descriptors of its own, opened by name: the segment's
        write descriptors are closed once it is sealed. A file retention
        has deleted meanwhile needs nothing.
        """
        for path in (self.log_path, self.index_path):
            try:
                fsync_path(path)
            except FileNotFoundError:
                pass

    def delete_files(self) -> None:
        """Disk thread: drop the segment's cached pages, then its files."""
        try:
            fd = os.open(self.log_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            try:
                advise(fd, FADV_DONTNEED)
            finally:
                os.close(fd)
        for path in (self.log_path, self.index_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def remove_created(self) -> None:
        """Disk thread: undo :meth:`create_files` of a segment nobody saw."""
        self.wcache.discard(self)
        self.release_writer()
        self.delete_files()

    def close(self) -> None:
        """Release every descriptor (shutdown: both threads are done)."""
        self.rcache.discard(self)
        self.release_reader()
        self.wcache.discard(self)
        self.release_writer()
