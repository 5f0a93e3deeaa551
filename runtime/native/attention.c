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
/* A decode step reads the cache in place, from memory: a row's keys and values were last touched
   a whole step ago, and the hardware prefetcher stops at every 4 KB. So chunk512 and chunk256
   ask ahead (`row`: bytes a key): the first 16 keys before they start, then, while keys j .. j + 7
   are scored, the keys 16 further on and these 8 keys' values (not needed before the softmax).
   Prefetches never fault, and change no number. Both INLINE (always_inline): GCC 12 dropped
   the prefetches of a plain `static inline` helper called from these always-inlined,
   target-attributed functions, silently (objdump: none left). */
INLINE void ask_first(const void* k, int64_t row) {
  for (int64_t o = 0; o < 16 * row; o += 64) _mm_prefetch((const char*)k + o, _MM_HINT_T0);
}

INLINE void ask_ahead(const void* k, const void* v, int64_t row, int64_t j, int64_t n) {
  for (int64_t o = 0; o < 8 * row; o += 64) {
    if (j + 16 < n) _mm_prefetch((const char*)k + (j + 16) * row + o, _MM_HINT_T0);
    _mm_prefetch((const char*)v + j * row + o, _MM_HINT_T0);
  }
}

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

/* 16 cache elements from element i of x as fp32: x float, or (half) IEEE half, converted in the
   load (exactly). Every chunk function below takes `half` as a constant, so each is compiled
   twice and both read the same numbers in the same order: a decode step reads an fp16 cache in
   place, a prompt's block converts it once into fp32 rows, and the bits are the same. */
AVX512 INLINE __m512 load512(const void* x, int64_t i, int half) {
  if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)x + i)));
  return _mm512_loadu_ps((const float*)x + i);
}

/* The sums of 8 registers' lanes, key jj's in lane jj of the result. */
AVX512 INLINE __m256 lane_sums8(const __m512* acc) {
  __m512 x[4], z[2];
  for (int p = 0; p < 4; p++)
    x[p] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * p], acc[2 * p + 1]),
                         _mm512_unpackhi_ps(acc[2 * p], acc[2 * p + 1]));
  for (int p = 0; p < 2; p++) /* each 128-bit lane: four keys' partial sums */
    z[p] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * p], x[2 * p + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * p], x[2 * p + 1], 0xEE));
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                           _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
  u = _mm512_add_ps(_mm512_shuffle_f32x4(u, u, 0x88), _mm512_shuffle_f32x4(u, u, 0xDD));
  return _mm512_castps512_ps256(u);
}

/* Columns i0 .. i0 + 16w of R rows' weighted values Σ_j p_rj · V[j] (p: sc's rows, ATTN_CHUNK
   apart), into their parts (d + 2 apart): 4·R chains along the keys, each value read once for
   the R rows (a decode step: the heads of a group; a prompt's block: its queries' heads too). */
AVX512 INLINE void weigh_values(const float* sc, const void* v, int half, int R, int64_t n,
                                int64_t d, int64_t i0, int w, float* parts) {
  __m512 acc[6][4];
  for (int h = 0; h < R; h++)
    for (int c = 0; c < w; c++) acc[h][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j++) {
    __m512 vj[4];
    for (int c = 0; c < w; c++) vj[c] = load512(v, j * d + i0 + 16 * c, half);
    for (int h = 0; h < R; h++) {
      __m512 pj = _mm512_set1_ps(sc[h * ATTN_CHUNK + j]);
      for (int c = 0; c < w; c++) acc[h][c] = _mm512_fmadd_ps(pj, vj[c], acc[h][c]);
    }
  }
  for (int h = 0; h < R; h++)
    for (int c = 0; c < w; c++) _mm512_storeu_ps(parts + h * (d + 2) + 2 + i0 + 16 * c, acc[h][c]);
}

/* weigh_values over all d columns, 64 at a time */
AVX512 INLINE void weigh_all(const float* sc, const void* v, int half, int R, int64_t n,
                             int64_t d, float* parts) {
  for (int64_t i0 = 0; i0 < d; i0 += 64) {
    if (d - i0 >= 64) weigh_values(sc, v, half, R, n, d, i0, 4, parts);
    else weigh_values(sc, v, half, R, n, d, i0, (int)((d - i0) / 16), parts);
  }
}

/* A row's softmax over its n scores p[0:n] (max mx): p[j] ← e^(p[j] − mx), 16 at a time from
   j = 0, and part = [mx, Σ e] (the sum lane-wise, then _mm512_reduce_add_ps). Both schedules
   call this one function, so they round alike. */
