/* llamaonnx's CPU kernel library for onnxruntime: ops `MatMulQ4`, `MatMulQ8` and `GatherQ8` of
 * domain `ai.llamaonnx`.
 *
 * Y[.., N] = A[.., K] · Wᵀ for 4-bit weights in blocks of 32 along K, each block
 * W[n, b·32 + j] = d[n, b] · q[n, b, j] + m[n, b]   (q in 0..15)
 * which holds GGUF's Q4_1 exactly (d and m are its fp16 scale and minimum) and every
 * MatMulNBits block too (m = −d·zero_point). onnxruntime's MatMulNBits cannot hold the fractional
 * m without extra inputs (see export/quant/blocks.py), and its batch-1 path runs far below this
 * machine's memory bandwidth; this kernel reads each weight byte once per step.
 *
 * Activations are quantized per block of 32 to int8 (scale max|a|/127), as llama.cpp's Q4_1 path
 * and MatMulNBits' accuracy level 4 do. The error that costs is then Σ_j d·q_j·ε_j (ε the
 * activation's rounding): with codes 0..15 it is dominated by its constant part, so each block
 * also carries z, the code nearest zero weight (MatMulNBits' zero point), and the kernel computes
 *   y = d·da·Σ q·â_int + m·S + z·d·(S − da·Σ â_int)
 * with S the exact float block sum: the same as Σ (d·(q − z))·â + (m + z·d)·S, whose error is
 * Σ d·(q − z)·ε — what centred codes give, without signed codes.
 *
 * B, the packed weights, uint8 [N/16, K/32, 336]: one tile per 16 output rows and one K block —
 *   bytes   0..255  codes: byte v·64 + r·4 + i (v 0..3, r the row 0..15, i 0..3) holds
 *                   q[r, 8v + i] in its low nibble and q[r, 8v + 4 + i] in its high nibble,
 *                   so one 64-byte load gives 16 rows × 4 codes twice (what vpdpbusd reads);
 *   bytes 256..287  d of the 16 rows, fp16;
 *   bytes 288..319  m of the 16 rows, fp16;
 *   bytes 320..335  z of the 16 rows, uint8.
 *
 * MatMulQ4SwiGLU(A, B): the SwiGLU of a fused gate/up projection, silu(A·Gᵀ) ⊙ (A·Uᵀ), from
 * tiles of [G; U] stacked along N (output N/2): the Split, Sigmoid and two Muls that would follow
 * cost more per token than the arithmetic itself.
 *
 * MatMulQ8, the 8-bit LM head: W[n, b·32 + j] = d[n, b]·(c[n, b, j] − z[n, b]), c in 0..255 (GGUF's
 * Q8_0 is c = q + 128, z = 128). B uint8 [N/16, K/32, 560]: bytes v·64 + r·4 + i (v 0..7) hold
 * c[r, 4v + i]; 512..543 d (fp16); 544..559 z. GatherQ8(B, ids) reads rows of the same tiles: the
 * token embedding when it is tied to the head (one copy of the codes for both).
 *
 * export/quant/native.py writes both; tests/test_native.py checks this file against numpy.
 *
 * The onnxruntime C API is used through its function table (OrtApi): the library declares the
 * few entries it calls by their index, which onnxruntime keeps stable across releases (the
 * table only grows). `llamaonnx_check` (called by the runtime's tests) and RegisterCustomOps
 * confirm the table is the expected one before anything else is called.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define TILE 336
#define ROWS 16
#define BLOCK 32

/* ---- the kernel ------------------------------------------------------------------------- */

typedef struct {
  const uint8_t* w;     /* packed B */
  const int8_t* aq;     /* [M, K] quantized activations */
  const float* ad;      /* [M, nb] activation scales */
  const float* as;      /* [M, nb] exact float block sums S */
  const float* ae;      /* [M, nb] S − da·Σ â_int, what int8 rounding lost of S */
  float* y;             /* [M, N] */
  int64_t m, k, n, nb, groups, chunk;
  int bits;       /* 4: MatMulQ4 tiles, 8: MatMulQ8 tiles */
  int swiglu;     /* y [M, N/2] = silu(gate) ⊙ up, the rows computed into `scratch` [M, N] */
  float* scratch;
} Job;

#define TILE8 560

static float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal */
      int e = -1;
      do { e++; man <<= 1; } while (!(man & 0x400));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static void quantize_rows(const float* a, int64_t m, int64_t k, int8_t* q, float* d, float* s,
                          float* e) {
  int64_t nb = k / BLOCK;
  for (int64_t r = 0; r < m; r++) {
    for (int64_t b = 0; b < nb; b++) {
      const float* x = a + r * k + b * BLOCK;
      float amax = 0.f, sum = 0.f;
      for (int j = 0; j < BLOCK; j++) {
        float v = fabsf(x[j]);
        amax = v > amax ? v : amax;
        sum += x[j];
      }
      float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t qsum = 0;
      for (int j = 0; j < BLOCK; j++) {
        int8_t v = (int8_t)nearbyintf(x[j] * inv);
        q[r * k + b * BLOCK + j] = v;
        qsum += v;
      }
      d[r * nb + b] = scale;
      s[r * nb + b] = sum;
      e[r * nb + b] = sum - scale * (float)qsum;
    }
  }
}

