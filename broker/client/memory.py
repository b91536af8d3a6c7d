"""Opt-in allocator settings for a process that consumes at a high rate.

A consumer's memory rises and falls by megabytes all the time: a
subscription buffers up to ``max_buffered`` messages, each a ``bytes``
object of its own, and hands them out in batches; a large ``MSG`` frame is
assembled in a buffer of its own. glibc's ``malloc`` gives the free memory
at the top of a heap back to the kernel once there is more of it than its
trim threshold (128 KiB at first, at most 64 MiB as it adapts), and serves
allocations of its mmap threshold and up (128 KiB to 32 MiB) with ``mmap``,
unmapped again on ``free``. So a buffer that drains hands its memory back,
and the next one that fills faults it in again, page by page, each page
zeroed by the kernel: about 100,000 page faults a second in the
benchmark's ``consume`` scenario, 1 KiB messages at half a million a
second (see docs/benchmarks.md).

:func:`tune_malloc` fixes both thresholds where glibc's own adaptation
would end on 64-bit (mmap threshold 32 MiB, trim threshold twice that),
so that freed memory stays in the process for the next batch. It is a
setting of the whole process, so the client library never makes it by
itself: a program calls it once, at start. The cost is memory: up to the
trim threshold of free memory may stay at the top of each of malloc's
heaps (one per arena: the main one, and those of threads), besides the
free memory inside them, which glibc keeps in any case.

The same settings can be made without code, through glibc's environment
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or their
``GLIBC_TUNABLES`` names); when any of them is set, :func:`tune_malloc`
leaves the process as it is.
"""

from __future__ import annotations

import os

__all__ = ["tune_malloc", "on_glibc", "owner_chose", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 32 << 20   # glibc's ceiling for its own adaptive threshold on 64-bit
TRIM_THRESHOLD = 64 << 20   # twice the mmap threshold, as glibc keeps them when adapting

_M_TRIM_THRESHOLD = -1      # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")
_INT_MAX = (1 << 31) - 1


def on_glibc() -> bool:
    """True if this process runs on Linux with glibc, whose thresholds these are."""
    import platform
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def owner_chose() -> bool:
    """True if this process's environment sets glibc's thresholds itself."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in _ENVIRONMENT) \
        or any(name + "=" in tunables for name in _TUNABLES)


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Keep freed memory in this process for reuse, on glibc. True if applied.

    Sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` with
    ``mallopt``; True when glibc took both. Does nothing and returns False
    on other C libraries, or when the environment sets either threshold
    already (:func:`owner_chose`). Thresholds are bytes, from 1 to
    ``2**31 - 1`` (ValueError otherwise); glibc may refuse a value it
    does not take (its manual gives 512 KiB as the mmap threshold's limit
    on 32-bit), and then this returns False.
    """
    for value in (mmap_threshold, trim_threshold):
        if not 1 <= value <= _INT_MAX:
            raise ValueError("threshold out of range (1 to 2**31 - 1 bytes): %r" % (value,))
    if owner_chose() or not on_glibc():
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 \
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