AVX512 INLINE void softmax512(float* p, int64_t n, float mx, float* part) {
  __m512 sum = _mm512_setzero_ps(), m = _mm512_set1_ps(mx);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + j), m));
    _mm512_storeu_ps(p + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    __mmask16 tail = (__mmask16)((1u << (n - j)) - 1);
    __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p + j), m));
    _mm512_mask_storeu_ps(p + j, tail, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
  }
  part[0] = mx, part[1] = _mm512_reduce_add_ps(sum);
}

/* One chunk of n keys for G ≤ 3 query heads that share a kv head (see tiles.h), reading each key
   and value once for all G: for head h, m = max of scale · q_h·K[0:n], l = Σ e^(score − m) and
   acc[0:d] = Σ e^(score − m) · V[j] (not yet divided by l), into parts + h·(d + 2) = [m, l, acc];
   d a multiple of 16, sc G × ATTN_CHUNK floats. Scores 8 keys at a time (8·G chains, one per
   key and head, each along d, lane l summing dims l, l + 16, …; the lanes summed by lane_sums8's
   tree, which scores_block512 reproduces for a prompt); the weighted values 64 columns at a time
   (4·G chains along the keys). A last group of fewer than 8 keys repeats key n − 1 in the
   missing places and keeps only the real keys' scores. */
AVX512 INLINE void chunk512(const float* q, const void* k, const void* v, int half, int G,
                            int64_t n, int64_t d, float scale, float* sc, float* parts) {
  __m512 best[3];
  for (int h = 0; h < G; h++) best[h] = _mm512_set1_ps(-INFINITY);
  int64_t row = d * (half ? 2 : 4); /* bytes a key */
  ask_first(k, row);
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    int64_t last = n - 1 - j0 < 7 ? n - 1 - j0 : 7; /* keys j0 .. j0 + last are real */
    __mmask8 real = (__mmask8)((1u << (last + 1)) - 1);
    ask_ahead(k, v, row, j0, n);
    __m512 acc[3][8];
    for (int h = 0; h < G; h++)
      for (int jj = 0; jj < 8; jj++) acc[h][jj] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
#pragma GCC unroll 8
      for (int jj = 0; jj < 8; jj++) {
        __m512 kj = load512(k, (j0 + (jj < last ? jj : last)) * d + i, half);
        for (int h = 0; h < G; h++)
          acc[h][jj] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * d + i), kj, acc[h][jj]);
      }
    }
    for (int h = 0; h < G; h++) {
      __m256 r = _mm256_mul_ps(lane_sums8(acc[h]), _mm256_set1_ps(scale));
      _mm256_mask_storeu_ps(sc + h * ATTN_CHUNK + j0, real, r);
      best[h] = _mm512_mask_max_ps(best[h], (__mmask16)real, best[h], _mm512_castps256_ps512(r));
    }
  }
  for (int h = 0; h < G; h++)
    softmax512(sc + h * ATTN_CHUNK, n, _mm512_mask_reduce_max_ps(0xff, best[h]),
               parts + h * (d + 2));
  weigh_all(sc, v, half, G, n, d, parts);
}

/* The 16 keys' scores of R rows of queries (q: R × d, rows d apart) for KB groups of 16 keys of
   a transposed chunk (kt: d × ATTN_CHUNK, key j's dim i at kt[i·ATTN_CHUNK + j]), into sc (rows
   ATTN_CHUNK apart), the same numbers as chunk512's: lane l of a key's chain sums dims l,
   l + 16, … in order (here the key's lane in the register of dim-lane l), then the 16 lanes in
   lane_sums8's tree: s_t = (P[4t] + P[4t+2]) + (P[4t+1] + P[4t+3]), score = (s0 + s1) + (s2 + s3),
   times scale. The keys in the lanes make that tree 15 vertical adds instead of shuffles. Lanes
   4t + e and 4t + e + 2 go together (2·R·KB chains along d); s0 + s1 and s2 wait in `hold`. */
