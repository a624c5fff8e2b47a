/*
 * Fused, in-place fake-quantization of gathered embedding rows: the QAT hot path.
 *
 * Built and loaded by compress/quant/native.py (plain C, no PyTorch headers, called through ctypes).
 * Each function reproduces, value for value, the PyTorch reference in
 * compress/quant/fake_quant.py:
 *
 *   dqrm_fq_rowwise:   fake_quantize_rowwise_  (FBGEMM's fused N-bit row-wise rule)
 *   dqrm_fq_tablewise: fake_quantize_tablewise_ (DQRM's symmetric table-wise rule)
 *
 * One pass over each row instead of a dozen tensor ops. Exactness needs IEEE float32 arithmetic
 * with no contraction into FMA (-ffp-contract=off) and no fast-math; native.py passes those flags.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#ifndef __FLT16_MAX__
#error "dqrm-compress fake-quant kernels need a compiler with _Float16 (GCC >= 12 or Clang >= 15)"
#endif

/* Round to the nearest fp16 value (ties to even) and back: torch's x.half().float(). */
static inline float fp16_round(float x) { return (float)(_Float16)x; }

/* Round half to even, exact for |v| < 2^22: the callers clamp v to a small integer range first
 * (clamping to integer bounds before rounding gives the same result as rounding before). */
static inline float round_half_even_small(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    float t = v + magic;
    return t - magic;
}

/* FBGEMM's row-wise rule on rows [rows, dim] (contiguous float32), in place:
 *   bias = fp16(min), scale = fp16((max - bias) / (2^b - 1)) (1 when 0),
 *   q = clamp(rint((x - bias) * (1 / scale)), 0, 2^b - 1), x = q * scale + bias. */
void dqrm_fq_rowwise(float *w, int64_t rows, int64_t dim, int32_t bits) {
    const float qmax = (float)((1 << bits) - 1);
    for (int64_t r = 0; r < rows; ++r) {
        float *x = w + r * dim;
        float lo = x[0], hi = x[0];
        for (int64_t j = 1; j < dim; ++j) {
            lo = x[j] < lo ? x[j] : lo;
            hi = x[j] > hi ? x[j] : hi;
        }
        const float bias = fp16_round(lo);
        float scale = fp16_round((hi - bias) / qmax);
        if (scale == 0.0f) scale = 1.0f;
        const float inv = 1.0f / scale;
        for (int64_t j = 0; j < dim; ++j) {
            float v = (x[j] - bias) * inv;
            v = v < 0.0f ? 0.0f : (v > qmax ? qmax : v);
            v = round_half_even_small(v);
            x[j] = v * scale + bias;
        }
    }
}

/* DQRM's table-wise rule on n contiguous float32 values, in place:
 *   x = clamp(rint(x / scale), -2^(b-1), 2^(b-1) - 1) * scale. */
void dqrm_fq_tablewise(float *w, int64_t n, float scale, int32_t bits) {
    const float lo = (float)(-(1 << (bits - 1)));
    const float hi = (float)((1 << (bits - 1)) - 1);
    for (int64_t i = 0; i < n; ++i) {
        float v = w[i] / scale;
        v = v < lo ? lo : (v > hi ? hi : v);
        w[i] = round_half_even_small(v) * scale;
    }
}

/* max |x| of one row, exactly, NaN in -> NaN out (so that a broken table still fails the scale
 * check). Compares the IEEE bit patterns with the sign cleared: for non-negative floats their
 * unsigned order is the numeric order, inf sorts above every finite value and NaN above inf. An
 * integer max vectorizes where a float max with NaN handling does not (~4x faster). */
static inline float row_absmax(const float *x, int64_t dim) {
    uint32_t m = 0;
    for (int64_t j = 0; j < dim; ++j) {
        uint32_t a;
        memcpy(&a, x + j, sizeof a);
        a &= 0x7fffffffu;
        m = a > m ? a : m;
    }
    float r;
    memcpy(&r, &m, sizeof r);
    return r;
}

/* A block summary of max |W| for exact table-wise scales under sparse updates (compress/methods/scale_tracking.py).
 * Rows are grouped in blocks of `block` rows. For block b: bmax[b] is max |w[r, :]| over its rows
 * and barg[b] the row that holds it (its offset in the block), exact unless dirty[b], in which case bmax[b] is an upper
 * bound (the row that held the maximum got smaller) until the block is rescanned. */

