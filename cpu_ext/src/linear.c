/* linear.c -- y = x @ W^T over the thread pool, the engine lock and the scratch arena.
 *
 * Tokens are processed in chunks of JM_MC. Per chunk, phase 1 folds the activations once per
 * 128-row block (tasks: row blocks), phase 2 streams the weight tiles (tasks: 8 tiles = 32
 * rows, inside one row block). Large M is a blocked GEMM: each tile is streamed from DRAM
 * once per chunk and re-read from L1 for each group of tokens inside the chunk.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---- engine lock and scratch ------------------------------------------------------------- */
static pthread_mutex_t engine_mu = PTHREAD_MUTEX_INITIALIZER;
static void *scratch_p;
static size_t scratch_cap, scratch_alloc;

void jm_engine_lock(void) { pthread_mutex_lock(&engine_mu); }
void jm_engine_unlock(void) { pthread_mutex_unlock(&engine_mu); }

void *jm_scratch(size_t bytes) {
  if (bytes <= scratch_cap) return scratch_p;
  jm_free_node(scratch_p, scratch_alloc);
  scratch_cap = bytes + bytes / 4;
  scratch_p = jm_alloc_node(scratch_cap, -1, &scratch_alloc);
  if (!scratch_p) scratch_cap = 0;
  return scratch_p;
}

/* ---- dtype conversion ------------------------------------------------------------------- */
void jm_to_f32(const void *x, int32_t dtype, int64_t count, float *out) {
  if (dtype == JM_DT_F32) {
    memcpy(out, x, sizeof(float) * (size_t)count);
    return;
  }
  const uint16_t *h = (const uint16_t *)x;
  for (int64_t i = 0; i < count; i++) out[i] = jm_bf16_to_f32(h[i]);
}

void jm_from_f32(const float *x, int64_t count, int32_t dtype, void *out) {
  if (dtype == JM_DT_F32) {
    memmove(out, x, sizeof(float) * (size_t)count);
    return;
  }
  uint16_t *h = (uint16_t *)out;
  for (int64_t i = 0; i < count; i++) h[i] = jm_f32_to_bf16(x[i]);
}

/* ---- the two phases ---------------------------------------------------------------------- */
typedef struct {
  const jm_kernels *K;
  const jm_matrix *w;
  const float *x; /* [m][k] */
  int m;
  uint8_t *xf; /* [n_rb][m][k_pad] folded */
  size_t xf_rb;
  float *y; /* [m][ldy] */
  int64_t ldy;
} lin_ctx;

static void fold_task(void *ctx_, int64_t rb, int thread) {
  (void)thread;
  lin_ctx *c = ctx_;
  c->K->fold(c->w, (int)rb, c->x, c->w->k, c->m, c->xf + rb * c->xf_rb);
}

static void tile_task(void *ctx_, int64_t task, int thread) {
  (void)thread;
  lin_ctx *c = ctx_;
  const int t0 = (int)task * JM_TILES_PER_TASK;
  const int t1 = t0 + JM_TILES_PER_TASK < c->w->n_tiles ? t0 + JM_TILES_PER_TASK : c->w->n_tiles;
  const int rb = c->w->n_rb == 1 ? 0 : t0 * JM_TILE_ROWS / JM_KBLOCK;
  c->K->tiles(c->w, t0, t1, c->xf + rb * c->xf_rb, c->m, c->y + (int64_t)t0 * JM_TILE_ROWS, c->ldy);
}

/* folded-activation bytes of one row block for m tokens */
static size_t xf_rb_bytes(const jm_kernels *K, const jm_matrix *w, int m) {
  return ((size_t)m * (size_t)w->k_pad * K->xf_elem + 63) & ~(size_t)63;
}

/* y[m][ldy] (f32) = x[m][k] (f32) @ W^T; m <= JM_MC; xf scratch of n_rb * xf_rb_bytes */
static void linear_chunk(const jm_kernels *K, const jm_matrix *w, const float *x, int m, float *y,
                         int64_t ldy, uint8_t *xf) {
  lin_ctx c = {K, w, x, m, xf, xf_rb_bytes(K, w, m), y, ldy};
  jm_pool_run_sized(w->n_rb, fold_task, &c, (int64_t)w->n_rb * m * w->k_pad);
  jm_pool_run((w->n_tiles + JM_TILES_PER_TASK - 1) / JM_TILES_PER_TASK, tile_task, &c, NULL);
}

int jm_linear(const jm_matrix *w, const void *x, int32_t x_dtype, int64_t m, void *y,
              int32_t y_dtype) {
  if (!w || !jm_registry_has(w) || w->magic != JM_MATRIX_MAGIC)
    return jm_error(JM_EHANDLE, "jm_linear: not a live matrix");
  if ((x_dtype != JM_DT_F32 && x_dtype != JM_DT_BF16) || (y_dtype != JM_DT_F32 && y_dtype != JM_DT_BF16))
    return jm_error(JM_EINVAL, "jm_linear: dtypes must be f32 or bf16");
  if (m < 0) return jm_error(JM_EINVAL, "jm_linear: negative row count");
  if (m == 0) return JM_OK;
  if (!x || !y) return jm_error(JM_EINVAL, "jm_linear: NULL buffer");
  const jm_kernels *K = jm_kernels_current();
  const int mc_max = m < JM_MC ? (int)m : JM_MC;
  const size_t xf_bytes = (size_t)w->n_rb * xf_rb_bytes(K, w, mc_max);
  const size_t xc_bytes = x_dtype == JM_DT_F32 ? 0 : ((size_t)m * w->k * sizeof(float) + 63) & ~(size_t)63;
  const size_t yc_bytes = y_dtype == JM_DT_F32 ? 0 : (size_t)mc_max * w->n * sizeof(float);
  jm_engine_lock();
  uint8_t *s = jm_scratch(xf_bytes + xc_bytes + yc_bytes);
  if (!s) {
    jm_engine_unlock();
    return jm_error(JM_ENOMEM, "jm_linear: out of memory for %zu bytes of scratch", xf_bytes + xc_bytes + yc_bytes);
  }
  const float *xs = (const float *)x;
  if (xc_bytes) {
    jm_to_f32(x, x_dtype, m * w->k, (float *)(s + xf_bytes));
    xs = (const float *)(s + xf_bytes);
  }
  float *yc = (float *)(s + xf_bytes + xc_bytes);
  for (int64_t m0 = 0; m0 < m; m0 += JM_MC) {
    const int mc = m - m0 < JM_MC ? (int)(m - m0) : JM_MC;
    if (y_dtype == JM_DT_F32) {
      linear_chunk(K, w, xs + m0 * w->k, mc, (float *)y + m0 * w->n, w->n, s);
    } else {
      linear_chunk(K, w, xs + m0 * w->k, mc, yc, w->n, s);
      jm_from_f32(yc, (int64_t)mc * w->n, JM_DT_BF16, (uint16_t *)y + m0 * w->n);
    }
  }
  jm_engine_unlock();
  return JM_OK;
}
