/* attention.c: GroupQueryAttention as the `ort` graph uses it (tiles.h has the contract). */
#include "tiles.h"

static void rope(const float* x, const float* c, const float* sn, int64_t half, float* y) {
  for (int64_t i = 0; i < half; i++) {
    float a = x[i], b = x[i + half];
    y[i] = a * c[i] - b * sn[i];
    y[i + half] = b * c[i] + a * sn[i];
  }
}

#if defined(__x86_64__)
AVX512 static inline __m512 exp512(__m512 x) { /* Cephes' expf, as a vector: ~1 ulp */
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

/* out[0:16w] = inv · Σ_j p_j · v[j, 0:16w]: w columns of 16 × even/odd keys, 2w chains. */
AVX512 static inline void weigh_values(const float* p, const float* v, int64_t n, int64_t d,
                                       int w, __m512 inv, float* out) {
  __m512 even[4], odd[4];
  for (int c = 0; c < 4; c++) even[c] = odd[c] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
    for (int c = 0; c < w; c++) {
      even[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v + j * d + 16 * c), even[c]);
      odd[c] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v + (j + 1) * d + 16 * c), odd[c]);
    }
  }
  if (j < n) {
    __m512 p0 = _mm512_set1_ps(p[j]);
    for (int c = 0; c < w; c++)
      even[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v + j * d + 16 * c), even[c]);
  }
  for (int c = 0; c < w; c++)
    _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_add_ps(even[c], odd[c]), inv));
}

/* One chunk of n keys (see tiles.h): m = max of scale · q·K[0:n], l = Σ e^(score − m),
   acc[0:d] = Σ e^(score − m) · V[j] (not yet divided by l); d a multiple of 16. */
