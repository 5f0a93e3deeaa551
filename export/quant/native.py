"""Blocks packed for llamaonnx's own CPU kernel, `ai.llamaonnx.MatMulQ4` (runtime/native/q4ops.c).

The kernel reads W[n, b·32 + j] = d[n, b]·q[n, b, j] + m[n, b] — GGUF's Q4_1 as it is, and any
4-bit `Blocks` with m = offsets − d·zero_point — from tiles of 16 rows × one 32-wide block: 256
bytes of codes laid out for AVX-512 VNNI's dot product, then the 16 rows' d and m as fp16 (Q4_1's
own precision: exact for GGUF blocks) and their zero points z (the kernel centres the codes on z
to keep the int8 activations' error small). The layout is documented in q4ops.c.
"""

from __future__ import annotations

import numpy as np

from export.errors import QuantizationError
from export.quant.blocks import Blocks
from runtime.native import DOMAIN as DOMAIN  # the domain the runtime registers the library for

ROWS, BLOCK, TILE, TILE8 = 16, 32, 336, 560
OP, OP8, GATHER8 = "MatMulQ4", "MatMulQ8", "GatherQ8"
SWIGLU = "MatMulQ4SwiGLU"  # silu(gate)·up of a fused gate/up MatMulQ4
ATTENTION = "GroupQueryAttention"  # com.microsoft's, for packed QKV + rotary + a shared cache


def supports(blocks: Blocks) -> bool:
    """Whether MatMulQ4 (4-bit, offsets allowed) or MatMulQ8 (8-bit, no offsets) holds them."""
    n, k = blocks.shape
    return (
        (blocks.bits == 4 or (blocks.bits == 8 and blocks.offsets is None))
        and blocks.block_size == BLOCK
        and n % ROWS == 0
        and k % BLOCK == 0
    )


def op_for(blocks: Blocks) -> str:
    return OP if blocks.bits == 4 else OP8


def scale_min_zero(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d, m [N, nb] float32 (W = d·q + m) and the zero points z [N, nb] uint8."""
    zp = blocks.zero_points if blocks.zero_points is not None else 1 << (blocks.bits - 1)
    zp = np.broadcast_to(zp, blocks.scales.shape).astype(np.uint8)
    m = -blocks.scales * zp.astype(np.float32)
    if blocks.offsets is not None:
        m = m + blocks.offsets
    return blocks.scales.astype(np.float32), m.astype(np.float32), zp


def pack(blocks: Blocks) -> np.ndarray:
    """The kernel's B: uint8 [N/16, K/32, 336] for 4-bit blocks, [N/16, K/32, 560] for 8-bit."""
    if not supports(blocks):
        n, k = blocks.shape
        raise QuantizationError(
            f"MatMulQ4/Q8 take 4-bit (or offset-free 8-bit) blocks of {BLOCK} with N a multiple "
            f"of {ROWS}; got {blocks.bits}-bit blocks of {blocks.block_size}, N={n}, K={k}"
        )
    n, nb, _ = blocks.codes.shape
    if blocks.bits == 8:
        return _pack8(blocks)
    q = blocks.codes.reshape(n // ROWS, ROWS, nb, 4, 2, 4)  # g, r, b, v, half, i
    q = q.transpose(0, 2, 3, 1, 5, 4)  # g, b, v, r, i, half
    codes = (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8).reshape(n // ROWS, nb, 256)
    d, m, z = scale_min_zero(blocks)

    def halves(x: np.ndarray) -> np.ndarray:
        h = x.astype(np.float16).reshape(n // ROWS, ROWS, nb).transpose(0, 2, 1)
        return np.ascontiguousarray(h).view(np.uint8).reshape(n // ROWS, nb, 2 * ROWS)

    zeros = z.reshape(n // ROWS, ROWS, nb).transpose(0, 2, 1)
    return np.ascontiguousarray(np.concatenate([codes, halves(d), halves(m), zeros], axis=2))


def _pack8(blocks: Blocks) -> np.ndarray:
    n, nb, _ = blocks.codes.shape
    c = blocks.codes.reshape(n // ROWS, ROWS, nb, 8, 4).transpose(0, 2, 3, 1, 4)  # g, b, v, r, i
    zp = blocks.zero_points if blocks.zero_points is not None else 128
    z = np.broadcast_to(zp, blocks.scales.shape).astype(np.uint8)
    d = blocks.scales.astype(np.float16).reshape(n // ROWS, ROWS, nb).transpose(0, 2, 1)
    parts = [
        c.reshape(n // ROWS, nb, 512),
        np.ascontiguousarray(d).view(np.uint8),
        z.reshape(n // ROWS, ROWS, nb).transpose(0, 2, 1),
    ]
    return np.ascontiguousarray(np.concatenate(parts, axis=2))


def unpack8(packed: np.ndarray) -> np.ndarray:
    """W [N, K] float32 from a packed MatMulQ8 B (for tests)."""
    g, nb, _ = packed.shape
    c = packed[..., :512].reshape(g, nb, 8, ROWS, 4).transpose(0, 3, 1, 2, 4)  # g, r, b, v, i
    c = c.reshape(g * ROWS, nb, BLOCK).astype(np.float32)
    d = np.ascontiguousarray(packed[..., 512:544]).view(np.float16).astype(np.float32)
    d = d.reshape(g, nb, ROWS).transpose(0, 2, 1).reshape(g * ROWS, nb, 1)
    z = packed[..., 544:560].reshape(g, nb, ROWS).transpose(0, 2, 1).reshape(g * ROWS, nb, 1)
    return (d * (c - z.astype(np.float32))).reshape(g * ROWS, nb * BLOCK)


def fields(packed: np.ndarray) -> tuple[np.ndarray, ...]:
    """codes q [N, K], d, m [N, nb] float32 and z [N, nb] from a packed B (for tests)."""
    g, nb, _ = packed.shape
    codes = packed[..., :256].reshape(g, nb, 4, ROWS, 4)  # g, b, v, r, i
    q = np.stack([codes & 15, codes >> 4], axis=-1)  # g, b, v, r, i, half
    q = q.transpose(0, 3, 1, 2, 5, 4).reshape(g * ROWS, nb * BLOCK)

    def per_row(lo: int, width: int, dtype) -> np.ndarray:
        x = np.ascontiguousarray(packed[..., lo : lo + width]).view(dtype)
        return x.reshape(g, nb, ROWS).transpose(0, 2, 1).reshape(g * ROWS, nb)

    d = per_row(256, 2 * ROWS, np.float16).astype(np.float32)
    m = per_row(288, 2 * ROWS, np.float16).astype(np.float32)
    return q, d, m, per_row(320, ROWS, np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    """W [N, K] float32 from a packed B: what the kernel multiplies by (for tests)."""
    q, d, m, _ = fields(packed)
    return np.repeat(d, BLOCK, axis=1) * q + np.repeat(m, BLOCK, axis=1)
