"""Fixtures for the integration tests: a real ``pylogstreams serve`` process.

Every integration test runs once per codec implementation through the
``impl`` fixture (ids ``c`` and ``py``, module-scoped so pytest groups the
runs by implementation). ``c`` requires the server to report
``codec=cython`` in its ready line, so a broken build fails instead of
quietly testing the pure twin; ``py`` sets ``PYLOGSTREAMS_NO_EXTENSIONS=1``
and requires ``codec=python``.

The ``server`` fixture is a factory: ``srv = server("--heartbeat-timeout",
"1")`` starts a broker on a free port in a fresh sandbox and waits for its
ready line (a reader thread, no sleep-polling). ``srv.stop()`` sends
SIGTERM and asserts exit code 0, ``srv.kill()`` sends SIGKILL,
``srv.start()`` starts it again on the same data dir. Each server's stderr
goes to a file (so the pipe can never fill); its tail is printed when a test
fails. Every process is killed at teardown whatever happened.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("broker") is None:  # plain `pytest` without an install
    sys.path.insert(0, str(REPO))
_spec = importlib.util.find_spec("broker")
# The directory the `broker` package is imported from: the server processes
# import it from the same place as this test process does.
BROKER_ROOT = str(Path(_spec.origin).resolve().parent.parent) if _spec and _spec.origin else str(REPO)

IMPLS = {"c": "cython", "py": "python"}  # fixture id -> codec named in the ready line
READY_TIMEOUT = 30.0   # seconds for a server to print its ready line
STOP_TIMEOUT = 30.0    # seconds for SIGTERM to finish (flush + fsync)

READY_RE = re.compile(
    r"^pylogstreams serving on (?P<host>\S+):(?P<port>\d+) data-dir=(?P<data_dir>.+) "
    r"codec=(?P<codec>cython|python)$")


def impl_env(impl: str) -> dict:
    """The environment a server (or probe) of implementation ``impl`` runs in."""
    env = dict(os.environ)
    env.pop("PYLOGSTREAMS_NO_EXTENSIONS", None)
    if impl == "py":
        env["PYLOGSTREAMS_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (BROKER_ROOT, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ appearing in sandboxes
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Make the child get SIGKILL if pytest dies, so no broker outlives a run.

    Linux ties this to the *thread* that forked: start servers from the main
    thread (or a thread that outlives them).
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ServerProcess:
    """One broker data dir, and the server process currently serving it."""

    def __init__(self, impl: str, sandbox: Path, extra_args, log_dir: Path, name: str) -> None:
        self.impl = impl                      # "c" or "py": decides the environment
        self.expect_codec = IMPLS[impl]       # what the ready line must say
        self.sandbox = sandbox                # the server's cwd; holds data_dir and nothing else
        self.data_dir = sandbox / "data"      # --data-dir
        self.extra_args = [str(a) for a in extra_args]
        self.log_dir = log_dir
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.ready_line: str | None = None
        self.runs = 0                         # how many times a process was started
        self.log_paths: list[Path] = []
        self.stdout_lines: list[str] = []     # stdout lines after the ready line
        self.command = [sys.executable, "-m", "broker"]  # how the CLI is invoked
        self.sandbox_before: set | None = None  # sandbox entries before the first start

    @property
    def argv(self) -> list[str]:
        return [*self.command, "serve", "--host", "127.0.0.1", "--port", "0",
                "--data-dir", str(self.data_dir), *self.extra_args]

    def start(self, port: int | None = None) -> "ServerProcess":
        """Start a server on the data dir and wait for its ready line.

        ``port`` reuses a given port instead of a fresh ephemeral one.
        """
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if self.sandbox_before is None:
            self.sandbox_before = set(os.listdir(self.sandbox))
        self.runs += 1
        log_path = self.log_dir / ("%s-run%d.stderr.log" % (self.name, self.runs))
        self.log_paths.append(log_path)
        argv = self.argv
        if port is not None:
            argv[argv.index("--port") + 1] = str(port)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=str(self.sandbox), env=impl_env(self.impl), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=log, preexec_fn=_die_with_parent)
        lines: queue.Queue = queue.Queue()
        proc = self.proc
        extra = self.stdout_lines

        def pump() -> None:
            first = True
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if first:
                    lines.put(line)
                    first = False
                else:
                    extra.append(line)
            if first:
                lines.put(None)  # EOF before any line: the process died

        threading.Thread(target=pump, name="stdout-" + self.name, daemon=True).start()
        try:
            line = lines.get(timeout=READY_TIMEOUT)
        except queue.Empty:
            self.kill()
            raise AssertionError("no ready line within %.0fs\n%s" % (READY_TIMEOUT, self.log_tail()))
        if line is None:
            rc = proc.wait(10)
            raise AssertionError("server exited (rc=%s) before its ready line\n%s"
                                 % (rc, self.log_tail()))
        m = READY_RE.match(line)
        assert m, "malformed ready line %r\n%s" % (line, self.log_tail())
        self.ready_line = line
        assert m["host"] == "127.0.0.1", line
        assert Path(m["data_dir"]).resolve() == self.data_dir.resolve(), line
        assert m["codec"] == self.expect_codec, (
            "implementation %r must run codec=%s, ready line says %r (broken build?)\n%s"
            % (self.impl, self.expect_codec, line, self.log_tail()))
        self.port = int(m["port"])
        assert self.port > 0, line
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` and return the exit code (killing it if it hangs)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("server did not exit within %.0fs of signal %d\n%s"
                                 % (timeout, sig, self.log_tail()))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """Graceful stop: the server must exit with code 0."""
        rc = self.signal_stop(sig, timeout)
        assert rc == 0, "server exited with %r after signal %d\n%s" % (rc, sig, self.log_tail())

    def kill(self) -> None:
        """kill -9, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def restart(self, sig: int | None = signal.SIGTERM) -> "ServerProcess":
        """Stop (gracefully with ``sig``, or kill -9 with ``sig=None``) and start again."""
        if sig is None:
            self.kill()
        else:
            self.stop(sig)
        return self.start()

    def log_text(self) -> str:
        parts = []
        for p in self.log_paths:
            try:
                parts.append("--- %s ---\n%s" % (p.name, p.read_text("utf-8", "replace")))
            except OSError:
                pass
        return "\n".join(parts)

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_text().splitlines()
        return "\n".join(lines[-n:])


