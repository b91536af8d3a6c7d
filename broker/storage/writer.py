"""The disk thread, and the loop-side batching that feeds it.

Publishes are not written one by one. The event loop collects them per
topic (:meth:`DiskWriter.append`); at the end of a loop iteration in which
the disk thread is idle, every topic's pending messages, every changed
consumer offset, the segment files retention released and any queued disk
call go to it as one job. While it writes that job, the next one
accumulates: this is group commit, and the busier the broker the larger the
batches.

The disk thread takes each topic's batches as records (a v1 ``PUB``'s are
finished on the loop by ``wire1.publish_records``; a list of messages, from
a v0 ``PUB`` or a v1 one parsed first, is encoded here, one codec call),
writes them (one ``pwrite``, or one ``pwritev`` of the batches as they are
when some are 64 KiB or more, so that they are not copied into one buffer
first; more when they straddle a segment roll) and applies the topic's
fsync policy; the GIL is released during write and
fsync. Then the loop makes the data visible (``TopicLog.written``), calls
the ``on_stored`` callbacks and wakes the consumers. Nothing is readable,
and so nothing is delivered or acknowledged, before it is in the file.

Durability, per topic (``TopicLog.config.fsync``, broker default in
:class:`~broker.config.Config`):

- ``always``: the job's appends to the topic are fsynced before the job is
  reported, so a batch becomes visible and acknowledged only after the
  fsync covering it; every publish that arrived while the previous job
  was being written shares that one fsync.
- ``interval``: written data is fsynced at most ``fsync_interval_ms``
  after it was written (a timer on the disk thread's queue wait, never a
  sleep); it is visible and acknowledged once written. These fsyncs, and
  the periodic checkpoint, run on a second thread (the syncer) on
  duplicated descriptors: an fsync can take tens of milliseconds, and the
  disk thread keeps writing meanwhile, so it never shows up as latency.
- ``never``: the OS writes back when it likes; fsynced at shutdown only.

Whatever the policy, a segment is fsynced when it is sealed (rolled):
under ``always`` at the roll, before the batch is acknowledged; otherwise
by the syncer, right after the job that rolled (``TopicLog._roll``: at
most one seal waits per topic, and no checkpoint names a segment past
it). Everything is fsynced at a clean shutdown. At most every
``checkpoint_interval_ms`` the syncer writes the recovery checkpoint
(``broker/storage/checkpoint.py``), claiming for each topic only what an
fsync has covered; at a clean shutdown the disk thread writes a final one
marked clean.

Every ``WRITEBACK_BYTES`` (4 MiB) of a segment, the syncer also starts
the kernel's writeback of them (``sync_file_range``, as RocksDB's
``bytes_per_sync``), so that the fsync that seals a segment has little
left to do. It is the syncer's, not the write's: the call can block (up
to milliseconds when the disk is busy), and when the write that crossed
the mark made it, that write went to the disk thread instead of being
written on the loop, and every batch arriving meanwhile waited for the
hand-over and the call (at 10k msg/s of 1 KB, every 0.4 s; see
docs/benchmarks.md).

Retention runs on a loop timer: it drops expired segments from their topics
(in the loop, so no reader can reach them any more) and hands their files
to the disk thread, which drops their cached pages and deletes them; the
syncer fsyncs their directory in its next round.

A small job (``inline_write_bytes``) that arrives while the disk thread
is idle is written by the loop itself, holding ``_disk_lock`` (the disk
thread holds it while it works): two thread wake-ups less per batch at
low rates. Anything that may wait for the disk stays with the disk
thread (:meth:`DiskWriter._write_here`).

Bounds: two jobs with the disk thread at most (the queue has ``maxsize=4``:
two jobs, the syncer's wake-up and the loop's).
The loop submits a job when none is in flight; only under load (1 MiB or
more waiting) does it queue a second one behind it, so that the disk
thread moves straight on to it. The loop gives each batch its offsets
(``TopicLog.next_offset``) and append time as it arrives; the disk thread
writes from the topic's end as it has written it, so a batch that fails
leaves no gap before the ones queued after it (records made with offsets
past the failed ones are re-encoded at their place, and ``_done`` gives the
failed offsets back to the loop). Published bytes waiting
for the disk are counted; above ``append_high_water`` the producers that
keep publishing are paused (``pause_reading``) until the backlog falls
below ``append_low_water``. Disk calls (:meth:`DiskWriter.run`) are capped.

Two builds of this one source: as it is (the pure-Python broker), and
compiled by Cython into ``broker._speedups.writer``, where
``broker/_speedups/writer.pxd`` makes ``DiskWriter`` and ``_Job``
extension types whose attributes are C fields (the loop-side work per
batch is mostly attribute access on the writer). ``broker.storage.DiskWriter``
is the compiled one when the Cython codec is loaded
(``broker.codec.IMPLEMENTATION``). Keep this file plain Python; an
attribute that the ``.pxd`` does not declare still works (the instance has
a ``__dict__``), but a test fails until it is declared.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import struct
import threading
import time
from typing import Callable

# Absolute imports: this source is also compiled, as broker._speedups.writer
# (see broker/_speedups/writer.pxd), where a relative import would look in
# broker._speedups.
from broker.codec import records
from broker.histogram import Histogram
from broker.storage import checkpoint as checkpoint_file
from broker.storage.fileio import fsync_dir, start_writeback
from broker.storage.log import TopicLog
from broker.storage.offsets import OffsetStore
from broker.storage.topicconfig import TopicConfig

__all__ = ["DiskWriter"]

log = logging.getLogger("broker.storage.writer")  # one name for both builds

_U64 = struct.Struct(">Q")  # a record's offset field, at byte 8
_STOP = object()
_WAKE = object()           # the syncer finished a round: take its results in
_TIMEOUT = object()        # (not queued) the disk thread's wait for a deadline ended
_LOOP_WAKE = object()      # the loop wrote something due earlier than the thread's wait
_WRITEBACK = object()      # (a syncer item) start the writeback of a segment's range
_SEAL = object()           # (a syncer item) fsync a segment sealed by a roll
_DIRSYNC = object()        # (a syncer item) fsync a directory files were deleted from
_RECORD_OVERHEAD = 24     # record header bytes per message (broker/_pure/records.py)
_MAX_CALLS = 256          # disk calls waiting for the disk thread, at most
_RETENTION_SLICE = 256    # topics checked per loop callback by the retention timer
_SYNC_RETRY = 0.01        # s: look again this soon when the syncer is still busy
_DOUBLE_BUFFER = 1 << 20  # backlog (bytes) above which a second job is queued
_OFFSETS_DELAY = 0.005    # s an offsets-only job waits for a write to ride with
_OWN_PART_BYTES = 64 * 1024  # a topic's part of a job this big is written as it is, not joined


class _Job:
    """One unit of work for the disk thread, and its results."""

    __slots__ = ("appends", "acks", "offsets", "deletes", "calls", "checkpoint", "nbytes",
                 "results", "errors", "ends", "call_results", "unsynced")

    def __init__(self, appends, acks, offsets, deletes, calls, checkpoint: bool,
                 nbytes: int = 0) -> None:
        self.appends = appends      # [(TopicLog, [(messages or records, count, ts, last_len)], n)]
        self.acks = acks            # [(callback, TopicLog, index in the topic's batch, count)]
        self.offsets = offsets      # {(client_id, topic): offset} to persist
        self.deletes = deletes      # [(directory, [Segment])] dropped by retention
        self.calls = calls          # [(fn, args, future)] to run on the disk thread
        self.checkpoint = checkpoint  # write a checkpoint (after syncing) in this job
        self.nbytes = nbytes        # published bytes it carries (flow control)
        self.results = []           # [(TopicLog, AppendResult)]
        self.errors = []            # [(TopicLog, count, OSError)] appends that failed
        self.ends = {}              # {TopicLog: offset after its last record on disk, after the job}
        self.call_results = []      # [(future, result, exception)]
        self.unsynced = []          # [(TopicLog, AppendResult, count)] written, fsync=always, not yet reported


class DiskWriter:
    """Batches appends and offset updates onto one disk thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, offsets: OffsetStore, *,
                 fsync: str, fsync_interval_ms: int, high_water: int, low_water: int,
                 on_written: Callable[[TopicLog], None], store=None,
                 clock: Callable[[], float] | None = None,
                 checkpoint_interval_ms: int | None = None,
                 retention_check_interval_ms: int | None = None,
                 inline_write_bytes: int | None = None) -> None:
        self._loop = loop
        self._offsets = offsets
        self._store = store                          # LogStore: checkpoints, retention, configs
        self._fsync = fsync                          # broker default; offsets follow it
        self._interval = fsync_interval_ms / 1000.0
        self._high = high_water
        self._low = low_water
        self._on_written = on_written                # loop callback per topic written
        self._tail = getattr(store, "tail", None)    # TailCache: batches just written (loop)
        cfg = getattr(store, "config", None)
        self._clock = clock or getattr(store, "clock", None) or time.time  # wall clock, s
        if checkpoint_interval_ms is None:
            checkpoint_interval_ms = cfg.checkpoint_interval_ms if cfg else 10_000
        if retention_check_interval_ms is None:
            retention_check_interval_ms = cfg.retention_check_interval_ms if cfg else 0
        if inline_write_bytes is None:
            inline_write_bytes = cfg.inline_write_bytes if cfg else 0
        self._inline_max = inline_write_bytes       # jobs up to this size may be written on the loop
        self._checkpoint_every = checkpoint_interval_ms / 1000.0
        self._retention_every = retention_check_interval_ms / 1000.0
        self._pending: dict[TopicLog, list] = {}     # topic -> message lists not yet submitted
        self._pending_bytes = 0                      # bytes in _pending and the jobs in flight
        self._flight_bytes = 0                       # of which in the jobs in flight
        self._in_flight = 0                          # jobs with the disk thread (at most 2)
        self._paused: set = set()                    # transports paused for backpressure
        self._idle_waiters: list[asyncio.Future] = []  # flush() callers
        self._deletes: list = []                     # [(directory, segments)] to delete
        self._calls: list = []                       # [(fn, args, future)] to run
        self._want_checkpoint = False                # checkpoint() asked for one
        self._retention_handle: asyncio.Handle | None = None  # retention timer or slice
        self._kick_handle: asyncio.Handle | None = None  # _kick scheduled for this iteration
        self._offsets_handle: asyncio.TimerHandle | None = None  # offsets-only job, later
        self._offsets_due = False     # committed offsets have waited long enough: write them
        # At most two jobs (_in_flight <= 2), one _WAKE and one _LOOP_WAKE:
        # never full.
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._closing = False                        # close() began: nothing more is written here
        # The disk thread's state (everything below, the segments and the
        # offsets journal) belongs to whoever holds this lock: the disk
        # thread while it works, or the loop for a write of its own.
        self._disk_lock = threading.Lock()
        self._thread_due: float | None = None        # when the idle disk thread wakes by itself
        self._loop_wake = False                      # a _LOOP_WAKE is in the queue
        self._wake_queued = False                    # the syncer's _WAKE is in the queue
        # Disk thread state.
        self._dirty: dict = {}                       # item -> fsync deadline (monotonic)
        self._sync_due = float("inf")                # earliest deadline in _dirty
        self._writeback: dict = {}                   # segments due a writeback (ordered set)
        self._seals: dict = {}                       # topic -> its sealed segment to fsync
        self._dirsyncs: dict = {}                    # directories to fsync (deletions; ordered set)
        self._lazy: set = set()                      # fsync=never topics written (synced at stop)
        self._offsets_retry: dict = {}               # offsets whose journal write failed
        self.fsync_histogram = Histogram()           # fsync durations (s), for /metrics
        self._changed = False                        # written since the last checkpoint
        self._last_checkpoint = time.monotonic()
        self._clean_stop = True                      # close(): sync and write a clean checkpoint
        self._thread = threading.Thread(target=self._run, name="pylogstreams-disk", daemon=True)
        # The syncer: background fsyncs and checkpoints (see the module doc).
        self._sync_queue: queue.Queue = queue.Queue(maxsize=1)  # one round at a time
        self._sync_results: collections.deque = collections.deque()  # rounds done, to apply
        self._sync_busy = False                      # a round is with the syncer (disk thread)
        self._busy_retry = 0.0                       # while busy, timed work waits until then
        self._syncer = threading.Thread(target=self._run_syncer, name="pylogstreams-sync",
                                        daemon=True)
        self.stats = store.stats if store is not None else {}
        for key in ("batches", "messages", "bytes", "inline_writes", "fsyncs", "fsync_errors",
                    "write_errors", "segments_deleted", "bytes_deleted", "checkpoints", "checkpoint_errors",
                    "retention_runs"):
            self.stats.setdefault(key, 0)

    def start(self) -> None:
        self._syncer.start()
        self._thread.start()
        if self._store is not None and self._retention_every > 0:
            self._retention_handle = self._loop.call_soon(self._retention_tick)

    @property
    def alive(self) -> bool:
        """The disk thread is running."""
        return self._thread.is_alive()

    # -- event loop --------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def next_stamp(self, topic: TopicLog) -> tuple[int, int]:
        """``(offset, time)`` for the next batch published to ``topic`` (loop).

        The offset is the topic's next one as the loop hands them out
        (``TopicLog.next_offset``); the time is now, in ms, never before
        the topic's previous batch, so that time lookups can binary-search
        (the wall clock may step back). ``wire1.publish_records`` makes
        finished records with them, which :meth:`append` takes as they are.
        """
        now_ms = int(self._clock() * 1000)
        if now_ms > topic.next_time:
            topic.next_time = now_ms
        return topic.next_offset, topic.next_time

    def append(self, topic: TopicLog, messages, nbytes: int, transport=None,
               on_stored: Callable | None = None, count: int | None = None,
               ts: int | None = None, last_len: int = 0) -> None:
        """Queue ``messages`` for ``topic``: a list of bytes, or records.

        Records are a ``bytearray`` of ``count`` finished records made by
        ``wire1.publish_records`` with the offset and time ``ts`` that
        :meth:`next_stamp` gave, ``last_len`` the size of the last one: the
        disk thread writes them as they are, so no message is copied or
        hashed again. (Should a batch queued before them fail, their
        offsets move to follow the topic's end: the disk thread re-encodes
        them.) A list of messages is encoded on the disk thread, with the
        time this call gives it when ``ts`` is None.

        ``nbytes`` is their size as the caller measured it (per batch, not
        per message: the network chunk that carried them, say); the batch
        counts at least its size as stored, however it was measured, for
        flow control and for :meth:`_may_write_here`. If the backlog is over
        the high-water mark and a transport is given, that transport stops
        reading until it drains.
        ``on_stored(base_offset, count, error)`` is called in the loop once
        the batch is written (and fsynced, when the topic's policy is
        ``always``), with the offset of its first message, or with
        ``base_offset=None`` and the OSError if it could not be stored.
        """
        if ts is None:
            ts = self.next_stamp(topic)[1]
        if count is None:
            count = len(messages)
        nbytes = max(nbytes, _stored_size(messages, count))
        topic.unwritten += count
        entry = (messages, count, on_stored, ts, last_len)
        lists = self._pending.get(topic)
        if lists is None:
            self._pending[topic] = [entry]
        else:
            lists.append(entry)
        self._pending_bytes += nbytes
        if self._pending_bytes > self._high and transport is not None \
                and transport not in self._paused:
            self._paused.add(transport)
            transport.pause_reading()
        self._kick_soon()

    def offsets_changed(self) -> None:
        """Committed offsets changed: write them with the next job.

        A commit does not wait for the disk (``CMT`` is answered at once),
        so offsets alone do not start a job right away: they ride with the
        next publish, or go on their own after ``_OFFSETS_DELAY``. A
        consumer committing after every batch would otherwise double the
        jobs, and a publish would queue behind the offsets write.
        """
        if self._offsets_handle is None and not self._offsets_due:
            self._offsets_handle = self._loop.call_later(_OFFSETS_DELAY, self._offsets_timer)

    def _offsets_timer(self) -> None:
        self._offsets_handle = None
        self._offsets_due = True
        self._kick_soon()  # after this iteration's reads: their publishes ride along

    def forget(self, transport) -> None:
        """A paused connection went away: nothing to resume."""
        self._paused.discard(transport)

    def run(self, fn: Callable, *args) -> asyncio.Future:
        """Run ``fn(*args)`` on the disk thread with the next job; a future of its result.

        For blocking file work the loop must not do itself (a topic's
        config file, ...). Calls run in order, after the job's appends.
        """
        if len(self._calls) >= _MAX_CALLS:
            raise RuntimeError("too many disk calls waiting")
        fut = self._loop.create_future()
        self._calls.append((fn, args, fut))
        self._kick()
        return fut

    async def set_topic_config(self, name: str, **overrides) -> TopicConfig:
        """Change a topic's settings live and persist them (see ``LogStore.set_topic_config``).

        The new settings apply once ``config.json`` is durably replaced,
        which the disk thread does; the loop never waits on the disk.
        """
        store = self._store
        topic, merged = store.prepare_topic_config(name, overrides)
        await self.run(topic.save_overrides, merged)
        store.apply_topic_config(topic, merged)
        return topic.config

    def checkpoint(self) -> asyncio.Future:
        """Sync everything written so far and write a checkpoint; resolves when done."""
        self._want_checkpoint = True
        return self.run(_noop)

    def enforce_retention(self) -> int:
        """Apply retention to every topic now; return how many segments were dropped.

        The timer does the same in slices; tests and admin commands call
        this. Await :meth:`flush` to wait for the files to be deleted.
        """
        if self._store is None:
            return 0
        return self._retention_pass(list(self._store.topics.values()))

    async def flush(self) -> None:
        """Wait until everything appended or requested so far is done."""
        while (self._in_flight or self._pending or self._offsets.dirty or self._deletes
               or self._calls):
            fut = self._loop.create_future()
            self._idle_waiters.append(fut)
            self._kick()
            await fut

    async def close(self, clean: bool = True) -> None:
        """Write everything, fsync, write a clean checkpoint, stop the thread.

        ``clean=False`` stops the thread after the pending writes without
        the final fsync and checkpoint: the files are left as a crash
        (kill -9) would leave them. Tests and the benchmark use it.
        """
        if self._retention_handle is not None:
            self._retention_handle.cancel()
            self._retention_handle = None
        await self.flush()
        if self._kick_handle is not None:
            self._kick_handle.cancel()
            self._kick_handle = None
        if self._offsets_handle is not None:
            self._offsets_handle.cancel()
            self._offsets_handle = None
        self._clean_stop = clean
        self._closing = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            await self._loop.run_in_executor(None, self._thread.join)

    def _kick_soon(self) -> None:
        """Submit a job at the end of this loop iteration, not now.

        Everything published in the same iteration (every connection's
        data_received, every producer woken by an acknowledgement) joins
        the same job: under fsync=always, the same fsync.
        """
        if self._kick_handle is None and self._may_submit():  # _done kicks otherwise
            self._kick_handle = self._loop.call_soon(self._kick)

    def _may_submit(self) -> bool:
        # One job at a time, so that the next one gathers everything that
        # arrives meanwhile (group commit); but under load (a backlog of
        # _DOUBLE_BUFFER bytes or more) a second one waits in the queue, so
        # the disk thread starts it the moment it finishes the first instead
        # of idling through the loop's round trip.
        n = self._in_flight
        return n == 0 or (n == 1 and self._pending_bytes - self._flight_bytes >= _DOUBLE_BUFFER)

    def _work_waiting(self) -> bool:
        """Whether :meth:`_kick` has anything to do (if it may submit at all).

        Something to write, delete, call or checkpoint; a ``flush()``
        waiting (answered even when there is nothing); or committed offsets
        whose short wait (``_OFFSETS_DELAY``) is over.
        """
        return bool(self._pending or self._deletes or self._calls or self._want_checkpoint
                    or self._idle_waiters or (self._offsets_due and self._offsets.dirty))

    def _kick(self) -> None:
        if self._kick_handle is not None:
            self._kick_handle.cancel()
            self._kick_handle = None
        if not self._may_submit() or not self._work_waiting() or not self._thread.is_alive():
            return
        writes = self._pending or self._deletes or self._calls or self._want_checkpoint
        if not writes and not self._offsets.dirty:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
            return
        # (Offsets alone, not yet due, never get here: _work_waiting.)
        self._offsets_due = False
        if self._offsets_handle is not None:
            self._offsets_handle.cancel()
            self._offsets_handle = None
        appends = []
        acks = []
        for topic, entries in self._pending.items():
            # The disk thread writes from the topic's end there (records
            # re-encoded if a failed batch moved it); acknowledgements are
            # relative to the topic's first offset in the job.
            start = 0
            parts = []
            for part, count, cb, ts, last_len in entries:
                if cb is not None:
                    acks.append((cb, topic, start, count))
                start += count
                if count:
                    parts.append((part, count, ts, last_len))
            appends.append((topic, parts, start))
        self._pending = {}
        nbytes = self._pending_bytes - self._flight_bytes
        deletes, self._deletes = self._deletes, []
        calls, self._calls = self._calls, []
        job = _Job(appends, acks, self._offsets.take_dirty(), deletes, calls,
                   self._want_checkpoint, nbytes)
        self._want_checkpoint = False
        self._in_flight += 1
        self._flight_bytes += nbytes
        self._submit(job)

    def _submit(self, job: _Job) -> None:
        """Hand ``job`` to the disk thread, or write it here (:meth:`_write_here`)."""
        if self._in_flight == 1 and self._inline_max and job.nbytes <= self._inline_max \
                and not (self._closing or job.deletes or job.calls or job.checkpoint) \
                and self._write_here(job):
            return
        self._queue.put_nowait(job)

    def _write_here(self, job: _Job) -> bool:
        """Write a small job on the loop, if the disk thread is idle; False if not done.

        Handing a job over costs two thread wake-ups (there and back), and
        on a machine whose idle CPUs are slow to wake those are the tail of
        the latency at low rates. A job of at most ``inline_write_bytes`` is
        one ``pwrite`` into the page cache, the same cost as the hand-over:
        it is written here when nothing can make it block longer. Anything
        that may wait for the disk goes to the disk thread: fsync=always, a
        segment roll (files to create, maybe a waiting seal to finish), a
        topic's first write, files to reopen (the write cache closed them),
        an offsets journal compaction or retry, deletions, disk calls and
        checkpoints. A write that is due a writeback start stays here: that
        is the syncer's (``_timed_work``). Under load the disk thread is
        busy (``_in_flight``) and every job goes to it.
        """
        if not self._disk_lock.acquire(False):
            return False  # the disk thread is at work (timed work or stopping)
        try:
            if not self._may_write_here(job):
                return False
            try:
                self._write(job)
            except Exception:  # as on the disk thread; a KeyboardInterrupt is the loop's own
                log.exception("unexpected error writing on the loop")
                self._abandon(job)
            self.stats["inline_writes"] += 1
            # Data now waits for an fsync (or a checkpoint) that the idle
            # disk thread may not be timing yet: wake it to.
            due = self._next_deadline()
            if due is not None and not self._loop_wake \
                    and (self._thread_due is None or due < self._thread_due):
                try:
                    self._queue.put_nowait(_LOOP_WAKE)
                    self._loop_wake = True
                except queue.Full:  # the thread has items to take: it recomputes its wait
                    pass
        finally:
            self._disk_lock.release()
        # Reported at once, as the disk thread's jobs are when they come
        # back: the acknowledgements and deliveries leave in this turn of
        # the loop, not the next. (_submit is the last thing _kick does.)
        self._done(job)
        return True

    def _may_write_here(self, job: _Job) -> bool:
        """Nothing in ``job`` can wait for the disk (under ``_disk_lock``)."""
        if self._fsync == "always" or self._offsets_retry \
                or (job.offsets and self._offsets.would_compact(len(job.offsets))):
            return False
        for topic, _parts, count in job.appends:
            if not count:
                continue
            seg = topic.active
            if not topic.materialized or topic.config.fsync == "always" or seg.uncut \
                    or seg.fd < 0:  # opening (and evicting) files is the disk thread's
                return False
            # job.nbytes is at least what the whole job writes (append).
            if seg.size + job.nbytes > topic.config.segment_bytes:
                return False
        return True

    def _done(self, job: _Job) -> None:
        self._in_flight -= 1
        self._pending_bytes -= job.nbytes
        self._flight_bytes -= job.nbytes
        stored = {}
        tail = self._tail
        for topic, _parts, count in job.appends:
            topic.unwritten -= count
        for topic, result in job.results:
            stored[topic] = result.end_offset - result.count  # its first offset
            topic.next_offset = result.end_offset + topic.unwritten  # (the same, but for a drift)
            topic.written(result)
            if tail is not None and result.buf is not None:
                first = result.end_offset - result.count
                if type(result.buf) is list:  # the parts as written (_records)
                    for part, n in result.buf:
                        tail.add(topic, first, first + n, part)
                        first += n
                else:
                    tail.add(topic, first, result.end_offset, result.buf)
            result.buf = None
        errors = job.errors
        if len(stored) + len(errors) < len(job.appends):
            # The disk thread failed before reaching some topics: not stored.
            seen = set(stored).union(t for t, _c, _e in errors)
            errors = errors + [(t, n, RuntimeError("disk thread error; not stored"))
                               for t, _p, n in job.appends if n and t not in seen]
        failed = {}
        for topic, count, exc in errors:
            failed[topic] = exc
            self.stats["write_errors"] += 1
            end = job.ends.get(topic)
            if end is None:  # not expected: _write and _abandon record every topic
                topic.next_offset -= count
            else:
                # Those offsets were never assigned: the next publish gets
                # the topic's end on disk plus what is still on its way
                # there (from the disk's end, should a failed cut-back
                # have left it ahead of the loop's count).
                topic.next_offset = end + topic.unwritten
            log.error("append to topic %s failed, %d messages not stored: %s",
                      topic.name, count, exc)
        for cb, topic, rel, count in job.acks:
            exc = failed.get(topic)
            base = stored.get(topic)
            if exc is None and base is None:  # an empty batch to a topic with no other
                base = topic.next_offset
            try:
                cb(None if exc else base + rel, count, exc)
            except Exception:
                log.exception("on_stored callback failed")
        # Then the subscribers: their pumps run now (Broker._on_written), a
        # send each; the acknowledgements went first, so a producer's next
        # batch is on its way while a topic's many consumers are served.
        for topic in stored:
            try:
                self._on_written(topic)
            except Exception:  # as a pump in its own loop callback would be: logged, no more
                log.exception("delivery of topic %s failed", topic.name)
        for fut, result, exc in job.call_results:
            if fut.done():
                continue
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)
        for _fn, _args, fut in job.calls:
            if not fut.done():  # the disk thread failed before reaching it
                fut.set_exception(RuntimeError("disk thread error; see the log"))
        if self._paused and self._pending_bytes <= self._low:
            paused, self._paused = self._paused, set()
            for transport in paused:
                if not transport.is_closing():
                    transport.resume_reading()
        # What arrived while the job was in flight (or flush() waiting for
        # it) goes next; when nothing did, as after most jobs at low rates,
        # no turn of the loop is spent finding that out.
        if self._work_waiting():
            self._kick_soon()

    def _retention_tick(self, remaining: list | None = None) -> None:
        """Timer: check topics a slice at a time so the loop never stalls."""
        self._retention_handle = None
        if remaining is None:
            remaining = list(self._store.topics.values())
            self.stats["retention_runs"] += 1
        self._retention_pass(remaining[:_RETENTION_SLICE])
        rest = remaining[_RETENTION_SLICE:]
        if rest:
            self._retention_handle = self._loop.call_soon(self._retention_tick, rest)
        else:
            self._retention_handle = self._loop.call_later(self._retention_every,
                                                           self._retention_tick)

    def _retention_pass(self, topics: list) -> int:
        now_ms = int(self._clock() * 1000)
        dropped = 0
        for topic in topics:
            try:
                n = topic.expired_segments(now_ms)
            except (OSError, records.CorruptRecordError) as exc:
                log.error("retention check of topic %s failed: %s", topic.name, exc)
                continue
            if n:
                segs = topic.drop_oldest(n)
                if segs:
                    log.info("retention: topic %s drops %d segments, now starts at offset %d",
                             topic.name, len(segs), topic.start_offset)
                    self._deletes.append((topic.directory, segs))
                    dropped += len(segs)
        if dropped:
            self._kick()
        return dropped

    # -- disk thread -------------------------------------------------------

    def _run(self) -> None:
        q = self._queue
        lock = self._disk_lock
        while True:
            with lock:
                due = self._thread_due = self._next_deadline()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            try:
                job = q.get(timeout=timeout)
            except queue.Empty:
                job = _TIMEOUT  # an fsync or checkpoint deadline passed
            with lock:
                if self._work(job):
                    return

    def _work(self, job) -> bool:
        """Disk thread, under ``_disk_lock``: one item from the queue; True at _STOP."""
        if job is _WAKE or job is _LOOP_WAKE or job is _TIMEOUT:
            if job is _LOOP_WAKE:
                self._loop_wake = False
            elif job is _WAKE:
                self._wake_queued = False
            try:
                self._timed_work()  # a deadline passed, or the syncer's results are in
            except BaseException:  # a bug must not kill the disk thread
                log.exception("disk thread: unexpected error")
            return False
        if job is _STOP:
            if self._clean_stop:
                self._stop_work()
            else:
                self._stop_syncer()
            return True
        try:
            self._write(job)
        except BaseException:  # never leave the loop waiting forever
            log.exception("disk thread: unexpected error")
            self._abandon(job)
        self._loop.call_soon_threadsafe(self._done, job)
        # A due interval fsync or checkpoint runs after the job is
        # reported: under fsync=interval it doesn't gate delivery, so it
        # mustn't add its latency to the batch that happened to be last.
        try:
            self._timed_work()
        except BaseException:
            log.exception("disk thread: unexpected error")
        return False

    def _abandon(self, job: _Job) -> None:
        """A job broke off: take back appends not yet fsynced under fsync=always.

        They will be reported as not stored (``_done``), so they must not
        stay in the file for a later batch to make readable.
        """
        for topic, result, count in job.unsynced:
            if result is None:
                continue  # the offsets journal
            try:
                topic.undo(result)
            except BaseException:
                log.exception("could not take back a batch of topic %s", topic.name)
            job.errors.append((topic, count, RuntimeError("disk thread error; not stored")))
            job.ends[topic] = topic.active.end_offset
        job.unsynced.clear()
        for topic, _parts, count in job.appends:  # and the ones it never reached
            if count and topic not in job.ends:
                job.ends[topic] = topic.active.end_offset

    def _next_deadline(self) -> float | None:
        # A writeback, a seal or a directory fsync is due at once.
        due = 0.0 if self._writeback or self._seals or self._dirsyncs else self._sync_due
        if self._changed and self._store is not None:
            due = min(due, self._last_checkpoint + self._checkpoint_every)
        if self._sync_busy:
            # Nothing timed can start before the syncer's round is over:
            # look again shortly rather than spin on a deadline passed.
            due = max(due, self._busy_retry)
        return None if due == float("inf") else due

    def _timed_work(self) -> None:
        self._apply_synced()
        now = time.monotonic()
        ckpt = (self._changed and self._store is not None
                and now >= self._last_checkpoint + self._checkpoint_every)
        if now < self._sync_due and not ckpt and not (
                self._writeback or self._seals or self._dirsyncs):
            return
        if self._sync_busy:
            # The previous round's fsyncs are still running (a slow disk):
            # look again shortly; what is dirty stays dirty.
            self._busy_retry = now + _SYNC_RETRY
            return
        # Seals first: an fsync of a topic's next segment in this round
        # counts only once the seal before it is done (note_durable).
        items = [(_SEAL, seg, topic) for topic, seg in self._seals.items()
                 if topic.unsealed is seg]
        self._seals = {}
        items.extend([(_DIRSYNC, directory, None) for directory in self._dirsyncs])
        self._dirsyncs = {}
        for seg in self._writeback:
            try:
                wb = seg.take_writeback()
            except OSError as exc:  # EMFILE...: the next write asks again
                log.warning("could not start a writeback of %s: %s", seg.log_path, exc)
                continue
            if wb is not None:
                fd, offset, nbytes = wb
                items.append((_WRITEBACK, fd, (offset, nbytes)))
        self._writeback = {}
        if now >= self._sync_due:
            dirty, self._dirty = self._dirty, {}
            self._sync_due = float("inf")
            for item in dirty:
                try:
                    if isinstance(item, TopicLog):
                        items.append((item, item.active.dup_fd(), item.active_entry()))
                    else:
                        fd = item.dup_fd()
                        if fd >= 0:
                            items.append((item, fd, None))
                except OSError as exc:  # EMFILE...: sync it here instead
                    log.warning("background fsync unavailable (%s); syncing now", exc)
                    self._dirty[item] = now
                    self._sync()
        checkpoint = None
        if ckpt:
            # What the fsyncs so far have covered (durable entries), not
            # what this round will: recovery scans the rest.
            checkpoint = (self._store.data_dir, self._store.checkpoint_entries(),
                          int(self._clock() * 1000))
            self._store.note_checkpoint(clean=False)
            self._changed = False
            self._last_checkpoint = now
        if items or checkpoint:
            self._sync_busy = True
            self._sync_queue.put((items, checkpoint))

    def _write(self, job: _Job) -> None:
        stats = self.stats
        # fsync=always topics: fsynced before the job is reported. Kept on
        # the job until each is reported, so that if something unexpected
        # breaks the job off, _abandon can take them back (see _run).
        synced_now = job.unsynced
        for topic, parts, count in job.appends:
            if not count:
                continue
            # The topic's end as the disk thread knows it: what an earlier
            # job wrote (a failed one wrote nothing, so no gap can open).
            base = topic.active.end_offset
            try:
                out, nbytes, last_len, ts = _records(parts, base)
                result = topic.append(out, count, ts, last_len)
            except Exception as exc:  # OSError above all; anything else is refused too
                if not isinstance(exc, OSError):
                    log.exception("append to topic %s failed", topic.name)
                job.errors.append((topic, count, exc))
                job.ends[topic] = topic.active.end_offset
                continue
            if topic.active.writeback_due():
                self._writeback[topic.active] = None  # the syncer starts it (_timed_work)
            if result.rolled and topic.unsealed is not None:
                self._seals[topic] = topic.unsealed  # the syncer fsyncs it (_timed_work)
            policy = topic.config.fsync
            if policy == "always":
                synced_now.append((topic, result, count))
            else:
                job.results.append((topic, result))  # written: reported whatever follows
            self._changed = True
            stats["batches"] += 1
            stats["messages"] += count
            stats["bytes"] += nbytes
            if policy == "always":
                continue
            if policy == "interval":
                self._mark_dirty(topic, topic.config.fsync_interval_ms / 1000.0)
            else:
                self._lazy.add(topic)
        offsets = job.offsets
        if self._offsets_retry:  # a failed write (ENOSPC...) goes again with this job
            offsets = {**self._offsets_retry, **offsets}
        if offsets:
            try:
                self._offsets.write(offsets)
                self._offsets_retry = {}
                if self._fsync == "always":
                    synced_now.append((self._offsets, None, 0))
                elif self._fsync == "interval":
                    self._mark_dirty(self._offsets, self._interval)
            except OSError as exc:
                self._offsets_retry = offsets
                log.error("could not persist consumer offsets (retried with the next "
                          "write): %s", exc)
        while synced_now:  # group commit: one fsync per topic per job
            topic, result, count = synced_now[0]
            try:
                started = time.perf_counter()
                if result is None:
                    topic.fsync()  # the offsets journal
                else:
                    topic.active.fsync()
                    topic.note_synced()
                self.fsync_histogram.observe(time.perf_counter() - started)
                stats["fsyncs"] += 1
            except OSError as exc:
                stats["fsync_errors"] += 1
                if result is None:
                    log.error("fsync of the offsets journal failed: %s", exc)
                    continue
                # The data's fate on disk is unknown: refuse the batch and cut it off.
                log.error("fsync of topic %s failed: %s", topic.name, exc)
                topic.undo(result)
                job.errors.append((topic, count, exc))
                job.ends[topic] = topic.active.end_offset
                del synced_now[0]
                continue
            if result is not None:
                job.results.append((topic, result))
            del synced_now[0]
        for directory, segments in job.deletes:
            self._delete(directory, segments)
        for fn, args, fut in job.calls:
            try:
                job.call_results.append((fut, fn(*args), None))
            except Exception as exc:
                job.call_results.append((fut, None, exc))
        if job.checkpoint:
            self._sync(everything=True)
            self._write_checkpoint(clean=False)

    # -- syncer thread --------------------------------------------------------

    def _run_syncer(self) -> None:
        q = self._sync_queue
        while True:
            work = q.get()
            if work is _STOP:
                return
            items, checkpoint = work
            done = []
            ckpt_error = None
            try:
                for item, fd, entry in items:
                    if item is _WRITEBACK:
                        try:
                            start_writeback(fd, *entry)  # (offset, nbytes); ignores errors
                        finally:
                            os.close(fd)
                        continue
                    if item is _DIRSYNC:  # fd is the directory's path
                        _fsync_deletions(fd)
                        continue
                    started = time.perf_counter()
                    if item is _SEAL:  # fd is the Segment, entry its TopicLog
                        try:
                            entry.sync_seal(fd)
                            done.append((fd, entry, time.perf_counter() - started, None))
                        except OSError as exc:
                            done.append((fd, entry, 0.0, exc))
                        continue
                    try:
                        os.fsync(fd)
                        done.append((item, entry, time.perf_counter() - started, None))
                    except OSError as exc:
                        done.append((item, None, 0.0, exc))
                    finally:
                        os.close(fd)
                if checkpoint is not None:
                    try:
                        checkpoint_file.write(checkpoint[0], checkpoint[1], False, checkpoint[2])
                    except OSError as exc:
                        ckpt_error = exc
            except BaseException as exc:  # a bug must neither kill the thread nor hang the writer
                log.exception("syncer: unexpected error")
                ckpt_error = ckpt_error or exc
            finally:
                # Always answered: the disk thread waits for this round
                # before a synchronous sync or checkpoint.
                self._sync_results.append((done, checkpoint is not None, ckpt_error))
                q.task_done()
                self._wake_for_results()

    def _wake_for_results(self) -> None:
        """Syncer: wake the disk thread, idle or not, to take a round's results in.

        At most one such wake-up waits in the queue (the disk thread clears
        ``_wake_queued`` when it takes it, then takes every result in): the
        disk thread may take results in after a job and start the next
        round before it reaches the previous wake-up, and uncoalesced
        wake-ups would fill the queue that jobs are put in without waiting.
        """
        if not self._wake_queued:
            self._wake_queued = True
            try:
                self._queue.put_nowait(_WAKE)
            except queue.Full:  # cannot happen (see __init__); the thread is busy anyway
                self._wake_queued = False

    def _apply_synced(self) -> None:
        """Disk thread: take in what the syncer finished."""
        results = self._sync_results
        while results:
            done, checkpointed, ckpt_error = results.popleft()
            self._sync_busy = False
            for item, entry, seconds, exc in done:
                if exc is not None:
                    # Already acknowledged: all we can do is say so loudly.
                    # (A seal that failed stays waiting: the topic's next
                    # roll, or the shutdown, fsyncs it again.)
                    self.stats["fsync_errors"] += 1
                    log.error("fsync failed: %s", exc)
                    continue
                self.fsync_histogram.observe(seconds)
                self.stats["fsyncs"] += 1
                if isinstance(entry, TopicLog):  # a seal: (sealed Segment, its TopicLog)
                    entry.note_sealed(item)
                elif entry is not None:
                    item.note_durable(entry)
            if checkpointed:
                if ckpt_error is None:
                    self.stats["checkpoints"] += 1
                else:
                    self.stats["checkpoint_errors"] += 1
                    self._changed = True  # try again at the next interval
                    log.error("could not write the recovery checkpoint: %s", ckpt_error)

    def _syncer_idle(self) -> None:
        """Disk thread: wait for the syncer's round in progress, if any."""
        if self._sync_busy:
            self._sync_queue.join()
            self._apply_synced()

    def _mark_dirty(self, item, interval: float) -> None:
        if item not in self._dirty:
            due = time.monotonic() + interval
            self._dirty[item] = due
            if due < self._sync_due:
                self._sync_due = due

    def _sync(self, everything: bool = False) -> None:
        """fsync what waits for it (``everything``: fsync=never topics too), here and now."""
        if everything:
            self._syncer_idle()
            self._finish_seals()
        dirty, self._dirty = self._dirty, {}
        self._sync_due = float("inf")
        items = list(dirty)
        if everything:
            items.extend(self._lazy)
            self._lazy = set()
        for item in items:
            try:
                started = time.perf_counter()
                if isinstance(item, TopicLog):
                    item.active.fsync()
                    item.note_synced()
                else:
                    item.fsync()
                self.fsync_histogram.observe(time.perf_counter() - started)
                self.stats["fsyncs"] += 1
            except OSError as exc:
                # Already acknowledged: all we can do is say so loudly.
                self.stats["fsync_errors"] += 1
                log.error("fsync failed: %s", exc)

    def _finish_seals(self) -> None:
        """fsync every sealed segment, and directory, still waiting for it, here and now."""
        if self._store is not None:
            topics = self._store.topic_list()  # (a loop may add one meanwhile)
        else:
            topics = list(self._seals)
        for topic in topics:
            if topic.unsealed is None:
                continue
            try:
                started = time.perf_counter()
                topic.finish_seal()
                self.fsync_histogram.observe(time.perf_counter() - started)
                self.stats["fsyncs"] += 1
            except OSError as exc:
                self.stats["fsync_errors"] += 1
                log.error("fsync of a sealed segment of topic %s failed: %s", topic.name, exc)
        self._seals = {}
        dirs, self._dirsyncs = list(self._dirsyncs), {}
        for directory in dirs:
            _fsync_deletions(directory)

    def _write_checkpoint(self, clean: bool) -> None:
        store = self._store
        if store is None:
            return
        self._syncer_idle()  # its checkpoint, if it has one going, is older
        try:
            store.write_checkpoint(clean=clean)
            self.stats["checkpoints"] += 1
        except OSError as exc:
            self.stats["checkpoint_errors"] += 1
            log.error("could not write the recovery checkpoint: %s", exc)
        self._changed = False
        self._last_checkpoint = time.monotonic()

    def _delete(self, directory: str, segments: list) -> None:
        deleted = 0
        for seg in segments:
            try:
                seg.delete_files()
            except OSError as exc:
                log.error("could not delete %s: %s", seg.log_path, exc)
                continue
            deleted += 1
            self.stats["segments_deleted"] += 1
            self.stats["bytes_deleted"] += seg.size
        if deleted:
            # Made durable by the syncer: on ext4 a directory fsync commits
            # the journal, which waits for every file's data written since
            # (100 ms and more under load), and no write need wait for it.
            self._dirsyncs[directory] = None

    def _stop_syncer(self) -> None:
        if self._syncer.is_alive():
            self._sync_queue.put(_STOP)
            self._syncer.join()
        self._apply_synced()

    def _stop_work(self) -> None:
        """Clean shutdown: fsync everything, then the clean checkpoint."""
        self._stop_syncer()
        if self._store is not None:
            for topic in list(self._store.topics.values()):
                try:
                    topic.active.cut_tail()
                except OSError as exc:  # recovery may find the refused batch: say so
                    log.error("could not cut refused records off %s: %s",
                              topic.active.log_path, exc)
        if self._offsets_retry:
            try:
                self._offsets.write(self._offsets_retry)
            except OSError as exc:
                log.error("consumer offsets not persisted at shutdown: %s", exc)
        self._sync(everything=True)
        try:
            self._offsets.fsync()
        except OSError as exc:
            self.stats["fsync_errors"] += 1
            log.error("fsync of the offsets journal failed: %s", exc)
        if self._store is not None:
            self._write_checkpoint(clean=True)


