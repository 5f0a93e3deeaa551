/* pool.c: the library's own threads for its kernels' parallel loops (Linux; elsewhere, and until
 * the runtime asks for threads, the kernels use onnxruntime's).
 *
 * A decode step is ~150 nodes of 5–60 µs, each split over the threads. Under onnxruntime's
 * parallel loop each node pays its worker's wake-up (~1.6 µs after the call on the AVX2 EPYC)
 * and hands its chunks out from per-thread shards; here the workers spin between nodes and
 * each thread streams one contiguous range of a node's weights, taking chunks from its front,
 * and once it is done, steals from the back of another's: the hardware prefetcher sees one
 * stream a thread, and a thread that starts late costs the others only what they take over.
 * The runtime runs onnxruntime on one thread and this pool on the rest
 * (llamaonnx_threads; docs/speed.md, "2026-12-04").
 *
 * Results do not depend on which thread runs a task: every task writes its own outputs. */
#include "tiles.h"

#if defined(__linux__)
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
/* how long a worker polls for the next job before it sleeps: a decode step's host time many times
   over, short enough that an idle library's workers do not take cores from another's (two
   libraries in one process: runtime.bench.ab) */
#define SPIN_NS 3000000

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline void relax(void) {
#if defined(__x86_64__)
  _mm_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* a thread's range of tasks, [lo, hi) packed in one word: its owner takes from the front,
   others steal from the back */
typedef struct {
  _Atomic uint64_t span;
  char pad[56];
} Range;

typedef struct {
  void (*fn)(void*, size_t);
  void* data;
  int threads; /* ranges: the caller's (0) and its workers' (worker w: w + 1) */
  Range range[MAX_THREADS];
} PoolJob;

/* (the words each side polls or writes every job on lines of their own) */
#define LINE __attribute__((aligned(64)))
static struct {
  LINE _Atomic uint32_t gen; /* bumped for each job and at exit (the workers' futex word) */
  LINE _Atomic int entered;  /* workers inside the job */
  LINE _Atomic int closed;   /* the job's caller is done: no worker may enter it */
  _Atomic uint32_t job_gen;  /* the gen of pool.job */
  _Atomic int sleeping;      /* workers asleep on gen: a job wakes them */
  _Atomic int wanted;        /* threads asked for, the caller's included */
  _Atomic int stop;
  _Atomic uint32_t resize;   /* bumped when more threads are asked for (or at exit): the futex
                                word of the workers past what is asked for */
  int workers;               /* started */
  pthread_mutex_t lock;      /* one job at a time; another caller uses onnxruntime's loop */
  pthread_t thread[MAX_THREADS];
  _Atomic long jobs;         /* run on the pool (llamaonnx_pool_jobs, for tests) */
  LINE PoolJob job;          /* the current job */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .closed = 1};

static int64_t take_front(Range* r) {
  uint64_t v = atomic_load_explicit(&r->span, memory_order_relaxed);
  do {
    if ((v & 0xffffffffu) >= (v >> 32)) return -1;
  } while (!atomic_compare_exchange_weak_explicit(&r->span, &v, v + 1, memory_order_relaxed,
                                                  memory_order_relaxed));
  return (int64_t)(v & 0xffffffffu);
}

static int64_t take_back(Range* r) {
  uint64_t v = atomic_load_explicit(&r->span, memory_order_relaxed);
  do {
    if ((v & 0xffffffffu) >= (v >> 32)) return -1;
  } while (!atomic_compare_exchange_weak_explicit(&r->span, &v, v - (1ull << 32),
                                                  memory_order_relaxed, memory_order_relaxed));
  return (int64_t)(v >> 32) - 1;
}

static void work(PoolJob* j, int me) {
  int64_t i;
  while ((i = take_front(&j->range[me])) >= 0) j->fn(j->data, (size_t)i);
  for (int k = 1; k < j->threads; k++)
    while ((i = take_back(&j->range[(me + k) % j->threads])) >= 0) j->fn(j->data, (size_t)i);
}

static void futex_wait(_Atomic uint32_t* word, uint32_t seen) {
  syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
}
static void futex_wake(_Atomic uint32_t* word) {
  syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Worker w polls for a job while it has one to expect (w + 1 threads or more asked for) and
   less than SPIN_NS since its last, else sleeps until the next. It enters a job only while its
   caller has not closed it, and the caller waits only for the workers inside: a worker that
   comes late (asleep, or not given a core) finds its range taken and costs nothing. */
static void* worker(void* arg) {
  int w = (int)(uintptr_t)arg;
  uint32_t seen = atomic_load(&pool.gen);
  for (;;) {
    int64_t since = now_ns();
    unsigned polls = 0;
    while (atomic_load_explicit(&pool.gen, memory_order_acquire) == seen) {
      uint32_t resize = atomic_load(&pool.resize);
      if (w + 1 >= atomic_load(&pool.wanted)) { /* not asked for: asleep until that changes */
        if (atomic_load(&pool.stop)) return NULL;
        futex_wait(&pool.resize, resize);
        continue;
      }
      relax();
      if (++polls % 1024 || now_ns() - since < SPIN_NS) continue;
      /* (seq_cst, against pool_run's gen bump and read of `sleeping`: one of the two sees the
         other, so a job is never posted to a worker that then sleeps through it) */
      atomic_fetch_add(&pool.sleeping, 1);
      futex_wait(&pool.gen, seen); /* (returns at once if gen has moved on) */
      atomic_fetch_sub(&pool.sleeping, 1);
      since = now_ns();
    }
    seen = atomic_load_explicit(&pool.gen, memory_order_acquire);
    if (atomic_load(&pool.stop)) return NULL;
    atomic_fetch_add(&pool.entered, 1);
    if (!atomic_load(&pool.closed) && atomic_load(&pool.job_gen) == seen && w + 1 < pool.job.threads)
      work(&pool.job, w + 1);
    atomic_fetch_sub_explicit(&pool.entered, 1, memory_order_release);
  }
}

/* Starts the workers still missing (under the lock). */
static void start_workers(int want) {
  if (want > MAX_THREADS - 1) want = MAX_THREADS - 1;
  while (pool.workers < want) {
    if (pthread_create(&pool.thread[pool.workers], NULL, worker, (void*)(uintptr_t)pool.workers))
      break; /* no more threads to be had: the ranges are for those there are */
    pool.workers++;
  }
}

/* A forked child has none of the parent's threads: it starts its own on its first job. */
static void after_fork_child(void) {
  pthread_mutex_init(&pool.lock, NULL);
  atomic_store(&pool.entered, 0);
  atomic_store(&pool.sleeping, 0);
  atomic_store(&pool.closed, 1);
  pool.workers = 0;
}

static void stop_workers(void) {
  if (!pool.workers) return;
  atomic_store(&pool.stop, 1);
  atomic_fetch_add(&pool.gen, 1);
  atomic_fetch_add(&pool.resize, 1);
  futex_wake(&pool.gen);
  futex_wake(&pool.resize);
  for (int i = 0; i < pool.workers; i++) pthread_join(pool.thread[i], NULL);
  pool.workers = 0;
}

__attribute__((constructor)) static void pool_init(void) {
  pthread_atfork(NULL, NULL, after_fork_child);
}
/* at unload or exit: a worker must not be left polling in code about to be unmapped */
__attribute__((destructor)) static void pool_fini(void) { stop_workers(); }

/* The threads the kernels' loops use from now on, the caller's included (1: none of the
   library's, onnxruntime's loop): one setting for the process, the last one asked. Returns the
   threads it will use. Workers start on the first job after it. */
int llamaonnx_threads(int n) {
  if (n < 1) n = 1;
  if (n > MAX_THREADS) n = MAX_THREADS;
  if (atomic_exchange(&pool.wanted, n) < n) { /* workers past the old count may be asleep */
    atomic_fetch_add(&pool.resize, 1);
    futex_wake(&pool.resize);
  }
  return n;
}

int pool_threads(void) {
  int wanted = atomic_load_explicit(&pool.wanted, memory_order_relaxed);
  return wanted < 2 ? 0 : wanted;
}

int pool_run(void (*fn)(void*, size_t), void* data, size_t tasks) {
  int wanted = pool_threads();
  if (!wanted || tasks < 2 || tasks > 0xffffffffu) return 0;
  if (pthread_mutex_trylock(&pool.lock)) return 0;
  if (pool.workers < wanted - 1) start_workers(wanted - 1);
  int threads = (pool.workers < wanted - 1 ? pool.workers : wanted - 1) + 1;
  if (threads < 2) return pthread_mutex_unlock(&pool.lock), 0;
  PoolJob* j = &pool.job; /* no worker is inside: the last job's caller waited them out */
  j->fn = fn, j->data = data, j->threads = threads;
  for (int t = 0; t < threads; t++) {
    uint64_t lo = tasks * (size_t)t / (size_t)threads, hi = tasks * (size_t)(t + 1) / (size_t)threads;
    atomic_store_explicit(&j->range[t].span, lo | hi << 32, memory_order_relaxed);
  }
  uint32_t gen = atomic_load(&pool.gen) + 1; /* only this thread bumps it (under the lock) */
  atomic_store(&pool.job_gen, gen);
  atomic_store(&pool.closed, 0);
  atomic_fetch_add(&pool.gen, 1);
  if (atomic_load(&pool.sleeping)) futex_wake(&pool.gen); /* idle past SPIN_NS: they steal back */
  work(j, 0);
  atomic_store(&pool.closed, 1);
  while (atomic_load_explicit(&pool.entered, memory_order_acquire) > 0) relax();
  atomic_fetch_add_explicit(&pool.jobs, 1, memory_order_relaxed);
  pthread_mutex_unlock(&pool.lock);
  return 1;
}

long llamaonnx_pool_jobs(void) { return atomic_load(&pool.jobs); }

#else /* no pool: onnxruntime's loop */
int llamaonnx_threads(int n) {
  (void)n;
  return 1;
}
int pool_run(void (*fn)(void*, size_t), void* data, size_t tasks) {
  (void)fn, (void)data, (void)tasks;
  return 0;
}
int pool_threads(void) { return 0; }
long llamaonnx_pool_jobs(void) { return 0; }
#endif
