/* int4_gemm_moe.c -- the fused routed MoE with INT4 experts on the GEMM path (prefill: many
 * tokens per expert); the FP8/BF16 twin is moe_gemm.c, the kernels int4_gemm*.c.
 *
 * The assignments arrive sorted by expert (moe.c). The x rows of all t tokens are folded (int8
 * per group) once; experts are taken in batches whose hidden activations h [rows][inter] fit
 * the buffer; per batch three pool jobs:
 *   gate/up  tasks (expert, panel of inter rows): gate and up panels unpacked once, every
 *            token of the expert (its folded x row, through the token list) against them,
 *            h = silu(gate) * up for the panel's columns;
 *   fold     h rows folded for down (tasks: row ranges);
 *   down     tasks (panel of hidden rows): per expert of the batch in order, its down panel
 *            unpacked, y = h_e @ panel^T, then out[token, panel] += weight * y in assignment
 *            order.
 * The quantization, the kernels' f32 operations and the per-token summation order are those of
 * the GEMV path with the AVX2 kernels: both paths give the same result, and it does not depend
 * on the thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "int4.h"
#include "moe.h"


typedef struct {
  const jm_int4_gemm_kernels *K;
  const jm_store_layer *L;
  const jm_matrix *wg0, *wd0; /* layouts of every gate/up and every down matrix */
  const uint8_t *xf;          /* [t] folded x rows */
  const int32_t *tok;         /* sorted assignments: token */
  const float *wt;            /* sorted assignments: weight */
  const int32_t *expert;      /* batch's experts */
  const int32_t *start;       /* assignment range of expert j: [start[j], start[j+1]) */
  int n_exp, a0, a_count;     /* batch: experts, first assignment (row 0 of h), rows */
  float *h, *out;
  uint8_t *xh;    /* [a_count] folded h rows */
  uint8_t *tbuf;  /* per thread: a panel, then [max rows][NP] f32 */
  int64_t tbytes; /* per-thread buffer bytes */
  int64_t pbytes; /* panel bytes (the larger layout) */
  int n_bufs;
  _Atomic int failed;
} mg_ctx;

static int panels_of(int n) { return (n + JM_INT4_GEMM_NP - 1) / JM_INT4_GEMM_NP; }

static uint8_t *thread_buf(mg_ctx *c, int thread, void **own) {
  uint8_t *b = jm_thread_buf(c->tbuf, c->n_bufs, (size_t)c->tbytes, thread, own);
  if (!b) c->failed = 1;
  return b;
}

static void gate_up_task(void *ctx_, int64_t task, int thread) {
  mg_ctx *c = ctx_;
  const int I = c->L->inter, per = panels_of(I);
  const int j = (int)(task / per), n0 = (int)(task % per) * JM_INT4_GEMM_NP;
  const int np = I - n0 < JM_INT4_GEMM_NP ? I - n0 : JM_INT4_GEMM_NP;
  const jm_store_expert *e = &c->L->experts[c->expert[j]];
  const int a = c->start[j], m = c->start[j + 1] - a;
  void *own;
  uint8_t *tb = thread_buf(c, thread, &own);
  if (!tb) return;
  const int64_t xs = jm_int4_xf_stride(c->wg0);
  float *u = (float *)(tb + c->pbytes), *hg = c->h + (int64_t)(a - c->a0) * I + n0;
  jm_int4_gemm_block(c->K, e->m[0], c->xf, xs, c->tok + a, 0, m, n0, np, hg, I, tb);
  jm_int4_gemm_block(c->K, e->m[1], c->xf, xs, c->tok + a, 0, m, n0, np, u, JM_INT4_GEMM_NP, tb);
  jm_swiglu(hg, I, hg, I, u, JM_INT4_GEMM_NP, m, np);
  free(own);
}

#define FOLD_ROWS 8
static void fold_task(void *ctx_, int64_t task, int thread) {
  mg_ctx *c = ctx_;
  const int r0 = (int)task * FOLD_ROWS, n = c->a_count - r0 < FOLD_ROWS ? c->a_count - r0 : FOLD_ROWS;
  c->K->fold(c->wd0, 0, c->h + (int64_t)r0 * c->L->inter, c->L->inter, n, c->xh + r0 * jm_int4_xf_stride(c->wd0));
}

static void down_task(void *ctx_, int64_t task, int thread) {
  mg_ctx *c = ctx_;
  const int H = c->L->hidden;
  const int n0 = (int)task * JM_INT4_GEMM_NP, np = H - n0 < JM_INT4_GEMM_NP ? H - n0 : JM_INT4_GEMM_NP;
  void *own;
  uint8_t *tb = thread_buf(c, thread, &own);
  if (!tb) return;
  float *y = (float *)(tb + c->pbytes);
  const int64_t xs = jm_int4_xf_stride(c->wd0);
  for (int j = 0; j < c->n_exp; j++) {
    const int a = c->start[j], m = c->start[j + 1] - a;
    jm_int4_gemm_block(c->K, c->L->experts[c->expert[j]].m[2], c->xh + (int64_t)(a - c->a0) * xs, xs, NULL, 0, m,
                       n0, np, y, JM_INT4_GEMM_NP, tb);
    for (int i = 0; i < m; i++) {
      float *o = c->out + (int64_t)c->tok[a + i] * H + n0;
      const float w = c->wt[a + i], *yi = y + i * JM_INT4_GEMM_NP;
      for (int r = 0; r < np; r++) o[r] += w * yi[r];
    }
  }
  free(own);
}

