/* activations.c: a matmul's activation rows made ready for the tiles (Prep, tiles.h): the RMSNorm
 * folded in front of a projection, each 32-block rounded to int8 with its scale, exact sum and
 * rounding error, and for two-digit nodes what that rounding left, rounded again (on every block,
 * or on each row's few blocks of largest scale). Every path computes the same bits: the x86
 * paths' vector forms keep the portable C's operations and order. */
#include "tiles.h"

/* Each 32-block of a row: int8 codes at 127/amax, the scale, the block's sum and its rounding
   error (sum − scale·Σcodes). The sum is taken in one fixed order on every path (8 partial
   sums, lane l = x[l] + x[l+8] + x[l+16] + x[l+24], then lanes 0..7 in turn), so the paths agree
   to the bit. */
static void quantize_block(const float* x, float amax, const float part[8], int8_t* q, float* d,
                           float* s, float* e) {
  float sum = 0.f;
  for (int l = 0; l < 8; l++) sum += part[l];
  float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t qsum = 0;
  for (int j = 0; j < BLOCK; j++) {
    int8_t v = (int8_t)nearbyintf(x[j] * inv);
    q[j] = v;
    qsum += v;
  }
  *d = scale, *s = sum, *e = sum - scale * (float)qsum;
}

static void quantize_rows_scalar(const float* a, int64_t m, int64_t k, int8_t* q, int64_t qrow,
                                 int64_t qblock, float* d, float* s, float* e) {
  int64_t nb = k / BLOCK;
  for (int64_t r = 0; r < m; r++)
    for (int64_t b = 0; b < nb; b++) {
      const float* x = a + r * k + b * BLOCK;
      float amax = 0.f, part[8] = {0.f};
      for (int j = 0; j < BLOCK; j++) {
        float v = fabsf(x[j]);
        amax = v > amax ? v : amax;
        part[j % 8] += x[j];
      }
      int64_t i = r * nb + b;
      quantize_block(x, amax, part, q + r * qrow + b * qblock, d + i, s + i, e + i);
    }
}

#if defined(__x86_64__)
/* The same block by block, 8 lanes wide (AVX2; the AVX-512 path uses it too). */
AVX2 static void quantize_rows_avx2(const float* a, int64_t m, int64_t k, int8_t* q, int64_t qrow,
                                    int64_t qblock, float* d, float* s, float* e) {
  int64_t nb = k / BLOCK;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t r = 0; r < m; r++)
    for (int64_t b = 0; b < nb; b++) {
      const float* x = a + r * k + b * BLOCK;
      __m256 v[4], mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int c = 0; c < 4; c++) {
        v[c] = _mm256_loadu_ps(x + 8 * c);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[c]));
        sum = _mm256_add_ps(sum, v[c]);
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      float amax = _mm_cvtss_f32(m4), part[8], acc = 0.f;
      _mm256_storeu_ps(part, sum);
      for (int l = 0; l < 8; l++) acc += part[l];
      float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      __m256 vi = _mm256_set1_ps(inv);
      __m256i ci[4];
      for (int c = 0; c < 4; c++)
        ci[c] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[c], vi),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      /* int32 → int8 (|code| ≤ 127: the packs saturate nothing), back in element order */
      __m256i w16 = _mm256_packs_epi32(ci[0], ci[1]), x16 = _mm256_packs_epi32(ci[2], ci[3]);
      __m256i b8 = _mm256_packs_epi16(w16, x16);
      b8 = _mm256_permutevar8x32_epi32(b8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256((__m256i*)(q + r * qrow + b * qblock), b8);
      __m256i t = _mm256_add_epi32(_mm256_add_epi32(ci[0], ci[1]), _mm256_add_epi32(ci[2], ci[3]));
      __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
      t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
      t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
      int64_t i = r * nb + b;
      d[i] = scale, s[i] = acc, e[i] = acc - scale * (float)_mm_cvtsi128_si32(t4);
    }
}
#endif

