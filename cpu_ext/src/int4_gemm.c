/* int4_gemm.c -- the INT4 GEMM path (prefill: many tokens against one INT4 weight), driver.
 *
 * The activations are folded (quantized to int8 per group, int4.h) once per call with the
 * path's own fold, the same bytes the GEMV path folds. Weight panels of JM_INT4_GEMM_NP rows are
 * unpacked once per task into u8 codes + f32 scales (int4_gemm_avx2.c, scalar twin
 * int4_gemm_ref.c) and every token of the task runs against them, K chunk by K chunk (a chunk
 * of the panel and of MR tokens' int8 rows stay in L1 while the panel's row groups go by).
 * Per output, the 8 group-lane f32 sums run over the super-blocks in order whatever the
 * chunking, then one 8-lane sum: results depend neither on the blocking nor on the thread count
 * (and equal the AVX2 GEMV tile kernel's).
 * jm_linear (linear.c) calls jm_int4_gemm_chunk; the fused MoE is int4_gemm_moe.c. Both take it
 * from jm_int4_gemm_min_rows() rows, unless env JAXMOE_CPU_INT4_GEMM=0.
 */
#include <stdlib.h>

#include "int4.h"

#define TOKEN_BLOCK 64 /* tokens whose per-lane sums (TOKEN_BLOCK x NP x 8 f32) a block keeps */
#define KC_COLS 1024   /* columns of a K chunk: NP x KC_COLS codes + MR x KC_COLS int8 fit L1 */

int jm_int4_gemm_enabled(void) {
  static _Atomic int on = -1; /* env JAXMOE_CPU_INT4_GEMM=0 at load: INT4 stays on the GEMV path (A/B runs) */
  if (on < 0) {
    const char *env = getenv("JAXMOE_CPU_INT4_GEMM");
    on = !(env && env[0] == '0' && !env[1]);
  }
  return on;
}

/* INT4 takes its GEMM path from 2/3 of jm_gemm_min_rows() (16 at the default 24; 1 when forced
 * from 1 row; never when disabled). Measured here: the fused MoE at 16 rows per active expert
 * (8 DeepSeek-shaped experts, T = 64, top-2) ran 1.47x faster on it than on the GEMV chunks. */
int jm_int4_gemm_min_rows(void) {
  const int r = jm_gemm_min_rows() / 3 * 2;
  return r < 1 ? 1 : r;
}

const jm_int4_gemm_kernels *jm_int4_gemm_current(void) {
  /* the AVX-512 path has no INT4 GEMM of its own: AVX2 runs wherever it can */
  return jm_isa_selected() == JM_ISA_SCALAR || !jm_isa_supported(JM_ISA_AVX2) ? &jm_int4_gemm_scalar
                                                                              : &jm_int4_gemm_avx2;
}

void jm_int4_gemm_block(const jm_int4_gemm_kernels *K, const jm_matrix *w, const uint8_t *xf, int64_t xs,
                        const int32_t *rows, int m0, int m1, int n0, int np, float *c, int64_t ldc, uint8_t *pbuf) {
  const int64_t prs = jm_int4_panel_row(w), lda = JM_INT4_GEMM_NP * 8;
  const int n_sb = jm_int4_n_sb(w), sbc = KC_COLS / (8 * w->group) > 1 ? KC_COLS / (8 * w->group) : 1;
  float acc8[TOKEN_BLOCK * JM_INT4_GEMM_NP * 8] __attribute__((aligned(32)));
  K->panel(w, n0, np, pbuf);
  for (int ib = m0; ib < m1; ib += TOKEN_BLOCK) {
    const int ie = m1 - ib < TOKEN_BLOCK ? m1 : ib + TOKEN_BLOCK;
    for (int sb0 = 0; sb0 < n_sb; sb0 += sbc) { /* a K chunk of the panel and the tokens' x stay in L1 */
      const int sb1 = n_sb - sb0 < sbc ? n_sb : sb0 + sbc;
      for (int i0 = ib; i0 < ie; i0 += JM_INT4_GEMM_MR) {
        const int mr = ie - i0 < JM_INT4_GEMM_MR ? ie - i0 : JM_INT4_GEMM_MR;
        const uint8_t *xr[JM_INT4_GEMM_MR];
        for (int i = 0; i < mr; i++) xr[i] = xf + (int64_t)(rows ? rows[i0 + i] : i0 + i) * xs;
        for (int r0 = 0; r0 < np; r0 += JM_INT4_GEMM_NR) {
          const int nr = np - r0 < JM_INT4_GEMM_NR ? np - r0 : JM_INT4_GEMM_NR;
          K->micro(w, pbuf + r0 * prs, prs, nr, xr, mr, sb0, sb1, acc8 + (i0 - ib) * lda + 8 * r0, lda);
        }
      }
    }
    for (int i = ib; i < ie; i++)
      for (int r = 0; r < np; r++) {
        const float *a = acc8 + (i - ib) * lda + 8 * r;
        c[(int64_t)i * ldc + r] = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
      }
  }
}

