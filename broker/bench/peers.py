"""Drivers for the peers: Redis Streams (redis-py + hiredis) and NATS JetStream (nats-py).

Same interface as the drivers in :mod:`.workers`; the harness treats every
system alike. Batching is made equivalent to ours, as far as each client
allows:

=================  =====================================  ==========================================
                   pylogstreams (client library)          peer
=================  =====================================  ==========================================
publish a batch    one ``PUB`` frame of B messages, one    Redis: a pipeline of B ``XADD`` (one round
                   ``ACK`` once stored                     trip, a reply each). NATS: B
                                                          ``publish_async`` then wait for the B
                                                          JetStream acks
in flight          ``window`` batches per connection       Redis: ``window`` pipelines (pooled
                                                          connections). NATS: ``window`` batches
consume a batch    up to B messages from ``get_batch``;    Redis: ``XACK`` (previous batch) +
                   processed offsets committed when the    ``XREADGROUP COUNT B BLOCK`` in one
                   buffer runs dry                         pipeline. NATS: pull consumer
                                                          ``fetch(B)``, ack policy *all*, one ack on
                                                          the last message of each batch
fan-out            each subscriber reads the whole topic   one consumer group / durable per consumer
ping               ``PNG`` -> ``POG``                      Redis ``PING``; NATS ``flush()`` (PING/PONG)
=================  =====================================  ==========================================

The backlog for the consume scenario is loaded through each system's
fastest path and is not timed (NATS: core publishes into the stream's
subject, then waiting until the stream holds them all).
"""

from __future__ import annotations

import asyncio
import struct
import time

__all__ = ["RedisDriver", "NatsDriver", "missing_client"]

_ts_of = struct.Struct(">q").unpack_from


def missing_client(system: str) -> str | None:
    """Why ``system``'s Python client cannot be used here, or None if it can."""
    try:
        if system == "redis":
            import redis.asyncio  # noqa: F401
            try:
                import hiredis  # noqa: F401
            except ImportError:
                return None  # works without hiredis, only slower; the report says so
        elif system == "nats":
            import nats  # noqa: F401
    except ImportError as exc:
        return "Python client not installed (%s)" % exc
    return None


def has_hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
        return True
    except ImportError:
        return False


# -- Redis Streams -----------------------------------------------------------------


class RedisDriver:
    """Redis Streams: XADD pipelined, XREADGROUP + XACK."""

    name = "redis"
    FIELD = b"v"

    def __init__(self, host: str, port: int, opts: dict) -> None:
        import redis.asyncio as aioredis
        self.aioredis = aioredis
        self.host, self.port = host, port

    async def setup_topic(self, conn, topic: str) -> None:
        pass  # XADD creates the stream; groups are made by consumer()

    async def connect(self, name: str, lanes: int = 1):
        # One pooled connection per lane, so that `lanes` pipelines can be in
        # flight at once, as our `window` batches are on one connection.
        # (Not single_connection_client: pipelines would still ask the pool.)
        r = self.aioredis.Redis(host=self.host, port=self.port, socket_timeout=60,
                                max_connections=max(1, lanes))
        await r.ping()
        return r

    async def close(self, r) -> None:
        await r.aclose()

    async def publish(self, r, topic: str, values: list) -> None:
        pipe = r.pipeline(transaction=False)
        field = self.FIELD
        for v in values:
            pipe.xadd(topic, {field: v})
        await pipe.execute()

    preload = publish

    async def preload_done(self, r, topic: str, count: int) -> None:
        pass

    async def consumer(self, r, topic: str, name: str, stamps: bool = True):
        try:
            await r.xgroup_create(topic, name, id="0", mkstream=True)
        except self.aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        return _RedisConsumer(r, topic, name, self.FIELD, stamps)

    async def ping(self, r) -> None:
        await r.ping()


