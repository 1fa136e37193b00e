/* profile.c -- cheap native timing per entry point, for finding where prefill time goes.
 *
 * Off unless env JAXMOE_CPU_PROFILE is set (read once): then jm_linear, jm_linear_grouped and
 * jm_moe add their wall time (CLOCK_MONOTONIC, under the engine lock, so calls never overlap),
 * call count and token rows to counters split by path (GEMV chunks vs the GEMM path), read
 * with jm_profile_read() and printed to stderr at exit when the value is "print". Off, the cost
 * is one load and a branch per call.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

static _Atomic int prof_on = -1;
static _Atomic int64_t prof_ns[JM_PROF_N], prof_calls[JM_PROF_N], prof_rows[JM_PROF_N];
static const char *const prof_names[JM_PROF_N] = {"linear",         "linear_gemm", "linear_grouped",
                                                  "linear_grouped_gemm", "moe",  "moe_gemm"};

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void prof_print(void) {
  for (int i = 0; i < JM_PROF_N; i++)
    if (prof_calls[i])
      fprintf(stderr, "jaxmoe_cpu profile: %-20s %8lld calls %10lld rows %10.3f s\n", prof_names[i],
              (long long)prof_calls[i], (long long)prof_rows[i], prof_ns[i] * 1e-9);
}

int64_t jm_prof_start(void) {
  int on = prof_on;
  if (on < 0) {
    const char *env = getenv("JAXMOE_CPU_PROFILE");
    on = env && *env && strcmp(env, "0") ? 1 : 0;
    if (on && !strcmp(env, "print")) atexit(prof_print);
    prof_on = on;
  }
  return on ? now_ns() : 0;
}

void jm_prof_stop(int which, int64_t t0, int64_t rows) {
  if (!t0) return;
  prof_ns[which] += now_ns() - t0;
  prof_calls[which] += 1;
  prof_rows[which] += rows;
}

int jm_profile_read(int64_t *out, int32_t n_max, int32_t reset) {
  const int n = n_max < JM_PROF_N ? n_max : JM_PROF_N;
  for (int i = 0; out && i < n; i++) out[3 * i] = prof_ns[i], out[3 * i + 1] = prof_calls[i], out[3 * i + 2] = prof_rows[i];
  if (reset)
    for (int i = 0; i < JM_PROF_N; i++) prof_ns[i] = prof_calls[i] = prof_rows[i] = 0;
  return JM_PROF_N;
}

const char *jm_profile_name(int32_t i) { return i >= 0 && i < JM_PROF_N ? prof_names[i] : NULL; }