AVX512 INLINE void scores_block512(const float* q, int R, const float* kt, int KB, int64_t d,
                                   float scale, float* sc) {
  __m512 hold[2][4][2]; /* s0, then s0 + s1; s2 */
  for (int t = 0; t < 4; t++) {
    __m512 x[4][2];
    for (int half = 0; half < 2; half++) { /* lanes (4t, 4t + 2), then (4t + 1, 4t + 3) */
      __m512 p[2][4][2];
      for (int u = 0; u < 2; u++)
        for (int r = 0; r < R; r++)
          for (int b = 0; b < KB; b++) p[u][r][b] = _mm512_setzero_ps();
      for (int64_t i = 4 * t + half; i < d; i += 16)
        for (int u = 0; u < 2; u++) {
          __m512 kv[2];
          for (int b = 0; b < KB; b++)
            kv[b] = _mm512_loadu_ps(kt + (i + 2 * u) * ATTN_CHUNK + 16 * b);
          for (int r = 0; r < R; r++) {
            __m512 qi = _mm512_set1_ps(q[r * d + i + 2 * u]);
            for (int b = 0; b < KB; b++) p[u][r][b] = _mm512_fmadd_ps(qi, kv[b], p[u][r][b]);
          }
        }
      for (int r = 0; r < R; r++)
        for (int b = 0; b < KB; b++) {
          __m512 y = _mm512_add_ps(p[0][r][b], p[1][r][b]);
          x[r][b] = half ? _mm512_add_ps(x[r][b], y) : y; /* s_t */
        }
    }
    for (int r = 0; r < R; r++)
      for (int b = 0; b < KB; b++) {
        if (t == 0) hold[0][r][b] = x[r][b];
        else if (t == 1) hold[0][r][b] = _mm512_add_ps(hold[0][r][b], x[r][b]);
        else if (t == 2) hold[1][r][b] = x[r][b];
        else {
          __m512 score = _mm512_add_ps(hold[0][r][b], _mm512_add_ps(hold[1][r][b], x[r][b]));
          score = _mm512_mul_ps(score, _mm512_set1_ps(scale));
          _mm512_storeu_ps(sc + r * ATTN_CHUNK + 16 * b, score);
        }
      }
  }
}

/* Scores of `rows` rows of queries for keys 0 .. 16·groups of a transposed chunk: blocks of four
   rows and two groups of keys (2·4·2 chains in registers, six loads for eight multiply-adds). */
AVX512 static void scores512(const float* q, int64_t rows, const float* kt, int64_t groups,
                             int64_t d, float scale, float* sc) {
  for (int64_t g = 0; g < groups; g += 2)
    for (int64_t r = 0; r < rows; r += 4) {
      const float* qr = q + r * d;
      float* out = sc + r * ATTN_CHUNK + 16 * g;
      const float* kg = kt + 16 * g;
      int few = rows - r < 4 ? (int)(rows - r) : 0, two = groups - g >= 2;
      if (!few && two) scores_block512(qr, 4, kg, 2, d, scale, out); /* the common case */
      else if (two) scores_block512(qr, few, kg, 2, d, scale, out);
      else scores_block512(qr, few ? few : 4, kg, 1, d, scale, out);
    }
}

/* 16 rows of 16 floats (rows ≥ `real` read as zeros) transposed: dst[i·ds + j] = src[j·ss + i] */
AVX512 static void transpose16(const float* src, int64_t ss, int real, float* dst, int64_t ds) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; i++)
    r[i] = i < real ? _mm512_loadu_ps(src + i * ss) : _mm512_setzero_ps();
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; i++) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; i++) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
  for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * ds, r[i]);
}

/* A chunk's n keys (k: n × d, fp32) as kt: d × ATTN_CHUNK, the keys past n up to a multiple of
   16 zero. */
AVX512 static void transpose_keys(const float* k, int64_t n, int64_t d, float* kt) {
  for (int64_t j = 0; j < n; j += 16)
    for (int64_t i = 0; i < d; i += 16)
      transpose16(k + j * d + i, d, n - j < 16 ? (int)(n - j) : 16, kt + i * ATTN_CHUNK + j,
                  ATTN_CHUNK);
}

/* A prompt block's step 2 for one chunk on AVX-512: `rows` rows of queries (query r's G heads
   at rows r·G .. r·G + G − 1; q rows × d), row x taking nk[x] ≥ 1 keys of the chunk (k, v: fp32
   rows; nk non-decreasing), each row's part into parts + x·(d + 2). The same numbers as chunk512
   gives each row alone (a decode step): scores by scores512 on the transposed keys, then
   softmax512 and weigh_values on runs of rows with the same nk, up to six rows a pass. */
AVX512 static void block512(const float* q, int64_t rows, const int64_t* nk, const float* k,
                            const float* v, int64_t d, float scale, float* kt, float* sc,
                            float* parts) {
  int64_t n_max = nk[rows - 1];
  transpose_keys(k, n_max, d, kt);
  scores512(q, rows, kt, (n_max + 15) / 16, d, scale, sc);
  for (int64_t x = 0; x < rows; x++) {
    float* p = sc + x * ATTN_CHUNK;
    int64_t n = nk[x], j = 0;
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= n; j += 16) best = _mm512_max_ps(best, _mm512_loadu_ps(p + j));
    if (j < n) {
      __mmask16 tail = (__mmask16)((1u << (n - j)) - 1);
      best = _mm512_mask_max_ps(best, tail, best, _mm512_loadu_ps(p + j));
    }
    softmax512(p, n, _mm512_reduce_max_ps(best), parts + x * (d + 2));
  }
  for (int64_t x = 0; x < rows;) {
    int64_t y = x + 1;
    while (y < rows && y - x < 6 && nk[y] == nk[x]) y++;
    float* px = parts + x * (d + 2);
    const float* sx = sc + x * ATTN_CHUNK;
    switch (y - x) { /* the row count a constant in each, so the chains stay in registers */
      case 6: weigh_all(sx, v, 0, 6, nk[x], d, px); break;
      case 5: weigh_all(sx, v, 0, 5, nk[x], d, px); break;
      case 4: weigh_all(sx, v, 0, 4, nk[x], d, px); break;
      case 3: weigh_all(sx, v, 0, 3, nk[x], d, px); break;
      case 2: weigh_all(sx, v, 0, 2, nk[x], d, px); break;
      default: weigh_all(sx, v, 0, 1, nk[x], d, px); break;
    }
    x = y;
  }
}
/* A chunk function (chunk512, chunk256) for each size of head group and both caches, G and half
   constants in each, and the table of them, NAME##_of[half][G - 1]. */
