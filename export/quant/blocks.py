"""Block-wise weight quantization in numpy, and GGUF's blocks (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K,
Q5_K, Q6_K) read as they are.

A `Blocks` holds a weight W [N, K] (N outputs, K inputs) as codes in blocks of `block_size` along K:

    W[n, b·bs + j] = scales[n, b] · (codes[n, b, j] − zero_points[n, b]) + offsets[n, b]

which is `MatMulNBits`' dequantization (codes packed low nibble first, a missing zero point meaning
2^(bits−1)) plus Q4_1's per-block offset, which MatMulNBits' integer zero points cannot hold.
`offset_rows` folds it into the same MatMulNBits as extra input rows (see there).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from export.errors import QuantizationError

BITS = (4, 8)


def check_settings(bits: int, block_size: int) -> None:
    if bits not in BITS:
        raise QuantizationError(f"bits must be one of {BITS}, not {bits}")
    if block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise QuantizationError(
            f"block size must be a power of two from 16 to 256 (MatMulNBits), not {block_size}"
        )


@dataclasses.dataclass
class Blocks:
    bits: int
    block_size: int
    codes: np.ndarray  # uint8 [N, nb, block_size], each in [0, 2^bits)
    scales: np.ndarray  # float32 [N, nb]
    zero_points: np.ndarray | None  # uint8 [N, nb]; None means 2^(bits-1)
    offsets: np.ndarray | None  # float32 [N, nb]; None means 0
    origin: str  # "rtn-symmetric", "rtn-asymmetric", "gguf-Q4_1", …
    carried: bool = False  # the source's own blocks, not rounded here

    @property
    def shape(self) -> tuple[int, int]:
        n, nb, bs = self.codes.shape
        return n, nb * bs

    def centred_codes(self) -> np.ndarray:
        """codes − their zero point, float32 [N, nb, block_size]: what the scales multiply."""
        zp = self.zero_points if self.zero_points is not None else 1 << (self.bits - 1)
        zp = np.broadcast_to(zp, self.scales.shape)[..., None].astype(np.float32)
        return self.codes.astype(np.float32) - zp

    def dequantize(self) -> np.ndarray:
        w = self.scales[..., None] * self.centred_codes()
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(self.shape)

    def packed(self) -> np.ndarray:
        """uint8 [N, nb, block_size·bits/8], MatMulNBits' B (two 4-bit codes per byte, the
        even element in the low nibble)."""
        if self.bits == 8:
            return np.ascontiguousarray(self.codes)
        return (self.codes[..., 0::2] | (self.codes[..., 1::2] << 4)).astype(np.uint8)

    def packed_zero_points(self) -> np.ndarray | None:
        """uint8 [N, ceil(nb·bits/8)], MatMulNBits' zero_points."""
        if self.zero_points is None:
            return None
        zp = self.zero_points
        if self.bits == 8:
            return np.ascontiguousarray(zp)
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)


def quantize(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool, search: bool = True
) -> Blocks:
    """Round-to-nearest block quantization of W [N, K]. `search` tries a few narrower ranges per
    block and keeps the one with the least squared error (clipping outliers often pays at 4 bits).
    """
    check_settings(bits, block_size)
    n, k = w.shape
    if k % block_size:
        raise QuantizationError(
            f"a weight with {k} inputs cannot be cut into blocks of {block_size}; "
            f"choose a block size that divides {k}"
        )
    x = w.astype(np.float32).reshape(n, k // block_size, block_size)
    levels = (1 << bits) - 1
    best = best_err = None
    for shrink in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75) if search else (1.0,):
        if symmetric:
            # llama.cpp's Q4_0 rule: the element of largest magnitude maps to code 0 (−2^(b−1)),
            # using the whole [−2^(b−1), 2^(b−1) − 1] range.
            idx = np.abs(x).argmax(-1)[..., None]
            peak = np.take_along_axis(x, idx, -1)[..., 0] * shrink
            scale = peak / -(1 << (bits - 1))
            zp = None
            mid = 1 << (bits - 1)
            safe = np.where(scale == 0, 1.0, scale)
            codes = np.clip(np.rint(x / safe[..., None]) + mid, 0, levels)
        else:
            lo = np.minimum(x.min(-1), 0) * shrink
            hi = np.maximum(x.max(-1), 0) * shrink
            scale = (hi - lo) / levels
            safe = np.where(scale == 0, 1.0, scale)
            zp = np.clip(np.rint(-lo / safe), 0, levels)
            codes = np.clip(np.rint(x / safe[..., None]) + zp[..., None], 0, levels)
        cand = Blocks(
            bits,
            block_size,
            codes.astype(np.uint8),
            scale.astype(np.float32),
            None if zp is None else zp.astype(np.uint8),
            None,
            f"rtn-{'symmetric' if symmetric else 'asymmetric'}",
        )
        err = ((cand.dequantize().reshape(x.shape) - x) ** 2).sum(-1)
        if best is None:
            best, best_err = cand, err
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best.codes[better] = cand.codes[better]
        best.scales[better] = cand.scales[better]
        if zp is not None:
            best.zero_points[better] = cand.zero_points[better]
    return best


