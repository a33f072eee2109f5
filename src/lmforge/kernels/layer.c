/* A whole transformer block's decode step in one call and one OpenMP parallel region.

   Calling each product, norm and attention separately costs a Python round trip and a thread fork/join each:
   seven of them per layer, about a fifth of a small model's decode step. Here the threads stay up for the whole
   layer, sharing out each product's rows and meeting at a barrier between stages; the small serial stages (norms,
   residual adds, activation rounding) run on one thread. x (M, hidden) is updated in place. */

#include <math.h>
#include <stddef.h>

#include "kernels.h"

static void mat_team(const Mat* m, const Layer* L, const float* x, float* y, int M) {
    if (m->bits == 32)
        lmf_linear_f32_team(x, (const float* const*)m->ws, m->biases, m->ns, m->count, y, M, m->in_features);
    else
        lmf_linear_q_team(x, m->ws, m->ds, m->ms, m->biases, m->ns, m->count, m->bits, m->group, y, M,
                          m->in_features, L->xq, L->xd, L->xs);
}

static void add_rows(float* x, const float* y, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

void lmf_decode_layer(const Layer* L, float* x, int M, int hidden, const long* pos, int pos_stride, float* k_cache,
                      float* v_cache, int max_len) {
    size_t n = (size_t)M * hidden;
    float scale = 1.0f / sqrtf((float)L->D);
#pragma omp parallel
    {
#pragma omp single
        lmf_rms_norm_f32(x, L->norm1, L->h, M, hidden, L->eps);
        mat_team(&L->qkv, L, L->h, L->qkv_out, M);
        lmf_decode_attention_team(L->qkv_out, M, L->H, L->Hkv, L->D, L->cos_t, L->sin_t, pos, pos_stride, k_cache,
                                  v_cache, max_len, L->y, scale);
        mat_team(&L->o, L, L->y, L->o_out, M);
#pragma omp single
        {
            add_rows(x, L->o_out, n);
            lmf_rms_norm_f32(x, L->norm2, L->h, M, hidden, L->eps);
        }
        mat_team(&L->gate_up, L, L->h, L->gu, M);
#pragma omp single
        lmf_silu_mul_f32(L->gu, L->act, M, L->I);
        mat_team(&L->down, L, L->act, L->o_out, M);
#pragma omp single
        add_rows(x, L->o_out, n);
    }
}
