"""Push delivery of one topic to one connection.

A :class:`Subscription` is woken when its topic's log grows (or when its
connection can take more data) and turns stored records straight into v0
delivery frames in one codec call per chunk. It never polls: the writer
calls ``Connection.schedule_delivery`` after each completed write.

A v0 subscription commits its client's offset as it writes to the
connection's transport (v0 clients cannot acknowledge): only while the
connection is alive, only for what was written, and at most the
transport's high-water mark ahead of what the client has read. A v1
subscription never commits: the client does, with ``CMT``.
"""

from __future__ import annotations

from ..codec import records
from ..storage import TopicLog

__all__ = ["Subscription"]

_to_v0 = records.records_to_deliveries


class Subscription:
    """One topic delivered to one connection from ``offset`` on."""

    __slots__ = ("conn", "topic", "offset", "convert", "forward", "auto_commit")

    def __init__(self, conn, topic: TopicLog, offset: int, convert, auto_commit: bool,
                 forward=None) -> None:
        self.conn = conn              # the Connection receiving the messages
        self.topic = topic            # the log read from
        self.offset = offset          # next offset to write to the transport
        self.convert = convert        # stored records -> wire frames, one call per chunk
        self.forward = forward        # cached records -> one frame as they are (v1), or None
        self.auto_commit = auto_commit  # v0: commit what was sent; v1: the client commits

    @classmethod
    def v0(cls, conn, topic: TopicLog, offset: int) -> "Subscription":
        name = topic.name_bytes

        def convert(buf, from_offset, end_offset, max_bytes, verify):
            return _to_v0(buf, name, from_offset, end_offset, max_bytes, 0, verify)

        return cls(conn, topic, offset, convert, auto_commit=True)

    @property
    def behind(self) -> bool:
        return self.offset < self.topic.end_offset

    def read(self, max_bytes: int):
        """The next chunk of frames: ``(frames, count, next_offset)`` or None."""
        return self.topic.read(self.offset, max_bytes, self.convert, self.forward)
