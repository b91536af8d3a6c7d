"""The asyncio client: :class:`AsyncClient`, :class:`Producer`, :class:`Subscription`.

One connection per client, speaking protocol v1 (docs/protocol.md), built
on an ``asyncio.Protocol`` and the same codec as the broker (Cython when
it is loaded). Requests carry ids and are answered by futures; deliveries
arrive as whole batches (one ``MSG`` frame, one codec call) into a bounded
buffer per subscription; when the buffer is full the client stops reading
the socket, and TCP carries the back-pressure to the broker.

Delivery is at-least-once: the broker stores the offsets the client
*commits*; after a reconnect a subscription resumes at the first message
not yet processed, so a message can arrive twice but is never skipped.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import itertools
import logging
import math
import struct
from typing import AsyncIterator, Callable, Iterable

from ..codec import wire1
from ..protocol import PROTOCOL_VERSION, From
from .errors import BrokerError, ConnectionLost, error_for
from .message import Message

__all__ = ["AsyncClient", "Producer", "Subscription", "start_spec"]

log = logging.getLogger(__name__)

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_ACK = struct.Struct(">QI")
_SPEC = struct.Struct(">Bq")

_decode_messages = wire1.decode_messages
_DELIVERY_SLACK = 64 * 1024  # receive limit above max_frame_bytes (MSG framing, topic names)

_K = wire1.KINDS
K_RES, K_ACK, K_ERR, K_MSG, K_POG = _K[b"RES"], _K[b"ACK"], _K[b"ERR"], _K[b"MSG"], _K[b"POG"]


def start_spec(start) -> tuple[int, int]:
    """``(mode, value)`` for SUB/SEK from a friendly start value.

    ``"committed"`` (default), ``"oldest"``, ``"latest"``, an ``int``
    offset, or a ``datetime`` (aware or local) / ``("time", ms)``.
    """
    if start is None or start == "committed":
        return From.COMMITTED, 0
    if start == "oldest":
        return From.OLDEST, 0
    if start == "latest":
        return From.LATEST, 0
    if isinstance(start, bool):
        raise TypeError("start must be a mode name, an offset or a datetime")
    if isinstance(start, int):
        if start < 0:
            raise ValueError("offset must be >= 0")
        return From.OFFSET, start
    if isinstance(start, datetime.datetime):
        return From.TIME, int(start.timestamp() * 1000)
    if isinstance(start, tuple) and len(start) == 2 and start[0] == "time":
        return From.TIME, int(start[1])
    raise ValueError("start must be 'committed', 'oldest', 'latest', an offset or a datetime")


def _topic_bytes(topic) -> bytes:
    return topic.encode("utf-8") if isinstance(topic, str) else bytes(topic)


def _value_bytes(value) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


class _Protocol(asyncio.Protocol):
    """Socket events -> the client (one instance per connection)."""

    def __init__(self, client: "AsyncClient") -> None:
        self.client = client
        # A delivery frame carries a stored record, 16 bytes more than the
        # publish frame that stored it (offset and time): accept what the
        # broker may send, not just what we may send.
        self.reader = wire1.V1Reader(client.max_frame_bytes + _DELIVERY_SLACK)
        self.transport: asyncio.Transport | None = None
        self.paused = False                       # our writes are above the high-water mark
        self.drain_waiters: list[asyncio.Future] = []
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client._on_frames(self, self.reader.feed(data))

    def connection_lost(self, exc) -> None:
        self.lost = True
        for fut in self.drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self.drain_waiters.clear()
        self.client._on_lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        waiters, self.drain_waiters = self.drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


class AsyncClient:
    """A connection to a pylogstreams broker, for asyncio code.

    ::

        async with AsyncClient("127.0.0.1", 1234, client_id="worker-1") as client:
            offset = await client.publish("events", b"hello")
            sub = await client.subscribe("events", start="oldest")
            async for msg in sub:
                print(msg.offset, msg.value)
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1234, *,
                 client_id: str | bytes | None = None, heartbeat: float = 30.0,
                 reconnect: bool = True, connect_timeout: float = 10.0,
                 request_timeout: float = 30.0, max_frame_bytes: int = 1 << 20,
                 max_buffered: int = 10_000, ssl=None, user: str | None = None,
                 secret: str | bytes | None = None, commit_interval: float = 0.1) -> None:
        self.host = host
        self.port = port
        self._client_id = _topic_bytes(client_id) if client_id else b""  # b"": let the broker pick
        self.heartbeat = heartbeat                # seconds between PNGs (0: none)
        self.reconnect = reconnect                # reconnect and resubscribe after a loss
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_frame_bytes = max_frame_bytes    # largest frame this client sends (accepts a bit more)
        self.max_buffered = max_buffered          # messages buffered per subscription
        if commit_interval < 0:
            raise ValueError("commit_interval must be >= 0")
        self.commit_interval = commit_interval    # seconds between auto commits (0: each time)
        self.ssl = ssl                            # True, or an ssl.SSLContext: connect with TLS
        self.user = user                          # authenticate as this user (AUT) if set
        self._secret = _value_bytes(secret) if secret is not None else b""
        self._proto: _Protocol | None = None
        self._rids = itertools.count(1)           # request ids (0 is "no request")
        self._pending: dict[int, asyncio.Future] = {}   # rid -> reply future
        # rid -> callback run on its RES as the frame is read, before the
        # frames behind it (SUB/SEK: MSG frames right after the reply belong
        # to the new position, and must not be judged by the old one).
        self._on_reply: dict[int, Callable[[bytes], None]] = {}
        self._subs: dict[int, "Subscription"] = {}      # SUB rid -> subscription
        self._heartbeat: asyncio.TimerHandle | None = None
        self._closing = False
        self._reconnecting: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._read_paused_by: set = set()         # subscriptions whose buffer is full
        self._ever_connected = False              # reconnect only what once connected

    # -- connection ----------------------------------------------------------

    @property
    def client_id(self) -> str:
        """The id the broker knows this client by (assigned if none was given)."""
        return self._client_id.decode("utf-8", "replace")

    @property
    def connected(self) -> bool:
        return self._proto is not None and not self._proto.lost and self._connected.is_set()

    async def connect(self) -> "AsyncClient":
        """Open the connection and say HEL. Returns self."""
        await self._open()
        return self

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self.host, self.port,
                                       ssl=self.ssl or None,
                                       server_hostname=self.host if self.ssl else None),
                self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectionLost("cannot connect to %s:%d: %s" % (self.host, self.port, exc)) from exc
        self._proto = proto
        try:
            payload = _U16.pack(PROTOCOL_VERSION) + wire1.pack_str(self._client_id)
            reply = await self._call_on(proto, b"HEL", payload)
            _version = _U16.unpack_from(reply, 0)[0]
            self._client_id, _ = wire1.read_str(reply, 2)
            if self.user is not None:
                await self._call_on(proto, b"AUT", wire1.pack_str(self.user)
                                    + wire1.pack_str(self._secret))
        except BaseException:
            # No answer to HEL or AUT (a stalled broker), or a refusal: a
            # half-open connection is of no use, and must not leak.
            proto.transport.abort()
            raise
        self._connected.set()
        self._ever_connected = True
        if self._heartbeat is None:
            self._schedule_heartbeat()

    async def close(self) -> None:
        """Commit what subscriptions processed, then close the connection."""
        if self._closing:
            return
        for sub in list(self._subs.values()):
            # Only auto_commit subscriptions: with auto_commit=False only
            # commit() moves the stored offset (at least once).
            if sub.auto_commit and self.connected:
                try:
                    await sub._commit_processed(wait=True)
                except (BrokerError, ConnectionLost):
                    pass
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        proto = self._proto
        if proto is not None and not proto.lost:
            proto.transport.write(b"\0\0\0\0")  # zero-length frame: goodbye
            proto.transport.close()
        self._fail_pending(ConnectionLost("client closed"))
        for sub in self._subs.values():
            sub._closed()

    def _schedule_heartbeat(self) -> None:
        if self.heartbeat and not self._closing:
            loop = asyncio.get_running_loop()
            self._heartbeat = loop.call_later(self.heartbeat, self._send_heartbeat)

    def _send_heartbeat(self) -> None:
        self._heartbeat = None
        if self.connected:
            rid = next(self._rids)
            self._proto.transport.write(wire1.encode(b"PNG", rid))
        self._schedule_heartbeat()

    def _fail_pending(self, exc: Exception) -> None:
        self._on_reply.clear()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def _on_lost(self, proto: _Protocol, exc) -> None:
        if proto is not self._proto:
            return
        self._connected.clear()
        self._read_paused_by.clear()
        lost = ConnectionLost("connection to %s:%d lost%s" % (
            self.host, self.port, ": %s" % exc if exc else ""))
        self._fail_pending(lost)
        if self._closing:
            return
        if self.reconnect and self._ever_connected:
            if self._reconnecting is None:
                self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())
            return
        # No reconnect: the subscriptions end, raising ConnectionLost once their
        # buffered messages are consumed (instead of waiting forever).
        for sub in list(self._subs.values()):
            sub._lost(lost)

    async def _reconnect(self) -> None:
        delay = 0.05
        while not self._closing:
            try:
                await self._open()
            except (ConnectionLost, BrokerError, asyncio.TimeoutError) as exc:
                # A timeout too (HEL unanswered): giving up here would leave
                # the client disconnected for good.
                log.info("reconnect to %s:%d failed (%s); retrying in %.2f s",
                         self.host, self.port, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            subs, self._subs = list(self._subs.values()), {}
            for sub in subs:
                try:
                    await sub._resubscribe()
                except (ConnectionLost, BrokerError, asyncio.TimeoutError) as exc:
                    log.warning("resubscribing to %s failed: %s", sub.topic, exc)
            self._reconnecting = None
            return

    async def wait_connected(self) -> None:
        await self._connected.wait()

    # -- requests ------------------------------------------------------------

    def _send(self, kind: bytes, payload: bytes,
              on_reply: Callable[[bytes], None] | None = None) -> tuple[int, asyncio.Future]:
        proto = self._proto
        if proto is None or proto.lost or not self._connected.is_set() and kind != b"HEL":
            raise ConnectionLost("not connected to %s:%d" % (self.host, self.port))
        rid = next(self._rids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        if on_reply is not None:
            self._on_reply[rid] = on_reply
        proto.transport.write(wire1.encode(kind, rid, payload))
        return rid, fut

    async def _call_on(self, proto: _Protocol, kind: bytes, payload: bytes):
        if proto.lost:
            # As _send: a request on a lost connection fails now. (A
            # connection reset before _open had it, by a broker starting on
            # the port, was ignored by _on_lost as not ours yet; its HEL
            # would wait request_timeout for a reply that cannot come.)
            raise ConnectionLost("connection to %s:%d lost" % (self.host, self.port))
        rid = next(self._rids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        proto.transport.write(wire1.encode(kind, rid, payload))
        return await _reply(fut, self.request_timeout)

    async def _call(self, kind: bytes, payload: bytes = b"",
                    on_reply: Callable[[bytes], None] | None = None):
        if not self.connected and self._reconnecting is not None:
            await asyncio.wait_for(self._connected.wait(), self.connect_timeout)
        _, fut = self._send(kind, payload, on_reply)
        await self._drain()
        return await _reply(fut, self.request_timeout)

    async def _drain(self) -> None:
        proto = self._proto
        if proto is not None and proto.paused and not proto.lost:
            fut = asyncio.get_running_loop().create_future()
            proto.drain_waiters.append(fut)
            await fut

    def _on_frames(self, proto: _Protocol, events: list) -> None:
        pending = self._pending
        for kind, rid, payload in events:
            if kind == K_MSG:
                sub = self._subs.get(rid)
                if sub is not None:
                    sub._deliver(payload)
                continue
            if kind == K_ERR:
                code = _U16.unpack_from(payload, 0)[0]
                text, _ = wire1.read_str(payload, 2)
                exc = error_for(code, text.decode("utf-8", "replace"))
                self._on_reply.pop(rid, None)
                fut = pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                elif rid == 0:
                    log.warning("broker error: %s", exc)
                continue
            if kind in (K_RES, K_ACK, K_POG):
                hook = self._on_reply.pop(rid, None)
                if hook is not None and kind == K_RES:
                    hook(payload)
                fut = pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(payload)
                continue
            if kind == wire1.K_CLOSE or kind == wire1.K_ERROR:
                log.warning("broker sent %s; closing", "close" if kind == wire1.K_CLOSE else payload)
                proto.transport.abort()
                return

    # -- publishing ----------------------------------------------------------

    async def publish(self, topic: str, value: bytes | str) -> int:
        """Publish one message; returns its offset once the broker stored it."""
        return await self.publish_batch(topic, [value])

    async def publish_batch(self, topic: str, values: Iterable[bytes | str]) -> int:
        """Publish many messages in one frame; returns the offset of the first.

        The batch is stored whole or not at all; its offsets are
        ``first, first + 1, ...`` in the order given.
        """
        msgs = values if type(values) in (list, tuple) else list(values)
        fut = self._publish_nowait(topic, msgs)
        await self._drain()
        payload = await _reply(fut, self.request_timeout)
        return _ACK.unpack(payload)[0]

    def _publish_nowait(self, topic, msgs: list) -> asyncio.Future:
        proto = self._proto
        if proto is None or proto.lost or not self._connected.is_set():
            raise ConnectionLost("not connected to %s:%d" % (self.host, self.port))
        rid = next(self._rids)
        try:
            # Bytes-like values go to the codec as they are: one call, no
            # Python per message.
            frame = wire1.encode_publish(rid, _topic_bytes(topic), msgs)
        except (TypeError, BufferError):  # str (UTF-8), or objects bytes() takes
            frame = wire1.encode_publish(rid, _topic_bytes(topic), [_value_bytes(v) for v in msgs])
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        proto.transport.write(frame)
        return fut

    def producer(self, *, max_batch: int = 1000, linger_ms: float = 5.0,
                 max_in_flight: int = 16) -> "Producer":
        """A batching producer on this connection (see :class:`Producer`)."""
        return Producer(self, max_batch=max_batch, linger_ms=linger_ms, max_in_flight=max_in_flight)

    # -- consuming -----------------------------------------------------------

    async def subscribe(self, topic: str, start=None, *, auto_commit: bool = True) -> "Subscription":
        """Start push delivery of ``topic``; see :func:`start_spec` for ``start``."""
        sub = Subscription(self, topic, auto_commit=auto_commit)
        await sub._subscribe(*start_spec(start))
        return sub

    async def commit(self, topic: str, offset: int) -> None:
        """Store ``offset`` (the next one to process) as this client's position."""
        await self._call(b"CMT", wire1.pack_str(topic) + _U64.pack(offset))

    # -- administration ------------------------------------------------------

    async def ping(self) -> None:
        await self._call(b"PNG")

    async def topics(self) -> list[dict]:
        import json
        return json.loads(await self._call(b"TOP"))

    async def offsets(self, client_id: str | None = None) -> list[dict]:
        import json
        return json.loads(await self._call(b"OFS", wire1.pack_str(client_id or b"")))

    async def topic_config(self, topic: str, **overrides) -> dict:
        """A topic's settings; with keyword arguments, change and persist them.

        Settings: ``fsync``, ``fsync_interval_ms``, ``retention_ms``,
        ``retention_bytes``, ``segment_bytes``; ``None`` resets one to the
        broker's default. Returns the settings in force afterwards.
        """
        import json
        body = json.dumps(overrides) if overrides else ""
        return json.loads(await self._call(b"CFG", wire1.pack_str(topic) + wire1.pack_str(body)))

    async def stats(self) -> dict:
        import json
        return json.loads(await self._call(b"STA"))

    # -- flow control for subscriptions -------------------------------------

    def _buffer_full(self, sub: "Subscription") -> None:
        if not self._read_paused_by and self._proto is not None and not self._proto.lost:
            self._proto.transport.pause_reading()
        self._read_paused_by.add(sub)

    def _buffer_drained(self, sub: "Subscription") -> None:
        if sub in self._read_paused_by:
            self._read_paused_by.discard(sub)
            if not self._read_paused_by and self._proto is not None and not self._proto.lost:
                self._proto.transport.resume_reading()


class Producer:
    """Batches ``send()`` calls into ``PUB`` frames.

    A batch goes out when it holds ``max_batch`` messages or ``linger_ms``
    after its first message; at most ``max_in_flight`` batches await their
    acknowledgement (``send`` waits when the window is full, so memory stays
    bounded). Each ``send`` returns a future resolving to the message's
    offset, or raising if the batch was refused.
    """

    def __init__(self, client: AsyncClient, *, max_batch: int, linger_ms: float,
                 max_in_flight: int) -> None:
        self.client = client
        self.max_batch = max_batch
        self.linger = linger_ms / 1000.0
        self._max_in_flight = max_in_flight
        self._window = asyncio.Semaphore(max_in_flight)  # batches awaiting their ACK
        self._batches: dict[str, tuple[list, list]] = {}  # topic -> (values, futures)
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task] = set()

    async def send(self, topic: str, value: bytes | str) -> asyncio.Future:
        """Queue one message; returns a future for its offset."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        batch = self._batches.get(topic)
        if batch is None:
            batch = self._batches[topic] = ([], [])
        batch[0].append(_value_bytes(value))
        batch[1].append(fut)
        if len(batch[0]) >= self.max_batch:
            await self._send_batch(topic)
        elif self._timer is None:
            self._timer = loop.call_later(self.linger, self._linger_expired)
        return fut

    def _linger_expired(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush(wait=False))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send_batch(self, topic: str) -> None:
        batch = self._batches.pop(topic, None)
        if batch is None:
            return  # a send() filled it and sent it while flush() waited for the window
        values, futures = batch
        await self._window.acquire()
        try:
            ack = self.client._publish_nowait(topic, values)
        except BaseException as exc:
            self._window.release()
            for f in futures:
                if not f.done():
                    f.set_exception(exc)
            return
        await self.client._drain()

        def done(ack_fut: asyncio.Future) -> None:
            self._window.release()
            if ack_fut.cancelled():
                exc = ConnectionLost("publish cancelled")
            else:
                exc = ack_fut.exception()
            if exc is not None:
                for f in futures:
                    if not f.done():
                        f.set_exception(exc)
                return
            base = _ACK.unpack(ack_fut.result())[0]
            for i, f in enumerate(futures):
                if not f.done():
                    f.set_result(base + i)

        ack.add_done_callback(done)

    async def flush(self, wait: bool = True) -> None:
        """Send every queued batch; with ``wait``, until all are acknowledged."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for topic in list(self._batches):
            await self._send_batch(topic)
        if wait:
            # Holding every window slot at once means every batch in flight
            # has been answered.
            acquired = 0
            try:
                for _ in range(self._max_in_flight):
                    await self._window.acquire()
                    acquired += 1
            finally:
                for _ in range(acquired):
                    self._window.release()


class Subscription:
    """Messages of one topic, as an async iterator of :class:`Message`.

    With ``auto_commit`` (the default) a message counts as processed when
    the next one is asked for, and processed offsets are committed in
    batches: whenever the buffer runs dry, but at most once per the
    client's ``commit_interval`` (0.1 s by default; the commits asked for
    meanwhile go as one at its end), and on close. Otherwise call
    :meth:`commit`.
    """

    def __init__(self, client: AsyncClient, topic: str, *, auto_commit: bool) -> None:
        self.client = client
        self.topic = topic
        self.auto_commit = auto_commit
        self.rid = 0                               # request id of our SUB (tags MSG frames)
        # Messages not yet yielded, as the lists decode_messages made (one per
        # MSG frame): get_batch hands out whole lists and slices, so it runs
        # Python per frame, not per message.
        self._buffer: collections.deque = collections.deque()
        self._buffered = 0       # messages in _buffer not yet handed out
        self._head = 0           # of the first list, this many are handed out
        self._waiter: asyncio.Future | None = None
        self._next = 0           # offset of the next message to yield
        self._processed = 0      # offsets below this are processed (commit candidate)
        self._committed = -1     # last offset committed by us
        self._in_hand = -1       # offset after the last batch yielded, -1 if none in hand
        self._done = False
        self._error: Exception | None = None  # why it ended, if not closed by us
        self._commit_sent = -math.inf  # loop time of the last auto commit sent
        self._commit_timer: asyncio.TimerHandle | None = None  # a coalesced auto commit

    async def _subscribe(self, mode: int, value: int) -> None:
        payload = wire1.pack_str(self.topic) + _SPEC.pack(mode, value)
        rid, fut = self.client._send(b"SUB", payload, self._moved)
        self.rid = rid
        self.client._subs[rid] = self
        try:
            await _reply(fut, self.client.request_timeout)
        except BaseException:
            self.client._subs.pop(rid, None)
            raise

    def _moved(self, reply: bytes) -> None:
        """The broker's RES to our SUB or SEK: delivery continues from its offset.

        Runs as the reply is read: MSG frames before it were for the old
        position (dropped here), those behind it are for the new one.
        """
        offset = _U64.unpack(reply)[0]
        self._buffer.clear()
        self._buffered = self._head = 0
        self._in_hand = -1
        self._next = self._processed = offset
        self.client._buffer_drained(self)

    async def _resubscribe(self) -> None:
        # Resume at the first message not processed: at-least-once.
        self._buffer.clear()
        self._buffered = self._head = 0
        self._in_hand = -1
        await self._subscribe(From.OFFSET, self._processed)

    def _deliver(self, payload: bytes) -> None:
        # One codec call per MSG frame builds the Messages, checks every
        # CRC and drops what a seek or resubscribe made stale.
        msgs, self._next = _decode_messages(payload, self.topic, self._next, Message)
        if msgs:
            self._buffer.append(msgs)
            self._buffered += len(msgs)
            if self._buffered >= self.client.max_buffered:
                self.client._buffer_full(self)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _lost(self, exc: Exception) -> None:
        self._error = exc
        self._closed()

    def _closed(self) -> None:
        self._done = True
        self._cancel_commit_timer()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        batch = await self.get_batch(1)
        if not batch:
            raise StopAsyncIteration
        return batch[0]

    async def get_batch(self, max_messages: int = 1000, timeout: float | None = None) -> list[Message]:
        """The buffered messages, at most ``max_messages``; waits for one if none.

        Returns ``[]`` when the subscription or client closed, or after
        ``timeout`` seconds with nothing to return. Raises
        :class:`ConnectionLost` once the buffer is empty if the connection
        was lost and the client does not reconnect.
        """
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self._mark_processed()
        buf = self._buffer
        if not self._buffered:
            if self.auto_commit:
                self._auto_commit()
            loop = asyncio.get_running_loop()
            while not self._buffered and not self._done:
                # A future and a timer, not asyncio.wait_for: a delivery
                # wakes this task itself, a loop turn sooner (wait_for
                # wakes a waiter of its own first, which then wakes us).
                waiter = self._waiter = loop.create_future()
                timer = None if timeout is None else loop.call_later(timeout, _time_out, waiter)
                try:
                    timed_out = await waiter
                finally:
                    self._waiter = None
                    if timer is not None:
                        timer.cancel()
                if timed_out and not self._buffered:
                    return []
            if not self._buffered:
                if self._error is not None:
                    raise self._error
                return []
        n = min(max_messages, self._buffered)
        out = None
        need = n
        while need:
            # Whole lists go out as they are; a list handed out in parts
            # keeps its place (_head), so each message is copied once.
            chunk = buf[0]
            head = self._head
            avail = len(chunk) - head
            if avail <= need:
                part = chunk if head == 0 else chunk[head:]
                buf.popleft()
                self._head = 0
                need -= avail
            else:
                part = chunk[head:head + need]
                self._head = head + need
                need = 0
            if out is None:
                out = part
            else:
                out.extend(part)
        self._buffered -= n
        self._in_hand = out[-1].offset + 1
        if self._buffered < self.client.max_buffered // 2:
            self.client._buffer_drained(self)
        return out

    def _handed(self, offset: int) -> None:
        """The caller now holds the message at ``offset``; all before are processed."""
        if offset > self._processed:
            self._processed = offset
        self._in_hand = offset + 1

    def _mark_processed(self) -> None:
        if self._in_hand >= 0:
            self._processed = max(self._processed, self._in_hand)
            self._in_hand = -1

    def _auto_commit(self) -> None:
        """The buffer ran dry: commit what was processed, at most once per interval.

        The first commit goes at once; one asked for sooner than
        ``commit_interval`` after the last waits for the rest of it, with
        every commit asked for meanwhile (a consumer that keeps up with a
        steady stream runs dry after every delivery). A crash loses at most
        that interval's commits: the messages come again (at least once).
        """
        self._mark_processed()
        if self._processed <= self._committed or self._commit_timer is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._commit_sent + self.client.commit_interval - loop.time()
        if wait > 0:
            self._commit_timer = loop.call_later(wait, self._commit_due)
        else:
            self._send_commit()

    def _commit_due(self) -> None:
        self._commit_timer = None
        if not self._done:
            self._send_commit()

    def _cancel_commit_timer(self) -> None:
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None

    def _send_commit(self, log_errors: bool = True) -> asyncio.Future | None:
        """Send a CMT of the processed offsets, if they moved; its reply future."""
        if self._processed <= self._committed or not self.client.connected:
            return None
        self._committed = self._processed
        self._commit_sent = asyncio.get_running_loop().time()
        payload = wire1.pack_str(self.topic) + _U64.pack(self._processed)
        _, fut = self.client._send(b"CMT", payload)
        if log_errors:
            fut.add_done_callback(_log_commit_error)
        return fut

    async def _commit_processed(self, wait: bool) -> None:
        self._mark_processed()
        self._cancel_commit_timer()
        fut = self._send_commit(log_errors=not wait)
        if wait and fut is not None:
            await _reply(fut, self.client.request_timeout)

    async def commit(self, offset: int | None = None) -> None:
        """Commit ``offset`` (default: everything yielded so far) and wait for it."""
        if offset is None:
            self._mark_processed()
            offset = self._processed
        else:
            self._processed = max(self._processed, offset)
        self._committed = offset
        await self.client.commit(self.topic, offset)

    async def seek(self, start) -> int:
        """Move to ``start`` (see :func:`start_spec`); returns the new offset."""
        mode, value = start_spec(start)
        reply = await self.client._call(b"SEK", wire1.pack_str(self.topic) + _SPEC.pack(mode, value),
                                        self._moved)
        return _U64.unpack(reply)[0]

    async def close(self) -> None:
        """Commit what was processed (with auto_commit) and unsubscribe."""
        if self.auto_commit:
            await self._commit_processed(wait=True)
        self.client._subs.pop(self.rid, None)
        self.client._buffer_drained(self)
        if self.client.connected:
            await self.client._call(b"UNS", wire1.pack_str(self.topic))
        self._closed()


def _log_commit_error(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("commit failed: %s", fut.exception())


async def _reply(fut: asyncio.Future, timeout: float | None):
    """``fut``'s result (a request's reply), or TimeoutError after ``timeout`` seconds.

    What ``asyncio.wait_for`` does for a future, without its go-between:
    the reply wakes the caller itself, a loop turn sooner, and no waiter
    is made per request. On timeout the future fails (a reply arriving
    later is dropped, as for a cancelled one); cancelling the caller
    cancels it.
    """
    if timeout is None:
        return await fut
    timer = asyncio.get_running_loop().call_later(timeout, _expire, fut)
    try:
        return await fut
    finally:
        timer.cancel()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


def _time_out(waiter: asyncio.Future) -> None:
    """``get_batch``'s timer: wake the fetch with nothing (True: timed out)."""
    if not waiter.done():
        waiter.set_result(True)
