/* test_native.c -- C-level harness for cpu_ext, meant to run under AddressSanitizer and
 * UndefinedBehaviorSanitizer (make sanitize). Every ISA path this build can run is checked
 * against a double-precision reference with the bounds of jaxmoe/cpu/reference.py, on odd
 * shapes (K, N not multiples of 128, M across token chunks), with the GEMM path off and forced
 * on (jm_set_gemm_min_rows), the fused MoE against a scalar
 * double reference, batch invariance (a row's bits alone, inside a batch, on the GEMV and the
 * GEMM path), in every precision the path has, and every error path (NULL, freed handles, bad
 * ids, bad shapes).
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
      if (jm_bf16_dot()) bound += ldexp(1.0, -8) * s + flushed;
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
  jm_store *s = jm_store_create(3);
  CHECK(s && jm_store_init_layer(s, 1, E, H, I) == JM_OK && jm_store_init_layer(s, 2, E, H, I) == JM_OK, "store init");
  for (int e = 0; e < E; e++) {
    g[e] = fp8_random(I, H), u[e] = fp8_random(I, H), d[e] = fp8_random(H, I);
    for (int i = 0; i < I * H; i++) g[e].w[i] *= 1e-2, u[e].w[i] *= 1e-2, d[e].w[i] *= 1e-2;
    for (int i = 0; i < (I + 127) / 128 * ((H + 127) / 128); i++) g[e].s[i] *= 1e-2f, u[e].s[i] *= 1e-2f;
    for (int i = 0; i < (H + 127) / 128 * ((I + 127) / 128); i++) d[e].s[i] *= 1e-2f;
    CHECK(jm_store_set_expert(s, 1, e, jm_matrix_create_fp8(g[e].q, H, g[e].s, (H + 127) / 128, I, H, -1),
                              jm_matrix_create_fp8(u[e].q, H, u[e].s, (H + 127) / 128, I, H, -1),
                              jm_matrix_create_fp8(d[e].q, I, d[e].s, (I + 127) / 128, H, I, -1)) == JM_OK, "set expert");
    /* layer 2: the same experts packed into the layer's slabs */
    CHECK(jm_store_pack(s, 2, e, 0, JM_FMT_FP8, g[e].q, H, g[e].s, (H + 127) / 128, -1) == JM_OK &&
          jm_store_pack(s, 2, e, 1, JM_FMT_FP8, u[e].q, H, u[e].s, (H + 127) / 128, -1) == JM_OK &&
          jm_store_pack(s, 2, e, 2, JM_FMT_FP8, d[e].q, I, d[e].s, (I + 127) / 128, -1) == JM_OK, "pack expert");
  }
  const uint8_t *slab = NULL;
  const float *slab_scale = NULL;
  int64_t slot = 0, packed = 0, floats = 0;
  int32_t fmt = 0;
  CHECK(jm_store_slab(s, 2, 2, &slab, &slot, &packed, &slab_scale, &floats, &fmt) == JM_OK && slab && slot % 4096 == 0 &&
        packed == 152 * 128 && floats == 2 && fmt == JM_FMT_FP8, "down slab of layer 2");
  CHECK(slab_scale && slab_scale[floats * (E - 1)] == d[E - 1].s[0], "slab scales in expert order");
  CHECK(jm_store_slab(s, 1, 0, &slab, NULL, NULL, NULL, NULL, NULL) == JM_EINVAL, "no slab for set_expert matrices");
  CHECK(jm_store_pack(s, 2, 0, 3, JM_FMT_FP8, g[0].q, H, g[0].s, 2, -1) == JM_EINVAL, "bad projection rejected");
  CHECK(jm_store_pack(s, 2, 0, 0, JM_FMT_INT4, g[0].q, H, g[0].s, 2, -1) == JM_EINVAL, "INT4 not packed in slabs");
  CHECK(jm_store_pack(s, 2, 0, 0, JM_FMT_FP8, g[0].q, H - 1, g[0].s, 2, -1) == JM_EINVAL, "short stride rejected");
  float *x = malloc(sizeof(float) * T * H), *out = malloc(sizeof(float) * T * H), wt[21 * 2];
  int32_t ids[21 * 2];
  for (int i = 0; i < T * H; i++) x[i] = (float)nrand();
  for (int t = 0; t < T; t++) {
    ids[t * K] = (int32_t)(rnd() % E), ids[t * K + 1] = (ids[t * K] + 1 + (int32_t)(rnd() % (E - 1))) % E;
    wt[t * K] = (float)urand(), wt[t * K + 1] = (float)urand();
  }
  ids[3] = -1; /* padding */
  CHECK(jm_moe(s, 2, x, JM_DT_F32, T, ids, wt, K, out, JM_DT_F32) == JM_OK, "jm_moe (slabs)");
  float *out_slab = malloc(sizeof(float) * T * H);
  memcpy(out_slab, out, sizeof(float) * T * H);
  CHECK(jm_moe(s, 1, x, JM_DT_F32, T, ids, wt, K, out, JM_DT_F32) == JM_OK, "jm_moe");
  CHECK(!memcmp(out, out_slab, sizeof(float) * T * H), "slab-packed experts == separately packed ones");
  free(out_slab);
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
  CHECK(max_err <= (jm_bf16_dot() ? 3e-2 : 1e-4) * max_ref, "moe isa %d: max err %.3g of %.3g", isa, max_err, max_ref);
  ids[0] = E;
  CHECK(jm_moe(s, 1, x, JM_DT_F32, T, ids, wt, K, out, JM_DT_F32) == JM_EINVAL, "bad expert id rejected");
  CHECK(jm_moe(s, 0, x, JM_DT_F32, T, ids, wt, K, out, JM_DT_F32) == JM_EINVAL, "empty layer rejected");
  jm_store_free(s);
  CHECK(jm_moe(s, 1, x, JM_DT_F32, T, ids, wt, K, out, JM_DT_F32) == JM_EHANDLE, "freed store rejected");
  CHECK(jm_store_from_handle((int64_t)(intptr_t)s) == NULL, "freed store handle");
  for (int e = 0; e < E; e++) fp8_free(&g[e]), fp8_free(&u[e]), fp8_free(&d[e]);
  free(x), free(out);
}