static void scan_block(const float *w, int64_t rows, int64_t dim, int64_t block, int64_t b,
                       float *bmax, int32_t *barg, uint8_t *dirty) {
    const int64_t start = b * block, end = start + block < rows ? start + block : rows;
    float m = -1.0f;
    int64_t arg = start;
    for (int64_t r = start; r < end; ++r) {
        const float a = row_absmax(w + r * dim, dim);
        if (a > m || a != a) {
            m = a;
            arg = r;
            if (a != a) break; /* NaN: the block (and the scale) is NaN until this row changes */
        }
    }
    bmax[b] = m < 0.0f ? 0.0f : m;
    barg[b] = (int32_t)(arg - start);
    dirty[b] = 0;
}

/* Summarize every block of w [rows, dim]. */
void dqrm_blocks_build(const float *w, int64_t rows, int64_t dim, int64_t block, float *bmax,
                       int32_t *barg, uint8_t *dirty) {
    const int64_t nblocks = (rows + block - 1) / block;
    for (int64_t b = 0; b < nblocks; ++b) scan_block(w, rows, dim, block, b, bmax, barg, dirty);
}

/* Rescan the dirty blocks; returns how many there were. */
int64_t dqrm_blocks_rescan(const float *w, int64_t rows, int64_t dim, int64_t block, float *bmax,
                           int32_t *barg, uint8_t *dirty) {
    const int64_t nblocks = (rows + block - 1) / block;
    int64_t n = 0;
    for (int64_t b = 0; b < nblocks; ++b) {
        if (dirty[b]) {
            scan_block(w, rows, dim, block, b, bmax, barg, dirty);
            ++n;
        }
    }
    return n;
}

/* After rows ids[0..n) changed: a row now at least the block's maximum becomes it; the row that
 * held the maximum, if smaller now, leaves an upper bound and marks the block dirty. */
