/* matmul.c: Y = A · Wᵀ from the packed tiles of tiles.h — MatMulQ4 (4- and 5-bit), MatMulQ8, the SwiGLU of a
 * fused gate/up projection, and GatherQ8 — on AVX-512 VNNI, AVX-VNNI, AVX2 or NEON where the CPU has them (the
 * choice is made when the library is first used, on the machine that runs it), else in portable
 * C, all with the same arithmetic. */
#include "tiles.h"
#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* Row r's 32 codes of a MatMulQ4 or 6-bit tile, in order (code 8v + i in the low nibble of byte
   v·64 + r·4 + i, 8v + 4 + i in its high one), with `planes` high-bit planes added (a 5-bit
   tile's fifth bits; a 6-bit tile's fifth and sixth), or CRUMBS (TILE6K's). */
static void row_codes(const uint8_t* p, int r, int planes, int q[BLOCK]) {
  for (int v = 0; v < 4; v++)
    for (int i = 0; i < 4; i++) {
      uint8_t byte = p[v * 64 + r * 4 + i];
      q[8 * v + i] = byte & 15, q[8 * v + 4 + i] = byte >> 4;
      if (planes == CRUMBS) /* registers u = 2v (low nibbles), 2v + 1 (high) */
        for (int half = 0; half < 2; half++) {
          int u = 2 * v + half;
          q[8 * v + 4 * half + i] |= ((p[256 + 64 * (u / 4) + r * 4 + i] >> (2 * (u % 4))) & 3) << 4;
        }
    }
  for (int k = 0; k < planes; k++) {
    uint64_t mask[8];
    memcpy(mask, p + FIFTH + 64 * k, sizeof mask);
    for (int v = 0; v < 4; v++)
      for (int i = 0; i < 4; i++) {
        q[8 * v + i] |= (int)((mask[2 * v] >> (r * 4 + i)) & 1) << (4 + k);
        q[8 * v + 4 + i] |= (int)((mask[2 * v + 1] >> (r * 4 + i)) & 1) << (4 + k);
      }
  }
}

/* Portable path: the same arithmetic, one row at a time (machines without AVX-512 VNNI). */
static void rows_scalar(const Job* j, int64_t g0, int64_t g1) {
  const Layout l = layout_of(j->tile);
  for (int64_t g = g0; g < g1; g++) {
    for (int64_t t = 0; t < j->m; t++) {
      float acc[ROWS] = {0}, off[ROWS] = {0};
      for (int64_t b = 0; b < j->nb; b++) {
        const uint8_t* p = tile_at(j->w, j->nb, j->tile, g, b);
        const uint8_t* ps = tile_scalars(p, b, l);
        const int8_t* a = act_block(j, t, b, 0);
        float da = j->ad[t * j->nb + b], sa = j->as[t * j->nb + b], ea = j->ae[t * j->nb + b];
        for (int r = 0; r < ROWS; r++) {
          int q[BLOCK];
          int32_t dot = 0;
          row_codes(p, r, l.five, q);
          for (int i = 0; i < BLOCK; i++) dot += q[i] * a[i];
          float dr, mr;
          if (l.k4) { /* d = D·sc, m = E·mn: exact in fp32 */
            uint16_t dh, eh;
            memcpy(&dh, k4_d(ps, b, l) + 2 * r, 2);
            memcpy(&eh, k4_e(ps, b, l) + 2 * r, 2);
            dr = half_to_float(dh) * (float)ps[l.d + r];
            mr = half_to_float(eh) * (float)ps[l.m + r];
          } else if (l.f32) {
            memcpy(&dr, p + l.d + 4 * r, 4);
            memcpy(&mr, p + l.m + 4 * r, 4);
          } else {
            uint16_t dh, mh;
            memcpy(&dh, p + l.d + 2 * r, 2);
            dr = half_to_float(dh);
            if (l.m < 0) {
              mr = -(float)l.zero * dr;
            } else {
              memcpy(&mh, p + l.m + 2 * r, 2);
              mr = half_to_float(mh);
            }
          }
          float zd = l.z == ZERO_WEIGHT ? -mr : (l.z < 0 ? (float)l.zero : (float)ps[l.z + r]) * dr;
          acc[r] += (float)dot * (dr * da);
          off[r] += mr * sa + zd * ea;
        }
      }
      for (int r = 0; r < ROWS; r++) j->y[t * j->n + g * ROWS + r] = acc[r] + off[r];
    }
  }
}

/* Row r's scales of a Q6_K block's two halves (p its codes): fp32 in the 512-byte tile, D·sc
   (exact in fp32) in the super-block one. */
static void halves_row(const uint8_t* p, int64_t b, int64_t tile, int r, float* s0, float* s1) {
  if (tile == TILE6K) {
    const uint8_t* sb = super_of(p, b, tile);
    uint16_t dh;
    memcpy(&dh, sb + K6_D + 2 * r, 2);
    *s0 = half_to_float(dh) * (float)(int8_t)sb[32 * (b & 7) + r];
    *s1 = half_to_float(dh) * (float)(int8_t)sb[32 * (b & 7) + 16 + r];
    return;
  }
  memcpy(s0, p + HALVES + 4 * r, 4);
  memcpy(s1, p + HALVES + 64 + 4 * r, 4);
}

static void rows_scalar_q6(const Job* j, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; g++) {
    for (int64_t t = 0; t < j->m; t++) {
      float acc[ROWS] = {0};
      for (int64_t b = 0; b < j->nb; b++) {
        const uint8_t* p = tile_at(j->w, j->nb, j->tile, g, b);
        const int8_t* a = act_block(j, t, b, 0);
        float da = j->ad[t * j->nb + b];
        const int32_t* h = j->hs + 2 * (t * j->nb + b);
        for (int r = 0; r < ROWS; r++) {
          int q[BLOCK];
          int32_t dot[2] = {0, 0}; /* the first 16 codes, the last 16 */
          row_codes(p, r, j->tile == TILE6K ? CRUMBS : 2, q);
          for (int i = 0; i < BLOCK; i++) dot[i / 16] += q[i] * a[i];
          float s0, s1;
          halves_row(p, b, j->tile, r, &s0, &s1);
          acc[r] += da * (s0 * (float)(dot[0] - 32 * h[0]) + s1 * (float)(dot[1] - 32 * h[1]));
        }
      }
      for (int r = 0; r < ROWS; r++) j->y[t * j->n + g * ROWS + r] = acc[r];
    }
  }
}

static void rows_scalar_q8(const Job* j, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; g++) {
    for (int64_t t = 0; t < j->m; t++) {
      float acc[ROWS] = {0};
      for (int64_t b = 0; b < j->nb; b++) {
        const uint8_t* p = j->w + (g * j->nb + b) * j->tile;
        const int8_t* a = act_block(j, t, b, 0);
        int64_t ib = t * j->nb + b;
        float da = j->ad[ib], qs = j->as[ib] - j->ae[ib]; /* da·Σ â_int */
        for (int r = 0; r < ROWS; r++) {
          int32_t dot = 0;
          for (int v = 0; v < 8; v++)
            for (int i = 0; i < 4; i++) dot += p[v * 64 + r * 4 + i] * a[4 * v + i];
          uint16_t dh;
          memcpy(&dh, p + 512 + 2 * r, 2);
          acc[r] += half_to_float(dh) * ((float)dot * da - (float)zero8(p, j->tile, r) * qs);
        }
      }
      for (int r = 0; r < ROWS; r++) j->y[t * j->n + g * ROWS + r] = acc[r];
    }
  }
}

#if defined(__x86_64__)

/* A tile's codes for its 16 rows in 8 registers (c[2v]: the low nibbles of bytes v·64.., c[2v+1]:
   their high nibbles), with `planes` high-bit planes added under their masks (a 5-bit tile's
   fifth bits; a 6-bit tile's fifth and sixth). */
AVX512 INLINE void codes512(const uint8_t* p, int planes, __m512i c[8]) {
  const __m512i lo = _mm512_set1_epi8(0x0F);
  for (int v = 0; v < 4; v++) {
    __m512i x = _mm512_loadu_si512((const void*)(p + v * 64));
    c[2 * v] = _mm512_and_si512(x, lo);
    c[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), lo);
  }
  if (planes == CRUMBS) /* (tiles.h: register u's at 256 + 64·(u / 4), bits 2·(u % 4)) */
    for (int k = 0; k < 2; k++) {
      const __m512i h = _mm512_loadu_si512((const void*)(p + 256 + 64 * k)), m = _mm512_set1_epi8(0x30);
      c[4 * k] = _mm512_or_si512(c[4 * k], _mm512_and_si512(_mm512_slli_epi16(h, 4), m));
      c[4 * k + 1] = _mm512_or_si512(c[4 * k + 1], _mm512_and_si512(_mm512_slli_epi16(h, 2), m));
      c[4 * k + 2] = _mm512_or_si512(c[4 * k + 2], _mm512_and_si512(h, m));
      c[4 * k + 3] = _mm512_or_si512(c[4 * k + 3], _mm512_and_si512(_mm512_srli_epi16(h, 2), m));
    }
  for (int k = 0; k < planes; k++) {
    const __m512i add = _mm512_set1_epi8((char)(16 << k));
    for (int u = 0; u < 8; u++) {
      uint64_t bits;
      memcpy(&bits, p + FIFTH + 64 * k + 8 * u, 8);
      c[u] = _mm512_mask_add_epi8(c[u], _cvtu64_mask64(bits), c[u], add);
    }
  }
}

/* The T tokens' integer dot products with the 16 rows of block b's codes c: s[t] (`res`: their
   residuals'; `two`: fused digits, act_block). One chain of
   eight vpdpbusd waits on each one's latency; the tokens' chains go interleaved, and a lone
   token's as two chains of four (integer sums: any order gives the same numbers). These and the
   tile functions are always inlined, so that T is a constant in their loops (GCC had left
   tile_tokens out of line, its accumulators behind a variable T). */
