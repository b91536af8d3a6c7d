"""The data directory: every topic's log and the consumer offsets.

Layout::

    <data-dir>/
      .lock                   held (flock) while a broker uses the directory
      meta.json               {"format": 1}
      topics/<topic>/         one directory per topic (see segment.py)
      offsets/offsets.log     consumer offsets journal (see offsets.py)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os

from ..topics import InvalidTopic, validate_topic
from .log import TopicLog
from .offsets import OffsetStore

__all__ = ["LogStore", "DataDirLocked", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class DataDirLocked(RuntimeError):
    """Another broker process is using the data directory."""


class LogStore:
    """Opens, creates and closes topic logs under one data directory."""

    def __init__(self, data_dir: str, segment_bytes: int, index_interval_bytes: int) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.topics_dir = os.path.join(self.data_dir, "topics")
        self.segment_bytes = segment_bytes
        self.interval = index_interval_bytes
        self.topics: dict[str, TopicLog] = {}       # open topics by name
        self.offsets = OffsetStore(os.path.join(self.data_dir, "offsets"))
        self._lock_fd = -1

    def open(self) -> None:
        os.makedirs(self.topics_dir, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.data_dir, ".lock"),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise DataDirLocked("data dir %s is in use by another broker" % self.data_dir) from None
        self._check_meta()
        for name in sorted(os.listdir(self.topics_dir)):
            try:
                validate_topic(name.encode("utf-8", "surrogateescape"))
            except InvalidTopic:
                log.warning("ignoring %s: not a valid topic directory", name)
                continue
            directory = os.path.join(self.topics_dir, name)
            if os.path.isdir(directory):
                self.topics[name] = TopicLog.open(name, directory, self.segment_bytes, self.interval)
        self.offsets.load()
        log.info("opened %d topics in %s", len(self.topics), self.data_dir)

    def _check_meta(self) -> None:
        path = os.path.join(self.data_dir, "meta.json")
        try:
            with open(path) as f:
                meta = json.load(f)
        except FileNotFoundError:
            with open(path + ".tmp", "w") as f:
                json.dump({"format": FORMAT_VERSION}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
            return
        if meta.get("format") != FORMAT_VERSION:
            raise RuntimeError("data dir %s has storage format %r; this broker reads format %d"
                               % (self.data_dir, meta.get("format"), FORMAT_VERSION))

    def get(self, name: str) -> TopicLog | None:
        return self.topics.get(name)

    def get_or_create(self, name: str) -> TopicLog:
        """The log of a validated topic name, created if new."""
        topic = self.topics.get(name)
        if topic is None:
            directory = os.path.join(self.topics_dir, name)
            topic = self.topics[name] = TopicLog.create(name, directory, self.segment_bytes,
                                                        self.interval)
            log.info("created topic %s", name)
        return topic

    def close(self) -> None:
        for topic in self.topics.values():
            topic.close()
        self.topics.clear()
        self.offsets.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
