/* lmforge weight-only quantized kernels: INT8 and INT4 group-wise weights times float activations.

   Layout (what lmforge.quant.pack writes, and what GGUF's Q8_0 / Q4_0 / Q4_1 blocks hold for group 32):
   - INT8: q (N, K) int8, w = d * q, one fp16 scale d per group of `group` weights along K.
   - INT4: q (N, K / 2) bytes; within each 32-weight block, byte i holds weight i in its low nibble and weight
     i + 16 in its high nibble; w = d * q + m with q in 0..15, fp16 d and m per group.
   Decoding streams every weight once per token, so fewer bytes per weight is more tokens per second; the work
   per byte must stay below what memory delivers. As llama.cpp does on AVX2, the activations are quantized to
   int8 in blocks of 32 (one float scale each) once per call, and each 32-weight block becomes one integer dot
   product (maddubs: unsigned 8-bit times signed 8-bit) and one fused multiply-add of its scales. The INT4 offset
   term needs only the (rounded) activation group sums: sum_i (d q_i + m) x_i = d sum_i q_i x_i + m sum_i x_i.
   Prefill (many rows) does not come here: lmf_dequant_q expands a matrix to fp32 for MKL's GEMM. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "simd.h"

#define PARALLEL_MIN 65536  /* weights below which one thread is faster than waking a second */

/* x (M, K) -> xq int8 (M, K), xd (M, K/32) block scales, xs (M, K/group) group sums of the rounded x. */
static void quantize_rows(const float* x, int M, int K, int group, int8_t* xq, float* xd, float* xs) {
    int nb = K / QBLOCK, ng = K / group;
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < ng; g++) xs[m * ng + g] = 0.0f;
        for (int b = 0; b < nb; b++) {
            const float* v = x + (size_t)m * K + (size_t)b * QBLOCK;
            float amax = 0.0f;
            for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(v[i]));
            float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            xd[m * nb + b] = d;
            int8_t* out = xq + (size_t)m * K + (size_t)b * QBLOCK;
            int sum = 0;
            for (int i = 0; i < QBLOCK; i++) {
                out[i] = (int8_t)lrintf(v[i] * inv);
                sum += out[i];
            }
            /* The sum of the rounded values, not of x: then sum_i (d q_i + m) x_i uses one x throughout, and the
               rounding error of x meets the weights themselves (mean near 0) rather than q_i (mean near 7.5). */
            xs[m * ng + b * QBLOCK / group] += d * (float)sum;
        }
    }
}

/* The activation side of one call, quantized once and shared by every output row. */
typedef struct {
    const int8_t* xq;
    const float* xd;
    const float* xs;
    int M, K, group;
    int shift; /* log2(group / 32): block b has scale b >> shift (a division here costs more than the block) */
} Acts;

#ifdef __AVX2__
/* sum over the 32 lanes of u (unsigned bytes) * s (signed bytes), as 8 int32 lanes turned float. */
static inline __m256 dot_u8s8(__m256i u, __m256i s) {
    __m256i p16 = _mm256_maddubs_epi16(u, s); /* pairs: |15 * 127 * 2| and |127 * 127 * 2| fit int16 */
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

#endif

#ifdef __AVX2__
/* 32 nibbles of one INT4 block as bytes 0..15, in weight order: the 16 bytes in both lanes, the upper lane
   shifted down a nibble (three instructions). */
static inline __m256i unpack_q4_fast(const uint8_t* q) {
    __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)q));
    both = _mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

/* The combined scales d_w * d_x of blocks b0..b0+n-1 (n <= 8), as floats in `out`. For a full chunk of eight the
   weight scales (8 >> shift distinct fp16 values) are widened and spread with one permute, not eight conversions. */
