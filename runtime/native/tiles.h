/* tiles.h: what the parts of llamaonnx's kernel library share — the packed tile layouts, the
 * jobs the matmul and attention kernels run, and the internal functions that cross files.
 * The layouts are the contract with export/quant/native.py, which packs the tiles and reads
 * these constants back from the built library (`llamaonnx_layout`), so they are written once.
 *
 * The files: activations.c (a matmul's activation rows: the folded RMSNorm, int8 blocks, the
 * second digit), matmul.c (MatMulQ4 / MatMulQ8 / SwiGLU / GatherQ8 kernels, AMX, AVX-512 VNNI,
 * AVX-VNNI, AVX2, NEON and portable C, and which of them runs; tiles256.h the 256-bit ones),
 * attention.c (GroupQueryAttention), weights.c (the weights in huge pages), pool.c (the
 * library's own threads for the kernels' parallel loops), ort_binding.c
 * (onnxruntime's C API by its function table, the custom-op domain).
 *
 * llamaonnx's CPU kernel library for onnxruntime: ops `MatMulQ4`, `MatMulQ8`, their SwiGLU forms
 * `MatMulQ4SwiGLU` and `MatMulQ8SwiGLU`, `GatherQ8` and `GroupQueryAttention` of domain
 * `ai.llamaonnx`.
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
 * B uint8 [N/16, K/32, 320] is that tile without z: GGUF's Q4_1 in its own 5 bits a weight (the
 * 336-byte tile spends 5.25), its codes centred on the block's zero weight itself, −m/d, not on
 * the code nearest it: the kernel takes z·d = −m, and computes
 *   y = d·da·Σ q·â_int + m·da·Σ â_int
 * (llama.cpp's Q4_1 × Q8_1 dot product), whose error Σ (d·q + m)·ε = Σ W·ε is the centred
 * codes' up to the offset left, (m + z·d)·Σ ε with |m + z·d| ≤ d/2, of either sign: on the
 * default model the same quality, KL 2.92e-3 from the fp32 reference against 2.95e-3
 * (docs/activation_cost.md and its run before). Blocks with offsets of their own (Q4_1) take it; blocks rounded here,
 * whose z is their own zero point, keep the 336-byte tile.
 *
 * B uint8 [N/16, K/32, 288] is that tile without m and z: GGUF's Q4_0, whose m is −8·d and whose
 * codes are centred on 8 (4.5 bits a weight, the file's own size, where the 336-byte tile spends
 * 5.25); the kernel makes m and z·d from d.
 *
 * B uint8 [N/16, K/32, 400] is the same tile with d and m in fp32 (bytes 256..319 d, 320..383 m,
 * 384..399 z): GGUF's Q4_K, whose d·scale and dmin·min products fp16 cannot hold (11 + 6 bits),
 * carried exactly.
 *
 * 5-bit codes (q in 0..31: GGUF's Q5_0, Q5_1 and Q5_K, which llama.cpp's Q4_K_M and Q5_K_M files
 * use for every tensor whose width is not a multiple of 256) go to the same op in two more tiles:
 * B uint8 [N/16, K/32, 384]: bytes 0..255 the codes' low four bits as above; 256..319 their
 *                   fifth bits, eight little-endian 64-bit masks, mask u (u = 2v + half) holding
 *                   in bit r·4 + i the fifth bit of the code in the low (half 0) or high (half 1)
 *                   nibble of byte v·64 + r·4 + i — one bit per byte of the register that nibble
 *                   is unpacked into, so AVX-512BW adds 16 under the mask; 320..351 d and
 *                   352..383 m of the 16 rows, fp16 (Q5_0: m = −16·d; Q5_1: its own d and m);
 * B uint8 [N/16, K/32, 448]: the same with d (320..383) and m (384..447) in fp32 (Q5_K's d·scale
 *                   and dmin·min products);
 * B uint8 [N/16, K/32, 352]: the 384-byte tile without m, which is −16·d (Q5_0: 5.5 bits a weight,
 *                   the file's own size).
 * B uint8 [N/16, K/32, 416] and [.., 464]: the 384- and 448-byte tiles with the rows' zero points
 *                   z after m (16 bytes; the 416-byte tile's last 16 unused, so that no two
 *                   kinds share a size): Q5_1 and Q5_K, whose minimums put the code nearest
 *                   zero weight anywhere in 0..31.
 * A 5-bit tile without z has its codes centred on 16 (Q5_0's own zero, the middle of the range),
 * so the kernel computes y = d·da·Σ q·â_int + m·S + 16·d·(S − da·Σ â_int); with z, as the 4-bit
 * tile. 6 and 7 bits a weight where the 8-bit tile spends 8.75.
 * The kernel tells them apart by B's last dimension.
 *
 * B uint8 [N/16, K/32, 312] holds Q4_K at the file's own size, 4.875 bits a weight where the
 * 400-byte tile spends 6.25: every 8 slots of 312 bytes along K are one super-block of 2496
 * bytes, 16 rows × 256 weights (Q4_K's own super-block, so K is a multiple of 256), laid out
 *   bytes    0..127   sc, block i's 16 rows at 16·i, uint8 (Q4_K's 6-bit scales);
 *          128..255   mn, the same for Q4_K's 6-bit minimums;
 *          256..383   z, the same for the zero points;
 *          384..415   D of the 16 rows, fp16 (Q4_K's d); 416..447 E (−dmin), fp16;
 *          448..2495  the 8 blocks' codes, 256 bytes each as in the 336-byte tile (block i's at
 *                     448 + 256·i: a 64-byte load never splits a line);
 * and W = d·q + m with d = D·sc and m = E·mn, products the kernel makes in fp32, where they are
 * exact (11 × 6 bits): the 400-byte tile's d and m, to the bit, from a quarter fewer bytes. The
 * scalars come first, so that a row group's blocks read their lines in ascending order: one
 * stream, which the hardware prefetcher follows alone. A decode step of one row takes no
 * software prefetches on this tile: with them, one thread streaming a 5632 × 1024 weight from
 * memory on the Zen 4 EPYC read it at 14 GB/s, without them at 21–24, where the 400-byte tiles
 * read at 24–27. Several rows (batched decode) keep the AVX-512 path's prefetch of the next row
 * group, a block's codes and one line of scalars: 8 rows 1.08–1.09× without (docs/speed.md).
 *
 * B uint8 [N/16, K/32, 376] holds Q5_K the same way, 5.875 bits a weight where the 464-byte tile
 * spends 7.25 (the file 5.5): the same 448 bytes of scalars, then 8 blocks' codes of 320 bytes
 * each (the 5-bit tile's low nibbles and fifth bits), 3008 bytes a super-block.
 *
 * B uint8 [N/16, K/32, 296] is the 312-byte tile without z, what export writes for Q4_K (4.625
 * bits a weight; the file 4.5): a super-block's sc at 0, mn at 128, D at 256, E at 288 and the
 * codes from 320 (2368 bytes a super-block). As in Q4_1's 320-byte tile, the codes are centred
 * on each block's zero weight, z·d = −m = −E·mn, and the kernel computes
 * d·da·Σ q·â_int + m·da·Σ â_int: llama.cpp's own Q4_K × Q8_K form, d·Σ sc·(q·â) − dmin·Σ mn·Σ â,
 * with blocks of 32 activations. The same quality (SmolLM2's Q4_K_M over six texts: KL
 * 3.005e-3 from the fp32 reference against 3.032e-3, paired difference −2.7e-5 ± 4.2e-5), 5 %
 * fewer bytes, and no z to convert a block. The 312-byte tile stays readable for folders
 * written before it. Q5_K keeps its z: centred on the zero weight, its Q5_K_M file's KL rose
 * from 3.57e-3 to 3.75e-3 (+1.8e-4 ± 0.6e-4; docs/speed.md, 2026-12-05 20:06).
 *
 * B uint8 [N/16, K/32, 424] holds Q6_K the same way, 6.625 bits a weight where the 512-byte
 * tile spends 8 (the file 6.5625): 8 slots of 424 bytes a super-block of 3392, 16 rows × 256,
 *   bytes    0..255   sc, int8 (Q6_K's scales of 16 weights): block i's first half's 16 rows at
 *                     32·i, its second half's at 32·i + 16;
 *          256..287   D of the 16 rows, fp16 (Q6_K's d); 288..319 unused (the codes' lines
 *                     aligned);
 *          320..3391  the 8 blocks' codes, 384 bytes each (block i's at 320 + 384·i): the low
 *                     nibbles as in the 512-byte tile, then each code's fifth and sixth bits
 *                     as a two-bit crumb: bits 2t, 2t + 1 of byte 256 + 64·k + j hold them for
 *                     byte j of code register u = 4k + t (codes512's c[u]). A shift, an AND and
 *                     an OR put them in place for a whole register (llama.cpp's Q6_K layout does
 *                     the same), where the 512-byte tile's bit masks cost the 256-bit paths a
 *                     shuffle, two ANDs and a compare per plane;
 * and each half's scale s = D·sc, made in fp32, exact (11 × 8 bits): the 512-byte tile's.
 *
 * MatMulQ4SwiGLU(A, B): the SwiGLU of a fused gate/up projection, silu(A·Gᵀ) ⊙ (A·Uᵀ), from
 * tiles of [G; U] stacked along N (output N/2): the Split, Sigmoid and two Muls that would follow
 * cost more per token than the arithmetic itself. MatMulQ8SwiGLU is the same on MatMulQ8's tiles
 * (8-bit, or Q6_K's: gate/up of Q8_0 and Q6_K files).
 *
 * MatMulQ8, the 8-bit LM head: W[n, b·32 + j] = d[n, b]·(c[n, b, j] − z[n, b]), c in 0..255 (GGUF's
 * Q8_0 is c = q + 128, z = 128). B uint8 [N/16, K/32, 560]: bytes v·64 + r·4 + i (v 0..7) hold
 * c[r, 4v + i]; 512..543 d (fp16); 544..559 z. B uint8 [N/16, K/32, 544] is that tile without z,
 * which is 128 for every block: GGUF's Q8_0 in its own 8.5 bits a weight (the 560-byte tile spends
 * 8.75). GatherQ8(B, ids) reads rows of the same tiles (and of Q6_K's, below): the token embedding
 * when it is tied to the head (one copy of the codes for both).
 *
 * MatMulQ8 also reads GGUF's Q6_K: W[n, h·16 + j] = s[n, h]·(q − 32), q in 0..63, one scale
 * s = d·sc (fp16 × int8: exact in fp32) a block of 16. B uint8 [N/16, K/32, 512]: bytes 0..255
 * the codes' low four bits as in MatMulQ4's tile, 256..319 their fifth and 320..383 their sixth
 * bits (masks as in the 5-bit tile), 384..447 s of the 32-block's first 16 weights for the 16
 * rows, 448..511 of its last 16 (fp32). The first half's codes are the registers of v 0..1, the
 * second's of v 2..3: each half's integer dot product is taken apart, less 32 times the half's
 * sum of int8 activations, and scaled by its own s: y = da·Σ s_h·(Σ q·â_int − 32·Σ â_int), the
 * error llama.cpp's Q6_K × Q8 dot product has.
 *
 * The four matmul ops take two optional inputs, an RMSNorm in front of the projection:
 * op(A, B, gamma, skip) computes R = A + skip (output 1, the residual stream's next value) and
 * multiplies RMSNorm(R)·gamma (attribute `epsilon`) instead of A; op(A, B, gamma) normalises A
 * alone. This is onnxruntime's SkipSimplifiedLayerNormalization, computed in its own float order,
 * folded into the node that reads it (export/quant/norm.py): 59 nodes a step fewer on a 30-layer
 * model (all its norms but the last), each of which cost more in dispatch than its arithmetic.
 *
 * Two digits (attribute `digits` 2 on any of the three; export's `--precise`): what each
 * activation's int8 rounding left, r = x − da·â, is rounded to int8 in its turn at da/F (|r| ≤
 * da/2 keeps it within ±F/2), with S = 0 and e = −(da/F)·Σ r̂ (its row's offsets already hold
 * the exact sums). F (digit_shift) is 16 for 4-bit codes, 8 for 5-bit codes and 128 for 8- and
 * 6-bit ones: the largest power of two that keeps F·code within a byte where it can (F·15 = 240,
 * F·31 = 248), so that AMX takes both digits of a block in one tile product, [â r̂]·[F·c; c]
 * (matmul.c, rows_amx). The x86 kernels read both digits of a token in one pass (they lie side
 * by side, a block's â then its r̂: act_block) and join their integer sums, F·s + s_r (exact in
 * int32), before the float work of one token; NEON, portable C and Q6_K's tiles take the
 * residuals as rows of their own (rows M.. of the int8 rows) and add each row's two outputs
 * (before the SwiGLU). What is left is at most 1/(2F) of a block's scale, 1/32 for 4-bit codes:
 * KL ~1e-5 against ~3e-3 with one digit on the default model, near float activations' quality,
 * for twice the dot products (on AMX, for little more than one digit's).
 * Attribute `blocks` B > 0 spends the second digit only on each row's B blocks of largest scale,
 * where the rounding error is largest (a block's error grows with da², and a norm's output puts
 * most of it in a few blocks: docs/quantization.md, "Two digits on a few blocks"): the others'
 * residual is 0 and the x86 kernels skip their dot products, B/nb of the second digit's at
 * decode; a prompt's rows, 4 to a pass (AMX: 16 to a tile pass), pay for the union of theirs.
 *
 * export/quant/native.py writes both; tests/test_native.py checks this file against numpy.
 *
 * The onnxruntime C API is used through its function table (OrtApi): the library declares the
 * few entries it calls by their index, which onnxruntime keeps stable across releases (the
 * table only grows). `llamaonnx_check` (called by the runtime's tests) and RegisterCustomOps
 * confirm the table is the expected one before anything else is called.
 */
