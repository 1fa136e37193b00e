/* linear_avx2.c -- AVX2/FMA/F16C kernels (compiled with -mavx2 -mfma -mf16c).
 *
 * FP8: 16 weight bytes are sign-extended to 16-bit lanes (vpmovsxbw); each 32-bit lane then
 * holds bytes (2j, 2j+1), and one shift + one mask per half gives f32 bits equal to
 * value * 2^-120 for the even and the odd bytes:
 *   even: (v << 20) & 0x87F00000     odd: (v << 4) & 0x87F00000
 * (the sign-extension puts the sign at bit 31 in both). The folded activations are stored
 * de-interleaved per 16 columns (8 even, then 8 odd) to match. Subnormal codes become f32
 * denormals and are exact: the pool runs with MXCSR's FTZ/DAZ off.
 * BF16: a 32-bit lane holds two bf16; even = v << 16, odd = v & 0xFFFF0000.
 */
#include <immintrin.h>
#include <string.h>

#include "internal.h"

#define AI static inline __attribute__((always_inline))

/* x[0..16) -> [x0 x2 .. x14 | x1 x3 .. x15] * s */
AI void deinterleave16(const float *x, float s, float *o) {
  const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(x), _mm256_set1_ps(s));
  const __m256 b = _mm256_mul_ps(_mm256_loadu_ps(x + 8), _mm256_set1_ps(s));
  const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 d = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
  _mm256_storeu_ps(o, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8)));
  _mm256_storeu_ps(o + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(d), 0xD8)));
}

static void fold_avx2(const jm_matrix *w, int rb, const float *x, int64_t ldx, int m, void *xf_) {
  float *xf = (float *)xf_;
  const float f = w->format == JM_FMT_FP8 ? jm_exp2i(JM_FOLD_EXP) : 1.0f;
  for (int i = 0; i < m; i++) {
    const float *xi = x + i * ldx;
    float *o = xf + (int64_t)i * w->k_pad;
    for (int b = 0; b < w->kb; b++) {
      const float s = w->format == JM_FMT_FP8 ? jm_scale_of(w, rb, b) * f : 1.0f;
      for (int j = b * JM_KBLOCK; j < (b + 1) * JM_KBLOCK; j += 16) {
        if (j + 16 <= w->k) {
          deinterleave16(xi + j, s, o + j);
        } else {
          float tmp[16] = {0};
          if (j < w->k) memcpy(tmp, xi + j, sizeof(float) * (size_t)(w->k - j));
          deinterleave16(tmp, s, o + j);
        }
      }
    }
  }
}

AI float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AI void prefetch_chunk(const uint8_t *q) {
  for (int l = 0; l < JM_TILE_ROWS; l++)
    _mm_prefetch((const char *)q + JM_PF_DIST + l * JM_SEG, _MM_HINT_T0);
}

/* One 4-row tile against MR <= 2 tokens. The activations of a 16-column step are loaded
 * once into registers and reused by the 4 rows (2*MR + 4*MR*NA + 2 of the 16 ymm registers);
 * NA = 2 accumulators per (row, token) when MR == 1, so the FMA chains hide their latency. */
AI void tile_kernel(const uint8_t *p, int k_pad, const float *xf, int64_t xs, const int fp8,
                    const int MR, float unfold, float *y, int64_t ldy, int rows) {
  const int NA = MR == 1 ? 2 : 1;
  __m256 acc[JM_TILE_ROWS][2][2];
#pragma GCC unroll 4
  for (int r = 0; r < JM_TILE_ROWS; r++)
#pragma GCC unroll 2
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 2
      for (int a = 0; a < NA; a++) acc[r][i][a] = _mm256_setzero_ps();
  const int cols_per_chunk = fp8 ? JM_SEG : JM_SEG / 2;
  const int nchunks = k_pad / cols_per_chunk;
  const __m256i mask = _mm256_set1_epi32((int)0x87F00000u);
  const __m256i hi16 = _mm256_set1_epi32((int)0xFFFF0000u);
  for (int c = 0; c < nchunks; c++) {
    const uint8_t *q = p + (int64_t)c * JM_SEG * JM_TILE_ROWS;
    prefetch_chunk(q);
    const int steps = cols_per_chunk / 16;
#pragma GCC unroll 4
    for (int s = 0; s < steps; s++) {
      const int col = c * cols_per_chunk + s * 16;
      __m256 xe[2], xo[2];
#pragma GCC unroll 2
      for (int i = 0; i < MR; i++) {
        xe[i] = _mm256_loadu_ps(xf + i * xs + col);
        xo[i] = _mm256_loadu_ps(xf + i * xs + col + 8);
      }
#pragma GCC unroll 4
      for (int r = 0; r < JM_TILE_ROWS; r++) {
        __m256 we, wo;
        if (fp8) {
          const __m256i v =
              _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + r * JM_SEG + s * 16)));
          we = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 20), mask));
          wo = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 4), mask));
        } else {
          const __m256i v = _mm256_loadu_si256((const __m256i *)(q + r * JM_SEG + s * 32));
          we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
          wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi16));
        }
#pragma GCC unroll 2
        for (int i = 0; i < MR; i++) {
          acc[r][i][0] = _mm256_fmadd_ps(we, xe[i], acc[r][i][0]);
          acc[r][i][NA - 1] = _mm256_fmadd_ps(wo, xo[i], acc[r][i][NA - 1]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < rows; r++)
#pragma GCC unroll 2
    for (int i = 0; i < MR; i++) {
      const __m256 a = NA == 2 ? _mm256_add_ps(acc[r][i][0], acc[r][i][1]) : acc[r][i][0];
      y[i * ldy + r] = hsum8(a) * unfold;
    }
}

static void tiles_avx2(const jm_matrix *w, int t0, int t1, const void *xf_, int m, float *y,
                       int64_t ldy) {
  const float *xf = (const float *)xf_;
  const float unfold = w->format == JM_FMT_FP8 ? jm_exp2i(JM_UNFOLD_EXP) : 1.0f;
  for (int t = t0; t < t1; t++) {
    const uint8_t *p = jm_tile_ptr(w, t);
    int rows = w->n - t * JM_TILE_ROWS;
    rows = rows > JM_TILE_ROWS ? JM_TILE_ROWS : rows;
    float *yt = y + (t - t0) * JM_TILE_ROWS;
    for (int i0 = 0; i0 < m; i0 += 2) {
      const float *x0 = xf + (int64_t)i0 * w->k_pad;
      float *y0 = yt + i0 * ldy;
#define K_(F, R) tile_kernel(p, w->k_pad, x0, w->k_pad, F, R, unfold, y0, ldy, rows)
      if (w->format == JM_FMT_FP8) {
        if (m - i0 == 1) K_(1, 1); else K_(1, 2);
      } else {
        if (m - i0 == 1) K_(0, 1); else K_(0, 2);
      }
#undef K_
    }
  }
}

const jm_kernels jm_kernels_avx2 = {JM_ISA_AVX2, sizeof(float), fold_avx2, tiles_avx2};
