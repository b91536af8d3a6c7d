"""The client library: one set of behavioural tests, run on both clients.

Every test body is written once, as a coroutine against a small adapter
(``api``): with ``api`` = ``async`` it drives :class:`broker.AsyncClient`
on the test's event loop; with ``sync`` it drives the blocking
:class:`broker.Client` from worker threads (one per call, so concurrent
producers really are concurrent threads). Both run against a real broker of
each implementation (``impl`` c / py, from conftest). The client's own codec
is the one this test process imported; the twins are compared directly in
test_wire1.py.

Every wait has a deadline: adapter calls time out, the whole body has a
timeout, and blocking calls run in daemon threads that cannot keep the test
process alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest

import broker
from broker.client import (
    AlreadySubscribed, BrokerError, ConnectionLost, InvalidOffset, InvalidTopicError,
    NotSubscribed, error_for,
)
from broker.client import errors as client_errors
from broker.errors import ErrorCode
from conftest import impl_env
from v1support import HOST, free_port, unique
from v1support import shared_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

CALL_TIMEOUT = 20.0   # any single client call
BODY_TIMEOUT = 90.0   # a whole test body
TESTS_DIR = Path(__file__).resolve().parent


# -- the adapter --------------------------------------------------------------------

async def in_thread(fn, *args, timeout: float = CALL_TIMEOUT):
    """Run a blocking call in a daemon thread; await its result with a deadline."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(ok, value):
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def run():
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting test
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    threading.Thread(target=run, daemon=True, name="sync-call").start()
    return await asyncio.wait_for(fut, timeout)


class SyncSub:
    def __init__(self, sub):
        self.raw = sub

    async def take(self, n: int, timeout: float = CALL_TIMEOUT):
        """The next ``n`` messages, by iterating (``next``)."""
        it = iter(self.raw)
        return await in_thread(lambda: [next(it) for _ in range(n)], timeout=timeout)

    async def poll(self, timeout: float):
        return await in_thread(self.raw.poll, timeout, timeout=timeout + CALL_TIMEOUT)

    async def commit(self, offset=None):
        await in_thread(self.raw.commit, offset)

    async def seek(self, start):
        return await in_thread(self.raw.seek, start)

    async def close(self):
        await in_thread(self.raw.close)


class SyncProducer:
    def __init__(self, producer):
        self.raw = producer

    async def send_many(self, topic, values):
        """Queue values; returns awaitables of their offsets."""
        cfuts = await in_thread(self.raw.send_many, topic, values)
        return [asyncio.wrap_future(f) for f in cfuts]

    async def flush(self):
        await in_thread(self.raw.flush)


class SyncClient:
    kind = "sync"

    def __init__(self, client):
        self.raw = client

    @property
    def client_id(self):
        return self.raw.client_id

    @property
    def aclient(self):
        return self.raw._aclient

    async def publish(self, topic, value):
        return await in_thread(self.raw.publish, topic, value)

    async def publish_batch(self, topic, values):
        return await in_thread(self.raw.publish_batch, topic, values)

    async def subscribe(self, topic, start=None, auto_commit=True):
        return SyncSub(await in_thread(functools.partial(
            self.raw.subscribe, topic, start, auto_commit=auto_commit)))

    async def producer(self, **options):
        return SyncProducer(self.raw.producer(**options))

    async def commit(self, topic, offset):
        await in_thread(self.raw.commit, topic, offset)

    async def ping(self):
        await in_thread(self.raw.ping)

    async def topics(self):
        return await in_thread(self.raw.topics)

    async def offsets(self, client_id=None):
        return await in_thread(self.raw.offsets, client_id)

    async def stats(self):
        return await in_thread(self.raw.stats)

    async def close(self):
        await in_thread(self.raw.close)

    async def drop_connection(self):
        """Cut the TCP connection abruptly (RST), as a crash would."""
        proto = self.aclient._proto
        self.raw._lt.loop.call_soon_threadsafe(_abort, proto.transport)


class AsyncSub:
    def __init__(self, sub):
        self.raw = sub

    async def take(self, n: int, timeout: float = CALL_TIMEOUT):
        async def go():
            return [await self.raw.__anext__() for _ in range(n)]
        return await asyncio.wait_for(go(), timeout)

    async def poll(self, timeout: float):
        return await asyncio.wait_for(self.raw.get_batch(1000, timeout), timeout + CALL_TIMEOUT)

    async def commit(self, offset=None):
        await asyncio.wait_for(self.raw.commit(offset), CALL_TIMEOUT)

    async def seek(self, start):
        return await asyncio.wait_for(self.raw.seek(start), CALL_TIMEOUT)

    async def close(self):
        await asyncio.wait_for(self.raw.close(), CALL_TIMEOUT)


class AsyncProducer:
    def __init__(self, producer):
        self.raw = producer

    async def send_many(self, topic, values):
        return [await self.raw.send(topic, v) for v in values]

    async def flush(self):
        await asyncio.wait_for(self.raw.flush(), CALL_TIMEOUT)


