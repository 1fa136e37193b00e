/* moe_gemm.c -- the fused routed MoE on the GEMM path (prefill: many tokens per expert).
 *
 * The assignments arrive sorted by expert (moe.c). Experts are taken in batches whose hidden
 * activations h [rows][inter] fit the caller's buffer; per batch two pool jobs:
 *   gate/up  tasks (expert, JM_GEMM_NP-row panel of inter): gate and up panels decoded once,
 *            every token of the expert (x rows read through the token list) against them,
 *            h = silu(gate) * up for the panel's columns;
 *   down     tasks (JM_GEMM_NP-row panel of hidden): for each expert of the batch in order,
 *            y = h_e @ down panel^T, then out[token, panel] += weight * y in assignment order.
 * x is folded once per call, each batch's h once after gate/up; every weight byte is decoded
 * once per call. A task owns its outputs (down tasks own column
 * ranges of out), and out's per-token sums run in the sorted assignment order, as on the GEMV
 * path: results do not depend on the thread count.
 */
#include <math.h>
#include <stdlib.h>

#include "moe.h"

typedef struct {
  const jm_kernels *K;
  const jm_store_layer *L;
  const uint8_t *xf;     /* [t] folded x rows (gate/up's k_pad) */
  const int32_t *tok;    /* sorted assignments: token */
  const float *wt;       /* sorted assignments: weight */
  const int32_t *expert; /* batch's experts */
  const int32_t *start;  /* assignment range of expert j: [start[j], start[j+1]) */
  int n_exp, a0;         /* batch: experts, first assignment (row 0 of h) */
  float *h;              /* [rows][inter] */
  uint8_t *hf, *tbuf;    /* [rows] folded h rows (down's k_pad); per-thread buffers */
  float *out;
  size_t gbytes, tbytes; /* per-thread buffer: a GEMM buffer (gbytes) + [max rows][JM_GEMM_NP] f32 */
  int n_bufs;
  _Atomic int failed;
} mg_ctx;

static int panels_of(int n) { return (n + JM_GEMM_NP - 1) / JM_GEMM_NP; }

static void gate_up_task(void *ctx_, int64_t task, int thread) {
  const mg_ctx *c = ctx_;
  const int I = c->L->inter, per = panels_of(I);
  const int j = (int)(task / per), n0 = (int)(task % per) * JM_GEMM_NP;
  const int np = I - n0 < JM_GEMM_NP ? I - n0 : JM_GEMM_NP;
  const jm_store_expert *e = &c->L->experts[c->expert[j]];
  const int a = c->start[j], m = c->start[j + 1] - a;
  void *own;
  uint8_t *tb = jm_thread_buf(c->tbuf, c->n_bufs, c->tbytes, thread, &own);
  if (!tb) {
    ((mg_ctx *)c)->failed = 1;
    return;
  }
  float *u = (float *)(tb + c->gbytes), *hg = c->h + (int64_t)(a - c->a0) * I + n0;
  jm_gemm_block(c->K, e->m[0], c->xf, c->tok + a, 0, m, n0, np, hg, I, tb);
  jm_gemm_block(c->K, e->m[1], c->xf, c->tok + a, 0, m, n0, np, u, JM_GEMM_NP, tb);
  jm_swiglu(hg, I, hg, I, u, JM_GEMM_NP, m, np);
  free(own);
}

