"""Error codes of protocol v1, shared by the broker and the clients.

Every refusal the broker sends a v1 client is an ``ERR`` frame carrying one
of these codes and a readable text. The codes are stable: clients may
switch on them. The client library raises the exception class mapped to
each code (``broker.client.errors``).
"""

from __future__ import annotations

import enum

__all__ = ["ErrorCode", "LimitError"]


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1            # the framing is broken; the connection is closed
    FRAME_TOO_LARGE = 2      # length prefix over the limit; the connection is closed
    UNKNOWN_COMMAND = 3      # a frame type the broker does not know
    BAD_REQUEST = 4          # a known frame type whose payload does not parse
    UNSUPPORTED_VERSION = 5  # HEL asked for a protocol version the broker lacks
    NOT_IDENTIFIED = 6       # a request before HEL completed
    INVALID_TOPIC = 7        # topic name breaks the naming rule
    BAD_CRC = 8              # a published message failed its CRC; batch not stored
    STORAGE_ERROR = 9        # the disk refused the write (full, I/O error); not stored
    INVALID_OFFSET = 10      # seek/commit target out of range or unknown mode
    NOT_SUBSCRIBED = 11      # SEK/UNS for a topic this connection doesn't consume
    ALREADY_SUBSCRIBED = 12  # SUB twice for one topic on one connection
    LIMIT_EXCEEDED = 13      # a configured limit (connections, topics, ...) was reached
    UNAUTHORIZED = 14        # authentication missing or permissions lacking


class LimitError(Exception):
    """A configured limit (topics, subscriptions, ...) refused a request."""