AVX512 static void chunk_avx512(const float* q, const float* k, const float* v, int64_t n,
                                int64_t d, float scale, float* sc, float* m_out, float* l_out,
                                float* out) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  int64_t j0 = 0;
  for (; j0 + 16 <= n; j0 += 16) { /* 16 keys, their 16 dot products summed as one transpose */
    __m512 acc[16];
#pragma GCC unroll 16
    for (int jj = 0; jj < 16; jj++) acc[jj] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) { /* 16 independent chains */
      __m512 qi = _mm512_loadu_ps(q + i);
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; jj++)
        acc[jj] = _mm512_fmadd_ps(qi, _mm512_loadu_ps(k + (j0 + jj) * d + i), acc[jj]);
    }
    __m512 x[8], z[4];
    for (int p = 0; p < 8; p++)
      x[p] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * p], acc[2 * p + 1]),
                           _mm512_unpackhi_ps(acc[2 * p], acc[2 * p + 1]));
    for (int p = 0; p < 4; p++)
      z[p] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * p], x[2 * p + 1], 0x44),
                           _mm512_shuffle_ps(x[2 * p], x[2 * p + 1], 0xEE));
    __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                               _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
    __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x88),
                               _mm512_shuffle_f32x4(z[2], z[3], 0xDD));
    __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88),
                             _mm512_shuffle_f32x4(u01, u23, 0xDD));
    r = _mm512_mul_ps(r, _mm512_set1_ps(scale));
    _mm512_storeu_ps(sc + j0, r);
    best = _mm512_max_ps(best, r);
  }
  float mx = _mm512_reduce_max_ps(best);
  for (int64_t j = j0; j < n; j++) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + j * d + i), acc);
    sc[j] = _mm512_reduce_add_ps(acc) * scale;
    mx = sc[j] > mx ? sc[j] : mx;
  }
  __m512 sum = _mm512_setzero_ps(), m = _mm512_set1_ps(mx);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + j), m));
    _mm512_storeu_ps(sc + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    __mmask16 tail = (__mmask16)((1u << (n - j)) - 1);
    __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sc + j), m));
    _mm512_mask_storeu_ps(sc + j, tail, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
  }
  *m_out = mx, *l_out = _mm512_reduce_add_ps(sum);
  __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i0 = 0; i0 < d; i0 += 64) {
    if (d - i0 >= 64) weigh_values(sc, v + i0, n, d, 4, one, out + i0);
    else weigh_values(sc, v + i0, n, d, (int)((d - i0) / 16), one, out + i0);
  }
}
/* ---- AVX2 + FMA: the same steps 8 lanes wide ------------------------------------------------ */
AVX2 static inline float hsum256(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* chunk_avx512's chunk 8 lanes wide; d a multiple of 8. */
AVX2 static void chunk_avx2(const float* q, const float* k, const float* v, int64_t n, int64_t d,
                            float scale, float* sc, float* m_out, float* l_out, float* out) {
  float mx = -INFINITY;
  int64_t j = 0;
  __m256 best = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= n; j += 8) { /* 8 keys: 8 independent chains, summed as one transpose */
    __m256 a[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) a[c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
      __m256 qi = _mm256_loadu_ps(q + i);
#pragma GCC unroll 8
      for (int c = 0; c < 8; c++) a[c] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + (j + c) * d + i), a[c]);
    }
    /* hadd pairs twice: each 128-bit half holds 4 keys' partial sums; the halves added */
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                             _mm256_permute2f128_ps(u0, u1, 0x31));
    r = _mm256_mul_ps(r, _mm256_set1_ps(scale));
    _mm256_storeu_ps(sc + j, r);
    best = _mm256_max_ps(best, r);
  }
  {
    float b8[8];
    _mm256_storeu_ps(b8, best);
    for (int c = 0; c < 8; c++) mx = b8[c] > mx ? b8[c] : mx;
  }
  for (; j < n; j++) {
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8)
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + j * d + i), a0);
    sc[j] = hsum256(a0) * scale;
    mx = sc[j] > mx ? sc[j] : mx;
  }
  __m256 sum = _mm256_setzero_ps(), m = _mm256_set1_ps(mx);
  float tail = 0.f;
  for (j = 0; j + 8 <= n; j += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + j), m));
    _mm256_storeu_ps(sc + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  for (; j < n; j++) tail += sc[j] = expf(sc[j] - mx);
  *m_out = mx, *l_out = hsum256(sum) + tail;
  for (int64_t i0 = 0; i0 < d; i0 += 64) { /* 64 columns: 8 accumulators */
    int w = d - i0 >= 64 ? 8 : (int)((d - i0) / 8);
    __m256 acc[8];
    for (int c = 0; c < w; c++) acc[c] = _mm256_setzero_ps();
    for (j = 0; j < n; j++) {
      __m256 pj = _mm256_set1_ps(sc[j]);
      const float* vj = v + j * d + i0;
      for (int c = 0; c < w; c++) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * c), acc[c]);
    }
    for (int c = 0; c < w; c++) _mm256_storeu_ps(out + i0 + 8 * c, acc[c]);
  }
}
/* fp16 → fp32, 8 at a time (exact: every half is a float) */
AVX2 static void half_rows_f16c(const uint16_t* h, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
  for (; i < count; i++) out[i] = half_to_float(h[i]);
}
#endif

static void chunk_scalar(const float* q, const float* k, const float* v, int64_t n, int64_t d,
                         float scale, float* sc, float* m_out, float* l_out, float* out) {
  float mx = -INFINITY, sum = 0.f;
  for (int64_t j = 0; j < n; j++) {
    float acc = 0.f;
    for (int64_t i = 0; i < d; i++) acc += q[i] * k[j * d + i];
    sc[j] = acc * scale;
    mx = sc[j] > mx ? sc[j] : mx;
  }
  for (int64_t j = 0; j < n; j++) sum += sc[j] = expf(sc[j] - mx);
  for (int64_t i = 0; i < d; i++) {
    float acc = 0.f;
    for (int64_t j = 0; j < n; j++) acc += sc[j] * v[j * d + i];
    out[i] = acc;
  }
  *m_out = mx, *l_out = sum;
}

