/* threadpool.c -- our own pthread pool with fine-grained dynamic tiles, NUMA placement hooks
 * and NUMA-aware allocation.
 *
 * One job at a time (jobs are serialized by a mutex); the caller thread works too. Workers
 * spin after a job (decode calls come back-to-back, XLA ops between them) and then sleep on a condvar.
 * Tasks are claimed with an atomic counter per NUMA node; a thread drains its own node's
 * tasks first and then steals. On one node (this machine) everything is one queue.
 * Every worker and the caller run tasks with MXCSR = 0x1F80 (round to nearest, no FTZ/DAZ),
 * so results do not depend on the calling thread's floating-point state (XLA sets FTZ).
 * Env: JAXMOE_CPU_THREADS (count), JAXMOE_CPU_NUMA=0 (ignore NUMA).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

#define MAX_THREADS 256
#define MAX_NODES 8
/* Polls (with a yield every 256) before a worker sleeps: long enough to span the gaps between a
 * decode step's kernel calls (XLA's ops between them). At 4096 the workers fell asleep there and
 * each call woke them: 0.9 ms more per Qwen3-MoE-mid decode step (AVX2 EPYC, 2 cores, measured). */
#define SPIN_ITERS 65536

/* A job's task counters carry the job's generation in their top bits, so a worker that wakes
 * up late cannot claim tasks of a later job with a stale view; the caller waits for all tasks
 * to be done, not for every worker to check in (on a loaded machine a descheduled worker
 * would otherwise stall every job by a time slice). */
#define GEN_SHIFT 40
#define IDX_MASK ((1ull << GEN_SHIFT) - 1)

static struct {
  pthread_mutex_t job_mu, mu;
  pthread_cond_t cv_start;
  int started, want_threads, n_threads, n_nodes, stop, sleepers;
  int node_of[MAX_THREADS];
  pthread_t th[MAX_THREADS];
  _Atomic uint64_t gen;
  _Atomic int64_t done; /* tasks finished in the current job */
  jm_task_fn fn;
  void *ctx;
  _Atomic uint64_t next[MAX_NODES]; /* gen << GEN_SHIFT | next task index */
  int64_t end[MAX_NODES];
} P = {.job_mu = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER, .cv_start = PTHREAD_COND_INITIALIZER};

static int parse_cpulist(const char *path, cpu_set_t *set) {
  FILE *f = fopen(path, "r");
  if (!f) return 0;
  char buf[4096];
  int n = 0;
  if (fgets(buf, sizeof buf, f)) {
    for (char *s = buf; *s && *s != '\n';) {
      char *e;
      long a = strtol(s, &e, 10), b = a;
      if (e == s) break;
      if (*e == '-') b = strtol(e + 1, &e, 10);
      for (long c = a; c <= b && c < CPU_SETSIZE; c++, n++) CPU_SET((int)c, set);
      s = *e == ',' ? e + 1 : e;
    }
  }
  fclose(f);
  return n;
}

static cpu_set_t node_cpus[MAX_NODES];

int jm_numa_nodes(void) {
  static int nodes = 0;
  if (nodes) return nodes;
  const char *env = getenv("JAXMOE_CPU_NUMA");
  int n = 1;
  if (!(env && !strcmp(env, "0"))) {
    for (int j = 0; j < MAX_NODES; j++) {
      char path[96];
      CPU_ZERO(&node_cpus[j]);
      snprintf(path, sizeof path, "/sys/devices/system/node/node%d/cpulist", j);
      if (!parse_cpulist(path, &node_cpus[j])) break;
      n = j + 1;
    }
  }
  nodes = n;
  return nodes;
}
int jm_pool_nodes(void) { return jm_numa_nodes(); }

static int cores(void) {
  cpu_set_t s;
  if (sched_getaffinity(0, sizeof s, &s) == 0) return CPU_COUNT(&s);
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}

