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
#include <string.h>

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
