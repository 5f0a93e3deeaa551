"""Lowering to onnxruntime's fused contrib ops, the fastest graph for onnxruntime on CPU and CUDA.

    Add(x, h) ─► llamaonnx.RMSNorm ─► …      ─►  SkipSimplifiedLayerNormalization(x, h, W)
       └──► residual consumers                       ├─ out 0 ─► …   └─ out 3 (x + h) ─► residual
    llamaonnx.RMSNorm (no Add before it)      ─►  SimplifiedLayerNormalization
    rope_q(q), rope_k(k) ─► llamaonnx.GroupQueryAttention(q, k, v, past_k, past_v, bias)
                                              ─►  com.microsoft.GroupQueryAttention(q, k, v,
                                                    past_k, past_v, seqlens_k, total_len,
                                                    cos_table, sin_table, do_rotary=1)
    attention_mask ─► ReduceSum − 1 ─► Cast(int32) ─► seqlens_k      (computed once)
    attention_mask ─► Shape[1] ─► Cast(int32) ─► total_len

GroupQueryAttention takes the lengths, not a bias: each row's valid keys are 0 … seqlens_k, so
batches must be right-padded, and rotary positions follow from the lengths (position_ids and the
bias subgraph are pruned). Past and present may share one preallocated buffer (B, Hkv, Tmax, Dh);
the runtime binds the same memory to both.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from export.passes.graph import attr, ensure_opset, ours, producers, prune, replace_nodes

MS = "com.microsoft"


def lower_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    _lengths(g)
    made = producers(g)
    for n in ours(g, "GroupQueryAttention"):
        q, k, v, pk, pv, _bias = n.input
        rope_q, rope_k = made[q], made[k]
        assert rope_q.op_type == rope_k.op_type == "RotaryEmbedding", "GQA inputs must be rotated"
        new = helper.make_node(
            "GroupQueryAttention",
            [
                rope_q.input[0],
                rope_k.input[0],
                v,
                pk,
                pv,
                "seqlens_k",
                "total_sequence_length",
                rope_q.input[2],
                rope_q.input[3],
            ],
            list(n.output),
            name=n.name,
            domain=MS,
            num_heads=attr(n, "num_heads"),
            kv_num_heads=attr(n, "kv_num_heads"),
            scale=attr(n, "scale"),
            do_rotary=1,
            rotary_interleaved=0,
        )
        replace_nodes(g, [n], [new])
    _norms(g)
    _stamp_present_shapes(g)
    prune(model)
    ensure_opset(model, MS, 1)
    return model


def _stamp_present_shapes(g: onnx.GraphProto) -> None:
    """GroupQueryAttention's present is the shared buffer when past is one (max(P, T) long), not
    the traced P + S: declare a free dimension so no consumer relies on the traced formula."""
    for out in g.output:
        if out.name.startswith("present."):
            out.type.tensor_type.shape.dim[2].dim_param = "present_sequence_length"


def _lengths(g: onnx.GraphProto) -> None:
    nodes = [
        helper.make_node(
            "Constant",
            [],
            ["/ort/axis1"],
            value=helper.make_tensor("a", TensorProto.INT64, [1], [1]),
        ),
        helper.make_node(
            "Constant", [], ["/ort/one"], value=helper.make_tensor("o", TensorProto.INT64, [], [1])
        ),
        helper.make_node("ReduceSum", ["attention_mask", "/ort/axis1"], ["/ort/len"], keepdims=0),
        helper.make_node("Sub", ["/ort/len", "/ort/one"], ["/ort/len_minus_one"]),
        helper.make_node("Cast", ["/ort/len_minus_one"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["/ort/total_1d"], start=1, end=2),
        helper.make_node("Squeeze", ["/ort/total_1d"], ["/ort/total"]),
        helper.make_node("Cast", ["/ort/total"], ["total_sequence_length"], to=TensorProto.INT32),
    ]
    for k, n in enumerate(nodes):
        n.name = n.name or f"/ort/lengths_{k}"
        g.node.insert(k, n)


def _norms(g: onnx.GraphProto) -> None:
    made = producers(g)
    for n in ours(g, "RMSNorm"):
        x, w = n.input
        eps = attr(n, "epsilon")
        add = made.get(x)
        if add is not None and add.op_type == "Add" and add.domain == "" and len(add.input) == 2:
            summed = f"{n.name}/residual"
            new = helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [add.input[0], add.input[1], w],
                [n.output[0], "", "", summed],
                name=n.name,
                domain=MS,
                epsilon=eps,
            )
            for other in g.node:
                other.input[:] = [summed if i == x else i for i in other.input]
            for out in g.output:
                assert out.name != x, "a residual sum is a graph output"
            replace_nodes(g, [n], [new])
            g.node.remove(add)
        else:
            new = helper.make_node(
                "SimplifiedLayerNormalization",
                [x, w],
                list(n.output),
                name=n.name,
                axis=-1,
                epsilon=eps,
                stash_type=1,
            )
            replace_nodes(g, [n], [new])