/* 1 when every active expert's gate/up share one INT4 layout (group) and every down another
 * (the folded activations are then shared by all of them), and the path is enabled */
int jm_int4_moe_gemm_usable(const jm_store_layer *L, const int32_t *order, int ne) {
  if (ne <= 0 || !jm_int4_gemm_enabled()) return 0;
  const jm_store_expert *e0 = &L->experts[order[0]];
  for (int j = 0; j < ne; j++) {
    const jm_store_expert *e = &L->experts[order[j]];
    for (int p = 0; p < 3; p++)
      if (e->m[p]->format != JM_FMT_INT4 || e->m[p]->group != e0->m[p == 2 ? 2 : 0]->group) return 0;
  }
  return 1;
}

int jm_int4_moe_gemm_call(const jm_store_layer *L, const void *x, int32_t x_dtype, int64_t t, const int32_t *tok,
                          const float *wt, const int32_t *order, const int32_t *cnt, int ne, int64_t n_act, void *out,
                          int32_t out_dtype) {
  const int H = L->hidden, I = L->inter;
  const jm_matrix *wg0 = L->experts[order[0]].m[0], *wd0 = L->experts[order[0]].m[2];
  int max_rows;
  int64_t h_rows;
  int32_t *start = jm_moe_starts(order, cnt, ne, n_act, I, &max_rows, &h_rows);
  if (!start) return jm_error(JM_ENOMEM, "jm_moe: out of memory");
  const int64_t xs_g = jm_int4_xf_stride(wg0), xs_d = jm_int4_xf_stride(wd0);
  const int64_t pbytes = jm_int4_panel_bytes(wg0) > jm_int4_panel_bytes(wd0) ? jm_int4_panel_bytes(wg0)
                                                                             : jm_int4_panel_bytes(wd0);
  const int n_bufs = jm_pool_threads();
  const int64_t tbytes = (pbytes + (int64_t)max_rows * JM_INT4_GEMM_NP * (int64_t)sizeof(float) + 63) & ~(int64_t)63;
#define A64(b) (((size_t)(b) + 63) & ~(size_t)63)
  const size_t x_bytes = x_dtype == JM_DT_F32 ? 0 : A64((size_t)t * H * sizeof(float));
  const size_t xf_bytes = A64((size_t)t * (size_t)xs_g), xh_bytes = A64((size_t)h_rows * (size_t)xs_d);
  const size_t h_bytes = A64((size_t)h_rows * I * sizeof(float)), tb_bytes = (size_t)n_bufs * (size_t)tbytes;
  const size_t o_bytes = out_dtype == JM_DT_F32 ? 0 : (size_t)t * H * sizeof(float);
#undef A64
  const size_t total = x_bytes + xf_bytes + xh_bytes + h_bytes + tb_bytes + o_bytes;
  jm_engine_lock();
  uint8_t *sc = jm_scratch(total);
  if (!sc) {
    jm_engine_unlock();
    free(start);
    return jm_error(JM_ENOMEM, "jm_moe: out of memory for %zu bytes of INT4 GEMM scratch", total);
  }
  const jm_int4_gemm_kernels *K = jm_int4_gemm_current();
  const float *xs = (const float *)x;
  if (x_bytes) {
    jm_to_f32(x, x_dtype, t * H, (float *)sc);
    xs = (const float *)sc;
  }
  uint8_t *xf = sc + x_bytes, *xh = xf + xf_bytes;
  float *h = (float *)(xh + xh_bytes);
  uint8_t *tbuf = (uint8_t *)h + h_bytes;
  float *o = out_dtype == JM_DT_F32 ? (float *)out : (float *)(tbuf + tb_bytes);
  memset(o, 0, (size_t)t * H * sizeof(float));
  jm_fold_rows(K->fold, wg0, xs, H, t, (size_t)jm_int4_xf_stride(wg0), xf); /* every token once, for all its experts */
  mg_ctx c = {K, L, wg0, wd0, xf, tok, wt, NULL, NULL, 0, 0, 0, h, o, xh, tbuf, tbytes, pbytes, n_bufs, 0};
  for (int j0 = 0; j0 < ne && !c.failed;) {
    int j1 = j0 + 1;
    while (j1 < ne && start[j1 + 1] - start[j0] <= h_rows) j1++;
    c.expert = order + j0, c.start = start + j0, c.n_exp = j1 - j0, c.a0 = start[j0];
    c.a_count = start[j1] - start[j0];
    jm_pool_run((int64_t)c.n_exp * panels_of(I), gate_up_task, &c, NULL);
    if (!c.failed)
      jm_pool_run_sized((c.a_count + FOLD_ROWS - 1) / FOLD_ROWS, fold_task, &c, (int64_t)c.a_count * I);
    if (!c.failed) jm_pool_run(panels_of(H), down_task, &c, NULL);
    j0 = j1;
  }
  const int rc = c.failed ? jm_error(JM_ENOMEM, "jm_moe: out of memory for an INT4 GEMM panel buffer") : JM_OK;
  if (rc == JM_OK && out_dtype != JM_DT_F32) jm_from_f32(o, t * H, out_dtype, out);
  jm_engine_unlock();
  free(start);
  return rc;
}
