"""Bounded sets of open segment files, least recently used closed first.

The broker keeps two, each used by one thread only, so neither needs a lock
and no file descriptor is ever closed under a thread still using it:

- the **read cache** (event loop): one read-only descriptor per segment
  being read, plus that segment's in-memory sparse index, which is dropped
  with the descriptor so index memory is bounded too;
- the **write cache** (disk thread): the log and index descriptors of
  active segments being appended to.

A segment not in a cache holds no descriptor at all: a topic with 10,000
segments, or 10,000 topics, costs at most ``capacity`` descriptors per
cache. Opening is lazy: nothing is opened before it is read or written.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

__all__ = ["FileCache"]


class FileCache:
    """An LRU of segments holding open files for one thread."""

    __slots__ = ("capacity", "_lru", "_release", "stats", "_opens_key", "_evictions_key")

    def __init__(self, capacity: int, release: Callable[[object], None], stats: dict,
                 name: str) -> None:
        if capacity < 1:
            raise ValueError("a file cache needs room for at least one segment")
        self.capacity = capacity            # most segments holding files at once
        self._lru: OrderedDict = OrderedDict()  # segment -> None, least recently used first
        self._release = release             # closes what a segment holds for this cache
        self.stats = stats                  # shared counters (LogStore.stats)
        self._opens_key = name + "_opens"
        self._evictions_key = name + "_evictions"
        stats.setdefault(self._opens_key, 0)
        stats.setdefault(self._evictions_key, 0)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, seg) -> bool:
        return seg in self._lru

    def touch(self, seg) -> None:
        """``seg`` (already open) was just used."""
        self._lru.move_to_end(seg)

    def add(self, seg) -> None:
        """``seg`` just opened its files: track it, closing the oldest if over."""
        lru = self._lru
        lru[seg] = None
        self.stats[self._opens_key] += 1
        while len(lru) > self.capacity:
            old, _ = lru.popitem(last=False)
            self.stats[self._evictions_key] += 1
            self._release(old)

    def discard(self, seg) -> None:
        """``seg`` closed its files itself (sealed, deleted, shut down)."""
        self._lru.pop(seg, None)

    def clear(self) -> None:
        while self._lru:
            seg, _ = self._lru.popitem(last=False)
            self._release(seg)
