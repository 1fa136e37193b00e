/* moe.c -- the fused routed-MoE layer over the host expert store.
 *
 *   out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = ids[t, j]
 *
 * Assignments (t, j) are grouped by expert (counting sort) so each expert's weights are
 * streamed once per call; an expert's tokens are cut into items of at most JM_MC tokens.
 * Items are processed in batches whose folded activations fit a scratch budget. Per batch:
 *   gather   x rows of the batch's assignments (tasks: rows)
 *   fold     x for gate and up (tasks: item x matrix)
 *   gate/up  32 rows of gate and of up, then h = silu(g) * u (tasks: item x 8 tiles)
 *   fold     h for down (tasks: items)
 *   down     32 rows of down (tasks: item x 8 tiles)
 *   combine  out[t, cols] += w * y[a, cols] in assignment order (tasks: column ranges)
 * Every task is a fine-grained tile of one expert; items are ordered by the NUMA node of
 * their expert's weights and each node's threads take their node's tasks first. The result
 * does not depend on the thread count (fixed tiles, fixed summation order).
 * With many tokens per active expert (mean >= jm_gemm_min_rows(); INT4: jm_int4_gemm_min_rows())
 * the GEMM path of moe_gemm.c (FP8/BF16) or int4_gemm_moe.c (INT4) runs instead: each weight decoded once per
 * call, same summation order into out.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "int4.h" /* internal.h + jm_int4_gemm_min_rows */
#include "moe.h"

#define FOLD_BUDGET_DEFAULT (4u << 20) /* L3-resident between fold and use; env JAXMOE_CPU_MOE_BUDGET */
#define COMBINE_COLS 256

typedef struct {
  int32_t expert, a0, mc; /* assignments [a0, a0+mc) of the sorted list */
  size_t xf_g, xf_u, xf_d; /* byte offsets of the item's folded activations in the batch */
} item_t;

typedef struct {
  const jm_kernels *K;
  const jm_store_layer *L;
  const float *x;   /* [t][hidden] f32 */
  const int32_t *tok; /* sorted assignments: token */
  const float *wt;  /* sorted assignments: weight */
  item_t *items;
  int n_items, a_begin, a_count; /* batch: items and assignments */
  int64_t *pre;     /* per-phase task prefix over the batch's items (n_items + 1) */
  float *xy;        /* [a_count][hidden]: gathered x, later down's output */
  float *h;         /* [a_count][inter] */
  uint8_t *xf;      /* folded activations */
  float *out;       /* [t][hidden] f32 accumulator */
} moe_ctx;

static int tile_tasks(const jm_matrix *w) { return (w->n_tiles + JM_TILES_PER_TASK - 1) / JM_TILES_PER_TASK; }

static int find_item(const moe_ctx *c, int64_t task) { /* largest i with pre[i] <= task */
  int lo = 0, hi = c->n_items - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (c->pre[mid] <= task) lo = mid; else hi = mid - 1;
  }
  return lo;
}

static void gather_task(void *ctx_, int64_t a, int thread) {
  moe_ctx *c = ctx_;
  const int hid = c->L->hidden;
  memcpy(c->xy + a * hid, c->x + (int64_t)c->tok[c->a_begin + a] * hid, sizeof(float) * (size_t)hid);
}

static void fold_gu_task(void *ctx_, int64_t task, int thread) {
  moe_ctx *c = ctx_;
  const int i = find_item(c, task);
  const item_t *it = &c->items[i];
  const jm_store_expert *e = &c->L->experts[it->expert];
  const int which = (int)(task - c->pre[i]); /* 0 gate, 1 up */
  c->K->fold(e->m[which], 0, c->xy + (int64_t)(it->a0 - c->a_begin) * c->L->hidden, c->L->hidden, it->mc,
             c->xf + (which ? it->xf_u : it->xf_g));
}

