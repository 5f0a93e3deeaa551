"""llamaonnx's CPU kernel (runtime/native/, `ai.llamaonnx.MatMulQ4`): the packed layout
against the blocks it holds, both code paths against numpy, the onnxruntime binding, and clear
errors."""

from itertools import product

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.errors import QuantizationError
from export.quant.blocks import Blocks, from_gguf, quantize
from export.quant.native import (
    ATTENTION,
    BLOCK,
    DOMAIN,
    GATHER8,
    LAYOUT,
    LAYOUT_OLDEST,
    OP,
    OP8,
    ROWS,
    SWIGLU,
    SWIGLU8,
    TILE,
    TILE4F,
    TILE4K,
    TILE4KM,
    TILE4M,
    TILE4Z,
    TILE5,
    TILE5F,
    TILE5K,
    TILE5Z,
    TILE5ZP,
    TILE5ZPF,
    TILE6,
    TILE6K,
    TILE8,
    TILE8Z,
    op_for,
    pack,
    supports,
)
from runtime import native
from runtime.errors import OptionError
from tests.gguf_writer import random_blocks

# every kernel path this CPU runs (the portable C one everywhere): each is checked against numpy
PATHS = native.supported_paths()


def test_the_packer_and_the_library_share_one_tile_layout():
    assert native.layout() == {
        "rows": ROWS, "block": BLOCK, "tile": TILE, "tile8": TILE8, "tile4f": TILE4F,
        "tile5": TILE5, "tile5f": TILE5F, "tile6": TILE6, "tile5z": TILE5Z, "tile5zp": TILE5ZP,
        "tile5zpf": TILE5ZPF, "tile4k": TILE4K, "tile6k": TILE6K, "tile5k": TILE5K,
        "tile4z": TILE4Z, "tile8z": TILE8Z, "tile4m": TILE4M, "revision": LAYOUT,
        "oldest": LAYOUT_OLDEST, "tile4km": TILE4KM,
    }  # fmt: skip


@pytest.mark.parametrize("op", [OP, OP8, SWIGLU, SWIGLU8, GATHER8])
def test_a_tile_layout_the_library_does_not_read_is_refused(op):
    """A node's `layout` attribute names the revision its tiles were packed in: the library runs
    the revisions it reads (a node without one is revision 1, the folders before it) and refuses
    any other when the session loads, saying what to do."""
    blocks = q8_0(32, 64) if op in (OP8, SWIGLU8, GATHER8) else q4_1(32, 64)
    packed = pack(blocks)
    a = {"a": np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 1, 64)}
    if op == GATHER8:
        a = {"a": np.array([[3, 1]], np.int64)}

    def session(**attributes):
        node = helper.make_node(op, ["b", "a"] if op == GATHER8 else ["a", "b"], ["y"],
                                domain=DOMAIN, **attributes)  # fmt: skip
        kind = TensorProto.INT64 if op == GATHER8 else TensorProto.FLOAT
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("a", kind, list(a["a"].shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(packed, "b")],
        )
        return _load(graph)

    (want,) = session(layout=LAYOUT).run(None, a)
    assert LAYOUT_OLDEST == 1  # (while it is, a node without the attribute runs too)
    np.testing.assert_array_equal(session().run(None, a)[0], want)
    refused = ((LAYOUT + 1, "run it with the newer llamaonnx that wrote it"),
               (LAYOUT_OLDEST - 1, "quantize it again with this llamaonnx"))  # fmt: skip
    for revision, says in refused:
        with pytest.raises(Exception, match=f"tile layout revision {revision}, .*{says}"):
            session(layout=revision)


# -- reading packed tiles back (test helpers) ----------------------------------------------------
def unpack8(packed: np.ndarray) -> np.ndarray:
    """W [N, K] float32 from a packed MatMulQ8 B (for tests)."""
    g, nb, _ = packed.shape
    c = packed[..., :512].reshape(g, nb, 8, ROWS, 4).transpose(0, 3, 1, 2, 4)  # g, r, b, v, i
    c = c.reshape(g * ROWS, nb, BLOCK).astype(np.float32)
    d = np.ascontiguousarray(packed[..., 512:544]).view(np.float16).astype(np.float32)
    d = d.reshape(g, nb, ROWS).transpose(0, 2, 1).reshape(g * ROWS, nb, 1)
    z = np.full((g, nb, ROWS), 128, np.uint8) if packed.shape[-1] == TILE8Z else packed[..., 544:]
    z = z.reshape(g, nb, ROWS).transpose(0, 2, 1).reshape(g * ROWS, nb, 1)
    return (d * (c - z.astype(np.float32))).reshape(g * ROWS, nb * BLOCK)


# the super-block tiles of Q4_K and Q5_K: those with each block's z, and Q4_K's centred on its
# zero weight (no z)
K_TILES, K_ZERO_WEIGHT = (TILE4K, TILE5K, TILE4KM), (TILE4KM,)
# the tiles whose codes are centred on each block's zero weight (tiles.h, ZERO_WEIGHT)
ZERO_WEIGHT = (TILE4M, *K_ZERO_WEIGHT)


