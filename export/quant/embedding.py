"""Rewrite: the token embedding's Gather → its quantized form.

    Gather(table, ids)  →  Reshape(GatherBlockQuantized(codes, ids, scales[, zero points]))
                           [+ Gather(offsets, ids) for Q4_1]                      (MatMulNBits)
                        →  GatherQ8(the LM head's MatMulQ8 tiles, ids)           (native, tied)

With tied weights one copy of the codes serves the head and the embedding.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from export.passes.graph import MS, replace_nodes
from export.quant.blocks import Blocks
from export.quant.native import DOMAIN, GATHER8


def native_embedding(g, node, head: Blocks) -> None:
    """The tied embedding as GatherQ8 rows of the LM head's own MatMulQ8 tiles: one copy of the
    codes serves both."""
    gather = helper.make_node(
        GATHER8,
        ["model.output.tiles", node.input[1]],
        [node.output[0]],
        name="/model/tok_embeddings/GatherQ8",
        domain=DOMAIN,
    )
    replace_nodes(g, [node], [gather])


def quantize_embedding(g, node, blocks: Blocks, shared: bool, init) -> None:
    """Gather(table, ids) → Reshape(GatherBlockQuantized(codes [V, nb, bs·bits/8], ids), [.., D]),
    plus the gathered Q4_1 offsets where there are any."""
    prefix = "model.tok_embeddings"
    v, nb, _ = blocks.codes.shape
    data = "model.output.qweight" if shared else init(f"{prefix}.qweight", blocks.packed())
    inputs = [data, node.input[1], init(f"{prefix}.scales", blocks.scales[..., None])]
    if blocks.zero_points is not None:
        zp = blocks.zero_points[..., None]
        inputs.append(init(f"{prefix}.zero_points", zp))
    out = node.output[0]
    nodes = [
        helper.make_node(
            "GatherBlockQuantized",
            inputs,
            [f"{prefix}/blocks"],
            name="/model/tok_embeddings/GatherBlockQuantized",
            domain=MS,
            bits=blocks.bits,
            block_size=blocks.block_size,
            gather_axis=0,
            quantize_axis=2,
        )
    ]
    blocked = f"{prefix}/blocks"
    if blocks.offsets is not None:
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
