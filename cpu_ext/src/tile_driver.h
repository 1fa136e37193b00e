/* tile_driver.h -- the loops around a SIMD file's block sums, shared by linear_avx2.c,
 * linear_avx512.c and linear_avx512bf16.c (included once by each, after it defines):
 *   VEC, V_ZERO(), V_SET1(s), V_FMA(a, b, c) = a * b + c, V_LOAD(p), V_STORE(p, v), V_SUM(v)
 *            its f32 accumulator vector (ACC_L lanes) and V_SUM's fixed pairwise tree
 *   MR_MAX   tokens per GEMM block_sums call (3 to 6); MR_GEMV (<= MR_MAX) for the GEMV
 *   XT       the folded activation element type
 *   GEMM_KMAJOR  1: the GEMM path runs K-block-major (gemm_tiles), 0: tile-major over the
 *            decoded tiles like the GEMV (gemv_tiles; measured faster for the bf16 kernels)
 *   block_sums(p, src, dec, kb, xr, MR, blk)   the block sums blk[r][i] (from zero) of one
 *            128-column block kb of the 4-row tile at p against tokens xr[0..MR)
 *            (always_inline; src, dec, MR compile-time constants)
 *   SHIFT_DECODE(dec)   1 when FP8 decodes to value * 2^-120 (internal.h jm_block_scale)
 *   BF16_DOT  1 for the bf16 kernels (the jm_kernels flag)
 *   fold(w, x, ldx, m, xf, dec)   for TD_TABLE
 *   STEP, decode_step(p, src, dec, col, r, o)   columns per step; writes row r's weights of
 *            the step at col (from the tile at p) to o in the order block_sums reads them
 * Per output: acc = V_FMA(blk, scale, acc) after every block in K order, then V_SUM(acc)
 * (internal.h's canonical sum). GEMV (gemv_tiles): per tile and group of MR_GEMV tokens, every
 * K block with acc in registers; the weights stream from DRAM once per token group. GEMM
 * (run_tiles_dec: decoded tiles, t1 - t0 <= JM_GEMM_NP / 4, m <= JM_GEMM_MB): the same over
 * the decoded tiles, or with GEMM_KMAJOR per K block every tile and group of MR_MAX tokens, acc
 * in memory, so a block's weights and activations stay in L1 (measured faster for the f32
 * kernels). All apply the same operations to each output in the same order: the same bits.
 */
#ifndef JM_TILE_DRIVER_H
#define JM_TILE_DRIVER_H

#define TD_GROUPS ((JM_GEMM_MB + MR_MAX - 1) / MR_MAX) /* token groups of a GEMM block */
#define TD_SLOT (MR_MAX * JM_TILE_ROWS * ACC_L)            /* floats of one (tile, group) accumulator */

/* one tile t (at p) against MR tokens, acc in registers */
AI void gemv_tile(const jm_matrix *w, int t, const uint8_t *p, const int src, const int dec, const XT *const *xr,
                  const int MR, float *y, int64_t ldy, int rows) {
  VEC acc[JM_TILE_ROWS][MR_MAX], blk[JM_TILE_ROWS][MR_MAX];
  for (int r = 0; r < JM_TILE_ROWS; r++)
    for (int i = 0; i < MR; i++) acc[r][i] = V_ZERO();
  for (int kb = 0; kb < w->kb; kb++) {
    block_sums(p, src, dec, kb, xr, MR, blk);
    const VEC sv = V_SET1(jm_block_scale(w, t, kb, SHIFT_DECODE(dec)));
    for (int r = 0; r < JM_TILE_ROWS; r++)
      for (int i = 0; i < MR; i++) acc[r][i] = V_FMA(blk[r][i], sv, acc[r][i]);
  }
  for (int r = 0; r < rows; r++)
    for (int i = 0; i < MR; i++) y[i * ldy + r] = V_SUM(acc[r][i]);
}

