"""Sparse offset index of one segment.

The ``.index`` file next to a segment holds 8-byte entries
``[u32 offset - segment base][u32 byte position]``, big-endian, one per
``index_interval_bytes`` of log, in increasing order. Looking up offset N
is a binary search for the last entry at or before N, then a forward read
of at most one interval. The file is a cache: it is rebuilt from the log
whenever it is missing or does not match.
"""

from __future__ import annotations

import bisect
import sys
from array import array

__all__ = ["ENTRY_SIZE", "SparseIndex"]

ENTRY_SIZE = 8


class SparseIndex:
    """In-memory copy of a segment's index: two parallel arrays."""

    __slots__ = ("rel_offsets", "positions")

    def __init__(self) -> None:
        self.rel_offsets = array("I")  # entry offsets, relative to the segment base
        self.positions = array("I")    # byte position of that record in the segment

    def __len__(self) -> int:
        return len(self.rel_offsets)

    def extend(self, entries: bytes) -> None:
        """Add packed big-endian entries (as written to the .index file)."""
        if not entries:
            return
        if len(entries) % ENTRY_SIZE:
            raise ValueError("index entries must be a multiple of %d bytes" % ENTRY_SIZE)
        pairs = array("I")
        pairs.frombytes(entries)
        if sys.byteorder == "little":
            pairs.byteswap()
        self.rel_offsets.extend(pairs[0::2])
        self.positions.extend(pairs[1::2])

    def lookup(self, rel_offset: int) -> int:
        """Byte position of the last indexed record at or before ``rel_offset``."""
        i = bisect.bisect_right(self.rel_offsets, rel_offset) - 1
        return self.positions[i] if i >= 0 else 0

    def truncate(self, size: int) -> None:
        """Drop entries pointing at or beyond byte ``size`` of the segment."""
        i = bisect.bisect_left(self.positions, size)
        del self.rel_offsets[i:]
        del self.positions[i:]

    @classmethod
    def from_bytes(cls, data: bytes) -> "SparseIndex":
        index = cls()
        usable = len(data) - len(data) % ENTRY_SIZE
        index.extend(data[:usable])
        return index
