// One decoded query per row against that row's own keys: out[b, h] = softmax(scale * q . k_j) v, j < len[b].
// Each (row, kv head) is computed by one thread with fixed loops: its bits do not depend on the other rows.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAXG 16
#define MAXD 256
#define STACK_KEYS 2048

// e^x for x <= 0 (scores minus their maximum): Cody-Waite reduction to |r| <= ln2/2, degree-6 Taylor
// polynomial (relative error about 1e-7), 2^n built in the exponent bits. Written as plain arithmetic
// so the compiler vectorizes the loop that calls it.
static inline float exp_nonpos(float x) {
    x = x < -87.f ? -87.f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.f + r * (1.f + r * (0.5f + r * (0.166666672f + r * (0.0416666679f + r * (0.00833333377f + r * 0.00138888892f)))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

void decode_attention(const float *q, long q_sb, long q_sh,
                      const float *k, const float *v, long kv_sb, long kv_sh, long kv_sn,
                      const long *lengths, int B, int Hq, int Hkv, int D, float scale, float *out) {
    int G = Hq / Hkv;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < B * Hkv; t++) {
        int b = t / Hkv, hk = t % Hkv;
        long n = lengths[b];
        float stack_buf[MAXG * STACK_KEYS];
        float *s = n <= STACK_KEYS ? stack_buf : (float *)malloc(sizeof(float) * MAXG * n);
        const float *kb = k + b * kv_sb + hk * kv_sh, *vb = v + b * kv_sb + hk * kv_sh;
        float qs[MAXG][MAXD];
        for (int g = 0; g < G; g++) {
            const float *qh = q + b * q_sb + (long)(hk * G + g) * q_sh;
            for (int d = 0; d < D; d++) qs[g][d] = qh[d] * scale;
        }
        for (long j = 0; j < n; j++) {
            const float *kj = kb + j * kv_sn;
            for (int g = 0; g < G; g++) {
                float acc[16] = {0};
                int d = 0;
                for (; d + 16 <= D; d += 16)
                    for (int l = 0; l < 16; l++) acc[l] += qs[g][d + l] * kj[d + l];
                float sum = 0.f;
                for (; d < D; d++) sum += qs[g][d] * kj[d];
                for (int l = 0; l < 16; l++) sum += acc[l];
                s[g * n + j] = sum;
            }
        }
        float inv[MAXG];
        for (int g = 0; g < G; g++) {
            float *sg = s + g * n, m = sg[0], z = 0.f;
            for (long j = 1; j < n; j++) m = sg[j] > m ? sg[j] : m;
            for (long j = 0; j < n; j++) sg[j] = exp_nonpos(sg[j] - m);
            for (long j = 0; j < n; j++) z += sg[j];
            inv[g] = 1.f / z;
        }
        float acc[MAXG][MAXD];
        for (int g = 0; g < G; g++)
            for (int d = 0; d < D; d++) acc[g][d] = 0.f;
        for (long j = 0; j < n; j++) {
            const float *vj = vb + j * kv_sn;
            for (int g = 0; g < G; g++) {
                float p = s[g * n + j];
                for (int d = 0; d < D; d++) acc[g][d] += p * vj[d];
            }
        }
        for (int g = 0; g < G; g++) {
            float *o = out + ((long)b * Hq + hk * G + g) * D;
            for (int d = 0; d < D; d++) o[d] = acc[g][d] * inv[g];
        }
        if (s != stack_buf) free(s);
    }
}