typedef void ChunkFn(const float* q, const void* k, const void* v, int64_t n, int64_t d,
                     float scale, float* sc, float* parts);
#define CHUNK_FN(TARGET, NAME, G, half)                                                          \
  TARGET static void NAME##_##G##_##half(const float* q, const void* k, const void* v,           \
                                         int64_t n, int64_t d, float scale, float* sc,          \
                                         float* parts) {                                        \
    NAME(q, k, v, half, G, n, d, scale, sc, parts);                                              \
  }
#define CHUNK_TABLE(TARGET, NAME)                                                                \
  CHUNK_FN(TARGET, NAME, 1, 0)                                                                   \
  CHUNK_FN(TARGET, NAME, 2, 0)                                                                   \
  CHUNK_FN(TARGET, NAME, 3, 0)                                                                   \
  CHUNK_FN(TARGET, NAME, 1, 1)                                                                   \
  CHUNK_FN(TARGET, NAME, 2, 1)                                                                   \
  CHUNK_FN(TARGET, NAME, 3, 1)                                                                   \
  static ChunkFn* const NAME##_of[2][3] = {{NAME##_1_0, NAME##_2_0, NAME##_3_0},                 \
                                           {NAME##_1_1, NAME##_2_1, NAME##_3_1}};
CHUNK_TABLE(AVX512, chunk512)
/* ---- AVX2 + FMA: the same steps 8 lanes wide ------------------------------------------------ */
AVX2 static inline float hsum256(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AVX2 INLINE __m256 load256(const void* x, int64_t i, int half) {
  if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)x + i)));
  return _mm256_loadu_ps((const float*)x + i);
}

/* The 8 keys' scores from their chains (lane l of key c's chain a[c] summing dims l, l + 8, …):
   hadd pairs twice, each 128-bit half then holding 4 keys' partial sums, and the halves added,
   so key c's score is ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) of its lanes, times scale.
   scores_block256 reproduces this tree for a prompt. */
AVX2 INLINE __m256 lane_sums256(const __m256* a, float scale) {
  __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                           _mm256_permute2f128_ps(u0, u1, 0x31));
  return _mm256_mul_ps(r, _mm256_set1_ps(scale));
}

/* A row's softmax over its n scores p[0:n] (max mx): p[j] ← e^(p[j] − mx), 8 at a time from
   j = 0 (the last few with expf), and part = [mx, Σ e] (the sum lane-wise, then hsum256, then the
   last few). Both schedules call this one function, so they round alike. */
AVX2 INLINE void softmax256(float* p, int64_t n, float mx, float* part) {
  __m256 sum = _mm256_setzero_ps(), m = _mm256_set1_ps(mx);
  float tail = 0.f;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), m));
    _mm256_storeu_ps(p + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  for (; j < n; j++) tail += p[j] = expf(p[j] - mx);
  part[0] = mx, part[1] = hsum256(sum) + tail;
}

/* Columns i0 .. i0 + 8w of R rows' weighted values Σ_j p_rj · V[j] (p: sc's rows, ATTN_CHUNK
   apart), into their parts (d + 2 apart): R·w chains along the keys, each value read once for
   the R rows (a decode step: one head; a prompt's block: its queries' heads). */
AVX2 INLINE void weigh_values256(const float* sc, const void* v, int half, int R, int64_t n,
                                 int64_t d, int64_t i0, int w, float* parts) {
  __m256 acc[6][8];
  for (int h = 0; h < R; h++)
    for (int c = 0; c < w; c++) acc[h][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j++) {
    __m256 vj[8];
    for (int c = 0; c < w; c++) vj[c] = load256(v, j * d + i0 + 8 * c, half);
    for (int h = 0; h < R; h++) {
      __m256 pj = _mm256_set1_ps(sc[h * ATTN_CHUNK + j]);
      for (int c = 0; c < w; c++) acc[h][c] = _mm256_fmadd_ps(pj, vj[c], acc[h][c]);
    }
  }
  for (int h = 0; h < R; h++)
    for (int c = 0; c < w; c++) _mm256_storeu_ps(parts + h * (d + 2) + 2 + i0 + 8 * c, acc[h][c]);
}

