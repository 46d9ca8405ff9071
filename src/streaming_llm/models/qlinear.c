/* y = x W^T for weight-only quantized linears (int4 in groups of 32 with a scale and a minimum, or
 * int8 per output channel), x float32 (M rows), y float32. Built and called by native.py; the
 * weight layout is made by models/quantize.py (`pack_native`).
 *
 * Arithmetic (llama.cpp's Q8 activations): each row's inputs are quantized per group of 32 to int8,
 *   xq = round(x * 127 / max|x|), a = max|x| / 127, b = a * sum(xq),
 * and the weights are unsigned codes u (int4: 0..15, int8: q + 128) with w = u * s + lo per group
 * (int8: lo = -128 s), so a group's part of an output is a * s * sum(u * xq) + lo * b: an exact
 * integer dot product (AVX512-VNNI's vpdpbusd: 64 byte products per instruction) and two float
 * multiply-adds per group of 32. Where AVX512-VNNI is missing, AVX2 does the same sums with
 * vpmaddubsw (byte products summed in pairs into int16) and vpmaddwd: every int16 partial sum is
 * bounded below 2^15 (|u| <= 15 per nibble, |xq| <= 127, at most 8 pair sums per slot; int8 weights
 * are split into their two nibbles, u = 16 uh + ul), so no product saturates and the integer sums,
 * and therefore the bits, are those of the other paths.
 *
 * Layout: outputs in tiles of 16 (one vector lane per output). Per tile and group of 32 inputs,
 * int4: 4 chunks of 64 bytes, byte 4*lane + j of chunk c holding input 8c + j in its low nibble and
 * 8c + 4 + j in its high one; int8: 8 chunks, byte 4*lane + j of chunk c holding input 4c + j.
 * s, lo: float16, [tile][group][16] (per_group) or [tile][16] (per channel).
 *
 * Speed: a block of up to 8 rows (AVX2: 4, in two halves of 8 outputs) shares each weight load;
 * the block code is instantiated per row count (block_fast, block_avx2), so its sums live in
 * registers (with a runtime count, gcc kept them on the stack: 2-3x slower), and a group's maximum
 * is taken in vectors (the scalar loop cost more than the products at 33 rows).
 *
 * Exactness: a row's result depends on that row only (its own quantization, integer sums, then the
 * groups in order, each lane alone), so a stream gets the same bits alone or among other rows, in
 * any thread count. `portable` runs the same arithmetic in plain C (the same bits; for tests and
 * for checking a build).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define QL_FAST 2 /* AVX512-VNNI */
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QL_FAST 1 /* AVX2 */
#else
#define QL_FAST 0
#endif

#define GS 32 /* inputs per group */
#define NT 16 /* outputs per tile */
#define MB 8  /* rows per block of the AVX512 path */
#define MB2 4 /* rows per block of the AVX2 path (16 vector registers) */

int qlinear_fast(void) { return QL_FAST; } /* 2: AVX512-VNNI, 1: AVX2, 0: plain C only */

static float half_to_float(uint16_t h) { /* exact: float16 -> float32 */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) bits = sign | 0x7F800000 | (man << 13);
    else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else { /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* One row's groups: xq (k int8), a and b (k/32 floats each). */
static void quantize_row(const float *x, long k, int8_t *xq, float *a, float *b, int portable) {
    for (long g = 0; g < k / GS; g++) {
        const float *xg = x + g * GS;
        float mx = 0.f;
#if QL_FAST == 2
        __m512 x0 = _mm512_loadu_ps(xg), x1 = _mm512_loadu_ps(xg + 16);
        if (!portable) /* the same maximum (it does not depend on the order) */
            mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        else
#elif QL_FAST == 1
        __m256 v[4];
        if (!portable) {
            const __m256 sign = _mm256_set1_ps(-0.f);
            for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xg + 8 * i);
            __m256 m8 = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                      _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        } else
#endif
            for (int i = 0; i < GS; i++) mx = fmaxf(mx, fabsf(xg[i]));
        float d = mx / 127.f, inv = mx > 0.f ? 127.f / mx : 0.f;
        int sum = 0;
#if QL_FAST == 2
        if (!portable) {
            __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(inv)));
            __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(inv)));
            _mm_storeu_si128((__m128i *)(xq + g * GS), _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(xq + g * GS + 16), _mm512_cvtepi32_epi8(q1));
            sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        } else