/* claims and runs tasks of job `gen` until none is left (or the job is over) */
static void run_tasks(int tid, uint64_t gen) {
  const int home = P.node_of[tid];
  for (int k = 0; k < P.n_nodes; k++) {
    const int j = (home + k) % P.n_nodes;
    uint64_t v = atomic_load(&P.next[j]);
    for (;;) {
      if ((v >> GEN_SHIFT) != (gen & ((1ull << (64 - GEN_SHIFT)) - 1))) return; /* a later job */
      const int64_t t = (int64_t)(v & IDX_MASK);
      if (t >= P.end[j]) break;
      if (!atomic_compare_exchange_weak(&P.next[j], &v, v + 1)) continue;
      P.fn(P.ctx, t, tid);
      atomic_fetch_add(&P.done, 1);
      v = atomic_load(&P.next[j]);
    }
  }
}

static void *worker(void *arg) {
  const int tid = (int)(intptr_t)arg;
  _mm_setcsr(0x1F80);
  uint64_t seen = 0;
  for (;;) {
    uint64_t g;
    int spins = 0;
    while ((g = atomic_load(&P.gen)) == seen && spins < SPIN_ITERS) {
      _mm_pause();
      if (++spins % 256 == 0) sched_yield();
    }
    if (g == seen) {
      pthread_mutex_lock(&P.mu);
      P.sleepers++;
      while ((g = atomic_load(&P.gen)) == seen && !P.stop) pthread_cond_wait(&P.cv_start, &P.mu);
      P.sleepers--;
      pthread_mutex_unlock(&P.mu);
    }
    if (P.stop) return NULL;
    seen = g;
    run_tasks(tid, g);
  }
}

static void pin(pthread_t th, int node) {
  if (P.n_nodes > 1) pthread_setaffinity_np(th, sizeof(cpu_set_t), &node_cpus[node]);
}

static void stop_workers(void) { /* under job_mu */
  if (!P.started) return;
  pthread_mutex_lock(&P.mu);
  P.stop = 1;
  pthread_cond_broadcast(&P.cv_start);
  pthread_mutex_unlock(&P.mu);
  for (int i = 1; i < P.n_threads; i++) pthread_join(P.th[i], NULL);
  P.stop = 0;
  P.started = 0;
}

static void start_workers(void) { /* under job_mu */
  P.n_nodes = jm_numa_nodes();
  int n = P.want_threads > 0 ? P.want_threads : cores();
  if (n > MAX_THREADS) n = MAX_THREADS;
  P.n_threads = n;
  for (int i = 0; i < n; i++) P.node_of[i] = (int)((int64_t)i * P.n_nodes / n);
  atomic_store(&P.gen, 0);
  for (int i = 1; i < n; i++) {
    if (pthread_create(&P.th[i], NULL, worker, (void *)(intptr_t)i) != 0) {
      P.n_threads = i; /* run with what we have */
      break;
    }
    pin(P.th[i], P.node_of[i]);
  }
  P.started = 1;
}

static void after_fork_child(void) { /* threads do not survive fork: start afresh */
  pthread_mutex_init(&P.job_mu, NULL);
  pthread_mutex_init(&P.mu, NULL);
  pthread_cond_init(&P.cv_start, NULL);
  P.sleepers = 0;
  P.started = 0;
  P.stop = 0;
}

static pthread_once_t once = PTHREAD_ONCE_INIT;
static void init_once(void) {
  const char *env = getenv("JAXMOE_CPU_THREADS");
  if (env && *env) P.want_threads = atoi(env);
  pthread_atfork(NULL, NULL, after_fork_child);
}

int jm_set_num_threads(int n) {
  pthread_once(&once, init_once);
  pthread_mutex_lock(&P.job_mu);
  stop_workers();
  P.want_threads = n > 0 ? n : 0;
  pthread_mutex_unlock(&P.job_mu);
  return JM_OK;
}