def pytest_addoption(parser):
    parser.addoption("--impl", default="c,py",
                     help="codec implementations to run the integration tests on "
                          "(comma-separated subset of: c, py; default both)")


@pytest.fixture(scope="module", params=sorted(IMPLS), ids=sorted(IMPLS))
def impl(request) -> str:
    """``"c"`` or ``"py"``: which codec the broker under test must run."""
    wanted = {s.strip() for s in request.config.getoption("--impl").split(",")}
    if request.param not in wanted:
        pytest.skip("implementation %s not selected (--impl)" % request.param)
    return request.param


@pytest.fixture
def server(impl, tmp_path, request):
    """Factory: ``server(*extra_cli_args, start=True)`` -> :class:`ServerProcess`."""
    made: list[ServerProcess] = []

    def factory(*extra_args, start: bool = True) -> ServerProcess:
        n = len(made)
        sandbox = tmp_path / ("sandbox%d" % n)
        sandbox.mkdir()
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        srv = ServerProcess(impl, sandbox, extra_args, logs, "server%d" % n)
        made.append(srv)
        if start:
            srv.start()
        return srv

    yield factory
    for srv in made:
        srv.kill()
        if srv.proc is not None and srv.proc.stdout is not None:
            srv.proc.stdout.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for srv in made:
            print("==== %s (%s) stderr tail ====\n%s" % (srv.name, srv.impl, srv.log_tail(80)))
    # Every test also checks that the broker created nothing outside its data
    # dir in its working directory (the sandbox holds the data dir only).
    for srv in made:
        if srv.sandbox_before is not None:
            stray = set(os.listdir(srv.sandbox)) - srv.sandbox_before - {srv.data_dir.name}
            assert not stray, "%s created %r outside its data dir" % (srv.name, sorted(stray))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep


@pytest.fixture(autouse=True)
def _hang_guard(request):
    """Last resort against a hung test: dump every stack and abort the run.

    Every wait in these tests has its own deadline; this only fires if one
    was forgotten, so CI ends with a traceback instead of its time limit.
    """
    import faulthandler
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
