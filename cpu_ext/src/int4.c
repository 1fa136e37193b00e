/* int4.c -- INT4 matrices: repacking group-quantized nibbles and f16 scales into the
 * streaming tile layout (int4.h), and the choice of the INT4 kernels for the selected ISA.
 *
 * The AVX-512 INT4 kernel needs AVX512_VNNI (vpdpbusd) besides the AVX-512 path's features;
 * without it the AVX2 INT4 kernel runs. jm_kernels_for() is what linear.c and moe.c call.
 */
#include <cpuid.h>
#include <stdlib.h>
#include <string.h>

#include "int4.h"

static int vnni_supported(void) {
  static int cached = -1;
  if (cached < 0) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, NULL) >= 7) __cpuid_count(7, 0, a, b, c, d);
    cached = ((c >> 11) & 1) && ((b >> 31) & 1); /* AVX512_VNNI and AVX512VL (ymm forms) */
  }
  return cached;
}

int jm_int4_isa(void) {
  const int isa = jm_isa_selected();
  if (isa == JM_ISA_AVX512 && !(jm_int4_avx512_emulated || vnni_supported())) return JM_ISA_AVX2;
  return isa;
}

const jm_kernels *jm_kernels_for(const jm_matrix *w) {
  if (w->format != JM_FMT_INT4) return jm_kernels_current();
  switch (jm_int4_isa()) {
    case JM_ISA_AVX512: return &jm_int4_kernels_avx512;
    case JM_ISA_AVX2: return &jm_int4_kernels_avx2;
    default: return &jm_int4_kernels_scalar;
  }
}

static inline int nibble(const uint8_t *row, int64_t col) {
  return (row[col >> 1] >> ((col & 1) * 4)) & 15;
}

/* packs the rows of a run of whole tiles (padding first: nibble 8 = 0 with scale 0); tasks of
 * jm_matrix_create_int4 on the thread pool, each writing only its own tiles */
typedef struct {
  jm_matrix *m;
  const uint8_t *q;
  int64_t ldq;
  const uint16_t *scale;
  int64_t lds;
  int32_t ng, tiles_per_task;
} int4_fill_ctx;

static void int4_fill_task(void *ctx, int64_t task, int thread) {
  (void)thread;
  const int4_fill_ctx *c = ctx;
  const jm_matrix *m = c->m;
  const int32_t group = m->group, k = m->k, ng = c->ng, n_sb = jm_int4_n_sb(m), V = group / 8;
  const int64_t sbb = jm_int4_sb_bytes(m);
  const int64_t t0 = task * c->tiles_per_task;
  const int64_t t1 = t0 + c->tiles_per_task < m->n_tiles ? t0 + c->tiles_per_task : m->n_tiles;
  memset(m->data + t0 * m->tile_bytes, 0x88, (size_t)((t1 - t0) * m->tile_bytes));
  const int64_t r_end = t1 * JM_TILE_ROWS < m->n ? t1 * JM_TILE_ROWS : m->n;
  for (int64_t r = t0 * JM_TILE_ROWS; r < r_end; r++) {
    const uint8_t *src = c->q + r * c->ldq;
    const uint16_t *sc = c->scale + r * c->lds;
    uint8_t *tile = m->data + (r / JM_TILE_ROWS) * m->tile_bytes;
    const int rr = (int)(r % JM_TILE_ROWS);
    for (int sb = 0; sb < n_sb; sb++) {
      uint8_t *nib = tile + sb * sbb + (int64_t)rr * 4 * group;
      uint16_t *ss = (uint16_t *)(tile + sb * sbb + 16 * (int64_t)group + 16 * rr);
      for (int l = 0; l < 8; l++) {
        const int g = sb * 8 + l;
        ss[l] = g < ng ? sc[g] : 0;
        for (int v = 0; v < V; v++)
          for (int j = 0; j < 4; j++) {
            const int64_t c_lo = (int64_t)g * group + 8 * v + j, c_hi = c_lo + 4;
            const int lo = c_lo < k ? nibble(src, c_lo) : 8, hi = c_hi < k ? nibble(src, c_hi) : 8;
            nib[32 * v + 4 * l + j] = (uint8_t)(lo | hi << 4);
          }
      }
    }
  }
}

