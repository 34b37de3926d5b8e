/* Fused CPU loops of the dynamic word embeddings' step (issue 16), float32 data, float64 sums:
 * the likelihood's pointwise pass over the logits, the variational chain terms (forward and
 * analytic backward) and the minibatch's positive counts (goldstone_cli/models/dwe.py has their
 * PyTorch twins; tests/test_native_kernels.py compares them).
 *
 * Built and loaded like movielens.c (goldstone_cli/kernels/native.py). The exponential, log1p and
 * log are written out in fastmath.h (range reduction + polynomial, no library calls) so that the
 * compiler vectorizes the loops (the exponential's polynomial is the classic minimax one of Cephes'
 * expf). Accuracy: a few float32 ulps. Lessons (measured on a Zen 1 core): keep float64 reductions out of
 * a vectorized float32 loop (GCC then emits scalar code); sum each row in float and add the rows in
 * float64. Split long pointwise chains (exponential -> division -> log1p) into short loops over
 * L1-resident buffers: the out-of-order window holds less than two iterations of the fused loop, so
 * its latency, not its instruction count, set the speed (1.6-1.7x faster split). No conditional stores
 * inside a vectorized loop (GCC if-converts them into masked stores, microcoded on AMD); make the
 * condition a constant of an inlined call instead. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fastmath.h"

/* Up to CHAIN_CHUNK numbers of one position of gs_chain_terms_fwd_f32 (last: the step T-1, a
 * constant at each call site; off, yn, sn, a unused there). One e^-|r| gives b = softplus(r) as
 * torch computes it (beta 1: max(r, 0) + log(1 + e^-|r|)) and sigmoid(r), with one division for
 * 1/(1+e) and 1/(2+e); the backward pass reads 1/b and sigmoid(r) from here instead of computing
 * them again. sum log b is the log of a product: the exponents of the b's add up as integers, their
 * mantissas (in [1, 2)) multiply, at most CHAIN_CHUNK of them (< 2^128: no overflow), and one log
 * per chunk (instead of one per number) finishes it. Split into short loops over L1-resident
 * buffers like logits_row (long dependency chains overflow the out-of-order
 * window). */
#define CHAIN_CHUNK 120

/* The sum of the b = softplus(r) of a chunk that are inf or NaN: chain_fwd_chunk's rare case (an
 * r = +inf, whose b's bits would give a finite log where torch.log gives inf), out of its loops. */
__attribute__((noinline, cold)) static float nonfinite_logs(const float *rr, const float *sb, int64_t n) {
    float sum = 0.0f;
    for (int64_t k = 0; k < n; ++k) {
        const float r = rr[k], bt = (r > 0.0f ? r : 0.0f) + log1p_atanh(sb[k]);
        if (!(bt < __builtin_inff())) sum += bt;
    }
    return sum;
}

static inline void chain_fwd_chunk(const int last, const float *restrict rr, const float *restrict oo,
                                   const float *restrict ep, const float *restrict mp, const float *restrict yn,
                                   const float *restrict sn, float *restrict ibp, float *restrict gp,
                                   float *restrict ap, float *restrict yp, float *restrict sp, float *restrict xp,
                                   int64_t n, float *s_out, float *c_out, float *l_out) {
    float eb[CHAIN_CHUNK], sb[CHAIN_CHUNK]; /* e^-|r|, e / (2 + e) */
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) eb[k] = exp_nonpos(-__builtin_fabsf(rr[k]));
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
        const float r = rr[k], e = eb[k];
        const float inv = 1.0f / ((1.0f + e) * (2.0f + e));
        const float sg = (2.0f + e) * inv; /* 1 / (1 + e) */
        sb[k] = e * ((1.0f + e) * inv);
        gp[k] = r >= 0.0f ? sg : e * sg;
    }
    float mant = 1.0f, rmax = 0.0f; /* rmax: b = softplus(r) is infinite only for r = +inf */
    int32_t expo = 0;
