"""The ``pylogstreams`` command.

Every option of ``serve`` can also be given as an environment variable,
named in its help text (``PYLOGSTREAMS_PORT`` for ``--port``, ...).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import click

from . import __version__
from .config import FSYNC_POLICIES, Config

_DEFAULTS = Config()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pylogstreams")
def main() -> None:
    """pylogstreams: a persistent publish/subscribe log broker."""


@main.command()
@click.option("--host", envvar="PYLOGSTREAMS_HOST", default=_DEFAULTS.host, show_default=True, show_envvar=True,
              help="Address to listen on.")
@click.option("--port", envvar="PYLOGSTREAMS_PORT", type=click.IntRange(0, 65535), default=_DEFAULTS.port, show_default=True,
              show_envvar=True, help="TCP port; 0 picks a free one.")
@click.option("--data-dir", envvar="PYLOGSTREAMS_DATA_DIR", type=click.Path(file_okay=False), default=_DEFAULTS.data_dir,
              show_default=True, show_envvar=True, help="Where logs and offsets are kept.")
@click.option("--pure", envvar="PYLOGSTREAMS_PURE", is_flag=True, default=False, show_envvar=True,
              help="Use the pure-Python codec (same as PYLOGSTREAMS_NO_EXTENSIONS=1).")
@click.option("--heartbeat-timeout", envvar="PYLOGSTREAMS_HEARTBEAT_TIMEOUT", type=click.FloatRange(min=0.01), show_envvar=True,
              default=_DEFAULTS.heartbeat_timeout, show_default=True,
              help="Seconds of silence after which a client is disconnected.")
@click.option("--segment-bytes", envvar="PYLOGSTREAMS_SEGMENT_BYTES", type=click.IntRange(1024, 1 << 30), show_envvar=True,
              default=_DEFAULTS.segment_bytes, show_default=True,
              help="Roll a topic's segment file at this size.")
@click.option("--max-frame-bytes", envvar="PYLOGSTREAMS_MAX_FRAME_BYTES", type=click.IntRange(16, 0x7FFFFFFF), show_envvar=True,
              default=_DEFAULTS.max_frame_bytes, show_default=True,
              help="Largest frame a client may send; larger closes the connection.")
@click.option("--fsync", envvar="PYLOGSTREAMS_FSYNC", type=click.Choice(FSYNC_POLICIES), default=_DEFAULTS.fsync,
              show_default=True, show_envvar=True,
              help="always: every batch is fsynced before it is delivered; interval: at most "
                   "--fsync-interval-ms apart; never: the OS decides.")
@click.option("--fsync-interval-ms", envvar="PYLOGSTREAMS_FSYNC_INTERVAL_MS", type=click.IntRange(1), default=_DEFAULTS.fsync_interval_ms,
              show_default=True, show_envvar=True, help="With --fsync interval.")
@click.option("--log-level", envvar="PYLOGSTREAMS_LOG_LEVEL", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, show_envvar=True)
def serve(pure: bool, log_level: str, **options) -> None:
    """Run the broker until SIGTERM or SIGINT (Ctrl-C)."""
    if pure:
        # Must happen before broker.codec is first imported.
        os.environ["PYLOGSTREAMS_NO_EXTENSIONS"] = "1"
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = Config(**options)
    try:
        _run(_serve(config))
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


def _run(coro) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it installs
        logging.getLogger("broker").warning("uvloop not installed; using the asyncio loop")
        asyncio.run(coro)
    else:
        uvloop.run(coro)


async def _serve(config: Config) -> None:
    from . import codec
    from .server import Broker
    from .storage import DataDirLocked

    broker = Broker(config)
    try:
        await broker.start()
    except DataDirLocked as exc:
        raise click.ClickException(str(exc)) from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    click.echo("pylogstreams serving on %s:%d data-dir=%s codec=%s"
               % (config.host, broker.port, broker.store.data_dir, codec.IMPLEMENTATION))
    sys.stdout.flush()
    await stop.wait()
    logging.getLogger("broker").info("signal received, shutting down")
    await broker.stop()
