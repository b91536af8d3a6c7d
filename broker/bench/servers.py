"""The servers a benchmark run talks to: ours, redis-server, nats-server.

Each is started on a free loopback port in its own temporary directory,
in its own session (so a Ctrl-C on the terminal reaches the harness, which
then stops the servers in order, rather than killing them mid-write), and
stopped with SIGTERM (SIGKILL after a grace period). Every server started
is registered in :data:`_LIVE` until stopped; :func:`stop_all` is called
from the harness's ``finally`` and from ``atexit``, so nothing outlives
the benchmark.

:class:`ProcStats` reads a server's CPU time and memory from ``/proc``
(no psutil needed): CPU seconds are ``utime + stime`` of the whole process
(all threads), peak RSS is ``VmHWM``.
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["ServerError", "Server", "OursServer", "RedisServer", "NatsServer", "ProcStats",
           "free_port", "stop_all", "SERVER_KINDS"]

READY_TIMEOUT = 30.0   # seconds for a server to accept connections
STOP_TIMEOUT = 30.0    # seconds SIGTERM gets (our broker flushes and fsyncs)

_LIVE: list["Server"] = []  # started and not yet stopped
_SERVE_HELP: str | None = None  # `serve --help` text, read once
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ServerError(RuntimeError):
    """A server could not be started (missing binary, crashed, never ready)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError("exited with code %s before accepting connections" % proc.returncode)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerError("not accepting connections on port %d after %.0f s" % (port, timeout))


class ProcStats:
    """CPU seconds and memory of one process, from /proc/<pid>."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (every thread), in seconds."""
        try:
            with open("/proc/%d/stat" % self.pid, "rb") as f:
                data = f.read()
        except OSError:
            return float("nan")
        # The command name (field 2) may contain spaces: split after its ")".
        fields = data[data.rindex(b")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK   # utime, stime

    def memory(self) -> dict:
        """``{"rss": bytes, "hwm": bytes}``: resident now and peak resident."""
        out = {"rss": 0, "hwm": 0}
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out["rss"] = int(line.split()[1]) * 1024
                    elif line.startswith("VmHWM:"):
                        out["hwm"] = int(line.split()[1]) * 1024
        except OSError:
            pass
        return out


class Server:
    """A child server process in a temporary directory."""

    kind = "?"           # "ours", "redis", "nats"

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.tmpdir = ""
        self.log_path = ""
        self.stats: ProcStats | None = None
        self.description = ""   # version / settings, for the report

    def command(self) -> list[str]:
        raise NotImplementedError

    def _spawn(self, argv: list[str], env: dict | None = None) -> None:
        self.log_path = os.path.join(self.tmpdir, "server.log")
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=log, env=env, cwd=self.tmpdir,
                                         start_new_session=True)
        finally:
            log.close()
        _LIVE.append(self)
        self.stats = ProcStats(self.proc.pid)
        # Drain stdout in a thread so that a chatty server never blocks on a full pipe.
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump_stdout, daemon=True).start()

    def _pump_stdout(self) -> None:
        for raw in self.proc.stdout:
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._lines.put(None)

    def start(self) -> "Server":
        raise NotImplementedError

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except ProcessLookupError:
                pass
        if self in _LIVE:
            _LIVE.remove(self)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = ""

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class OursServer(Server):
    """``python -m broker serve --port 0`` in a temporary data dir.

    ``wrapper`` goes in front of the command (``valgrind --tool=callgrind
    ...`` for bench/batch_cost.py), ``ready_timeout`` replaces
    READY_TIMEOUT (such a wrapper starts it 20-50 times slower).
    """

    kind = "ours"

    def __init__(self, pure: bool, fsync: str = "interval", extra: tuple = (),
                 wrapper: tuple = (), ready_timeout: float = READY_TIMEOUT) -> None:
        super().__init__()
        self.pure = pure
        self.fsync = fsync
        self.extra = list(extra)
        self.wrapper = list(wrapper)
        self.ready_timeout = ready_timeout
        self.codec = ""

    @staticmethod
    def connection_limit_options(n: int) -> tuple:
        """``serve`` options that allow ``n`` connections from one address, where they exist."""
        global _SERVE_HELP
        if _SERVE_HELP is None:
            out = subprocess.run([sys.executable, "-m", "broker", "serve", "--help"],
                                 capture_output=True, text=True, timeout=60)
            _SERVE_HELP = out.stdout
        opts: tuple = ()
        for name in ("--max-connections", "--max-connections-per-ip"):
            if name + " " in _SERVE_HELP or name + "\n" in _SERVE_HELP:
                opts += (name, str(max(n, 20_000)))
        return opts

    def start(self) -> "OursServer":
        self.tmpdir = tempfile.mkdtemp(prefix="plsbench-ours-")
        env = dict(os.environ)
        env.pop("PYLOGSTREAMS_NO_EXTENSIONS", None)
        env["PYTHONUNBUFFERED"] = "1"
        argv = self.wrapper + [
            sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1", "--port", "0",
            "--data-dir", os.path.join(self.tmpdir, "data"), "--fsync", self.fsync,
            "--log-level", "warning"] + (["--pure"] if self.pure else []) + self.extra
        self._spawn(argv, env)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                tail = self.log_tail()
                self.stop()
                raise ServerError("pylogstreams did not start:\n" + tail)
            if line.startswith("pylogstreams serving on "):
                break
        # "pylogstreams serving on HOST:PORT data-dir=... codec=cython"
        parts = line.split()
        self.port = int(parts[3].rsplit(":", 1)[1])
        self.codec = parts[-1].split("=", 1)[1]
        want = "python" if self.pure else "cython"
        if self.codec != want:
            self.stop()
            raise ServerError("pylogstreams reports codec=%s, expected %s (is the Cython "
                              "build broken?)" % (self.codec, want))
        from .. import __version__
        self.description = "pylogstreams %s codec=%s fsync=%s" % (__version__, self.codec, self.fsync)
        return self