def super_blocks(packed: np.ndarray) -> tuple[np.ndarray, ...]:
    """A Q4_K (Q5_K) super-block tile's parts (tiles.h): codes [g, nb, 256 (320)] as a 336-byte
    (5-bit) tile's, sc, mn, z [N, nb] uint8 (z None where the tile has none) and D, E
    [N, nb / 8] float32 (for tests)."""
    g, nb, size = packed.shape
    s = packed.reshape(g, nb // 8, 8 * size)
    codes_at = 320 if size in K_ZERO_WEIGHT else 448  # (D and E the 64 bytes before)

    def per_block(lo: int) -> np.ndarray:  # block-major, then row
        x = s[..., lo : lo + 128].reshape(g, nb // 8, 8, ROWS).transpose(0, 3, 1, 2)
        return x.reshape(g * ROWS, nb)

    def per_row(lo: int) -> np.ndarray:
        x = np.ascontiguousarray(s[..., lo : lo + 32]).view(np.float16)
        return x.reshape(g, nb // 8, ROWS).transpose(0, 2, 1).reshape(g * ROWS, nb // 8)

    codes = s[..., codes_at:].reshape(g, nb, -1)
    sc, mn = per_block(0), per_block(128)
    z = None if size in K_ZERO_WEIGHT else per_block(256)
    big_d, big_e = (per_row(codes_at - lo).astype(np.float32) for lo in (64, 32))
    return codes, sc, mn, z, big_d, big_e


def super6(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q6_K super-block tile's parts (tiles.h): codes [g, nb, 384] as a 512-byte tile's, sc
    [N, K/16] int8 (each block's halves in order) and D [N, K/256] float32 (for tests)."""
    g, nb, _ = packed.shape
    s = packed.reshape(g, nb // 8, 3392)
    sc = s[..., :256].view(np.int8).reshape(g, nb // 8, 16, ROWS).transpose(0, 3, 1, 2)
    d = np.ascontiguousarray(s[..., 256:288]).view(np.float16).reshape(g, nb // 8, ROWS)
    d = d.transpose(0, 2, 1).reshape(g * ROWS, nb // 8).astype(np.float32)
    return s[..., 320:].reshape(g, nb, 384), sc.reshape(g * ROWS, nb * 2), d


def codes_of(packed: np.ndarray) -> np.ndarray:
    """The codes q [N, K] of a packed MatMulQ4 or 6-bit MatMulQ8 B: low nibbles, then the fifth
    (5- and 6-bit tiles) and sixth (6-bit) bit planes (for tests)."""
    g, nb, size = packed.shape
    if size in K_TILES:
        packed = super_blocks(packed)[0]
    elif size == TILE6K:
        packed = super6(packed)[0]
    codes = packed[..., :256].reshape(g, nb, 4, ROWS, 4)  # g, b, v, r, i
    q = np.stack([codes & 15, codes >> 4], axis=-1)  # g, b, v, r, i, half
    planes = {TILE5: 1, TILE5F: 1, TILE5Z: 1, TILE5ZP: 1, TILE5ZPF: 1, TILE5K: 1, TILE6: 2}
    planes = planes.get(size, 0)
    if size == TILE6K:  # crumbs: bits 2t of byte 64k + j, register u = 4k + t = 2v + half
        crumbs = packed[..., 256:384].reshape(g, nb, 2, 1, ROWS * 4) >> (2 * np.arange(4))[:, None]
        high = (crumbs & 3).reshape(g, nb, 4, 2, ROWS, 4).transpose(0, 1, 2, 4, 5, 3)
        q = q | (high.astype(np.uint8) << 4)
    for p in range(planes):  # mask u = 2v + half, bit r·4 + i
        bits = np.unpackbits(packed[..., 256 + 64 * p : 320 + 64 * p], axis=-1, bitorder="little")
        q = q | (bits.reshape(g, nb, 4, 2, ROWS, 4).transpose(0, 1, 2, 4, 5, 3) << (4 + p))
    return q.transpose(0, 3, 1, 2, 5, 4).reshape(g * ROWS, nb * BLOCK)


def fields(packed: np.ndarray) -> tuple[np.ndarray, ...]:
    """codes q [N, K], d, m [N, nb] float32 and z [N, nb] from a packed B (for tests); a tile
    centred on its zero weight (ZERO_WEIGHT) has z = −m/d, where d ≠ 0 (0 where it is)."""
    g, nb, size = packed.shape
    if size in K_TILES:  # d = D·sc, m = E·mn, each product exact in float32
        _, sc, mn, z, big_d, big_e = super_blocks(packed)
        d = np.repeat(big_d, 8, axis=1) * sc.astype(np.float32)
        m = np.repeat(big_e, 8, axis=1) * mn.astype(np.float32)
        return codes_of(packed), d, m, _zero_weight(d, m) if z is None else z

    def per_row(lo: int, width: int, dtype) -> np.ndarray:
        x = np.ascontiguousarray(packed[..., lo : lo + width]).view(dtype)
        return x.reshape(g, nb, ROWS).transpose(0, 2, 1).reshape(g * ROWS, nb)

    wide = 4 if size in (TILE4F, TILE5F, TILE5ZPF) else 2  # fp32 or fp16 d and m
    dtype = np.float32 if wide == 4 else np.float16
    five = size in (TILE5, TILE5F, TILE5Z, TILE5ZP, TILE5ZPF)
    at = 320 if five else 256
    d = per_row(at, wide * ROWS, dtype).astype(np.float32)
    # the zero code of a tile without z (tiles.h's Layout.zero): Q4_0's 8, a 5-bit tile's 16;
    # where the tile has no m either (Q4_0, Q5_0), m = −zero·d
    zero = 8 if size == TILE4Z else 16 if five and size not in (TILE5ZP, TILE5ZPF) else 0
    if size in (TILE4Z, TILE5Z):
        m = -zero * d
    else:
        m = per_row(at + wide * ROWS, wide * ROWS, dtype)
    if size == TILE4M:
        z = _zero_weight(d, m.astype(np.float32))
    elif zero:
        z = np.full(d.shape, zero, np.uint8)
    else:
        z = per_row(at + 2 * wide * ROWS, ROWS, np.uint8)
    return codes_of(packed), d, m.astype(np.float32), z


def _zero_weight(d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """−m/d, the code of each block's zero weight, where d ≠ 0 (0 where it is)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d == 0, np.float32(0), -m / d).astype(np.float32)


def unpack6(packed: np.ndarray) -> np.ndarray:
    """W [N, K] float32 from a packed 6-bit MatMulQ8 B: s·(q − 32), one s per 16 (for tests)."""
    g, nb, size = packed.shape
    if size == TILE6K:  # s = D·sc, exact in float32
        _, sc, d = super6(packed)
        s = np.repeat(d, 16, axis=1) * sc.astype(np.float32)
        return np.repeat(s, 16, axis=1) * (codes_of(packed).astype(np.float32) - 32)
    s = np.ascontiguousarray(packed[..., 384:512]).view(np.float32)  # g, b, half·16 + r
    s = s.reshape(g, nb, 2, ROWS).transpose(0, 3, 1, 2).reshape(g * ROWS, nb * 2)
    return np.repeat(s, 16, axis=1) * (codes_of(packed).astype(np.float32) - 32)


def unpack(packed: np.ndarray) -> np.ndarray:
    """W [N, K] float32 from a packed B: what the kernel multiplies by (for tests)."""
    q, d, m, _ = fields(packed)
    return np.repeat(d, BLOCK, axis=1) * q + np.repeat(m, BLOCK, axis=1)


def q4_1(n: int, k: int, seed: int = 0) -> Blocks:
    """Random GGUF Q4_1 blocks (fp16 d and m), read the way the GGUF loader reads them."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    raw = np.zeros((n, nb, 20), np.uint8)
    raw[..., 0:2] = (rng.random((n, nb, 1)) * 0.02 + 1e-3).astype(np.float16).view(np.uint8)
    raw[..., 2:4] = (-rng.random((n, nb, 1)) * 0.15).astype(np.float16).view(np.uint8)
    raw[..., 4:] = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    return from_gguf("Q4_1", raw.reshape(n, nb * 20), k)


def q4_k(n: int, k: int, seed: int = 0) -> Blocks:
    """Random GGUF Q4_K blocks: d·scale and dmin·min that fp16 cannot hold."""
    return from_gguf("Q4_K", random_blocks("Q4_K", n, k, seed), k)


def q4_k_fp32(n: int, k: int, seed: int = 0) -> Blocks:
    """Q4_K's blocks with each d and m moved by a part in 10⁴: no longer an fp16 times 0..63, so
    they keep the 400-byte tiles' fp32 products."""
    b = q4_k(n, k, seed)
    nudge = np.float32(1.0001)
    return Blocks(b.bits, b.block_size, b.codes, b.scales * nudge, b.zero_points,
                  b.offsets * nudge, b.origin, b.carried)  # fmt: skip


def q5_k_fp32(n: int, k: int, seed: int = 0) -> Blocks:
    """Q5_K's blocks nudged as q4_k_fp32's: they keep the 464-byte tiles' fp32 products."""
    b = gguf_blocks("Q5_K", n, k, seed)
    nudge = np.float32(1.0001)
    return Blocks(b.bits, b.block_size, b.codes, b.scales * nudge, b.zero_points,
                  b.offsets * nudge, b.origin, b.carried)  # fmt: skip


def q6_k_fp32(n: int, k: int, seed: int = 0) -> Blocks:
    """Q6_K's blocks with each scale moved by a part in 10⁴: they keep the 512-byte tiles."""
    b = gguf_blocks("Q6_K", n, k, seed)
    return Blocks(b.bits, b.block_size, b.codes, b.scales * np.float32(1.0001), b.zero_points,
                  None, b.origin, b.carried)  # fmt: skip


def q8_0(n: int, k: int, seed: int = 0) -> Blocks:
    """Random GGUF Q8_0 blocks, the LM head's format."""
    rng = np.random.default_rng(seed)
    raw = np.zeros((n, k // 32, 34), np.uint8)
    raw[..., 0:2] = (rng.random((n, k // 32, 1)) * 0.01).astype(np.float16).view(np.uint8)
    raw[..., 2:] = rng.integers(0, 256, (n, k // 32, 32), dtype=np.uint8)
    return from_gguf("Q8_0", raw.reshape(n, -1), k)


def q8_zp(n: int, k: int, seed: int = 0) -> Blocks:
    """8-bit blocks with zero points of their own (what `--precision int8` rounds a float weight
    to): MatMulQ8's 560-byte tile, which keeps z, where Q8_0's z is 128 everywhere. The scales
    are fp16's, which the tile keeps."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    b = quantize(w, 8, 32, symmetric=False)
    assert b.zero_points is not None and len(np.unique(b.zero_points)) > 10
    d = b.scales.astype(np.float16).astype(np.float32)
    return Blocks(b.bits, b.block_size, b.codes, d, b.zero_points, None, b.origin)


def q4_zp(n: int, k: int, seed: int = 0) -> Blocks:
    """4-bit blocks with zero points of their own (what `--no-gguf-blocks` rounds a float weight
    to): the 336-byte tile, which keeps z, where Q4_1's tile is centred on each block's zero
    weight and keeps none. The scales are fp16's, which the tile keeps."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05 + rng.uniform(-0.1, 0.1, (n, 1))).astype(np.float32)
    b = quantize(w, 4, 32, symmetric=False)  # (rows moved off zero: zero points across 0..15)
    assert b.zero_points is not None and np.any(b.zero_points != 8)
    d = b.scales.astype(np.float16).astype(np.float32)
    return Blocks(b.bits, b.block_size, b.codes, d, b.zero_points, None, b.origin)


def gguf_blocks(kind: str, n: int, k: int, seed: int = 0) -> Blocks:
    """Random GGUF blocks of `kind` (every code, scale and minimum bit random), as read."""
    return from_gguf(kind, random_blocks(kind, n, k, seed), k)


BLOCKS = (
    {"Q4_1": q4_1, "Q4-zp": q4_zp, "Q4_K": q4_k, "Q8_0": q8_0, "Q8-zp": q8_zp}
    | {
        kind: lambda n, k, seed=0, kind=kind: gguf_blocks(kind, n, k, seed)
        for kind in ("Q4_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K")
    }
    | {  # K-quants whose scales the super-block tiles cannot factor: the fp32 tiles
        "Q4_K-fp32": q4_k_fp32,
        "Q5_K-fp32": q5_k_fp32,
        "Q6_K-fp32": q6_k_fp32,
    }
)

# one of each tile kind's blocks: the file types, and 8-bit blocks with zero points of their own
EVERY_KIND = ["Q4_0", "Q4_1", "Q4-zp", "Q4_K", "Q8_0", "Q8-zp", "Q5_0", "Q5_1", "Q5_K", "Q6_K"]


def kept_blocks(a: np.ndarray, blocks: int) -> np.ndarray:
    """[..., nb] bool: each row's `blocks` blocks of largest scale (the first of equals first),
    where two digits on a few blocks (attribute `blocks`) keep the second; 0: all of them."""
    amax = np.abs(a.reshape(*a.shape[:-1], -1, 32)).max(-1)
    if blocks == 0:
        return np.ones(amax.shape, bool)
    order = np.argsort(-amax, axis=-1, kind="stable")[..., :blocks]
    keep = np.zeros(amax.shape, bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return keep


def second_digit(tile: int) -> int:
    """F, what a second digit's step is of the first's (tiles.h, digit_shift): 16 for 4-bit
    codes, 8 for 5-bit ones, 128 for 8- and 6-bit ones."""
    if tile in (TILE, TILE4M, TILE4Z, TILE4F, TILE4K, TILE4KM):
        return 16
    return 128 if tile in (TILE6, TILE6K, TILE8, TILE8Z) else 8


def rounded(a: np.ndarray, digits: int = 1, blocks: int = 0, tile: int = TILE) -> np.ndarray:
    """a with each block of 32 rounded to int8 steps, in float32 as the kernel does it; with two
    digits plus what that rounding left, rounded to steps of 1/F the block's scale (F by the
    weights' tile: second_digit), on each row's `blocks` blocks of largest scale (0: on all)."""
    x = a.reshape(*a.shape[:-1], -1, 32)
    amax = np.abs(x).max(-1, keepdims=True)
    inv = np.float32(127) / np.where(amax == 0, np.float32(1), amax)
    codes = np.rint(x * inv)
    da = amax / np.float32(127)
    out = codes.astype(np.float64) * da.astype(np.float64)
    if digits == 2:
        f = np.float32(second_digit(tile))
        left = x - da * codes  # float32, as the kernel computes it
        inv2 = f / np.where(da == 0, np.float32(1), da)
        second = np.clip(np.rint(left * inv2), -f / 2, f / 2).astype(np.float64)
        second *= kept_blocks(a, blocks)[..., None]
        out += second * (da / f).astype(np.float64)
    return out.reshape(a.shape)


def reference(a: np.ndarray, packed: np.ndarray, digits: int = 1, blocks: int = 0) -> np.ndarray:
    """What the kernel computes: the codes centred on z times the activations rounded to int8 per
    block of 32, plus the rest of each weight, (m + z·d), times the exact block sums. (A 6-bit or
    8-bit tile, and one centred on its zero weight, ZERO_WEIGHT: its weights times the rounded
    activations.)"""
    r = rounded(a, digits, blocks, packed.shape[-1])
    if packed.shape[-1] in (TILE6, TILE6K):
        return (r @ unpack6(packed).T.astype(np.float64)).astype(np.float32)
    if packed.shape[-1] in (TILE8, TILE8Z):
        return (r @ unpack8(packed).T.astype(np.float64)).astype(np.float32)
    if packed.shape[-1] in ZERO_WEIGHT:
        return (r @ unpack(packed).T.astype(np.float64)).astype(np.float32)
    q, d, m, z = (x.astype(np.float64) for x in fields(packed))
    centred = np.repeat(d, 32, axis=1) * (q - np.repeat(z, 32, axis=1))
    rest = np.repeat(m + z * d, 32, axis=1)
    return (r @ centred.T + a.astype(np.float64) @ rest.T).astype(np.float32)


def matmul(
    packed: np.ndarray, a: np.ndarray, path: str, digits: int = 1, blocks: int = 0
) -> np.ndarray:
    """y = a · Wᵀ through the library's plain C entry point, on kernel path `path`, with the
    activations in `digits` int8 digits (the second on each row's `blocks` largest, 0: all)."""
    (m, k), n = a.shape, packed.shape[0] * ROWS
    y = np.zeros((m, n), np.float32)
    with native.use_path(path):
        assert native.library().llamaonnx_matmul_digits(
            packed.shape[-1], a.ctypes.data, m, k, packed.ctypes.data, n, y.ctypes.data, digits,
            blocks,
        ) == 0  # fmt: skip
    return y


def test_packed_tiles_hold_the_blocks():
    """GGUF's Q4_1 exactly (its d and m are fp16), in the 320-byte tile (the file's own 5 bits a
    weight, no z); blocks quantized here from floats to fp16's precision in d and m, a few
    hundredths of a quantization step, in the 336-byte tile that keeps their zero points."""
    gguf = q4_1(48, 96)
    packed = pack(gguf)
    assert packed.shape == (3, 3, TILE4M) and packed.size * 8 / gguf.codes.size == 5.0
    np.testing.assert_array_equal(unpack(packed), gguf.dequantize())
    assert pack(q4_zp(48, 96)).shape == (3, 3, TILE)
    w = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    for symmetric in (True, False):
        blocks = quantize(w, 4, 32, symmetric)
        step = np.abs(np.repeat(blocks.scales, 32, axis=1))  # (symmetric scales may be < 0)
        assert np.all(np.abs(unpack(pack(blocks)) - blocks.dequantize()) <= step / 50)


def test_q4_k_blocks_pack_exactly_in_their_super_block_tiles(monkeypatch):
    """Q4_K's per-32 d·scale and dmin·min (fp16 × 6 bits, which fp16 cannot hold) go to its
    super-block tiles as the file has them, fp16 d and dmin and 6-bit factors, 4.625 bits a
    weight (no z: centred on each block's zero weight), and read back to the gguf dequantizer's
    weights: to the bit those of the 400-byte tiles, which hold the products in fp32 and take
    blocks whose products are not Q4_K's, and of the 312-byte tiles that kept z."""
    import gguf

    raw = random_blocks("Q4_K", 32, 512, seed=5)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K).reshape(32, 512)
    blocks = from_gguf("Q4_K", raw, 512)
    assert supports(blocks)
    packed = pack(blocks)
    assert packed.shape == (2, 16, TILE4KM) and pack(q4_1(32, 64)).shape[-1] == TILE4M
    assert packed.size * 8 / want.size == 4.625 and raw.size * 8 / want.size == 4.5
    np.testing.assert_allclose(unpack(packed), want, rtol=1e-6, atol=1e-7)
    _, sc, mn, _, big_d, big_e = super_blocks(packed)
    assert sc.max() <= 63 and mn.max() <= 63 and sc.max() > 31 and mn.max() > 31
    np.testing.assert_array_equal(np.repeat(big_d, 8, axis=1) * sc, blocks.scales)
    fp32 = pack(q4_k_fp32(32, 512, seed=5))
    assert fp32.shape == (2, 16, TILE4F)
    with monkeypatch.context() as m:  # the same blocks in the 400-byte tiles
        m.setattr("export.quant.native.k4_factors", lambda blocks: None)
        np.testing.assert_array_equal(unpack(pack(blocks)), unpack(packed))
    with monkeypatch.context() as m:  # and in the 312-byte ones, with each block's z
        m.setattr("export.quant.native.K_SLOTS", {4: TILE4K, 5: TILE5K})
        with_z = pack(blocks)
    assert with_z.shape == (2, 16, TILE4K) and super_blocks(packed)[3] is None
    np.testing.assert_array_equal(unpack(with_z), unpack(packed))
    np.testing.assert_array_equal(codes_of(with_z), codes_of(packed))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_super_block_tiles_give_the_fp32_tiles_bits(path, kind, monkeypatch):
    """Every path makes d = D·sc and m = E·mn (Q6_K: s = D·sc) from the super-block tile
    exactly, so each gives the 400-byte (512-byte) tile's bits: one token and a prompt's, one
    digit and two (on a few blocks too). (For Q4_K, the super-block tile that keeps each
    block's z, which folders written before the zero-weight one hold.)"""
    n, k = 64, 1024
    blocks = BLOCKS[kind](n, k, seed=21)
    with monkeypatch.context() as m:
        m.setattr("export.quant.native.K_SLOTS", {4: TILE4K, 5: TILE5K})
        packed = pack(blocks)
    with monkeypatch.context() as m:
        m.setattr("export.quant.native.k4_factors", lambda blocks: None)
        m.setattr("export.quant.native.q6_k_factors", lambda blocks: None)
        fp32 = pack(blocks)
    sizes = {"Q4_K": (TILE4K, TILE4F), "Q5_K": (TILE5K, TILE5ZPF), "Q6_K": (TILE6K, TILE6)}[kind]
    assert (packed.shape[-1], fp32.shape[-1]) == sizes
    rng = np.random.default_rng(21)
    for rows, (digits, few) in product((1, 2, 3, 4, 5, 17, 33), ((1, 0), (2, 0), (2, 3))):
        a = 3 * rng.standard_normal((rows, k)).astype(np.float32)
        a[:, 7] *= 30
        y = matmul(packed, a, path, digits, few)
        np.testing.assert_array_equal(y, matmul(fp32, a, path, digits, few))
        if rows == 5:
            want = reference(a, packed, digits, few)
            np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind,tile", [("Q4_K", TILE4KM)])
def test_zero_weight_super_block_tiles_match_numpy(path, kind, tile):
    """Q4_K's tiles without z compute the weights times the rounded activations
    (tiles.h: llama.cpp's Q4_K × Q8_K form), a token's bits the same alone and in a prompt of
    any length, with one digit and two (on a few blocks too)."""
    n, k = 64, 1024
    packed = pack(BLOCKS[kind](n, k, seed=22))
    assert packed.shape[-1] == tile
    rng = np.random.default_rng(22)
    for rows, (digits, few) in product((1, 2, 3, 4, 5, 17, 33), ((1, 0), (2, 0), (2, 3))):
        a = 3 * rng.standard_normal((rows, k)).astype(np.float32)
        a[:, 7] *= 30
        y = matmul(packed, a, path, digits, few)
        want = reference(a, packed, digits, few)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        np.testing.assert_array_equal(y[-1:], matmul(packed, a[-1:], path, digits, few))


def test_q6_k_blocks_pack_exactly_in_6bit_tiles():
    """Q6_K's blocks of 16 (codes 0..63 centred on 32) in MatMulQ8's super-block tiles, fp16 d
    and an int8 scale a half block as the file has them (6.625 bits a weight), read back to the
    gguf dequantizer's weights, as the 512-byte tiles' fp32 d·scale do; blocks whose scales are
    not an fp16 times an int8 keep those."""
    import gguf

    raw = random_blocks("Q6_K", 48, 512, seed=8)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q6_K).reshape(48, 512)
    blocks = from_gguf("Q6_K", raw, 512)
    assert supports(blocks) and op_for(blocks) == OP8
    packed = pack(blocks)
    assert packed.shape == (3, 16, TILE6K) and packed.size * 8 / want.size == 6.625
    np.testing.assert_allclose(unpack6(packed), want, rtol=1e-6, atol=1e-7)
    assert codes_of(packed).max() == 63
    _, sc, _ = super6(packed)
    assert sc.min() < -64 and sc.max() > 64  # signed scales, as the file's
    fp32 = pack(BLOCKS["Q6_K-fp32"](48, 512, seed=8))
    assert fp32.shape == (3, 16, TILE6)
    np.testing.assert_allclose(unpack6(fp32), want * np.float32(1.0001), rtol=1e-6, atol=1e-7)
    # blocks of 16 that are not Q6_K's (8-bit codes) have no native tile
    assert not supports(quantize(np.ones((16, 64), np.float32), 8, 16, True))


@pytest.mark.parametrize("path", PATHS)
def test_q4_0_blocks_pack_exactly_in_288_byte_tiles_with_the_336_byte_tiles_bits(path, monkeypatch):
    """Q4_0 (d·(q − 8)) in tiles of its own size, 288 bytes without m and z, which the kernel
    makes as −8·d and 8: the dequantizer's weights exactly, and on every path the bits of the
    same blocks in the tiles that store them: the 336-byte tile (m and z = 8) and the 320-byte
    one (m, centred on the zero weight −m/d = 8), 1–9, 16 and 33 rows, one digit and two."""
    import gguf

    raw = random_blocks("Q4_0", 48, 256, seed=2)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0).reshape(48, 256)
    blocks = from_gguf("Q4_0", raw, 256)
    packed = pack(blocks)
    assert packed.shape == (3, 8, TILE4Z)
    np.testing.assert_array_equal(unpack(packed), want)
    stored = Blocks(blocks.bits, blocks.block_size, blocks.codes, blocks.scales, None,
                    np.zeros_like(blocks.scales), blocks.origin, blocks.carried)  # fmt: skip
    wide = pack(stored)  # (an offset, zero, keeps m in the tile)
    assert wide.shape == (3, 8, TILE4M)
    with monkeypatch.context() as mp:  # the same blocks in the 336-byte tile (z = 8 stored)
        mp.setattr("export.quant.native._fp32_tile", lambda blocks, bits, wide: TILE)
        with_z = pack(blocks)
    assert with_z.shape == (3, 8, TILE)
    np.testing.assert_array_equal(unpack(wide), want)
    np.testing.assert_array_equal(unpack(with_z), want)
    rng = np.random.default_rng(4)
    for m in (*range(1, 10), 16, 33):
        a = 3 * rng.standard_normal((m, 256)).astype(np.float32)
        for digits, kept in ((1, 0), (2, 0), (2, 2)):
            y = matmul(packed, a, path, digits, kept)
            np.testing.assert_array_equal(y, matmul(wide, a, path, digits, kept))
            np.testing.assert_array_equal(y, matmul(with_z, a, path, digits, kept))


@pytest.mark.parametrize(
    "kind,size",
    [("Q5_0", TILE5Z), ("Q5_1", TILE5ZP), ("Q5_K", TILE5K), ("Q5_K-fp32", TILE5ZPF)],
)
def test_5bit_blocks_pack_exactly(kind, size):
    """Q5_1 (fp16 d and m, and z) in the 416-byte tiles, Q5_0 (m = −16·d, left to the kernel) in
    the 352-byte ones, Q5_K's d·scale and dmin·min factors (and z) in its super-block tiles, or
    where they do not factor, their products in the 464-byte ones: codes, fifth bits, d and m
    read back to the gguf dequantizer's weights, and the zero points to the code nearest each
    block's zero weight."""
    import gguf

    gguf_kind = kind.removesuffix("-fp32")
    raw = random_blocks(gguf_kind, 48, 512, seed=6)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[gguf_kind]).reshape(48, 512)
    blocks = from_gguf(gguf_kind, raw, 512) if kind == gguf_kind else BLOCKS[kind](48, 512, 6)
    want = want * (np.float32(1.0001) if kind != gguf_kind else 1)
    assert blocks.bits == 8 and supports(blocks)  # an 8-bit container, 5-bit codes
    packed = pack(blocks)
    assert packed.shape == (3, 16, size)
    np.testing.assert_allclose(unpack(packed), want, rtol=1e-6, atol=1e-7)
    q, d, m, z = fields(packed)
    np.testing.assert_array_equal(q, blocks.codes.reshape(48, 512))
    assert q.max() == 31  # (the fifth bits are there)
    if kind == "Q5_0":
        assert np.all(z == 16)
    else:  # the code nearest zero weight, which 16 is not for most blocks
        safe = np.where(d == 0, 1, d)
        np.testing.assert_array_equal(z, np.clip(np.rint(-m / safe), 0, 31).astype(np.uint8))
        assert np.mean(z != 16) > 0.5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,k,m", [(16, 32, 1), (48, 96, 3), (64, 576, 5), (960, 576, 1)])
@pytest.mark.parametrize(
    "kind",
    ["Q4_0", "Q4_1", "Q4-zp", "Q4_K", "Q4_K-fp32", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q6_K-fp32"],
)
def test_kernel_matches_numpy(n, k, m, path, kind):
    if "_K" in kind and k % 256:
        k = 256 * (k // 256 + 1)
    blocks = BLOCKS[kind](n, k, seed=n + k)
    packed = pack(blocks)
    a = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    y = matmul(packed, a, path)
    want = reference(a, packed)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    exact = a @ blocks.dequantize().T  # int8 activations: llama.cpp's Q4_1 error, no more
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 2e-2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind,tile", [("Q8_0", TILE8Z), ("Q8-zp", TILE8)])
def test_8bit_head_kernel_and_its_gather_match_numpy(path, kind, tile):
    """MatMulQ8 (the LM head) computes the centred codes times the rounded activations; GatherQ8
    (the tied embedding) returns the rows exactly. Q8_0's tile holds no z (128 for every block),
    other 8-bit blocks' holds each block's."""
    blocks = BLOCKS[kind](64, 96)
    packed = pack(blocks)
    assert packed.shape == (4, 3, tile)
    np.testing.assert_array_equal(unpack8(packed), blocks.dequantize())
    lib = native.library()
    a = np.random.default_rng(3).standard_normal((5, 96)).astype(np.float32)
    y = matmul(packed, a, path)
    want = rounded(a) @ unpack8(packed).T.astype(np.float64)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    ids = np.array([0, 63, 17, -1], np.int64)
    rows = np.zeros((4, 96), np.float32)
    assert (
        lib.llamaonnx_gather_q8(
            tile, packed.ctypes.data, 64, 96, ids.ctypes.data, 4, rows.ctypes.data
        )
        == 0
    )
    np.testing.assert_array_equal(rows, blocks.dequantize()[ids])
    bad = np.array([1, 64], np.int64)
    assert (
        lib.llamaonnx_gather_q8(
            tile, packed.ctypes.data, 64, 96, bad.ctypes.data, 2, rows.ctypes.data
        )
        == 2
    )


@pytest.mark.parametrize("kind,tile", [("Q6_K", TILE6K), ("Q6_K-fp32", TILE6)])
def test_gather_reads_q6_k_tiles_exactly(kind, tile):
    """A tied Q6_K head's tiles serve the embedding too: each row's halves s·(q − 32), as the
    blocks dequantize, from the super-block tile and from the fp32-scale one."""
    blocks = BLOCKS[kind](64, 512, seed=4)
    packed = pack(blocks)
    assert packed.shape == (4, 16, tile)
    ids = np.array([0, 63, 17, -1, 30], np.int64)
    rows = np.zeros((5, 512), np.float32)
    lib = native.library()
    assert lib.llamaonnx_gather_q8(tile, packed.ctypes.data, 64, 512, ids.ctypes.data, 5,
                                   rows.ctypes.data) == 0  # fmt: skip
    np.testing.assert_array_equal(rows, blocks.dequantize()[ids])


@pytest.mark.parametrize("kind", [k for k in EVERY_KIND if k != "Q5_1"])
def test_every_path_gives_the_same_answer(kind):
    """A folder answers the same on every CPU: the paths differ only in float summation order,
    and AVX-VNNI's one-instruction dot product and AVX2's pairwise one sum the same integers in
    the same order, so those two agree to the bit (where this CPU has both)."""
    n, k = 64, 512
    packed = pack(BLOCKS[kind](n, k, seed=5))
    a = np.random.default_rng(5).standard_normal((7, k)).astype(np.float32) * 3
    ys = {path: matmul(packed, a, path) for path in PATHS}
    top = np.abs(ys["portable"]).max()
    assert top > 1
    for path in PATHS:  # (summation order: an error of the summands' size, not the result's)
        np.testing.assert_allclose(ys[path], ys["portable"], rtol=1e-5, atol=2e-7 * top)
    if "avxvnni" in PATHS:
        np.testing.assert_array_equal(ys["avxvnni"], ys["avx2"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", EVERY_KIND)
def test_two_digits_match_numpy_and_float_activations(path, kind):
    """With two digits the kernel also rounds what each activation's int8 rounding left, at 1/F
    of its block's scale (F 16, 8 or 128 by the codes' width), and adds that product: numpy's
    model of it, and against the float product an error about F times below one digit's."""
    n, k = 64, 512
    blocks = BLOCKS[kind](n, k, seed=9)
    packed = pack(blocks)
    a = 3 * np.random.default_rng(9).standard_normal((5, k)).astype(np.float32)
    a[:, 7] *= 30  # an outlier: its blocks' scale is coarse for the rest
    one, two = matmul(packed, a, path), matmul(packed, a, path, digits=2)
    want = reference(a, packed, digits=2)
    np.testing.assert_allclose(two, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    exact = a.astype(np.float64) @ blocks.dequantize().T.astype(np.float64)
    f = second_digit(packed.shape[-1])
    assert np.linalg.norm(two - exact) < np.linalg.norm(one - exact) / (f / 2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("digits,blocks", [(1, 0), (2, 0), (2, 2)])
@pytest.mark.parametrize("m", [8, 16, 37])
@pytest.mark.parametrize("kind", EVERY_KIND)
def test_a_row_has_the_same_bits_alone_and_in_a_prompt(path, kind, m, digits, blocks):
    """A prompt's rows go through the tiles several at a time (AMX: 16 at a time on the tile
    unit, the rest 4 at a time), a decode step's row alone: the same integer sums and the same
    float work in the same order, so on every path a row's bits do not depend on what it is
    computed with; and the AMX path gives the AVX-512 path's bits. With two digits on a few
    blocks each row keeps its own (here they differ row to row), which a tile pass takes the
    union of."""
    n, k = 48, 512
    packed = pack(BLOCKS[kind](n, k, seed=m))
    rng = np.random.default_rng(m)
    a = 3 * rng.standard_normal((m, k)).astype(np.float32)
    a[:, 7] *= 30
    a[np.arange(m), rng.integers(32, k, m)] *= 20  # a second block of large scale, row by row
    kw = {"digits": digits, "blocks": blocks}
    together = matmul(packed, a, path, **kw)
    alone = np.concatenate([matmul(packed, a[i : i + 1], path, **kw) for i in range(m)])
    np.testing.assert_array_equal(together, alone)
    if path == "amx":
        np.testing.assert_array_equal(together, matmul(packed, a, "avx512", **kw))
    want = reference(a, packed, **kw)
    np.testing.assert_allclose(together, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["Q4_1", "Q5_K", "Q8_0", "Q8-zp", "Q6_K"])
def test_two_digits_on_a_few_blocks_match_numpy(path, kind):
    """`blocks` B: the second digit on each row's B blocks of largest scale only (the x86 kernels
    skip the others' dot products, the rest compute zeros): numpy's model of it, whose error
    falls from one digit's towards two's as B grows; B ≥ nb is every block, bit for bit."""
    n, k = 64, 512
    blocks = BLOCKS[kind](n, k, seed=11)
    packed = pack(blocks)
    rng = np.random.default_rng(11)
    a = rng.standard_normal((6, k)).astype(np.float32)
    a[:, 40] *= 40  # block 1's scale is the largest in every row,
    a[1, 300] *= 60  # and in row 1 block 9's larger still
    a[4, :] = np.repeat(rng.standard_normal(16), 32).astype(np.float32)  # equal scales in pairs
    exact = a.astype(np.float64) @ blocks.dequantize().T.astype(np.float64)
    err = {}
    for b in (0, 1, 2, 5):
        y = matmul(packed, a, path, digits=2, blocks=b)
        want = reference(a, packed, digits=2, blocks=b)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        err[b] = np.linalg.norm(y - exact)
    one = np.linalg.norm(matmul(packed, a, path) - exact)
    assert err[0] < err[5] < err[2] < err[1] < one
    np.testing.assert_array_equal(
        matmul(packed, a, path, digits=2, blocks=16), matmul(packed, a, path, digits=2)
    )


def test_blocks_keep_each_rows_largest_scales():
    """The kept blocks, by the model the tests hold the kernel to: the largest scales, the
    first of equals."""
    a = np.zeros((2, 4 * 32), np.float32)
    a[0, [5, 40, 70, 100]] = [1, 3, 2, 3]
    a[1, [0, 33]] = [-4, 4]
    np.testing.assert_array_equal(
        kept_blocks(a, 2), [[False, True, False, True], [True, True, False, False]]
    )
    np.testing.assert_array_equal(kept_blocks(a, 1), [[0, 1, 0, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize("path", PATHS)
def test_two_digits_give_a_row_the_same_bits_alone_or_among_others(path):
    """A row and its residual row are computed like any others: batching does not change them."""
    packed = pack(q4_1(64, 256, seed=2))
    a = np.random.default_rng(4).standard_normal((7, 256)).astype(np.float32)
    for blocks in (0, 2):
        together = matmul(packed, a, path, digits=2, blocks=blocks)
        for i in (0, 3, 6):
            alone = matmul(packed, a[i : i + 1], path, digits=2, blocks=blocks)
            np.testing.assert_array_equal(alone[0], together[i])


@pytest.mark.parametrize("path", PATHS)
def test_two_digit_nodes_in_onnxruntime_match_numpy(path):
    """The `digits` attribute on each op: MatMulQ4 and MatMulQ8 over a prompt's rows spread over
    the threads and at decode, SwiGLU on the summed gate and up rows, a folded norm's output
    rounded in two digits; any other value of it is refused when the session is made."""
    rng = np.random.default_rng(12)
    native.library()
    with native.use_path(path):
        for kind, blocks in product(("Q4_1", "Q8_0", "Q6_K"), (0, 3)):
            packed = pack(BLOCKS[kind](128, 256, seed=1))
            op = OP8 if kind != "Q4_1" else OP
            graph = _one_node(op, packed, 256, digits=2, **({"blocks": blocks} if blocks else {}))
            for threads in (1, 2):
                session = _load(graph, threads)
                for shape in [(1, 1), (2, 3), (1, 37)]:
                    a = 2 * rng.standard_normal((*shape, 256)).astype(np.float32)
                    want = reference(a.reshape(-1, 256), packed, 2, blocks).reshape(*shape, 128)
                    (y,) = session.run(None, {"a": a})
                    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
                    # the prompt's rows prepared in tasks over the threads (a pass's on AMX in
                    # one), the bits of the whole prompt prepared at once
                    one = matmul(packed, a.reshape(-1, 256), path, digits=2, blocks=blocks)
                    np.testing.assert_array_equal(y.reshape(-1, 128), one)
        gate_up = pack(q4_1(128, 96, seed=5))
        a = rng.standard_normal((2, 19, 96)).astype(np.float32)
        for blocks in (0, 1):
            graph = _one_node(SWIGLU, gate_up, 96, digits=2, blocks=blocks)
            both = reference(a, gate_up, 2, blocks).astype(np.float64)
            g, u = both[..., :64], both[..., 64:]
            want = g / (1 + np.exp(-g)) * u
            for threads in (1, 2):
                (h,) = _load(graph, threads).run(None, {"a": a})
                np.testing.assert_allclose(h, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        packed = pack(q4_1(64, 256, seed=3))
        normed = _norm_then(OP, packed, 256, True)
        normed.graph.node[0].attribute.append(helper.make_attribute("digits", 2))
        x, skip = (rng.standard_normal((1, 5, 256)).astype(np.float32) for _ in "xh")
        y, total = _run(normed, 2).run(None, {"x": x, "h": skip})
        r = (x + skip).astype(np.float64)
        n = (r / np.sqrt((r**2).mean(-1, keepdims=True) + 1e-5)) * np.linspace(0.5, 1.5, 256)
        want = reference(n.astype(np.float32).reshape(5, 256), packed, digits=2).reshape(y.shape)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        with pytest.raises(Exception, match="digits must be 1 or 2"):
            _load(_one_node(OP, packed, 256, dims=("b",), digits=3), 1).run(None, {"a": x[0]})
        with pytest.raises(Exception, match="blocks must be >= 0"):
            _load(_one_node(OP, packed, 256, dims=("b",), digits=2, blocks=-1), 1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind,top", [("Q5_1", 31), ("Q6_K", 63)])
def test_largest_codes_times_largest_activations(path, kind, top):
    """Every code at its largest (Q6_K: with every third 0) against activations that all round to
    ±127: the sums AVX2 builds in int16 — 4 products at a time for 5-bit codes, two pairs for
    6-bit ones (32004 at most) — would overflow if taken more at a time."""
    blocks = gguf_blocks(kind, 32, 256, seed=2)
    blocks.codes[:] = top
    if kind == "Q6_K":
        blocks.codes[:, ::3] = 0
    a = np.ones((3, 256), np.float32)
    a[1] = -1
    a[2, ::2] = -1
    y = matmul(pack(blocks), a, path)
    want = a.astype(np.float64) @ blocks.dequantize().T.astype(np.float64)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["Q8_0", "Q8-zp", "Q6_K", "Q6_K-fp32"])
def test_gather_op_in_onnxruntime_and_its_error(kind):
    """GatherQ8 returns the rows of any MatMulQ8 tile (8-bit, Q6_K's) exactly as its blocks."""
    blocks = BLOCKS[kind](32, 256)
    packed = pack(blocks)
    node = helper.make_node(GATHER8, ["b", "ids"], ["rows"], domain=DOMAIN)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(packed, "b")],
    )
    sess = _load(graph)
    ids = np.array([[1, 2, 31], [0, 0, 5]], np.int64)
    (rows,) = sess.run(None, {"ids": ids})
    np.testing.assert_array_equal(rows, blocks.dequantize()[ids])
    with pytest.raises(Exception, match="outside the vocabulary"):
        sess.run(None, {"ids": np.array([[32]], np.int64)})


def _run(model, threads: int | None = None) -> ort.InferenceSession:
    """A session of `model` with the kernel library registered (`threads`: None, onnxruntime's)."""
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(str(native.library_path()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _load(graph, threads: int = 2) -> ort.InferenceSession:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]
    )
    return _run(model, threads)


def _one_node(op: str, packed: np.ndarray, k: int, dims=("batch", "seq"), **attributes):
    """A graph of one of our nodes, y = op(a, b), B = `packed`, A [*dims, k]."""
    node = helper.make_node(op, ["a", "b"], ["y"], domain=DOMAIN, **attributes)
    return helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [*dims, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(packed, "b")],
    )


def _session(packed: np.ndarray, k: int, threads: int = 2) -> ort.InferenceSession:
    op = OP8 if packed.shape[2] in (TILE8, TILE8Z, TILE6, TILE6K) else OP
    return _load(_one_node(op, packed, k), threads)


# A process that runs a folder-like model (external data, which onnxruntime maps from its file):
# the head's MatMulQ8 first, then the tied embedding's GatherQ8 on the same initializer. It
# prints the bytes held in huge pages and how much of the data file is still resident.
_HELD = """
import sys, numpy as np, onnxruntime as ort
from runtime import native
opts = ort.SessionOptions()
opts.register_custom_ops_library(str(native.library_path()))
s = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
y, rows = s.run(None, {"a": np.load(sys.argv[2]), "ids": np.array([[0, 5, 32767]], np.int64)})
np.save(sys.argv[3], y), np.save(sys.argv[4], rows)
resident, inside = 0, False
for line in open("/proc/self/smaps"):
    if line[0] in "0123456789abcdef" and " " in line and "-" in line.split()[0]:
        inside = line.rstrip().endswith("m.data")
    elif inside and line.startswith("Rss:"):
        resident += int(line.split()[1]) * 1024
print(native.held_bytes(), resident)
"""


def test_weights_held_in_huge_pages_answer_the_same(tmp_path):
    """Where the kernel has transparent huge pages, a matmul node copies the weights onnxruntime
    maps from the folder's file into them at its first run and drops the file's own pages, so
    resident memory does not double. The tied
    embedding, which reads the same initializer after the head has copied it, still gets the
    right rows (they read back from the file). LLAMAONNX_HUGE_PAGES=0 holds nothing, and the
    answers are the same to the bit."""
    import os
    import subprocess
    import sys

    import onnx

    # 18 MB: a tensor onnxruntime maps rather than reads, and one that two of the page cache's
    # large folios (which a fault can map whole: up to 2 MB each) cannot fill a quarter of; at
    # 1.1 MB, 1 MB read as "resident" once in 13 runs (most likely one such folio behind the
    # gathered rows; not proven)
    blocks = q8_0(32768, 512)
    packed = pack(blocks)
    nodes = [
        helper.make_node(OP8, ["a", "b"], ["y"], domain=DOMAIN),
        helper.make_node(GATHER8, ["b", "ids"], ["rows"], domain=DOMAIN),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 512]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, None),
        ],
        [numpy_helper.from_array(packed, "b")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]
    )
    in_memory = _run(model)  # before saving, which moves the weights out to m.data
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data")
    a = np.random.default_rng(4).standard_normal((1, 512)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    runs = {}
    for held in ("default", "0"):
        env = {k: v for k, v in os.environ.items() if k != native.HUGE_PAGES_VARIABLE}
        if held == "0":
            env[native.HUGE_PAGES_VARIABLE] = "0"
        y, rows = tmp_path / f"y{held}.npy", tmp_path / f"rows{held}.npy"
        args = [sys.executable, "-c", _HELD, tmp_path / "m.onnx", tmp_path / "a.npy", y, rows]
        out = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        held_bytes, resident = map(int, out.stdout.split())
        runs[held] = np.load(y), np.load(rows), held_bytes, resident
    want = rounded(a) @ unpack8(packed).T.astype(np.float64)
    for y, rows, _, _ in runs.values():
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        np.testing.assert_array_equal(rows, blocks.dequantize()[[[0, 5, 32767]]])
    np.testing.assert_array_equal(runs["default"][0], runs["0"][0])
    # an initializer onnxruntime holds in its own memory, not a file's, is read in place
    before = native.held_bytes()
    y, rows = in_memory.run(None, {"a": a, "ids": np.array([[0, 5, 32767]], np.int64)})
    assert native.held_bytes() == before
    np.testing.assert_array_equal(y, runs["0"][0])
    np.testing.assert_array_equal(rows, runs["0"][1])
    assert runs["0"][2] == 0 and runs["0"][3] >= packed.nbytes  # read in place, all resident
    if native.huge_pages_possible():
        assert runs["default"][2] == packed.nbytes
        assert runs["default"][3] < packed.nbytes // 4  # only the gathered rows came back
    else:
        assert runs["default"][2] == 0


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (1, 130)])
def test_onnxruntime_op_matches_numpy_across_threads(shape):
    a = np.random.default_rng(7).standard_normal((*shape, 256)).astype(np.float32)
    head = pack(q8_0(512, 256))
    want8 = rounded(a) @ unpack8(head).T.astype(np.float64)
    for threads in (1, 2):
        (y,) = _session(head, 256, threads).run(None, {"a": a})
        np.testing.assert_allclose(y, want8, rtol=1e-4, atol=1e-4 * np.abs(want8).max())
        for kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_K", "Q6_K", "Q8-zp"):
            packed = pack(BLOCKS[kind](1024, 256))
            want = reference(a, packed)
            (y,) = _session(packed, 256, threads).run(None, {"a": a})
            assert y.shape == (*shape, 1024)
            np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_weights_fed_as_an_input_are_read_on_every_call():
    """A kernel reads a constant initializer's weights once, when it is created; weights that
    are a graph input instead (not constant) are read on every call: two runs with different
    weights give each their own product, equal to the initializer form's."""
    a = np.random.default_rng(3).standard_normal((1, 1, 256)).astype(np.float32)
    first, second = (pack(BLOCKS["Q4_1"](512, 256, seed=s)) for s in (1, 2))
    node = helper.make_node(OP, ["a", "b"], ["y"], domain=DOMAIN)
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "g",
        [info("a", TensorProto.FLOAT, [1, 1, 256]), info("b", TensorProto.UINT8, first.shape)],
        [info("y", TensorProto.FLOAT, None)],
    )
    fed = _load(graph)
    for packed in (first, second, first):
        (y,) = fed.run(None, {"a": a, "b": packed})
        (want,) = _session(packed, 256).run(None, {"a": a})
        np.testing.assert_array_equal(y, want)
    assert not np.array_equal(reference(a, first), reference(a, second))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [1.0, 60.0])  # 60: gates far past exp's range either way
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q8-zp", "Q6_K", "Q6_K-fp32"])
def test_swiglu_op_is_silu_of_the_gate_times_the_up_rows(path, scale, kind):
    """MatMulQ4SwiGLU on 4-bit tiles, MatMulQ8SwiGLU on 8-bit and Q6_K ones (both of Q6_K's)."""
    k = 256 if kind.startswith("Q6_K") else 96
    gate_up = BLOCKS[kind](128, k, seed=5)  # 64 gate rows, then 64 up rows
    packed = pack(gate_up)
    op = SWIGLU8 if op_for(gate_up) == OP8 else SWIGLU
    assert op == (SWIGLU if kind == "Q4_1" else SWIGLU8)
    graph = _one_node(op, packed, k)
    a = (scale * np.random.default_rng(9).standard_normal((2, 5, k))).astype(np.float32)
    both = reference(a, packed)
    g, u = both[..., :64].astype(np.float64), both[..., 64:]
    with np.errstate(over="ignore"):
        want = g / (1 + np.exp(-g)) * u
    assert scale == 1 or np.abs(g).max() > 90
    native.library()
    with native.use_path(path):
        for threads in (1, 2):
            (h,) = _load(graph, threads).run(None, {"a": a})
            assert h.shape == (2, 5, 64)
            np.testing.assert_allclose(h, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _norm_then(op: str, packed: np.ndarray, k: int, folded: bool, eps: float = 1e-5):
    """onnxruntime's SkipSimplifiedLayerNormalization and projection `op` (two nodes), or the one
    node export/quant/norm.py folds them into; outputs y and the residual sum x + h."""
    w = numpy_helper.from_array(np.linspace(0.5, 1.5, k, dtype=np.float32), "w")
    if folded:
        nodes = [
            helper.make_node(op, ["x", "b", "w", "h"], ["y", "sum"], domain=DOMAIN, epsilon=eps)
        ]
    else:
        nodes = [
            helper.make_node(
                "SkipSimplifiedLayerNormalization",
                ["x", "h", "w"],
                ["normed", "", "", "sum"],
                domain="com.microsoft",
                epsilon=eps,
            ),
            helper.make_node(op, ["normed", "b"], ["y"], domain=DOMAIN),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["batch", "seq", k]) for v in "xh"],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in ("y", "sum")],
        [numpy_helper.from_array(packed, "b"), w],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 21),
            helper.make_opsetid(DOMAIN, 1),
            helper.make_opsetid("com.microsoft", 1),
        ],
    )
    return model


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "kind", ["Q4_1", "Q4_K", "Q8_0", "Q5_1", "Q6_K", "SwiGLU", "SwiGLU5", "SwiGLU8", "SwiGLU6"]
)
def test_a_folded_norm_gives_onnxruntimes_skip_norm_to_the_bit(path, kind):
    """The norm a projection folds in computes onnxruntime's SkipSimplifiedLayerNormalization in
    its own float order: the folded graph's output and residual sum equal the two-node graph's
    exactly, at decode (one row) and for a prompt (rows spread over the threads)."""
    swiglu = {"SwiGLU": "Q4_1", "SwiGLU5": "Q5_0", "SwiGLU8": "Q8_0", "SwiGLU6": "Q6_K"}
    blocks = BLOCKS[swiglu.get(kind, kind)](128, 256, seed=3)
    op = {"Q8_0": OP8, "Q6_K": OP8, "SwiGLU": SWIGLU, "SwiGLU5": SWIGLU, "SwiGLU8": SWIGLU8,
          "SwiGLU6": SWIGLU8}.get(kind, OP)  # fmt: skip
    packed = pack(blocks)
    rng = np.random.default_rng(11)
    native.library()
    with native.use_path(path):
        for threads in (1, 2):
            two, one = (_run(_norm_then(op, packed, 256, f), threads) for f in (False, True))
            # 1 row, 8 (a block of the x86 form's transposed sums), 9, 10, 16 and 37 rows
            for shape in [(1, 1), (1, 8), (3, 3), (2, 5), (2, 8), (1, 37)]:
                x, h = (3 * rng.standard_normal((*shape, 256)).astype(np.float32) for _ in "xh")
                want = two.run(None, {"x": x, "h": h})
                got = one.run(None, {"x": x, "h": h})
                assert got[0].shape == want[0].shape and got[1].shape == x.shape
                np.testing.assert_array_equal(got[1], want[1])
                np.testing.assert_array_equal(got[0], want[0])


def test_a_norm_without_skip_and_bad_norm_inputs():
    """op(A, B, gamma) normalises A alone: what a zero skip gives, to the bit. A skip without
    gamma, a gamma of the wrong width or a gamma without epsilon are clear errors."""
    packed = pack(q4_1(64, 96, seed=4))
    x = np.random.default_rng(2).standard_normal((1, 3, 96)).astype(np.float32)
    with_skip = _run(_norm_then(OP, packed, 96, True), 2)
    want = with_skip.run(None, {"x": x, "h": np.zeros_like(x)})[0]
    alone = _norm_then(OP, packed, 96, True)
    del alone.graph.node[0].input[3], alone.graph.node[0].output[1], alone.graph.output[1]
    del alone.graph.input[1]
    np.testing.assert_array_equal(_run(alone, 2).run(None, {"x": x})[0], want)

    def broken(edit) -> ort.InferenceSession:
        model = _norm_then(OP, packed, 96, True)
        edit(model.graph)
        return _run(model, 1)

    def no_gamma(g):
        g.node[0].input[2] = ""

    def short_gamma(g):
        g.initializer[1].CopyFrom(numpy_helper.from_array(np.ones(32, np.float32), "w"))

    def no_epsilon(g):
        del g.node[0].attribute[:]

    for edit, says in [
        (no_gamma, "needs the norm weight"),
        (short_gamma, "must be \\[K\\]"),
        (no_epsilon, "epsilon attribute"),
    ]:
        with pytest.raises(Exception, match=says):
            broken(edit).run(None, {"x": x, "h": x})


def test_wrong_inputs_get_clear_errors():
    packed = pack(q4_1(32, 64))
    sess = _session(packed[:, :1], 64)  # B says K = 32, the graph says 64
    with pytest.raises(Exception, match="K = 32"):
        sess.run(None, {"a": np.zeros((1, 1, 64), np.float32)})
    with pytest.raises(QuantizationError, match="blocks of 32"):
        pack(quantize(np.zeros((32, 64), np.float32), 4, 64, False))
    assert not supports(quantize(np.zeros((24, 64), np.float32), 4, 32, False))  # N % 16
    # each SwiGLU op takes its own matmul's tiles, and gate and up rows in equal numbers
    eight = pack(q8_0(32, 64))
    for op, b, message in ((SWIGLU8, packed, "MatMulQ8: B must be"),
                           (SWIGLU, eight, "MatMulQ4: B must be"),
                           (SWIGLU8, eight[:1], "as many up rows as gate rows")):  # fmt: skip
        with pytest.raises(Exception, match=message):
            _load(_one_node(op, b, 64), 1).run(None, {"a": np.zeros((1, 1, 64), np.float32)})
    # a size of no tile of ours, though an odd multiple of 8 bytes as the super-block slots are
    odd = np.zeros((2, 8, 40), np.uint8)
    for op in (OP, OP8):
        with pytest.raises(Exception, match=f"{op}: B must be"):
            _load(_one_node(op, odd, 256), 1).run(None, {"a": np.zeros((1, 1, 256), np.float32)})


def test_missing_library_says_how_to_build_it(monkeypatch, tmp_path):
    from runtime.errors import ModelFolderError

    monkeypatch.setattr(native, "HERE", tmp_path)
    with pytest.raises(ModelFolderError, match="pip install -e"):
        native.library_path()
    assert not native.available()


def test_the_kernel_path_is_the_best_this_cpu_has_unless_one_is_named(monkeypatch):
    """Not a speed test: which path runs is chosen on the running machine; the variable names
    another (tests and the benchmark), and a bad name is a clear error."""
    assert "portable" in PATHS and native.path() == PATHS[-1]
    monkeypatch.setenv(native.PATH_VARIABLE, "portable")
    assert native.path() == PATHS[-1]  # (the library read its variable when it first ran)
    monkeypatch.setenv(native.PATH_VARIABLE, "sse9")
    with pytest.raises(OptionError, match="not a kernel path; choose from"):
        native.path()
    missing = [p for p in native.PATHS if p not in PATHS]
    for name in missing:  # (none on an AVX-512 VNNI machine)
        monkeypatch.setenv(native.PATH_VARIABLE, name)
        with pytest.raises(OptionError, match="cannot run"):
            native.path()
        with pytest.raises(OptionError, match="cannot run"):
            with native.use_path(name):
                pass
    monkeypatch.delenv(native.PATH_VARIABLE)
    with native.use_path("portable"):  # a block inside another leaves the outer one's path
        with native.use_path(PATHS[-1]):
            assert native.path() == PATHS[-1]
        assert native.path() == "portable"
    assert native.path() == PATHS[-1]


@pytest.mark.parametrize("name", PATHS)
def test_the_variable_forces_a_path_in_a_new_process(name):
    import os
    import subprocess
    import sys

    env = {**os.environ, native.PATH_VARIABLE: name}
    code = "from runtime import native; print(native.path())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == name, out.stderr


_SHAPES = """
import sys
from runtime.generator import GenerationConfig, Generator
from runtime.session import Session
g = Generator(Session(sys.argv[1], provider="cpu", threads=2))
prompts = [[1, 9690, 28, 2, 1270, 314, 253, 2036, 30], [1, 2, 3, 4, 5]]
print(g.generate_ids(prompts, GenerationConfig(max_new_tokens=12, stop_token_ids=())))
"""


def test_shapes_read_by_reference_and_by_copy_give_the_same_tokens(default_int4):
    """Where onnxruntime lends a tensor's shape by reference (1.24 and later) the kernels read it
    so; LLAMAONNX_SHAPES_BY_COPY=1 reads it as an older onnxruntime must. A two-prompt batch of
    the default model decodes the same tokens either way (prefill and decode, every op)."""
    import os
    import subprocess
    import sys

    runs = []
    for by_copy in ("0", "1"):
        env = {**os.environ, "LLAMAONNX_SHAPES_BY_COPY": by_copy}
        out = subprocess.run([sys.executable, "-c", _SHAPES, str(default_int4)], env=env,
                             capture_output=True, text=True, check=False)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(out.stdout.strip())
    assert runs[0] == runs[1] and runs[0].count(",") >= 23, runs


# -- attention -------------------------------------------------------------------------------------
H, HKV, D, LEN = 6, 2, 64, 64


def _gqa(ours: bool, qkv, key, value, seqlens, total, tables, heads=(H, HKV)):
    """One attention node — onnxruntime's GroupQueryAttention or ours — run on a shared cache
    buffer as the runtime binds it; returns the output and the cache after."""
    cos, sin = tables
    if ours:
        inputs = ["qkv", "pk", "pv", "sl", "tot", "cos", "sin"]
        attrs = {"domain": DOMAIN}
    else:
        inputs = ["qkv", "", "", "pk", "pv", "sl", "tot", "cos", "sin"]
        attrs = {"domain": "com.microsoft", "do_rotary": 1, "rotary_interleaved": 0}
    node = helper.make_node(
        ATTENTION, inputs, ["o", "k", "v"], num_heads=heads[0], kv_num_heads=heads[1],
        scale=0.125, **attrs
    )  # fmt: skip
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "g",
        [
            info("qkv", TensorProto.FLOAT, list(qkv.shape)),
            info("pk", helper.np_dtype_to_tensor_dtype(key.dtype), list(key.shape)),
            info("pv", helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)),
            info("sl", TensorProto.INT32, [len(seqlens)]),
            info("tot", TensorProto.INT32, []),
        ],
        [
            info("o", TensorProto.FLOAT, None),
            *(info(n, helper.np_dtype_to_tensor_dtype(key.dtype), None) for n in "kv"),
        ],
        [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 21),
            helper.make_opsetid("com.microsoft", 1),
            helper.make_opsetid(DOMAIN, 1),
        ],
    )
    sess = _run(model)
    key, value = key.copy(), value.copy()  # bound as past and present: written in place
    k, v = ort.OrtValue.ortvalue_from_numpy(key), ort.OrtValue.ortvalue_from_numpy(value)
    b = sess.io_binding()
    b.bind_cpu_input("qkv", qkv)
    b.bind_ortvalue_input("pk", k)
    b.bind_ortvalue_input("pv", v)
    b.bind_cpu_input("sl", np.asarray(seqlens, np.int32))
    b.bind_cpu_input("tot", np.array(total, np.int32))
    b.bind_output("o", "cpu")
    b.bind_ortvalue_output("k", k)
    b.bind_ortvalue_output("v", v)
    sess.run_with_iobinding(b)
    return b.get_outputs()[0].numpy(), key, value


def _tables(length: int, d: int = D) -> tuple[np.ndarray, np.ndarray]:
    pos = np.arange(length)[:, None] * 10000.0 ** (-np.arange(d // 2) / (d // 2))[None]
    return np.cos(pos).astype(np.float32), np.sin(pos).astype(np.float32)


# prompts within one chunk of keys, and over three (tiles.h: ATTN_CHUNK = 128), where a decode
# step shares the chunks out over the threads and merges them after; the cache in fp32, or in
# fp16 (llama.cpp's default): onnxruntime's kernel on an fp32 cache is the reference for both
@pytest.mark.parametrize("kv", [np.float32, np.float16])
@pytest.mark.parametrize("n", [37, 300])
@pytest.mark.parametrize("path", PATHS)
def test_attention_matches_onnxruntime_group_query_attention(path, n, kv):
    """A padded two-row prompt, a decode step, then a second chunk of three tokens: the same
    outputs and cache as onnxruntime's kernel (on the rows' real tokens)."""
    length, short = n + 27, n // 2 + 2  # the cache; row 1's real tokens
    tables = _tables(length)
    width = (H + 2 * HKV) * D
    native.library()
    with native.use_path(path):
        both = {}
        for ours in (False, True):
            cache = np.zeros((2, HKV, length, D), kv if ours else np.float32)
            prompt = np.random.default_rng(1).standard_normal((2, n, width)).astype(np.float32)
            o1, k, v = _gqa(ours, prompt, cache, cache, [n - 1, short - 1], n, tables)
            step = np.random.default_rng(2).standard_normal((2, 1, width)).astype(np.float32)
            o2, k, v = _gqa(ours, step, k, v, [n, short], n + 1, tables)
            chunk = np.random.default_rng(3).standard_normal((1, 3, width)).astype(np.float32)
            o3, k3, _ = _gqa(ours, chunk, k[:1], v[:1], [n + 3], n + 4, tables)
            both[ours] = (o1, o2, o3, k, v, k3)
    (a1, a2, a3, ak, av, ak3), (b1, b2, b3, bk, bv, bk3) = both[False], both[True]
    if kv == np.float32:
        close = cached = dict(rtol=1e-5, atol=2e-6)
    else:  # keys and values rounded to fp16 (11 significant bits; subnormals below 2^-14)
        close, cached = dict(rtol=0, atol=4e-3), dict(rtol=2**-10, atol=2**-24)
        assert bk.dtype == np.float16
    np.testing.assert_allclose(b1[0], a1[0], **close)
    np.testing.assert_allclose(b1[1, :short], a1[1, :short], **close)
    np.testing.assert_allclose(b2, a2, **close)
    np.testing.assert_allclose(b3, a3, **close)
    np.testing.assert_allclose(bk[0, :, : n + 1], ak[0, :, : n + 1], **cached)
    np.testing.assert_allclose(bv[1, :, : short + 1], av[1, :, : short + 1], **cached)
    np.testing.assert_allclose(bk3[0, :, : n + 4], ak3[0, :, : n + 4], **cached)


# the AVX-512 kernel takes up to three query heads of a group at a time (four: two and two)
# and 64 columns of the values at a time: groups of 1, 2, 4 and 5, head sizes with a tail; a
# prompt's block holds groups of up to 8 heads (12: one query at a time, as the other paths)
@pytest.mark.parametrize("kv", [np.float32, np.float16])
@pytest.mark.parametrize(
    "heads, d", [((4, 4), 64), ((6, 3), 32), ((8, 2), 64), ((10, 2), 80), ((12, 1), 64)]
)
@pytest.mark.parametrize("path", PATHS)
def test_attention_of_other_groups_and_head_sizes(path, heads, d, kv):
    """A 300-token prompt on two rows, then a decode step over its three chunks of keys: the
    same outputs as onnxruntime's kernel."""
    n, length, width = 300, 310, (heads[0] + 2 * heads[1]) * d
    tables = _tables(length, d)
    rng = np.random.default_rng(5)
    prompt = rng.standard_normal((2, n, width)).astype(np.float32)
    step = rng.standard_normal((2, 1, width)).astype(np.float32)
    native.library()
    with native.use_path(path):
        out = {}
        for ours in (False, True):
            cache = np.zeros((2, heads[1], length, d), kv if ours else np.float32)
            o1, k, v = _gqa(ours, prompt, cache, cache, [n - 1, n - 1], n, tables, heads)
            o2, _, _ = _gqa(ours, step, k, v, [n, n], n + 1, tables, heads)
            out[ours] = o1, o2
    close = dict(rtol=1e-5, atol=2e-6) if kv == np.float32 else dict(rtol=0, atol=4e-3)
    for theirs, mine in zip(out[False], out[True], strict=True):
        np.testing.assert_allclose(mine, theirs, **close)


def test_every_path_rounds_the_fp16_cache_alike():
    """The portable path rounds new keys and values to fp16 in C, the x86 paths with F16C's
    vcvtps2ph: the same halves, ties to even, subnormals and overflow included."""
    width, n = (H + 2 * HKV) * D, 4
    special = np.array(
        [1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 2**-20, 3 * 2**-25, 2**-25, 65519.0,
         65520.0, 70000.0, -70000.0, 2**-14 - 2**-25, 0.0, -0.0, 1e-9, 1 / 3, 2048 + 1],
        np.float32,
    )  # fmt: skip
    qkv = np.random.default_rng(6).standard_normal((1, n, width)).astype(np.float32)
    at = (H + HKV) * D  # token t's first values (kv head 0)
    qkv[0, 0, at : at + special.size] = special
    qkv[0, 1, at : at + special.size] = special * 1.5
    tables = _tables(n + 2)
    caches = {}
    native.library()
    for path in PATHS:
        with native.use_path(path):
            cache = np.zeros((1, HKV, n + 2, D), np.float16)
            _, k, v = _gqa(True, qkv, cache, cache, [n - 1], n, tables)
            caches[path] = k.view(np.uint16), v.view(np.uint16)
    first = caches[PATHS[0]]
    with np.errstate(over="ignore"):  # numpy rounds the same way too
        np.testing.assert_array_equal(first[1][0, 0, 0, : special.size],
                                      special.astype(np.float16).view(np.uint16))  # fmt: skip
    for path in PATHS[1:]:
        np.testing.assert_array_equal(caches[path][0], first[0], err_msg=path)
        np.testing.assert_array_equal(caches[path][1], first[1], err_msg=path)


@pytest.mark.parametrize("kv", [np.float32, np.float16])
@pytest.mark.parametrize("n, cuts", [(70, (29,)), (300, (29, 170))])
@pytest.mark.parametrize("heads, d", [((H, HKV), D), ((8, 2), 80)])
@pytest.mark.parametrize("path", PATHS)
def test_attention_gives_a_position_the_same_result_in_any_chunk(path, n, cuts, kv, heads, d):
    """A prompt prefilled whole, in pieces, and its last 40 tokens one by one: each position's
    output is the same to the bit (a position's keys are taken in the same chunks, each chunk's
    scores, softmax and sums in one fixed order, the chunks merged in order, whether a decode
    step spreads them over the threads or a prompt's queries run them in turn), so chunked
    prefill and batching cannot change a request's tokens through attention."""
    length = n + 26
    tables = _tables(length, d)
    qkv = np.random.default_rng(4).standard_normal((1, n, (heads[0] + 2 * heads[1]) * d))
    qkv = qkv.astype(np.float32)
    native.library()
    with native.use_path(path):
        cache = np.zeros((1, heads[1], length, d), kv)
        whole, _, _ = _gqa(True, qkv, cache, cache, [n - 1], n, tables, heads)
        pieces, k, v = [], cache, cache
        for lo, hi in zip((0, *cuts), (*cuts, n), strict=True):
            o, k, v = _gqa(True, qkv[:, lo:hi], k, v, [hi - 1], hi, tables, heads)
            pieces.append(o)
        start = n - 40
        first, k, v = _gqa(True, qkv[:, :start], cache, cache, [start - 1], start, tables, heads)
        steps = [first]
        for t in range(start, n):
            o, k, v = _gqa(True, qkv[:, t : t + 1], k, v, [t], t + 1, tables, heads)
            steps.append(o)
    np.testing.assert_array_equal(np.concatenate(pieces, 1), whole)
    np.testing.assert_array_equal(np.concatenate(steps, 1), whole)
