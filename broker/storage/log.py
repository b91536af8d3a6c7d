"""A topic's log: its segments in offset order.

The event loop reads (:meth:`TopicLog.read`) and sees only what the disk
thread has finished writing: ``end_offset`` and each segment's
``readable_size`` advance in the loop, when a write completes
(``broker/storage/writer.py``). The disk thread appends through
:meth:`TopicLog.append`, which rolls to a new segment at ``segment_bytes``.
"""

from __future__ import annotations

import bisect
import logging
import os
from typing import Callable

from ..codec import records
from .fileio import fsync_dir
from .segment import Segment

__all__ = ["TopicLog"]

log = logging.getLogger(__name__)

# convert(buf, from_offset, end_offset, max_bytes) -> (out, count, next_offset, used)
Converter = Callable[[bytes, int, int, int], tuple]


class TopicLog:
    """The segments of one topic and the offsets readers may see."""

    __slots__ = (
        "name", "name_bytes", "directory", "segments", "_bases",
        "end_offset", "next_offset", "subscribers", "active", "segment_bytes", "interval", "_rolled",
    )

    def __init__(self, name: str, directory: str, segments: list[Segment],
                 segment_bytes: int, interval: int) -> None:
        self.name = name                           # validated topic name
        self.name_bytes = name.encode("ascii")     # the same, as sent on the wire
        self.directory = directory                 # <data>/topics/<name>
        self.segments = segments                   # readable segments, oldest first (loop)
        self._bases = [s.base_offset for s in segments]  # their base offsets, for bisect
        self.end_offset = segments[-1].end_offset  # offset after the last readable record
        self.next_offset = self.end_offset         # offset the next publish will get (loop)
        self.subscribers: set = set()              # delivery subscriptions, woken on append
        self.active = segments[-1]                 # segment being appended to (disk thread)
        self.segment_bytes = segment_bytes         # roll the active segment past this size
        self.interval = interval                   # index interval, bytes
        self._rolled: list[Segment] = []           # new segments the loop hasn't seen (disk thread)

    @classmethod
    def create(cls, name: str, directory: str, segment_bytes: int, interval: int) -> "TopicLog":
        os.makedirs(directory, exist_ok=True)
        seg = Segment.create(directory, 0, interval)
        fsync_dir(directory)
        fsync_dir(os.path.dirname(directory))
        return cls(name, directory, [seg], segment_bytes, interval)

    @classmethod
    def open(cls, name: str, directory: str, segment_bytes: int, interval: int) -> "TopicLog":
        """Open an existing topic, recovering its active segment."""
        bases = sorted(int(f[:-4]) for f in os.listdir(directory)
                       if f.endswith(".log") and f[:-4].isdigit())
        if not bases:
            seg = Segment.create(directory, 0, interval)
            return cls(name, directory, [seg], segment_bytes, interval)
        segments = [Segment.open_sealed(directory, b, nxt, interval)
                    for b, nxt in zip(bases, bases[1:])]
        segments.append(Segment.recover(directory, bases[-1], interval))
        return cls(name, directory, segments, segment_bytes, interval)

    @property
    def start_offset(self) -> int:
        """The oldest offset still kept."""
        return self.segments[0].base_offset

    # -- event loop --------------------------------------------------------

    def read(self, offset: int, max_bytes: int, convert: Converter):
        """Convert records from ``offset`` on, about ``max_bytes`` of them.

        Returns ``convert``'s ``(out, count, next_offset)`` for the first
        non-empty result, or None when ``offset`` is at the end. Finds the
        segment by binary search on base offsets and the position by the
        sparse index, then reads forward: O(log segments + index interval).
        Raises :class:`records.CorruptRecordError` rather than serve a bad record.
        """
        end = self.end_offset
        offset = max(offset, self.start_offset)
        if offset >= end:
            return None
        i = bisect.bisect_right(self._bases, offset) - 1
        seg = self.segments[i]
        pos = seg.lookup(offset)
        want = max_bytes
        while True:
            buf = seg.read(pos, want)
            out, count, nxt, used = convert(buf, offset, end, max_bytes)
            if count:
                return out, count, nxt
            if used:
                # Only records before `offset` were in the buffer: skip them.
                pos += used
                offset = max(offset, nxt)
                want = max_bytes
                continue
            if pos >= seg.readable_size:
                i += 1
                if i >= len(self.segments):
                    return None
                seg = self.segments[i]
                pos = 0
                continue
            span = 4 + int.from_bytes(buf[:4], "big") if len(buf) >= 4 else 0
            if len(buf) < span <= seg.readable_size - pos:
                want = span  # one record larger than max_bytes: read it whole
                continue
            raise records.CorruptRecordError(pos, "record in %s cannot be read" % seg.log_path)

    def written(self, new_segments: list[Segment], end_offset: int, size: int,
                entries: bytes) -> None:
        """Make a completed write visible (called in the loop by the writer)."""
        for seg in new_segments:
            prev = self.segments[-1]
            prev.readable_size = prev.size  # sealed: its size is final
            self.segments.append(seg)
            self._bases.append(seg.base_offset)
        active = self.segments[-1]
        active.add_index(entries)
        active.readable_size = size
        self.end_offset = end_offset

    # -- disk thread -------------------------------------------------------

    def append(self, buf: bytes, count: int) -> tuple:
        """Write encoded records.

        Returns ``(new_segments, end_offset, size, entries)`` for
        :meth:`written`: the segments created by rolling since the last
        successful append, the offset after the last record, the active
        segment's size and the index entries just written.
        """
        seg = self.active
        if seg.size and seg.size + len(buf) > self.segment_bytes:
            seg.seal()
            seg = Segment.create(self.directory, seg.end_offset, self.interval)
            fsync_dir(self.directory)
            self.active = seg
            self._rolled.append(seg)
        try:
            entries = seg.append(buf, count)
        except OSError:
            # Never leave half a batch behind: cut back to where it began.
            try:
                seg.truncate()
            except OSError:
                log.exception("could not truncate %s after a failed write", seg.log_path)
            raise
        rolled, self._rolled = self._rolled, []
        return rolled, seg.end_offset, seg.size, entries

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        if self.active not in self.segments:
            self.active.close()

