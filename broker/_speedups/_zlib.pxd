# zlib's CRC-32, shared by frames.pyx and records.pyx (both link with -lz).
#
# Calling the C function directly skips zlib.crc32's argument parsing and
# buffer acquisition, which cost more than the CRC itself for small messages.

cdef extern from "zlib.h" nogil:
    # uLong crc32(uLong crc, const Bytef *buf, uInt len)
    unsigned long crc32(unsigned long crc, const unsigned char* buf, unsigned int len)


cdef enum:
    # Release the GIL only for CRCs over more than this many bytes. zlib
    # 1.2.13 runs at ~1.5-2 GB/s here, so 64 KiB is ~30-40 us of work; below
    # that, dropping and re-taking the GIL (and waking whichever thread wants
    # it, which may keep us waiting for its whole switch interval) costs more
    # than the parallelism can win back. CPython's zlib.crc32 uses 5 KiB.
    CRC_NOGIL_THRESHOLD = 65536
    # zlib takes an unsigned int length: feed larger buffers in 1 GiB steps.
    CRC_MAX_STEP = 1 << 30


cdef inline unsigned long crc32_run(unsigned long crc, const unsigned char* p,
                                    size_t n) noexcept nogil:
    while n > CRC_MAX_STEP:
        crc = crc32(crc, p, CRC_MAX_STEP)
        p += CRC_MAX_STEP
        n -= CRC_MAX_STEP
    return crc32(crc, p, <unsigned int>n)


cdef inline unsigned long crc32_update(unsigned long crc, const unsigned char* p,
                                       size_t n) noexcept:
    """CRC-32 of ``p[:n]`` continuing from ``crc``; called with the GIL held.

    The caller must keep ``p`` alive and unresizable while the GIL is
    released (a held Py_buffer, a bytes object, or a private buffer).
    """
    if n > CRC_NOGIL_THRESHOLD:
        with nogil:
            crc = crc32_run(crc, p, n)
        return crc
    return crc32_run(crc, p, n)