/* Portable path: the same arithmetic, one row at a time (machines without AVX-512 VNNI). */
static void rows_scalar(const Job* j, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; g++) {
    for (int64_t t = 0; t < j->m; t++) {
      float acc[ROWS] = {0}, off[ROWS] = {0};
      for (int64_t b = 0; b < j->nb; b++) {
        const uint8_t* p = j->w + (g * j->nb + b) * TILE;
        const int8_t* a = j->aq + t * j->k + b * BLOCK;
        float da = j->ad[t * j->nb + b], sa = j->as[t * j->nb + b], ea = j->ae[t * j->nb + b];
        for (int r = 0; r < ROWS; r++) {
          int32_t dot = 0;
          for (int v = 0; v < 4; v++)
            for (int i = 0; i < 4; i++) {
              uint8_t byte = p[v * 64 + r * 4 + i];
              dot += (byte & 15) * a[8 * v + i] + (byte >> 4) * a[8 * v + 4 + i];
            }
          uint16_t dh, mh;
          memcpy(&dh, p + 256 + 2 * r, 2);
          memcpy(&mh, p + 288 + 2 * r, 2);
          acc[r] += (float)dot * (half_to_float(dh) * da);
          off[r] += half_to_float(mh) * sa + (float)p[320 + r] * half_to_float(dh) * ea;
        }
      }
      for (int r = 0; r < ROWS; r++) j->y[t * j->n + g * ROWS + r] = acc[r] + off[r];
    }
  }
}

static void rows_scalar_q8(const Job* j, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; g++) {
    for (int64_t t = 0; t < j->m; t++) {
      float acc[ROWS] = {0};
      for (int64_t b = 0; b < j->nb; b++) {
        const uint8_t* p = j->w + (g * j->nb + b) * TILE8;
        const int8_t* a = j->aq + t * j->k + b * BLOCK;
        int64_t ib = t * j->nb + b;
        float da = j->ad[ib], qs = j->as[ib] - j->ae[ib]; /* da·Σ â_int */
        for (int r = 0; r < ROWS; r++) {
          int32_t dot = 0;
          for (int v = 0; v < 8; v++)
            for (int i = 0; i < 4; i++) dot += p[v * 64 + r * 4 + i] * a[4 * v + i];
          uint16_t dh;
          memcpy(&dh, p + 512 + 2 * r, 2);
          acc[r] += half_to_float(dh) * ((float)dot * da - (float)p[544 + r] * qs);
        }
      }
      for (int r = 0; r < ROWS; r++) j->y[t * j->n + g * ROWS + r] = acc[r];
    }
  }
}

#if defined(__x86_64__)
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

/* T tokens (1..4) share each unpacked tile: 16 rows × 32 codes in 8 registers. */
AVX512 static inline void tile_tokens(const Job* j, int64_t g, int64_t t0, int T) {
  const __m512i lo = _mm512_set1_epi8(0x0F);
  __m512 acc[4], off[4];
  for (int t = 0; t < T; t++) acc[t] = off[t] = _mm512_setzero_ps();
  const uint8_t* p = j->w + g * j->nb * TILE;
  for (int64_t b = 0; b < j->nb; b++, p += TILE) {
    __m512i c[8];
    for (int v = 0; v < 4; v++) {
      __m512i x = _mm512_loadu_si512((const void*)(p + v * 64));
      c[2 * v] = _mm512_and_si512(x, lo);
      c[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), lo);
    }
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 256)));
    __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 288)));
    __m512 zd = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 320)))), d);
    for (int t = 0; t < T; t++) {
      const int32_t* a = (const int32_t*)(j->aq + (t0 + t) * j->k + b * BLOCK);
      __m512i s = _mm512_setzero_si512();
      for (int v = 0; v < 8; v++) s = _mm512_dpbusd_epi32(s, c[v], _mm512_set1_epi32(a[v]));
      int64_t ib = (t0 + t) * j->nb + b;
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(j->ad[ib])),
                               acc[t]);
      off[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(j->as[ib]), off[t]);
      off[t] = _mm512_fmadd_ps(zd, _mm512_set1_ps(j->ae[ib]), off[t]);
    }
  }
  for (int t = 0; t < T; t++)
    _mm512_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS, _mm512_add_ps(acc[t], off[t]));
}