AVX512 INLINE void dots512(const Job* j, int64_t t0, int T, int64_t b, const __m512i c[8],
                           __m512i s[4], int two, int res) {
  const int32_t* a[4];
  for (int t = 0; t < T; t++)
    a[t] = (const int32_t*)(act_block(j, t0 + t, b, two) + (res ? BLOCK : 0));
  if (T == 1) {
    __m512i x = _mm512_setzero_si512(), y = _mm512_setzero_si512();
    for (int v = 0; v < 8; v += 2) {
      x = _mm512_dpbusd_epi32(x, c[v], _mm512_set1_epi32(a[0][v]));
      y = _mm512_dpbusd_epi32(y, c[v + 1], _mm512_set1_epi32(a[0][v + 1]));
    }
    s[0] = _mm512_add_epi32(x, y);
    return;
  }
  for (int t = 0; t < T; t++) s[t] = _mm512_setzero_si512();
  for (int v = 0; v < 8; v++)
    for (int t = 0; t < T; t++) s[t] = _mm512_dpbusd_epi32(s[t], c[v], _mm512_set1_epi32(a[t][v]));
}

/* The integer sums of a token's two digits joined, F·s + s_r, F = 2^shift (as tiles256.h's
   join): exact in int32 (|128·s| ≤ 128 · 32 · 255 · 127 < 2³¹ for 8-bit codes, the widest). */
AVX512 INLINE __m512i join512(const Job* j, __m512i s, __m512i r) {
  return _mm512_add_epi32(_mm512_sll_epi32(s, _mm_cvtsi32_si128(j->shift)), r);
}

/* dots512 for the tokens' int8 blocks and, for two digits (`two`, a constant wherever this is
   inlined), for their residuals too, the two sums joined (join512). */
AVX512 INLINE void digits512(const Job* j, int64_t t0, int T, int64_t b, const __m512i c[8],
                             __m512i s[4], int two) {
  dots512(j, t0, T, b, c, s, two, 0);
  if (!two) return;
  __m512i r[4];
  dots512(j, t0, T, b, c, r, two, 1);
  for (int t = 0; t < T; t++) s[t] = join512(j, s[t], r[t]);
}

/* The next tile group's lines of block b, prefetched while this group computes (on its first
   token group only). Eight rows of a decode step make the AVX-512 path compute-heavy enough that
   the hardware prefetcher falls behind the weights' stream from memory: measured on the 2-core
   EPYC, 8 rows × 250 cached tokens, ~10 % a step (two groups ahead: less; the 256-bit paths: no
   change, so they do without). One row alone goes without: it reads one ascending stream, which
   the hardware prefetcher follows, and this prefetch slowed it (Zen 4, one thread streaming from
   memory: the 8-bit head 20.6 → 28.9 GB/s without it, Q4_1 tiles 3–8 % faster, a super-block
   tile 14 → 23.6 GB/s; docs/speed.md). Past the last group it prefetches bytes it never reads,
   which cannot fault. */
AVX512 INLINE void ahead512(const Job* j, const uint8_t* p, int64_t b, int64_t stride, int64_t t0) {
  if (t0 || j->m == 1) return;
  const char* x = (const char*)p + j->nb * stride;
  if (super_tile(stride)) { /* a block's codes, and one line of its super-block's scalars */
    int64_t q = block_codes(stride), c = super_codes(stride);
    for (int64_t o = 0; o < q; o += 64) _mm_prefetch(x + o, _MM_HINT_T0);
    if ((b & 7) * 64 < c) _mm_prefetch(x - c - (b & 7) * q + (b & 7) * 64, _MM_HINT_T0);
    return;
  }
  for (int64_t o = 0; o < stride; o += 64) _mm_prefetch(x + o, _MM_HINT_T0);
}

/* A MatMulQ4 tile's scales d, minimums m (−16·d for 5-bit codes without them: Q5_0; −8·d for
   Q4_0's tile, Layout.zero) and the zero points' d·z (16·d or 8·d for codes without them, −m for
   a tile centred on its zero weight: Q4_1's, ZERO_WEIGHT);
   p is block b's tile (its codes); Q4_K's and Q5_K's d = D·sc and m = E·mn are made here, exactly. */
AVX512 INLINE __m512 bytes512(const uint8_t* x) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)x)));
}
AVX512 INLINE __m512 scale512(const uint8_t* p, Layout l, int64_t b) {
  if (l.k4) {
    const uint8_t* s = tile_scalars(p, b, l);
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)k4_d(s, b, l))),
                         bytes512(s + l.d));
  }
  return l.f32 ? _mm512_loadu_ps((const float*)(p + l.d))
               : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + l.d)));
}
AVX512 INLINE __m512 min512(const uint8_t* p, Layout l, __m512 d, int64_t b) {
  if (l.k4) {
    const uint8_t* s = tile_scalars(p, b, l);
    __m512 e = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)k4_e(s, b, l)));
    return _mm512_mul_ps(e, bytes512(s + l.m));
  }
  return l.m < 0 ? _mm512_mul_ps(_mm512_set1_ps(-(float)l.zero), d)
         : l.f32 ? _mm512_loadu_ps((const float*)(p + l.m))
                 : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + l.m)));
}
AVX512 INLINE __m512 zero512(const uint8_t* p, Layout l, __m512 d, __m512 m, int64_t b) {
  if (l.z == ZERO_WEIGHT) return _mm512_sub_ps(_mm512_setzero_ps(), m);
  return l.z < 0 ? _mm512_mul_ps(_mm512_set1_ps((float)l.zero), d)
                 : _mm512_mul_ps(bytes512(tile_scalars(p, b, l) + l.z), d);
}

/* Two digits on a few blocks (Job.kept, `two` 2 below): dots512 for the tokens, and on a block
   any of them keeps a residual on (the next in `*u`, the group's list), their residuals' too,
   joined into the sums of those that keep it (join512, as digits512; the token's scale is its
   joined sum's, da/F, there, else da: activations.c, fold_digits). A token's bits are the same
   whichever others share its group. At decode the list is the token's own, the same for every
   tile group, so the branch on it is predicted; a prompt's groups of 4 take the union of theirs. */
AVX512 INLINE void few512(const Job* j, int64_t t0, int T, int64_t b, const __m512i c[8],
                          __m512i s[4], const int32_t** u) {
  dots512(j, t0, T, b, c, s, 2, 0);
  if (**u != b) return;
  ++*u;
  __m512i r[4];
  dots512(j, t0, T, b, c, r, 2, 1);
  for (int t = 0; t < T; t++) {
    int keep = j->keep[(t0 + t) * j->nb + b];
    s[t] = _mm512_mask_mov_epi32(s[t], (__mmask16)-keep, join512(j, s[t], r[t]));
  }
}

/* T tokens (1..4) share each unpacked tile: 16 rows × 32 codes in 8 registers. `stride`: the
   tile's bytes, j->tile, a constant wherever this is inlined (tile_kind512), so that its layout
   costs no test a block; `two`: two-digit activations, both read here (each block's â and r̂),
   their integer sums joined as F·s + s_r, at the residual's scale da/F (a constant too): the
   float work of one token, not two; 2: on a few blocks only (few512). */
AVX512 INLINE void tile_tokens(const Job* j, int64_t g, int64_t t0, int T, const int64_t stride,
                               int two) {
  __m512 acc[4], off[4];
  for (int t = 0; t < T; t++) acc[t] = off[t] = _mm512_setzero_ps();
  const Layout l = layout_of(stride);
  const int five = l.five;
  const uint8_t* p = tile_at(j->w, j->nb, stride, g, 0);
  const int32_t* u = two == 2 ? j->kept + t0 / 4 * (j->nb + 1) : NULL;
  for (int64_t b = 0; b < j->nb; p = tile_step(p, b, stride), b++) {
    __m512i c[8];
    ahead512(j, p, b, stride, t0);
    codes512(p, five, c);
    __m512 d = scale512(p, l, b);
    __m512 m = min512(p, l, d, b);
    __m512 zd = zero512(p, l, d, m, b);
    __m512i s[4];
    if (two == 2) few512(j, t0, T, b, c, s, &u);
    else digits512(j, t0, T, b, c, s, two);
    for (int t = 0; t < T; t++) { /* (two digits: the joined sum's scalars, fold_digits) */
      int64_t ib = (t0 + t) * j->nb + b;
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]),
                               _mm512_mul_ps(d, _mm512_set1_ps(j->ad[ib])), acc[t]);
      off[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(j->as[ib]), off[t]);
      off[t] = _mm512_fmadd_ps(zd, _mm512_set1_ps(j->ae[ib]), off[t]);
    }
  }
  for (int t = 0; t < T; t++)
    _mm512_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS, _mm512_add_ps(acc[t], off[t]));
}

/* The 16 rows' zero codes of an 8-bit tile (zero8) */
AVX512 INLINE __m512 zeros8_512(const uint8_t* p, int64_t tile) {
  return tile == TILE8Z ? _mm512_set1_ps(128.f) : bytes512(p + 544);
}

/* The 8-bit head's tile; `two` as in tile_tokens. */
AVX512 INLINE void tile_tokens_q8(const Job* j, int64_t g, int64_t t0, int T, int two) {
  __m512 acc[4];
  for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
  const int64_t tile = j->tile;
  const uint8_t* p = j->w + g * j->nb * tile;
  const int32_t* u = two == 2 ? j->kept + t0 / 4 * (j->nb + 1) : NULL;
  for (int64_t b = 0; b < j->nb; b++, p += tile) {
    __m512i c[8];
    ahead512(j, p, b, tile, t0);
    for (int v = 0; v < 8; v++) c[v] = _mm512_loadu_si512((const void*)(p + v * 64));
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 512)));
    __m512 z = zeros8_512(p, tile);
    __m512i s[4];
    if (two == 2) few512(j, t0, T, b, c, s, &u);
    else digits512(j, t0, T, b, c, s, two);
    for (int t = 0; t < T; t++) {
      int64_t ib = (t0 + t) * j->nb + b;
      float qs = j->as[ib] - j->ae[ib]; /* da·Σ â_int (both digits': fold_digits) */
      __m512 x = _mm512_fnmadd_ps(z, _mm512_set1_ps(qs),
                                  _mm512_mul_ps(_mm512_cvtepi32_ps(s[t]), _mm512_set1_ps(j->ad[ib])));
      acc[t] = _mm512_fmadd_ps(d, x, acc[t]);
    }
  }
  for (int t = 0; t < T; t++) _mm512_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS, acc[t]);
}