#ifndef LLAMAONNX_TILES_H
#define LLAMAONNX_TILES_H

#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
/* where a constant argument (a tile's token count, a flag) must reach the body: always inlined */
#define INLINE static inline __attribute__((always_inline))
#if defined(__x86_64__)
#include <immintrin.h>
/* each fast path's functions are compiled for its instructions and called only where they run */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))
/* AVX-VNNI: AVX2 with the int8 dot product, VEX-encoded; and the same on 256-bit registers,
   EVEX-encoded, where a CPU has AVX-512 VNNI instead */
#define AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define AVX512VL256 __attribute__((target("avx2,fma,f16c,avx512vl,avx512vnni")))
AVX2 static inline __m256 exp256(__m256 x) { /* Cephes' expf as exp512, 2^n built in the exponent */
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.f)); /* e^88 < FLT_MAX */
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

#if defined(__aarch64__)
#include <arm_neon.h>
/* ARM's int8 dot product (ARMv8.2 dotprod: Apple M1 and later, Graviton 2+, Cortex-A76+) */
#define NEON_DOT __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

/* the kernel paths (x86, best first: AMX, AVX-512 VNNI, AVX-VNNI, AVX2; ARM: NEON with dotprod;
   else portable). The numbers are the library's interface (runtime/native/__init__.py's PATHS). */
