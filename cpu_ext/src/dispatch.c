/* dispatch.c -- run-time ISA and precision choice (cpuid + xgetbv), errors, and the registry
 * of live handles (so a stale or forged handle from Python or XLA is an error, not a crash).
 *
 * JAXMOE_CPU_ISA=scalar|avx2|avx512 forces a path at load time; jm_set_isa() at run time.
 * Forcing a path the CPU cannot run is an error (falls back to the best supported).
 * JAXMOE_CPU_PRECISION=exact|bf16 picks the precision at load time; jm_set_precision().
 */
#include <cpuid.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---- errors ------------------------------------------------------------------------------ */
static __thread char err_buf[512];

int jm_error(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err_buf, sizeof err_buf, fmt, ap);
  va_end(ap);
  return code;
}

const char *jm_last_error(void) { return err_buf; }

const char *jm_version(void) { return "jaxmoe_cpu 0.1.0"; }

/* ---- ISA --------------------------------------------------------------------------------- */
static uint64_t xgetbv0(void) {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((uint64_t)hi << 32) | lo;
}

static int detect(int isa) {
  unsigned a, b, c, d;
  if (isa == JM_ISA_SCALAR) return 1;
#ifdef JM_AVX512_EMULATED
  if (isa == JM_ISA_AVX512) return 1; /* test build: SIMDe emulation runs anywhere */
#endif
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
  if (!osxsave) return 0;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 6) != 6) return 0; /* XMM + YMM state */
  if (__get_cpuid_max(0, NULL) < 7) return 0;
  __cpuid_count(7, 0, a, b, c, d);
  const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1;
  const int avx512vl = (b >> 31) & 1;
  if (isa == JM_ISA_AVX2) return avx2 && fma && f16c;
  if (isa == JM_ISA_AVX512) return avx2 && fma && f16c && avx512f && avx512bw && avx512vl && (xcr0 & 0xe6) == 0xe6;
  return 0;
}

static int detect_bf16(void) { /* AVX512_BF16, on top of the AVX-512 path */
#ifdef JM_AVX512_EMULATED
  return 1;
#endif
  unsigned a, b, c, d;
  if (!detect(JM_ISA_AVX512) || __get_cpuid_max(0, NULL) < 7) return 0;
  __cpuid_count(7, 1, a, b, c, d);
  return (a >> 5) & 1;
}

static int supported[3] = {-1, -1, -1};
static _Atomic int selected = -2;

int jm_isa_supported(int isa) {
  if (isa < JM_ISA_SCALAR || isa > JM_ISA_AVX512) return 0;
  if (supported[isa] < 0) supported[isa] = detect(isa);
  return supported[isa];
}

const char *jm_isa_name(int isa) {
  switch (isa) {
    case JM_ISA_SCALAR: return "scalar";
    case JM_ISA_AVX2: return "avx2";
    case JM_ISA_AVX512: return "avx512";
    case JM_ISA_AUTO: return "auto";
    default: return "unknown";
  }
}

static int best(void) {
  for (int i = JM_ISA_AVX512; i > JM_ISA_SCALAR; i--)
    if (jm_isa_supported(i)) return i;
  return JM_ISA_SCALAR;
}

int jm_set_isa(int isa) {
  if (isa == JM_ISA_AUTO) {
    selected = best();
    return JM_OK;
  }
  if (isa < JM_ISA_SCALAR || isa > JM_ISA_AVX512)
    return jm_error(JM_EINVAL, "jm_set_isa: unknown ISA %d", isa);
  if (!jm_isa_supported(isa))
    return jm_error(JM_EUNSUPPORTED, "jm_set_isa: this CPU cannot run the %s path",
                    jm_isa_name(isa));
  selected = isa;
  return JM_OK;
}

