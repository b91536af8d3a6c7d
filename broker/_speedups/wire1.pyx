# cython: language_level=3
"""Protocol v1 codec, Cython twin of ``broker/_pure/wire1.py``.

Same names, signatures, results and exceptions as the pure module, which
is the reference (its docstring has the frame layouts). The per-message
work of the hot frames (CRC-32 of every published message, checking and
copying every delivered record) runs in C, once per frame for Python.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE,
)
from cpython.bytearray cimport (
    PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE,
)
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.number cimport PyNumber_Index
from cpython.ref cimport Py_INCREF
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

from ._crc32 cimport CRC_NOGIL_BATCH, crc32, crc32_update, use_crc32_kernel
from .records cimport (
    RECORD_HEADER_SIZE, RECORD_MIN_LENGTH, RecordHeader, crc_matches, load_be32,
    read_header, record_crc, store_be32, store_be64,
)

from .records import CorruptRecordError, decode_records

_U64_MAX = (1 << 64) - 1

__all__ = [
    "V1Reader", "ProtocolError", "KINDS", "K_ERROR", "K_CLOSE", "K_UNKNOWN",
    "encode", "pack_str", "read_str", "encode_publish", "parse_publish", "publish_records",
    "message_frame", "parse_messages", "decode_messages",
]

KINDS = {
    b"HEL": 1, b"PUB": 2, b"SUB": 3, b"UNS": 4, b"CMT": 5, b"SEK": 6, b"PNG": 7,
    b"TOP": 8, b"OFS": 9, b"STA": 10, b"AUT": 11, b"CFG": 12,
    b"RES": 20, b"ACK": 21, b"ERR": 22, b"MSG": 23, b"POG": 24,
}
K_CLOSE = 0
K_UNKNOWN = 30
K_ERROR = 31

FRAME_HEADER = 7

cdef enum:
    _FRAME_HEADER = 7
    _K_CLOSE = 0
    _K_PUB = 2
    _K_MSG = 23
    _K_UNKNOWN = 30
    _K_ERROR = 31


class ProtocolError(ValueError):
    """A v1 payload that does not match its type's layout."""


