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
              help="Use the pure-Python twin: codec and writer (same as PYLOGSTREAMS_NO_EXTENSIONS=1).")
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
@click.option("--retention-ms", envvar="PYLOGSTREAMS_RETENTION_MS", type=click.IntRange(-1),
              default=_DEFAULTS.retention_ms, show_default=True, show_envvar=True,
              help="Default for every topic: delete sealed segments older than this (-1: never).")
@click.option("--retention-bytes", envvar="PYLOGSTREAMS_RETENTION_BYTES", type=click.IntRange(-1),
              default=_DEFAULTS.retention_bytes, show_default=True, show_envvar=True,
              help="Default for every topic: keep it at most this big (-1: no limit).")
@click.option("--tail-cache-bytes", envvar="PYLOGSTREAMS_TAIL_CACHE_BYTES", type=click.IntRange(0),
              default=_DEFAULTS.tail_cache_bytes, show_default=True, show_envvar=True,
              help="Memory for the newest batches, served to consumers that keep up without "
                   "reading the disk (0: off).")
@click.option("--inline-write-bytes", envvar="PYLOGSTREAMS_INLINE_WRITE_BYTES", type=click.IntRange(0),
              default=_DEFAULTS.inline_write_bytes, show_default=True, show_envvar=True,
              help="A write job up to this size is written on the event loop when the disk "
                   "thread is idle, saving two thread wake-ups of latency (0: always the "
                   "disk thread).")
@click.option("--max-connections", envvar="PYLOGSTREAMS_MAX_CONNECTIONS", type=click.IntRange(1),
              default=_DEFAULTS.max_connections, show_default=True, show_envvar=True,
              help="Connections at once; more are closed on accept.")
@click.option("--max-connections-per-ip", envvar="PYLOGSTREAMS_MAX_CONNECTIONS_PER_IP",
              type=click.IntRange(1), default=_DEFAULTS.max_connections_per_ip, show_default=True,
              show_envvar=True, help="Connections at once from one address.")
@click.option("--max-topics", envvar="PYLOGSTREAMS_MAX_TOPICS", type=click.IntRange(1),
              default=_DEFAULTS.max_topics, show_default=True, show_envvar=True,
              help="Topics; creating one more is refused.")
@click.option("--max-subscriptions", envvar="PYLOGSTREAMS_MAX_SUBSCRIPTIONS", type=click.IntRange(1),
              default=_DEFAULTS.max_subscriptions, show_default=True, show_envvar=True,
              help="Subscriptions on one connection.")
@click.option("--read-timeout", envvar="PYLOGSTREAMS_READ_TIMEOUT", type=click.FloatRange(min=0.01),
              default=_DEFAULTS.read_timeout, show_default=True, show_envvar=True,
              help="Seconds a partly received frame may wait for the rest (slow-client defence).")
@click.option("--tls-cert", envvar="PYLOGSTREAMS_TLS_CERT", type=click.Path(dir_okay=False, exists=True),
              default=None, show_envvar=True, help="PEM certificate chain: serve TLS.")
@click.option("--tls-key", envvar="PYLOGSTREAMS_TLS_KEY", type=click.Path(dir_okay=False, exists=True),
              default=None, show_envvar=True, help="PEM private key for --tls-cert.")
@click.option("--auth-file", envvar="PYLOGSTREAMS_AUTH_FILE", type=click.Path(dir_okay=False, exists=True),
              default=None, show_envvar=True,
              help="TOML file of users and permissions (docs/security.md): require authentication.")
@click.option("--metrics-port", envvar="PYLOGSTREAMS_METRICS_PORT", type=click.IntRange(0, 65535),
              default=None, show_envvar=True, help="Serve /metrics and /healthz over HTTP on this port.")
@click.option("--metrics-host", envvar="PYLOGSTREAMS_METRICS_HOST", default=None, show_envvar=True,
              help="Address for --metrics-port (default: --host).")
@click.option("--log-level", envvar="PYLOGSTREAMS_LOG_LEVEL", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, show_envvar=True)
@click.option("--log-format", envvar="PYLOGSTREAMS_LOG_FORMAT", type=click.Choice(["text", "json"]),
              default="text", show_default=True, show_envvar=True,
              help="json: one JSON object per log line.")
def serve(pure: bool, log_level: str, log_format: str, **options) -> None:
    """Run the broker until SIGTERM or SIGINT (Ctrl-C)."""
    if pure:
        # Must happen before broker.codec is first imported.
        os.environ["PYLOGSTREAMS_NO_EXTENSIONS"] = "1"
    _setup_logging(log_level, log_format)
    try:
        config = Config(**options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        _run(_serve(config))
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + ".%03dZ" % record.msecs,
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = _JsonFormatter()
        formatter.converter = __import__("time").gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@main.command("hash-secret")
@click.password_option("--secret", prompt="Secret", help="The password or token to hash.")
def hash_secret(secret: str) -> None:
    """Print the scrypt hash of a secret, for the users file of --auth-file."""
    from .auth import hash_secret as _hash
    click.echo(_hash(secret))


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


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple) -> None:
    """End-to-end benchmark against Redis Streams and NATS JetStream (--help for options)."""
    from .bench import main as bench_main
    sys.exit(bench_main(list(args)))


# -- client tools -------------------------------------------------------------

