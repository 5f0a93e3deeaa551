"""Rewrite: the token embedding's Gather → its quantized form.

    Gather(table, ids)  →  Reshape(GatherBlockQuantized(codes, ids, scales[, zero points]))
                           [+ Gather(offsets, ids) for Q4_1]                      (MatMulNBits)
                        →  GatherQ8(the LM head's MatMulQ8 tiles, ids)           (native, tied)

With tied weights one copy of the codes serves the head and the embedding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import helper

from export.passes.graph import MS, replace_nodes
from export.quant.blocks import Blocks
from export.quant.native import GATHER8, tile_node


def native_embedding(g, node, head: Blocks) -> None:
    """The tied embedding as GatherQ8 rows of the LM head's own MatMulQ8 tiles: one copy of the
    codes serves both."""
    gather = tile_node(
        GATHER8,
        ["model.output.tiles", node.input[1]],
        [node.output[0]],
        name="/model/tok_embeddings/GatherQ8",
    )
    replace_nodes(g, [node], [gather])


def quantize_embedding(g, node, blocks: Blocks, shared: bool, init) -> None:
    """Gather(table, ids) → Reshape(GatherBlockQuantized(codes, ids, scales[, zp]), [.., D]),
    plus the gathered Q4_1 offsets where there are any.

    The codes are MatMulNBits' B, [V, nb, bs·bits/8] with quantize_axis 2, so a tied head's
    copy serves both, except for 4-bit codes with zero points. onnxruntime's CPU kernel reads
    4-bit zero points packed two per byte along the quantize axis, its CUDA kernel two per byte
    in flat block order (contrib_ops/cuda/quantization/gather_block_quantized.cu: `block_id =
    in_idx / block_size`). In the 3-D layout the two disagree on every other block (measured on
    an H200: the mixed K-quant llama's embedding off by up to 0.48 in the logits). Laid out
    [V, nb·bs/2] with quantize_axis 1 and zero points [V, nb/2], the two orders are the same
    bytes when nb is even; when nb is odd the codes go in an 8-bit container (one zero point
    per byte, nothing to pack)."""
    prefix = "model.tok_embeddings"
    v, nb, bs = blocks.codes.shape
    flat = blocks.bits == 4 and blocks.zero_points is not None
    if flat and nb % 2:
        blocks = dataclasses.replace(blocks, bits=8)  # same codes and zero points, 8-bit container
        flat = False
    if flat:
        data = init(f"{prefix}.qweight", blocks.packed().reshape(v, nb * bs // 2))
        scales = init(f"{prefix}.scales", blocks.scales)
        inputs = [
            data,
            node.input[1],
            scales,
            init(f"{prefix}.zero_points", blocks.packed_zero_points()),
        ]
        axis = 1
    else:
        data = "model.output.qweight" if shared else init(f"{prefix}.qweight", blocks.packed())
        inputs = [data, node.input[1], init(f"{prefix}.scales", blocks.scales[..., None])]
        if blocks.zero_points is not None:
            inputs.append(init(f"{prefix}.zero_points", blocks.zero_points[..., None]))
        axis = 2
    out = node.output[0]
    blocked = f"{prefix}/blocks"
    nodes = [
        helper.make_node(
            "GatherBlockQuantized",
            inputs,
            [blocked],
            name="/model/tok_embeddings/GatherBlockQuantized",
            domain=MS,
            bits=blocks.bits,
            block_size=blocks.block_size,
            gather_axis=0,
            quantize_axis=axis,
        )
    ]
    if blocks.offsets is not None:
        if flat:  # [.., D] → [.., nb, bs], so that each block's offset broadcasts over it
            split = init(f"{prefix}/block_shape", np.array([0, 0, nb, bs], np.int64))
            nodes.append(
                helper.make_node(
                    "Reshape",
                    [blocked, split],
                    [f"{prefix}/blocks_nb"],
                    name="/model/tok_embeddings/Reshape_blocks",
                )
            )
            blocked = f"{prefix}/blocks_nb"
        nodes += [
            helper.make_node(
                "Gather",
                [init(f"{prefix}.offsets", blocks.offsets[..., None]), node.input[1]],
                [f"{prefix}/offsets"],
                name="/model/tok_embeddings/offsets_Gather",
            ),
            helper.make_node(
                "Add",
                [blocked, f"{prefix}/offsets"],
                [f"{prefix}/blocks_m"],
                name="/model/tok_embeddings/Add",
            ),
        ]
        blocked = f"{prefix}/blocks_m"
    shape = init(f"{prefix}/shape", np.array([0, 0, -1], np.int64))
    nodes.append(
        helper.make_node("Reshape", [blocked, shape], [out], name="/model/tok_embeddings/Reshape")
    )
    replace_nodes(g, [node], nodes)