/* One chunk of keys for one query head, on this machine's path: into part = [m, l, acc[0:d]]. */
static void chunk(const float* q, const float* k, const float* v, int64_t n, int64_t d,
                  float scale, float* sc, float* part) {
#if defined(__x86_64__)
  int path = kernel_path();
  if (path == PATH_AVX512 && d % 16 == 0) {
    chunk_avx512(q, k, v, n, d, scale, sc, part, part + 1, part + 2);
    return;
  }
  if ((path == PATH_AVX2 || path == PATH_AVXVNNI) && d % 8 == 0) { /* fp32: no VNNI */
    chunk_avx2(q, k, v, n, d, scale, sc, part, part + 1, part + 2);
    return;
  }
#endif
  chunk_scalar(q, k, v, n, d, scale, sc, part, part + 1, part + 2);
}

/* state = [m, l, acc[0:d]] merged with the next chunk's `part` (the first chunk: taken as it
   is). One function for both schedules, so that they round alike. */
static void merge(float* state, const float* part, int64_t d, int first) {
  if (first) {
    memcpy(state, part, sizeof(float) * (size_t)(d + 2));
    return;
  }
  float m = state[0] > part[0] ? state[0] : part[0];
  float x = expf(state[0] - m), y = expf(part[0] - m);
  state[0] = m;
  state[1] = state[1] * x + part[1] * y;
  for (int64_t i = 0; i < d; i++) state[2 + i] = state[2 + i] * x + part[2 + i] * y;
}

static void finish(const float* state, int64_t d, float* out) {
  float inv = 1.f / state[1];
  for (int64_t i = 0; i < d; i++) out[i] = state[2 + i] * inv;
}

/* float → IEEE half, rounded to nearest even (what F16C's vcvtps2ph does), on every path. */
static uint16_t float_to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0));
  if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504: infinity */
  if (abs < 0x38800000u) { /* a half subnormal (or zero): shift the mantissa into place */
    if (abs < 0x33000000u) return (uint16_t)sign;
    uint32_t man = (abs & 0x7fffffu) | 0x800000u, shift = 126 - (abs >> 23);
    uint32_t half = man >> shift, rest = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rest > mid || (rest == mid && (half & 1))) half++;
    return (uint16_t)(sign | half);
  }
  uint32_t h = ((abs >> 13) - (112u << 10)), rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) h++;
  return (uint16_t)(sign | h);
}

/* Rows [j0, j0 + n) of one kv head's cache as fp32: the cache itself, or (an fp16 cache) those
   rows converted into `into` [n, d]. */
static const float* cache_rows(const Attn* a, const void* base, int64_t j0, int64_t n, float* into) {
  if (!a->kv16) return (const float*)base + j0 * a->d;
  const uint16_t* h = (const uint16_t*)base + j0 * a->d;
  int64_t count = n * a->d, i = 0;
#if defined(__x86_64__)
  if (kernel_path() != PATH_PORTABLE) {
    half_rows_f16c(h, count, into);
    return into;
  }
#endif
  for (; i < count; i++) into[i] = half_to_float(h[i]);
  return into;
}

static int64_t past_of(const Attn* a, int64_t b) {
  return a->first ? 0 : (int64_t)a->seqlens[b] + 1 - a->s;
}

/* Keys query s of row b attends over (causal, and within the row's length). */
static int64_t keys_of(const Attn* a, int64_t b, int64_t s) {
  int64_t pos = past_of(a, b) + s, total = (int64_t)a->seqlens[b] + 1;
  int64_t n = pos + 1 < total ? pos + 1 : total;
  return n > a->len ? a->len : n;
}

/* The rotated queries of the heads that read kv head g, for query s of row b: q [G, D]. */
static void rotated_queries(const Attn* a, int64_t b, int64_t g, int64_t s, float* q) {
  int64_t w = (a->h + 2 * a->hkv) * a->d, group = a->h / a->hkv, half = a->d / 2;
  int64_t pos = past_of(a, b) + s, rp = pos < a->rot_len ? pos : a->rot_len - 1;
  for (int64_t i = 0; i < group; i++)
    rope(a->qkv + (b * a->s + s) * w + (g * group + i) * a->d, a->cos + rp * half,
         a->sin + rp * half, half, q + i * a->d);
}