/* A Q6_K block's 16 rows' scales of its two halves (halves_row's). */
AVX512 INLINE void halves512(const uint8_t* p, int64_t b, int64_t tile, __m512* s0, __m512* s1) {
  if (tile == TILE6K) {
    const uint8_t* sb = super_of(p, b, tile);
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sb + K6_D)));
    const uint8_t* sc = sb + 32 * (b & 7);
    *s0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)sc))));
    *s1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(sc + 16)))));
    return;
  }
  *s0 = _mm512_loadu_ps((const float*)(p + HALVES));
  *s1 = _mm512_loadu_ps((const float*)(p + HALVES + 64));
}

AVX512 INLINE void tile_tokens_q6(const Job* j, int64_t g, int64_t t0, int T) {
  __m512 acc[4];
  for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
  const int64_t tile = j->tile;
  const uint8_t* p = tile_at(j->w, j->nb, tile, g, 0);
  for (int64_t b = 0; b < j->nb; p = tile_step(p, b, tile), b++) {
    __m512i c[8];
    ahead512(j, p, b, tile, t0);
    codes512(p, tile == TILE6K ? CRUMBS : 2, c);
    __m512 s0, s1;
    halves512(p, b, tile, &s0, &s1);
    for (int t = 0; t < T; t++) {
      const int8_t* aq = act_block(j, t0 + t, b, 0);
      const int32_t* a = (const int32_t*)aq;
      const int32_t* h = j->hs + 2 * ((t0 + t) * j->nb + b);
      __m512i x0 = _mm512_set1_epi32(-32 * h[0]), x1 = _mm512_set1_epi32(-32 * h[1]);
      for (int v = 0; v < 4; v++) x0 = _mm512_dpbusd_epi32(x0, c[v], _mm512_set1_epi32(a[v]));
      for (int v = 4; v < 8; v++) x1 = _mm512_dpbusd_epi32(x1, c[v], _mm512_set1_epi32(a[v]));
      __m512 x = _mm512_fmadd_ps(s1, _mm512_cvtepi32_ps(x1), _mm512_mul_ps(s0, _mm512_cvtepi32_ps(x0)));
      acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(j->ad[(t0 + t) * j->nb + b]), x, acc[t]);
    }
  }
  for (int t = 0; t < T; t++) _mm512_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS, acc[t]);
}

/* tile_tokens by the tile's kind (every MatMulQ4 tile), `two` a constant: with the tile's bytes
   a variable, its layout's tests ran in every block, and GCC kept them there (a Q4_K folder
   decoded 0.87× as fast once another super-block tile made those tests longer). */
AVX512 INLINE void tile_kind512(const Job* j, int64_t g, int64_t t0, int T, const int two) {
#define KIND512(S) \
  case S: tile_tokens(j, g, t0, T, S, two); return;
  switch (j->tile) {
    MATMULQ4_TILES(KIND512)
    default: tile_tokens(j, g, t0, T, TILE5Z, two); return;
  }
#undef KIND512
}

/* One tile of either format; T is a constant wherever this is inlined. */
AVX512 INLINE void tile(const Job* j, int64_t g, int64_t t0, int T) {
  int two = j->digits == 2 ? (j->kept ? 2 : 1) : 0; /* fused_digits */
  if (six(j->tile)) tile_tokens_q6(j, g, t0, T);
  else if (j->bits == 8 && two == 2) tile_tokens_q8(j, g, t0, T, 2);
  else if (j->bits == 8 && two) tile_tokens_q8(j, g, t0, T, 1);
  else if (j->bits == 8) tile_tokens_q8(j, g, t0, T, 0);
  else if (two == 2) tile_kind512(j, g, t0, T, 2);
  else if (two) tile_kind512(j, g, t0, T, 1);
  else tile_kind512(j, g, t0, T, 0);
}

/* Tokens t.. of row group g, 4 to a pass (the last pass 1–3). */
AVX512 INLINE void tokens512(const Job* j, int64_t g, int64_t t) {
  for (; t + 4 <= j->m; t += 4) tile(j, g, t, 4);
  switch (j->m - t) {
    case 3: tile(j, g, t, 3); break;
    case 2: tile(j, g, t, 2); break;
    case 1: tile(j, g, t, 1); break;
    default: break;
  }
}

AVX512 static void rows_avx512(const Job* j, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; g++) tokens512(j, g, 0);
}

/* ---- AMX (Intel Sapphire Rapids and later Xeons): the AVX-512 path with the integer dot products
 * of a prompt's tokens on the tile unit, 16 at a time ------------------------------------------
 * A prompt's rows are compute-bound on the AVX-512 path: 8 vpdpbusd a token and tile, besides
 * the float work of the blocks' scales. TDPBSUD multiplies a tile of 16 tokens' int8 blocks (A:
 * 16 rows × 32 bytes, read in place from the activation rows) by a tile of codes (B: 8 rows × 64
 * bytes, row kk holding 4 consecutive codes k = 4kk.. of each of the 16 output rows, which is
 * exactly what codes512 unpacks into its registers c[2v], c[2v+1]; the 8-bit head's tile is that
 * layout already) into 16 × 16 int32 sums: the integers dots512 makes. The float work after them
 * is tile_tokens' and tile_tokens_q8's, token by token in their order, so this path gives the
 * AVX-512 path's bits. A row group's codes are unpacked once for all of a call's tokens, with
 * their d, m and z·d as floats. Two digits on 4- and 5-bit codes take one product of K = 64:
 * a token's 64 bytes [â r̂] of a block (lying side by side: activations.c) by [F·c; c] (the codes
 * scaled by F = 16 or 8 still fit a byte), which is F·s + s_r, the AVX-512 path's joined sum, in
 * one tile product and one store: on this Xeon a tile product of K = 64 costs about what one of
 * K = 32 does, so the second digit adds little here (a 128 × 576 → 960 matmul: 392 µs against
 * one digit's 297 and 700 with a second product and store). The 8-bit head's codes are too wide
 * to scale: its residuals take a product of their own. Tokens past the last full 16 (and a
 * decode step's rows: at 8 rows the tile unit gained nothing) go through the AVX-512 passes;
 * Q6_K tiles take two products of K = 16 a block (rows_amx_q6: the same matmul on Q6_K tiles
 * 497–531 µs against the AVX-512 path's 775–793). Two digits on a few blocks (Job.kept) take
 * the joint product on the blocks any of a pass's 16 tokens keeps and one digit's on the rest
 * (Job.wide, Job.wad: a 128 × 576 → 960 matmul with 2 kept blocks whose outliers sit in the same
 * channels token after token, as a norm's do, 349–359 µs against every block's 384–397 and one
 * digit's 298–306; 507–545 while the unused F·c lines still filled L1). What bounds it: the tile
 * unit writes its sums to memory, a 64-byte row a token and block at ~1.5 cycles a row, and the
 * float work reads them back (~5 vector operations a token and block); a 128 × 576 → 960 matmul
 * on one core of the Intel Xeon (family 6, model 167) takes 310–330 µs against the AVX-512
 * path's 485–505.
 * Linux lends the tile state to a process that asks for it (arch_prctl ARCH_REQ_XCOMP_PERM,
 * amx_lent); where it does not, the AVX-512 path runs. */
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,amx-tile,amx-int8")))
#define AMX_HALF 8 /* tokens a float pass (their sums in 16 registers) */
/* A block's unpacked codes (with two digits, F·c and then c: 16 rows of B), then d, m and z·d
   of its 16 rows */
#define AMX_BLOCK(two) (512 * (1 + (two)) + 3 * 64)

typedef struct {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} TileConfig;

/* amx_block's registers: 0 and 3 sums, 1 and 4 int8 blocks (both digits' with `joint`), 2 and 5
   codes; 6 and 7 the residuals' sums and blocks where they take a product of their own, or
   (`mixed`: two digits on a few blocks of 4- or 5-bit codes) the int8 blocks and codes of the
   blocks whose two digits take one product, K = 64, beside 1, 2, 4, 5's K = 32 */
AMX static void amx_configure(int joint, int mixed) {
  TileConfig c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 8; i++) {
    /* 0: sums, 1: int8 blocks, 2: codes; `wide`: K = 64, both digits in one product */
    int kind = i == 6 ? (mixed ? 1 : 0) : i == 7 ? (mixed ? 2 : 1) : i % 3;
    int wide = mixed ? i >= 6 : joint && i != 7;
    c.rows[i] = kind == 2 ? (wide ? 2 : 1) * BLOCK / 4 : AMX_TOKENS; /* codes: 16 × 4 a row */
    c.colsb[i] = kind == 1 && !wide ? BLOCK : 64; /* int8; int32 or codes */
  }
  _tile_loadconfig(&c);
}

/* Row group g's blocks unpacked into u (nb × AMX_BLOCK(two) bytes); `two`: F·c before c, the
   B rows that take a token's â and then its r̂ in one product, on the blocks `any` flags (NULL:
   all; the rest are read as c alone, and their lines of F·c left untouched keep the codes and
   sums in L1 on this Xeon). */