#pragma omp simd reduction(+ : expo) reduction(* : mant) reduction(max : rmax)
    for (int64_t k = 0; k < n; ++k) {
        const float r = rr[k], bt = (r > 0.0f ? r : 0.0f) + log1p_atanh(sb[k]); /* softplus(r) */
        ibp[k] = 1.0f / bt;
        union { float f; int32_t i; } v = {.f = bt}; /* b = 2^(E - 127) m, b normal (e >= e^-87) */
        expo += ((v.i >> 23) & 0xff) - 127;
        v.i = (v.i & 0x007fffff) | 0x3f800000;
        mant *= v.f;
        rmax = r > rmax ? r : rmax; /* one max per number (an integer flag of the exponent cost 5%) */
    }
    float s1 = 0.0f, c1 = 0.0f;
    if (last) {
#pragma omp simd reduction(+ : s1)
        for (int64_t k = 0; k < n; ++k) {
            const float ib = ibp[k], yt = ep[k] * ib, st = ib * ib;
            yp[k] = yt, sp[k] = st, xp[k] = mp[k] + yt;
            s1 += st;
        }
    } else {
#pragma omp simd reduction(+ : s1, c1)
        for (int64_t k = 0; k < n; ++k) {
            const float ib = ibp[k], at = oo[k] * ib, tmp = at * sn[k];
            const float yt = ep[k] * ib - at * yn[k], st = ib * ib + at * tmp;
            ap[k] = at, yp[k] = yt, sp[k] = st, xp[k] = mp[k] + yt;
            s1 += st, c1 += tmp;
        }
    }
    /* log b summed; an infinite b adds inf (torch.log's value: the loss stays non-finite); a NaN r
     * reaches S through 1/b (NaN) already */
    float lb = (float)expo * 0.693147180559945f + log_pos(mant);
    if (rmax == __builtin_inff()) lb += nonfinite_logs(rr, sb, n);
    *s_out += s1, *c_out += c1, *l_out += lb;
}

static inline void chain_fwd_row(const int last, const float *restrict rr, const float *restrict oo,
                                 const float *restrict ep, const float *restrict mp, const float *restrict yn,
                                 const float *restrict sn, float *restrict ibp, float *restrict gp,
                                 float *restrict ap, float *restrict yp, float *restrict sp, float *restrict xp,
                                 int64_t d, float *s_out, float *c_out, float *l_out) {
    *s_out = 0.0f, *c_out = 0.0f, *l_out = 0.0f;
    for (int64_t k0 = 0; k0 < d; k0 += CHAIN_CHUNK) {
        const int64_t n = d - k0 < CHAIN_CHUNK ? d - k0 : CHAIN_CHUNK;
        chain_fwd_chunk(last, rr + k0, last ? NULL : oo + k0, ep + k0, mp + k0, last ? NULL : yn + k0,
                        last ? NULL : sn + k0, ibp + k0, gp + k0, last ? NULL : ap + k0, yp + k0, sp + k0, xp + k0,
                        n, s_out, c_out, l_out);
    }
}

/* The variational chain terms of one posterior (goldstone_cli/models/dwe.py, _ChainTerms: the
 * sample x = mu + B^-T eps, the marginal variances and the per-step sums of the prior's covariance
 * part and the entropy), forward in one pass over t = T-1 .. 0 for the slice of positions
 * [p0, p1) of P (each d numbers). raw (T, R, d) and off (T-1, R, d) are whole parameters whose row
 * rows[p] belongs to position p (rows NULL: R = P, row p). mu, eps, y, s, x: (T, P, d); a:
 * (T-1, P, d); ib = 1/b and sg = sigmoid(raw) (T, P, d) for the backward pass. Adds the slice's
 * sum_t-partials S_t = sum s_t, C_t = sum a_t s_t+1, Lb_t = sum log b_t into S (T), C (T-1), Lb (T),
 * in float64. */
void gs_chain_terms_fwd_f32(const float *restrict mu, const float *restrict raw, const float *restrict off,
                            const int64_t *rows, int64_t R, const float *restrict eps, int64_t T, int64_t P,
                            int64_t d, int64_t p0, int64_t p1, float *restrict ib, float *restrict sg,
                            float *restrict a, float *restrict y, float *restrict s, float *restrict x, double *S,
                            double *C, double *Lb) {
    const int64_t n = P * d;
    for (int64_t t = T - 1; t >= 0; --t) {
        double s_sum = 0.0, c_sum = 0.0, l_sum = 0.0;
        const int last = t == T - 1;
        for (int64_t p = p0; p < p1; ++p) {
            const int64_t row = rows ? rows[p] : p;
            const float *rr = raw + (t * R + row) * d;
            const int64_t o = t * n + p * d;
            float s1, c1, l1; /* one position's d numbers (set by chain_fwd_row): float, then added in float64 */
            if (last)
                chain_fwd_row(1, rr, NULL, eps + o, mu + o, NULL, NULL, ib + o, sg + o, NULL, y + o, s + o, x + o, d,
                              &s1, &c1, &l1);
            else
                chain_fwd_row(0, rr, off + (t * R + row) * d, eps + o, mu + o, y + o + n, s + o + n, ib + o, sg + o,
                              a + o, y + o, s + o, x + o, d, &s1, &c1, &l1);
            s_sum += s1, c_sum += c1, l_sum += l1;
        }
        S[t] += s_sum;
        Lb[t] += l_sum;
        if (!last) C[t] += c_sum;
    }
}

