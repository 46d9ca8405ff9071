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

static void one_task(const float *q, long q_sb, long q_sh, const float *k, const float *v, long kv_sb,
                     long kv_sh, long kv_sn, long n, int b, int hk, int G, int Hq, int D, float scale,
                     float *out) {
    float *o = out + ((long)b * Hq + (long)hk * G) * D;
    if (n <= 0) {
        memset(o, 0, sizeof(float) * G * D);
        return;
    }
    float stack_scores[STACK_SCORES];
    float *s = (long)G * n <= STACK_SCORES ? stack_scores : (float *)malloc(sizeof(float) * G * n);
    const float *kb = k + b * kv_sb + hk * kv_sh, *vb = v + b * kv_sb + hk * kv_sh;
    float qs[MAX_GROUP][MAX_DIM], acc[MAX_GROUP][MAX_DIM], inv[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        const float *qh = q + b * q_sb + (long)(hk * G + g) * q_sh;
        for (int d = 0; d < D; d++) qs[g][d] = qh[d] * scale;
    }
    for (long j = 0; j < n; j++) {  /* scores, each key read once for the whole group */
        const float *kj = kb + j * kv_sn;
        for (int g = 0; g < G; g++) {
            float lanes[16] = {0}, sum = 0.f;
            int d = 0;
            for (; d + 16 <= D; d += 16)
                for (int l = 0; l < 16; l++) lanes[l] += qs[g][d + l] * kj[d + l];
            for (; d < D; d++) sum += qs[g][d] * kj[d];
            for (int l = 0; l < 16; l++) sum += lanes[l];
            s[g * n + j] = sum;
        }
    }
    for (int g = 0; g < G; g++) {  /* softmax weights, unnormalized */
        float *sg = s + g * n, m = sg[0], z = 0.f;
        for (long j = 1; j < n; j++) m = sg[j] > m ? sg[j] : m;
        for (long j = 0; j < n; j++) sg[j] = exp_nonpositive(sg[j] - m);
        for (long j = 0; j < n; j++) z += sg[j];
        inv[g] = 1.f / z;
        for (int d = 0; d < D; d++) acc[g][d] = 0.f;
    }
    for (long j = 0; j < n; j++) {  /* weighted values, each value read once for the whole group */
        const float *vj = vb + j * kv_sn;
        for (int g = 0; g < G; g++) {
            float p = s[g * n + j];
            for (int d = 0; d < D; d++) acc[g][d] += p * vj[d];
        }
    }
    for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) o[(long)g * D + d] = acc[g][d] * inv[g];
    if (s != stack_scores) free(s);
}

/* q: element (b, h, d) at q[b*q_sb + h*q_sh + d]; k, v: (b, hk, j, d) at b*kv_sb + hk*kv_sh + j*kv_sn + d;
 * out: contiguous (B, Hq, D). Returns 0, or -1 for shapes beyond MAX_GROUP / MAX_DIM (nothing written). */
int decode_attention(const float *q, long q_sb, long q_sh, const float *k, const float *v, long kv_sb,
                     long kv_sh, long kv_sn, const long *lengths, int B, int Hq, int Hkv, int D,
                     float scale, int threads, float *out) {
    if (Hkv <= 0 || Hq % Hkv != 0 || Hq / Hkv > MAX_GROUP || D > MAX_DIM || D <= 0) return -1;
    int G = Hq / Hkv;
    #pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int t = 0; t < B * Hkv; t++)
        one_task(q, q_sb, q_sh, k, v, kv_sb, kv_sh, kv_sn, lengths[t / Hkv], t / Hkv, t % Hkv, G, Hq, D, scale, out);
    return 0;
}
