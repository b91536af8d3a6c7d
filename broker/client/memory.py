"""Opt-in allocator settings for a process that consumes at a high rate.

A consumer's memory rises and falls by megabytes all the time: a
subscription buffers up to ``max_buffered`` messages, each a ``bytes``
object of its own, and hands them out in batches; a large ``MSG`` frame is
assembled in a buffer of its own. glibc's ``malloc`` gives the top of its
heap back to the kernel as soon as more than its trim threshold is free
there (128 KiB at first, at most 64 MiB as it adapts), and serves
allocations of its mmap threshold and up (128 KiB to 32 MiB) with ``mmap``,
unmapped again on ``free``. So every megabyte a consumer frees is handed
back, and the next megabyte it reads is faulted in again, page by page,
each page zeroed by the kernel: about 100,000 page faults a second in the
benchmark's ``consume`` scenario, 1 KiB messages at half a million a second
(see docs/benchmarks.md).

:func:`tune_malloc` fixes both thresholds where glibc's own adaptation
would end (mmap threshold 32 MiB, trim threshold twice that), so that freed
memory stays in the process for the next batch. It is a setting of the
whole process, so the client library never makes it by itself: a program
calls it once, at start. The cost is memory: up to the trim threshold of
freed heap may stay resident.

The same settings can be made without code through glibc's environment
variables, ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``; when
either is set, :func:`tune_malloc` leaves the process as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 32 << 20   # glibc's ceiling for its own adaptive threshold on 64-bit
TRIM_THRESHOLD = 64 << 20   # twice the mmap threshold, as glibc keeps them when adapting

_M_TRIM_THRESHOLD = -1      # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Keep freed memory in this process for reuse, on glibc. True if applied.

    Sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` with
    ``mallopt``. Does nothing and returns False on other C libraries, or
    when ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is in the
    environment (the process's owner has chosen already). Raises
    ValueError for a threshold glibc does not take (the mmap threshold is at
    most 32 MiB on 64-bit).
    """
    if not (0 <= mmap_threshold <= MMAP_THRESHOLD and 0 <= trim_threshold < 1 << 31):
        raise ValueError("thresholds out of range: mmap %r, trim %r" % (mmap_threshold, trim_threshold))
    if any(name in os.environ for name in _ENVIRONMENT):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 \
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