static void gate_up_task(void *ctx_, int64_t task, int thread) {
  moe_ctx *c = ctx_;
  const int i = find_item(c, task);
  const item_t *it = &c->items[i];
  const jm_store_expert *e = &c->L->experts[it->expert];
  const int t0 = (int)(task - c->pre[i]) * JM_TILES_PER_TASK;
  const int t1 = t0 + JM_TILES_PER_TASK < e->m[0]->n_tiles ? t0 + JM_TILES_PER_TASK : e->m[0]->n_tiles;
  const int rows = JM_TILES_PER_TASK * JM_TILE_ROWS;
  float g[JM_MC * JM_TILES_PER_TASK * JM_TILE_ROWS], u[JM_MC * JM_TILES_PER_TASK * JM_TILE_ROWS];
  const jm_matrix *wg = e->m[0], *wu = e->m[1];
  c->K->tiles(wg, t0, t1, c->xf + it->xf_g, it->mc, g, rows);
  c->K->tiles(wu, t0, t1, c->xf + it->xf_u, it->mc, u, rows);
  const int r0 = t0 * JM_TILE_ROWS;
  const int r1 = t1 * JM_TILE_ROWS < c->L->inter ? t1 * JM_TILE_ROWS : c->L->inter;
  jm_swiglu(c->h + (int64_t)(it->a0 - c->a_begin) * c->L->inter + r0, c->L->inter, g, rows, u, rows, it->mc, r1 - r0);
}

static void fold_down_task(void *ctx_, int64_t task, int thread) {
  moe_ctx *c = ctx_;
  const int i = find_item(c, task);
  const item_t *it = &c->items[i];
  c->K->fold(c->L->experts[it->expert].m[2], 0, c->h + (int64_t)(it->a0 - c->a_begin) * c->L->inter, c->L->inter,
             it->mc, c->xf + it->xf_d);
}

static void down_task(void *ctx_, int64_t task, int thread) {
  moe_ctx *c = ctx_;
  const int i = find_item(c, task);
  const item_t *it = &c->items[i];
  const jm_matrix *w = c->L->experts[it->expert].m[2];
  const int t0 = (int)(task - c->pre[i]) * JM_TILES_PER_TASK;
  const int t1 = t0 + JM_TILES_PER_TASK < w->n_tiles ? t0 + JM_TILES_PER_TASK : w->n_tiles;
  c->K->tiles(w, t0, t1, c->xf + it->xf_d, it->mc,
              c->xy + (int64_t)(it->a0 - c->a_begin) * c->L->hidden + t0 * JM_TILE_ROWS, c->L->hidden);
}

static void combine_task(void *ctx_, int64_t task, int thread) {
  moe_ctx *c = ctx_;
  const int hid = c->L->hidden;
  const int c0 = (int)task * COMBINE_COLS, c1 = c0 + COMBINE_COLS < hid ? c0 + COMBINE_COLS : hid;
  for (int a = 0; a < c->a_count; a++) {
    float *o = c->out + (int64_t)c->tok[c->a_begin + a] * hid;
    const float *y = c->xy + (int64_t)a * hid;
    const float w = c->wt[c->a_begin + a];
    for (int j = c0; j < c1; j++) o[j] += w * y[j];
  }
}

/* runs one phase over the batch's items; per_item(i) tasks for item i */
static void phase(moe_ctx *c, int64_t (*per_item)(const moe_ctx *, const item_t *), jm_task_fn fn,
                  const int64_t *node_items) {
  c->pre[0] = 0;
  for (int i = 0; i < c->n_items; i++) c->pre[i + 1] = c->pre[i] + per_item(c, &c->items[i]);
  int64_t ns[9];
  const int nodes = jm_pool_nodes();
  if (node_items && nodes > 1 && nodes <= 8) {
    for (int j = 0; j <= nodes; j++) ns[j] = c->pre[node_items[j]];
    jm_pool_run(c->pre[c->n_items], fn, c, ns);
  } else {
    jm_pool_run(c->pre[c->n_items], fn, c, NULL);
  }
}
static int64_t n_fold_gu(const moe_ctx *c, const item_t *it) { return 2; }
static int64_t n_gate_up(const moe_ctx *c, const item_t *it) { return tile_tasks(c->L->experts[it->expert].m[0]); }
static int64_t n_fold_down(const moe_ctx *c, const item_t *it) { return 1; }
static int64_t n_down(const moe_ctx *c, const item_t *it) { return tile_tasks(c->L->experts[it->expert].m[2]); }

#define GEMM_H_ROWS 8192 /* assignment rows of h [rows][inter] per batch of experts (64 MB at inter 2048) */