/* store_map.c: packed bytes written to a file and adopted (mapped) give the same results */
static int64_t put_aligned(FILE *f, const void *p, int64_t n) {
  long pos = ftell(f);
  while (pos % 4096) fputc(0, f), pos++;
  fwrite(p, 1, (size_t)n, f);
  return pos;
}

static void test_store_map(void) {
  const int E = 3, H = 150, I = 70, T = 5, K = 2;
  fp8_mat w[3][3];
  jm_store *s = jm_store_create(1), *t = jm_store_create(1);
  CHECK(s && t && jm_store_init_layer(s, 0, E, H, I) == JM_OK && jm_store_init_layer(t, 0, E, H, I) == JM_OK, "map: stores");
  for (int e = 0; e < E; e++)
    for (int j = 0; j < 3; j++) {
      const int n = j < 2 ? I : H, k = j < 2 ? H : I;
      w[e][j] = fp8_random(n, k);
      CHECK(jm_store_pack(s, 0, e, j, JM_FMT_FP8, w[e][j].q, k, w[e][j].s, (k + 127) / 128, -1) == JM_OK, "map: pack");
    }
  FILE *f = tmpfile();
  int64_t off[3], soff[3], slot[3], floats[3];
  for (int j = 0; j < 3; j++) {
    const uint8_t *data;
    const float *sc;
    int64_t packed;
    int32_t fmt;
    CHECK(jm_store_slab(s, 0, j, &data, &slot[j], &packed, &sc, &floats[j], &fmt) == JM_OK, "map: slab");
    off[j] = put_aligned(f, data, slot[j] * E);
    soff[j] = put_aligned(f, sc, (int64_t)sizeof(float) * floats[j] * E);
  }
  /* an INT4 matrix and an FP8 one, adopted one by one */
  const int n4 = 9, k4 = 150, G = 32, ng = (k4 + G - 1) / G; /* k4 = H: x serves both */
  uint8_t q4[9 * 75];
  uint16_t s4[9 * 5];
  for (int i = 0; i < n4 * 75; i++) q4[i] = (uint8_t)rnd();
  for (int i = 0; i < n4 * ng; i++) s4[i] = (uint16_t)((5 + rnd() % 10) << 10);
  jm_matrix *m4 = jm_matrix_create_int4(q4, 75, s4, ng, n4, k4, G, -1);
  jm_matrix *m8 = jm_matrix_create_fp8(w[0][2].q, I, w[0][2].s, 1, H, I, -1);
  const uint8_t *d4, *d8;
  const float *sc8;
  int64_t b4, b8, f8;
  int32_t g4;
  CHECK(m4 && m8 && jm_matrix_packed(m4, &d4, &b4, NULL, NULL, &g4) == JM_OK && g4 == G &&
        jm_matrix_packed(m8, &d8, &b8, &sc8, &f8, NULL) == JM_OK && f8 == 2, "map: packed bytes");
  const int64_t o4 = put_aligned(f, d4, b4), o8 = put_aligned(f, d8, b8);
  fflush(f);
  const int fd = fileno(f);
  for (int j = 0; j < 3; j++) {
    fseek(f, soff[j], SEEK_SET);
    float *sc = malloc(sizeof(float) * (size_t)(floats[j] * E));
    CHECK(fread(sc, sizeof(float), (size_t)(floats[j] * E), f) == (size_t)(floats[j] * E), "map: read scales");
    CHECK(jm_store_adopt_slab(t, 0, j, JM_FMT_FP8, fd, off[j], slot[j], sc, -1) == JM_OK, "map: adopt slab %d", j);
    CHECK(jm_store_adopt_slab(t, 0, j, JM_FMT_FP8, fd, off[j], slot[j], sc, -1) == JM_EINVAL, "map: slab taken");
    free(sc);
  }
  CHECK(jm_store_slab(t, 0, 1, NULL, NULL, NULL, NULL, NULL, NULL) == JM_OK, "map: adopted slab is a slab");
  float x[5 * 150], y1[5 * 150], y2[5 * 150], wt[10];
  int32_t ids[10];
  for (int i = 0; i < T * H; i++) x[i] = (float)nrand();
  for (int i = 0; i < T * K; i++) ids[i] = (int32_t)(rnd() % E), wt[i] = (float)urand();
  CHECK(jm_moe(s, 0, x, JM_DT_F32, T, ids, wt, K, y1, JM_DT_F32) == JM_OK &&
        jm_moe(t, 0, x, JM_DT_F32, T, ids, wt, K, y2, JM_DT_F32) == JM_OK && !memcmp(y1, y2, sizeof y1),
        "map: adopted slabs == packed ones");
  jm_matrix *a4 = jm_matrix_adopt(JM_FMT_INT4, n4, k4, G, fd, o4, NULL, -1);
  jm_matrix *a8 = jm_matrix_adopt(JM_FMT_FP8, H, I, 0, fd, o8, sc8, -1);
  CHECK(a4 && a8, "map: adopt matrices");
  float z1[5 * 150], z2[5 * 150];
  CHECK(jm_linear(m4, x, JM_DT_F32, T, z1, JM_DT_F32) == JM_OK && jm_linear(a4, x, JM_DT_F32, T, z2, JM_DT_F32) == JM_OK &&
        !memcmp(z1, z2, sizeof(float) * T * n4), "map: adopted INT4 == packed");
  CHECK(jm_linear(m8, x, JM_DT_F32, T, z1, JM_DT_F32) == JM_OK && jm_linear(a8, x, JM_DT_F32, T, z2, JM_DT_F32) == JM_OK &&
        !memcmp(z1, z2, sizeof(float) * T * H), "map: adopted FP8 == packed");
  CHECK(jm_matrix_adopt(JM_FMT_BF16, H, I, 0, fd, o8 + (1 << 20), NULL, -1) == NULL, "map: range past the end refused");
  CHECK(jm_matrix_adopt(JM_FMT_BF16, H, I, 0, fd, 100, NULL, -1) == NULL, "map: unaligned offset refused");
  CHECK(jm_matrix_adopt(JM_FMT_INT4, H, I, 7, fd, 0, NULL, -1) == NULL, "map: bad group refused");
  fclose(f); /* the mappings outlive the file descriptor */
  CHECK(jm_moe(t, 0, x, JM_DT_F32, T, ids, wt, K, y2, JM_DT_F32) == JM_OK && !memcmp(y1, y2, sizeof y1), "map: after close");
  jm_matrix_free(a4), jm_matrix_free(a8), jm_matrix_free(m4), jm_matrix_free(m8);
  jm_store_free(s), jm_store_free(t);
  for (int e = 0; e < E; e++)
    for (int j = 0; j < 3; j++) fp8_free(&w[e][j]);
}

