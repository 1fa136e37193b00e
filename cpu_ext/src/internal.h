/* internal.h -- shared between the C files of cpu_ext; not part of the ABI. */
#ifndef JM_INTERNAL_H
#define JM_INTERNAL_H

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>

#include "jaxmoe_cpu.h"

#define JM_TILE_ROWS 4      /* rows per tile */
#define JM_SEG 64           /* bytes of one row per interleaved segment (one cache line) */
#define JM_KBLOCK 128       /* FP8 scale block (both dims); K is padded to a multiple */
#define JM_TILES_PER_TASK 8 /* 32 rows: a task never straddles a 128-row scale block */
#define JM_MC 16            /* tokens per GEMV chunk: folded activations stay in L2 */
#ifndef JM_PF_DIST
#define JM_PF_DIST 4096 /* software prefetch distance in the weight stream, bytes */
#endif

/* bf16 path: FP8 decodes to bf16 bits of value * 2^-120 (vdpbf16ps flushes bf16 denormals
 * and tiny products, so the 2^120 cannot simply be dropped): the activations carry
 * 2^JM_FOLD_EXP, the block scales 2^(120 - JM_FOLD_EXP). */
#define JM_FOLD_EXP 56

#define JM_MATRIX_MAGIC 0x6a6d6d6174726978ull
#define JM_STORE_MAGIC 0x6a6d73746f726521ull

struct jm_matrix {
  uint64_t magic;
  int32_t format;  /* JM_FMT_* */
  int32_t n, k;    /* logical shape */
  int32_t n_tiles; /* ceil(n / 4) */
  int32_t k_pad;   /* k rounded up to 128 */
  int32_t n_rb;    /* row blocks of the folded activations: ceil(n/128) for FP8, 1 for BF16 */
  int32_t kb;      /* k_pad / 128 */
  int32_t node;
  int64_t tile_bytes; /* 4 * k_pad * elem */
  uint8_t *data;      /* n_tiles * tile_bytes, 64-aligned */
  size_t data_alloc;
  float *scale; /* FP8: [n_rb][kb] */
  int32_t group; /* INT4 (int4.c): columns per scale group; k_pad is a multiple of 8 * group */
  int32_t borrowed; /* data and scale lie in an expert store's slab (store.c): freed with it */
};

/* pack.c: the FP8 / BF16 streaming layout. jm_matrix_new allocates (data NULL) or borrows
 * `data` (jm_matrix_packed_bytes(format, n, k) bytes, 64-aligned) and `scale` (FP8:
 * ceil(n/128) * ceil(k/128) floats), zeroes the data and registers the header;
 * jm_matrix_fill packs rows w[r * ldw] (elements) and copies the block scales. */
int64_t jm_matrix_packed_bytes(int32_t format, int32_t n, int32_t k);
/* a matrix's header and geometry (FP8/BF16 tiles), no data yet; NULL when out of memory */
jm_matrix *jm_matrix_header(int32_t format, int32_t n, int32_t k, int32_t node);
jm_matrix *jm_matrix_new(int32_t format, int32_t n, int32_t k, int32_t node, uint8_t *data, float *scale);
int jm_matrix_check_source(int32_t format, const void *w, int64_t ldw, const float *scale, int64_t lds, int32_t n,
                           int32_t k, const char *fn);
void jm_matrix_fill(jm_matrix *m, const void *w, int64_t ldw, const float *scale, int64_t lds);
/* the same, unzeroed data in, same bytes out: jm_matrix_new_unzeroed leaves the data as it is
 * and jm_matrix_fill_pool zeroes and fills it tile by tile over the thread pool (never call it
 * from a pool task); jm_matrix_create_fp8/_bf16 and jm_store_pack use these two */
jm_matrix *jm_matrix_new_unzeroed(int32_t format, int32_t n, int32_t k, int32_t node, uint8_t *data, float *scale);
void jm_matrix_fill_pool(jm_matrix *m, const void *w, int64_t ldw, const float *scale, int64_t lds);

