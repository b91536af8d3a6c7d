"""Per-topic settings set live through v1 CFG, the client and the CLI.

They must apply at once, survive a restart (persisted in the topic's
config.json) and be refused with BAD_REQUEST when unknown or invalid.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from broker.client import BadRequest, Client, InvalidTopicError
from v1support import unique


def _cli(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker", "topic-config", "--port", str(port),
                           *args], capture_output=True, text=True, timeout=30)


def test_client_reads_changes_and_resets_settings(server):
    srv = server("--retention-ms", "-1")
    t = unique("cfg")
    with Client("127.0.0.1", srv.port) as c:
        c.publish(t, b"x")
        before = c.topic_config(t)
        assert before["retention_ms"] == -1 and before["fsync"] == "interval"
        after = c.topic_config(t, retention_bytes=1_000_000, fsync="always")
        assert after["retention_bytes"] == 1_000_000 and after["fsync"] == "always"
        assert c.topic_config(t) == after
        # fsync=always now: a publish is acknowledged only after its fsync.
        fsyncs = c.stats().get("disk_fsyncs", 0)
        c.publish(t, b"y")
        assert c.stats().get("disk_fsyncs", 0) > fsyncs
        reset = c.topic_config(t, fsync=None)
        assert reset["fsync"] == "interval" and reset["retention_bytes"] == 1_000_000
    stored = json.loads((srv.data_dir / "topics" / t / "config.json").read_text())
    assert stored == {"retention_bytes": 1_000_000}
    srv.restart()
    with Client("127.0.0.1", srv.port) as c:
        assert c.topic_config(t)["retention_bytes"] == 1_000_000


def test_bad_settings_are_refused(server):
    srv = server()
    t = unique("cfg")
    with Client("127.0.0.1", srv.port) as c:
        with pytest.raises(BadRequest):
            c.topic_config(t, bogus=1)
        with pytest.raises(BadRequest):
            c.topic_config(t, fsync="sometimes")
        with pytest.raises(BadRequest):
            c.topic_config(t, retention_ms=-5)
        with pytest.raises(InvalidTopicError):
            c.topic_config("../etc", retention_ms=1)
        assert c.topic_config(t)["retention_ms"] == 7 * 24 * 3600 * 1000


def test_cli_topic_config(server):
    srv = server()
    t = unique("cfg")
    shown = _cli(srv.port, t, "--retention-ms", "5000", "--fsync", "never")
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(": ", 1) for line in shown.stdout.splitlines())
    assert lines["retention_ms"] == "5000" and lines["fsync"] == "never"
    reset = _cli(srv.port, t, "--reset", "fsync")
    assert reset.returncode == 0 and "fsync: interval" in reset.stdout
    bad = _cli(srv.port, "a/b")
    assert bad.returncode != 0 and "invalid topic" in bad.stderr
