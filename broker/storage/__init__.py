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

from .log import TopicLog
from .offsets import OffsetStore
from .store import DataDirLocked, LogStore
from .topicconfig import TopicConfig
from .writer import DiskWriter

__all__ = ["TopicLog", "OffsetStore", "LogStore", "DataDirLocked", "DiskWriter", "TopicConfig"]
