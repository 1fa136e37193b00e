/* linear_avx2.c -- AVX2/FMA/F16C exact kernels: f32 activations, f32 FMA over 8 lanes
 * (compiled with -mavx2 -mfma -mf16c).
 *
 * FP8, two decodes with the same results (as in linear_avx512.c; jm_fp8_decode):
 *   half   16 weight bytes sign-extended to 16-bit lanes; ((v << 7) & 0xBF80) are the IEEE
 *          half bits of value * 2^-8 and two vcvtph2ps give columns 0-7 and 8-15 as f32,
 *          exactly and never denormal (no microcode assists on Intel, whatever the codes);
 *   shift  8 bytes at a time sign-extended to 32-bit lanes; ((v << 20) & 0x87F00000) are the
 *          f32 bits of value * 2^-120 (denormal for subnormal codes; x carries 2^JM_FOLD_EXP).
 * A 16-column step adds its two 8-column halves into the block sum one after the other; block
 * scales multiply block sums (internal.h's canonical sum). BF16 weights: (u16 << 16).
 * The GEMM path's decoded tiles hold [k_pad / 16 steps][4 rows][16] f32.
 */
#include <immintrin.h>
#include <string.h>

#include "internal.h"

#define AI static inline __attribute__((always_inline))
#define STEP 16  /* columns per step: two 8-lane vectors */
#define MR_MAX 2 /* tokens per kernel call */


AI __m256 fp8x8_shift(const uint8_t *q) {
  const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 20), _mm256_set1_epi32((int)0x87F00000u)));
}

/* the two weight vectors (columns col..col+7, col+8..col+15) of row r */
AI void wvec(const uint8_t *p, const int src, const int dec, int col, int r, __m256 *lo, __m256 *hi) {
  if (src == JM_SRC_FP8) {
    const uint8_t *q = p + (int64_t)(col / JM_SEG) * JM_SEG * JM_TILE_ROWS + r * JM_SEG + col % JM_SEG;
    if (dec == JM_DEC_SHIFT) {
      *lo = fp8x8_shift(q);
      *hi = fp8x8_shift(q + 8);
      return;
    }
    const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(v, 7), _mm256_set1_epi16((short)0xBF80));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
  } else if (src == JM_SRC_BF16) {
    const uint8_t *q = p + (int64_t)(col / (JM_SEG / 2)) * JM_SEG * JM_TILE_ROWS + r * JM_SEG + 2 * (col % (JM_SEG / 2));
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)q)), 16));
    *hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(q + 16))), 16));
  } else {
    const float *q = (const float *)p + (int64_t)(col / STEP) * STEP * JM_TILE_ROWS + r * STEP;
    *lo = _mm256_loadu_ps(q);
    *hi = _mm256_loadu_ps(q + 8);
  }
}

AI float hsum8(__m256 v) { /* pairwise tree, as the scalar loop would add */
  float t[8];
  _mm256_storeu_ps(t, v);
  for (int w = 4; w > 0; w /= 2)
    for (int i = 0; i < w; i++) t[i] += t[i + w];
  return t[0];
}

AI void fold(const jm_matrix *w, const float *x, int64_t ldx, int m, float *xf, const int dec) {
  const __m256 f = _mm256_set1_ps(jm_fold_pow2(w, dec == JM_DEC_SHIFT));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int i = 0; i < m; i++) {
    const float *xi = x + i * ldx;
    float *o = xf + (int64_t)i * w->k_pad;
    for (int j = 0; j < w->k_pad; j += 8) { /* zero past k */
      const __m256 v = j + 8 <= w->k ? _mm256_loadu_ps(xi + j)
                                      : _mm256_maskload_ps(xi + j, _mm256_cmpgt_epi32(_mm256_set1_epi32(w->k - j), lane));
      _mm256_storeu_ps(o + j, _mm256_mul_ps(v, f));
    }
  }
}

/* The block sums of one 128-column block kb of a 4-row tile against tokens xr[0..MR)
 * (tile_driver.h adds them into the sums): 8 block sums, 4 x vectors and the two weight
 * vectors of a step fit the 16 ymm registers at MR = 2. */
AI void block_sums(const uint8_t *p, const int src, const int dec, int kb, const float *const *xr, const int MR,
                   __m256 blk[JM_TILE_ROWS][MR_MAX]) {
#pragma GCC unroll 4
  for (int r = 0; r < JM_TILE_ROWS; r++)
#pragma GCC unroll 3
    for (int i = 0; i < MR; i++) blk[r][i] = _mm256_setzero_ps();
#pragma GCC unroll 2
  for (int st = 0; st < JM_KBLOCK / STEP; st++) {
    const int col = kb * JM_KBLOCK + st * STEP;
    jm_prefetch_chunk(p, src, col);
    __m256 xl[MR_MAX], xh[MR_MAX];
#pragma GCC unroll 3
    for (int i = 0; i < MR; i++) xl[i] = _mm256_loadu_ps(xr[i] + col), xh[i] = _mm256_loadu_ps(xr[i] + col + 8);
#pragma GCC unroll 4
    for (int r = 0; r < JM_TILE_ROWS; r++) {
      __m256 lo, hi;
      wvec(p, src, dec, col, r, &lo, &hi);
#pragma GCC unroll 3
      for (int i = 0; i < MR; i++) {
        blk[r][i] = _mm256_fmadd_ps(lo, xl[i], blk[r][i]);
        blk[r][i] = _mm256_fmadd_ps(hi, xh[i], blk[r][i]);
      }
    }
  }
}

#define VEC __m256
#define V_ZERO() _mm256_setzero_ps()
#define V_SET1(s) _mm256_set1_ps(s)
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
/* GEMM panels: the step's two vectors of row r */
AI void decode_step(const uint8_t *p, const int src, const int dec, int col, int r, float *o) {
  __m256 lo, hi;
  wvec(p, src, dec, col, r, &lo, &hi);
  _mm256_storeu_ps(o, lo);
  _mm256_storeu_ps(o + 8, hi);
}

#define V_LOAD(p) _mm256_load_ps(p)
#define V_STORE(p, v) _mm256_store_ps(p, v)
#define V_SUM(v) hsum8(v)
#define ACC_L 8
#define MR_GEMV 2
#define SHIFT_DECODE(dec) ((dec) == JM_DEC_SHIFT)
#define BF16_DOT 0
#define XT float
#define WD_ELEM sizeof(float)
#define GEMM_KMAJOR 1
#include "tile_driver.h"

TD_TABLE(avx2, JM_ISA_AVX2, JM_DEC_HALF)
TD_TABLE(avx2_shift, JM_ISA_AVX2, JM_DEC_SHIFT)