int32_t *jm_moe_starts(const int32_t *order, const int32_t *cnt, int ne, int64_t n_act, int inter, int *max_rows,
                       int64_t *h_rows) {
  int32_t *start = malloc(sizeof *start * ((size_t)ne + 1));
  if (!start) return NULL;
  *max_rows = 0;
  start[0] = 0;
  for (int j = 0; j < ne; j++) {
    start[j + 1] = start[j] + cnt[order[j]];
    if (cnt[order[j]] > *max_rows) *max_rows = cnt[order[j]];
  }
  const char *env = getenv("JAXMOE_CPU_MOE_BUDGET"); /* set: bytes of h per batch of experts */
  const int64_t cap = env && atoll(env) > 0 ? atoll(env) / ((int64_t)inter * (int64_t)sizeof(float)) : GEMM_H_ROWS;
  *h_rows = n_act < cap ? n_act : cap;
  if (*h_rows < *max_rows) *h_rows = *max_rows;
  return start;
}

static int moe_gemm_call(const jm_store_layer *L, const void *x, int32_t x_dtype, int64_t t, const int32_t *tok,
                         const float *wt, const int32_t *order, const int32_t *cnt, int ne, int64_t n_act, void *out,
                         int32_t out_dtype) {
  const int H = L->hidden, I = L->inter;
  int max_rows;
  int64_t h_rows;
  int32_t *start = jm_moe_starts(order, cnt, ne, n_act, I, &max_rows, &h_rows);
  if (!start) return jm_error(JM_ENOMEM, "jm_moe: out of memory");
#define A64(b) (((size_t)(b) + 63) & ~(size_t)63)
  const size_t x_bytes = x_dtype == JM_DT_F32 ? 0 : A64((size_t)t * H * sizeof(float));
  const size_t h_bytes = A64((size_t)h_rows * I * sizeof(float));
  const int n_bufs = jm_pool_threads();
  const jm_kernels *K = jm_kernels_current();
  const size_t tb_bytes = A64(jm_moe_gemm_scratch(K, L, order, t, h_rows, n_bufs, max_rows));
  const size_t o_bytes = out_dtype == JM_DT_F32 ? 0 : (size_t)t * H * sizeof(float);
#undef A64
  jm_engine_lock();
  uint8_t *sc = jm_scratch(x_bytes + h_bytes + tb_bytes + o_bytes);
  if (!sc) {
    jm_engine_unlock();
    free(start);
    return jm_error(JM_ENOMEM, "jm_moe: out of memory for %zu bytes of scratch", x_bytes + h_bytes + tb_bytes + o_bytes);
  }
  const float *xs = (const float *)x;
  if (x_bytes) {
    jm_to_f32(x, x_dtype, t * H, (float *)sc);
    xs = (const float *)sc;
  }
  float *o = out_dtype == JM_DT_F32 ? (float *)out : (float *)(sc + x_bytes + h_bytes + tb_bytes);
  memset(o, 0, (size_t)t * H * sizeof(float));
  const int rc = jm_moe_gemm(K, L, xs, t, tok, wt, order, start, ne, o, (float *)(sc + x_bytes), h_rows,
                             sc + x_bytes + h_bytes, n_bufs, max_rows);
  if (rc == JM_OK && out_dtype != JM_DT_F32) jm_from_f32(o, t * H, out_dtype, out);
  jm_engine_unlock();
  free(start);
  return rc;
}

static int node_of(const jm_store_layer *L, int e) {
  const int n = L->experts[e].m[0]->node;
  return n < 0 ? 0 : n % jm_pool_nodes();
}