AMX INLINE void amx_unpack(const Job* j, int64_t g, uint8_t* u, int two, const uint8_t* any) {
  const Layout l = layout_of(j->tile);
  const uint8_t* p = tile_at(j->w, j->nb, j->tile, g, 0);
  const __m128i shift = _mm_cvtsi32_si128(j->shift);
  for (int64_t b = 0; b < j->nb; p = tile_step(p, b, j->tile), b++, u += AMX_BLOCK(two)) {
    __m512i c[8];
    codes512(p, l.five, c);
    for (int v = 0; v < 8; v++) {
      /* (F·c ≤ 248 stays within its byte of the 16-bit lane) */
      if (two && (!any || any[b]))
        _mm512_store_si512((void*)(u + 64 * v), _mm512_sll_epi16(c[v], shift));
      _mm512_store_si512((void*)(u + 512 * two + 64 * v), c[v]);
    }
    __m512 d = scale512(p, l, b);
    __m512 m = min512(p, l, d, b);
    _mm512_store_ps((float*)(u + 512 * (1 + two)), d);
    _mm512_store_ps((float*)(u + 512 * (1 + two) + 64), m);
    _mm512_store_ps((float*)(u + 512 * (1 + two) + 128), zero512(p, l, d, m, b));
  }
}

/* The integer sums of tokens t0.. (16) with block b's codes (64-byte rows at `codes`) into s's
   slot b ([nb][16][16]). Two digits: `joint` (4-bit codes), one product of [â r̂] (a token's 64
   bytes) by [F·c; c], which gives F·s + s_r at once; else (8-bit codes, too wide to scale) the
   residuals' own product, into slot nb + b. On a few blocks (`few`, Job.kept) only the blocks
   some of the 16 tokens keep (`wide` b) take the second digit: one K = 64 product, or the
   residuals' own; the rest a K = 32 product of â by c (the codes after F·c). Blocks alternate
   between two sets of tile registers (`odd`: 3, 4, 5 for 0, 1, 2; the residual's 6 and 7 are
   shared), and the float work reads a block's sums two blocks later (amx_tokens). (On the Xeon
   the VM offers, issuing them 1, 2, 4, 8 or all blocks ahead measured the same: its tile unit's
   work does not overlap the FMAs, docs/speed.md.) */
#define AMX_AHEAD 2
AMX INLINE void amx_block(const Job* j, int64_t t0, int64_t b, const uint8_t* codes, int two,
                          int joint, int few, int wide, int odd, int32_t* s) {
  const int8_t* a = act_block(j, t0, b, two);
  const int64_t stride = two ? 2 * j->k : j->k;
  int32_t* to = s + b * AMX_TOKENS * ROWS;
  if (few && joint) {
    if (wide) { /* (tiles 6, 7: K = 64) */
      _tile_loadd(7, codes, 64);
      _tile_loadd(6, a, stride);
    } else if (odd) {
      _tile_loadd(5, codes + 512, 64);
      _tile_loadd(4, a, stride);
    } else {
      _tile_loadd(2, codes + 512, 64);
      _tile_loadd(1, a, stride);
    }
    if (odd) {
      _tile_zero(3);
      if (wide) _tile_dpbsud(3, 6, 7);
      else _tile_dpbsud(3, 4, 5);
      _tile_stored(3, to, 64);
    } else {
      _tile_zero(0);
      if (wide) _tile_dpbsud(0, 6, 7);
      else _tile_dpbsud(0, 1, 2);
      _tile_stored(0, to, 64);
    }
    return;
  }
  if (odd) {
    _tile_loadd(5, codes, 64);
    _tile_loadd(4, a, stride);
    _tile_zero(3);
    _tile_dpbsud(3, 4, 5);
    _tile_stored(3, to, 64);
  } else {
    _tile_loadd(2, codes, 64);
    _tile_loadd(1, a, stride);
    _tile_zero(0);
    _tile_dpbsud(0, 1, 2);
    _tile_stored(0, to, 64);
  }
  if (!two || joint || (few && !wide)) return;
  _tile_loadd(7, a + BLOCK, stride);
  _tile_zero(6);
  if (odd) _tile_dpbsud(6, 7, 5);
  else _tile_dpbsud(6, 7, 2);
  _tile_stored(6, to + j->nb * AMX_TOKENS * ROWS, 64);
}

/* amx_block for block b (< nb), `stride` bytes a block's codes from `codes`; `wide` (with
   `few`): the blocks the tokens keep, 1 where any of them does */
AMX INLINE void amx_ahead(const Job* j, int64_t t0, int64_t b, const uint8_t* codes,
                          int64_t stride, int two, int joint, int few, const uint8_t* wide,
                          int32_t* s) {
  if (b >= j->nb) return;
  int w = few && wide[b];
  if (b & 1) amx_block(j, t0, b, codes + b * stride, two, joint, few, w, 1, s);
  else amx_block(j, t0, b, codes + b * stride, two, joint, few, w, 0, s);
}

/* Token t's sums of block b, both digits' joined where the residuals took a product of their own
   (`apart`; join512). */
AMX INLINE __m512i amx_sum(const Job* j, const int32_t* s, int64_t b, int t, int apart) {
  const int32_t* x = s + (b * AMX_TOKENS + t) * ROWS;
  __m512i v = _mm512_load_si512((const void*)x);
  return apart ? join512(j, v, _mm512_load_si512((const void*)(x + j->nb * AMX_TOKENS * ROWS)))
               : v;
}

/* tile_tokens for tokens t0.. (16) of row group g, its blocks unpacked in u; s: amx_block's.
   The float work takes 8 tokens at a time over every block (16 accumulators and 8 offsets in
   registers), the first 8 while the tile unit works ahead on the blocks' sums. `ad`: the
   tokens' scales (Job.ad, or on a few blocks Job.wad). */
AMX INLINE void amx_tokens(const Job* j, int64_t g, int64_t t0, const uint8_t* u, int two,
                           int few, const uint8_t* wide, const float* ad, int32_t* s) {
  const int64_t ub = AMX_BLOCK(two), cb = 512 * (1 + two);
  for (int64_t b = 0; b < AMX_AHEAD; b++) amx_ahead(j, t0, b, u, ub, two, 1, few, wide, s);
  for (int h = 0; h < AMX_TOKENS; h += AMX_HALF) {
    __m512 acc[AMX_HALF], off[AMX_HALF];
    for (int t = 0; t < AMX_HALF; t++) acc[t] = off[t] = _mm512_setzero_ps();
    const uint8_t* x = u;
    for (int64_t b = 0; b < j->nb; b++, x += ub) {
      if (!h) amx_ahead(j, t0, b + AMX_AHEAD, u, ub, two, 1, few, wide, s);
      __m512 d = _mm512_load_ps((const float*)(x + cb));
      __m512 m = _mm512_load_ps((const float*)(x + cb + 64));
      __m512 zd = _mm512_load_ps((const float*)(x + cb + 128));
      for (int t = 0; t < AMX_HALF; t++) {
        int64_t ib = (t0 + h + t) * j->nb + b;
        __m512 v = _mm512_cvtepi32_ps(amx_sum(j, s, b, h + t, 0));
        acc[t] = _mm512_fmadd_ps(v, _mm512_mul_ps(d, _mm512_set1_ps(ad[ib])), acc[t]);
        off[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(j->as[ib]), off[t]);
        off[t] = _mm512_fmadd_ps(zd, _mm512_set1_ps(j->ae[ib]), off[t]);
      }
    }
    for (int t = 0; t < AMX_HALF; t++)
      _mm512_storeu_ps(j->y + (t0 + h + t) * j->n + g * ROWS, _mm512_add_ps(acc[t], off[t]));
  }
}

/* tile_tokens_q8 for tokens t0.. (16) of row group g: the codes are B's rows as they lie; `ad`
   as amx_tokens'. On a few blocks (`few`) the sums are joined with the residuals' on the blocks
   some token keeps (`wide`). */
AMX INLINE void amx_tokens_q8(const Job* j, int64_t g, int64_t t0, int two, int few,
                              const uint8_t* wide, const float* ad, int32_t* s) {
  const int64_t tile = j->tile;
  const uint8_t* codes = j->w + g * j->nb * tile;
  for (int64_t b = 0; b < AMX_AHEAD; b++) amx_ahead(j, t0, b, codes, tile, two, 0, few, wide, s);
  for (int h = 0; h < AMX_TOKENS; h += AMX_HALF) {
    __m512 acc[AMX_HALF];
    for (int t = 0; t < AMX_HALF; t++) acc[t] = _mm512_setzero_ps();
    const uint8_t* p = codes;
    for (int64_t b = 0; b < j->nb; b++, p += tile) {
      if (!h) amx_ahead(j, t0, b + AMX_AHEAD, codes, tile, two, 0, few, wide, s);
      __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 512)));
      __m512 z = zeros8_512(p, tile);
      for (int t = 0; t < AMX_HALF; t++) {
        int64_t ib = (t0 + h + t) * j->nb + b;
        float qs = j->as[ib] - j->ae[ib];
        int apart = few ? wide[b] : two;
        __m512i sum = apart ? amx_sum(j, s, b, h + t, 1) : amx_sum(j, s, b, h + t, 0);
        __m512 x = _mm512_fnmadd_ps(z, _mm512_set1_ps(qs),
                                    _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(ad[ib])));
        acc[t] = _mm512_fmadd_ps(d, x, acc[t]);
      }
    }
    for (int t = 0; t < AMX_HALF; t++)
      _mm512_storeu_ps(j->y + (t0 + h + t) * j->n + g * ROWS, acc[t]);
  }
}

/* ---- Q6_K's tiles on the tile unit: each block's two halves of 16 codes have scales of their
   own, so a block takes two products of K = 16 (A: 16 tokens × 16 bytes, B: 4 rows of codes as
   codes512 unpacks them, c[0..3] and c[4..7]), and the float work is tile_tokens_q6's: each half's
   sum less 32 times the tokens' half sums (Job.hs), s1·x1 + s0·x0, by
   da, in its order: the AVX-512 path's bits. */
#define AMX_BLOCK6 (512 + 128) /* a block's unpacked codes, then s0 and s1 of its 16 rows */

AMX static void amx_configure_q6(void) {
  TileConfig c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 6; i++) {
    int kind = i % 3; /* 0: sums, 1: int8 half blocks, 2: codes */
    c.rows[i] = kind == 2 ? 4 : AMX_TOKENS;
    c.colsb[i] = kind == 1 ? 16 : 64;
  }
  _tile_loadconfig(&c);
}

