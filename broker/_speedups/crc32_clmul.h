/* CRC-32 (zlib's polynomial and conventions) for broker._speedups.
 *
 * pls_crc32(crc, p, n) returns exactly what zlib's crc32(crc, p, n) returns,
 * for any n (size_t, no 4 GiB limit). On x86-64 CPUs with PCLMULQDQ and
 * SSE4.1 (checked once, at run time, with CPUID) the bulk of each buffer
 * is folded with carry-less multiplication, 64 bytes per step in four
 * independent lanes; the last n % 16 bytes and buffers under 64 bytes go to
 * zlib. Elsewhere, everything goes to zlib.
 *
 * The method is the one in Intel's white paper "Fast CRC Computation for
 * Generic Polynomials Using PCLMULQDQ Instruction" (Gopal et al., 2009), in
 * its bit-reflected form. The constants are x^k mod P(x) for the shifts
 * named below, bit-reflected and shifted left by one; P is 0x104C11DB7.
 * tests/test_codec.py checks lengths 0 to 1099 at 16 alignments (and with
 * a running CRC at one) against zlib.crc32, and derives every constant
 * here from P (test_crc32_clmul_constants_follow_from_the_polynomial).
 */
#ifndef PLS_CRC32_CLMUL_H
#define PLS_CRC32_CLMUL_H

#include <stddef.h>
#include <stdint.h>
#include <zlib.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PLS_CRC32_HAVE_CLMUL 1
#include <cpuid.h>
#include <immintrin.h>
#endif

/* -1: not probed yet; 0: zlib only; 1: PCLMULQDQ. Per extension module;
 * probed on first use (frames probes at import, for CRC32_KERNEL). Threads
 * without the GIL may probe at once: they store the same value, atomically. */
static int pls_crc32_clmul = -1;

#ifdef PLS_CRC32_HAVE_CLMUL

/* The raw CRC state of the 128-bit remainder ``a``, reduced to 32 bits. */
__attribute__((target("pclmul,sse4.1")))
static inline uint32_t pls_crc32_reduce128(__m128i a)
{
    /* k3k4 of pls_crc32_fold; only its high half, x^(128-32), is used here */
    const __m128i k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    /* 64 -> 32 bits: x^64 */
    const __m128i k5 = _mm_set_epi64x(0, 0x0163cd6124LL);
    /* Barrett reduction: P(x) and mu = floor(x^64 / P(x)) */
    const __m128i pmu = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);
    const __m128i low32 = _mm_setr_epi32(-1, 0, -1, 0);
    __m128i t;

    /* 128 -> 64 bits */
    t = _mm_clmulepi64_si128(a, k4, 0x10);
    a = _mm_xor_si128(_mm_srli_si128(a, 8), t);
    /* 64 -> 32 bits */
    t = _mm_srli_si128(a, 4);
    a = _mm_clmulepi64_si128(_mm_and_si128(a, low32), k5, 0x00);
    a = _mm_xor_si128(a, t);
    /* Barrett reduction to the 32-bit remainder */
    t = _mm_clmulepi64_si128(_mm_and_si128(a, low32), pmu, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), pmu, 0x00);
    a = _mm_xor_si128(a, t);
    return (uint32_t)_mm_extract_epi32(a, 1);
}

/* Raw (not inverted) CRC state of p[0:n], folded in from ``state``.
 * n >= 64 and n % 16 == 0. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t pls_crc32_fold(uint32_t state, const unsigned char *p, size_t n)
{
    /* fold by 4 x 128 bits: x^(512+32), x^(512-32) */
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
    /* fold by 128 bits: x^(128+32), x^(128-32) */
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    __m128i a, b, c, d;

    a = _mm_loadu_si128((const __m128i *)(p + 0));
    b = _mm_loadu_si128((const __m128i *)(p + 16));
    c = _mm_loadu_si128((const __m128i *)(p + 32));
    d = _mm_loadu_si128((const __m128i *)(p + 48));
    a = _mm_xor_si128(a, _mm_cvtsi32_si128((int)state));
    p += 64;
    n -= 64;