# GGUF block layouts (ggml-common.h): type → (bits of its codes, weights a block, bytes a block).
# Codes of 5 and 6 bits are held in 8-bit containers here (MatMulNBits has no 5- or 6-bit form:
# there the container costs 8 / 5.5 (Q5_0), 8 / 6 (Q5_1), 8 / 5.5 (Q5_K) and 8 / 6.56 (Q6_K) the
# file's bytes); the native kernels pack them into 5- and 6-bit tiles (export/quant/native.py).
GGUF_TYPES = {
    "Q4_0": (4, 32, 18),
    "Q4_1": (4, 32, 20),
    "Q8_0": (8, 32, 34),
    "Q5_0": (5, 32, 22),
    "Q5_1": (5, 32, 24),
    "Q4_K": (4, 256, 144),
    "Q5_K": (5, 256, 176),
    "Q6_K": (6, 256, 210),
}


def gguf_bits(type_name: str) -> int:
    """The width of a carried GGUF type's codes (4, 5, 6 or 8)."""
    return GGUF_TYPES[type_name][0]


def _half(b: np.ndarray) -> np.ndarray:
    """fp16 little-endian byte pairs [..., 2] → float32 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """GGML's 4-bit packing of 32 weights in 16 bytes: byte j holds weight j in its low nibble
    and weight j + 16 in its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1's fifth bits: a little-endian uint32 [.., 4 bytes] → bit j of weight j."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes → the 8 sub-blocks' 6-bit scales and minimums (get_scale_min_k4)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _with_minimums(bits, bs, codes, d, minus, origin, top) -> Blocks:
    """W = d·q − minus → d·(q − z) + (z·d − minus) with z the code nearest zero weight: the
    codes are centred like the weights (smaller error from int8 activations at accuracy level
    4) and the offset left is at most d/2."""
    safe = np.where(d == 0, 1.0, d)
    z = np.clip(np.rint(minus / safe), 0, top).astype(np.uint8)
    return Blocks(bits, bs, codes, d, z, z * d - minus, origin, carried=True)


