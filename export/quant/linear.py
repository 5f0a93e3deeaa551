"""Rewrite: a projection's MatMul (x @ Wᵀ) → the op that reads its quantized blocks.

    x ─ MatMul(Wᵀ) ─ y   →   x ─ MatMulQ4 / MatMulQ8 (tiles) ─ y               (native kernels)
                         →   x ─ MatMulNBits(codes, scales[, zero points]) ─ y  (onnxruntime)
                         →   x ─ Concat(x, block sums of x) ─ MatMulNBits ─ y   (Q4_1 offsets)

llamaonnx's kernels (`native`) read Q4_0 / Q4_1 / Q8_0 blocks of 32 as they are. MatMulNBits
cannot hold Q4_1's offsets `m`, so they ride along as extra rows of the same op, read against
the input's block sums (blocks.offset_rows); the sums of one input are built once and serve
every projection that reads it.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from export.passes.graph import MS
from export.quant.blocks import FINE, Blocks, held_offsets, offset_rows, sum_repeats
from export.quant.graph import Edit
from export.quant.native import op_for, pack, supports, tile_node


class LinearWriter:
    """Writes the nodes of quantized projections into an `Edit`. `k_multiple`: inputs widened
    by block sums are kept a multiple of it (8 for CUDA, see `sum_repeats`)."""

    def __init__(self, edit: Edit, accuracy_level: int, k_multiple: int, native: bool):
        self.edit, self.accuracy_level = edit, accuracy_level
        self.k_multiple, self.native = k_multiple, native
        self._block_sums: dict[tuple[str, int], str] = {}  # (input, block size) → its sums
        # the largest |Δ| between an offset and what the offset rows hold of it, in an fp32
        # graph and in one converted to fp16 afterwards (None: no offset rows written)
        self.offset_error: dict[str, float] | None = None

    def write(
        self, nodes_out: list, x: str, blocks: Blocks, out: str, name: str, prefix: str
    ) -> None:
        """The op computing out = x @ dequantize(blocks)ᵀ, appended to `nodes_out`."""
        init = self.edit.init
        n_out, k = blocks.shape
        if self.native and supports(blocks):
            op = op_for(blocks)
            tiles = init(f"{prefix}.tiles", pack(blocks))
            nodes_out.append(tile_node(op, [x, tiles], [out], name=f"{name}/{op}"))
            return
        if blocks.offsets is not None:
            errors = self.offset_error or {"float32": 0.0, "float16": 0.0}
            for kind in errors:
                held = held_offsets(blocks.offsets, float16=kind == "float16")
                errors[kind] = max(errors[kind], float(np.abs(held - blocks.offsets).max()))
            self.offset_error = errors
            repeats = sum_repeats(k, blocks.block_size, self.k_multiple)
            x = self._with_block_sums(nodes_out, x, k, blocks.block_size, name, repeats)
            blocks, k = offset_rows(blocks, repeats)
        inputs = [
            x,
            init(f"{prefix}.qweight", blocks.packed()),
            init(f"{prefix}.scales", blocks.scales),
        ]
        zp = blocks.packed_zero_points()
        if zp is not None:
            inputs.append(init(f"{prefix}.zero_points", zp))
        nodes_out.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                [out],
                name=f"{name}/MatMulNBits",
                domain=MS,
                K=k,
                N=n_out,
                bits=blocks.bits,
                block_size=blocks.block_size,
                accuracy_level=self.accuracy_level,
            )
        )

    def _with_block_sums(
        self, nodes_out: list, x: str, k: int, block_size: int, name: str, repeats: int
    ) -> str:
        """Concat(x, S_0, S_0/FINE, S_1, …), S_b the sum of x over block b (`offset_rows`), built
        once per input: x's blocks [.., nb, bs] times the [bs, 2] matrix [1, 1/FINE], flattened.
        The sums go `repeats` times (no extra op: Concat lists them again). One MatMul for both
        digits: one kernel fewer per input than ReduceSum, then Mul (a [K, 2·nb] 0/1 matrix over
        all of x did it in one op too, but is re-read from memory on every call: slower)."""
        key = (x, block_size)
        if key in self._block_sums:
            return self._block_sums[key]
        init = self.edit.init
        sums = f"{name}/block_sums"  # named after its first reader
        shape = init(f"{sums}/blocks_shape", np.array([0, 0, k // block_size, -1], np.int64))
        flat = init(f"{sums}/flat_shape", np.array([0, 0, -1], np.int64))
        digits = np.stack([np.ones(block_size), np.full(block_size, 1 / FINE)], axis=1)
        nodes_out += [
            helper.make_node("Reshape", [x, shape], [f"{sums}/blocks"], name=f"{sums}/Reshape"),
            helper.make_node(
                "MatMul",
                [f"{sums}/blocks", init(f"{sums}/digits", digits.astype(np.float32))],
                [f"{sums}/pairs"],
                name=f"{sums}/MatMul",
            ),
            helper.make_node("Reshape", [f"{sums}/pairs", flat], [sums], name=f"{sums}/Flatten"),
            helper.make_node(
                "Concat", [x] + [sums] * repeats, [f"{sums}/input"], name=f"{sums}/Concat", axis=-1
            ),
        ]
        self._block_sums[key] = f"{sums}/input"
        return self._block_sums[key]