def _client_options(f):
    f = click.option("--secret", default=None, envvar="PYLOGSTREAMS_SECRET",
                     help="Secret for --user (prefer the environment variable).")(f)
    f = click.option("--user", default=None, envvar="PYLOGSTREAMS_USER",
                     help="Authenticate as this user.")(f)
    f = click.option("--tls-ca", default=None, envvar="PYLOGSTREAMS_TLS_CA",
                     type=click.Path(dir_okay=False, exists=True),
                     help="Connect with TLS, trusting this CA file.")(f)
    f = click.option("--tls", is_flag=True, default=False, envvar="PYLOGSTREAMS_TLS",
                     help="Connect with TLS, trusting the system's CAs.")(f)
    f = click.option("--client-id", default=None, envvar="PYLOGSTREAMS_CLIENT_ID",
                     help="Client id (offsets are stored per client id).")(f)
    f = click.option("--port", type=click.IntRange(1, 65535), default=_DEFAULTS.port,
                     show_default=True, envvar="PYLOGSTREAMS_PORT")(f)
    f = click.option("--host", default=_DEFAULTS.host, show_default=True,
                     envvar="PYLOGSTREAMS_HOST")(f)
    return f


_SECURITY = ("tls", "tls_ca", "user", "secret")


def _connect(host: str, port: int, client_id: str | None = None, *, tls: bool = False,
             tls_ca: str | None = None, user: str | None = None, secret: str | None = None):
    from .client import BrokerError, Client, ConnectionLost
    context = None
    if tls or tls_ca:
        import ssl
        context = ssl.create_default_context(cafile=tls_ca)
    try:
        return Client(host, port, client_id=client_id, reconnect=False, ssl=context,
                      user=user, secret=secret)
    except ConnectionLost as exc:
        raise click.ClickException("broker not reachable at %s:%d (%s)"
                                   % (host, port, exc.__cause__ or exc)) from None
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None


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
        verbose: bool, batch: int, **security) -> None:
    """Publish MESSAGE, or every line of stdin as one message, to TOPIC."""
    from .client import BrokerError, ConnectionLost
    with _connect(host, port, client_id, **security) as client:
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
                # Every future is kept, -v or not: a refused batch must fail the run.
                futures.extend(producer.send_many(topic, chunk))
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
            offsets = [fut.result() for fut in futures]
            if verbose:
                click.echo("".join("%d\n" % o for o in offsets), nl=False)
        except (BrokerError, ConnectionLost) as exc:
            raise click.ClickException(str(exc)) from None


@main.command()
@_client_options
@click.argument("topic")
@click.option("--from", "start", default="committed", show_default=True,
              help="oldest, latest, committed, an OFFSET, or a TIME (ISO 8601, e.g. 2026-11-27T10:00).")
@click.option("--count", type=click.IntRange(1), default=None, help="Exit after N messages.")
@click.option("--format", "fmt", type=click.Choice(["raw", "json"]), default="raw", show_default=True)
def sub(host: str, port: int, client_id: str | None, topic: str, start: str, count: int | None,
        fmt: str, **security) -> None:
    """Print the messages of TOPIC, one per line, as they arrive."""
    import json
    from .client import BrokerError, ConnectionLost
    spec = _parse_start(start)
    out = sys.stdout.buffer
    with _connect(host, port, client_id, **security) as client:
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
        except (BrokerError, ConnectionLost) as exc:
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
def topics(host: str, port: int, client_id: str | None, **security) -> None:
    """List topics: messages, bytes, first and next offset."""
    with _connect(host, port, client_id, **security) as client:
        _table(client.topics(), ["topic", "messages", "bytes", "first_offset", "next_offset"])


@main.command()
@_client_options
def offsets(host: str, port: int, client_id: str | None, **security) -> None:
    """Committed offset and lag per client and topic (only --client-id's if given)."""
    with _connect(host, port, None, **security) as client:
        _table(client.offsets(client_id), ["client_id", "topic", "offset", "end_offset", "lag"])


@main.command("topic-config")
@_client_options
@click.argument("topic")
@click.option("--retention-ms", type=click.IntRange(-1), default=None,
              help="Delete sealed segments older than this (-1: keep forever).")
@click.option("--retention-bytes", type=click.IntRange(-1), default=None,
              help="Keep the topic at most this big (-1: no limit).")
@click.option("--fsync", "fsync_policy", type=click.Choice(FSYNC_POLICIES), default=None)
@click.option("--fsync-interval-ms", type=click.IntRange(1), default=None)
@click.option("--segment-bytes", type=click.IntRange(1024), default=None)
@click.option("--reset", "reset", multiple=True,
              type=click.Choice(["retention_ms", "retention_bytes", "fsync", "fsync_interval_ms",
                                 "segment_bytes"]),
              help="Return a setting to the broker default (repeatable).")
def topic_config(host: str, port: int, client_id: str | None, topic: str,
                 retention_ms: int | None, retention_bytes: int | None, fsync_policy: str | None,
                 fsync_interval_ms: int | None, segment_bytes: int | None, reset: tuple,
                 **security) -> None:
    """Show TOPIC's settings, or change them (persisted, applied live)."""
    from .client import BrokerError
    overrides = {k: v for k, v in (("retention_ms", retention_ms),
                                   ("retention_bytes", retention_bytes),
                                   ("fsync", fsync_policy),
                                   ("fsync_interval_ms", fsync_interval_ms),
                                   ("segment_bytes", segment_bytes)) if v is not None}
    overrides.update({k: None for k in reset})
    with _connect(host, port, client_id, **security) as client:
        try:
            settings = client.topic_config(topic, **overrides)
        except BrokerError as exc:
            raise click.ClickException(str(exc)) from None
    for key, value in sorted(settings.items()):
        click.echo("%s: %s" % (key, value))


@main.command()
@_client_options
def stats(host: str, port: int, client_id: str | None, **security) -> None:
    """Broker statistics."""
    with _connect(host, port, client_id, **security) as client:
        for key, value in sorted(client.stats().items()):
            click.echo("%s: %s" % (key, value))