/* store_map.c: a range of 2 MiB and more is mapped at an address congruent to its file offset
 * modulo 2 MiB (so the page cache's 2 MiB folios can be mapped whole), trimmed to exactly its
 * length (jm_matrix_free unmaps it), and reads the same bytes */
static void test_store_map_huge(void) {
  const int N = 1024, Kd = 2304, T = 2; /* 2.4 MB packed */
  fp8_mat w = fp8_random(N, Kd);
  jm_matrix *m = jm_matrix_create_fp8(w.q, Kd, w.s, (Kd + 127) / 128, N, Kd, -1);
  const uint8_t *d, *da;
  const float *sc;
  int64_t b, f, ba;
  CHECK(m && jm_matrix_packed(m, &d, &b, &sc, &f, NULL) == JM_OK && b >= (2 << 20), "map huge: packed");
  FILE *fl = tmpfile();
  static const uint8_t zero[3 * 4096 + 1];
  fwrite(zero, 1, sizeof zero, fl); /* the range starts 4 KiB-aligned, not 2 MiB-aligned */
  const int64_t off = put_aligned(fl, d, b);
  fflush(fl);
  jm_matrix *a = jm_matrix_adopt(JM_FMT_FP8, N, Kd, 0, fileno(fl), off, sc, -1);
  CHECK(a && jm_matrix_packed(a, &da, &ba, NULL, NULL, NULL) == JM_OK && ba == b, "map huge: adopt");
  CHECK(((uintptr_t)da - (uintptr_t)off) % (2u << 20) == 0, "map huge: address %p not congruent to offset %lld",
        (const void *)da, (long long)off);
  CHECK(!memcmp(da, d, (size_t)b), "map huge: same bytes");
  float *x = malloc(sizeof(float) * T * Kd), *y1 = malloc(sizeof(float) * T * N), *y2 = malloc(sizeof(float) * T * N);
  for (int i = 0; i < T * Kd; i++) x[i] = (float)nrand();
  CHECK(jm_linear(m, x, JM_DT_F32, T, y1, JM_DT_F32) == JM_OK && jm_linear(a, x, JM_DT_F32, T, y2, JM_DT_F32) == JM_OK &&
        !memcmp(y1, y2, sizeof(float) * T * N), "map huge: adopted == packed");
  fclose(fl);
  jm_matrix_free(a), jm_matrix_free(m);
  free(x), free(y1), free(y2);
  fp8_free(&w);
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

/* ---- INT4 (issue 7): kernels vs a double reference that reproduces the int8 activations ---- */
static int int4_nib(const uint8_t *row, int c) { return (row[c >> 1] >> ((c & 1) * 4)) & 15; }

static void test_int4(int isa) {
  static const int shapes[][4] = {{5, 33, 32, 1}, {37, 300, 64, 3}, {9, 520, 256, 17}, {64, 256, 32, 2}};
  for (int si = 0; si < 4; si++) {
    const int n = shapes[si][0], k = shapes[si][1], G = shapes[si][2], m = shapes[si][3];
    const int ng = (k + G - 1) / G, ldq = ng * G / 2;
    uint8_t *q = malloc((size_t)n * ldq);
    uint16_t *sc = malloc(sizeof(uint16_t) * n * ng);
    float *x = malloc(sizeof(float) * m * k), *y = malloc(sizeof(float) * m * n);
    for (int i = 0; i < n * ldq; i++) q[i] = (uint8_t)rnd();
    for (int i = 0; i < n * ng; i++) sc[i] = (uint16_t)((5 + rnd() % 10) << 10); /* f16 2^-10 .. 2^-1 */
    for (int i = 0; i < m * k; i++) x[i] = (float)nrand();
    jm_matrix *mat = jm_matrix_create_int4(q, ldq, sc, ng, n, k, G, -1);
    CHECK(mat != NULL, "create int4 %dx%d group %d", n, k, G);
    CHECK(mat && jm_linear(mat, x, JM_DT_F32, m, y, JM_DT_F32) == JM_OK, "int4 jm_linear");
    int bad = 0;
    for (int i = 0; i < m && mat; i++)
      for (int r = 0; r < n; r++) {
        double ref = 0, abs_sum = 0;
        for (int g = 0; g < ng; g++) { /* the kernels' activation quantization, then exact dots */
          float amax = 0;
          for (int c = g * G; c < k && c < (g + 1) * G; c++) amax = fabsf(x[i * k + c]) > amax ? fabsf(x[i * k + c]) : amax;
          const float inv = amax > 0 ? 127.0f / amax : 0.0f;
          long dot = 0;
          for (int c = g * G; c < k && c < (g + 1) * G; c++)
            dot += (long)(int4_nib(q + (size_t)r * ldq, c) - 8) * (long)rintf(x[i * k + c] * inv);
          const double t = ldexp(1.0, (sc[r * ng + g] >> 10) - 15) * (double)(amax / 127.0f) * (double)dot;
          ref += t, abs_sum += fabs(t);
        }
        if (fabs(y[i * n + r] - ref) > (ng + 3) * ldexp(1.0, -24) * abs_sum + 1e-30 && bad++ < 3)
          fprintf(stderr, "  int4 isa %d [%d,%d] g%d: y[%d][%d] = %.9g, ref %.9g\n", isa, n, k, G, i, r, y[i * n + r], ref);
      }
    CHECK(!bad, "int4 linear isa %d shape %d %d %d group %d", isa, m, n, k, G);
    jm_matrix_free(mat);
    free(q), free(sc), free(x), free(y);
  }
  /* fused MoE with INT4 experts == its own linears composed (same kernels, f32 combine) */
  enum { E = 3, H = 96, I = 64, T = 4, K = 2 };
  jm_store *s = jm_store_create(1);
  CHECK(s && jm_store_init_layer(s, 0, E, H, I) == JM_OK, "int4 store init");
  static uint8_t qg[E][I * H / 2], qu[E][I * H / 2], qd[E][H * I / 2];
  static uint16_t sg[E][I * H / 32], su[E][I * H / 32], sd[E][H * I / 32];
  for (int e = 0; e < E; e++) {
    for (int i = 0; i < I * H / 2; i++) qg[e][i] = (uint8_t)rnd(), qu[e][i] = (uint8_t)rnd(), qd[e][i] = (uint8_t)rnd();
    for (int i = 0; i < I * H / 32; i++) sg[e][i] = su[e][i] = sd[e][i] = (uint16_t)(9 << 10);
    CHECK(jm_store_set_expert(s, 0, e, jm_matrix_create_int4(qg[e], H / 2, sg[e], H / 32, I, H, 32, -1),
                              jm_matrix_create_int4(qu[e], H / 2, su[e], H / 32, I, H, 32, -1),
                              jm_matrix_create_int4(qd[e], I / 2, sd[e], I / 32, H, I, 32, -1)) == JM_OK, "int4 set expert");
  }
  float x[T * H], out[T * H], wt[T * K];
  int32_t ids[T * K];
  for (int i = 0; i < T * H; i++) x[i] = (float)nrand();
  for (int i = 0; i < T * K; i++) ids[i] = (int32_t)(rnd() % E), wt[i] = (float)urand();
  ids[1] = (ids[0] + 1) % E, ids[3] = -1; /* distinct per token; one padding slot */
  for (int t = 1; t < T; t++) if (ids[t * K + 1] == ids[t * K]) ids[t * K + 1] = (ids[t * K] + 1) % E;
  CHECK(jm_moe(s, 0, x, JM_DT_F32, T, ids, wt, K, out, JM_DT_F32) == JM_OK, "int4 jm_moe");
  double max_err = 0, max_ref = 0;
  for (int t = 0; t < T; t++) {
    double ref[H] = {0};
    for (int j = 0; j < K; j++) {
      const int e = ids[t * K + j];
      if (e < 0) continue;
      float g[I], u[I], h[I], d[H];
      jm_linear(jm_store_matrix(s, 0, e, 0), x + t * H, JM_DT_F32, 1, g, JM_DT_F32);
      jm_linear(jm_store_matrix(s, 0, e, 1), x + t * H, JM_DT_F32, 1, u, JM_DT_F32);
      for (int r = 0; r < I; r++) h[r] = g[r] / (1.0f + expf(-g[r])) * u[r];
      jm_linear(jm_store_matrix(s, 0, e, 2), h, JM_DT_F32, 1, d, JM_DT_F32);
      for (int c = 0; c < H; c++) ref[c] += (double)wt[t * K + j] * d[c];
    }
    for (int c = 0; c < H; c++) {
      max_err = fmax(max_err, fabs(out[t * H + c] - ref[c]));
      max_ref = fmax(max_ref, fabs(ref[c]));
    }
  }
  CHECK(max_err <= 1e-5 * max_ref, "int4 moe isa %d: max err %.3g of %.3g", isa, max_err, max_ref);
  uint8_t fq[H * I];
  float fs[1] = {1.0f};
  memset(fq, 0x38, sizeof fq);
  CHECK(jm_store_set_expert(s, 0, 1, jm_matrix_create_int4(qg[1], H / 2, sg[1], H / 32, I, H, 32, -1),
                            jm_matrix_create_int4(qu[1], H / 2, su[1], H / 32, I, H, 32, -1),
                            jm_matrix_create_fp8(fq, I, fs, 1, H, I, -1)) == JM_OK, "mixed expert stored");
  const int32_t one = 1;
  const float w1 = 1.0f;
  CHECK(jm_moe(s, 0, x, JM_DT_F32, 1, &one, &w1, 1, out, JM_DT_F32) == JM_EINVAL, "mixed formats rejected");
  jm_store_free(s);
  uint8_t q0[64] = {0};
  uint16_t s0[4] = {0};
  CHECK(jm_matrix_create_int4(q0, 32, s0, 2, 2, 64, 48, -1) == NULL, "int4 group 48 rejected");
  CHECK(jm_matrix_create_int4(q0, 16, s0, 2, 2, 64, 32, -1) == NULL, "int4 short stride rejected");
  CHECK(jm_matrix_create_int4(NULL, 32, s0, 2, 2, 64, 32, -1) == NULL, "int4 NULL rejected");
}
/* ---- end INT4 ---- */

/* a row's output bits do not depend on the other rows of the call nor on the path */
static void test_invariance(int isa) {
  const int n = 300, k = 400, m = 29;
  fp8_mat w = fp8_random(n, k);
  jm_matrix *mat = jm_matrix_create_fp8(w.q, k, w.s, (k + 127) / 128, n, k, -1);
  float *x = malloc(sizeof(float) * m * k), *solo = malloc(sizeof(float) * m * n), *y = malloc(sizeof(float) * m * n);
  for (int i = 0; i < m * k; i++) x[i] = (float)nrand();
  jm_set_gemm_min_rows(-1);
  for (int i = 0; i < m; i++) jm_linear(mat, x + i * k, JM_DT_F32, 1, solo + i * n, JM_DT_F32);
  for (int gemm = -1; gemm <= 1; gemm += 2) {
    jm_set_gemm_min_rows(gemm);
    for (int mm = 2; mm <= m; mm += 9) {
      CHECK(jm_linear(mat, x, JM_DT_F32, mm, y, JM_DT_F32) == JM_OK, "invariance linear");
      CHECK(!memcmp(y, solo, sizeof(float) * mm * n), "isa %d bf16 %d gemm %d: %d rows differ from the rows alone", isa,
            jm_bf16_dot(), gemm, mm);
    }
  }
  jm_set_gemm_min_rows(0);
  jm_matrix_free(mat);
  free(x), free(solo), free(y), free(w.q), free(w.s), free(w.w);
}

/* packing runs over the thread pool (tiles split into tasks): a matrix packed on 1 and on 3
 * threads gives bit-identical outputs, for odd shapes large enough to be split (FP8, BF16,
 * INT4, and a store slab) */
static void test_parallel_pack(void) {
  const int n = 1031, k = 2177, m = 2, group = 32, ng = (k + group - 1) / group;
  fp8_mat w = fp8_random(n, k);
  uint16_t *wb = malloc(sizeof(uint16_t) * n * k), *s4 = malloc(sizeof(uint16_t) * n * ng);
  uint8_t *q4 = malloc((size_t)n * ((k + 1) / 2));
  float *x = malloc(sizeof(float) * m * k), *y[2][4];
  for (int i = 0; i < n * k; i++) wb[i] = (uint16_t)(0x3c00 + (rnd() & 0x3ff) - 0x200 + ((rnd() & 1) << 15));
  for (int i = 0; i < n * ((k + 1) / 2); i++) q4[i] = (uint8_t)rnd();
  for (int i = 0; i < n * ng; i++) s4[i] = (uint16_t)(0x2000 + (rnd() & 0x3ff)); /* small positive f16 */
  for (int i = 0; i < m * k; i++) x[i] = (float)nrand();
  for (int t = 0; t < 2; t++) {
    jm_set_num_threads(t ? 3 : 1);
    jm_matrix *ms[3] = {jm_matrix_create_fp8(w.q, k, w.s, (k + 127) / 128, n, k, -1),
                        jm_matrix_create_bf16(wb, k, n, k, -1),
                        jm_matrix_create_int4(q4, (k + 1) / 2, s4, ng, n, k, group, -1)};
    jm_store *st = jm_store_create(1);
    CHECK(st && jm_store_init_layer(st, 0, 1, n, k) == JM_OK &&
          jm_store_pack(st, 0, 0, 2, JM_FMT_FP8, w.q, k, w.s, (k + 127) / 128, -1) == JM_OK, "store pack [%d, %d]", n, k);
    for (int j = 0; j < 4; j++) {
      const jm_matrix *mat = j < 3 ? ms[j] : (st ? jm_store_matrix(st, 0, 0, 2) : NULL);
      y[t][j] = calloc((size_t)m * n, sizeof(float));
      CHECK(mat && jm_linear(mat, x, JM_DT_F32, m, y[t][j], JM_DT_F32) == JM_OK, "parallel pack linear %d", j);
    }
    for (int j = 0; j < 3; j++) jm_matrix_free(ms[j]);
    jm_store_free(st);
  }
  for (int j = 0; j < 4; j++) {
    CHECK(!memcmp(y[0][j], y[1][j], sizeof(float) * m * n), "matrix %d packed on 1 and 3 threads differs", j);
    free(y[0][j]), free(y[1][j]);
  }
  free(wb), free(s4), free(q4), free(x);
  fp8_free(&w);
}

int main(void) {
  for (int isa = JM_ISA_SCALAR; isa <= JM_ISA_AVX512; isa++) {
    if (!jm_isa_supported(isa)) {
      printf("skip %s (not supported here)\n", jm_isa_name(isa));
      continue;
    }
    jm_set_isa(isa);
    for (int prec = JM_PREC_EXACT; prec <= JM_PREC_BF16; prec++) {
      jm_set_precision(prec);
      if (prec == JM_PREC_BF16 && !jm_bf16_dot()) break; /* this path has no bf16 dot */
      for (int threads = 1; threads <= 3; threads += 2)
        for (int gemm = -1; gemm <= 1; gemm += 2) { /* GEMV chunks only / GEMM path from 1 row */
          jm_set_num_threads(threads);
          jm_set_gemm_min_rows(gemm);
          test_fp8_linear(isa);
          test_bf16_linear(isa);
          test_grouped(isa);
          test_moe(isa);
        }
      test_invariance(isa);
      printf("checked %s\n", jm_kernel_path());
    }
    jm_set_precision(JM_PREC_AUTO);
    for (int gemm = 0; gemm <= 1; gemm++) { /* INT4 (issue 7): default threshold / GEMM path from 1 row */
      jm_set_gemm_min_rows(gemm);
      test_int4(isa);
    }
    jm_set_gemm_min_rows(0);
  }
  test_parallel_pack();
  test_errors();
  test_store_map();
  test_store_map_huge();
  jm_set_num_threads(0);
  printf("%d passed, %d failed\n", passed, failed);
  return failed != 0;
}
