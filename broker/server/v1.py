"""Protocol v1 command handlers, mixed into :class:`Connection`.

A connection starts in v0. A first frame of type ``HEL`` switches it to v1
for good: the v0 reader stops in front of the ``HEL`` frame and hands the
unparsed bytes to a :class:`wire1.V1Reader`. From then on every request
carries a request id, and every refusal gets an ``ERR`` frame with a
stable code (``broker/errors.py``). The layouts are in docs/protocol.md.
"""

from __future__ import annotations

import collections
import json
import logging
import struct
import uuid

from .. import __version__
from ..codec import wire1
from ..errors import ErrorCode, LimitError
from ..protocol import PROTOCOL_VERSION
from ..topics import InvalidTopic
from .delivery import Subscription

log = logging.getLogger(__name__)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_MSG_HEAD = struct.Struct(">I3sI")  # frame length, type, request id


def batch_frame(rid: int, name_head: bytes, buf, count: int) -> tuple:
    """The ``MSG`` frame of ``buf`` as ``(head, buf)``: ``count`` valid records, as they are.

    ``name_head`` is the topic as ``wire1.pack_str`` packs it. Joined, the
    same bytes ``wire1.message_frame`` makes of ``buf`` when it takes every
    record, without walking them: for records of a tail-cache batch
    (``TopicLog.read``). Not joined: on uvloop the delivery pump hands both
    to ``transport.writelines``, which sends them with one ``writev`` and
    copies neither (a batch is never changed once written); elsewhere, two
    ``write`` calls.
    """
    size = wire1.FRAME_HEADER + len(name_head) + 4 + len(buf)
    return _MSG_HEAD.pack(size, b"MSG", rid) + name_head + _U32.pack(count), buf
_ACK = struct.Struct(">QI")
_ERR = struct.Struct(">H")
_SPEC = struct.Struct(">Bq")  # from-mode, value

_K = wire1.KINDS
# What an unauthenticated v1 connection may send.
_OPEN_KINDS = frozenset((_K[b"HEL"], _K[b"AUT"], _K[b"PNG"]))