AMX INLINE void amx_unpack_q6(const Job* j, int64_t g, uint8_t* u) {
  const uint8_t* p = tile_at(j->w, j->nb, j->tile, g, 0);
  for (int64_t b = 0; b < j->nb; p = tile_step(p, b, j->tile), b++, u += AMX_BLOCK6) {
    __m512i c[8];
    codes512(p, j->tile == TILE6K ? CRUMBS : 2, c);
    for (int v = 0; v < 8; v++) _mm512_store_si512((void*)(u + 64 * v), c[v]);
    __m512 s0, s1;
    halves512(p, b, j->tile, &s0, &s1);
    _mm512_store_ps((float*)(u + 512), s0);
    _mm512_store_ps((float*)(u + 576), s1);
  }
}

/* Block b's two half products for tokens t0.. (16) into s's slots 2b and 2b + 1 */
AMX INLINE void amx_block_q6(const Job* j, int64_t t0, int64_t b, const uint8_t* u, int32_t* s) {
  if (b >= j->nb) return;
  const int8_t* a = act_block(j, t0, b, 0);
  const uint8_t* codes = u + b * AMX_BLOCK6;
  int32_t* to = s + 2 * b * AMX_TOKENS * ROWS;
  _tile_loadd(2, codes, 64);
  _tile_loadd(1, a, j->k);
  _tile_zero(0);
  _tile_dpbsud(0, 1, 2);
  _tile_loadd(5, codes + 256, 64);
  _tile_loadd(4, a + 16, j->k);
  _tile_zero(3);
  _tile_dpbsud(3, 4, 5);
  _tile_stored(0, to, 64);
  _tile_stored(3, to + AMX_TOKENS * ROWS, 64);
}

/* tile_tokens_q6 for tokens t0.. (16) of row group g, its blocks unpacked in u */
AMX INLINE void amx_tokens_q6(const Job* j, int64_t g, int64_t t0, const uint8_t* u, int32_t* s) {
  for (int64_t b = 0; b < AMX_AHEAD; b++) amx_block_q6(j, t0, b, u, s);
  for (int h = 0; h < AMX_TOKENS; h += AMX_HALF) {
    __m512 acc[AMX_HALF];
    for (int t = 0; t < AMX_HALF; t++) acc[t] = _mm512_setzero_ps();
    const uint8_t* x = u;
    for (int64_t b = 0; b < j->nb; b++, x += AMX_BLOCK6) {
      if (!h) amx_block_q6(j, t0, b + AMX_AHEAD, u, s);
      __m512 s0 = _mm512_load_ps((const float*)(x + 512));
      __m512 s1 = _mm512_load_ps((const float*)(x + 576));
      const int32_t* sum = s + 2 * b * AMX_TOKENS * ROWS;
      for (int t = 0; t < AMX_HALF; t++) {
        int64_t ib = (t0 + h + t) * j->nb + b;
        const int32_t* hh = j->hs + 2 * ib;
        __m512i x0 = _mm512_add_epi32(_mm512_load_si512((const void*)(sum + (h + t) * ROWS)),
                                      _mm512_set1_epi32(-32 * hh[0]));
        __m512i x1 = _mm512_add_epi32(
            _mm512_load_si512((const void*)(sum + (AMX_TOKENS + h + t) * ROWS)),
            _mm512_set1_epi32(-32 * hh[1]));
        __m512 v = _mm512_fmadd_ps(s1, _mm512_cvtepi32_ps(x1),
                                   _mm512_mul_ps(s0, _mm512_cvtepi32_ps(x0)));
        acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(j->ad[ib]), v, acc[t]);
      }
    }
    for (int t = 0; t < AMX_HALF; t++)
      _mm512_storeu_ps(j->y + (t0 + h + t) * j->n + g * ROWS, acc[t]);
  }
}

AMX static void rows_amx_q6(const Job* j, int64_t g0, int64_t g1) {
  int64_t full = j->m / AMX_TOKENS * AMX_TOKENS;
  size_t unpacked = (size_t)j->nb * AMX_BLOCK6, sums = (size_t)j->nb * 2 * AMX_TOKENS * ROWS * 4;
  uint8_t* u = aligned_alloc(64, unpacked + sums);
  if (!u) {
    rows_avx512(j, g0, g1);
    return;
  }
  int32_t* s = (int32_t*)(u + unpacked);
  amx_configure_q6();
  for (int64_t g = g0; g < g1; g++) {
    amx_unpack_q6(j, g, u);
    for (int64_t t = 0; t < full; t += AMX_TOKENS) amx_tokens_q6(j, g, t, u, s);
    tokens512(j, g, full);
  }
  _tile_release();
  free(u);
}

AMX static void rows_amx(const Job* j, int64_t g0, int64_t g1) {
  int two = j->digits == 2, few = two && j->kept;
  if (j->m < AMX_TOKENS) {
    rows_avx512(j, g0, g1);
    return;
  }
  if (six(j->tile)) {
    rows_amx_q6(j, g0, g1);
    return;
  }
  /* the unpacked codes (4-bit family), then amx_block's int32 sums of a token group (the 8-bit
     head's residuals: a second set), then (few) each token group's kept blocks */
  int joint = two && j->bits == 4, apart = two && !joint;
  int64_t full = j->m / AMX_TOKENS * AMX_TOKENS;
  size_t unpacked = j->bits == 4 ? (size_t)j->nb * AMX_BLOCK(two) : 0;
  size_t sums = (size_t)j->nb * (1 + apart) * AMX_TOKENS * ROWS * 4;
  size_t flags = few ? ((size_t)j->nb + 63) / 64 * 64 : 0;
  if (few && !j->wide) { /* (Prep made them for the path it ran on) */
    rows_avx512(j, g0, g1);
    return;
  }
  uint8_t* u = aligned_alloc(64, unpacked + sums + flags);
  if (!u) {
    rows_avx512(j, g0, g1);
    return;
  }
  int32_t* s = (int32_t*)(u + unpacked);
  const uint8_t* wide = j->wide;
  const float* ad = few ? j->wad : j->ad; /* (indexed by token from 0) */
  uint8_t* any = few ? u + unpacked + sums : NULL; /* [nb]: any pass's wide */
  if (few) memset(any, 0, (size_t)j->nb);
  for (int64_t i = 0; few && i < full / AMX_TOKENS * j->nb; i++) any[i % j->nb] |= wide[i];
  amx_configure(joint && !few, joint && few);
  for (int64_t g = g0; g < g1; g++) {
    if (joint) amx_unpack(j, g, u, 1, any);
    else if (unpacked) amx_unpack(j, g, u, 0, NULL);
    for (int64_t t = 0; t < full; t += AMX_TOKENS) {
      const uint8_t* w = few ? wide + t / AMX_TOKENS * j->nb : NULL;
      if (!unpacked) {
        if (few) amx_tokens_q8(j, g, t, 1, 1, w, ad, s);
        else if (two) amx_tokens_q8(j, g, t, 1, 0, w, ad, s);
        else amx_tokens_q8(j, g, t, 0, 0, w, ad, s);
      } else if (few) amx_tokens(j, g, t, u, 1, 1, w, ad, s);
      else if (two) amx_tokens(j, g, t, u, 1, 0, w, ad, s);
      else amx_tokens(j, g, t, u, 0, 0, w, ad, s);
    }
    tokens512(j, g, full);
  }
  _tile_release();
  free(u);
}

/* ---- the 256-bit paths: AVX2 (with FMA and F16C; Intel Haswell and later, AMD Zen), and
 * AVX-VNNI (Intel Alder Lake and later, AMD Zen 5) -------------------------------------------
 * The same tiles, read as two halves of 8 rows (each 64-byte chunk: rows 0..7 in its first 32
 * bytes, rows 8..15 in its second); tiles256.h holds the kernels, compiled once per path with
 * its own integer dot products (below). Both give the same integer sums, so the paths agree to
 * the bit.
 *
 * AVX2 has no int8 dot product: vpmaddubsw multiplies the unsigned codes by the int8
 * activations and adds pairs into int16. 4-bit codes (≤ 15·127·2 per pair, ≤ 30480 over a
 * block's 8 products) are summed in int16 and widened once; 8-bit codes are made signed
 * (c − 128), and their magnitude (≤ 128, unsigned) multiplies a with their sign moved onto it
 * (|a| ≤ 127: no overflow, unlike moving a's sign onto the codes, which breaks at −128); each
 * pair is widened at once (128·127·2 ≤ 32512). VNNI's vpdpbusd does the multiply, the pair and
 * quad sums and the int32 accumulation in one instruction, on the same operands. */

AVX2 static inline __m256i dot_u4_avx2(const __m256i c[8], const int32_t* a) {
  __m256i s = _mm256_maddubs_epi16(c[0], _mm256_set1_epi32(a[0]));
  for (int v = 1; v < 8; v++) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c[v], _mm256_set1_epi32(a[v])));
  return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

AVX2 static inline __m256i dot_s8_avx2(const __m256i u[8], const __m256i c[8], const int32_t* a) {
  __m256i s = _mm256_setzero_si256();
  for (int v = 0; v < 8; v++) {
    __m256i prod = _mm256_maddubs_epi16(u[v], _mm256_sign_epi8(_mm256_set1_epi32(a[v]), c[v]));
    s = _mm256_add_epi32(s, _mm256_madd_epi16(prod, _mm256_set1_epi16(1)));
  }
  return s;
}

/* 5-bit codes (≤ 31·127·2 a pair) overflow int16 over 8 products: summed 4 at a time */
AVX2 static inline __m256i dot_u5_avx2(const __m256i c[8], const int32_t* a) {
  __m256i s[2];
  for (int h = 0; h < 2; h++) {
    s[h] = _mm256_maddubs_epi16(c[4 * h], _mm256_set1_epi32(a[4 * h]));
    for (int v = 4 * h + 1; v < 4 * h + 4; v++)
      s[h] = _mm256_add_epi16(s[h], _mm256_maddubs_epi16(c[v], _mm256_set1_epi32(a[v])));
  }
  const __m256i one = _mm256_set1_epi16(1);
  return _mm256_add_epi32(_mm256_madd_epi16(s[0], one), _mm256_madd_epi16(s[1], one));
}