/* weigh_values256 over all d columns, 16 at a time (R ≤ 6: 2·R chains and two loads in the 16
   registers) */
AVX2 INLINE void weigh_all256(const float* sc, const void* v, int half, int R, int64_t n,
                              int64_t d, float* parts) {
  for (int64_t i0 = 0; i0 < d; i0 += 16) {
    if (d - i0 >= 16) weigh_values256(sc, v, half, R, n, d, i0, 2, parts);
    else weigh_values256(sc, v, half, R, n, d, i0, 1, parts);
  }
}

/* The largest of x's 8 lanes */
AVX2 static inline float hmax256(__m256 x) {
  float b8[8], mx = -INFINITY;
  _mm256_storeu_ps(b8, x);
  for (int c = 0; c < 8; c++) mx = b8[c] > mx ? b8[c] : mx;
  return mx;
}

/* 4 keys' scores from their chains a[0..3]: the first half of lane_sums256's tree (hadd pairs
   twice), the halves added: the same numbers, 4 keys at a time. */
AVX2 INLINE __m128 lane_sums4(const __m256* a, float scale) {
  __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
  return _mm_mul_ps(r, _mm_set1_ps(scale));
}

/* chunk512's chunk 8 lanes wide for G ≤ 3 query heads that share a kv head (q: G × d), reading
   each key and value once for all G; d a multiple of 8; sc G × ATTN_CHUNK floats, parts as
   chunk512's. One head scores 8 keys at a time (8 chains along d, lane_sums256's tree), two or
   three heads 4 keys each (8 or 12 chains, the same tree's first half, lane_sums4); a last group
   short of keys repeats key n − 1 in the missing places and keeps only the real keys' scores,
   so every key is summed in the same tree, as scores_block256 sums it for a prompt. The weighted
   values 64 columns at a time for one head, 16 for two or three (8 or 6 chains along the
   keys). */
AVX2 INLINE void chunk256(const float* q, const void* k, const void* v, int half, int G,
                          int64_t n, int64_t d, float scale, float* sc, float* parts) {
  const int K = G == 1 ? 8 : 4; /* keys a group */
  __m256 best[3];
  for (int h = 0; h < G; h++) best[h] = _mm256_set1_ps(-INFINITY);
  int64_t row = d * (half ? 2 : 4); /* bytes a key */
  ask_first(k, row);
  for (int64_t j = 0; j < n; j += K) {
    int64_t last = n - 1 - j < K - 1 ? n - 1 - j : K - 1; /* keys j .. j + last are real */
    if (j % 8 == 0) ask_ahead(k, v, row, j, n); /* (8 keys a call) */
    __m256 a[3][8];
    for (int h = 0; h < G; h++)
#pragma GCC unroll 8
      for (int c = 0; c < K; c++) a[h][c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
#pragma GCC unroll 8
      for (int c = 0; c < K; c++) {
        __m256 kc = load256(k, (j + (c < last ? c : last)) * d + i, half);
        for (int h = 0; h < G; h++) a[h][c] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + i), kc, a[h][c]);
      }
    }
    for (int h = 0; h < G; h++) {
      float* out = sc + h * ATTN_CHUNK + j;
      __m256 r;
      if (K == 8) r = lane_sums256(a[h], scale);
      else r = _mm256_castps128_ps256(lane_sums4(a[h], scale));
      if (last == K - 1 && K == 8) _mm256_storeu_ps(out, r);
      else if (last == K - 1) _mm_storeu_ps(out, _mm256_castps256_ps128(r));
      else {
        float r8[8];
        _mm256_storeu_ps(r8, r);
        memcpy(out, r8, sizeof(float) * (size_t)(last + 1));
      }
      if (K == 4) r = _mm256_insertf128_ps(r, _mm256_castps256_ps128(r), 1); /* (no stray lanes) */
      best[h] = _mm256_max_ps(best[h], r); /* the repeats: key n − 1's own score */
    }
  }
  for (int h = 0; h < G; h++) softmax256(sc + h * ATTN_CHUNK, n, hmax256(best[h]), parts + h * (d + 2));
  if (G == 1)
    for (int64_t i0 = 0; i0 < d; i0 += 64) { /* 64 columns: 8 accumulators */
      if (d - i0 >= 64) weigh_values256(sc, v, half, 1, n, d, i0, 8, parts);
      else weigh_values256(sc, v, half, 1, n, d, i0, (int)((d - i0) / 8), parts);
    }
  else weigh_all256(sc, v, half, G, n, d, parts);
}

