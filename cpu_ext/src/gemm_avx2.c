/* gemm_avx2.c -- AVX2/FMA kernels of the GEMM path (compiled with -mavx2 -mfma -mf16c); the
 * scalar twin is gemm_ref.c, the driver gemm.c.
 *
 * Panel: 8 rows x 8 columns at a time. Each row's 8 FP8 bytes are sign-extended to 32-bit
 * lanes (vpmovsxbd); (v << 20) & 0x87F00000 are the f32 bits of value * 2^-120 (sign from the
 * sign extension, subnormal codes become exact f32 denormals: the pool runs without FTZ/DAZ),
 * times scale * 2^120 (one rounding, the same product as the scalar twin's); an 8x8 transpose turns the 8 row
 * vectors into 8 k-vectors of the k-major panel. BF16 rows: (u16 << 16).
 * Micro-kernel: MR <= 6 tokens x 16 rows, 12 ymm accumulators, per k two panel loads and one
 * broadcast per token (the classic outer-product form; the x rows are read in place).
 */
#include <immintrin.h>
#include <string.h>

#include "internal.h"

#define AI static inline __attribute__((always_inline))

AI void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

static void panel_avx2(const jm_matrix *w, int n0, int np, int kb, float *panel) {
  const int fp8 = w->format == JM_FMT_FP8;
  /* value * scale = (value * 2^-120) * (scale * 2^120) with one rounding while scale * 2^120 is
   * finite (|scale| < 2^8: every real checkpoint); else in two steps, the first exact */
  const float sc = fp8 ? jm_scale_of(w, n0 / JM_KBLOCK, kb) : 1.0f;
  const int one_mul = sc < 256.0f && sc > -256.0f;
  const __m256 s = _mm256_set1_ps(one_mul ? sc * 0x1p120f : sc);
  const __m256 up = _mm256_set1_ps(one_mul ? 1.0f : 0x1p120f);
  const __m256i mask = _mm256_set1_epi32((int)0x87F00000u);
  const int rows = (np + JM_GEMM_NR - 1) / JM_GEMM_NR * JM_GEMM_NR;
  const int per = fp8 ? JM_SEG : JM_SEG / 2; /* columns per 64-byte segment */
  for (int r8 = 0; r8 < rows; r8 += 8) {
    const uint8_t *rp[8];
    for (int j = 0; j < 8; j++) {
      const int row = n0 + r8 + j;
      rp[j] = r8 + j < np && row < w->n ? jm_tile_ptr(w, row / JM_TILE_ROWS) + (row % JM_TILE_ROWS) * JM_SEG : NULL;
    }
    float *o = panel + (r8 / JM_GEMM_NR) * JM_KBLOCK * JM_GEMM_NR + r8 % JM_GEMM_NR;
    for (int k = 0; k < JM_KBLOCK; k += 8) {
      const int col = kb * JM_KBLOCK + k;
      const int64_t off = (int64_t)(col / per) * JM_SEG * JM_TILE_ROWS + (col % per) * (fp8 ? 1 : 2);
      __m256 v[8];
#pragma GCC unroll 8
      for (int j = 0; j < 8; j++) {
        if (!rp[j]) {
          v[j] = _mm256_setzero_ps();
        } else if (fp8) {
          const __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(rp[j] + off)));
          const __m256 d = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b, 20), mask));
          v[j] = one_mul ? _mm256_mul_ps(d, s) : _mm256_mul_ps(_mm256_mul_ps(d, up), s);
        } else {
          const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(rp[j] + off)));
          v[j] = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
        }
      }
      transpose8(v);
#pragma GCC unroll 8
      for (int j = 0; j < 8; j++) _mm256_storeu_ps(o + (k + j) * JM_GEMM_NR, v[j]);
    }
  }
}

AI void micro_mr(const float *const *xr, const int MR, int kk, const float *sub, float *c, int64_t ldc, int nc,
                 int accumulate) {
  __m256 acc[JM_GEMM_MR][2];
  const float *x[JM_GEMM_MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps(), x[i] = xr[i];
#pragma GCC unroll 2
  for (int k = 0; k < kk; k++) {
    const __m256 w0 = _mm256_loadu_ps(sub + k * JM_GEMM_NR), w1 = _mm256_loadu_ps(sub + k * JM_GEMM_NR + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
      const __m256 b = _mm256_broadcast_ss(x[i] + k);
      acc[i][0] = _mm256_fmadd_ps(b, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(b, w1, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; i++) {
    float *ci = c + i * ldc;
    if (nc == JM_GEMM_NR) {
      if (accumulate) {
        acc[i][0] = _mm256_add_ps(_mm256_loadu_ps(ci), acc[i][0]);
        acc[i][1] = _mm256_add_ps(_mm256_loadu_ps(ci + 8), acc[i][1]);
      }
      _mm256_storeu_ps(ci, acc[i][0]);
      _mm256_storeu_ps(ci + 8, acc[i][1]);
    } else {
      float t[JM_GEMM_NR];
      _mm256_storeu_ps(t, acc[i][0]);
      _mm256_storeu_ps(t + 8, acc[i][1]);
      for (int j = 0; j < nc; j++) ci[j] = accumulate ? ci[j] + t[j] : t[j];
    }
  }
}

static void micro_avx2(const float *const *xr, int mr, int kk, const float *sub, float *c, int64_t ldc, int nc,
                       int accumulate) {
  switch (mr) {
    case 6: micro_mr(xr, 6, kk, sub, c, ldc, nc, accumulate); break;
    case 5: micro_mr(xr, 5, kk, sub, c, ldc, nc, accumulate); break;
    case 4: micro_mr(xr, 4, kk, sub, c, ldc, nc, accumulate); break;
    case 3: micro_mr(xr, 3, kk, sub, c, ldc, nc, accumulate); break;
    case 2: micro_mr(xr, 2, kk, sub, c, ldc, nc, accumulate); break;
    default: micro_mr(xr, 1, kk, sub, c, ldc, nc, accumulate); break;
  }
}

const jm_gemm_kernels jm_gemm_avx2 = {JM_ISA_AVX2, panel_avx2, micro_avx2};