class AsyncClientA:
    kind = "async"

    def __init__(self, client):
        self.raw = client
        self.aclient = client

    @property
    def client_id(self):
        return self.raw.client_id

    def _w(self, coro):
        return asyncio.wait_for(coro, CALL_TIMEOUT)

    async def publish(self, topic, value):
        return await self._w(self.raw.publish(topic, value))

    async def publish_batch(self, topic, values):
        return await self._w(self.raw.publish_batch(topic, values))

    async def subscribe(self, topic, start=None, auto_commit=True):
        return AsyncSub(await self._w(self.raw.subscribe(topic, start, auto_commit=auto_commit)))

    async def producer(self, **options):
        return AsyncProducer(self.raw.producer(**options))

    async def commit(self, topic, offset):
        await self._w(self.raw.commit(topic, offset))

    async def ping(self):
        await self._w(self.raw.ping())

    async def topics(self):
        return await self._w(self.raw.topics())

    async def offsets(self, client_id=None):
        return await self._w(self.raw.offsets(client_id))

    async def stats(self):
        return await self._w(self.raw.stats())

    async def close(self):
        await self._w(self.raw.close())

    async def drop_connection(self):
        _abort(self.raw._proto.transport)


def _abort(transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:  # RST rather than FIN, like a crashed process
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class API:
    """Connects clients of one kind and runs a test body, closing them after."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.clients: list = []

    async def connect(self, port: int, **options):
        options.setdefault("heartbeat", 0)
        options.setdefault("reconnect", False)
        options.setdefault("request_timeout", CALL_TIMEOUT)
        options.setdefault("connect_timeout", 5.0)
        if self.kind == "sync":
            c = SyncClient(await in_thread(functools.partial(broker.Client, HOST, port, **options)))
        else:
            raw = broker.AsyncClient(HOST, port, **options)
            await asyncio.wait_for(raw.connect(), CALL_TIMEOUT)
            c = AsyncClientA(raw)
        self.clients.append(c)
        return c

    def run(self, body):
        """Decorator: run ``body()`` now, on a fresh event loop, with a deadline."""
        async def main():
            try:
                await asyncio.wait_for(body(), BODY_TIMEOUT)
            finally:
                for c in self.clients:
                    try:
                        await asyncio.wait_for(c.close(), 10)
                    except Exception:  # noqa: BLE001 - best effort cleanup
                        pass
        asyncio.run(main())
        return body


@pytest.fixture(params=["sync", "async"])
def api(request) -> API:
    return API(request.param)


def values(n: int, tag: str = "v") -> list[bytes]:
    return [("%s-%05d|" % (tag, i)).encode() + bytes([i % 256]) * (i % 13) for i in range(n)]


# -- publishing ---------------------------------------------------------------------

def test_publish_returns_offsets(api, shared_server):
    @api.run
    async def _():
        c = await api.connect(shared_server.port)
        t = unique()
        assert [await c.publish(t, b"a"), await c.publish(t, b"b")] == [0, 1]
        assert await c.publish(t, "é") == 2              # str is sent as UTF-8
        assert await c.publish_batch(t, [b"x", b"y", "z"]) == 3
        assert await c.publish_batch(t, values(100)) == 6
        assert await c.publish(t, b"") == 106
        sub = await c.subscribe(t, "oldest")
        got = await sub.take(107)
        assert [m.offset for m in got] == list(range(107))
        assert [m.value for m in got] == [b"a", b"b", "é".encode(), b"x", b"y", b"z", *values(100), b""]
        assert all(m.topic == t for m in got)
        now = time.time() * 1000
        assert all(now - 60_000 < m.timestamp <= now + 1000 for m in got)
        assert isinstance(got[0], broker.Message)


def test_concurrent_producers_get_correct_acks(api, shared_server):
    """Several producers at once: every offset handed out once, and each holds its message."""
    n_prod, per_prod, n_plain = 4, 1500, 100

    @api.run
    async def _():
        t = unique("conc")
        port = shared_server.port
        clients = [await api.connect(port) for _ in range(n_prod + 2)]

        async def producer(k, c):
            p = await c.producer(max_batch=64, linger_ms=2, max_in_flight=3)
            mine = values(per_prod, "p%d" % k)
            futs = []
            for i in range(0, per_prod, 100):
                futs.extend(await p.send_many(t, mine[i:i + 100]))
                await asyncio.sleep(0)
            await p.flush()
            offsets = [await asyncio.wait_for(f, CALL_TIMEOUT) for f in futs]
            return list(zip(offsets, mine))

        async def plain(k, c):
            out = []
            for v in values(n_plain, "plain%d" % k):
                out.append((await c.publish(t, v), v))
            return out

        jobs = [producer(k, c) for k, c in enumerate(clients[:n_prod])]
        jobs += [plain(k, c) for k, c in enumerate(clients[n_prod:])]
        results = await asyncio.gather(*jobs)
        total = n_prod * per_prod + 2 * n_plain
        by_offset = {}
        for res in results:
            offs = [o for o, _ in res]
            assert offs == sorted(offs) and len(set(offs)) == len(offs), \
                "one producer's offsets must increase in send order"
            for o, v in res:
                assert o not in by_offset, "offset %d acknowledged twice" % o
                by_offset[o] = v
        assert sorted(by_offset) == list(range(total)), "acknowledged offsets are not contiguous"
        sub = await clients[0].subscribe(t, "oldest")
        got = await sub.take(total, timeout=60)
        assert [m.offset for m in got] == list(range(total))
        bad = [m.offset for m in got if by_offset[m.offset] != m.value]
        assert not bad, "offsets whose stored message is not the acknowledged one: %r" % bad[:10]


def test_producer_batches_several_topics(api, shared_server):
    """One producer, interleaved topics, a small window: all acknowledged, in order per topic."""
    @api.run
    async def _():
        c = await api.connect(shared_server.port)
        topics = [unique("multi") for _ in range(3)]
        p = await c.producer(max_batch=7, linger_ms=1, max_in_flight=1)
        futs = {t: [] for t in topics}
        for i in range(120):
            t = topics[i % 3 if i % 10 else (i // 10) % 3]
            futs[t].extend(await p.send_many(t, [b"%d" % i]))
        await p.flush()
        for t in topics:
            offs = [await asyncio.wait_for(f, CALL_TIMEOUT) for f in futs[t]]
            assert offs == list(range(len(offs)))


# -- subscribing -------------------------------------------------------------------

def test_subscribe_from_every_start(api, shared_server):
    @api.run
    async def _():
        port = shared_server.port
        t = unique("start")
        p = await api.connect(port)
        await p.publish_batch(t, values(5, "old"))
        await asyncio.sleep(0.05)   # time is the subject: later timestamps for the next batch
        await p.publish_batch(t, values(5, "new"))
        c = await api.connect(port)

        async def first(start, n):
            sub = await c.subscribe(t, start)
            got = await sub.take(n)
            await sub.close()
            return got

        all10 = await first("oldest", 10)
        assert [m.offset for m in all10] == list(range(10))
        assert [m.value for m in all10] == values(5, "old") + values(5, "new")
        assert [m.offset for m in await first(3, 7)] == list(range(3, 10))
        ts5 = all10[5].timestamp
        assert all10[4].timestamp < ts5
        when = datetime.datetime.fromtimestamp(ts5 / 1000, tz=datetime.timezone.utc)
        assert [m.offset for m in await first(when, 5)] == list(range(5, 10))
        assert [m.offset for m in await first(("time", ts5), 5)] == list(range(5, 10))
        assert [m.offset for m in await first(("time", 0), 1)] == [0]

        # latest, and an offset past the end (clamped to it): only new messages.
        latest = await c.subscribe(t, "latest")
        assert await latest.poll(0.2) == []
        other = unique("past")
        await p.publish(other, b"zero")
        past = await c.subscribe(other, 1000)
        await p.publish(t, b"eleventh")
        await p.publish(other, b"one")
        assert [(m.offset, m.value) for m in await latest.take(1)] == [(10, b"eleventh")]
        assert [(m.offset, m.value) for m in await past.take(1)] == [(1, b"one")]

        # committed: the oldest without a commit, the commit with one.
        cid = "cm-" + uuid.uuid4().hex
        k = await api.connect(port, client_id=cid)
        assert [m.offset for m in await (await k.subscribe(t, auto_commit=False)).take(1)] == [0]
        await k.commit(t, 7)
        await k.close()
        k2 = await api.connect(port, client_id=cid)
        sub = await k2.subscribe(t, "committed", auto_commit=False)
        assert [m.offset for m in await sub.take(4)] == [7, 8, 9, 10]


def test_seek(api, shared_server):
    @api.run
    async def _():
        t = unique("seek")
        c = await api.connect(shared_server.port)
        await c.publish_batch(t, values(10))
        sub = await c.subscribe(t, "oldest", auto_commit=False)
        got = await sub.take(10)
        assert await sub.seek(3) == 3
        assert [m.offset for m in await sub.take(7)] == list(range(3, 10))
        assert await sub.seek("oldest") == 0
        assert [m.offset for m in await sub.take(2)] == [0, 1]
        assert await sub.seek("latest") == 10
        assert await sub.poll(0.2) == []
        await c.publish(t, b"ten")
        assert [(m.offset, m.value) for m in await sub.take(1)] == [(10, b"ten")]
        assert await sub.seek(("time", got[4].timestamp)) <= 4
        assert await sub.seek(1 << 40) == 11
        with pytest.raises(ValueError):
            await sub.seek(-1)


def test_seek_back_while_messages_are_in_flight(api, shared_server):
    """Seeking back in the middle of a long delivery loses nothing after the seek point."""
    @api.run
    async def _():
        t = unique("seekfly")
        c = await api.connect(shared_server.port)
        await c.publish_batch(t, values(3000))
        for round_ in range(3):
            sub = await c.subscribe(t, "oldest", auto_commit=False)
            await sub.take(5 + round_ * 50)
            assert await sub.seek(2) == 2
            got = await sub.take(400)
            assert [m.offset for m in got] == list(range(2, 402))
            await sub.close()


# -- at least once --------------------------------------------------------------------

def _consumer_process(impl, port, topic, client_id, kind, n, commit):
    argv = [sys.executable, str(TESTS_DIR / "v1support.py"), "consume", str(port), topic,
            client_id, kind, str(n), "yes" if commit else "no"]
    return subprocess.Popen(argv, env=impl_env(impl), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(TESTS_DIR))


def _read_line(proc, timeout: float) -> str:
    """One stdout line from ``proc`` within ``timeout`` seconds."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError("no line from the consumer within %.0fs; stderr: %s"
                                     % (timeout, _stderr(proc)))
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError("consumer exited (rc=%s): %s" % (proc.wait(5), _stderr(proc)))
            buf += chunk
    finally:
        sel.close()
    return buf.decode().strip()


