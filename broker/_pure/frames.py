"""Wire framing, pure-Python twin of ``broker/_speedups/frames.pyx``.

This module is the reference implementation: the Cython module mirrors it
name for name and must produce identical results for identical input (the
test suite feeds both the same random byte streams).

Client to server (protocol v0)::

    [u32 big-endian N][N bytes body]            every command
    [u32 big-endian N][N bytes body][u32 CRC]   PUB only; CRC-32 of the message

The body is a 3-letter command, then one space and its arguments.
A frame with N == 0 means "client is going away".

:class:`FrameReader` is fed raw chunks of the byte stream in any split and
returns *events*: tuples ``(op, a, b)``. Consecutive well-formed PUB frames
to the same topic are coalesced into one ``(OP_PUB, topic, [messages])``
event, so the server runs Python once per batch, not once per message.
"""

from __future__ import annotations

import struct
import zlib

from .stream import ChunkedReader

__all__ = [
    "OP_CLOSE", "OP_REG", "OP_CID", "OP_SUB", "OP_SET", "OP_PUB", "OP_PNG",
    "OP_BADCRC", "OP_UNKNOWN", "OP_MALFORMED", "OP_ERROR", "OP_HEL",
    "CRC32_KERNEL", "FrameReader", "crc32", "encode_frame", "encode_pub",
    "encode_deliveries",
]

# Event kinds returned by FrameReader.feed(); the Cython twin uses the same ints.
OP_CLOSE = 0      # (OP_CLOSE, None, None): zero-length frame, client leaves
OP_REG = 1        # (OP_REG, None, None)
OP_CID = 2        # (OP_CID, client_id: bytes, None)
OP_SUB = 3        # (OP_SUB, topic: bytes, None)
OP_SET = 4        # (OP_SET, topic: bytes, offset: bytes)  offset parsed by the server
OP_PUB = 5        # (OP_PUB, topic: bytes, messages: list[bytes])  CRCs already checked
OP_PNG = 6        # (OP_PNG, None, None)
OP_BADCRC = 7     # (OP_BADCRC, topic: bytes, message_length: int)  not stored
OP_UNKNOWN = 8    # (OP_UNKNOWN, first bytes of the body (<= 16), None)
OP_MALFORMED = 9  # (OP_MALFORMED, command: bytes, reason: str)
OP_ERROR = 10     # (OP_ERROR, reason: str, None): framing broken, reader stops
OP_HEL = 11       # (OP_HEL, None, None): a first frame of type HEL; call detach()

_U32 = struct.Struct(">I")
_unpack_u32 = _U32.unpack_from
_pack_u32 = _U32.pack

#: What computes CRC-32: always zlib here (the Cython twin may say
#: ``"pclmulqdq"``).
CRC32_KERNEL = "zlib"
crc32 = zlib.crc32


