/* Standard normal draws that equal PyTorch's CPU torch.randn (float32, 16 or more numbers, one
 * contiguous tensor) from the same generator state, to float rounding, with the expensive half in
 * parallel (goldstone_cli/kernels/normal.py wraps them and checks them against torch.randn).
 *
 * PyTorch fills the tensor with uniforms u in [0, 1) from its MT19937 engine (24 bits of each 32-bit
 * output), then turns every group of 16 into normals by Box-Muller: for j < 8, with u1 = 1 - u[j]
 * and u2 = u[j + 8], r = sqrt(-2 log u1), and writes r cos(2 pi u2) at j and r sin(2 pi u2) at
 * j + 8. If the length is not a multiple of 16, the last 16 places are drawn again from 16 fresh
 * uniforms and transformed as one group. Both steps run on one thread there, and the transcendental
 * half costs more than the uniforms: here the uniforms (inherently sequential) come from one call
 * and the groups are transformed on disjoint ranges by several threads. */
#include <stdint.h>

#include "fastmath.h"

#define MT_N 624
#define MT_M 397

/* One twist of the whole state, as at::mt19937::next_state (the reference MT19937 recurrence). */
static void mt_twist(uint32_t *s) {
#define MT_MIX(u, v) ((((u) & 0x80000000u) | ((v) & 0x7fffffffu)) >> 1 ^ (((v) & 1u) ? 0x9908b0dfu : 0u))
    for (int i = 0; i < MT_N - MT_M; ++i) s[i] = s[i + MT_M] ^ MT_MIX(s[i], s[i + 1]);
    for (int i = MT_N - MT_M; i < MT_N - 1; ++i) s[i] = s[i + MT_M - MT_N] ^ MT_MIX(s[i], s[i + 1]);
    s[MT_N - 1] = s[MT_M - 1] ^ MT_MIX(s[MT_N - 1], s[0]);
#undef MT_MIX
}

/* n uniforms in [0, 1) as PyTorch draws them for float32 ((output & (2^24 - 1)) * 2^-24), from the
 * engine state s (624 words) and its counters left / next as PyTorch keeps them (a draw decrements
 * left and twists the state when it reaches 0; next indexes the word to temper). Both counters are
 * updated. Returns 0, or -1 for counters PyTorch never produces (nothing written then). */
int64_t gs_mt19937_uniform_f32(uint32_t *restrict s, int64_t *left, int64_t *next, float *restrict out, int64_t n) {
    int64_t l = *left, x = *next;
    if (l < 1 || l > MT_N + 1 || x < 0 || x > MT_N || (l > 1 && x + l - 1 > MT_N)) return -1;
    int64_t done = 0;
    while (done < n) {
        if (l == 1) { /* the next draw twists first */
            mt_twist(s);
            l = MT_N + 1;
            x = 0;
        }
        const int64_t m = (n - done < l - 1) ? n - done : l - 1;
        float *o = out + done;
        const uint32_t *w = s + x;
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) {
            uint32_t y = w[i];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9d2c5680u;
            y ^= (y << 15) & 0xefc60000u;
            y ^= y >> 18;
            o[i] = (float)(int32_t)(y & 0xffffffu) * 5.9604644775390625e-8f; /* 2^-24 */
        }
        done += m, x += m, l -= m;
    }
    *left = l, *next = x;
    return 0;
}

/* Box-Muller in place on the groups [g0, g1) of 16 numbers starting at data (see the top). */
void gs_box_muller_f32(float *restrict data, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
        float *a = data + 16 * g, *b = a + 8;
#pragma omp simd
        for (int j = 0; j < 8; ++j) {
            const float radius = __builtin_sqrtf(-2.0f * log_pos(1.0f - a[j]));
            float sn, cs;
            sincos_small(6.28318530717958647692f * b[j], &sn, &cs);
            a[j] = radius * cs;
            b[j] = radius * sn;
        }
    }
}