#elif QL_FAST == 1
        if (!portable) {
            __m256i q[4];
            for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
            /* packs interleave the 128-bit halves; the permutation puts the 32 codes back in order */
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(xq + g * GS), p);
            __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
        } else
#endif
        {
            for (int i = 0; i < GS; i++) {
                int q = (int)lrintf(xg[i] * inv); /* round half to even, as cvtps under the default MXCSR */
                xq[g * GS + i] = (int8_t)q;
                sum += q;
            }
        }
        a[g] = d;
        b[g] = d * (float)sum;
    }
}

/* Plain C: the same integer sums and float operations, lane by lane. */
static void tile_portable(const int8_t *xq, const float *a, const float *b, long m, long k, const uint8_t *wt,
                          const uint16_t *st, const uint16_t *lt, int per_group, int bits, float *y, long n, long t) {
    long G = k / GS, wg_bytes = bits == 4 ? 256 : 512;
    for (long r = 0; r < m; r++) {
        float acc[NT] = {0};
        for (long g = 0; g < G; g++) {
            int32_t isum[NT] = {0};
            const uint8_t *wg = wt + g * wg_bytes;
            const int8_t *xg = xq + r * k + g * GS;
            for (int lane = 0; lane < NT; lane++)
                for (int i = 0; i < GS; i++) {
                    int u;
                    if (bits == 4) {
                        int c = i / 8, j = i % 8;
                        uint8_t byte = wg[64 * c + 4 * lane + (j & 3)];
                        u = j < 4 ? (byte & 0x0F) : (byte >> 4);
                    } else {
                        u = wg[64 * (i / 4) + 4 * lane + (i % 4)];
                    }
                    isum[lane] += u * xg[i];
                }
            const uint16_t *sg = st + (per_group ? g * NT : 0), *lg = lt + (per_group ? g * NT : 0);
            for (int lane = 0; lane < NT; lane++) {
                float sa = half_to_float(sg[lane]) * a[r * G + g];
                acc[lane] = fmaf((float)isum[lane], sa, acc[lane]);
                acc[lane] = fmaf(half_to_float(lg[lane]), b[r * G + g], acc[lane]);
            }
        }
        memcpy(y + r * n + t * NT, acc, sizeof acc);
    }
}

#if QL_FAST == 2
/* Rows r0..r0+mb-1 of one tile. Always inlined with constant mb, bits and per_group (tile_fast's
 * switch), so the loops unroll and the sums stay in registers. With few rows, each row sums in two
 * vectors (split) so that more independent vpdpbusd chains are in flight; integer sums are exact in
 * any order, so the bits are the same. */
static inline __attribute__((always_inline)) void block_fast(const int8_t *xq, const float *a, const float *b,
                                                             long k, const uint8_t *wt, const uint16_t *st,
                                                             const uint16_t *lt, const int per_group, const int bits,
                                                             float *y, long n, long t, long r0, const int mb) {
    const long G = k / GS, wg_bytes = bits == 4 ? 256 : 512;
    const int split = mb <= 4 ? 2 : 1;
    const __m512i mask = _mm512_set1_epi8(0x0F);
    __m512 acc[MB];
    for (int r = 0; r < mb; r++) acc[r] = _mm512_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m512i isum[2][MB];
        for (int h = 0; h < split; h++)
            for (int r = 0; r < mb; r++) isum[h][r] = _mm512_setzero_si512();
        const uint8_t *wg = wt + g * wg_bytes;
        const int8_t *xg = xq + r0 * k + g * GS;
        if (bits == 4) {
            for (int c = 0; c < 4; c++) {
                __m512i w = _mm512_loadu_si512(wg + 64 * c);
                __m512i lo = _mm512_and_si512(w, mask), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask);
                for (int r = 0; r < mb; r++) {
                    int32_t x0, x1;
                    memcpy(&x0, xg + r * k + 8 * c, 4);
                    memcpy(&x1, xg + r * k + 8 * c + 4, 4);
                    isum[0][r] = _mm512_dpbusd_epi32(isum[0][r], lo, _mm512_set1_epi32(x0));
                    isum[split - 1][r] = _mm512_dpbusd_epi32(isum[split - 1][r], hi, _mm512_set1_epi32(x1));
                }
            }
        } else {
            for (int c = 0; c < 8; c++) {
                __m512i w = _mm512_loadu_si512(wg + 64 * c);
                for (int r = 0; r < mb; r++) {
                    int32_t x0;
                    memcpy(&x0, xg + r * k + 4 * c, 4);
                    isum[c % split][r] = _mm512_dpbusd_epi32(isum[c % split][r], w, _mm512_set1_epi32(x0));
                }
            }
        }
        const uint16_t *sg = st + (per_group ? g * NT : 0), *lg = lt + (per_group ? g * NT : 0);
        __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sg));
        __m512 l = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)lg));
        for (int r = 0; r < mb; r++) {
            long ag = (r0 + r) * G + g;
            __m512i sum = split == 2 ? _mm512_add_epi32(isum[0][r], isum[1][r]) : isum[0][r];
            __m512 sa = _mm512_mul_ps(s, _mm512_set1_ps(a[ag]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), sa, acc[r]);
            acc[r] = _mm512_fmadd_ps(l, _mm512_set1_ps(b[ag]), acc[r]);
        }
    }
    for (int r = 0; r < mb; r++) _mm512_storeu_ps(y + (r0 + r) * n + t * NT, acc[r]);
}

