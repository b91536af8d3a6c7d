"""The message type consumers receive."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Message"]


class Message(NamedTuple):
    """One stored message, as delivered by a subscription."""

    topic: str       # the topic it was published to
    offset: int      # its position in the topic: 0, 1, 2, ...
    timestamp: int   # when the broker appended it, ms since the Unix epoch
    value: bytes     # the message bytes as published
