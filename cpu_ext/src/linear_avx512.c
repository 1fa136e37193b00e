/* linear_avx512.c -- AVX-512 BF16 kernels (compiled with -mavx512f -mavx512bw -mavx512bf16).
 *
 * FP8: 32 weight bytes are sign-extended to 16-bit lanes and ((v << 4) & 0x87F0) gives bf16
 * bits equal to value * 2^-120; vdpbf16ps multiplies them with bf16 activations that carry
 * scale * 2^JM_FOLD_EXP (vdpbf16ps flushes bf16 denormals, so the 2^-120 cannot be left in
 * the weights' partner; subnormal FP8 codes decode to bf16 denormals and are flushed: an
 * error below 2^-15 of the block's largest weight). BF16 weights are used as they are.
 *
 * With JM_SIMDE defined the file compiles against SIMDe's portable AVX-512 (tests only:
 * it checks this file's layout and algebra on machines without AVX-512).
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

AI __m512bh as_bh(__m512i v) {
  __m512bh r;
  memcpy(&r, &v, sizeof r);
  return r;
}

AI float hsum16(__m512 v) { /* pairwise tree, once per (row, token) */
  float t[16];
  _mm512_storeu_ps(t, v);
  for (int w = 8; w > 0; w /= 2)
    for (int i = 0; i < w; i++) t[i] += t[i + w];
  return t[0];
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

static void fold_avx512(const jm_matrix *w, int rb, const float *x, int64_t ldx, int m,
                        void *xf_) {
  uint16_t *xf = (uint16_t *)xf_;
  const float f = w->format == JM_FMT_FP8 ? jm_exp2i(JM_FOLD_EXP) : 1.0f;
  for (int i = 0; i < m; i++) {
    const float *xi = x + i * ldx;
    uint16_t *o = xf + (int64_t)i * w->k_pad;
    for (int b = 0; b < w->kb; b++) {
      const __m512 s = _mm512_set1_ps(w->format == JM_FMT_FP8 ? jm_scale_of(w, rb, b) * f : 1.0f);
      for (int j = b * JM_KBLOCK; j < (b + 1) * JM_KBLOCK; j += 16) {
        __m512 v;
        if (j + 16 <= w->k) {
          v = _mm512_loadu_ps(xi + j);
        } else { /* K tail: zero padding */
          float tmp[16] = {0};
          if (j < w->k) memcpy(tmp, xi + j, sizeof(float) * (size_t)(w->k - j));
          v = _mm512_loadu_ps(tmp);
        }
        _mm256_storeu_si256((__m256i *)(o + j), f32_to_bf16_16(_mm512_mul_ps(v, s)));
      }
    }
  }
}

/* One 4-row tile against MR <= 4 tokens. A 32-column step loads the MR activation vectors
 * once and reuses them for the 4 rows (MR + 4*MR*NA + 2 of the 32 zmm registers); NA = 2
 * accumulators per (row, token) when MR == 1 to hide the vdpbf16ps latency. */
AI void tile_kernel(const uint8_t *p, int k_pad, const uint16_t *xf, int64_t xs, const int fp8,
                    const int MR, float unfold, float *y, int64_t ldy, int rows) {
  const int NA = MR == 1 ? 2 : 1;
  __m512 acc[JM_TILE_ROWS][4][2];
#pragma GCC unroll 4
  for (int r = 0; r < JM_TILE_ROWS; r++)
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 2
      for (int a = 0; a < NA; a++) acc[r][i][a] = _mm512_setzero_ps();
  const int cols_per_chunk = fp8 ? JM_SEG : JM_SEG / 2;
  const int nchunks = k_pad / cols_per_chunk;
  const __m512i mask = _mm512_set1_epi16((short)0x87F0);
  for (int c = 0; c < nchunks; c++) {
    const uint8_t *q = p + (int64_t)c * JM_SEG * JM_TILE_ROWS;
#pragma GCC unroll 4
    for (int l = 0; l < JM_TILE_ROWS; l++)
      _mm_prefetch((const char *)q + JM_PF_DIST + l * JM_SEG, _MM_HINT_T0);
    const int steps = cols_per_chunk / 32;
#pragma GCC unroll 2
    for (int s = 0; s < steps; s++) {
      const int col = c * cols_per_chunk + s * 32;
      const int a = NA == 2 ? s : 0; /* fp8: two steps per chunk alternate accumulators */
      __m512bh xb[4];
#pragma GCC unroll 4
      for (int i = 0; i < MR; i++) xb[i] = as_bh(_mm512_loadu_si512((const void *)(xf + i * xs + col)));
#pragma GCC unroll 4
      for (int r = 0; r < JM_TILE_ROWS; r++) {
        __m512i wv;
        if (fp8) {
          const __m256i b = _mm256_loadu_si256((const __m256i *)(q + r * JM_SEG + s * 32));
          wv = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(b), 4), mask);
        } else {
          wv = _mm512_loadu_si512((const void *)(q + r * JM_SEG));
        }
        const __m512bh wb = as_bh(wv);
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) acc[r][i][a] = _mm512_dpbf16_ps(acc[r][i][a], wb, xb[i]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++) {
      const __m512 v = NA == 2 ? _mm512_add_ps(acc[r][i][0], acc[r][i][1]) : acc[r][i][0];
      y[i * ldy + r] = hsum16(v) * unfold;
    }
}

static void tiles_avx512(const jm_matrix *w, int t0, int t1, const void *xf_, int m, float *y,
                         int64_t ldy) {
  const uint16_t *xf = (const uint16_t *)xf_;
  const float unfold = w->format == JM_FMT_FP8 ? jm_exp2i(JM_UNFOLD_EXP) : 1.0f;
  for (int t = t0; t < t1; t++) {
    const uint8_t *p = jm_tile_ptr(w, t);
    int rows = w->n - t * JM_TILE_ROWS;
    rows = rows > JM_TILE_ROWS ? JM_TILE_ROWS : rows;
    float *yt = y + (t - t0) * JM_TILE_ROWS;
    for (int i0 = 0; i0 < m; i0 += 4) {
      const uint16_t *x0 = xf + (int64_t)i0 * w->k_pad;
      float *y0 = yt + i0 * ldy;
      const int mr = m - i0 >= 4 ? 4 : m - i0;
#define K_(F, R) tile_kernel(p, w->k_pad, x0, w->k_pad, F, R, unfold, y0, ldy, rows)
#define BY_MR(F)             \
  switch (mr) {              \
    case 1: K_(F, 1); break; \
    case 2: K_(F, 2); break; \
    case 3: K_(F, 3); break; \
    default: K_(F, 4); break; \
  }
      if (w->format == JM_FMT_FP8) {
        BY_MR(1)
      } else {
        BY_MR(0)
      }
#undef BY_MR
#undef K_
    }
  }
}

const jm_kernels jm_kernels_avx512 = {JM_ISA_AVX512, sizeof(uint16_t), fold_avx512, tiles_avx512};
