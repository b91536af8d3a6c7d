"""Crash and shutdown: what a consumer received is never taken back.

kill -9 in the middle of a publish stream, then restart: a new consumer from
offset 0 gets a contiguous, byte-exact prefix of what was published, at least
as long as what any consumer had received before the crash. SIGTERM/SIGINT:
exit code 0, and every message the server had acknowledged (by handling the
producer's close frame) is there after a restart, as are consumer offsets.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid

import pytest

from v0client import (
    ConnectionClosed, V0Client, consumer, make_message, message_index, produce, pub_frame,
)

pytestmark = pytest.mark.integration

SIZE = 1024
BATCH = 200
STREAM_CAP = 400_000      # messages: an upper bound, the kill comes long before
STREAM_SECONDS = 60.0     # time bound for one streaming producer


class StreamingProducer(threading.Thread):
    """Publishes make_message(start), make_message(start+1), ... until stopped or cut off."""

    def __init__(self, port: int, topic: bytes, start: int = 0) -> None:
        super().__init__(daemon=True, name="streaming-producer")
        self.port = port
        self.topic = topic
        self.next = start          # first index not yet handed to sendall completely
        self.started_sending = threading.Event()
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None
        self.cut_off = False       # the server went away under it

    def run(self) -> None:
        try:
            p = V0Client(self.port, timeout=30)
        except OSError as exc:
            self.error = exc
            return
        try:
            p.cid(p.reg())
            deadline = time.monotonic() + STREAM_SECONDS
            while (not self.stop_flag.is_set() and self.next < STREAM_CAP
                   and time.monotonic() < deadline):
                data = b"".join(pub_frame(self.topic, make_message(i, SIZE))
                                for i in range(self.next, self.next + BATCH))
                p.send_raw(data)
                self.next += BATCH
                self.started_sending.set()
        except OSError:
            self.cut_off = True
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.error = exc
        finally:
            p.close()


def _assert_prefix(msgs, start: int = 0, what: str = "") -> None:
    """``msgs`` must be make_message(start), make_message(start+1), ... exactly."""
    for k, m in enumerate(msgs):
        if m != make_message(start + k, SIZE):
            try:
                idx = message_index(m)
            except ValueError:
                idx = None
            raise AssertionError("%s: position %d holds %r (index %s, %d bytes), expected index %d"
                                 % (what, start + k, m[:24], idx, len(m), start + k))


def _drain_until_closed(c: V0Client, topic: bytes, timeout: float = 30.0) -> list:
    """Everything a consumer still gets until the server is gone (partial frames dropped)."""
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = c.read_available(quiet=1.0)
        except ConnectionClosed:
            break
        out.extend(m for t, m in got if t == topic)
        if c.eof:
            break
    assert c.eof, "consumer connection still open after the server was stopped"
    return out


def _recover_all(srv, topic: bytes, timeout: float = 60.0):
    """All messages of ``topic`` after a restart: read from 0 up to a sentinel.

    The sentinel is published after the restart, so it lands right after the
    last message that survived; everything before it is the recovered log.
    Returns ``(recovered, sentinel)``.
    """
    sentinel = b"S" + uuid.uuid4().hex.encode()
    with consumer(srv.port, topic, 0) as c:
        produce(srv.port, topic, [sentinel])
        got = c.read_until(lambda d: d[1] == sentinel, timeout=timeout)
        c.expect_silence(0.2)
    assert all(t == topic for t, _ in got)
    return [m for _, m in got[:-1]], sentinel


def test_kill9_during_publish_stream(server):
    """Two crash cycles, each streaming into its own topic; earlier topics must survive later crashes."""
    srv = server()
    survived = {}  # topic -> its full recovered content, sentinel included
    for cycle in range(2):
        topic = b"crash%d" % cycle
        watcher = consumer(srv.port, topic, 0, timeout=30)
        watcher.barrier()
        prod = StreamingProducer(srv.port, topic)
        prod.start()
        try:
            # Let the stream run until the consumer has seen a good number of messages.
            seen = [m for _, m in watcher.read_deliveries(5000 + 3000 * cycle, timeout=60)]
            assert prod.is_alive(), "producer finished before the kill: not mid-stream"
            srv.kill()
            seen += _drain_until_closed(watcher, topic)
            # A producer that is cut off stops by itself at its first failed
            # send (the first send after the server died may still succeed):
            # wait for that rather than stop it first.
            prod.join(30)
        finally:
            watcher.close()
            prod.stop_flag.set()
            prod.join(30)
        assert not prod.is_alive()
        assert prod.error is None, prod.error
        assert prod.cut_off, "the producer never noticed the server died"
        _assert_prefix(seen, 0, "cycle %d, consumer before the crash" % cycle)

        srv.start()
        # Topics from earlier cycles are exactly as they were.
        for old, content in survived.items():
            again, sentinel = _recover_all(srv, old)
            assert again == content, "topic %r changed across a later crash" % old
            content.append(sentinel)
        recovered, sentinel = _recover_all(srv, topic)
        # Everything anyone received survived, in order, intact: no gaps, no
        # duplicates, no garbage; nothing that was never sent.
        _assert_prefix(recovered, 0, "cycle %d, recovered log" % cycle)
        assert len(recovered) >= len(seen), (
            "cycle %d: %d messages recovered but a consumer had received %d"
            % (cycle, len(recovered), len(seen)))
        assert len(recovered) <= prod.next, "recovered more messages than were sent"
        print("cycle %d: seen %d recovered %d sent %d" % (cycle, len(seen), len(recovered), prod.next))
        survived[topic] = recovered + [sentinel]
    srv.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_stop_keeps_everything(server, sig):
    srv = server()
    topic = b"graceful"
    n = 20_000
    msgs = [make_message(i, SIZE) for i in range(n)]
    produce(srv.port, topic, msgs)  # returns once the server handled the close frame
    reader = str(uuid.uuid4())
    with consumer(srv.port, topic, 0, client_id=reader) as c:
        assert [m for _, m in c.read_deliveries(n, timeout=60)] == msgs
        c.barrier()
        srv.stop(sig)  # immediately: exit code 0 required
        c.wait_closed(10)

    srv.start()
    assert _recover_all(srv, topic)[0] == msgs
    # The consumer's offset was saved: it resumes after everything it got
    # (n messages, then the sentinel published by _recover_all).
    with consumer(srv.port, topic, offset=None, client_id=reader) as c:
        got = c.read_deliveries(1)
        assert got[0][1].startswith(b"S"), "resumed at %r, expected the sentinel" % got[0][1][:20]
        c.expect_silence(0.3)
    srv.stop(sig)


def test_sigterm_during_publish_stream(server):
    """SIGTERM while a producer streams: exit 0, and a clean contiguous log."""
    srv = server()
    topic = b"stream-term"
    watcher = consumer(srv.port, topic, 0, timeout=30)
    watcher.barrier()
    prod = StreamingProducer(srv.port, topic)
    prod.start()
    try:
        seen = [m for _, m in watcher.read_deliveries(3000, timeout=60)]
        assert prod.is_alive(), "producer finished before the stop: not mid-stream"
        srv.stop(signal.SIGTERM)
        seen += _drain_until_closed(watcher, topic)
    finally:
        watcher.close()
        prod.stop_flag.set()
        prod.join(30)
    assert not prod.is_alive()
    assert prod.error is None, prod.error
    _assert_prefix(seen, 0, "consumer before SIGTERM")
    srv.start()
    recovered, _ = _recover_all(srv, topic)
    _assert_prefix(recovered, 0, "log after SIGTERM")
    assert len(seen) <= len(recovered) <= prod.next