CHUNK_TABLE(AVX2, chunk256)
/* The scores of R rows of queries (q: R × d, rows d apart) for KB groups of 8 keys of a
   transposed chunk (kt: d × ATTN_CHUNK, key j's dim i at kt[i·ATTN_CHUNK + j]), into sc (rows
   ATTN_CHUNK apart), the same numbers as chunk256's: lane l of a key's chain sums dims l,
   l + 8, … in order (here the key's lane in the register of dim-lane l: R·KB chains along d a
   lane), then lane_sums256's tree ((P0 + P1) + (P2 + P3)) + ((P4 + P5) + (P6 + P7)), times
   scale, as vertical adds, the partial sums waiting in `hold`. */
AVX2 INLINE void scores_block256(const float* q, int R, const float* kt, int KB, int64_t d,
                                 float scale, float* sc) {
  __m256 hold[3][4][2];
#pragma GCC unroll 8
  for (int l = 0; l < 8; l++) { /* unrolled: the tree's step a constant in each copy */
    __m256 p[4][2];
    for (int r = 0; r < R; r++)
      for (int b = 0; b < KB; b++) p[r][b] = _mm256_setzero_ps();
    for (int64_t i = l; i < d; i += 8) {
      __m256 kv[2];
      for (int b = 0; b < KB; b++) kv[b] = _mm256_loadu_ps(kt + i * ATTN_CHUNK + 8 * b);
      for (int r = 0; r < R; r++) {
        __m256 qi = _mm256_broadcast_ss(q + r * d + i);
        for (int b = 0; b < KB; b++) p[r][b] = _mm256_fmadd_ps(qi, kv[b], p[r][b]);
      }
    }
    for (int r = 0; r < R; r++)
      for (int b = 0; b < KB; b++) {
        __m256 x = p[r][b];
        switch (l) {
          case 0: hold[0][r][b] = x; break;                                 /* P0 */
          case 1: hold[0][r][b] = _mm256_add_ps(hold[0][r][b], x); break;   /* P0 + P1 */
          case 2: hold[1][r][b] = x; break;
          case 3: /* s0123 */
            hold[0][r][b] = _mm256_add_ps(hold[0][r][b], _mm256_add_ps(hold[1][r][b], x));
            break;
          case 4: hold[1][r][b] = x; break;
          case 5: hold[1][r][b] = _mm256_add_ps(hold[1][r][b], x); break;   /* P4 + P5 */
          case 6: hold[2][r][b] = x; break;
          default: {
            __m256 s67 = _mm256_add_ps(hold[2][r][b], x);
            __m256 score = _mm256_add_ps(hold[0][r][b], _mm256_add_ps(hold[1][r][b], s67));
            _mm256_storeu_ps(sc + r * ATTN_CHUNK + 8 * b, _mm256_mul_ps(score, _mm256_set1_ps(scale)));
          }
        }
      }
  }
}

/* Scores of `rows` rows of queries for keys 0 .. 8·groups of a transposed chunk: blocks of four
   rows and two groups of keys (8 chains, two loads and four broadcasts for 8 multiply-adds). */
AVX2 static void scores256(const float* q, int64_t rows, const float* kt, int64_t groups,
                           int64_t d, float scale, float* sc) {
  for (int64_t g = 0; g < groups; g += 2)
    for (int64_t r = 0; r < rows; r += 4) {
      const float* qr = q + r * d;
      float* out = sc + r * ATTN_CHUNK + 8 * g;
      const float* kg = kt + 8 * g;
      int few = rows - r < 4 ? (int)(rows - r) : 0, two = groups - g >= 2;
      if (!few && two) scores_block256(qr, 4, kg, 2, d, scale, out); /* the common case */
      else if (two) scores_block256(qr, few, kg, 2, d, scale, out);
      else scores_block256(qr, few ? few : 4, kg, 1, d, scale, out);
    }
}

/* 8 rows of 8 floats (rows ≥ `real` read as zeros) transposed: dst[i·ds + j] = src[j·ss + i] */
AVX2 static void transpose8(const float* src, int64_t ss, int real, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; i++) r[i] = i < real ? _mm256_loadu_ps(src + i * ss) : _mm256_setzero_ps();
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; i++) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + i * ds, t[i]);
}

/* A chunk's n keys (k: n × d, fp32) as kt: d × ATTN_CHUNK, the keys past n up to a multiple of
   8 zero. */
AVX2 static void transpose_keys256(const float* k, int64_t n, int64_t d, float* kt) {
  for (int64_t j = 0; j < n; j += 8)
    for (int64_t i = 0; i < d; i += 8)
      transpose8(k + j * d + i, d, n - j < 8 ? (int)(n - j) : 8, kt + i * ATTN_CHUNK + j, ATTN_CHUNK);
}

