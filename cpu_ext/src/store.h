/* store.h -- layout of the host expert store (shared by store.c and moe.c). */
#ifndef JM_STORE_H
#define JM_STORE_H

#include "internal.h"

typedef struct {
  jm_matrix *m[3]; /* gate [inter, hidden], up [inter, hidden], down [hidden, inter] */
} jm_store_expert;

typedef struct {
  int32_t n_experts, hidden, inter; /* n_experts == 0: not a MoE layer / not loaded */
  jm_store_expert *experts;
} jm_store_layer;

struct jm_store {
  uint64_t magic;
  int32_t n_layers;
  jm_store_layer *layers;
};

#endif
