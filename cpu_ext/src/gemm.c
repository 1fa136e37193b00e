/* gemm.c -- the GEMM path: many tokens against one weight (prefill; experts with many
 * tokens). A panel of JM_GEMM_NP weight rows (all K) is decoded once into the kernel's operand
 * type (K->decode), then blocks of JM_GEMM_MB tokens are folded and run against it by
 * K->tiles_dec: the same kernel, the same canonical sum as the GEMV path (internal.h), so both
 * paths give the same bits for a row. Each weight byte is decoded once per call; the decoded
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
  const size_t panel = (size_t)JM_GEMM_NP * (size_t)w->k_pad * K->wd_elem;
  return ((panel + 63) & ~(size_t)63) + (((size_t)JM_GEMM_MB * (size_t)w->k_pad * K->xf_elem + 63) & ~(size_t)63);
}

void jm_gemm_block(const jm_kernels *K, const jm_matrix *w, const float *x, int64_t ldx, const int32_t *rows, int m0,
                   int m1, int n0, int np, float *c, int64_t ldc, void *buf) {
  const int t0 = n0 / JM_TILE_ROWS, t1 = (n0 + np + JM_TILE_ROWS - 1) / JM_TILE_ROWS;
  uint8_t *wd = buf, *xf = wd + ((((size_t)JM_GEMM_NP * (size_t)w->k_pad * K->wd_elem) + 63) & ~(size_t)63);
  K->decode(w, t0, t1, wd);
  float yb[JM_GEMM_MB * JM_GEMM_NP];
  for (int i0 = m0; i0 < m1; i0 += JM_GEMM_MB) {
    const int mb = m1 - i0 < JM_GEMM_MB ? m1 - i0 : JM_GEMM_MB;
    for (int i = 0; i < mb; i++) K->fold(w, 0, x + (int64_t)(rows ? rows[i0 + i] : i0 + i) * ldx, ldx, 1, xf + (size_t)i * w->k_pad * K->xf_elem);
    K->tiles_dec(w, t0, t1, wd, xf, mb, yb, JM_GEMM_NP);
    for (int i = 0; i < mb; i++)
      for (int r = 0; r < np; r++) c[(int64_t)(i0 + i) * ldc + r] = yb[i * JM_GEMM_NP + r];
  }
}

typedef struct {
  const jm_kernels *K;
  const jm_matrix *const *ws;
  const float *x;
  int64_t ldx, ldy;
  float *y;
  uint8_t *bufs;
  size_t buf_bytes;
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
  jm_gemm_block(c->K, w, c->x + j * w->k, c->ldx, NULL, m0, m1, n0, np, c->y + j * w->n + n0, c->ldy, pb);
  free(own);
}

int jm_gemm_groups(const jm_kernels *K, const jm_matrix *const *ws, int64_t g, const float *x, int64_t ldx, int m,
                   float *y, int64_t ldy, uint8_t *bufs, int n_bufs) {
  const int panels = (ws[0]->n + JM_GEMM_NP - 1) / JM_GEMM_NP, threads = n_bufs;
  int part_rows;
  const int parts = jm_gemm_split(g * panels, m, threads, JM_GEMM_MB, &part_rows);
  groups_ctx c = {K, ws, x, ldx, ldy, y, bufs, jm_gemm_buf_bytes(K, ws[0]), m, panels, parts, part_rows, n_bufs, 0};
  jm_pool_run(g * panels * parts, groups_task, &c, NULL);
  return c.failed ? jm_error(JM_ENOMEM, "jm_linear: out of memory for a GEMM panel buffer") : JM_OK;
}