class RedisServer(Server):
    """redis-server with AOF on; ``appendfsync`` follows our ``--fsync``."""

    kind = "redis"
    _APPENDFSYNC = {"always": "always", "interval": "everysec", "never": "no"}

    def __init__(self, fsync: str = "interval", maxclients: int = 10_000) -> None:
        super().__init__()
        self.fsync = fsync
        self.maxclients = maxclients

    @staticmethod
    def binary() -> str | None:
        return shutil.which("redis-server")

    def start(self) -> "RedisServer":
        exe = self.binary()
        if exe is None:
            raise ServerError("redis-server not installed (apt-get install redis-server)")
        self.tmpdir = tempfile.mkdtemp(prefix="plsbench-redis-")
        self.port = free_port()
        appendfsync = self._APPENDFSYNC[self.fsync]
        argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.tmpdir,
                "--daemonize", "no", "--save", "", "--appendonly", "yes",
                "--appendfsync", appendfsync, "--maxclients", str(self.maxclients),
                "--protected-mode", "no", "--logfile", ""]
        self._spawn(argv)
        try:
            _wait_port(self.port, self.proc, READY_TIMEOUT)
        except ServerError as exc:
            tail = self.log_tail()
            self.stop()
            raise ServerError("redis-server: %s\n%s" % (exc, tail)) from None
        version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()
        ver = next((w[2:] for w in version if w.startswith("v=")), "?")
        self.description = "redis-server %s, appendonly yes, appendfsync %s" % (ver, appendfsync)
        return self


class NatsServer(Server):
    """nats-server -js with file storage in the temporary directory."""

    kind = "nats"

    def __init__(self, fsync: str = "interval") -> None:
        super().__init__()
        self.fsync = fsync

    @staticmethod
    def binary() -> str | None:
        return shutil.which("nats-server") or (
            "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)

    def start(self) -> "NatsServer":
        exe = self.binary()
        if exe is None:
            raise ServerError("nats-server not installed (apt-get install nats-server)")
        self.tmpdir = tempfile.mkdtemp(prefix="plsbench-nats-")
        self.port = free_port()
        conf = os.path.join(self.tmpdir, "nats.conf")
        with open(conf, "w") as f:
            f.write('listen: "127.0.0.1:%d"\n' % self.port)
            f.write("max_connections: 100000\n")
            f.write("max_payload: 8MB\n")
            f.write('jetstream { store_dir: "%s" }\n' % os.path.join(self.tmpdir, "js"))
        self._spawn([exe, "-c", conf])
        try:
            _wait_port(self.port, self.proc, READY_TIMEOUT)
        except ServerError as exc:
            tail = self.log_tail()
            self.stop()
            raise ServerError("nats-server: %s\n%s" % (exc, tail)) from None
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
        ver = out.split()[-1] if out else "?"
        # nats-server 2.9 has no sync_interval setting: JetStream writes every
        # message to the OS at once and fsyncs on its own schedule (2 minutes).
        self.description = "nats-server %s -js, file storage (fsync: server default)" % ver
        return self


SERVER_KINDS = {"ours": OursServer, "redis": RedisServer, "nats": NatsServer}


def stop_all() -> None:
    """Stop every server still running (newest first)."""
    for server in list(reversed(_LIVE)):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(stop_all)