int jm_moe(const jm_store *s, int32_t layer, const void *x, int32_t x_dtype, int64_t t, const int32_t *ids,
           const float *weights, int32_t top_k, void *out, int32_t out_dtype) {
  if (!s || !jm_registry_has(s) || s->magic != JM_STORE_MAGIC) return jm_error(JM_EHANDLE, "jm_moe: not a live expert store");
  if (layer < 0 || layer >= s->n_layers) return jm_error(JM_EINVAL, "jm_moe: layer %d out of range [0, %d)", layer, s->n_layers);
  const jm_store_layer *L = &s->layers[layer];
  if (!L->n_experts) return jm_error(JM_EINVAL, "jm_moe: layer %d has no experts in this store", layer);
  if ((x_dtype != JM_DT_F32 && x_dtype != JM_DT_BF16) || (out_dtype != JM_DT_F32 && out_dtype != JM_DT_BF16))
    return jm_error(JM_EINVAL, "jm_moe: dtypes must be f32 or bf16");
  if (t < 0 || top_k <= 0) return jm_error(JM_EINVAL, "jm_moe: bad token count %lld or top_k %d", (long long)t, top_k);
  if (t == 0) return JM_OK;
  if (!x || !ids || !weights || !out) return jm_error(JM_EINVAL, "jm_moe: NULL buffer");
  const int E = L->n_experts, H = L->hidden, I = L->inter;
  for (int64_t a = 0; a < t * top_k; a++) {
    if (ids[a] >= E) return jm_error(JM_EINVAL, "jm_moe: expert id %d at [%lld, %lld] out of range [0, %d)", ids[a], (long long)(a / top_k), (long long)(a % top_k), E);
    if (ids[a] >= 0 && !L->experts[ids[a]].m[2]) return jm_error(JM_EINVAL, "jm_moe: layer %d expert %d is not loaded", layer, ids[a]);
  }
  /* INT4 (int4.c): the experts' format picks the kernels; one format per call */
  const jm_matrix *f0 = NULL;
  for (int64_t a = 0; a < t * top_k; a++)
    for (int j = 0; j < 3 && ids[a] >= 0; j++) {
      const jm_matrix *mj = L->experts[ids[a]].m[j];
      if (!f0) f0 = mj;
      if (mj->format != f0->format) return jm_error(JM_EINVAL, "jm_moe: layer %d mixes expert weight formats (%d and %d)", layer, f0->format, mj->format);
    }
  const jm_kernels *K = f0 ? jm_kernels_for(f0) : jm_kernels_current();
  const int nodes = jm_pool_nodes();
  const char *env = getenv("JAXMOE_CPU_MOE_BUDGET");
  const size_t budget = env && atoll(env) > 0 ? (size_t)atoll(env) : FOLD_BUDGET_DEFAULT;
  /* counting sort of the assignments by (node, expert) */
  const int64_t n_all = t * top_k;
  int32_t *cnt = calloc((size_t)E + 1, sizeof *cnt), *order = malloc(sizeof *order * (size_t)E);
  int32_t *tok = malloc(sizeof *tok * (size_t)n_all), *pos = calloc((size_t)E, sizeof *pos);
  float *wt = malloc(sizeof *wt * (size_t)n_all);
  item_t *items = calloc((size_t)n_all + 1, sizeof *items); /* at most one item per assignment */
  int64_t *pre = malloc(sizeof *pre * (size_t)(n_all + 2)), node_items[9] = {0};
  int rc = JM_OK, used_gemm = 0;
  const int64_t prof_t0 = jm_prof_start();
  if (!cnt || !order || !tok || !pos || !wt || !items || !pre) { rc = jm_error(JM_ENOMEM, "jm_moe: out of memory"); goto done; }
  for (int64_t a = 0; a < n_all; a++) if (ids[a] >= 0) cnt[ids[a]]++;
  int n_items = 0, ne = 0;
  for (int nd = 0; nd < nodes; nd++)
    for (int e = 0; e < E; e++)
      if (cnt[e] && node_of(L, e) == nd) order[ne++] = e, n_items += (cnt[e] + JM_MC - 1) / JM_MC;
  int64_t a0 = 0;
  for (int i = 0, k = 0; i < ne; i++) {
    const int e = order[i];
    pos[e] = (int32_t)a0;
    for (int32_t m = 0; m < cnt[e]; m += JM_MC, k++) {
      items[k].expert = e, items[k].a0 = (int32_t)(a0 + m), items[k].mc = cnt[e] - m < JM_MC ? cnt[e] - m : JM_MC;
      node_items[node_of(L, e) + 1] = k + 1;
    }
    a0 += cnt[e];
  }
  for (int j = 1; j <= nodes; j++) if (node_items[j] < node_items[j - 1]) node_items[j] = node_items[j - 1];
  for (int64_t a = 0; a < n_all; a++)
    if (ids[a] >= 0) { const int32_t p = pos[ids[a]]++; tok[p] = (int32_t)(a / top_k); wt[p] = weights[a]; }
  /* many tokens per active expert: the GEMM path decodes each weight once for all of them */
  if (ne > 0 && (f0->format == JM_FMT_FP8 || f0->format == JM_FMT_BF16) && a0 >= (int64_t)ne * jm_gemm_min_rows()) {
    used_gemm = 1;
    rc = moe_gemm_call(L, x, x_dtype, t, tok, wt, order, cnt, ne, a0, out, out_dtype);
    goto done;
  }
  if (ne > 0 && f0->format == JM_FMT_INT4 && a0 >= (int64_t)ne * jm_int4_gemm_min_rows() &&
      jm_int4_moe_gemm_usable(L, order, ne)) {
    used_gemm = 1;
    rc = jm_int4_moe_gemm_call(L, x, x_dtype, t, tok, wt, order, cnt, ne, a0, out, out_dtype);
    goto done;
  }
  /* batches: consecutive items within the fold budget; size the scratch for the largest */
  size_t max_fold = 0, max_rows = 0, fold = 0, rows = 0;
  for (int i = 0; i < n_items; i++) {
    const jm_store_expert *e = &L->experts[items[i].expert];
    const size_t f = jm_fold_bytes(K, e->m[0], items[i].mc) + jm_fold_bytes(K, e->m[1], items[i].mc) + jm_fold_bytes(K, e->m[2], items[i].mc);
    if (fold && fold + f > budget) fold = 0, rows = 0;
    fold += f, rows += (size_t)items[i].mc;
    if (fold > max_fold) max_fold = fold;
    if (rows > max_rows) max_rows = rows;
  }
  const size_t x_bytes = ((size_t)t * H * sizeof(float) + 63) & ~(size_t)63;
  const size_t xy_bytes = (max_rows * H * sizeof(float) + 63) & ~(size_t)63, h_bytes = (max_rows * I * sizeof(float) + 63) & ~(size_t)63;
  const size_t o_bytes = out_dtype == JM_DT_F32 ? 0 : (size_t)t * H * sizeof(float);
  jm_engine_lock();
  uint8_t *sc = jm_scratch(max_fold + x_bytes + xy_bytes + h_bytes + o_bytes);
  if (!sc) { jm_engine_unlock(); rc = jm_error(JM_ENOMEM, "jm_moe: out of memory for scratch"); goto done; }
  float *xs = (float *)(sc + max_fold);
  jm_to_f32(x, x_dtype, t * H, xs);
  moe_ctx c = {K, L, xs, tok, wt, NULL, 0, 0, 0, pre, (float *)(sc + max_fold + x_bytes),
               (float *)(sc + max_fold + x_bytes + xy_bytes), sc,
               out_dtype == JM_DT_F32 ? (float *)out : (float *)(sc + max_fold + x_bytes + xy_bytes + h_bytes)};
  memset(c.out, 0, (size_t)t * H * sizeof(float));
  for (int i0 = 0; i0 < n_items;) {
    size_t off = 0;
    int i1 = i0;
    for (; i1 < n_items; i1++) {
      const jm_store_expert *e = &L->experts[items[i1].expert];
      const int mc = items[i1].mc;
      const size_t f = jm_fold_bytes(K, e->m[0], mc) + jm_fold_bytes(K, e->m[1], mc) + jm_fold_bytes(K, e->m[2], mc);
      if (i1 > i0 && off + f > budget) break;
      items[i1].xf_g = off, items[i1].xf_u = off + jm_fold_bytes(K, e->m[0], mc);
      items[i1].xf_d = items[i1].xf_u + jm_fold_bytes(K, e->m[1], mc);
      off += f;
    }
    c.items = items + i0, c.n_items = i1 - i0, c.a_begin = items[i0].a0;
    c.a_count = items[i1 - 1].a0 + items[i1 - 1].mc - c.a_begin;
    int64_t ni[9];
    for (int j = 0; j <= nodes && j < 9; j++) {
      const int64_t v = node_items[j] - i0;
      ni[j] = v < 0 ? 0 : (v > c.n_items ? c.n_items : v);
    }
    jm_pool_run_sized(c.a_count, gather_task, &c, (int64_t)c.a_count * H);
    phase(&c, n_fold_gu, fold_gu_task, ni);
    phase(&c, n_gate_up, gate_up_task, ni);
    phase(&c, n_fold_down, fold_down_task, ni);
    phase(&c, n_down, down_task, ni);
    jm_pool_run_sized((H + COMBINE_COLS - 1) / COMBINE_COLS, combine_task, &c, (int64_t)c.a_count * H);
    i0 = i1;
  }
  if (out_dtype != JM_DT_F32) jm_from_f32(c.out, t * H, out_dtype, out);
  jm_engine_unlock();
done:
  jm_prof_stop(used_gemm ? JM_PROF_MOE_GEMM : JM_PROF_MOE, prof_t0, t);
  free(cnt), free(order), free(tok), free(pos), free(wt), free(items), free(pre);
  return rc;
}
