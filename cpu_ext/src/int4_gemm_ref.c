/* int4_gemm_ref.c -- scalar twin of the INT4 GEMM-path kernels (always compiled; see
 * int4_gemm_avx2.c): the same unpacked panel bytes, exact integer group dots, and per group
 * lane l of each super-block acc[l] = fmaf((float)dot * s_x, s_w, acc[l]) (the driver then sums
 * the 8 lanes in one order for both), so its results equal the AVX2 path's bit for bit.
 */
#include <math.h>
#include <string.h>

#include "int4.h"

static void panel_ref(const jm_matrix *w, int n0, int np, uint8_t *panel) {
  const int G = w->group, V = G / 8, n_sb = jm_int4_n_sb(w);
  const int64_t sbb = jm_int4_sb_bytes(w), prs = jm_int4_panel_row(w);
  for (int r = 0; r < np; r++) {
    const int row = n0 + r;
    const uint8_t *tile = jm_tile_ptr(w, row / JM_TILE_ROWS);
    const int rr = row % JM_TILE_ROWS;
    uint8_t *o = panel + r * prs;
    float *so = (float *)(o + w->k_pad);
    for (int sb = 0; sb < n_sb; sb++) {
      const uint8_t *src = tile + sb * sbb + (int64_t)rr * 4 * G;
      uint8_t *dst = o + (int64_t)sb * 8 * G;
      for (int b = 0; b < 32 * V; b++) {
        dst[b] = src[b] & 15;
        dst[32 * V + b] = src[b] >> 4;
      }
      for (int l = 0; l < 8; l++) {
        uint16_t h;
        memcpy(&h, tile + sb * sbb + 16 * (int64_t)G + 16 * rr + 2 * l, 2);
        so[8 * sb + l] = jm_f16_to_f32(h);
      }
    }
  }
}

static void micro_ref(const jm_matrix *w, const uint8_t *p, int64_t prs, int nr, const uint8_t *const *xr, int mr,
                      int sb0, int sb1, float *acc8, int64_t lda) {
  const int G = w->group, nv = G / 4;
  for (int i = 0; i < mr; i++) {
    const int8_t *x = (const int8_t *)xr[i];
    const float *sx = jm_int4_sx(w, (uint8_t *)xr[i]);
    const int32_t *corr = jm_int4_corr(w, (uint8_t *)xr[i]);
    for (int r = 0; r < nr; r++) {
      const uint8_t *u = p + r * prs;
      const float *sw = (const float *)(u + w->k_pad);
      float *acc = acc8 + i * lda + 8 * r;
      if (!sb0) memset(acc, 0, 8 * sizeof(float));
      for (int sb = sb0; sb < sb1; sb++)
        for (int l = 0; l < 8; l++) {
          int32_t dot = corr[8 * sb + l];
          for (int v = 0; v < nv; v++)
            for (int j = 0; j < 4; j++) {
              const int64_t b = (int64_t)sb * 8 * G + 32 * v + 4 * l + j;
              dot += u[b] * x[b];
            }
          acc[l] = fmaf((float)dot * sx[8 * sb + l], sw[8 * sb + l], acc[l]);
        }
    }
  }
}

const jm_int4_gemm_kernels jm_int4_gemm_scalar = {JM_ISA_SCALAR, jm_int4_fold_ref, panel_ref, micro_ref};
