/* lmforge CPU kernels, compiled on first use by kernels/__init__.py with the system C compiler.

   Decoding multiplies a few activation rows by every weight matrix, so it is bound by how fast weights stream
   from memory. PyTorch's fp32 GEMV on AVX2 machines runs on one thread at about half the memory bandwidth; these
   kernels split the output features across OpenMP threads (sharing PyTorch's own OpenMP runtime, which is
   already loaded when this library is) and read each weight row once for all activation rows.
   Every function has a portable C body; AVX2+FMA intrinsics are used where the compiler targets them. */

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "kernels.h"
#include "simd.h"

/* Below this many weight elements a product is too small to be worth waking a second thread. */
#define PARALLEL_MIN 65536
/* Activation rows handled per pass over a weight tile: the tile stays in L1 while they are multiplied. */
#define K_TILE 512

#ifdef __AVX2__
/* out[r] += dot(w + r*K, x) over k in [k0, k1) for r < 4, k0 and k1 multiples of 8. */
static inline void dot4(const float* w, const float* x, size_t K, size_t k0, size_t k1, float out[4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (size_t k = k0; k < k1; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + K + k), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 2 * K + k), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 3 * K + k), xv, a3);
    }
    out[0] += hsum(a0);
    out[1] += hsum(a1);
    out[2] += hsum(a2);
    out[3] += hsum(a3);
}
#endif

static inline float dot1(const float* w, const float* x, size_t k0, size_t k1) {
    float s = 0.0f;
    size_t k = k0;
#ifdef __AVX2__
    if (k1 - k0 >= 8) {
        __m256 a = _mm256_setzero_ps();
        for (; k + 8 <= k1; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a);
        s = hsum(a);
    }
#endif
    for (; k < k1; k++) s += w[k] * x[k];
    return s;
}

/* One group of up to 4 output features [n0, n0 + rows) of one matrix w (N, K) for all M activation rows;
   results go to y[m * ldy + n] (ldy: the output row stride, wider than N when several matrices share y). */
static void linear_rows(const float* x, const float* w, const float* bias, float* y, size_t M, size_t ldy, size_t K,
                        size_t n0, size_t rows) {
    float acc[8][4] = {{0}};  /* M <= 8, checked by the caller */
    for (size_t k0 = 0; k0 < K; k0 += K_TILE) {
        size_t k1 = k0 + K_TILE < K ? k0 + K_TILE : K;
        for (size_t m = 0; m < M; m++) {
            const float* xm = x + m * K;
            size_t kv = k0;
#ifdef __AVX2__
            if (rows == 4) {
                kv = k0 + ((k1 - k0) & ~(size_t)7);
                dot4(w + n0 * K, xm, K, k0, kv, acc[m]);
            }
#endif
            for (size_t r = 0; r < rows; r++) acc[m][r] += dot1(w + (n0 + r) * K, xm, kv, k1);
        }
    }
    for (size_t m = 0; m < M; m++)
        for (size_t r = 0; r < rows; r++) y[m * ldy + n0 + r] = acc[m][r] + (bias ? bias[n0 + r] : 0.0f);
}

/* y (M, sum N_i) = x (M, K) @ [W_0; W_1; ...]^T + [b_0; b_1; ...]: several matrices (N_i, K) that read the same
   input, as if stacked, without copying them into one. biases[i] may be NULL. Row-major, 1 <= M <= 8.
   The _team form shares its rows out among the threads of an enclosing parallel region (a whole decode layer). */
void lmf_linear_f32_team(const float* x, const float* const* ws, const float* const* biases, const int* ns, int count,
                         float* y, int M, int K) {
    long starts[9] = {0}; /* group index where matrix i begins; count <= 8 */
    size_t ldy = 0;
    for (int i = 0; i < count; i++) {
        starts[i + 1] = starts[i] + (ns[i] + 3) / 4;
        ldy += (size_t)ns[i];
    }
#pragma omp for schedule(static)
    for (long g = 0; g < starts[count]; g++) {
        int i = 0;
        size_t col = 0;
        while (g >= starts[i + 1]) col += (size_t)ns[i++];
        size_t n0 = (size_t)(g - starts[i]) * 4;
        size_t rows = (size_t)ns[i] - n0 < 4 ? (size_t)ns[i] - n0 : 4;
        linear_rows(x, ws[i], biases[i], y + col, (size_t)M, ldy, (size_t)K, n0, rows);
    }
}

void lmf_linear_f32(const float* x, const float* const* ws, const float* const* biases, const int* ns, int count,
                    float* y, int M, int K) {
    size_t total = 0;
    for (int i = 0; i < count; i++) total += (size_t)ns[i] * (size_t)K;
#pragma omp parallel if (total >= PARALLEL_MIN)
    lmf_linear_f32_team(x, ws, biases, ns, count, y, M, K);
}