static inline void block_scales(const uint16_t* d, const float* xd, int b0, int n, int shift, float out[8]) {
    if (n < 8) { /* a row's last, partial chunk */
        for (int j = 0; j < n; j++) out[j] = h2f(d[(b0 + j) >> shift]) * xd[b0 + j];
        return;
    }
    __m128i h;
    const uint16_t* src = d + (b0 >> shift);
    if (shift == 0) {
        h = _mm_loadu_si128((const __m128i*)src);
    } else if (shift == 1) {
        h = _mm_loadl_epi64((const __m128i*)src);
    } else {
        int32_t two;
        memcpy(&two, src, sizeof two);
        h = _mm_cvtsi32_si128(two);
    }
    __m256i lane = _mm256_srlv_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(shift));
    __m256 dw = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), lane);
    _mm256_storeu_ps(out, _mm256_mul_ps(dw, _mm256_loadu_ps(xd + b0)));
}

/* A row's INT4 sum once its blocks are in: the offset term, eight groups at a time (a scalar loop here would be a
   latency chain as long as the rest), then the two accumulators. Not inlined, so that the one-row and the many-row
   kernels run the very same instructions here (-ffast-math may compile an inlined copy differently). */
__attribute__((noinline)) static float q4_finish(__m256 acc0, __m256 acc1, const uint16_t* mn, const float* xs,
                                                 int ng) {
    int g = 0;
    for (; g + 8 <= ng; g += 8)
        acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mn + g))), _mm256_loadu_ps(xs + g),
                               acc1);
    float off = 0.0f;
    for (; g < ng; g++) off += h2f(mn[g]) * xs[g];
    return hsum(_mm256_add_ps(acc0, acc1)) + off;
}

/* The one-row case (a single conversation decoding), kept apart so that everything stays in registers: two
   accumulators in turn hide the multiply-add latency, block b going to acc[b & 1]. */
static float q4_row1(const uint8_t* q, const uint16_t* d, const uint16_t* mn, const Acts* a) {
    int nb = a->K / QBLOCK, shift = a->shift, ng = a->K / a->group;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float sc[8];
    for (int b = 0; b < nb; b += 8) {
        int n = nb - b < 8 ? nb - b : 8;
        block_scales(d, a->xd, b, n, shift, sc);
        for (int j = 0; j < n; j++) {
            __m256i x = _mm256_loadu_si256((const __m256i*)(a->xq + (size_t)(b + j) * QBLOCK));
            __m256 dot = dot_u8s8(unpack_q4_fast(q + (size_t)(b + j) * 16), x);
            if (j & 1)
                acc1 = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(sc + j), acc1);
            else
                acc0 = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(sc + j), acc0);
        }
    }
    return q4_finish(acc0, acc1, mn, a->xs, ng);
}

static float q8_row1(const int8_t* q, const uint16_t* d, const Acts* a) {
    int nb = a->K / QBLOCK, shift = a->shift;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float sc[8];
    for (int b = 0; b < nb; b += 8) {
        int n = nb - b < 8 ? nb - b : 8;
        block_scales(d, a->xd, b, n, shift, sc);
        for (int j = 0; j < n; j++) {
            const int8_t* qb = q + (size_t)(b + j) * QBLOCK;
            __m256i w = _mm256_loadu_si256((const __m256i*)qb);
            __m256i x = _mm256_loadu_si256((const __m256i*)(a->xq + (size_t)(b + j) * QBLOCK));
            __m256 dot = dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)); /* |w| times x with w's sign */
            if (j & 1)
                acc1 = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(sc + j), acc1);
            else
                acc0 = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(sc + j), acc0);
        }
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}
#endif

/* out[m] = dot(row n of an INT4 matrix, x[m]) for every activation row m. Each row adds up exactly as q4_row1
   does (block b into acc[b & 1][m], the same scale products, the same q4_finish), so its result does not depend
   on how many rows share the call: a server's greedy replies are the same idle or busy (serve.scheduler). */