AVX512 static inline void tile_tokens_q8(const Job* j, int64_t g, int64_t t0, int T) {
  __m512 acc[4];
  for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
  const uint8_t* p = j->w + g * j->nb * TILE8;
  for (int64_t b = 0; b < j->nb; b++, p += TILE8) {
    __m512i c[8];
    for (int v = 0; v < 8; v++) c[v] = _mm512_loadu_si512((const void*)(p + v * 64));
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 512)));
    __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 544))));
    for (int t = 0; t < T; t++) {
      const int32_t* a = (const int32_t*)(j->aq + (t0 + t) * j->k + b * BLOCK);
      __m512i s = _mm512_setzero_si512();
      for (int v = 0; v < 8; v++) s = _mm512_dpbusd_epi32(s, c[v], _mm512_set1_epi32(a[v]));
      int64_t ib = (t0 + t) * j->nb + b;
      __m512 x = _mm512_fnmadd_ps(z, _mm512_set1_ps(j->as[ib] - j->ae[ib]),
                                  _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(j->ad[ib])));
      acc[t] = _mm512_fmadd_ps(d, x, acc[t]);
    }
  }
  for (int t = 0; t < T; t++) _mm512_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS, acc[t]);
}

/* One tile of either format; T is a constant wherever this is inlined. */
AVX512 static inline void tile(const Job* j, int64_t g, int64_t t0, int T) {
  if (j->bits == 8) tile_tokens_q8(j, g, t0, T);
  else tile_tokens(j, g, t0, T);
}

AVX512 static void rows_avx512(const Job* j, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; g++) {
    int64_t t = 0;
    for (; t + 4 <= j->m; t += 4) tile(j, g, t, 4);
    switch (j->m - t) {
      case 3: tile(j, g, t, 3); break;
      case 2: tile(j, g, t, 2); break;
      case 1: tile(j, g, t, 1); break;
      default: break;
    }
  }
}
#endif

static int use_avx512 = -1;

static int fast_path(void) {
#if defined(__x86_64__)
  if (use_avx512 < 0) {
    use_avx512 = __builtin_cpu_supports("avx512f") &&
                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512vnni");
  }
  return use_avx512;
#else
  return 0;
#endif
}

static void rows(const Job* j, int64_t g0, int64_t g1);

/* Chunk i of the row groups (of the gate's groups for SwiGLU: each with its up group). */
static void run_chunk(void* data, size_t i) {
  const Job* j = (const Job*)data;
  int64_t groups = j->swiglu ? j->groups / 2 : j->groups;
  int64_t g0 = (int64_t)i * j->chunk, g1 = g0 + j->chunk;
  if (g1 > groups) g1 = groups;
  if (g0 >= g1) return;
  if (!j->swiglu) {
    rows(j, g0, g1);
    return;
  }
  Job into = *j;
  into.y = j->scratch;
  rows(&into, g0, g1);
  rows(&into, g0 + groups, g1 + groups);
  int64_t half = j->n / 2;
  for (int64_t t = 0; t < j->m; t++)
    for (int64_t c = g0 * ROWS; c < g1 * ROWS; c++) {
      float g = j->scratch[t * j->n + c], u = j->scratch[t * j->n + half + c];
      j->y[t * half + c] = g / (1.f + expf(-g)) * u;
    }
}

static void rows(const Job* j, int64_t g0, int64_t g1) {
#if defined(__x86_64__)
  if (fast_path()) {
    rows_avx512(j, g0, g1);
    return;
  }
#endif
  if (j->bits == 8) rows_scalar_q8(j, g0, g1);
  else rows_scalar(j, g0, g1);
}

/* For tests and tools, without onnxruntime: y = a · Wᵀ on one thread (bits 4: MatMulQ4 tiles,
   8: MatMulQ8 tiles). Returns 0 on success. */
int llamaonnx_matmul(int bits, const float* a, int64_t m, int64_t k, const uint8_t* w, int64_t n,
                     float* y) {
  if (k % BLOCK || n % ROWS || (bits != 4 && bits != 8)) return 1;
  int64_t nb = k / BLOCK;
  int8_t* q = malloc((size_t)(m * k) + 64);
  float* d = malloc(sizeof(float) * (size_t)(m * nb) * 3 + 64);
  if (!q || !d) return free(q), free(d), 2;
  float *s = d + m * nb, *e = s + m * nb;
  quantize_rows(a, m, k, q, d, s, e);
  Job j = {w, q, d, s, e, y, m, k, n, nb, n / ROWS, n / ROWS, bits, 0, NULL};
  run_chunk(&j, 0);
  free(q), free(d);
  return 0;
}

/* 1 when the AVX-512 VNNI kernel runs here. `portable` 1 forces the portable one (tests). */
/* Rows `ids` of a MatMulQ8 weight, dequantized: out [count, K]. Returns the first bad id's
   position + 1, or 0. */