def _stderr(proc) -> str:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    return proc.stderr.read().decode(errors="replace")[-2000:]


@pytest.mark.parametrize("commit", [False, True], ids=["no-commit", "committed"])
def test_killed_consumer(api, shared_server, impl, commit):
    """kill -9 a consumer holding 5 messages: without a commit they come again, after one not."""
    @api.run
    async def _():
        t = unique("kill")
        cid = "victim-" + uuid.uuid4().hex
        c = await api.connect(shared_server.port)
        await c.publish_batch(t, values(10))
        proc = _consumer_process(impl, shared_server.port, t, cid, api.kind, 5, commit)
        try:
            line = await in_thread(_read_line, proc, 30.0, timeout=40)
            assert line == "OFFSETS 0,1,2,3,4", line
        finally:
            proc.kill()
            proc.wait(10)
            proc.stdin.close()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        again = await api.connect(shared_server.port, client_id=cid)
        sub = await again.subscribe(t, auto_commit=False)
        first = (await sub.take(1))[0].offset
        assert first == (5 if commit else 0)


@pytest.mark.parametrize("commit", [False, True], ids=["no-commit", "committed"])
def test_dropped_connection(api, shared_server, commit):
    """The same with the connection cut (RST) inside this process."""
    @api.run
    async def _():
        t = unique("drop")
        cid = "drop-" + uuid.uuid4().hex
        p = await api.connect(shared_server.port)
        await p.publish_batch(t, values(10))
        c = await api.connect(shared_server.port, client_id=cid)
        sub = await c.subscribe(t, auto_commit=False)
        assert [m.offset for m in await sub.take(6)] == list(range(6))
        if commit:
            await sub.commit()     # everything handed out: 0..5
        await c.drop_connection()
        again = await api.connect(shared_server.port, client_id=cid)
        sub2 = await again.subscribe(t, auto_commit=False)
        assert (await sub2.take(1))[0].offset == (6 if commit else 0)