#define PATH_PORTABLE 0
#define PATH_AVX2 1
#define PATH_AVX512 2
#define PATH_NEON 3
#define PATH_AVXVNNI 4
#define PATH_AMX 5 /* AVX-512 VNNI with a prompt's int8 products on the tile unit, 16 tokens at a time */
#define AMX_TOKENS 16 /* tokens a tile pass */
#define WIDE512(path) ((path) == PATH_AVX512 || (path) == PATH_AMX)

/* the tile layouts (see above) */
/* Which revision of these layouts a folder's tiles were packed in: every node that reads tiles
   carries it as its `layout` attribute (export/quant/native.py writes it; a node without one
   is revision 1, all folders before it was added), and the kernels refuse a revision outside
   TILE_LAYOUT_OLDEST..TILE_LAYOUT at load rather than misread the bytes. A change to any
   tile's layout at the same size raises TILE_LAYOUT, and TILE_LAYOUT_OLDEST to it where the
   old tiles are no longer read (a new size needs neither: no older folder holds it). */
#define TILE_LAYOUT 1
#define TILE_LAYOUT_OLDEST 1
#define TILE 336
#define ROWS 16
#define BLOCK 32
#define TILE8 560
#define TILE4F 400
#define TILE5 384
#define TILE5F 448
#define TILE6 512
#define TILE5Z 352 /* a 5-bit tile without m: Q5_0, whose m is −16·d */
#define TILE4Z 288 /* a 4-bit tile without m and z: Q4_0, whose m is −8·d */
#define TILE4M 320 /* a 4-bit tile without z: Q4_1, centred on its zero weight (z·d = −m) */
#define TILE8Z 544 /* an 8-bit tile without z: Q8_0, whose z is 128 */
#define TILE5ZP 416 /* TILE5 with each row's zero point z at 384..399 (400..415 unused): Q5_1 */
#define TILE5ZPF 464 /* TILE5F with each row's zero point z at 448..463: Q5_K */
#define FIFTH 256 /* where a 5- or 6-bit tile's fifth bits start (a 6-bit tile's sixth: + 64) */
#define HALVES 384 /* where a 6-bit tile's two scales a row start */
#define TILE4K 312 /* Q4_K, 8 slots a super-block (see above) */
#define K4_BLOCKS 8
#define K4_SC 0 /* a TILE4K super-block's sc, mn, z (16 bytes a block each), D, E, codes */
#define K4_MN 128
#define K4_Z 256
#define K4_CODES 448 /* (D and E lie in the 64 bytes before a super-block's codes) */
#define TILE4KM 296 /* TILE4K without z: Q4_K, centred on each block's zero weight (z·d = −m) */
#define K4M_CODES 320 /* a TILE4KM super-block's sc at 0, mn at 128, D, E, codes */
#define TILE5K 376 /* Q5_K, 8 slots a super-block: TILE4K's scalars, 5-bit codes */
#define TILE6K 424 /* Q6_K, 8 slots a super-block */
#define K6_D 256 /* a TILE6K super-block's D; its sc at 0, its codes at K6_CODES */
#define K6_CODES 320
#define CRUMBS (-2) /* `planes` of the code unpackers: TILE6K's crumbs instead of bit planes */

