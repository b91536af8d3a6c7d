# CRC-32, shared by frames.pyx, records.pyx and wire1.pyx (all link -lz).
#
# ``crc32`` is zlib's crc32 with a size_t length: crc32_clmul.h folds with
# PCLMULQDQ where the CPU has it (about 9x zlib 1.2.13 on 1 KiB here) and
# calls zlib for the rest. Calling C directly also skips zlib.crc32's
# argument parsing and buffer acquisition, which cost more than the CRC
# itself for small messages.

cdef extern from "crc32_clmul.h" nogil:
    # zlib's crc32(crc, buf, len) for any size_t len
    unsigned long crc32 "pls_crc32" (unsigned long crc, const unsigned char* buf, size_t len)
    # crc32(crc, buf, 16), one PCLMULQDQ reduction where the CPU has it:
    # a record CRC's tail (offset and time), see records.pxd
    unsigned long crc32_16 "pls_crc32_16" (unsigned long crc, const unsigned char* buf)
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
    # The batch path (publish_records) also walks a header and copies and
    # stamps per record, which costs as much as the fold's CRC for short
    # messages: it releases the GIL over this many bytes whatever the
    # kernel.
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


cdef inline str use_crc32_kernel(object name):
    """Tests only: this module hashes with ``"zlib"``, or probes again (``None``).

    Each extension module has its own copy of the probe's result (the
    header's statics); this sets the calling module's, so that tests can
    run the zlib path of every CRC on a CPU with PCLMULQDQ. Returns the
    kernel now in use.
    """
    global crc32_clmul_flag
    if name == "zlib":
        crc32_clmul_flag = 0
    elif name is None:
        crc32_clmul_flag = -1
    else:
        raise ValueError("kernel must be 'zlib' or None")
    return "pclmulqdq" if crc32_accelerated() else "zlib"
