/* matmul.c: Y = A · Wᵀ from the packed tiles of tiles.h — MatMulQ4, MatMulQ8, the SwiGLU of a
 * fused gate/up projection, and GatherQ8 — on AVX-512 VNNI where the CPU has it, else in
 * portable C with the same arithmetic. */
#include "tiles.h"

void quantize_rows(const float* a, int64_t m, int64_t k, int8_t* q, float* d, float* s,
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

int fast_path(void) {
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
void run_chunk(void* data, size_t i) {
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

/* The tile layout, for the packer (export/quant/native.py): 0 rows per tile, 1 block width,
   2 bytes of a 4-bit tile, 3 bytes of an 8-bit tile; -1 for anything else. */
int64_t llamaonnx_layout(int what) {
  switch (what) {
    case 0: return ROWS;
    case 1: return BLOCK;
    case 2: return TILE;
    case 3: return TILE8;
    default: return -1;
  }
}

