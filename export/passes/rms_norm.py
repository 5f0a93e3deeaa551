"""Lowering of `llamaonnx.RMSNorm(X, W)`, per target.

    onnx23:  RMSNorm(X, W)              ─►  RMSNormalization(X, W, axis=-1, stash_type=fp32)
    ort:     Add(x, h) ─► RMSNorm ─► …  ─►  SkipSimplifiedLayerNormalization(x, h, W)
                └──► residual readers        ├─ out 0 ─► …   └─ out 3 (x + h) ─► residual readers
             RMSNorm (no Add before it) ─►  SimplifiedLayerNormalization(X, W)

Contract: the same y = X / sqrt(mean(X²) + ε) · (W + offset) in float32, the residual sum computed
once. Neither standard op has an offset: it is folded into a copy of W (Gemma's 1 + w), or added by
a node where W is not an initializer.
The ort fusion needs the Add to be a plain two-input Add whose sum is not a graph output; where
it is not, the norm is lowered alone and `skip` says why.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from export.passes.graph import MS, attr, ours, producers, replace_nodes, skip


def _scale(g: onnx.GraphProto, n: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto]]:
    """The name of W + offset, and the nodes (if any) that compute it."""
    w = n.input[1]
    offset = _offset(n)
    if offset == 0.0:
        return w, []
    name = f"{w}.plus_offset"
    init = next((i for i in g.initializer if i.name == w), None)
    if init is not None:
        value = numpy_helper.to_array(init)
        g.initializer.append(numpy_helper.from_array((value + offset).astype(value.dtype), name))
        return name, []
    const = helper.make_node(
        "Constant", [], [f"{name}/value"], name=f"{n.name}/offset", value_float=offset
    )
    cast = helper.make_node(
        "CastLike", [const.output[0], w], [f"{name}/cast"], name=f"{n.name}/cast"
    )
    add = helper.make_node("Add", [w, cast.output[0]], [name], name=f"{n.name}/add_offset")
    return name, [const, cast, add]


def _offset(n: onnx.NodeProto) -> float:
    try:
        return float(attr(n, "offset"))
    except KeyError:  # folders exported before the attribute existed
        return 0.0


def to_onnx23(g: onnx.GraphProto) -> int:
    nodes = ours(g, "RMSNorm")
    for n in nodes:
        w, extra = _scale(g, n)
        new = helper.make_node(
            "RMSNormalization",
            [n.input[0], w],
            list(n.output),
            name=n.name,
            axis=-1,
            epsilon=attr(n, "epsilon"),
            stash_type=1,
        )
        replace_nodes(g, [n], [*extra, new])
    return len(nodes)


def _why_not_fused(add: onnx.NodeProto | None, x: str, g: onnx.GraphProto) -> str | None:
    if add is None or add.op_type != "Add" or add.domain != "" or len(add.input) != 2:
        return "its input is not a residual Add"
    if any(out.name == x for out in g.output):
        return "the residual sum is a graph output"
    return None


def to_ort(g: onnx.GraphProto) -> int:
    made = producers(g)
    nodes = ours(g, "RMSNorm")
    for n in nodes:
        x = n.input[0]
        w, extra = _scale(g, n)
        eps = attr(n, "epsilon")
        add = made.get(x)
        why = _why_not_fused(add, x, g)
        if why is None:
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
            replace_nodes(g, [n], [*extra, new])
            g.node.remove(add)
            continue
        if add is not None and add.op_type == "Add":  # a first norm reads no residual sum
            skip("RMSNorm → SkipSimplifiedLayerNormalization", n.name, why)
        new = helper.make_node(
            "SimplifiedLayerNormalization",
            [x, w],
            list(n.output),
            name=n.name,
            axis=-1,
            epsilon=eps,
            stash_type=1,
        )
        replace_nodes(g, [n], [*extra, new])
    return len(nodes)
