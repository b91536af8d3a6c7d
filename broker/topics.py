"""Topic names: what is allowed, checked before any path is built from one.

A topic becomes a directory name under the data dir, so the rule is strict:
ASCII letters, digits, ``.``, ``_`` and ``-``; 1 to 200 characters; not
``.`` or ``..``. No separator, NUL or non-ASCII byte can pass, so no client
can name a path outside the data dir.
"""

from __future__ import annotations

import re

__all__ = ["MAX_TOPIC_LENGTH", "InvalidTopic", "validate_topic"]

MAX_TOPIC_LENGTH = 200

_VALID = re.compile(rb"[A-Za-z0-9._-]{1,%d}\Z" % MAX_TOPIC_LENGTH)


class InvalidTopic(ValueError):
    """A topic name broke the naming rule."""


def validate_topic(name: bytes) -> str:
    """Return ``name`` as ``str`` if it is a valid topic, else raise."""
    if not _VALID.match(name) or name in (b".", b".."):
        raise InvalidTopic("invalid topic name %r: use 1-%d of A-Z a-z 0-9 . _ -, not . or .."
                           % (name[:64], MAX_TOPIC_LENGTH))
    return name.decode("ascii")
