"""``/metrics`` (Prometheus text format) and ``/healthz`` over plain HTTP.

Enabled with ``--metrics-port``. A deliberately small HTTP/1.0 responder on
the broker's own event loop: one GET per connection, bounded request size,
a read timeout, no dependencies.
"""

from __future__ import annotations

import asyncio
import logging

from .. import __version__, codec

__all__ = ["MetricsServer", "render"]

log = logging.getLogger(__name__)

_MAX_REQUEST = 8192   # bytes of request head accepted
_READ_TIMEOUT = 5.0   # seconds to send the request head

# Counters kept by the broker, exported as pylogstreams_errors_total{kind=...}.
_ERROR_KINDS = ("bad_crc", "bad_frames", "unknown_commands", "invalid_topics", "malformed",
                "unidentified", "unauthorized", "auth_failures", "refused_connections",
                "refused_topics", "refused_subscriptions", "heartbeat_timeouts",
                "read_timeouts", "corrupt_reads")


def _label(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(broker) -> str:
    """The broker's metrics in Prometheus text exposition format 0.0.4."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples) -> None:
        out.append("# HELP pylogstreams_%s %s" % (name, help_))
        out.append("# TYPE pylogstreams_%s %s" % (name, kind))
        for labels, value in samples:
            if labels:
                lab = ",".join('%s="%s"' % (k, _label(v)) for k, v in labels)
                out.append("pylogstreams_%s{%s} %s" % (name, lab, value))
            else:
                out.append("pylogstreams_%s %s" % (name, value))

    stats = broker.stats()
    metric("info", "gauge", "Broker version and codec.",
           [((("version", __version__), ("codec", codec.IMPLEMENTATION)), 1)])
    metric("connections", "gauge", "Open client connections.", [((), stats["connections"])])
    metric("subscriptions", "gauge", "Active delivery subscriptions.",
           [((), stats["subscriptions"])])
    metric("topics", "gauge", "Topics.", [((), stats["topics"])])
    metric("messages_in_total", "counter", "Messages accepted for publishing, by topic.",
           [((("topic", t),), n) for t, n in sorted(broker.topic_in.items())])
    metric("messages_out_total", "counter", "Messages delivered to consumers, by topic.",
           [((("topic", t),), n) for t, n in sorted(broker.topic_out.items())])
    topics = broker.describe_topics()
    metric("topic_bytes", "gauge", "Bytes stored, by topic.",
           [((("topic", t["topic"]),), t["bytes"]) for t in topics])
    metric("topic_next_offset", "gauge", "Next offset to be written, by topic.",
           [((("topic", t["topic"]),), t["next_offset"]) for t in topics])
    metric("consumer_lag", "gauge", "Messages between a client's stored offset and the end.",
           [((("client_id", o["client_id"]), ("topic", o["topic"])), o["lag"])
            for o in broker.describe_offsets()])
    writer = broker.writer
    metric("disk_pending_bytes", "gauge", "Published bytes waiting for the disk thread.",
           [((), writer.pending_bytes if writer else 0)])
    metric("disk_batches_total", "counter",
           "Batches written (by the disk thread, or on the event loop when small).",
           [((), stats.get("disk_batches", 0))])
    metric("disk_inline_writes_total", "counter",
           "Batches written on the event loop (small, with the disk thread idle).",
           [((), stats.get("disk_inline_writes", 0))])
    metric("disk_bytes_total", "counter",
           "Record bytes written (by the disk thread, or on the event loop).",
           [((), stats.get("disk_bytes", 0))])
    metric("fsyncs_total", "counter", "fsyncs by the disk and syncer threads.",
           [((), stats.get("disk_fsyncs", 0))])
    metric("tail_cache_bytes", "gauge", "Newest batches held in memory for caught-up consumers.",
           [((), stats.get("tail_cache_bytes", 0))])
    metric("tail_reads_total", "counter", "Deliveries served from the tail cache, not the disk.",
           [((), stats.get("disk_tail_reads", 0))])
    hist = getattr(writer, "fsync_histogram", None)
    if hist is not None:
        bounds, counts, total, n = hist.snapshot()
        name = "fsync_seconds"
        out.append("# HELP pylogstreams_%s Duration of fsync rounds." % name)
        out.append("# TYPE pylogstreams_%s histogram" % name)
        acc = 0
        for bound, c in zip(bounds, counts):
            acc += c
            out.append('pylogstreams_%s_bucket{le="%g"} %d' % (name, bound, acc))
        out.append('pylogstreams_%s_bucket{le="+Inf"} %d' % (name, n))
        out.append("pylogstreams_%s_sum %.6f" % (name, total))
        out.append("pylogstreams_%s_count %d" % (name, n))
    metric("errors_total", "counter", "Refused or bad input, by kind.",
           [((("kind", k),), stats.get(k, 0)) for k in _ERROR_KINDS])
    return "\n".join(out) + "\n"


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` for one broker."""

    def __init__(self, broker) -> None:
        self.broker = broker
        self._server: asyncio.AbstractServer | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            if len(head) > _MAX_REQUEST:
                return
            parts = head.split(b"\r\n", 1)[0].split()
            method, path = (parts + [b"", b""])[:2]
            if method != b"GET":
                status, body, ctype = "405 Method Not Allowed", "GET only\n", "text/plain"
            elif path.split(b"?")[0] == b"/metrics":
                status, body = "200 OK", render(self.broker)
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            elif path.split(b"?")[0] == b"/healthz":
                healthy = self.broker.healthy()
                status = "200 OK" if healthy else "503 Service Unavailable"
                body, ctype = ("ok\n" if healthy else "disk thread not running\n"), "text/plain"
            else:
                status, body, ctype = "404 Not Found", "not found\n", "text/plain"
            data = body.encode()
            writer.write(("HTTP/1.0 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                          "Connection: close\r\n\r\n" % (status, ctype, len(data))).encode() + data)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