/* Step 1, per (b, kv head): rotate the new keys and write keys and values into the cache (as
   fp16, rounded to nearest, for an fp16 cache). */
void attn_store(void* data, size_t task) {
  const Attn* a = (const Attn*)data;
  int64_t b = (int64_t)task / a->hkv, g = (int64_t)task % a->hkv, w = (a->h + 2 * a->hkv) * a->d;
  int64_t past = past_of(a, b), half = a->d / 2, d = a->d;
  float rotated[512];
  for (int64_t s = 0; s < a->s; s++) {
    int64_t pos = past + s;
    if (pos >= a->len) break;
    const float* x = a->qkv + (b * a->s + s) * w;
    int64_t at = ((b * a->hkv + g) * a->len + pos) * d;
    int64_t rp = pos < a->rot_len ? pos : a->rot_len - 1;
    const float* v = x + (a->h + a->hkv + g) * d;
    float* k = a->kv16 ? rotated : (float*)a->key + at; /* an fp32 cache takes it in place */
    rope(x + (a->h + g) * d, a->cos + rp * half, a->sin + rp * half, half, k);
    if (!a->kv16) {
      memcpy((float*)a->value + at, v, sizeof(float) * (size_t)d);
      continue;
    }
    uint16_t *kd = (uint16_t*)a->key + at, *vd = (uint16_t*)a->value + at;
    for (int64_t i = 0; i < d; i++) kd[i] = float_to_half(rotated[i]), vd[i] = float_to_half(v[i]);
  }
}

/* The cache of kv head g of row b (float or uint16 elements). */
static const void* head_cache(const Attn* a, const void* cache, int64_t b, int64_t g) {
  size_t at = (size_t)((b * a->hkv + g) * a->len * a->d);
  return a->kv16 ? (const void*)((const uint16_t*)cache + at) : (const void*)((const float*)cache + at);
}

/* Step 2 for a prompt, per (b, kv head, block of ATTN_QUERIES queries): chunk by chunk of keys
   (read from memory, and converted from fp16, once for the block), each query of the block and
   each head of the group takes the chunk's part and merges it into its own state, in chunk
   order. */
void attn_rows(void* data, size_t task) {
  const Attn* a = (const Attn*)data;
  int64_t bg = (int64_t)task / a->qblocks, s0 = (int64_t)task % a->qblocks * ATTN_QUERIES;
  int64_t b = bg / a->hkv, g = bg % a->hkv, d = a->d, group = a->h / a->hkv;
  int64_t s1 = s0 + ATTN_QUERIES < a->s ? s0 + ATTN_QUERIES : a->s, rows = s1 - s0;
  int64_t n[ATTN_QUERIES], n_max = 0;
  for (int64_t s = s0; s < s1; s++) {
    n[s - s0] = keys_of(a, b, s);
    n_max = n[s - s0] > n_max ? n[s - s0] : n_max;
  }
  size_t floats = ATTN_CHUNK + (size_t)(rows * group * d + (rows * group + 1) * (d + 2)) +
                  (a->kv16 ? 2 * ATTN_CHUNK * (size_t)d : 0);
  float* sc = malloc(sizeof(float) * floats + 64);
  if (!sc) {
    *a->failed = 1; /* the op returns an error */
    return;
  }
  float *q = sc + ATTN_CHUNK, *part = q + rows * group * d, *state = part + d + 2;
  float *kbuf = state + rows * group * (d + 2), *vbuf = kbuf + ATTN_CHUNK * d;
  const void *kc = head_cache(a, a->key, b, g), *vc = head_cache(a, a->value, b, g);
  for (int64_t s = s0; s < s1; s++)
    if (n[s - s0] > 0) rotated_queries(a, b, g, s, q + (s - s0) * group * d);
  for (int64_t c0 = 0; c0 < n_max; c0 += ATTN_CHUNK) {
    int64_t width = n_max - c0 < ATTN_CHUNK ? n_max - c0 : ATTN_CHUNK;
    const float *k = cache_rows(a, kc, c0, width, kbuf), *v = cache_rows(a, vc, c0, width, vbuf);
    for (int64_t r = 0; r < rows; r++) {
      if (n[r] <= c0) continue;
      int64_t nk = n[r] - c0 < ATTN_CHUNK ? n[r] - c0 : ATTN_CHUNK;
      for (int64_t i = 0; i < group; i++) {
        chunk(q + (r * group + i) * d, k, v, nk, d, a->scale, sc, part);
        merge(state + (r * group + i) * (d + 2), part, d, c0 == 0);
      }
    }
  }
  for (int64_t r = 0; r < rows; r++) {
    float* o = a->out + ((b * a->s + s0 + r) * a->h + g * group) * d;
    for (int64_t i = 0; i < group; i++) {
      if (n[r] <= 0) memset(o + i * d, 0, sizeof(float) * (size_t)d);
      else finish(state + (r * group + i) * (d + 2), d, o + i * d);
    }
  }
  free(sc);
}