def test_auto_commit(api, shared_server):
    """auto_commit: processed messages are committed when the buffer runs dry and on close."""
    @api.run
    async def _():
        t = unique("auto")
        cid = "auto-" + uuid.uuid4().hex
        p = await api.connect(shared_server.port)
        await p.publish_batch(t, values(10))
        c = await api.connect(shared_server.port, client_id=cid)
        sub = await c.subscribe(t)
        assert len(await sub.take(10)) == 10
        assert await sub.poll(0.2) == []     # ran dry: the ten are processed and committed
        await c.ping()                      # replies come in order: the commit was handled
        rows = await p.offsets(cid)
        assert [(r["topic"], r["offset"], r["lag"]) for r in rows] == [(t, 10, 0)]
        await p.publish_batch(t, values(3, "more"))
        assert len(await sub.take(2)) == 2
        # Closing counts the message in hand as processed too (the caller is
        # done with it), but not the third, never handed out.
        await c.close()
        rows = await p.offsets(cid)
        assert [r["offset"] for r in rows] == [12]


def _count_commits(client: broker.AsyncClient):
    """Spy on ``client``'s CMT frames: a list of their offsets, and an event per frame."""
    sent: list[int] = []
    event = asyncio.Event()
    send = client._send

    def spy(kind, payload, *args, **kwargs):
        if kind == b"CMT":
            sent.append(struct.unpack_from(">Q", payload, len(payload) - 8)[0])
            event.set()
        return send(kind, payload, *args, **kwargs)

    client._send = spy
    return sent, event


async def _consume_one_and_run_dry(p, sub, topic, value):
    await p.publish(topic, value)
    assert len(await asyncio.wait_for(sub.get_batch(10), CALL_TIMEOUT)) == 1
    assert await sub.get_batch(10, 0.05) == []   # ran dry: the message is processed


async def _until_committed(sent, event, offset):
    """Wait for the CMT of ``offset`` (it may wait for a commit interval)."""
    while not sent or sent[-1] != offset:
        event.clear()
        await asyncio.wait_for(event.wait(), 15)


@contextlib.asynccontextmanager
async def _first_processed(port: int, tag: str, commit_interval: float):
    """A producer, and a consumer that has processed one message of a new topic.

    Yields ``(producer, consumer, sub, topic, client_id, sent, event)``:
    ``sent`` and ``event`` spy on the consumer's CMT frames. The consumer
    is closed by the caller (or with the context).
    """
    t = unique(tag)
    cid = tag + "-" + uuid.uuid4().hex
    async with broker.AsyncClient(HOST, port, reconnect=False) as p:
        c = await broker.AsyncClient(HOST, port, client_id=cid, reconnect=False,
                                     commit_interval=commit_interval).connect()
        try:
            sent, event = _count_commits(c)
            await p.publish(t, b"first")        # the topic exists before the subscription
            sub = await c.subscribe(t, start="oldest")
            assert len(await sub.get_batch(10)) == 1
            assert await sub.get_batch(10, 0.05) == []
            yield p, c, sub, t, cid, sent, event
        finally:
            await c.close()


# A subscription whose buffer runs dry before its first delivery arrives
# commits its start (offset 0) then, so the first message's commit may
# have waited for the interval.


def test_auto_commits_are_coalesced_within_the_interval(shared_server):
    """The buffer runs dry twice within the interval: one CMT for both, at its end."""
    async def main():
        async with _first_processed(shared_server.port, "coalesce", 3.0) as (p, c, sub, t, cid,
                                                                             sent, event):
            await _until_committed(sent, event, 1)
            before = len(sent)
            event.clear()
            for value in (b"second", b"third"):
                await _consume_one_and_run_dry(p, sub, t, value)
            assert len(sent) == before          # within the interval: they wait
            await c.ping()
            assert [r["offset"] for r in await p.offsets(cid)] == [1]
            await asyncio.wait_for(event.wait(), 15)   # the timer's commit
            assert sent[before:] == [3]         # both, in one frame
            await c.ping()
            assert [r["offset"] for r in await p.offsets(cid)] == [3]
            await sub.close()
            assert sent[before:] == [3]         # nothing left to commit
    asyncio.run(asyncio.wait_for(main(), BODY_TIMEOUT))


