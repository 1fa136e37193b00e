/* store.c -- the host expert store: per layer, per expert, the repacked gate/up/down
 * matrices. Explicit create/free; the address is the handle XLA calls take as an attribute
 * and is validated against the registry of live objects before use.
 *
 * Two ways in: jm_store_set_expert hands over three separately allocated matrices (any
 * format, e.g. INT4); jm_store_pack packs one FP8/BF16 projection straight into the layer's
 * slab for that projection, where the experts lie one after the other in expert order, so
 * that jm_store_slab can show a range of experts as one contiguous run of bytes: the single
 * host copy that decode reads and stream-loading prefill sends to an accelerator.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "store.h"

jm_store *jm_store_create(int32_t n_layers) {
  if (n_layers <= 0 || n_layers > 100000) {
    jm_error(JM_EINVAL, "jm_store_create: bad layer count %d", n_layers);
    return NULL;
  }
  jm_store *s = calloc(1, sizeof *s);
  if (s) s->layers = calloc((size_t)n_layers, sizeof *s->layers);
  if (!s || !s->layers || jm_registry_add(s) != JM_OK) {
    if (s) free(s->layers);
    free(s);
    jm_error(JM_ENOMEM, "jm_store_create: out of memory");
    return NULL;
  }
  s->magic = JM_STORE_MAGIC;
  s->n_layers = n_layers;
  return s;
}

static void layer_free(jm_store_layer *l) {
  for (int32_t e = 0; e < l->n_experts; e++)
    for (int j = 0; j < 3; j++) jm_matrix_free(l->experts[e].m[j]);
  free(l->experts);
  for (int j = 0; j < 3; j++) {
    jm_free_node(l->slab[j].data, l->slab[j].alloc);
    free(l->slab[j].scale);
  }
  memset(l, 0, sizeof *l);
}

void jm_store_free(jm_store *s) {
  if (!s || !jm_registry_remove(s)) return;
  for (int32_t i = 0; i < s->n_layers; i++) layer_free(&s->layers[i]);
  s->magic = 0;
  free(s->layers);
  free(s);
}

jm_store *jm_store_from_handle(int64_t handle) {
  jm_store *s = (jm_store *)(uintptr_t)handle;
  if (!handle || !jm_registry_has(s) || s->magic != JM_STORE_MAGIC) {
    jm_error(JM_EHANDLE, "0x%llx is not a live jaxmoe expert store handle (freed or never created)",
             (unsigned long long)handle);
    return NULL;
  }
  return s;
}

static int check_layer(const jm_store *s, int32_t layer, const char *fn) {
  if (!s || !jm_registry_has(s) || s->magic != JM_STORE_MAGIC)
    return jm_error(JM_EHANDLE, "%s: not a live expert store", fn);
  if (layer < 0 || layer >= s->n_layers)
    return jm_error(JM_EINVAL, "%s: layer %d out of range [0, %d)", fn, layer, s->n_layers);
  return JM_OK;
}

int jm_store_init_layer(jm_store *s, int32_t layer, int32_t n_experts, int32_t hidden, int32_t inter) {
  int rc = check_layer(s, layer, "jm_store_init_layer");
  if (rc) return rc;
  if (n_experts <= 0 || hidden <= 0 || inter <= 0)
    return jm_error(JM_EINVAL, "jm_store_init_layer: bad shape (experts %d, hidden %d, inter %d)",
                    n_experts, hidden, inter);
  jm_store_layer *l = &s->layers[layer];
  layer_free(l);
  l->experts = calloc((size_t)n_experts, sizeof *l->experts);
  if (!l->experts) return jm_error(JM_ENOMEM, "jm_store_init_layer: out of memory");
  l->n_experts = n_experts;
  l->hidden = hidden;
  l->inter = inter;
  return JM_OK;
}

int jm_store_set_expert(jm_store *s, int32_t layer, int32_t expert, jm_matrix *gate, jm_matrix *up,
                        jm_matrix *down) {
  jm_matrix *ms[3] = {gate, up, down};
  int rc = check_layer(s, layer, "jm_store_set_expert");
  const jm_store_layer *l = rc ? NULL : &s->layers[layer];
  if (!rc && !l->n_experts) rc = jm_error(JM_EINVAL, "jm_store_set_expert: layer %d not initialised", layer);
  if (!rc && (expert < 0 || expert >= l->n_experts))
    rc = jm_error(JM_EINVAL, "jm_store_set_expert: expert %d out of range [0, %d)", expert, l->n_experts);
  for (int j = 0; j < 3 && !rc; j++) {
    const int32_t want_n = j < 2 ? l->inter : l->hidden, want_k = j < 2 ? l->hidden : l->inter;
    if (!ms[j] || !jm_registry_has(ms[j]))
      rc = jm_error(JM_EHANDLE, "jm_store_set_expert: %s is not a live matrix", j == 0 ? "gate" : j == 1 ? "up" : "down");
    else if (ms[j]->n != want_n || ms[j]->k != want_k)
      rc = jm_error(JM_EINVAL, "jm_store_set_expert: layer %d expert %d %s is [%d, %d], expected [%d, %d]",
                    layer, expert, j == 0 ? "gate" : j == 1 ? "up" : "down", ms[j]->n, ms[j]->k, want_n, want_k);
  }
  if (rc) {
    for (int j = 0; j < 3; j++) jm_matrix_free(ms[j]);
    return rc;
  }
  jm_store_expert *x = &s->layers[layer].experts[expert];
  for (int j = 0; j < 3; j++) {
    jm_matrix_free(x->m[j]);
    x->m[j] = ms[j];
  }
  return JM_OK;
}

static const char *const proj_name[3] = {"gate", "up", "down"};

static int check_expert(const jm_store *s, int32_t layer, int32_t expert, int32_t which, const char *fn) {
  int rc = check_layer(s, layer, fn);
  if (rc) return rc;
  const jm_store_layer *l = &s->layers[layer];
  if (!l->n_experts) return jm_error(JM_EINVAL, "%s: layer %d not initialised", fn, layer);
  if (expert < 0 || expert >= l->n_experts)
    return jm_error(JM_EINVAL, "%s: expert %d out of range [0, %d)", fn, expert, l->n_experts);
  if (which < 0 || which > 2) return jm_error(JM_EINVAL, "%s: projection %d is not 0 (gate), 1 (up) or 2 (down)", fn, which);
  return JM_OK;
}

static int slab_init(jm_store_layer *l, int32_t layer, int32_t which, int32_t format, int32_t n, int32_t k) {
  jm_store_slab_mem *b = &l->slab[which];
  if (b->data) {
    if (b->format != format)
      return jm_error(JM_EINVAL, "jm_store_pack: layer %d %s slab holds format %d, got format %d", layer,
                      proj_name[which], b->format, format);
    return JM_OK;
  }
  b->slot_bytes = (jm_matrix_packed_bytes(format, n, k) + 4095) / 4096 * 4096;
  b->data = jm_alloc_node((size_t)l->n_experts * (size_t)b->slot_bytes, -1, &b->alloc);
  b->scale_floats = format == JM_FMT_FP8 ? (int64_t)((n + JM_KBLOCK - 1) / JM_KBLOCK) * ((k + JM_KBLOCK - 1) / JM_KBLOCK) : 0;
  b->scale = b->scale_floats ? malloc(sizeof(float) * (size_t)(l->n_experts * b->scale_floats)) : NULL;
  if (!b->data || (b->scale_floats && !b->scale)) {
    jm_free_node(b->data, b->alloc);
    free(b->scale);
    memset(b, 0, sizeof *b);
    return jm_error(JM_ENOMEM, "jm_store_pack: out of memory for layer %d's %s slab", layer, proj_name[which]);
  }
  b->format = format;
  return JM_OK;
}

int jm_store_pack(jm_store *s, int32_t layer, int32_t expert, int32_t which, int32_t format, const void *w,
                  int64_t ldw, const float *scale, int64_t lds, int32_t node) {
  int rc = check_expert(s, layer, expert, which, "jm_store_pack");
  if (rc) return rc;
  if (format != JM_FMT_FP8 && format != JM_FMT_BF16)
    return jm_error(JM_EINVAL, "jm_store_pack: format %d is not FP8 (%d) or BF16 (%d)", format, JM_FMT_FP8, JM_FMT_BF16);
  jm_store_layer *l = &s->layers[layer];
  const int32_t n = which < 2 ? l->inter : l->hidden, k = which < 2 ? l->hidden : l->inter;
  if ((rc = jm_matrix_check_source(format, w, ldw, scale, lds, n, k, "jm_store_pack"))) return rc;
  if ((rc = slab_init(l, layer, which, format, n, k))) return rc;
  jm_store_slab_mem *b = &l->slab[which];
  uint8_t *slot = b->data + (int64_t)expert * b->slot_bytes;
  if (b->alloc) jm_bind_node(slot, (size_t)b->slot_bytes, node); /* before the first touch */
  jm_matrix *m = jm_matrix_new_unzeroed(format, n, k, node, slot, b->scale ? b->scale + expert * b->scale_floats : NULL);
  if (!m) return JM_ENOMEM;
  jm_matrix_fill_pool(m, w, ldw, scale, lds); /* over the thread pool: first touch there too */
  jm_matrix_free(l->experts[expert].m[which]);
  l->experts[expert].m[which] = m;
  return JM_OK;
}