class _RedisConsumer:
    def __init__(self, r, topic: str, group: str, field: bytes, stamps: bool) -> None:
        self.r = r
        self.stamps = stamps
        self.topic = topic
        self.group = group
        self.field = field
        self.unacked: list = []

    async def fetch(self, max_messages: int, timeout: float):
        pipe = self.r.pipeline(transaction=False)
        if self.unacked:
            pipe.xack(self.topic, self.group, *self.unacked)
        pipe.xreadgroup(self.group, "c", {self.topic: ">"}, count=max_messages,
                        block=max(1, int(timeout * 1000)))
        res = await pipe.execute()
        self.unacked = []
        streams = res[-1]
        if not streams:
            return 0, []
        entries = streams[0][1]
        field = self.field
        self.unacked = [e[0] for e in entries]
        if not self.stamps:
            return len(entries), ()
        return len(entries), [_ts_of(e[1][field])[0] for e in entries]

    async def close(self) -> None:
        if self.unacked:
            await self.r.xack(self.topic, self.group, *self.unacked)
            self.unacked = []


# -- NATS JetStream ------------------------------------------------------------------


def _stream_name(topic: str) -> str:
    return topic.replace(".", "_").replace("*", "_").replace(">", "_")


class NatsDriver:
    """NATS JetStream, file storage: acknowledged publish, pull consumer + ack."""

    name = "nats"

    def __init__(self, host: str, port: int, opts: dict) -> None:
        import nats
        self.nats = nats
        self.url = "nats://%s:%d" % (host, port)
        self.max_pending = max(4000, opts.get("batch", 1000) * opts.get("window", 1) * 2)

    async def connect(self, name: str, lanes: int = 1):
        nc = await self.nats.connect(self.url, name=name, allow_reconnect=False,
                                     connect_timeout=30, max_reconnect_attempts=0,
                                     pending_size=64 * 1024 * 1024)
        nc._bench_js = nc.jetstream(timeout=60, publish_async_max_pending=self.max_pending)
        return nc

    async def setup_topic(self, nc, topic: str) -> None:
        from nats.js.api import StorageType
        from nats.js.errors import BadRequestError
        try:
            await nc._bench_js.add_stream(name=_stream_name(topic), subjects=[topic],
                                          storage=StorageType.FILE)
        except BadRequestError as exc:  # created concurrently with another config: fine
            if "already in use" not in str(exc):
                raise

    async def close(self, nc) -> None:
        await nc.close()

    async def publish(self, nc, topic: str, values: list) -> None:
        js = nc._bench_js
        futs = [await js.publish_async(topic, v) for v in values]
        await asyncio.gather(*futs)

    async def preload(self, nc, topic: str, values: list) -> None:
        for v in values:
            await nc.publish(topic, v)
        await nc.flush(timeout=60)

    async def preload_done(self, nc, topic: str, count: int) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = await nc._bench_js.stream_info(_stream_name(topic))
            if info.state.messages >= count:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("NATS stream %s never reached %d messages" % (topic, count))

    async def consumer(self, nc, topic: str, name: str, stamps: bool = True):
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        cfg = ConsumerConfig(ack_policy=AckPolicy.ALL, deliver_policy=DeliverPolicy.ALL,
                             max_ack_pending=-1, max_waiting=512)
        psub = await nc._bench_js.pull_subscribe(topic, durable=name, stream=_stream_name(topic),
                                                 config=cfg)
        return _NatsConsumer(self.nats, psub, stamps)

    async def ping(self, nc) -> None:
        await nc.flush(timeout=30)


class _NatsConsumer:
    LINGER = 0.005   # seconds a caught-up fetch waits for more messages

    def __init__(self, nats, psub, stamps: bool) -> None:
        self.psub = psub
        self.stamps = stamps
        self.timeout_error = nats.errors.TimeoutError

    async def fetch(self, max_messages: int, timeout: float):
        # nats-py's fetch(n), once caught up, waits for n messages or its
        # timeout: a short timeout keeps big batches when behind and adds at
        # most LINGER of latency when caught up.
        try:
            msgs = await self.psub.fetch(max_messages, timeout=min(timeout, self.LINGER))
        except (self.timeout_error, asyncio.TimeoutError):
            return 0, []
        if not msgs:
            return 0, []
        await msgs[-1].ack()   # ack policy "all": acknowledges the whole batch
        if not self.stamps:
            return len(msgs), ()
        return len(msgs), [_ts_of(m.data)[0] for m in msgs]

    async def close(self) -> None:
        try:
            await self.psub.unsubscribe()
        except Exception:  # noqa: BLE001
            pass
