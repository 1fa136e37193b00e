/* linear.c -- y = x @ W^T over the thread pool, the engine lock and the scratch arena; and
 * the grouped form (g matrices of one shape, x [m][g][k] -> y [m][g][n]: per-head weights).
 *
 * GEMV path: tokens in chunks of JM_MC. Per chunk, phase 1 folds the activations once per
 * matrix, phase 2 streams the weight tiles (tasks: 8 tiles = 32 rows): each tile is read from
 * DRAM once per chunk and from L1 for each group of tokens inside the chunk. From
 * jm_gemm_min_rows() rows on, the GEMM path (gemm.c) decodes each weight panel once per call.
 * Both run the same canonical sum (internal.h): a row's result is the same on either path.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "int4.h" /* internal.h + the INT4 GEMM path */

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

/* ---- the two phases, over g matrices of one shape (g = 1: a plain linear) ---------------- */
typedef struct {
  const jm_kernels *K;
  const jm_matrix *const *ws; /* g matrices [n, k], same shape and format */
  int64_t g;
  const float *x; /* token i, group j at x + i*ldx + j*k */
  int64_t ldx;
  int m;
  uint8_t *xf; /* [g][m][k_pad] folded */
  size_t xf_group;
  float *y; /* token i, group j at y + i*ldy + j*n */
  int64_t ldy, tile_tasks;
} lin_ctx;

static void fold_task(void *ctx_, int64_t task, int thread) {
  lin_ctx *c = ctx_;
  c->K->fold(c->ws[task], 0, c->x + task * c->ws[0]->k, c->ldx, c->m, c->xf + task * c->xf_group);
}

static void tile_task(void *ctx_, int64_t task, int thread) {
  lin_ctx *c = ctx_;
  const int64_t j = task / c->tile_tasks;
  const jm_matrix *w = c->ws[j];
  const int t0 = (int)(task % c->tile_tasks) * JM_TILES_PER_TASK;
  const int t1 = t0 + JM_TILES_PER_TASK < w->n_tiles ? t0 + JM_TILES_PER_TASK : w->n_tiles;
  c->K->tiles(w, t0, t1, c->xf + j * c->xf_group, c->m,
              c->y + j * w->n + (int64_t)t0 * JM_TILE_ROWS, c->ldy);
}

/* y = x @ W_j^T for every group j, m <= JM_MC tokens; xf scratch of g * jm_fold_bytes */
static void linear_chunk(const jm_kernels *K, const jm_matrix *const *ws, int64_t g, const float *x, int m,
                         float *y, uint8_t *xf) {
  const jm_matrix *w = ws[0];
  lin_ctx c = {K, ws, g, x, g * w->k, m, xf, jm_fold_bytes(K, w, m), y, g * w->n,
               (w->n_tiles + JM_TILES_PER_TASK - 1) / JM_TILES_PER_TASK};
  jm_pool_run_sized(g, fold_task, &c, g * m * w->k_pad);
  jm_pool_run(g * c.tile_tasks, tile_task, &c, NULL);
}

/* The row-chunk driver of both paths: under the engine lock, one scratch of `work_bytes`
 * (the path's own) + x as f32 (when bf16) + one chunk of y as f32 (when bf16); x converted
 * once, `fn` run per chunk of at most mc_max rows, y written per chunk. */
typedef int (*chunk_fn)(void *ctx, const float *x, int mc, float *y, uint8_t *work);