static void down_task(void *ctx_, int64_t task, int thread) {
  const mg_ctx *c = ctx_;
  const int H = c->L->hidden;
  const int n0 = (int)task * JM_GEMM_NP, np = H - n0 < JM_GEMM_NP ? H - n0 : JM_GEMM_NP;
  void *own;
  uint8_t *tb = jm_thread_buf(c->tbuf, c->n_bufs, c->tbytes, thread, &own);
  if (!tb) {
    ((mg_ctx *)c)->failed = 1;
    return;
  }
  float *y = (float *)(tb + c->gbytes);
  for (int j = 0; j < c->n_exp; j++) {
    const int a = c->start[j], m = c->start[j + 1] - a;
    const jm_matrix *wd = c->L->experts[c->expert[j]].m[2];
    jm_gemm_block(c->K, wd, c->hf + (size_t)(a - c->a0) * wd->k_pad * c->K->xf_elem, NULL, 0, m, n0, np, y,
                  JM_GEMM_NP, tb);
    for (int i = 0; i < m; i++) {
      float *o = c->out + (int64_t)c->tok[a + i] * H + n0;
      const float w = c->wt[a + i], *yi = y + i * JM_GEMM_NP;
      for (int r = 0; r < np; r++) o[r] += w * yi[r];
    }
  }
  free(own);
}

/* the per-thread buffer: the larger GEMM panel buffer of gate/up (k = hidden) and down
 * (k = inter), then max_rows x JM_GEMM_NP f32 */
static size_t panel_bytes(const jm_kernels *K, const jm_store_layer *L, const int32_t *expert) {
  const jm_store_expert *e = &L->experts[expert[0]];
  const size_t a = jm_gemm_buf_bytes(K, e->m[0]), b = jm_gemm_buf_bytes(K, e->m[2]);
  return a > b ? a : b;
}

static size_t thread_bytes(const jm_kernels *K, const jm_store_layer *L, const int32_t *expert, int max_rows) {
  return panel_bytes(K, L, expert) + (((size_t)max_rows * JM_GEMM_NP * sizeof(float) + 63) & ~(size_t)63);
}

size_t jm_moe_gemm_scratch(const jm_kernels *K, const jm_store_layer *L, const int32_t *expert, int64_t t,
                           int64_t h_rows, int n_bufs, int max_rows) {
  const jm_store_expert *e = &L->experts[expert[0]];
  return jm_fold_bytes(K, e->m[0], t) + jm_fold_bytes(K, e->m[2], h_rows) +
         (size_t)n_bufs * thread_bytes(K, L, expert, max_rows);
}

int jm_moe_gemm(const jm_kernels *K, const jm_store_layer *L, const float *x, int64_t t, const int32_t *tok,
                const float *wt, const int32_t *expert, const int32_t *start, int n_exp, float *out, float *h,
                int64_t h_rows, uint8_t *scratch, int n_bufs, int max_rows) {
  const jm_store_expert *e0 = &L->experts[expert[0]];
  uint8_t *xf = scratch, *hf = xf + jm_fold_bytes(K, e0->m[0], t), *tbuf = hf + jm_fold_bytes(K, e0->m[2], h_rows);
  jm_fold_rows(K->fold, e0->m[0], x, L->hidden, t, (size_t)e0->m[0]->k_pad * K->xf_elem, xf);
  mg_ctx c = {K, L, xf, tok, wt, NULL, NULL, 0, 0, h, hf, tbuf, out, panel_bytes(K, L, expert),
              thread_bytes(K, L, expert, max_rows), n_bufs, 0};
  for (int j0 = 0; j0 < n_exp && !c.failed;) {
    int j1 = j0 + 1;
    while (j1 < n_exp && start[j1 + 1] - start[j0] <= h_rows) j1++;
    c.expert = expert + j0, c.start = start + j0, c.n_exp = j1 - j0, c.a0 = start[j0];
    jm_pool_run((int64_t)c.n_exp * panels_of(L->inter), gate_up_task, &c, NULL);
    jm_fold_rows(K->fold, e0->m[2], h, L->inter, start[j1] - start[j0], (size_t)e0->m[2]->k_pad * K->xf_elem, hf);
    if (!c.failed) jm_pool_run(panels_of(L->hidden), down_task, &c, NULL);
    j0 = j1;
  }
  return c.failed ? jm_error(JM_ENOMEM, "jm_moe: out of memory for a GEMM panel buffer") : JM_OK;
}