int64_t llamaonnx_gather_q8(const uint8_t* w, int64_t n, int64_t k, const int64_t* ids,
                            int64_t count, float* out) {
  int64_t nb = k / BLOCK;
  for (int64_t i = 0; i < count; i++) {
    int64_t id = ids[i];
    if (id < 0) id += n;
    if (id < 0 || id >= n) return i + 1;
    int64_t g = id / ROWS, r = id % ROWS;
    for (int64_t b = 0; b < nb; b++) {
      const uint8_t* p = w + (g * nb + b) * TILE8;
      uint16_t dh;
      memcpy(&dh, p + 512 + 2 * r, 2);
      float d = half_to_float(dh), z = (float)p[544 + r];
      for (int v = 0; v < 8; v++)
        for (int c = 0; c < 4; c++)
          out[i * k + b * BLOCK + 4 * v + c] = d * ((float)p[v * 64 + r * 4 + c] - z);
    }
  }
  return 0;
}

int llamaonnx_fast_path(int portable) {
  if (portable) use_avx512 = 0;
  else use_avx512 = -1;
  return fast_path();
}

/* ---- attention ------------------------------------------------------------------------ */
/* GroupQueryAttention as the `ort` graph uses onnxruntime's (com.microsoft): packed QKV
 * [B, S, (H + 2·Hkv)·D], rotary embedding (half-split, cos/sin tables [positions, D/2]) on q and k,
 * the new k and v written into the shared past/present buffer [B, Hkv, L, D] at each row's
 * position, then causal softmax attention over that row's cache; seqlens_k[b] + 1 is row b's total
 * length. A first prompt (total_sequence_length == S) starts at position 0; otherwise row b's new
 * tokens start at seqlens_k[b] + 1 − S. Query head h reads kv head h / (H / Hkv).
 * onnxruntime's CPU kernel spends ~40 µs a layer on a decode step of this model, mostly outside
 * the arithmetic; this one streams each row's cache once per query head. */

typedef struct {
  const float *qkv, *cos, *sin;
  float *key, *value, *out, *scores; /* scores: a T-float row per task */
  const int32_t* seqlens;
  int64_t b, s, h, hkv, d, len, rot_len, t_max;
  float scale;
  int first;
} Attn;

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

/* out[0:d] = softmax(scale · q·K[0:n]) · V[0:n], d a multiple of 16. */
AVX512 static void attend_avx512(const float* q, const float* k, const float* v, int64_t n,
                                 int64_t d, float scale, float* sc, float* out) {
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
  __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t i0 = 0; i0 < d; i0 += 64) {
    if (d - i0 >= 64) weigh_values(sc, v + i0, n, d, 4, inv, out + i0);
    else weigh_values(sc, v + i0, n, d, (int)((d - i0) / 16), inv, out + i0);
  }
}
#endif

static void attend_scalar(const float* q, const float* k, const float* v, int64_t n, int64_t d,
                          float scale, float* sc, float* out) {
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
    out[i] = acc / sum;
  }
}

static int64_t past_of(const Attn* a, int64_t b) {
  return a->first ? 0 : (int64_t)a->seqlens[b] + 1 - a->s;
}