static void q4_row(const uint8_t* q, const uint16_t* d, const uint16_t* mn, const Acts* a, float* out) {
    int nb = a->K / QBLOCK, per = a->group / QBLOCK, ng = a->K / a->group;
#ifdef __AVX2__
    __m256 acc[2][MAX_M];
    for (int m = 0; m < a->M; m++) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        float dg = h2f(d[g]);
        for (int s = 0; s < per; s++) {
            int b = g * per + s;
            __m256i w = unpack_q4_fast(q + (size_t)b * 16);
            for (int m = 0; m < a->M; m++) {
                __m256i xv = _mm256_loadu_si256((const __m256i*)(a->xq + (size_t)m * a->K + (size_t)b * QBLOCK));
                __m256 scale = _mm256_set1_ps(dg * a->xd[m * nb + b]);
                acc[b & 1][m] = _mm256_fmadd_ps(dot_u8s8(w, xv), scale, acc[b & 1][m]);
            }
        }
    }
    for (int m = 0; m < a->M; m++) out[m] = q4_finish(acc[0][m], acc[1][m], mn, a->xs + (size_t)m * ng, ng);
#else
    float off[MAX_M] = {0};
    for (int m = 0; m < a->M; m++) {
        float total = 0.0f;
        for (int b = 0; b < nb; b++) {
            const uint8_t* qb = q + (size_t)b * 16;
            const int8_t* xb = a->xq + (size_t)m * a->K + (size_t)b * QBLOCK;
            int32_t sum = 0;
            for (int i = 0; i < 16; i++) sum += (qb[i] & 0x0f) * xb[i] + (qb[i] >> 4) * xb[i + 16];
            total += h2f(d[b >> shift]) * a->xd[m * nb + b] * (float)sum;
        }
        for (int g = 0; g < ng; g++) off[m] += h2f(mn[g]) * a->xs[m * ng + g];
        out[m] = total + off[m];
    }
#endif
}

/* out[m] = dot(row n of an INT8 matrix, x[m]) for every activation row m; each row adds up as q8_row1 does. */
static void q8_row(const int8_t* q, const uint16_t* d, const Acts* a, float* out) {
    int nb = a->K / QBLOCK, per = a->group / QBLOCK, ng = a->K / a->group;
#ifdef __AVX2__
    __m256 acc[2][MAX_M];
    for (int m = 0; m < a->M; m++) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        float dg = h2f(d[g]);
        for (int s = 0; s < per; s++) {
            int b = g * per + s;
            __m256i w = _mm256_loadu_si256((const __m256i*)(q + (size_t)b * QBLOCK));
            __m256i wabs = _mm256_sign_epi8(w, w); /* |w| as unsigned; the sign moves onto x */
            for (int m = 0; m < a->M; m++) {
                __m256i xv = _mm256_loadu_si256((const __m256i*)(a->xq + (size_t)m * a->K + (size_t)b * QBLOCK));
                __m256 dot = dot_u8s8(wabs, _mm256_sign_epi8(xv, w));
                acc[b & 1][m] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dg * a->xd[m * nb + b]), acc[b & 1][m]);
            }
        }
    }
    for (int m = 0; m < a->M; m++) out[m] = hsum(_mm256_add_ps(acc[0][m], acc[1][m]));
#else
    for (int m = 0; m < a->M; m++) {
        float total = 0.0f;
        for (int b = 0; b < nb; b++) {
            const int8_t* qb = q + (size_t)b * QBLOCK;
            const int8_t* xb = a->xq + (size_t)m * a->K + (size_t)b * QBLOCK;
            int32_t sum = 0;
            for (int i = 0; i < QBLOCK; i++) sum += qb[i] * xb[i];
            total += h2f(d[b >> shift]) * a->xd[m * nb + b] * (float)sum;
        }
        out[m] = total;
    }
#endif
}

/* y (M, sum N_i) = x (M, K) @ [W_0; W_1; ...]^T + biases, for `count` quantized matrices of one scheme that read
   the same input, as if stacked (q|k|v, gate|up). qs[i]: packed weights; ds[i], ms[i]: fp16 scales and INT4
   offsets (ms unused for INT8); biases[i] may be NULL. 1 <= M <= 8; K a multiple of `group`, itself of 32.
   The _team form runs inside an enclosing parallel region, with scratch for the quantized activations:
   xq (M * K), xd (M * K / 32), xs (M * K / 32) (see kernels.h). */
