"""Blocks packed for llamaonnx's own CPU kernel, `ai.llamaonnx.MatMulQ4` (runtime/native/).

The kernel reads W[n, b·32 + j] = d[n, b]·q[n, b, j] + m[n, b] — GGUF's Q4_1 as it is, and any
4-bit `Blocks` with m = offsets − d·zero_point — from tiles of 16 rows × one 32-wide block: 256
bytes of codes laid out for AVX-512 VNNI's dot product, then the 16 rows' d and m as fp16 (Q4_1's
own precision: exact for GGUF blocks) and their zero points z (the kernel centres the codes on z
to keep the int8 activations' error small). The layout is documented in runtime/native/tiles.h;
the constants below are its shape, and `pack` checks them against the built library's
(`llamaonnx_layout`) before it writes a tile, so the two can never drift apart silently.
"""

from __future__ import annotations

import functools

import numpy as np

from export.errors import QuantizationError
from export.quant.blocks import Blocks
from runtime.native import DOMAIN as DOMAIN  # the domain the runtime registers the library for

ROWS, BLOCK, TILE, TILE8 = 16, 32, 336, 560  # rows a tile, block width, bytes of a 4 / 8-bit tile
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
    _check_layout()
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


@functools.cache
def _check_layout() -> None:
    from runtime import native

    built = native.layout()
    ours = {"rows": ROWS, "block": BLOCK, "tile": TILE, "tile8": TILE8}
    if built != ours:
        raise QuantizationError(
            f"the kernel library was built with the tile layout {built}, this packer writes "
            f"{ours}: reinstall llamaonnx (pip install -e .) so both come from one version"
        )
