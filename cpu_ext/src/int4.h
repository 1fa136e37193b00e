/* int4.h -- the INT4 streaming layout, shared by int4*.c (not part of the ABI).
 *
 * A super-block is 8 groups (8 * G columns). Tile t (4 rows) holds, per super-block sb:
 *   rows 0..3: 4G bytes of nibbles each, then 4 x 16 bytes: the row's 8 f16 group scales
 * so one tile is one sequential stream of n_sb * (16G + 64) bytes. Inside a row's nibbles,
 * 32-byte vector v (0 <= v < G/8), byte p: lane l = p/4 (= group l of the super-block),
 * j = p%4; the low nibble is column l*G + 8v + j, the high nibble column l*G + 8v + 4 + j
 * (values stored as u = q + 8). So a vpmaddubsw/vpmaddwd (AVX2) or vpdpbusd (AVX-512 VNNI)
 * accumulates each group in its own 32-bit lane, and one vcvtph2ps gives the 8 scales.
 *
 * Folded activations of one token (JM_INT4_XF_ELEM * k_pad bytes): per super-block the 8G
 * int8 values permuted to match (G/8 "low" vectors, then G/8 "high" vectors of 32 bytes);
 * after k_pad bytes, sx[k_pad/G] (f32, amax/127 of the group) and corr[k_pad/G] (int32,
 * -8 * sum of the group's int8 values, which turns dot(u, qx) into dot(q, qx)).
 */
#ifndef JM_INT4_H
#define JM_INT4_H

#include "internal.h"

/* IEEE half -> float, exact (as vcvtph2ps for finite values): the scalar paths' scales */
static inline float jm_f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 0x3ff;
  union { uint32_t u; float f; } v;
  if (e == 0) { /* zero / subnormal: m * 2^-24 */
    const float f = (float)m * (1.0f / 16777216.0f);
    v.f = f;
    v.u |= sign;
  } else if (e == 31) {
    v.u = sign | 0x7f800000u | (m << 13);
  } else {
    v.u = sign | ((e + 112) << 23) | (m << 13);
  }
  return v.f;
}

#define JM_INT4_XF_ELEM 2 /* folded bytes per padded column (int8 + room for sx/corr) */

static inline int jm_int4_n_sb(const jm_matrix *w) { return w->k_pad / (8 * w->group); }
static inline int64_t jm_int4_sb_bytes(const jm_matrix *w) { return 16 * (int64_t)w->group + 64; }
static inline int64_t jm_int4_xf_stride(const jm_matrix *w) { return (int64_t)JM_INT4_XF_ELEM * w->k_pad; }
static inline float *jm_int4_sx(const jm_matrix *w, uint8_t *xf_tok) { return (float *)(xf_tok + w->k_pad); }
static inline int32_t *jm_int4_corr(const jm_matrix *w, uint8_t *xf_tok) {
  return (int32_t *)(xf_tok + w->k_pad + 4 * (w->k_pad / w->group));
}

/* Quantizes one group of g floats (g = w->group, zero past `valid`) into q[g] int8 in column
 * order; returns sx = amax/127 and *sum = sum of q. Identical results on every path: amax is
 * exact, q = rint(x * (127 / amax)) in f32 under round-to-nearest-even. */
float jm_int4_quant_group_ref(const float *x, int valid, int g, int8_t *q, int32_t *sum);
/* writes the G int8 of group l of super-block sb into their permuted places */
void jm_int4_place_group(const jm_matrix *w, uint8_t *xf_tok, int group_index, const int8_t *q);

typedef float (*jm_int4_quant_fn)(const float *x, int valid, int g, int8_t *q, int32_t *sum);
void jm_int4_fold_with(jm_int4_quant_fn quant, const jm_matrix *w, const float *x, int64_t ldx, int m, void *xf);
void jm_int4_fold_ref(const jm_matrix *w, int rb, const float *x, int64_t ldx, int m, void *xf);
void jm_int4_fold_avx2(const jm_matrix *w, int rb, const float *x, int64_t ldx, int m, void *xf);

extern const jm_kernels jm_int4_kernels_scalar;
extern const jm_kernels jm_int4_kernels_avx2;
extern const jm_kernels jm_int4_kernels_avx512;
extern const int jm_int4_avx512_emulated; /* 1 in the SIMDe test build */

