/* weights.c: a matmul node's packed weights, held in huge pages.
 *
 * onnxruntime maps an external-data initializer straight from its file, in 4-KiB pages. A
 * decode step streams every weight once (~100 MB for the default int4 model), so it walks
 * ~25,000 pages a step, and on a virtual machine each TLB miss is a two-level page walk. Copied
 * once, at a node's first run, into 2-MiB pages (Linux transparent huge pages, madvise mode or
 * always), the same bytes decode 1.073× as fast on the 2-core Intel Xeon (median of 40 pairs;
 * docs/quantization.md, "The weights in huge pages"). The bytes are the same, so the results
 * are too.
 *
 * Only initializers onnxruntime maps from the folder's file are held (a weight it holds in its
 * own memory may be an input whose bytes change between runs). The copies live in slabs of at
 * least 32 MiB, 2-MiB aligned, handed out in order, so a layer's weights lie together; a slab is
 * unmapped when its last copy is released (the newest one is kept, emptied, for the next). The
 * file's own pages behind a copy are dropped (MADV_DONTNEED on a private file mapping: they read
 * back from the file if anything touches them again), so resident memory does not double. Off
 * where the kernel has no transparent huge pages, on other systems, or with
 * LLAMAONNX_HUGE_PAGES=0. */
#include "tiles.h"

#if defined(__linux__)
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#define HUGE_PAGE ((size_t)2 << 20)
#define SLAB ((size_t)32 << 20)

typedef struct Slab {
  char* base;
  size_t size, used;
  int64_t live; /* copies not yet released */
} Slab;

struct Held {
  const void* src;
  void* copy; /* NULL: no copy could be made, and the node reads src */
  size_t bytes;
  Slab* slab;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static Slab* current; /* the slab new copies go into */
static int64_t held_bytes;

/* 1 where the kernel backs an madvise'd mapping with transparent huge pages (THP `always` or
   `madvise`), whatever LLAMAONNX_HUGE_PAGES says (runtime.native.huge_pages_possible asks it). */
int llamaonnx_huge_pages_possible(void) {
  FILE* f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  char line[128] = {0};
  if (f) {
    if (!fgets(line, sizeof line, f)) line[0] = 0;
    fclose(f);
  }
  return strstr(line, "[always]") != NULL || strstr(line, "[madvise]") != NULL;
}

/* 1 where huge pages are possible and the user has not said no (asked once, under the lock). */
static int wanted(void) {
  static int answer = -1;
  if (answer >= 0) return answer;
  const char* env = getenv("LLAMAONNX_HUGE_PAGES");
  if (env && strcmp(env, "0") == 0) return answer = 0;
  return answer = llamaonnx_huge_pages_possible();
}

static Slab* new_slab(size_t bytes) {
  size_t size = bytes > SLAB ? (bytes + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1) : SLAB;
  /* map one huge page more and trim, so the slab starts on a 2-MiB boundary */
  char* raw = mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
  if (raw == MAP_FAILED) return NULL;
  char* base = (char*)(((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
  if (base > raw) munmap(raw, (size_t)(base - raw));
  munmap(base + size, (size_t)(raw + HUGE_PAGE - base));
  madvise(base, size, MADV_HUGEPAGE);
  Slab* s = calloc(1, sizeof(Slab));
  if (!s) {
    munmap(base, size);
    return NULL;
  }
  s->base = base, s->size = size;
  return s;
}

/* 1 if [lo, hi) lies inside one private mapping of a file (/proc/self/maps: an inode). */
static int file_backed(uintptr_t lo, uintptr_t hi) {
  FILE* f = fopen("/proc/self/maps", "r");
  if (!f) return 0;
  char line[512];
  int yes = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long start, end, inode;
    char perms[8];
    if (sscanf(line, "%lx-%lx %7s %*s %*s %lu", &start, &end, perms, &inode) != 4) continue;
    if (start <= lo && hi <= end) {
      yes = inode != 0 && perms[3] == 'p';
      break;
    }
  }
  fclose(f);
  return yes;
}

/* Copies bytes from src (a private file mapping) to dst a piece at a time, dropping each piece's
   whole pages once copied, so the two are never both resident for more than a piece (peak
   memory, not only the steady state, stays that of one copy). */
static void copy_and_drop(void* dst, const void* src, size_t bytes) {
  const size_t piece = (size_t)1 << 20;
  uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  uintptr_t lo = ((uintptr_t)src + page - 1) & ~(page - 1); /* the first page not yet dropped */
  for (size_t o = 0; o < bytes; o += piece) {
    size_t n = bytes - o < piece ? bytes - o : piece;
    memcpy((char*)dst + o, (const char*)src + o, n);
    uintptr_t hi = ((uintptr_t)src + o + n) & ~(page - 1); /* pages wholly copied end here */
    if (hi > lo) madvise((void*)lo, hi - lo, MADV_DONTNEED), lo = hi;
  }
}

/* What a node reads: its copy, if it has one of these very bytes, else src itself. */
static const uint8_t* chosen(const Held* h, const void* src) {
  return h && h->src == src && h->copy ? (const uint8_t*)h->copy : (const uint8_t*)src;
}

const uint8_t* held_weights(Held* _Atomic* slot, const void* src, size_t bytes) {
  Held* h = atomic_load_explicit(slot, memory_order_acquire);
  if (h) return chosen(h, src);
  pthread_mutex_lock(&lock);
  h = atomic_load_explicit(slot, memory_order_relaxed);
  if (!h && (h = calloc(1, sizeof(Held)))) {
    h->src = src;
    /* only an initializer onnxruntime maps from the folder's file: memory it owns (a weight
       given inline, or one fed as an input, whose bytes may change between runs) is read in
       place */
    if (!wanted() || !file_backed((uintptr_t)src, (uintptr_t)src + bytes)) goto done;
    size_t need = (bytes + 63) & ~(size_t)63;
    if (!current || current->size - current->used < need) {
      Slab* s = new_slab(need);
      if (s) {
        if (current && current->live == 0) munmap(current->base, current->size), free(current);
        current = s;
      }
    }
    if (current && current->size - current->used >= need) {
      h->copy = current->base + current->used, h->slab = current, h->bytes = bytes;
      current->used += need, current->live++;
      copy_and_drop(h->copy, src, bytes);
      held_bytes += (int64_t)bytes;
    }
  done:
    atomic_store_explicit(slot, h, memory_order_release);
  }
  pthread_mutex_unlock(&lock);
  return chosen(h, src);
}

void held_release(Held* h) {
  if (!h) return;
  pthread_mutex_lock(&lock);
  if (h->slab) {
    held_bytes -= (int64_t)h->bytes;
    if (--h->slab->live == 0) {
      if (h->slab == current) current->used = 0; /* the next session's copies reuse it */
      else munmap(h->slab->base, h->slab->size), free(h->slab);
    }
  }
  pthread_mutex_unlock(&lock);
  free(h);
}

int64_t llamaonnx_held_bytes(void) {
  pthread_mutex_lock(&lock);
  int64_t n = held_bytes;
  pthread_mutex_unlock(&lock);
  return n;
}

#else /* no transparent huge pages: every node reads its input in place */
struct Held {
  int unused;
};
const uint8_t* held_weights(Held* _Atomic* slot, const void* src, size_t bytes) {
  (void)slot, (void)bytes;
  return (const uint8_t*)src;
}
void held_release(Held* h) { (void)h; }
int64_t llamaonnx_held_bytes(void) { return 0; }
int llamaonnx_huge_pages_possible(void) { return 0; }
#endif