/* Per-ISA kernels of the FP8 / BF16 formats (INT4 has its own tables in int4*.c).
 *
 * The canonical sum (what makes every result batch invariant): for an output y[i][r] of a row
 * r in 128-row block rb, with L the path's vector lanes (scalar: 1),
 *   acc = 0
 *   for each 128-column block kb in order:
 *     blk = 0;  for each step of the block in column order: blk += w[r, cols] * xf[i, cols]
 *               (lane-wise: f32 FMA, or one vdpbf16ps on the bf16 path)
 *     acc = fma(blk, scale[rb][kb] * 2^scale_exp, acc)      (lane-wise)
 *   y = hsum(acc) in a fixed pairwise tree
 * The order does not depend on the token count, the token block, the tile range or the path
 * (GEMV decodes the weights on the fly; the GEMM path decodes a panel once into `wd` and runs
 * the same kernel on it), so a row's bits never depend on the other rows of a call.
 * "Folded" activations xf[m][k_pad]: x in the kernel's operand type, zero past k (f32 on the
 * exact paths; bf16 of x * 2^JM_FOLD_EXP for FP8 weights on the bf16 path). */
/* x rows [0, m) (ldx apart) -> folded rows of the kernel's operand type */
typedef void (*jm_fold_fn)(const jm_matrix *w, int rb, const float *x, int64_t ldx, int m, void *xf);

typedef struct {
  int isa;
  int bf16;       /* bf16 dot products (activations rounded to bf16) */
  size_t xf_elem; /* bytes per folded element */
  size_t wd_elem; /* bytes per decoded weight element (GEMM panels); 0: no GEMM path (INT4) */
  /* rb: unused by the FP8/BF16 kernels (the block scales multiply block sums) */
  jm_fold_fn fold;
  /* y[i*ldy + r - 4*t0] for tokens i < m, rows r in tiles [t0, t1) (r < n), any m */
  void (*tiles)(const jm_matrix *w, int t0, int t1, const void *xf, int m, float *y,
                int64_t ldy);
  /* tiles [t0, t1) of w decoded into wd (4 * k_pad elements of wd_elem bytes per tile) */
  void (*decode)(const jm_matrix *w, int t0, int t1, void *wd);
  /* as tiles, reading the tiles [t0, t1) (at most JM_GEMM_NP / 4) from their decoded copy wd
   * and token i's folded row at xr[i] (m <= JM_GEMM_MB): bit-identical results */
  void (*tiles_dec)(const jm_matrix *w, int t0, int t1, const void *wd, const void *const *xr,
                    int m, float *y, int64_t ldy);
} jm_kernels;

/* Where a SIMD kernel's weight vectors come from: the packed FP8 or BF16 tile stream, or a
 * GEMM panel decoded into the kernel's operand type. */
enum { JM_SRC_FP8, JM_SRC_BF16, JM_SRC_DEC };

/* the f16 bits of FP8 code b (sign-extended to 16 bits) equal to value * 2^-8 */
static inline uint16_t jm_fp8_to_f16_bits(uint8_t b) { return (uint16_t)(((uint16_t)(int16_t)(int8_t)b << 7) & 0xBF80u); }

/* GEMM path (gemm.c) for many tokens per weight: the activations are folded once per call, a
 * panel of JM_GEMM_NP rows (JM_GEMM_NP / 4 tiles, inside one 128-row block) is decoded once
 * into the kernel's operand type, then tiles_dec runs blocks of JM_GEMM_MB tokens against it. */
#define JM_GEMM_NP 16 /* rows per panel: divides 128 */
#define JM_GEMM_MB 12 /* tokens per tiles_dec call */
/* token rows from which jm_linear uses the GEMM path (jm_moe: mean rows per active expert) */
#define JM_GEMM_MIN_DEFAULT 24
int jm_gemm_min_rows(void);
/* bytes of one thread's GEMM buffer for w: a decoded panel */
size_t jm_gemm_buf_bytes(const jm_kernels *K, const jm_matrix *w);
/* bytes of m folded rows for w (64-aligned) */
size_t jm_fold_bytes(const jm_kernels *K, const jm_matrix *w, int64_t m);
/* xf + i * row_bytes = fold(x + i * ldx) for the rows i < m, over the pool (FP8/BF16 and INT4) */
void jm_fold_rows(jm_fold_fn fold, const jm_matrix *w, const float *x, int64_t ldx, int64_t m, size_t row_bytes,
                  void *xf);
