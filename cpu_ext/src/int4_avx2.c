/* int4_avx2.c -- INT4 x int8 kernels with AVX2 (compiled with -mavx2 -mfma -mf16c).
 *
 * Per row and super-block (8 groups, int4.h): each 32-byte vector of nibbles splits into
 * low and high nibbles (u in [0, 15]); vpmaddubsw with the matching int8 activations and
 * int16 adds over 4 vectors (8 products of <= 15 * 127 per lane: <= 30480, no saturation),
 * then vpmaddwd with ones gives one int32 per group lane; plus corr (-8 sum qx) that is the
 * exact dot(q_w, q_x) of the 8 groups. In f32: acc += cvt(dot) * s_x * s_w (vcvtph2ps).
 * Up to 4 tokens share each decoded weight vector.
 */
#include <immintrin.h>
#include <string.h>

#include "int4.h"

#define AI static inline __attribute__((always_inline))

AI float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AI int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

AI float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* vectorized twin of jm_int4_quant_group_ref (bit-identical results) */
static float quant_group(const float *x, int valid, int G, int8_t *q, int32_t *sum) {
  float tmp[256];
  const float *src = x;
  if (valid < G) {
    memset(tmp, 0, sizeof(float) * (size_t)G);
    memcpy(tmp, x, sizeof(float) * (size_t)valid);
    src = tmp;
  }
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  for (int j = 0; j < G; j += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(src + j), absm));
  const float amax = hmax8(mx);
  const __m256 inv = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
  __m256i s = _mm256_setzero_si256();
  int32_t qi[256];
  for (int j = 0; j < G; j += 8) {
    const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + j), inv));
    s = _mm256_add_epi32(s, v);
    _mm256_storeu_si256((__m256i *)(qi + j), v);
  }
  for (int j = 0; j < G; j++) q[j] = (int8_t)qi[j];
  *sum = hsum8i(s);
  return amax / 127.0f;
}

void jm_int4_fold_avx2(const jm_matrix *w, int rb, const float *x, int64_t ldx, int m, void *xf) {
  jm_int4_fold_with(quant_group, w, x, ldx, m, xf);
}

/* one tile (4 rows) against MR <= 4 tokens whose folded activations are xf + i*xs */
AI void tile_kernel(const jm_matrix *w, const uint8_t *p, const uint8_t *xf, int64_t xs, const int MR, float *y,
                    int64_t ldy, int rows) {
  const int G = w->group, V = G / 8, n_sb = jm_int4_n_sb(w);
  const int64_t sbb = jm_int4_sb_bytes(w);
  const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
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
      __m256i d[4];
      for (int i = 0; i < MR; i++) d[i] = corr[i];
      for (int v0 = 0; v0 < V; v0 += 4) {
        __m256i a16[4];
        for (int i = 0; i < MR; i++) a16[i] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int v = v0; v < v0 + 4; v++) {
          const __m256i wv = _mm256_loadu_si256((const __m256i *)(nib + 32 * v));
          const __m256i lo = _mm256_and_si256(wv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
          for (int i = 0; i < MR; i++) {
            const __m256i xl = _mm256_loadu_si256((const __m256i *)(xlo + i * xs + 32 * v));
            const __m256i xh = _mm256_loadu_si256((const __m256i *)(xhi + i * xs + 32 * v));
            a16[i] = _mm256_add_epi16(a16[i], _mm256_maddubs_epi16(lo, xl));
            a16[i] = _mm256_add_epi16(a16[i], _mm256_maddubs_epi16(hi, xh));
          }
        }
        for (int i = 0; i < MR; i++) d[i] = _mm256_add_epi32(d[i], _mm256_madd_epi16(a16[i], ones));
      }
      const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + 16 * (int64_t)G + 16 * r)));
      for (int i = 0; i < MR; i++)
        acc[r][i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d[i]), sxv[i]), sw, acc[r][i]);
    }
  }
  for (int r = 0; r < rows; r++)
    for (int i = 0; i < MR; i++) y[i * ldy + r] = hsum8(acc[r][i]);
}

static void tiles_avx2(const jm_matrix *w, int t0, int t1, const void *xf_, int m, float *y, int64_t ldy) {
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
        case 1: tile_kernel(w, p, x0, xs, 1, y0, ldy, rows); break;
        case 2: tile_kernel(w, p, x0, xs, 2, y0, ldy, rows); break;
        case 3: tile_kernel(w, p, x0, xs, 3, y0, ldy, rows); break;
        default: tile_kernel(w, p, x0, xs, 4, y0, ldy, rows); break;
      }
    }
  }
}

const jm_kernels jm_int4_kernels_avx2 = {.isa = JM_ISA_AVX2, .xf_elem = JM_INT4_XF_ELEM, .fold = jm_int4_fold_avx2, .tiles = tiles_avx2};
