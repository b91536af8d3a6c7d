"""A topic's log: its segments in offset order.

The event loop reads (:meth:`TopicLog.read`, :meth:`TopicLog.offset_for_time`)
and sees only what the disk thread has finished writing: ``end_offset`` and
each segment's ``readable_size`` advance in the loop, when a write completes
(``broker/storage/writer.py`` calls :meth:`TopicLog.written`). The disk
thread appends through :meth:`TopicLog.append`, which fills the active
segment up to ``segment_bytes`` and rolls to a new one, splitting a batch
at a record boundary when it does not fit.

Retention (:meth:`expired_segments`, :meth:`drop_oldest`) is decided in the
loop, which removes whole sealed segments from the list first; the disk
thread deletes their files afterwards, so no reader can ever reach a
deleted file. The active segment is never deleted.

A new topic exists only in memory until its first append: the disk thread
then creates its directory and first segment (:meth:`materialize`), so
creating a topic never blocks the loop on an fsync.
"""

from __future__ import annotations

import bisect
import collections
import logging
import os
from typing import Callable

from ..codec import records
from . import recordwalk
from .checkpoint import CheckpointEntry
from .fileio import atomic_write, fsync_dir
from .segment import HEADER_SIZE as _HEADER_SIZE, Segment, parse_segment_file
from .tailcache import LOOKBACK
from .topicconfig import CONFIG_FILE, TopicConfig, encode_overrides

__all__ = ["TopicLog", "AppendResult"]

log = logging.getLogger(__name__)

# A part of a tail-cache batch handed to forward() is a view (no copy) while
# the batch is at most this many times its size, else a copy: a congested
# transport keeps what it is given, and so at most this multiple of the
# bytes its buffer counts.
_PIN_RATIO = 4

# convert(buf, from_offset, end_offset, max_bytes, verify) -> (out, count, next_offset, used);
# verify=False for batches from the tail cache (see tailcache.py)
Converter = Callable[[bytes, int, int, int, bool], tuple]  # buf, from, end, max_bytes, verify
# forward(records, count) -> out: a run of valid records from a tail-cache batch, framed
# as they are (a v1 MSG, as the parts to write: see v1.batch_frame)
Forward = Callable[[bytes, int], object]


class AppendResult:
    """What one :meth:`TopicLog.append` did, for the loop and for undoing it."""

    __slots__ = ("pieces", "rolled", "end_offset", "undo", "buf", "count")

    def __init__(self, pieces, rolled, end_offset, undo, buf=None, count: int = 0) -> None:
        self.pieces = pieces          # [(segment, index entries, size after)] in order
        self.rolled = rolled          # segments created, in order
        self.end_offset = end_offset  # offset after the last record written
        self.undo = undo              # (active before, its state, durable, durable_next, unsealed)
        self.buf = buf                # the records written, or their parts (for the tail cache)
        self.count = count            # how many