/* block512 8 lanes wide: a prompt block's step 2 for one chunk on AVX2, the same numbers as
   chunk256 gives each row alone (a decode step): scores by scores256 on the transposed keys,
   then softmax256 and weigh_values256 on runs of rows with the same nk, up to six rows a pass. */
AVX2 static void block256(const float* q, int64_t rows, const int64_t* nk, const float* k,
                          const float* v, int64_t d, float scale, float* kt, float* sc,
                          float* parts) {
  int64_t n_max = nk[rows - 1];
  transpose_keys256(k, n_max, d, kt);
  scores256(q, rows, kt, (n_max + 7) / 8, d, scale, sc);
  for (int64_t x = 0; x < rows; x++) {
    float* p = sc + x * ATTN_CHUNK;
    int64_t n = nk[x], j = 0;
    __m256 best = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= n; j += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(p + j));
    float mx = hmax256(best);
    for (; j < n; j++) mx = p[j] > mx ? p[j] : mx;
    softmax256(p, n, mx, parts + x * (d + 2));
  }
  for (int64_t x = 0; x < rows;) {
    int64_t y = x + 1;
    while (y < rows && y - x < 6 && nk[y] == nk[x]) y++;
    float* px = parts + x * (d + 2);
    const float* sx = sc + x * ATTN_CHUNK;
    switch (y - x) { /* the row count a constant in each, so the chains stay in registers */
      case 6: weigh_all256(sx, v, 0, 6, nk[x], d, px); break;
      case 5: weigh_all256(sx, v, 0, 5, nk[x], d, px); break;
      case 4: weigh_all256(sx, v, 0, 4, nk[x], d, px); break;
      case 3: weigh_all256(sx, v, 0, 3, nk[x], d, px); break;
      case 2: weigh_all256(sx, v, 0, 2, nk[x], d, px); break;
      default: weigh_all256(sx, v, 0, 1, nk[x], d, px); break;
    }
    x = y;
  }
}
/* fp32 → fp16, 8 at a time, rounded to nearest even (float_to_half's rounding) */
AVX2 static void float_rows_f16c(const float* x, int64_t count, uint16_t* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm_storeu_si128((__m128i*)(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < count; i++) out[i] = (uint16_t)_cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}
/* fp16 → fp32, 8 at a time (exact: every half is a float) */
AVX2 static void half_rows_f16c(const uint16_t* h, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
  for (; i < count; i++) out[i] = half_to_float(h[i]);
}
#endif

static inline float cache_at(const void* x, int64_t i, int half) {
  return half ? half_to_float(((const uint16_t*)x)[i]) : ((const float*)x)[i];
}

static void chunk_scalar(const float* q, const void* k, const void* v, int half, int64_t n,
                         int64_t d, float scale, float* sc, float* part) {
  float mx = -INFINITY, sum = 0.f;
  for (int64_t j = 0; j < n; j++) {
    float acc = 0.f;
    for (int64_t i = 0; i < d; i++) acc += q[i] * cache_at(k, j * d + i, half);
    sc[j] = acc * scale;
    mx = sc[j] > mx ? sc[j] : mx;
  }
  for (int64_t j = 0; j < n; j++) sum += sc[j] = expf(sc[j] - mx);
  for (int64_t i = 0; i < d; i++) {
    float acc = 0.f;
    for (int64_t j = 0; j < n; j++) acc += sc[j] * cache_at(v, j * d + i, half);
    part[2 + i] = acc;
  }
  part[0] = mx, part[1] = sum;
}

/* One chunk of keys for the G query heads that share a kv head, on this machine's path: head h's
   part into parts + h·(d + 2) = [m, l, acc[0:d]]. q: the G rotated queries [G, d]; k and v: n
   rows of d, fp32 or (half) fp16, the same numbers either way; sc: 3·ATTN_CHUNK floats. */
static void chunk(const float* q, const void* k, const void* v, int half, int64_t G, int64_t n,
                  int64_t d, float scale, float* sc, float* parts) {
#if defined(__x86_64__)
  int path = kernel_path();
  /* (AVX-VNNI takes the AVX2 functions: this is fp32 work) */
  ChunkFn* const(*of)[3] = WIDE512(path) && d % 16 == 0 ? chunk512_of
                           : (path == PATH_AVX2 || path == PATH_AVXVNNI) && d % 8 == 0
                               ? chunk256_of
                               : NULL;
  if (of) {
    for (int64_t h = 0; h < G;) { /* up to three heads a pass (four: two and two) */
      int64_t g = G - h == 4 ? 2 : G - h < 3 ? G - h : 3;
      of[half != 0][g - 1](q + h * d, k, v, n, d, scale, sc, parts + h * (d + 2));
      h += g;
    }
    return;
  }
#endif
  for (int64_t h = 0; h < G; h++) {
    const float* qh = q + h * d;
    float* ph = parts + h * (d + 2);
    chunk_scalar(qh, k, v, half, n, d, scale, sc, ph);
  }
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

/* float → IEEE half, rounded to nearest even: the portable path's; the others use F16C's vcvtps2ph,
   which rounds the same way (a test compares the caches the paths write). */
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
#if defined(__x86_64__)
    if (kernel_path() != PATH_PORTABLE) {
      float_rows_f16c(rotated, d, kd);
      float_rows_f16c(v, d, vd);
      continue;
    }
#endif
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
  int wide = 0; /* the block's rows together (block512, block256), up to 8 heads a group */
#if defined(__x86_64__)
  int path = kernel_path();
  if (WIDE512(path) && d % 16 == 0 && group <= 8) wide = 512;
  else if ((path == PATH_AVX2 || path == PATH_AVXVNNI) && d % 8 == 0 && group <= 8) wide = 256;
#endif
  int64_t lines = wide ? rows * group : 3; /* score rows */
  size_t floats = (size_t)(lines * ATTN_CHUNK) +
                  (size_t)(rows * group * d + (rows + 1) * group * (d + 2)) +
                  (size_t)(wide ? rows * group * (d + 2) + ATTN_CHUNK * d : 0) +
                  (a->kv16 ? 2 * ATTN_CHUNK * (size_t)d : 0);
  float* sc = malloc(sizeof(float) * floats + 64);
  if (!sc) {
    *a->failed = 1; /* the op returns an error */
    return;
  }
  float *q = sc + lines * ATTN_CHUNK, *part = q + rows * group * d;
  float* state = part + group * (d + 2);
  float *kbuf = state + rows * group * (d + 2), *vbuf = kbuf + ATTN_CHUNK * d;
  float *parts = a->kv16 ? vbuf + ATTN_CHUNK * d : kbuf, *kt = parts + rows * group * (d + 2);
  const void *kc = head_cache(a, a->key, b, g), *vc = head_cache(a, a->value, b, g);
  for (int64_t s = s0; s < s1; s++)
    if (n[s - s0] > 0) rotated_queries(a, b, g, s, q + (s - s0) * group * d);
  for (int64_t c0 = 0; c0 < n_max; c0 += ATTN_CHUNK) {
    int64_t width = n_max - c0 < ATTN_CHUNK ? n_max - c0 : ATTN_CHUNK;
    const float *k = cache_rows(a, kc, c0, width, kbuf), *v = cache_rows(a, vc, c0, width, vbuf);
#if defined(__x86_64__)
    if (wide) {
      int64_t first = 0, nk[ATTN_QUERIES * 8]; /* group ≤ 8 (wide) */
      while (n[first] <= c0) first++; /* n non-decreasing: the rows with keys here, a suffix */
      int64_t lines_here = (rows - first) * group;
      for (int64_t r = first; r < rows; r++)
        for (int64_t i = 0; i < group; i++)
          nk[(r - first) * group + i] = n[r] - c0 < ATTN_CHUNK ? n[r] - c0 : ATTN_CHUNK;
      if (wide == 512) block512(q + first * group * d, lines_here, nk, k, v, d, a->scale, kt, sc, parts);
      else block256(q + first * group * d, lines_here, nk, k, v, d, a->scale, kt, sc, parts);
      for (int64_t x = 0; x < lines_here; x++)
        merge(state + (first * group + x) * (d + 2), parts + x * (d + 2), d, c0 == 0);
      continue;
    }
#endif
    for (int64_t r = 0; r < rows; r++) {
      if (n[r] <= c0) continue;
      int64_t nk = n[r] - c0 < ATTN_CHUNK ? n[r] - c0 : ATTN_CHUNK;
      chunk(q + r * group * d, k, v, 0, group, nk, d, a->scale, sc, part);
      for (int64_t i = 0; i < group; i++)
        merge(state + (r * group + i) * (d + 2), part + i * (d + 2), d, c0 == 0);
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
  float* sc = malloc(sizeof(float) * (3 * ATTN_CHUNK + (size_t)(group * d)) + 64);
  if (!sc) {
    *a->failed = 1;
    return;
  }
  float* q = sc + 3 * ATTN_CHUNK;
  size_t at = (size_t)(c0 * d) * (a->kv16 ? 2 : 4); /* bytes: the cache read in place */
  const char *k = (const char*)head_cache(a, a->key, b, g) + at;
  const char *v = (const char*)head_cache(a, a->value, b, g) + at;
  rotated_queries(a, b, g, 0, q);
  chunk(q, k, v, a->kv16, group, nk, d, a->scale, sc, part_of(a, bg, c, 0));
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
