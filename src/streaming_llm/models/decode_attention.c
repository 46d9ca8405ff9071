/* Single-query attention for decoding, one stream per row: for every row b and query head h,
 *   out[b, h] = sum_j softmax_j(scale * q[b, h] . k[b, h/G, j]) v[b, h/G, j],  j < lengths[b],
 * float32 throughout. Built and called by native.py (its docstring says why and when).
 *
 * Exactness: each (row, KV head) pair is one task computed with fixed loops (scores, max, exp,
 * sum, weighted values, in key order), so a row's result has the same bits whatever the other
 * rows are, however many threads run, and whichever thread runs it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 16  /* query heads per KV head */
#define MAX_DIM 256   /* head dimension */
#define STACK_SCORES 8192

/* e^x for x <= 0 (a score minus the maximum): Cody-Waite reduction to |r| <= ln2/2, degree-6 Taylor
 * polynomial (relative error about 1e-7), 2^n put in the exponent bits. Plain arithmetic, so the
 * compiler vectorizes the loop that calls it (libm's expf is a call per element). */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.f + r * (1.f + r * (0.5f + r * (0.166666672f + r * (0.0416666679f + r * (0.00833333377f + r * 0.00138888892f)))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* GCC/Clang vector extensions of the target's width: W floats (16 with AVX512, else 8, -march=native).
 * Every sum is defined over 16 lanes (element i of a head vector into lane i % 16, then the lanes
 * pairwise 8, 4, 2, 1 apart); with W = 8 the 16 lanes are P = 2 vectors (lanes 0-7, 8-15) doing the
 * same additions, so every build gives the same bits, and no vector is wider than a register (gcc
 * keeps 64-byte vectors on the stack where the registers are 32 bytes wide: 3-4x slower). */
#ifdef __AVX512F__
#define W 16
typedef int iw __attribute__((vector_size(64)));
#else
#define W 8
typedef int iw __attribute__((vector_size(32)));
#endif
#define P (16 / W) /* vectors per 16 lanes */
typedef float vw __attribute__((vector_size(4 * W)));

static inline vw loadw(const float *p) {
    vw x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline float hsum16(const vw *x) { /* the 16 lanes of x[0..P-1] pairwise, 8, 4, 2, 1 apart */
#if W == 16
    vw y = x[0] + __builtin_shuffle(x[0], (iw){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    y += __builtin_shuffle(y, (iw){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    y += __builtin_shuffle(y, (iw){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    y += __builtin_shuffle(y, (iw){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
#else
    vw y = x[0] + x[1]; /* lanes 8 apart */
    y += __builtin_shuffle(y, (iw){4, 5, 6, 7, 0, 1, 2, 3});
    y += __builtin_shuffle(y, (iw){2, 3, 0, 1, 6, 7, 4, 5});
    y += __builtin_shuffle(y, (iw){1, 0, 3, 2, 5, 4, 7, 6});
#endif
    return y[0];
}

static inline float sum(const float *x, long n) {  /* 16 lanes (element i into lane i % 16), then hsum16 */
    vw lanes[P] = {{0}};
    float tail = 0.f;
    long i = 0;
    for (; i + 16 <= n; i += 16)
        for (int p = 0; p < P; p++) lanes[p] += loadw(x + i + W * p);
    for (; i < n; i++) tail += x[i];
    return hsum16(lanes) + tail;
}

static inline float maximum(const float *x, long n) {  /* n >= 1; order does not matter for a max */
    float m = x[0];
    for (long i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* One (row, KV head): its G query heads over its n keys. D is a multiple of 16 up to MAX_DIM; inlined
 * with a constant D (see decode_attention) so the per-head vectors stay in registers. */
static inline __attribute__((always_inline)) void one_task(
        const float *q, long q_sb, long q_sh, const float *k, const float *v, long kv_sb, long kv_sh, long kv_sn,
        long n, int b, int hk, int G, int Hq, const int D, float scale, float *out) {
    const int nv = D / W;
    float *o = out + ((long)b * Hq + (long)hk * G) * D;
    if (n <= 0) {
        memset(o, 0, sizeof(float) * G * D);
        return;
    }
    float stack_scores[STACK_SCORES];
    float *s = (long)G * n <= STACK_SCORES ? stack_scores : (float *)malloc(sizeof(float) * G * n);
    const float *kb = k + b * kv_sb + hk * kv_sh, *vb = v + b * kv_sb + hk * kv_sh;
    for (int g = 0; g < G; g++) {
        const float *qh = q + b * q_sb + (long)(hk * G + g) * q_sh;
        vw qv[MAX_DIM / W];
        for (int c = 0; c < nv; c++) qv[c] = loadw(qh + W * c) * scale;
        float *sg = s + g * n;
        for (long j = 0; j < n; j++) {  /* scores: vector c adds into lanes (c % P) */
            const float *kj = kb + j * kv_sn;
            vw acc[P];
            for (int p = 0; p < P; p++) acc[p] = qv[p] * loadw(kj + W * p);
            for (int c = P; c < nv; c++) acc[c % P] += qv[c] * loadw(kj + W * c);
            sg[j] = hsum16(acc);
        }
        float m = maximum(sg, n);  /* softmax weights */
        for (long j = 0; j < n; j++) sg[j] = exp_nonpositive(sg[j] - m);
        float inv = 1.f / sum(sg, n);
        vw acc[MAX_DIM / W];  /* weighted values */
        for (int c = 0; c < nv; c++) acc[c] = (vw){0};
        for (long j = 0; j < n; j++) {
            const float *vj = vb + j * kv_sn;
            float p = sg[j];
            for (int c = 0; c < nv; c++) acc[c] += p * loadw(vj + W * c);
        }
        for (int c = 0; c < nv; c++) {
            vw r = acc[c] * inv;
            memcpy(o + (long)g * D + W * c, &r, sizeof r);
        }
    }
    if (s != stack_scores) free(s);
}

/* q: element (b, h, d) at q[b*q_sb + h*q_sh + d]; k, v: (b, hk, j, d) at b*kv_sb + hk*kv_sh + j*kv_sn + d;
 * out: contiguous (B, Hq, D). Returns 0, or -1 for shapes it does not do: more than MAX_GROUP query
 * heads per KV head, D not a multiple of 16 or past MAX_DIM (nothing written). */
int decode_attention(const float *q, long q_sb, long q_sh, const float *k, const float *v, long kv_sb,
                     long kv_sh, long kv_sn, const long *lengths, int B, int Hq, int Hkv, int D,
                     float scale, int threads, float *out) {
    if (Hkv <= 0 || Hq % Hkv != 0 || Hq / Hkv > MAX_GROUP || D > MAX_DIM || D <= 0 || D % 16 != 0) return -1;
    int G = Hq / Hkv;
    #pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int t = 0; t < B * Hkv; t++) {
        int b = t / Hkv, hk = t % Hkv;
        long n = lengths[b];
        switch (D) {  /* the common head sizes as constants, so the loops over D unroll */
        case 64: one_task(q, q_sb, q_sh, k, v, kv_sb, kv_sh, kv_sn, n, b, hk, G, Hq, 64, scale, out); break;
        case 128: one_task(q, q_sb, q_sh, k, v, kv_sb, kv_sh, kv_sn, n, b, hk, G, Hq, 128, scale, out); break;
        default: one_task(q, q_sb, q_sh, k, v, kv_sb, kv_sh, kv_sn, n, b, hk, G, Hq, D, scale, out); break;
        }
    }
    return 0;
}
