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


# -- client tools -------------------------------------------------------------

def _client_options(f):
    f = click.option("--client-id", default=None, envvar="PYLOGSTREAMS_CLIENT_ID",
                     help="Client id (offsets are stored per client id).")(f)
    f = click.option("--port", type=click.IntRange(1, 65535), default=_DEFAULTS.port,
                     show_default=True, envvar="PYLOGSTREAMS_PORT")(f)
    f = click.option("--host", default=_DEFAULTS.host, show_default=True,
                     envvar="PYLOGSTREAMS_HOST")(f)
    return f


def _connect(host: str, port: int, client_id: str | None = None):
    from .client import Client, ConnectionLost
    try:
        return Client(host, port, client_id=client_id, reconnect=False)
    except ConnectionLost as exc:
        raise click.ClickException("broker not reachable at %s:%d (%s)" % (host, port, exc.__cause__ or exc)) from None


class _Progress:
    """A one-line counter on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.enabled = sys.stderr.isatty()
        self.label = label
        self.total = total
        self.count = 0
        self._shown = 0.0

    def add(self, n: int) -> None:
        self.count += n
        if self.enabled:
            import time
            now = time.monotonic()
            if now - self._shown >= 0.2:
                self._shown = now
                self._draw()

    def _draw(self) -> None:
        if self.total:
            width = 30
            done = int(width * self.count / self.total)
            bar = "[" + "#" * done + "-" * (width - done) + "]"
            sys.stderr.write("\r%s %s %d/%d" % (self.label, bar, self.count, self.total))
        else:
            sys.stderr.write("\r%s %d" % (self.label, self.count))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            sys.stderr.write("\n")


@main.command()
@_client_options
@click.argument("topic")
@click.argument("message", required=False)
@click.option("-v", "--verbose", is_flag=True, help="Print each message's offset.")
@click.option("--batch", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Messages per PUB frame when reading stdin.")
def pub(host: str, port: int, client_id: str | None, topic: str, message: str | None,
        verbose: bool, batch: int) -> None:
    """Publish MESSAGE, or every line of stdin as one message, to TOPIC."""
    from .client import BrokerError
    with _connect(host, port, client_id) as client:
        try:
            if message is not None:
                offset = client.publish(topic, message.encode())
                if verbose:
                    click.echo(offset)
                return
            progress = _Progress("published")
            stdin = sys.stdin.buffer
            lines: list[bytes] = []
            producer = client.producer(max_batch=batch, linger_ms=5, max_in_flight=8)
            futures = []

            def send(chunk):
                futs = producer.send_many(topic, chunk)
                if verbose:
                    futures.extend(futs)
                progress.add(len(chunk))

            for line in stdin:
                lines.append(line[:-1] if line.endswith(b"\n") else line)
                if len(lines) >= batch:
                    send(lines)
                    lines = []
            if lines:
                send(lines)
            producer.flush()
            progress.close()
            for fut in futures:
                click.echo(fut.result())
        except BrokerError as exc:
            raise click.ClickException(str(exc)) from None


@main.command()
@_client_options
@click.argument("topic")
@click.option("--from", "start", default="committed", show_default=True,
              help="oldest, latest, committed, an OFFSET, or a TIME (ISO 8601, e.g. 2026-11-27T10:00).")
@click.option("--count", type=click.IntRange(1), default=None, help="Exit after N messages.")
@click.option("--format", "fmt", type=click.Choice(["raw", "json"]), default="raw", show_default=True)
def sub(host: str, port: int, client_id: str | None, topic: str, start: str, count: int | None,
        fmt: str) -> None:
    """Print the messages of TOPIC, one per line, as they arrive."""
    import json
    from .client import BrokerError
    spec = _parse_start(start)
    out = sys.stdout.buffer
    with _connect(host, port, client_id) as client:
        try:
            # Without a --client-id the broker makes one up: storing offsets
            # under a throwaway id would only clutter the offsets store.
            subscription = client.subscribe(topic, spec, auto_commit=client_id is not None)
            progress = _Progress("received", count)
            seen = 0
            while count is None or seen < count:
                batch = subscription.poll(max_messages=(count - seen) if count else 1000)
                if not batch:
                    break
                if fmt == "raw":
                    out.write(b"".join([m.value + b"\n" for m in batch]))
                else:
                    out.write("".join([json.dumps({
                        "topic": m.topic, "offset": m.offset, "timestamp": m.timestamp,
                        "value": m.value.decode("utf-8", "backslashreplace")}) + "\n"
                        for m in batch]).encode())
                out.flush()
                seen += len(batch)
                progress.add(len(batch))
            progress.close()
        except BrokerError as exc:
            raise click.ClickException(str(exc)) from None
        except BrokenPipeError:
            pass


def _parse_start(start: str):
    import datetime
    if start in ("oldest", "latest", "committed"):
        return start
    if start.isdigit():
        return int(start)
    try:
        when = datetime.datetime.fromisoformat(start)
    except ValueError:
        raise click.BadParameter("use oldest, latest, committed, an offset or an ISO 8601 time",
                                 param_hint="--from") from None
    return when


def _table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        click.echo("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


@main.command()
@_client_options
def topics(host: str, port: int, client_id: str | None) -> None:
    """List topics: messages, bytes, first and next offset."""
    with _connect(host, port, client_id) as client:
        _table(client.topics(), ["topic", "messages", "bytes", "first_offset", "next_offset"])


@main.command()
@_client_options
def offsets(host: str, port: int, client_id: str | None) -> None:
    """Committed offset and lag per client and topic (only --client-id's if given)."""
    with _connect(host, port, None) as client:
        _table(client.offsets(client_id), ["client_id", "topic", "offset", "end_offset", "lag"])


@main.command()
@_client_options
def stats(host: str, port: int, client_id: str | None) -> None:
    """Broker statistics."""
    with _connect(host, port, client_id) as client:
        for key, value in sorted(client.stats().items()):
            click.echo("%s: %s" % (key, value))
