"""Per-topic settings: broker-wide defaults with per-topic overrides.

A topic's overrides live in ``topics/<topic>/config.json``, a JSON object
holding only the settings that differ from the broker's defaults, e.g.::

    {"fsync": "always", "retention_ms": 86400000}

Keys (anything else is ignored with a warning when loading):

``fsync``              ``"always"``, ``"interval"`` or ``"never"``
``fsync_interval_ms``  with ``interval``: the longest written data waits for fsync
``retention_ms``       delete sealed segments whose newest record is older; -1 keeps forever
``retention_bytes``    keep the topic at most this big (sealed segments go first); -1: no limit
``segment_bytes``      roll the active segment at this size

The file is replaced atomically (write, fsync, rename, directory fsync);
a missing or unreadable file means "no overrides".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from ..config import FSYNC_POLICIES

__all__ = ["TopicConfig", "OVERRIDABLE", "CONFIG_FILE", "validate_overrides",
           "load_overrides", "encode_overrides"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MIN_SEGMENT_BYTES = 1024


@dataclasses.dataclass(frozen=True, slots=True)
class TopicConfig:
    """The settings in force for one topic (defaults with overrides applied)."""

    fsync: str = "interval"                    # always | interval | never
    fsync_interval_ms: int = 1000              # with fsync="interval"
    retention_ms: int = 7 * 24 * 3600 * 1000   # -1: keep forever
    retention_bytes: int = -1                  # -1: no size limit
    segment_bytes: int = 64 * 1024 * 1024      # roll the active segment at this size

    @classmethod
    def from_broker(cls, config) -> "TopicConfig":
        """Broker-wide defaults from a :class:`broker.config.Config`."""
        return cls(**{f: getattr(config, f) for f in OVERRIDABLE})

    def with_overrides(self, overrides: dict) -> "TopicConfig":
        return dataclasses.replace(self, **overrides) if overrides else self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


OVERRIDABLE = tuple(f.name for f in dataclasses.fields(TopicConfig))


def _check(key: str, value) -> None:
    if key == "fsync":
        if value not in FSYNC_POLICIES:
            raise ValueError("fsync must be one of %s, not %r" % (", ".join(FSYNC_POLICIES), value))
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("%s must be an integer, not %r" % (key, value))
    if key == "fsync_interval_ms" and value < 1:
        raise ValueError("fsync_interval_ms must be at least 1")
    if key in ("retention_ms", "retention_bytes") and value < -1:
        raise ValueError("%s must be -1 (no limit) or >= 0" % key)
    if key == "segment_bytes" and not MIN_SEGMENT_BYTES <= value < 1 << 32:
        raise ValueError("segment_bytes must be in %d .. 2**32-1" % MIN_SEGMENT_BYTES)


def validate_overrides(overrides: dict) -> dict:
    """Check names and values; ``None`` values mean "back to the default"."""
    for key, value in overrides.items():
        if key not in OVERRIDABLE:
            raise ValueError("unknown topic setting %r (known: %s)" % (key, ", ".join(OVERRIDABLE)))
        if value is not None:
            _check(key, value)
    return overrides


def load_overrides(directory: str) -> dict:
    """The valid overrides in ``directory/config.json`` (empty when absent)."""
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); using the broker defaults", path, exc)
        return {}
    if not isinstance(data, dict):
        log.warning("%s: not a JSON object; using the broker defaults", path)
        return {}
    out = {}
    for key, value in data.items():
        try:
            validate_overrides({key: value})
        except ValueError as exc:
            log.warning("%s: ignoring %s", path, exc)
            continue
        if value is not None:
            out[key] = value
    return out


def encode_overrides(overrides: dict) -> bytes:
    return (json.dumps(overrides, sort_keys=True, indent=1) + "\n").encode("ascii")
