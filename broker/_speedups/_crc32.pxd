# CRC-32, shared by frames.pyx, records.pyx and wire1.pyx (all link -lz).
#
# ``crc32`` is zlib's crc32 with a size_t length: crc32_clmul.h folds with
# PCLMULQDQ where the CPU has it (about 9x zlib 1.2.13 on 1 KiB here) and
# calls zlib for the rest. Calling C directly also skips zlib.crc32's
# argument parsing and buffer acquisition, which cost more than the CRC
# itself for small messages.

from libc.stdint cimport uint32_t, uint64_t


cdef extern from "crc32_clmul.h" nogil:
    # zlib's crc32(crc, buf, len) for any size_t len
    unsigned long crc32 "pls_crc32" (unsigned long crc, const unsigned char* buf, size_t len)
    # 1 if this process folds with PCLMULQDQ, else 0
    int crc32_accelerated "pls_crc32_accelerated" ()
    # the probe's result in this module (-1 before the probe); tests force zlib
    int crc32_clmul_flag "pls_crc32_clmul"


cdef enum:
    # Release the GIL only for a CRC over more than this many bytes of one
    # buffer: about 30-70 us of work, with zlib 1.2.13 (~1.5-2 GB/s here)
    # or the PCLMULQDQ fold (~16 GB/s). Below that, dropping and re-taking
    # the GIL (and waking whichever thread wants it, which may keep us
    # waiting for its whole switch interval) costs more than the
    # parallelism can win back. CPython's zlib.crc32 uses 5 KiB.
    CRC_NOGIL_ZLIB = 65536
    CRC_NOGIL_CLMUL = 1 << 20
    # The batch paths (publish_records, stamp_records) also walk a header
    # and copy or stamp per record, which costs as much as the fold's CRC
    # for short messages: they release the GIL over this many bytes
    # whatever the kernel.
    CRC_NOGIL_BATCH = 65536


cdef inline size_t crc_nogil_threshold() noexcept nogil:
    return CRC_NOGIL_CLMUL if crc32_accelerated() else CRC_NOGIL_ZLIB


cdef inline unsigned long crc32_update(unsigned long crc, const unsigned char* p,
                                       size_t n) noexcept:
    """CRC-32 of ``p[:n]`` continuing from ``crc``; called with the GIL held.

    The caller must keep ``p`` alive and unresizable while the GIL is
    released (a held Py_buffer, a bytes object, or a private buffer).
    """
    if n > crc_nogil_threshold():
        with nogil:
            crc = crc32(crc, p, n)
        return crc
    return crc32(crc, p, n)


# CRC-32 combination (zlib's crc32_combine, 1.2.12's fast form, written out
# here so that no particular zlib version is needed): the CRC of A + B from
# crc(A), crc(B) and len(B). ``crc32_shift_op(n)`` is the operator for a
# given len(B); ``crc32_apply_op(op, crc_a, crc_b)`` applies it. Computing
# the operator costs ~log2(n) GF(2) multiplications; applying it, one.

cdef enum:
    _CRC_POLY = 0xedb88320   # reflected CRC-32 polynomial


cdef inline uint32_t crc32_multmodp(uint32_t a, uint32_t b) noexcept nogil:
    # a * b modulo the CRC polynomial, in zlib's reflected bit order
    cdef uint32_t m = <uint32_t>1 << 31
    cdef uint32_t p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return p


cdef inline uint32_t crc32_shift_op(uint64_t nbytes) noexcept nogil:
    # x^(8 * nbytes) modulo the polynomial: shifting a CRC over nbytes zeros
    cdef uint32_t p = <uint32_t>1 << 31      # x^0
    cdef uint32_t sq = <uint32_t>1 << 23     # x^8: one byte
    while nbytes:
        if nbytes & 1:
            p = crc32_multmodp(sq, p)
        nbytes >>= 1
        if nbytes:
            sq = crc32_multmodp(sq, sq)
    return p


cdef inline uint32_t crc32_apply_op(uint32_t op, uint32_t crc_a, uint32_t crc_b) noexcept nogil:
    return crc32_multmodp(op, crc_a) ^ crc_b
