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
         "--runs", "1", "--hop", "inline", "--ack", "--work-us", "20", "--work-kind", kind],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    row = re.search(r"^\| 1 \| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out.stdout, re.M)
    assert row, out.stdout
    assert 900 <= int(row.group(1)) <= 1001, out.stdout


@pytest.mark.parametrize("codec", ["cython", "pure"])
def test_batch_cost_runs(codec):
    # bench/batch_cost.py without valgrind: two brokers (5 and 25 batches of
    # 3 messages, each published, acknowledged and delivered), and the
    # broker's CPU time per batch from their difference.
    out = subprocess.run(
        [sys.executable, "bench/batch_cost.py", "--batches", "20", "--warmup", "5", "--batch", "3"]
        + (["--pure"] if codec == "pure" else []),
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    # (20 batches are too few for the figures to mean anything: the two
    # brokers' start-up costs differ by more than that; the row must be there.)
    row = re.search(r"^\| %s \| 3 x 1024 B \| -?[\d.]+ \| -?\d+ \| -?\d+ \| -?[\d.]+ \|$" % codec,
                    out.stdout, re.M)
    assert row, out.stdout


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