/* output (i, n0 + j) at c[i*ldc + j] for token rows [m0, m1), panel rows [n0, n0 + np) of w
 * (np <= JM_GEMM_NP, n0 a multiple of JM_GEMM_NP); token i's folded row (k_pad elements) at
 * xf + (rows ? rows[i] : i) * k_pad; buf: jm_gemm_buf_bytes(K, w) bytes */
void jm_gemm_block(const jm_kernels *K, const jm_matrix *w, const void *xf, const int32_t *rows, int m0, int m1,
                   int n0, int np, float *c, int64_t ldc, void *buf);
/* y[i*ldy + j*n + r] = x[i*ldx + j*k + :] . W_j[r] for g matrices of one shape, m tokens,
 * over the pool (tasks: matrix x panel x token range); scratch: g * jm_fold_bytes(m) for the
 * folded x, then n_bufs buffers of jm_gemm_buf_bytes (one per pool thread); the caller's, under
 * the engine lock. */
int jm_gemm_groups(const jm_kernels *K, const jm_matrix *const *ws, int64_t g, const float *x,
                   int64_t ldx, int m, float *y, int64_t ldy, uint8_t *scratch, int n_bufs);
size_t jm_gemm_groups_scratch(const jm_kernels *K, const jm_matrix *w, int64_t g, int m, int n_bufs);
/* thread's slice of per-thread buffers of `bytes` each; a thread id >= n_bufs (pool resized
 * meanwhile) gets its own 64-aligned allocation in *own (free it), NULL when out of memory */
void *jm_thread_buf(void *bufs, int n_bufs, size_t bytes, int thread, void **own);
/* token parts per panel for a GEMM over `tasks` (matrix x panel) tasks of m rows: when there are
 * few panels, split the tokens too (in multiples of mr rows) so every thread has several tasks;
 * *part_rows: rows per part (a multiple of mr) */
int jm_gemm_split(int64_t tasks, int m, int threads, int mr, int *part_rows);

/* cheap per-entry-point timing, on when JAXMOE_CPU_PROFILE is set (profile.c) */
enum { JM_PROF_LINEAR, JM_PROF_LINEAR_GEMM, JM_PROF_GROUPED, JM_PROF_GROUPED_GEMM, JM_PROF_MOE, JM_PROF_MOE_GEMM, JM_PROF_N };
int64_t jm_prof_start(void); /* 0 when profiling is off */
void jm_prof_stop(int which, int64_t t0, int64_t rows);

extern const jm_kernels jm_kernels_scalar;
extern const jm_kernels jm_kernels_avx2;
extern const jm_kernels jm_kernels_avx512;
extern const jm_kernels jm_kernels_avx512bf16;
extern const jm_kernels jm_kernels_avx2_shift;   /* the JM_DEC_SHIFT twins of avx2 / avx512 */
extern const jm_kernels jm_kernels_avx512_shift;
/* probe.c: the faster of two equivalent kernel tables on a small hot matrix of uniform codes */
const jm_kernels *jm_probe_faster(const jm_kernels *a, const jm_kernels *b);
const jm_kernels *jm_kernels_current(void); /* FP8/BF16 kernels of the selected ISA and precision */
/* the kernels for w's format under the selected ISA (int4.c: INT4 has its own tables) */
const jm_kernels *jm_kernels_for(const jm_matrix *w);

/* errors (dispatch.c) */
int jm_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* helpers shared by kernels */
static inline float jm_bf16_to_f32(uint16_t h) {
  union { uint32_t u; float f; } v = {(uint32_t)h << 16};
  return v.f;
}
static inline uint16_t jm_f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
  union { float f; uint32_t u; } v = {f};
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
  return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1)) >> 16);
}
static inline const uint8_t *jm_tile_ptr(const jm_matrix *w, int t) {
  return w->data + (int64_t)t * w->tile_bytes;
}
static inline float jm_scale_of(const jm_matrix *w, int rb, int kb) {
  return w->scale[(int64_t)rb * w->kb + kb];
}
float jm_exp2i(int e); /* exact 2^e for -126 <= e <= 127 */

