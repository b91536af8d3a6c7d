"""Numbers into tables: percentiles, the markdown tables, the JSON file, the plot."""

from __future__ import annotations

import array
import json
import math
import os
import platform
import subprocess
import sys

__all__ = ["percentiles", "machine_info", "meminfo", "results_table", "ratio_table", "targets_table",
           "write_json", "plot", "fmt_rate"]


def percentiles(samples_ns: array.array, points=(50.0, 99.0, 99.9)) -> list[float] | None:
    """Nearest-rank percentiles of ``samples_ns``, in milliseconds (None if empty)."""
    n = len(samples_ns)
    if not n:
        return None
    try:
        import numpy as np
        a = np.frombuffer(samples_ns, dtype=np.int64)
        return [float(v) / 1e6 for v in np.percentile(a, points, method="inverted_cdf")]
    except ImportError:
        s = sorted(samples_ns)
        return [s[min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1))] / 1e6 for p in points]


def meminfo(field: str) -> int:
    """A ``/proc/meminfo`` field in bytes (``MemTotal``, ``MemAvailable``...); 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_info() -> dict:
    """nproc, CPU model, kernel, Python, load: what a reader needs to judge the numbers."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    mem = meminfo("MemTotal")
    try:  # the compiled codec's CRC-32 kernel; the pure twin always uses zlib
        from .._speedups.frames import CRC32_KERNEL as crc32
    except ImportError:
        crc32 = "zlib (no compiled codec)"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "crc32": crc32,
        "memory_gib": round(mem / 2 ** 30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "loadavg": [round(x, 2) for x in load],
    }