/* Where head i of the group of (row, kv head) bg keeps chunk c's part: [m, l, acc[0:d]]. */
static float* part_of(const Attn* a, int64_t bg, int64_t c, int64_t i) {
  return a->partial + ((bg * a->chunks + c) * (a->h / a->hkv) + i) * (a->d + 2);
}

/* Step 2 for a decode step (one query a row), per (b, kv head, chunk): the chunk's part for each
   head of the group, into `partial`; attn_combine merges them. */
void attn_split(void* data, size_t task) {
  const Attn* a = (const Attn*)data;
  int64_t bg = (int64_t)task / a->chunks, c = (int64_t)task % a->chunks;
  int64_t b = bg / a->hkv, g = bg % a->hkv, d = a->d, group = a->h / a->hkv;
  int64_t n = keys_of(a, b, 0), c0 = c * ATTN_CHUNK;
  if (c0 >= n) return;
  int64_t nk = n - c0 < ATTN_CHUNK ? n - c0 : ATTN_CHUNK;
  size_t floats = ATTN_CHUNK + (size_t)(group * d) + (a->kv16 ? 2 * ATTN_CHUNK * (size_t)d : 0);
  float* sc = malloc(sizeof(float) * floats + 64);
  if (!sc) {
    *a->failed = 1;
    return;
  }
  float *q = sc + ATTN_CHUNK, *kbuf = q + group * d, *vbuf = kbuf + ATTN_CHUNK * d;
  const float* k = cache_rows(a, head_cache(a, a->key, b, g), c0, nk, kbuf);
  const float* v = cache_rows(a, head_cache(a, a->value, b, g), c0, nk, vbuf);
  rotated_queries(a, b, g, 0, q);
  for (int64_t i = 0; i < group; i++) chunk(q + i * d, k, v, nk, d, a->scale, sc, part_of(a, bg, c, i));
  free(sc);
}

void attn_combine(const Attn* a) {
  int64_t d = a->d, group = a->h / a->hkv;
  for (int64_t b = 0; b < a->b; b++) {
    int64_t n = keys_of(a, b, 0);
    for (int64_t h = 0; h < a->h; h++) {
      float* o = a->out + (b * a->h + h) * d;
      if (n <= 0) {
        memset(o, 0, sizeof(float) * (size_t)d);
        continue;
      }
      int64_t g = h / group, i = h % group, bg = b * a->hkv + g;
      float* state = part_of(a, bg, 0, i); /* the later chunks merged into chunk 0's part */
      for (int64_t c = 1; c * ATTN_CHUNK < n; c++) merge(state, part_of(a, bg, c, i), d, 0);
      finish(state, d, o);
    }
  }
}
