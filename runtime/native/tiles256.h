/* tiles256.h: the kernels of the 256-bit paths (8 rows a register), included by matmul.c once per
 * path, after it defines TARGET256 (the path's target attribute), NAME256(x) (x with the path's
 * suffix) and the path's integer dot products: NAME256(dot_u4) (4-bit codes), NAME256(dot_u5)
 * (5-bit) and NAME256(dot_s8) (8-bit codes made signed, with their magnitudes) on a half tile's
 * 8 code registers, and NAME256(pair_add), NAME256(widen) and NAME256(add_s8), the same products
 * a register at a time. Not a header of its own: no include guard. */

/* A 5- or 6-bit tile's high bits for half h of register u: bit i of `bits` → `value` in byte i. */
TARGET256 INLINE __m256i NAME256(bit_bytes)(uint32_t bits, char value) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  __m256i x = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread), bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(x, bit), _mm256_set1_epi8(value));
}

/* Code registers 2v and 2v + 1 of half h (rows 8h..8h+7) of a tile, as codes512 lays them out
   (codes 8v..8v+3 and 8v+4..8v+7 — a's int32 words 2v, 2v + 1), with `planes` high-bit planes,
   or CRUMBS (TILE6K's: registers 2v, 2v + 1 take bits 4·(v % 2).. of the crumbs at v / 2). */
TARGET256 INLINE void NAME256(code_pair)(const uint8_t* p, int h, int v, int planes, __m256i* c0, __m256i* c1) {
  const __m256i lo = _mm256_set1_epi8(0x0F);
  __m256i x = _mm256_loadu_si256((const __m256i*)(p + v * 64 + 32 * h));
  *c0 = _mm256_and_si256(x, lo);
  *c1 = _mm256_and_si256(_mm256_srli_epi16(x, 4), lo);
  if (planes == CRUMBS) {
    const __m256i m = _mm256_set1_epi8(0x30);
    __m256i hb = _mm256_loadu_si256((const __m256i*)(p + 256 + 64 * (v / 2) + 32 * h));
    __m256i x0 = v % 2 ? hb : _mm256_slli_epi16(hb, 4);
    __m256i x1 = v % 2 ? _mm256_srli_epi16(hb, 2) : _mm256_slli_epi16(hb, 2);
    *c0 = _mm256_or_si256(*c0, _mm256_and_si256(x0, m));
    *c1 = _mm256_or_si256(*c1, _mm256_and_si256(x1, m));
  }
  for (int k = 0; k < planes; k++) {
    uint32_t bits0, bits1;
    memcpy(&bits0, p + FIFTH + 64 * k + 8 * (2 * v) + 4 * h, 4);
    memcpy(&bits1, p + FIFTH + 64 * k + 8 * (2 * v + 1) + 4 * h, 4);
    *c0 = _mm256_or_si256(*c0, NAME256(bit_bytes)(bits0, (char)(16 << k)));
    *c1 = _mm256_or_si256(*c1, NAME256(bit_bytes)(bits1, (char)(16 << k)));
  }
}

/* Half h of a tile's codes in 8 registers (code_pair's, in order). */
TARGET256 INLINE void NAME256(codes)(const uint8_t* p, int h, int planes, __m256i c[8]) {
  for (int v = 0; v < 4; v++) NAME256(code_pair)(p, h, v, planes, &c[2 * v], &c[2 * v + 1]);
}

/* The lines of the block AHEAD256 blocks after p (blocks of `stride` bytes), prefetched by the
   one- and two-token passes (pair_tokens): at decode the weights stream from memory, and with
   the hardware prefetcher alone the loads wait. Past a weight's end it prefetches bytes it never
   reads, which cannot fault. */
#ifndef AHEAD256
#define AHEAD256 16
#endif
TARGET256 INLINE void NAME256(ahead)(const uint8_t* p, int64_t stride) {
  if (super_tile(stride)) return; /* (its one ascending stream: see tiles.h) */
  for (int64_t o = 0; o < stride; o += 64) _mm_prefetch((const char*)p + AHEAD256 * stride + o, _MM_HINT_T0);
}

/* The integer sums of a token's two digits joined, F·s + s_r (exact in int32: see join512 in
   matmul.c). */
TARGET256 INLINE __m256i NAME256(join)(const Job* j, __m256i s, __m256i r) {
  return _mm256_add_epi32(_mm256_sll_epi32(s, _mm_cvtsi32_si128(j->shift)), r);
}

