"""Log storage: segmented append-only topic logs and consumer offsets.

The format and the guarantees are described in docs/storage.md.

- ``segment``: one ``.log`` file of records and its ``.index``; recovery
- ``index``: the sparse offset index
- ``log``: a topic's segments; reads, time lookup, rolling, retention
- ``writer``: the disk thread and the batching that feeds it; fsync policies
- ``checkpoint``: the recovery checkpoint
- ``topicconfig``: per-topic settings and their ``config.json``
- ``filecache``: the LRU caches of open segment files
- ``offsets``: consumer offsets journal
- ``store``: the data directory
- ``fileio``, ``recordwalk``: small helpers
"""

import logging

from .. import codec
from .log import TopicLog
from .offsets import OffsetStore
from .store import DataDirLocked, LogStore
from .topicconfig import TopicConfig
from .writer import DiskWriter

# The writer's compiled build (writer.py itself, compiled with
# broker/_speedups/writer.pxd) goes with the Cython codec; the pure-Python
# broker runs writer.py as it is.
if codec.IMPLEMENTATION == "cython":
    try:
        from .._speedups.writer import DiskWriter  # noqa: F811 - the compiled build
    except ImportError as _exc:  # pragma: no cover - depends on the build
        logging.getLogger(__name__).warning(
            "compiled writer unavailable (%s); using broker/storage/writer.py as it is", _exc)

__all__ = ["TopicLog", "OffsetStore", "LogStore", "DataDirLocked", "DiskWriter", "TopicConfig"]