/* One position's d numbers of gs_chain_terms_bwd_f32 at one step. The flags are constants at every
 * call site (first: t = 0, last: t = T-1, acc: add into the gradients of gathered rows, deps: the
 * eps gradient wanted), so each call compiles to a loop without branches or masked stores (AMD's
 * masked stores are microcoded; without them, and with 1/b and sigmoid(raw) from the forward pass,
 * the backward went from 16.6 to 8-11 ns per number). */
static inline void chain_bwd_row(const int first, const int last, const int acc, const int want_eps,
                                 const float *restrict ib, const float *restrict sg, const float *restrict ep,
                                 const float *restrict gp, const float *restrict ap_prev, const float *restrict at,
                                 const float *restrict sn, const float *restrict yn, float *restrict lp,
                                 float *restrict np, float *restrict dr, float *restrict dof, float *restrict dp,
                                 float h, float gwp, float gwt, float gf, int64_t d) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) {
        float lk = gp[k], nk = h;
        if (!first) {
            const float apk = ap_prev[k];
            lk -= apk * lp[k];                  /* lam_t = gx_t - a_t-1 lam_t-1 */
            nk += (np[k] * apk + gwp) * apk;    /* nu_t = h_t + a_t-1 (g w_t-1 + a_t-1 nu_t-1) */
        }
        lp[k] = lk, np[k] = nk;
        const float ibk = ib[k];
        float r = -2.0f * (nk * ibk) * ibk - lk * ep[k] * ibk + gf; /* g - lam eps / b - 2 nu / b^2 */
        if (want_eps) dp[k] = lk * ibk;
        if (!last) {
            const float atk = at[k];
            const float da = (2.0f * (atk * nk) + gwt) * sn[k] - lk * yn[k];
            r -= atk * da;
            if (acc) dof[k] += da * ibk; else dof[k] = da * ibk; /* dl_t = da_t / b_t */
        }
        const float gr = r * ibk * sg[k]; /* draw_t = db_t sigmoid(raw_t), db_t = r / b_t */
        if (acc) dr[k] += gr; else dr[k] = gr;
    }
}

#define CHAIN_BWD_CASE(m)                                                                                         \
    case m:                                                                                                       \
        chain_bwd_row((m) & 1, ((m) >> 1) & 1, ((m) >> 2) & 1, ((m) >> 3) & 1, ibp, sgp, ep, gp, ap_prev, at_, sn, \
                      yn, lp, np, dr, dof, dp, h, gwp, gwt, gf, d);                                               \
        break;

/* Zeroes the rows of one step's dense gradient rows g (R rows of d numbers) that the slice [p0, p1)
 * of the strictly increasing rows (P of them) owns and does not write: those after rows[p0-1] (from
 * row 0 for p0 = 0) up to its last row, and up to R for the last slice (p1 = P). */
static void zero_gaps(float *g, const int64_t *rows, int64_t R, int64_t P, int64_t d, int64_t p0, int64_t p1) {
    int64_t lo = p0 > 0 ? rows[p0 - 1] + 1 : 0;
    for (int64_t p = p0; p <= p1; ++p) {
        const int64_t hi = p < p1 ? rows[p] : (p1 == P ? R : lo);
        if (hi > lo) memset(g + lo * d, 0, (size_t)((hi - lo) * d) * sizeof(float));
        if (p < p1) lo = rows[p] + 1;
    }
}