/* Two digits on a few blocks (`two` 2 below, as few512 in matmul.c): on a block the group keeps
   a residual on (the next in its list), token t's sum s (block ib) joined with its residual's r
   where it keeps one (its scale then the joined sum's: fold_digits), else s. */
TARGET256 INLINE __m256i NAME256(few)(const Job* j, int64_t ib, __m256i s, __m256i r) {
  int keep = j->keep[ib];
  return _mm256_blendv_epi8(s, NAME256(join)(j, s, r), _mm256_set1_epi32(-keep));
}

/* Half h of a MatMulQ4 tile's scales: d, m (−zero·d where the tile has none: Layout.zero) and
   the zero points' z·d (zero·d for codes without zero points, −m for a tile centred on its zero
   weight: ZERO_WEIGHT). */
TARGET256 INLINE __m256 NAME256(bytes)(const uint8_t* x) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)x)));
}
TARGET256 INLINE void NAME256(scales)(const uint8_t* p, Layout l, int64_t b, int h, int five, __m256* d, __m256* m, __m256* zd) {
  const uint8_t* s = tile_scalars(p, b, l); /* (p itself but for the super-block tiles) */
  if (l.k4) { /* d = D·sc, m = E·mn: exact in fp32 */
    *d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(k4_d(s, b, l) + 16 * h))),
                       NAME256(bytes)(s + l.d + 8 * h));
    *m = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(k4_e(s, b, l) + 16 * h))),
                       NAME256(bytes)(s + l.m + 8 * h));
  } else {
    const int dsize = l.f32 ? 4 : 2;
    *d = l.f32 ? _mm256_loadu_ps((const float*)(p + l.d) + 8 * h)
               : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + l.d + 8 * dsize * h)));
    *m = l.m < 0 ? _mm256_mul_ps(_mm256_set1_ps(-(float)l.zero), *d)
         : l.f32 ? _mm256_loadu_ps((const float*)(p + l.m) + 8 * h)
                 : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + l.m + 8 * dsize * h)));
  }
  *zd = l.z == ZERO_WEIGHT ? _mm256_sub_ps(_mm256_setzero_ps(), *m)
        : l.z < 0          ? _mm256_mul_ps(_mm256_set1_ps((float)l.zero), *d)
                           : _mm256_mul_ps(NAME256(bytes)(s + l.z + 8 * h), *d);
}

/* The float work of a token's integer sums s on a block of half a tile: d·ad·s + m·as + zd·ae,
   ad, as, ae the token's block scalars (Job). */
TARGET256 INLINE __m256 NAME256(weigh)(__m256i s, __m256 d, __m256 m, __m256 zd, float ad, float as, float ae, __m256 acc) {
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(ad)), acc);
  acc = _mm256_fmadd_ps(m, _mm256_set1_ps(as), acc);
  return _mm256_fmadd_ps(zd, _mm256_set1_ps(ae), acc);
}

/* Token t's integer sums s (and its residual's, sr, where it reads one: two 1, or `here`)
   on block b of half a tile, times the scales, added to acc: the float work of a token, the same
   in every pass. */
TARGET256 INLINE __m256 NAME256(sums_to)(const Job* j, __m256i s, __m256i sr, __m256 d, __m256 m, __m256 zd, int64_t b, int64_t t, int two, int here, __m256 acc) {
  int64_t ib = t * j->nb + b; /* (two digits: the joined sum's scalars, fold_digits) */
  if (two == 1 || here) s = two == 1 ? NAME256(join)(j, s, sr) : NAME256(few)(j, ib, s, sr);
  return NAME256(weigh)(s, d, m, zd, j->ad[ib], j->as[ib], j->ae[ib], acc);
}

/* Token t's block b on half a tile's codes c, added to acc. `here`: a block its group keeps a
   residual on (two 2). */
TARGET256 INLINE __m256 NAME256(token)(const Job* j, const __m256i c[8], __m256 d, __m256 m, __m256 zd, int64_t b, int64_t t, int five, int two, int here, __m256 acc) {
  const int32_t* a = (const int32_t*)act_block(j, t, b, two);
  __m256i s = five ? NAME256(dot_u5)(c, a) : NAME256(dot_u4)(c, a), sr = s;
  if (two == 1 || here) {
    const int32_t* r = (const int32_t*)(act_block(j, t, b, two) + BLOCK);
    sr = five ? NAME256(dot_u5)(c, r) : NAME256(dot_u4)(c, r);
  }
  return NAME256(sums_to)(j, s, sr, d, m, zd, b, t, two, here, acc);
}

