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

/* Step 1, per (b, kv head): rotate the new keys and write keys and values into the cache. */
void attn_store(void* data, size_t task) {
  const Attn* a = (const Attn*)data;
  int64_t b = (int64_t)task / a->hkv, g = (int64_t)task % a->hkv, w = (a->h + 2 * a->hkv) * a->d;
  int64_t past = past_of(a, b), half = a->d / 2;
  for (int64_t s = 0; s < a->s; s++) {
    int64_t pos = past + s;
    if (pos >= a->len) break;
    const float* x = a->qkv + (b * a->s + s) * w;
    float* kd = a->key + ((b * a->hkv + g) * a->len + pos) * a->d;
    float* vd = a->value + ((b * a->hkv + g) * a->len + pos) * a->d;
    int64_t rp = pos < a->rot_len ? pos : a->rot_len - 1;
    rope(x + (a->h + g) * a->d, a->cos + rp * half, a->sin + rp * half, half, kd);
    memcpy(vd, x + (a->h + a->hkv + g) * a->d, sizeof(float) * (size_t)a->d);
  }
}

/* Step 2 for a prompt, per (b, kv head, block of ATTN_QUERIES queries): each query of the block,
   for each head of the group, chunk by chunk, merged as it goes. Each chunk of keys is read from
   memory once for the group's heads. */
void attn_rows(void* data, size_t task) {
  const Attn* a = (const Attn*)data;
  int64_t bg = (int64_t)task / a->qblocks, s0 = (int64_t)task % a->qblocks * ATTN_QUERIES;
  int64_t b = bg / a->hkv, g = bg % a->hkv, d = a->d, group = a->h / a->hkv;
  int64_t s1 = s0 + ATTN_QUERIES < a->s ? s0 + ATTN_QUERIES : a->s;
  float *sc = a->scratch + (int64_t)task * a->per_task, *q = sc + ATTN_CHUNK;
  float *part = q + group * d, *state = part + d + 2;
  const float* k = a->key + (b * a->hkv + g) * a->len * d;
  const float* v = a->value + (b * a->hkv + g) * a->len * d;
  for (int64_t s = s0; s < s1; s++) {
    int64_t n = keys_of(a, b, s);
    float* o = a->out + ((b * a->s + s) * a->h + g * group) * d;
    if (n <= 0) {
      memset(o, 0, sizeof(float) * (size_t)(group * d));
      continue;
    }
    rotated_queries(a, b, g, s, q);
    for (int64_t c0 = 0; c0 < n; c0 += ATTN_CHUNK) {
      int64_t nk = n - c0 < ATTN_CHUNK ? n - c0 : ATTN_CHUNK;
      for (int64_t i = 0; i < group; i++) {
        chunk(q + i * d, k + c0 * d, v + c0 * d, nk, d, a->scale, sc, part);
        merge(state + i * (d + 2), part, d, c0 == 0);
      }
    }
    for (int64_t i = 0; i < group; i++) finish(state + i * (d + 2), d, o + i * d);
  }
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
  float *sc = a->scratch + (int64_t)task * a->per_task, *q = sc + ATTN_CHUNK;
  const float* k = a->key + ((b * a->hkv + g) * a->len + c0) * d;
  const float* v = a->value + ((b * a->hkv + g) * a->len + c0) * d;
  rotated_queries(a, b, g, 0, q);
  for (int64_t i = 0; i < group; i++)
    chunk(q + i * d, k, v, nk, d, a->scale, sc, a->partial + ((bg * a->chunks + c) * group + i) * (d + 2));
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
      const float* first = a->partial + (bg * a->chunks * group + i) * (d + 2);
      float* state = (float*)first; /* merged in place into chunk 0's part */
      for (int64_t c = 1; c * ATTN_CHUNK < n; c++)
        merge(state, a->partial + ((bg * a->chunks + c) * group + i) * (d + 2), d, 0);
      finish(state, d, o);
    }
  }
}