/* The backward pass of gs_chain_terms_fwd_f32 for positions [p0, p1), t = 0 .. T-1 (the adjoints of
 * both recurrences run forward in t; the formulas of _ChainTerms.backward): ib, sg, a, y, s from the
 * forward pass, gx (T, P, d) the sample's incoming gradient, g the terms' incoming gradient, w (T-1)
 * the chain weights, half_iv = 1/(2 sigma_0^2); lam, nu: (P, d) scratch. Writes deps (T, P, d; may
 * be NULL) and the raw / off gradients: without rows into draw (T, P, d) / doff (T-1, P, d); with
 * rows into the rows of the dense draw (T, R, d) / doff (T-1, R, d): with fill (rows strictly
 * increasing) it writes them and zeroes the rows between (zero_gaps: every number of the dense
 * gradients written once, no zero-filled buffer read back), else it ADDS into them (rows must not
 * repeat within a slice handled by another thread). */
void gs_chain_terms_bwd_f32(const int64_t *rows, int64_t R, const float *restrict ib, const float *restrict sg,
                            const float *restrict a, const float *restrict y, const float *restrict s,
                            const float *restrict eps, const float *restrict gx, double g, const double *w,
                            double half_iv, int64_t T, int64_t P, int64_t d, int64_t p0, int64_t p1,
                            float *restrict lam, float *restrict nu, float *restrict draw, float *restrict doff,
                            float *restrict deps, int64_t fill) {
    const int64_t n = P * d;
    const float gf = (float)g;
    const int acc = rows != NULL && !fill;
    for (int64_t t = 0; t < T; ++t) {
        const float h = (float)(g * (half_iv + (t < T - 1 ? 0.5 * w[t] : 0.0) + (t > 0 ? 0.5 * w[t - 1] : 0.0)));
        const float gwp = t > 0 ? (float)(g * w[t - 1]) : 0.0f, gwt = t < T - 1 ? (float)(g * w[t]) : 0.0f;
        const int first = t == 0, last = t == T - 1;
        const int mode = first | (last << 1) | (acc << 2) | ((deps != NULL) << 3);
        if (rows && fill) {
            zero_gaps(draw + t * R * d, rows, R, P, d, p0, p1);
            if (!last) zero_gaps(doff + t * R * d, rows, R, P, d, p0, p1);
        }
        for (int64_t p = p0; p < p1; ++p) {
            const int64_t row = rows ? rows[p] : p;
            const int64_t o = t * n + p * d;
            const float *ibp = ib + o, *sgp = sg + o, *ep = eps + o, *gp = gx + o;
            float *lp = lam + p * d, *np = nu + p * d;
            float *dr = rows ? draw + (t * R + row) * d : draw + o;
            float *dp = deps ? deps + o : NULL;
            const float *ap_prev = first ? NULL : a + o - n;
            const float *at_ = last ? NULL : a + o, *sn = last ? NULL : s + o + n, *yn = last ? NULL : y + o + n;
            float *dof = last ? NULL : (rows ? doff + (t * R + row) * d : doff + o);
            if (rows && p + 1 < p1) { /* the next position's gradient rows: scattered, the prefetcher misses them */
                const int64_t nx = t * R + rows[p + 1];
                for (int64_t k = 0; k < d; k += 16) {
                    __builtin_prefetch(draw + nx * d + k, 1);
                    if (!last) __builtin_prefetch(doff + nx * d + k, 1);
                }
            }
            switch (mode) {
                CHAIN_BWD_CASE(0) CHAIN_BWD_CASE(1) CHAIN_BWD_CASE(2) CHAIN_BWD_CASE(3)
                CHAIN_BWD_CASE(4) CHAIN_BWD_CASE(5) CHAIN_BWD_CASE(6) CHAIN_BWD_CASE(7)
                CHAIN_BWD_CASE(8) CHAIN_BWD_CASE(9) CHAIN_BWD_CASE(10) CHAIN_BWD_CASE(11)
                CHAIN_BWD_CASE(12) CHAIN_BWD_CASE(13) CHAIN_BWD_CASE(14) CHAIN_BWD_CASE(15)
            }
        }
    }
}
#undef CHAIN_BWD_CASE

/* One row x of Q logits with the weights w of its time step (nb[t]):
 *     returns sum_q w[q] softplus(x[q])      (the negatives of Eq. 11's log sigma(-x))
 *     x[q] = sigmoid(x[q])                   (in place: the gradient's factor)
 * with softplus(x) = max(x, 0) + log(1 + e^-|x|) and sigmoid from the same e^-|x|.
 *
 * Three loops per LOGITS_CHUNK numbers of a row (the exponential; the one division and the
 * sigmoid; log1p and the weighted sum) with the intermediates in L1-resident buffers: one loop doing
 * all of it is one ~130-cycle dependency chain per 8 logits, and the out-of-order window holds less
 * than two of those (a 256-bit instruction is two micro-ops on Zen 1), so it ran at 4.8 ns per logit;
 * split, 2.8 ns (4M-logit blocks, one thread, 2-core AMD EPYC machine). */
