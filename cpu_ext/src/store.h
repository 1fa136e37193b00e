/* store.h -- layout of the host expert store (shared by store.c and the MoE files, moe.h). */
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

#endif
