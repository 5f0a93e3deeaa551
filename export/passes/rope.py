"""Lowering of `llamaonnx.RotaryEmbedding(X, pos, cos, sin)`, per target.

    onnx23:  RotaryEmbedding(X, pos, cos, sin) ─► RotaryEmbedding(X, cos, sin, pos, num_heads,
                                                                  interleaved=0)
    ort:     fused into GroupQueryAttention (passes/gqa.py), which rotates q and k itself.

Contract: the rotate-half rotation of the reference, from the same cos/sin tables.
"""

from __future__ import annotations

import onnx
from onnx import helper

from export.passes.graph import attr, ours, replace_nodes


def to_onnx23(g: onnx.GraphProto) -> int:
    nodes = ours(g, "RotaryEmbedding")
    for n in nodes:
        x, pos, cos, sin = n.input
        new = helper.make_node(
            "RotaryEmbedding",
            [x, cos, sin, pos],
            list(n.output),
            name=n.name,
            num_heads=attr(n, "num_heads"),
            interleaved=0,
        )
        replace_nodes(g, [n], [new])
    return len(nodes)
