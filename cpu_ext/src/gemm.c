/* gemm.c -- the GEMM path: many tokens against one weight (prefill; experts with many
 * tokens). The per-ISA kernels (gemm_avx2.c, scalar twin gemm_ref.c) decode a panel of
 * JM_GEMM_NP weight rows x one 128-column K block once into f32 (block scale folded in) and
 * run a 6-token x 16-row register-blocked micro-kernel over all tokens. Each weight byte is
 * decoded once per call, whatever the token count; the activations of a K block
 * (tokens x 512 bytes) stay in L2 while the panels of a task go by.
 *
 * Sums: per output, the K blocks are summed in order (block sums added to the output one after
 * the other); tasks own disjoint outputs, so results do not depend on the thread count.
 * The token-row threshold (jm_gemm_min_rows) comes from env JAXMOE_CPU_GEMM_MIN at load, or
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

const jm_gemm_kernels *jm_gemm_current(void) {
  return jm_isa_selected() == JM_ISA_SCALAR || !jm_isa_supported(JM_ISA_AVX2) ? &jm_gemm_scalar : &jm_gemm_avx2;
}

void jm_gemm_block(const jm_gemm_kernels *G, const jm_matrix *w, const float *x, int64_t ldx, const int32_t *rows,
                   int m0, int m1, int n0, int np, float *c, int64_t ldc, float *pbuf) {
  const int nsub = (np + JM_GEMM_NR - 1) / JM_GEMM_NR;
  const int t0 = n0 / JM_TILE_ROWS, t1 = (n0 + np + JM_TILE_ROWS - 1) / JM_TILE_ROWS;
  const int64_t blk = (int64_t)JM_KBLOCK * JM_TILE_ROWS * (w->format == JM_FMT_FP8 ? 1 : 2); /* tile bytes per K block */
  for (int kb = 0; kb < w->kb; kb++) {
    const int kk = w->k - kb * JM_KBLOCK < JM_KBLOCK ? w->k - kb * JM_KBLOCK : JM_KBLOCK;
    /* the panel reads one short run per tile, 16 tiles apart: prefetch the next block's runs
     * (the hardware prefetchers do not follow so many streams) */
    if (kb + 1 < w->kb)
      for (int t = t0; t < t1; t++)
        for (int64_t b = 0; b < blk; b += 64) __builtin_prefetch(jm_tile_ptr(w, t) + (kb + 1) * blk + b);
    G->panel(w, n0, np, kb, pbuf);
    /* one 8 KB sub-panel stays in L1 while the token rows of this K block (512 bytes each,
     * in L2) go by */
    for (int s = 0; s < nsub; s++) {
      const int nc = np - s * JM_GEMM_NR < JM_GEMM_NR ? np - s * JM_GEMM_NR : JM_GEMM_NR;
      for (int i0 = m0; i0 < m1; i0 += JM_GEMM_MR) {
        const int mr = m1 - i0 < JM_GEMM_MR ? m1 - i0 : JM_GEMM_MR;
        const float *xr[JM_GEMM_MR];
        for (int i = 0; i < mr; i++) xr[i] = x + (rows ? rows[i0 + i] : i0 + i) * ldx + kb * JM_KBLOCK;
        G->micro(xr, mr, kk, pbuf + s * JM_KBLOCK * JM_GEMM_NR, c + (int64_t)i0 * ldc + s * JM_GEMM_NR, ldc, nc,
                 kb > 0);
      }
    }
  }
}

typedef struct {
  const jm_gemm_kernels *G;
  const jm_matrix *const *ws;
  const float *x;
  int64_t ldx, ldy;
  float *y, *pbufs;
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
  float *pb = jm_thread_buf(c->pbufs, c->n_bufs, JM_GEMM_PBUF * sizeof(float), thread, &own);
  if (!pb) {
    ((groups_ctx *)c)->failed = 1;
    return;
  }
  jm_gemm_block(c->G, w, c->x + j * w->k, c->ldx, NULL, m0, m1, n0, np, c->y + j * w->n + n0, c->ldy, pb);
  free(own);
}

int jm_gemm_groups(const jm_gemm_kernels *G, const jm_matrix *const *ws, int64_t g, const float *x, int64_t ldx,
                   int m, float *y, int64_t ldy, float *pbufs, int n_bufs) {
  const int panels = (ws[0]->n + JM_GEMM_NP - 1) / JM_GEMM_NP, threads = n_bufs;
  int part_rows;
  const int parts = jm_gemm_split(g * panels, m, threads, JM_GEMM_MR, &part_rows);
  groups_ctx c = {G, ws, x, ldx, ldy, y, pbufs, m, panels, parts, part_rows, n_bufs, 0};
  jm_pool_run(g * panels * parts, groups_task, &c, NULL);
  return c.failed ? jm_error(JM_ENOMEM, "jm_linear: out of memory for a GEMM panel buffer") : JM_OK;
}
