"""A consumer that goes away leaves nothing running; offsets only cover what was written.

The in-process checks run tests/inproc_probe.py in a subprocess, once per
codec implementation and event loop (stdlib asyncio and uvloop): see its
docstring for what it asserts. The wire-level test checks the same resume
rule from outside, against a real ``pylogstreams serve``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import impl_env
from v0client import consumer, make_message, message_index, produce

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("inproc_probe.py")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_disconnect_mid_stream_leaves_nothing_running(impl, loop, tmp_path):
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    proc = subprocess.run(
        [sys.executable, str(PROBE), "--loop", loop, "--data-dir", str(tmp_path / "data")],
        env=impl_env(impl), cwd=str(tmp_path), capture_output=True, timeout=180)
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, "probe failed (rc=%d)\n%s\n%s" % (proc.returncode, out, err[-4000:])
    obs = json.loads(out)
    assert obs["codec"] == {"c": "cython", "py": "python"}[impl], obs["codec"]
    assert loop in obs["loop"].lower() or (loop == "asyncio" and "asyncio" in obs["loop"])
    assert obs["problems"] == [], json.dumps(obs, indent=1) + "\n" + err[-3000:]


def _tcp_max(name: str) -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/" + name).read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 8 << 20


def test_resume_point_after_disconnect_while_paused(server):
    """A consumer stops reading, the server's transport fills and pauses, the
    consumer vanishes; reconnecting with the same id it resumes no earlier
    than what it received, and no later than what the server could have
    written (what it received + kernel buffers + the transport's buffer).
    """
    srv = server()
    topic = b"resume"
    n = 30_000
    size = 1024
    produce(srv.port, topic, (make_message(i, size) for i in range(n)))
    cid = str(uuid.uuid4())
    c = consumer(srv.port, topic, 0, client_id=cid, rcvbuf=4096)
    try:
        got = c.read_deliveries(20)
        assert [m for _, m in got] == [make_message(i, size) for i in range(20)]
        # Stop reading for a while: everything the server can push piles up in
        # the kernel buffers and the transport's buffer, then it must pause.
        time.sleep(1.0)
        rcvbuf = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        received = len(got)
    finally:
        c.abort()
    frame_size = 4 + len(topic) + 1 + size
    # Upper bound on what can have been handed to the transport: the client's
    # receive buffer, the server's send buffer at its largest, the transport's
    # high-water mark and one pump's overshoot (generous: 4 MiB).
    bound_bytes = rcvbuf + _tcp_max("tcp_wmem") + (4 << 20)
    bound = received + bound_bytes // frame_size + 1
    assert bound < n // 2, "backlog too small for the bound to mean anything"
    with consumer(srv.port, topic, offset=None, client_id=cid) as r:
        first = r.read_deliveries(1)[0][1]
        idx = message_index(first)
        assert first == make_message(idx, size)
        assert received <= idx <= bound, (
            "resumed at %d: received %d, at most %d could have been written" % (idx, received, bound))
        # And from there on, contiguous.
        rest = r.read_deliveries(100)
        assert [m for _, m in rest] == [make_message(i, size) for i in range(idx + 1, idx + 101)]


def test_superseded_connection_stops_mid_stream(server):
    """CID supersession stops a running stream at once, and the new connection
    takes over without a gap: it starts no later than where the old one's
    deliveries end (v0 can't ack, so an overlap is allowed, a gap is not).
    """
    srv = server()
    topic = b"supersede"
    n = 30_000
    size = 1024
    produce(srv.port, topic, (make_message(i, size) for i in range(n)))
    cid = str(uuid.uuid4())
    old = consumer(srv.port, topic, 0, client_id=cid, rcvbuf=4096)
    try:
        got_old = [m for _, m in old.read_deliveries(20)]
        time.sleep(0.5)  # old stops reading: its stream is paused mid-way
        with consumer(srv.port, topic, offset=None, client_id=cid) as new:
            first = new.read_deliveries(1)[0][1]
            # The old connection gets what was already in flight, then nothing.
            got_old += [m for _, m in old.read_available(quiet=1.0)]
            assert old.read_available(quiet=0.5) == [], "old connection still receiving"
            k = len(got_old)
            assert got_old == [make_message(i, size) for i in range(k)], "old stream corrupt"
            assert k < n, "the old connection received the whole backlog: never stopped"
            idx = message_index(first)
            assert first == make_message(idx, size)
            assert idx <= k, "gap: old connection ended at %d, new one starts at %d" % (k, idx)
            rest = [m for _, m in new.read_deliveries(n - idx - 1, timeout=60)]
            assert rest == [make_message(i, size) for i in range(idx + 1, n)]
    finally:
        old.close()