#define LOGITS_CHUNK 512
static inline float logits_row(float *restrict xr, const float *restrict wr, int64_t Q, const int scaled, float c,
                               const int64_t *restrict pq, int64_t j, int64_t j1, float *restrict saved) {
    float eb[LOGITS_CHUNK], sb[LOGITS_CHUNK], mb[LOGITS_CHUNK]; /* e^-|x|, e / (2 + e), max(x, 0) */
    float acc = 0.0f;
    for (int64_t q0 = 0; q0 < Q; q0 += LOGITS_CHUNK) {
        const int64_t n = Q - q0 < LOGITS_CHUNK ? Q - q0 : LOGITS_CHUNK;
        float *x = xr + q0;
        const float *w = wr + q0;
#pragma omp simd
        for (int64_t q = 0; q < n; ++q) eb[q] = exp_nonpos(-__builtin_fabsf(x[q])); /* fabs: one vandps */
        /* the row's positives [j, j1) (columns pq in increasing order) in this chunk: their logits
         * saved while the chunk is in L1, before the next loop overwrites them */
        for (; j < j1 && pq[j] < q0 + n; ++j) saved[j] = x[pq[j] - q0];
#pragma omp simd
        for (int64_t q = 0; q < n; ++q) {
            const float xq = x[q], e = eb[q];
            const float inv = 1.0f / ((1.0f + e) * (2.0f + e)); /* one division for both reciprocals */
            const float s = (2.0f + e) * inv;                     /* 1 / (1 + e) */
            sb[q] = e * ((1.0f + e) * inv);                       /* e / (2 + e) */
            mb[q] = xq > 0.0f ? xq : 0.0f;
            const float sig = xq >= 0.0f ? s : e * s;
            x[q] = scaled ? (c * w[q]) * sig : sig; /* scaled: G / (-r), the rank-one factor applied */
        }
#pragma omp simd reduction(+ : acc)
        for (int64_t q = 0; q < n; ++q) acc += w[q] * (mb[q] + log1p_atanh(sb[q]));
    }
    return acc;
}

/* The row of the block (tb, pb, Q) that holds the positive entry j (step pt - t0, position pp - p0),
 * or -1 if it lies outside the block (its column too). */
static inline int64_t positive_row(const int64_t *pt, const int64_t *pp, const int64_t *pq, int64_t j, int64_t t0,
                                   int64_t p0, int64_t tb, int64_t pb, int64_t Q) {
    const int64_t t = pt[j] - t0, p = pp[j] - p0, q = pq[j];
    return (t < 0 || t >= tb || p < 0 || p >= pb || q < 0 || q >= Q) ? -1 : t * pb + p;
}

/* The first of the k positive entries (sorted by row) whose row is >= r, for a valid sorted list;
 * entries outside the block count as row -1 here and are reported by the caller's checks. */
static int64_t first_positive_at(const int64_t *pt, const int64_t *pp, const int64_t *pq, int64_t k, int64_t r,
                                 int64_t t0, int64_t p0, int64_t tb, int64_t pb, int64_t Q) {
    int64_t lo = 0, hi = k;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (positive_row(pt, pp, pq, mid, t0, p0, tb, pb, Q) < r) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* The n log sigma(x) terms of the positives [j0, j1) of one row, summed in float; their logits x
 * are xr[pq[j]] (the row not yet overwritten) or, with xr NULL, adj[j] (saved by logits_row);
 * adj[j] = n sigma(-x) / scale[j] (scale NULL: n sigma(-x) inv, one factor for all), to be added to
 * the row after the logits pass. */
#define POS_CHUNK 256
static inline float positives_of_row(const float *restrict xr, const int64_t *restrict pq, const float *restrict n,
                                     const float *restrict scale, float inv, int64_t j0, int64_t j1,
                                     float *restrict adj) {
    float xb[POS_CHUNK], eb[POS_CHUNK];
    float part = 0.0f;
    for (int64_t c0 = j0; c0 < j1; c0 += POS_CHUNK) {
        const int64_t m = j1 - c0 < POS_CHUNK ? j1 - c0 : POS_CHUNK;
        for (int64_t i = 0; i < m; ++i) xb[i] = xr ? xr[pq[c0 + i]] : adj[c0 + i];
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) eb[i] = exp_nonpos(-__builtin_fabsf(xb[i]));
        const float *nn = n + c0, *sc = scale ? scale + c0 : NULL;
        float *ad = adj + c0;
#pragma omp simd reduction(+ : part)
        for (int64_t i = 0; i < m; ++i) {
            const float xi = xb[i], e = eb[i];
            const float inv = 1.0f / ((1.0f + e) * (2.0f + e));
            const float ls = (xi < 0.0f ? xi : 0.0f) - log1p_atanh(e * ((1.0f + e) * inv)); /* log sigma(x) */
            const float sneg = (xi >= 0.0f ? e : 1.0f) * ((2.0f + e) * inv);                /* sigma(-x) */
            part += nn[i] * ls;
            ad[i] = nn[i] * sneg;
        }
        if (sc) {
#pragma omp simd
            for (int64_t i = 0; i < m; ++i) ad[i] /= sc[i];
        } else {
#pragma omp simd
            for (int64_t i = 0; i < m; ++i) ad[i] *= inv;
        }
    }
    return part;
}

