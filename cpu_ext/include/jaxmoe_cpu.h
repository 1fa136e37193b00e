/* jaxmoe_cpu.h -- the one public C ABI of jaxmoe's CPU expert engine.
 *
 * cffi parses this file (preprocessor lines stripped), so declarations here use only plain C
 * types, enums with explicit values and opaque structs.
 *
 * Weights are repacked once, at load time, into a jm_matrix: a sequential stream of 4-row
 * tiles (64-byte row segments interleaved, K zero-padded to a multiple of 128) that the
 * kernels read front to back with software prefetch. FP8 matrices keep their 128x128 block
 * scales (weight_scale_inv) beside the stream; the kernels multiply block sums by them.
 *
 * FP8 e4m3 decode contract (all ISA paths): code b means
 *   sign(b) * 2^(e-7) * (1 + m/8)   for e = (b>>3)&15 > 0,
 *   sign(b) * 2^-6 * (m/8)          for e == 0 (subnormal),
 * i.e. the exact e4m3fn value for the 254 non-NaN codes; the two NaN codes 0x7f/0xff decode
 * as +-480. Checkpoints never contain NaN codes. The exact kernels decode a code through its
 * IEEE half bits ((sext(b) << 7) & 0xBF80 = value * 2^-8) and vcvtph2ps, so subnormal codes are
 * exact and no FMA reads a denormal; the bf16 kernels (JM_PREC_BF16 on AVX-512 BF16) decode to
 * bf16 bits of value * 2^-120, flush the 14 subnormal codes to zero (vdpbf16ps treats bf16
 * denormals as zero) and round activations to bf16. Block scales multiply 128-column block
 * sums (see jm_set_precision for batch invariance).
 *
 * Errors: functions return JM_OK (0) or a JM_E* code and leave a message for
 * jm_last_error() (thread-local); functions returning pointers return NULL on error.
 * Nothing aborts the process.
 */
#ifndef JAXMOE_CPU_H
#define JAXMOE_CPU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* JM_ISA_AVX512 needs AVX-512 F/BW/VL (+ AVX2/FMA/F16C); its bf16 dot products need AVX512_BF16 */
enum jm_isa { JM_ISA_AUTO = -1, JM_ISA_SCALAR = 0, JM_ISA_AVX2 = 1, JM_ISA_AVX512 = 2 };
enum jm_format { JM_FMT_FP8 = 1, JM_FMT_BF16 = 2, JM_FMT_INT4 = 3 };
enum jm_dtype { JM_DT_F32 = 0, JM_DT_BF16 = 1 };
enum jm_status { JM_OK = 0, JM_EINVAL = 1, JM_ENOMEM = 2, JM_EUNSUPPORTED = 3, JM_EHANDLE = 4 };

typedef struct jm_matrix jm_matrix; /* a repacked Linear weight [n, k] (out, in) */
typedef struct jm_store jm_store;   /* host expert store: per layer, per expert gate/up/down */

/* ---- library state --------------------------------------------------------------------- */
const char *jm_last_error(void);
const char *jm_version(void);
int jm_isa_supported(int isa);      /* 1 if this CPU (and OS) can run the path */
int jm_isa_selected(void);          /* the path in use */
int jm_set_isa(int isa);            /* JM_ISA_AUTO: best supported; env JAXMOE_CPU_ISA at load */
const char *jm_isa_name(int isa);
int jm_num_threads(void);
int jm_set_num_threads(int n);      /* n <= 0: all cores (env JAXMOE_CPU_THREADS at load) */
int jm_numa_nodes(void);            /* NUMA nodes the pool places threads and weights on */

/* Precision of the FP8 / BF16 kernels (process-wide, like the ISA and the thread count):
 *   JM_PREC_EXACT  weights decoded exactly to f32 (FP8 through f16, no denormal arithmetic),
 *                  f32 activations and f32 sums, on every ISA path;
 *   JM_PREC_BF16   activations rounded to bf16 and bf16 dot products (AVX-512 BF16
 *                  vdpbf16ps; subnormal FP8 codes flush to zero) where the selected path has
 *                  them; a path without a bf16 dot stays exact.
 * JM_PREC_AUTO: the default (env JAXMOE_CPU_PRECISION=exact|bf16 at load, else exact).
 * Every precision is batch invariant: an output row's bits do not depend on the other rows of
 * the call, on the row count, or on whether the GEMV or the GEMM path ran. */
enum jm_precision { JM_PREC_AUTO = -1, JM_PREC_EXACT = 0, JM_PREC_BF16 = 1 };
int jm_set_precision(int precision);
int jm_precision(void);             /* the precision asked for (never JM_PREC_AUTO) */
int jm_bf16_dot(void);              /* 1 if the FP8/BF16 kernels in use now run bf16 dot products */
const char *jm_kernel_path(void);   /* the FP8/BF16 kernels in use now: "scalar", "avx2",
                                     * "avx512" (f32 FMA) or "avx512-bf16" */

