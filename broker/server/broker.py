"""The broker: listener, storage, disk thread, client registry, statistics.

Data flow (see docs/design.md for the picture)::

    socket -> Connection.data_received -> codec FrameReader (one call per chunk)
           -> Broker.publish -> DiskWriter.append (pending, per topic)
           -> disk thread: encode records, pwrite, fsync policy
           -> loop: TopicLog.written, the producers' acknowledgements,
              Broker._on_written -> Connection.deliver_now (the same turn)
           -> Connection._pump -> TopicLog.read + records_to_deliveries -> transport.write
"""

from __future__ import annotations

import asyncio
import collections
import logging

from .. import codec
from ..auth import Authenticator
from ..config import Config
from ..errors import LimitError
from ..protocol import From
from ..storage import DiskWriter, LogStore, TopicLog
from ..topics import validate_topic
from .connection import Connection

__all__ = ["Broker"]

log = logging.getLogger(__name__)

_CLOSE_GRACE = 5.0  # seconds connections get to flush their buffers on shutdown


class Broker:
    """A pylogstreams broker serving one data directory on one address."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store = LogStore(self.config.data_dir, config=self.config)
        self.writer: DiskWriter | None = None
        self.connections: set[Connection] = set()
        self.clients: dict[bytes, Connection] = {}   # client id -> connection speaking for it
        self._topics: dict[bytes, TopicLog] = {}     # wire name -> log, for validated names
        self._server: asyncio.AbstractServer | None = None
        self._closed: asyncio.Future | None = None   # resolved when all connections are gone
        self.port: int | None = None                 # bound port once started
        self.counters: collections.Counter = collections.Counter()  # events by kind
        self.per_ip: collections.Counter = collections.Counter()    # open connections by address
        self.topic_in: collections.Counter = collections.Counter()  # messages published, by topic
        self.topic_out: collections.Counter = collections.Counter()  # messages delivered, by topic
        cfg = self.config
        self.auth = Authenticator.load(cfg.auth_file) if cfg.auth_file else None
        self.metrics = None                          # the /metrics HTTP server, if enabled

    # -- life cycle ----------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        cfg = self.config
        self.store.open()
        self.writer = DiskWriter(
            self.loop, self.store.offsets, fsync=cfg.fsync,
            fsync_interval_ms=cfg.fsync_interval_ms, high_water=cfg.append_high_water,
            low_water=cfg.append_low_water, on_written=self._on_written, store=self.store)
        self.writer.start()
        ssl_context = None
        if cfg.tls_cert:
            import ssl
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        # A TLS handshake is read before any Connection exists, so the read
        # timeout must bound it here (the loop's default is 60 s): a client
        # that stalls half-way through its ClientHello is a slow client too.
        tls_options = {"ssl": ssl_context}
        if ssl_context is not None:
            tls_options["ssl_handshake_timeout"] = cfg.read_timeout
        self._server = await self.loop.create_server(
            lambda: Connection(self), cfg.host, cfg.port, reuse_address=True, backlog=4096,
            **tls_options)
        self.port = self._server.sockets[0].getsockname()[1]
        if cfg.metrics_port is not None:
            from .metrics import MetricsServer
            self.metrics = MetricsServer(self)
            await self.metrics.start(cfg.metrics_host or cfg.host, cfg.metrics_port)
        log.info("serving on %s:%d%s, data dir %s, codec %s, loop %s, auth %s", cfg.host,
                 self.port, " (TLS)" if ssl_context else "", self.store.data_dir,
                 codec.IMPLEMENTATION, type(self.loop).__module__,
                 "on" if self.auth else "off")

    async def stop(self) -> None:
        """Stop accepting, let connections flush, write and fsync everything."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            conn.transport.pause_reading()
            conn.stop_delivery()
            conn.transport.close()
        if self.connections:
            self._closed = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._closed), _CLOSE_GRACE)
            except asyncio.TimeoutError:
                for conn in list(self.connections):
                    conn.transport.abort()
        await self._server.wait_closed()
        if self.metrics is not None:
            await self.metrics.stop()
        await self.writer.close()
        self.store.close()
        self._server = None
        log.info("stopped; everything written and synced")

    # -- used by connections -------------------------------------------------

    def connection_made(self, conn: Connection) -> bool:
        """Admit ``conn``, or say no (the connection then closes itself)."""
        cfg = self.config
        if len(self.connections) >= cfg.max_connections:
            self.counters["refused_connections"] += 1
            log.warning("%s: refused, %d connections open (--max-connections)",
                        conn.peer, len(self.connections))
            return False
        if self.per_ip[conn.ip] >= cfg.max_connections_per_ip:
            self.counters["refused_connections"] += 1
            log.warning("%s: refused, %d connections from this address (--max-connections-per-ip)",
                        conn.peer, self.per_ip[conn.ip])
            return False
        self.connections.add(conn)
        self.per_ip[conn.ip] += 1
        self.counters["connections_accepted"] += 1
        return True

    def connection_lost(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.per_ip[conn.ip] -= 1
        if not self.per_ip[conn.ip]:
            del self.per_ip[conn.ip]
        if conn.client_id is not None and self.clients.get(conn.client_id) is conn:
            del self.clients[conn.client_id]
        self.writer.forget(conn)
        if self._closed is not None and not self.connections and not self._closed.done():
            self._closed.set_result(None)

    def bind_client(self, conn: Connection, client_id: bytes) -> None:
        """``conn`` speaks for ``client_id``; an older connection is superseded."""
        old = self.clients.get(client_id)
        if old is not None and old is not conn:
            log.info("client %s reconnected from %s; delivery to %s stopped",
                     client_id[:64], conn.peer, old.peer)
            old.stop_delivery()
            old.client_id = None
            self.counters["superseded"] += 1
        if conn.client_id is not None and self.clients.get(conn.client_id) is conn:
            del self.clients[conn.client_id]
        conn.client_id = client_id
        self.clients[client_id] = conn

    def topic(self, name: bytes) -> TopicLog:
        """The log for a wire topic name; validates and creates on first use."""
        topic = self._topics.get(name)
        if topic is None:
            valid = validate_topic(name)
            if valid not in self.store.topics and len(self.store.topics) >= self.config.max_topics:
                self.counters["refused_topics"] += 1
                raise LimitError("topic limit reached (%d, --max-topics)" % self.config.max_topics)
            topic = self.store.get_or_create(valid)
            self._topics[name] = topic
        return topic

    def known_topic(self, name: bytes) -> TopicLog | None:
        """The log for a wire topic name already in use, else None (nothing created)."""
        return self._topics.get(name)

    def publish(self, topic: TopicLog, messages, nbytes: int, transport,
                on_stored=None, count: int | None = None, ts: int | None = None,
                last_len: int = 0) -> None:
        """Queue a batch for ``topic``: messages, or ``count`` records; see :meth:`DiskWriter.append`."""
        if count is None:
            count = len(messages)
        topic.next_offset += count
        self.counters["messages_in"] += count
        self.topic_in[topic.name] += count
        self.writer.append(topic, messages, nbytes, transport, on_stored, count, ts, last_len)

    def commit_offset(self, client_id: bytes, topic: str, offset: int) -> None:
        offsets = self.store.offsets
        offsets.set(client_id, topic, offset)
        if offsets.dirty:
            self.writer.offsets_changed()

    def resolve_offset(self, client_id: bytes | None, topic: TopicLog, mode: int, value: int) -> int:
        """The offset a SUB/SEK/SET request names; ValueError if it names none."""
        if mode == From.COMMITTED:
            stored = self.store.offsets.get(client_id, topic.name) if client_id else None
            offset = topic.start_offset if stored is None else stored
        elif mode == From.OLDEST:
            return topic.start_offset
        elif mode == From.LATEST:
            return topic.next_offset
        elif mode == From.OFFSET:
            if value < 0:
                raise ValueError("offset %d is negative" % value)
            offset = value
        elif mode == From.TIME:
            try:
                offset = topic.offset_for_time(value)
            except (OSError, ValueError) as exc:  # CorruptRecordError is a ValueError
                raise ValueError("cannot seek %s by time: %s" % (topic.name, exc)) from exc
        else:
            raise ValueError("unknown start mode %d" % mode)
        return min(max(offset, topic.start_offset), topic.next_offset)

    def describe_topics(self) -> list[dict]:
        out = []
        for name in sorted(self.store.topics):
            topic = self.store.topics[name]
            out.append({
                "topic": name,
                "first_offset": topic.start_offset,
                "next_offset": topic.end_offset,
                "messages": topic.end_offset - topic.start_offset,
                "bytes": sum(seg.readable_size for seg in topic.segments),
                "segments": len(topic.segments),
                "subscribers": len(topic.subscribers),
            })
        return out

    def describe_offsets(self, client_id: bytes | None = None) -> list[dict]:
        out = []
        for (cid, name), offset in sorted(self.store.offsets.items()):
            if client_id is not None and cid != client_id:
                continue
            topic = self.store.topics.get(name)
            end = topic.end_offset if topic is not None else offset
            out.append({"client_id": cid.decode("utf-8", "replace"), "topic": name,
                        "offset": offset, "end_offset": end, "lag": max(0, end - offset)})
        return out

    def _on_written(self, topic: TopicLog) -> None:
        # Delivered in this turn of the loop (the writer reports the batch,
        # acknowledges it, then calls this): a caught-up consumer's latency
        # is the write and the sends, not another turn of the loop.
        for sub in tuple(topic.subscribers):  # a delivery may end a subscription
            try:
                sub.conn.deliver_now(sub)
            except Exception:  # one connection's failure is not the others'
                log.exception("%s: delivery of topic %s failed", sub.conn.peer, topic.name)

    # -- introspection -------------------------------------------------------

    def healthy(self) -> bool:
        """Serving, with a live disk thread."""
        return self._server is not None and self.writer is not None and self.writer.alive

    def stats(self) -> dict:
        """Counters and gauges, for tests, logs and (later) metrics."""
        out = dict(self.counters)
        conns = self.connections
        out.update(
            connections=len(conns),
            subscriptions=sum(len(c.subs) for c in conns),
            pending_pumps=sum(1 for c in conns if c._pump_handle is not None),
            timers=sum(1 for c in conns if c._timer is not None),
            topics=len(self.store.topics),
            pending_bytes=self.writer.pending_bytes if self.writer else 0,
            tail_cache_bytes=self.store.tail.bytes,
            codec=codec.IMPLEMENTATION,
        )
        if self.writer:
            out.update({"disk_" + k: v for k, v in self.writer.stats.items()})
        for key in ("messages_in", "messages_out", "bad_crc", "bad_frames", "unknown_commands",
                    "invalid_topics", "malformed"):
            out.setdefault(key, 0)
        return out
