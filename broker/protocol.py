"""Protocol v1 constants shared by the broker and the clients."""

from __future__ import annotations

import enum

__all__ = ["PROTOCOL_VERSION", "From"]

PROTOCOL_VERSION = 1


class From(enum.IntEnum):
    """Where SUB starts and SEK moves to: the ``u8 mode`` of their payload."""

    COMMITTED = 0  # the client's committed offset; the oldest if it has none
    OLDEST = 1     # the oldest offset still kept
    LATEST = 2     # the next offset to be published (only new messages)
    OFFSET = 3     # the value is an offset (clamped into the kept range)
    TIME = 4       # the value is a time in ms: the first message appended at or after it
