"""Load-generating worker processes and the drivers they use.

A worker is a ``spawn``-ed process running one asyncio (uvloop) loop with
one *role* for any number of client connections:

- ``produce``: each client publishes its quota (or for a duration, or at a
  fixed rate) in acknowledged batches, ``window`` batches in flight;
  every message carries ``time.time_ns()`` of its batch in its first 8
  bytes. Records ack latency (send -> ack) per batch.
- ``consume``: each client reads its topic from the oldest message until
  it has what the producers stored; records end-to-end latency (payload
  timestamp -> receipt) per message.
- ``preload``: like produce, through the fastest path a system has, not
  timed (the backlog for the consume scenario).
- ``conn``: opens many connections, then each pings round-trip every
  ``ping_interval`` seconds for ``hold`` seconds; records the RTTs.

A *driver* hides the system behind seven coroutines (``connect``,
``close``, ``publish``, ``consumer``, ``ping``, ``preload``,
``setup_topic``). Ours come in two flavours: ``client`` (the public
client library, what users run) and ``raw`` (pre-encoded v1 frames on a
bare protocol: the broker's own limit, without client-side Python work).
Redis and NATS drivers are in :mod:`.peers`.

Nothing here imports the broker's codec at module level: the spawned
process picks its codec through ``PYLOGSTREAMS_NO_EXTENSIONS``, which
:func:`worker_main` sets before the first import.
"""

from __future__ import annotations

import array
import asyncio
import collections
import os
import resource
import struct
import time
import traceback

__all__ = ["worker_main", "make_driver", "payload_pad", "raise_nofile"]

_TS = struct.Struct(">q")
_ts_of = _TS.unpack_from


_TICK = 0.001  # s: the paced producer's shortest sleep


def raise_nofile(want: int = 0) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE up to the hard limit; ``(soft, hard)``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, want, 1 << 16)
    if want and hard == resource.RLIM_INFINITY:
        target = max(want, soft)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def payload_pad(size: int) -> bytes:
    """The bytes after the 8-byte timestamp: incompressible, fixed per run."""
    return os.urandom(max(0, size - 8))


# -- drivers: ours -------------------------------------------------------------


class OursClientDriver:
    """pylogstreams through the public asyncio client (``broker.client.aio``)."""

    name = "ours"

    def __init__(self, host: str, port: int, opts: dict) -> None:
        from ..client.aio import AsyncClient
        self._cls = AsyncClient
        self.host, self.port = host, port
        self.max_frame = opts.get("max_frame_bytes", 1 << 20)
        interval = opts.get("commit_interval")
        self.options = {} if interval is None else {"commit_interval": interval}

    async def setup_topic(self, conn, topic: str) -> None:
        pass  # topics are created by their first PUB or SUB

    async def connect(self, name: str, lanes: int = 1):
        client = self._cls(self.host, self.port, client_id=name, heartbeat=30.0,
                           reconnect=False, request_timeout=60.0,
                           max_frame_bytes=max(self.max_frame, 1 << 20) * 2, **self.options)
        return await client.connect()

    async def close(self, conn) -> None:
        await conn.close()

    async def publish(self, conn, topic: str, values: list) -> None:
        await conn.publish_batch(topic, values)

    preload = publish

    async def preload_done(self, conn, topic: str, count: int) -> None:
        pass  # publish_batch returned: stored

    async def consumer(self, conn, topic: str, name: str, stamps: bool = True):
        return _OursConsumer(await conn.subscribe(topic, start="oldest", auto_commit=True), stamps)

    async def ping(self, conn) -> None:
        await conn.ping()


class _OursConsumer:
    __slots__ = ("sub", "stamps")

    def __init__(self, sub, stamps: bool) -> None:
        self.sub = sub
        self.stamps = stamps      # read each payload's timestamp (False: count only)

    async def fetch(self, max_messages: int, timeout: float):
        batch = await self.sub.get_batch(max_messages, timeout)
        if not self.stamps:
            return len(batch), ()
        return len(batch), [_ts_of(m.value)[0] for m in batch]

    async def close(self) -> None:
        await self.sub.close()


