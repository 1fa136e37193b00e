/* store.h -- layout of the host expert store (shared by store.c and moe.c). */
#ifndef JM_STORE_H
#define JM_STORE_H

#include "internal.h"

typedef struct {
  jm_matrix *m[3]; /* gate [inter, hidden], up [inter, hidden], down [hidden, inter] */
} jm_store_expert;

/* One projection of every expert of a layer, packed one expert after the other (jm_store_pack):
 * a range of experts is one contiguous run of bytes, what stream-loading prefill transfers. */
typedef struct {
  uint8_t *data;        /* n_experts slots of slot_bytes */
  size_t alloc;         /* jm_alloc_node's mapping length (0: heap) */
  int64_t slot_bytes;   /* one expert's packed bytes, rounded up to a 4 KiB page */
  float *scale;         /* FP8: n_experts * scale_floats block scales; NULL for BF16 */
  int64_t scale_floats; /* ceil(n/128) * ceil(k/128) */
  int32_t format;       /* JM_FMT_FP8 | JM_FMT_BF16; 0: no slab */
} jm_store_slab_mem;

typedef struct {
  int32_t n_experts, hidden, inter; /* n_experts == 0: not a MoE layer / not loaded */
  jm_store_expert *experts;
  jm_store_slab_mem slab[3]; /* gate, up, down */
} jm_store_layer;

struct jm_store {
  uint64_t magic;
  int32_t n_layers;
  jm_store_layer *layers;
};

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

#endif
