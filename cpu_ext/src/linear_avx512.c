/* linear_avx512.c -- AVX-512F exact kernels: f32 activations, f32 FMA over 16 lanes
 * (compiled with -mavx512f -mavx512bw -mavx512vl -mf16c; no BF16 needed).
 *
 * FP8, two decodes with the same results (internal.h, jm_fp8_decode):
 *   half   16 weight bytes are sign-extended to 16-bit lanes; ((v << 7) & 0xBF80) are the IEEE
 *          half bits of value * 2^-8 (sign, the 4 exponent bits under a zero top bit, 3
 *          mantissa bits; subnormal codes become half subnormals), and vcvtph2ps turns them
 *          into f32 exactly: every code is a normal f32, no FMA ever reads a denormal (Intel
 *          CPUs take microcode assists on denormal operands). x is used as it is, block scales
 *          times 2^8.
 *   shift  16 bytes sign-extended to 32-bit lanes; ((v << 20) & 0x87F00000) are the f32 bits
 *          of value * 2^-120 (subnormal codes become f32 denormals: full speed on AMD, where
 *          vcvtph2ps zmm is slow). x carries 2^JM_FOLD_EXP, block scales 2^(120 - FOLD).
 * Both sum the same products in the same order, scaled by exact powers of two.
 * The block scale multiplies each 128-column block sum (the canonical sum of internal.h).
 * BF16 weights: (u16 << 16). The GEMM path's decoded tiles hold these f32 vectors in the
 * order the kernel reads them: [k_pad / 16 steps][4 rows][16].
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

#define AI static inline __attribute__((always_inline))
#ifdef JM_SIMDE /* SIMDe has no vpmovsxbd zmm */
#define cvt_i8_i32(a) _mm512_cvtepi16_epi32(_mm256_cvtepi8_epi16(a))
#else
#define cvt_i8_i32(a) _mm512_cvtepi8_epi32(a)
#endif
#define L 16    /* lanes */
#define MR_MAX 6 /* tokens per kernel call */

enum { SRC_FP8, SRC_BF16, SRC_DEC }; /* where the kernel's weight vectors come from */
enum { DEC_HALF, DEC_SHIFT };         /* the FP8 decode */

AI __m512 fp8x16(const uint8_t *p, const int dec) {
  if (dec == DEC_SHIFT) {
    const __m512i v = cvt_i8_i32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(v, 20), _mm512_set1_epi32((int)0x87F00000u)));
  }
  const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
  return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(v, 7), _mm256_set1_epi16((short)0xBF80)));
}

AI __m512 bf16x16(const uint8_t *p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* the weight vector of row r, columns [col, col + 16) */
AI __m512 wvec(const uint8_t *p, const int src, const int dec, int col, int r) {
  if (src == SRC_FP8) return fp8x16(p + (int64_t)(col / JM_SEG) * JM_SEG * JM_TILE_ROWS + r * JM_SEG + col % JM_SEG, dec);
  if (src == SRC_BF16)
    return bf16x16(p + (int64_t)(col / (JM_SEG / 2)) * JM_SEG * JM_TILE_ROWS + r * JM_SEG + 2 * (col % (JM_SEG / 2)));
  return _mm512_loadu_ps((const float *)p + (int64_t)(col / L) * L * JM_TILE_ROWS + r * L);
}

AI float hsum16(__m512 v) { /* pairwise tree */
  float t[16];
  _mm512_storeu_ps(t, v);
  for (int w = 8; w > 0; w /= 2)
    for (int i = 0; i < w; i++) t[i] += t[i + w];
  return t[0];
}

AI void fold(const jm_matrix *w, const float *x, int64_t ldx, int m, float *xf, const int dec) {
  const __m512 f = _mm512_set1_ps(dec == DEC_SHIFT && w->format == JM_FMT_FP8 ? 0x1p56f : 1.0f);
  for (int i = 0; i < m; i++) {
    const float *xi = x + i * ldx;
    float *o = xf + (int64_t)i * w->k_pad;
    for (int j = 0; j < w->k_pad; j += L) { /* zero past k */
      const __mmask16 mk = j + L <= w->k ? (__mmask16)0xFFFF : (j < w->k ? (__mmask16)((1u << (w->k - j)) - 1) : 0);
      _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xi + j), f));
    }
  }
}

/* The block sums of one 128-column block kb of a 4-row tile against tokens xr[0..MR): the x
 * vectors of a step loaded once for the 4 rows (tile_driver.h adds them into the sums). */
AI void block_sums(const uint8_t *p, const int src, const int dec, int kb, const float *const *xr, const int MR,
                   __m512 blk[JM_TILE_ROWS][MR_MAX]) {
#pragma GCC unroll 4
  for (int r = 0; r < JM_TILE_ROWS; r++)
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) blk[r][i] = _mm512_setzero_ps();
  const int pf = src == SRC_FP8 ? JM_SEG : (src == SRC_BF16 ? JM_SEG / 2 : 0); /* columns per 256-byte chunk */
#pragma GCC unroll 2
  for (int st = 0; st < JM_KBLOCK / L; st++) {
    const int col = kb * JM_KBLOCK + st * L;
    if (pf && col % pf == 0) {
      const uint8_t *q = p + (int64_t)(col / pf) * JM_SEG * JM_TILE_ROWS;
#pragma GCC unroll 4
      for (int l = 0; l < JM_TILE_ROWS; l++) _mm_prefetch((const char *)q + JM_PF_DIST + l * JM_SEG, _MM_HINT_T0);
    }
    __m512 xv[MR_MAX];
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) xv[i] = _mm512_loadu_ps(xr[i] + col);
#pragma GCC unroll 4
    for (int r = 0; r < JM_TILE_ROWS; r++) {
      const __m512 wv = wvec(p, src, dec, col, r);
#pragma GCC unroll 6
      for (int i = 0; i < MR; i++) blk[r][i] = _mm512_fmadd_ps(wv, xv[i], blk[r][i]);
    }
  }
}

/* the block scale of tile t's rows in column block kb, with the decode's power of two */
AI float block_scale(const jm_matrix *w, int t, int kb, const int dec) {
  if (w->format != JM_FMT_FP8) return 1.0f;
  return jm_scale_of(w, t * JM_TILE_ROWS / JM_KBLOCK, kb) * (dec == DEC_SHIFT ? 0x1p64f : 0x1p8f);
}

#define VEC __m512
#define V_ZERO() _mm512_setzero_ps()
#define V_SET1(s) _mm512_set1_ps(s)
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_LOAD(p) _mm512_load_ps(p)
#define V_STORE(p, v) _mm512_store_ps(p, v)
#define V_SUM(v) hsum16(v)
#define ACC_L L
#define MR_GEMV 3
#define XT float
#define WD_ELEM sizeof(float)
#define GEMM_KMAJOR 1
#include "tile_driver.h"

AI void decode(const jm_matrix *w, int t0, int t1, void *wd, const int dec) {
  float *o = (float *)wd;
  for (int t = t0; t < t1; t++) {
    const uint8_t *p = jm_tile_ptr(w, t);
    for (int col = 0; col < w->k_pad; col += L)
      for (int r = 0; r < JM_TILE_ROWS; r++, o += L)
        _mm512_storeu_ps(o, w->format == JM_FMT_FP8 ? wvec(p, SRC_FP8, dec, col, r) : wvec(p, SRC_BF16, dec, col, r));
  }
}

TD_TABLE(avx512, JM_ISA_AVX512, DEC_HALF)
TD_TABLE(avx512_shift, JM_ISA_AVX512, DEC_SHIFT)
