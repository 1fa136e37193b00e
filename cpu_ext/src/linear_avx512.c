/* linear_avx512.c -- AVX-512F exact kernels: f32 activations, f32 FMA over 16 lanes
 * (compiled with -mavx512f -mavx512bw -mavx512vl -mf16c; no BF16 needed).
 *
 * A step is 32 columns: 32 weight bytes sign-extended to 16-bit lanes give the even and the odd
 * columns' weights as two f32 vectors, and x is folded in the same order (per 32 columns the 16
 * even, then the 16 odd): lane j sums columns 2j, then 2j + 1 of each step. FP8, two decodes
 * with the same results (internal.h, jm_fp8_decode):
 *   half   ((v << 7) & 0xBF80) are the IEEE half bits of value * 2^-8 (sign, the 4 exponent
 *          bits under a zero top bit, 3 mantissa bits; subnormal codes become half
 *          subnormals); a word permute puts the even halves low, the odd high, and vcvtph2ps
 *          turns them into f32 exactly: no FMA ever reads a denormal (Intel CPUs take
 *          microcode assists on denormal operands). x is used as it is, block scales x 2^8.
 *   shift  on the 32-bit lanes (v << 20) & 0x87F00000 (even) and (v << 4) & 0x87F00000 (odd)
 *          are the f32 bits of value * 2^-120 (subnormal codes become f32 denormals: full
 *          speed on AMD, where vcvtph2ps on 512-bit vectors is slow). x carries 2^JM_FOLD_EXP,
 *          block scales 2^(120 - FOLD).
 * Both sum the same products in the same order, scaled by exact powers of two.
 * The block scale multiplies each 128-column block sum (the canonical sum of internal.h).
 * BF16 weights: one 64-byte segment is a step; (u << 16) even, (u & 0xFFFF0000) odd. The GEMM
 * path's decoded tiles hold these vectors in the order the kernel reads them:
 * [k_pad / 32 steps][4 rows][16 even, 16 odd].
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
#define L 16     /* lanes */
#define STEP 32  /* columns per step: the even and the odd 16 */
#define MR_MAX 4 /* tokens per kernel call */


/* 32 FP8 codes -> the f32 weights of the even (*e) and the odd (*o) columns */
AI void fp8x32(const uint8_t *p, const int dec, __m512 *e, __m512 *o) {
  const __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)); /* word j = sext(b_j) */
  if (dec == JM_DEC_SHIFT) { /* 32-bit lane j holds words 2j (low) and 2j+1 (high) */
    const __m512i mask = _mm512_set1_epi32((int)0x87F00000u);
    *e = _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(v, 20), mask));
    *o = _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(v, 4), mask));
    return;
  }
  const __m512i h = _mm512_and_si512(_mm512_slli_epi16(v, 7), _mm512_set1_epi16((short)0xBF80)); /* half bits */
  const __m512i eo = _mm512_permutexvar_epi16(
      _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 30, 28, 26, 24, 22, 20, 18, 16, 14,
                       12, 10, 8, 6, 4, 2, 0),
      h); /* even halves low, odd halves high */
  *e = _mm512_cvtph_ps(_mm512_castsi512_si256(eo));
  *o = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(eo, 1));
}

/* the weight vectors of row r, columns [col, col + 32): even and odd columns */
AI void wvec(const uint8_t *p, const int src, const int dec, int col, int r, __m512 *e, __m512 *o) {
  if (src == JM_SRC_FP8) {
    fp8x32(p + (int64_t)(col / JM_SEG) * JM_SEG * JM_TILE_ROWS + r * JM_SEG + col % JM_SEG, dec, e, o);
  } else if (src == JM_SRC_BF16) { /* 32 bf16 = one 64-byte segment; lane j: columns 2j (low), 2j+1 */
    const __m512i u = _mm512_loadu_si512((const void *)(p + (int64_t)(col / (JM_SEG / 2)) * JM_SEG * JM_TILE_ROWS + r * JM_SEG));
    *e = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    *o = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
  } else {
    const float *q = (const float *)p + (int64_t)(col / STEP) * STEP * JM_TILE_ROWS + r * STEP;
    *e = _mm512_loadu_ps(q);
    *o = _mm512_loadu_ps(q + L);
  }
}

/* x (times 2^56 for the shift decode of FP8) per 32 columns: the 16 even, then the 16 odd
 * columns, as the weight vectors come; zero past k */
AI void fold(const jm_matrix *w, const float *x, int64_t ldx, int m, float *xf, const int dec) {
  const __m512 f = _mm512_set1_ps(jm_fold_pow2(w, dec == JM_DEC_SHIFT));
  const __m512i ie = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i io = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  for (int i = 0; i < m; i++) {
    const float *xi = x + i * ldx;
    float *o = xf + (int64_t)i * w->k_pad;
    for (int j = 0; j < w->k_pad; j += STEP) {
      __m512 v[2];
      for (int h = 0; h < 2; h++) {
        const int c = j + h * L;
        v[h] = _mm512_mul_ps(jm_load_tail16(xi + c, w->k - c), f);
      }
      _mm512_storeu_ps(o + j, _mm512_permutex2var_ps(v[0], ie, v[1]));
      _mm512_storeu_ps(o + j + L, _mm512_permutex2var_ps(v[0], io, v[1]));
    }
  }
}

/* The block sums of one 128-column block kb of a 4-row tile against tokens xr[0..MR): per
 * 32-column step the even then the odd weight vector, the x vectors of a step loaded once for
 * the 4 rows (tile_driver.h adds the sums into the running ones). */
AI void block_sums(const uint8_t *p, const int src, const int dec, int kb, const float *const *xr, const int MR,
                   __m512 blk[JM_TILE_ROWS][MR_MAX]) {
#pragma GCC unroll 4
  for (int r = 0; r < JM_TILE_ROWS; r++)
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++) blk[r][i] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int st = 0; st < JM_KBLOCK / STEP; st++) {
    const int col = kb * JM_KBLOCK + st * STEP;
    jm_prefetch_chunk(p, src, col);
    __m512 xe[MR_MAX], xo[MR_MAX];
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++) xe[i] = _mm512_loadu_ps(xr[i] + col), xo[i] = _mm512_loadu_ps(xr[i] + col + L);
#pragma GCC unroll 4
    for (int r = 0; r < JM_TILE_ROWS; r++) {
      __m512 we, wo;
      wvec(p, src, dec, col, r, &we, &wo);
#pragma GCC unroll 4
      for (int i = 0; i < MR; i++) blk[r][i] = _mm512_fmadd_ps(wo, xo[i], _mm512_fmadd_ps(we, xe[i], blk[r][i]));
    }
  }
}

/* GEMM panels: the step's even and odd vectors of row r */
AI void decode_step(const uint8_t *p, const int src, const int dec, int col, int r, float *o) {
  __m512 e, od;
  wvec(p, src, dec, col, r, &e, &od);
  _mm512_storeu_ps(o, e);
  _mm512_storeu_ps(o + L, od);
}

#define MR_GEMV 2
#define SHIFT_DECODE(dec) ((dec) == JM_DEC_SHIFT)
#define BF16_DOT 0
#define XT float
#define WD_ELEM sizeof(float)
#define GEMM_KMAJOR 1
#include "tile_driver.h"

TD_TABLE(avx512, JM_ISA_AVX512, JM_DEC_HALF)
TD_TABLE(avx512_shift, JM_ISA_AVX512, JM_DEC_SHIFT)
