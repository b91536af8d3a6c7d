"""Small file helpers shared by the storage modules.

``os.write``/``os.pwrite``/``os.fsync`` release the GIL around the system
call, so the disk thread never holds up the event loop while it waits.
"""

from __future__ import annotations

import os

__all__ = ["write_all", "pwrite_all", "fsync_dir"]


def write_all(fd: int, data) -> None:
    """``os.write`` until every byte is written (short writes happen)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def pwrite_all(fd: int, data, position: int) -> None:
    """``os.pwrite`` at ``position`` until every byte is written."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, position)
        view = view[n:]
        position += n


def fsync_dir(path: str) -> None:
    """Make a created, renamed or deleted entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