def from_gguf(type_name: str, raw: np.ndarray, k: int) -> Blocks:
    """GGUF rows raw uint8 [N, nb·block_bytes] → Blocks, values unchanged (to fp32 rounding of
    the K types' d·scale products, which fp32 holds exactly: 11 × 8 bits):

        Q4_0  d·(q − 8)                   blocks of 32, 4-bit
        Q4_1  d·q + m                     blocks of 32, 4-bit + offsets
        Q8_0  d·q, q int8 (held as q + 128) blocks of 32, 8-bit
        Q5_0  d·(q − 16)                  blocks of 32, 8-bit container
        Q5_1  d·q + m                     blocks of 32, 8-bit container + offsets
        Q4_K  d·sc_b·q − dmin·m_b         blocks of 32 (8 a super-block of 256), 4-bit + offsets
        Q5_K  d·sc_b·q − dmin·m_b         blocks of 32, 8-bit container + offsets
        Q6_K  d·sc_b·(q − 32), sc_b int8  blocks of 16 (16 a super-block), 8-bit container
    """
    if type_name not in GGUF_TYPES:
        raise QuantizationError(
            f"GGUF type {type_name} is not carried; carried types: {sorted(GGUF_TYPES)}"
        )
    _, per, nbytes = GGUF_TYPES[type_name]
    n = raw.shape[0]
    if k % per:
        raise QuantizationError(f"a {type_name} row of {k} weights is not whole blocks of {per}")
    b = np.ascontiguousarray(raw).reshape(n, k // per, nbytes)
    origin = f"gguf-{type_name}"
    if type_name == "Q8_0":
        codes = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(8, 32, codes, _half(b[..., 0:2]), None, None, origin, carried=True)
    if type_name == "Q4_0":
        codes = _nibbles(b[..., 2:])
        return Blocks(4, 32, codes, _half(b[..., 0:2]), None, None, origin, carried=True)
    if type_name == "Q4_1":
        d, m = _half(b[..., 0:2]), _half(b[..., 2:4])
        return _with_minimums(4, 32, _nibbles(b[..., 4:]), d, -m, origin, 15)
    if type_name == "Q5_0":
        codes = _nibbles(b[..., 6:]) | (_high_bits(b[..., 2:6]) << 4)
        zp = np.full((n, k // 32), 16, np.uint8)
        return Blocks(8, 32, codes, _half(b[..., 0:2]), zp, None, origin, carried=True)
    if type_name == "Q5_1":
        d, m = _half(b[..., 0:2]), _half(b[..., 2:4])
        codes = _nibbles(b[..., 8:]) | (_high_bits(b[..., 4:8]) << 4)
        return _with_minimums(8, 32, codes, d, -m, origin, 31)
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _half(b[..., 0:2]), _half(b[..., 2:4])
        sc, mn = _k_scales(b[..., 4:16])
        scales = (d[..., None] * sc).reshape(n, -1)  # [N, nb·8]
        minus = (dmin[..., None] * mn).reshape(n, -1)
        # codes: 4 pairs of sub-blocks, each pair 32 bytes: low nibbles the first sub-block
        qs = b[..., 16:144] if type_name == "Q4_K" else b[..., 48:176]
        qs = qs.reshape(n, k // 256, 4, 1, 32)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, k // 256, 8, 32)
        if type_name == "Q4_K":
            return _with_minimums(4, 32, q.reshape(n, -1, 32), scales, minus, origin, 15)
        # Q5_K: 32 bytes of fifth bits, bit i of byte j the fifth bit of sub-block i's weight j
        qh = b[..., 16:48][:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]
        q = q | ((qh & 1) << 4)
        return _with_minimums(8, 32, q.reshape(n, -1, 32), scales, minus, origin, 31)
    # Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, fp16 d
    ql, qh = b[..., 0:128], b[..., 128:192]
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    d = _half(b[..., 208:210])
    ql = ql.reshape(n, k // 256, 2, 1, 64)  # two halves of 128 weights, each 64 bytes
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=3).reshape(n, k // 256, 2, 4, 32)
    qh = qh.reshape(n, k // 256, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    q = (low | ((qh & 3) << 4)).reshape(n, -1, 16)
    scales = (d[..., None] * sc).reshape(n, -1)
    zp = np.full(scales.shape, 32, np.uint8)
    return Blocks(8, 16, q.astype(np.uint8), scales, zp, None, origin, carried=True)


FINE = 16  # the second copy of the block sums is scaled by 1/FINE


def _offset_digits(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """offsets [N, nb] → scale [N, 1], coarse and fine digits [N, nb] (signed, see offset_rows)."""
    r = offsets.astype(np.float64)
    scale = np.abs(r).max(1, keepdims=True) / 7
    safe = np.where(scale == 0, 1.0, scale)
    coarse = np.clip(np.rint(r / safe), -7, 7)
    # the fine digit spans [−8, 7]: a remainder that would round to +8 takes the next coarse step
    coarse = np.where((r / safe - coarse) * FINE > FINE / 2 - 0.5, coarse + 1, coarse)
    fine = np.clip(np.rint((r / safe - coarse) * FINE), -8, 7)
    return safe, coarse, fine


def held_offsets(offsets: np.ndarray, float16: bool = False) -> np.ndarray:
    """The offsets as `offset_rows` holds them (to compare with the exact ones); `float16`: in a
    graph converted to fp16, whose row scales are rounded to it."""
    scale, coarse, fine = _offset_digits(offsets)
    if float16:
        scale = scale.astype(np.float16).astype(np.float64)
    return (scale * (coarse + fine / FINE)).astype(np.float32)


def offset_rows(blocks: Blocks, repeats: int = 1) -> tuple[Blocks, int]:
    """Blocks with Q4_1's offsets folded in as extra rows, and their K.

    Σ_k A[k]·W[n, k] = Σ_k A[k]·(codes part)[n, k] + Σ_b S_b(A)·offsets[n, b], with S_b(A) the sum
    of A over block b: the offsets are the weights of more inputs, the block sums, appended after
    the K real ones. They are held to 8 bits in two 4-bit digits: the input gets S_b(A) and
    S_b(A)/FINE, interleaved (S_0, S_0/FINE, S_1, …: one small MatMul of A's blocks by [1, 1/FINE]
    makes them), and offsets[n, b] ≈ s_n·(c − 8) + s_n·(f − 8)/FINE with one scale s_n per output,
    zero point 8, |c − 8| ≤ 7. One MatMulNBits then reads [A, S_0, S_0/FINE, …] — no float offset
    matrix, no Add. The rows' last block may be partial, which MatMulNBits allows. An
    offset is at most d/2 (see `from_gguf`); its rounding error is at most s_n/(2·FINE), s_n
    being the column's largest offset / 7.

    `repeats` > 1: the input carries the block sums that many times (`sum_repeats`) and the
    copies after the first get zero weights — only to make K a multiple of what a kernel needs.
    """
    n, nb, bs = blocks.codes.shape
    safe, coarse, fine = _offset_digits(blocks.offsets)
    rows = np.stack([coarse, fine], axis=-1).reshape(n, 2 * nb) + 8
    extra = -(-2 * nb * repeats // bs)
    codes = np.full((n, extra * bs), 8, np.uint8)
    codes[:, : 2 * nb] = rows
    mid = np.uint8(1 << (blocks.bits - 1))
    zp = blocks.zero_points if blocks.zero_points is not None else np.full((n, nb), mid, np.uint8)
    merged = Blocks(
        blocks.bits,
        bs,
        np.concatenate([blocks.codes, codes.reshape(n, extra, bs)], axis=1),
        np.concatenate([blocks.scales, np.repeat(safe.astype(np.float32), extra, 1)], axis=1),
        np.concatenate([zp, np.full((n, extra), 8, np.uint8)], axis=1),
        None,
        blocks.origin,
    )
    return merged, nb * bs + 2 * nb * repeats


def sum_repeats(k: int, block_size: int, multiple: int) -> int:
    """How many times the 2·nb block sums go after a K-wide input so that the total is a multiple of
    `multiple` (CUDA's MatMulNBits takes its fast batch-1 kernel only when K % 8 == 0: 576 inputs
    + 2·18 block sums = 612 would not)."""
    nb = -(-k // block_size)
    for r in range(1, multiple + 1):
        if (nb * block_size + 2 * nb * r) % multiple == 0:
            return r
    raise ValueError(f"no repeat count makes {k} inputs + block sums a multiple of {multiple}")


def permute_rows(blocks: Blocks, fn) -> Blocks:
    """Applies a row permutation `fn` (array → array along axis 0) to every per-row array."""
    return dataclasses.replace(
        blocks,
        codes=fn(blocks.codes),
        scales=fn(blocks.scales),
        zero_points=None if blocks.zero_points is None else fn(blocks.zero_points),
        offsets=None if blocks.offsets is None else fn(blocks.offsets),
    )
