"""Lowering passes: our llamaonnx nodes rewritten for one target, each result verified against
the reference. One file per op, as in export/onnx/functions/: rms_norm.py, rope.py, gqa.py, each
with a `to_<target>` rewrite per target that changes it, its contract and its diagram. The
order per target is below; `portable` keeps our nodes with their function bodies. Every target
first gets `logits_to_keep` (logits.py: the LM head on the last positions only, when asked)."""

from __future__ import annotations

import onnx

from export.errors import ExportError
from export.passes import gqa, logits, rms_norm, rope
from export.passes.graph import MS, ensure_opset, prune

# rotary before attention on onnx23; on ort, GroupQueryAttention absorbs the rotary nodes first
PASSES = {
    "portable": (),
    "onnx23": (rms_norm.to_onnx23, rope.to_onnx23, gqa.to_onnx23),
    "ort": (gqa.to_ort, rms_norm.to_ort),
}
TARGETS = tuple(PASSES)


def lower(model: onnx.ModelProto, target: str) -> onnx.ModelProto:
    """Rewrites `model` in place for `target` and returns it."""
    if target not in PASSES:
        raise ExportError(f"unknown target {target!r}; choose one of {TARGETS}")
    logits.keep_last(model)
    if not PASSES[target]:
        return model
    for rewrite in PASSES[target]:
        rewrite(model.graph)
    prune(model)
    if target == "ort":
        ensure_opset(model, MS, 1)
    return model
