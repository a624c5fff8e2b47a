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
