/* moe.h -- shared by the fused MoE files: moe.c (the layer, GEMV items, path choice) and its
 * GEMM paths moe_gemm.c (FP8/BF16) and int4_gemm_moe.c (INT4); not part of the ABI. */
#ifndef JM_MOE_H
#define JM_MOE_H

#include "store.h"

/* moe.c, for both GEMM paths of the fused MoE: the assignment range [start[j], start[j+1]) of
 * each sorted expert j (malloc'd, NULL when out of memory), the largest expert's rows, and the
 * rows of h per batch of experts (env JAXMOE_CPU_MOE_BUDGET bytes, or 8192; at least max_rows) */
int32_t *jm_moe_starts(const int32_t *order, const int32_t *cnt, int ne, int64_t n_act, int inter, int *max_rows,
                       int64_t *h_rows);

/* the fused MoE's FP8/BF16 GEMM path (moe_gemm.c): scratch bytes for t tokens, h_rows rows of
 * h per batch of experts, n_bufs threads and max_rows rows per expert; then the call */
size_t jm_moe_gemm_scratch(const jm_kernels *K, const jm_store_layer *L, const int32_t *expert, int64_t t,
                           int64_t h_rows, int n_bufs, int max_rows);
int jm_moe_gemm(const jm_kernels *K, const jm_store_layer *L, const float *x, int64_t t, const int32_t *tok,
                const float *wt, const int32_t *expert, const int32_t *start, int n_exp, float *out, float *h,
                int64_t h_rows, uint8_t *scratch, int n_bufs, int max_rows);

/* the fused MoE's INT4 GEMM path (int4_gemm_moe.c; its threshold is jm_int4_gemm_min_rows in
 * int4.h). usable: 1 when the ne sorted experts `order` share one INT4 layout for gate/up and
 * one for down, and the path is enabled. call: the whole layer for the t tokens whose n_act
 * assignments (tok, wt) are sorted by expert, cnt[e] of them for expert e; x and out in their
 * dtypes, as jm_moe takes them. */
int jm_int4_moe_gemm_usable(const jm_store_layer *L, const int32_t *order, int ne);
int jm_int4_moe_gemm_call(const jm_store_layer *L, const void *x, int32_t x_dtype, int64_t t, const int32_t *tok,
                          const float *wt, const int32_t *order, const int32_t *cnt, int ne, int64_t n_act, void *out,
                          int32_t out_dtype);

#endif