def fmt_rate(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x >= 100:
        return "{:,.0f}".format(x)
    return "{:,.1f}".format(x)


def _ms(x) -> str:
    if x is None:
        return "-"
    return "%.2f" % x if x < 10 else "%.1f" % x if x < 100 else "%.0f" % x


def _md(headers: list[str], rows: list[list[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def results_table(results: list[dict]) -> str:
    """One row per run: throughput, latency, broker CPU and memory."""
    headers = ["scenario", "system", "msgs", "msg/s", "MB/s", "p50 ms", "p99 ms", "p99.9 ms",
               "latency of", "CPU s/M msgs", "peak RSS MB", "notes"]
    rows = []
    for r in results:
        if r.get("error"):
            rows.append([r["scenario"], r["label"]] + ["-"] * 9 + ["FAILED: " + r["error"].splitlines()[0][:80]])
            continue
        lat = r.get("latency_ms") or [None, None, None]
        rows.append([
            r["scenario"], r["label"], "{:,}".format(r["messages"]), fmt_rate(r["msgs_per_s"]),
            fmt_rate(r["mb_per_s"]), _ms(lat[0]), _ms(lat[1]), _ms(lat[2]), r.get("latency_kind", "-"),
            "%.1f" % r["cpu_s_per_m"] if r.get("cpu_s_per_m") is not None else "-",
            "%.0f" % (r["server_hwm"] / 1e6) if r.get("server_hwm") else "-",
            r.get("notes", ""),
        ])
    return _md(headers, rows, "ll" + "r" * 9 + "l")


# Which figure a scenario is compared on, and whether higher is better.
COMPARE = {
    "publish": ("msgs_per_s", True), "consume": ("msgs_per_s", True),
    "pubsub": ("msgs_per_s", True), "devlog50": ("msgs_per_s", True),
    "latency": ("p99", False), "conn1k": ("server_hwm", False), "conn10k": ("server_hwm", False),
}


def _metric(r: dict, key: str):
    if r is None or r.get("error"):
        return None
    if key == "p99":
        lat = r.get("latency_ms")
        return lat[1] if lat else None
    return r.get(key)


def ratio_table(results: list[dict], peers: list[str]) -> str:
    """Ours / peer per scenario, for each of our modes."""
    by = {(r["scenario"], r["label"]): r for r in results}
    scenarios = [s for s in COMPARE if any(k[0] == s for k in by)]
    ours = []
    for r in results:
        if r["system"].startswith("ours") and r["label"] not in ours:
            ours.append(r["label"])
    headers = ["scenario", "compared on"]
    for o in ours:
        for p in peers:
            headers.append("%s / %s" % (o, p))
    rows = []
    for s in scenarios:
        key, higher = COMPARE[s]
        what = {"msgs_per_s": "msg/s (higher is better)", "p99": "p99 latency (lower is better)",
                "server_hwm": "peak RSS (lower is better)"}[key]
        row = [s, what]
        for o in ours:
            a = _metric(by.get((s, o)), key)
            for p in peers:
                b = _metric(by.get((s, p)), key)
                row.append("%.2fx" % (a / b) if a and b else "-")
        rows.append(row)
    return _md(headers, rows, "ll" + "r" * (len(headers) - 2))


def targets_table(results: list[dict], quick: bool) -> str:
    """Issue 5's targets, each met or missed, from this run's Cython rows."""
    by = {(r["scenario"], r["label"]): r for r in results if not r.get("error")}
    c = "ours/cython"

    def rate(s, label=c):
        r = by.get((s, label))
        return r["msgs_per_s"] if r else None

    def row(name, value, ok, figure):
        if value is None:
            return [name, "not measured", "-"]
        return [name, figure, "met" if ok else "MISSED"]

    rows = []
    for s, goal in (("publish", 500_000), ("consume", 500_000), ("pubsub", 250_000)):
        v = rate(s)
        rows.append(row("%s >= %s msg/s" % (s, "{:,}".format(goal)), v, v is not None and v >= goal,
                        "%s msg/s (%.0f%% of target)" % (fmt_rate(v), 100 * v / goal) if v else ""))
    lat = by.get(("latency", c))
    p99 = lat["latency_ms"][1] if lat and lat.get("latency_ms") else None
    rows.append(row("p99 <= 2 ms at 10k msg/s", p99, p99 is not None and p99 <= 2.0,
                    "p99 %s ms" % _ms(p99)))
    conn = by.get(("conn10k", c))
    hwm = conn["server_hwm"] / 1e6 if conn else None
    n = conn.get("connections") if conn else None
    rows.append(row("10,000 connections, RSS <= 300 MB", hwm,
                    hwm is not None and hwm <= 300 and (n or 0) >= 10_000,
                    "%.0f MB peak RSS with %s connections" % (hwm, "{:,}".format(n or 0)) if hwm else ""))
    for peer in ("redis", "nats"):
        worst = None
        for s in ("publish", "consume", "pubsub", "devlog50"):
            a, b = rate(s), rate(s, peer)
            if a and b:
                ratio = a / b
                if worst is None or ratio < worst[0]:
                    worst = (ratio, s)
        rows.append(row(">= 3x %s on every throughput scenario" % peer, worst,
                        worst is not None and worst[0] >= 3.0,
                        "lowest %.2fx (%s)" % worst if worst else ""))
    # The devlog's 20-30k msg/s was its 50-producer/50-consumer harness: 10x is 200-300k.
    pure = rate("devlog50", "ours/pure")
    others = ", ".join("%s %s" % (s, fmt_rate(rate(s, "ours/pure")))
                       for s in ("publish", "consume", "pubsub") if rate(s, "ours/pure"))
    rows.append(row("pure mode >= 10x the devlog's 20-30k msg/s (200-300k; devlog50 scenario)", pure,
                    pure is not None and pure >= 300_000,
                    "devlog50 %s msg/s = %.1f-%.1fx the devlog%s" % (
                        fmt_rate(pure), pure / 30_000, pure / 20_000,
                        " (pure: %s)" % others if others else "") if pure else ""))
    text = _md(["target (issue 5)", "measured", "verdict"], rows, "lll")
    if quick:
        text += "\n\n(--quick run: counts too small for the verdicts to mean much.)"
    return text


def write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")


def plot(path: str, results: list[dict]) -> str | None:
    """Latency histograms and throughput over time, one row per scenario.

    Returns an explanation if it could not plot (matplotlib missing).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install 'pylogstreams[plot]'); no plot"
    scenarios = []
    for r in results:
        if r["scenario"] not in scenarios and not r.get("error") and r.get("series"):
            scenarios.append(r["scenario"])
    if not scenarios:
        return "nothing to plot"
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(13, 3.2 * len(scenarios)), squeeze=False)
    for i, s in enumerate(scenarios):
        ax_h, ax_t = axes[i]
        for r in results:
            if r["scenario"] != s or r.get("error"):
                continue
            lat = r.get("_lat")
            if lat is not None and len(lat):
                data = [x / 1e6 for x in lat[:: max(1, len(lat) // 200_000)]]
                lo, hi = max(min(data), 1e-3), max(data)
                if hi > lo:
                    bins = [lo * (hi / lo) ** (k / 60) for k in range(61)]
                    ax_h.hist(data, bins=bins, histtype="step", label=r["label"], density=True)
            series = r.get("series") or []
            if len(series) > 1:
                ts, rates = [], []
                for (t0, a0), (t1, a1) in zip(series, series[1:]):
                    if t1 - t0 >= 0.05:   # the last sample can follow the previous closely
                        ts.append(t1)
                        rates.append((a1 - a0) / (t1 - t0))
                ax_t.plot(ts, rates, label=r["label"])
        if not ax_h.get_legend_handles_labels()[0]:
            ax_h.text(0.5, 0.5, "no latency figure (consuming a backlog)", ha="center",
                      va="center", transform=ax_h.transAxes)
        else:
            ax_h.set_xscale("log")
        ax_h.set_title("%s: latency (%s)" % (s, next((r.get("latency_kind", "") for r in results
                                                     if r["scenario"] == s), "")))
        ax_h.set_xlabel("ms")
        ax_t.set_title("%s: throughput over time" % s)
        ax_t.set_xlabel("s")
        ax_t.set_ylabel("msg/s" if not s.startswith("conn") else "pings/s")
        for ax in (ax_h, ax_t):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def git_describe(repo: str) -> str:
    try:
        out = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def command_line() -> str:
    """The command as a reader would type it."""
    prog = sys.argv[0] if sys.argv else "?"
    if prog.endswith(("__main__.py", "pylogstreams")):
        head = ["pylogstreams", "bench"]
        args = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "bench" else sys.argv[1:]
    else:
        head = ["python", os.path.relpath(prog)]
        args = sys.argv[1:]
    return " ".join(head + args)
