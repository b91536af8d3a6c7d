"""The disk thread, and the loop-side batching that feeds it.

Publishes are not written one by one. The event loop collects them per
topic (:meth:`DiskWriter.append`); whenever the disk thread is idle, every
topic's pending messages and every changed consumer offset go to it as one
job. While it writes that job, the next one accumulates: this is group
commit, and the busier the broker the larger the batches.

The disk thread encodes each topic's batch into records (one Cython call),
writes it with one ``pwrite`` and applies the fsync policy; the GIL is
released during write and fsync. Then the loop makes the data visible
(``TopicLog.written``) and wakes the consumers. Nothing is readable, and so
nothing is delivered, before it is in the file.

Bounds: one job in flight, one queued at most (the queue has ``maxsize=1``
and the loop only submits when none is in flight). Published bytes waiting
for the disk are counted; above ``append_high_water`` the producers that
keep publishing are paused (``pause_reading``) until the backlog falls
below ``append_low_water``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Callable

from ..codec import records
from .log import TopicLog
from .offsets import OffsetStore

__all__ = ["DiskWriter"]

log = logging.getLogger(__name__)

_STOP = object()


class _Job:
    """One unit of work for the disk thread, and its results."""

    __slots__ = ("appends", "acks", "offsets", "results", "errors", "sync")

    def __init__(self, appends, acks, offsets, sync: bool) -> None:
        self.appends = appends  # [(TopicLog, messages, base_offset)]
        self.acks = acks        # [(callback, TopicLog, base_offset, count)] to call when done
        self.offsets = offsets  # {(client_id, topic): offset} to persist
        self.sync = sync        # fsync everything written before reporting
        self.results = []       # [(TopicLog, TopicLog.append() result)]
        self.errors = []        # [(TopicLog, count, OSError)] appends that failed


class DiskWriter:
    """Batches appends and offset updates onto one disk thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, offsets: OffsetStore, *,
                 fsync: str, fsync_interval_ms: int, high_water: int, low_water: int,
                 on_written: Callable[[TopicLog], None]) -> None:
        self._loop = loop
        self._offsets = offsets
        self._fsync = fsync                          # always | interval | never
        self._interval = fsync_interval_ms / 1000.0
        self._high = high_water
        self._low = low_water
        self._on_written = on_written                # loop callback per topic written
        self._pending: dict[TopicLog, list] = {}     # topic -> message lists not yet submitted
        self._pending_bytes = 0                      # bytes in _pending and the job in flight
        self._job_bytes = 0                          # of which in the job in flight
        self._in_flight = False                      # a job is with the disk thread
        self._paused: set = set()                    # transports paused for backpressure
        self._idle_waiters: list[asyncio.Future] = []  # flush() callers
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._dirty_segments: set = set()            # written since last fsync (disk thread)
        self._last_sync = time.monotonic()           # (disk thread)
        self._thread = threading.Thread(target=self._run, name="pylogstreams-disk", daemon=True)
        self.stats = {"batches": 0, "messages": 0, "bytes": 0, "fsyncs": 0, "write_errors": 0}

    def start(self) -> None:
        self._thread.start()

    # -- event loop --------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def append(self, topic: TopicLog, messages: list, nbytes: int, transport=None,
               on_stored: Callable | None = None) -> None:
        """Queue ``messages`` (a list of bytes) for ``topic``.

        ``nbytes`` is their size as the caller measured it (per batch, not
        per message). If the backlog is over the high-water mark and a
        transport is given, that transport stops reading until it drains.
        ``on_stored(base_offset, count, error)`` is called in the loop once
        the batch is written (and fsynced, under ``fsync="always"``), with
        the offset of its first message, or with ``base_offset=None`` and
        the OSError if it could not be stored.
        """
        entry = (messages, on_stored)
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
        self._kick()

    def offsets_changed(self) -> None:
        self._kick()

    def forget(self, transport) -> None:
        """A paused connection went away: nothing to resume."""
        self._paused.discard(transport)

    async def flush(self) -> None:
        """Wait until everything appended so far is written."""
        while self._in_flight or self._pending or self._offsets.dirty:
            fut = self._loop.create_future()
            self._idle_waiters.append(fut)
            self._kick()
            await fut

    async def close(self) -> None:
        """Write everything, fsync, and stop the thread."""
        await self.flush()
        self._queue.put(_STOP)
        await self._loop.run_in_executor(None, self._thread.join)

    def _kick(self) -> None:
        if self._in_flight or not self._thread.is_alive():
            return
        if not self._pending and not self._offsets.dirty:
            return
        appends = []
        acks = []
        for topic, entries in self._pending.items():
            base = topic.end_offset
            if len(entries) == 1:
                msgs = entries[0][0]
            else:
                msgs = []
                for lst, _ in entries:
                    msgs.extend(lst)
            start = base
            for lst, cb in entries:
                if cb is not None:
                    acks.append((cb, topic, start, len(lst)))
                start += len(lst)
            appends.append((topic, msgs, base))
        self._pending = {}
        self._job_bytes = self._pending_bytes
        job = _Job(appends, acks, self._offsets.take_dirty(), self._fsync == "always")
        self._in_flight = True
        self._queue.put_nowait(job)

    def _done(self, job: _Job) -> None:
        self._in_flight = False
        self._pending_bytes -= self._job_bytes
        self._job_bytes = 0
        for topic, result in job.results:
            topic.written(*result)
            self._on_written(topic)
        failed = {}
        for topic, count, exc in job.errors:
            failed[topic] = exc
            self.stats["write_errors"] += 1
            topic.next_offset -= count  # those offsets were never assigned
            log.error("append to topic %s failed, %d messages not stored: %s",
                      topic.name, count, exc)
        for cb, topic, base, count in job.acks:
            exc = failed.get(topic)
            try:
                cb(None if exc else base, count, exc)
            except Exception:
                log.exception("on_stored callback failed")
        if self._paused and self._pending_bytes <= self._low:
            paused, self._paused = self._paused, set()
            for transport in paused:
                if not transport.is_closing():
                    transport.resume_reading()
        self._kick()
        if not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    # -- disk thread -------------------------------------------------------

    def _run(self) -> None:
        q = self._queue
        while True:
            timeout = None
            if self._dirty_segments and self._fsync == "interval":
                timeout = max(0.0, self._last_sync + self._interval - time.monotonic())
            try:
                job = q.get(timeout=timeout)
            except queue.Empty:
                self._sync()  # the interval elapsed with unsynced data
                continue
            if job is _STOP:
                self._sync()
                return
            try:
                self._write(job)
            except BaseException:  # never leave the loop waiting forever
                log.exception("disk thread: unexpected error")
            self._loop.call_soon_threadsafe(self._done, job)

    def _write(self, job: _Job) -> None:
        now_ms = int(time.time() * 1000)
        stats = self.stats
        for topic, msgs, base in job.appends:
            try:
                buf = records.encode_records(msgs, base, now_ms)
                job.results.append((topic, topic.append(buf, len(msgs))))
            except OSError as exc:
                job.errors.append((topic, len(msgs), exc))
                continue
            self._dirty_segments.add(topic)
            stats["batches"] += 1
            stats["messages"] += len(msgs)
            stats["bytes"] += len(buf)
        if job.offsets:
            try:
                self._offsets.write(job.offsets)
                self._dirty_segments.add(self._offsets)
            except OSError:
                log.exception("could not persist consumer offsets")
        if job.sync or (self._fsync == "interval"
                        and time.monotonic() - self._last_sync >= self._interval):
            self._sync()

    def _sync(self) -> None:
        dirty, self._dirty_segments = self._dirty_segments, set()
        for item in dirty:
            try:
                if isinstance(item, TopicLog):
                    item.active.fsync()
                else:
                    item.fsync()
            except OSError:
                log.exception("fsync failed")
        self._last_sync = time.monotonic()
        if dirty:
            self.stats["fsyncs"] += 1