static int run_chunks(const jm_matrix *w, int64_t g, const void *x, int32_t x_dtype, int64_t m, void *y,
                      int32_t y_dtype, int64_t mc_max, size_t work_bytes, chunk_fn fn, void *ctx) {
  const int64_t row_in = g * w->k, row_out = g * w->n;
  const size_t xc_bytes = x_dtype == JM_DT_F32 ? 0 : ((size_t)m * row_in * sizeof(float) + 63) & ~(size_t)63;
  const size_t yc_bytes = y_dtype == JM_DT_F32 ? 0 : (size_t)mc_max * row_out * sizeof(float);
  jm_engine_lock();
  uint8_t *s = jm_scratch(work_bytes + xc_bytes + yc_bytes);
  if (!s) {
    jm_engine_unlock();
    return jm_error(JM_ENOMEM, "jm_linear: out of memory for %zu bytes of scratch", work_bytes + xc_bytes + yc_bytes);
  }
  const float *xs = (const float *)x;
  if (xc_bytes) {
    jm_to_f32(x, x_dtype, m * row_in, (float *)(s + work_bytes));
    xs = (const float *)(s + work_bytes);
  }
  float *yc = (float *)(s + work_bytes + xc_bytes);
  int rc = JM_OK;
  for (int64_t m0 = 0; m0 < m && rc == JM_OK; m0 += mc_max) {
    const int mc = (int)(m - m0 < mc_max ? m - m0 : mc_max);
    float *yo = y_dtype == JM_DT_F32 ? (float *)y + m0 * row_out : yc;
    rc = fn(ctx, xs + m0 * row_in, mc, yo, s);
    if (rc == JM_OK && y_dtype != JM_DT_F32) jm_from_f32(yc, (int64_t)mc * row_out, y_dtype, (uint16_t *)y + m0 * row_out);
  }
  jm_engine_unlock();
  return rc;
}

typedef struct {
  const jm_kernels *K;
  const jm_matrix *const *ws;
  int64_t g;
  int n_bufs;
} path_ctx;

/* the GEMV path: token chunks of at most JM_MC rows through the tile kernels */
static int gemv_chunk(void *ctx_, const float *x, int mc, float *y, uint8_t *work) {
  const path_ctx *c = ctx_;
  linear_chunk(c->K, c->ws, c->g, x, mc, y, work);
  return JM_OK;
}

/* the GEMM path: activations folded once per chunk, weight panels decoded once per chunk
 * (gemm.c); chunks of GEMM_CHUNK rows bound the folded copy (and the f32 copy of a bf16 y) */
#define GEMM_CHUNK 1024
static int gemm_chunk(void *ctx_, const float *x, int mc, float *y, uint8_t *work) {
  const path_ctx *c = ctx_;
  const jm_matrix *w = c->ws[0];
  return jm_gemm_groups(c->K, c->ws, c->g, x, c->g * w->k, mc, y, c->g * w->n, work, c->n_bufs);
}

#define INT4_GEMM_CHUNK 1024 /* token rows per INT4 GEMM chunk (folded: 2 k bytes each) */

/* x [m][g][k] -> y [m][g][n] over g validated matrices of one shape */
static int linear_groups(const jm_matrix *const *ws, int64_t g, const void *x, int32_t x_dtype, int64_t m, void *y,
                         int32_t y_dtype, int grouped_call) {
  if ((x_dtype != JM_DT_F32 && x_dtype != JM_DT_BF16) || (y_dtype != JM_DT_F32 && y_dtype != JM_DT_BF16))
    return jm_error(JM_EINVAL, "jm_linear: dtypes must be f32 or bf16");
  if (m < 0) return jm_error(JM_EINVAL, "jm_linear: negative row count");
  if (m == 0) return JM_OK;
  if (!x || !y) return jm_error(JM_EINVAL, "jm_linear: NULL buffer");
  const jm_matrix *w = ws[0];
  const int64_t t0 = jm_prof_start();
  int rc;
  if (m >= jm_gemm_min_rows() && (w->format == JM_FMT_FP8 || w->format == JM_FMT_BF16)) {
    path_ctx c = {jm_kernels_current(), ws, g, jm_pool_threads()};
    const int64_t mc_max = m < GEMM_CHUNK ? m : GEMM_CHUNK;
    rc = run_chunks(w, g, x, x_dtype, m, y, y_dtype, mc_max, jm_gemm_groups_scratch(c.K, w, g, (int)mc_max, c.n_bufs),
                    gemm_chunk, &c);
    jm_prof_stop(grouped_call ? JM_PROF_GROUPED_GEMM : JM_PROF_LINEAR_GEMM, t0, m);
  } else if (w->format == JM_FMT_INT4 && m >= jm_int4_gemm_min_rows() && jm_int4_gemm_enabled()) {
    /* INT4 GEMM path (int4_gemm.c): activations folded once per chunk of INT4_GEMM_CHUNK rows,
     * weight panels unpacked once per chunk */
    jm_int4_linear_ctx c = {ws, g, jm_pool_threads()};
    const int64_t mc_max = m < INT4_GEMM_CHUNK ? m : INT4_GEMM_CHUNK;
    rc = run_chunks(w, g, x, x_dtype, m, y, y_dtype, mc_max, jm_int4_gemm_work_bytes(ws, g, mc_max, c.n_bufs),
                    jm_int4_gemm_chunk, &c);
    jm_prof_stop(grouped_call ? JM_PROF_GROUPED_GEMM : JM_PROF_LINEAR_GEMM, t0, m);
  } else {
    path_ctx c = {jm_kernels_for(w) /* INT4: its own kernels (int4.c) */, ws, g, 0};
    const int mc_max = m < JM_MC ? (int)m : JM_MC;
    rc = run_chunks(w, g, x, x_dtype, m, y, y_dtype, mc_max, (size_t)g * jm_fold_bytes(c.K, w, mc_max),
                    gemv_chunk, &c);
    jm_prof_stop(grouped_call ? JM_PROF_GROUPED : JM_PROF_LINEAR, t0, m);
  }
  return rc;
}

