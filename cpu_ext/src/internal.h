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
#define JM_MC 16            /* tokens per chunk: folded activations stay in L2 */
#ifndef JM_PF_DIST
#define JM_PF_DIST 4096 /* software prefetch distance in the weight stream, bytes */
#endif

/* FP8 decode yields value * 2^-120; the activations carry 2^JM_FOLD_EXP instead of 2^120 so
 * that |x * scale| up to 2^72 cannot overflow, and results are multiplied by 2^JM_UNFOLD. */
#define JM_FOLD_EXP 56
#define JM_UNFOLD_EXP (120 - JM_FOLD_EXP)

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
jm_matrix *jm_matrix_new(int32_t format, int32_t n, int32_t k, int32_t node, uint8_t *data, float *scale);
int jm_matrix_check_source(int32_t format, const void *w, int64_t ldw, const float *scale, int64_t lds, int32_t n,
                           int32_t k, const char *fn);
void jm_matrix_fill(jm_matrix *m, const void *w, int64_t ldw, const float *scale, int64_t lds);

/* Per-ISA kernels. "Folded" activations: for row block rb, xf[m][k_pad] holds
 * x * scale[rb][kb] * 2^JM_FOLD_EXP (FP8) or x (BF16) in the element type and order the
 * ISA's tile kernel reads. */
typedef struct {
  int isa;
  size_t xf_elem; /* bytes per folded element */
  void (*fold)(const jm_matrix *w, int rb, const float *x, int64_t ldx, int m, void *xf);
  /* y[i*ldy + r - 4*t0] for tokens i < m, rows r in tiles [t0, t1) (r < n); xf folded for
   * the row block of these tiles; m <= JM_MC. */
  void (*tiles)(const jm_matrix *w, int t0, int t1, const void *xf, int m, float *y,
                int64_t ldy);
} jm_kernels;

/* GEMM path (gemm.c) for many tokens per weight: a weight panel of up to JM_GEMM_NP rows x
 * one 128-column K block is decoded once (FP8 value x block scale, exact f32 products of one
 * rounding) into panel[s][k][16] (16-row sub-panels, k-major), then a register-blocked
 * micro-kernel runs every token against it. Panels lie inside one 128-row scale block. */
#define JM_GEMM_NP 64 /* rows per panel: divides 128 */
#define JM_GEMM_MR 6  /* tokens per micro-kernel call */
#define JM_GEMM_NR 16 /* rows per sub-panel */
/* token rows from which jm_linear uses the GEMM path (jm_moe: mean rows per active expert).
 * Measured here (loaded 2-core Zen 5; GEMV time / GEMM time): 6 DeepSeek expert matrices at
 * M=16 0.81x, 24 1.00x, 64 1.4x; the fused MoE at 16 rows per expert 0.83x in isolation and
 * 0.96-1.13x inside the bench-v3-mid prefill (a wash), at 64 rows per expert 1.38x. */
#define JM_GEMM_MIN_DEFAULT 24
typedef struct {
  int isa;
  /* rows [n0, n0+np) of w (np <= JM_GEMM_NP, inside one 128-row block; rows >= n read as 0),
   * columns [128 kb, 128 kb + 128): panel[(r/16)*128*16 + k*16 + r%16] = value * scale */
  void (*panel)(const jm_matrix *w, int n0, int np, int kb, float *panel);
  /* c[i*ldc + j] = (accumulate ? c[i*ldc + j] : 0) + sum_{k<kk} xr[i][k] * sub[k*16 + j] for
   * i < mr (1..JM_GEMM_MR), j < nc (1..16) */
  void (*micro)(const float *const *xr, int mr, int kk, const float *sub, float *c, int64_t ldc,
                int nc, int accumulate);
} jm_gemm_kernels;
extern const jm_gemm_kernels jm_gemm_scalar;
extern const jm_gemm_kernels jm_gemm_avx2;
const jm_gemm_kernels *jm_gemm_current(void); /* AVX2 when the selected path is not scalar */
int jm_gemm_min_rows(void);
/* output (i, n0 + j) at c[i*ldc + j] for token rows [m0, m1), panel rows [n0, n0 + np) of w,
 * over all K blocks; x_i = x + (rows ? rows[i] : i) * ldx; pbuf: JM_GEMM_NP * 128 f32 */
void jm_gemm_block(const jm_gemm_kernels *G, const jm_matrix *w, const float *x, int64_t ldx,
                   const int32_t *rows, int m0, int m1, int n0, int np, float *c, int64_t ldc,
                   float *pbuf);
#define JM_GEMM_PBUF (JM_GEMM_NP * JM_KBLOCK) /* floats of one panel buffer */
/* y[i*ldy + j*n + r] = x[i*ldx + j*k + :] . W_j[r] for g matrices of one shape, m tokens,
 * over the pool (tasks: matrix x 64-row panel x token range); pbufs: n_bufs JM_GEMM_PBUF (one
 * per pool thread), caller's scratch under the engine lock. JM_OK or JM_ENOMEM. */
int jm_gemm_groups(const jm_gemm_kernels *G, const jm_matrix *const *ws, int64_t g, const float *x,
                   int64_t ldx, int m, float *y, int64_t ldy, float *pbufs, int n_bufs);
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
const jm_kernels *jm_kernels_current(void);
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