/* logits_row on the rows [r0, r1) of one logits block X (tb, pb, Q), per_row[i] its result, with
 * the block's positive counts (Eq. 11's n log sigma(x) and the gradient's n sigma(-x); none: k = 0):
 * k entries sorted by row, with steps pt, positions pp and columns pq, counts n and the gradient's
 * rank-one factor scale. Row by row, while the row is in cache: the row's positives read x, then
 * the logits pass overwrites the row with sigmoid(x), then X[row, q] += adj = n sigma(-x) / scale
 * for each of them in order (index_add_'s result). With row factors cr (tb pb of them, c_p of each
 * row; scale then unused, NULL) the row becomes cr[i] nb_q sigmoid(x) and adj = n sigma(-x) inv:
 * with inv = -1/r the block is G / (-r) (G the gradient with respect to the logits, Eq. 11) and
 * needs no scaling pass. *loglik gets sum n log sigma(x) over the rows' entries (float per row,
 * float64 across rows). Each call finds its own entries by binary search, so calls on disjoint row
 * ranges cover every entry once and can run concurrently. Returns 0, or -1 - j for the first of
 * its entries that lies outside the block or out of row order (nothing trusted then). */
int64_t gs_logits_block_f32(float *restrict X, const float *restrict nb, int64_t tb, int64_t pb, int64_t Q, int64_t r0,
                            int64_t r1, float *restrict per_row, const int64_t *restrict pt,
                            const int64_t *restrict pp, const int64_t *restrict pq, const float *restrict n,
                            const float *restrict scale, int64_t k, int64_t t0, int64_t p0, float *restrict adj,
                            const float *restrict cr, float inv, double *loglik) {
    const int64_t j0 = r0 <= 0 ? 0 : first_positive_at(pt, pp, pq, k, r0, t0, p0, tb, pb, Q);
    const int64_t jend = r1 >= tb * pb ? k : first_positive_at(pt, pp, pq, k, r1, t0, p0, tb, pb, Q);
    int64_t prev = r0;
    for (int64_t j = j0; j < jend; ++j) { /* checked first: the rows below trust these entries */
        const int64_t r = positive_row(pt, pp, pq, j, t0, p0, tb, pb, Q);
        if (r < prev || r >= r1) return -1 - j;
        prev = r;
    }
    double total = 0.0;
    int64_t j = j0;
    for (int64_t i = r0; i < r1; ++i) {
        float *xr = X + i * Q;
        int64_t je = j;
        int increasing = 1; /* the row's columns in order (as block_positives gives them) */
        while (je < jend && (pt[je] - t0) * pb + (pp[je] - p0) == i) {
            increasing &= je == j || pq[je] >= pq[je - 1];
            ++je;
        }
        const float *wr = nb + (i / pb) * Q;
        const float *sc = cr ? NULL : scale;
        if (increasing) { /* the positives' logits saved by the pass (the row in L1), then their terms */
            per_row[i] = cr ? logits_row(xr, wr, Q, 1, cr[i], pq, j, je, adj)
                            : logits_row(xr, wr, Q, 0, 0.0f, pq, j, je, adj);
            if (je > j) total += positives_of_row(NULL, pq, n, sc, inv, j, je, adj);
        } else { /* read first, scattered over the row (from memory) */
            total += positives_of_row(xr, pq, n, sc, inv, j, je, adj);
            per_row[i] = cr ? logits_row(xr, wr, Q, 1, cr[i], pq, je, je, adj)
                            : logits_row(xr, wr, Q, 0, 0.0f, pq, je, je, adj);
        }
        for (int64_t jj = j; jj < je; ++jj) xr[pq[jj]] += adj[jj];
        j = je;
    }
    *loglik = total;
    return 0;
}