/* one block kb of tile t against MR tokens, acc[(r * MR_MAX + i) * ACC_L] in memory */
AI void gemm_block(const jm_matrix *w, int t, int kb, const uint8_t *p, const int dec, const XT *const *xr,
                   const int MR, float *acc) {
  VEC blk[JM_TILE_ROWS][MR_MAX];
  block_sums(p, JM_SRC_DEC, dec, kb, xr, MR, blk);
  const VEC sv = V_SET1(jm_block_scale(w, t, kb, SHIFT_DECODE(dec)));
  for (int r = 0; r < JM_TILE_ROWS; r++)
    for (int i = 0; i < MR; i++) {
      float *a = acc + (r * MR_MAX + i) * ACC_L;
      V_STORE(a, V_FMA(blk[r][i], sv, V_LOAD(a)));
    }
}

#define TD_MR(k, MAX) ((k) <= (MAX) ? (k) : (MAX))
#define TD_BY_MR(MAX, CALL) /* CALL(MR) with a compile-time MR = mr, 1 <= mr <= MAX <= 6 */ \
  switch (mr) {                                                                         \
    case 1: CALL(1); break;                                                             \
    case 2: CALL(TD_MR(2, MAX)); break;                                                 \
    case 3: CALL(TD_MR(3, MAX)); break;                                                 \
    case 4: CALL(TD_MR(4, MAX)); break;                                                 \
    case 5: CALL(TD_MR(5, MAX)); break;                                                 \
    default: CALL(MAX); break;                                                          \
  }

AI void gemv_tiles(const jm_matrix *w, int t0, int t1, const uint8_t *base, int64_t tile_bytes, const int src,
                   const int dec, const XT *const *xr, int m, float *y, int64_t ldy) {
  for (int t = t0; t < t1; t++) {
    const int rows = w->n - t * JM_TILE_ROWS < JM_TILE_ROWS ? w->n - t * JM_TILE_ROWS : JM_TILE_ROWS;
    const uint8_t *p = base + (t - t0) * tile_bytes;
    for (int i = 0; i < m; i += MR_GEMV) {
      const int mr = m - i < MR_GEMV ? m - i : MR_GEMV;
      float *yi = y + (int64_t)i * ldy + (t - t0) * JM_TILE_ROWS;
#define TD_CALL(MR) gemv_tile(w, t, p, src, dec, xr + i, MR, yi, ldy, rows)
      TD_BY_MR(MR_GEMV, TD_CALL)
#undef TD_CALL
    }
  }
}

AI void gemm_tiles(const jm_matrix *w, int t0, int t1, const uint8_t *wd, const int dec, const XT *const *xr, int m,
                   float *y, int64_t ldy) {
  float accm[JM_GEMM_NP / JM_TILE_ROWS * TD_GROUPS * TD_SLOT] __attribute__((aligned(64)));
  const int nt = t1 - t0, ng = (m + MR_MAX - 1) / MR_MAX;
  const int64_t tile_bytes = (int64_t)JM_TILE_ROWS * w->k_pad * WD_ELEM;
  memset(accm, 0, sizeof(float) * (size_t)(nt * ng * TD_SLOT));
  for (int kb = 0; kb < w->kb; kb++)
    for (int t = t0; t < t1; t++)
      for (int g = 0; g < ng; g++) {
        const int i = g * MR_MAX, mr = m - i >= MR_MAX ? MR_MAX : m - i;
        const uint8_t *p = wd + (t - t0) * tile_bytes;
        float *acc = accm + (int64_t)((t - t0) * ng + g) * TD_SLOT;
#define TD_CALL(MR) gemm_block(w, t, kb, p, dec, xr + i, MR, acc)
        TD_BY_MR(MR_MAX, TD_CALL)
#undef TD_CALL
      }
  for (int t = t0; t < t1; t++) {
    const int rows = w->n - t * JM_TILE_ROWS < JM_TILE_ROWS ? w->n - t * JM_TILE_ROWS : JM_TILE_ROWS;
    for (int g = 0; g < ng; g++) {
      const int i = g * MR_MAX, mr = m - i >= MR_MAX ? MR_MAX : m - i;
      const float *acc = accm + (int64_t)((t - t0) * ng + g) * TD_SLOT;
      for (int r = 0; r < rows; r++)
        for (int j = 0; j < mr; j++)
          y[(int64_t)(i + j) * ldy + (t - t0) * JM_TILE_ROWS + r] = V_SUM(V_LOAD(acc + (r * MR_MAX + j) * ACC_L));
    }
  }
}