/* ---- jm_linear: g matrices of one shape, tasks (matrix, panel, token part) ------------------ */
typedef struct {
  const jm_int4_gemm_kernels *K;
  const jm_matrix *const *ws;
  const uint8_t *xf; /* [g][m] folded rows, matrix j's at xf + j * xg */
  int64_t xg;
  float *y;
  uint8_t *pbufs;
  int64_t ldy, pbytes;
  int m, panels, parts, part_rows, n_bufs;
  _Atomic int failed;
} groups_ctx;

static void groups_task(void *ctx_, int64_t task, int thread) {
  groups_ctx *c = ctx_;
  const int64_t per_matrix = (int64_t)c->panels * c->parts;
  const int64_t j = task / per_matrix;
  const int p = (int)(task % per_matrix / c->parts), part = (int)(task % c->parts);
  const jm_matrix *w = c->ws[j];
  const int n0 = p * JM_INT4_GEMM_NP, np = w->n - n0 < JM_INT4_GEMM_NP ? w->n - n0 : JM_INT4_GEMM_NP;
  const int m0 = part * c->part_rows, m1 = m0 + c->part_rows < c->m ? m0 + c->part_rows : c->m;
  if (m0 >= m1) return;
  void *own;
  uint8_t *pb = jm_thread_buf(c->pbufs, c->n_bufs, (size_t)c->pbytes, thread, &own);
  if (!pb) {
    c->failed = 1;
    return;
  }
  jm_int4_gemm_block(c->K, w, c->xf + j * c->xg, jm_int4_xf_stride(w), NULL, m0, m1, n0, np, c->y + j * w->n + n0, c->ldy, pb);
  free(own);
}

/* the matrices of a group share n and k, maybe not the group size: the widest layout sizes all */
static int64_t max_xs(const jm_matrix *const *ws, int64_t g) {
  int64_t v = 0;
  for (int64_t j = 0; j < g; j++) v = jm_int4_xf_stride(ws[j]) > v ? jm_int4_xf_stride(ws[j]) : v;
  return v;
}
static int64_t max_pbytes(const jm_matrix *const *ws, int64_t g) {
  int64_t v = 0;
  for (int64_t j = 0; j < g; j++) v = jm_int4_panel_bytes(ws[j]) > v ? jm_int4_panel_bytes(ws[j]) : v;
  return v;
}

size_t jm_int4_gemm_work_bytes(const jm_matrix *const *ws, int64_t g, int64_t mc_max, int n_bufs) {
  const size_t fold = ((size_t)g * (size_t)mc_max * (size_t)max_xs(ws, g) + 63) & ~(size_t)63;
  return fold + (size_t)n_bufs * (size_t)max_pbytes(ws, g);
}

int jm_int4_gemm_chunk(void *ctx_, const float *x, int mc, float *y, uint8_t *work) {
  const jm_int4_linear_ctx *lc = ctx_;
  const jm_matrix *w = lc->ws[0];
  const jm_int4_gemm_kernels *K = jm_int4_gemm_current();
  const int64_t g = lc->g, xg = (int64_t)mc * max_xs(lc->ws, g);
  for (int64_t j = 0; j < g; j++)
    jm_fold_rows(K->fold, lc->ws[j], x + j * w->k, g * w->k, mc, (size_t)jm_int4_xf_stride(lc->ws[j]), work + j * xg);
  const size_t fold = ((size_t)g * (size_t)xg + 63) & ~(size_t)63;
  const int panels = (w->n + JM_INT4_GEMM_NP - 1) / JM_INT4_GEMM_NP;
  int part_rows;
  const int parts = jm_gemm_split(g * panels, mc, lc->n_bufs, JM_INT4_GEMM_MR, &part_rows);
  groups_ctx c = {K, lc->ws, work, xg, y, work + fold, g * w->n, max_pbytes(lc->ws, g), mc, panels, parts, part_rows,
                  lc->n_bufs, 0};
  jm_pool_run(g * panels * parts, groups_task, &c, NULL);
  return c.failed ? jm_error(JM_ENOMEM, "jm_linear: out of memory for an INT4 GEMM panel buffer") : JM_OK;
}