/* The exact SIMD kernels' FP8 decode; both give the same results (exact powers of two apart):
 *   JM_DEC_HALF   through IEEE half bits and vcvtph2ps: no operand is ever a denormal (Intel
 *                 CPUs take a microcode assist for every FMA that reads one);
 *   JM_DEC_SHIFT  f32 bits by shift and mask: subnormal codes become f32 denormal operands
 *                 (full speed on AMD Zen, where vcvtph2ps on 512-bit vectors is slow).
 * JM_DEC_AUTO (the default; env JAXMOE_CPU_FP8_DECODE=half|shift|auto at load): measured once,
 * on first use, by timing both kernels on a small matrix of uniformly drawn codes (6 % of them
 * subnormal) and taking the faster. jm_fp8_decode() returns the decode in use. */
enum jm_fp8_decode { JM_DEC_AUTO = -1, JM_DEC_HALF = 0, JM_DEC_SHIFT = 1 };
int jm_set_fp8_decode(int decode);
int jm_fp8_decode(void);

/* ---- matrices ---------------------------------------------------------------------------- */
/* w: e4m3 bytes, row r at w + r*ldw; scale: f32 [ceil(n/128), ceil(k/128)], row j at
 * scale + j*lds. node: NUMA node for the repacked copy, -1 = any. The input is copied, tiles in
 * parallel over the thread pool (as jm_store_pack and jm_matrix_create_int4 do): the same bytes
 * on any thread count. Not to be called from inside a pool task. */
jm_matrix *jm_matrix_create_fp8(const uint8_t *w, int64_t ldw, const float *scale, int64_t lds,
                                int32_t n, int32_t k, int32_t node);
/* w: bf16 bits, row r at w + r*ldw (in elements). */
jm_matrix *jm_matrix_create_bf16(const uint16_t *w, int64_t ldw, int32_t n, int32_t k,
                                 int32_t node);
/* ---- INT4 (issue 7; src/int4*.c) ----
 * Group-wise symmetric INT4: value = scale[r][g] * (u - 8) for the nibble u of column c in
 * group g = c / group. q: packed nibbles, row r at q + r*ldq, byte j = columns 2j (low nibble)
 * and 2j+1 (high nibble), >= ceil(k/2) bytes per row; scale: f16 bits [n, ceil(k/group)], row
 * r at scale + r*lds. group: a multiple of 32 in [32, 256]. Columns past k are ignored.
 * Kernels quantize the activations to int8 per group (scale amax/127, round to nearest even)
 * and compute y = sum_g s_w[g] * s_x[g] * dot_int(q_w, q_x). */
jm_matrix *jm_matrix_create_int4(const uint8_t *q, int64_t ldq, const uint16_t *scale, int64_t lds,
                                 int32_t n, int32_t k, int32_t group, int32_t node);
/* the INT4 path jm_linear / jm_moe use for INT4 matrices under the selected ISA */
int jm_int4_isa(void);
/* ---- end INT4 ---- */
void jm_matrix_free(jm_matrix *m);
int jm_matrix_info(const jm_matrix *m, int32_t *format, int32_t *n, int32_t *k, int64_t *bytes);
/* validates a handle (an address from Python or an XLA attribute); NULL + error if not live */
jm_matrix *jm_matrix_from_handle(int64_t handle);

/* y[m, n] = x[m, k] @ W^T. x, y contiguous row-major; dtypes JM_DT_F32 / JM_DT_BF16. */
int jm_linear(const jm_matrix *w, const void *x, int32_t x_dtype, int64_t m, void *y,
              int32_t y_dtype);

/* GEMM path: from m token rows on, jm_linear / jm_linear_grouped (and jm_moe from a mean of
 * m rows per active expert) decode each weight panel once per call into the kernels' operand
 * type and run the GEMV's own tile kernel over all tokens against it (FP8 / BF16: the same bits
 * as the GEMV path) instead of decoding the weights again for every chunk of tokens.
 * Default 24 (env JAXMOE_CPU_GEMM_MIN at load); m = 0 restores it, m < 0 disables the path.
 * Returns the previous value (-1: disabled). */
int jm_set_gemm_min_rows(int32_t m);
/* native timing per entry point when env JAXMOE_CPU_PROFILE is set ("print": to stderr at
 * exit): out[3i..3i+2] = ns, calls, token rows of entry i < n_max (names: jm_profile_name);
 * reset zeroes the counters. Returns the number of entries. */
int jm_profile_read(int64_t *out, int32_t n_max, int32_t reset);
const char *jm_profile_name(int32_t i);

/* ---- matrix groups: g matrices of one shape, e.g. per attention head -------------------- */
typedef struct jm_group jm_group;
/* takes ownership of the g matrices (frees them on error too) */
jm_group *jm_group_create(jm_matrix *const *ms, int32_t g);
void jm_group_free(jm_group *grp);
jm_group *jm_group_from_handle(int64_t handle);
int jm_group_info(const jm_group *grp, int32_t *g, int32_t *n, int32_t *k);
/* y[m, j, :] = W_j @ x[m, j, :] for every group j: x [m, g, k], y [m, g, n] contiguous */
int jm_linear_grouped(const jm_group *grp, const void *x, int32_t x_dtype, int64_t m, void *y,
                      int32_t y_dtype);