void dqrm_blocks_update(const float *w, int64_t dim, int64_t block, const int64_t *ids, int64_t n,
                        float *bmax, int32_t *barg, uint8_t *dirty) {
    for (int64_t i = 0; i < n; ++i) {
        const int64_t r = ids[i], b = r / block;
        const int32_t k = (int32_t)(r - b * block);
        const float a = row_absmax(w + r * dim, dim);
        if (a >= bmax[b] || a != a) {
            bmax[b] = a;
            barg[b] = k;
        } else if (k == barg[b]) {
            dirty[b] = 1;
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Conversion: quantize whole rows into the stored (packed) form, one pass per row.
 *
 *   dqrm_rowwise_quantize:   compress/quant/fbgemm_rowwise.py rowwise_quantize_packed, byte for
 *                            byte FBGEMM's FloatToFusedNBitRowwiseQuantizedSBHalf (AVX2 kernel),
 *                            the sign of a zero bias included
 *   dqrm_tablewise_quantize: compress/quant/tablewise.py tablewise_quantize_packed
 *
 * Codes are packed low bits first: byte k holds codes k*per .. k*per+per-1, code p at bits
 * p*bits.. (per = 8 / bits). The loops are written so that the compiler vectorizes them: codes of
 * a block of columns into a small float buffer, then packed by exact float sums (every partial
 * sum is a whole number below 256). */

#define DQRM_LANES 8   /* float32 lanes of FBGEMM's AVX2 min/max scan */
#define DQRM_BLOCK 512 /* columns (values) quantized per inner step; a multiple of 8 */

/* The zero FBGEMM's AVX2 scan reports as the min of a row whose min is zero (+0.0 or -0.0): 8
 * lanes take lane = minps(lane, block) over whole blocks of 8 columns (ties return the newer
 * value), are folded 0..7 with std::min (ties keep the earlier), then the D % 8 tail columns with
 * std::min (ties keep). So the zero of the first lane that has one, from that lane's last block,
 * wins; else the first zero of the tail. The same rule as _fbgemm_zero_extremum. */
static float fbgemm_zero_min(const float *x, int64_t dim) {
    const int64_t full = dim / DQRM_LANES * DQRM_LANES;
    for (int64_t lane = 0; lane < DQRM_LANES && lane < full; ++lane) {
        for (int64_t j = full - DQRM_LANES + lane; j >= 0; j -= DQRM_LANES) {
            if (x[j] == 0.0f) return x[j];
        }
    }
    for (int64_t j = full; j < dim; ++j) {
        if (x[j] == 0.0f) return x[j];
    }
    return 0.0f; /* not reached for a row whose min is zero */
}

/* 8 float32 lanes (GCC/Clang vector extensions: AVX where the build enables it, else narrower
 * vectors or scalars). */
typedef float dqrm_v8f __attribute__((vector_size(32)));
typedef int32_t dqrm_v8i __attribute__((vector_size(32)));

static inline dqrm_v8f v8_load(const float *p) {
    dqrm_v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* m ? a : b per lane (m all ones or all zeros). */
static inline dqrm_v8f v8_select(dqrm_v8i m, dqrm_v8f a, dqrm_v8f b) {
    return (dqrm_v8f)((m & (dqrm_v8i)a) | (~m & (dqrm_v8i)b));
}

/* Min and max of a row, and whether it holds a NaN; 8 lanes over whole blocks of 8 columns,
 * then the tail (the min's value is the row's min in any order; its sign when zero is settled by
 * fbgemm_zero_min). */
static inline int row_minmax(const float *x, int64_t dim, float *lo_out, float *hi_out) {
    const int64_t full = dim / DQRM_LANES * DQRM_LANES;
    float lo = x[0], hi = x[0];
    int nan = 0;
    if (full) {
        dqrm_v8f l = v8_load(x), h = l;
        dqrm_v8i n = l != l;
        for (int64_t b = DQRM_LANES; b < full; b += DQRM_LANES) {
            const dqrm_v8f v = v8_load(x + b);
            l = v8_select(v < l, v, l);
            h = v8_select(v > h, v, h);
            n |= v != v;
        }
        lo = l[0];
        hi = h[0];
        for (int k = 0; k < DQRM_LANES; ++k) {
            lo = l[k] < lo ? l[k] : lo;
            hi = h[k] > hi ? h[k] : hi;
            nan |= n[k];
        }
    }
    for (int64_t j = full; j < dim; ++j) {
        lo = x[j] < lo ? x[j] : lo;
        hi = x[j] > hi ? x[j] : hi;
        nan |= x[j] != x[j];
    }
    *lo_out = lo;
    *hi_out = hi;
    return nan;
}

/* Pack n float codes (whole numbers in [0, 2^bits - 1]; n a multiple of 8 / bits) into bytes. */
static inline void pack_codes(const float *q, int64_t n, int32_t bits, uint8_t *out) {
    if (bits == 8) {
        for (int64_t k = 0; k < n; ++k) out[k] = (uint8_t)(int32_t)q[k];
    } else if (bits == 4) {
        for (int64_t k = 0; k < n / 2; ++k) out[k] = (uint8_t)(int32_t)(q[2 * k] + 16.0f * q[2 * k + 1]);
    } else {
        for (int64_t k = 0; k < n / 4; ++k) {
            out[k] = (uint8_t)(int32_t)(q[4 * k] + 4.0f * q[4 * k + 1] + 16.0f * q[4 * k + 2] +
                                        64.0f * q[4 * k + 3]);
        }
    }
}

static inline uint16_t half_bits(float v) {
    _Float16 h = (_Float16)v;
    uint16_t b;
    memcpy(&b, &h, sizeof b);
    return b;
}

static inline int finite_half(uint16_t b) { return (b & 0x7c00u) != 0x7c00u; }

#define DQRM_ROWS 8 /* rows whose scale and bias are computed together */

/* Row-wise quantize rows [rows, dim] (contiguous float32) into packed [rows, dim*bits/8] and the
 * fp16 bits of each row's scale and bias. Returns -1, or the first row whose scale or bias is not
 * a finite fp16 number (a NaN, an inf, or a range beyond fp16); the rows of its group of
 * DQRM_ROWS before it are written. Per row, in float32 (FBGEMM's rule): bias = fp16(min),
 * scale = fp16((max - bias) / (2^b - 1)) (1 when the range or the rounded scale is 0),
 * q = clamp(rint((x - bias) * (1 / scale)), 0, 2^b - 1). */
int64_t dqrm_rowwise_quantize(const float *w, int64_t rows, int64_t dim, int32_t bits,
                              uint8_t *packed, uint16_t *scale_out, uint16_t *bias_out) {
    const float qmax = (float)((1 << bits) - 1);
    const int64_t nb = dim * bits / 8;
    float q[DQRM_BLOCK];
    for (int64_t r0 = 0; r0 < rows; r0 += DQRM_ROWS) {
        const int64_t m = rows - r0 < DQRM_ROWS ? rows - r0 : DQRM_ROWS;
        float lo[DQRM_ROWS] = {0}, hi[DQRM_ROWS] = {0}, bias[DQRM_ROWS], inv[DQRM_ROWS];
        uint16_t scale16[DQRM_ROWS], bias16[DQRM_ROWS];
        for (int64_t i = 0; i < m; ++i) {
            const float *x = w + (r0 + i) * dim;
            if (row_minmax(x, dim, lo + i, hi + i)) return r0 + i;
            if (lo[i] == 0.0f) lo[i] = fbgemm_zero_min(x, dim);
        }
        for (int i = 0; i < DQRM_ROWS; ++i) { /* vectorized over the rows */
            bias16[i] = half_bits(lo[i]);
            bias[i] = fp16_round(lo[i]);
            const float range = hi[i] - bias[i];
            float scale = fp16_round(range == 0.0f ? 1.0f : range / qmax);
            scale = scale == 0.0f ? 1.0f : scale;
            float v = 1.0f / scale;
            /* 1/scale overflowed: cannot with an fp16 scale; FBGEMM's rule */
            const int bad = v - v != 0.0f;
            scale = bad ? 1.0f : scale;
            inv[i] = bad ? 1.0f : v;
            scale16[i] = half_bits(scale);
        }
        for (int64_t i = 0; i < m; ++i) {
            if (!finite_half(scale16[i]) || !finite_half(bias16[i])) return r0 + i;
            const int64_t r = r0 + i;
            const float *x = w + r * dim;
            const float b = bias[i], s = inv[i];
            scale_out[r] = scale16[i];
            bias_out[r] = bias16[i];
            for (int64_t c = 0; c < dim; c += DQRM_BLOCK) {
                const int64_t n = dim - c < DQRM_BLOCK ? dim - c : DQRM_BLOCK;
                for (int64_t j = 0; j < n; ++j) {
                    float v = (x[c + j] - b) * s;
                    v = v < 0.0f ? 0.0f : (v > qmax ? qmax : v);
                    q[j] = round_half_even_small(v);
                }
                pack_codes(q, n, bits, packed + r * nb + c * bits / 8);
            }
        }
    }
    return -1;
}

/* Table-wise quantize n contiguous float32 values (whole rows) into packed unsigned codes
 * clamp(rint(x / scale), -2^(b-1), 2^(b-1) - 1) + 2^(b-1); n a multiple of 8 / bits. */
void dqrm_tablewise_quantize(const float *w, int64_t n, float scale, int32_t bits,
                             uint8_t *packed) {
    const float lo = (float)(-(1 << (bits - 1)));
    const float hi = (float)((1 << (bits - 1)) - 1);
    const float offset = (float)(1 << (bits - 1));
    float q[DQRM_BLOCK];
    for (int64_t c = 0; c < n; c += DQRM_BLOCK) {
        const int64_t m = n - c < DQRM_BLOCK ? n - c : DQRM_BLOCK;
        for (int64_t j = 0; j < m; ++j) {
            float v = w[c + j] / scale;
            v = v < lo ? lo : (v > hi ? hi : v);
            q[j] = round_half_even_small(v) + offset;
        }
        pack_codes(q, m, bits, packed + c * bits / 8);
    }
}

/* max |x| over n contiguous float32 values as IEEE bits with the sign cleared: the value's bits
 * when every value is finite, at least 0x7f800000 (inf) when one is inf or NaN (NaN above inf).
 * One integer pass (see row_absmax): the finite check of a loaded table and its max|W|. */
uint32_t dqrm_absmax_bits(const float *x, int64_t n) {
    uint32_t m = 0;
    for (int64_t j = 0; j < n; ++j) {
        uint32_t a;
        memcpy(&a, x + j, sizeof a);
        a &= 0x7fffffffu;
        m = a > m ? a : m;
    }
    return m;
}


/* ------------------------------------------------------------------------------------------------
 * L2 ranges (compress/quant/l2_ranges.py): per-row scale and bias chosen to minimize the row's L2
 * quantization error.
 *
 * 1. The greedy range search of Guan et al. 2019 ("Post-training 4-bit quantization on embedding
 *    tables"), value for value PyTorch's choose_qparams_optimized (what
 *    torch.ops.quantized.embedding_bag_4bit_prepack / _2bit_prepack run with optimized_qparams):
 *      xmin, xmax = min(x) (the first minimum, as std::min_element), max(x)
 *      step = (xmax - xmin) / nbins; thr = int(nbins * (1 - ratio)) * step
 *      loss(a, b): bias = fp16(a), scale = fp16((b - bias) / (2^bits - 1)) (1 when b - bias is 0),
 *        inv = 1 / scale (1 when scale is 0), q = clamp(rint((x - bias) * inv), 0, 2^bits - 1),
 *        sqrt(sum over the columns, in order, of (x - (q * scale + bias))^2), all in float32
 *      walk: while cur_min + thr < cur_max: l1 = loss(cur_min + step, cur_max),
 *        l2 = loss(cur_min, cur_max - step); the current range becomes the best when
 *        cur < l1, cur < l2 and cur < best; then move to the smaller of l1, l2 (a tie moves max).
 *    The best range gives FBGEMM's stored parameters (range_params).
 * 2. Optionally `refine` least-squares steps (HQQ-style alternating minimization): for the codes
 *    of the current parameters, the scale and bias that minimize the error in closed form, rounded
 *    to fp16; kept only when the row's error (float64, of the values as stored) falls.
 *
 * Each lane of L2_LANES follows one row (its column sums stay sequential, so the losses are
 * PyTorch's to the bit); the lane loops are written for the compiler to vectorize. L2_MAX_STEPS
 * bounds the walk where float steps stop moving the range (PyTorch's loop would not end). The
 * search is compiled once per instruction set where GCC can clone functions (x86-64), so AVX-512
 * and AVX2 machines use their widest vectors; every clone performs the same IEEE operations. */

#define L2_LANES 16
#define L2_FOR _Pragma("GCC unroll 1") for (int k = 0; k < L2_LANES; ++k)
#define L2_MAX_STEPS_PER_BIN 4

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define L2_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define L2_CLONES
#endif
#define L2_INLINE static inline __attribute__((always_inline))

/* fp16(in) per lane, as float32 (F16C vector conversions where the build has them). */
L2_INLINE void l2_half(const float *in, float *out) {
#if defined(__F16C__)
    for (int k = 0; k < L2_LANES; k += 8) {
        const __m256 v = _mm256_loadu_ps(in + k);
        _mm256_storeu_ps(out + k, _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)));
    }
#else
    L2_FOR { out[k] = (float)(_Float16)in[k]; }
#endif
}

/* fp16(x) per lane as float32, in float arithmetic that vectorizes (no conversion instructions):
 * x rounded to a multiple of fp16's unit in the last place at x, 2^max(e - 10, -24) for
 * 2^e <= |x| < 2^(e + 1), by adding and subtracting 1.5 * 2^(ulp exponent + 23) (round to nearest
 * even, as the conversion); beyond 65504 the result becomes inf. The same value as
 * (float)(_Float16)x for every finite x, except that a zero result is +0.0 (the sign of a zero
 * does not change the loss: only l2_loss_params uses it). */
L2_INLINE void l2_half_value(const float *in, float *out) {
    L2_FOR {
        uint32_t u;
        memcpy(&u, in + k, sizeof u);
        int32_t e = (int32_t)((u >> 23) & 0xffu) - 127 - 10;
        e = e < -24 ? -24 : (e > 5 ? 5 : e);
        const uint32_t cbits = ((uint32_t)(e + 23 + 127) << 23) | 0x400000u;
        float c;
        memcpy(&c, &cbits, sizeof c);
        const float r = (in[k] + c) - c;
        const float inf = __builtin_inff();
        out[k] = r > 65504.0f ? inf : (r < -65504.0f ? -inf : r);
    }
}

/* Parameters of ranges [lo, hi] as the search's loss uses them (no FBGEMM corner rule for a scale
 * that rounds to 0: the loss keeps scale 0 with inv 1, as PyTorch's does). */
L2_INLINE void l2_loss_params(const float *lo, const float *hi, float qmax, float *b, float *s,
                              float *inv) {
    float q[L2_LANES], h[L2_LANES], span[L2_LANES];
    l2_half_value(lo, h);
    L2_FOR {
        span[k] = hi[k] - h[k];
        q[k] = span[k] / qmax;
    }
    l2_half_value(q, q);
    L2_FOR {
        const float sc = span[k] == 0.0f ? 1.0f : q[k];
        const float v = 1.0f / sc;
        b[k] = h[k];
        s[k] = sc;
        inv[k] = sc == 0.0f ? 1.0f : v;
    }
}

/* The search's losses of two parameter sets (b1, s1, i1) and (b2, s2, i2) for the rows xt
 * [dim][L2_LANES], in one pass. */
L2_INLINE void l2_losses(const float *xt, int64_t dim, float qmax, const float *b1,
                         const float *s1, const float *i1, const float *b2, const float *s2,
                         const float *i2, float *n1, float *n2) {
    float a1[L2_LANES], a2[L2_LANES];
    L2_FOR { a1[k] = a2[k] = 0.0f; }
    for (int64_t j = 0; j < dim; ++j) {
        const float *x = xt + j * L2_LANES;
        L2_FOR {
            float t1 = (x[k] - b1[k]) * i1[k], t2 = (x[k] - b2[k]) * i2[k];
            /* clamp to [0, qmax] as max/min instructions (a -0 becomes +0: the same loss) */
            t1 = t1 > 0.0f ? t1 : 0.0f;
            t2 = t2 > 0.0f ? t2 : 0.0f;
            t1 = __builtin_rintf(qmax < t1 ? qmax : t1);
            t2 = __builtin_rintf(qmax < t2 ? qmax : t2);
            const float d1 = x[k] - (t1 * s1[k] + b1[k]), d2 = x[k] - (t2 * s2[k] + b2[k]);
            a1[k] += d1 * d1;
            a2[k] += d2 * d2;
        }
    }
    L2_FOR {
        n1[k] = __builtin_sqrtf(a1[k]);
        n2[k] = __builtin_sqrtf(a2[k]);
    }
}

/* The greedy walk for L2_LANES rows (transposed in xt) from their minima and maxima; the chosen
 * ranges into lo, hi. */
L2_INLINE void l2_walk(const float *xt, int64_t dim, float qmax, int64_t nbins, float ratio,
                       const float *xmin, const float *xmax, float *lo, float *hi) {
    float step[L2_LANES], thr[L2_LANES], best[L2_LANES], cmin[L2_LANES], cmax[L2_LANES];
    float closs[L2_LANES], up[L2_LANES], down[L2_LANES], l1[L2_LANES], l2[L2_LANES];
    float b1[L2_LANES], s1[L2_LANES], i1[L2_LANES], b2[L2_LANES], s2[L2_LANES], i2[L2_LANES];
    int32_t active[L2_LANES];
    const int min_bins = (int)((double)nbins * (1.0 - (double)ratio));
    L2_FOR {
        step[k] = (xmax[k] - xmin[k]) / (float)nbins;
        thr[k] = (float)min_bins * step[k];
        cmin[k] = lo[k] = xmin[k];
        cmax[k] = hi[k] = xmax[k];
    }
    l2_loss_params(xmin, xmax, qmax, b1, s1, i1);
    l2_losses(xt, dim, qmax, b1, s1, i1, b1, s1, i1, closs, l2);
    int32_t any = 0;
    L2_FOR {
        best[k] = closs[k];
        active[k] = -(cmin[k] + thr[k] < cmax[k]);
    }
    L2_FOR { any |= active[k]; }
    const int64_t limit = nbins * L2_MAX_STEPS_PER_BIN;
    for (int64_t it = 0; it < limit && any; ++it) {
        L2_FOR {
            up[k] = cmin[k] + step[k];
            down[k] = cmax[k] - step[k];
        }
        l2_loss_params(up, cmax, qmax, b1, s1, i1);
        l2_loss_params(cmin, down, qmax, b2, s2, i2);
        l2_losses(xt, dim, qmax, b1, s1, i1, b2, s2, i2, l1, l2);
        L2_FOR {
            const float c = closs[k];
            const int32_t local = active[k] & -(c < l1[k]) & -(c < l2[k]) & -(c < best[k]);
            const int32_t left = -(l1[k] < l2[k]);
            best[k] = local ? c : best[k];
            lo[k] = local ? cmin[k] : lo[k];
            hi[k] = local ? cmax[k] : hi[k];
            cmin[k] = (active[k] & left) ? up[k] : cmin[k];
            cmax[k] = (active[k] & ~left) ? down[k] : cmax[k];
            closs[k] = active[k] ? (left ? l1[k] : l2[k]) : c;
            active[k] &= -(cmin[k] + thr[k] < cmax[k]);
        }
        any = 0;
        L2_FOR { any |= active[k]; }
    }
}

/* FBGEMM's stored parameters of a range [lo, hi]: bias = fp16(lo), scale = fp16((hi - bias) /
 * (2^b - 1)), 1 when the range or the rounded scale is 0 (or 1/scale overflows). fp16 rounding
 * keeps the sign of a zero bias. */
L2_INLINE void l2_stored_params(const float *lo, const float *hi, float qmax, float *b, float *s) {
    float q[L2_LANES];
    l2_half(lo, b);
    L2_FOR { q[k] = hi[k] - b[k] == 0.0f ? 1.0f : (hi[k] - b[k]) / qmax; }
    l2_half(q, s);
    L2_FOR {
        const float sc = s[k] == 0.0f ? 1.0f : s[k];
        const float v = 1.0f / sc;
        s[k] = v - v != 0.0f ? 1.0f : sc;
    }
}

/* The float64 error of the rows as stored with (b, s), and the sums of their codes q, q^2 and
 * x * q (sequential over the columns). */
L2_INLINE void l2_stored_error(const float *xt, int64_t dim, float qmax, const float *b,
                               const float *s, double *err, double *sq, double *sqq,
                               double *sxq) {
    float inv[L2_LANES];
    L2_FOR {
        inv[k] = 1.0f / s[k];
        err[k] = sq[k] = sqq[k] = sxq[k] = 0.0;
    }
    for (int64_t j = 0; j < dim; ++j) {
        const float *x = xt + j * L2_LANES;
        L2_FOR {
            float t = (x[k] - b[k]) * inv[k];
            t = t < 0.0f ? 0.0f : t;
            t = __builtin_rintf(t > qmax ? qmax : t);
            const double d = (double)x[k] - (double)(t * s[k] + b[k]);
            err[k] += d * d;
            sq[k] += (double)t;
            sqq[k] += (double)t * (double)t;
            sxq[k] += (double)x[k] * (double)t;
        }
    }
}

/* `refine` least-squares steps from the stored parameters (b, s), in place (see above). */
L2_INLINE void l2_refine(const float *xt, int64_t dim, float qmax, int32_t refine, float *b,
                         float *s) {
    double err[L2_LANES], sq[L2_LANES], sqq[L2_LANES], sxq[L2_LANES], sx[L2_LANES];
    double err2[L2_LANES], sq2[L2_LANES], sqq2[L2_LANES], sxq2[L2_LANES];
    float nb[L2_LANES], ns[L2_LANES], cs[L2_LANES], cb[L2_LANES];
    int32_t live[L2_LANES];
    const double n = (double)dim;
    L2_FOR { sx[k] = 0.0; }
    for (int64_t j = 0; j < dim; ++j) {
        L2_FOR { sx[k] += (double)xt[j * L2_LANES + k]; }
    }
    l2_stored_error(xt, dim, qmax, b, s, err, sq, sqq, sxq);
    L2_FOR { live[k] = 1; }
    for (int32_t it = 0; it < refine; ++it) {
        int any = 0;
        L2_FOR {
            const double den = n * sqq[k] - sq[k] * sq[k];
            const double slope = den > 0.0 ? (n * sxq[k] - sq[k] * sx[k]) / den : 0.0;
            cs[k] = (float)slope;
            cb[k] = (float)((sx[k] - slope * sq[k]) / n);
        }
        l2_half(cs, cs);
        l2_half(cb, cb);
        L2_FOR {
            const double den = n * sqq[k] - sq[k] * sq[k];
            const float v = 1.0f / cs[k];
            const int ok = live[k] & (den > 0.0) & (cs[k] > 0.0f) & (cs[k] - cs[k] == 0.0f) &
                           (cb[k] - cb[k] == 0.0f) & (v - v == 0.0f);
            ns[k] = ok ? cs[k] : s[k];
            nb[k] = ok ? cb[k] : b[k];
            live[k] = ok;
            any |= ok;
        }
        if (!any) break;
        l2_stored_error(xt, dim, qmax, nb, ns, err2, sq2, sqq2, sxq2);
        any = 0;
        L2_FOR {
            const int take = live[k] & (err2[k] < err[k]);
            b[k] = take ? nb[k] : b[k];
            s[k] = take ? ns[k] : s[k];
            err[k] = take ? err2[k] : err[k];
            sq[k] = take ? sq2[k] : sq[k];
            sqq[k] = take ? sqq2[k] : sqq[k];
            sxq[k] = take ? sxq2[k] : sxq[k];
            live[k] = take;
            any |= take;
        }
        if (!any) break;
    }
}

/* Per-row stored scale and bias (float32 holding fp16 values; a zero bias keeps its sign) of
 * rows [rows, dim] (contiguous float32) by the greedy walk (nbins, ratio), then `refine`
 * least-squares steps. Returns -1; -2 when its scratch (dim * L2_LANES floats) cannot be
 * allocated; or the first row holding a NaN or an inf (its group of L2_LANES rows and the rows
 * after are not written). */
L2_CLONES
int64_t dqrm_l2_params(const float *w, int64_t rows, int64_t dim, int32_t bits, int64_t nbins,
                       float ratio, int32_t refine, float *scale_out, float *bias_out) {
    const float qmax = (float)((1 << bits) - 1);
    float *xt = malloc((size_t)dim * L2_LANES * sizeof(float));
    if (xt == NULL) return -2;
    for (int64_t r0 = 0; r0 < rows; r0 += L2_LANES) {
        const int64_t m = rows - r0 < L2_LANES ? rows - r0 : L2_LANES;
        float xmin[L2_LANES] = {0}, xmax[L2_LANES] = {0}, lo[L2_LANES], hi[L2_LANES];
        float b[L2_LANES], s[L2_LANES];
        for (int64_t i = 0; i < m; ++i) {
            const float *x = w + (r0 + i) * dim;
            float a = x[0], z = x[0], bad = 0.0f;
            for (int64_t j = 0; j < dim; ++j) {
                const float v = x[j];
                bad += v - v; /* NaN once a value is a NaN or an inf */
                a = v < a ? v : a; /* the first minimum, as std::min_element */
                z = v > z ? v : z;
                xt[j * L2_LANES + i] = v;
            }
            if (bad != 0.0f || bad != bad) {
                free(xt);
                return r0 + i;
            }
            xmin[i] = a;
            xmax[i] = z;
        }
        for (int64_t i = m; i < L2_LANES; ++i) {
            for (int64_t j = 0; j < dim; ++j) xt[j * L2_LANES + i] = 0.0f;
        }
        l2_walk(xt, dim, qmax, nbins, ratio, xmin, xmax, lo, hi);
        l2_stored_params(lo, hi, qmax, b, s);
        if (refine > 0) l2_refine(xt, dim, qmax, refine, b, s);
        for (int64_t i = 0; i < m; ++i) {
            scale_out[r0 + i] = s[i];
            bias_out[r0 + i] = b[i];
        }
    }
    free(xt);
    return -1;
}

/* Quantize rows [rows, dim] with the given per-row scale and bias (float32 holding fp16 values)
 * into packed codes q = clamp(rint((x - bias) * (1 / scale)), 0, 2^b - 1) and the fp16 bits of
 * scale and bias. Returns -1, or the first row whose scale or bias is not a finite fp16 number
 * (rows before it are written). */
int64_t dqrm_rowwise_quantize_params(const float *w, int64_t rows, int64_t dim, int32_t bits,
                                     const float *scale, const float *bias, uint8_t *packed,
                                     uint16_t *scale_out, uint16_t *bias_out) {
    const float qmax = (float)((1 << bits) - 1);
    const int64_t nb = dim * bits / 8;
    float q[DQRM_BLOCK];
    for (int64_t r = 0; r < rows; ++r) {
        scale_out[r] = half_bits(scale[r]);
        bias_out[r] = half_bits(bias[r]);
        if (!finite_half(scale_out[r]) || !finite_half(bias_out[r])) return r;
        const float *x = w + r * dim;
        const float b = bias[r], inv = 1.0f / scale[r];
        for (int64_t c = 0; c < dim; c += DQRM_BLOCK) {
            const int64_t n = dim - c < DQRM_BLOCK ? dim - c : DQRM_BLOCK;
            for (int64_t j = 0; j < n; ++j) {
                float v = (x[c + j] - b) * inv;
                v = v < 0.0f ? 0.0f : (v > qmax ? qmax : v);
                q[j] = round_half_even_small(v);
            }
            pack_codes(q, n, bits, packed + r * nb + c * bits / 8);
        }
    }
    return -1;
}

/* Fake-quantize rows [rows, dim] in place with per-row scale and bias (float32 holding fp16
 * values): x = q * scale + bias with the codes dqrm_rowwise_quantize_params stores. */
void dqrm_fq_rowwise_params(float *w, int64_t rows, int64_t dim, int32_t bits, const float *scale,
                            const float *bias) {
    const float qmax = (float)((1 << bits) - 1);
    for (int64_t r = 0; r < rows; ++r) {
        float *x = w + r * dim;
        const float b = bias[r], s = scale[r], inv = 1.0f / s;
        for (int64_t j = 0; j < dim; ++j) {
            float v = (x[j] - b) * inv;
            v = v < 0.0f ? 0.0f : (v > qmax ? qmax : v);
            x[j] = round_half_even_small(v) * s + b;
        }
    }
}