def test_commit_interval_zero_commits_each_time_the_buffer_runs_dry(shared_server):
    async def main():
        async with _first_processed(shared_server.port, "eachdry", 0) as (p, c, sub, t, cid,
                                                                          sent, _event):
            for value in (b"second", b"third"):
                await _consume_one_and_run_dry(p, sub, t, value)
            assert sent in ([1, 2, 3], [0, 1, 2, 3])
            await c.ping()
            assert [r["offset"] for r in await p.offsets(cid)] == [3]
    asyncio.run(asyncio.wait_for(main(), BODY_TIMEOUT))


def test_closing_sends_a_waiting_auto_commit_at_once(shared_server):
    """A commit waiting for the interval goes with close(), not after it (and not twice)."""
    async def main():
        async with _first_processed(shared_server.port, "closewait", 60.0) as (p, c, sub, t, cid,
                                                                               sent, _event):
            await _consume_one_and_run_dry(p, sub, t, b"second")
            assert sent in ([1], [0])           # one at once; the next waits for 60 s
            assert sub._commit_timer is not None
            await c.close()
            assert sent[-1] == 2 and len(sent) == 2
            assert sub._commit_timer is None    # cancelled: it cannot fire on a closed client
            assert [r["offset"] for r in await p.offsets(cid)] == [2]
    asyncio.run(asyncio.wait_for(main(), BODY_TIMEOUT))


def test_a_negative_commit_interval_is_refused():
    with pytest.raises(ValueError, match="commit_interval"):
        broker.AsyncClient(HOST, 1, commit_interval=-1)


def test_closing_does_not_commit_a_manual_subscription(api, shared_server):
    """auto_commit=False means only commit() commits, also when the client closes."""
    @api.run
    async def _():
        t = unique("manual")
        cid = "manual-" + uuid.uuid4().hex
        p = await api.connect(shared_server.port)
        await p.publish_batch(t, values(10))
        c = await api.connect(shared_server.port, client_id=cid)
        sub = await c.subscribe(t, auto_commit=False)
        await sub.take(10)
        assert await sub.poll(0.1) == []
        await c.close()
        assert await p.offsets(cid) == []
        c2 = await api.connect(shared_server.port, client_id=cid)
        sub2 = await c2.subscribe(t, auto_commit=False)
        assert (await sub2.take(1))[0].offset == 0
        await sub2.commit(4)
        await c2.close()
        assert [r["offset"] for r in await p.offsets(cid)] == [4]


def test_commit_covers_what_was_handed_out(api, shared_server):
    """commit() with no offset commits up to the last message handed to the caller."""
    @api.run
    async def _():
        t = unique("handed")
        cid = "handed-" + uuid.uuid4().hex
        p = await api.connect(shared_server.port)
        await p.publish_batch(t, values(10))
        c = await api.connect(shared_server.port, client_id=cid)
        sub = await c.subscribe(t, auto_commit=False)
        got = await sub.take(3)
        rest = await sub.poll(1.0)
        while len(got) + len(rest) < 10:
            rest += await sub.poll(1.0)
        assert [m.offset for m in got + rest] == list(range(10))
        await sub.commit()
        assert [r["offset"] for r in await p.offsets(cid)] == [10]


def test_reconnect_after_broker_restart(api, server):
    """kill -9 the broker, start it on the same port: the client reconnects and
    resumes where it was (at least once); a clean restart keeps the commit."""
    srv = server(start=False)
    port = free_port()
    srv.start(port=port)

    @api.run
    async def _():
        t = unique("restart")
        cid = "phoenix-" + uuid.uuid4().hex
        c = await api.connect(port, client_id=cid, reconnect=True)
        await c.publish_batch(t, values(10))
        sub = await c.subscribe(t, "oldest", auto_commit=False)
        assert [m.offset for m in await sub.take(4)] == [0, 1, 2, 3]
        await sub.commit()
        srv.kill()
        # Started from this thread on purpose, blocking the loop for a moment:
        # conftest's servers die with the *thread* that started them
        # (PR_SET_PDEATHSIG), so a helper thread would take this one with it.
        srv.start(port=port)
        assert srv.port == port
        fresh = await api.connect(port)
        assert await fresh.publish_batch(t, values(5, "after")) == 10
        # The old subscription carries on: from where it was, maybe repeating
        # a little (resubscribed at the last processed offset), never skipping.
        seen = [m.offset for m in await sub.take(1)]
        while seen[-1] < 14:
            seen += [m.offset for m in await sub.take(1)]
        assert seen[0] <= 4
        assert all(b <= a + 1 for a, b in zip(seen, seen[1:])), "skipped messages: %r" % seen
        assert set(range(4, 15)) <= set(seen)
        # The old client publishes again on its new connection.
        assert await c.publish(t, b"sixteenth") == 15
        await sub.commit(12)
        await c.close()
        await fresh.close()
        await in_thread(srv.stop, timeout=40)   # clean stop: the commit is on disk
        srv.start(port=port)
        back = await api.connect(port, client_id=cid)
        sub = await back.subscribe(t, auto_commit=False)
        assert [m.offset for m in await sub.take(4)] == [12, 13, 14, 15]