int jm_isa_selected(void) {
  if (selected == -2) {
    const char *env = getenv("JAXMOE_CPU_ISA");
    int want = JM_ISA_AUTO;
    if (env && *env) {
      for (int i = JM_ISA_SCALAR; i <= JM_ISA_AVX512; i++)
        if (!strcmp(env, jm_isa_name(i))) want = i;
      if (want == JM_ISA_AUTO && strcmp(env, "auto"))
        fprintf(stderr, "jaxmoe_cpu: ignoring JAXMOE_CPU_ISA=%s (scalar|avx2|avx512|auto)\n", env);
    }
    if (want != JM_ISA_AUTO && !jm_isa_supported(want)) {
      fprintf(stderr, "jaxmoe_cpu: JAXMOE_CPU_ISA=%s not supported by this CPU; using %s\n", env,
              jm_isa_name(best()));
      want = JM_ISA_AUTO;
    }
    selected = want == JM_ISA_AUTO ? best() : want;
  }
  return selected;
}

/* ---- precision --------------------------------------------------------------------------- */
static _Atomic int precision = -2;

int jm_precision(void) {
  if (precision == -2) {
    const char *env = getenv("JAXMOE_CPU_PRECISION");
    int p = JM_PREC_EXACT;
    if (env && *env) {
      if (!strcmp(env, "bf16")) p = JM_PREC_BF16;
      else if (strcmp(env, "exact") && strcmp(env, "auto"))
        fprintf(stderr, "jaxmoe_cpu: ignoring JAXMOE_CPU_PRECISION=%s (exact|bf16|auto)\n", env);
    }
    precision = p;
  }
  return precision;
}

int jm_set_precision(int p) {
  if (p == JM_PREC_AUTO) {
    precision = -2;
    jm_precision();
    return JM_OK;
  }
  if (p != JM_PREC_EXACT && p != JM_PREC_BF16) return jm_error(JM_EINVAL, "jm_set_precision: unknown precision %d", p);
  precision = p;
  return JM_OK;
}

int jm_bf16_dot(void) {
  static int bf16 = -1;
  if (bf16 < 0) bf16 = detect_bf16();
  return jm_isa_selected() == JM_ISA_AVX512 && jm_precision() == JM_PREC_BF16 && bf16;
}

/* ---- FP8 decode of the exact SIMD kernels --------------------------------------------------- */
static _Atomic int decode_asked = -2;        /* JM_DEC_*; -2: env not read yet */
static _Atomic int decode_measured[3] = {-1, -1, -1}; /* per ISA: the probe's choice */

int jm_set_fp8_decode(int d) {
  if (d != JM_DEC_AUTO && d != JM_DEC_HALF && d != JM_DEC_SHIFT)
    return jm_error(JM_EINVAL, "jm_set_fp8_decode: unknown decode %d", d);
  decode_asked = d;
  return JM_OK;
}

static int decode_for(int isa) {
  if (decode_asked == -2) {
    const char *env = getenv("JAXMOE_CPU_FP8_DECODE");
    int d = JM_DEC_AUTO;
    if (env && *env) {
      if (!strcmp(env, "half")) d = JM_DEC_HALF;
      else if (!strcmp(env, "shift")) d = JM_DEC_SHIFT;
      else if (strcmp(env, "auto")) fprintf(stderr, "jaxmoe_cpu: ignoring JAXMOE_CPU_FP8_DECODE=%s (half|shift|auto)\n", env);
    }
    decode_asked = d;
  }
  if (decode_asked != JM_DEC_AUTO || isa == JM_ISA_SCALAR) return decode_asked == JM_DEC_SHIFT;
  if (decode_measured[isa] < 0) { /* once per ISA: concurrent first calls wait for one probe */
    static pthread_mutex_t probe_mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&probe_mu);
    if (decode_measured[isa] < 0) {
      const jm_kernels *half = isa == JM_ISA_AVX512 ? &jm_kernels_avx512 : &jm_kernels_avx2;
      const jm_kernels *shift = isa == JM_ISA_AVX512 ? &jm_kernels_avx512_shift : &jm_kernels_avx2_shift;
      decode_measured[isa] = jm_probe_faster(half, shift) == shift ? JM_DEC_SHIFT : JM_DEC_HALF;
    }
    pthread_mutex_unlock(&probe_mu);
  }
  return decode_measured[isa];
}