/* The integer sums of T tokens (rows t0.. of the activations; `res` 1: and their residuals', into
   sr; 2: their residuals' alone, into s)
   on block b, half h of a tile (p), each pair of code registers unpacked once and taken by every
   token before the next (as codes lays them out): the same sums as dot_u4 / dot_u5 give on
   codes' registers, integers in a different order (4-bit: ≤ 8 products a lane in int16, as
   dot_u4; 5-bit: 4, as dot_u5), with T int16 accumulators live instead of 8 code registers. */
TARGET256 INLINE void NAME256(tile_sums)(const Job* j, const uint8_t* p, int h, int64_t b, int64_t t0, int T, int five, int two, int res, __m256i s[4], __m256i sr[4]) {
  const int32_t *a[4], *r[4];
  __m256i w[4], wr[4];
  for (int t = 0; t < T; t++) {
    a[t] = (const int32_t*)(act_block(j, t0 + t, b, two) + (res == 2 ? BLOCK : 0));
    r[t] = (const int32_t*)(act_block(j, t0 + t, b, two) + BLOCK);
    w[t] = wr[t] = s[t] = sr[t] = _mm256_setzero_si256();
  }
  for (int v = 0; v < 4; v++) {
    __m256i c0, c1;
    NAME256(code_pair)(p, h, v, five, &c0, &c1);
    for (int t = 0; t < T; t++) {
      w[t] = NAME256(pair_add)(w[t], c0, c1, _mm256_set1_epi32(a[t][2 * v]), _mm256_set1_epi32(a[t][2 * v + 1]));
      if (res == 1) wr[t] = NAME256(pair_add)(wr[t], c0, c1, _mm256_set1_epi32(r[t][2 * v]), _mm256_set1_epi32(r[t][2 * v + 1]));
      /* kept in its register here: else GCC reassociates the integer adds into a tree over all
         32 products, which holds them all at once and spills */
      __asm__("" : "+x"(w[t]));
      if (res == 1) __asm__("" : "+x"(wr[t]));
    }
    if (v == 3 || (five && v == 1)) /* widened: all 8 products (4-bit), or each 4 (5-bit) */
      for (int t = 0; t < T; t++) {
        s[t] = _mm256_add_epi32(s[t], NAME256(widen)(w[t]));
        w[t] = _mm256_setzero_si256();
        if (res == 1) {
          sr[t] = _mm256_add_epi32(sr[t], NAME256(widen)(wr[t]));
          wr[t] = _mm256_setzero_si256();
        }
      }
  }
}

/* T tokens (3 or 4) share each half tile (8 rows × 32 codes): tile_sums, then each token's
   float work. `five`: a 5-bit tile; `two`: two-digit activations read in one pass, as on
   AVX-512 (constants wherever this is inlined). Measured on a 2-core AMD EPYC (Zen 3, AVX2
   only), one thread, against the 8 code registers every token read before (which spilled the
   accumulators: 8 codes, 4 accumulators and 3 scales in 16 registers): see docs/speed.md.
   One digit reads the tokens' block scalars side by side (Job.sc, which alloc_work lays out for
   every one-digit job of 3 or more rows on these paths): the same floats, so the same bits. The
   three arrays had cost each token three pointers, 12 general registers for 4 tokens, reloaded
   from the stack every block; one thread, a 1024×576 Q4_1 weight from L2, 4 / 8 / 64 rows:
   1.05× / 1.10× / 1.09× (docs/speed.md). */
TARGET256 INLINE void NAME256(half_tile_tokens)(const Job* j, int64_t g, int h, int64_t t0, int T, int five, int two) {
  const int side = two == 0; /* one digit: the block scalars side by side (Job.sc) */
  __m256 acc[4];
  for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
  const int64_t stride = j->tile;
  const Layout l = layout_of(stride);
  const uint8_t* p = tile_at(j->w, j->nb, stride, g, 0);
  const int32_t* u = two == 2 ? j->kept + t0 / 4 * (j->nb + 1) : NULL;
  const float* sc = side ? j->sc + t0 / 4 * j->nb * 12 : NULL;
  for (int64_t b = 0; b < j->nb; p = tile_step(p, b, stride), b++) {
    int here = two == 2 && *u == b; /* (a block the group keeps a residual on) */
    u += here;
    __m256i s[4], sr[4];
    if ((two == 1 || here) && !APART256) NAME256(tile_sums)(j, p, h, b, t0, T, five, two, 1, s, sr);
    else NAME256(tile_sums)(j, p, h, b, t0, T, five, two, 0, s, sr);
    if ((two == 1 || here) && APART256) { /* the residuals' in a pass of their own */
      __m256i unused[4];
      NAME256(tile_sums)(j, p, h, b, t0, T, five, two, 2, sr, unused);
    }
    __m256 d, m, zd;
    NAME256(scales)(p, l, b, h, five, &d, &m, &zd);
    if (side) {
      for (int t = 0; t < T; t++) acc[t] = NAME256(weigh)(s[t], d, m, zd, sc[3 * t], sc[3 * t + 1], sc[3 * t + 2], acc[t]);
      sc += 12;
    } else {
      for (int t = 0; t < T; t++) acc[t] = NAME256(sums_to)(j, s[t], sr[t], d, m, zd, b, t0 + t, two, here, acc[t]);
    }
  }
  for (int t = 0; t < T; t++) _mm256_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS + 8 * h, acc[t]);
}

