"""fp16 conversion of a lowered graph: weights, activations and the KV cache in float16, with the
numerically fragile parts in float32 so nothing overflows:

- normalization: onnxruntime's (Skip)SimplifiedLayerNormalization and opset-23 RMSNormalization
  accumulate in float32 (`stash_type` 1); our portable `RMSNorm` function runs on float32 inputs
  (Cast in, Cast out), as do the portable `RotaryEmbedding` and `GroupQueryAttention` functions;
- softmax: opset-23 Attention gets `softmax_precision` float32; onnxruntime's GroupQueryAttention
  accumulates its softmax in float32 itself;
- `logits` stay a float32 output (the LM head runs in fp16, then one Cast).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.onnx.domain import DOMAIN

# Our function ops run in float32 on the portable target: which of their inputs are floating point.
_ISLANDS = {"RMSNorm": (0, 1), "RotaryEmbedding": (0, 2, 3), "GroupQueryAttention": range(6)}
_F32, _F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _to_fp16(t: onnx.TensorProto) -> onnx.TensorProto:
    """Finite values beyond float16's range are clamped to ±65504 (the attention bias' "minus
    infinity" is float32's lowest finite value); weights never come near it."""
    a = numpy_helper.to_array(t)
    limit = np.finfo(np.float16).max
    a = np.where(np.isfinite(a), np.clip(a, -limit, limit), a)
    return numpy_helper.from_array(a.astype(np.float16), t.name)


def _island(n: onnx.NodeProto):
    return _ISLANDS.get(n.op_type) if n.domain == DOMAIN else None


def convert_fp16(model: onnx.ModelProto) -> None:
    g = model.graph
    # Weights only float32 islands read (norm weights, rotary tables of portable functions) stay
    # float32: rounding them to fp16 and back would only lose precision.
    readers: dict[str, list[bool]] = {}
    for n in g.node:
        for k, x in enumerate(n.input):
            readers.setdefault(x, []).append(_island(n) is not None and k in _island(n))
    keep32 = {t.name for t in g.initializer if all(readers.get(t.name, [False]))}
    for i, t in enumerate(g.initializer):
        if t.data_type == _F32 and t.name not in keep32:
            g.initializer[i].CopyFrom(_to_fp16(t))
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type == _F32:
            v.type.tensor_type.elem_type = _F16
    del g.value_info[:]
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == _F32:
                a.i = _F16
            elif a.name == "value" and a.t.data_type == _F32:  # Constant, ConstantOfShape
                a.t.CopyFrom(_to_fp16(a.t))
            elif n.op_type == "Attention" and a.name == "softmax_precision":
                a.i = _F32
        if n.op_type == "Attention" and n.domain in ("", "ai.onnx"):
            if not any(a.name == "softmax_precision" for a in n.attribute):
                n.attribute.append(helper.make_attribute("softmax_precision", _F32))
    _islands(g, keep32)
    # logits leave as float32: the LM head's fp16 result gets one Cast.
    logits = next(o for o in g.output if o.name == "logits")
    logits.type.tensor_type.elem_type = _F32
    for n in g.node:
        n.output[:] = ["logits_fp16" if o == "logits" else o for o in n.output]
    g.node.append(
        helper.make_node("Cast", ["logits_fp16"], ["logits"], name="/model/logits_Cast", to=_F32)
    )


def _islands(g: onnx.GraphProto, fp32_inputs: set[str]) -> None:
    nodes = []
    for n in g.node:
        floats = _island(n)
        if floats is None:
            nodes.append(n)
            continue
        for k in floats:
            if k < len(n.input) and n.input[k] and n.input[k] not in fp32_inputs:
                x = n.input[k]
                nodes.append(
                    helper.make_node(
                        "Cast", [x], [f"{n.name}/in{k}_fp32"], name=f"{n.name}/Cast_in{k}", to=_F32
                    )
                )
                n.input[k] = f"{n.name}/in{k}_fp32"
        nodes.append(n)
        for k, y in enumerate(list(n.output)):
            n.output[k] = f"{n.name}/out{k}_fp32"
            nodes.append(
                helper.make_node("Cast", [n.output[k]], [y], name=f"{n.name}/Cast_out{k}", to=_F16)
            )
    del g.node[:]
    g.node.extend(nodes)