#define QL_BLOCK(PG, BITS, MBC) block_fast(xq, a, b, k, wt, st, lt, PG, BITS, y, n, t, r0, MBC)
#define QL_ROWS(PG, BITS)                                                                                    \
    switch (mb) {                                                                                            \
    case 1: QL_BLOCK(PG, BITS, 1); break;                                                                    \
    case 2: QL_BLOCK(PG, BITS, 2); break;                                                                    \
    case 3: QL_BLOCK(PG, BITS, 3); break;                                                                    \
    case 4: QL_BLOCK(PG, BITS, 4); break;                                                                    \
    case 5: QL_BLOCK(PG, BITS, 5); break;                                                                    \
    case 6: QL_BLOCK(PG, BITS, 6); break;                                                                    \
    case 7: QL_BLOCK(PG, BITS, 7); break;                                                                    \
    default: QL_BLOCK(PG, BITS, 8); break;                                                                   \
    }

static void tile_fast(const int8_t *xq, const float *a, const float *b, long m, long k, const uint8_t *wt,
                      const uint16_t *st, const uint16_t *lt, int per_group, int bits, float *y, long n, long t) {
    for (long r0 = 0; r0 < m; r0 += MB) {
        int mb = m - r0 < MB ? (int)(m - r0) : MB;
        if (bits == 4) { QL_ROWS(1, 4) } /* the two layouts pack_native makes (qlinear checks) */
        else { QL_ROWS(0, 8) }
    }
}
#elif QL_FAST == 1
/* Rows r0..r0+mb-1 of one half (8 outputs) of one tile: AVX2, 8 lanes per vector (see the header
 * for why the int16 partial sums cannot overflow). Instantiated per row count like block_fast. */
static inline __attribute__((always_inline)) void block_avx2(const int8_t *xq, const float *a, const float *b,
                                                             long k, const uint8_t *wt, const uint16_t *st,
                                                             const uint16_t *lt, const int per_group, const int bits,
                                                             float *y, long n, long t, long r0, const int mb,
                                                             const int half) {
    const long G = k / GS, wg_bytes = bits == 4 ? 256 : 512;
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[MB2];
    for (int r = 0; r < mb; r++) acc[r] = _mm256_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m256i lo16[MB2], hi16[MB2], isum[MB2];
        for (int r = 0; r < mb; r++) lo16[r] = hi16[r] = _mm256_setzero_si256();
        const uint8_t *wg = wt + g * wg_bytes + 32 * half;
        const int8_t *xg = xq + r0 * k + g * GS;
        for (int c = 0; c < (bits == 4 ? 4 : 8); c++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(wg + 64 * c));
            __m256i lo = _mm256_and_si256(w, mask), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
            for (int r = 0; r < mb; r++) {
                int32_t x0, x1;
                if (bits == 4) { /* low nibbles: inputs 8c..8c+3, high: 8c+4..8c+7, all in one sum */
                    memcpy(&x0, xg + r * k + 8 * c, 4);
                    memcpy(&x1, xg + r * k + 8 * c + 4, 4);
                    lo16[r] = _mm256_add_epi16(lo16[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)));
                    lo16[r] = _mm256_add_epi16(lo16[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
                } else { /* int8: inputs 4c..4c+3; the nibbles sum apart (u = 16 uh + ul) */
                    memcpy(&x0, xg + r * k + 4 * c, 4);
                    __m256i xb = _mm256_set1_epi32(x0);
                    lo16[r] = _mm256_add_epi16(lo16[r], _mm256_maddubs_epi16(lo, xb));
                    hi16[r] = _mm256_add_epi16(hi16[r], _mm256_maddubs_epi16(hi, xb));
                }
            }
        }
        for (int r = 0; r < mb; r++) {
            isum[r] = _mm256_madd_epi16(lo16[r], ones);
            if (bits == 8) isum[r] = _mm256_add_epi32(isum[r], _mm256_slli_epi32(_mm256_madd_epi16(hi16[r], ones), 4));
        }
        const uint16_t *sg = st + (per_group ? g * NT : 0) + 8 * half, *lg = lt + (per_group ? g * NT : 0) + 8 * half;
        __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sg));
        __m256 l = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)lg));
        for (int r = 0; r < mb; r++) {
            long ag = (r0 + r) * G + g;
            __m256 sa = _mm256_mul_ps(s, _mm256_set1_ps(a[ag]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), sa, acc[r]);
            acc[r] = _mm256_fmadd_ps(l, _mm256_set1_ps(b[ag]), acc[r]);
        }
    }
    for (int r = 0; r < mb; r++) _mm256_storeu_ps(y + (r0 + r) * n + t * NT + 8 * half, acc[r]);
}