/* Step 1, per (b, kv head): rotate the new keys and write keys and values into the cache. */
static void attn_store(void* data, size_t task) {
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

/* Step 2, per (b, query head): rotate each new query and attend over the row's cache. */
static void attn_heads(void* data, size_t task) {
  const Attn* a = (const Attn*)data;
  int64_t b = (int64_t)task / a->h, h = (int64_t)task % a->h, w = (a->h + 2 * a->hkv) * a->d;
  int64_t g = h / (a->h / a->hkv), past = past_of(a, b), total = (int64_t)a->seqlens[b] + 1;
  int64_t half = a->d / 2;
  float q[512], *sc = a->scores + task * a->t_max;
  const float* k = a->key + (b * a->hkv + g) * a->len * a->d;
  const float* v = a->value + (b * a->hkv + g) * a->len * a->d;
  for (int64_t s = 0; s < a->s; s++) {
    int64_t pos = past + s, rp = pos < a->rot_len ? pos : a->rot_len - 1;
    int64_t n = pos + 1 < total ? pos + 1 : total; /* causal, and within the row's length */
    if (n > a->len) n = a->len;
    float* o = a->out + (b * a->s + s) * a->h * a->d + h * a->d;
    if (n <= 0) {
      memset(o, 0, sizeof(float) * (size_t)a->d);
      continue;
    }
    rope(a->qkv + (b * a->s + s) * w + h * a->d, a->cos + rp * half, a->sin + rp * half, half, q);
#if defined(__x86_64__)
    if (fast_path() && a->d % 16 == 0) {
      attend_avx512(q, k, v, n, a->d, a->scale, sc, o);
      continue;
    }
#endif
    attend_scalar(q, k, v, n, a->d, a->scale, sc, o);
  }
}

/* ---- onnxruntime binding ----------------------------------------------------------------- */

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

/* OrtApi entries by index (onnxruntime_c_api.h, struct OrtApi; API version 17 and later). */
enum {
  CREATE_STATUS = 0,
  CREATE_CUSTOM_OP_DOMAIN = 26,
  CUSTOM_OP_DOMAIN_ADD = 27,
  ADD_CUSTOM_OP_DOMAIN = 28,
  GET_TENSOR_MUTABLE_DATA = 51,
  GET_DIMENSIONS_COUNT = 61,
  GET_DIMENSIONS = 62,
  GET_TENSOR_TYPE_AND_SHAPE = 65,
  KERNEL_INFO_GET_ATTRIBUTE_FLOAT = 85,
  KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86,
  KERNEL_CONTEXT_GET_INPUT = 90,
  KERNEL_CONTEXT_GET_OUTPUT = 91,
  RELEASE_STATUS = 93,
  RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
  GET_BUILD_INFO_STRING = 254,
  KERNEL_CONTEXT_PARALLEL_FOR = 274,
};
#define API_VERSION 17
#define ORT_INVALID_ARGUMENT 2
#define ORT_FAIL 1

static const void* const* api; /* the OrtApi table */
#define CALL(index, type) ((type)api[index])

typedef OrtStatus* (*create_status_fn)(int, const char*);
typedef OrtStatus* (*get_input_fn)(const OrtKernelContext*, size_t, const OrtValue**);
typedef OrtStatus* (*get_output_fn)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
typedef OrtStatus* (*type_and_shape_fn)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
typedef OrtStatus* (*dims_count_fn)(const OrtTensorTypeAndShapeInfo*, size_t*);
typedef OrtStatus* (*dims_fn)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
typedef void (*release_info_fn)(OrtTensorTypeAndShapeInfo*);
typedef OrtStatus* (*mutable_data_fn)(OrtValue*, void**);
typedef OrtStatus* (*parallel_for_fn)(const OrtKernelContext*, void (*)(void*, size_t), size_t,
                                      size_t, void*);
typedef OrtStatus* (*create_domain_fn)(const char*, OrtCustomOpDomain**);
typedef OrtStatus* (*domain_add_fn)(OrtCustomOpDomain*, const void*);
typedef OrtStatus* (*add_domain_fn)(OrtSessionOptions*, OrtCustomOpDomain*);
typedef const char* (*build_info_fn)(void);
typedef OrtStatus* (*attr_int_fn)(const OrtKernelInfo*, const char*, int64_t*);
typedef OrtStatus* (*attr_float_fn)(const OrtKernelInfo*, const char*, float*);
typedef void (*release_status_fn)(OrtStatus*);

#define TRY(expr)                 \
  do {                            \
    OrtStatus* _s = (expr);       \
    if (_s) return _s;            \
  } while (0)

static OrtStatus* error(int code, const char* msg) {
  return CALL(CREATE_STATUS, create_status_fn)(code, msg);
}

static OrtStatus* shape_of(const OrtValue* v, int64_t* dims, size_t* rank) {
  OrtTensorTypeAndShapeInfo* info;
  TRY(CALL(GET_TENSOR_TYPE_AND_SHAPE, type_and_shape_fn)(v, &info));
  OrtStatus* s = CALL(GET_DIMENSIONS_COUNT, dims_count_fn)(info, rank);
  if (!s && *rank > 8) s = error(ORT_INVALID_ARGUMENT, "MatMulQ4: rank above 8");
  if (!s) s = CALL(GET_DIMENSIONS, dims_fn)(info, dims, *rank);
  CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, release_info_fn)(info);
  return s;
}

/* Input i of a kernel call: its value, shape and data. */
typedef struct {
  const OrtValue* value;
  int64_t dims[8];
  size_t rank;
  void* data;
} Input;

static OrtStatus* input(OrtKernelContext* ctx, size_t i, Input* in) {
  TRY(CALL(KERNEL_CONTEXT_GET_INPUT, get_input_fn)(ctx, i, &in->value));
  TRY(shape_of(in->value, in->dims, &in->rank));
  return CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)((OrtValue*)in->value, &in->data);
}