/* the GEMV entry: m <= JM_MC tokens of contiguous folded activations */
AI void run_tiles_gemv(const jm_matrix *w, int t0, int t1, const int dec, const XT *xf, int m, float *y, int64_t ldy) {
  const XT *xr[JM_MC];
  for (int i = 0; i < m; i++) xr[i] = xf + (int64_t)i * w->k_pad;
  if (w->format == JM_FMT_FP8)
    gemv_tiles(w, t0, t1, jm_tile_ptr(w, t0), w->tile_bytes, JM_SRC_FP8, dec, xr, m, y, ldy);
  else
    gemv_tiles(w, t0, t1, jm_tile_ptr(w, t0), w->tile_bytes, JM_SRC_BF16, dec, xr, m, y, ldy);
}

/* the GEMM entry: decoded tiles wd, token rows by pointer (m <= JM_GEMM_MB) */
AI void run_tiles_dec(const jm_matrix *w, int t0, int t1, const int dec, const void *wd, const void *const *xr, int m,
                      float *y, int64_t ldy) {
#if GEMM_KMAJOR
  gemm_tiles(w, t0, t1, (const uint8_t *)wd, dec, (const XT *const *)xr, m, y, ldy);
#else
  gemv_tiles(w, t0, t1, (const uint8_t *)wd, (int64_t)JM_TILE_ROWS * w->k_pad * WD_ELEM, JM_SRC_DEC, dec,
             (const XT *const *)xr, m, y, ldy);
#endif
}

/* tiles [t0, t1) of w decoded into wd: per tile, per step, per row, decode_step's elements */
AI void decode(const jm_matrix *w, int t0, int t1, void *wd, const int dec) {
  XT *o = (XT *)wd;
  for (int t = t0; t < t1; t++) {
    const uint8_t *p = jm_tile_ptr(w, t);
    for (int col = 0; col < w->k_pad; col += STEP)
      for (int r = 0; r < JM_TILE_ROWS; r++, o += STEP) {
        if (w->format == JM_FMT_FP8)
          decode_step(p, JM_SRC_FP8, dec, col, r, o);
        else
          decode_step(p, JM_SRC_BF16, dec, col, r, o);
      }
  }
}

/* one kernel table per FP8 decode: jm_kernels_<NAME> with the file's fold and decode */
#define TD_TABLE(NAME, ISA, DEC)                                                                                     \
  static void fold_##NAME(const jm_matrix *w, int rb, const float *x, int64_t ldx, int m, void *xf) {                \
    fold(w, x, ldx, m, (XT *)xf, DEC);                                                                               \
  }                                                                                                                  \
  static void tiles_##NAME(const jm_matrix *w, int t0, int t1, const void *xf, int m, float *y, int64_t ldy) {       \
    run_tiles_gemv(w, t0, t1, DEC, (const XT *)xf, m, y, ldy);                                                       \
  }                                                                                                                  \
  static void tiles_dec_##NAME(const jm_matrix *w, int t0, int t1, const void *wd, const void *const *xr, int m,     \
                               float *y, int64_t ldy) {                                                              \
    run_tiles_dec(w, t0, t1, DEC, wd, xr, m, y, ldy);                                                                \
  }                                                                                                                  \
  static void decode_##NAME(const jm_matrix *w, int t0, int t1, void *wd) { decode(w, t0, t1, wd, DEC); }            \
  const jm_kernels jm_kernels_##NAME = {ISA, BF16_DOT, sizeof(XT), WD_ELEM, fold_##NAME, tiles_##NAME,            \
                                       decode_##NAME, tiles_dec_##NAME};

#endif
