/* linear_ref.c -- scalar reference kernels (always compiled; the twin of every SIMD path).
 *
 * Same packed layout, same decode and the same canonical sum as the SIMD kernels with one
 * lane (internal.h): an FP8 byte decodes through its IEEE half bits to value * 2^-8 (exact,
 * never denormal), f32 activations, per 128-column block an ascending f32 sum, then
 * acc = fma(block sum, scale * 2^8, acc). BF16 weights are exact in f32.
 * The GEMM path's decoded tiles hold [4 rows][k_pad] f32.
 */
#include <math.h>
#include <string.h>

#include "int4.h" /* jm_f16_to_f32 */

float jm_exp2i(int e) {
  union { uint32_t u; float f; } v = {(uint32_t)(e + 127) << 23};
  return v.f;
}

static void fold_ref(const jm_matrix *w, int rb, const float *x, int64_t ldx, int m, void *xf_) {
  float *xf = (float *)xf_;
  for (int i = 0; i < m; i++) {
    memcpy(xf + (int64_t)i * w->k_pad, x + i * ldx, sizeof(float) * (size_t)w->k);
    memset(xf + (int64_t)i * w->k_pad + w->k, 0, sizeof(float) * (size_t)(w->k_pad - w->k));
  }
}

/* weight (row r of tile p, column col) as f32 */
static float weight(const jm_matrix *w, const uint8_t *p, int r, int col) {
  if (w->format == JM_FMT_FP8)
    return jm_f16_to_f32(jm_fp8_to_f16_bits(p[(int64_t)(col / JM_SEG) * JM_SEG * JM_TILE_ROWS + r * JM_SEG + col % JM_SEG]));
  const int per = JM_SEG / 2;
  const uint8_t *q = p + (int64_t)(col / per) * JM_SEG * JM_TILE_ROWS + r * JM_SEG + 2 * (col % per);
  return jm_bf16_to_f32((uint16_t)(q[0] | q[1] << 8));
}

/* the canonical sum of one output: row r of tile p (or its decoded row wd) against xi */
static float dot_row(const jm_matrix *w, int t, const float *xi, const float *wd, const uint8_t *p, int r) {
  float acc = 0.0f;
  for (int kb = 0; kb < w->kb; kb++) {
    float blk = 0.0f;
    for (int col = kb * JM_KBLOCK; col < (kb + 1) * JM_KBLOCK; col++)
      blk += (wd ? wd[col] : weight(w, p, r, col)) * xi[col];
    acc = fmaf(blk, jm_block_scale(w, t, kb, 0), acc);
  }
  return acc;
}

static void run_tiles(const jm_matrix *w, int t0, int t1, const float *wd, const float *const *xr, int m, float *y,
                      int64_t ldy) {
  for (int t = t0; t < t1; t++) {
    const uint8_t *p = jm_tile_ptr(w, t);
    for (int r = 0; r < JM_TILE_ROWS; r++) {
      const int row = t * JM_TILE_ROWS + r;
      if (row >= w->n) break;
      const float *wr = wd ? wd + ((int64_t)(t - t0) * JM_TILE_ROWS + r) * w->k_pad : NULL;
      for (int i = 0; i < m; i++)
        y[i * ldy + row - t0 * JM_TILE_ROWS] = dot_row(w, t, xr[i], wr, p, r);
    }
  }
}

static void tiles_ref(const jm_matrix *w, int t0, int t1, const void *xf, int m, float *y, int64_t ldy) {
  const float *xr[JM_MC];
  for (int i = 0; i < m; i++) xr[i] = (const float *)xf + (int64_t)i * w->k_pad;
  run_tiles(w, t0, t1, NULL, xr, m, y, ldy);
}

static void tiles_dec_ref(const jm_matrix *w, int t0, int t1, const void *wd, const void *const *xr, int m, float *y,
                          int64_t ldy) {
  run_tiles(w, t0, t1, (const float *)wd, (const float *const *)xr, m, y, ldy);
}

static void decode_ref(const jm_matrix *w, int t0, int t1, void *wd) {
  float *o = (float *)wd;
  for (int t = t0; t < t1; t++)
    for (int r = 0; r < JM_TILE_ROWS; r++)
      for (int col = 0; col < w->k_pad; col++) *o++ = weight(w, jm_tile_ptr(w, t), r, col);
}

const jm_kernels jm_kernels_scalar = {JM_ISA_SCALAR, 0, sizeof(float), sizeof(float), fold_ref, tiles_ref, decode_ref,
                                      tiles_dec_ref};