typedef struct {
  int bits, swiglu;
} Kind;
static const Kind q4_kind = {4, 0}, q8_kind = {8, 0}, swiglu_kind = {4, 1};

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const Kind* kind = (const Kind*)kernel;
  int bits = kind->bits, tile = bits == 8 ? TILE8 : TILE;
  Input a, b;
  TRY(input(ctx, 0, &a));
  TRY(input(ctx, 1, &b));
  const int64_t *adims = a.dims, *bdims = b.dims;
  size_t arank = a.rank;
  if (b.rank != 3 || bdims[2] != tile)
    return error(ORT_INVALID_ARGUMENT, bits == 8 ? "MatMulQ8: B must be uint8 [N/16, K/32, 560]"
                                                 : "MatMulQ4: B must be uint8 [N/16, K/32, 336]");
  if (arank < 1 || adims[arank - 1] != bdims[1] * BLOCK)
    return error(ORT_INVALID_ARGUMENT, "MatMulQ4/Q8: A's last dimension must be K = 32 · B.shape[1]");
  if (kind->swiglu && bdims[0] % 2)
    return error(ORT_INVALID_ARGUMENT, "MatMulQ4SwiGLU: B needs as many up rows as gate rows");
  int64_t k = adims[arank - 1], n = bdims[0] * ROWS, m = 1, nb = bdims[1];
  for (size_t i = 0; i + 1 < arank; i++) m *= adims[i];
  int64_t ydims[8];
  memcpy(ydims, adims, sizeof(int64_t) * arank);
  ydims[arank - 1] = kind->swiglu ? n / 2 : n;
  OrtValue* yv;
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 0, ydims, arank, &yv));
  void* yp;
  TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(yv, &yp));
  if (m == 0) return NULL;
  int8_t* q = malloc((size_t)(m * k) + 64);
  float* d = malloc(sizeof(float) * (size_t)(m * nb * 3 + (kind->swiglu ? m * n : 0)) + 64);
  if (!q || !d) {
    free(q), free(d);
    return error(ORT_FAIL, "MatMulQ4: out of memory");
  }
  float *s = d + m * nb, *e = s + m * nb;
  quantize_rows((const float*)a.data, m, k, q, d, s, e);
  /* Chunks of row groups (for SwiGLU, of gate groups, each with its up group), spread over
     onnxruntime's intra-op threads: a few per thread so that an uneven one evens out, and at
     least 4 groups each so a chunk outweighs its dispatch. */
  int64_t groups = bdims[0], work = kind->swiglu ? groups / 2 : groups, chunk = work / 8;
  if (chunk < 4) chunk = 4;
  if (m > 1) chunk = (groups + 15) / 16; /* prefill: more, smaller chunks */
  if (chunk < 1) chunk = 1;                /* (B with no rows) */
  Job j = {(const uint8_t*)b.data, q, d, s, e, (float*)yp, m, k, n, nb, groups, chunk,
           bits, kind->swiglu, e + m * nb};
  size_t chunks = (size_t)((work + chunk - 1) / chunk);
  OrtStatus* st = chunks > 1
                      ? CALL(KERNEL_CONTEXT_PARALLEL_FOR, parallel_for_fn)(ctx, run_chunk, chunks, 0, &j)
                      : (run_chunk(&j, 0), NULL);
  free(q), free(d);
  return st;
}

static OrtStatus* compute_gather(void* kernel, OrtKernelContext* ctx) {
  (void)kernel;
  Input b, ids;
  TRY(input(ctx, 0, &b));
  TRY(input(ctx, 1, &ids));
  const int64_t *bdims = b.dims, *idims = ids.dims;
  size_t irank = ids.rank;
  if (b.rank != 3 || bdims[2] != TILE8)
    return error(ORT_INVALID_ARGUMENT, "GatherQ8: B must be uint8 [N/16, K/32, 560]");
  if (irank > 7) return error(ORT_INVALID_ARGUMENT, "GatherQ8: ids of rank above 7");
  int64_t n = bdims[0] * ROWS, k = bdims[1] * BLOCK, count = 1, odims[8];
  for (size_t i = 0; i < irank; i++) count *= idims[i], odims[i] = idims[i];
  odims[irank] = k;
  OrtValue* out;
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 0, odims, irank + 1, &out));
  void* op;
  TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(out, &op));
  if (llamaonnx_gather_q8((const uint8_t*)b.data, n, k, (const int64_t*)ids.data, count, (float*)op))
    return error(ORT_INVALID_ARGUMENT, "GatherQ8: a token id is outside the vocabulary");
  return NULL;
}

typedef struct {
  int64_t heads, kv_heads;
  float scale; /* 0: 1/sqrt(head size) */
} AttnKernel;

