/* int4_gemm_avx2.c -- AVX2 kernels of the INT4 GEMM path (compiled with -mavx2 -mfma -mf16c);
 * the driver is int4_gemm.c, the scalar twin int4_gemm_ref.c, the layout int4.h.
 *
 * Panel: each packed 32-byte nibble vector of a row becomes two u8 vectors (and / shift+and),
 * its 8 f16 group scales one f32 vector (vcvtph2ps, exact).
 * Micro-kernel: MR <= 4 tokens x NR <= 3 rows. Per 32-byte step NR weight vectors and one
 * activation vector per token are loaded; MR * NR int16 accumulators take 8 vpmaddubsw each
 * (the bound in int4.h), then vpmaddwd widens them into the int32 group dots (+ corr); per
 * super-block acc = fma(cvt(dot) * s_x, s_w, acc), as the GEMV tile kernel (int4_avx2.c) does.
 */
#include <immintrin.h>

#include "int4.h"

#define AI static inline __attribute__((always_inline))

static void panel_avx2(const jm_matrix *w, int n0, int np, uint8_t *panel) {
  const int G = w->group, V = G / 8, n_sb = jm_int4_n_sb(w);
  const int64_t sbb = jm_int4_sb_bytes(w), prs = jm_int4_panel_row(w);
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int r = 0; r < np; r++) {
    const int row = n0 + r;
    const uint8_t *tile = jm_tile_ptr(w, row / JM_TILE_ROWS);
    const int rr = row % JM_TILE_ROWS;
    uint8_t *o = panel + r * prs;
    float *so = (float *)(o + w->k_pad);
    for (int sb = 0; sb < n_sb; sb++) {
      const uint8_t *src = tile + sb * sbb + (int64_t)rr * 4 * G;
      uint8_t *dst = o + (int64_t)sb * 8 * G;
      for (int v = 0; v < V; v++) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(src + 32 * v));
        _mm256_storeu_si256((__m256i *)(dst + 32 * v), _mm256_and_si256(wv, m4));
        _mm256_storeu_si256((__m256i *)(dst + 32 * (V + v)), _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4));
      }
      const __m128i h = _mm_loadu_si128((const __m128i *)(tile + sb * sbb + 16 * (int64_t)G + 16 * rr));
      _mm256_storeu_ps(so + 8 * sb, _mm256_cvtph_ps(h));
    }
  }
}