/* Whether a tile of `tile` bytes, one of ours (tile_bits), is a super-block tile's slot (TILE4K,
   TILE4KM, TILE5K, TILE6K): one test where a per-block loop's tile is a variable, as the slots
   are the tiles whose size is an odd multiple of 8 (every other tile's a multiple of 16:
   checked below). Not a check of a size from outside: tile_bits is. */
INLINE int super_tile(int64_t tile) { return (tile & 15) == 8; }
_Static_assert((TILE4K & 15) == 8 && (TILE4KM & 15) == 8 && (TILE5K & 15) == 8 &&
                   (TILE6K & 15) == 8,
               "super-block slots are odd multiples of 8 bytes");
_Static_assert(!(TILE & 15) && !(TILE4M & 15) && !(TILE4Z & 15) && !(TILE4F & 15) &&
                   !(TILE5 & 15) && !(TILE5F & 15) && !(TILE5Z & 15) && !(TILE5ZP & 15) &&
                   !(TILE5ZPF & 15) && !(TILE6 & 15) && !(TILE8 & 15) && !(TILE8Z & 15),
               "every other tile is a multiple of 16 bytes");
/* Q4_K's and Q5_K's slots (the super-block tiles of MatMulQ4) */
INLINE int k4_tile(int64_t tile) { return tile == TILE4K || tile == TILE4KM || tile == TILE5K; }
/* a super-block tile's offset of its codes and bytes of a block's codes */
INLINE int64_t super_codes(int64_t tile) {
  return tile == TILE6K ? K6_CODES : tile == TILE4KM ? K4M_CODES : K4_CODES;
}
INLINE int64_t block_codes(int64_t tile) {
  return tile == TILE4K || tile == TILE4KM ? 256 : tile == TILE5K ? 320 : 384;
}