/* One or two tokens (a decode step) with two digits (one token with two: few_tokens, which
   also takes every one-digit pass) take both halves of each block in one pass over the tile,
   each row's sums the same as a pass per half gives: a block's bytes are used as they arrive,
   where a second pass re-read the first's lines from cache while memory idled; and the blocks
   AHEAD256 on are prefetched. Measured on a 2-core AMD EPYC (Zen 3, AVX2 only), interleaved
   against the build before: one thread, a decode step's layer matmuls streamed from memory
   1.16–1.31× and the 8-bit head 1.43–1.55× (16 blocks ahead the best of 4 to 64); the whole
   decode step 1.15–1.21× (runtime.bench.ab, 130- and 1000-token prompts). Three or four tokens'
   accumulators and codes would not fit the 16 registers together: they keep a pass per half,
   without prefetches (which, even never run, cost those register-bound loops 10–14 % at a
   130-token prompt; a burst for the next tile group cost 4 and 8 rows 10–18 %). */
TARGET256 INLINE void NAME256(pair_tokens)(const Job* j, int64_t g, int64_t t0, int T, int five, int two) {
  __m256 acc[2][2];
  for (int h = 0; h < 2; h++)
    for (int t = 0; t < T; t++) acc[h][t] = _mm256_setzero_ps();
  const int64_t stride = j->tile;
  const Layout l = layout_of(stride);
  const uint8_t* p = tile_at(j->w, j->nb, stride, g, 0);
  const int32_t* u = two == 2 ? j->kept + t0 / 4 * (j->nb + 1) : NULL;
  for (int64_t b = 0; b < j->nb; p = tile_step(p, b, stride), b++) {
    int here = two == 2 && *u == b;
    u += here;
    if (t0 == 0) NAME256(ahead)(p, stride);
    for (int h = 0; h < 2; h++) {
      __m256i c[8];
      NAME256(codes)(p, h, five, c);
      __m256 d, m, zd;
      NAME256(scales)(p, l, b, h, five, &d, &m, &zd);
      for (int t = 0; t < T; t++) acc[h][t] = NAME256(token)(j, c, d, m, zd, b, t0 + t, five, two, here, acc[h][t]);
    }
  }
  for (int h = 0; h < 2; h++)
    for (int t = 0; t < T; t++) _mm256_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS + 8 * h, acc[h][t]);
}

/* Half h of an 8-bit tile's codes: c − 128 as int8 and its magnitude (≤ 128) as uint8 in u. */
TARGET256 INLINE void NAME256(codes8)(const uint8_t* p, int h, __m256i c[8], __m256i u[8]) {
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  for (int v = 0; v < 8; v++) {
    c[v] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(p + v * 64 + 32 * h)), flip);
    u[v] = _mm256_abs_epi8(c[v]);
  }
}

/* An 8-bit tile's float work of a token's sums s on a block of half a tile: d·(ad·s + shift·qs),
   qs = as − ae (da·Σ â_int). */
TARGET256 INLINE __m256 NAME256(weigh8)(__m256i s, __m256 d, __m256 shift, float ad, float qs, __m256 acc) {
  __m256 x = _mm256_fmadd_ps(shift, _mm256_set1_ps(qs),
                             _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(ad)));
  return _mm256_fmadd_ps(d, x, acc);
}

/* Token t's integer sums s (and its residual's, sr: two 1, or `here`) on block b of half an
   8-bit tile, times d and its shift 128 − z, added to acc: the float work of a token, the same
   in every pass. */
