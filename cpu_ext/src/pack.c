/* pack.c -- repacking a Linear weight [n, k] into the kernels' streaming layout.
 *
 * Tile t holds rows 4t..4t+3. Inside a tile, the rows are interleaved in 64-byte segments:
 *   segment c of row r at  t*tile_bytes + c*256 + r*64
 * (FP8: 64 columns per segment; BF16: 32). K is zero-padded to a multiple of 128 and the last
 * tile is zero-padded to 4 rows, so kernels never see a tail. The stream of a task (8 tiles)
 * is read strictly front to back. FP8 block scales are kept as [ceil(n/128)][k_pad/128].
 * A matrix owns its memory, or borrows it from an expert store's slab (jm_matrix_new with
 * data: store.c), where the experts of a layer lie one after the other.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int64_t jm_matrix_packed_bytes(int32_t format, int32_t n, int32_t k) {
  const int64_t k_pad = (int64_t)(k + JM_KBLOCK - 1) / JM_KBLOCK * JM_KBLOCK;
  return (int64_t)(n + JM_TILE_ROWS - 1) / JM_TILE_ROWS * JM_TILE_ROWS * k_pad * (format == JM_FMT_BF16 ? 2 : 1);
}

jm_matrix *jm_matrix_header(int32_t format, int32_t n, int32_t k, int32_t node) {
  jm_matrix *m = calloc(1, sizeof *m);
  if (!m) return NULL;
  m->magic = JM_MATRIX_MAGIC;
  m->format = format;
  m->n = n;
  m->k = k;
  m->node = node;
  m->n_tiles = (n + JM_TILE_ROWS - 1) / JM_TILE_ROWS;
  m->kb = (k + JM_KBLOCK - 1) / JM_KBLOCK;
  m->k_pad = m->kb * JM_KBLOCK;
  m->n_rb = format == JM_FMT_FP8 ? (n + JM_KBLOCK - 1) / JM_KBLOCK : 1;
  m->tile_bytes = (int64_t)JM_TILE_ROWS * m->k_pad * (format == JM_FMT_BF16 ? 2 : 1);
  return m;
}

static jm_matrix *matrix_new(int32_t format, int32_t n, int32_t k, int32_t node, uint8_t *data, float *scale,
                             int zero) {
  jm_matrix *m = jm_matrix_header(format, n, k, node);
  if (!m) goto oom;
  const size_t bytes = (size_t)m->n_tiles * (size_t)m->tile_bytes;
  m->borrowed = data != NULL;
  m->data = data ? data : jm_alloc_node(bytes, node, &m->data_alloc);
  if (!m->data) goto oom;
  if (zero) memset(m->data, 0, bytes);
  if (format == JM_FMT_FP8) {
    m->scale = scale ? scale : malloc(sizeof(float) * (size_t)m->n_rb * (size_t)m->kb);
    if (!m->scale) goto oom;
  }
  if (jm_registry_add(m) != JM_OK) goto oom;
  return m;
oom:
  if (m && !m->borrowed) {
    jm_free_node(m->data, m->data_alloc);
    free(m->scale);
  }
  free(m);
  jm_error(JM_ENOMEM, "out of memory packing a [%d, %d] matrix", n, k);
  return NULL;
}

jm_matrix *jm_matrix_new(int32_t format, int32_t n, int32_t k, int32_t node, uint8_t *data, float *scale) {
  return matrix_new(format, n, k, node, data, scale, 1);
}

jm_matrix *jm_matrix_new_unzeroed(int32_t format, int32_t n, int32_t k, int32_t node, uint8_t *data, float *scale) {
  return matrix_new(format, n, k, node, data, scale, 0);
}

/* copy row `row` (bytes src, row_bytes long) into its tile's interleaved segments */
static void put_row(jm_matrix *m, int32_t row, const uint8_t *src, int64_t row_bytes) {
  uint8_t *t = m->data + (int64_t)(row / JM_TILE_ROWS) * m->tile_bytes + (row % JM_TILE_ROWS) * JM_SEG;
  for (int64_t off = 0, c = 0; off < row_bytes; off += JM_SEG, c++) {
    const int64_t len = row_bytes - off < JM_SEG ? row_bytes - off : JM_SEG;
    memcpy(t + c * JM_SEG * JM_TILE_ROWS, src + off, (size_t)len);
  }
}

int jm_matrix_check_source(int32_t format, const void *w, int64_t ldw, const float *scale, int64_t lds, int32_t n,
                           int32_t k, const char *fn) {
  const int32_t kb = (k + JM_KBLOCK - 1) / JM_KBLOCK;
  if (n <= 0 || k <= 0 || !w || (format == JM_FMT_FP8 && !scale))
    return jm_error(JM_EINVAL, "%s: shape must be positive, got [%d, %d], and buffers non-NULL", fn, n, k);
  if (ldw < k || (format == JM_FMT_FP8 && lds < kb))
    return jm_error(JM_EINVAL, "%s: strides too small (ldw %lld < k %d or lds %lld < %d)", fn, (long long)ldw, k,
                    (long long)lds, kb);
  return JM_OK;
}

