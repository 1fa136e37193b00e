/* test_native.c -- C-level harness for cpu_ext, meant to run under AddressSanitizer and
 * UndefinedBehaviorSanitizer (make sanitize). Every ISA path this build can run is checked
 * against a double-precision reference with the bounds of jaxmoe/cpu/reference.py, on odd
 * shapes (K, N not multiples of 128, M across token chunks), with the GEMM path off and forced
 * on (jm_set_gemm_min_rows), the fused MoE against a scalar
 * double reference, and every error path (NULL, freed handles, bad ids, bad shapes).
 * Prints "N passed, N failed" and exits non-zero on any failure.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jaxmoe_cpu.h"

static int passed, failed;
#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (cond) {                                                  \
      passed++;                                                  \
    } else {                                                     \
      failed++;                                                  \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);       \
      fprintf(stderr, __VA_ARGS__);                              \
      fprintf(stderr, " [%s]\n", jm_last_error());               \
    }                                                            \
  } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
  rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
  return (uint32_t)(rng_state >> 16);
}
static double urand(void) { return (rnd() & 0xffffff) / 16777216.0; }
static double nrand(void) { return sqrt(-2 * log(urand() + 1e-12)) * cos(6.283185307 * urand()); }

static double fp8_value(uint8_t b) { /* the kernel contract: NaN codes are +-480 */
  const int e = (b >> 3) & 15, m = b & 7;
  const double mag = e ? ldexp(1.0 + m / 8.0, e - 7) : ldexp(m / 8.0, -6);
  return (b & 0x80) ? -mag : mag;
}
static int fp8_subnormal(uint8_t b) { return !(b & 0x78) && (b & 7); }

typedef struct {
  int n, k;
  uint8_t *q;
  float *s;
  double *w; /* dequantized [n][k] */
} fp8_mat;

static fp8_mat fp8_random(int n, int k) {
  fp8_mat m = {n, k, malloc((size_t)n * k), NULL, malloc(sizeof(double) * n * k)};
  const int nb = (n + 127) / 128, kb = (k + 127) / 128;
  m.s = malloc(sizeof(float) * nb * kb);
  for (int i = 0; i < nb * kb; i++) m.s[i] = (float)ldexp(1.0, (int)(rnd() % 12) - 10);
  for (int r = 0; r < n; r++)
    for (int c = 0; c < k; c++) {
      m.q[r * k + c] = (uint8_t)rnd();
      m.w[r * k + c] = fp8_value(m.q[r * k + c]) * m.s[(r / 128) * kb + c / 128];
    }
  return m;
}
static void fp8_free(fp8_mat *m) { free(m->q), free(m->s), free(m->w); }

/* |y - ref| <= bound for every element; ref/bound per reference.py */
static int check_linear(const double *w, const uint8_t *codes, int n, int k, const float *x, int m, const float *y, int isa) {
  const double u = ldexp(1.0, -24);
  for (int i = 0; i < m; i++)
    for (int r = 0; r < n; r++) {
      double ref = 0, s = 0, flushed = 0;
      for (int c = 0; c < k; c++) {
        const double p = w[r * k + c] * x[i * k + c];
        ref += p, s += fabs(p);
        if (codes && fp8_subnormal(codes[r * k + c])) flushed += fabs(p);
      }
      double bound = (k + 2) * u * s + 1e-30;
      if (isa == JM_ISA_AVX512) bound += ldexp(1.0, -8) * s + flushed;
      if (fabs(y[i * n + r] - ref) > bound) {
        fprintf(stderr, "  isa %d m=%d n=%d k=%d: y[%d][%d] = %.9g, ref %.9g, bound %.3g\n", isa, m, n, k, i, r, y[i * n + r], ref, bound);
        return 0;
      }
    }
  return 1;
}

static void test_fp8_linear(int isa) {
  static const int shapes[][3] = {{1, 1, 1}, {3, 5, 70}, {17, 130, 257}, {1, 300, 200}, {40, 33, 129}, {2, 4, 640}, {13, 200, 300}};
  for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
    const int m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
    fp8_mat w = fp8_random(n, k);
    jm_matrix *mat = jm_matrix_create_fp8(w.q, k, w.s, (k + 127) / 128, n, k, -1);
    CHECK(mat != NULL, "create fp8 %dx%d", n, k);
    float *x = malloc(sizeof(float) * m * k), *y = malloc(sizeof(float) * m * n);
    for (int i = 0; i < m * k; i++) x[i] = (float)nrand();
    CHECK(jm_linear(mat, x, JM_DT_F32, m, y, JM_DT_F32) == JM_OK, "jm_linear");
    CHECK(check_linear(w.w, w.q, n, k, x, m, y, isa), "fp8 linear isa %d shape %d %d %d", isa, m, n, k);
    uint16_t *yb = malloc(sizeof(uint16_t) * m * n);
    CHECK(jm_linear(mat, x, JM_DT_F32, m, yb, JM_DT_BF16) == JM_OK, "jm_linear bf16 out");
    free(yb);
    jm_matrix_free(mat);
    free(x), free(y);
    fp8_free(&w);
  }
}