#define QL_BLOCK2(PG, BITS, MBC) block_avx2(xq, a, b, k, wt, st, lt, PG, BITS, y, n, t, r0, MBC, half)
#define QL_ROWS2(PG, BITS)                                                                                   \
    switch (mb) {                                                                                            \
    case 1: QL_BLOCK2(PG, BITS, 1); break;                                                                   \
    case 2: QL_BLOCK2(PG, BITS, 2); break;                                                                   \
    case 3: QL_BLOCK2(PG, BITS, 3); break;                                                                   \
    default: QL_BLOCK2(PG, BITS, 4); break;                                                                  \
    }

static void tile_fast(const int8_t *xq, const float *a, const float *b, long m, long k, const uint8_t *wt,
                      const uint16_t *st, const uint16_t *lt, int per_group, int bits, float *y, long n, long t) {
    for (long r0 = 0; r0 < m; r0 += MB2) {
        int mb = m - r0 < MB2 ? (int)(m - r0) : MB2;
        for (int half = 0; half < 2; half++) {
            if (bits == 4) { QL_ROWS2(1, 4) }
            else { QL_ROWS2(0, 8) }
        }
    }
}
#endif

/* x: m rows of k floats, row r at x + r*x_stride; y: m x n contiguous. Returns 0; -1 for shapes it
 * does not do (k not a multiple of 32, n not a multiple of 16, bits not 4 with per_group or 8
 * without), -2 where the fast
 * path was asked for and this build has none, -3 when out of memory (nothing written then). */
int qlinear(const float *x, long m, long k, long x_stride, const uint8_t *w, const uint16_t *s,
            const uint16_t *lo, int per_group, int bits, long n, float *y, int threads, int portable) {
    if (m <= 0 || k <= 0 || k % GS || n <= 0 || n % NT || (bits != 4 && bits != 8) || per_group != (bits == 4))
        return -1;
    if (!portable && !QL_FAST) return -2;
    long G = k / GS;
    int8_t *xq = malloc((size_t)(m * k));
    float *ab = malloc(sizeof(float) * 2 * (size_t)(m * G));
    if (!xq || !ab) {
        free(xq);
        free(ab);
        return -3;
    }
    float *a = ab, *b = ab + m * G;
    for (long r = 0; r < m; r++) quantize_row(x + r * x_stride, k, xq + r * k, a + r * G, b + r * G, portable);
    long T = n / NT, wt_bytes = G * (bits == 4 ? 256 : 512), sc = per_group ? G * NT : NT;
    #pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (long t = 0; t < T; t++) {
#if QL_FAST
        if (!portable) {
            tile_fast(xq, a, b, m, k, w + t * wt_bytes, s + t * sc, lo + t * sc, per_group, bits, y, n, t);
            continue;
        }
#endif
        tile_portable(xq, a, b, m, k, w + t * wt_bytes, s + t * sc, lo + t * sc, per_group, bits, y, n, t);
    }
    free(xq);
    free(ab);
    return 0;
}