/* Block b's codes in row group g of a weight of `tile`-byte tiles, nb blocks a row. */
INLINE const uint8_t* tile_at(const uint8_t* w, int64_t nb, int64_t tile, int64_t g, int64_t b) {
  if (super_tile(tile))
    return w + (g * nb + (b & ~(int64_t)7)) * tile + super_codes(tile) + (b & 7) * block_codes(tile);
  return w + (g * nb + b) * tile;
}

/* Block b + 1's codes after block b's at p (the same row group). */
INLINE const uint8_t* tile_step(const uint8_t* p, int64_t b, int64_t tile) {
  if (super_tile(tile)) {
    int64_t q = block_codes(tile);
    return p + q + ((b & 7) == 7 ? (tile - q) * K4_BLOCKS : 0);
  }
  return p + tile;
}

/* The super-block of a super-block tile's block b whose codes are at p. */
INLINE const uint8_t* super_of(const uint8_t* p, int64_t b, int64_t tile) {
  return p - super_codes(tile) - (b & 7) * block_codes(tile);
}

/* Where a MatMulQ4 tile of `tile` bytes keeps d (fp16 or fp32), m (-1: none, m = −16·d) and z
   (-1: a 5-bit tile without zero points, z 16; ZERO_WEIGHT: none, z·d = −m). */
#define ZERO_WEIGHT (-2)
typedef struct {
  int five, f32, d, m, z;
  int k4; /* TILE4K, TILE4KM, TILE5K: a block's code bytes (0: none of them); d, m, z
             are where sc, mn, z lie past tile_scalars' pointer */
  int zero; /* the zero code of every block where the tile holds none (z < 0): 16 for 5-bit
               tiles without zero points, 8 for Q4_0's TILE4Z; and m = −zero·d where it holds
               no m either (m < 0: TILE5Z, TILE4Z) */
  int codes; /* k4: where a super-block's codes start (K4_CODES, K4M_CODES); D and E lie in the
                64 bytes before them */
} Layout;

INLINE Layout layout_of(int64_t tile) {
  if (k4_tile(tile)) {
    Layout k = {tile == TILE5K, 0, K4_SC, K4_MN, tile == TILE4KM ? ZERO_WEIGHT : K4_Z,
                (int)block_codes(tile), 0, (int)super_codes(tile)};
    return k;
  }
  if (tile == TILE4Z) {
    Layout z = {0, 0, 256, -1, -1, 0, 8};
    return z;
  }
  if (tile == TILE4M) {
    Layout w = {0, 0, 256, 288, ZERO_WEIGHT, 0, 0};
    return w;
  }
  int zp5 = tile == TILE5ZP || tile == TILE5ZPF;
  int five = tile == TILE5 || tile == TILE5F || tile == TILE5Z || zp5;
  int f32 = tile == TILE4F || tile == TILE5F || tile == TILE5ZPF;
  int d = five ? FIFTH + 64 : 256, size = f32 ? 4 * ROWS : 2 * ROWS;
  Layout l = {five, f32, d, tile == TILE5Z ? -1 : d + size, five && !zp5 ? -1 : d + 2 * size, 0,
              five && !zp5 ? 16 : 0, 0};
  return l;
}

/* Where block b's scalars are read from, with Layout's offsets: the tile itself, or for the Q4_K
   and Q5_K tiles (l.k4: a block's code bytes) its super-block's start moved on by the block's
   16 bytes (sc, mn and z lie at l.d, l.m, l.z past it; D and E at k4_d's and k4_e's). */