def test_a_connection_reset_while_connecting_is_a_failed_attempt(shared_server, monkeypatch):
    """A reconnect whose new connection is reset before ``_open`` has it (a
    broker starting or stopping on the port) is a failed attempt, retried
    after the backoff. It used to become the client's connection anyway, dead,
    and the HEL sent on it waited ``request_timeout`` (30 s) for a reply: what
    made ``test_reconnect_after_broker_restart`` time out now and then."""
    from broker.client import aio
    real = aio._Protocol.connection_made
    resets = []

    def connection_made(self, transport):
        real(self, transport)
        if resets == ["armed"]:  # the first attempt after arming, only
            resets.append("reset")
            transport.abort()  # connection_lost runs before _open resumes

    monkeypatch.setattr(aio._Protocol, "connection_made", connection_made)

    async def main():
        c = broker.AsyncClient(HOST, shared_server.port, heartbeat=0, reconnect=True,
                               request_timeout=30)
        await asyncio.wait_for(c.connect(), 10)
        t = unique("reset")
        sub = await c.subscribe(t, "oldest")
        resets.append("armed")
        c._proto.transport.abort()  # the connection goes away: the client reconnects
        for _ in range(1000):
            if not c.connected:
                break
            await asyncio.sleep(0)
        assert not c.connected
        await asyncio.wait_for(c.wait_connected(), 10)  # not after request_timeout
        assert resets == ["armed", "reset"]
        assert await c.publish(t, b"after") == 0
        got = await sub.get_batch(1, timeout=10)
        assert [m.value for m in got] == [b"after"]
        await c.close()

    asyncio.run(main())


# -- errors ------------------------------------------------------------------------------

def test_error_codes_map_to_exceptions():
    for code in ErrorCode:
        exc = error_for(int(code), "text")
        assert isinstance(exc, BrokerError)
        assert exc.code == code
        assert "text" in str(exc) and str(int(code)) in str(exc)
        name = type(exc).__name__
        assert name != "BrokerError", "no exception class for %s" % code.name
        assert name in client_errors.__all__
    exc = error_for(999, "new code")
    assert type(exc) is BrokerError and exc.code == 999
    assert issubclass(ConnectionLost, ConnectionError)
    assert issubclass(BrokerError, client_errors.PyLogStreamsError)


def test_typed_exceptions(api, shared_server):
    @api.run
    async def _():
        c = await api.connect(shared_server.port)
        t = unique("typed")
        with pytest.raises(InvalidTopicError) as info:
            await c.publish("no spaces allowed", b"x")
        assert info.value.code == ErrorCode.INVALID_TOPIC
        with pytest.raises(InvalidTopicError):
            await c.subscribe("../etc", "oldest")
        await c.publish(t, b"one")
        with pytest.raises(InvalidOffset):
            await c.commit(t, 5)
        sub = await c.subscribe(t, "oldest")
        with pytest.raises(AlreadySubscribed):
            await c.subscribe(t, "latest")
        await sub.close()
        with pytest.raises(NotSubscribed):
            await sub.close()
        with pytest.raises(ValueError):
            await c.subscribe(t, -3)
        await c.ping()   # the connection survived every refusal
        assert [m.value for m in await (await c.subscribe(t, "oldest")).take(1)] == [b"one"]


def test_subscription_ends_when_the_connection_is_lost(api, server):
    """Without reconnect, iterating a subscription raises ConnectionLost once
    the buffered messages are consumed; it must not wait forever."""
    srv = server()

    @api.run
    async def _():
        c = await api.connect(srv.port, reconnect=False)
        await c.publish_batch("lost", [b"a", b"b", b"c"])
        sub = await c.subscribe("lost", "oldest", auto_commit=False)
        assert [m.value for m in await sub.take(2)] == [b"a", b"b"]
        await in_thread(srv.kill)
        assert [m.value for m in await sub.take(1)] == [b"c"]   # buffered: still handed out
        with pytest.raises(ConnectionLost):
            await sub.take(1, timeout=15)


def test_largest_accepted_message_can_be_consumed(api, shared_server):
    """A MSG frame is 16 bytes larger than the PUB frame that stored its
    message: a client with the default limits must still take it."""
    @api.run
    async def _():
        t = unique("big")
        c = await api.connect(shared_server.port)
        size = (1 << 20) - 7 - 2 - len(t) - 4 - 8   # the PUB frame is exactly 1 MiB
        assert await c.publish(t, b"x" * size) == 0
        sub = await c.subscribe(t, "oldest")
        assert len((await sub.take(1, timeout=10))[0].value) == size


def test_connect_refused(api):
    @api.run
    async def _():
        with pytest.raises(ConnectionLost):
            await api.connect(free_port())


# -- heartbeats -----------------------------------------------------------------------------

def test_heartbeats_keep_the_connection(api, server):
    srv = server("--heartbeat-timeout", "1")

    @api.run
    async def _():
        alive = await api.connect(srv.port, heartbeat=0.3)
        silent = await api.connect(srv.port, heartbeat=0)
        before = (await alive.stats())["connections_accepted"]
        await asyncio.sleep(2.2)     # time is the subject: twice the broker's timeout
        await alive.ping()
        assert await alive.publish(unique("hb"), b"still here") == 0
        stats = await alive.stats()
        assert stats["connections_accepted"] == before, "the heartbeating client reconnected"
        assert stats.get("heartbeat_timeouts") == 1   # the silent one, only
        with pytest.raises(ConnectionLost):
            await silent.ping()


# -- the delivery races, scripted --------------------------------------------------------------

