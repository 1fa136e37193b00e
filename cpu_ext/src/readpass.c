/* readpass.c -- the benchmark's yardstick: a read-only pass over the packed bytes of some
 * matrices, spread over the same pool in 256 KiB tasks. What a GEMV cannot beat. */
#include <immintrin.h>

#include "internal.h"

#define READ_TASK (256 << 10)

typedef struct {
  const jm_matrix *const *ms;
  int32_t n;
  int64_t tasks_per[64];
  uint64_t acc[256];
} read_ctx;

__attribute__((target("avx2"))) static uint64_t read_avx2(const uint8_t *p, int64_t bytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t j = 0; j + 128 <= bytes; j += 128) {
    a0 = _mm256_or_si256(a0, _mm256_load_si256((const __m256i *)(p + j)));
    a1 = _mm256_or_si256(a1, _mm256_load_si256((const __m256i *)(p + j + 32)));
    a2 = _mm256_or_si256(a2, _mm256_load_si256((const __m256i *)(p + j + 64)));
    a3 = _mm256_or_si256(a3, _mm256_load_si256((const __m256i *)(p + j + 96)));
  }
  const __m256i a = _mm256_or_si256(_mm256_or_si256(a0, a1), _mm256_or_si256(a2, a3));
  return (uint64_t)_mm256_extract_epi64(a, 0) | (uint64_t)_mm256_extract_epi64(a, 3);
}

static uint64_t read_scalar(const uint8_t *p, int64_t bytes) {
  const uint64_t *q = (const uint64_t *)p;
  uint64_t a[8] = {0};
  for (int64_t j = 0; j + 8 <= bytes / 8; j += 8)
    for (int u = 0; u < 8; u++) a[u] |= q[j + u];
  return a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7];
}

static void read_task(void *ctx_, int64_t task, int thread) {
  read_ctx *c = ctx_;
  int i = 0;
  while (task >= c->tasks_per[i]) task -= c->tasks_per[i++];
  const jm_matrix *m = c->ms[i];
  const int64_t total = (int64_t)m->n_tiles * m->tile_bytes;
  const int64_t b0 = task * READ_TASK, b1 = b0 + READ_TASK < total ? b0 + READ_TASK : total;
  const uint64_t r = jm_isa_supported(JM_ISA_AVX2) ? read_avx2(m->data + b0, b1 - b0) : read_scalar(m->data + b0, b1 - b0);
  c->acc[thread & 255] ^= r;
}

uint64_t jm_read_pass(const jm_matrix *const *ms, int32_t n) {
  read_ctx c = {ms, n, {0}, {0}};
  if (!ms || n <= 0 || n > 64) return (uint64_t)jm_error(JM_EINVAL, "jm_read_pass: 1..64 matrices");
  int64_t tasks = 0;
  for (int32_t i = 0; i < n; i++) {
    if (!jm_registry_has(ms[i])) return (uint64_t)jm_error(JM_EHANDLE, "jm_read_pass: not a live matrix");
    const int64_t total = (int64_t)ms[i]->n_tiles * ms[i]->tile_bytes;
    c.tasks_per[i] = (total + READ_TASK - 1) / READ_TASK;
    tasks += c.tasks_per[i];
  }
  jm_engine_lock();
  jm_pool_run(tasks, read_task, &c, NULL);
  jm_engine_unlock();
  uint64_t r = 0;
  for (int i = 0; i < 256; i++) r ^= c.acc[i];
  return r;
}
