/* int4_ref.c -- scalar reference of the INT4 kernels (always compiled; the twin of the
 * AVX2 and AVX-512 VNNI paths): same layout (int4.h), same int8 activations, exact integer
 * group dots, then per group lane l of each super-block acc[l] = fmaf(dot * s_x, s_w, acc[l])
 * and one fixed 8-lane sum: the order of the INT4 GEMM's scalar twin, so rows give the same bits
 * on the GEMV and the GEMM path.
 */
#include <math.h>
#include <string.h>

#include "int4.h"

void jm_int4_fold_ref(const jm_matrix *w, int rb, const float *x, int64_t ldx, int m, void *xf) {
  jm_int4_fold_with(jm_int4_quant_group_ref, w, x, ldx, m, xf);
}

static void tiles_ref(const jm_matrix *w, int t0, int t1, const void *xf_, int m, float *y, int64_t ldy) {
  const uint8_t *xf = (const uint8_t *)xf_;
  const int G = w->group, V = G / 8, n_sb = jm_int4_n_sb(w);
  const int64_t sbb = jm_int4_sb_bytes(w);
  for (int t = t0; t < t1; t++) {
    const uint8_t *p = jm_tile_ptr(w, t);
    for (int r = 0; r < JM_TILE_ROWS; r++) {
      const int row = t * JM_TILE_ROWS + r;
      if (row >= w->n) break;
      for (int i = 0; i < m; i++) {
        uint8_t *tok = (uint8_t *)xf + i * jm_int4_xf_stride(w);
        const float *sx = jm_int4_sx(w, tok);
        const int32_t *corr = jm_int4_corr(w, tok);
        float acc[8] = {0};
        for (int sb = 0; sb < n_sb; sb++) {
          const uint8_t *nib = p + sb * sbb + (int64_t)r * 4 * G;
          const uint8_t *sc = p + sb * sbb + 16 * (int64_t)G + 16 * r;
          const int8_t *xlo = (const int8_t *)tok + (int64_t)sb * 8 * G, *xhi = xlo + 4 * G;
          for (int l = 0; l < 8; l++) {
            int32_t dot = corr[sb * 8 + l];
            for (int v = 0; v < V; v++)
              for (int j = 0; j < 4; j++) {
                const int b = 32 * v + 4 * l + j;
                dot += (nib[b] & 15) * xlo[b] + (nib[b] >> 4) * xhi[b];
              }
            uint16_t h;
            memcpy(&h, sc + 2 * l, 2);
            acc[l] = fmaf((float)dot * sx[sb * 8 + l], jm_f16_to_f32(h), acc[l]);
          }
        }
        y[i * ldy + row - t0 * JM_TILE_ROWS] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
      }
    }
  }
}

const jm_kernels jm_int4_kernels_scalar = {.isa = JM_ISA_SCALAR, .xf_elem = JM_INT4_XF_ELEM, .fold = jm_int4_fold_ref, .tiles = tiles_ref};
