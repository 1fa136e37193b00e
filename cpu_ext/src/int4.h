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

#endif
