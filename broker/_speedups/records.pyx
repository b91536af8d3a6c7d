# cython: language_level=3
"""Log record format, Cython twin of ``broker/_pure/records.py``.

Same names, signatures, results and exceptions as the pure module, which is
the reference (see its docstring for the record layout). Every function
takes one buffer through the buffer protocol and walks its records in C:
Python runs once per call, plus once per record only where the result is a
Python object per record (``decode_records``).

Integer arguments must be ints (anything with ``__index__``). Offsets are
compared exactly over the whole u64 range, however large or negative the
Python ints passed in are.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.number cimport PyNumber_Index
from cpython.buffer cimport PyObject_CheckBuffer
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport UINT32_MAX, UINT64_MAX, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from ._crc32 cimport crc32_update, use_crc32_kernel

import struct

__all__ = [
    "HEADER_SIZE", "CorruptRecordError", "encode_records", "scan_records",
    "index_entries", "decode_records", "records_to_deliveries",
]

HEADER_SIZE = RECORD_HEADER_SIZE

# index_entries does its position arithmetic in int64; arguments beyond
# this magnitude go to the pure twin instead (see there).
cdef object _INDEX_ARG_MAX = 1 << 60
cdef object _U64_MAX = UINT64_MAX
cdef object _PY_SSIZE_T_MAX = PY_SSIZE_T_MAX

_u32_range_error = "'I' format requires 0 <= number <= %d" % UINT32_MAX


class CorruptRecordError(ValueError):
    """A record failed its CRC or offset check where a valid one must be."""

    def __init__(self, position, reason):
        super().__init__("corrupt record at byte %d: %s" % (position, reason))
        self.position = position  # byte position of the bad record in the buffer
        self.reason = reason      # what was wrong with it


cdef inline bytes _make_bytes(const unsigned char* p, Py_ssize_t n):
    return PyBytes_FromStringAndSize(<const char*>p, n)


cdef struct Threshold:
    # ``offset >= value`` for a Python int value, on u64 offsets
    uint64_t value    # value clamped to [0, 2**64 - 1]
    bint never        # value > 2**64 - 1: no offset reaches it


cdef inline bint reaches(uint64_t offset, Threshold t) noexcept nogil:
    return not t.never and offset >= t.value


cdef int _threshold(object value, Threshold* t) except -1:
    value = PyNumber_Index(value)
    t.never = value > _U64_MAX
    t.value = 0 if (t.never or value <= 0) else <uint64_t>value
    return 0


cdef Py_ssize_t _start_arg(object start) except -1:
    # The pure twin's struct.unpack_from would read a negative start from
    # the end of the buffer; both twins refuse it instead.
    start = PyNumber_Index(start)
    if start < 0:
        raise ValueError("start must be >= 0")
    if start > _PY_SSIZE_T_MAX:
        return PY_SSIZE_T_MAX  # past any buffer: nothing to read
    return <Py_ssize_t>start


cdef int _u64_field(object value, uint64_t* out) except -1:
    # struct.pack(">Q", value) in the pure twin: struct.error if not an
    # integer or out of range.
    try:
        value = PyNumber_Index(value)
    except TypeError:
        raise struct.error("required argument is not an integer") from None
    if value < 0 or value > _U64_MAX:
        raise struct.error("argument out of range")
    out[0] = <uint64_t>value
    return 0


cdef inline object _bytes_like(object obj):
    # The pure twin calls bytes(topic): accept the same non-buffer objects.
    if PyBytes_CheckExact(obj) or PyObject_CheckBuffer(obj):
        return obj
    return bytes(obj)


def encode_records(messages, base_offset, timestamp_ms):
    """Encode ``messages`` as consecutive records starting at ``base_offset``."""
    cdef tuple items
    cdef Py_ssize_t i, count, mlen
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t pos = 0
    cdef uint64_t base, ts
    cdef Py_buffer view
    cdef object msg
    cdef bytes out
    cdef unsigned char* p
    # A tuple snapshot: two passes over the same items (size, then fill).
    items = messages if type(messages) is tuple else tuple(messages)
    count = len(items)
    if count == 0:
        return b""  # nothing packed, so (like the pure twin) nothing checked
    _u64_field(base_offset, &base)
    _u64_field(timestamp_ms, &ts)
    # Pass 1: size and validate, raising what the pure twin raises for the
    # first bad record (offset overflow, then message type, then length).
    for i in range(count):
        if <uint64_t>i > UINT64_MAX - base:
            raise struct.error("argument out of range")
        msg = items[i]
        if PyBytes_CheckExact(msg):
            mlen = PyBytes_GET_SIZE(msg)
        else:
            PyObject_GetBuffer(msg, &view, PyBUF_SIMPLE)
            mlen = view.len
            PyBuffer_Release(&view)
        if <size_t>mlen > UINT32_MAX - RECORD_MIN_LENGTH:
            raise struct.error(_u32_range_error)
        total += RECORD_HEADER_SIZE + mlen
    # Pass 2: one output object, filled in place.
    out = PyBytes_FromStringAndSize(NULL, total)
    p = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(count):
        msg = items[i]
        if PyBytes_CheckExact(msg):
            pos = _put_record(p, pos, total, base + <uint64_t>i, ts,
                              <const unsigned char*>PyBytes_AS_STRING(msg),
                              PyBytes_GET_SIZE(msg))
        else:
            PyObject_GetBuffer(msg, &view, PyBUF_SIMPLE)
            try:
                pos = _put_record(p, pos, total, base + <uint64_t>i, ts,
                                  <const unsigned char*>view.buf, view.len)
            finally:
                PyBuffer_Release(&view)
    if pos != total:
        raise RuntimeError("message changed size during encode_records()")
    return out


cdef Py_ssize_t _put_record(unsigned char* p, Py_ssize_t pos, Py_ssize_t total,
                            uint64_t offset, uint64_t ts,
                            const unsigned char* msg, Py_ssize_t mlen) except -1:
    # One record at p + pos. The bound check keeps a bytearray resized
    # between the two passes (another thread may run while a large CRC
    # releases the GIL) from overrunning the output.
    cdef unsigned char* rec = p + pos
    if pos + RECORD_HEADER_SIZE + mlen > total:
        raise RuntimeError("message changed size during encode_records()")
    store_be32(rec, <uint32_t>(RECORD_MIN_LENGTH + mlen))
    store_be64(rec + 8, offset)
    store_be64(rec + 16, ts)
    memcpy(rec + RECORD_HEADER_SIZE, msg, <size_t>mlen)
    # CRC over the output's payload, then offset and time: the copy is
    # private, so it is safe to hash without the GIL.
    store_be32(rec + 4, record_crc(rec, <uint32_t>crc32_update(
        0, rec + RECORD_HEADER_SIZE, <size_t>mlen)))
    return pos + RECORD_HEADER_SIZE + mlen


def _use_crc32_kernel(name):
    """Tests only: the record CRCs of this module by ``"zlib"``, or probe again (``None``)."""
    return use_crc32_kernel(name)


def scan_records(buf, expected_offset, start=0):
    """Validate records from ``start``; stop at the first invalid one.

    Returns ``(count, valid_end)``: how many valid records follow ``start``
    with contiguous offsets from ``expected_offset``, and the byte position
    just after the last of them. Recovery truncates a segment to
    ``valid_end``: the longest valid prefix.
    """
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef Py_ssize_t pos, end
    cdef Py_ssize_t count = 0
    cdef uint64_t expected
    cdef bint exhausted = False  # expected went past 2**64 - 1: nothing more can match
    cdef RecordHeader hdr
    pos = _start_arg(start)
    expected_offset = PyNumber_Index(expected_offset)
    if expected_offset < 0:
        raise ValueError("expected_offset must be >= 0")
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if expected_offset > _U64_MAX:
            return 0, start
        expected = <uint64_t>expected_offset
        p = <const unsigned char*>view.buf
        end = view.len
        while end - pos >= RECORD_HEADER_SIZE:
            read_header(p + pos, &hdr)
            # cheapest checks first; the CRC only for a plausible record
            if (hdr.length < RECORD_MIN_LENGTH or hdr.length > end - pos - 4
                    or exhausted or hdr.offset != expected
                    or not crc_matches(p + pos, &hdr)):
                break
            pos += 4 + <Py_ssize_t>hdr.length
            count += 1
            if expected == UINT64_MAX:
                exhausted = True
            else:
                expected += 1
        return count, (pos if count else start)
    finally:
        PyBuffer_Release(&view)


def index_entries(buf, base_position, next_index_position, interval,
                  segment_base_offset):
    """Sparse index entries for the records in ``buf`` (assumed valid).

    ``buf`` is appended to a segment at byte ``base_position``. An entry
    ``[u32 offset - segment_base_offset][u32 position]`` is emitted for each
    record starting at or after ``next_index_position``, after which the
    next one is due ``interval`` bytes later. Returns ``(entries, next)``.
    """
    cdef Py_buffer view
    cdef Py_ssize_t entries
    cdef int64_t args[4]
    cdef bytes out
    cdef object arg
    cdef int k = 0
    for arg in (base_position, next_index_position, interval, segment_base_offset):
        arg = PyNumber_Index(arg)
        if not -_INDEX_ARG_MAX <= arg <= _INDEX_ARG_MAX:
            # Positions this far out are nonsense for a segment (the index
            # stores u32 positions), but the answer must still match the
            # reference exactly; C int64 arithmetic would not, so ask it.
            from broker._pure.records import index_entries as reference
            return reference(buf, base_position, next_index_position, interval,
                             segment_base_offset)
        args[k] = arg
        k += 1
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        # Pass 1 counts (and range-checks) the entries, pass 2 writes them.
        entries = _walk_index(<const unsigned char*>view.buf, view.len, args, NULL)
        out = PyBytes_FromStringAndSize(NULL, entries * 8)
        due = _walk_index(<const unsigned char*>view.buf, view.len, args,
                          <unsigned char*>PyBytes_AS_STRING(out))
        return out, due
    finally:
        PyBuffer_Release(&view)


cdef int64_t _walk_index(const unsigned char* p, Py_ssize_t end, int64_t* args,
                         unsigned char* out) except? -1:
    # args: base_position, next_index_position, interval, segment_base_offset,
    # each within +-2**60 so no sum below overflows. Counting pass
    # (out == NULL) returns the number of entries; the writing pass returns
    # the position the next entry is due at.
    cdef int64_t base = args[0]
    cdef int64_t due = args[1]
    cdef int64_t interval = args[2]
    cdef int64_t seg_base = args[3]
    cdef int64_t where
    cdef Py_ssize_t pos = 0
    cdef int64_t entries = 0
    cdef uint64_t off, rel
    while end - pos >= RECORD_HEADER_SIZE:
        where = base + pos
        if where >= due:
            off = load_be64(p + pos + 8)
            # struct.pack(">II", off - seg_base, where) in the pure twin
            if seg_base >= 0:
                if off < <uint64_t>seg_base or off - <uint64_t>seg_base > UINT32_MAX:
                    raise struct.error(_u32_range_error)
                rel = off - <uint64_t>seg_base
            else:
                if <uint64_t>(-seg_base) > UINT32_MAX or off > UINT32_MAX - <uint64_t>(-seg_base):
                    raise struct.error(_u32_range_error)
                rel = off + <uint64_t>(-seg_base)
            if where < 0 or where > UINT32_MAX:
                raise struct.error(_u32_range_error)
            if out != NULL:
                store_be32(out + 8 * entries, <uint32_t>rel)
                store_be32(out + 8 * entries + 4, <uint32_t>where)
            entries += 1
            due = where + interval
        # assumed valid, but never loops forever: pos advances >= 4 bytes
        pos += 4 + <Py_ssize_t>load_be32(p + pos)
    return entries if out == NULL else due


def decode_records(buf, from_offset, end_offset, start=0):
    """Decode valid records with ``from_offset <= offset < end_offset``.

    ``buf[start:]`` must begin at a record boundary. Returns
    ``(records, position)`` where records is a list of
    ``(offset, time_ms, payload)`` and position is where decoding stopped
    (an incomplete record, ``end_offset`` reached, or the end of ``buf``).
    A complete record that fails its checks raises :class:`CorruptRecordError`.
    """
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef Py_ssize_t pos, end
    cdef Threshold lo, hi
    cdef RecordHeader hdr
    cdef list out = []
    cdef Py_ssize_t start_c = _start_arg(start)
    pos = start_c
    _threshold(from_offset, &lo)
    _threshold(end_offset, &hi)
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        end = view.len
        while end - pos >= RECORD_HEADER_SIZE:
            read_header(p + pos, &hdr)
            if hdr.length < RECORD_MIN_LENGTH:
                raise CorruptRecordError(pos, "length %d below minimum" % hdr.length)
            if hdr.length > end - pos - 4 or reaches(hdr.offset, hi):
                break
            if not crc_matches(p + pos, &hdr):
                raise CorruptRecordError(pos, "checksum mismatch")
            if reaches(hdr.offset, lo):
                out.append((hdr.offset, hdr.time,
                            _make_bytes(p + pos + RECORD_HEADER_SIZE,
                                        hdr.length - RECORD_MIN_LENGTH)))
            pos += 4 + <Py_ssize_t>hdr.length
        return out, (pos if pos != start_c else start)
    finally:
        PyBuffer_Release(&view)


def records_to_deliveries(buf, topic, from_offset, end_offset, max_bytes, start=0, verify=True):
    """Turn stored records into v0 delivery frames, verifying each CRC.

    Like :func:`decode_records`, but the output is the bytes to write to a
    v0 consumer: ``[u32 len]["topic payload"]`` per record with
    ``from_offset <= offset < end_offset``, stopping before the output
    would exceed ``max_bytes`` (at least one record is always taken).
    Returns ``(frames, count, next_offset, position)``: next_offset is the
    offset after the last record consumed (delivered or skipped) and
    ``from_offset`` when none was.
    """
    cdef Py_buffer view
    cdef Py_buffer tview
    cdef const unsigned char* p
    cdef unsigned char* w
    cdef Py_ssize_t pos, end, stop, plen, n, limit
    cdef Py_ssize_t size = 0
    cdef Py_ssize_t count = 0
    cdef Threshold lo, hi
    cdef RecordHeader hdr
    cdef bint consumed = False
    cdef uint64_t last = 0
    cdef bytes out
    cdef Py_ssize_t start_c = _start_arg(start)
    cdef bint check = bool(verify)
    pos = start_c
    _threshold(from_offset, &lo)
    _threshold(end_offset, &hi)
    max_bytes = PyNumber_Index(max_bytes)
    # Sizes are Py_ssize_t: clamping changes no comparison against them.
    limit = -1 if max_bytes < 0 else (<Py_ssize_t>max_bytes
                                       if max_bytes < _PY_SSIZE_T_MAX
                                       else PY_SSIZE_T_MAX)
    topic = _bytes_like(topic)
    PyObject_GetBuffer(topic, &tview, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            p = <const unsigned char*>view.buf
            end = view.len
            plen = tview.len + 1
            # Pass 1: validate and pick the records, summing the output size.
            while end - pos >= RECORD_HEADER_SIZE:
                read_header(p + pos, &hdr)
                if hdr.length < RECORD_MIN_LENGTH:
                    raise CorruptRecordError(pos, "length %d below minimum" % hdr.length)
                if hdr.length > end - pos - 4 or reaches(hdr.offset, hi):
                    break
                if check and not crc_matches(p + pos, &hdr):
                    raise CorruptRecordError(pos, "checksum mismatch")
                if reaches(hdr.offset, lo):
                    n = hdr.length - RECORD_MIN_LENGTH
                    if count and size + 4 + plen + n > limit:
                        break
                    if <size_t>(plen + n) > UINT32_MAX:
                        raise struct.error(_u32_range_error)
                    size += 4 + plen + n
                    count += 1
                consumed = True
                last = hdr.offset
                pos += 4 + <Py_ssize_t>hdr.length
            stop = pos
            # Pass 2: copy the picked records into one bytes object. The
            # buffer is held (immutable for the duration), so the headers
            # read the same as in pass 1.
            out = PyBytes_FromStringAndSize(NULL, size)
            w = <unsigned char*>PyBytes_AS_STRING(out)
            pos = start_c
            while pos < stop:
                read_header(p + pos, &hdr)
                if reaches(hdr.offset, lo):
                    n = hdr.length - RECORD_MIN_LENGTH
                    store_be32(w, <uint32_t>(plen + n))
                    memcpy(w + 4, tview.buf, <size_t>tview.len)
                    w[4 + tview.len] = b' '
                    memcpy(w + 4 + plen, p + pos + RECORD_HEADER_SIZE, <size_t>n)
                    w += 4 + plen + n
                pos += 4 + <Py_ssize_t>hdr.length
        finally:
            PyBuffer_Release(&view)
    finally:
        PyBuffer_Release(&tview)
    if not consumed:
        return out, count, from_offset, (stop if stop != start_c else start)
    # Python ints: last + 1 may be 2**64, and from_offset any int.
    return out, count, max(<object>last + 1, from_offset), stop