/* The same products a code register at a time, for the passes that unpack each once for every
   token (tiles256.h, tile_sums): two registers' products added to int16 sums w (widened to int32
   by `widen` before they can overflow), and an 8-bit register's (magnitude u, sign c) to int32. */
AVX2 static inline __m256i pair_add_avx2(__m256i w, __m256i c0, __m256i c1, __m256i a0, __m256i a1) {
  return _mm256_add_epi16(w, _mm256_add_epi16(_mm256_maddubs_epi16(c0, a0), _mm256_maddubs_epi16(c1, a1)));
}
AVX2 static inline __m256i widen_avx2(__m256i w) { return _mm256_madd_epi16(w, _mm256_set1_epi16(1)); }
AVX2 static inline __m256i add_s8_avx2(__m256i s, __m256i u, __m256i c, __m256i a) {
  return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(a, c)), _mm256_set1_epi16(1)));
}

#define TARGET256 AVX2
#define NAME256(x) x##_avx2
/* Two digits' 3–4-token passes sum the residuals in a pass of their own over the codes: AVX2's
   int16 sums and their widening hold twice the registers of VNNI's int32 chains, and both
   digits' at once spilled (one core, 128 × 576 → 960: 1318–1343 µs against 1377–1465 every
   block, 941–976 against 964–1011 on 2; on AVX-VNNI apart was 8 % slower every block) */
#define APART256 1
#include "tiles256.h"

/* AVX-VNNI's vpdpbusd (VEX-encoded). On a CPU with AVX-512 VNNI but not AVX-VNNI (AMD Zen 4,
 * Intel Ice Lake to Sapphire Rapids) the same instruction exists EVEX-encoded on 256-bit
 * registers (AVX512VL): the path runs that form there, so it is tested and measured on such
 * machines too. */
#define DOT256(TARGET, SUFFIX, DPBUSD)                                                            \
  TARGET static inline __m256i dot_u4_##SUFFIX(const __m256i c[8], const int32_t* a) {           \
    __m256i s = _mm256_setzero_si256();                                                          \
    for (int v = 0; v < 8; v++) s = DPBUSD(s, c[v], _mm256_set1_epi32(a[v]));                    \
    return s;                                                                                    \
  }                                                                                              \
  TARGET static inline __m256i dot_s8_##SUFFIX(const __m256i u[8], const __m256i c[8],           \
                                               const int32_t* a) {                               \
    __m256i s = _mm256_setzero_si256();                                                          \
    for (int v = 0; v < 8; v++) s = DPBUSD(s, u[v], _mm256_sign_epi8(_mm256_set1_epi32(a[v]), c[v])); \
    return s;                                                                                    \
  }                                                                                              \
  TARGET static inline __m256i dot_u5_##SUFFIX(const __m256i c[8], const int32_t* a) {           \
    return dot_u4_##SUFFIX(c, a); /* (int32 sums: no overflow) */                                \
  }                                                                                              \
  TARGET static inline __m256i pair_add_##SUFFIX(__m256i w, __m256i c0, __m256i c1, __m256i a0,  \
                                                 __m256i a1) {                                   \
    return DPBUSD(DPBUSD(w, c0, a0), c1, a1); /* int32 already */                               \
  }                                                                                              \
  TARGET static inline __m256i widen_##SUFFIX(__m256i w) { return w; }                           \
  TARGET static inline __m256i add_s8_##SUFFIX(__m256i s, __m256i u, __m256i c, __m256i a) {     \
    return DPBUSD(s, u, _mm256_sign_epi8(a, c));                                                 \
  }

DOT256(AVXVNNI, avxvnni, _mm256_dpbusd_avx_epi32)
#define TARGET256 AVXVNNI
#define NAME256(x) x##_avxvnni
#define APART256 0
#include "tiles256.h"

DOT256(AVX512VL256, vnni256, _mm256_dpbusd_epi32)
#define TARGET256 AVX512VL256
#define NAME256(x) x##_vnni256
#define APART256 0
#include "tiles256.h"
#endif

#if defined(__aarch64__)
/* ---- NEON with dotprod: sdot multiplies 4 int8 pairs into each int32 lane, signed × signed, so
 * 4-bit codes (0..15) go in as they are and 8-bit codes as c − 128 (Σ c·a = Σ (c − 128)·a +
 * 128·Σ a). A 16-byte load is 4 rows × 4 codes of a tile's 64-byte chunk: a tile is 4 quarters.
 * T tokens (1..4) share each quarter's codes. */
/* A 4-bit-family tile's codes for quarter q4 (rows 4q4..4q4+3) in 8 registers, as codes512 lays
   them out, with `planes` high-bit planes added (bit i of the quarter's 16 → 16 << k in byte i). */
NEON_DOT static void codes_neon(const uint8_t* p, int q4, int planes, int8x16_t c[8]) {
  const uint8x16_t bit = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  for (int v = 0; v < 4; v++) {
    uint8x16_t x = vld1q_u8(p + v * 64 + 16 * q4);
    c[2 * v] = vreinterpretq_s8_u8(vandq_u8(x, vdupq_n_u8(0x0F)));
    c[2 * v + 1] = vreinterpretq_s8_u8(vshrq_n_u8(x, 4));
  }
  if (planes == CRUMBS) /* (tiles.h: register u's at 256 + 64·(u / 4), bits 2·(u % 4)) */
    for (int u = 0; u < 8; u++) {
      uint8x16_t x = vshlq_u8(vld1q_u8(p + 256 + 64 * (u / 4) + 16 * q4), vdupq_n_s8((int8_t)(4 - 2 * (u % 4))));
      x = vandq_u8(x, vdupq_n_u8(0x30));
      c[u] = vreinterpretq_s8_u8(vorrq_u8(vreinterpretq_u8_s8(c[u]), x));
    }
  for (int k = 0; k < planes; k++)
    for (int u = 0; u < 8; u++) {
      uint16_t bits;
      memcpy(&bits, p + FIFTH + 64 * k + 8 * u + 2 * q4, 2);
      uint8x16_t x = vcombine_u8(vdup_n_u8((uint8_t)bits), vdup_n_u8((uint8_t)(bits >> 8)));
      x = vandq_u8(vtstq_u8(x, bit), vdupq_n_u8((uint8_t)(16 << k)));
      c[u] = vreinterpretq_s8_u8(vorrq_u8(vreinterpretq_u8_s8(c[u]), x));
    }
}

NEON_DOT static void quarter_tokens_neon(const Job* j, int64_t g, int q4, int64_t t0, int T) {
  float32x4_t acc[4];
  for (int t = 0; t < T; t++) acc[t] = vdupq_n_f32(0.f);
  const int64_t stride = j->tile;
  const int q8 = j->bits == 8;
  const Layout l = layout_of(stride);
  const uint8_t* p = tile_at(j->w, j->nb, stride, g, 0);
  for (int64_t b = 0; b < j->nb; p = tile_step(p, b, stride), b++) {
    int8x16_t c[8];
    float32x4_t d, m = vdupq_n_f32(0.f), z;
    uint8_t zb[4]; /* (the 8-bit tile's, or the tile's z, or its shared zero code) */
    if (q8) {
      for (int v = 0; v < 8; v++)
        c[v] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p + v * 64 + 16 * q4), vdupq_n_u8(0x80)));
      d = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p + 512 + 8 * q4)));
      for (int r = 0; r < 4; r++) zb[r] = zero8(p, stride, 4 * q4 + r);
    } else {
      codes_neon(p, q4, l.five, c);
      const uint8_t* ps = tile_scalars(p, b, l);
      if (l.k4) { /* d = D·sc, m = E·mn */
        uint8_t sc[4], mn[4];
        memcpy(sc, ps + l.d + 4 * q4, 4);
        memcpy(mn, ps + l.m + 4 * q4, 4);
        float scf[4] = {sc[0], sc[1], sc[2], sc[3]}, mnf[4] = {mn[0], mn[1], mn[2], mn[3]};
        d = vmulq_f32(vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(k4_d(ps, b, l) + 8 * q4))), vld1q_f32(scf));
        m = vmulq_f32(vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(k4_e(ps, b, l) + 8 * q4))), vld1q_f32(mnf));
      } else if (l.f32) {
        d = vld1q_f32((const float*)(p + l.d) + 4 * q4);
        m = vld1q_f32((const float*)(p + l.m) + 4 * q4);
      } else {
        d = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p + l.d + 8 * q4)));
        m = l.m < 0 ? vmulq_n_f32(d, -(float)l.zero)
                    : vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p + l.m + 8 * q4)));
      }
      if (l.z >= 0) memcpy(zb, ps + l.z + 4 * q4, 4);
      else memset(zb, l.zero, 4);
    }
    float zf[4] = {zb[0], zb[1], zb[2], zb[3]};
    z = vld1q_f32(zf);
    /* z·d: −m where the tile is centred on its zero weight (ZERO_WEIGHT) */
    float32x4_t zd = !q8 && l.z == ZERO_WEIGHT ? vnegq_f32(m) : vmulq_f32(z, d);
    for (int t = 0; t < T; t++) {
      const int32_t* a = (const int32_t*)(act_block(j, t0 + t, b, 0));
      int32x4_t s = vdupq_n_s32(0);
      for (int v = 0; v < 8; v++) s = vdotq_s32(s, c[v], vreinterpretq_s8_s32(vdupq_n_s32(a[v])));
      int64_t ib = (t0 + t) * j->nb + b;
      float da = j->ad[ib], sa = j->as[ib], ea = j->ae[ib];
      if (q8) { /* d·(da·Σ (c−128)·â + (128 − z)·da·Σ â) */
        float32x4_t x = vmulq_n_f32(vcvtq_f32_s32(s), da);
        x = vfmaq_n_f32(x, vsubq_f32(vdupq_n_f32(128.f), z), sa - ea);
        acc[t] = vfmaq_f32(acc[t], d, x);
      } else {
        acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(s), vmulq_n_f32(d, da));
        acc[t] = vfmaq_n_f32(acc[t], m, sa);
        acc[t] = vfmaq_n_f32(acc[t], zd, ea);
      }
    }
  }
  for (int t = 0; t < T; t++) vst1q_f32(j->y + (t0 + t) * j->n + g * ROWS + 4 * q4, acc[t]);
}

