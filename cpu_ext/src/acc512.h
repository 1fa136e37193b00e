/* acc512.h -- the f32 accumulator vector of the AVX-512 kernel files (linear_avx512.c,
 * linear_avx512bf16.c) for tile_driver.h: 16 lanes, summed by one fixed pairwise tree. */
#ifndef JM_ACC512_H
#define JM_ACC512_H

static inline __attribute__((always_inline)) float jm_hsum16(__m512 v) { /* pairwise tree */
  float t[16];
  _mm512_storeu_ps(t, v);
  for (int w = 8; w > 0; w /= 2)
    for (int i = 0; i < w; i++) t[i] += t[i + w];
  return t[0];
}

/* The 16 floats at p, lanes from `valid` on zero (0 <= valid). Real AVX-512 skips masked-off
 * lanes; SIMDe's emulation reads all 16 and masks afterwards, so there a partial tail goes
 * through a zeroed copy and nothing past the row is read. */
static inline __attribute__((always_inline)) __m512 jm_load_tail16(const float *p, int valid) {
  if (valid >= 16) return _mm512_loadu_ps(p);
  if (valid <= 0) return _mm512_setzero_ps();
#ifdef JM_SIMDE
  float t[16] = {0};
  memcpy(t, p, (size_t)valid * sizeof(float));
  return _mm512_loadu_ps(t);
#else
  return _mm512_maskz_loadu_ps((__mmask16)((1u << valid) - 1), p);
#endif
}

#define VEC __m512
#define V_ZERO() _mm512_setzero_ps()
#define V_SET1(s) _mm512_set1_ps(s)
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_LOAD(p) _mm512_load_ps(p)
#define V_STORE(p, v) _mm512_store_ps(p, v)
#define V_SUM(v) jm_hsum16(v)
#define ACC_L 16

#endif
