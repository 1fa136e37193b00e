/* linear_ref.c -- scalar reference kernels (always compiled; the twin of every SIMD path).
 *
 * Same packed layout and same algebra as the SIMD kernels: an FP8 byte decodes by shift and
 * mask to f32 bits equal to value * 2^-120 (exact for all 254 non-NaN codes, +-480 for the
 * NaN codes), activations carry scale * 2^JM_FOLD_EXP, the sum is multiplied by
 * 2^JM_UNFOLD_EXP. Accumulation is in f32.
 */
#include <string.h>

#include "internal.h"

static inline float fp8_shift_decode(uint8_t b) {
  union { uint32_t u; float f; } v = {((uint32_t)(b & 0x7f) << 20) | ((uint32_t)(b & 0x80) << 24)};
  return v.f;
}

float jm_exp2i(int e) {
  union { uint32_t u; float f; } v = {(uint32_t)(e + 127) << 23};
  return v.f;
}

static void fold_ref(const jm_matrix *w, int rb, const float *x, int64_t ldx, int m, void *xf_) {
  float *xf = (float *)xf_;
  const float f = w->format == JM_FMT_FP8 ? jm_exp2i(JM_FOLD_EXP) : 1.0f;
  for (int i = 0; i < m; i++) {
    const float *xi = x + i * ldx;
    float *o = xf + (int64_t)i * w->k_pad;
    for (int b = 0; b < w->kb; b++) {
      const float s = w->format == JM_FMT_FP8 ? jm_scale_of(w, rb, b) * f : 1.0f;
      for (int j = b * JM_KBLOCK; j < (b + 1) * JM_KBLOCK; j++) o[j] = j < w->k ? xi[j] * s : 0.0f;
    }
  }
}

/* row r of tile p, columns [j0, j0 + per) = one 64-byte segment, decoded to f32 */
static void decode_segment(const jm_matrix *w, const uint8_t *seg, float *out, int per) {
  for (int j = 0; j < per; j++) {
    if (w->format == JM_FMT_FP8) {
      out[j] = fp8_shift_decode(seg[j]);
    } else {
      uint16_t h;
      memcpy(&h, seg + 2 * j, 2);
      out[j] = jm_bf16_to_f32(h);
    }
  }
}

static void tiles_ref(const jm_matrix *w, int t0, int t1, const void *xf_, int m, float *y,
                      int64_t ldy) {
  const float *xf = (const float *)xf_;
  const float unfold = w->format == JM_FMT_FP8 ? jm_exp2i(JM_UNFOLD_EXP) : 1.0f;
  const int per = w->format == JM_FMT_FP8 ? JM_SEG : JM_SEG / 2; /* columns per segment */
  float wd[JM_SEG];
  for (int t = t0; t < t1; t++) {
    const uint8_t *p = jm_tile_ptr(w, t);
    for (int r = 0; r < JM_TILE_ROWS; r++) {
      const int row = t * JM_TILE_ROWS + r;
      if (row >= w->n) break;
      for (int i = 0; i < m; i++) {
        const float *xi = xf + (int64_t)i * w->k_pad;
        float acc = 0.0f;
        for (int c = 0; c < w->k_pad / per; c++) {
          decode_segment(w, p + (int64_t)c * JM_SEG * JM_TILE_ROWS + r * JM_SEG, wd, per);
          for (int j = 0; j < per; j++) acc += wd[j] * xi[c * per + j];
        }
        y[i * ldy + row - t0 * JM_TILE_ROWS] = acc * unfold;
      }
    }
  }
}

const jm_kernels jm_kernels_scalar = {JM_ISA_SCALAR, sizeof(float), fold_ref, tiles_ref};