static void test_bf16_linear(int isa) {
  const int m = 5, n = 37, k = 300;
  uint16_t *wb = malloc(sizeof(uint16_t) * n * k);
  double *w = malloc(sizeof(double) * n * k);
  for (int i = 0; i < n * k; i++) {
    const float f = (float)nrand();
    uint32_t bits;
    memcpy(&bits, &f, 4);
    wb[i] = (uint16_t)(bits >> 16);
    bits = (uint32_t)wb[i] << 16;
    float g;
    memcpy(&g, &bits, 4);
    w[i] = g;
  }
  jm_matrix *mat = jm_matrix_create_bf16(wb, k, n, k, -1);
  float *x = malloc(sizeof(float) * m * k), *y = malloc(sizeof(float) * m * n);
  for (int i = 0; i < m * k; i++) x[i] = (float)nrand();
  CHECK(mat && jm_linear(mat, x, JM_DT_F32, m, y, JM_DT_F32) == JM_OK, "bf16 linear");
  CHECK(check_linear(w, NULL, n, k, x, m, y, isa), "bf16 linear isa %d", isa);
  jm_matrix_free(mat);
  free(wb), free(w), free(x), free(y);
}

static void test_grouped(int isa) {
  enum { G = 3, M = 5, N = 33, K = 129 };
  fp8_mat w[G];
  jm_matrix *ms[G];
  for (int j = 0; j < G; j++) w[j] = fp8_random(N, K), ms[j] = jm_matrix_create_fp8(w[j].q, K, w[j].s, 2, N, K, -1);
  jm_group *grp = jm_group_create(ms, G);
  CHECK(grp != NULL, "group create");
  float *x = malloc(sizeof(float) * M * G * K), *y = malloc(sizeof(float) * M * G * N);
  float *xj = malloc(sizeof(float) * M * K), *yj = malloc(sizeof(float) * M * N);
  for (int i = 0; i < M * G * K; i++) x[i] = (float)nrand();
  CHECK(jm_linear_grouped(grp, x, JM_DT_F32, M, y, JM_DT_F32) == JM_OK, "grouped linear");
  for (int j = 0; j < G; j++) {
    for (int i = 0; i < M; i++) {
      memcpy(xj + i * K, x + (i * G + j) * K, sizeof(float) * K);
      memcpy(yj + i * N, y + (i * G + j) * N, sizeof(float) * N);
    }
    CHECK(check_linear(w[j].w, w[j].q, N, K, xj, M, yj, isa), "grouped isa %d group %d", isa, j);
  }
  jm_group_free(grp);
  CHECK(jm_linear_grouped(grp, x, JM_DT_F32, M, y, JM_DT_F32) == JM_EHANDLE, "freed group");
  jm_matrix *bad[2] = {jm_matrix_create_fp8(w[0].q, K, w[0].s, 2, N, K, -1), jm_matrix_create_fp8(w[1].q, K, w[1].s, 2, N - 1, K, -1)};
  CHECK(jm_group_create(bad, 2) == NULL, "mismatched group rejected (and its matrices freed)");
  for (int j = 0; j < G; j++) fp8_free(&w[j]);
  free(x), free(y), free(xj), free(yj);
}

static double silu(double v) { return v / (1 + exp(-v)); }

