"""A fixed-bucket latency histogram, for the Prometheus ``/metrics`` page.

Observed on one thread (the disk thread times its fsyncs), read on another
(the event loop renders ``/metrics``): ``observe`` only adds to ints and a
float, and ``snapshot`` copies, so a reader sees at worst an observation
half counted, never a broken histogram.
"""

from __future__ import annotations

import bisect

__all__ = ["Histogram", "FSYNC_BUCKETS"]

# Upper bounds in seconds: an SSD's fsync to a stalled disk's.
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Counts of observations per bucket (``value <= bound``), their sum and number."""

    __slots__ = ("bounds", "_counts", "_sum", "_n")

    def __init__(self, bounds=FSYNC_BUCKETS) -> None:
        self.bounds = tuple(bounds)               # bucket upper bounds, increasing
        self._counts = [0] * len(self.bounds)     # observations in each bucket (not cumulative)
        self._sum = 0.0                           # of all observations
        self._n = 0                               # observations, +Inf bucket included

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self._counts):
            self._counts[i] += 1
        self._sum += value
        self._n += 1

    def snapshot(self) -> tuple[tuple, list, float, int]:
        """``(bounds, per-bucket counts, sum, count)``; the count includes +Inf."""
        return self.bounds, list(self._counts), self._sum, self._n