/* ---- the GEMM path (int4_gemm*.c): many tokens against one INT4 weight ------------------
 * A panel of up to JM_INT4_GEMM_NP rows is unpacked once per call: per row, k_pad u8 codes in
 * the fold's order (per super-block 2V vectors of 32 bytes: the low nibbles of packed vectors
 * 0..V-1, then their high nibbles, V = G/8), then k_pad/G f32 scales (from f16, exact). An
 * MR-token x NR-row micro-kernel runs the folded activations of every token against it: per
 * super-block, 8 vpmaddubsw are summed in int16 (|pair| <= 2*15*127 = 3810, 8 * 3810 = 30480
 * < 2^15: no saturation), widened by vpmaddwd, plus corr: the exact group dots; then per group
 * lane acc = fma(cvt(dot) * s_x, s_w, acc) over the super-blocks in order and one 8-lane sum:
 * the same f32 operations as the AVX2 GEMV tile kernel, so both paths give identical results;
 * the scalar twin replays them lane by lane (fmaf), identical too. */
#define JM_INT4_GEMM_NP 18 /* rows per unpacked panel (a multiple of NR) */
#ifndef JM_INT4_GEMM_MR
#define JM_INT4_GEMM_MR 4 /* tokens per micro-kernel call (<= 4) */
#endif
#ifndef JM_INT4_GEMM_NR
#define JM_INT4_GEMM_NR 3 /* rows per micro-kernel call (<= 4) */
#endif
static inline int64_t jm_int4_panel_row(const jm_matrix *w) { return w->k_pad + 4 * (int64_t)(w->k_pad / w->group); }
typedef struct {
  int isa;
  jm_fold_fn fold; /* rows over the pool: jm_fold_rows with row bytes jm_int4_xf_stride */
  /* rows [n0, n0 + np) of w (np <= JM_INT4_GEMM_NP, n0 + np <= n) unpacked at panel + r * row */
  void (*panel)(const jm_matrix *w, int n0, int np, uint8_t *panel);
  /* for rows r < nr <= NR (at p + r * prs) and tokens i < mr <= MR (folded at xr[i]): adds super-
   * blocks [sb0, sb1) in order into the 8 group-lane f32 sums acc8[i*lda + 8r + l] (zeroed first
   * when sb0 == 0); y = ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)) once all are in */
  void (*micro)(const jm_matrix *w, const uint8_t *p, int64_t prs, int nr, const uint8_t *const *xr, int mr,
                int sb0, int sb1, float *acc8, int64_t lda);
} jm_int4_gemm_kernels;
extern const jm_int4_gemm_kernels jm_int4_gemm_scalar;
extern const jm_int4_gemm_kernels jm_int4_gemm_avx2;
const jm_int4_gemm_kernels *jm_int4_gemm_current(void); /* AVX2 unless the scalar path is selected */
int jm_int4_gemm_enabled(void); /* 0 when env JAXMOE_CPU_INT4_GEMM=0 */
int jm_int4_gemm_min_rows(void); /* token rows (MoE: mean per active expert) from which it runs */
static inline int64_t jm_int4_panel_bytes(const jm_matrix *w) { return JM_INT4_GEMM_NP * jm_int4_panel_row(w); }
/* unpacks panel rows [n0, n0 + np) into pbuf, then out (i, n0 + r) at c[i*ldc + r] for token rows
 * [m0, m1) folded at xf + (rows ? rows[i] : i) * xs */
void jm_int4_gemm_block(const jm_int4_gemm_kernels *K, const jm_matrix *w, const uint8_t *xf, int64_t xs,
                        const int32_t *rows, int m0, int m1, int n0, int np, float *c, int64_t ldc, uint8_t *pbuf);
/* jm_linear's INT4 GEMM path, a chunk function of linear.c's row-chunk driver: work holds
 * jm_int4_gemm_work_bytes(); ctx is a jm_int4_linear_ctx */
typedef struct {
  const jm_matrix *const *ws;
  int64_t g;
  int n_bufs;
} jm_int4_linear_ctx;
size_t jm_int4_gemm_work_bytes(const jm_matrix *const *ws, int64_t g, int64_t mc_max, int n_bufs);
int jm_int4_gemm_chunk(void *ctx, const float *x, int mc, float *y, uint8_t *work);

#endif
