/* gemm_ref.c -- scalar twin of the GEMM-path kernels (always compiled; see gemm_avx2.c).
 *
 * Panel: an FP8 byte decodes by shift and mask to f32 bits of value * 2^-120 (exact, the
 * contract in jaxmoe_cpu.h), times 2^120 (exact) gives the value, times the block scale gives
 * the weight with one rounding; BF16 weights are exact in f32. The micro-kernel sums over k
 * in ascending order in f32.
 */
#include "internal.h"

static inline float fp8_value(uint8_t b) {
  union { uint32_t u; float f; } v = {((uint32_t)(b & 0x7f) << 20) | ((uint32_t)(b & 0x80) << 24)};
  return v.f * 0x1p120f;
}

static void panel_ref(const jm_matrix *w, int n0, int np, int kb, float *panel) {
  const int fp8 = w->format == JM_FMT_FP8;
  const float s = fp8 ? jm_scale_of(w, n0 / JM_KBLOCK, kb) : 1.0f;
  const int rows = (np + JM_GEMM_NR - 1) / JM_GEMM_NR * JM_GEMM_NR;
  for (int r = 0; r < rows; r++) {
    float *o = panel + (r / JM_GEMM_NR) * JM_KBLOCK * JM_GEMM_NR + r % JM_GEMM_NR;
    const int row = n0 + r;
    if (r >= np || row >= w->n) {
      for (int k = 0; k < JM_KBLOCK; k++) o[k * JM_GEMM_NR] = 0.0f;
      continue;
    }
    const uint8_t *tp = jm_tile_ptr(w, row / JM_TILE_ROWS) + (row % JM_TILE_ROWS) * JM_SEG;
    for (int k = 0; k < JM_KBLOCK; k++) {
      const int col = kb * JM_KBLOCK + k;
      if (fp8) {
        const uint8_t *seg = tp + (int64_t)(col / JM_SEG) * JM_SEG * JM_TILE_ROWS;
        o[k * JM_GEMM_NR] = fp8_value(seg[col % JM_SEG]) * s;
      } else {
        const int per = JM_SEG / 2;
        const uint8_t *seg = tp + (int64_t)(col / per) * JM_SEG * JM_TILE_ROWS;
        const uint16_t h = (uint16_t)(seg[2 * (col % per)] | seg[2 * (col % per) + 1] << 8);
        o[k * JM_GEMM_NR] = jm_bf16_to_f32(h);
      }
    }
  }
}

static void micro_ref(const float *const *xr, int mr, int kk, const float *sub, float *c, int64_t ldc, int nc,
                      int accumulate) {
  for (int i = 0; i < mr; i++)
    for (int j = 0; j < nc; j++) {
      float acc = 0.0f;
      for (int k = 0; k < kk; k++) acc += xr[i][k] * sub[k * JM_GEMM_NR + j];
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc : acc;
    }
}

const jm_gemm_kernels jm_gemm_scalar = {JM_ISA_SCALAR, panel_ref, micro_ref};
