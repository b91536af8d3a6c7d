"""How steady this machine's CPU is: a hiccup meter, for reading tail latency.

Every ``--every-ms`` (default 1) it runs the same small piece of Python
(about ``--work-us`` microseconds on a steady CPU, calibrated at start) and
times it. On bare metal every run takes about as long as the others. On a
VM whose host takes the CPU away or shares it, runs come out several times
slower for a stretch of milliseconds at a time: a *slow phase* (``--factor``
times the median or more, three samples or more, no gap over 10 ms between
them). Nothing else runs here: no sockets, no disk, a sleep between runs
(about 2% of one CPU), so what it shows belongs to the machine.

It prints the spread of the run times, the slow phases per second, the share
of the time they cover, how much slower the CPU was in them, and the first
few. The ``latency`` scenario's p99 (10,000 msg/s) lands in these phases:
about 1% of its messages arrive during a phase once they cover more than
1% of the time. Run it alone (``python bench/hiccups.py``) or next to any
benchmark.

    python bench/hiccups.py [--seconds 10] [--every-ms 1] [--work-us 20]
                            [--factor 4] [--list 20]
"""

from __future__ import annotations

import argparse
import time

_GAP_NS = 10_000_000   # samples of one phase are at most this far apart
_MIN_SAMPLES = 3       # a phase has at least this many slow samples


def _work(n: int) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def calibrate(work_us: float) -> int:
    """Loop count for ``_work`` that takes ``work_us`` on this CPU (best of 5)."""
    n = 20_000
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        _work(n)
        best = min(best, time.perf_counter() - t)
    return max(1, int(n * work_us / 1e6 / best))


def measure(seconds: float, every_ms: float = 1.0, work_us: float = 20.0) -> list[tuple[int, int]]:
    """(time.monotonic_ns() at start, ns taken) for each run of the work."""
    n = calibrate(work_us)
    for _ in range(200):
        _work(n)
    rows = []
    clock = time.perf_counter_ns
    mono = time.monotonic_ns
    end = mono() + int(seconds * 1e9)
    pause = every_ms / 1000.0
    while True:
        t = mono()
        if t >= end:
            return rows
        t0 = clock()
        _work(n)
        rows.append((t, clock() - t0))
        time.sleep(pause)


Phase = tuple[int, int, int, float]  # start ns, end ns, slow samples, worst x median


def phases(rows: list[tuple[int, int]], factor: float = 4.0) -> tuple[int, list[Phase]]:
    """The median run time, and the slow phases: (start ns, end ns, samples, worst x median)."""
    if not rows:
        return 0, []
    taken = sorted(ns for _, ns in rows)
    med = taken[len(taken) // 2]
    found: list[list] = []
    for t, ns in rows:
        if ns < factor * med:
            continue
        if found and t - found[-1][1] <= _GAP_NS:
            ph = found[-1]
            ph[1] = t + ns
            ph[2] += 1
            ph[3] = max(ph[3], ns / med)
        else:
            found.append([t, t + ns, 1, ns / med])
    return med, [tuple(p) for p in found if p[2] >= _MIN_SAMPLES]


def report(rows: list[tuple[int, int]], factor: float = 4.0, listed: int = 20) -> str:
    med, found = phases(rows, factor)
    if not rows:
        return "no samples\n"
    taken = sorted(ns for _, ns in rows)
    n = len(taken)
    span = max(1, rows[-1][0] + rows[-1][1] - rows[0][0])
    slow_ns = sum(e - s for s, e, _, _ in found)
    lengths = sorted(e - s for s, e, _, _ in found)
    worst = sorted(x for _, _, _, x in found)
    lines = [
        "| samples | work p50 us | p99 us | max us | slow phases | per s | share of time | "
        "median phase ms | longest ms | slowdown in phases (median, worst) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        "| %d | %.1f | %.1f | %.1f | %d | %.2f | %.1f%% | %s | %s | %s |" % (
            n, med / 1e3, taken[min(n - 1, int(n * 0.99))] / 1e3, taken[-1] / 1e3,
            len(found), len(found) / (span / 1e9), 100.0 * slow_ns / span,
            "%.1f" % (lengths[len(lengths) // 2] / 1e6) if found else "-",
            "%.1f" % (lengths[-1] / 1e6) if found else "-",
            "%.0fx, %.0fx" % (worst[len(worst) // 2], worst[-1]) if found else "-"),
    ]
    if found and listed:
        t0 = rows[0][0]
        lines.append("")
        lines.append("first phases (start ms after the first sample + length ms, worst x median): "
                     + ", ".join("%d+%.0f (%.0fx)" % ((s - t0) / 1e6, (e - s) / 1e6, x)
                                 for s, e, _, x in found[:listed]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="how long to measure (default 10)")
    ap.add_argument("--every-ms", type=float, default=1.0, help="pause between runs (default 1)")
    ap.add_argument("--work-us", type=float, default=20.0,
                    help="length of one run on a steady CPU, calibrated at start (default 20)")
    ap.add_argument("--factor", type=float, default=4.0,
                    help="a run this many times the median or slower is slow (default 4)")
    ap.add_argument("--list", type=int, default=20, help="phases to list (default 20)")
    args = ap.parse_args(argv)
    rows = measure(args.seconds, args.every_ms, args.work_us)
    print(report(rows, args.factor, args.list), end="")


if __name__ == "__main__":
    main()
