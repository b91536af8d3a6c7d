"""The buffering both pure frame readers share (v0 ``FrameReader``, v1 ``V1Reader``).

A subclass implements ``_scan(data, events) -> consumed`` and sets
``_need`` (bytes the incomplete frame needs, at least) and ``_broken``.
"""

from __future__ import annotations

__all__ = ["ChunkedReader"]


class ChunkedReader:
    """Feeds any chunking of a byte stream to ``_scan``, in linear time."""

    __slots__ = ("max_frame_bytes", "_buf", "_need", "_broken")

    def __init__(self, max_frame_bytes: int = 1 << 20) -> None:
        if max_frame_bytes < 16:
            raise ValueError("max_frame_bytes must be at least 16")
        self.max_frame_bytes = max_frame_bytes  # largest frame accepted
        self._buf = bytearray()                  # unparsed remainder
        self._need = 0                           # bytes the buffered frame needs, at least
        self._broken = False                     # set once framing broke or the peer closed

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of their frame."""
        return len(self._buf)

    @property
    def broken(self) -> bool:
        """True once a framing error or a close was reported; input is then ignored."""
        return self._broken

    def feed(self, data) -> list:
        if self._broken:
            return []
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                # The buffered frame is still incomplete: don't rescan it,
                # so a large frame arriving in many chunks costs linear time.
                return []
            view = bytes(buf)
        else:
            # bytes(memoryview(...)), not bytes(data): bytes(5) would be
            # five zero bytes, i.e. a "close" frame, not a TypeError.
            view = data if type(data) is bytes else bytes(memoryview(data))
        events: list = []
        pos = self._scan(view, events)
        if self._broken or pos == len(view):
            buf.clear()
        elif buf:
            del buf[:pos]
        else:
            buf += memoryview(view)[pos:]
        return events

    def _scan(self, data: bytes, events: list) -> int:  # pragma: no cover - abstract
        raise NotImplementedError
