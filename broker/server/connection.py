"""One client connection: v0 framing, command handlers, delivery, liveness.

``data_received`` feeds the codec once and hands every complete frame to
its handler, in order. Consecutive PUBs to one topic arrive as one event
(the codec coalesces them), so publishing costs Python work per batch.

All per-connection work is attached to this object and nothing else: one
delivery callback handle, one heartbeat timer handle and the subscriptions.
``connection_lost`` cancels the handles and detaches the subscriptions, so
nothing keeps running for a client that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from ..auth import ANYONE
from ..codec import frames, records
from ..errors import LimitError
from ..protocol import From
from ..topics import InvalidTopic
from .delivery import Subscription
from .v1 import V1Handlers

__all__ = ["Connection"]

log = logging.getLogger(__name__)

_MAX_CLIENT_ID = 255   # bytes; longer CID arguments are refused
_MAX_COMPLAINTS = 5    # bad-input warnings logged per connection before going quiet
_PUMP_BUDGET = 16      # delivery chunks per callback before yielding to other clients
# Bytes read from one connection before it yields the loop to the others.
# The loop reads a busy socket many times per iteration (libuv: up to 32
# reads of 256 kB), and each chunk costs Python work per frame: without a
# budget one flooding client holds everyone else up for a second or more.
_READ_BUDGET = 256 * 1024
_TURN_CHUNKS = 4       # chunks one subscription may send before the next gets a turn

OP_CLOSE = frames.OP_CLOSE
OP_REG = frames.OP_REG
OP_CID = frames.OP_CID
OP_PUB = frames.OP_PUB
OP_HEL = frames.OP_HEL


class Connection(V1Handlers, asyncio.Protocol):
    """The broker's side of one TCP connection (protocol v0, or v1 after HEL)."""

    def __init__(self, broker) -> None:
        self.broker = broker                  # the Broker that accepted us
        self.loop = broker.loop
        cfg = broker.config
        self.reader = frames.FrameReader(cfg.max_frame_bytes)  # incremental frame scanner
        self.transport: asyncio.Transport | None = None
        self.peer = "?"                       # "host:port" for log lines
        self.ip = "?"                         # remote address, for per-address limits
        # Who this is: everyone may do everything without an auth file;
        # with one, None until authenticated (or anonymous, if allowed).
        self.user = ANYONE if broker.auth is None else None
        self.version = 0                      # wire protocol: 0 until a HEL frame, then 1
        self.client_id: bytes | None = None   # set by REG, CID or HEL
        self.subs: dict[str, Subscription] = {}  # topic name -> subscription
        self.last_seen = 0.0                  # loop.time() of the last bytes received
        self.write_paused = False             # transport above its high-water mark
        self._writev = False                  # writelines sends without a copy (uvloop)
        self._read_pauses: set[str] = set()   # why reading is paused: "disk", "replies", "burst"
        self._partial_since = 0.0             # loop.time() a partial frame started waiting, or 0
        self._burst = 0                       # bytes read since this connection last yielded
        self._burst_handle: asyncio.Handle | None = None  # scheduled end of a yield
        self.closed = False                   # connection_lost has run
        self._pump_handle: asyncio.Handle | None = None   # scheduled delivery callback
        self._ready: dict[Subscription, None] = {}  # subscriptions that may have data, in turn order
        self._timer: asyncio.TimerHandle | None = None    # heartbeat check
        self._complaints = 0                  # bad-input warnings logged so far
        self._tasks: set[asyncio.Task] = set()  # v1 requests awaiting the disk or a hash
        self._auth_pending = False            # an AUT is being checked
        self._auth_failures = 0               # failed AUTs; the third closes the connection
        self._handlers = {
            frames.OP_PNG: self._on_png,
            frames.OP_CID: self._on_cid,
            frames.OP_SUB: self._on_sub,
            frames.OP_SET: self._on_set,
            frames.OP_REG: self._on_reg,
            frames.OP_CLOSE: self._on_close,
            frames.OP_HEL: self._on_hel,
            frames.OP_BADCRC: self._on_badcrc,
            frames.OP_UNKNOWN: self._on_unknown,
            frames.OP_MALFORMED: self._on_malformed,
            frames.OP_ERROR: self._on_error,
        }

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.ip = str(peer[0])
            self.peer = "%s:%s" % (peer[0], peer[1])
        if not self.broker.connection_made(self):
            self.closed = True
            transport.abort()
            return
        cfg = self.broker.config
        transport.set_write_buffer_limits(high=cfg.write_high_water, low=cfg.write_low_water)
        # uvloop's writelines is one writev that keeps the buffers; the
        # stdlib's joins them (3.11) or, in 3.12 and 3.13.0, neither pauses
        # the protocol above high water nor checks for a lost connection.
        self._writev = type(transport).__module__.startswith("uvloop")
        self.last_seen = self.loop.time()
        self._timer = self.loop.call_at(self.last_seen + self._check_period(), self._check_alive)

    def data_received(self, data: bytes) -> None:
        now = self.last_seen = self.loop.time()
        if self.version:
            self._v1_data(data)
        else:
            self._v0_data(data)
        if self.reader.buffered:
            if not self._partial_since:
                self._partial_since = now
        else:
            self._partial_since = 0.0
        if self.write_paused and not self.closed:
            # Replies are waiting on a client that isn't reading them: read
            # no more requests from it until they drain (resume_writing).
            self.pause_reading("replies")
        self._burst += len(data)
        if self._burst >= _READ_BUDGET and self._burst_handle is None and not self.closed:
            # Let the other connections have the loop before reading more.
            self.pause_reading("burst")
            self._burst_handle = self.loop.call_soon(self._end_burst)

    def _end_burst(self) -> None:
        self._burst = 0
        self._burst_handle = None
        self.resume_reading("burst")

    def _v0_data(self, data: bytes) -> None:
        events = self.reader.feed(data)
        if not events:
            return
        nbytes = len(data)
        for op, a, b in events:
            if self.closed:
                return
            if op == OP_PUB:
                if self.client_id is None:
                    self._refuse_unidentified()
                    return
                if self.user is None:
                    self._refuse_anonymous()
                    return
                self._on_pub(a, b, nbytes)
                nbytes = 0  # the whole chunk is accounted to the first batch
                continue
            if op == OP_HEL and self.client_id is None:
                self._enter_v1()
                return
            if self.client_id is None and op not in (OP_REG, OP_CID, OP_CLOSE) \
                    and op != frames.OP_ERROR:
                self._refuse_unidentified()
                return
            if self.user is None and op != OP_CLOSE and op != frames.OP_ERROR:
                if self.broker.auth.allow_anonymous:
                    self.user = self.broker.auth.anonymous
                else:
                    self._refuse_anonymous()
                    return
            self._handlers[op](a, b)

    def connection_lost(self, exc) -> None:
        self.closed = True
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._burst_handle is not None:
            self._burst_handle.cancel()
            self._burst_handle = None
        self._ready.clear()
        for sub in self.subs.values():
            sub.topic.subscribers.discard(sub)
        self.subs.clear()
        self.broker.connection_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.resume_reading("replies")
        self.schedule_delivery()

    # Reading is paused for more than one reason at a time: the disk thread's
    # backlog (DiskWriter calls these with no reason) and unread replies.

    def pause_reading(self, reason: str = "disk") -> None:
        if not self._read_pauses and not self.closed:
            self.transport.pause_reading()
        self._read_pauses.add(reason)

    def resume_reading(self, reason: str = "disk") -> None:
        if reason in self._read_pauses:
            self._read_pauses.discard(reason)
            if not self._read_pauses and not self.closed:
                self.transport.resume_reading()
                # While we were not reading, the rest of a partial frame
                # could not arrive: its read timeout starts again now.
                now = self.loop.time()
                if self._partial_since:
                    self._partial_since = now
                if reason == "disk":
                    self.last_seen = now  # our backlog, not the client's silence

    def is_closing(self) -> bool:
        return self.closed or self.transport.is_closing()

    # -- commands ------------------------------------------------------------

    def _on_pub(self, topic_name: bytes, messages: list, nbytes: int) -> None:
        topic = self._topic(topic_name, "PUB")
        if topic is None:
            return
        if not self.user.may_publish(topic.name):
            self._refuse_permission("publish to", topic.name)
            return
        self.broker.publish(topic, messages, nbytes, self)

    def _on_reg(self, a, b) -> None:
        client_id = str(uuid.uuid4()).encode("ascii")
        self.broker.bind_client(self, client_id)
        self.transport.write(frames.encode_frame(client_id))

    def _on_cid(self, client_id: bytes, b) -> None:
        if len(client_id) > _MAX_CLIENT_ID:
            self.broker.counters["malformed"] += 1
            self._complain("malformed", "CID longer than %d bytes" % _MAX_CLIENT_ID)
            return
        if client_id != self.client_id:
            self.stop_delivery()  # its offsets belonged to the previous id
        self.broker.bind_client(self, client_id)

    def _on_sub(self, topic_name: bytes, b) -> None:
        topic = self._topic(topic_name, "SUB")
        if topic is None or topic.name in self.subs:
            return
        if not self.user.may_subscribe(topic.name):
            self._refuse_permission("subscribe to", topic.name)
            return
        if len(self.subs) >= self.broker.config.max_subscriptions:
            self.broker.counters["refused_subscriptions"] += 1
            self._complain("limit", "SUB %s refused: %d subscriptions on this connection "
                           "(--max-subscriptions)" % (topic.name, len(self.subs)))
            return
        start = self.broker.resolve_offset(self.client_id, topic, From.COMMITTED, 0)
        sub = Subscription.v0(self, topic, start)
        self.subs[topic.name] = sub
        topic.subscribers.add(sub)
        self.schedule_delivery(sub)

    def _on_set(self, topic_name: bytes, value: bytes, *, _max=1 << 63) -> None:
        try:
            requested = int(value)
        except ValueError:
            requested = None
        if requested is None or requested < -1 or requested >= _max:
            self.broker.counters["malformed"] += 1
            self._complain("malformed", "SET offset %r is not 0, -1 or an offset" % value[:32])
            return
        topic = self._topic(topic_name, "SET")
        if topic is None:
            return
        if not self.user.may_subscribe(topic.name):
            # SET stores an offset, like a v1 CMT: it needs the same permission.
            self._refuse_permission("set an offset on", topic.name)
            return
        if requested == 0:
            offset = self.broker.resolve_offset(None, topic, From.OLDEST, 0)
        elif requested == -1:
            offset = self.broker.resolve_offset(None, topic, From.LATEST, 0)
        else:
            offset = self.broker.resolve_offset(None, topic, From.OFFSET, requested)
        sub = self.subs.get(topic.name)
        if sub is not None:
            sub.offset = offset
            self.schedule_delivery(sub)
        self.broker.commit_offset(self.client_id, topic.name, offset)

    def _on_png(self, a, b) -> None:
        pass  # v0: liveness only (last_seen is already updated), no reply

    def _on_hel(self, a, b) -> None:
        # HEL after REG/CID: a v0 client can't switch protocols mid-stream.
        self.broker.counters["unknown_commands"] += 1
        self._complain("unknown", "HEL must be the first frame; ignored")

    def _on_close(self, a, b) -> None:
        self.transport.close()

    def _on_badcrc(self, topic_name: bytes, length: int) -> None:
        self.broker.counters["bad_crc"] += 1
        self._complain("bad_crc", "PUB to %r: CRC mismatch, %d-byte message not stored"
                       % (topic_name[:64], length))

    def _on_unknown(self, head: bytes, b) -> None:
        self.broker.counters["unknown_commands"] += 1
        self._complain("unknown", "unknown command %r ignored" % head)

    def _on_malformed(self, command: bytes, reason: str) -> None:
        self.broker.counters["malformed"] += 1
        self._complain("malformed", reason)

    def _on_error(self, reason: str, b) -> None:
        self.broker.counters["bad_frames"] += 1
        log.warning("%s: %s; closing the connection", self.peer, reason)
        self.transport.abort()

    # -- helpers -------------------------------------------------------------

    def _topic(self, name: bytes, command: str):
        try:
            return self.broker.topic(name)
        except InvalidTopic as exc:
            self.broker.counters["invalid_topics"] += 1
            self._complain("invalid_topic", "%s refused: %s" % (command, exc))
        except LimitError as exc:
            self._complain("limit", "%s refused: %s" % (command, exc))
        return None

    def _refuse_anonymous(self) -> None:
        self.broker.counters["unauthorized"] += 1
        log.warning("%s: unauthenticated v0 client refused (allow_anonymous is off); closing",
                    self.peer)
        self.transport.abort()

    def _refuse_permission(self, what: str, topic: str) -> None:
        self.broker.counters["unauthorized"] += 1
        self._complain("unauthorized", "%s may not %s %s" % (self.user.name, what, topic))

    def _refuse_unidentified(self) -> None:
        self.broker.counters["unidentified"] += 1
        log.warning("%s: command before REG or CID; closing the connection", self.peer)
        self.transport.abort()

    def _complain(self, kind: str, message: str) -> None:
        self._complaints += 1
        if self._complaints <= _MAX_COMPLAINTS:
            log.warning("%s: %s", self.peer, message)
            if self._complaints == _MAX_COMPLAINTS:
                log.warning("%s: further bad input from this connection is counted, not logged",
                            self.peer)

    def _check_period(self) -> float:
        cfg = self.broker.config
        return min(cfg.heartbeat_timeout, cfg.read_timeout)

    def _check_alive(self) -> None:
        """Close silent clients and clients that hold half a frame too long.

        Runs once per min(heartbeat timeout, read timeout), not per read, so
        liveness costs one timer per connection and period.
        """
        self._timer = None
        if self.closed:
            return
        cfg = self.broker.config
        now = self.loop.time()
        # Time we spend not reading this client is not the client's doing:
        # no read timeout while reading is paused, and no silence timeout
        # while the disk backlog paused it. (A client that does not read
        # its replies still times out as silent: it is not being read.)
        disk_paused = "disk" in self._read_pauses
        if not disk_paused and now - self.last_seen >= cfg.heartbeat_timeout:
            self.broker.counters["heartbeat_timeouts"] += 1
            log.info("%s: silent for %.0f s, closing", self.peer, cfg.heartbeat_timeout)
            self.transport.abort()
            return
        if (self._partial_since and not self._read_pauses
                and now - self._partial_since >= cfg.read_timeout):
            self.broker.counters["read_timeouts"] += 1
            log.warning("%s: a frame incomplete for %.0f s (%d bytes held), closing",
                        self.peer, cfg.read_timeout, self.reader.buffered)
            self.transport.abort()
            return
        # At least once per period: a partial frame that starts after this
        # check must be caught within the read timeout, not the heartbeat's.
        deadline = now + self._check_period()
        if not disk_paused:
            deadline = min(deadline, self.last_seen + cfg.heartbeat_timeout)
            if self._partial_since and not self._read_pauses:
                deadline = min(deadline, self._partial_since + cfg.read_timeout)
        self._timer = self.loop.call_at(max(deadline, now + 0.001), self._check_alive)

    # -- delivery ------------------------------------------------------------

    def stop_delivery(self) -> None:
        """Stop all push delivery at once (superseded by a newer connection)."""
        for sub in self.subs.values():
            sub.topic.subscribers.discard(sub)
        self.subs.clear()
        self._ready.clear()
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None

    def remove_subscription(self, sub: Subscription) -> None:
        sub.topic.subscribers.discard(sub)
        self._ready.pop(sub, None)
        if self.subs.get(sub.topic.name) is sub:
            del self.subs[sub.topic.name]

    def schedule_delivery(self, sub: Subscription | None = None) -> None:
        """Give ``sub`` a turn (it may have data), and run the pump soon.

        Called by the writer when a topic grows, by SUB/SET/SEK, and with
        no argument by resume_writing to continue the turns in progress.
        """
        if sub is not None:
            self._ready[sub] = None
        if self._pump_handle is None and self._ready and not self.write_paused \
                and not self.closed:
            self._pump_handle = self.loop.call_soon(self._pump)

    def deliver_now(self, sub: Subscription) -> None:
        """``sub``'s topic grew (the writer, via the broker): its turn now, not next turn.

        The pump runs at once, with its usual budgets; a pump already
        scheduled is folded into this one. Paused or closed, it waits as
        :meth:`schedule_delivery` would have it wait.
        """
        self._ready[sub] = None
        if self.write_paused or self.closed:
            return
        if self._pump_handle is not None:
            self._pump_handle.cancel()
        self._pump()

    def _pump(self) -> None:
        """Write deliveries, round-robin over the ready subscriptions.

        Each subscription gets up to _TURN_CHUNKS chunks per turn and the
        callback up to _PUMP_BUDGET chunks in all, so one busy connection
        can't monopolise the loop and one busy topic can't starve the others
        on its connection. A subscription still behind goes to the back.
        """
        self._pump_handle = None
        if self.closed:
            return
        transport = self.transport
        chunk = self.broker.config.delivery_chunk_bytes
        ready = self._ready
        budget = _PUMP_BUDGET
        counters = self.broker.counters
        topic_out = self.broker.topic_out
        while ready and budget and not self.write_paused:
            sub = next(iter(ready))
            del ready[sub]
            turn = _TURN_CHUNKS
            while turn and sub.behind and not self.write_paused:
                try:
                    got = sub.read(chunk)
                except records.CorruptRecordError as exc:
                    counters["corrupt_reads"] += 1
                    log.error("%s: topic %s: %s; delivery of this topic stopped",
                              self.peer, sub.topic.name, exc)
                    self.remove_subscription(sub)
                    break
                if got is None:
                    # Nothing readable at or after our offset: if retention
                    # moved the log start past us, move with it rather than
                    # stay "behind" forever (which would spin).
                    if sub.offset < sub.topic.start_offset:
                        sub.offset = sub.topic.start_offset
                    break
                out, count, nxt = got
                if type(out) is not tuple:
                    transport.write(out)
                elif self._writev:  # a tail-cache batch behind its head (v1.batch_frame)
                    transport.writelines(out)
                else:
                    transport.write(out[0])
                    transport.write(out[1])
                sub.offset = nxt
                if sub.auto_commit:
                    # v0 can't acknowledge: its offset follows what was
                    # written to this live transport, and nothing else.
                    self.broker.commit_offset(self.client_id, sub.topic.name, nxt)
                counters["messages_out"] += count
                topic_out[sub.topic.name] += count
                turn -= 1
                budget -= 1
            if sub.behind and self.subs.get(sub.topic.name) is sub:
                ready[sub] = None  # back of the line
        self.schedule_delivery()