int jm_fp8_decode(void) {
  const int isa = jm_isa_selected();
  return isa == JM_ISA_SCALAR ? JM_DEC_HALF : decode_for(isa);
}

const jm_kernels *jm_kernels_current(void) {
  switch (jm_isa_selected()) {
    case JM_ISA_AVX512:
      if (jm_bf16_dot()) return &jm_kernels_avx512bf16;
      return decode_for(JM_ISA_AVX512) == JM_DEC_SHIFT ? &jm_kernels_avx512_shift : &jm_kernels_avx512;
    case JM_ISA_AVX2: return decode_for(JM_ISA_AVX2) == JM_DEC_SHIFT ? &jm_kernels_avx2_shift : &jm_kernels_avx2;
    default: return &jm_kernels_scalar;
  }
}

const char *jm_kernel_path(void) {
  const jm_kernels *K = jm_kernels_current();
  return K->bf16 ? "avx512-bf16" : jm_isa_name(K->isa);
}

/* ---- registry of live handles: open addressing, tombstones ------------------------------ */
static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static uintptr_t *reg_tab;
static size_t reg_cap, reg_used; /* used counts live + tombstones */
#define REG_TOMB ((uintptr_t)1)

static size_t reg_slot(uintptr_t p, size_t cap) { return (size_t)((p >> 6) * 0x9E3779B97F4A7C15ull) & (cap - 1); }

static int reg_insert(uintptr_t *tab, size_t cap, uintptr_t p) {
  for (size_t i = reg_slot(p, cap);; i = (i + 1) & (cap - 1))
    if (tab[i] == 0 || tab[i] == REG_TOMB) {
      const int fresh = tab[i] == 0;
      tab[i] = p;
      return fresh;
    }
}

int jm_registry_add(const void *p) {
  pthread_mutex_lock(&reg_mu);
  if ((reg_used + 1) * 2 > reg_cap) {
    size_t cap = reg_cap ? reg_cap * 2 : 256;
    uintptr_t *tab = calloc(cap, sizeof *tab);
    if (!tab) {
      pthread_mutex_unlock(&reg_mu);
      return jm_error(JM_ENOMEM, "out of memory (handle registry)");
    }
    reg_used = 0;
    for (size_t i = 0; i < reg_cap; i++)
      if (reg_tab[i] > REG_TOMB) reg_used += reg_insert(tab, cap, reg_tab[i]);
    free(reg_tab);
    reg_tab = tab;
    reg_cap = cap;
  }
  reg_used += reg_insert(reg_tab, reg_cap, (uintptr_t)p);
  pthread_mutex_unlock(&reg_mu);
  return JM_OK;
}

static size_t reg_find(uintptr_t p) { /* under reg_mu; reg_cap if absent */
  if (!reg_cap || p <= REG_TOMB) return reg_cap;
  for (size_t i = reg_slot(p, reg_cap), n = 0; n < reg_cap; i = (i + 1) & (reg_cap - 1), n++) {
    if (reg_tab[i] == p) return i;
    if (reg_tab[i] == 0) break;
  }
  return reg_cap;
}

int jm_registry_has(const void *p) {
  pthread_mutex_lock(&reg_mu);
  const int has = reg_find((uintptr_t)p) != reg_cap;
  pthread_mutex_unlock(&reg_mu);
  return has;
}

int jm_registry_remove(const void *p) {
  pthread_mutex_lock(&reg_mu);
  const size_t i = reg_find((uintptr_t)p);
  if (i != reg_cap) reg_tab[i] = REG_TOMB;
  pthread_mutex_unlock(&reg_mu);
  return i != reg_cap;
}
