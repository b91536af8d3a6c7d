"""Selects the codec implementation once, at import.

``PYLOGSTREAMS_NO_EXTENSIONS=1`` (any non-empty value other than ``0``)
forces the pure-Python twin. Otherwise the Cython extensions are used; if
they cannot be imported (a pure build, a broken build) the pure twin is
loaded and a warning is logged, and :data:`IMPLEMENTATION` says so. The test
suite fails when a default install does not load the compiled codec, so a
broken build cannot hide behind the fallback.

Everything else in the broker imports the codec from here.
"""

from __future__ import annotations

import logging
import os

__all__ = ["IMPLEMENTATION", "NO_EXTENSIONS", "frames", "records", "wire1"]

log = logging.getLogger(__name__)


def _no_extensions() -> bool:
    value = os.environ.get("PYLOGSTREAMS_NO_EXTENSIONS", "")
    return value not in ("", "0")


NO_EXTENSIONS: bool = _no_extensions()

if NO_EXTENSIONS:
    from ._pure import frames, records, wire1
    IMPLEMENTATION = "python"
else:
    try:
        from ._speedups import frames, records, wire1
        IMPLEMENTATION = "cython"
    except ImportError as exc:  # pragma: no cover - depends on the build
        log.warning("Cython codec unavailable (%s); using the pure-Python codec", exc)
        from ._pure import frames, records, wire1
        IMPLEMENTATION = "python"