/* y (M, D) = x / sqrt(mean(x^2) + eps) * weight, per row. */
void lmf_rms_norm_f32(const float* x, const float* weight, float* y, int M, int D, float eps) {
    for (int m = 0; m < M; m++) {
        const float* xm = x + (size_t)m * D;
        float* ym = y + (size_t)m * D;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int d = 0; d < D; d++) ss += xm[d] * xm[d];
        float scale = 1.0f / sqrtf((float)(ss / D) + eps);
        for (int d = 0; d < D; d++) ym[d] = xm[d] * scale * weight[d];
    }
}

/* Rotate-half RoPE of one head vector in place; c and s are the (D,) table rows for its position. */
static void rope_head(float* x, const float* c, const float* s, int D) {
    int half = D / 2;
    for (int i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i + half] + x1 * s[i + half];
    }
}

/* One decode step of attention for B rows, one new token each, all in one call:
   qkv (B, (H + 2*Hkv) * D) holds each row's projected q | k | v (modified: RoPE applied in place);
   RoPE from the cos/sin tables (max_pos, D) at row b's position pos_in[b * pos_stride] (stride 0: all rows share
   one position); k and v stored into the caches (B, Hkv, max_len, D) at pos[b];
   then each head attends over its row's positions [0, pos[b]] (grouped-query: head h reads kv head h / (H / Hkv)).
   out (B, H * D). Rows need not share a length, so no mask is ever built. The _team form runs inside an
   enclosing parallel region. */
void lmf_decode_attention_team(float* qkv, int B, int H, int Hkv, int D, const float* cos_t, const float* sin_t,
                               const long* pos, int pos_stride, float* k_cache, float* v_cache, int max_len,
                               float* out, float scale) {
    size_t width = (size_t)(H + 2 * Hkv) * D;
#pragma omp single
    for (int b = 0; b < B; b++) {
        long p = pos[b * pos_stride];
        float* row = qkv + b * width;
        const float* c = cos_t + (size_t)p * D;
        const float* s = sin_t + (size_t)p * D;
        for (int h = 0; h < H + Hkv; h++) rope_head(row + (size_t)h * D, c, s, D);
        for (int g = 0; g < Hkv; g++) {
            size_t at = (((size_t)b * Hkv + g) * max_len + p) * D;
            for (int d = 0; d < D; d++) {
                k_cache[at + d] = row[(size_t)(H + g) * D + d];
                v_cache[at + d] = row[(size_t)(H + Hkv + g) * D + d];
            }
        }
    }
    int group = H / Hkv;
#pragma omp for schedule(static)
    for (long bh = 0; bh < (long)B * H; bh++) {
        int b = (int)(bh / H), h = (int)(bh % H), g = h / group;
        long len = pos[b * pos_stride] + 1;
        const float* q = qkv + b * width + (size_t)h * D;
        const float* K = k_cache + ((size_t)b * Hkv + g) * max_len * D;
        const float* V = v_cache + ((size_t)b * Hkv + g) * max_len * D;
        float* o = out + ((size_t)b * H + h) * D;
        float scores_stack[4096];
        float* scores = len <= 4096 ? scores_stack : (float*)malloc(sizeof(float) * len);
        float top = -FLT_MAX; /* not -INFINITY: the library is built with -ffast-math (finite math) */
        for (long j = 0; j < len; j++) {
            scores[j] = dot1(K + j * D, q, 0, (size_t)D) * scale;
            if (scores[j] > top) top = scores[j];
        }
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (long j = 0; j < len; j++) {
            scores[j] = expf(scores[j] - top);
            total += scores[j];
        }
        for (int d = 0; d < D; d++) o[d] = 0.0f;
        for (long j = 0; j < len; j++) {
            float p = scores[j];
#pragma omp simd
            for (int d = 0; d < D; d++) o[d] += p * V[j * D + d];
        }
        for (int d = 0; d < D; d++) o[d] /= total;
        if (scores != scores_stack) free(scores);
    }
}

void lmf_decode_attention_f32(float* qkv, int B, int H, int Hkv, int D, const float* cos_t, const float* sin_t,
                              const long* pos_in, int pos_stride, float* k_cache, float* v_cache, int max_len,
                              float* out, float scale) {
#pragma omp parallel
    lmf_decode_attention_team(qkv, B, H, Hkv, D, cos_t, sin_t, pos_in, pos_stride, k_cache, v_cache, max_len, out,
                              scale);
}

/* out (M, I) = silu(gu[:, :I]) * gu[:, I:], for the fused gate|up projection of a SwiGLU MLP. */
void lmf_silu_mul_f32(const float* gu, float* out, int M, int I) {
    for (int m = 0; m < M; m++) {
        const float* g = gu + (size_t)m * 2 * I;
#pragma omp simd
        for (int i = 0; i < I; i++) out[(size_t)m * I + i] = g[i] / (1.0f + expf(-g[i])) * g[I + i];
    }
}