static OrtStatus* compute_attention(void* kernel, OrtKernelContext* ctx) {
  const AttnKernel* kern = (const AttnKernel*)kernel;
  Input in[7]; /* qkv, past key, past value, seqlens_k, total_sequence_length, cos, sin */
  for (size_t i = 0; i < 7; i++) TRY(input(ctx, i, &in[i]));
  const int64_t *qd = in[0].dims, *kd = in[1].dims, *vd = in[2].dims, *sd = in[3].dims;
  const int64_t* cd = in[5].dims;
  int64_t h = kern->heads, hkv = kern->kv_heads;
  if (in[0].rank != 3 || in[1].rank != 4 || in[2].rank != 4 || in[3].rank != 1 ||
      in[5].rank != 2 || hkv <= 0 || h % hkv)
    return error(ORT_INVALID_ARGUMENT, "GroupQueryAttention: expects qkv [B, S, (H + 2 Hkv) D], "
                                       "past key/value [B, Hkv, L, D], seqlens_k [B], cos [P, D/2]");
  int64_t b = qd[0], s = qd[1], d = qd[2] / (h + 2 * hkv), len = kd[2];
  if (d * (h + 2 * hkv) != qd[2] || d > 512 || d % 2 || kd[0] != b || kd[1] != hkv ||
      kd[3] != d || memcmp(kd, vd, sizeof(int64_t) * 4) || sd[0] != b || cd[1] * 2 != d)
    return error(ORT_INVALID_ARGUMENT, "GroupQueryAttention: inconsistent shapes");
  void *kp = in[1].data, *vp = in[2].data;
  const int32_t* seqlens = (const int32_t*)in[3].data;
  int64_t total = *(const int32_t*)in[4].data, present = total > len ? total : len;
  int first = total == s;
  for (int64_t i = 0; i < b; i++) {
    int64_t past = first ? 0 : (int64_t)seqlens[i] + 1 - s;
    if (seqlens[i] < 0 || past < 0 || seqlens[i] + 1 > present)
      return error(ORT_INVALID_ARGUMENT, "GroupQueryAttention: seqlens_k outside the cache");
  }
  int64_t od[3] = {b, s, h * d}, pd[4] = {b, hkv, present, d};
  OrtValue *ov, *pk, *pv;
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 0, od, 3, &ov));
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 1, pd, 4, &pk));
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 2, pd, 4, &pv));
  void *op, *pkp, *pvp;
  TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(ov, &op));
  TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(pk, &pkp));
  TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(pv, &pvp));
  /* present is past's own buffer when the caller binds them together (the runtime does); else
     past's rows are copied over first */
  for (int pass = 0; pass < 2; pass++) {
    const float* from = (const float*)(pass ? vp : kp);
    float* to = (float*)(pass ? pvp : pkp);
    if (from == to) continue;
    for (int64_t r = 0; r < b * hkv; r++) {
      memcpy(to + r * present * d, from + r * len * d, sizeof(float) * (size_t)(len * d));
      memset(to + (r * present + len) * d, 0, sizeof(float) * (size_t)((present - len) * d));
    }
  }
  float* scores = malloc(sizeof(float) * (size_t)(b * h * present) + 64);
  if (!scores) return error(ORT_FAIL, "GroupQueryAttention: out of memory");
  float scale = kern->scale != 0.f ? kern->scale : 1.f / sqrtf((float)d);
  Attn a = {(const float*)in[0].data, (const float*)in[5].data, (const float*)in[6].data,
            (float*)pkp, (float*)pvp,
            (float*)op, scores, seqlens, b, s, h, hkv, d, present, cd[0], present, scale, first};
  for (int64_t t = 0; t < b * hkv; t++) attn_store(&a, (size_t)t);
  OrtStatus* st = NULL;
  /* At decode the step is a read of the rows' cache (from memory: the weights streamed since
     evicted it), which two threads do at nearly twice one's bandwidth; a short cache or tiny
     model is not worth waking the other threads for. */
  if (b * hkv * total * d * 8 >= (128 << 10) || b * h * s * total * d >= (1 << 18))
    st = CALL(KERNEL_CONTEXT_PARALLEL_FOR, parallel_for_fn)(ctx, attn_heads, (size_t)(b * h), 0, &a);
  else
    for (int64_t t = 0; t < b * h; t++) attn_heads(&a, (size_t)t);
  free(scores);
  return st;
}

/* OrtCustomOp, as far as its version 16 reads (CreateKernelV2 / KernelComputeV2). */
typedef struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const struct OrtCustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const struct OrtCustomOp*);
  const char* (*GetExecutionProviderType)(const struct OrtCustomOp*);
  int (*GetInputType)(const struct OrtCustomOp*, size_t);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp*);
  int (*GetOutputType)(const struct OrtCustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const struct OrtCustomOp*, size_t);
  int (*GetOutputCharacteristic)(const struct OrtCustomOp*, size_t);
  int (*GetInputMemoryType)(const struct OrtCustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp*);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp*);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp*);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp*);
  OrtStatus* (*CreateKernelV2)(const struct OrtCustomOp*, const OrtApi*, const OrtKernelInfo*,
                               void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
} OrtCustomOp;

enum { TYPE_FLOAT = 1, TYPE_UINT8 = 2, TYPE_INT32 = 6, TYPE_INT64 = 7 };