class _RawProtocol(asyncio.Protocol):
    """A bare v1 connection: frames in, counters and futures out."""

    def __init__(self, wire1, max_frame: int) -> None:
        self.wire1 = wire1
        self.reader = wire1.V1Reader(max_frame)
        self.transport = None
        self.acks: collections.deque = collections.deque()   # futures of PUBs in flight, in order
        self.replies: dict = {}                              # rid -> future (HEL, SUB, PNG)
        self.msgs: collections.deque = collections.deque()   # (count, first offset) per MSG frame
        self.msg_waiter = None
        self.lost = None
        self.paused = False
        self.drains: list = []                               # writers waiting for resume_writing
        k = wire1.KINDS
        self.K_ACK, self.K_MSG, self.K_ERR = k[b"ACK"], k[b"MSG"], k[b"ERR"]

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data) -> None:
        K_ACK, K_MSG = self.K_ACK, self.K_MSG
        for kind, rid, payload in self.reader.feed(data):
            if kind == K_ACK:
                fut = self.acks.popleft()
                if not fut.done():
                    fut.set_result(None)
            elif kind == K_MSG:
                tlen = int.from_bytes(payload[0:2], "big")
                count = int.from_bytes(payload[2 + tlen:6 + tlen], "big")
                first = int.from_bytes(payload[14 + tlen:22 + tlen], "big") if count else 0
                self.msgs.append((count, first))
                w = self.msg_waiter
                if w is not None and not w.done():
                    w.set_result(None)
            elif kind == self.K_ERR:
                self._fail(RuntimeError("broker error: %r" % bytes(payload[:200])))
            else:
                fut = self.replies.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(payload)

    def _fail(self, exc) -> None:
        self.lost = exc
        for fut in list(self.acks) + list(self.replies.values()) + [self.msg_waiter] + self.drains:
            if fut is not None and not fut.done():
                fut.set_exception(exc)

    def connection_lost(self, exc) -> None:
        self._fail(ConnectionError("connection lost: %s" % exc))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        drains, self.drains = self.drains, []
        for fut in drains:
            if not fut.done():
                fut.set_result(None)


class OursRawDriver:
    """pylogstreams through pre-encoded v1 frames on a bare asyncio protocol.

    ``publish`` ignores the values it is given after the first call per
    topic: it sends the same pre-encoded ``PUB`` frame again (so the
    payload timestamps are stale: raw rows report ack latency, not
    end-to-end). The consumer counts records from each ``MSG`` header and
    commits once per frame; it does not decode records.
    """

    name = "ours-raw"

    def __init__(self, host: str, port: int, opts: dict) -> None:
        from ..codec import wire1
        self.wire1 = wire1
        self.host, self.port = host, port
        self.max_frame = max(opts.get("max_frame_bytes", 1 << 20), 1 << 20) * 2
        self._frames: dict = {}     # (topic, count) -> pre-encoded PUB frame
        self._rid = 0

    async def setup_topic(self, conn, topic: str) -> None:
        pass

    def _next_rid(self) -> int:
        self._rid = (self._rid + 1) & 0xFFFFFFFF or 1
        return self._rid

    async def _request(self, proto, kind: bytes, payload: bytes = b""):
        rid = self._next_rid()
        fut = asyncio.get_running_loop().create_future()
        proto.replies[rid] = fut
        proto.transport.write(self.wire1.encode(kind, rid, payload))
        return await asyncio.wait_for(fut, 60)

    async def connect(self, name: str, lanes: int = 1):
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(
            lambda: _RawProtocol(self.wire1, self.max_frame), self.host, self.port)
        await self._request(proto, b"HEL", struct.pack(">H", 1) + self.wire1.pack_str(name.encode()))
        return proto

    async def close(self, proto) -> None:
        if proto.transport is not None and not proto.transport.is_closing():
            proto.transport.write(b"\0\0\0\0")
            proto.transport.close()

    async def publish(self, proto, topic: str, values: list) -> None:
        key = (topic, len(values))
        frame = self._frames.get(key)
        if frame is None:
            frame = self._frames[key] = self.wire1.encode_publish(1, topic.encode(), values)
        if proto.lost is not None:
            raise proto.lost
        fut = asyncio.get_running_loop().create_future()
        proto.acks.append(fut)
        proto.transport.write(frame)
        if proto.paused:
            drain = asyncio.get_running_loop().create_future()
            proto.drains.append(drain)
            await drain
        await fut

    preload = publish

    async def preload_done(self, proto, topic: str, count: int) -> None:
        pass

    async def consumer(self, proto, topic: str, name: str, stamps: bool = True):
        spec = self.wire1.pack_str(topic.encode()) + struct.pack(">Bq", 1, 0)  # from oldest
        await self._request(proto, b"SUB", spec)
        return _RawConsumer(self, proto, topic)

    async def ping(self, proto) -> None:
        await self._request(proto, b"PNG")


