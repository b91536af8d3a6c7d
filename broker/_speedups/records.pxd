# C-level declarations of broker/_speedups/records.pyx, for cimport: the
# record layout and the header/CRC helpers, inline so a future Cython
# segment reader can walk records without calling into this module.

from libc.stdint cimport uint32_t, uint64_t

from ._crc32 cimport crc32_16, crc32_update


cdef enum:
    RECORD_HEADER_SIZE = 24   # length + crc + offset + time (HEADER_SIZE in Python)
    RECORD_MIN_LENGTH = 20    # crc + offset + time: the smallest valid length field
    RECORD_CRC_START = 8      # the CRC's tail: bytes 8 .. 24 (offset and time)


cdef struct RecordHeader:
    uint32_t length   # bytes after the length field: 20 + payload size
    uint32_t crc      # CRC-32 of the payload, continued over bytes 8 .. 24
    uint64_t offset   # logical offset in the topic
    uint64_t time     # append time in ms since the epoch


cdef inline uint32_t load_be32(const unsigned char* p) noexcept nogil:
    # gcc turns the shifts into one load + bswap (movbe)
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16)
            | (<uint32_t>p[2] << 8) | <uint32_t>p[3])


cdef inline uint64_t load_be64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>load_be32(p) << 32) | load_be32(p + 4)


cdef inline void store_be32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void store_be64(unsigned char* p, uint64_t v) noexcept nogil:
    store_be32(p, <uint32_t>(v >> 32))
    store_be32(p + 4, <uint32_t>v)


cdef inline void read_header(const unsigned char* p, RecordHeader* hdr) noexcept nogil:
    # p must have RECORD_HEADER_SIZE readable bytes
    hdr.length = load_be32(p)
    hdr.crc = load_be32(p + 4)
    hdr.offset = load_be64(p + 8)
    hdr.time = load_be64(p + 16)


cdef inline uint32_t record_crc(const unsigned char* p, uint32_t payload_crc) noexcept nogil:
    # The record CRC of the record at p from its payload's CRC: continued
    # over offset and time (p[8:24]), so a payload is hashed once.
    return <uint32_t>crc32_16(payload_crc, p + RECORD_CRC_START)


cdef inline bint crc_matches(const unsigned char* p, const RecordHeader* hdr) noexcept:
    # p[:4 + hdr.length] must be readable and hdr.length >= RECORD_MIN_LENGTH
    return record_crc(p, <uint32_t>crc32_update(
        0, p + RECORD_HEADER_SIZE, hdr.length - RECORD_MIN_LENGTH)) == hdr.crc
