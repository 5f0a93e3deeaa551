"""Blocks packed for llamaonnx's own CPU kernel, `ai.llamaonnx.MatMulQ4` (runtime/native/).

The kernel reads W[n, b·32 + j] = d[n, b]·q[n, b, j] + m[n, b] — GGUF's Q4_1 as it is, and any
4-bit `Blocks` with m = offsets − d·zero_point — from tiles of 16 rows × one 32-wide block: 256
bytes of codes laid out for AVX-512 VNNI's dot product, then the 16 rows' d and m as fp16 (Q4_1's
own precision: exact for its GGUF blocks; fp32, in a 400-byte tile, for Q4_K's d·scale products)
and their zero points z (the kernel centres the codes on z to keep the int8 activations' error
small); Q4_0, whose m is −8·d and z 8, in 288 bytes without them (its 4.5 bits a weight). Codes
of 5 bits (GGUF's Q5_0, Q5_1, Q5_K, which arrive in 8-bit containers) get the 4-bit tile's low
nibbles plus a plane of fifth bits, no z (centred on 16), in 384 bytes (fp16 d and m) or 448
(fp32), or 352 where m is −16·d (Q5_0: its 5.5 bits a weight); Q5_1 and Q5_K,
whose zero weight can sit at any code, keep their z too (416 and 464 bytes). Q4_K itself goes
to a tile of its own super-blocks (16 rows × 256, 8 slots of 296 bytes: 4.625 bits a weight
against the 400-byte tile's 6.25), which keeps its d and dmin in fp16 and each block's 6-bit
scale and minimum as bytes, the products made exactly in the kernel, and no z: its codes are
centred on each block's zero weight (z·d = −m), as Q4_1's 320-byte tile's are (the 312-byte
slots that kept z are still read, not written); Q5_K likewise but with its z (376-byte slots,
5.875 bits a weight against the 464-byte tile's 7.25: centred on the zero weight, it lost
quality) and Q6_K (424-byte slots, 6.625 bits against the 512-byte tile's 8). GGUF's Q6_K
(blocks of 16, z = 32) goes to MatMulQ8 in a 512-byte tile: low nibbles, fifth and sixth bit
planes, and the two halves' fp32 scales. 8-bit blocks go to MatMulQ8 in 560 bytes (codes, fp16 d,
z), or 544 without z where every block's is 128 (GGUF's Q8_0: its 8.5 bits a weight). The layout
is documented in runtime/native/tiles.h; the
constants below are its shape, and `pack` checks them against the built library's
(`llamaonnx_layout`) before it writes a tile, so the two can never drift apart silently.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from export.errors import QuantizationError
from export.quant.blocks import Blocks
from runtime.native import DOMAIN as DOMAIN  # the domain the runtime registers the library for

if TYPE_CHECKING:
    import onnx

# rows a tile, block width, bytes of a 4-bit / 8-bit tile, of a 4-bit tile with fp32 d and m,
# of a 5-bit tile with fp16 / fp32 d and m, of a 6-bit tile (blocks of 16), of a 5-bit tile
# without m (Q5_0: m = −16·d)
ROWS, BLOCK, TILE, TILE8, TILE4F, TILE5, TILE5F, TILE6 = 16, 32, 336, 560, 400, 384, 448, 512
TILE5Z, TILE5ZP, TILE5ZPF = 352, 416, 464
TILE4Z = 288  # a 4-bit tile without m and z: Q4_0 (m = −8·d, z = 8)
TILE8Z = 544  # an 8-bit tile without z: Q8_0 (z = 128)
TILE4M = 320  # a 4-bit tile without z: Q4_1, centred on its zero weight (z·d = −m)
TILE4K, K4_BLOCKS = 312, 8  # a slot of Q4_K's super-block tile, and the slots a super-block
TILE5K, TILE6K = 376, 424  # a slot of Q5_K's and of Q6_K's
# a slot of Q4_K's super-block tile without z, centred on each block's zero weight (z·d = −m),
# which export writes (the 312-byte one stays readable)
TILE4KM = 296
K_SLOTS = {4: TILE4KM, 5: TILE5K}  # the super-block tile of Q4_K's (4) and Q5_K's (5) blocks
# the layouts' revision (tiles.h, TILE_LAYOUT), which every node that reads tiles carries as its
# `layout` attribute, so that a library whose layouts changed refuses them; and the oldest one
# the kernels read
LAYOUT, LAYOUT_OLDEST = 1, 1
OP, OP8, GATHER8 = "MatMulQ4", "MatMulQ8", "GatherQ8"
SWIGLU = "MatMulQ4SwiGLU"  # silu(gate)·up of a fused gate/up MatMulQ4
SWIGLU8 = "MatMulQ8SwiGLU"  # the same of a fused gate/up MatMulQ8 (8-bit or Q6_K tiles)
MATMULS = (OP, OP8, SWIGLU, SWIGLU8)  # the ops that multiply by tiles
ATTENTION = "GroupQueryAttention"  # com.microsoft's, for packed QKV + rotary + a shared cache


def code_bits(blocks: Blocks) -> int:
    """The tile width that holds the codes: 4, 5 (an 8-bit container whose codes are all below
    32: GGUF's Q5_0 / Q5_1 / Q5_K), 6 (blocks of 16 with codes below 64 centred on 32, no
    offsets: GGUF's Q6_K) or 8."""
    if blocks.bits == 4:
        return 4
    top = int(blocks.codes.max()) if blocks.codes.size else 0
    if blocks.block_size == BLOCK // 2:
        return 6 if top < 64 and blocks.offsets is None and _centred_on(blocks, 32) else 8
    return 5 if top < 32 else 8


def _centred_on(blocks: Blocks, z: int) -> bool:
    """Whether every block's zero point is z (given, not the 2^(bits−1) a missing one means)."""
    return blocks.zero_points is not None and bool(np.all(blocks.zero_points == z))


def supports(blocks: Blocks) -> bool:
    """Whether MatMulQ4 (4- or 5-bit codes, offsets allowed) or MatMulQ8 (8-bit, no offsets; or
    Q6_K's 6-bit blocks of 16) holds them — exactly, for a GGUF's carried blocks: 4- and 5-bit
    tiles keep d and m in fp16 where that holds them (Q4_0, Q4_1, Q5_0, Q5_1) and in fp32 where
    it does not (Q4_K's and Q5_K's d·scale products); 8-bit tiles keep d in fp16, which holds
    Q8_0; 6-bit tiles keep Q6_K's d·scale in fp32."""
    n, k = blocks.shape
    if n % ROWS or k % BLOCK:
        return False
    bits = code_bits(blocks)
    if bits == 6:
        return True
    if blocks.block_size != BLOCK:
        return False
    if bits < 8:
        return True
    return blocks.offsets is None and (not blocks.carried or _fp16_exact(blocks))


def _fp16_exact(blocks: Blocks) -> bool:
    d, m, _ = scale_min_zero(blocks)
    return all(np.array_equal(x.astype(np.float16).astype(np.float32), x) for x in (d, m))


def k4_factors(blocks: Blocks) -> tuple[np.ndarray, ...] | None:
    """4- or 5-bit blocks whose d and m are Q4_K's (Q5_K's), d = D·sc and m = E·mn with D and E
    fp16 for each row's 8 blocks in turn (a super-block) and sc, mn integers 0..63, factored so:
    D, E float16 [N, nb/8] and sc, mn uint8 [N, nb]; None where some super-block's are not (the
    fp32 products are then packed as they are, in TILE4F or TILE5ZPF). Any factors whose products
    give d and m to the bit will do: they are checked, not assumed."""
    n, nb = blocks.scales.shape
    if code_bits(blocks) not in (4, 5) or blocks.block_size != BLOCK or nb % K4_BLOCKS:
        return None
    d, m, _ = scale_min_zero(blocks)
    factors = []
    for x in (d, m):  # (E is −dmin: the kernel makes m without a negation)
        f = _super_factors(x.reshape(n, nb // K4_BLOCKS, K4_BLOCKS), 0, 63)
        if f is None:
            return None
        factors.append(f)
    (big_d, sc), (big_e, mn) = factors
    return big_d, big_e, sc.reshape(n, nb), mn.reshape(n, nb)


def q6_k_factors(blocks: Blocks) -> tuple[np.ndarray, np.ndarray] | None:
    """Q6_K's blocks of 16 (6-bit codes centred on 32) whose scales are d·sc, d fp16 for each
    row's 16 blocks in turn (a super-block of 256) and sc an int8: D float16 [N, K/256] and sc
    int8 [N, K/16]; None where some super-block's are not (checked, as k4_factors)."""
    n, nh = blocks.scales.shape
    if code_bits(blocks) != 6 or nh % (2 * K4_BLOCKS):
        return None
    x = blocks.scales.astype(np.float32).reshape(n, nh // (2 * K4_BLOCKS), 2 * K4_BLOCKS)
    f = _super_factors(x, -128, 127)
    return None if f is None else (f[0], f[1].view(np.int8).reshape(n, nh))


def _super_factors(x: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray] | None:
    """x float32 [..., B] → (D float16 [...], q [..., B] uint8, as int8 where lo < 0) with D·q == x
    in float32 and q in lo..hi, or None. D is tried as x's largest magnitude over the widest
    codes first (llama.cpp's quantizers give that block 63, or −128 for Q6_K), then narrower,
    for the super-blocks those did not hold."""
    widest = sorted((k for k in range(lo, hi + 1) if k), key=lambda k: (-abs(k), k))
    with np.errstate(all="ignore"):
        top = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
        big = np.zeros(top.shape, np.float16)
        q = np.zeros(x.shape, np.uint8)
        left = np.flatnonzero(top != 0)  # an all-zero super-block: D = 0, q = 0
        flat_x, flat_top = x.reshape(-1, x.shape[-1]), top.reshape(-1)
        for k in widest:
            if left.size == 0:
                break
            cand = (flat_top[left] / np.float32(k)).astype(np.float16)
            wide = cand.astype(np.float32)[:, None]
            qk = np.rint(flat_x[left] / wide)
            exact = wide * qk.astype(np.float32) == flat_x[left]
            ok = np.all((qk >= lo) & (qk <= hi) & exact, -1) & np.isfinite(cand)
            big.reshape(-1)[left[ok]] = cand[ok]
            q.reshape(-1, x.shape[-1])[left[ok]] = qk[ok].astype(np.int16).astype(np.uint8)
            left = left[~ok]
    return None if left.size else (big, q)


def tile_bytes(blocks: Blocks) -> int:
    """The tile a weight's blocks are packed in: TILE8 (TILE8Z for Q8_0's z = 128), TILE6 or
    TILE6K (Q6_K's super-blocks: MatMulQ8); TILE or TILE5 (TILE4Z for Q4_0's m = −8·d, TILE5Z
    for Q5_0's −16·d), or TILE4F / TILE5F for carried blocks whose d or m fp16 cannot hold,
    TILE4KM / TILE5K for those of them that are Q4_K's or Q5_K's (MatMulQ4)."""
    return _tile(blocks)[0]


def _tile(blocks: Blocks) -> tuple[int, tuple[np.ndarray, ...] | None]:
    """tile_bytes, and the factors a super-block tile keeps (k4_factors, q6_k_factors)."""
    bits = code_bits(blocks)
    if bits == 6:
        factors = q6_k_factors(blocks)
        return (TILE6 if factors is None else TILE6K), factors
    if bits == 8:  # Q8_0's zero code is 128 for every block: the kernel makes it
        centred = blocks.zero_points is None or _centred_on(blocks, 128)
        return (TILE8Z if centred else TILE8), None
    wide = blocks.carried and not _fp16_exact(blocks)
    factors = k4_factors(blocks) if wide else None
    if factors is not None:
        return K_SLOTS[bits], factors
    return _fp32_tile(blocks, bits, wide), None


def _fp32_tile(blocks: Blocks, bits: int, wide: bool) -> int:
    if bits == 5 and not wide and blocks.offsets is None and _centred_on(blocks, 16):
        return TILE5Z  # m = −16·d: the kernel makes it
    centred = blocks.zero_points is None or _centred_on(blocks, 8)  # (None: 2^(bits−1), 8)
    if bits == 4 and not wide and blocks.offsets is None and centred:
        return TILE4Z  # Q4_0's m = −8·d and z = 8: the kernel makes both
    if bits == 4 and not wide and blocks.offsets is not None:
        # Q4_1's minimums: centred on the zero weight itself (z·d = −m), as good as the code
        # nearest it (tiles.h), so the tile keeps no z: the file's own 5 bits a weight
        return TILE4M
    if bits == 5 and blocks.zero_points is not None and not _centred_on(blocks, 16):
        # Q5_1 / Q5_K: the code nearest zero weight is anywhere in 0..31, and the int8
        # activations' error is d·(q − z)·ε: centred on 16 instead, it grows by (z − 16)·d·Σε
        return TILE5ZPF if wide else TILE5ZP
    return {(4, False): TILE, (4, True): TILE4F, (5, False): TILE5, (5, True): TILE5F}[bits, wide]


def op_for(blocks: Blocks) -> str:
    return OP8 if code_bits(blocks) >= 6 else OP


def scale_min_zero(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d, m [N, nb] float32 (W = d·q + m) and the zero points z [N, nb] uint8."""
    zp = blocks.zero_points if blocks.zero_points is not None else 1 << (blocks.bits - 1)
    zp = np.broadcast_to(zp, blocks.scales.shape).astype(np.uint8)
    m = -blocks.scales * zp.astype(np.float32)
    if blocks.offsets is not None:
        m = m + blocks.offsets
    return blocks.scales.astype(np.float32), m.astype(np.float32), zp


def pack(blocks: Blocks) -> np.ndarray:
    """The kernel's B: uint8 [N/16, K/32, 336] for 4-bit blocks ([.., 288] for Q4_0's, [.., 400]
    with fp32 d and m, [.., 296] for Q4_K's super-blocks), [.., 352] to [.., 464] for 5-bit
    ones ([.., 376] for Q5_K's super-blocks), [.., 560] for 8-bit ([.., 544] for Q8_0's, z
    128), [.., 512] or [.., 424] (super-blocks) for Q6_K's 6-bit blocks of 16 (`tile_bytes`)."""
    if not supports(blocks):
        n, k = blocks.shape
        raise QuantizationError(
            f"MatMulQ4/Q8 take 4- or 5-bit (or offset-free 8-bit) blocks of {BLOCK}, or 6-bit "
            f"blocks of {BLOCK // 2} centred on 32, with N a multiple of {ROWS} and K of "
            f"{BLOCK}; got {blocks.bits}-bit blocks of {blocks.block_size}, N={n}, K={k}"
        )
    _check_layout()
    n, nb, _ = blocks.codes.shape
    size, factors = _tile(blocks)
    if size in (TILE8, TILE8Z):
        return _pack8(blocks, size)
    if size in (TILE6, TILE6K):
        blocks = _halves_as_blocks_of_32(blocks)
        nb //= 2
    q = blocks.codes.reshape(n // ROWS, ROWS, nb, 4, 2, 4)  # g, r, b, v, half, i
    q = q.transpose(0, 2, 3, 1, 5, 4)  # g, b, v, r, i, half
    low = q & 15
    parts = [(low[..., 0] | (low[..., 1] << 4)).astype(np.uint8).reshape(n // ROWS, nb, 256)]
    fifth = (4,)
    if size == TILE6K:  # each code's two high bits as a crumb (tiles.h): register u = 4k + t
        high = ((q >> 4) & 3).transpose(0, 1, 2, 5, 3, 4).reshape(n // ROWS, nb, 2, 4, 64)
        crumbs = (high << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(3, dtype=np.uint8)
        codes = np.concatenate([parts[0], crumbs.reshape(n // ROWS, nb, 128)], 2)
        return _super6(codes, *factors)
    for plane in {TILE5: fifth, TILE5F: fifth, TILE5Z: fifth, TILE5ZP: fifth, TILE5ZPF: fifth,
                  TILE5K: fifth, TILE6: (4, 5)}.get(size, ()):  # fmt: skip
        # register u = 2v + half holds byte r·4 + i; its fifth (sixth) bits, one 64-bit mask
        high = ((q >> plane) & 1).transpose(0, 1, 2, 5, 3, 4).reshape(n // ROWS, nb, 8, 64)
        parts.append(np.packbits(high, axis=-1, bitorder="little").reshape(n // ROWS, nb, 64))
    if size in (TILE4K, TILE5K, TILE4KM):
        return _super4(blocks, np.concatenate(parts, axis=2), size, factors)
    if size == TILE6:  # the scales of each half (16 weights) of the block, fp32
        s = blocks.scales.astype(np.float32).reshape(n // ROWS, ROWS, nb, 2).transpose(0, 2, 3, 1)
        parts.append(np.ascontiguousarray(s).view(np.uint8).reshape(n // ROWS, nb, 128))
    else:
        d, m, z = scale_min_zero(blocks)
        dtype = np.float32 if size in (TILE4F, TILE5F, TILE5ZPF) else np.float16

        def per_row(x: np.ndarray) -> np.ndarray:
            h = x.astype(dtype).reshape(n // ROWS, ROWS, nb).transpose(0, 2, 1)
            return np.ascontiguousarray(h).view(np.uint8).reshape(n // ROWS, nb, -1)

        parts += [per_row(d)] if size in (TILE4Z, TILE5Z) else [per_row(d), per_row(m)]
        if size in (TILE, TILE4F, TILE5ZP, TILE5ZPF):
            parts.append(z.reshape(n // ROWS, ROWS, nb).transpose(0, 2, 1))
        if size == TILE5ZP:  # unused: no two tile kinds share a size
            parts.append(np.zeros((n // ROWS, nb, ROWS), np.uint8))
    packed = np.ascontiguousarray(np.concatenate(parts, axis=2))
    assert packed.shape[-1] == size
    return packed


def _super4(blocks: Blocks, codes: np.ndarray, size: int, factors) -> np.ndarray:
    """Q4_K's (Q5_K's) super-block tile (tiles.h) from its blocks, their k4_factors and their codes
    as the 336-byte (5-bit) tile lays them out, [N/16, K/32, 256 or 320]: per 16 rows × 256
    weights, sc, mn (16 bytes a block each), D and E of the 16 rows (fp16), then the 8 blocks'
    codes; [N/16, K/32, 296 or 376], 8 slots a super-block (the 376-byte one, and the 312-byte
    one that Q4_K's took before the zero-weight one, with each block's z after mn)."""
    n, nb, _ = blocks.codes.shape
    g, s = n // ROWS, nb // K4_BLOCKS
    big_d, big_e, sc, mn = factors
    codes = codes.reshape(g, s, -1)

    def per_block(x: np.ndarray) -> np.ndarray:  # [N, nb] → [g, s, 8 · 16]: block-major, then row
        return x.reshape(g, ROWS, s, K4_BLOCKS).transpose(0, 2, 3, 1).reshape(g, s, -1)

    rows = [_super_rows(x) for x in (big_d, big_e)]
    zs = [per_block(scale_min_zero(blocks)[2])] if size in (TILE4K, TILE5K) else []
    parts = [per_block(sc), per_block(mn), *zs, *rows, codes]
    return np.ascontiguousarray(np.concatenate(parts, axis=2)).reshape(g, nb, size)


def _super6(codes: np.ndarray, big_d: np.ndarray, sc: np.ndarray) -> np.ndarray:
    """Q6_K's super-block tile (tiles.h) from its codes ([N/16, K/32, 384]: low nibbles, then
    crumbs) and q6_k_factors: per 16 rows × 256 weights, the int8 sc of each block's two halves
    (16 rows each), D of the 16 rows (fp16), 32 bytes unused, then the 8 blocks' codes;
    [N/16, K/32, 424], 8 slots a super-block."""
    g, nb, _ = codes.shape
    s = nb // K4_BLOCKS
    sc = sc.view(np.uint8).reshape(g, ROWS, s, 2 * K4_BLOCKS).transpose(0, 2, 3, 1)
    d = _super_rows(big_d)
    parts = [sc.reshape(g, s, -1), d, np.zeros((g, s, 32), np.uint8), codes.reshape(g, s, -1)]
    return np.ascontiguousarray(np.concatenate(parts, axis=2)).reshape(g, nb, TILE6K)


def _super_rows(x: np.ndarray) -> np.ndarray:
    """A super-block tile's fp16 value a row, [N, K/256] → uint8 [N/16, K/256, 32]: each
    super-block's 16 rows side by side."""
    n, s = x.shape
    h = np.ascontiguousarray(x.astype(np.float16).reshape(n // ROWS, ROWS, s).transpose(0, 2, 1))
    return h.view(np.uint8).reshape(n // ROWS, s, 2 * ROWS)


def _halves_as_blocks_of_32(blocks: Blocks) -> Blocks:
    """Blocks of 16 seen as blocks of 32 for the code layout (the scales stay per half)."""
    n, nb, _ = blocks.codes.shape
    return Blocks(
        blocks.bits, BLOCK, blocks.codes.reshape(n, nb // 2, BLOCK), blocks.scales.reshape(n, -1),
        None, None, blocks.origin, blocks.carried,
    )  # fmt: skip


def _pack8(blocks: Blocks, size: int) -> np.ndarray:
    n, nb, _ = blocks.codes.shape
    c = blocks.codes.reshape(n // ROWS, ROWS, nb, 8, 4).transpose(0, 2, 3, 1, 4)  # g, b, v, r, i
    d = blocks.scales.astype(np.float16).reshape(n // ROWS, ROWS, nb).transpose(0, 2, 1)
    parts = [c.reshape(n // ROWS, nb, 512), np.ascontiguousarray(d).view(np.uint8)]
    if size == TILE8:  # (TILE8Z: every z is 128, which the kernel supplies)
        z = np.broadcast_to(blocks.zero_points, blocks.scales.shape).astype(np.uint8)
        parts.append(z.reshape(n // ROWS, ROWS, nb).transpose(0, 2, 1))
    return np.ascontiguousarray(np.concatenate(parts, axis=2))


@functools.cache
def _check_layout() -> None:
    from runtime import native

    built = native.layout()
    ours = {
        "rows": ROWS, "block": BLOCK, "tile": TILE, "tile8": TILE8, "tile4f": TILE4F,
        "tile5": TILE5, "tile5f": TILE5F, "tile6": TILE6, "tile5z": TILE5Z, "tile5zp": TILE5ZP,
        "tile5zpf": TILE5ZPF, "tile4k": TILE4K, "tile6k": TILE6K, "tile5k": TILE5K,
        "tile4z": TILE4Z, "tile8z": TILE8Z, "tile4m": TILE4M, "revision": LAYOUT,
        "oldest": LAYOUT_OLDEST, "tile4km": TILE4KM,
    }  # fmt: skip
    if built != ours:
        raise QuantizationError(
            f"the kernel library was built with the tile layout {built}, this packer writes "
            f"{ours}: reinstall llamaonnx (pip install -e .) so both come from one version"
        )


def tile_node(op: str, inputs: list[str], outputs: list[str], name: str) -> onnx.NodeProto:
    """A node of ours that reads tiles (`op`: MATMULS or GATHER8), marked with the layouts'
    revision it was packed in."""
    from onnx import helper

    return helper.make_node(op, inputs, outputs, name=name, domain=DOMAIN, layout=LAYOUT)


def module_of(node) -> str:
    """The module a projection node computes, from its name: '/model/layers.0/feed_forward/w2/
    MatMulQ4' → 'layers.0.feed_forward.w2', '/model/output/MatMulQ8' → 'output'."""
    return ".".join(node.name.split("/")[2:-1])


def precise_pattern(spec: str) -> tuple[str, int]:
    """'PATTERN' → (PATTERN, 0): two digits on every block; 'PATTERN=B' → (PATTERN, B): on each
    activation row's B blocks of largest scale (B ≥ 1)."""
    pattern, eq, blocks = spec.rpartition("=") if "=" in spec else (spec, "", "0")
    if not pattern or not blocks.isdigit() or (eq and int(blocks) < 1):
        raise QuantizationError(
            f"--precise {spec!r}: expected PATTERN or PATTERN=BLOCKS with BLOCKS a whole number "
            "≥ 1 (e.g. '*=2': two digits on each activation row's 2 blocks of largest scale)"
        )
    return pattern, int(blocks)


def two_digits(graph, specs: tuple[str, ...]) -> list[str]:
    """Gives the kernels' projection nodes whose module matches one of `specs` (fnmatch patterns,
    each with an optional '=BLOCKS'; where several match, the last wins) the attribute digits=2:
    the kernel then also rounds what each activation's int8 rounding left, at 1/16 of its
    block's scale (1/8 on 5-bit codes, 1/128 on 8-bit ones: runtime/native/tiles.h), and adds
    that product too (runtime/native/activations.c, residual_rows). On the default model all of
    them bring the int8 activations' KL from 3e-3 to 1e-5 (docs/quantization.md, "Two digits"),
    for twice the integer work (on AMX, one tile product takes both digits). With '=B',
    attribute blocks=B: only on each row's B blocks of largest scale, where most of the rounding
    error is, for B/nb of that work.
    Returns the modules marked, each as 'module' or 'module=B'."""
    import fnmatch

    import onnx

    parsed = [precise_pattern(s) for s in specs]
    nodes = [n for n in graph.node if n.domain == DOMAIN and n.op_type in MATMULS]
    marked = []
    for node in nodes:
        module = module_of(node)
        hits = [b for p, b in parsed if fnmatch.fnmatchcase(module, p)]
        if not hits:
            continue
        kept = [a for a in node.attribute if a.name not in ("digits", "blocks")]
        extra = [onnx.helper.make_attribute("blocks", hits[-1])] if hits[-1] else []
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("digits", 2), *extra])
        marked.append(f"{module}={hits[-1]}" if hits[-1] else module)
    modules = [m.partition("=")[0] for m in marked]
    for spec, (p, _) in zip(specs, parsed, strict=True):
        if not any(fnmatch.fnmatchcase(m, p) for m in modules):
            names = sorted({module_of(n) for n in nodes})
            raise QuantizationError(
                f"--precise {spec!r} matches no projection on llamaonnx's kernels; their names "
                f"are {', '.join(names[:5])}, ... {names[-1]} ({len(names)} in all)"
            )
    return marked
