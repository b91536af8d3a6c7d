"""The client tools: ``pylogstreams pub | sub | topics | offsets | stats``.

Each runs as a real process (the installed ``pylogstreams`` script when there
is one, else ``python -m broker``) in the environment of the implementation
under test (``py``: the tools use the pure codec too), against a real broker.
stderr is a pipe here, never a terminal: no progress bar may appear on it,
so no ``\\r``; one test gives a tool a terminal to see that the bar is there.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from broker import Client
from conftest import impl_env
from v1support import HOST, free_port, unique
from v1support import shared_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

TOOL_TIMEOUT = 60.0

_SCRIPT = shutil.which("pylogstreams")
COMMAND = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "broker"]


def tool(impl, port, *args, input: bytes | None = None, timeout: float = TOOL_TIMEOUT):
    """Run one tool to completion; returns the CompletedProcess (bytes)."""
    argv = [*COMMAND, args[0], "--host", HOST, "--port", str(port), *args[1:]]
    return subprocess.run(argv, input=input, capture_output=True, env=impl_env(impl),
                          timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)


def ok(proc) -> bytes:
    assert proc.returncode == 0, "rc=%s stderr=%r" % (proc.returncode, proc.stderr[-2000:])
    assert b"\r" not in proc.stderr, "progress output on a pipe: %r" % proc.stderr[-200:]
    return proc.stdout


def client(port, **kw) -> Client:
    return Client(HOST, port, heartbeat=0, reconnect=False, **kw)


# -- pub / sub --------------------------------------------------------------------------

def test_pub_message_verbose_prints_the_offset(shared_server, impl):
    port = shared_server.port
    t = unique("cli")
    assert ok(tool(impl, port, "pub", t, "hello", "-v")) == b"0\n"
    assert ok(tool(impl, port, "pub", t, "wörld", "--verbose")) == b"1\n"
    assert ok(tool(impl, port, "pub", t, "quiet")) == b""
    assert ok(tool(impl, port, "sub", t, "--from", "oldest", "--count", "3")) == \
        "hello\nwörld\nquiet\n".encode()


def test_pub_stdin_verbose_prints_every_offset(shared_server, impl):
    port = shared_server.port
    t = unique("cli")
    ok(tool(impl, port, "pub", t, "first"))
    out = ok(tool(impl, port, "pub", t, "-v", "--batch", "3", input=b"a\nb\nc\nd\ne\n"))
    assert out == b"1\n2\n3\n4\n5\n"


def test_100k_lines_through_pub_into_sub(shared_server, impl):
    """100,000 lines piped into pub, read back by a sub started first: byte for byte."""
    port = shared_server.port
    t = unique("bulk")
    n = 100_000
    lines = []
    for i in range(n):
        if i % 10_007 == 0:
            lines.append(b"")                            # an empty line is an empty message
        elif i % 3 == 0:
            lines.append(("%06d héllo wörld\t|%s" % (i, "x" * (i % 50))).encode())
        else:
            lines.append(b"%06d %s" % (i, bytes([33 + i % 90]) * (i % 17)))
    data = b"\n".join(lines) + b"\n"
    sub = subprocess.Popen([*COMMAND, "sub", t, "--host", HOST, "--port", str(port),
                            "--from", "oldest", "--count", str(n)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=impl_env(impl))
    try:
        pub = tool(impl, port, "pub", t, input=data, timeout=TOOL_TIMEOUT)
        ok(pub)
        assert pub.stdout == b""
        out, err = sub.communicate(timeout=TOOL_TIMEOUT)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate(timeout=10)
    assert sub.returncode == 0, err[-2000:]
    assert b"\r" not in err and b"\r" not in pub.stderr
    assert len(out) == len(data)
    assert out == data, "first difference at line %d" % next(
        i for i, (a, b) in enumerate(zip(out.split(b"\n"), lines)) if a != b)
    with client(port) as c:
        row = {r["topic"]: r for r in c.topics()}[t]
        assert row["messages"] == n and row["next_offset"] == n


def test_sub_json(shared_server, impl):
    port = shared_server.port
    t = unique("json")
    values = [b"plain", "ünïcode".encode(), b"bad \xff utf-8", b'quote " and \\ backslash']
    before = int(time.time() * 1000)
    with client(port) as c:
        c.publish_batch(t, values)
    out = ok(tool(impl, port, "sub", t, "--from", "oldest", "--count", "4", "--format", "json"))
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert len(rows) == 4
    for i, (row, value) in enumerate(zip(rows, values)):
        assert set(row) == {"topic", "offset", "timestamp", "value"}
        assert row["topic"] == t and row["offset"] == i
        assert isinstance(row["timestamp"], int) and before - 5000 <= row["timestamp"] <= time.time() * 1000 + 5000
        assert row["value"] == value.decode("utf-8", "backslashreplace")


def test_sub_from_offset_and_time(shared_server, impl):
    port = shared_server.port
    t = unique("from")
    with client(port) as c:
        c.publish_batch(t, [b"a0", b"a1", b"a2"])
        time.sleep(0.05)   # time is the subject: the next batch gets a later timestamp
        c.publish_batch(t, [b"b3", b"b4"])
        sub = c.subscribe(t, "oldest")
        stamps = [m.timestamp for m in (next(sub) for _ in range(5))]
    assert ok(tool(impl, port, "sub", t, "--from", "2", "--count", "2")) == b"a2\nb3\n"
    # An ISO 8601 time (local, naive, like a user would type it) of message 3.
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(stamps[3] / 1000)) \
        + ".%03d" % (stamps[3] % 1000)
    assert ok(tool(impl, port, "sub", t, "--from", when, "--count", "2")) == b"b3\nb4\n"


def test_sub_from_latest_waits_for_new_messages(shared_server, impl):
    port = shared_server.port
    t = unique("latest")
    with client(port) as c:
        c.publish(t, b"old")
        sub = subprocess.Popen([*COMMAND, "sub", t, "--host", HOST, "--port", str(port),
                                "--from", "latest", "--count", "1"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=impl_env(impl))
        try:
            # Publish only once the broker shows the subscription (a state, polled
            # with a deadline), so "latest" is decided before the new message.
            deadline = time.monotonic() + 30
            while {r["topic"]: r for r in c.topics()}[t]["subscribers"] == 0:
                assert time.monotonic() < deadline, "sub never subscribed"
                assert sub.poll() is None, sub.communicate()[1]
                time.sleep(0.02)
            c.publish(t, b"new")
            out, err = sub.communicate(timeout=TOOL_TIMEOUT)
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.communicate(timeout=10)
    assert sub.returncode == 0, err
    assert out == b"new\n"


def test_sub_with_client_id_commits_without_does_not(shared_server, impl):
    port = shared_server.port
    t = unique("offs")
    cid = "cli-" + uuid.uuid4().hex[:8]
    with client(port) as c:
        c.publish_batch(t, [b"1", b"2", b"3", b"4"])
    assert ok(tool(impl, port, "sub", t, "--from", "oldest", "--count", "2")) == b"1\n2\n"
    with client(port) as c:
        assert [r for r in c.offsets() if r["topic"] == t] == [], \
            "sub without --client-id stored offsets under a made-up id"
    assert ok(tool(impl, port, "sub", t, "--client-id", cid, "--count", "3")) == b"1\n2\n3\n"
    # The next run with the same id continues after what the last one printed.
    assert ok(tool(impl, port, "sub", t, "--client-id", cid, "--count", "1")) == b"4\n"
    with client(port) as c:
        assert [(r["client_id"], r["offset"], r["lag"]) for r in c.offsets(cid)] == [(cid, 4, 0)]


# -- topics / offsets / stats ------------------------------------------------------------

def _table(out: bytes) -> tuple[list[str], list[list[str]]]:
    lines = out.decode().splitlines()
    assert lines, "empty output"
    return lines[0].split(), [line.split() for line in lines[1:]]


def test_topics_offsets_stats(shared_server, impl):
    port = shared_server.port
    t = unique("admin")
    cid = "adm-" + uuid.uuid4().hex[:8]
    with client(port, client_id=cid) as c:
        c.publish_batch(t, [b"x" * 10, b"y" * 20, b"z" * 30])
        c.commit(t, 2)
    head, rows = _table(ok(tool(impl, port, "topics")))
    assert head == ["topic", "messages", "bytes", "first_offset", "next_offset"]
    assert [t, "3", str(3 * 24 + 60), "0", "3"] in rows
    head, rows = _table(ok(tool(impl, port, "offsets", "--client-id", cid)))
    assert head == ["client_id", "topic", "offset", "end_offset", "lag"]
    assert rows == [[cid, t, "2", "3", "1"]]
    head, rows = _table(ok(tool(impl, port, "offsets")))
    assert [cid, t, "2", "3", "1"] in rows
    assert ok(tool(impl, port, "offsets", "--client-id", "nobody-" + uuid.uuid4().hex)) == b"(none)\n"
    lines = ok(tool(impl, port, "stats")).decode().splitlines()
    stats = dict(line.split(": ", 1) for line in lines)
    assert len(stats) == len(lines) and len(lines) > 5
    assert stats["codec"] == {"c": "cython", "py": "python"}[impl]
    assert int(stats["messages_in"]) >= 3
    assert lines == sorted(lines)


@pytest.mark.parametrize("stdin", [False, True], ids=["argument", "stdin"])
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_pub_refused_by_the_broker(shared_server, impl, stdin, verbose):
    """A refused publish fails the run, with or without -v, from stdin too."""
    args = ["pub", "no spaces"] + ([] if stdin else ["x"]) + (["-v"] if verbose else [])
    proc = tool(impl, shared_server.port, *args, input=b"x\ny\n" if stdin else None)
    assert proc.returncode != 0, "a refused publish exited 0"
    assert proc.stdout == b""
    err = proc.stderr.decode().strip()
    assert "\n" not in err and "invalid topic" in err, err


def test_bad_from_is_a_usage_error(shared_server, impl):
    proc = tool(impl, shared_server.port, "sub", "t", "--from", "yesterday-ish")
    assert proc.returncode == 2
    assert b"--from" in proc.stderr


# -- the broker is down --------------------------------------------------------------------

DOWN_CASES = {
    "pub": (["pub", "t", "message"], None),
    "pub-stdin": (["pub", "t"], b"line one\nline two\n"),
    "sub": (["sub", "t", "--count", "1"], None),
    "topics": (["topics"], None),
    "offsets": (["offsets"], None),
    "stats": (["stats"], None),
}


def test_every_tool_fails_cleanly_when_the_broker_is_down(impl):
    port = free_port()
    procs = {}
    for name, (args, stdin) in DOWN_CASES.items():   # all at once: they only wait for imports
        argv = [*COMMAND, args[0], "--host", HOST, "--port", str(port), *args[1:]]
        procs[name] = (subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=impl_env(impl)), stdin)
    problems = []
    for name, (proc, stdin) in procs.items():
        try:
            out, err = proc.communicate(stdin, timeout=TOOL_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
            problems.append("%s: still running after %.0fs" % (name, TOOL_TIMEOUT))
            continue
        text = err.decode(errors="replace").strip()
        if proc.returncode == 0:
            problems.append("%s: exit code 0" % name)
        if out:
            problems.append("%s: printed %r" % (name, out[:100]))
        if "\n" in text or not text:
            problems.append("%s: not a one-line error: %r" % (name, text[-500:]))
        elif "not reachable" not in text or str(port) not in text:
            problems.append("%s: unclear error: %r" % (name, text))
    assert not problems, "\n".join(problems)


def test_sub_exits_with_an_error_when_the_broker_goes_away(server, impl):
    srv = server()
    with client(srv.port) as c:
        c.publish("gone", b"first")
    sub = subprocess.Popen([*COMMAND, "sub", "gone", "--host", HOST, "--port", str(srv.port),
                            "--from", "oldest"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=impl_env(impl))
    try:
        ready, _, _ = select.select([sub.stdout], [], [], TOOL_TIMEOUT)
        assert ready, "sub printed nothing"
        assert sub.stdout.readline() == b"first\n"
        srv.stop()
        out, err = sub.communicate(timeout=TOOL_TIMEOUT)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate(timeout=10)
    assert sub.returncode not in (0, None)
    text = err.decode().strip()
    assert "\n" not in text and "lost" in text, text


# -- the progress bar --------------------------------------------------------------------------

def test_progress_bar_only_on_a_terminal(shared_server, impl):
    """With stderr a terminal, sub draws its bar (\\r ... newline); piped, it never does."""
    port = shared_server.port
    t = unique("tty")
    with client(port) as c:
        c.publish_batch(t, [b"m%d" % i for i in range(50)])
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*COMMAND, "sub", t, "--host", HOST, "--port", str(port),
                                 "--from", "oldest", "--count", "50"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                                env=impl_env(impl))
        os.close(slave)
        slave = -1
        out, _ = proc.communicate(timeout=TOOL_TIMEOUT)
        shown = b""
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is gone
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    assert out == b"".join(b"m%d\n" % i for i in range(50))
    assert b"\r" in shown and re.search(rb"50/50", shown), shown
    piped = tool(impl, port, "sub", t, "--from", "oldest", "--count", "50")
    assert ok(piped) == out and piped.stderr == b""
