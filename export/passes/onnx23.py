"""Lowering to standard opset-23 ops: RMSNormalization, RotaryEmbedding and Attention.

llamaonnx.RMSNorm(X, W)                     ─► RMSNormalization(X, W, axis=-1, stash_type=fp32)
llamaonnx.RotaryEmbedding(X, pos, cos, sin) ─► RotaryEmbedding(X, cos, sin, pos, num_heads)
llamaonnx.GroupQueryAttention(q, k, v, pk, pv, bias)
                                            ─► Attention(q, k, v, bias, pk, pv,
                                                         q_num_heads, kv_num_heads, scale)
"""

from __future__ import annotations

import onnx
from onnx import helper

from export.passes.graph import attr, ours, prune, replace_nodes


def lower_onnx23(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    for n in ours(g, "RMSNorm"):
        new = helper.make_node(
            "RMSNormalization",
            list(n.input),
            list(n.output),
            name=n.name,
            axis=-1,
            epsilon=attr(n, "epsilon"),
            stash_type=1,
        )
        replace_nodes(g, [n], [new])
    for n in ours(g, "RotaryEmbedding"):
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
    for n in ours(g, "GroupQueryAttention"):
        q, k, v, pk, pv, bias = n.input
        new = helper.make_node(
            "Attention",
            [q, k, v, bias, pk, pv],
            list(n.output),
            name=n.name,
            q_num_heads=attr(n, "num_heads"),
            kv_num_heads=attr(n, "kv_num_heads"),
            scale=attr(n, "scale"),
        )
        replace_nodes(g, [n], [new])
    prune(model)
    return model