class V1Handlers:
    """The v1 half of a Connection (state lives on the Connection)."""

    def _enter_v1(self) -> None:
        rest = self.reader.detach()
        self.version = 1
        self.reader = wire1.V1Reader(self.broker.config.max_frame_bytes)
        self._v1_acks = collections.deque()  # [reply or None] per PUB not yet answered, in order
        self._v1_handlers = {
            _K[b"HEL"]: self._v1_hel,
            _K[b"PUB"]: self._v1_pub,
            _K[b"SUB"]: self._v1_sub,
            _K[b"UNS"]: self._v1_uns,
            _K[b"CMT"]: self._v1_cmt,
            _K[b"SEK"]: self._v1_sek,
            _K[b"PNG"]: self._v1_png,
            _K[b"TOP"]: self._v1_top,
            _K[b"OFS"]: self._v1_ofs,
            _K[b"STA"]: self._v1_sta,
            _K[b"AUT"]: self._v1_aut,
            _K[b"CFG"]: self._v1_cfg,
        }
        if rest:
            self._v1_data(rest)

    def _v1_data(self, data) -> None:
        events = self.reader.feed(data)
        nbytes = len(data)
        handlers = self._v1_handlers
        for kind, rid, payload in events:
            # Once we decided to close (bad HEL, bad framing, ...), frames
            # pipelined behind that point are not acted on.
            if self.closed or self.transport.is_closing():
                return
            handler = handlers.get(kind)
            if handler is not None:
                if self.client_id is None and kind != _K[b"HEL"]:
                    self._v1_error(rid, ErrorCode.NOT_IDENTIFIED, "send HEL first")
                    continue
                if self.user is None and kind not in _OPEN_KINDS:
                    self.broker.counters["unauthorized"] += 1
                    self._v1_error(rid, ErrorCode.UNAUTHORIZED, "authenticate with AUT first")
                    continue
                try:
                    handler(rid, payload, nbytes)
                except (wire1.ProtocolError, struct.error, UnicodeDecodeError) as exc:
                    self.broker.counters["malformed"] += 1
                    self._v1_error(rid, ErrorCode.BAD_REQUEST, "malformed request: %s" % exc)
                    if self.client_id is None:
                        # A HEL that doesn't parse: an error in HEL closes the
                        # connection (protocol.md).
                        self.transport.close()
                nbytes = 0
            elif kind == wire1.K_CLOSE:
                self.transport.close()
            elif kind == wire1.K_ERROR:
                self.broker.counters["bad_frames"] += 1
                code = ErrorCode.FRAME_TOO_LARGE if "exceeds" in payload else ErrorCode.BAD_FRAME
                self._v1_error(0, code, payload)
                log.warning("%s: %s; closing the connection", self.peer, payload)
                self.transport.close()
            else:
                self.broker.counters["unknown_commands"] += 1
                self._v1_error(rid, ErrorCode.UNKNOWN_COMMAND,
                               "unknown frame type %r" % (payload if kind == wire1.K_UNKNOWN else kind))

    # -- replies -------------------------------------------------------------

    def _v1_reply(self, rid: int, payload: bytes = b"") -> None:
        if not self.closed:
            self.transport.write(wire1.encode(b"RES", rid, payload))

    def _v1_json(self, rid: int, obj) -> None:
        self._v1_reply(rid, json.dumps(obj, separators=(",", ":")).encode())

    def _v1_error(self, rid: int, code: int, text: str) -> None:
        if not self.closed:
            payload = _ERR.pack(code) + wire1.pack_str(text[:1000])
            self.transport.write(wire1.encode(b"ERR", rid, payload))

    def _v1_topic(self, rid: int, name: bytes, may=None):
        """The topic named ``name``, or None after an ERR; ``may`` checks permission."""
        try:
            topic = self.broker.topic(name)
        except InvalidTopic as exc:
            self.broker.counters["invalid_topics"] += 1
            self._v1_error(rid, ErrorCode.INVALID_TOPIC, str(exc))
            return None
        except LimitError as exc:
            self._v1_error(rid, ErrorCode.LIMIT_EXCEEDED, str(exc))
            return None
        if may is not None and not may(topic.name):
            self.broker.counters["unauthorized"] += 1
            self._v1_error(rid, ErrorCode.UNAUTHORIZED, "%s may not %s %s" % (
                self.user.name, "publish to" if may == self.user.may_publish else "read",
                topic.name))
            return None
        return topic

    # -- handlers --------------------------------------------------------------

    def _v1_hel(self, rid: int, payload: bytes, nbytes: int) -> None:
        if self.client_id is not None:
            self._v1_error(rid, ErrorCode.BAD_REQUEST, "HEL was already sent")
            return
        version = _U16.unpack_from(payload, 0)[0]
        # The version first: another version's HEL may not parse as ours.
        if version != PROTOCOL_VERSION:
            self._v1_error(rid, ErrorCode.UNSUPPORTED_VERSION,
                           "protocol version %d not supported; this broker speaks %d"
                           % (version, PROTOCOL_VERSION))
            self.transport.close()
            return
        client_id, _ = wire1.read_str(payload, 2)
        if len(client_id) > 255:
            self._v1_error(rid, ErrorCode.BAD_REQUEST, "client id longer than 255 bytes")
            self.transport.close()  # an error in HEL closes the connection (protocol.md)
            return
        if not client_id:
            client_id = str(uuid.uuid4()).encode("ascii")
        auth = self.broker.auth
        if auth is not None and not auth.allow_anonymous:
            # Not claimed until AUT succeeds (_v1_check): binding supersedes
            # the id's current connection, which stops its deliveries, and
            # nobody may do that to a client without a secret.
            self.client_id = client_id
            self.user = None
        else:
            self.broker.bind_client(self, client_id)
            if auth is not None:
                self.user = auth.anonymous
        self._v1_reply(rid, _U16.pack(PROTOCOL_VERSION) + wire1.pack_str(client_id)
                       + wire1.pack_str(__version__))

    def _v1_aut(self, rid: int, payload: bytes, nbytes: int) -> None:
        name, pos = wire1.read_str(payload, 0)
        secret, _ = wire1.read_str(payload, pos)
        auth = self.broker.auth
        if auth is None:
            self._v1_reply(rid)  # nothing to check: everyone may do everything
            return
        if self._auth_pending:
            self._v1_error(rid, ErrorCode.BAD_REQUEST, "an AUT is already being checked")
            return
        # The hash runs in a thread.
        self._auth_pending = True
        self._v1_spawn(self._v1_check(rid, name.decode("utf-8", "replace"), secret))

    def _v1_spawn(self, coro) -> None:
        """Run ``coro`` as a task owned by this connection (cancelled with it)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _v1_check(self, rid: int, name: str, secret: bytes) -> None:
        try:
            user = await self.broker.auth.verify(name, secret)
        finally:
            self._auth_pending = False
        if self.closed:
            return
        if user is None:
            self.broker.counters["auth_failures"] += 1
            log.warning("%s: authentication failed for user %r", self.peer, name[:64])
            self._v1_error(rid, ErrorCode.UNAUTHORIZED, "authentication failed")
            self._auth_failures += 1
            if self._auth_failures >= 3:
                self.transport.close()
            return
        self.user = user
        self.broker.bind_client(self, self.client_id)  # now it may claim its id
        self._v1_reply(rid)

    def _v1_pub(self, rid: int, payload: bytes, nbytes: int) -> None:
        # A topic that exists and may be published to (nearly every PUB):
        # straight to finished log records, in one pass that checks each
        # CRC, copies the message once and gives it its offset, time and
        # record CRC; the loop hands out a topic's offsets in order, and
        # the disk thread writes the records as they are. Any other PUB is
        # parsed first, so that a bad CRC is reported before anything about
        # the topic and no topic is made for a refused batch.
        name, _pos = wire1.read_str(payload, 0)
        topic = self.broker.known_topic(name)
        fast = topic is not None and self.user.may_publish(topic.name)
        if fast:
            base, ts = self.broker.writer.next_stamp(topic)
            _name, batch, count, bad, last_len = wire1.publish_records(payload, base, ts)
        else:
            _name, batch, bad = wire1.parse_publish(payload)
            count, ts, last_len = len(batch), None, 0
        if bad >= 0:
            self.broker.counters["bad_crc"] += 1
            self._v1_error(rid, ErrorCode.BAD_CRC,
                           "CRC mismatch in message %d; batch of %d not stored" % (bad, count))
            return
        if not fast:
            topic = self._v1_topic(rid, name, self.user.may_publish)
            if topic is None:
                return
        # ACKs (and STORAGE_ERRORs) leave in PUB order (protocol.md), although
        # the disk thread reports batches per topic and an empty batch needs
        # no disk at all: each PUB takes a slot in a per-connection queue,
        # filled with its reply when stored, written once it is at the front.
        queue = self._v1_acks
        if not count:
            reply = wire1.encode(b"ACK", rid, _ACK.pack(topic.next_offset, 0))
            if queue:
                queue.append([reply])
            else:
                self.transport.write(reply)
            return
        slot = [None]
        queue.append(slot)

        def on_stored(base, count, error, conn=self, rid=rid, slot=slot):
            if conn.closed:
                return
            if error is None:
                slot[0] = wire1.encode(b"ACK", rid, _ACK.pack(base, count))
            else:
                text = wire1.pack_str(("not stored: %s" % error)[:1000])
                slot[0] = wire1.encode(b"ERR", rid, _ERR.pack(ErrorCode.STORAGE_ERROR) + text)
            conn._v1_flush_acks()

        self.broker.publish(topic, batch, nbytes, self, on_stored, count, ts, last_len)

    def _v1_flush_acks(self) -> None:
        queue = self._v1_acks
        out = []
        while queue and queue[0][0] is not None:
            out.append(queue.popleft()[0])
        if out and not self.closed:
            self.transport.write(b"".join(out))

    def _v1_sub(self, rid: int, payload: bytes, nbytes: int) -> None:
        name, pos = wire1.read_str(payload, 0)
        mode, value = _SPEC.unpack_from(payload, pos)
        topic = self._v1_topic(rid, name, self.user.may_subscribe)
        if topic is None:
            return
        if topic.name in self.subs:
            self._v1_error(rid, ErrorCode.ALREADY_SUBSCRIBED, "already subscribed to %s" % topic.name)
            return
        if len(self.subs) >= self.broker.config.max_subscriptions:
            self.broker.counters["refused_subscriptions"] += 1
            self._v1_error(rid, ErrorCode.LIMIT_EXCEEDED, "%d subscriptions on this connection "
                           "(--max-subscriptions)" % len(self.subs))
            return
        offset = self._v1_resolve(rid, topic, mode, value)
        if offset is None:
            return
        name_bytes = topic.name_bytes
        message_frame = wire1.message_frame
        name_head = wire1.pack_str(name_bytes)

        def convert(buf, from_offset, end_offset, max_bytes, verify):
            return message_frame(buf, rid, name_bytes, from_offset, end_offset, max_bytes, verify)

        def forward(records, count):
            return batch_frame(rid, name_head, records, count)

        sub = Subscription(self, topic, offset, convert, auto_commit=False, forward=forward)
        self._v1_reply(rid, _U64.pack(offset))
        self.subs[topic.name] = sub
        topic.subscribers.add(sub)
        self.schedule_delivery(sub)

    def _v1_uns(self, rid: int, payload: bytes, nbytes: int) -> None:
        name, _ = wire1.read_str(payload, 0)
        sub = self.subs.get(name.decode("ascii", "replace"))
        if sub is None:
            self._v1_error(rid, ErrorCode.NOT_SUBSCRIBED, "not subscribed to %r" % name[:64])
            return
        self.remove_subscription(sub)
        self._v1_reply(rid)

    def _v1_cmt(self, rid: int, payload: bytes, nbytes: int) -> None:
        name, pos = wire1.read_str(payload, 0)
        offset = _U64.unpack_from(payload, pos)[0]
        topic = self._v1_topic(rid, name, self.user.may_subscribe)
        if topic is None:
            return
        if offset > topic.end_offset:
            self._v1_error(rid, ErrorCode.INVALID_OFFSET,
                           "cannot commit %d: topic %s ends at %d" % (offset, topic.name, topic.end_offset))
            return
        self.broker.commit_offset(self.client_id, topic.name, offset)
        self._v1_reply(rid)

    def _v1_sek(self, rid: int, payload: bytes, nbytes: int) -> None:
        name, pos = wire1.read_str(payload, 0)
        mode, value = _SPEC.unpack_from(payload, pos)
        sub = self.subs.get(name.decode("ascii", "replace"))
        if sub is None:
            self._v1_error(rid, ErrorCode.NOT_SUBSCRIBED, "not subscribed to %r" % name[:64])
            return
        offset = self._v1_resolve(rid, sub.topic, mode, value)
        if offset is None:
            return
        sub.offset = offset
        self._v1_reply(rid, _U64.pack(offset))
        self.schedule_delivery(sub)

    def _v1_png(self, rid: int, payload: bytes, nbytes: int) -> None:
        self.transport.write(wire1.encode(b"POG", rid))

    def _v1_top(self, rid: int, payload: bytes, nbytes: int) -> None:
        self._v1_json(rid, self.broker.describe_topics())

    def _v1_ofs(self, rid: int, payload: bytes, nbytes: int) -> None:
        client_id, _ = wire1.read_str(payload, 0) if payload else (b"", 0)
        self._v1_json(rid, self.broker.describe_offsets(client_id or None))

    def _v1_sta(self, rid: int, payload: bytes, nbytes: int) -> None:
        self._v1_json(rid, self.broker.stats())

    def _v1_cfg(self, rid: int, payload: bytes, nbytes: int) -> None:
        """Read or change a topic's settings: ``str topic, str JSON overrides``."""
        name, pos = wire1.read_str(payload, 0)
        body, _ = wire1.read_str(payload, pos)
        try:
            overrides = json.loads(body) if body.strip() else {}
            if not isinstance(overrides, dict):
                raise ValueError("overrides must be a JSON object")
        except ValueError as exc:
            self._v1_error(rid, ErrorCode.BAD_REQUEST, "CFG: %s" % exc)
            return
        may = self.user.may_publish if overrides else self.user.may_subscribe
        topic = self._v1_topic(rid, name, may)
        if topic is None:
            return
        if not overrides:
            self._v1_json(rid, topic.config.as_dict())
            return
        self._v1_spawn(self._v1_set_config(rid, topic.name, overrides))

    async def _v1_set_config(self, rid: int, name: str, overrides: dict) -> None:
        try:
            config = await self.broker.writer.set_topic_config(name, **overrides)
        except (ValueError, TypeError) as exc:
            self._v1_error(rid, ErrorCode.BAD_REQUEST, "CFG: %s" % exc)
            return
        except OSError as exc:
            self._v1_error(rid, ErrorCode.STORAGE_ERROR, "CFG not saved: %s" % exc)
            return
        log.info("%s: topic %s settings changed: %s", self.peer, name, overrides)
        self._v1_json(rid, config.as_dict())

    def _v1_resolve(self, rid: int, topic, mode: int, value: int):
        try:
            return self.broker.resolve_offset(self.client_id, topic, mode, value)
        except ValueError as exc:
            self._v1_error(rid, ErrorCode.INVALID_OFFSET, str(exc))
            return None

