/* linear_avx512bf16.c -- AVX-512 BF16 kernels: bf16 activations, vdpbf16ps dot products
 * (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16); the precision JM_PREC_BF16.
 *
 * FP8: 32 weight bytes are sign-extended to 16-bit lanes and ((v << 4) & 0x87F0) gives bf16
 * bits equal to value * 2^-120; vdpbf16ps flushes bf16 denormals and tiny products, so the
 * activations carry 2^JM_FOLD_EXP (x * 2^56 rounded to bf16 once) and the block scales
 * 2^(120 - JM_FOLD_EXP); subnormal FP8 codes decode to bf16 denormals and are flushed (an
 * error below 2^-15 of the block's largest weight). BF16 weights are used as they are. Block
 * sums are scaled and added as in internal.h's canonical sum. The GEMM path's decoded tiles hold
 * the bf16 vectors in the order the kernel reads them: [k_pad / 32 steps][4 rows][32].
 *
 * With JM_SIMDE defined the file compiles against SIMDe's portable AVX-512 (tests only).
 */
#ifdef JM_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#else
#include <immintrin.h>
#endif
#include <string.h>

#include "internal.h"
#include "acc512.h"

#define AI static inline __attribute__((always_inline))
#define STEP 32  /* columns per vdpbf16ps step (bf16 pairs) */
#define MR_MAX 6 /* tokens per kernel call */


AI __m512bh as_bh(__m512i v) {
  __m512bh r;
  memcpy(&r, &v, sizeof r);
  return r;
}

AI __m512i wvec(const uint8_t *p, const int src, int col, int r) {
  if (src == JM_SRC_FP8) {
    const __m256i b = _mm256_loadu_si256((const __m256i *)(p + (int64_t)(col / JM_SEG) * JM_SEG * JM_TILE_ROWS +
                                                           r * JM_SEG + col % JM_SEG));
    return _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(b), 4), _mm512_set1_epi16((short)0x87F0));
  }
  if (src == JM_SRC_BF16)
    return _mm512_loadu_si512((const void *)(p + (int64_t)(col / STEP) * JM_SEG * JM_TILE_ROWS + r * JM_SEG));
  return _mm512_loadu_si512((const void *)((const uint16_t *)p + (int64_t)(col / STEP) * STEP * JM_TILE_ROWS + r * STEP));
}

/* 16 floats -> 16 bf16, round to nearest even (inputs are finite) */
AI __m256i f32_to_bf16_16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __m512i h = _mm512_srli_epi32(r, 16); /* 0..65535 -> as int16, so the saturating pack is exact */
  const __m512i sgn = _mm512_slli_epi32(_mm512_and_si512(h, _mm512_set1_epi32(0x8000)), 1);
  return _mm512_cvtsepi32_epi16(_mm512_sub_epi32(h, sgn));
}

/* bf16 of x * 2^56 (FP8 weights) or x (BF16 weights), round to nearest even; zero past k */
AI void fold(const jm_matrix *w, const float *x, int64_t ldx, int m, uint16_t *xf, const int dec) {
  const __m512 f = _mm512_set1_ps(jm_fold_pow2(w, 1));
  for (int i = 0; i < m; i++) {
    const float *xi = x + i * ldx;
    uint16_t *o = xf + (int64_t)i * w->k_pad;
    for (int j = 0; j < w->k_pad; j += 16) { /* zero past k */
      _mm256_storeu_si256((__m256i *)(o + j), f32_to_bf16_16(_mm512_mul_ps(jm_load_tail16(xi + j, w->k - j), f)));
    }
  }
}

/* The block sums of one 128-column block kb of a 4-row tile against tokens xr[0..MR)
 * (tile_driver.h adds them into the sums) */
AI void block_sums(const uint8_t *p, const int src, const int dec, int kb, const uint16_t *const *xr, const int MR,
                   __m512 blk[JM_TILE_ROWS][MR_MAX]) {
#pragma GCC unroll 4
  for (int r = 0; r < JM_TILE_ROWS; r++)
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) blk[r][i] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int st = 0; st < JM_KBLOCK / STEP; st++) {
    const int col = kb * JM_KBLOCK + st * STEP;
    jm_prefetch_chunk(p, src, col);
    __m512bh xv[MR_MAX];
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) xv[i] = as_bh(_mm512_loadu_si512((const void *)(xr[i] + col)));
#pragma GCC unroll 4
    for (int r = 0; r < JM_TILE_ROWS; r++) {
      const __m512bh wv = as_bh(wvec(p, src, col, r));
#pragma GCC unroll 6
      for (int i = 0; i < MR; i++) blk[r][i] = _mm512_dpbf16_ps(blk[r][i], wv, xv[i]);
    }
  }
}

/* GEMM panels: the step's bf16 vector of row r */
AI void decode_step(const uint8_t *p, const int src, const int dec, int col, int r, uint16_t *o) {
  _mm512_storeu_si512((void *)o, wvec(p, src, col, r));
}

#define MR_GEMV 3
#define SHIFT_DECODE(dec) 1 /* value * 2^-120 bf16 bits */
#define BF16_DOT 1
#define XT uint16_t
#define WD_ELEM sizeof(uint16_t)
#define GEMM_KMAJOR 0
#include "tile_driver.h"

TD_TABLE(avx512bf16, JM_ISA_AVX512, 0)