def _f(kind: bytes, rid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I3sI", 7 + len(payload), kind, rid) + payload


def _records(offsets) -> bytes:
    out = b""
    for off in offsets:
        tail = struct.pack(">QQ", off, 1_700_000_000_000 + off) + b"v%d" % off
        out += struct.pack(">II", 20 + len(tail) - 16, zlib.crc32(tail[:16], zlib.crc32(tail[16:]))) + tail
    return out


def _msg(rid: int, offsets) -> bytes:
    offsets = list(offsets)
    return _f(b"MSG", rid, b"\0\x01t" + struct.pack(">I", len(offsets)) + _records(offsets))


class ScriptedBroker:
    """A fake v1 broker in a thread: answers HEL/PNG/CMT/UNS itself and hands
    SUB and SEK to ``on_request(conn_no, kind, rid, payload) -> bytes to send``,
    sent in ONE write, so a reply and the messages behind it arrive together."""

    def __init__(self, on_request):
        self.on_request = on_request
        self.lsock = socket.create_server((HOST, 0))
        self.lsock.settimeout(30)
        self.port = self.lsock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.requests: list = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            for n in range(2):
                sock, _ = self.lsock.accept()
                sock.settimeout(30)
                self.conns.append(sock)
                threading.Thread(target=self._conn, args=(n, sock), daemon=True).start()
        except OSError:
            pass

    def _conn(self, n, sock):
        buf = b""
        try:
            while True:
                while len(buf) < 4 or len(buf) < 4 + struct.unpack_from(">I", buf)[0]:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                size = struct.unpack_from(">I", buf)[0]
                if size == 0:      # the client's goodbye
                    return
                kind, rid = buf[4:7], struct.unpack_from(">I", buf, 7)[0]
                payload, buf = buf[11:4 + size], buf[4 + size:]
                self.requests.append((n, kind, rid, payload))
                if kind == b"HEL":
                    sock.sendall(_f(b"RES", rid, b"\0\x01\0\x04fake\0\x010"))
                elif kind == b"PNG":
                    sock.sendall(_f(b"POG", rid))
                elif kind in (b"CMT", b"UNS"):
                    sock.sendall(_f(b"RES", rid))
                else:
                    sock.sendall(self.on_request(n, kind, rid, payload))
        except OSError:
            return
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def close(self):
        self.lsock.close()
        for s in self.conns:
            s.close()


def test_seek_reply_and_messages_in_one_segment(api):
    """RES(SEK) and the MSG frames that follow it, read in one chunk."""
    def on_request(n, kind, rid, payload):
        if kind == b"SUB":
            on_request.sub_rid = rid
            return _f(b"RES", rid, struct.pack(">Q", 0)) + _msg(rid, range(10))
        assert kind == b"SEK"
        return _f(b"RES", rid, struct.pack(">Q", 5)) + _msg(on_request.sub_rid, range(5, 10))

    fake = ScriptedBroker(on_request)
    try:
        @api.run
        async def _():
            c = await api.connect(fake.port)
            sub = await c.subscribe("t", "oldest", auto_commit=False)
            assert [m.offset for m in await sub.take(10)] == list(range(10))
            assert await sub.seek(5) == 5
            got = await sub.take(5, timeout=3)
            assert [(m.offset, m.value) for m in got] == [(o, b"v%d" % o) for o in range(5, 10)]
    finally:
        fake.close()
    assert fake.error is None, fake.error


def test_resubscribe_reply_and_messages_in_one_segment(api):
    """After a reconnect, RES(SUB) and the redelivered MSG frames in one chunk."""
    resubscribed = threading.Event()

    def on_request(n, kind, rid, payload):
        assert kind == b"SUB"
        if n == 0:
            on_request.rid = rid
            return _f(b"RES", rid, struct.pack(">Q", 0))   # messages come later, separately
        mode, value = struct.unpack_from(">Bq", payload, 3)
        assert (mode, value) == (3, 2), "must resume at the message in hand (offset 2)"
        resubscribed.set()
        return _f(b"RES", rid, struct.pack(">Q", value)) + _msg(rid, range(value, 10))

    fake = ScriptedBroker(on_request)
    try:
        @api.run
        async def _():
            c = await api.connect(fake.port, reconnect=True)
            sub = await c.subscribe("t", "oldest", auto_commit=False)
            fake.conns[0].sendall(_msg(on_request.rid, range(3)))
            assert [m.offset for m in await sub.take(3)] == [0, 1, 2]   # 2 is in hand
            fake.conns[0].shutdown(socket.SHUT_RDWR)   # the broker goes away
            assert await in_thread(resubscribed.wait, 10)
            got = await sub.take(8, timeout=5)
            assert [m.offset for m in got] == list(range(2, 10))
    finally:
        fake.close()
    assert fake.error is None, fake.error


def test_producer_flush_while_a_full_batch_waits(shared_server):
    """flush() and a send() that fills a batch, both waiting for the window."""
    release = threading.Event()
    counts: dict = {}

    def on_request(n, kind, rid, payload):
        assert kind == b"PUB"
        release.wait(20)      # hold every ACK until the test says so
        tlen = struct.unpack_from(">H", payload)[0]
        topic = payload[2:2 + tlen]
        count = struct.unpack_from(">I", payload, 2 + tlen)[0]
        base = counts.get(topic, 0)
        counts[topic] = base + count
        return _f(b"ACK", rid, struct.pack(">QI", base, count))

    fake = ScriptedBroker(on_request)

    async def settle(predicate):
        for _ in range(1000):   # yield to the loop until the tasks got there
            if predicate():
                return
            await asyncio.sleep(0)
        raise AssertionError("tasks did not reach the expected state")

    async def main():
        c = broker.AsyncClient(HOST, fake.port, heartbeat=0, reconnect=False)
        await asyncio.wait_for(c.connect(), 10)
        try:
            p = c.producer(max_batch=3, linger_ms=60_000, max_in_flight=1)
            fa = await p.send("A", b"a0")
            fb = [await p.send("B", b"b0")]
            fc = [await p.send("C", v) for v in (b"c0", b"c1", b"c2")]  # goes out, holds the window
            flush = asyncio.ensure_future(p.flush())
            await settle(lambda: "A" not in p._batches)      # flush took A, waits for the window
            more = asyncio.ensure_future(asyncio.gather(p.send("B", b"b1"), p.send("B", b"b2")))
            await settle(lambda: "B" not in p._batches)      # the full B waits for the window too
            release.set()
            await asyncio.wait_for(flush, 10)
            fb += await asyncio.wait_for(more, 10)
            await asyncio.wait_for(p.flush(), 10)
            assert await asyncio.wait_for(fa, 10) == 0
            assert [await asyncio.wait_for(f, 10) for f in fb] == [0, 1, 2]
            assert [await asyncio.wait_for(f, 10) for f in fc] == [0, 1, 2]
        finally:
            release.set()
            await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        release.set()
        fake.close()
    assert fake.error is None, fake.error


class _IdleClient:
    """What a Subscription asks of its client, for tests that feed it frames."""
    max_buffered = 1 << 30
    connected = False

    def _buffer_full(self, sub):
        pass

    def _buffer_drained(self, sub):
        pass


def test_a_delivery_wakes_a_waiting_fetch_in_one_loop_turn():
    """A get_batch waiting on an empty buffer returns on the loop turn after
    the MSG frame is handled (nothing in between to wake it), and its
    timer is cancelled; with nothing delivered it returns [] once its
    timeout has passed."""
    from broker.client.aio import Subscription
    from broker.codec import records, wire1

    async def main():
        loop = asyncio.get_running_loop()
        sub = Subscription(_IdleClient(), "t", auto_commit=False)
        fetch = loop.create_task(sub.get_batch(10, 30.0))
        await asyncio.sleep(0)
        assert sub._waiter is not None and not fetch.done()
        frame = wire1.message_frame(records.encode_records([b"a", b"b"], 0, 1000),
                                    1, b"t", 0, 2, 1 << 20)[0]
        sub._deliver(frame[11:])  # the MSG payload, after the frame's head
        await asyncio.sleep(0)
        assert fetch.done()
        assert [(m.offset, m.value) for m in fetch.result()] == [(0, b"a"), (1, b"b")]
        assert sub._waiter is None
        assert all(h.cancelled() for h in loop._scheduled)  # the fetch's 30 s timer
        t0 = loop.time()
        assert await sub.get_batch(10, 0.05) == []
        assert loop.time() - t0 >= 0.04

    asyncio.run(main())


def test_a_reply_wakes_its_request_in_one_loop_turn():
    """A request's wait (publish, calls, commits) returns on the loop turn
    after its reply is handled, and its timer is cancelled."""
    from broker.client.aio import _reply

    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        request = loop.create_task(_reply(fut, 30.0))
        await asyncio.sleep(0)
        assert not request.done()
        fut.set_result(b"reply")
        await asyncio.sleep(0)
        assert request.done() and request.result() == b"reply"
        assert all(h.cancelled() for h in loop._scheduled)

    asyncio.run(main())


def test_a_request_times_out_and_its_late_reply_is_dropped():
    """publish raises TimeoutError once request_timeout passes without an
    answer; the answer that comes later is dropped, and the next request
    gets its own."""
    held = []

    def on_request(n, kind, rid, payload):
        assert kind == b"PUB"
        if not held:
            held.append(rid)
            return b""  # no answer, for now
        return (_f(b"ACK", held[0], struct.pack(">QI", 0, 1))
                + _f(b"ACK", rid, struct.pack(">QI", 1, 1)))

    fake = ScriptedBroker(on_request)

    async def main():
        c = broker.AsyncClient(HOST, fake.port, heartbeat=0, reconnect=False,
                               request_timeout=0.2)
        await asyncio.wait_for(c.connect(), 10)
        try:
            t0 = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await c.publish("t", b"a")
            assert time.monotonic() - t0 >= 0.15
            assert await asyncio.wait_for(c.publish("t", b"b"), 10) == 1
            assert not c._pending
        finally:
            await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        fake.close()
    assert fake.error is None, fake.error


def test_get_batch_hands_out_frames_in_order_in_any_sizes():
    """Subscription.get_batch over several decoded frames: whole frames,
    parts of frames and single messages come out in order, each once."""
    from broker.client.aio import Subscription
    from broker.client.message import Message

    async def main():
        sub = Subscription(_IdleClient(), "t", auto_commit=False)
        offset = 0
        for size in (5, 1, 300, 2, 40):
            frame = [Message("t", offset + i, 0, b"v%d" % (offset + i)) for i in range(size)]
            sub._buffer.append(frame)
            sub._buffered += size
            offset += size
        got = []
        for want in (1, 1, 3, 7, 1, 250, 1, 1, 1000):
            batch = await sub.get_batch(want)
            assert 1 <= len(batch) <= want
            got.extend(batch)
        while sub._buffered:
            got.extend(await sub.get_batch(1))
        assert [m.offset for m in got] == list(range(offset))
        assert await sub.get_batch(5, timeout=0.01) == []
        with pytest.raises(ValueError):
            await sub.get_batch(0)

    asyncio.run(main())
