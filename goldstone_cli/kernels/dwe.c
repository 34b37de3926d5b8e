/* Fused CPU loop of the dynamic word embeddings' likelihood (issue 16), float32.
 *
 * Built and loaded like movielens.c (goldstone_cli/kernels/native.py). The exponential and log1p
 * below are written out (range reduction + polynomial, no branches, no library calls) so that the
 * compiler vectorizes the loop: one pass over the logits instead of PyTorch's separate softplus,
 * sigmoid and row-sum passes. Accuracy: a few float32 ulps (tests compare with float64). */
#include <stdint.h>

/* e^y for y <= 0, y >= -87 (clamped there: e^-87 = 1.6e-38, the float range's end). Cody-Waite
 * reduction y = n ln2 + r, |r| <= ln2/2, then a degree-6 polynomial for e^r and 2^n from its bits. */
static inline float exp_nonpos(float y) {
    y = y < -87.0f ? -87.0f : y;
    const float n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(y / ln2) */
    float r = y - n * 0.693359375f;                                         /* ln2, high bits (exact) */
    r = r - n * -2.12194440e-4f;                                            /* ln2, low bits */
    const float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23}; /* 2^n (C11: type punning) */
    return p * scale.f;
}

/* log(1 + e) for 0 <= e <= 1 as 2 atanh(s), s = e / (2 + e) <= 1/3 (given as e * inv2, inv2 =
 * 1 / (2 + e)): exact for small e as well (no 1 + e rounding); the series to s^13 leaves a relative
 * error below 2e-8. */
static inline float log1p_unit(float e, float inv2) {
    const float s = e * inv2, s2 = s * s;
    float p = 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

/* X: rows [r0, r1) of a (tb * pb, Q) block of logits, row i at time step i / pb; nb: (tb, Q).
 *     per_row[i] = sum_q nb[i / pb, q] softplus(X[i, q])      (the negatives of Eq. 11's log sigma(-x))
 *     X[i, q]    = sigmoid(X[i, q])                           (in place: the gradient's factor)
 * with softplus(x) = max(x, 0) + log(1 + e^-|x|) and sigmoid from the same e^-|x|. */
void gs_softplus_rows_sigmoid_f32(float *restrict X, const float *restrict nb, int64_t pb, int64_t Q,
                                  int64_t r0, int64_t r1, float *restrict per_row) {
    for (int64_t i = r0; i < r1; ++i) {
        float *x = X + i * Q;
        const float *w = nb + (i / pb) * Q;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t q = 0; q < Q; ++q) {
            const float xq = x[q], ax = xq < 0.0f ? -xq : xq;
            const float e = exp_nonpos(-ax);
            const float inv = 1.0f / ((1.0f + e) * (2.0f + e)); /* one division for both reciprocals */
            const float sp = (xq > 0.0f ? xq : 0.0f) + log1p_unit(e, (1.0f + e) * inv);
            const float s = (2.0f + e) * inv; /* 1 / (1 + e) */
            acc += w[q] * sp;
            x[q] = xq >= 0.0f ? s : e * s;
        }
        per_row[i] = acc;
    }
}

/* The stored positive counts of a minibatch block (Eq. 11's n^+ at the words rows x contexts cols):
 * for every step t and word position p (row t n_rows + rows[p] of the stacked CSR crow / col), each
 * entry whose column c (< n_cols) has a position q = col_pos[c] >= 0 in the block, in (t, p) order.
 * Writes t, p, q and the entry's index into the CSR (for its count) and returns how many; the
 * outputs hold at least the total length of the selected rows. A row or CSR offset out of range
 * stops the loop and returns -1 - (t P + p). */
int64_t gs_block_positives(const int64_t *crow, const int64_t *col, const int64_t *rows, const int64_t *col_pos,
                           int64_t T, int64_t n_rows, int64_t n_cols, int64_t P, int64_t nnz, int64_t *out_t,
                           int64_t *out_p, int64_t *out_q, int64_t *out_idx) {
    int64_t k = 0;
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t p = 0; p < P; ++p) {
            const int64_t w = rows[p];
            if (w < 0 || w >= n_rows) return -1 - (t * P + p);
            const int64_t a = crow[t * n_rows + w], b = crow[t * n_rows + w + 1];
            if (a < 0 || b < a || b > nnz) return -1 - (t * P + p);
            for (int64_t i = a; i < b; ++i) {
                const int64_t c = col[i];
                const int64_t q = (c >= 0 && c < n_cols) ? col_pos[c] : -1;
                if (q >= 0) {
                    out_t[k] = t;
                    out_p[k] = p;
                    out_q[k] = q;
                    out_idx[k] = i;
                    ++k;
                }
            }
        }
    }
    return k;
}