/* ---- host expert store ------------------------------------------------------------------ */
jm_store *jm_store_create(int32_t n_layers);
void jm_store_free(jm_store *s);
jm_store *jm_store_from_handle(int64_t handle);
/* declares layer `layer` as MoE with n_experts experts of shape gate/up [inter, hidden],
 * down [hidden, inter] */
int jm_store_init_layer(jm_store *s, int32_t layer, int32_t n_experts, int32_t hidden,
                        int32_t inter);
/* packs projection `which` (0 gate [inter, hidden], 1 up, 2 down [hidden, inter]) of one
 * expert, FP8 (w uint8 e4m3 codes, rows ldw apart; scale [ceil(n/128)][lds]) or BF16 (w uint16,
 * scale NULL), straight into the layer's slab for that projection (allocated on first use;
 * one format per slab), where the experts lie one after the other; node: NUMA node or -1 */
int jm_store_pack(jm_store *s, int32_t layer, int32_t expert, int32_t which, int32_t format,
                  const void *w, int64_t ldw, const float *scale, int64_t lds, int32_t node);
/* the slab of projection `which` of a layer, when every expert's matrix lies in it: expert e's
 * packed bytes (tiles of 4 rows, 64-byte row segments, as jm_matrix_create_fp8 packs) at
 * data + e * slot_bytes (packed_bytes of them), its block scales at scale + e * scale_floats
 * (NULL for BF16); JM_EINVAL otherwise. Borrowed pointers, valid until the layer is freed. */
int jm_store_slab(const jm_store *s, int32_t layer, int32_t which, const uint8_t **data,
                  int64_t *slot_bytes, int64_t *packed_bytes, const float **scale,
                  int64_t *scale_floats, int32_t *format);
/* hands the three matrices of one expert to the store (it frees them; on error too) */
int jm_store_set_expert(jm_store *s, int32_t layer, int32_t expert, jm_matrix *gate,
                        jm_matrix *up, jm_matrix *down);
int jm_store_layer_info(const jm_store *s, int32_t layer, int32_t *n_experts, int32_t *hidden,
                        int32_t *inter, int32_t *complete);
int64_t jm_store_bytes(const jm_store *s);
/* borrowed pointer to one matrix of the store (which: 0 gate, 1 up, 2 down); NULL on error */
const jm_matrix *jm_store_matrix(const jm_store *s, int32_t layer, int32_t expert, int32_t which);

/* ---- packed weights from a file (src/store_map.c; the weights cache) ----------------------
 * Adopting maps [offset, offset + bytes) of the open file fd read-only (offset a page multiple;
 * the caller may close fd afterwards) and registers matrices that point into the mapping:
 * the bytes must be exactly what pack.c / int4.c wrote (jm_matrix_packed / jm_store_slab),
 * nothing is checked but sizes. The mapping is released with the matrix / store. FP8 block
 * scales are copied. JM_EINVAL when the file is shorter than the range. */
/* one matrix: n_tiles * tile_bytes bytes (jm_matrix_info's bytes); group: INT4 only */
jm_matrix *jm_matrix_adopt(int32_t format, int32_t n, int32_t k, int32_t group, int32_t fd, int64_t offset,
                           const float *scale, int32_t node);
/* the slab of projection `which` of an initialised layer whose experts lack that projection:
 * n_experts slots of slot_bytes (a 4 KiB multiple); FP8 scale: n_experts * scale_floats */
int jm_store_adopt_slab(jm_store *s, int32_t layer, int32_t which, int32_t format, int32_t fd, int64_t offset,
                        int64_t slot_bytes, const float *scale, int32_t node);
/* a matrix's packed bytes (borrowed), its FP8 block scales (NULL otherwise) and INT4 group */
int jm_matrix_packed(const jm_matrix *m, const uint8_t **data, int64_t *bytes, const float **scale,
                     int64_t *scale_floats, int32_t *group);

/* Fused routed MoE of one layer:
 * out[t, :] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j].
 * x [t, hidden], ids/weights [t, top_k], out [t, hidden]; ids < 0 are skipped (padding). */
int jm_moe(const jm_store *s, int32_t layer, const void *x, int32_t x_dtype, int64_t t,
           const int32_t *ids, const float *weights, int32_t top_k, void *out,
           int32_t out_dtype);

/* ---- benchmark yardstick ---------------------------------------------------------------- */
/* reads the packed bytes of n (1..64) matrices once over the pool; returns a checksum */
uint64_t jm_read_pass(const jm_matrix *const *ms, int32_t n);

/* ---- XLA FFI handlers (defined in ffi.cc): "linear", "linear_grouped", "moe" (layer
 * attribute), "moe_dyn" (layer as a scalar int32 operand, e.g. inside a scan over layers);
 * NULL for other names */
void *jm_ffi_handler(const char *name);

#ifdef __cplusplus
}
#endif
#endif /* JAXMOE_CPU_H */
