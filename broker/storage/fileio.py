"""Small file helpers shared by the storage modules.

``os.write``/``os.pwrite``/``os.fsync`` release the GIL around the system
call, so the disk thread never holds up the event loop while it waits.
"""

from __future__ import annotations

import os

__all__ = [
    "write_all", "pwrite_all", "pwritev_all", "fsync_dir", "atomic_write", "write_replace",
    "write_replace_parts",
    "advise", "FADV_SEQUENTIAL", "FADV_DONTNEED", "start_writeback",
]

FADV_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", None)
FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


def _sync_file_range():
    # Linux's sync_file_range(2), which the os module does not wrap; ctypes
    # releases the GIL around the call. None elsewhere.
    try:
        import ctypes
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, ImportError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` to the disk, not wait.

    Like RocksDB's ``bytes_per_sync``: a segment's pages go to the disk
    while it fills, so the fsync that seals it has little left to do
    instead of tens of megabytes (a stall of tens of milliseconds). It
    guarantees nothing; durability still comes from fsync. A no-op where
    sync_file_range(2) does not exist; errors are ignored.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


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


_PWRITEV = getattr(os, "pwritev", None)  # Linux, the BSDs, macOS 11+

# The most buffers one pwritev(2) takes (IOV_MAX; POSIX guarantees 16).
try:
    IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (AttributeError, ValueError, OSError):
    IOV_MAX = 16


def pwritev_all(fd: int, bufs: list, position: int) -> None:
    """Write the buffers one after the other at ``position``, without joining them.

    ``os.pwritev`` (at most ``IOV_MAX`` buffers a call) until every byte is
    written; a short write resumes where it stopped. Where the os module
    has no ``pwritev``, one ``pwrite`` of the buffers joined.
    """
    if _PWRITEV is None:
        pwrite_all(fd, b"".join(bufs), position)
        return
    views = [memoryview(b).cast("B") for b in bufs]
    i = 0
    while i < len(views):
        n = os.pwritev(fd, views[i:i + IOV_MAX], position)  # through os: tests patch it
        position += n
        while n and n >= views[i].nbytes:  # whole buffers written
            n -= views[i].nbytes
            i += 1
        if n:
            views[i] = views[i][n:]
        while i < len(views) and not views[i].nbytes:  # empty ones
            i += 1


def fsync_path(path: str, flags: int = 0) -> None:
    """fsync the file (or, with ``os.O_DIRECTORY``, directory) at ``path``,
    through a descriptor of its own. FileNotFoundError if there is none."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a created, renamed or deleted entry in ``path`` durable."""
    fsync_path(path, os.O_DIRECTORY)


def write_replace(path: str, data, *, durable: bool) -> None:
    """Replace ``path`` with ``data`` through ``path.tmp`` and a rename.

    Readers see the old file or the new one, never a mix. With ``durable``
    the temporary file is fsynced before the rename and the directory
    after it, so the new content survives power loss once this returns.
    A failure (ENOSPC, EIO) removes the temporary file and leaves ``path``
    as it was.
    """
    write_replace_parts(path, (data,), durable=durable)


def write_replace_parts(path: str, parts, *, durable: bool) -> None:
    """:func:`write_replace` of the concatenation of ``parts``, an iterable
    of buffers consumed one at a time (so a large file is never whole in
    memory). An exception from the iterable is a failure like any other."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            for data in parts:
                write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


def atomic_write(path: str, data) -> None:
    """Durably replace ``path`` with ``data`` (see :func:`write_replace`)."""
    write_replace(path, data, durable=True)


def advise(fd: int, advice, offset: int = 0, length: int = 0) -> None:
    """``posix_fadvise`` where it exists; a hint, so failures are ignored."""
    if advice is None:
        return
    try:
        os.posix_fadvise(fd, offset, length, advice)
    except OSError:
        pass
