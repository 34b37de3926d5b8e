/* Vectorizable float32 elementary functions shared by the C loops (dwe.c, normal.c): range
 * reduction + polynomial, no library calls, so that GCC vectorizes the loops that call them.
 * Accuracy: a few float32 ulps. */
#ifndef GOLDSTONE_FASTMATH_H
#define GOLDSTONE_FASTMATH_H
#include <stdint.h>

/* e^y for y <= 0, y >= -87 (clamped there: e^-87 = 1.6e-38, the float range's end). Cody-Waite
 * reduction y = n ln2 + r, |r| <= ln2/2, then a degree-6 polynomial for e^r and 2^n from its bits.
 * n = round(y / ln2) is read from the low mantissa bits of y / ln2 + 1.5 2^23 (an integer there),
 * in unsigned arithmetic: NaN in, NaN out (through r) with no float-to-int conversion of a NaN and
 * no shift of a negative value (both undefined behaviour; UBSan flagged the casts of before). */
static inline float exp_nonpos(float y) {
    y = y < -87.0f ? -87.0f : y; /* NaN stays NaN */
    const union { float f; uint32_t i; } m = {.f = y * 1.44269504088896341f + 12582912.0f};
    const float n = m.f - 12582912.0f;         /* round(y / ln2) */
    float r = y - n * 0.693359375f;            /* ln2, high bits (exact) */
    r = r - n * -2.12194440e-4f;               /* ln2, low bits */
    const float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    /* 2^n: m.i = 0x4b400000 + n for -126 <= n <= 0 (C11: type punning) */
    const union { uint32_t i; float f; } scale = {.i = (m.i - 0x4b400000u + 127u) << 23};
    return p * scale.f;
}

/* log(1 + e) for 0 <= e <= 1 as 2 atanh(s), given s = e / (2 + e) <= 1/3: exact for small e as
 * well (no 1 + e rounding); the series to s^13 leaves a relative error below 2e-8. */
static inline float log1p_atanh(float s) {
    const float s2 = s * s;
    float p = 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

/* log(x) for normal x > 0: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m-1)/(m+1)),
 * |(m-1)/(m+1)| <= 0.172, the series to s^9 (relative error below 1e-9 of the series). */
static inline float log_pos(float x) {
    union { float f; int32_t i; } v = {.f = x};
    int32_t e = ((v.i >> 23) & 0xff) - 127;
    v.i = (v.i & 0x007fffff) | 0x3f800000; /* m in [1, 2) */
    const int big = v.f > 1.41421356f;
    const float m = big ? 0.5f * v.f : v.f;
    e += big;
    const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float p = 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return (float)e * 0.693147180559945f + 2.0f * s * p;
}

/* sin and cos of 0 <= x < 7: quadrant k = round(x / (pi/2)), r = x - k pi/2 in three parts (each
 * k * part exact for k <= 4), |r| <= pi/4, and the minimax polynomials of Cephes' sinf / cosf. */
static inline void sincos_small(float x, float *sn, float *cs) {
    const float kf = (float)(int32_t)(x * 0.636619772f + 0.5f);
    const int32_t k = (int32_t)kf;
    const float r = ((x - kf * 1.5703125f) - kf * 4.837512969970703125e-4f) - kf * 7.54978995489188216e-8f;
    const float z = r * r;
    const float s = r + r * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
    const float c = 1.0f - 0.5f * z + z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f +
                                                                            z * 2.443315711809948e-5f));
    const int swap = k & 1;
    const float ss = swap ? c : s, cc = swap ? s : c;
    *sn = (k & 2) ? -ss : ss;
    *cs = ((k + 1) & 2) ? -cc : cc;
}

#endif