cdef inline uint32_t _tag(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | <uint32_t>p[2]


cdef int _kind(const unsigned char* p) noexcept nogil:
    # A switch on the 3-byte type, so no bytes object is built per frame.
    cdef uint32_t t = _tag(p)
    if t == 0x505542: return 2    # PUB
    if t == 0x4d5347: return 23   # MSG
    if t == 0x41434b: return 21   # ACK
    if t == 0x524553: return 20   # RES
    if t == 0x434d54: return 5    # CMT
    if t == 0x504e47: return 7    # PNG
    if t == 0x504f47: return 24   # POG
    if t == 0x48454c: return 1    # HEL
    if t == 0x535542: return 3    # SUB
    if t == 0x554e53: return 4    # UNS
    if t == 0x53454b: return 6    # SEK
    if t == 0x544f50: return 8    # TOP
    if t == 0x4f4653: return 9    # OFS
    if t == 0x535441: return 10   # STA
    if t == 0x455252: return 22   # ERR
    if t == 0x415554: return 11   # AUT
    if t == 0x434647: return 12   # CFG
    return -1


cdef enum:
    # A frame at least this big that arrives in pieces is copied straight
    # into its final payload object as they come, instead of accumulating
    # in the reader's buffer (which grows by realloc and is shifted after
    # each frame): every byte of a large PUB is copied once here.
    _DIRECT_MIN = 65536


@cython.final
cdef class V1Reader:
    """Incremental v1 frame splitter: ``feed(data)`` -> ``[(kind, rid, payload)]``.

    A payload is bytes, except that a ``PUB`` or ``MSG`` frame lying whole
    in a ``bytes`` chunk comes as a read-only memoryview of that chunk (the
    bulk kinds: no copy; see the pure twin).
    """

    cdef readonly Py_ssize_t max_frame_bytes
    cdef bytearray _buf
    cdef Py_ssize_t _need
    cdef bint _broken
    # The large frame being filled in place (see _DIRECT_MIN), if any.
    cdef object _big          # its payload: a bytes object nobody else has seen yet
    cdef Py_ssize_t _big_fill  # payload bytes filled so far
    cdef int _big_kind
    cdef uint32_t _big_rid

    def __init__(self, Py_ssize_t max_frame_bytes=1 << 20):
        if max_frame_bytes < 16:
            raise ValueError("max_frame_bytes must be at least 16")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._need = 0
        self._broken = False
        self._big = None
        self._big_fill = 0

    @property
    def buffered(self):
        if self._big is not None:
            return 4 + _FRAME_HEADER + self._big_fill
        return len(self._buf)

    @property
    def broken(self):
        return self._broken

    def feed(self, data):
        cdef Py_buffer view
        cdef list events
        cdef Py_ssize_t pos, n
        if self._broken:
            return []
        events = []
        buf = self._buf
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            pos = 0
            if self._big is not None:
                pos = self._fill(<const unsigned char*>view.buf, view.len, events)
                if pos == view.len:
                    return events
            if PyByteArray_GET_SIZE(buf):
                buf += (<const char*>view.buf)[pos:view.len]
                n = PyByteArray_GET_SIZE(buf)
                if n < self._need:
                    return events
                # Scanning a bytearray we then resize: scan first, resize after.
                pos = self._scan(<const unsigned char*>PyByteArray_AS_STRING(buf), n, events)
                if self._broken or pos == n:
                    del buf[:]
                else:
                    del buf[:pos]
                return events
            # Zero-copy path: parse straight from the chunk, keep only the tail
            # (and a PUB or MSG payload is a view of the chunk, when it is bytes).
            pos += self._scan(<const unsigned char*>view.buf + pos, view.len - pos, events,
                              data if PyBytes_CheckExact(data) else None, pos)
            if not self._broken and pos < view.len:
                buf += (<const char*>view.buf)[pos:view.len]
        finally:
            PyBuffer_Release(&view)
        return events

    cdef Py_ssize_t _fill(self, const unsigned char* data, Py_ssize_t end,
                          list events) except -1:
        # Copy what this chunk holds of the large frame; emit it when whole.
        cdef Py_ssize_t size = PyBytes_GET_SIZE(self._big)
        cdef Py_ssize_t take = size - self._big_fill
        if take > end:
            take = end
        memcpy(PyBytes_AS_STRING(self._big) + self._big_fill, data, take)
        self._big_fill += take
        if self._big_fill == size:
            events.append((self._big_kind, self._big_rid, self._big))
            self._big = None
            self._big_fill = 0
            self._need = 4
        return take

    cdef Py_ssize_t _scan(self, const unsigned char* data, Py_ssize_t end, list events,
                          object chunk=None, Py_ssize_t base=0) except -1:
        # ``chunk``: the bytes object ``data`` points into, at ``base`` (None
        # when ``data`` is the reader's own buffer, which changes): the bulk
        # kinds' payloads are then views of it instead of copies.
        cdef Py_ssize_t pos = 0, have, start
        cdef uint32_t n, rid
        cdef int kind
        cdef Py_ssize_t limit = self.max_frame_bytes
        cdef object whole = None
        while end - pos >= 4:
            n = load_be32(data + pos)
            if n == 0:
                events.append((_K_CLOSE, 0, b""))
                self._broken = True
                return pos + 4
            if n > limit:
                events.append((_K_ERROR, 0, "frame length %d exceeds limit %d" % (n, limit)))
                self._broken = True
                return pos
            if n < _FRAME_HEADER:
                events.append((_K_ERROR, 0, "frame length %d is below the v1 minimum %d"
                               % (n, _FRAME_HEADER)))
                self._broken = True
                return pos
            if end - pos < 4 + <Py_ssize_t>n:
                # Only once a good part of it is here: a header alone does
                # not make us allocate the whole frame.
                if n >= _DIRECT_MIN and end - pos >= 4 + _FRAME_HEADER + _DIRECT_MIN // 2:
                    kind = _kind(data + pos + 4)
                    if kind >= 0:
                        # Large and incomplete: fill its payload in place from now on.
                        have = end - pos - 4 - _FRAME_HEADER
                        self._big = PyBytes_FromStringAndSize(NULL, n - _FRAME_HEADER)
                        memcpy(PyBytes_AS_STRING(self._big), data + pos + 4 + _FRAME_HEADER, have)
                        self._big_fill = have
                        self._big_kind = kind
                        self._big_rid = load_be32(data + pos + 7)
                        self._need = 0
                        return end
                self._need = 4 + n
                return pos
            kind = _kind(data + pos + 4)
            rid = load_be32(data + pos + 7)
            if kind < 0:
                events.append((_K_UNKNOWN, rid,
                               PyBytes_FromStringAndSize(<const char*>data + pos + 4, 3)))
            elif chunk is not None and (kind == _K_PUB or kind == _K_MSG):
                if whole is None:
                    whole = PyMemoryView_FromObject(chunk)
                start = base + pos + 4 + _FRAME_HEADER
                events.append((kind, rid, whole[start:start + n - _FRAME_HEADER]))
            else:
                events.append((kind, rid, PyBytes_FromStringAndSize(
                    <const char*>data + pos + 4 + _FRAME_HEADER, n - _FRAME_HEADER)))
            pos += 4 + n
        self._need = 4
        return pos


cdef inline bytes _bytes(value):
    # Bytes-like objects only: bytes(5) would be five zero bytes, bytes([1, 2]) two.
    return value if type(value) is bytes else bytes(memoryview(value))


cdef Py_ssize_t _str_end(const unsigned char* p, Py_ssize_t end) except -1:
    """Position just after the ``[u16 n][n bytes]`` string at the start of ``p``."""
    cdef Py_ssize_t n
    if end < 2:
        raise ProtocolError("truncated string")
    n = (<Py_ssize_t>p[0] << 8) | p[1]
    if end - 2 < n:
        raise ProtocolError("truncated string")
    return 2 + n


def encode(kind, rid, payload=b""):
    """One v1 frame of ``kind`` (3 bytes) with request id ``rid``."""
    cdef bytes k = _bytes(kind)
    cdef bytes p = _bytes(payload)
    cdef Py_ssize_t n = len(p)
    cdef bytes out
    cdef unsigned char* o
    if len(k) != 3:
        raise ValueError("kind must be 3 bytes")
    if rid < 0 or rid > 0xFFFFFFFF or n + _FRAME_HEADER > 0xFFFFFFFF:
        raise OverflowError("request id or payload out of range")
    out = PyBytes_FromStringAndSize(NULL, 4 + _FRAME_HEADER + n)
    o = <unsigned char*>PyBytes_AS_STRING(out)
    store_be32(o, <uint32_t>(n + _FRAME_HEADER))
    memcpy(o + 4, PyBytes_AS_STRING(k), 3)
    store_be32(o + 7, <uint32_t>rid)
    if n:
        memcpy(o + 11, PyBytes_AS_STRING(p), n)
    return out


def pack_str(value):
    """``[u16 n][n bytes]``; ``value`` is str (UTF-8) or bytes."""
    value = value.encode("utf-8") if isinstance(value, str) else _bytes(value)
    cdef Py_ssize_t n = len(value)
    if n > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return bytes(((n >> 8) & 0xFF, n & 0xFF)) + value


def read_str(payload, Py_ssize_t pos):
    """Read ``[u16 n][n bytes]`` at ``pos``: ``(bytes, position after)``."""
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef Py_ssize_t n
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        if pos < 0 or view.len - pos < 2:
            raise ProtocolError("truncated string")
        n = (<Py_ssize_t>p[pos] << 8) | p[pos + 1]
        if view.len - pos - 2 < n:
            raise ProtocolError("truncated string")
        return PyBytes_FromStringAndSize(<const char*>p + pos + 2, n), pos + 2 + n
    finally:
        PyBuffer_Release(&view)


cdef inline Py_ssize_t _byte_len(object msg) except -1:
    # Bytes, not items: len() of an array('I') or a cast memoryview counts
    # elements. A buffer that is not contiguous raises BufferError here.
    cdef Py_buffer view
    if PyBytes_CheckExact(msg):
        return PyBytes_GET_SIZE(msg)
    PyObject_GetBuffer(msg, &view, PyBUF_SIMPLE)
    n = view.len
    PyBuffer_Release(&view)
    return n


def encode_publish(rid, topic, messages):
    """A whole ``PUB`` frame: ``messages`` to ``topic``, each with its CRC."""
    cdef tuple items
    cdef bytes t, out
    cdef Py_ssize_t i, count, total, tlen, mlen, pos
    cdef Py_buffer view
    cdef unsigned char* o
    t = topic.encode("utf-8") if isinstance(topic, str) else _bytes(topic)
    tlen = len(t)
    if tlen > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    if rid < 0 or rid > 0xFFFFFFFF:
        raise OverflowError("request id out of range")
    items = messages if type(messages) is tuple else tuple(messages)
    count = len(items)
    total = 4 + _FRAME_HEADER + 2 + tlen + 4
    for i in range(count):
        total += 8 + _byte_len(items[i])
    if total - 4 > 0xFFFFFFFF:
        raise OverflowError("frame too large")
    out = PyBytes_FromStringAndSize(NULL, total)
    o = <unsigned char*>PyBytes_AS_STRING(out)
    store_be32(o, <uint32_t>(total - 4))
    memcpy(o + 4, b"PUB", 3)
    store_be32(o + 7, <uint32_t>rid)
    o[11] = <unsigned char>(tlen >> 8)
    o[12] = <unsigned char>tlen
    memcpy(o + 13, PyBytes_AS_STRING(t), tlen)
    pos = 13 + tlen
    store_be32(o + pos, <uint32_t>count)
    pos += 4
    for i in range(count):
        PyObject_GetBuffer(items[i], &view, PyBUF_SIMPLE)
        try:
            mlen = view.len
            if pos + 8 + mlen > total:
                raise RuntimeError("message changed size while encoding")
            store_be32(o + pos, <uint32_t>mlen)
            store_be32(o + pos + 4, <uint32_t>crc32_update(0, <const unsigned char*>view.buf, mlen))
            memcpy(o + pos + 8, view.buf, mlen)
            pos += 8 + mlen
        finally:
            PyBuffer_Release(&view)
    if pos != total:
        raise RuntimeError("message changed size while encoding")
    return out


cdef Py_ssize_t _pub_count(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                           uint32_t* count) except -1:
    # A PUB payload's message count, after the topic (at pos): where the
    # first message starts. Each message needs at least its 8-byte header,
    # so an absurd count is refused before anything is built.
    if end - pos < 4:
        raise ProtocolError("PUB: missing message count")
    count[0] = load_be32(p + pos)
    pos += 4
    if count[0] > <uint32_t>((end - pos) // 8):
        raise ProtocolError("PUB: count %d does not fit the frame" % count[0])
    return pos


cdef bytes _pub_head(const unsigned char* p, Py_ssize_t end, Py_ssize_t* pos,
                     uint32_t* count):
    # A PUB payload's topic; sets its message count and where the first
    # message starts.
    cdef Py_ssize_t tend = _str_end(p, end)
    topic = PyBytes_FromStringAndSize(<const char*>p + 2, tend - 2)
    pos[0] = _pub_count(p, tend, end, count)
    return topic


def parse_publish(payload):
    """Split a ``PUB`` payload: ``(topic, messages, bad_index)``."""
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef Py_ssize_t end, pos, n, i
    cdef uint32_t count, crc
    cdef list messages
    cdef bytes msg, topic
    cdef Py_ssize_t bad = -1
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        end = view.len
        topic = _pub_head(p, end, &pos, &count)
        messages = PyList_New(count)
        for i in range(count):
            if end - pos < 8:
                raise ProtocolError("PUB: truncated message header")
            n = load_be32(p + pos)
            crc = load_be32(p + pos + 4)
            pos += 8
            if end - pos < n:
                raise ProtocolError("PUB: truncated message")
            msg = PyBytes_FromStringAndSize(<const char*>p + pos, n)
            Py_INCREF(msg)
            PyList_SET_ITEM(messages, i, msg)
            if bad < 0 and <uint32_t>crc32_update(0, p + pos, n) != crc:
                bad = i
            pos += n
        if pos != end:
            raise ProtocolError("PUB: %d trailing bytes" % (end - pos))
        return topic, messages, bad
    finally:
        PyBuffer_Release(&view)


cdef Py_ssize_t _copy_records(const unsigned char* p, Py_ssize_t pos, uint32_t count,
                              unsigned char* o, uint64_t base, uint64_t ts) noexcept nogil:
    # PUB items at p + pos (layout already checked) -> finished records at
    # o, offsets base onwards. Returns the index of the first message whose
    # CRC is wrong, or -1.
    cdef uint32_t i, n, crc
    for i in range(count):
        n = load_be32(p + pos)
        crc = load_be32(p + pos + 4)
        pos += 8
        if <uint32_t>crc32(0, p + pos, n) != crc:
            return i
        store_be32(o, <uint32_t>(RECORD_MIN_LENGTH + n))
        store_be64(o + 8, base + i)
        store_be64(o + 16, ts)
        # the checked CRC continued over offset and time: hashed once
        store_be32(o + 4, record_crc(o, crc))
        memcpy(o + RECORD_HEADER_SIZE, p + pos, n)
        o += RECORD_HEADER_SIZE + n
        pos += n
    return -1


def publish_records(payload, base_offset, timestamp_ms):
    """Turn a ``PUB`` payload straight into finished log records (see the pure twin)."""
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef Py_ssize_t end, pos, first, n = 0, bad
    cdef uint32_t count, i
    cdef uint64_t base, ts
    cdef bytes topic
    cdef bytearray out
    cdef unsigned char* o
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        end = view.len
        topic = _pub_head(p, end, &pos, &count)
        base_offset = PyNumber_Index(base_offset)
        timestamp_ms = PyNumber_Index(timestamp_ms)
        if not (0 <= base_offset <= _U64_MAX and 0 <= timestamp_ms <= _U64_MAX) \
                or base_offset + count > _U64_MAX + 1:
            raise ValueError("publish_records: offset or time out of range")
        base = <uint64_t>base_offset
        ts = <uint64_t>timestamp_ms
        first = pos
        for i in range(count):  # the layout first: the same errors as parse_publish
            if end - pos < 8:
                raise ProtocolError("PUB: truncated message header")
            n = load_be32(p + pos)
            pos += 8
            if end - pos < n:
                raise ProtocolError("PUB: truncated message")
            pos += n
        if pos != end:
            raise ProtocolError("PUB: %d trailing bytes" % (end - pos))
        out = PyByteArray_FromStringAndSize(NULL, (end - first)
                                            + (RECORD_HEADER_SIZE - 8) * <Py_ssize_t>count)
        # One pass: check each message's CRC and copy it behind its finished
        # record header. The output is private and the payload held: no GIL
        # needed.
        o = <unsigned char*>PyByteArray_AS_STRING(out)
        if end - first > CRC_NOGIL_BATCH:
            with nogil:
                bad = _copy_records(p, first, count, o, base, ts)
        else:
            bad = _copy_records(p, first, count, o, base, ts)
        if bad >= 0:
            return topic, None, count, bad, 0
        return topic, out, count, -1, (n + RECORD_HEADER_SIZE if count else 0)
    finally:
        PyBuffer_Release(&view)


def _use_crc32_kernel(name):
    """Tests only: the CRCs of this module by ``"zlib"``, or probe again (``None``)."""
    return use_crc32_kernel(name)


def message_frame(buf, rid, topic, from_offset, end_offset, max_bytes, verify=True):
    """A ``MSG`` frame of stored records, forwarded without re-encoding."""
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef Py_ssize_t end, pos = 0, first = -1, size, tlen
    cdef Py_ssize_t count = 0
    cdef RecordHeader hdr
    cdef uint64_t lo, hi, nxt
    cdef Py_ssize_t limit = max_bytes
    cdef bytes t, out
    cdef unsigned char* o
    cdef bint check = bool(verify)
    if from_offset < 0 or end_offset < 0:
        raise ValueError("offsets must be >= 0")
    lo = from_offset
    hi = end_offset
    nxt = lo
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        end = view.len
        while end - pos >= RECORD_HEADER_SIZE:
            read_header(p + pos, &hdr)
            if hdr.length < RECORD_MIN_LENGTH:
                raise CorruptRecordError(pos, "length %d below minimum" % hdr.length)
            if <Py_ssize_t>hdr.length > end - pos - 4 or hdr.offset >= hi:
                break
            if check and not crc_matches(p + pos, &hdr):
                raise CorruptRecordError(pos, "checksum mismatch")
            if hdr.offset >= lo:
                if first < 0:
                    first = pos
                elif pos + 4 + <Py_ssize_t>hdr.length - first > limit:
                    break
                count += 1
            nxt = hdr.offset + 1
            pos += 4 + hdr.length
        if not count:
            return b"", 0, max(<object>nxt, from_offset), pos
        # The topic is checked here, where the pure twin's pack_str checks it.
        t = topic.encode("utf-8") if isinstance(topic, str) else _bytes(topic)
        tlen = len(t)
        if tlen > 0xFFFF:
            raise ValueError("string longer than 65535 bytes")
        size = pos - first
        out = PyBytes_FromStringAndSize(NULL, 4 + _FRAME_HEADER + 2 + tlen + 4 + size)
        o = <unsigned char*>PyBytes_AS_STRING(out)
        store_be32(o, <uint32_t>(_FRAME_HEADER + 2 + tlen + 4 + size))
        memcpy(o + 4, b"MSG", 3)
        store_be32(o + 7, <uint32_t>rid)
        o[11] = <unsigned char>(tlen >> 8)
        o[12] = <unsigned char>tlen
        memcpy(o + 13, PyBytes_AS_STRING(t), tlen)
        store_be32(o + 13 + tlen, <uint32_t>count)
        memcpy(o + 17 + tlen, p + first, size)
        return out, count, <object>nxt, pos
    finally:
        PyBuffer_Release(&view)


def parse_messages(payload):
    """Decode a ``MSG`` payload: ``(topic, [(offset, time_ms, value), ...])``."""
    topic, pos = read_str(payload, 0)
    if len(payload) - pos < 4:
        raise ProtocolError("MSG: missing record count")
    count = int.from_bytes(payload[pos:pos + 4], "big")
    pos += 4
    out, stop = decode_records(payload, 0, (1 << 63) - 1, pos)
    if len(out) != count or stop != len(payload):
        raise CorruptRecordError(stop, "MSG: %d of %d records decoded" % (len(out), count))
    return topic, out


cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)
    int PyObject_GC_IsTracked(object op)


cdef extern from *:
    """
    /* A tuple subclass instance of four items, made the way CPython's
       tuple_subtype_new makes it (tp_alloc, then the items) but without
       the argument tuple and the call through tuple.__new__. Before 3.14
       only: later tuples carry a cached hash that tp_alloc leaves zero. */
    #if PY_VERSION_HEX < 0x030E0000
    #define PLS_DIRECT_TUPLE4 1
    static PyObject* pls_tuple4(PyObject* type, PyObject* a, PyObject* b, PyObject* c,
                                PyObject* d) {
        PyTypeObject* t = (PyTypeObject*)type;
        PyObject* o = t->tp_alloc(t, 4);
        if (o == NULL) return NULL;
        Py_INCREF(a); PyTuple_SET_ITEM(o, 0, a);
        Py_INCREF(b); PyTuple_SET_ITEM(o, 1, b);
        Py_INCREF(c); PyTuple_SET_ITEM(o, 2, c);
        Py_INCREF(d); PyTuple_SET_ITEM(o, 3, d);
        return o;
    }
    #else
    #define PLS_DIRECT_TUPLE4 0
    static PyObject* pls_tuple4(PyObject* type, PyObject* a, PyObject* b, PyObject* c,
                                PyObject* d) {
        PyErr_SetString(PyExc_SystemError, "pls_tuple4 is not available");
        return NULL;
    }
    #endif
    """
    bint PLS_DIRECT_TUPLE4
    object pls_tuple4(object type, object a, object b, object c, object d)


cdef inline bint _atomic(object topic):
    # The other fields are ints and bytes, which hold no references.
    return type(topic) is str or type(topic) is bytes


cdef dict _plain_cache = {}


cdef bint _plain_namedtuple(factory) except -1:
    # A namedtuple class of four fields, as collections.namedtuple and
    # typing.NamedTuple make them: its __new__ does nothing but
    # tuple.__new__(cls, fields), which we can call without the Python
    # frame in between (a third of the decoding time per message).
    cdef object known
    try:
        known = _plain_cache.get(factory)
    except TypeError:  # unhashable: not a class, so not a namedtuple
        return False
    if known is not None:
        return known
    ok = False
    if isinstance(factory, type) and issubclass(factory, tuple):
        new = factory.__dict__.get("__new__")
        new = getattr(new, "__func__", new)  # a staticmethod in the class dict
        fields = factory.__dict__.get("_fields")
        ok = (type(fields) is tuple and len(fields) == 4
              and getattr(new, "__globals__", {}).get("_tuple_new") is tuple.__new__)
    if len(_plain_cache) < 64:
        _plain_cache[factory] = ok
    return ok


def decode_messages(payload, topic, min_offset, factory):
    """Decode a ``MSG`` payload straight into message objects (see the pure twin)."""
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef Py_ssize_t end, pos, n
    cdef uint32_t count, seen = 0
    cdef RecordHeader hdr
    cdef uint64_t nxt
    cdef list out = []
    cdef bint plain = _plain_namedtuple(factory)
    cdef bint direct = plain and PLS_DIRECT_TUPLE4 and (<type>factory).__itemsize__ == sizeof(void*)
    cdef bint untrack = _atomic(topic)
    cdef object value, msg, offset, when = None
    cdef uint64_t last_time = 0
    if min_offset < 0:
        raise ValueError("min_offset must be >= 0")
    nxt = min_offset
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        end = view.len
        pos = _str_end(p, end)
        if end - pos < 4:
            raise ProtocolError("MSG: missing record count")
        count = load_be32(p + pos)
        pos += 4
        while end - pos >= RECORD_HEADER_SIZE:
            read_header(p + pos, &hdr)
            if hdr.length < RECORD_MIN_LENGTH:
                raise CorruptRecordError(pos, "length %d below minimum" % hdr.length)
            if <Py_ssize_t>hdr.length > end - pos - 4:
                break
            if hdr.offset >= <uint64_t>0x7FFFFFFFFFFFFFFF:
                break  # decode_records' end_offset in the pure twin
            if not crc_matches(p + pos, &hdr):
                raise CorruptRecordError(pos, "checksum mismatch")
            if hdr.offset >= nxt:
                value = PyBytes_FromStringAndSize(
                    <const char*>p + pos + RECORD_HEADER_SIZE, hdr.length - RECORD_MIN_LENGTH)
                offset = hdr.offset
                if when is None or hdr.time != last_time:
                    when = hdr.time  # one int object for a batch's shared time
                    last_time = hdr.time
                if plain:
                    if direct:
                        msg = pls_tuple4(factory, topic, offset, when, value)
                    else:
                        msg = tuple.__new__(factory, (topic, offset, when, value))
                    # Like an exact tuple of atomic values, it cannot be part
                    # of a cycle: keep it out of the collector's lists, which
                    # a consumer's buffer of thousands would otherwise fill.
                    if untrack and PyObject_GC_IsTracked(msg):
                        PyObject_GC_UnTrack(<void*>msg)
                    out.append(msg)
                else:
                    out.append(factory(topic, offset, when, value))
                nxt = hdr.offset + 1
            seen += 1
            pos += 4 + hdr.length
        if seen != count or pos != end:
            raise CorruptRecordError(pos, "MSG: %d of %d records decoded" % (seen, count))
        return out, <object>nxt
    finally:
        PyBuffer_Release(&view)
