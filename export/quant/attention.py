"""Rewrite: onnxruntime's GroupQueryAttention → llamaonnx's (`ai.llamaonnx.GroupQueryAttention`).

Contract: a `com.microsoft.GroupQueryAttention` with packed QKV (inputs 1 and 2 empty), rotary
from cos/sin tables (do_rotary=1, not interleaved), the shared KV buffer and all 9 inputs, and no
attribute beyond num_heads, kv_num_heads, scale, do_rotary, rotary_interleaved, becomes one node
of ours with the same outputs, reading [query, past key, past value, seqlens_k,
total_sequence_length, cos, sin]. It computes the same (tests/test_native.py compares the two)
in a fraction of the time at decode. Any other configuration stays onnxruntime's, and `skip`
says why.
"""

from __future__ import annotations

import onnx
from onnx import helper

from export.errors import QuantizationError
from export.passes.graph import MS, replace_nodes, skip
from export.quant.native import ATTENTION, DOMAIN

NAME = "native attention"
_PLAIN = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved"}


def _why_not(n: onnx.NodeProto, attrs: dict) -> str | None:
    if not set(attrs) <= _PLAIN:
        return f"attributes {sorted(set(attrs) - _PLAIN)} are not supported"
    if attrs.get("do_rotary") != 1 or attrs.get("rotary_interleaved", 0) != 0:
        return "it does not apply rotary itself, or interleaves it"
    if len(n.input) != 9 or not all(n.input[i] for i in (0, 3, 4, 5, 6, 7, 8)):
        return "it lacks the shared KV buffer, lengths or cos/sin inputs"
    if n.input[1] or n.input[2]:
        return "its QKV is not packed into one input"
    return None


def native_attention(g: onnx.GraphProto) -> int:
    """Rewrites in place; returns how many nodes became ours."""
    done = 0
    for n in list(g.node):
        if n.op_type != "GroupQueryAttention" or n.domain != MS:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        why = _why_not(n, attrs)
        if why:
            skip(NAME, n.name, why)
            continue
        kept = {k: v for k, v in attrs.items() if k in ("num_heads", "kv_num_heads", "scale")}
        ins = list(n.input)
        new = helper.make_node(
            ATTENTION,
            [ins[0], ins[3], ins[4], ins[5], ins[6], ins[7], ins[8]],
            list(n.output),
            name=n.name,
            domain=DOMAIN,
            **kept,
        )
        replace_nodes(g, [n], [new])
        done += 1
    return done


def ours_everywhere(g: onnx.GraphProto) -> bool:
    """Whether the graph has attention and every layer's is ours (an fp16 cache is possible)."""
    attention = [n for n in g.node if n.op_type == ATTENTION]
    return bool(attention) and all(n.domain == DOMAIN for n in attention)


def fp16_cache(g: onnx.GraphProto) -> int:
    """The KV cache in fp16: every layer's past/present key and value, which only our attention
    reads and writes (it rounds each new key and value to fp16 once, and reads them back
    exactly). Returns how many cache tensors were retyped; QuantizationError where a layer's
    attention is not ours (a sliding window or soft-cap keeps onnxruntime's, whose float32
    graph cannot take an fp16 cache)."""
    attention = [n for n in g.node if n.op_type == ATTENTION]
    theirs = [n.name for n in attention if n.domain != DOMAIN]
    if not ours_everywhere(g):
        raise QuantizationError(
            "--kv-cache float16 needs llamaonnx's attention kernel on every layer; "
            + (
                f"{len(theirs)} layers keep onnxruntime's ({theirs[0]}, ...)"
                if theirs
                else "this graph has none"
            )
            + ": quantize with --kv-cache float32"
        )
    cache = {x for n in attention for x in (*n.input[1:3], *n.output[1:3])}
    retyped = 0
    for value in (*g.input, *g.output):
        if value.name in cache:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
            retyped += 1
    if retyped != 4 * len(attention):
        raise QuantizationError(
            f"--kv-cache float16: {retyped} of the {4 * len(attention)} cache tensors are graph "
            "inputs and outputs; the cache must be the graph's own past/present"
        )
    return retyped
