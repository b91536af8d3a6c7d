"""Fuzzing, the short run for CI (the long one is ``scripts/fuzz_long.py``).

Targets and the input grammar are in ``tests/fuzz_targets.py``:

- the v0 and v1 frame scanners of both implementations, fed the same
  hostile streams in the same random chunks: identical events, identical
  state, bounded buffering, chunking-independent results;
- the v1 payload parsers and the MSG builder of both implementations on
  damaged input: identical results or identical exception types;
- command handling: a real in-process broker fed the streams through fake
  transports: no exception, replies that follow docs/protocol.md, nothing
  stored that was not sent with a good CRC, every ACK honoured, nothing
  written outside the data dir, nothing left behind by a closed connection;
- the same seeded command streams through a Cython broker process and a
  pure-Python one: the same replies, example by example.

Run counts are printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as ft
from conftest import impl_env

C, PY = ft.codec_modules()
EXECUTIONS: collections.Counter = collections.Counter()
HERE = Path(__file__).resolve().parent

_FAST = settings(max_examples=200, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])
_LIMITS = st.sampled_from([16, 64, 300, 4096, 1 << 20])


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nfuzz executions: %s (total %d)"
          % (json.dumps(dict(EXECUTIONS), sort_keys=True), sum(EXECUTIONS.values())))


def test_both_implementations_are_fuzzed():
    """The twins are only compared if the Cython build is there."""
    assert C is not None, "the Cython codec is not built: nothing to compare the pure twin with"


@_FAST
@given(data=st.data(), limit=_LIMITS)
def test_v0_scanner_twins(data, limit):
    src = ft.HypothesisSource(data)
    stream = ft.v0_stream(src) if src.chance(3, 4) else ft.any_stream(src)
    ft.check_frames(C, PY, ft.chunked(src, stream), limit)
    EXECUTIONS["v0 scanner"] += 1


@_FAST
@given(data=st.data(), limit=_LIMITS)
def test_v1_scanner_twins(data, limit):
    src = ft.HypothesisSource(data)
    stream = ft.v1_stream(src) if src.chance(3, 4) else ft.any_stream(src)
    ft.check_v1_reader(C, PY, ft.chunked(src, stream), limit)
    EXECUTIONS["v1 scanner"] += 1


@_FAST
@given(chunks=st.lists(st.binary(max_size=64), max_size=8), limit=_LIMITS)
def test_scanners_on_raw_bytes(chunks, limit):
    ft.check_frames(C, PY, chunks, limit)
    ft.check_v1_reader(C, PY, chunks, limit)
    EXECUTIONS["raw bytes, both scanners"] += 1


@_FAST
@given(data=st.data())
def test_payload_parsers_twins(data):
    ft.check_payloads(C, PY, ft.HypothesisSource(data))
    EXECUTIONS["payload parsers"] += 1


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = ft.CommandHarness(str(tmp_path_factory.mktemp("fuzz-broker")))
    yield h
    h.close()


@pytest.fixture(scope="module")
def auth_harness(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-auth")
    users = ft.write_auth_file(str(root.parent / ("users-%s.toml" % root.name)), True)
    h = ft.CommandHarness(str(root), auth_file=users)
    yield h
    h.close()


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_command_handling(harness, data):
    """In-process broker (this process's codec), no auth."""
    src = ft.HypothesisSource(data)
    harness.run(ft.chunked(src, ft.any_stream(src)))
    EXECUTIONS["commands"] += 1


def test_command_handling_store_is_sound(harness):
    """After the examples above: the log holds only what was sent, every ACK holds."""
    assert harness.executions >= 50
    checked = harness.check_store()
    print("\ncommand fuzz: %d stored messages checked, %d ACKed batches found in the log"
          % (checked, len(harness.acked)))


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_command_handling_with_auth(auth_harness, data):
    """The same, with a users file and anonymous access allowed (restricted)."""
    src = ft.HypothesisSource(data)
    auth_harness.run(ft.chunked(src, ft.any_stream(src)))
    EXECUTIONS["commands with auth"] += 1


def test_command_handling_with_auth_store_is_sound(auth_harness):
    assert auth_harness.executions >= 30
    auth_harness.check_store()
    # Anonymous clients may publish to "a" only; alice to chat.*, a, x*.
    for name in auth_harness.broker.store.topics:
        topic = auth_harness.broker.store.topics[name]
        if topic.end_offset > topic.start_offset:
            assert name == "a" or name.startswith(("chat.", "x")), (
                "messages stored in %s, which nobody may publish to" % name)


DIFF_EXAMPLES = 2000


def _differential(impl: str, tmp_path, seed: int) -> dict:
    env = impl_env(impl)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env["PYTHONPATH"]])
    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzz_targets.py"), "differential", "--seed", str(seed),
         "--examples", str(DIFF_EXAMPLES)],
        env=env, cwd=str(tmp_path), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(proc.stdout)


def test_command_handling_cython_and_python_agree(tmp_path, seed=int(os.environ.get("FUZZ_SEED", "1"))):
    """Two broker processes, one per codec, the same seeded streams: the same answers."""
    c = _differential("c", tmp_path, seed)
    py = _differential("py", tmp_path, seed)
    assert (c["codec"], py["codec"]) == ("cython", "python")
    assert c["executions"] == py["executions"] == DIFF_EXAMPLES
    for i, (a, b) in enumerate(zip(c["transcript"], py["transcript"])):
        assert a == b, "example %d (seed %d): cython %r, python %r" % (i, seed, a, b)
    assert c["stored_checked"] == py["stored_checked"]
    assert c["acked_batches"] > 0, "no PUB was ever acknowledged: the grammar is too hostile"
    EXECUTIONS["commands, differential (2 processes)"] += 2 * DIFF_EXAMPLES