/* A 6-bit tile's quarter: codes 0..63 go to sdot as they are; each half block its own sum. */
NEON_DOT static void quarter_tokens_neon_q6(const Job* j, int64_t g, int q4, int64_t t0, int T) {
  float32x4_t acc[4];
  for (int t = 0; t < T; t++) acc[t] = vdupq_n_f32(0.f);
  const uint8_t* p = tile_at(j->w, j->nb, j->tile, g, 0);
  for (int64_t b = 0; b < j->nb; p = tile_step(p, b, j->tile), b++) {
    int8x16_t c[8];
    codes_neon(p, q4, j->tile == TILE6K ? CRUMBS : 2, c);
    float h0[4], h1[4];
    for (int r = 0; r < 4; r++) halves_row(p, b, j->tile, 4 * q4 + r, &h0[r], &h1[r]);
    float32x4_t s0 = vld1q_f32(h0), s1 = vld1q_f32(h1);
    for (int t = 0; t < T; t++) {
      const int8_t* aq = act_block(j, t0 + t, b, 0);
      const int32_t* a = (const int32_t*)aq;
      const int32_t* h = j->hs + 2 * ((t0 + t) * j->nb + b);
      int32x4_t x0 = vdupq_n_s32(-32 * h[0]), x1 = vdupq_n_s32(-32 * h[1]);
      for (int v = 0; v < 4; v++) x0 = vdotq_s32(x0, c[v], vreinterpretq_s8_s32(vdupq_n_s32(a[v])));
      for (int v = 4; v < 8; v++) x1 = vdotq_s32(x1, c[v], vreinterpretq_s8_s32(vdupq_n_s32(a[v])));
      float32x4_t y = vfmaq_f32(vmulq_f32(s0, vcvtq_f32_s32(x0)), s1, vcvtq_f32_s32(x1));
      acc[t] = vfmaq_n_f32(acc[t], y, j->ad[(t0 + t) * j->nb + b]);
    }
  }
  for (int t = 0; t < T; t++) vst1q_f32(j->y + (t0 + t) * j->n + g * ROWS + 4 * q4, acc[t]);
}

NEON_DOT static void rows_neon(const Job* j, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; g++)
    for (int q4 = 0; q4 < 4; q4++)
      for (int64_t t = 0; t < j->m; t += 4) {
        int T = j->m - t < 4 ? (int)(j->m - t) : 4;
        if (six(j->tile)) quarter_tokens_neon_q6(j, g, q4, t, T);
        else quarter_tokens_neon(j, g, q4, t, T);
      }
}
#endif

/* ---- which path runs ----------------------------------------------------------------------
 * The best this CPU has, unless LLAMAONNX_KERNEL_PATH names one (portable, avx2, avxvnni, avx512,
 * amx: what tests and the benchmark use to cover every path on one machine; neon on ARM). A named path
 * the CPU lacks is not taken (it would fault): the best one is, and the Python side says so. */

static int current_path = -1;

#if defined(__x86_64__)
/* Whether this CPU has AMX's int8 tiles (CPUID 7: EDX bits 24, 25) and Linux lends this process
   their state (asked once; a sandbox may refuse, and the AVX-512 path runs instead). */
static int amx_lent(void) {
  static int lent = -1;
  if (lent < 0) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, NULL) >= 7) __cpuid_count(7, 0, a, b, c, d);
#if defined(__linux__)
    lent = (d >> 24 & 1) && (d >> 25 & 1) &&
           syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    lent = 0; /* (other systems: the AVX-512 path; their way of lending the tiles is not wired) */
    (void)d;
#endif
  }
  return lent;
}
#endif