int jm_store_slab(const jm_store *s, int32_t layer, int32_t which, const uint8_t **data, int64_t *slot_bytes,
                  int64_t *packed_bytes, const float **scale, int64_t *scale_floats, int32_t *format) {
  int rc = check_expert(s, layer, 0, which, "jm_store_slab");
  if (rc) return rc;
  const jm_store_layer *l = &s->layers[layer];
  const jm_store_slab_mem *b = &l->slab[which];
  for (int32_t e = 0; e < l->n_experts; e++) {
    const jm_matrix *m = l->experts[e].m[which];
    if (!b->data || !m || m->data != b->data + (int64_t)e * b->slot_bytes)
      return jm_error(JM_EINVAL, "jm_store_slab: layer %d %s of expert %d is not in the layer's slab (%s)", layer,
                      proj_name[which], e, m ? "handed over by jm_store_set_expert" : "missing");
  }
  const jm_matrix *m0 = l->experts[0].m[which];
  if (data) *data = b->data;
  if (slot_bytes) *slot_bytes = b->slot_bytes;
  if (packed_bytes) *packed_bytes = (int64_t)m0->n_tiles * m0->tile_bytes;
  if (scale) *scale = b->scale;
  if (scale_floats) *scale_floats = b->scale_floats;
  if (format) *format = b->format;
  return JM_OK;
}