TARGET256 INLINE __m256 NAME256(sums8_to)(const Job* j, __m256i s, __m256i sr, __m256 d, __m256 shift, int64_t b, int64_t t, int two, int here, __m256 acc) {
  int64_t ib = t * j->nb + b;
  float qs = j->as[ib] - j->ae[ib]; /* da·Σ â_int (both digits': fold_digits) */
  if (two == 1 || here) s = two == 1 ? NAME256(join)(j, s, sr) : NAME256(few)(j, ib, s, sr);
  return NAME256(weigh8)(s, d, shift, j->ad[ib], qs, acc);
}

/* Token t's block b on half an 8-bit tile (codes8), d its scales, shift 128 − z; `here` as in
   token. */
TARGET256 INLINE __m256 NAME256(token8)(const Job* j, const __m256i u[8], const __m256i c[8], __m256 d, __m256 shift, int64_t b, int64_t t, int two, int here, __m256 acc) {
  const int32_t* a = (const int32_t*)act_block(j, t, b, two);
  __m256i s = NAME256(dot_s8)(u, c, a), sr = s;
  if (two == 1 || here) sr = NAME256(dot_s8)(u, c, (const int32_t*)(act_block(j, t, b, two) + BLOCK));
  return NAME256(sums8_to)(j, s, sr, d, shift, b, t, two, here, acc);
}

/* tile_sums for an 8-bit tile: each code register (c − 128, and its magnitude) made once and
   taken by every token before the next, the same int32 sums as dot_s8's. */
TARGET256 INLINE void NAME256(tile_sums8)(const Job* j, const uint8_t* p, int h, int64_t b, int64_t t0, int T, int two, int res, __m256i s[4], __m256i sr[4]) {
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  const int32_t *a[4], *r[4];
  for (int t = 0; t < T; t++) {
    a[t] = (const int32_t*)act_block(j, t0 + t, b, two);
    r[t] = (const int32_t*)(act_block(j, t0 + t, b, two) + BLOCK);
    s[t] = sr[t] = _mm256_setzero_si256();
  }
  for (int v = 0; v < 8; v++) {
    __m256i c = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(p + v * 64 + 32 * h)), flip);
    __m256i u = _mm256_abs_epi8(c);
    for (int t = 0; t < T; t++) {
      s[t] = NAME256(add_s8)(s[t], u, c, _mm256_set1_epi32(a[t][v]));
      if (res) sr[t] = NAME256(add_s8)(sr[t], u, c, _mm256_set1_epi32(r[t][v]));
      __asm__("" : "+x"(s[t])); /* (as in tile_sums) */
      if (res) __asm__("" : "+x"(sr[t]));
    }
  }
}

/* Half h of an 8-bit tile's scales d and 128 − z (Σ c·a = Σ (c − 128)·a + 128·Σ a; 0 for
   TILE8Z, whose z is 128). */
TARGET256 INLINE void NAME256(scales8)(const uint8_t* p, int64_t tile, int h, __m256* d, __m256* shift) {
  *d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 512 + 16 * h)));
  if (tile == TILE8Z) {
    *shift = _mm256_setzero_ps();
    return;
  }
  __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 544 + 8 * h))));
  *shift = _mm256_sub_ps(_mm256_set1_ps(128.f), z);
}

TARGET256 INLINE void NAME256(half_tile_tokens_q8)(const Job* j, int64_t g, int h, int64_t t0, int T, int two) {
  const int side = two == 0; /* as half_tile_tokens */
  __m256 acc[4];
  for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
  const int64_t tile = j->tile;
  const uint8_t* p = j->w + g * j->nb * tile;
  const int32_t* kb = two == 2 ? j->kept + t0 / 4 * (j->nb + 1) : NULL;
  const float* sc = side ? j->sc + t0 / 4 * j->nb * 12 : NULL;
  for (int64_t b = 0; b < j->nb; b++, p += tile) {
    int here = two == 2 && *kb == b; /* (a block the group keeps a residual on) */
    kb += here;
    __m256i s[4], sr[4];
    if (two == 1 || here) NAME256(tile_sums8)(j, p, h, b, t0, T, two, 1, s, sr);
    else NAME256(tile_sums8)(j, p, h, b, t0, T, two, 0, s, sr);
    __m256 d, shift;
    NAME256(scales8)(p, tile, h, &d, &shift);
    if (side) {
      for (int t = 0; t < T; t++) acc[t] = NAME256(weigh8)(s[t], d, shift, sc[3 * t], sc[3 * t + 1] - sc[3 * t + 2], acc[t]);
      sc += 12;
    } else {
      for (int t = 0; t < T; t++) acc[t] = NAME256(sums8_to)(j, s[t], sr[t], d, shift, b, t0 + t, two, here, acc[t]);
    }
  }
  for (int t = 0; t < T; t++) _mm256_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS + 8 * h, acc[t]);
}