void jm_matrix_fill(jm_matrix *m, const void *w, int64_t ldw, const float *scale, int64_t lds) {
  const int elem = m->format == JM_FMT_BF16 ? 2 : 1;
  for (int32_t r = 0; r < m->n; r++) put_row(m, r, (const uint8_t *)w + (int64_t)r * ldw * elem, (int64_t)m->k * elem);
  if (m->format == JM_FMT_FP8)
    for (int32_t i = 0; i < m->n_rb; i++) memcpy(m->scale + (int64_t)i * m->kb, scale + i * lds, sizeof(float) * (size_t)m->kb);
}

/* ---- the same bytes over the thread pool: each task zeroes and fills a run of whole tiles
 * (rows 4t..4t+3 of its tiles), so the first touch of the destination pages (and of the
 * source's file pages) is spread over the pool's threads; the result does not depend on
 * the thread count or the order the tasks run in. */
#define FILL_TASK_BYTES (128 << 10) /* packed bytes per task */

typedef struct {
  jm_matrix *m;
  const uint8_t *w;
  int64_t row_stride, row_bytes; /* bytes */
  int32_t tiles_per_task;
} fill_ctx;

static void fill_task(void *ctx, int64_t task, int thread) {
  (void)thread;
  const fill_ctx *c = ctx;
  jm_matrix *m = c->m;
  const int64_t t0 = task * c->tiles_per_task;
  const int64_t t1 = t0 + c->tiles_per_task < m->n_tiles ? t0 + c->tiles_per_task : m->n_tiles;
  memset(m->data + t0 * m->tile_bytes, 0, (size_t)((t1 - t0) * m->tile_bytes));
  const int64_t r_end = t1 * JM_TILE_ROWS < m->n ? t1 * JM_TILE_ROWS : m->n;
  for (int64_t r = t0 * JM_TILE_ROWS; r < r_end; r++) put_row(m, (int32_t)r, c->w + r * c->row_stride, c->row_bytes);
}

void jm_matrix_fill_pool(jm_matrix *m, const void *w, int64_t ldw, const float *scale, int64_t lds) {
  const int elem = m->format == JM_FMT_BF16 ? 2 : 1;
  int64_t per = FILL_TASK_BYTES / m->tile_bytes;
  per = per < 1 ? 1 : per;
  fill_ctx c = {m, w, ldw * elem, (int64_t)m->k * elem, (int32_t)per};
  jm_pool_run_sized((m->n_tiles + per - 1) / per, fill_task, &c, (int64_t)m->n_tiles * m->tile_bytes);
  if (m->format == JM_FMT_FP8)
    for (int32_t i = 0; i < m->n_rb; i++) memcpy(m->scale + (int64_t)i * m->kb, scale + i * lds, sizeof(float) * (size_t)m->kb);
}

jm_matrix *jm_matrix_create_fp8(const uint8_t *w, int64_t ldw, const float *scale, int64_t lds,
                                int32_t n, int32_t k, int32_t node) {
  if (jm_matrix_check_source(JM_FMT_FP8, w, ldw, scale, lds, n, k, "jm_matrix_create_fp8")) return NULL;
  jm_matrix *m = jm_matrix_new_unzeroed(JM_FMT_FP8, n, k, node, NULL, NULL);
  if (m) jm_matrix_fill_pool(m, w, ldw, scale, lds);
  return m;
}

jm_matrix *jm_matrix_create_bf16(const uint16_t *w, int64_t ldw, int32_t n, int32_t k, int32_t node) {
  if (jm_matrix_check_source(JM_FMT_BF16, w, ldw, NULL, 0, n, k, "jm_matrix_create_bf16")) return NULL;
  jm_matrix *m = jm_matrix_new_unzeroed(JM_FMT_BF16, n, k, node, NULL, NULL);
  if (m) jm_matrix_fill_pool(m, w, ldw, NULL, 0);
  return m;
}

void jm_matrix_free(jm_matrix *m) {
  if (!m || !jm_registry_remove(m)) return; /* unknown or already freed: ignore */
  m->magic = 0;
  if (!m->borrowed) { /* a store slab's memory goes with the store (store.c) */
    jm_free_node(m->data, m->data_alloc);
    free(m->scale);
  }
  free(m);
}

jm_matrix *jm_matrix_from_handle(int64_t handle) {
  jm_matrix *m = (jm_matrix *)(uintptr_t)handle;
  if (!handle || !jm_registry_has(m) || m->magic != JM_MATRIX_MAGIC) {
    jm_error(JM_EHANDLE, "0x%llx is not a live jaxmoe matrix handle (freed or never created)",
             (unsigned long long)handle);
    return NULL;
  }
  return m;
}

int jm_matrix_info(const jm_matrix *m, int32_t *format, int32_t *n, int32_t *k, int64_t *bytes) {
  if (!m || !jm_registry_has(m)) return jm_error(JM_EHANDLE, "jm_matrix_info: not a live matrix");
  if (format) *format = m->format;
  if (n) *n = m->n;
  if (k) *k = m->k;
  if (bytes) *bytes = (int64_t)m->n_tiles * m->tile_bytes;
  return JM_OK;
}