static void* create_kernel(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info);
static OrtStatus* create_kernel_v2(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* i,
                                   void** out) {
  *out = create_kernel(op, a, i);
  return NULL;
}
static const char* name_q4(const OrtCustomOp* op) { (void)op; return "MatMulQ4"; }
static const char* name_q8(const OrtCustomOp* op) { (void)op; return "MatMulQ8"; }
static const char* name_swiglu(const OrtCustomOp* op) { (void)op; return "MatMulQ4SwiGLU"; }
static const char* name_gather(const OrtCustomOp* op) { (void)op; return "GatherQ8"; }
static const char* op_ep(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static int matmul_input(const OrtCustomOp* op, size_t i) { (void)op; return i == 0 ? TYPE_FLOAT : TYPE_UINT8; }
static int gather_input(const OrtCustomOp* op, size_t i) { (void)op; return i == 0 ? TYPE_UINT8 : TYPE_INT64; }
static size_t two(const OrtCustomOp* op) { (void)op; return 2; }
static int output_type(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return TYPE_FLOAT; }
static size_t output_count(const OrtCustomOp* op) { (void)op; return 1; }
static void compute_v1(void* k, OrtKernelContext* ctx) { (void)compute(k, ctx); }
static void gather_v1(void* k, OrtKernelContext* ctx) { (void)compute_gather(k, ctx); }
static void destroy(void* k) { (void)k; }
static int required(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return 0; }
static int default_memory(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return 0; }
static int one(const OrtCustomOp* op) { (void)op; return 1; }

#define MATMUL_OP(name)                                                                     \
  {16,     create_kernel, name,           op_ep, matmul_input, two,      output_type,       \
   output_count, compute_v1, destroy,     required, required,  default_memory, one, one, one, \
   one,    create_kernel_v2, compute}
static const OrtCustomOp matmul_q4 = MATMUL_OP(name_q4);
static const OrtCustomOp matmul_q8 = MATMUL_OP(name_q8);
static const OrtCustomOp matmul_q4_swiglu = MATMUL_OP(name_swiglu);
static const char* name_attention(const OrtCustomOp* op) { (void)op; return "GroupQueryAttention"; }
static int attention_input(const OrtCustomOp* op, size_t i) {
  (void)op;
  return i == 3 || i == 4 ? TYPE_INT32 : TYPE_FLOAT;
}
static size_t seven(const OrtCustomOp* op) { (void)op; return 7; }
static size_t three(const OrtCustomOp* op) { (void)op; return 3; }
static void attention_v1(void* k, OrtKernelContext* ctx) { (void)compute_attention(k, ctx); }
static void destroy_attention(void* k) { free(k); }
static OrtStatus* create_attention(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info,
                                   void** out) {
  (void)op, (void)a;
  AttnKernel* k = calloc(1, sizeof(AttnKernel));
  if (!k) return error(ORT_FAIL, "GroupQueryAttention: out of memory");
  OrtStatus* st = CALL(KERNEL_INFO_GET_ATTRIBUTE_INT64, attr_int_fn)(info, "num_heads", &k->heads);
  if (!st) st = CALL(KERNEL_INFO_GET_ATTRIBUTE_INT64, attr_int_fn)(info, "kv_num_heads", &k->kv_heads);
  if (st) return free(k), st;
  OrtStatus* none = CALL(KERNEL_INFO_GET_ATTRIBUTE_FLOAT, attr_float_fn)(info, "scale", &k->scale);
  if (none) { /* no scale attribute: 1/sqrt(head size) */
    CALL(RELEASE_STATUS, release_status_fn)(none);
    k->scale = 0.f;
  }
  *out = k;
  return NULL;
}
static void* create_attention_v1(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* i) {
  void* k = NULL;
  OrtStatus* st = create_attention(op, a, i, &k);
  if (st) CALL(RELEASE_STATUS, release_status_fn)(st);
  return k;
}
static const OrtCustomOp attention = {
    16,           create_attention_v1, name_attention, op_ep,    attention_input, seven,
    output_type,  three,               attention_v1,   destroy_attention, required, required,
    default_memory, one,               one,            one,      one,             create_attention,
    compute_attention,
};

static const OrtCustomOp gather_q8 = {
    16,           create_kernel, name_gather,   op_ep,    gather_input,   two,
    output_type,  output_count,  gather_v1,     destroy,  required,       required,
    default_memory, one,         one,           one,      one,            create_kernel_v2,
    compute_gather,
};

/* The kernel state is the op's weight format. */
static void* create_kernel(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info) {
  (void)a, (void)info;
  return (void*)(op == &matmul_q4 ? &q4_kind : op == &matmul_q8 ? &q8_kind : &swiglu_kind);
}

static const char* check_api(const OrtApiBase* base) {
  const OrtApi* table = base->GetApi(API_VERSION);
  if (!table) return "this onnxruntime does not offer C API version 17 (onnxruntime >= 1.17)";
  api = (const void* const*)table;
  const char* info = CALL(GET_BUILD_INFO_STRING, build_info_fn)();
  if (!info || strncmp(info, "ORT Build Info", 14) != 0)
    return "onnxruntime's C API table is not laid out as this library expects";
  return NULL;
}

/* The entry point onnxruntime calls for SessionOptions.register_custom_ops_library. */
OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  const char* problem = check_api(base);
  if (problem) {
    if (!api) return NULL; /* no table to build a status with; the op stays unregistered */
    return error(ORT_FAIL, problem);
  }
  OrtCustomOpDomain* domain;
  TRY(CALL(CREATE_CUSTOM_OP_DOMAIN, create_domain_fn)("ai.llamaonnx", &domain));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &matmul_q4));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &matmul_q8));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &matmul_q4_swiglu));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &attention));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &gather_q8));
  return CALL(ADD_CUSTOM_OP_DOMAIN, add_domain_fn)(options, domain);
}