/* NV: vectors per super-block when known at compile time (8 for group 32), else 0 */
AI void micro_t(const jm_matrix *w, const uint8_t *p, int64_t prs, const uint8_t *const *xr, const int MR,
                const int NR, const int NV, int sb0, int sb1, float *acc8, int64_t lda) {
  const int G = w->group, nv = NV ? NV : G / 4;
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t *wr[4];
  const float *sw[4];
  const uint8_t *xp[4];
  const float *sx[4];
  const int32_t *cr[4];
  #pragma GCC unroll 4
  for (int r = 0; r < NR; r++) wr[r] = p + r * prs, sw[r] = (const float *)(wr[r] + w->k_pad);
  #pragma GCC unroll 4
  for (int i = 0; i < MR; i++) {
    xp[i] = xr[i];
    sx[i] = jm_int4_sx(w, (uint8_t *)xr[i]);
    cr[i] = jm_int4_corr(w, (uint8_t *)xr[i]);
  }
  __m256 acc[4][4];
  #pragma GCC unroll 4
  for (int i = 0; i < MR; i++)
    #pragma GCC unroll 4
    for (int r = 0; r < NR; r++) acc[i][r] = sb0 ? _mm256_loadu_ps(acc8 + i * lda + 8 * r) : _mm256_setzero_ps();
  for (int sb = sb0; sb < sb1; sb++) {
    const int64_t ob = (int64_t)sb * 8 * G;
    __m256i d[4][4];
    #pragma GCC unroll 4
    for (int i = 0; i < MR; i++) {
      const __m256i cv = _mm256_loadu_si256((const __m256i *)(cr[i] + 8 * sb));
      #pragma GCC unroll 4
      for (int r = 0; r < NR; r++) d[i][r] = cv;
    }
    for (int v0 = 0; v0 < nv; v0 += 8) {
      __m256i a[4][4];
#pragma GCC unroll 8
      for (int v = 0; v < 8; v++) {
        const int64_t o = ob + 32 * (v0 + v);
        __m256i wv[4];
        #pragma GCC unroll 4
        for (int r = 0; r < NR; r++) wv[r] = _mm256_loadu_si256((const __m256i *)(wr[r] + o));
        #pragma GCC unroll 4
        for (int i = 0; i < MR; i++) {
          const __m256i xv = _mm256_loadu_si256((const __m256i *)(xp[i] + o));
          #pragma GCC unroll 4
          for (int r = 0; r < NR; r++) {
            const __m256i pr = _mm256_maddubs_epi16(wv[r], xv);
            a[i][r] = v ? _mm256_add_epi16(a[i][r], pr) : pr;
            __asm__("" : "+x"(a[i][r])); /* keeps the sum a chain: no reassociation into a tree */
          }
        }
      }
      #pragma GCC unroll 4
      for (int i = 0; i < MR; i++)
        #pragma GCC unroll 4
        for (int r = 0; r < NR; r++) d[i][r] = _mm256_add_epi32(d[i][r], _mm256_madd_epi16(a[i][r], ones));
    }
    __m256 swv[4];
    #pragma GCC unroll 4
    for (int r = 0; r < NR; r++) swv[r] = _mm256_loadu_ps(sw[r] + 8 * sb);
    #pragma GCC unroll 4
    for (int i = 0; i < MR; i++) {
      const __m256 sxv = _mm256_loadu_ps(sx[i] + 8 * sb);
      #pragma GCC unroll 4
      for (int r = 0; r < NR; r++)
      {
        acc[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d[i][r]), sxv), swv[r], acc[i][r]);
        /* more pairs than registers: the f32 sums live in memory (one load + store per
         * super-block) so that the int16 sums of the inner loop keep the registers */
        if (MR * NR > 6) __asm__("" : "+m"(acc[i][r]));
      }
    }
  }
  #pragma GCC unroll 4
  for (int i = 0; i < MR; i++)
    #pragma GCC unroll 4
    for (int r = 0; r < NR; r++) _mm256_storeu_ps(acc8 + i * lda + 8 * r, acc[i][r]);
}

_Static_assert(JM_INT4_GEMM_MR <= 4 && JM_INT4_GEMM_NR <= 4, "the switches below go up to 4 x 4");
#define MICRO_NV(MR, NR)                                             \
  do {                                                               \
    if (w->group == 32) micro_t(w, p, prs, xr, MR, NR, 8, sb0, sb1, acc8, lda); \
    else micro_t(w, p, prs, xr, MR, NR, 0, sb0, sb1, acc8, lda);                \
  } while (0)
#define MICRO_MR(NR)                          \
  switch (mr) {                               \
    case 4: MICRO_NV(4, NR); break;           \
    case 3: MICRO_NV(3, NR); break;           \
    case 2: MICRO_NV(2, NR); break;           \
    default: MICRO_NV(1, NR); break;          \
  }

static void micro_avx2(const jm_matrix *w, const uint8_t *p, int64_t prs, int nr, const uint8_t *const *xr, int mr,
                       int sb0, int sb1, float *acc8, int64_t lda) {
  switch (nr) {
    case 4: MICRO_MR(4); break;
    case 3: MICRO_MR(3); break;
    case 2: MICRO_MR(2); break;
    default: MICRO_MR(1); break;
  }
}

const jm_int4_gemm_kernels jm_int4_gemm_avx2 = {JM_ISA_AVX2, jm_int4_fold_avx2, panel_avx2, micro_avx2};
