"""Rewrite: onnxruntime's SkipSimplifiedLayerNormalization folded into the native projection
that reads it.

Contract:

    SkipSimplifiedLayerNormalization(x, h, W) ─┬─ out 0 ─ MatMulQ4 | MatMulQ8 | …SwiGLU (B)
                                               └─ out 3 (x + h) ─► residual readers

becomes `op(x, B, W, h) → (y, x + h)` with the norm's `epsilon`: the kernel sums, normalises and
quantizes the row itself (runtime/native/tiles.h), in onnxruntime's float order, so the output is
the unfolded graph's to the bit (tests/test_native.py). A decode step of a 30-layer model then
runs 59 nodes fewer (all its norms but the last, which the head reads through logits_to_keep's
Slice), each of which cost more in onnxruntime's dispatch than in arithmetic.
Only where the normalised value has that one reader, as the projection's A, and the norm has no
beta, bias or mean/inv-std outputs; else `skip` says why.
"""

from __future__ import annotations

import onnx
from onnx import helper

from export.passes.graph import MS, attr, replace_nodes, skip
from export.quant.graph import consumers
from export.quant.native import DOMAIN, MATMULS

NAME = "norm folding"


def _why_not(norm: onnx.NodeProto, readers: list[onnx.NodeProto]) -> str | None:
    if len(norm.input) != 3 or not all(norm.input):
        return "it has a beta or bias input"
    if any(norm.output[1:3]):
        return "its mean or inverse-deviation output is read"
    if not any(a.name == "epsilon" for a in norm.attribute):
        return "it has no epsilon attribute (onnxruntime's default would have to be guessed)"
    if len(readers) != 1:
        return f"its output has {len(readers)} readers, not one projection"
    mm = readers[0]
    if mm.domain != DOMAIN or mm.op_type not in MATMULS:
        return f"its output is read by {mm.domain or 'ai.onnx'}.{mm.op_type}, not our projection"
    if len(mm.input) != 2 or mm.input[0] != norm.output[0]:
        return "the projection already folds a norm, or reads the output as its weight"
    return None


def fold_norms(g: onnx.GraphProto) -> int:
    """Rewrites in place; returns how many norms were folded."""
    users = consumers(g)
    folded = 0
    for norm in [n for n in g.node if n.op_type == "SkipSimplifiedLayerNormalization"]:
        if norm.domain != MS:
            continue
        readers = users.get(norm.output[0], [])
        why = _why_not(norm, readers)
        if why:
            skip(NAME, norm.name, why)
            continue
        mm = readers[0]
        x, h, w = norm.input
        summed = norm.output[3] if len(norm.output) > 3 else ""
        new = helper.make_node(
            mm.op_type,
            [x, mm.input[1], w, h],
            [mm.output[0], summed] if summed else [mm.output[0]],
            name=mm.name,
            domain=DOMAIN,
            epsilon=attr(norm, "epsilon"),
        )
        new.attribute.extend(mm.attribute)  # (its tiles' layout, and digits where marked)
        replace_nodes(g, [norm, mm], [new])
        folded += 1
    return folded
