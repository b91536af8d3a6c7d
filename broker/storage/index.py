"""Sparse offset index of one segment.

The ``.index`` file next to a segment holds 8-byte entries
``[u32 offset - segment base][u32 byte position]``, big-endian, one per
``index_interval_bytes`` of log, in increasing order. The record at byte 0
always has an entry, and after an entry at position ``p`` the next one is
for the first record starting at or after ``p + interval``. Looking up
offset N is a binary search for the last entry at or before N, then a
forward read of at most about one interval. The file is a cache: it is
rebuilt from the log whenever it is missing or does not match.
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

    def extend(self, entries) -> None:
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

    def last_position(self) -> int:
        """Position of the last entry (0 when empty: the first record is at 0)."""
        return self.positions[-1] if self.positions else 0

    def to_bytes(self) -> bytes:
        """The entries packed as in the .index file."""
        pairs = array("I", bytes(8 * len(self)))
        pairs[0::2] = self.rel_offsets
        pairs[1::2] = self.positions
        if sys.byteorder == "little":
            pairs.byteswap()
        return pairs.tobytes()

    def valid_prefix(self, size: int, rel_end: int) -> int:
        """Cut the index to the entries that can be right; return how many remain.

        A usable index starts with ``(0, 0)``, has strictly increasing
        offsets and positions, and points inside the first ``size`` bytes of
        the log at offsets below ``rel_end``. Anything after the first entry
        breaking that (a torn or zero-filled tail after a crash) is dropped.
        """
        rel, pos = self.rel_offsets, self.positions
        n = len(rel)
        if n and (rel[0] != 0 or pos[0] != 0):
            n = 0
        elif n > 1 and not (_strictly_increasing(rel) and _strictly_increasing(pos)):
            for i in range(1, n):
                if rel[i] <= rel[i - 1] or pos[i] <= pos[i - 1]:
                    n = i
                    break
        if n:
            n = min(n, bisect.bisect_left(pos, size, 0, n), bisect.bisect_left(rel, rel_end, 0, n))
        del rel[n:]
        del pos[n:]
        return n

    @classmethod
    def from_bytes(cls, data) -> "SparseIndex":
        index = cls()
        usable = len(data) - len(data) % ENTRY_SIZE
        index.extend(memoryview(data)[:usable])
        return index


def _strictly_increasing(values: array) -> bool:
    # sorted() and set() run in C: the common (valid) case costs no Python
    # loop per entry; the slow search for the cut runs only on a bad file.
    return values.tolist() == sorted(set(values))