int jm_num_threads(void) {
  pthread_once(&once, init_once);
  pthread_mutex_lock(&P.job_mu);
  if (!P.started) start_workers();
  const int n = P.n_threads;
  pthread_mutex_unlock(&P.job_mu);
  return n;
}
int jm_pool_threads(void) { return jm_num_threads(); }

void jm_pool_run(int64_t n_tasks, jm_task_fn fn, void *ctx, const int64_t *node_start) {
  if (n_tasks <= 0) return;
  pthread_once(&once, init_once);
  pthread_mutex_lock(&P.job_mu);
  if (!P.started) start_workers();
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(0x1F80);
  const uint64_t gen = atomic_load(&P.gen) + 1, tag = (gen & ((1ull << (64 - GEN_SHIFT)) - 1)) << GEN_SHIFT;
  int64_t begin[MAX_NODES], end[MAX_NODES];
  for (int j = 0; j < P.n_nodes; j++) {
    begin[j] = 0, end[j] = n_tasks; /* node_start has jm_pool_nodes()+1 entries */
    if (node_start) begin[j] = node_start[j], end[j] = node_start[j + 1];
    else if (j > 0) begin[j] = end[j];
  }
  /* First retag the task counters: a worker still inside run_tasks of the last job (it read
   * next[j] before that job ended) then fails its claim. Only after that may end[j], fn and
   * ctx change: otherwise such a worker could compare its stale index with the new end[j],
   * claim it under the old tag, and run (and count in `done`) a task of the new job before
   * its set-up, letting the caller return while a task still runs. */
  for (int j = 0; j < P.n_nodes; j++) atomic_store(&P.next[j], tag | (uint64_t)begin[j]);
  P.fn = fn;
  P.ctx = ctx;
  atomic_store(&P.done, 0);
  for (int j = 0; j < P.n_nodes; j++) P.end[j] = end[j];
  atomic_store(&P.gen, gen);
  if (P.n_threads > 1 && n_tasks > 1) {
    pthread_mutex_lock(&P.mu);
    if (P.sleepers) pthread_cond_broadcast(&P.cv_start);
    pthread_mutex_unlock(&P.mu);
  }
  run_tasks(0, gen);
  for (int spins = 0; atomic_load(&P.done) < n_tasks; spins++) { /* tasks other threads hold */
    _mm_pause();
    if (spins % 256 == 255) sched_yield();
  }
  _mm_setcsr(csr);
  pthread_mutex_unlock(&P.job_mu);
}

void jm_pool_run_sized(int64_t n_tasks, jm_task_fn fn, void *ctx, int64_t work) {
  if (work > JM_SERIAL_WORK) {
    jm_pool_run(n_tasks, fn, ctx, NULL);
    return;
  }
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(0x1F80);
  for (int64_t t = 0; t < n_tasks; t++) fn(ctx, t, 0);
  _mm_setcsr(csr);
}

/* ---- memory ------------------------------------------------------------------------------ */
#define MPOL_BIND_ 2

void *jm_alloc_node(size_t bytes, int node, size_t *alloc_bytes) {
  if (bytes == 0) bytes = 64;
  if (bytes < (2u << 20)) {
    *alloc_bytes = 0;
    void *p = NULL;
    return posix_memalign(&p, 64, bytes) ? NULL : p;
  }
  const size_t len = (bytes + (2u << 20) - 1) & ~(size_t)((2u << 20) - 1);
  void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
  madvise(p, len, MADV_HUGEPAGE);
#endif
  jm_bind_node(p, len, node);
  *alloc_bytes = len;
  return p;
}

void jm_bind_node(void *p, size_t len, int node) {
  if (node >= 0 && jm_numa_nodes() > 1 && node < MAX_NODES) {
    unsigned long mask = 1ul << node;
    syscall(SYS_mbind, p, len, MPOL_BIND_, &mask, (unsigned long)MAX_NODES + 1, 0);
  }
}

void jm_free_node(void *p, size_t alloc_bytes) {
  if (!p) return;
  if (alloc_bytes) munmap(p, alloc_bytes);
  else free(p);
}