int jm_store_layer_info(const jm_store *s, int32_t layer, int32_t *n_experts, int32_t *hidden,
                        int32_t *inter, int32_t *complete) {
  int rc = check_layer(s, layer, "jm_store_layer_info");
  if (rc) return rc;
  const jm_store_layer *l = &s->layers[layer];
  int32_t full = l->n_experts > 0;
  for (int32_t e = 0; e < l->n_experts && full; e++)
    full = l->experts[e].m[0] && l->experts[e].m[1] && l->experts[e].m[2];
  if (n_experts) *n_experts = l->n_experts;
  if (hidden) *hidden = l->hidden;
  if (inter) *inter = l->inter;
  if (complete) *complete = full;
  return JM_OK;
}

int64_t jm_store_bytes(const jm_store *s) {
  if (!s || !jm_registry_has(s)) return -1;
  int64_t total = 0;
  for (int32_t i = 0; i < s->n_layers; i++)
    for (int32_t e = 0; e < s->layers[i].n_experts; e++)
      for (int j = 0; j < 3; j++) {
        const jm_matrix *m = s->layers[i].experts[e].m[j];
        if (m) total += (int64_t)m->n_tiles * m->tile_bytes;
      }
  return total;
}

const jm_matrix *jm_store_matrix(const jm_store *s, int32_t layer, int32_t expert, int32_t which) {
  if (check_layer(s, layer, "jm_store_matrix")) return NULL;
  const jm_store_layer *l = &s->layers[layer];
  if (expert < 0 || expert >= l->n_experts || which < 0 || which > 2 || !l->experts[expert].m[which]) {
    jm_error(JM_EINVAL, "jm_store_matrix: no matrix %d of expert %d in layer %d", which, expert, layer);
    return NULL;
  }
  return l->experts[expert].m[which];
}