INLINE const uint8_t* tile_scalars(const uint8_t* p, int64_t b, Layout l) {
  return l.k4 ? p - l.codes - (b & 7) * l.k4 + (b & 7) * 16 : p;
}
/* D or E of a Q4_K or Q5_K tile's block's 16 rows (fp16), from tile_scalars' pointer s */
INLINE const uint8_t* k4_d(const uint8_t* s, int64_t b, Layout l) {
  return s - (b & 7) * 16 + l.codes - 64;
}
INLINE const uint8_t* k4_e(const uint8_t* s, int64_t b, Layout l) {
  return s - (b & 7) * 16 + l.codes - 32;
}

/* Q6_K's tiles: the 512-byte one and its super-block's slots */
static inline int six(int64_t tile) { return tile == TILE6 || tile == TILE6K; }

/* Every MatMulQ4 tile but TILE5Z, as X(bytes): with TILE5Z, what tile_bits accepts, and what
   the switches by tile kind (matmul.c's tile_kind512, tiles256.h's few_kind) list, TILE5Z their
   default. One list, so that a new tile cannot be left out of a switch and run as TILE5Z. */
#define MATMULQ4_TILES(X) \
  X(TILE) X(TILE4Z) X(TILE4M) X(TILE4F) X(TILE4K) X(TILE4KM) X(TILE5K) X(TILE5) X(TILE5F) \
  X(TILE5ZP) X(TILE5ZPF)

/* The op a tile of `tile` bytes is for: 4 (MatMulQ4: 4- or 5-bit codes), 8 (MatMulQ8: 8-bit
   codes, or Q6_K's 6-bit ones), 0 for no tile of ours. */
static inline int tile_bits(int64_t tile) {
#define IS_TILE(S) tile == (S) ||
  if (MATMULQ4_TILES(IS_TILE) tile == TILE5Z) return 4;
#undef IS_TILE
  return tile == TILE8 || tile == TILE8Z || tile == TILE6 || tile == TILE6K ? 8 : 0;
}

/* An 8-bit tile's zero code of row r, block at p: TILE8's own z, 128 for TILE8Z */
static inline uint8_t zero8(const uint8_t* p, int64_t tile, int r) {
  return tile == TILE8Z ? 128 : p[544 + r];
}

/* functions one file calls in another: kept out of the library's exported symbols */
#if defined(__GNUC__)
#define LLAMAONNX_INTERNAL __attribute__((visibility("hidden")))
#else
#define LLAMAONNX_INTERNAL
#endif

typedef struct {
  const uint8_t* w;     /* packed B */
  const int8_t* aq;     /* [M, K] quantized activations */
  const float* ad;      /* [M, nb] activation scales */
  const float* as;      /* [M, nb] exact float block sums S */
  const float* ae;      /* [M, nb] S − da·Σ â_int, what int8 rounding lost of S */
  float* y;             /* [M, N] */
  int64_t m, k, n, nb, groups, chunk;
  int bits;       /* 4: MatMulQ4 tiles (4- or 5-bit codes), 8: MatMulQ8 tiles (8- or 6-bit) */
  int tile;       /* bytes a tile: TILE, TILE4M, TILE4Z, TILE4F (4-bit, fp32 d and m), TILE4K, TILE5*;
                     TILE8, TILE8Z, TILE6, TILE6K */
  int swiglu;     /* y [M, N/2] = silu(gate) ⊙ up, the rows computed into `scratch` [M, N] */
  float* scratch;
  int digits;     /* 2: ad, as, ae hold 2M rows, M of the activations and M of what their int8
                     rounding left (activations.c); the x86 kernels read both digits of a token
                     (matmul.c, fused_digits: aq's row t holds block b's â and then its r̂,
                     act_block), the others have M more rows in aq and compute both into `scratch`
                     [2M, N] and add each row's two. Else 1. */
  int shift;      /* fused digits: a residual digit is worth 1/2^shift of its token's (digit_shift) */
  const int32_t* kept; /* two digits on a few blocks (Prep.blocks): for each group of 4 rows
                          (the x86 kernels' token groups), [nb + 1], the blocks any of them keeps
                          a residual on, in order, then -1. The others' residual codes are 0, so
                          the x86 kernels add only these blocks' (few512), and the rest need not
                          know. NULL: every block */
  const uint8_t* keep; /* with kept: [M, nb], 1 where a row keeps its block's residual */
  const float* sc; /* one digit on a 256-bit path, M ≥ 3: ad, as, ae again, side by side for
                      each group of 4 rows, [ceil(M / 4), nb, 4, 3], which its 3–4-token passes
                      read through one pointer instead of three a token (tiles256.h) */
  const uint8_t* wide; /* AMX, two digits on a few blocks: for each 16 rows (a tile pass),
                          [nb] 1 on the blocks any of them keeps (Prep.wide), which take both
                          digits in one product */
  const float* wad;    /* with wide: [M, nb] ad, but da/F where a row does not keep a block
                          its 16 keep: its residual codes there are 0, so its joined product
                          gives F·s, and F·s at da/F is s at da to the bit (s is exact in float,
                          |s| < 2^24, and so is F·s, a power of two times it; so is da/F): the
                          AVX-512 path's float work (few512) */
  const int32_t* hs; /* Q6_K's tiles: each row's int8 sums over its blocks' halves [rows, nb, 2]
                        (Prep.hs), which z = 32 takes off each half's dot product */
} Job;

