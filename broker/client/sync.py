"""The blocking client: :class:`Client`, for code without an event loop.

It runs an :class:`AsyncClient` on an event loop in a background thread
and waits for its results, so both clients share one implementation of
the protocol, heartbeats, batching, acknowledgements and reconnects. Work
crosses threads once per call or per batch of messages, never per message
of a batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Iterable, Iterator

from .aio import AsyncClient, Producer as _AsyncProducer, Subscription as _AsyncSubscription
from .message import Message

__all__ = ["Client", "Producer", "Subscription"]


class _LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        try:
            import uvloop
            self.loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever,
                                        name="pylogstreams-client", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float | None = None):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError("no answer within %s s" % timeout) from None

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


class Client:
    """A blocking connection to a pylogstreams broker.

    ::

        with Client("127.0.0.1", 1234, client_id="worker-1") as client:
            offset = client.publish("events", b"hello")
            for msg in client.subscribe("events", start="oldest"):
                print(msg.offset, msg.value)

    Takes the same options as :class:`AsyncClient`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1234, **options) -> None:
        self._lt = _LoopThread()
        self._aclient = AsyncClient(host, port, **options)
        try:
            self._lt.run(self._aclient.connect())
        except BaseException:
            try:
                self._lt.run(self._aclient.close(), timeout=5)
            finally:
                self._lt.stop()
            raise

    @property
    def client_id(self) -> str:
        return self._aclient.client_id

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._lt.loop.is_closed():
            return  # closed already: closing twice is harmless, like a file's close()
        try:
            self._lt.run(self._aclient.close(), timeout=10)
        finally:
            self._lt.stop()

    def _run(self, coro):
        return self._lt.run(coro)

    def publish(self, topic: str, value: bytes | str) -> int:
        """Publish one message; returns its offset once stored."""
        return self._run(self._aclient.publish(topic, value))

    def publish_batch(self, topic: str, values: Iterable[bytes | str]) -> int:
        """Publish many messages in one frame; returns the first offset."""
        return self._run(self._aclient.publish_batch(topic, list(values)))

    def producer(self, **options) -> "Producer":
        """A batching producer; see :class:`broker.client.aio.Producer`."""
        return Producer(self, self._aclient.producer(**options))

    def subscribe(self, topic: str, start=None, *, auto_commit: bool = True) -> "Subscription":
        sub = self._run(self._aclient.subscribe(topic, start, auto_commit=auto_commit))
        return Subscription(self, sub)

    def commit(self, topic: str, offset: int) -> None:
        self._run(self._aclient.commit(topic, offset))

    def ping(self) -> None:
        self._run(self._aclient.ping())

    def topics(self) -> list[dict]:
        return self._run(self._aclient.topics())

    def offsets(self, client_id: str | None = None) -> list[dict]:
        return self._run(self._aclient.offsets(client_id))

    def topic_config(self, topic: str, **overrides) -> dict:
        """A topic's settings; with keyword arguments, change and persist them."""
        return self._run(self._aclient.topic_config(topic, **overrides))

    def stats(self) -> dict:
        return self._run(self._aclient.stats())


class Producer:
    """Blocking face of the batching producer: ``send`` returns a
    ``concurrent.futures.Future`` for the offset."""

    def __init__(self, client: Client, producer: _AsyncProducer) -> None:
        self._client = client
        self._producer = producer

    def send_many(self, topic: str, values: Iterable[bytes | str]) -> list[concurrent.futures.Future]:
        """Queue many messages in one hop to the client's loop."""
        values = list(values)

        async def go():
            return [await self._producer.send(topic, v) for v in values]

        afuts = self._client._run(go())
        return [_wrap(f, self._client._lt.loop) for f in afuts]

    def send(self, topic: str, value: bytes | str) -> concurrent.futures.Future:
        return self.send_many(topic, [value])[0]

    def flush(self) -> None:
        self._client._run(self._producer.flush())


def _wrap(afut: asyncio.Future, loop) -> concurrent.futures.Future:
    cfut: concurrent.futures.Future = concurrent.futures.Future()

    def copy(f: asyncio.Future) -> None:
        if f.cancelled():
            cfut.cancel()
        elif f.exception() is not None:
            cfut.set_exception(f.exception())
        else:
            cfut.set_result(f.result())

    loop.call_soon_threadsafe(afut.add_done_callback, copy)
    return cfut


class Subscription:
    """A blocking iterator of :class:`Message` (fetched a batch at a time)."""

    def __init__(self, client: Client, sub: _AsyncSubscription) -> None:
        self._client = client
        self._sub = sub
        self._batch: list[Message] = []
        self._pos = 0

    @property
    def topic(self) -> str:
        return self._sub.topic

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        if self._pos >= len(self._batch):
            self._batch = self._client._run(self._sub.get_batch(1000))
            self._pos = 0
            if not self._batch:
                raise StopIteration
        msg = self._batch[self._pos]
        self._pos += 1
        # Only the messages before this one are processed: a commit (or
        # close) must not cover the rest of the prefetched batch.
        self._sub._handed(msg.offset)
        return msg

    def poll(self, timeout: float | None = None, max_messages: int = 1000) -> list[Message]:
        """The next batch of messages (``[]`` after ``timeout`` seconds)."""
        rest = self._batch[self._pos:]
        if rest:
            self._batch, self._pos = [], 0
            self._sub._handed(rest[-1].offset)  # all of it is now in the caller's hands
            return rest
        return self._client._run(self._sub.get_batch(max_messages, timeout))

    def commit(self, offset: int | None = None) -> None:
        self._client._run(self._sub.commit(offset))

    def seek(self, start) -> int:
        self._batch, self._pos = [], 0
        return self._client._run(self._sub.seek(start))

    def close(self) -> None:
        self._client._run(self._sub.close())