class TopicLog:
    """The segments of one topic and the offsets readers may see."""

    __slots__ = (
        "name", "name_bytes", "directory", "segments", "_bases", "_sealed_bytes",
        "end_offset", "next_offset", "subscribers", "active", "interval",
        "config", "overrides", "stats", "rcache", "wcache",
        "materialized", "last_time", "next_time", "unwritten", "durable", "durable_next",
        "unsealed", "tail", "tail_cache",
    )

    def __init__(self, name: str, directory: str, segments: list[Segment], config: TopicConfig,
                 interval: int, rcache, wcache, stats: dict, overrides: dict | None = None,
                 materialized: bool = True) -> None:
        self.name = name                           # validated topic name
        self.name_bytes = name.encode("ascii")     # the same, as sent on the wire
        self.directory = directory                 # <data>/topics/<name>
        self.segments = segments                   # readable segments, oldest first (loop)
        self._bases = [s.base_offset for s in segments]  # their base offsets, for bisect
        self._sealed_bytes = sum(s.readable_size for s in segments[:-1])  # (loop)
        self.end_offset = segments[-1].end_offset  # offset after the last readable record
        self.next_offset = self.end_offset         # offset the next publish will get (loop)
        self.subscribers: set = set()              # delivery subscriptions, woken on append
        self.active = segments[-1]                 # segment being appended to (disk thread)
        self.interval = interval                   # index interval, bytes
        self.config = config                       # settings in force (replaced, never mutated)
        self.overrides = dict(overrides or {})     # what config.json holds (loop)
        self.stats = stats                         # shared counters (LogStore.stats)
        self.rcache = rcache                       # read FileCache
        self.wcache = wcache                       # write FileCache
        self.materialized = materialized           # directory and first segment exist
        self.last_time = self.active.last_time     # newest append time, ms (disk thread)
        self.next_time = self.last_time            # least time the next publish gets, ms (loop)
        self.unwritten = 0                         # records handed to the disk thread, not reported (loop)
        self.durable: CheckpointEntry | None = None  # state at the last fsync (disk thread)
        self.durable_next: CheckpointEntry | None = None  # one past `unsealed`, held back
        self.unsealed: Segment | None = None  # sealed, its fsync not yet done (disk thread)
        self.tail: collections.deque = collections.deque()  # newest batches (TailCache; loop)
        self.tail_cache = None        # the TailCache keeping them (set by the LogStore)

    @classmethod
    def create(cls, name: str, directory: str, config: TopicConfig, interval: int,
               rcache, wcache, stats: dict, overrides: dict | None = None) -> "TopicLog":
        """A new, empty topic. No file is touched until :meth:`materialize`."""
        seg = Segment(directory, 0, interval, rcache, wcache)
        return cls(name, directory, [seg], config, interval, rcache, wcache, stats,
                   overrides, materialized=False)

    @classmethod
    def open(cls, name: str, directory: str, config: TopicConfig, interval: int, rcache,
             wcache, stats: dict, overrides: dict | None = None, entry=None,
             clean: bool = False) -> "TopicLog":
        """Open an existing topic without opening its sealed segments.

        Lists the directory and stats each segment file; only the last
        segment is recovered (:meth:`Segment.recover`), from the checkpoint
        ``entry`` when it still applies, and the one before it too when
        ``entry`` does not name the last one (its seal may not have been
        done: see below).
        """
        sizes = {}
        orphans = []
        with os.scandir(directory) as it:
            for e in it:
                parsed = parse_segment_file(e.name)
                if parsed is None:
                    continue
                base, ext = parsed
                if ext == "log":
                    sizes[base] = e.stat().st_size
                elif ext == "index":
                    orphans.append(base)
        for base in orphans:
            if base not in sizes:  # left by a deletion cut short
                try:
                    os.unlink(os.path.join(directory, "%020d.index" % base))
                except OSError:
                    pass
        bases = sorted(sizes)
        if not bases:
            seg = Segment(directory, 0, interval, rcache, wcache)
            seg.create_files()
            topic = cls(name, directory, [seg], config, interval, rcache, wcache, stats, overrides)
            return topic
        # Every segment but the last two is fsynced: a roll waits for the
        # seal before it (_roll). The one before the last is trusted too
        # when the checkpoint names the last one, which it does only once
        # that seal is done (note_sealed); else it is scanned like the last.
        trusted = len(bases) - 1
        if trusted and (entry is None or entry.base_offset < bases[-1]):
            trusted -= 1
        segments = [Segment.sealed_at(directory, b, nxt, sizes[b], interval, rcache, wcache)
                    for b, nxt in zip(bases[:trusted], bases[1:])]
        last = None
        if trusted < len(bases) - 1:
            prev = Segment.recover(directory, bases[trusted], interval, rcache, wcache,
                                   entry, False, stats)
            if prev.end_offset == bases[-1]:
                prev.sealed = True  # whole: the last segment follows it
                segments.append(prev)
                # Its seal may not have reached the directory fsync that
                # makes the last one's name durable: do it before a
                # checkpoint names the last one.
                fsync_dir(directory)
            else:
                # Its seal never reached the disk: the last segment starts
                # past a gap, and goes (the log ends at the last valid record).
                log.warning("segment %s ends at offset %d, not at %d where the next one "
                            "begins: removing the next one", prev.log_path, prev.end_offset,
                            bases[-1])
                Segment(directory, bases[-1], interval, rcache, wcache).delete_files()
                fsync_dir(directory)
                stats["recovery_dropped_segments"] = (
                    stats.get("recovery_dropped_segments", 0) + 1)
                stats["recovery_truncated_bytes"] = (stats.get("recovery_truncated_bytes", 0)
                                                     + sizes[bases[-1]])
                last = prev
        if last is None:
            last = Segment.recover(directory, bases[-1], interval, rcache, wcache,
                                   entry, clean, stats)
        if last.size == 0 and segments:
            # An empty active segment: the newest time is in the one before.
            last.last_time = segments[-1].max_time() or 0
        segments.append(last)
        topic = cls(name, directory, segments, config, interval, rcache, wcache, stats, overrides)
        topic.durable = topic._entry()
        return topic

    @property
    def start_offset(self) -> int:
        """The oldest offset still kept."""
        return self.segments[0].base_offset

    @property
    def size_bytes(self) -> int:
        """Bytes of readable log (event loop)."""
        return self._sealed_bytes + self.segments[-1].readable_size

    # -- event loop --------------------------------------------------------

    def read(self, offset: int, max_bytes: int, convert: Converter, forward: Forward | None = None):
        """Convert records from ``offset`` on, about ``max_bytes`` of them.

        Returns ``convert``'s ``(out, count, next_offset)`` for the first
        non-empty result, or None when ``offset`` is at the end. An offset
        below the oldest kept one (deleted by retention) reads from the
        oldest kept one, and is counted (``offset_resets``). Finds the
        segment by binary search on base offsets and the position by the
        sparse index, then reads forward: O(log segments + index interval).
        With ``forward``, a read from a tail-cache batch takes its records as
        they are, ``forward(records, count)``: the whole batch when it fits
        ``max_bytes``, else the part that does, found by bisecting the
        batch's record positions (``TailCache.starts``); no walk per read.
        Raises :class:`records.CorruptRecordError` rather than serve a bad record.
        """
        end = self.end_offset
        segments = self.segments
        if offset < segments[0].base_offset:
            if offset < end:
                self.stats["offset_resets"] += 1
            offset = segments[0].base_offset
        if offset >= end:
            return None
        tail = self.tail
        if tail:
            # Caught up: the records are in a batch this broker wrote and
            # still holds (broker/storage/tailcache.py), CRCs not re-checked.
            k = len(tail)
            for j in range(k - 1, max(k - LOOKBACK, 0) - 1, -1):
                entry = tail[j]
                first, last, buf, starts = entry
                if first <= offset:
                    if forward is not None and offset < last <= end:
                        if offset == first and len(buf) <= max_bytes:
                            self.stats["tail_reads"] += 1
                            return forward(buf, last - first), last - first, last
                        if self.tail_cache is not None:
                            self.stats["tail_reads"] += 1
                            return self._forward_part(entry, offset, max_bytes, forward)
                    if offset < last:
                        out, count, nxt, _used = convert(buf, offset, end, max_bytes, False)
                        if count:
                            self.stats["tail_reads"] += 1
                            return out, count, nxt
                    break
        i = bisect.bisect_right(self._bases, offset) - 1
        seg = segments[i]
        pos = seg.lookup(offset)
        want = max_bytes
        while True:
            buf = seg.read(pos, want)
            out, count, nxt, used = convert(buf, offset, end, max_bytes, True)
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
                if i >= len(segments):
                    return None
                seg = segments[i]
                pos = 0
                continue
            avail = seg.readable_size - pos
            if len(buf) < _HEADER_SIZE <= avail:
                want = _HEADER_SIZE  # max_bytes too small to see the record's length
                continue
            span = 4 + int.from_bytes(buf[:4], "big") if len(buf) >= 4 else 0
            if len(buf) < span <= avail:
                want = span  # one record larger than max_bytes: read it whole
                continue
            raise records.CorruptRecordError(pos, "record in %s cannot be read" % seg.log_path)

    def _forward_part(self, entry, offset: int, max_bytes: int, forward: Forward):
        """Records ``offset`` on of a tail-cache batch, as many as fit ``max_bytes``
        (at least one), as ``message_frame`` would take them."""
        first, last, buf, starts = entry
        if starts is None:
            starts = self.tail_cache.starts(entry)
        n = last - first
        i = offset - first
        a = starts[i]
        if len(buf) - a <= max_bytes:
            m = n
        else:
            # Records i .. m-1 end at starts[m]: the largest m with starts[m] <= a + max_bytes.
            m = max(bisect.bisect_right(starts, a + max_bytes, i + 1) - 1, i + 1)
        b = starts[m] if m < n else len(buf)
        # A view keeps the whole batch alive while a transport holds it.
        part = memoryview(buf)[a:b] if len(buf) <= _PIN_RATIO * (b - a) else buf[a:b]
        return forward(part, m - i), m - i, first + m

    def offset_for_time(self, ts_ms: int) -> int:
        """The first offset whose append time is at or after ``ts_ms``.

        ``end_offset`` when every kept record is older; ``start_offset``
        when none is. A binary search over segments by the time of their
        first record (one header read each, cached), then one within the
        segment (:meth:`Segment.offset_for_time`).
        """
        segments = self.segments
        lo, hi = 0, len(segments)
        while lo < hi:  # first segment whose first record is at or after ts_ms
            mid = (lo + hi) // 2
            t = segments[mid].first_time()
            if t is None or t >= ts_ms:
                hi = mid
            else:
                lo = mid + 1
        if lo == 0:
            return self.start_offset
        seg = segments[lo - 1]
        seg_end = segments[lo].base_offset if lo < len(segments) else self.end_offset
        found = seg.offset_for_time(ts_ms, seg_end)
        return seg_end if found is None else found

    def written(self, result: AppendResult) -> None:
        """Make a completed append visible (called in the loop by the writer)."""
        for seg, entries, size in result.pieces:
            seg.add_index(entries)
            seg.readable_size = size
        for seg in result.rolled:
            prev = self.segments[-1]
            prev.readable_size = prev.size  # sealed: its size is final
            self._sealed_bytes += prev.readable_size
            self.segments.append(seg)
            self._bases.append(seg.base_offset)
        self.end_offset = result.end_offset

    def expired_segments(self, now_ms: int) -> int:
        """How many of the oldest segments retention deletes now (never the active one).

        By age: a sealed segment goes once its newest record is older than
        ``retention_ms``. By size: the oldest sealed segments go while the
        topic is bigger than ``retention_bytes``.
        """
        cfg = self.config
        segments = self.segments
        sealed = len(segments) - 1
        n = 0
        if cfg.retention_ms >= 0:
            cutoff = now_ms - cfg.retention_ms
            while n < sealed:
                t = segments[n].max_time()
                if t is None:
                    # Unreadable tail: the next segment's first record is
                    # no older than anything in this one.
                    t = segments[n + 1].first_time()
                if t is None or t >= cutoff:
                    break
                n += 1
        if cfg.retention_bytes >= 0:
            total = self.size_bytes - sum(s.readable_size for s in segments[:n])
            while n < sealed and total > cfg.retention_bytes:
                total -= segments[n].readable_size
                n += 1
        return n

    def drop_oldest(self, n: int) -> list[Segment]:
        """Remove the ``n`` oldest (sealed) segments from the log; return them.

        Their read descriptors are closed here; the disk thread deletes the
        files. ``start_offset`` moves to the first remaining segment.
        """
        n = min(n, len(self.segments) - 1)
        if n <= 0:
            return []
        dropped = self.segments[:n]
        del self.segments[:n]
        del self._bases[:n]
        for seg in dropped:
            self._sealed_bytes -= seg.readable_size
            seg.rcache.discard(seg)
            seg.release_reader()
        return dropped

    # -- disk thread -------------------------------------------------------

    def materialize(self) -> None:
        """Create the topic's directory and first segment (first append)."""
        if self.materialized:
            return
        os.makedirs(self.directory, exist_ok=True)
        self.active.create_files()
        if self.overrides:
            atomic_write(os.path.join(self.directory, CONFIG_FILE),
                         encode_overrides(self.overrides))
        fsync_dir(self.directory)
        fsync_dir(os.path.dirname(self.directory))
        self.materialized = True

    def save_overrides(self, overrides: dict) -> None:
        """Persist ``config.json`` (atomically, durably)."""
        if not self.materialized:
            self.materialize()  # writes the current overrides
        atomic_write(os.path.join(self.directory, CONFIG_FILE), encode_overrides(overrides))

    def append(self, buf, count: int, ts_ms: int, last_len: int) -> AppendResult:
        """Write encoded records, ``ts_ms`` the newest append time among them.

        ``buf`` is the records, or a list of ``(records, count)`` parts
        that follow one another (the disk thread's parts of a job, written
        with one ``pwritev`` rather than joined). ``last_len`` is the size
        of the last record. Fills the active segment up to
        ``segment_bytes`` and rolls, as often as needed; a batch that does
        not fit is split at a record boundary (one pass over the batch's
        record headers, in the codec, per split batch; parts are joined
        first). A record bigger than a whole segment gets a segment of its
        own. On an OSError nothing of the batch is left behind: every
        segment touched is cut back and new ones are removed (on any
        exception, in fact).
        """
        self.materialize()
        seg = self.active
        undo = (seg, seg.state(), self.durable, self.durable_next, self.unsealed)
        limit = self.config.segment_bytes
        if type(buf) is list:
            if len(buf) == 1:
                buf = buf[0][0]
                n = len(buf)
            else:
                n = sum([len(part) for part, _n in buf])
        else:
            n = len(buf)
        pieces = []
        rolled = []
        try:
            if seg.size + n <= limit or (seg.size == 0 and count == 1):
                pieces.append((seg, seg.append(buf, count, last_len, ts_ms), seg.size))
            else:
                if type(buf) is list:  # a roll is rare: join the parts, split where it falls
                    buf = b"".join([part for part, _n in buf])
                starts = recordwalk.record_starts(buf)
                starts.append(n)
                pos = 0   # byte position in buf of the next record to write
                i = 0     # its index in starts
                view = memoryview(buf)
                while i < count:
                    room = limit - seg.size
                    j = bisect.bisect_right(starts, pos + room, i) - 1
                    if j <= i:
                        if seg.size:
                            seg = self._roll(rolled)
                            continue
                        j = i + 1  # a record bigger than a segment: alone
                    end = starts[j]
                    last = end - starts[j - 1]
                    entries = seg.append(view[pos:end], j - i, last, ts_ms)
                    pieces.append((seg, entries, seg.size))
                    pos, i = end, j
                    if i < count:
                        seg = self._roll(rolled)
        except BaseException:
            self.undo(AppendResult(pieces, rolled, None, undo))
            raise
        self.last_time = ts_ms
        if rolled:
            self.stats["segments_rolled"] += len(rolled)
        return AppendResult(pieces, rolled, seg.end_offset, undo, buf, count)

    def _roll(self, rolled: list) -> Segment:
        """Seal the active segment and start the next one.

        Under ``fsync=always`` the seal's fsyncs (the segment's files, and
        the directory for the new one's names) are done here: the batch
        being written is acknowledged after them. Otherwise they are left
        to the syncer thread (``unsealed``; the writer hands them over right
        after this job), as Kafka flushes a rolled segment in the
        background, so that the topic's writes do not wait for the disk:
        on ext4 the directory's fsync commits the journal, which first
        writes out the data of the segment just sealed (about 100 ms for
        64 MiB on a 400 MB/s disk). At most one seal waits: a roll
        finishes the previous one here first, which bounds what recovery
        must scan to the last two segments (:meth:`open`).
        """
        prev = self.active
        if self.unsealed is not None:
            self.finish_seal()
        durable = self.config.fsync == "always"
        prev.seal(durable)
        if not durable:
            self.unsealed = prev
        seg = Segment(self.directory, prev.end_offset, self.interval, self.rcache, self.wcache)
        seg.last_time = prev.last_time
        rolled.append(seg)  # before creating: undo removes a half-created one too
        seg.create_files()
        if durable:
            fsync_dir(self.directory)
        self.active = seg
        return seg

    def undo(self, result: AppendResult) -> None:
        """Take back an append nobody has seen (failed write or failed fsync)."""
        active, state, durable, durable_next, unsealed = result.undo
        for seg in reversed(result.rolled):
            try:
                seg.remove_created()
            except OSError:
                log.exception("could not remove %s after a failed append", seg.log_path)
        self.active = active
        active.sealed = False
        # What is durable as before the append: a seal it finished may have
        # moved it to a segment just removed. (A seal it finished stays
        # done; if it waits again, the next roll does it once more.)
        self.durable, self.durable_next, self.unsealed = durable, durable_next, unsealed
        try:
            active.restore(state)
        except OSError:
            log.exception("could not truncate %s after a failed append", active.log_path)

    def note_synced(self) -> None:
        """Disk thread: the active segment was just fsynced up to its size."""
        self.note_durable(self._entry())

    def active_entry(self) -> CheckpointEntry:
        """Disk thread: the active segment's state now (for a background fsync)."""
        return self._entry()

    def note_durable(self, entry: CheckpointEntry) -> None:
        """Disk thread: a background fsync covered ``entry`` (taken before it began).

        An older entry than the one already durable is ignored: rounds
        finish in order, but the disk thread syncs by itself too. An entry
        past a segment whose seal is not done is held back until it is
        (:meth:`note_sealed`): a checkpoint naming a segment tells recovery
        that every one before it is on disk.
        """
        unsealed = self.unsealed
        if unsealed is not None and entry.base_offset > unsealed.base_offset:
            held = self.durable_next
            if held is None or (entry.base_offset, entry.size) > (held.base_offset, held.size):
                self.durable_next = entry
            return
        cur = self.durable
        if cur is None or (entry.base_offset, entry.size) > (cur.base_offset, cur.size):
            self.durable = entry

    def finish_seal(self) -> None:
        """Disk thread: the seal left for later (:meth:`sync_seal`), here and now."""
        seg = self.unsealed
        if seg is not None:
            self.sync_seal(seg)
            self.note_sealed(seg)

    def sync_seal(self, seg: Segment) -> None:
        """Any thread: fsync sealed ``seg``'s files, then the directory (the next one's names)."""
        seg.sync_sealed()
        fsync_dir(self.directory)

    def note_sealed(self, seg: Segment) -> None:
        """Disk thread: ``seg``'s seal fsync is done (here or on the syncer).

        What is durable moves on to the segment after it: its start, or
        what an fsync of it covered meanwhile (``durable_next``).
        """
        if self.unsealed is not seg:
            return  # already done here, before the syncer reported it
        self.unsealed = None
        held, self.durable_next = self.durable_next, None
        nxt = self.active
        if nxt.base_offset != seg.end_offset:
            return  # cannot happen while a roll waits for the seal before it
        if held is None or held.base_offset != nxt.base_offset:
            held = CheckpointEntry(nxt.base_offset, 0, nxt.base_offset, 0, seg.last_time, 0, 0)
        self.note_durable(held)

    def _entry(self, seg: Segment | None = None) -> CheckpointEntry:
        if seg is None:
            seg = self.active
        return CheckpointEntry(seg.base_offset, seg.size, seg.end_offset, seg.last_pos,
                               seg.last_time, seg.index_size, seg.next_index_pos)

    def checkpoint_entry(self) -> CheckpointEntry | None:
        """Disk thread: what the checkpoint may claim for this topic.

        The state at the last fsync; under ``fsync=never`` the current one
        (nothing is ever synced, and a process crash keeps the page cache),
        or while a seal waits, the whole of the segment that waits for it.
        """
        if not self.materialized:
            return None
        if self.config.fsync == "never":
            return self._entry(self.unsealed)
        return self.durable

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        if self.active not in self.segments:
            self.active.close()