/* Token t's int8 block b; `two` (fused digits: a constant where the kernels inline this) lays a
   block's residual in the BLOCK bytes after it, so a row spans 2K. */
static inline const int8_t* act_block(const Job* j, int64_t t, int64_t b, int two) {
  return j->aq + (t * j->k + b * BLOCK) * (two ? 2 : 1);
}

/* The second digit's weight, 1/2^shift of the first's, for a tile of `tile` bytes: 16 for 4-bit
   codes, 8 for 5-bit ones (F·code within a byte, for AMX's product of both digits at once), 128
   for 8- and 6-bit codes (|r̂| ≤ 64). */
static inline int digit_shift(int64_t tile) {
  if (tile_bits(tile) != 4) return 7;
  return layout_of(tile).five ? 3 : 4;
}

/* A matmul's activations made ready, `rows` rows a task: A (or RMSNorm(A + skip)·gamma, into
   `normed`, the sum into `sum` where wanted) quantized into q, d, s, e as Job reads them. */
typedef struct {
  const float *a, *skip, *gamma;
  float *sum, *normed;
  int8_t* q;
  float *d, *s, *e;
  int64_t m, k, rows;
  int64_t qrow, qblock; /* q's layout: row r's block b at r·qrow + b·qblock (act_block) */
  int shift;            /* two digits: the residual's weight, 1/2^shift (digit_shift) */
  float eps;
  int digits; /* as Job's: 2, what the int8 rounding left quantized too, into rows M.. of d, s, e
                 and into q's rows M.. (qrow K) or beside each block's â (qblock 2·BLOCK) */
  int64_t blocks; /* two digits: 0 on every block; else on each row's `blocks` (< nb) blocks of
                     largest scale da (the first of equals), the rest of the residual 0 */
  uint8_t* keep;  /* [M, nb] when blocks > 0: 1 on those blocks */
  int32_t* kept;  /* when blocks > 0: Job.kept, [ceil(M / 4), nb + 1] */
  float* sc;      /* Job.sc, or NULL */
  uint8_t* wide;  /* Job.wide and Job.wad (the rows of whole passes), or NULL; `rows` is then
                     a multiple of AMX_TOKENS, so that a task holds its passes' rows */
  float* wad;
  int32_t* hs;    /* Job.hs, or NULL: made once a matmul here, where every pass of every row
                     group (16 chunks of a prompt, each with its tokens) had made its own */
} Prep;

/* ---- attention ------------------------------------------------------------------------ */
/* GroupQueryAttention as the `ort` graph uses onnxruntime's (com.microsoft): packed QKV
 * [B, S, (H + 2·Hkv)·D], rotary embedding (half-split, cos/sin tables [positions, D/2]) on q and k,
 * the new k and v written into the shared past/present buffer [B, Hkv, L, D] at each row's
 * position, then causal softmax attention over that row's cache; seqlens_k[b] + 1 is row b's total
 * length. A first prompt (total_sequence_length == S) starts at position 0; otherwise row b's new
 * tokens start at seqlens_k[b] + 1 − S. Query head h reads kv head h / (H / Hkv).
 * onnxruntime's CPU kernel spends ~40 µs a layer on a decode step of this model, mostly outside
 * the arithmetic.
 *
 * This one reads each kv head's cache once for all the query heads that share it (GQA's whole
 * point: a 4k-token cache is ~6 MB a layer here, read from memory). The keys of a row are taken
 * in fixed chunks of ATTN_CHUNK: each chunk gives its scores' max, their exponentials' sum and
 * the exponential-weighted sum of its values, and the chunks are merged in order (the online
 * softmax). A decode step spreads the chunks over the threads and merges them after (one query
 * row per head, too few heads to share out evenly); a prompt spreads blocks of queries and merges
 * as it goes. The same chunks merged in the same order either way: a position's output does not
 * depend on how it was scheduled (chunked prefill, batching).
 * On AVX-512 a chunk's keys and values are read once for up to three query heads of the group
 * (8 keys × 3 heads of score chains, 4 × 3 of value chains in registers). A prompt's block
 * transposes each chunk's keys once (keys along the register's lanes) and scores four rows of
 * queries × 32 keys at a time: the same products in the same chains, and the lanes summed in the
 * same tree, which is 15 vertical adds there instead of shuffles; its values go six rows at a
 * time. 1.6× the attention of a 4096-token prompt. The AVX2 path does the same 8 lanes wide
 * (block256: four rows × 16 keys, the tree 7 vertical adds; its values six rows × 16 columns),
 * where it took each query and head alone: 1.7–1.8× a 2048- and 4096-token prompt's attention
 * on an AVX2-only AMD EPYC (Zen 3). Its decode step reads each key and value once for two or
 * three heads (4 keys × 3 heads of score chains, 16 columns × 3 of value chains), and a last
 * group short of keys repeats the last key in the missing lanes, so every key of a chunk is
 * summed in the one tree.
 * The cache may be fp16 (the op is registered a second time with float16 past/present; quantize's
 * default wherever this op runs): each new key and value is rounded to fp16 once; a decode step
 * reads the cache in place, converting in its loads, and a prompt's block of queries converts
 * each chunk once into fp32 rows; both are exact, so the same arithmetic sees the same numbers.
 * A decode step after 4,000 tokens reads half the bytes: 71 → 98 tok/s on the default model. */

