"""What the weight rewrites share: the projections and the token embedding, found by the names
the exporter gives them (`/model/layers.3/attention/wq/MatMul` reading
`model.layers.3.attention.wq.weight_T`, the tied head reading `Transpose(model.output.weight)`),
the readers of each value, an `Edit` that gathers the initializers a rewrite adds, and `skip`,
which says why a rewrite left a candidate as it was (logged; `llamaonnx -v` shows it)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx
from onnx import numpy_helper

from export.passes.graph import producers, prune

_LINEAR = re.compile(r"^/model/(.+)/MatMul$")


def module_of(node_name: str) -> str | None:
    """'/model/layers.3/attention/wq/MatMul' → 'layers.3.attention.wq'."""
    m = _LINEAR.match(node_name)
    return m.group(1).replace("/", ".") if m else None


def linear_weights(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, np.ndarray]]:
    """module → (its MatMul node, W [N, K] as float32), for every projection with a constant
    weight."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    made_by = producers(g)
    found = {}
    for n in g.node:
        module = module_of(n.name) if n.op_type == "MatMul" else None
        if module is None:
            continue
        b = n.input[1]
        if b in inits:
            found[module] = (n, numpy_helper.to_array(inits[b]).T)
        elif b in made_by and made_by[b].op_type == "Transpose" and made_by[b].input[0] in inits:
            found[module] = (n, numpy_helper.to_array(inits[made_by[b].input[0]]))
    return found


def embedding(model: onnx.ModelProto) -> tuple[onnx.NodeProto, str] | None:
    """The token embedding's Gather and its table's initializer name."""
    inits = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.name == "/model/tok_embeddings/Gather" and n.input[0] in inits:
            return n, n.input[0]
    return None


def consumers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            out.setdefault(x, []).append(n)
    return out


@dataclasses.dataclass
class Edit:
    """One rewrite of a model in place: `init` adds an initializer, `commit` puts them in the
    graph and prunes what no longer has a reader."""

    model: onnx.ModelProto
    new_inits: list[onnx.TensorProto] = dataclasses.field(default_factory=list)

    def init(self, name: str, array: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def commit(self) -> None:
        self.model.graph.initializer.extend(self.new_inits)
        self.new_inits.clear()
        prune(self.model)
