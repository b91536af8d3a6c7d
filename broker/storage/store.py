"""The data directory: every topic's log and the consumer offsets.

Layout (details in docs/storage.md)::

    <data-dir>/
      .lock                   held (flock) while a broker uses the directory
      meta.json               {"format": 2} (format 1 is upgraded in place: upgrade.py)
      checkpoint              recovery checkpoint (see checkpoint.py)
      topics/<topic>/         one directory per topic (see segment.py)
        <20 digits>.log       records
        <20 digits>.index     sparse index
        config.json           per-topic setting overrides (see topicconfig.py)
      offsets/offsets.log     consumer offsets journal (see offsets.py)

Opening lists the topic directories and stats their segment files; it reads
no log data except after a crash, and then only the part of each topic's
active segment written after the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
from typing import Callable

from ..config import Config
from ..topics import InvalidTopic, validate_topic
from . import checkpoint
from .fileio import atomic_write
from .filecache import FileCache
from .tailcache import TailCache
from .log import TopicLog
from .offsets import OffsetStore
from .topicconfig import TopicConfig, load_overrides, validate_overrides
from .upgrade import upgrade_format1

__all__ = ["LogStore", "DataDirLocked", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2


class DataDirLocked(RuntimeError):
    """Another broker process is using the data directory."""


class LogStore:
    """Opens, creates and closes topic logs under one data directory.

    ``config`` supplies the broker-wide defaults (segment size, index
    interval, fsync policy, retention, file-cache sizes); the positional
    ``segment_bytes`` and ``index_interval_bytes``, when given, override
    it. ``clock`` returns the wall-clock time in seconds (``time.time``);
    record append times and retention use it, and tests inject their own.
    """

    def __init__(self, data_dir: str, segment_bytes: int | None = None,
                 index_interval_bytes: int | None = None, *, config: Config | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        cfg = config or Config()
        changes = {}
        if segment_bytes is not None:
            changes["segment_bytes"] = segment_bytes
        if index_interval_bytes is not None:
            changes["index_interval_bytes"] = index_interval_bytes
        if changes:
            cfg = dataclasses.replace(cfg, **changes)
        if cfg.max_open_segments < 1 or cfg.max_open_writers < 1:
            raise ValueError("max_open_segments and max_open_writers must be at least 1")
        self.config = cfg                            # broker-wide defaults
        self.data_dir = os.path.abspath(data_dir)
        self.topics_dir = os.path.join(self.data_dir, "topics")
        self.segment_bytes = cfg.segment_bytes
        self.interval = cfg.index_interval_bytes
        self.defaults = TopicConfig.from_broker(cfg)  # what a topic without overrides uses
        self.clock = clock                           # wall clock, seconds
        self.topics: dict[str, TopicLog] = {}       # open topics by name (event loop)
        self.offsets = OffsetStore(os.path.join(self.data_dir, "offsets"))
        self.stats: dict = {
            "offset_resets": 0,            # reads from an offset retention had deleted
            "segments_rolled": 0,
            "recovery_scanned_bytes": 0,   # log bytes checked at startup
            "recovery_truncated_bytes": 0,  # torn or corrupt tail bytes cut at startup
            "recovery_dropped_segments": 0,  # segments removed after a torn one, at startup
            "index_rebuilds": 0,
            "tail_reads": 0,               # deliveries served from the tail cache
        }
        self.tail = TailCache(getattr(cfg, "tail_cache_bytes", 0))  # newest batches, in memory
        # Read side (event loop) and write side (disk thread) file caches.
        self.rcache = FileCache(cfg.max_open_segments, _release_reader, self.stats, "read_fd")
        self.wcache = FileCache(cfg.max_open_writers, _release_writer, self.stats, "write_fd")
        self._lock_fd = -1
        self._clean = False   # a clean checkpoint covers the current state

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
        try:
            self._check_meta()
        except BaseException:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1
            raise
        found = checkpoint.read(self.data_dir)
        clean, entries = found if found is not None else (False, {})
        scanned_before = self.stats["recovery_scanned_bytes"]
        stale = False  # a checkpoint entry did not match: rewrite the checkpoint
        for name, directory in self._topic_dirs():
            overrides = load_overrides(directory)
            entry = entries.get(name)
            topic = TopicLog.open(name, directory, self.defaults.with_overrides(overrides),
                                  self.interval, self.rcache, self.wcache, self.stats,
                                  overrides, entry=entry, clean=clean)
            if entry is not None and (entry.base_offset, entry.size, entry.end_offset) != (
                    topic.active.base_offset, topic.active.size, topic.active.end_offset):
                stale = True
            topic.tail_cache = self.tail
            self.topics[name] = topic
        self.offsets.load()
        scanned = self.stats["recovery_scanned_bytes"] - scanned_before
        if stale or scanned or (found is None and self.topics):
            # What was recovered is on disk (recovery fsyncs what it
            # scanned): record it, so no later restart trusts an old claim.
            self.write_checkpoint(clean=False)
        log.info("opened %d topics in %s (%s checkpoint, %d log bytes scanned)",
                 len(self.topics), self.data_dir,
                 "clean" if clean else "crash-time" if found else "no", scanned)

    def _topic_dirs(self) -> list[tuple[str, str]]:
        """``(name, path)`` of each topic directory, in name order; others are ignored."""
        out = []
        for name in sorted(os.listdir(self.topics_dir)):
            try:
                validate_topic(name.encode("utf-8", "surrogateescape"))
            except InvalidTopic:
                log.warning("ignoring %s: not a valid topic directory", name)
                continue
            directory = os.path.join(self.topics_dir, name)
            if os.path.isdir(directory):
                out.append((name, directory))
        return out

    def _check_meta(self) -> None:
        path = os.path.join(self.data_dir, "meta.json")
        try:
            with open(path) as f:
                meta = json.load(f)
        except FileNotFoundError:
            self._write_meta(path)
            return
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if type(fmt) is int and fmt == 1:
            # The same layout with each record's CRC computed in one pass
            # (upgrade.py): rewrite the CRCs, then say format 2.
            segments, rewritten = upgrade_format1([d for _name, d in self._topic_dirs()])
            self._write_meta(path)
            log.warning("upgraded data dir %s from storage format 1 to %d: %d records rewritten "
                        "in %d segments", self.data_dir, FORMAT_VERSION, rewritten, segments)
            return
        if type(fmt) is not int or fmt != FORMAT_VERSION:
            raise RuntimeError("data dir %s has storage format %r; this broker reads format %d"
                               % (self.data_dir, fmt, FORMAT_VERSION))

    @staticmethod
    def _write_meta(path: str) -> None:
        atomic_write(path, json.dumps({"format": FORMAT_VERSION}).encode())

    def get(self, name: str) -> TopicLog | None:
        return self.topics.get(name)

    def get_or_create(self, name: str) -> TopicLog:
        """The log of a validated topic name, created if new.

        A new topic is only created in memory here; the disk thread creates
        its files with its first append, so this never blocks on the disk.
        """
        topic = self.topics.get(name)
        if topic is None:
            directory = os.path.join(self.topics_dir, name)
            topic = self.topics[name] = TopicLog.create(
                name, directory, self.defaults, self.interval, self.rcache, self.wcache,
                self.stats)
            topic.tail_cache = self.tail
            log.info("created topic %s", name)
        return topic

    # -- per-topic settings ------------------------------------------------

    def topic_config(self, name: str) -> TopicConfig:
        """The settings in force for topic ``name`` (the defaults if unknown)."""
        topic = self.topics.get(name)
        return topic.config if topic is not None else self.defaults

    def set_topic_config(self, name: str, **overrides) -> TopicConfig:
        """Override settings of topic ``name`` (created if new) and persist them.

        Keywords are the fields of :class:`~broker.storage.topicconfig.TopicConfig`
        (``fsync``, ``fsync_interval_ms``, ``retention_ms``, ``retention_bytes``,
        ``segment_bytes``); ``None`` removes an override, returning that
        setting to the broker default. Raises ValueError for an unknown name
        or a bad value, before changing anything. The new settings take
        effect at once (the next append, fsync or retention check) and are
        written to ``topics/<name>/config.json`` atomically and durably.

        This blocks on an fsync: from the event loop use
        ``await DiskWriter.set_topic_config(...)``, which does the writing
        on the disk thread.
        """
        topic, merged = self.prepare_topic_config(name, overrides)
        topic.save_overrides(merged)
        self.apply_topic_config(topic, merged)
        return topic.config

    def prepare_topic_config(self, name: str, overrides: dict) -> tuple[TopicLog, dict]:
        """Validate ``overrides`` for topic ``name``; the topic and the merged overrides."""
        validate_overrides(overrides)
        name = validate_topic(name.encode("ascii", "replace") if isinstance(name, str) else name)
        topic = self.get_or_create(name)
        merged = dict(topic.overrides)
        for key, value in overrides.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return topic, merged

    def apply_topic_config(self, topic: TopicLog, merged: dict) -> None:
        topic.overrides = dict(merged)
        topic.config = self.defaults.with_overrides(merged)

    # -- checkpoints and shutdown ----------------------------------------

    def write_checkpoint(self, clean: bool = False) -> None:
        """Write the recovery checkpoint (disk thread, or with no writer running).

        Each topic contributes the state its log was last fsynced at: a
        prefix of its active segment, or of the one before while that one's
        seal waits (see :meth:`TopicLog.checkpoint_entry`). ``clean`` says
        every topic was fsynced to its end just before.
        """
        checkpoint.write(self.data_dir, self.checkpoint_entries(), clean,
                         int(self.clock() * 1000))
        self._clean = clean

    def topic_list(self) -> list:
        """Disk thread: the topics, as a list taken safely while the loop may add one."""
        return _snapshot(self.topics)

    def checkpoint_entries(self) -> dict:
        """Disk thread: each topic's checkpoint entry (see :meth:`write_checkpoint`)."""
        entries = {}
        for topic in _snapshot(self.topics):
            entry = topic.checkpoint_entry()
            if entry is not None:
                entries[topic.name] = entry
        return entries

    def note_checkpoint(self, clean: bool) -> None:
        """A checkpoint is being written elsewhere (the writer's syncer thread)."""
        self._clean = clean

    def close(self, *, checkpoint: bool = True) -> None:
        """Close every file. ``checkpoint=False`` leaves the files as a crash would.

        When no clean checkpoint was written (no :class:`DiskWriter` ran,
        or it was closed with ``clean=False``), ``checkpoint=True`` fsyncs
        every active segment and writes one here.
        """
        if checkpoint and not self._clean and self._lock_fd >= 0:
            try:
                for topic in self.topics.values():
                    if topic.materialized:
                        topic.finish_seal()
                        topic.active.fsync()
                        topic.note_synced()
                self.offsets.fsync()
                self.write_checkpoint(clean=True)
            except OSError as exc:
                log.error("could not write the shutdown checkpoint: %s", exc)
        for topic in self.topics.values():
            topic.close()
        self.topics.clear()
        self.rcache.clear()
        self.wcache.clear()
        self.offsets.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _snapshot(topics: dict) -> list:
    # Called from the disk thread while the loop may add a topic: list()
    # of a dict view runs in C under the GIL, but retry rather than rely on it.
    for _ in range(100):
        try:
            return list(topics.values())
        except RuntimeError:
            continue
    return list(topics.copy().values())


def _release_reader(seg) -> None:
    seg.release_reader()


def _release_writer(seg) -> None:
    seg.release_writer()