class _RawConsumer:
    def __init__(self, driver: OursRawDriver, proto: _RawProtocol, topic: str) -> None:
        self.driver = driver
        self.proto = proto
        self.topic_str = driver.wire1.pack_str(topic.encode())

    async def fetch(self, max_messages: int, timeout: float):
        proto = self.proto
        if not proto.msgs:
            if proto.lost is not None:
                raise proto.lost
            proto.msg_waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(proto.msg_waiter, timeout)
            except asyncio.TimeoutError:
                return 0, []
            finally:
                proto.msg_waiter = None
        n = 0
        nxt = 0
        msgs = proto.msgs
        while msgs and n < max_messages:
            count, first = msgs.popleft()
            n += count
            nxt = first + count
        if n:
            # Commit like the client's auto-commit would; the RES is not awaited.
            rid = self.driver._next_rid()
            proto.transport.write(self.driver.wire1.encode(b"CMT", rid, self.topic_str + struct.pack(">Q", nxt)))
        return n, ()

    async def close(self) -> None:
        pass


def make_driver(system: str, host: str, port: int, opts: dict):
    """The driver for ``system``: ours, ours-raw, redis or nats."""
    if system == "ours":
        return OursClientDriver(host, port, opts)
    if system == "ours-raw":
        return OursRawDriver(host, port, opts)
    from . import peers
    if system == "redis":
        return peers.RedisDriver(host, port, opts)
    if system == "nats":
        return peers.NatsDriver(host, port, opts)
    raise ValueError("unknown system %r" % system)


# -- roles ----------------------------------------------------------------------


class _Ctx:
    """What a role coroutine needs: plan, shared state, its own counter slot."""

    def __init__(self, wid: int, plan: dict, shared: dict) -> None:
        self.wid = wid
        self.plan = plan
        self.counters = shared["counters"]     # Array('q'): progress per worker
        self.expected = shared["expected"]     # Array('q'): per consumer client, -1 = unknown
        self.start = shared["start"]           # Event: go
        self.stop = shared["stop"]             # Event: stop now (deadline or Ctrl-C)
        self.count = 0                         # messages (or pings) done by this worker
        self.nbytes = 0
        self.t_first = 0.0                     # time.time() of the first completion
        self.t_last = 0.0                      # time.time() of the last completion
        self.lat = array.array("q")            # latency samples, ns
        self.per_topic: collections.Counter = collections.Counter()  # topic -> stored messages
        self.errors: list[str] = []

    def done(self, n: int) -> None:
        now = time.time()
        if not self.t_first:
            self.t_first = now
        self.t_last = now
        self.count += n
        self.counters[self.wid] = self.count

    def stopping(self) -> bool:
        return self.stop.is_set()