#define PLS_FOLD(x, k, next)                                               \
    do {                                                                   \
        __m128i lo_ = _mm_clmulepi64_si128((x), (k), 0x00);                \
        (x) = _mm_clmulepi64_si128((x), (k), 0x11);                        \
        (x) = _mm_xor_si128(_mm_xor_si128((x), lo_), (next));              \
    } while (0)

    while (n >= 64) {
        PLS_FOLD(a, k1k2, _mm_loadu_si128((const __m128i *)(p + 0)));
        PLS_FOLD(b, k1k2, _mm_loadu_si128((const __m128i *)(p + 16)));
        PLS_FOLD(c, k1k2, _mm_loadu_si128((const __m128i *)(p + 32)));
        PLS_FOLD(d, k1k2, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    /* four lanes into one */
    PLS_FOLD(a, k3k4, b);
    PLS_FOLD(a, k3k4, c);
    PLS_FOLD(a, k3k4, d);
    while (n >= 16) {
        PLS_FOLD(a, k3k4, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
#undef PLS_FOLD

    return pls_crc32_reduce128(a);
}

/* Raw CRC state of the 16 bytes at p, folded in from ``state``: one block,
 * straight to the reduction (a record CRC's tail: offset and time). */
__attribute__((target("pclmul,sse4.1")))
static uint32_t pls_crc32_block16(uint32_t state, const unsigned char *p)
{
    return pls_crc32_reduce128(_mm_xor_si128(
        _mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)state)));
}

#endif /* PLS_CRC32_HAVE_CLMUL */

/* 1 if this process folds with PCLMULQDQ, else 0 (probed on first use). */
static inline int pls_crc32_accelerated(void)
{
#ifdef PLS_CRC32_HAVE_CLMUL
    int flag = __atomic_load_n(&pls_crc32_clmul, __ATOMIC_RELAXED);
    if (flag < 0) {
        unsigned int eax, ebx, ecx, edx;
        flag = __get_cpuid(1, &eax, &ebx, &ecx, &edx)
               && (ecx & bit_PCLMUL) && (ecx & bit_SSE4_1);
        __atomic_store_n(&pls_crc32_clmul, flag, __ATOMIC_RELAXED);
    }
    return flag;
#else
    return 0;
#endif
}

/* zlib takes an unsigned int length: feed it at most 1 GiB per call. */
#define PLS_CRC32_ZLIB_STEP ((size_t)1 << 30)

static inline unsigned long pls_crc32_zlib(unsigned long crc,
                                           const unsigned char *p, size_t n)
{
    while (n > PLS_CRC32_ZLIB_STEP) {
        crc = crc32(crc, p, (uInt)PLS_CRC32_ZLIB_STEP);
        p += PLS_CRC32_ZLIB_STEP;
        n -= PLS_CRC32_ZLIB_STEP;
    }
    return crc32(crc, p, (uInt)n);
}

/* zlib's crc32(crc, p, n), for any size_t n. Safe without the GIL. */
static inline unsigned long pls_crc32(unsigned long crc,
                                      const unsigned char *p, size_t n)
{
#ifdef PLS_CRC32_HAVE_CLMUL
    if (n >= 64 && pls_crc32_accelerated()) {
        size_t bulk = n & ~(size_t)15;
        crc = ~pls_crc32_fold(~(uint32_t)crc, p, bulk) & 0xffffffffUL;
        p += bulk;
        n -= bulk;
        if (n == 0)
            return crc;
    }
#endif
    return pls_crc32_zlib(crc, p, n);
}

/* pls_crc32(crc, p, 16): the 16 bytes of a record's offset and time. */
static inline unsigned long pls_crc32_16(unsigned long crc, const unsigned char *p)
{
#ifdef PLS_CRC32_HAVE_CLMUL
    if (pls_crc32_accelerated())
        return ~pls_crc32_block16(~(uint32_t)crc, p) & 0xffffffffUL;
#endif
    return crc32(crc, p, 16);
}

#endif /* PLS_CRC32_CLMUL_H */
