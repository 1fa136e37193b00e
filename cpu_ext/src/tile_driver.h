/* tile_driver.h -- the loops around a SIMD file's block kernel, shared by linear_avx2.c,
 * linear_avx512.c and linear_avx512bf16.c (included once by each, after it defines):
 *   ACC_L    lanes of its f32 accumulator vectors
 *   MR_MAX   tokens per block_kernel call (3 to 6)
 *   XT       the folded activation element type
 *   block_kernel(p, src, dec, kb, s, xr, MR, acc)   one 128-column block kb of the 4-row tile
 *            at p against tokens xr[0..MR): block sums b, then acc[(r * MR_MAX + i) * ACC_L] =
 *            fma(b, s, acc) lane-wise (always_inline; src, dec, MR compile-time constants)
 *   acc_sum(acc)   the fixed pairwise tree over the ACC_L lanes of one accumulator
 *   block_scale(w, t, kb, dec)   the scale that multiplies tile t's block sums of block kb
 * run_tiles computes y for tiles [t0, t1) x tokens [0, m). GEMV (kmajor 0): per tile and group
 * of MR_MAX tokens every K block in order, the weights streaming from DRAM once per token
 * group. GEMM (kmajor 1, decoded tiles, t1 - t0 <= JM_GEMM_NP / 4, m <= JM_GEMM_MB): per K block
 * every tile and token group, so the block's weights and activations stay in L1. Either way
 * each output sees the same block_kernel calls in the same K order: the same bits.
 */
#ifndef JM_TILE_DRIVER_H
#define JM_TILE_DRIVER_H

#define TD_GROUPS ((JM_GEMM_MB + MR_MAX - 1) / MR_MAX) /* token groups of a GEMM block */
#define TD_SLOT (MR_MAX * JM_TILE_ROWS * ACC_L)            /* floats of one (tile, group) accumulator */

AI void run_tiles(const jm_matrix *w, int t0, int t1, const uint8_t *base, int64_t tile_bytes, const int src,
                  const int dec, const XT *const *xr, int m, float *y, int64_t ldy, const int kmajor) {
  float accm[JM_GEMM_NP / JM_TILE_ROWS * TD_GROUPS * TD_SLOT] __attribute__((aligned(64)));
  const int nt = kmajor ? t1 - t0 : 1, ng = kmajor ? (m + MR_MAX - 1) / MR_MAX : 1; /* slots at once */
  for (int tt = t0; tt < t1; tt += nt)
    for (int i0 = 0; i0 < m; i0 += ng * MR_MAX) {
      memset(accm, 0, sizeof(float) * (size_t)(nt * ng * TD_SLOT));
      for (int kb = 0; kb < w->kb; kb++)
        for (int t = tt; t < tt + nt; t++)
          for (int g = 0; g < ng && i0 + g * MR_MAX < m; g++) {
            const int i = i0 + g * MR_MAX, mr = m - i >= MR_MAX ? MR_MAX : m - i;
            const uint8_t *p = base + (t - t0) * tile_bytes;
            const float s = block_scale(w, t, kb, dec);
            float *acc = accm + (int64_t)((t - tt) * ng + g) * TD_SLOT;
            switch (mr) {
              case 1: block_kernel(p, src, dec, kb, s, xr + i, 1, acc); break;
              case 2: block_kernel(p, src, dec, kb, s, xr + i, 2, acc); break;
#if MR_MAX > 3
              case 3: block_kernel(p, src, dec, kb, s, xr + i, 3, acc); break;
#endif
#if MR_MAX > 4
              case 4: block_kernel(p, src, dec, kb, s, xr + i, 4, acc); break;
#endif
#if MR_MAX > 5
              case 5: block_kernel(p, src, dec, kb, s, xr + i, 5, acc); break;
#endif
              default: block_kernel(p, src, dec, kb, s, xr + i, MR_MAX, acc); break;
            }
          }
      for (int t = tt; t < tt + nt; t++) {
        const int rows = w->n - t * JM_TILE_ROWS < JM_TILE_ROWS ? w->n - t * JM_TILE_ROWS : JM_TILE_ROWS;
        for (int g = 0; g < ng && i0 + g * MR_MAX < m; g++) {
          const int i = i0 + g * MR_MAX, mr = m - i >= MR_MAX ? MR_MAX : m - i;
          const float *acc = accm + (int64_t)((t - tt) * ng + g) * TD_SLOT;
          for (int r = 0; r < rows; r++)
            for (int j = 0; j < mr; j++)
              y[(int64_t)(i + j) * ldy + (t - t0) * JM_TILE_ROWS + r] = acc_sum(acc + (r * MR_MAX + j) * ACC_L);
        }
      }
    }
}

/* the GEMV entry: m <= JM_MC tokens of contiguous folded activations */
AI void run_tiles_gemv(const jm_matrix *w, int t0, int t1, const int dec, const XT *xf, int m, float *y, int64_t ldy) {
  const XT *xr[JM_MC];
  for (int i = 0; i < m; i++) xr[i] = xf + (int64_t)i * w->k_pad;
  if (w->format == JM_FMT_FP8)
    run_tiles(w, t0, t1, jm_tile_ptr(w, t0), w->tile_bytes, SRC_FP8, dec, xr, m, y, ldy, 0);
  else
    run_tiles(w, t0, t1, jm_tile_ptr(w, t0), w->tile_bytes, SRC_BF16, dec, xr, m, y, ldy, 0);
}

/* the GEMM entry: decoded tiles wd, token rows by pointer (m <= JM_GEMM_MB) */
AI void run_tiles_dec(const jm_matrix *w, int t0, int t1, const int dec, const void *wd, const void *const *xr, int m,
                      float *y, int64_t ldy) {
  run_tiles(w, t0, t1, (const uint8_t *)wd, (int64_t)JM_TILE_ROWS * w->k_pad * WD_ELEM, SRC_DEC, dec,
            (const XT *const *)xr, m, y, ldy, 1);
}

#endif