/* Rows a [m, k] into q (row r's block b at r·qrow + b·qblock), d, s, e [m, k / BLOCK]. */
void quantize_rows(const float* a, int64_t m, int64_t k, int8_t* q, int64_t qrow, int64_t qblock,
                   float* d, float* s, float* e) {
#if defined(__x86_64__)
  if (kernel_path() != PATH_PORTABLE) {
    quantize_rows_avx2(a, m, k, q, qrow, qblock, d, s, e);
    return;
  }
#endif
  quantize_rows_scalar(a, m, k, q, qrow, qblock, d, s, e);
}

/* The RMSNorm in front of a projection (export/quant/norm.py folds onnxruntime's
   SkipSimplifiedLayerNormalization into the projection's node): row by row, r = x + skip (written
   to `sum` where asked), y = r / sqrt(mean(r²) + eps) · gamma, in onnxruntime's own float order
   (one running sum of squares, then divide, then scale), so that the folded graph computes what
   the unfolded one did, to the bit. Four rows at a time: each row's sum keeps its order, and the
   four chains of additions overlap. No contraction: an FMA would round the sum differently. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void skip_rms_norm_scalar(const float* x, const float* skip, const float* gamma, int64_t m,
                                 int64_t k, float eps, float* sum, float* y) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t r0 = 0; r0 < m; r0 += 4) {
    int n = m - r0 < 4 ? (int)(m - r0) : 4;
    float squares[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t h = 0; h < k; h++)
      for (int i = 0; i < n; i++) {
        int64_t at = (r0 + i) * k + h;
        float v = skip ? x[at] + skip[at] : x[at];
        if (sum) sum[at] = v;
        y[at] = v;
        squares[i] += v * v;
      }
    for (int i = 0; i < n; i++) {
      float rms = sqrtf(squares[i] / (float)k + eps);
      float* yr = y + (r0 + i) * k;
      for (int64_t h = 0; h < k; h++) yr[h] = yr[h] / rms * gamma[h];
    }
  }
}

#if defined(__x86_64__)
/* An 8 × 8 block of floats transposed: lane i of r[j] becomes lane j of r[i]. */
AVX2 static inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; j++) {
      u[i + 2 * j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + 2 * j + 1] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  for (int j = 0; j < 4; j++) {
    r[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
    r[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
  }
}

/* skip_rms_norm 8 rows at a time (AVX2; the AVX-512 path uses it too), to the same bits: the
   sums r = x + skip and the final scaling run 8 values of a row at a time (the same operation on
   each value), and the sums of squares keep a row in each lane, the rows' values transposed 8 × 8
   as they are added, so each row's sum is still one running sum in the scalar order. The scalar
   form's per-value branches and chains had made it ~11 % of the main thread's time at an 8-row
   decode step, serial, with the pool's other thread waiting (perf, this Zen 5). */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
AVX2 static void skip_rms_norm_avx2(const float* x, const float* skip, const float* gamma,
                                    int64_t m, int64_t k, float eps, float* sum, float* y) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t r0 = 0; r0 < m; r0 += 8) {
    int n = m - r0 < 8 ? (int)(m - r0) : 8;
    for (int i = 0; i < n; i++) {
      int64_t o = (r0 + i) * k, h = 0;
      for (; h + 8 <= k; h += 8) {
        __m256 v = _mm256_loadu_ps(x + o + h);
        if (skip) v = _mm256_add_ps(v, _mm256_loadu_ps(skip + o + h));
        if (sum) _mm256_storeu_ps(sum + o + h, v);
        _mm256_storeu_ps(y + o + h, v);
      }
      for (; h < k; h++) {
        float v = skip ? x[o + h] + skip[o + h] : x[o + h];
        if (sum) sum[o + h] = v;
        y[o + h] = v;
      }
    }
    __m256 sq = _mm256_setzero_ps();
    int64_t h = 0;
    for (; h + 8 <= k; h += 8) {
      __m256 t[8];
      for (int i = 0; i < 8; i++)
        t[i] = i < n ? _mm256_loadu_ps(y + (r0 + i) * k + h) : _mm256_setzero_ps();
      transpose8(t); /* t[j]: value h + j of each row */
      for (int j = 0; j < 8; j++) sq = _mm256_add_ps(sq, _mm256_mul_ps(t[j], t[j]));
    }
    float squares[8];
    _mm256_storeu_ps(squares, sq);
    for (; h < k; h++)
      for (int i = 0; i < n; i++) {
        float v = y[(r0 + i) * k + h];
        squares[i] += v * v;
      }
    for (int i = 0; i < n; i++) {
      float rms = sqrtf(squares[i] / (float)k + eps);
      const __m256 by = _mm256_set1_ps(rms);
      float* yr = y + (r0 + i) * k;
      int64_t c = 0;
      for (; c + 8 <= k; c += 8)
        _mm256_storeu_ps(yr + c, _mm256_mul_ps(_mm256_div_ps(_mm256_loadu_ps(yr + c), by),
                                               _mm256_loadu_ps(gamma + c)));
      for (; c < k; c++) yr[c] = yr[c] / rms * gamma[c];
    }
  }
}
#endif