jm_matrix *jm_matrix_create_int4(const uint8_t *q, int64_t ldq, const uint16_t *scale, int64_t lds, int32_t n,
                                 int32_t k, int32_t group, int32_t node) {
  if (n <= 0 || k <= 0 || !q || !scale) {
    jm_error(JM_EINVAL, "jm_matrix_create_int4: shape must be positive, got [%d, %d], and buffers non-NULL", n, k);
    return NULL;
  }
  if (group < 32 || group > 256 || group % 32) {
    jm_error(JM_EINVAL, "jm_matrix_create_int4: group size %d must be a multiple of 32 in [32, 256]", group);
    return NULL;
  }
  const int32_t ng = (k + group - 1) / group;
  if (ldq < (k + 1) / 2 || lds < ng) {
    jm_error(JM_EINVAL, "jm_matrix_create_int4: strides too small (ldq %lld < %d or lds %lld < %d)", (long long)ldq,
             (k + 1) / 2, (long long)lds, ng);
    return NULL;
  }
  jm_matrix *m = calloc(1, sizeof *m);
  if (!m) goto oom;
  const int32_t sbc = 8 * group;
  m->magic = JM_MATRIX_MAGIC;
  m->format = JM_FMT_INT4;
  m->n = n, m->k = k, m->node = node, m->group = group;
  m->n_tiles = (n + JM_TILE_ROWS - 1) / JM_TILE_ROWS;
  m->k_pad = (k + sbc - 1) / sbc * sbc;
  m->kb = m->k_pad / JM_KBLOCK;
  m->n_rb = 1;
  const int n_sb = jm_int4_n_sb(m);
  const int64_t sbb = jm_int4_sb_bytes(m);
  m->tile_bytes = n_sb * sbb;
  const size_t bytes = (size_t)m->n_tiles * (size_t)m->tile_bytes;
  m->data = jm_alloc_node(bytes, node, &m->data_alloc);
  if (!m->data) goto oom;
  int64_t per = (128 << 10) / m->tile_bytes; /* tiles per pool task: ~128 KiB of packed bytes */
  per = per < 1 ? 1 : per;
  int4_fill_ctx c = {m, q, ldq, scale, lds, ng, (int32_t)per};
  jm_pool_run_sized((m->n_tiles + per - 1) / per, int4_fill_task, &c, (int64_t)bytes);
  if (jm_registry_add(m) != JM_OK) goto oom;
  return m;
oom:
  if (m) jm_free_node(m->data, m->data_alloc);
  free(m);
  jm_error(JM_ENOMEM, "out of memory packing a [%d, %d] INT4 matrix", n, k);
  return NULL;
}

/* ---- activation quantization (shared by every path: bit-identical int8 values) ---------- */
float jm_int4_quant_group_ref(const float *x, int valid, int g, int8_t *q, int32_t *sum) {
  float amax = 0.0f;
  for (int j = 0; j < valid; j++) {
    const float a = x[j] < 0 ? -x[j] : x[j];
    amax = a > amax ? a : amax;
  }
  int32_t s = 0;
  const float inv = amax > 0 ? 127.0f / amax : 0.0f;
  for (int j = 0; j < g; j++) {
    int v = j < valid ? (int)__builtin_rintf(x[j] * inv) : 0;
    v = v > 127 ? 127 : v < -127 ? -127 : v;
    q[j] = (int8_t)v;
    s += v;
  }
  *sum = s;
  return amax / 127.0f;
}

void jm_int4_place_group(const jm_matrix *w, uint8_t *xf_tok, int gi, const int8_t *q) {
  const int G = w->group, V = G / 8, sb = gi / 8, l = gi % 8;
  uint8_t *lo = xf_tok + (int64_t)sb * 8 * G, *hi = lo + 4 * G;
  for (int v = 0; v < V; v++) {
    memcpy(lo + 32 * v + 4 * l, q + 8 * v, 4);
    memcpy(hi + 32 * v + 4 * l, q + 8 * v + 4, 4);
  }
}

/* the fold of every path: each group of each token quantized by `quant` (a path's twin of
 * jm_int4_quant_group_ref), its scale, correction and int8 values placed in the token's xf */
void jm_int4_fold_with(jm_int4_quant_fn quant, const jm_matrix *w, const float *x, int64_t ldx, int m, void *xf_) {
  uint8_t *xf = (uint8_t *)xf_;
  const int G = w->group, ng = w->k_pad / G;
  int8_t q[256];
  for (int i = 0; i < m; i++) {
    const float *xi = x + i * ldx;
    uint8_t *tok = xf + i * jm_int4_xf_stride(w);
    float *sx = jm_int4_sx(w, tok);
    int32_t *corr = jm_int4_corr(w, tok);
    for (int g = 0; g < ng; g++) {
      const int c0 = g * G;
      const int valid = c0 >= w->k ? 0 : (w->k - c0 < G ? w->k - c0 : G);
      int32_t s;
      sx[g] = quant(valid ? xi + c0 : xi, valid, G, q, &s); /* no pointer past the row */
      corr[g] = -8 * s;
      jm_int4_place_group(w, tok, g, q);
    }
  }
}