TARGET256 INLINE void NAME256(pair_tokens_q8)(const Job* j, int64_t g, int64_t t0, int T, int two) {
  __m256 acc[2][2];
  for (int h = 0; h < 2; h++)
    for (int t = 0; t < T; t++) acc[h][t] = _mm256_setzero_ps();
  const int64_t tile = j->tile;
  const uint8_t* p = j->w + g * j->nb * tile;
  const int32_t* kb = two == 2 ? j->kept + t0 / 4 * (j->nb + 1) : NULL;
  for (int64_t b = 0; b < j->nb; b++, p += tile) {
    int here = two == 2 && *kb == b;
    kb += here;
    if (t0 == 0) NAME256(ahead)(p, tile);
    for (int h = 0; h < 2; h++) {
      __m256i c[8], u[8];
      NAME256(codes8)(p, h, c, u);
      __m256 d, shift;
      NAME256(scales8)(p, tile, h, &d, &shift);
      for (int t = 0; t < T; t++) acc[h][t] = NAME256(token8)(j, u, c, d, shift, b, t0 + t, two, here, acc[h][t]);
    }
  }
  for (int h = 0; h < 2; h++)
    for (int t = 0; t < T; t++) _mm256_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS + 8 * h, acc[h][t]);
}

/* Block b (at p) of a 6-bit tile's half h for T tokens (1..4), added to acc: each pair of code
   registers unpacked once and taken by every token before the next, into one int32 sum per half
   block (x, from −32·Σ a of the half, Job.hs, as the scalar path), then the two halves' scales. */
TARGET256 INLINE void NAME256(block_q6)(const Job* j, const uint8_t* p, int h, int64_t b, int64_t t0, int T, __m256 acc[4]) {
  const int32_t* a[4];
  __m256i x[4][2];
  for (int t = 0; t < T; t++) {
    a[t] = (const int32_t*)act_block(j, t0 + t, b, 0);
    const int32_t* hs = j->hs + 2 * ((t0 + t) * j->nb + b);
    x[t][0] = _mm256_set1_epi32(-32 * hs[0]), x[t][1] = _mm256_set1_epi32(-32 * hs[1]);
  }
  for (int v = 0; v < 4; v++) {
    __m256i c0, c1;
    NAME256(code_pair)(p, h, v, j->tile == TILE6K ? CRUMBS : 2, &c0, &c1);
    for (int t = 0; t < T; t++) { /* two registers' products at a time: ≤ 63·127·4 in int16 */
      __m256i w = NAME256(pair_add)(_mm256_setzero_si256(), c0, c1, _mm256_set1_epi32(a[t][2 * v]),
                                    _mm256_set1_epi32(a[t][2 * v + 1]));
      x[t][v / 2] = _mm256_add_epi32(x[t][v / 2], NAME256(widen)(w));
      __asm__("" : "+x"(x[t][v / 2])); /* (as in tile_sums) */
    }
  }
  __m256 s0, s1;
  if (j->tile == TILE6K) { /* (halves_row's D·sc, exact) */
    const uint8_t* sb = super_of(p, b, TILE6K);
    __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sb + K6_D + 16 * h)));
    const uint8_t* sc = sb + 32 * (b & 7) + 8 * h;
    s0 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)sc))));
    s1 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(sc + 16)))));
  } else {
    s0 = _mm256_loadu_ps((const float*)(p + HALVES) + 8 * h);
    s1 = _mm256_loadu_ps((const float*)(p + HALVES + 64) + 8 * h);
  }
  for (int t = 0; t < T; t++) {
    __m256 y = _mm256_fmadd_ps(s1, _mm256_cvtepi32_ps(x[t][1]), _mm256_mul_ps(s0, _mm256_cvtepi32_ps(x[t][0])));
    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(j->ad[(t0 + t) * j->nb + b]), y, acc[t]);
  }
}

TARGET256 INLINE void NAME256(half_tile_tokens_q6)(const Job* j, int64_t g, int h, int64_t t0, int T) {
  __m256 acc[4];
  for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
  const uint8_t* p = tile_at(j->w, j->nb, j->tile, g, 0);
  for (int64_t b = 0; b < j->nb; p = tile_step(p, b, j->tile), b++) {
    NAME256(block_q6)(j, p, h, b, t0, T, acc);
  }
  for (int t = 0; t < T; t++) _mm256_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS + 8 * h, acc[t]);
}

