/* Fused CPU loops of the MovieLens step (issue 16), float32 data with float64 sums.
 *
 * Built on first use by goldstone_cli/kernels/native.py with the system C compiler and loaded with
 * ctypes; every function has a pure-PyTorch twin (the tests compare them) that runs where no
 * compiler is available. No Python objects: plain pointers, lengths and float64 outputs.
 *
 * Layouts follow DESIGN.md: a parameter Z of shape (T, N, d) is seen as T rows of L = N d numbers.
 */
#include <math.h>
#include <stdint.h>

/* Columns per tile of chain_quadratic: 3 rows of a tile (Z_{t-1}, Z_t, Z_{t+1}) plus the output row
 * stay in the L1/L2 caches while t advances, so Z is read from memory once and out written once. */
#define TILE 2048

/* For columns [c0, c1) of every time step of a chain over T steps (edge weights w[t] of (t, t+1)):
 *     out_t = diag_t Z_t - w_t Z_{t+1} - w_{t-1} Z_{t-1}      (gamma Z + L Z: gradient of Eqs. 3, 9)
 *     sq   += sum Z_t^2                                        (the gamma term of Eq. 9)
 *     psi  += 1/2 w_t sum (Z_{t+1} - Z_t)^2                    (Eq. 3 / Eq. 6)
 * out may be NULL (values only). Sums in float64. */
void gs_chain_quadratic_f32(const float *restrict Z, float *restrict out, const float *w, const float *diag,
                            int64_t T, int64_t L, int64_t c0, int64_t c1, double *sums) {
    double sq = 0.0, psi = 0.0;
    for (int64_t a = c0; a < c1; a += TILE) {
        int64_t b = a + TILE < c1 ? a + TILE : c1;
        for (int64_t t = 0; t < T; ++t) {
            const float *z = Z + t * L;
            const float *zn = t + 1 < T ? z + L : z;      /* Z_{t+1}; unused weight 0 at t = T-1 */
            const float *zp = t > 0 ? z - L : z;          /* Z_{t-1}; unused weight 0 at t = 0 */
            const float wn = t + 1 < T ? w[t] : 0.0f;
            const float wp = t > 0 ? w[t - 1] : 0.0f;
            const float dg = diag[t];
            double s2 = 0.0, e2 = 0.0;
            if (out) {
                float *o = out + t * L;
#pragma omp simd reduction(+ : s2, e2)
                for (int64_t j = a; j < b; ++j) {
                    const float zj = z[j], dj = zn[j] - zj;
                    o[j] = dg * zj - wn * zn[j] - wp * zp[j];
                    s2 += (double)zj * (double)zj;
                    e2 += (double)dj * (double)dj;
                }
            } else {
#pragma omp simd reduction(+ : s2, e2)
                for (int64_t j = a; j < b; ++j) {
                    const float zj = z[j], dj = zn[j] - zj;
                    s2 += (double)zj * (double)zj;
                    e2 += (double)dj * (double)dj;
                }
            }
            sq += s2;
            psi += 0.5 * (double)wn * e2;
        }
    }
    sums[0] = sq;
    sums[1] = psi;
}

/* Ratings ahead whose rows are prefetched (a row of d = 30 floats spans two cache lines). */
#define PREFETCH 16

/* softplus(y) = log(1 + e^y) as torch.nn.functional.softplus (beta 1, threshold 20) computes it. */
static inline float softplus_f(float y) { return y > 20.0f ? y : log1pf(expf(y)); }

/* The ratings' part of Eqs. 8-9 for n ratings at flat rows ru[r] of U (rows of d numbers) and
 * rv[r] of V, labels x[r] = +1/-1: returns sum_r softplus(-x_r u.v) in float64 and, if gU is not
 * NULL, adds the gradient of scale * that sum into gU, gV:
 *     g_r = -x_r sigmoid(-x_r u.v) scale,   gU[ru] += g_r v,   gV[rv] += g_r u
 * in the order of the ratings (as index_add_ on one thread). U has nu rows and V nv rows; a row index
 * outside them stops the loop and returns -1 - r (r: the first bad rating), nothing read out of range. */
double gs_bernoulli_ratings_f32(const float *restrict U, const float *restrict V, const int64_t *ru,
                                const int64_t *rv, const float *x, int64_t n, int64_t d, int64_t nu,
                                int64_t nv, float scale, float *restrict gU, float *restrict gV) {
    double nll = 0.0;
    for (int64_t r = 0; r < n; ++r) {
        if (ru[r] < 0 || ru[r] >= nu || rv[r] < 0 || rv[r] >= nv) return -1.0 - (double)r;
        if (r + PREFETCH < n) { /* the rows of a later rating: V's rows are scattered within a bin */
            const int64_t pu = ru[r + PREFETCH], pv = rv[r + PREFETCH];
            if (pu >= 0 && pu < nu && pv >= 0 && pv < nv) {
                __builtin_prefetch(V + pv * d);
                __builtin_prefetch(V + pv * d + d - 1);
                if (gV) {
                    __builtin_prefetch(gV + pv * d, 1);
                    __builtin_prefetch(gV + pv * d + d - 1, 1);
                }
                __builtin_prefetch(U + pu * d);
                __builtin_prefetch(U + pu * d + d - 1);
            }
        }
        const float *u = U + ru[r] * d, *v = V + rv[r] * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < d; ++k) dot += u[k] * v[k];
        const float xr = x[r], mx = -xr * dot;
        nll += (double)softplus_f(mx);
        if (gU) {
            const float g = -xr * (1.0f / (1.0f + expf(-mx))) * scale;
            float *gu = gU + ru[r] * d, *gv = gV + rv[r] * d;
            for (int64_t k = 0; k < d; ++k) {
                const float uk = u[k], vk = v[k];
                gu[k] += g * vk;
                gv[k] += g * uk;
            }
        }
    }
    return nll;
}
