"""The command line: option names scripts depend on, both entry points."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import impl_env
from v0client import V0Client, consumer, produce

pytestmark = pytest.mark.integration


def test_serve_help_names_the_options(impl):
    out = subprocess.run([sys.executable, "-m", "broker", "serve", "--help"], env=impl_env(impl),
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    text = out.stdout.decode()
    for opt in ("--host", "--port", "--data-dir", "--heartbeat-timeout", "--segment-bytes",
                "--max-frame-bytes", "--pure"):
        assert opt in text, opt


def test_console_script(server):
    exe = shutil.which("pylogstreams")
    if exe is None:
        pytest.skip("pylogstreams console script not installed (pip install -e .)")
    srv = server(start=False)
    srv.command = [exe]
    srv.start()
    produce(srv.port, b"cli", [b"via the console script"])
    with consumer(srv.port, b"cli", 0) as c:
        assert c.read_deliveries(1) == [(b"cli", b"via the console script")]
    srv.stop()


def test_restart_on_same_port(server):
    """A stopped broker's port can be taken again at once (SO_REUSEADDR)."""
    srv = server()
    port = srv.port
    with V0Client(port) as c:
        c.reg()
    srv.stop()
    srv.start(port=port)
    assert srv.port == port
    with V0Client(port) as c:
        c.reg()
