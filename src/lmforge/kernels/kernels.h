/* What the kernel files share: the worksharing ("_team") forms of the products and attention, which run inside
   an enclosing OpenMP parallel region, and the description of one decode layer for lmf_decode_layer. */
#ifndef LMFORGE_KERNELS_H
#define LMFORGE_KERNELS_H

#include <stdint.h>

#define QBLOCK 32 /* activation / weight block along K of the quantized kernels */
#define MAX_M 8   /* activation rows per call */

void lmf_linear_f32_team(const float* x, const float* const* ws, const float* const* biases, const int* ns, int count,
                         float* y, int M, int K);
void lmf_linear_q_team(const float* x, const void* const* qs, const uint16_t* const* ds, const uint16_t* const* ms,
                       const float* const* biases, const int* ns, int count, int bits, int group, float* y, int M,
                       int K, int8_t* xq, float* xd, float* xs);
void lmf_decode_attention_team(float* qkv, int B, int H, int Hkv, int D, const float* cos_t, const float* sin_t,
                               const long* pos, int pos_stride, float* k_cache, float* v_cache, int max_len,
                               float* out, float scale);
void lmf_rms_norm_f32(const float* x, const float* weight, float* y, int M, int D, float eps);
void lmf_silu_mul_f32(const float* gu, float* out, int M, int I);

/* One stacked product (kernels.LinearPlan or kernels.QuantPlan, mirrored by ctypes in kernels/__init__.py). */
typedef struct {
    int bits; /* 32: float weights; 8 or 4: quantized */
    int group;
    int count;
    int in_features;
    const void* const* ws; /* float matrices, or packed quantized ones */
    const uint16_t* const* ds;
    const uint16_t* const* ms;
    const float* const* biases;
    const int* ns;
} Mat;

/* One transformer block's decode step: its weights, shapes and scratch buffers (sized for M rows). */
typedef struct {
    const float* norm1;
    const float* norm2;
    float eps;
    int H, Hkv, D, I; /* heads, kv heads, head dim, MLP width */
    Mat qkv, o, gate_up, down;
    const float* cos_t;
    const float* sin_t;
    float *h, *qkv_out, *y, *o_out, *gu, *act; /* activations */
    int8_t* xq;                                /* quantized activations: M * max K */
    float *xd, *xs;                            /* their scales and group sums: M * max K / 32 */
} Layer;

#endif