/* pair_tokens for a 6-bit tile: one or two tokens take both halves of each block in one pass,
   prefetching ahead */
TARGET256 INLINE void NAME256(pair_tokens_q6)(const Job* j, int64_t g, int64_t t0, int T) {
  __m256 acc[2][4];
  for (int h = 0; h < 2; h++)
    for (int t = 0; t < T; t++) acc[h][t] = _mm256_setzero_ps();
  const uint8_t* p = tile_at(j->w, j->nb, j->tile, g, 0);
  for (int64_t b = 0; b < j->nb; p = tile_step(p, b, j->tile), b++) {
    if (t0 == 0) NAME256(ahead)(p, j->tile);
    for (int h = 0; h < 2; h++) NAME256(block_q6)(j, p, h, b, t0, T, acc[h]);
  }
  for (int h = 0; h < 2; h++)
    for (int t = 0; t < T; t++) _mm256_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS + 8 * h, acc[h][t]);
}

/* One or two tokens (rows t0.., T a constant) on tile group g of MatMulQ4 tiles of `tile` bytes
   (a constant: 4- or 5-bit codes, fp16 or fp32 scales), with one digit, or one token with two
   (`two` 1: its residual row read in the same pass, as a second row): a decode step's layer
   matmuls, which at one or two rows are bound by this loop's instructions, not by memory. Each
   pair of code registers is unpacked for both halves at once and taken by every row, so each
   activation word is broadcast once a block (pair_tokens: once a half); the int16 sums stay
   within dot_u4's and dot_u5's bounds (8 and 4 products a lane). The same integer sums and the
   same float operations in the same order as pair_tokens: the same bits. */
TARGET256 INLINE void NAME256(few_tokens)(const Job* j, int64_t g, int64_t t0, const int T, const int tile, const int two) {
  const Layout l = layout_of(tile);
  const int five = l.five, R = T * (1 + two); /* rows read: the tokens, then their residuals */
  __m256 acc[2][2];
  for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  const uint8_t* p = tile_at(j->w, j->nb, tile, g, 0);
  const int32_t* a[2];
  for (int r = 0; r < R; r++) /* (a residual's block: BLOCK bytes past its token's) */
    a[r] = (const int32_t*)(r < T ? act_block(j, t0 + r, 0, two) : act_block(j, t0 + r - T, 0, two) + BLOCK);
  const int64_t words = (two ? 2 : 1) * BLOCK / 4;
  for (int64_t b = 0; b < j->nb; p = tile_step(p, b, tile), b++) {
    if (t0 == 0) NAME256(ahead)(p, tile);
    __m256i w[2][2][2];
    for (int r = 0; r < R; r++)
      for (int h = 0; h < 2; h++) w[r][h][0] = w[r][h][1] = _mm256_setzero_si256();
    for (int v = 0; v < 4; v++) {
      __m256i a0[2], a1[2];
      for (int r = 0; r < R; r++) {
        a0[r] = _mm256_set1_epi32(a[r][b * words + 2 * v]);
        a1[r] = _mm256_set1_epi32(a[r][b * words + 2 * v + 1]);
      }
      for (int h = 0; h < 2; h++) {
        __m256i c0, c1;
        NAME256(code_pair)(p, h, v, five, &c0, &c1);
        int u = five ? v / 2 : 0; /* 5-bit: a sum per two registers' pairs */
        for (int r = 0; r < R; r++) w[r][h][u] = NAME256(pair_add)(w[r][h][u], c0, c1, a0[r], a1[r]);
      }
    }
    for (int t = 0; t < T; t++)
      for (int h = 0; h < 2; h++) {
        __m256i s[2];
        for (int x = 0; x <= two; x++) {
          s[x] = NAME256(widen)(w[t + x * T][h][0]);
          if (five) s[x] = _mm256_add_epi32(s[x], NAME256(widen)(w[t + x * T][h][1]));
          __asm__("" : "+x"(s[x])); /* the float work after the integer sums, a half at a time */
        }
        __m256 d, m, zd;
        NAME256(scales)(p, l, b, h, five, &d, &m, &zd);
        acc[t][h] = NAME256(sums_to)(j, s[0], s[two], d, m, zd, b, t0 + t, two, 0, acc[t][h]);
        __asm__("" : "+x"(acc[t][h]));
      }
  }
  for (int t = 0; t < T; t++) {
    _mm256_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS, acc[t][0]);
    _mm256_storeu_ps(j->y + (t0 + t) * j->n + g * ROWS + 8, acc[t][1]);
  }
}

