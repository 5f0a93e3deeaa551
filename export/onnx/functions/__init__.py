"""Our ONNX domain: one custom node per RMSNorm, RoPE and GQA, each with a model-local
function body.

Each op lives in its own file with (1) its `OpSchema`, registered once so the onnxscript tracer used
by torch.onnx can emit the node, (2) the translation from the torch custom op, and (3) the ONNX
function body that any ONNX runtime executes. `install(model)` appends the bodies to a ModelProto.
"""

from __future__ import annotations

import functools

import onnx

from export.onnx.functions import gqa, rms_norm, rope
from export.onnx.functions.common import DOMAIN, DOMAIN_VERSION, OPSET

_MODULES = (rms_norm, rope, gqa)


@functools.cache
def register_schemas() -> None:
    for m in _MODULES:
        try:
            onnx.defs.register_schema(m.SCHEMA)
        except Exception as e:  # already registered in this process by another copy
            if "already" not in str(e).lower():
                raise


def translation_table() -> dict:
    """torch custom op → onnxscript translation (torch.onnx.export's custom_translation_table)."""
    register_schemas()
    return {m.TORCH_OP: m.translate for m in _MODULES}


def install(model: onnx.ModelProto) -> None:
    """Add the function bodies of the ops the graph uses, and the domain's opset import."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    have = {(f.domain, f.name) for f in model.functions}
    for m in _MODULES:
        if m.OP_TYPE in used and (DOMAIN, m.OP_TYPE) not in have:
            model.functions.append(m.function_proto())
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))


__all__ = ["DOMAIN", "OPSET", "install", "translation_table", "register_schemas"]
