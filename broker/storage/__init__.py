"""Log storage: segmented append-only topic logs and consumer offsets.

- ``segment``: one ``.log`` file of records and its ``.index``
- ``index``: the sparse offset index
- ``log``: a topic's segments; reads on the event loop
- ``writer``: the disk thread and the batching that feeds it
- ``offsets``: consumer offsets journal
- ``store``: the data directory
"""

from .log import TopicLog
from .offsets import OffsetStore
from .store import DataDirLocked, LogStore
from .writer import DiskWriter

__all__ = ["TopicLog", "OffsetStore", "LogStore", "DataDirLocked", "DiskWriter"]