#define ATTN_CHUNK 128 /* keys a softmax chunk */
#define ATTN_QUERIES 16 /* queries a task, for a prompt */

typedef struct {
  const float *qkv, *cos, *sin;
  void *key, *value; /* the cache: float, or (kv16) IEEE half */
  float* out;
  float* partial;  /* a decode step's chunks: [B, Hkv, chunks, G, D + 2] (m, l, weighted values) */
  const int32_t* seqlens;
  int64_t b, s, h, hkv, d, len, rot_len, t_max;
  int64_t chunks, qblocks; /* chunks of the longest row; query blocks a (row, kv head) */
  float scale;
  int first, kv16;
  volatile int* failed; /* set by a task that could not get its scratch */
} Attn;

static inline float half_to_float(uint16_t h) {
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

/* weights.c: a node's weights copied once into huge pages (`slot`: the node's, NULL at first);
   returns the bytes to read, src itself where no copy is made */
typedef struct Held Held;
LLAMAONNX_INTERNAL const uint8_t* held_weights(Held* _Atomic* slot, const void* src, size_t bytes);
LLAMAONNX_INTERNAL void held_release(Held* h);
LLAMAONNX_INTERNAL int kernel_path(void);
LLAMAONNX_INTERNAL int path_supported(int p);
LLAMAONNX_INTERNAL int path_from_name(const char* name);
LLAMAONNX_INTERNAL void quantize_rows(const float* a, int64_t m, int64_t k, int8_t* q, int64_t qrow,
                                      int64_t qblock, float* d, float* s, float* e);
LLAMAONNX_INTERNAL void skip_rms_norm(const float* x, const float* skip, const float* gamma,
                                      int64_t m, int64_t k, float eps, float* sum, float* y);
LLAMAONNX_INTERNAL void prepare_rows(void* data, size_t i);
LLAMAONNX_INTERNAL void run_chunk(void* data, size_t i);
LLAMAONNX_INTERNAL int alloc_work(Prep* p, Job* j);
LLAMAONNX_INTERNAL void free_work(Prep* p);
LLAMAONNX_INTERNAL void attn_store(void* data, size_t task);
LLAMAONNX_INTERNAL void attn_rows(void* data, size_t task);
LLAMAONNX_INTERNAL void attn_split(void* data, size_t task);
LLAMAONNX_INTERNAL void attn_combine(const Attn* a);
/* pool.c: fn over tasks 0..n-1 on the library's threads, each taking its own contiguous range
   first; 0 where it did not (no threads asked for or to be had, fewer than 2 tasks, another
   caller's job running): the caller then runs onnxruntime's loop */
LLAMAONNX_INTERNAL int pool_run(void (*fn)(void*, size_t), void* data, size_t tasks);
/* the threads pool_run would run a job on now, the caller's included (0: none of the library's) */
LLAMAONNX_INTERNAL int pool_threads(void);

/* the library's plain C entry points (runtime/native/__init__.py calls them through ctypes) */
int llamaonnx_matmul(int tile, const float* a, int64_t m, int64_t k, const uint8_t* w, int64_t n,
                     float* y);
int llamaonnx_matmul_digits(int tile, const float* a, int64_t m, int64_t k, const uint8_t* w,
                            int64_t n, float* y, int digits, int64_t blocks);
int64_t llamaonnx_gather_q8(int tile, const uint8_t* w, int64_t n, int64_t k, const int64_t* ids,
                            int64_t count, float* out);
int llamaonnx_kernel_path(int set);
int llamaonnx_path_supported(int p);
int64_t llamaonnx_layout(int what);
int64_t llamaonnx_held_bytes(void);
int llamaonnx_huge_pages_possible(void);
int llamaonnx_threads(int n);
long llamaonnx_pool_jobs(void);

#endif