int path_supported(int p) {
  switch (p) {
    case PATH_PORTABLE: return 1;
#if defined(__aarch64__)
    case PATH_NEON: return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
#if defined(__x86_64__)
    case PATH_AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case PATH_AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case PATH_AMX: return path_supported(PATH_AVX512) && amx_lent();
    case PATH_AVXVNNI: /* VEX-encoded, or EVEX on 256-bit registers (rows below) */
      return path_supported(PATH_AVX2) &&
             (__builtin_cpu_supports("avxvnni") ||
              (__builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")));
#endif
    default: return 0;
  }
}

static int best_path(void) {
  static const int order[] = {PATH_AMX, PATH_AVX512, PATH_AVXVNNI, PATH_AVX2, PATH_NEON};
  for (size_t i = 0; i < sizeof order / sizeof *order; i++)
    if (path_supported(order[i])) return order[i];
  return PATH_PORTABLE;
}

int path_from_name(const char* name) {
  if (!name || !*name) return -1;
  if (!strcmp(name, "portable")) return PATH_PORTABLE;
  if (!strcmp(name, "avx2")) return PATH_AVX2;
  if (!strcmp(name, "avx512")) return PATH_AVX512;
  if (!strcmp(name, "amx")) return PATH_AMX;
  if (!strcmp(name, "avxvnni")) return PATH_AVXVNNI;
  if (!strcmp(name, "neon")) return PATH_NEON;
  return -2;
}

int kernel_path(void) {
  if (current_path < 0) {
    int asked = path_from_name(getenv("LLAMAONNX_KERNEL_PATH"));
    current_path = asked >= 0 && path_supported(asked) ? asked : best_path();
  }
  return current_path;
}

static void rows(const Job* j, int64_t g0, int64_t g1);

#if defined(__x86_64__)
/* silu(gate) · up for row groups g0..g1, 8 columns at a time (exp256: Cephes' expf, ~1 ulp). */
AVX2 static void silu_mul_avx2(const Job* j, int64_t g0, int64_t g1, int64_t half) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  for (int64_t t = 0; t < j->m; t++)
    for (int64_t c = g0 * ROWS; c < g1 * ROWS; c += 8) {
      __m256 g = _mm256_loadu_ps(j->scratch + t * j->n + c);
      __m256 u = _mm256_loadu_ps(j->scratch + t * j->n + half + c);
      __m256 den = _mm256_add_ps(one, exp256(_mm256_xor_ps(g, sign)));
      _mm256_storeu_ps(j->y + t * half + c, _mm256_mul_ps(_mm256_div_ps(g, den), u));
    }
}
#endif

/* Whether the kernel itself reads both digits of two-digit activations (the x86 paths, every
   tile but Q6_K's: tile_tokens, tile_tokens_q8, tiles256.h's); elsewhere (NEON, portable C,
   Q6_K) the residual rows are rows of their own, added after. */
static int fused_digits(const Job* j) {
#if defined(__x86_64__)
  return j->digits == 2 && !six(j->tile) && kernel_path() != PATH_PORTABLE;
#else
  (void)j;
  return 0;
#endif
}

/* Whether the rows' passes read Job.sc: tiles256.h's 3–4-token passes (AVX2, AVX-VNNI) on one
   digit, every tile but Q6_K's (half_tile_tokens_q6 reads the three arrays). */
static int side_scalars(const Job* j, int64_t m) {
#if defined(__x86_64__)
  return j->digits == 1 && m >= 3 && !six(j->tile) &&
         (kernel_path() == PATH_AVX2 || kernel_path() == PATH_AVXVNNI);
#else
  (void)j, (void)m;
  return 0;
#endif
}

/* A matmul's working memory, in two allocations that Prep's q and d start: the int8 rows, then
   Prep.keep [M, nb]; the floats d, s, e [rows, nb], the scratch where run_chunk needs one (SwiGLU's
   gate and up [M, N]; [2M, N] where the second digit's rows are computed as rows of their own),
   Prep.wide (bytes); then Prep.kept, then Job.sc where the passes read it, then Job.hs for
   Q6_K's tiles, then Job.wad. Before: p's m, k, digits, blocks (0 for every block) and rows, j's
   n, tile, swiglu and digits. Points p's buffers and j's at them (and rounds p's rows up to whole
   AMX passes where pass_blocks needs them); returns 0, or 1 out of memory (nothing held). */
int alloc_work(Prep* p, Job* j) {
  int64_t m = p->m, k = p->k, nb = k / BLOCK, rows = p->digits * m;
  int apart = j->digits == 2 && !fused_digits(j);
  int64_t scratch = j->swiglu || apart ? (apart ? rows : m) * j->n : 0; /* floats */
  int64_t kept = p->blocks ? (m + 3) / 4 * (nb + 1) : 0;                /* int32s */
  int64_t sc = side_scalars(j, m) ? (m + 3) / 4 * nb * 12 : 0; /* floats */
  int64_t hs = six(j->tile) ? rows * nb * 2 : 0;                 /* int32s */
  int64_t passes = 0; /* AMX, two digits on a few blocks: its passes' flags and scales */
#if defined(__x86_64__)
  if (p->blocks && kernel_path() == PATH_AMX && !six(j->tile)) passes = m / AMX_TOKENS;
#endif
  int64_t wad = passes * AMX_TOKENS * nb, flags = passes * nb; /* floats, bytes */
  p->q = malloc((size_t)(rows * k + (p->blocks ? m * nb : 0) + flags) + 64);
  p->d = malloc(sizeof(float) * (size_t)(rows * nb * 3 + scratch + kept + sc + hs + wad) + 64);
  if (!p->q || !p->d) return free(p->q), free(p->d), 1;
  p->s = p->d + rows * nb, p->e = p->s + rows * nb;
  int fused = fused_digits(j); /* a block's residual beside it */
  p->qrow = fused ? 2 * k : k; /* (act_block) */
  p->qblock = fused ? 2 * BLOCK : BLOCK;
  p->shift = j->shift = digit_shift(j->tile);
  p->keep = p->blocks ? (uint8_t*)p->q + rows * k : NULL;
  p->kept = p->blocks ? (int32_t*)(p->e + rows * nb + scratch) : NULL;
  p->sc = sc ? p->e + rows * nb + scratch + kept : NULL;
  p->hs = hs ? (int32_t*)(p->e + rows * nb + scratch + kept + sc) : NULL;
  p->wad = wad ? p->e + rows * nb + scratch + kept + sc + hs : NULL;
  p->wide = passes ? (uint8_t*)p->q + rows * k + m * nb : NULL;
  if (passes) p->rows = (p->rows + AMX_TOKENS - 1) / AMX_TOKENS * AMX_TOKENS; /* (pass_blocks) */
  j->aq = p->q, j->ad = p->d, j->as = p->s, j->ae = p->e;
  j->scratch = scratch ? p->e + rows * nb : NULL;
  j->kept = p->kept, j->keep = p->keep, j->sc = p->sc, j->hs = p->hs;
  j->wide = p->wide, j->wad = p->wad;
  return 0;
}

void free_work(Prep* p) { free(p->q), free(p->d); }

/* Chunk i of the row groups (of the gate's groups for SwiGLU: each with its up group). */
void run_chunk(void* data, size_t i) {
  const Job* j = (const Job*)data;
  int64_t groups = j->swiglu ? j->groups / 2 : j->groups;
  int64_t g0 = (int64_t)i * j->chunk, g1 = g0 + j->chunk;
  if (g1 > groups) g1 = groups;
  if (g0 >= g1) return;
  int two = j->digits == 2 && !fused_digits(j);
  if (!j->swiglu && !two) {
    rows(j, g0, g1);
    return;
  }
  Job into = *j;
  into.y = j->scratch;
  if (two) into.m = 2 * j->m, into.digits = 1; /* the residual rows as rows of their own */
  rows(&into, g0, g1);
  if (j->swiglu) rows(&into, g0 + groups, g1 + groups);
  if (two) { /* each row's residual row added to it: into y, or for SwiGLU in scratch (gate, up) */
    for (int part = 0; part < 1 + j->swiglu; part++) {
      int64_t c0 = (g0 + part * groups) * ROWS, c1 = (g1 + part * groups) * ROWS;
      for (int64_t t = 0; t < j->m; t++) {
        float* to = (j->swiglu ? j->scratch : j->y) + t * j->n;
        const float *x = j->scratch + t * j->n, *r = j->scratch + (j->m + t) * j->n;
        for (int64_t c = c0; c < c1; c++) to[c] = x[c] + r[c];
      }
    }
    if (!j->swiglu) return;
  }
  int64_t half = j->n / 2;
#if defined(__x86_64__)
  if (kernel_path() != PATH_PORTABLE) {
    silu_mul_avx2(j, g0, g1, half);
    return;
  }
#endif
  for (int64_t t = 0; t < j->m; t++)
    for (int64_t c = g0 * ROWS; c < g1 * ROWS; c++) {
      float g = j->scratch[t * j->n + c], u = j->scratch[t * j->n + half + c];
      j->y[t * half + c] = g / (1.f + expf(-g)) * u;
    }
}

static void rows(const Job* j, int64_t g0, int64_t g1) {
#if defined(__x86_64__)
  switch (kernel_path()) {
    case PATH_AVX512: rows_avx512(j, g0, g1); return;
    case PATH_AMX: rows_amx(j, g0, g1); return;
    case PATH_AVX2: rows_avx2(j, g0, g1); return;
    case PATH_AVXVNNI:
      if (__builtin_cpu_supports("avxvnni")) rows_avxvnni(j, g0, g1);
      else rows_vnni256(j, g0, g1);
      return;
    default: break;
  }
#endif
#if defined(__aarch64__)
  if (kernel_path() == PATH_NEON) {
    rows_neon(j, g0, g1);
    return;
  }
#endif
  if (six(j->tile)) rows_scalar_q6(j, g0, g1);
  else if (j->bits == 8) rows_scalar_q8(j, g0, g1);
  else rows_scalar(j, g0, g1);
}

/* For tests and tools, without onnxruntime: y = a · Wᵀ on one thread, from tiles of `tile` bytes
   (TILE, TILE4M, TILE4Z, TILE4F, TILE4K, TILE4KM or a TILE5 kind: MatMulQ4, TILE8, TILE8Z, TILE6 or TILE6K:
   MatMulQ8). Returns 0 on success. */
int llamaonnx_matmul(int tile, const float* a, int64_t m, int64_t k, const uint8_t* w, int64_t n,
                     float* y) {
  return llamaonnx_matmul_digits(tile, a, m, k, w, n, y, 1, 0);
}

/* The same with the activations in `digits` int8 digits, 1 or 2 (two: each row's int8 rounding
   residual quantized and added; on each row's `blocks` blocks of largest scale, 0: on all). */
int llamaonnx_matmul_digits(int tile, const float* a, int64_t m, int64_t k, const uint8_t* w,
                            int64_t n, float* y, int digits, int64_t blocks) {
  int bits = tile_bits(tile);
  if (k % BLOCK || n % ROWS || !bits || (digits != 1 && digits != 2) || blocks < 0) return 1;
  int64_t nb = k / BLOCK;
  if (super_tile(tile) && nb % K4_BLOCKS) return 1;
  if (digits == 1 || blocks >= nb) blocks = 0; /* (every block) */
  Prep p = {.a = a, .m = m, .k = k, .rows = m, .digits = digits, .blocks = blocks};
  Job j = {.w = w, .y = y, .m = m, .k = k, .n = n, .nb = nb, .groups = n / ROWS,
           .chunk = n / ROWS, .bits = bits, .tile = tile, .digits = digits};
  if (alloc_work(&p, &j)) return 2;
  prepare_rows(&p, 0);
  run_chunk(&j, 0);
  free_work(&p);
  return 0;
}

/* Rows `ids` of a MatMulQ8 weight (8-bit tiles, or Q6_K's), dequantized exactly as the blocks
   they hold (d·(c − z), s·(q − 32)): out [count, K]. Returns the first bad id's position + 1,
   or 0. */
int64_t llamaonnx_gather_q8(int tile, const uint8_t* w, int64_t n, int64_t k, const int64_t* ids,
                            int64_t count, float* out) {
  int64_t nb = k / BLOCK;
  for (int64_t i = 0; i < count; i++) {
    int64_t id = ids[i];
    if (id < 0) id += n;
    if (id < 0 || id >= n) return i + 1;
    int64_t g = id / ROWS, r = id % ROWS;
    float* row = out + i * k;
    for (int64_t b = 0; b < nb; b++, row += BLOCK) {
      const uint8_t* p = tile_at(w, nb, tile, g, b);
      if (six(tile)) { /* s·(q − 32) of each half, as the blocks */
        int q[BLOCK];
        float s[2];
        row_codes(p, (int)r, tile == TILE6K ? CRUMBS : 2, q);
        halves_row(p, b, tile, (int)r, &s[0], &s[1]);
        for (int c = 0; c < BLOCK; c++) row[c] = s[c / 16] * (float)(q[c] - 32);
        continue;
      }
      uint16_t dh;
      memcpy(&dh, p + 512 + 2 * r, 2);
      float d = half_to_float(dh), z = (float)zero8(p, tile, (int)r);
      for (int v = 0; v < 8; v++)
        for (int c = 0; c < 4; c++) row[4 * v + c] = d * ((float)p[v * 64 + r * 4 + c] - z);
    }
  }
  return 0;
}

/* The path that runs (0 portable, 1 AVX2, 2 AVX-512 VNNI, 3 NEON, 4 AVX-VNNI, 5 AMX). `set`: -1
   leaves it, -2 returns to the default (the environment's, else the best), 0..5 takes that path
   if this CPU has it (else returns -1 and changes nothing). */
int llamaonnx_kernel_path(int set) {
  if (set == -2) current_path = -1;
  else if (set >= 0) {
    if (!path_supported(set)) return -1;
    current_path = set;
  }
  return kernel_path();
}

int llamaonnx_path_supported(int p) { return path_supported(p); }

/* The tile layout, for the packer (export/quant/native.py): 0 rows per tile, 1 block width,
   2 bytes of a 4-bit tile, 3 bytes of an 8-bit tile, 4 bytes of a 4-bit tile with fp32 d and m,
   5 and 6 bytes of a 5-bit tile with fp16 and with fp32 d and m, 7 bytes of a 6-bit tile, 8 bytes
   of a 5-bit tile without m, 9 and 10 those of 5 and 6 with zero points, 11, 12 and 13 a Q4_K,
   a Q6_K and a Q5_K super-block tile's slot, 14 bytes of a 4-bit tile without m and z (Q4_0),
   15 of an 8-bit tile without z (Q8_0), 16 of a 4-bit tile without z (Q4_1), 17 the layouts'
   revision (TILE_LAYOUT), 18 the oldest revision the kernels read, 19 a Q4_K super-block tile's
   slot without z; -1 for anything else. */
int64_t llamaonnx_layout(int what) {
  switch (what) {
    case 0: return ROWS;
    case 1: return BLOCK;
    case 2: return TILE;
    case 3: return TILE8;
    case 4: return TILE4F;
    case 5: return TILE5;
    case 6: return TILE5F;
    case 7: return TILE6;
    case 8: return TILE5Z;
    case 9: return TILE5ZP;
    case 10: return TILE5ZPF;
    case 11: return TILE4K;
    case 12: return TILE6K;
    case 13: return TILE5K;
    case 14: return TILE4Z;
    case 15: return TILE8Z;
    case 16: return TILE4M;
    case 17: return TILE_LAYOUT;
    case 18: return TILE_LAYOUT_OLDEST;
    case 19: return TILE4KM;
    default: return -1;
  }
}