void lmf_linear_q_team(const float* x, const void* const* qs, const uint16_t* const* ds, const uint16_t* const* ms,
                       const float* const* biases, const int* ns, int count, int bits, int group, float* y, int M,
                       int K, int8_t* xq, float* xd, float* xs) {
#pragma omp single
    quantize_rows(x, M, K, group, xq, xd, xs);
    Acts a = {xq, xd, xs, M, K, group, __builtin_ctz((unsigned)(group / QBLOCK))};
    long starts[9] = {0}; /* index of the first row of matrix i; count <= 8 */
    size_t ldy = 0;
    for (int i = 0; i < count; i++) {
        starts[i + 1] = starts[i] + ns[i];
        ldy += (size_t)ns[i];
    }
    size_t row_bytes = bits == 4 ? (size_t)K / 2 : (size_t)K, ng = (size_t)K / group;
#pragma omp for schedule(static)
    for (long r = 0; r < starts[count]; r++) {
        int i = 0;
        size_t col = 0;
        while (r >= starts[i + 1]) col += (size_t)ns[i++];
        size_t n = (size_t)(r - starts[i]);
        float out[MAX_M];
        const uint8_t* q = (const uint8_t*)qs[i] + n * row_bytes;
#ifdef __AVX2__
        if (M == 1)
            out[0] = bits == 4 ? q4_row1(q, ds[i] + n * ng, ms[i] + n * ng, &a)
                               : q8_row1((const int8_t*)q, ds[i] + n * ng, &a);
        else
#endif
            if (bits == 4)
            q4_row(q, ds[i] + n * ng, ms[i] + n * ng, &a, out);
        else
            q8_row((const int8_t*)q, ds[i] + n * ng, &a, out);
        float b = biases[i] ? biases[i][n] : 0.0f;
        for (int m = 0; m < M; m++) y[(size_t)m * ldy + col + n] = out[m] + b;
    }
}

void lmf_linear_q(const float* x, const void* const* qs, const uint16_t* const* ds, const uint16_t* const* ms,
                  const float* const* biases, const int* ns, int count, int bits, int group, float* y, int M, int K) {
    int8_t* xq = malloc((size_t)M * K);
    float* xd = malloc(sizeof(float) * (size_t)M * (K / QBLOCK));
    float* xs = malloc(sizeof(float) * (size_t)M * (K / QBLOCK));
    size_t total = 0;
    for (int i = 0; i < count; i++) total += (size_t)ns[i] * (size_t)K;
#pragma omp parallel if (total >= PARALLEL_MIN)
    lmf_linear_q_team(x, qs, ds, ms, biases, ns, count, bits, group, y, M, K, xq, xd, xs);
    free(xq);
    free(xd);
    free(xs);
}

/* out (N, K) float = the matrix a quantized weight stands for (prefill runs a float GEMM on it). */
void lmf_dequant_q(const void* qv, const uint16_t* d, const uint16_t* mn, int bits, int group, int N, int K,
                   float* out) {
    size_t ng = (size_t)K / group, nb = (size_t)K / QBLOCK, per = (size_t)group / QBLOCK;
#pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++) {
        for (size_t b = 0; b < nb; b++) {
            size_t g = (size_t)n * ng + b / per;
            float dg = h2f(d[g]), mg = bits == 4 ? h2f(mn[g]) : 0.0f;
            float* o = out + (size_t)n * K + b * QBLOCK;
            if (bits == 8) {
                const int8_t* q = (const int8_t*)qv + (size_t)n * K + b * QBLOCK;
                for (int i = 0; i < QBLOCK; i++) o[i] = dg * (float)q[i];
            } else {
                const uint8_t* q = (const uint8_t*)qv + ((size_t)n * nb + b) * 16;
                for (int i = 0; i < 16; i++) {
                    o[i] = dg * (float)(q[i] & 0x0f) + mg;
                    o[i + 16] = dg * (float)(q[i] >> 4) + mg;
                }
            }
        }
    }
}
