"""A smoke run of the end-to-end benchmark (``pylogstreams bench``).

Both codecs, client and raw mode, tiny counts, no peers: it must complete
and print its results table with one row per run. No timing assertions:
the figures of a run this small mean nothing (docs/benchmarks.md has the
real ones).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import impl_env

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = [(scenario, system + "/" + codec)
        for scenario in ("publish", "pubsub")
        for system in ("ours", "ours-raw")
        for codec in ("cython", "pure")]


def test_bench_quick_run_prints_its_table(tmp_path):
    report = tmp_path / "bench.json"
    out = subprocess.run(
        [sys.executable, "-m", "broker", "bench", "--quick", "--scenarios", "publish,pubsub",
         "--peers", "none", "--count", "2000", "--max-seconds", "30", "--json", str(report),
         "--warm-memory", "0.0625", "--commit-interval", "0.05"],
        env=impl_env("c"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for scenario, label in ROWS:
        assert re.search(r"^\| %s \| %s \| [\d,]+ \| [\d,.]+ \|" % (scenario, re.escape(label)),
                         out.stdout, re.M), "no row for %s %s in:\n%s" % (scenario, label, out.stdout)
    assert "### Targets (issue 5)" in out.stdout
    doc = json.loads(report.read_text())
    assert sorted((r["scenario"], r["label"]) for r in doc["results"]) == sorted(ROWS)
    assert all(not r.get("error") and r["messages"] == 2000 for r in doc["results"])
    # --warm-memory touched 64 MiB before each run (or nothing, were the
    # machine short of memory) and says so; the header names the CRC-32 kernel the compiled codec uses.
    assert re.search(r"^- warmed 0\.06 GiB of memory before each of 8 runs \(--warm-memory "
                     r"0\.0625\), [\d.]+ s in all$", out.stdout, re.M) \
        or re.search(r"^- --warm-memory 0\.0625 skipped before 8 runs", out.stdout, re.M)
    assert "- our client's auto commit interval: 0.05 s (--commit-interval;" in out.stdout
    assert doc["settings"]["commit_interval"] == 0.05
    # Every worker process kept its freed memory (glibc, unless the
    # environment set malloc's thresholds itself), and the report says so.
    from broker.client.memory import on_glibc, owner_chose
    tuned = on_glibc() and not owner_chose()
    assert all(r["malloc_tuned"] is tuned for r in doc["results"])
    assert ("kept freed memory for reuse (broker.client.tune_malloc(), glibc) in %d of 8 runs"
            % (8 if tuned else 0)) in out.stdout
    assert doc["settings"]["malloc"] == "tuned"
    assert doc["machine"]["crc32"] in ("pclmulqdq", "zlib")
    assert "CRC-32 %s;" % doc["machine"]["crc32"] in out.stdout


@pytest.mark.parametrize("kind", ["wall", "cpu"])
def test_latency_floor_with_the_brokers_shape_runs(kind):
    # bench/latency_floor.py with every piece of the broker's shape: a write
    # on the loop, an answer to the producer, and work per chunk of either
    # kind (a wall-clock spin, or a fixed count of loop iterations that a
    # slowed CPU stretches). Half a second at 2,000 msg/s: about 1,000
    # messages, each of them relayed and measured.
    out = subprocess.run(
        [sys.executable, "bench/latency_floor.py", "--rate", "2000", "--seconds", "0.5",
         "--runs", "1", "--hop", "inline", "--ack", "--work-us", "0,20", "--work-kind", kind],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    # One row per --work-us value, in the order given.
    rows = re.findall(r"^\| ([\d.]+) \| 1 \| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$",
                      out.stdout, re.M)
    assert [w for w, _ in rows] == ["0", "20"], out.stdout
    for _, n in rows:
        assert 900 <= int(n) <= 1001, out.stdout


@pytest.mark.parametrize("codec", ["cython", "pure"])
def test_batch_cost_runs(codec):
    # bench/batch_cost.py without valgrind: two brokers (5 and 25 batches of
    # 3 messages, each published, acknowledged and delivered), and the
    # broker's CPU time per batch from their difference.
    out = subprocess.run(
        [sys.executable, "bench/batch_cost.py", "--batches", "20", "--warmup", "5", "--batch", "3"]
        + (["--pure", "--pause-ms", "0"] if codec == "pure" else []),  # (and back to back)
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    # (20 batches are too few for the figures to mean anything: the two
    # brokers' start-up costs differ by more than that; the row must be there.)
    row = re.search(r"^\| %s \| 3 x 1024 B \| -?[\d.]+ \| -?\d+ \| -?\d+ \| -?[\d.]+ \|$" % codec,
                    out.stdout, re.M)
    assert row, out.stdout



_SWAP_ROWS = ["pure", "pure + compiled wire1.publish_records", "pure + compiled crc32", "cython"]


def test_pure_swap_runs():
    # bench/pure_swap.py: devlog50 against the pure broker, the pure broker
    # with one compiled function (then the compiled CRC-32) in place of its
    # pure twin, and the compiled broker; each swapped broker reports its swap.
    out = subprocess.run(
        [sys.executable, "bench/pure_swap.py", "--quick", "--rounds", "1",
         "--swap", "wire1.publish_records", "--swap", "crc32", "--", "--count", "2000",
         "--max-seconds", "30"],
        cwd=ROOT, env=impl_env("c"), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = re.findall(r"^\| (.+?) \| ([\d,]+) \| ([\d,]+) \| [\d.]+ \|$", out.stdout, re.M)
    assert [name for name, _, _ in rows] == _SWAP_ROWS, out.stdout
    assert all(each == median for _, each, median in rows), out.stdout  # one round


def test_pure_swap_refuses_a_run_without_its_swap():
    # A broker that did not make the swap (here: the hook written empty)
    # must not yield a figure that would be read as the swapped one.
    code = ("import runpy, sys; m = runpy.run_path('bench/pure_swap.py', run_name='pure_swap'); "
            "m['main'].__globals__['_HOOK'] = ''; "
            "m['main'](['--quick', '--rounds', '1', '--', '--count', '2000'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=impl_env("c"),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert "did not report its swap: not measured" in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("codec", ["cython", "pure"])
def test_ack_latency_runs(codec):
    # bench/ack_latency.py: a publisher awaiting each ACK, with 0 and then 2
    # subscribers on its topic (a broker each); every message reaches both.
    out = subprocess.run(
        [sys.executable, "bench/ack_latency.py", "--subscribers", "0,2", "--count", "50"]
        + (["--pure"] if codec == "pure" else []),
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for n, delivered in ((0, "0 of 0"), (2, "100 of 100")):
        assert re.search(r"^\| %s \| %d \| 50 \| \d+ \| \d+ \| %s \|$" % (codec, n, delivered),
                         out.stdout, re.M), out.stdout


def _hiccups():
    import importlib.util
    spec = importlib.util.spec_from_file_location("hiccups", os.path.join(ROOT, "bench", "hiccups.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hiccups_finds_the_slow_phases():
    # bench/hiccups.py's reading of its samples, on made-up ones: a run
    # every millisecond taking 10 us, except three stretches. Five slow
    # runs in a row are a phase; two slow runs are not (fewer than three);
    # slow runs 12 ms apart are two phases, not one.
    h = _hiccups()
    ms = 1_000_000
    taken = {t: 10_000 for t in range(1000)}
    for t in range(100, 105):
        taken[t] = 200_000          # 20x, a 5 ms phase
    for t in (300, 301):
        taken[t] = 100_000          # only two: no phase
    for t in (500, 501, 502, 514, 515, 516):
        taken[t] = 60_000           # 6x, then 12 ms later 6x again
    rows = [(t * ms, ns) for t, ns in sorted(taken.items())]
    med, found = h.phases(rows, factor=4.0)
    assert med == 10_000
    assert [(s // ms, n, round(x)) for s, _, n, x in found] == [(100, 5, 20), (500, 3, 6), (514, 3, 6)]
    assert found[0][1] == 104 * ms + 200_000   # a phase ends when its last slow run does
    text = h.report(rows, factor=4.0)
    assert "| 1000 | 10.0 |" in text and "| 3 | 3.00 |" in text, text
    assert "100+4 (20x), 500+2 (6x), 514+2 (6x)" in text, text   # 4.2 ms, 2.06 ms
    # With a factor above every slowdown there is nothing to report.
    assert h.phases(rows, factor=25.0)[1] == []


def test_hiccups_runs():
    # The meter itself, for a third of a second: about 300 samples, and
    # its table.
    out = subprocess.run([sys.executable, "bench/hiccups.py", "--seconds", "0.3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    row = re.search(r"^\| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \| [\d.]+ \| [\d.]+% \|", out.stdout, re.M)
    assert row, out.stdout
    assert 100 <= int(row.group(1)) <= 320, out.stdout
