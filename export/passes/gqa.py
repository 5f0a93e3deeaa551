"""Lowering of `llamaonnx.GroupQueryAttention(q, k, v, past_k, past_v, bias)`, per target.

    onnx23:  GroupQueryAttention(q, k, v, pk, pv, bias)
                 ─► Attention(q, k, v, bias, pk, pv, q_num_heads, kv_num_heads, scale)
    ort:     rope_q(q), rope_k(k) ─► GroupQueryAttention(q, k, v, pk, pv, bias)
                 ─► com.microsoft.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k,
                        total_len, cos_table, sin_table, do_rotary=1)
             attention_mask ─► ReduceSum − 1 ─► Cast(int32) ─► seqlens_k      (computed once)
             attention_mask ─► Shape[1] ─► Cast(int32) ─► total_len

Variants: `softcap` becomes the softcap attribute of both (each caps the scores before the mask).
`sliding_window` w (the query at position p sees keys at p - w < q <= p) is already in the bias,
which onnx23's Attention reads; onnxruntime's GroupQueryAttention builds its mask from the lengths
and gets local_window_size = w (the same count: tests/test_families.py holds it to transformers).

onnxruntime's GroupQueryAttention takes the lengths, not a bias: each row's valid keys are
0 … seqlens_k, so batches must be right-padded, and rotary positions follow from the lengths
(position_ids and the bias subgraph are pruned). Past and present may share one preallocated
buffer (B, Hkv, Tmax, Dh); the runtime binds the same memory to both. The ort form needs q and k
to come straight from our RotaryEmbedding (it rotates them itself); a graph where they do not is
refused with a LoweringError that says so.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from export.errors import LoweringError
from export.passes.graph import MS, attr, ours, producers, replace_nodes


def _variant(n: onnx.NodeProto, name: str, default):
    try:
        return attr(n, name)
    except KeyError:  # folders exported before the attribute existed
        return default


def to_onnx23(g: onnx.GraphProto) -> int:
    nodes = ours(g, "GroupQueryAttention")
    for n in nodes:
        q, k, v, pk, pv, bias = n.input
        softcap = _variant(n, "softcap", 0.0)  # the window is in the bias already
        new = helper.make_node(
            "Attention",
            [q, k, v, bias, pk, pv],
            list(n.output),
            name=n.name,
            q_num_heads=attr(n, "num_heads"),
            kv_num_heads=attr(n, "kv_num_heads"),
            scale=attr(n, "scale"),
            **({"softcap": softcap} if softcap > 0 else {}),
        )
        replace_nodes(g, [n], [new])
    return len(nodes)


def to_ort(g: onnx.GraphProto) -> int:
    _lengths(g)
    made = producers(g)
    nodes = ours(g, "GroupQueryAttention")
    for n in nodes:
        q, k, v, pk, pv, _bias = n.input
        rope_q, rope_k = made.get(q), made.get(k)
        if not (
            rope_q is not None
            and rope_k is not None
            and rope_q.op_type == rope_k.op_type == "RotaryEmbedding"
        ):
            raise LoweringError(
                f"{n.name}: the ort target fuses rotary into onnxruntime's GroupQueryAttention, "
                "but this node's q and k do not come from RotaryEmbedding nodes; lower this "
                "graph with --target onnx23 or portable"
            )
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
            **_ort_variants(n),
        )
        replace_nodes(g, [n], [new])
    _stamp_present_shapes(g)
    return len(nodes)


def _ort_variants(n: onnx.NodeProto) -> dict:
    """Only the attributes a node needs: a plain node stays one the native kernel takes."""
    out = {}
    softcap, window = _variant(n, "softcap", 0.0), _variant(n, "sliding_window", 0)
    if softcap > 0:
        out["softcap"] = softcap
    if window > 0:
        out["local_window_size"] = window
    return out


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