void skip_rms_norm(const float* x, const float* skip, const float* gamma, int64_t m, int64_t k,
                   float eps, float* sum, float* y) {
#if defined(__x86_64__)
  if (kernel_path() != PATH_PORTABLE) {
    skip_rms_norm_avx2(x, skip, gamma, m, k, eps, sum, y);
    return;
  }
#endif
  skip_rms_norm_scalar(x, skip, gamma, m, k, eps, sum, y);
}

/* Two digits (a node's `digits` 2): what each row's int8 rounding left, r = x − da·â, rounded in
   its turn to int8 at 1/F of the block's scale, F = 2^shift (|r| ≤ da/2, so the codes stay
   within ±F/2), into q2 (laid out as q: beside each â, or rows of their own) and rows m.. of d,
   s, e. A residual row adds only Σ d_w·(q_w − z)·r̂ to its row's output: the row's own offset
   term already holds the exact block sums, so its S is 0 and its e (S − da·Σ â) is −da·Σ â.
   What is left of each activation is then at most 1/(2F) of its block's scale (tiles.h). No
   contraction: every path computes the same digits. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void residual_rows(const float* x, int64_t m, int64_t k, const int8_t* q, int64_t qrow,
                          int64_t qblock, const float* d, const uint8_t* keep, int shift, int8_t* q2,
                          float* d2, float* s2, float* e2) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  int64_t nb = k / BLOCK;
  const float f = (float)(1 << shift), top = f / 2.f;
  for (int64_t t = 0; t < m; t++)
    for (int64_t b = 0; b < nb; b++) {
      int64_t i = t * nb + b, at = t * k + b * BLOCK, qt = t * qrow + b * qblock;
      float da = d[i], scale = da / f, inv = da > 0.f ? f / da : 0.f;
      if (keep && !keep[i]) {
        memset(q2 + qt, 0, BLOCK), d2[i] = scale, s2[i] = 0.f, e2[i] = 0.f;
        continue;
      }
      int32_t sum = 0;
      for (int j = 0; j < BLOCK; j++) {
        float v = nearbyintf((x[at + j] - da * (float)q[qt + j]) * inv);
        int8_t c = (int8_t)(v > top ? top : v < -top ? -top : v);
        q2[qt + j] = c;
        sum += c;
      }
      d2[i] = scale, s2[i] = 0.f, e2[i] = -(scale * (float)sum);
    }
}

#if defined(__x86_64__)
/* The same 8 lanes at a time (AVX2 and AVX-512 paths): the same operations in the same order, so
   the same digits. (GCC would contract the multiply and subtract of these intrinsics too.) */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