/* few_tokens by the tile's kind (every MatMulQ4 tile), `two` a constant. */
TARGET256 INLINE void NAME256(few_kind)(const Job* j, int64_t g, int64_t t0, int T, const int two) {
#define KIND256(S) \
  case S: NAME256(few_tokens)(j, g, t0, T, S, two); return;
  switch (j->tile) {
    MATMULQ4_TILES(KIND256)
    default: NAME256(few_tokens)(j, g, t0, T, TILE5Z, two); return;
  }
#undef KIND256
}

/* T (1 or 2, a constant) tokens of tile group g in one pass, by the tile's kind. */
TARGET256 INLINE void NAME256(pair_kind)(const Job* j, int64_t g, int64_t t0, int T) {
  int two = j->digits == 2 ? (j->kept ? 2 : 1) : 0; /* fused_digits; 2: on a few blocks */
  int five = layout_of(j->tile).five;
  if (six(j->tile)) NAME256(pair_tokens_q6)(j, g, t0, T);
  else if (j->bits == 8 && two == 2) NAME256(pair_tokens_q8)(j, g, t0, T, 2);
  else if (j->bits == 8 && two) NAME256(pair_tokens_q8)(j, g, t0, T, 1);
  else if (j->bits == 8) NAME256(pair_tokens_q8)(j, g, t0, T, 0);
  else if (!two) NAME256(few_kind)(j, g, t0, T, 0);
  else if (two == 1 && T == 1) NAME256(few_kind)(j, g, t0, 1, 1);
  else if (five && two == 2) NAME256(pair_tokens)(j, g, t0, T, 1, 2);
  else if (two == 2) NAME256(pair_tokens)(j, g, t0, T, 0, 2);
  else if (five) NAME256(pair_tokens)(j, g, t0, T, 1, 1);
  else NAME256(pair_tokens)(j, g, t0, T, 0, 1);
}

/* Kept out of line, so that the pass-per-half loops compile as they did alone (with a first,
   generalised form of these loops inlined beside them, the 4-token loops lost 8–11 %). */
TARGET256 __attribute__((noinline)) static void NAME256(pair)(const Job* j, int64_t g, int64_t t0, int T) {
  if (T == 1) NAME256(pair_kind)(j, g, t0, 1);
  else NAME256(pair_kind)(j, g, t0, 2);
}

TARGET256 INLINE void NAME256(tile)(const Job* j, int64_t g, int64_t t0, int T) {
  if (T <= 2) { /* both halves in one pass */
    NAME256(pair)(j, g, t0, T);
    return;
  }
  int two = j->digits == 2 ? (j->kept ? 2 : 1) : 0; /* fused_digits; 2: on a few blocks */
  for (int h = 0; h < 2; h++) {
    if (six(j->tile)) NAME256(half_tile_tokens_q6)(j, g, h, t0, T);
    else if (j->bits == 8 && two == 2) NAME256(half_tile_tokens_q8)(j, g, h, t0, T, 2);
    else if (j->bits == 8 && two) NAME256(half_tile_tokens_q8)(j, g, h, t0, T, 1);
    else if (layout_of(j->tile).five && two == 2) NAME256(half_tile_tokens)(j, g, h, t0, T, 1, 2);
    else if (two == 2) NAME256(half_tile_tokens)(j, g, h, t0, T, 0, 2);
    else if (j->bits == 8) NAME256(half_tile_tokens_q8)(j, g, h, t0, T, 0);
    else if (layout_of(j->tile).five && two) NAME256(half_tile_tokens)(j, g, h, t0, T, 1, 1);
    else if (layout_of(j->tile).five) NAME256(half_tile_tokens)(j, g, h, t0, T, 1, 0);
    else if (two) NAME256(half_tile_tokens)(j, g, h, t0, T, 0, 1);
    else NAME256(half_tile_tokens)(j, g, h, t0, T, 0, 0);
  }
}

TARGET256 static void NAME256(rows)(const Job* j, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; g++) {
    int64_t t = 0;
    for (; t + 4 <= j->m; t += 4) NAME256(tile)(j, g, t, 4);
    switch (j->m - t) {
      case 3: NAME256(tile)(j, g, t, 3); break;
      case 2: NAME256(tile)(j, g, t, 2); break;
      case 1: NAME256(tile)(j, g, t, 1); break;
      default: break;
    }
  }
}

#undef TARGET256
#undef NAME256
#undef APART256
