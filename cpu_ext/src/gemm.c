/* gemm.c -- the GEMM path: many tokens against one weight (prefill; experts with many
 * tokens). The activations are folded once per call (jm_fold_rows); a panel of JM_GEMM_NP
 * weight rows (all K) is decoded once into the kernel's operand type (K->decode), then
 * K->tiles_dec runs blocks of JM_GEMM_MB tokens against it: the same block sums, the same
 * canonical sum as the GEMV path (internal.h), so both paths give the same bits for a row.
 * Each weight byte is decoded once per call (per token part when panels are few); the decoded
 * panel (16 rows x K) stays in L2 while the token blocks go by.
 *
 * Tasks own disjoint outputs, so results do not depend on the thread count either. The
 * token-row threshold (jm_gemm_min_rows) comes from env JAXMOE_CPU_GEMM_MIN at load, or
 * jm_set_gemm_min_rows().
 */
#include <stdlib.h>

#include "internal.h"

static _Atomic int gemm_min = -1;

int jm_gemm_min_rows(void) {
  int v = gemm_min;
  if (v < 0) {
    const char *env = getenv("JAXMOE_CPU_GEMM_MIN");
    v = env && *env ? atoi(env) : JM_GEMM_MIN_DEFAULT;
    if (v <= 0) v = 1 << 30; /* 0 or negative: never */
    gemm_min = v;
  }
  return v;
}

int jm_set_gemm_min_rows(int32_t m) {
  const int prev = jm_gemm_min_rows();
  gemm_min = m == 0 ? JM_GEMM_MIN_DEFAULT : (m < 0 ? 1 << 30 : m);
  return prev >= (1 << 30) ? -1 : prev;
}

size_t jm_gemm_buf_bytes(const jm_kernels *K, const jm_matrix *w) {
  return ((size_t)JM_GEMM_NP * (size_t)w->k_pad * K->wd_elem + 63) & ~(size_t)63;
}

size_t jm_fold_bytes(const jm_kernels *K, const jm_matrix *w, int64_t m) {
  return ((size_t)m * (size_t)w->k_pad * K->xf_elem + 63) & ~(size_t)63;
}

typedef struct {
  jm_fold_fn fold;
  const jm_matrix *w;
  const float *x;
  int64_t ldx, m;
  size_t row_bytes;
  uint8_t *xf;
} fold_ctx;

#define FOLD_ROWS 8 /* rows per fold task */
static void fold_task(void *ctx_, int64_t task, int thread) {
  const fold_ctx *c = ctx_;
  const int64_t i0 = task * FOLD_ROWS, n = c->m - i0 < FOLD_ROWS ? c->m - i0 : FOLD_ROWS;
  c->fold(c->w, 0, c->x + i0 * c->ldx, c->ldx, (int)n, c->xf + (size_t)i0 * c->row_bytes);
}

void jm_fold_rows(jm_fold_fn fold, const jm_matrix *w, const float *x, int64_t ldx, int64_t m, size_t row_bytes,
                  void *xf) {
  fold_ctx c = {fold, w, x, ldx, m, row_bytes, xf};
  jm_pool_run_sized((m + FOLD_ROWS - 1) / FOLD_ROWS, fold_task, &c, m * w->k_pad);
}

void jm_gemm_block(const jm_kernels *K, const jm_matrix *w, const void *xf, const int32_t *rows, int m0, int m1,
                   int n0, int np, float *c, int64_t ldc, void *buf) {
  const int t0 = n0 / JM_TILE_ROWS, t1 = (n0 + np + JM_TILE_ROWS - 1) / JM_TILE_ROWS;
  const size_t row_bytes = (size_t)w->k_pad * K->xf_elem;
  K->decode(w, t0, t1, buf);
  float yb[JM_GEMM_MB * JM_GEMM_NP];
  const void *xr[JM_GEMM_MB];
  for (int i0 = m0; i0 < m1; i0 += JM_GEMM_MB) {
    const int mb = m1 - i0 < JM_GEMM_MB ? m1 - i0 : JM_GEMM_MB;
    for (int i = 0; i < mb; i++) xr[i] = (const uint8_t *)xf + (size_t)(rows ? rows[i0 + i] : i0 + i) * row_bytes;
    K->tiles_dec(w, t0, t1, buf, xr, mb, yb, JM_GEMM_NP);
    for (int i = 0; i < mb; i++)
      for (int r = 0; r < np; r++) c[(int64_t)(i0 + i) * ldc + r] = yb[i * JM_GEMM_NP + r];
  }
}

