"""Small graph-editing helpers shared by the lowering passes and the quantizer's rewrites, and
`skip`, with which a rewrite says why it left a candidate as it was (logged; `-v` shows it)."""

from __future__ import annotations

import logging

import onnx

from export.onnx.domain import DOMAIN

log = logging.getLogger(__name__)
MS = "com.microsoft"  # onnxruntime's contrib-op domain


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    raise KeyError(f"node {node.name} has no attribute {name}")


def ours(graph: onnx.GraphProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.domain == DOMAIN and n.op_type == op_type]


def replace_nodes(
    graph: onnx.GraphProto, old: list[onnx.NodeProto], new: list[onnx.NodeProto]
) -> None:
    """`new` where the first of `old` stood (the graph stays topologically sorted)."""
    index = min(list(graph.node).index(n) for n in old)
    for n in old:
        graph.node.remove(n)
    for k, n in enumerate(new):
        graph.node.insert(index + k, n)


def prune(model: onnx.ModelProto) -> None:
    """Drop nodes, initializers, inputs and functions that no graph output depends on."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in g.input if i.name in needed]
    del g.input[:]
    g.input.extend(inputs)
    vi = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vi)
    used = {(n.domain, n.op_type) for n in g.node}
    funcs = [f for f in model.functions if (f.domain, f.name) in used]
    del model.functions[:]
    model.functions.extend(funcs)
    if not any(d == DOMAIN for d, _ in used):
        imports = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(imports)


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def skip(rewrite: str, where: str, why: str) -> None:
    """A rewrite's precondition failed for one candidate: say which and why."""
    log.info("%s: %s left as it is: %s", rewrite, where, why)
