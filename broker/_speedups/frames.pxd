# C-level declarations of broker/_speedups/frames.pyx, for cimport.

cimport cython
from libc.stdint cimport int64_t


# Event kinds as C constants; frames.pyx exports the same values to Python
# as OP_CLOSE ... OP_ERROR (plain ints, like the pure twin).
cdef enum Event:
    EV_CLOSE = 0
    EV_REG = 1
    EV_CID = 2
    EV_SUB = 3
    EV_SET = 4
    EV_PUB = 5
    EV_PNG = 6
    EV_BADCRC = 7
    EV_UNKNOWN = 8
    EV_MALFORMED = 9
    EV_ERROR = 10
    EV_HEL = 11


@cython.final
cdef class FrameReader:
    cdef object _max_frame_bytes  # the limit as given: returned by the property and quoted in OP_ERROR
    cdef int64_t _limit           # the same limit clamped to [-1, 2**32 - 1] for C comparisons
    cdef unsigned char* _buf      # carried input (PyMem): one incomplete frame, or all input since HEL
    cdef Py_ssize_t _len          # bytes held in _buf
    cdef Py_ssize_t _cap          # bytes allocated for _buf
    cdef Py_ssize_t _need         # size of the carried frame, at least (prefix + body + trailer)
    cdef bint _broken             # set once OP_CLOSE or OP_ERROR is emitted; later input is ignored
    cdef bint _started            # the first frame's command has been seen
    cdef bint _detached           # stopped at a first-frame HEL: input is kept for detach()
    cdef bint _busy               # inside feed(): guards _buf while a large CRC runs without the GIL
    cdef bytes _pub_topic         # topic of the PUB event being coalesced during feed(), else None
    cdef list _pub_msgs           # message list of that event

    cdef int _carry(self, data) except -1
    cdef int _keep(self, const unsigned char* data, Py_ssize_t size) except -1
    cdef int _reserve(self, Py_ssize_t size, Py_ssize_t bound) except -1
    cdef int _feed(self, const unsigned char* data, Py_ssize_t size, list events) except -1
    cdef Py_ssize_t _scan(self, const unsigned char* data, Py_ssize_t end,
                          list events) except -1
    cdef int _pub(self, const unsigned char* body, Py_ssize_t n, list events) except -1
    cdef inline bint _crc_ok(self, const unsigned char* msg, Py_ssize_t mlen,
                             const unsigned char* trailer) noexcept
    cdef int _command(self, const unsigned char* body, Py_ssize_t n, list events) except -1
