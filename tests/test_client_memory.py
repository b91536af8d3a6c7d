"""``broker.client.tune_malloc``: freed memory stays in the process (glibc).

What it is for: a consumer's memory rises and falls by megabytes, and
glibc's defaults hand every freed megabyte back to the kernel and fault it
in again (docs/benchmarks.md). Each test runs in a fresh interpreter,
since the setting is the whole process's and cannot be undone.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from broker.client import tune_malloc
from broker.client.memory import on_glibc, owner_chose

GLIBC = on_glibc()
# Without the environment's own settings: the child processes get none.
_CLEAN = {k: v for k, v in os.environ.items()
          if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

# A consumer's pattern in small: 4 MiB of 1 KiB values made and dropped,
# 40 times over; prints the minor page faults taken by the last 30 rounds
# (the first ones fill the heap either way).
_CHURN = r"""
import sys
from broker.client import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tuned" else False

def faults():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])

SOURCE = bytes(range(256)) * 4

def round_():
    values = [SOURCE[:1000] + b"%4d" % i for i in range(4096)]
    del values

for _ in range(10):
    round_()
before = faults()
for _ in range(30):
    round_()
print(applied, faults() - before)
"""


def _churn(mode: str, env: dict | None = None) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True,
                         timeout=60, env=dict(_CLEAN, **(env or {})))
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="mallopt's thresholds are glibc's; elsewhere tune_malloc does nothing")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    _, default = _churn("default")
    if default < 30 * 500:
        # glibc's defaults give the freed top of the heap back every round:
        # a thousand 4 KiB pages faulted in again per round. Not so where
        # the heap is backed by huge pages.
        pytest.skip("no page-by-page churn here to take away (%d faults in 30 rounds)" % default)
    applied, tuned = _churn("tuned")
    assert applied
    assert tuned < default // 20, (tuned, default)


@pytest.mark.skipif(not GLIBC, reason="mallopt's thresholds are glibc's; elsewhere tune_malloc does nothing")
@pytest.mark.parametrize("env", [
    {"MALLOC_TRIM_THRESHOLD_": "131072"},
    {"MALLOC_MMAP_THRESHOLD_": "131072"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
    {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.mmap_threshold=131072"},
])
def test_the_environments_settings_win(env):
    # The process's owner chose already (glibc reads these at start): the
    # call leaves the process as it is and says so.
    applied, faults = _churn("tuned", env)
    assert not applied
    _, default = _churn("default")
    assert faults > default // 4, (faults, default)


def test_owner_chose_reads_the_environment(monkeypatch):
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert not owner_chose()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")  # another tunable
    assert not owner_chose()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:glibc.malloc.trim_threshold=1")
    assert owner_chose()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert owner_chose()


def test_thresholds_out_of_range_are_refused(monkeypatch):
    import ctypes

    def never(*args, **kwargs):
        raise AssertionError("mallopt reached with a threshold out of range")
    monkeypatch.setattr(ctypes, "CDLL", never)  # this process's malloc stays as it is
    for kwargs in ({"mmap_threshold": 0}, {"trim_threshold": 0}, {"trim_threshold": -1},
                   {"mmap_threshold": 1 << 31}, {"trim_threshold": 1 << 31}):
        with pytest.raises(ValueError):
            tune_malloc(**kwargs)


def test_on_another_c_library_it_does_nothing(monkeypatch):
    # musl has a mallopt that ignores these parameters: not called at all.
    import ctypes
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2.4"))
    monkeypatch.setattr(ctypes, "CDLL", None)  # any call would raise
    assert tune_malloc() is False