def _noop() -> None:
    return None


def _fsync_deletions(directory: str) -> None:
    """Make retention's deletions in ``directory`` durable (syncer, or at a stop)."""
    try:
        fsync_dir(directory)
    except OSError as exc:  # the deletions may come back after a crash
        log.error("could not fsync %s: %s", directory, exc)


def _stored_size(messages, count: int) -> int:
    """Bytes a batch takes as log records: finished ones, or a list of messages."""
    if type(messages) is bytearray:
        return len(messages)
    return sum(map(len, messages)) + count * _RECORD_OVERHEAD


def _records(parts: list, base: int):
    """Disk thread: one topic's parts of a job as log records, ``(out, nbytes, last_len, ts)``.

    A part is a list of messages (v0 publishes, and v1 ones that were
    parsed first), encoded here, or finished records from
    ``wire1.publish_records``, written as they are when they start at
    ``base`` onwards as expected. They start elsewhere only when a batch
    queued before them failed (``_done`` then sets the loop's offsets from
    the disk's end): they are re-encoded at their place, so no gap opens.

    ``out`` is the records as ``[(records, count)]`` in offset order, for
    one ``pwritev`` (``TopicLog.append``) and then the tail cache: a part
    of ``_OWN_PART_BYTES`` or more stays as it is (joining would copy each
    of its bytes once more), and each run of smaller parts between them is
    joined into one (a cheap copy, and few pieces for the write and the
    tail cache). ``nbytes`` is their size in all; ``ts`` is the last
    part's time, the newest.
    """
    out = []
    run = []
    run_count = 0
    nbytes = 0
    off = base
    for part, count, ts, last_len in parts:
        if type(part) is not bytearray:
            last_len = _RECORD_OVERHEAD + len(part[-1])
            part = records.encode_records(part, off, ts)
        elif _U64.unpack_from(part, 8)[0] != off:
            part, last_len = _reoffset(part, count, off, ts)
        off += count
        nbytes += len(part)
        if len(part) < _OWN_PART_BYTES:
            run.append(part)
            run_count += count
            continue
        if run:
            out.append((run[0] if len(run) == 1 else b"".join(run), run_count))
            run = []
            run_count = 0
        out.append((part, count))
    if run:
        out.append((run[0] if len(run) == 1 else b"".join(run), run_count))
    return out, nbytes, last_len, ts


def _reoffset(buf: bytearray, count: int, base: int, ts: int):
    """``count`` records re-encoded from offset ``base``: ``(records, last_len)``."""
    first = _U64.unpack_from(buf, 8)[0]
    decoded, _end = records.decode_records(buf, first, first + count)
    if len(decoded) != count:
        raise RuntimeError("records batch holds %d records, not %d" % (len(decoded), count))
    log.warning("records made with offsets from %d are stored from %d: a batch before "
                "them failed", first, base)
    return records.encode_records([m for _o, _t, m in decoded], base, ts), \
        _RECORD_OVERHEAD + len(decoded[-1][2])