async def _produce(ctx: _Ctx, driver, clients: list) -> None:
    plan = ctx.plan
    size = plan["size"]
    batch = plan["batch"]
    window = plan["window"]
    pad = payload_pad(size)
    rate = plan.get("rate") or 0.0
    duration = plan.get("duration") or 0.0
    deadline = time.monotonic() + (duration or plan["max_seconds"])
    preload = plan["role"] == "preload"
    publish = driver.preload if preload else driver.publish
    lat = ctx.lat
    ns = time.perf_counter_ns

    async def lane(conn, topic: str, quota: list) -> None:
        while not ctx.stopping():
            if duration:
                if time.monotonic() >= deadline:
                    return
                n = batch
            else:
                n = min(batch, quota[0])
                if n <= 0:
                    return
                quota[0] -= n
            values = [_TS.pack(time.time_ns()) + pad] * n
            t0 = ns()
            await publish(conn, topic, values)
            lat.append(ns() - t0)
            ctx.per_topic[topic] += n
            ctx.done(n)
            if time.monotonic() >= deadline and not duration:
                return

    async def paced(conn, topic: str, quota: list, per_client_rate: float) -> None:
        # Fixed rate: every tick, send what is due (one frame), stamped when sent.
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(window)
        tasks = set()
        t0 = time.monotonic()
        sent = 0

        async def one(values, n):
            try:
                t = ns()
                await publish(conn, topic, values)
                lat.append(ns() - t)
                ctx.per_topic[topic] += n
                ctx.done(n)
            finally:
                sem.release()

        while not ctx.stopping():
            now = time.monotonic()
            if now >= deadline or (not duration and quota[0] <= 0):
                break
            due = int((now - t0) * per_client_rate) - sent
            if not duration:
                due = min(due, quota[0])
            if due > 0:
                due = min(due, max(batch, 1))
                await sem.acquire()
                values = [_TS.pack(time.time_ns()) + pad] * due
                task = loop.create_task(one(values, due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += due
                if not duration:
                    quota[0] -= due
            # Ticks of at least 1 ms: the loop's timers have millisecond
            # resolution, so shorter sleeps would spin (and the producer's
            # CPU, not the broker, would set the latency).
            next_at = max(t0 + (sent + 1) / per_client_rate, now + _TICK)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if tasks:
            await asyncio.gather(*tasks)

    conns = []
    try:
        for c in clients:
            conn = await driver.connect(c["name"], window)
            conns.append(conn)
            await driver.setup_topic(conn, c["topic"])
        await _ready_and_wait(ctx)
        jobs = []
        for conn, c in zip(conns, clients):
            quota = [c["quota"]]
            if rate:
                jobs.append(paced(conn, c["topic"], quota, rate / len(clients)))
            else:
                jobs.extend(lane(conn, c["topic"], quota) for _ in range(window))
        await asyncio.gather(*jobs)
        if preload:
            for conn, c in zip(conns, clients):
                await driver.preload_done(conn, c["topic"], ctx.per_topic[c["topic"]])
    finally:
        for conn in conns:
            try:
                await asyncio.wait_for(driver.close(conn), 10)
            except Exception:  # noqa: BLE001 - closing after a failure
                pass


async def _consume(ctx: _Ctx, driver, clients: list) -> None:
    plan = ctx.plan
    batch = plan["fetch"]
    deadline = time.monotonic() + plan["max_seconds"]
    lat = ctx.lat
    size = plan["size"]
    conns, subs = [], []

    async def one(sub, slot: int) -> None:
        got = 0
        while not ctx.stopping() and time.monotonic() < deadline:
            want = ctx.expected[slot]
            if 0 <= want <= got:
                return
            n, stamps = await sub.fetch(batch, 0.2)
            if n:
                now = time.time_ns()
                if stamps:
                    lat.extend([now - t for t in stamps])
                got += n
                ctx.nbytes += n * size
                ctx.done(n)

    try:
        for c in clients:
            conn = await driver.connect(c["name"])
            conns.append(conn)
            await driver.setup_topic(conn, c["topic"])
            subs.append(await driver.consumer(conn, c["topic"], c["name"], plan.get("stamps", True)))
        await _ready_and_wait(ctx)
        await asyncio.gather(*(one(sub, c["slot"]) for sub, c in zip(subs, clients)))
    finally:
        for sub in subs:
            try:
                await asyncio.wait_for(sub.close(), 10)
            except Exception:  # noqa: BLE001
                pass
        for conn in conns:
            try:
                await asyncio.wait_for(driver.close(conn), 10)
            except Exception:  # noqa: BLE001
                pass


async def _conn(ctx: _Ctx, driver, clients: list) -> None:
    import random
    plan = ctx.plan
    interval = plan["ping_interval"]
    hold = plan["hold"]
    lat = ctx.lat
    conns: list = []
    sem = asyncio.Semaphore(plan.get("connect_parallel", 100))
    t_connect = time.monotonic()

    async def open_one(c):
        async with sem:
            conns.append(await driver.connect(c["name"]))

    async def pinger(conn, end: float) -> None:
        await asyncio.sleep(random.random() * interval)
        while not ctx.stopping() and time.monotonic() < end:
            t0 = time.perf_counter_ns()
            await driver.ping(conn)
            lat.append(time.perf_counter_ns() - t0)
            ctx.done(1)
            await asyncio.sleep(interval)

    try:
        await asyncio.gather(*(open_one(c) for c in clients))
        ctx.connect_seconds = time.monotonic() - t_connect
        await _ready_and_wait(ctx)
        end = time.monotonic() + hold
        await asyncio.gather(*(pinger(conn, end) for conn in conns))
    finally:
        closing = [asyncio.wait_for(driver.close(conn), 10) for conn in conns]
        for i in range(0, len(closing), 500):
            await asyncio.gather(*closing[i:i + 500], return_exceptions=True)


async def _ready_and_wait(ctx: _Ctx) -> None:
    ctx.shared_q.put(("ready", ctx.wid, getattr(ctx, "connect_seconds", 0.0)))
    loop = asyncio.get_running_loop()
    while not ctx.start.is_set():
        if ctx.stop.is_set():
            raise asyncio.CancelledError("stopped before start")
        await loop.run_in_executor(None, ctx.start.wait, 0.5)


_ROLES = {"produce": _produce, "preload": _produce, "consume": _consume, "conn": _conn}


def worker_main(wid: int, plan: dict, shared: dict) -> None:
    """Entry point of a spawned worker: run ``plan["role"]``, report on the queue."""
    q = shared["queue"]
    if plan.get("client_pure"):
        os.environ["PYLOGSTREAMS_NO_EXTENSIONS"] = "1"
    else:
        os.environ.pop("PYLOGSTREAMS_NO_EXTENSIONS", None)
    raise_nofile(len(plan["clients"]) + 64)
    malloc_tuned = False
    if plan.get("malloc", "default") == "tuned":
        from broker.client.memory import tune_malloc
        malloc_tuned = tune_malloc()
    ctx = _Ctx(wid, plan, shared)
    ctx.shared_q = q
    try:
        driver = make_driver(plan["system"], plan["host"], plan["port"], plan)
        role = _ROLES[plan["role"]]
        try:
            import uvloop
            run = uvloop.run
        except ImportError:  # pragma: no cover
            run = asyncio.run
        run(role(ctx, driver, plan["clients"]))
    except KeyboardInterrupt:
        return
    except BaseException as exc:  # noqa: BLE001 - reported to the harness
        if not ctx.stop.is_set() or not isinstance(exc, asyncio.CancelledError):
            q.put(("error", wid, "%s: %s\n%s" % (type(exc).__name__, exc, traceback.format_exc(limit=8))))
            return
    q.put(("result", wid, {
        "role": plan["role"], "count": ctx.count, "bytes": ctx.count * plan["size"],
        "t_first": ctx.t_first, "t_last": ctx.t_last, "lat": ctx.lat.tobytes(),
        "per_topic": dict(ctx.per_topic), "connect_seconds": getattr(ctx, "connect_seconds", 0.0),
        "malloc_tuned": malloc_tuned,
    }))