/* The powers of two that go with an FP8 decode: `shift` decodes give value * 2^-120 (the shift
 * decode of the exact paths, and the bf16 path), so x carries 2^JM_FOLD_EXP and the block
 * scales 2^(120 - JM_FOLD_EXP); the `half` decode gives value * 2^-8, x as it is, scales x 2^8.
 * BF16 weights carry none. */
static inline float jm_fold_pow2(const jm_matrix *w, int shift) {
  return shift && w->format == JM_FMT_FP8 ? 0x1p56f : 1.0f; /* 2^JM_FOLD_EXP */
}
/* the factor that multiplies tile t's block sums of column block kb */
static inline float jm_block_scale(const jm_matrix *w, int t, int kb, int shift) {
  if (w->format != JM_FMT_FP8) return 1.0f;
  return jm_scale_of(w, t * JM_TILE_ROWS / JM_KBLOCK, kb) * (shift ? 0x1p64f : 0x1p8f); /* 2^(120 - FOLD) : 2^8 */
}

/* software prefetch of a tile's 4 row segments JM_PF_DIST ahead, at the first column `col` of
 * each 256-byte chunk of the packed stream (nothing for decoded panels: they sit in L2) */
static inline void jm_prefetch_chunk(const uint8_t *p, int src, int col) {
  const int per = src == JM_SRC_FP8 ? JM_SEG : (src == JM_SRC_BF16 ? JM_SEG / 2 : 0); /* columns per chunk */
  if (!per || col % per) return;
  const uint8_t *q = p + (int64_t)(col / per) * JM_SEG * JM_TILE_ROWS;
  for (int l = 0; l < JM_TILE_ROWS; l++) __builtin_prefetch(q + JM_PF_DIST + l * JM_SEG);
}

/* thread pool (threadpool.c). Tasks [node_start[j], node_start[j+1]) prefer threads of NUMA
 * node j; node_start NULL = one node. The caller thread takes part. Jobs are serialized. */
typedef void (*jm_task_fn)(void *ctx, int64_t task, int thread);
void jm_pool_run(int64_t n_tasks, jm_task_fn fn, void *ctx, const int64_t *node_start);
/* same, but on the caller alone when `work` (elements touched) is below JM_SERIAL_WORK: a
 * small phase costs less than the barrier that a pool job ends with */
#define JM_SERIAL_WORK (256 << 10)
void jm_pool_run_sized(int64_t n_tasks, jm_task_fn fn, void *ctx, int64_t work);
int jm_pool_threads(void);
int jm_pool_nodes(void);

/* engine lock + grow-only scratch (linear.c): one kernel call at a time uses the scratch */
void jm_engine_lock(void);
void jm_engine_unlock(void);
void *jm_scratch(size_t bytes); /* valid until the next call; under the engine lock */

/* NUMA-aware allocation (threadpool.c) */
void *jm_alloc_node(size_t bytes, int node, size_t *alloc_bytes);
void jm_free_node(void *p, size_t alloc_bytes);
/* binds [p, p + len) (page-aligned) to a NUMA node; a no-op on one node or for node < 0 */
void jm_bind_node(void *p, size_t len, int node);

/* handle registry (dispatch.c) */
int jm_registry_add(const void *p);
int jm_registry_remove(const void *p);
int jm_registry_has(const void *p);

/* the experts' SwiGLU: h[i*ldh + r] = silu(g[i*ldg + r]) * u[i*ldu + r] for i < m, r < n
 * (h may be g: in place). One definition for the fused MoE's GEMV and both GEMM paths. */
static inline void jm_swiglu(float *h, int64_t ldh, const float *g, int64_t ldg, const float *u, int64_t ldu, int m,
                             int n) {
  for (int i = 0; i < m; i++)
    for (int r = 0; r < n; r++) {
      const float gv = g[i * ldg + r];
      h[i * ldh + r] = gv / (1.0f + expf(-gv)) * u[i * ldu + r];
    }
}

/* shared activation conversion (linear.c) */
void jm_to_f32(const void *x, int32_t dtype, int64_t count, float *out);
void jm_from_f32(const float *x, int64_t count, int32_t dtype, void *out);

#endif