class FrameReader(ChunkedReader):
    """Incremental v0 frame scanner.

    ``feed(data)`` accepts any chunk of the stream and returns the list of
    events completed by it; an incomplete frame stays buffered for the next
    call. Only the unparsed remainder is ever copied, so the cost is linear in
    the bytes fed whatever the chunking. A length prefix above
    ``max_frame_bytes`` is rejected before anything is allocated for it: the
    reader returns an ``OP_ERROR`` event and ignores all later input.
    """

    __slots__ = ("_started", "_detached")

    def __init__(self, max_frame_bytes: int = 1 << 20) -> None:
        super().__init__(max_frame_bytes)
        self._started = False                    # the first frame's command has been seen
        self._detached = False                   # stopped at a first-frame HEL (see detach)

    def feed(self, data) -> list:
        if self._detached:
            if not self._broken:
                self._buf += data  # everything after HEL belongs to the v1 reader
            return []
        return super().feed(data)

    def detach(self) -> bytes:
        """After OP_HEL: every byte from the HEL frame on, for the v1 reader.

        A first frame of type ``HEL`` opts the connection into protocol v1;
        the reader stops in front of it. The reader is finished afterwards.
        """
        if not self._detached:
            raise RuntimeError("detach() is only possible after an OP_HEL event")
        rest = bytes(self._buf)
        self._buf.clear()
        self._detached = False
        self._broken = True
        return rest

    def _scan(self, data: bytes, events: list) -> int:
        """Parse whole frames from ``data``; return bytes consumed."""
        end = len(data)
        limit = self.max_frame_bytes
        pos = 0
        pub_topic = None   # topic of the PUB event being coalesced
        pub_msgs = None    # its message list
        while end - pos >= 4:
            n = _unpack_u32(data, pos)[0]
            if n == 0:
                events.append((OP_CLOSE, None, None))
                pos += 4
                self._broken = True  # nothing after a close is read
                return pos
            if n > limit:
                events.append((OP_ERROR, "frame length %d exceeds limit %d" % (n, limit), None))
                self._broken = True
                return pos
            start = pos + 4
            if not self._started:
                if n >= 3 and end - pos < 7:
                    self._need = 7
                    return pos
                self._started = True
                if n >= 3 and data[start:start + 3] == b"HEL":
                    events.append((OP_HEL, None, None))
                    self._detached = True
                    return pos
            is_pub = n >= 3 and data[start:start + 3] == b"PUB"
            total = 4 + n + (4 if is_pub else 0)
            if end - pos < total:
                self._need = total
                return pos
            body = data[start:start + n]
            pos += total
            if is_pub:
                if n == 3 or body[3] != 0x20:
                    events.append((OP_MALFORMED, b"PUB", "PUB needs a topic and a message"))
                    pub_topic = None
                    continue
                sp = body.find(b" ", 4)
                if sp < 0 or sp == 4:
                    events.append((OP_MALFORMED, b"PUB", "PUB needs a topic and a message"))
                    pub_topic = None
                    continue
                topic = body[4:sp]
                msg = body[sp + 1:]
                if zlib.crc32(msg) != _unpack_u32(data, start + n)[0]:
                    events.append((OP_BADCRC, topic, len(msg)))
                    pub_topic = None
                    continue
                if pub_topic is not None and topic == pub_topic:
                    pub_msgs.append(msg)
                else:
                    pub_topic = topic
                    pub_msgs = [msg]
                    events.append((OP_PUB, topic, pub_msgs))
                continue
            pub_topic = None
            self._command(body, events)
        self._need = 4
        return pos

    @staticmethod
    def _command(body: bytes, events: list) -> None:
        cmd = body[:3]
        if len(body) > 3 and body[3] != 0x20:
            events.append((OP_UNKNOWN, body[:16], None))
            return
        arg = body[4:]
        if cmd == b"PNG":
            events.append((OP_PNG, None, None))
        elif cmd == b"REG":
            events.append((OP_REG, None, None))
        elif cmd == b"CID":
            if arg:
                events.append((OP_CID, arg, None))
            else:
                events.append((OP_MALFORMED, cmd, "CID needs a client id"))
        elif cmd == b"SUB":
            if arg:
                events.append((OP_SUB, arg, None))
            else:
                events.append((OP_MALFORMED, cmd, "SUB needs a topic"))
        elif cmd == b"SET":
            sp = arg.find(b" ")
            if sp <= 0 or sp == len(arg) - 1:
                events.append((OP_MALFORMED, cmd, "SET needs a topic and an offset"))
            else:
                events.append((OP_SET, arg[:sp], arg[sp + 1:]))
        else:
            events.append((OP_UNKNOWN, body[:16], None))


def encode_frame(body) -> bytes:
    """``[u32 len][body]``: a reply frame (the REG id) or any v0 frame."""
    return _pack_u32(len(body)) + bytes(body)


def encode_pub(topic, message) -> bytes:
    """A client's v0 PUB frame: ``[u32 len]["PUB topic message"][u32 crc]``."""
    body = b"PUB " + bytes(topic) + b" " + bytes(message)
    return _pack_u32(len(body)) + body + _pack_u32(zlib.crc32(message))


def encode_deliveries(topic, messages) -> bytes:
    """Frame a batch of v0 deliveries: ``[u32 len]["topic message"]`` each."""
    prefix = bytes(topic) + b" "
    plen = len(prefix)
    parts = []
    append = parts.append
    for msg in messages:
        append(_pack_u32(plen + len(msg)))
        append(prefix)
        append(msg)
    return b"".join(parts)