typedef struct {
  const jm_kernels *K;
  const jm_matrix *const *ws;
  int64_t ldy;
  float *y;
  uint8_t *xf, *bufs; /* [g][m] folded rows; per-thread panel buffers */
  size_t buf_bytes, xf_group;
  int m, panels, parts, part_rows, n_bufs;
  _Atomic int failed;
} groups_ctx;

void *jm_thread_buf(void *bufs, int n_bufs, size_t bytes, int thread, void **own) {
  *own = NULL;
  if (thread < n_bufs) return (uint8_t *)bufs + (size_t)thread * bytes;
  /* a pool resized (jm_set_num_threads) between sizing the scratch and the job: own buffer */
  void *p = NULL;
  if (posix_memalign(&p, 64, bytes)) return NULL;
  return *own = p;
}

int jm_gemm_split(int64_t tasks, int m, int threads, int mr, int *part_rows) {
  int parts = 1;
  const int64_t want = 4 * (int64_t)threads;
  if (tasks < want) {
    parts = (int)((want + tasks - 1) / tasks);
    const int max_parts = (m + 4 * mr - 1) / (4 * mr);
    if (parts > max_parts) parts = max_parts > 0 ? max_parts : 1;
  }
  *part_rows = ((m + parts - 1) / parts + mr - 1) / mr * mr;
  return parts;
}

static void groups_task(void *ctx_, int64_t task, int thread) {
  const groups_ctx *c = ctx_;
  const int64_t per_matrix = (int64_t)c->panels * c->parts;
  const int64_t j = task / per_matrix;
  const int p = (int)(task % per_matrix / c->parts), part = (int)(task % c->parts);
  const jm_matrix *w = c->ws[j];
  const int n0 = p * JM_GEMM_NP, np = w->n - n0 < JM_GEMM_NP ? w->n - n0 : JM_GEMM_NP;
  const int m0 = part * c->part_rows, m1 = m0 + c->part_rows < c->m ? m0 + c->part_rows : c->m;
  if (m0 >= m1) return;
  void *own;
  void *pb = jm_thread_buf(c->bufs, c->n_bufs, c->buf_bytes, thread, &own);
  if (!pb) {
    ((groups_ctx *)c)->failed = 1;
    return;
  }
  jm_gemm_block(c->K, w, c->xf + j * c->xf_group, NULL, m0, m1, n0, np, c->y + j * w->n + n0, c->ldy, pb);
  free(own);
}

size_t jm_gemm_groups_scratch(const jm_kernels *K, const jm_matrix *w, int64_t g, int m, int n_bufs) {
  return (size_t)g * jm_fold_bytes(K, w, m) + (size_t)n_bufs * jm_gemm_buf_bytes(K, w);
}

int jm_gemm_groups(const jm_kernels *K, const jm_matrix *const *ws, int64_t g, const float *x, int64_t ldx, int m,
                   float *y, int64_t ldy, uint8_t *scratch, int n_bufs) {
  const jm_matrix *w = ws[0];
  const int panels = (w->n + JM_GEMM_NP - 1) / JM_GEMM_NP, threads = n_bufs;
  const size_t xf_group = jm_fold_bytes(K, w, m);
  for (int64_t j = 0; j < g; j++)
    jm_fold_rows(K->fold, ws[j], x + j * w->k, ldx, m, (size_t)w->k_pad * K->xf_elem, scratch + j * xf_group);
  int part_rows;
  const int parts = jm_gemm_split(g * panels, m, threads, JM_GEMM_MB, &part_rows);
  groups_ctx c = {K, ws, ldy, y, scratch, scratch + g * xf_group, jm_gemm_buf_bytes(K, w), xf_group,
                  m, panels, parts, part_rows, n_bufs, 0};
  jm_pool_run(g * panels * parts, groups_task, &c, NULL);
  return c.failed ? jm_error(JM_ENOMEM, "jm_linear: out of memory for a GEMM panel buffer") : JM_OK;
}
