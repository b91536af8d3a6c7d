"""The tail cache: the newest record batches of every topic, kept in memory.

A consumer that keeps up reads what was just written. Every batch the disk
thread writes was encoded in this process, with its CRCs computed from the
published bytes, so a subscriber that is caught up is
served from these bytes: no ``pread`` and no second CRC pass, since no disk
has touched them. Anything older, or anything read after a restart, comes
from the segment files and is checked record by record as before.

A v1 subscriber gets the records as they are (``TopicLog.read`` with a
``forward`` function): the whole batch, or the part that fits its chunk,
found by bisecting the batch's record positions, which :meth:`TailCache.starts`
computes on the first such read and keeps with the batch.

Bounds: one budget for the whole broker (``Config.tail_cache_bytes``,
0 turns the cache off), counting each batch's bytes, a fixed overhead and
its positions once computed. Batches leave in the order they came, oldest
first, whatever their topic; a batch larger than the budget is not kept.
Only the event loop touches it (``DiskWriter._done`` adds, ``TopicLog.read``
reads).
"""

from __future__ import annotations

import collections
from array import array

from .recordwalk import record_starts

__all__ = ["TailCache"]

# What one kept batch costs besides its bytes (the bytearray and tuple
# objects, the deque slots), counted against the budget so that many tiny
# batches cannot hold much more memory than it says.
ENTRY_OVERHEAD = 200

# How many of a topic's newest batches a read looks through. A caught-up
# subscriber is in the newest write's batches: one, or a few when the disk
# thread wrote parts of 64 KiB or more apart rather than joined (see
# ``_records`` in broker/storage/writer.py); one further behind reads the
# files, in larger chunks than single batches would give it.
LOOKBACK = 16

# An entry of TopicLog.tail: [first offset, end offset, records, starts],
# starts being None until a read needs the records' positions.
FIRST, END, BUF, STARTS = range(4)


def _size(entry) -> int:
    starts = entry[STARTS]
    return len(entry[BUF]) + ENTRY_OVERHEAD + (0 if starts is None else len(starts) * 4)


class TailCache:
    """Recent batches per topic (``TopicLog.tail``), under one byte budget."""

    __slots__ = ("max_bytes", "bytes", "_order")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes              # budget for all topics; 0: off
        self.bytes = 0                          # bytes held now (with ENTRY_OVERHEAD each)
        self._order: collections.deque = collections.deque()  # (TopicLog, entry), oldest first

    def add(self, topic, first_offset: int, end_offset: int, buf) -> None:
        """Keep ``buf`` (records ``first_offset`` .. ``end_offset - 1`` of ``topic``)."""
        if not buf:
            return
        entry = [first_offset, end_offset, buf, None]
        n = _size(entry)
        if n > self.max_bytes:
            return
        topic.tail.append(entry)
        self._order.append((topic, entry))
        self.bytes += n
        self._evict()

    def starts(self, entry) -> array:
        """Where each record of a kept batch starts (``array('I')``), computed once.

        For a read that starts inside the batch or takes only part of it:
        one walk over the record headers (in C with the compiled codec),
        then a bisection per read. Counted against the budget.
        """
        starts = entry[STARTS]
        if starts is None:
            starts = entry[STARTS] = record_starts(entry[BUF])
            self.bytes += len(starts) * 4
            self._evict()
        return starts

    def _evict(self) -> None:
        order = self._order
        while self.bytes > self.max_bytes:
            old, entry = order.popleft()
            old.tail.popleft()  # a topic's oldest batch is the oldest of it in _order
            self.bytes -= _size(entry)

    def clear(self) -> None:
        for topic, _entry in self._order:
            topic.tail.clear()
        self._order.clear()
        self.bytes = 0