int jm_linear(const jm_matrix *w, const void *x, int32_t x_dtype, int64_t m, void *y, int32_t y_dtype) {
  if (!w || !jm_registry_has(w) || w->magic != JM_MATRIX_MAGIC)
    return jm_error(JM_EHANDLE, "jm_linear: not a live matrix");
  return linear_groups(&w, 1, x, x_dtype, m, y, y_dtype, 0);
}

/* ---- groups ------------------------------------------------------------------------------ */
#define JM_GROUP_MAGIC 0x6a6d67726f757021ull

struct jm_group {
  uint64_t magic;
  int32_t g;
  jm_matrix **ms;
};

jm_group *jm_group_create(jm_matrix *const *ms, int32_t g) {
  int ok = ms && g > 0;
  for (int32_t j = 0; ok && j < g; j++)
    ok = ms[j] && jm_registry_has(ms[j]) && ms[j]->n == ms[0]->n && ms[j]->k == ms[0]->k &&
         ms[j]->format == ms[0]->format;
  jm_group *grp = ok ? calloc(1, sizeof *grp) : NULL;
  if (grp) grp->ms = malloc(sizeof *grp->ms * (size_t)g);
  if (!ok || !grp || !grp->ms || jm_registry_add(grp) != JM_OK) {
    if (grp) free(grp->ms);
    free(grp);
    for (int32_t j = 0; ms && j < g; j++) jm_matrix_free(ms[j]);
    jm_error(ok ? JM_ENOMEM : JM_EINVAL, "jm_group_create: %s", ok ? "out of memory" : "need g > 0 live matrices of one shape and format");
    return NULL;
  }
  grp->magic = JM_GROUP_MAGIC;
  grp->g = g;
  memcpy(grp->ms, ms, sizeof *grp->ms * (size_t)g);
  return grp;
}

void jm_group_free(jm_group *grp) {
  if (!grp || !jm_registry_remove(grp)) return;
  for (int32_t j = 0; j < grp->g; j++) jm_matrix_free(grp->ms[j]);
  grp->magic = 0;
  free(grp->ms);
  free(grp);
}

jm_group *jm_group_from_handle(int64_t handle) {
  jm_group *grp = (jm_group *)(uintptr_t)handle;
  if (!handle || !jm_registry_has(grp) || grp->magic != JM_GROUP_MAGIC) {
    jm_error(JM_EHANDLE, "0x%llx is not a live jaxmoe matrix-group handle (freed or never created)",
             (unsigned long long)handle);
    return NULL;
  }
  return grp;
}

int jm_group_info(const jm_group *grp, int32_t *g, int32_t *n, int32_t *k) {
  if (!grp || !jm_registry_has(grp) || grp->magic != JM_GROUP_MAGIC)
    return jm_error(JM_EHANDLE, "jm_group_info: not a live matrix group");
  if (g) *g = grp->g;
  if (n) *n = grp->ms[0]->n;
  if (k) *k = grp->ms[0]->k;
  return JM_OK;
}

int jm_linear_grouped(const jm_group *grp, const void *x, int32_t x_dtype, int64_t m, void *y, int32_t y_dtype) {
  if (!grp || !jm_registry_has(grp) || grp->magic != JM_GROUP_MAGIC)
    return jm_error(JM_EHANDLE, "jm_linear_grouped: not a live matrix group");
  return linear_groups((const jm_matrix *const *)grp->ms, grp->g, x, x_dtype, m, y, y_dtype, 1);
}