AVX2 static void residual_rows_avx2(const float* x, int64_t m, int64_t k, const int8_t* q,
                                    int64_t qrow, int64_t qblock, const float* d,
                                    const uint8_t* keep, int shift, int8_t* q2, float* d2,
                                    float* s2, float* e2) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  int64_t nb = k / BLOCK;
  const float f = (float)(1 << shift);
  const __m256 hi = _mm256_set1_ps(f / 2.f), lo = _mm256_set1_ps(-f / 2.f);
  for (int64_t t = 0; t < m; t++)
    for (int64_t b = 0; b < nb; b++) {
      int64_t i = t * nb + b, at = t * k + b * BLOCK, qt = t * qrow + b * qblock;
      float da = d[i], scale = da / f, inv = da > 0.f ? f / da : 0.f;
      if (keep && !keep[i]) {
        memset(q2 + qt, 0, BLOCK), d2[i] = scale, s2[i] = 0.f, e2[i] = 0.f;
        continue;
      }
      __m256 vd = _mm256_set1_ps(da), vi = _mm256_set1_ps(inv);
      __m256i ci[4];
      for (int c = 0; c < 4; c++) {
        __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64((const __m128i*)(q + qt + 8 * c))));
        __m256 left = _mm256_sub_ps(_mm256_loadu_ps(x + at + 8 * c), _mm256_mul_ps(vd, code));
        __m256 v = _mm256_round_ps(_mm256_mul_ps(left, vi),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        ci[c] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
      }
      __m256i w16 = _mm256_packs_epi32(ci[0], ci[1]), x16 = _mm256_packs_epi32(ci[2], ci[3]);
      __m256i b8 = _mm256_packs_epi16(w16, x16);
      b8 = _mm256_permutevar8x32_epi32(b8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256((__m256i*)(q2 + qt), b8);
      __m256i sum = _mm256_add_epi32(_mm256_add_epi32(ci[0], ci[1]), _mm256_add_epi32(ci[2], ci[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      d2[i] = scale, s2[i] = 0.f, e2[i] = -(scale * (float)_mm_cvtsi128_si32(s4));
    }
}
#endif

/* Which blocks of rows with scales d [m, nb] keep their residual: each row's `blocks` (< nb) of
   largest scale, the first of equals before the later (blocks passes over the row: few blocks,
   few passes), as flags `keep` [m, nb]; and for each group of 4 rows (m a multiple of 4, or the
   last rows), the blocks any of them keeps, in order, then -1 (`kept`, Job.kept). A norm's
   outliers sit in the same channels token after token, so a group's are mostly one row's. */
static void select_blocks(const float* d, int64_t m, int64_t nb, int64_t blocks, uint8_t* keep,
                          int32_t* kept) {
  memset(keep, 0, (size_t)(m * nb));
  for (int64_t t = 0; t < m; t++)
    for (int64_t c = 0; c < blocks; c++) {
      int64_t best = -1;
      for (int64_t b = 0; b < nb; b++)
        if (!keep[t * nb + b] && (best < 0 || d[t * nb + b] > d[t * nb + best])) best = b;
      keep[t * nb + best] = 1;
    }
  for (int64_t t0 = 0; t0 < m; t0 += 4, kept += nb + 1) {
    int64_t c = 0;
    for (int64_t b = 0; b < nb; b++) {
      int any = 0;
      for (int64_t t = t0; t < t0 + 4 && t < m; t++) any |= keep[t * nb + b];
      if (any) kept[c++] = (int32_t)b;
    }
    kept[c] = -1;
  }
}

/* Fused digits (the residual beside each block: the x86 kernels): rows r0..r1's block scalars
   made those of the joined sum F·s + s_r, so the kernels read one token's: d the residual's
   da/F where the row keeps it (`keep`, NULL: every block; else da, the sum not joined), e both
   rows' (the residual's S is 0). */
static void fold_digits(const Prep* p, int64_t r0, int64_t r1, const uint8_t* keep) {
  if (p->qblock == BLOCK) return;
  int64_t nb = p->k / BLOCK, rest = p->m * nb;
  for (int64_t i = r0 * nb; i < r1 * nb; i++) {
    if (!keep || keep[i - r0 * nb]) p->d[i] = p->d[rest + i];
    p->e[i] += p->e[rest + i];
  }
}

/* Rows r0..r1's wide flags and scales (Job.wide, Job.wad), for each whole pass of AMX_TOKENS
   rows (a task's rows start one: Prep.rows is a multiple of AMX_TOKENS; a last part pass goes
   through the AVX-512 passes) */
static void pass_blocks(const Prep* p, int64_t r0, int64_t r1) {
  int64_t nb = p->k / BLOCK;
  const float part = 1.f / (float)(1 << p->shift);
  for (int64_t t0 = r0; t0 + AMX_TOKENS <= r1; t0 += AMX_TOKENS) {
    uint8_t* wide = p->wide + t0 / AMX_TOKENS * nb;
    memset(wide, 0, (size_t)nb);
    for (int64_t t = t0; t < t0 + AMX_TOKENS; t++)
      for (int64_t b = 0; b < nb; b++) wide[b] |= p->keep[t * nb + b];
    for (int64_t i = t0 * nb; i < (t0 + AMX_TOKENS) * nb; i++)
      p->wad[i] = wide[i % nb] && !p->keep[i] ? p->d[i] * part : p->d[i];
  }
}

/* The int8 sums over each half (16) of rows r0..r1's blocks (Prep.hs) */
static void half_sums(const Prep* p, int64_t r0, int64_t r1) {
  int64_t nb = p->k / BLOCK;
  for (int64_t t = r0; t < r1; t++)
    for (int64_t b = 0; b < nb; b++) {
      const int8_t* a = p->q + t * p->qrow + b * p->qblock;
      int32_t* h = p->hs + 2 * (t * nb + b);
      int32_t lo = 0, hi = 0;
      for (int i = 0; i < 16; i++) lo += a[i], hi += a[16 + i];
      h[0] = lo, h[1] = hi;
    }
}

/* Task i of a matmul's activation rows: their norm (where one is folded in), then their int8
   blocks (and, for two digits, their residuals'). */
void prepare_rows(void* data, size_t i) {
  const Prep* p = (const Prep*)data;
  int64_t r0 = (int64_t)i * p->rows, r1 = r0 + p->rows < p->m ? r0 + p->rows : p->m;
  if (r0 >= r1) return;
  int64_t nb = p->k / BLOCK;
  const float* a = p->a + r0 * p->k;
  if (p->gamma) {
    skip_rms_norm(a, p->skip ? p->skip + r0 * p->k : NULL, p->gamma, r1 - r0, p->k, p->eps,
                  p->sum ? p->sum + r0 * p->k : NULL, p->normed + r0 * p->k);
    a = p->normed + r0 * p->k;
  }
  int8_t* q = p->q + r0 * p->qrow;
  quantize_rows(a, r1 - r0, p->k, q, p->qrow, p->qblock, p->d + r0 * nb, p->s + r0 * nb,
                p->e + r0 * nb);
  if (p->sc) /* (a task's rows start a group of 4: `rows` is m or 8) */
    for (int64_t t = r0; t < r1; t++)
      for (int64_t b = 0; b < nb; b++) {
        float* o = p->sc + ((t / 4 * nb + b) * 4 + t % 4) * 3;
        o[0] = p->d[t * nb + b], o[1] = p->s[t * nb + b], o[2] = p->e[t * nb + b];
      }
  if (p->hs) half_sums(p, r0, r1);
  if (p->digits != 2) return;
  int64_t at = (p->m + r0) * nb;
  uint8_t* keep = p->blocks > 0 ? p->keep + r0 * nb : NULL;
  if (keep) select_blocks(p->d + r0 * nb, r1 - r0, nb, p->blocks, keep, p->kept + r0 / 4 * (nb + 1));
  /* beside each block's â (qblock 2·BLOCK), or rows M.. of their own */
  int8_t* q2 = p->qblock > BLOCK ? q + BLOCK : p->q + (p->m + r0) * p->qrow;
#if defined(__x86_64__)
  if (kernel_path() != PATH_PORTABLE)
    residual_rows_avx2(a, r1 - r0, p->k, q, p->qrow, p->qblock, p->d + r0 * nb, keep, p->shift,
                       q2, p->d + at, p->s + at, p->e + at);
  else
#endif
    residual_rows(a, r1 - r0, p->k, q, p->qrow, p->qblock, p->d + r0 * nb, keep, p->shift, q2,
                  p->d + at, p->s + at, p->e + at);
  fold_digits(p, r0, r1, keep);
  if (p->wide) pass_blocks(p, r0, r1);
  if (p->hs) half_sums(p, p->m + r0, p->m + r1); /* (Q6_K: rows of their own) */
}
