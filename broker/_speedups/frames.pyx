# cython: language_level=3
"""Wire framing, Cython twin of ``broker/_pure/frames.py``.

Same names, signatures, events and bytes as the pure module, which is the
reference (see its docstring for the protocol). What differs is where the
work happens: frames are parsed straight from the caller's buffer, message
bytes are cut with one ``PyBytes_FromStringAndSize`` each and CRCs go to
C (``crc32_clmul.h``: PCLMULQDQ where the CPU has it, else zlib), so
Python-level work is per event, not per byte.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_SIMPLE, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.long cimport PyLong_AsUnsignedLongMask
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport UINT32_MAX, int64_t, uint32_t
from libc.string cimport memchr, memcmp, memcpy

from ._crc32 cimport crc32_accelerated, crc32_update

import struct

__all__ = [
    "OP_CLOSE", "OP_REG", "OP_CID", "OP_SUB", "OP_SET", "OP_PUB", "OP_PNG",
    "OP_BADCRC", "OP_UNKNOWN", "OP_MALFORMED", "OP_ERROR", "OP_HEL",
    "CRC32_KERNEL", "FrameReader", "crc32", "encode_frame", "encode_pub", "encode_deliveries",
]

# Plain ints with the pure module's values (see its table for the tuples).
OP_CLOSE = EV_CLOSE
OP_REG = EV_REG
OP_CID = EV_CID
OP_SUB = EV_SUB
OP_SET = EV_SET
OP_PUB = EV_PUB
OP_PNG = EV_PNG
OP_BADCRC = EV_BADCRC
OP_UNKNOWN = EV_UNKNOWN
OP_MALFORMED = EV_MALFORMED
OP_ERROR = EV_ERROR
OP_HEL = EV_HEL

cdef enum:
    # Below this capacity the carry buffer is kept between frames; above it,
    # it is freed once empty so an idle connection that once received a big
    # frame does not pin max_frame_bytes of memory.
    KEEP_CAPACITY = 65536
    MIN_CAPACITY = 256

# Events without per-frame data are immutable: build them once.
cdef tuple _CLOSE_EVENT = (EV_CLOSE, None, None)
cdef tuple _REG_EVENT = (EV_REG, None, None)
cdef tuple _PNG_EVENT = (EV_PNG, None, None)
cdef tuple _HEL_EVENT = (EV_HEL, None, None)
cdef tuple _PUB_MALFORMED = (EV_MALFORMED, b"PUB", "PUB needs a topic and a message")
cdef tuple _CID_MALFORMED = (EV_MALFORMED, b"CID", "CID needs a client id")
cdef tuple _SUB_MALFORMED = (EV_MALFORMED, b"SUB", "SUB needs a topic")
cdef tuple _SET_MALFORMED = (EV_MALFORMED, b"SET", "SET needs a topic and an offset")

_u32_range_error = "'I' format requires 0 <= number <= %d" % UINT32_MAX


cdef inline uint32_t load_be32(const unsigned char* p) noexcept nogil:
    # gcc turns this into one load + bswap (movbe)
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16)
            | (<uint32_t>p[2] << 8) | <uint32_t>p[3])


cdef inline void store_be32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline bytes _make_bytes(const unsigned char* p, Py_ssize_t n):
    return PyBytes_FromStringAndSize(<const char*>p, n)


cdef inline object _bytes_like(object obj):
    # The pure twin calls bytes(obj) on topics and bodies; for non-buffer
    # objects (a list of ints...) do the same so both accept the same input.
    if PyBytes_CheckExact(obj) or PyObject_CheckBuffer(obj):
        return obj
    return bytes(obj)


cdef inline int _check_u32(Py_ssize_t n) except -1:
    # struct.pack(">I") in the pure twin raises struct.error past 4 GiB
    if <size_t>n > UINT32_MAX:
        raise struct.error(_u32_range_error)
    return 0


cdef int64_t _clamp_limit(object value) except? -2:
    # Body lengths are u32: a limit >= 2**32 - 1 never triggers and a
    # negative one always does. int() floors positive floats, which gives
    # the same answer as the pure twin's ``n > value`` for integer n.
    if value >= UINT32_MAX:
        return UINT32_MAX
    if value < 0:
        return -1
    return <int64_t>int(value)


@cython.final
@cython.auto_pickle(False)
cdef class FrameReader:
    """Incremental v0 frame scanner.

    ``feed(data)`` accepts any chunk of the stream and returns the list of
    events completed by it; an incomplete frame stays buffered for the next
    call. Only the unparsed remainder is ever copied, so the cost is linear in
    the bytes fed whatever the chunking. A length prefix above
    ``max_frame_bytes`` is rejected before anything is allocated for it: the
    reader returns an ``OP_ERROR`` event and ignores all later input.
    """

    def __init__(self, max_frame_bytes=1 << 20):
        if max_frame_bytes < 16:
            raise ValueError("max_frame_bytes must be at least 16")
        self._max_frame_bytes = max_frame_bytes
        self._limit = _clamp_limit(max_frame_bytes)

    def __dealloc__(self):
        PyMem_Free(self._buf)

    @property
    def max_frame_bytes(self):
        """Largest frame body accepted (the PUB trailer not counted)."""
        return self._max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value):
        # Writable like the pure twin's attribute, and likewise unchecked.
        self._limit = _clamp_limit(value)
        self._max_frame_bytes = value

    @property
    def buffered(self):
        """Bytes held waiting for the rest of their frame."""
        return self._len

    @property
    def broken(self):
        """True once a framing error was reported; input is then ignored."""
        return self._broken

    def feed(self, data):
        """Parse ``data`` (any bytes-like chunk); return the completed events."""
        cdef Py_buffer view
        cdef list events
        if self._broken:
            return []
        if self._detached:
            self._carry(data)
            return []
        if self._busy:
            # Only possible from another thread while a large CRC runs
            # without the GIL; the carry buffer must not move under it.
            raise RuntimeError("FrameReader.feed() called concurrently")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        self._busy = True
        try:
            events = []
            self._feed(<const unsigned char*>view.buf, view.len, events)
            return events
        finally:
            self._busy = False
            # Coalescing never spans feed() calls, and the events list must
            # not be kept alive by the reader.
            self._pub_topic = None
            self._pub_msgs = None
            if self._broken or (self._len == 0 and self._cap > KEEP_CAPACITY):
                PyMem_Free(self._buf)
                self._buf = NULL
                self._len = self._cap = 0
            PyBuffer_Release(&view)

    def detach(self):
        """After OP_HEL: every byte from the HEL frame on, for the v1 reader.

        The reader is finished afterwards (``broken``).
        """
        cdef bytes rest
        if not self._detached:
            raise RuntimeError("detach() is only possible after an OP_HEL event")
        if self._busy:
            raise RuntimeError("FrameReader.detach() called during feed()")
        rest = _make_bytes(self._buf, self._len)
        PyMem_Free(self._buf)
        self._buf = NULL
        self._len = self._cap = 0
        self._detached = False
        self._broken = True
        return rest

    cdef int _carry(self, data) except -1:
        # Detached: keep everything for detach(), parse nothing.
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._keep(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef int _keep(self, const unsigned char* data, Py_ssize_t size) except -1:
        # Append to the carry buffer with no frame to bound it (after HEL).
        self._reserve(self._len + size, PY_SSIZE_T_MAX)
        memcpy(self._buf + self._len, data, <size_t>size)
        self._len += size
        return 0

    cdef int _reserve(self, Py_ssize_t size, Py_ssize_t bound) except -1:
        # Grow to hold ``size`` bytes by doubling, so input arriving in many
        # chunks is copied in linear time, but not past ``bound`` (the
        # carried frame's known size): memory follows the bytes actually
        # received, not what a length prefix claims (a 4-byte prefix must
        # not make us allocate a whole frame).
        cdef Py_ssize_t cap
        cdef unsigned char* grown
        if size <= self._cap:
            return 0
        cap = 2 * self._cap
        if cap > bound:
            cap = bound
        if cap < MIN_CAPACITY:
            cap = MIN_CAPACITY
        if cap < size:
            cap = size
        grown = <unsigned char*>PyMem_Realloc(self._buf, <size_t>cap)
        if grown == NULL:
            raise MemoryError()
        self._buf = grown
        self._cap = cap
        return 0

    cdef int _feed(self, const unsigned char* data, Py_ssize_t size,
                   list events) except -1:
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t take, used
        if self._len:
            # Finish the carried frame by copying only the bytes it still
            # needs. _need is a lower bound that grows as the header
            # arrives (prefix, then body length, then the PUB trailer), so
            # loop until _scan consumes the frame or breaks the reader.
            while True:
                if self._len < self._need:
                    take = self._need - self._len
                    if take > size - pos:
                        take = size - pos
                    # +4: room for a PUB trailer not seen yet
                    self._reserve(self._len + take, self._need + 4)
                    memcpy(self._buf + self._len, data + pos, <size_t>take)
                    self._len += take
                    pos += take
                    if self._len < self._need:
                        return 0  # the chunk ended inside the frame
                used = self._scan(self._buf, self._len, events)
                if self._broken:
                    self._len = 0
                    return 0
                if self._detached:
                    # Stopped at HEL: keep the carry and the rest of the chunk.
                    self._keep(data + pos, size - pos)
                    return 0
                if used:
                    # the buffer held exactly this one frame
                    self._len = 0
                    break
        # Zero-copy fast path: parse straight from the caller's chunk.
        pos += self._scan(data + pos, size - pos, events)
        if self._broken:
            return 0
        if pos < size:
            # Carry the incomplete frame: only its bytes, never the size
            # its prefix announces (after HEL: everything that is left).
            self._keep(data + pos, size - pos)
        return 0

    cdef Py_ssize_t _scan(self, const unsigned char* data, Py_ssize_t end,
                          list events) except -1:
        """Parse whole frames from ``data[:end]``; return bytes consumed."""
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t total
        cdef uint32_t n
        cdef const unsigned char* body
        while end - pos >= 4:
            n = load_be32(data + pos)
            if n == 0:
                events.append(_CLOSE_EVENT)
                self._broken = True  # nothing after a close is read
                return pos + 4
            if n > self._limit:
                events.append((EV_ERROR, "frame length %d exceeds limit %d"
                               % (n, self._max_frame_bytes), None))
                self._broken = True
                return pos
            body = data + pos + 4
            total = 4 + <Py_ssize_t>n
            if not self._started:
                # A first frame of type HEL opts into protocol v1: stop in
                # front of it so its bytes and all after go to the v1 reader.
                if n >= 3 and end - pos < 7:
                    self._need = 7
                    return pos
                self._started = True
                if n >= 3 and body[0] == b'H' and body[1] == b'E' and body[2] == b'L':
                    events.append(_HEL_EVENT)
                    self._detached = True
                    return pos
            # A body starting with "PUB" has a CRC trailer. Until its first
            # three bytes are here we can't tell, but then the frame is
            # incomplete anyway and _need (4 + n) is still a lower bound.
            if (n >= 3 and end - pos >= 7 and body[0] == b'P'
                    and body[1] == b'U' and body[2] == b'B'):
                total += 4
                if end - pos < total:
                    self._need = total
                    return pos
                self._pub(body, n, events)
            else:
                if end - pos < total:
                    self._need = total
                    return pos
                self._pub_topic = None  # any other event breaks coalescing
                self._command(body, n, events)
            pos += total
        self._need = 4
        return pos

    cdef int _pub(self, const unsigned char* body, Py_ssize_t n,
                  list events) except -1:
        # body[:n] starts with "PUB"; its CRC trailer is at body[n:n + 4].
        cdef const unsigned char* topic = body + 4
        cdef const unsigned char* sp
        cdef Py_ssize_t tlen, mlen
        cdef bytes current = self._pub_topic
        if n == 3 or body[3] != b' ':
            events.append(_PUB_MALFORMED)
            self._pub_topic = None
            return 0
        if current is not None:
            # Fast path, the common case of a producer's burst: the topic of
            # the batch being coalesced, followed by a space. That topic has
            # no spaces, so that space is the first one: the general path
            # would find the same split, without the memchr.
            tlen = PyBytes_GET_SIZE(current)
            if (n > 4 + tlen and topic[tlen] == b' '
                    and memcmp(topic, PyBytes_AS_STRING(current), <size_t>tlen) == 0):
                mlen = n - 5 - tlen
                if self._crc_ok(topic + tlen + 1, mlen, body + n):
                    self._pub_msgs.append(_make_bytes(topic + tlen + 1, mlen))
                else:
                    events.append((EV_BADCRC, current, mlen))
                    self._pub_topic = None
                return 0
        sp = <const unsigned char*>memchr(topic, b' ', <size_t>(n - 4))
        if sp == NULL or sp == topic:
            events.append(_PUB_MALFORMED)
            self._pub_topic = None
            return 0
        tlen = sp - topic
        mlen = n - 5 - tlen
        if not self._crc_ok(sp + 1, mlen, body + n):
            events.append((EV_BADCRC, _make_bytes(topic, tlen), mlen))
            self._pub_topic = None
            return 0
        current = _make_bytes(topic, tlen)
        self._pub_topic = current
        self._pub_msgs = [_make_bytes(sp + 1, mlen)]
        events.append((EV_PUB, current, self._pub_msgs))
        return 0

    cdef inline bint _crc_ok(self, const unsigned char* msg, Py_ssize_t mlen,
                             const unsigned char* trailer) noexcept:
        return crc32_update(0, msg, <size_t>mlen) == load_be32(trailer)

    cdef int _command(self, const unsigned char* body, Py_ssize_t n,
                      list events) except -1:
        # Every frame but PUB: 3-letter command, then " " and arguments.
        cdef const unsigned char* arg = body + 4
        cdef Py_ssize_t alen = n - 4 if n > 4 else 0
        cdef const unsigned char* sp
        if n < 3 or (n > 3 and body[3] != b' '):
            events.append((EV_UNKNOWN, _make_bytes(body, n if n < 16 else 16), None))
        elif memcmp(body, b"PNG", 3) == 0:
            events.append(_PNG_EVENT)
        elif memcmp(body, b"REG", 3) == 0:
            events.append(_REG_EVENT)
        elif memcmp(body, b"CID", 3) == 0:
            if alen:
                events.append((EV_CID, _make_bytes(arg, alen), None))
            else:
                events.append(_CID_MALFORMED)
        elif memcmp(body, b"SUB", 3) == 0:
            if alen:
                events.append((EV_SUB, _make_bytes(arg, alen), None))
            else:
                events.append(_SUB_MALFORMED)
        elif memcmp(body, b"SET", 3) == 0:
            sp = <const unsigned char*>memchr(arg, b' ', <size_t>alen)
            if sp == NULL or sp == arg or sp == arg + alen - 1:
                events.append(_SET_MALFORMED)
            else:
                events.append((EV_SET, _make_bytes(arg, sp - arg),
                               _make_bytes(sp + 1, arg + alen - sp - 1)))
        else:
            events.append((EV_UNKNOWN, _make_bytes(body, n if n < 16 else 16), None))
        return 0


#: What computes CRC-32 in this process: ``"pclmulqdq"`` (carry-less
#: multiplication, chosen at run time when the CPU has it) or ``"zlib"``.
CRC32_KERNEL = "pclmulqdq" if crc32_accelerated() else "zlib"


def crc32(data, value=0, /):
    """CRC-32 of ``data`` continuing from ``value``, like ``zlib.crc32``."""
    cdef Py_buffer view
    cdef unsigned long crc
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        # zlib.crc32 takes ``value`` bitwise: any int, reduced mod 2**32
        crc = PyLong_AsUnsignedLongMask(value) & UINT32_MAX
        return crc32_update(crc, <const unsigned char*>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)


def encode_frame(body):
    """``[u32 len][body]``: a reply frame (the REG id) or any v0 frame."""
    cdef Py_buffer view
    cdef bytes out
    cdef unsigned char* p
    body = _bytes_like(body)
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        _check_u32(view.len)
        out = PyBytes_FromStringAndSize(NULL, 4 + view.len)
        p = <unsigned char*>PyBytes_AS_STRING(out)
        store_be32(p, <uint32_t>view.len)
        memcpy(p + 4, view.buf, <size_t>view.len)
        return out
    finally:
        PyBuffer_Release(&view)


def encode_pub(topic, message):
    """A client's v0 PUB frame: ``[u32 len]["PUB topic message"][u32 crc]``."""
    cdef Py_buffer tview
    cdef Py_buffer mview
    cdef bytes out
    cdef unsigned char* p
    cdef Py_ssize_t n
    topic = _bytes_like(topic)
    PyObject_GetBuffer(topic, &tview, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(message, &mview, PyBUF_SIMPLE)
        try:
            n = 5 + tview.len + mview.len
            _check_u32(n)
            out = PyBytes_FromStringAndSize(NULL, 8 + n)
            p = <unsigned char*>PyBytes_AS_STRING(out)
            store_be32(p, <uint32_t>n)
            memcpy(p + 4, b"PUB ", 4)
            memcpy(p + 8, tview.buf, <size_t>tview.len)
            p[8 + tview.len] = b' '
            memcpy(p + 9 + tview.len, mview.buf, <size_t>mview.len)
            store_be32(p + 4 + n, <uint32_t>crc32_update(
                0, <const unsigned char*>mview.buf, <size_t>mview.len))
            return out
        finally:
            PyBuffer_Release(&mview)
    finally:
        PyBuffer_Release(&tview)


cdef inline Py_ssize_t _put_delivery(unsigned char* p, Py_ssize_t pos, Py_ssize_t total,
                                     Py_buffer* topic, const unsigned char* msg,
                                     Py_ssize_t mlen) except -1:
    # One "[u32 len][topic message]" frame at p + pos. The bound check is
    # what keeps a bytearray resized between the two passes from
    # overrunning the output.
    cdef Py_ssize_t plen = topic.len + 1
    if pos + 4 + plen + mlen > total:
        raise RuntimeError("message changed size during encode_deliveries()")
    store_be32(p + pos, <uint32_t>(plen + mlen))
    memcpy(p + pos + 4, topic.buf, <size_t>topic.len)
    p[pos + 4 + topic.len] = b' '
    memcpy(p + pos + 4 + plen, msg, <size_t>mlen)
    return pos + 4 + plen + mlen


def encode_deliveries(topic, messages):
    """Frame a batch of v0 deliveries: ``[u32 len]["topic message"]`` each."""
    cdef Py_buffer tview
    cdef Py_buffer mview
    cdef tuple items
    cdef object msg
    cdef Py_ssize_t i, count, plen, mlen
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t pos = 0
    cdef bytes out
    cdef unsigned char* p
    cdef const unsigned char* src
    # A tuple snapshot: two passes over the same items (size, then copy),
    # and any iterable is accepted like in the pure twin.
    items = messages if type(messages) is tuple else tuple(messages)
    count = len(items)
    topic = _bytes_like(topic)
    PyObject_GetBuffer(topic, &tview, PyBUF_SIMPLE)
    try:
        plen = tview.len + 1
        for i in range(count):
            msg = items[i]
            if PyBytes_CheckExact(msg):
                mlen = PyBytes_GET_SIZE(msg)
            else:
                PyObject_GetBuffer(msg, &mview, PyBUF_SIMPLE)
                mlen = mview.len
                PyBuffer_Release(&mview)
            _check_u32(plen + mlen)
            total += 4 + plen + mlen
        out = PyBytes_FromStringAndSize(NULL, total)
        p = <unsigned char*>PyBytes_AS_STRING(out)
        for i in range(count):
            msg = items[i]
            if PyBytes_CheckExact(msg):
                src = <const unsigned char*>PyBytes_AS_STRING(msg)
                mlen = PyBytes_GET_SIZE(msg)
                pos = _put_delivery(p, pos, total, &tview, src, mlen)
            else:
                PyObject_GetBuffer(msg, &mview, PyBUF_SIMPLE)
                try:
                    pos = _put_delivery(p, pos, total, &tview,
                                        <const unsigned char*>mview.buf, mview.len)
                finally:
                    PyBuffer_Release(&mview)
        if pos != total:
            raise RuntimeError("message changed size during encode_deliveries()")
        return out
    finally:
        PyBuffer_Release(&tview)