/* The stored positive counts of a minibatch block (Eq. 11's n^+ at the words rows x contexts cols)
 * at the T steps: for every step t and word position p (row t n_rows + rows[p] of the stacked CSR
 * crow / col), each entry whose column c (< n_cols) has a position q = col_pos[c] >= 0 in the
 * block, in (t, p) order. Writes t, p, q and the entry's index into the CSR (for its count) to
 * out_t, out_p, out_q, out_idx (and its float32 count val[i] to out_val if val is not NULL) and
 * returns how many; the outputs hold at least the total length of the selected rows (every entry
 * is written at the next free place, which only a kept one advances: half the entries are dropped,
 * a branch on it was mispredicted half the time). A row or CSR offset out of range stops the loop
 * and returns -1 - (t P + p). */
int64_t gs_block_positives(const int64_t *crow, const int64_t *col, const int64_t *rows, const int64_t *col_pos,
                           int64_t n_rows, int64_t n_cols, int64_t P, int64_t nnz, int64_t T, int64_t *out_t,
                           int64_t *out_p, int64_t *out_q, int64_t *out_idx, const float *val, float *out_val) {
    int64_t k = 0;
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t p = 0; p < P; ++p) {
            const int64_t w = rows[p];
            if (w < 0 || w >= n_rows) return -1 - (t * P + p);
            const int64_t a = crow[t * n_rows + w], b = crow[t * n_rows + w + 1];
            if (a < 0 || b < a || b > nnz) return -1 - (t * P + p);
            for (int64_t i = a; i < b; ++i) { /* written always, kept if q >= 0: no branch to mispredict */
                const int64_t c = col[i];
                const int64_t q = (c >= 0 && c < n_cols) ? col_pos[c] : -1;
                out_t[k] = t;
                out_p[k] = p;
                out_q[k] = q;
                out_idx[k] = i;
                if (val) out_val[k] = val[i]; /* the same branch for every entry: predicted */
                k += q >= 0;
            }
        }
    }
    return k;
}

/* Row gathers of a (T, R, d) parameter at the minibatch rows (P of them) for the steps [t0, t1):
 * out[t, p] = x[t, rows[p]] (gs_rows_gather_f32, the forward's x[:, rows]) and x[t, rows[p]] +=
 * src[t, p] (gs_rows_add_f32, its gradient added into a dense one, in the order of p as index_add_).
 * Different steps never share a row: callers split [0, T) over threads. Rows must lie in [0, R)
 * (checked by the caller). The next row is prefetched: the rows are scattered. */
void gs_rows_gather_f32(const float *restrict x, const int64_t *rows, int64_t R, int64_t P, int64_t d, int64_t t0,
                        int64_t t1, float *restrict out) {
    for (int64_t t = t0; t < t1; ++t) {
        const float *xt = x + t * R * d;
        float *ot = out + t * P * d;
        for (int64_t p = 0; p < P; ++p) {
            if (p + 1 < P)
                for (int64_t k = 0; k < d; k += 16) __builtin_prefetch(xt + rows[p + 1] * d + k);
            const float *xr = xt + rows[p] * d;
            float *orow = ot + p * d;
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) orow[k] = xr[k];
        }
    }
}

void gs_rows_add_f32(float *restrict x, const int64_t *rows, int64_t R, int64_t P, int64_t d, int64_t t0, int64_t t1,
                     const float *restrict src) {
    for (int64_t t = t0; t < t1; ++t) {
        float *xt = x + t * R * d;
        const float *st = src + t * P * d;
        for (int64_t p = 0; p < P; ++p) {
            if (p + 1 < P)
                for (int64_t k = 0; k < d; k += 16) __builtin_prefetch(xt + rows[p + 1] * d + k, 1);
            float *xr = xt + rows[p] * d;
            const float *sr = st + p * d;
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) xr[k] += sr[k];
        }
    }
}