static void test_moe(int isa) {
  const int E = 5, H = 150, I = 70, T = 21, K = 2;
  fp8_mat g[5], u[5], d[5];
  jm_store *s = jm_store_create(2);
  CHECK(s && jm_store_init_layer(s, 1, E, H, I) == JM_OK, "store init");
  for (int e = 0; e < E; e++) {
    g[e] = fp8_random(I, H), u[e] = fp8_random(I, H), d[e] = fp8_random(H, I);
    for (int i = 0; i < I * H; i++) g[e].w[i] *= 1e-2, u[e].w[i] *= 1e-2, d[e].w[i] *= 1e-2;
    for (int i = 0; i < (I + 127) / 128 * ((H + 127) / 128); i++) g[e].s[i] *= 1e-2f, u[e].s[i] *= 1e-2f;
    for (int i = 0; i < (H + 127) / 128 * ((I + 127) / 128); i++) d[e].s[i] *= 1e-2f;
    CHECK(jm_store_set_expert(s, 1, e, jm_matrix_create_fp8(g[e].q, H, g[e].s, (H + 127) / 128, I, H, -1),
                              jm_matrix_create_fp8(u[e].q, H, u[e].s, (H + 127) / 128, I, H, -1),
                              jm_matrix_create_fp8(d[e].q, I, d[e].s, (I + 127) / 128, H, I, -1)) == JM_OK, "set expert");
  }
  float *x = malloc(sizeof(float) * T * H), *out = malloc(sizeof(float) * T * H), wt[21 * 2];
  int32_t ids[21 * 2];
  for (int i = 0; i < T * H; i++) x[i] = (float)nrand();
  for (int t = 0; t < T; t++) {
    ids[t * K] = (int32_t)(rnd() % E), ids[t * K + 1] = (ids[t * K] + 1 + (int32_t)(rnd() % (E - 1))) % E;
    wt[t * K] = (float)urand(), wt[t * K + 1] = (float)urand();
  }
  ids[3] = -1; /* padding */
  CHECK(jm_moe(s, 1, x, JM_DT_F32, T, ids, wt, K, out, JM_DT_F32) == JM_OK, "jm_moe");
  double max_err = 0, max_ref = 0;
  for (int t = 0; t < T; t++) {
    double ref[150] = {0};
    for (int j = 0; j < K; j++) {
      const int e = ids[t * K + j];
      if (e < 0) continue;
      double h[70];
      for (int r = 0; r < I; r++) {
        double gv = 0, uv = 0;
        for (int c = 0; c < H; c++) gv += g[e].w[r * H + c] * x[t * H + c], uv += u[e].w[r * H + c] * x[t * H + c];
        h[r] = silu(gv) * uv;
      }
      for (int r = 0; r < H; r++) {
        double y = 0;
        for (int c = 0; c < I; c++) y += d[e].w[r * I + c] * h[c];
        ref[r] += wt[t * K + j] * y;
      }
    }
    for (int r = 0; r < H; r++) {
      max_err = fmax(max_err, fabs(out[t * H + r] - ref[r]));
      max_ref = fmax(max_ref, fabs(ref[r]));
    }
  }
  /* f32 paths: ~1e-6 relative; bf16 activations: ~1e-2 (the Python tests use exact bounds) */
  CHECK(max_err <= (isa == JM_ISA_AVX512 ? 3e-2 : 1e-4) * max_ref, "moe isa %d: max err %.3g of %.3g", isa, max_err, max_ref);
  ids[0] = E;
  CHECK(jm_moe(s, 1, x, JM_DT_F32, T, ids, wt, K, out, JM_DT_F32) == JM_EINVAL, "bad expert id rejected");
  CHECK(jm_moe(s, 0, x, JM_DT_F32, T, ids, wt, K, out, JM_DT_F32) == JM_EINVAL, "empty layer rejected");
  jm_store_free(s);
  CHECK(jm_moe(s, 1, x, JM_DT_F32, T, ids, wt, K, out, JM_DT_F32) == JM_EHANDLE, "freed store rejected");
  CHECK(jm_store_from_handle((int64_t)(intptr_t)s) == NULL, "freed store handle");
  for (int e = 0; e < E; e++) fp8_free(&g[e]), fp8_free(&u[e]), fp8_free(&d[e]);
  free(x), free(out);
}

static void test_errors(void) {
  uint8_t q[4] = {0};
  float sc = 1;
  CHECK(jm_matrix_create_fp8(NULL, 2, &sc, 1, 2, 2, -1) == NULL, "NULL weight");
  CHECK(jm_matrix_create_fp8(q, 1, &sc, 1, 2, 2, -1) == NULL, "short stride");
  CHECK(jm_matrix_create_bf16((const uint16_t *)q, 2, 0, 2, -1) == NULL, "zero rows");
  jm_matrix *m = jm_matrix_create_fp8(q, 2, &sc, 1, 2, 2, -1);
  float x[2] = {1, 2}, y[2];
  CHECK(jm_linear(m, x, 7, 1, y, JM_DT_F32) == JM_EINVAL, "bad dtype");
  CHECK(jm_linear(m, NULL, JM_DT_F32, 1, y, JM_DT_F32) == JM_EINVAL, "NULL x");
  CHECK(jm_matrix_from_handle((int64_t)(intptr_t)m) == m, "live handle");
  jm_matrix_free(m);
  CHECK(jm_linear(m, x, JM_DT_F32, 1, y, JM_DT_F32) == JM_EHANDLE, "freed matrix");
  jm_matrix_free(m); /* double free: ignored */
  CHECK(jm_matrix_from_handle(0x1234) == NULL, "forged handle");
  CHECK(jm_store_create(0) == NULL, "zero layers");
  CHECK(jm_set_isa(99) == JM_EINVAL, "unknown isa");
}

int main(void) {
  for (int isa = JM_ISA_SCALAR; isa <= JM_ISA_AVX512; isa++) {
    if (!jm_isa_supported(isa)) {
      printf("skip %s (not supported here)\n", jm_isa_name(isa));
      continue;
    }
    jm_set_isa(isa);
    for (int threads = 1; threads <= 3; threads += 2)
      for (int gemm = -1; gemm <= 1; gemm += 2) { /* GEMV chunks only / GEMM path from 1 row */
        jm_set_num_threads(threads);
        jm_set_gemm_min_rows(gemm);
        test_fp8_linear(isa);
        test_bf16_linear(isa);
        test_grouped(isa);
        test_moe(isa);
      }
    jm_set_gemm_min_rows(0);
    printf("checked %s\n", jm_isa_name(isa));
  }
  test_errors();
  jm_set_num_threads(0);
  printf("%d passed, %d failed\n", passed, failed);
  return failed != 0;
}
