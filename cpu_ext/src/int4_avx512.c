/* int4_avx512.c -- INT4 x int8 kernels with AVX-512 VNNI (vpdpbusd), selected at run time
 * (int4.c) where the CPU has AVX512_VNNI besides the AVX-512 path's features.
 *
 * Per row and super-block (int4.h): 64 bytes = two 32-byte nibble vectors v, v+1; low and
 * high nibbles (u8) against the int8 activations with vpdpbusd, which sums 4 products per
 * 32-bit lane: lane l of either 256-bit half is group l. The halves are added, corr
 * (-8 sum qx) makes it dot(q_w, q_x), and acc += cvt(dot) * s_x * s_w as on AVX2.
 * Activations are quantized by the AVX2 fold (identical int8 values on every path).
 *
 * With JM_SIMDE defined the file compiles against SIMDe's portable AVX-512 (the emu512 test
 * build): it checks this file's layout and algebra on machines without AVX-512.
 */
#ifdef JM_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define JM_TARGET
const int jm_int4_avx512_emulated = 1;
#else
#include <immintrin.h>
#define JM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
const int jm_int4_avx512_emulated = 0;
#endif

#include "int4.h"

#define AI static inline __attribute__((always_inline)) JM_TARGET

AI float hsum8_512(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AI void tile_kernel512(const jm_matrix *w, const uint8_t *p, const uint8_t *xf, int64_t xs, const int MR, float *y,
                       int64_t ldy, int rows) {
  const int G = w->group, V = G / 8, n_sb = jm_int4_n_sb(w);
  const int64_t sbb = jm_int4_sb_bytes(w);
  const __m512i m4 = _mm512_set1_epi8(15);
  __m256 acc[JM_TILE_ROWS][4];
  for (int r = 0; r < JM_TILE_ROWS; r++)
    for (int i = 0; i < MR; i++) acc[r][i] = _mm256_setzero_ps();
  for (int sb = 0; sb < n_sb; sb++) {
    const uint8_t *q = p + sb * sbb;
    for (int64_t o = 0; o < sbb; o += 64) _mm_prefetch((const char *)q + JM_PF_DIST + o, _MM_HINT_T0);
    __m256 sxv[4];
    __m256i corr[4];
    for (int i = 0; i < MR; i++) {
      uint8_t *tok = (uint8_t *)xf + i * xs;
      sxv[i] = _mm256_loadu_ps(jm_int4_sx(w, tok) + sb * 8);
      corr[i] = _mm256_loadu_si256((const __m256i *)(jm_int4_corr(w, tok) + sb * 8));
    }
    const int8_t *xlo = (const int8_t *)xf + (int64_t)sb * 8 * G, *xhi = xlo + 4 * G;
#pragma GCC unroll 4
    for (int r = 0; r < JM_TILE_ROWS; r++) {
      const uint8_t *nib = q + (int64_t)r * 4 * G;
      __m512i d[4];
      for (int i = 0; i < MR; i++) d[i] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int v = 0; v < V; v += 2) {
        const __m512i wv = _mm512_loadu_si512((const void *)(nib + 32 * v));
        const __m512i lo = _mm512_and_si512(wv, m4), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
        for (int i = 0; i < MR; i++) {
          d[i] = _mm512_dpbusd_epi32(d[i], lo, _mm512_loadu_si512((const void *)(xlo + i * xs + 32 * v)));
          d[i] = _mm512_dpbusd_epi32(d[i], hi, _mm512_loadu_si512((const void *)(xhi + i * xs + 32 * v)));
        }
      }
      const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + 16 * (int64_t)G + 16 * r)));
      for (int i = 0; i < MR; i++) {
        const __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(d[i]), _mm512_extracti64x4_epi64(d[i], 1));
        const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(s, corr[i]));
        acc[r][i] = _mm256_fmadd_ps(_mm256_mul_ps(f, sxv[i]), sw, acc[r][i]);
      }
    }
  }
  for (int r = 0; r < rows; r++)
    for (int i = 0; i < MR; i++) y[i * ldy + r] = hsum8_512(acc[r][i]);
}

JM_TARGET static void tiles_avx512(const jm_matrix *w, int t0, int t1, const void *xf_, int m, float *y,
                                   int64_t ldy) {
  const uint8_t *xf = (const uint8_t *)xf_;
  const int64_t xs = jm_int4_xf_stride(w);
  for (int t = t0; t < t1; t++) {
    const uint8_t *p = jm_tile_ptr(w, t);
    int rows = w->n - t * JM_TILE_ROWS;
    rows = rows > JM_TILE_ROWS ? JM_TILE_ROWS : rows;
    float *yt = y + (t - t0) * JM_TILE_ROWS;
    for (int i0 = 0; i0 < m; i0 += 4) {
      const uint8_t *x0 = xf + i0 * xs;
      float *y0 = yt + i0 * ldy;
      switch (m - i0) {
        case 1: tile_kernel512(w, p, x0, xs, 1, y0, ldy, rows); break;
        case 2: tile_kernel512(w, p, x0, xs, 2, y0, ldy, rows); break;
        case 3: tile_kernel512(w, p, x0, xs, 3, y0, ldy, rows); break;
        default: tile_kernel512(w, p, x0, xs, 4, y0, ldy, rows); break;
      }
    }
  }
}

const jm_kernels jm_int4_kernels_avx512 = {.isa = JM_ISA_AVX512, .xf_elem = JM_INT4_XF_ELEM, .fold = jm_int4_fold_avx2, .tiles = tiles_avx512};
