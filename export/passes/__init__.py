"""Lowering passes: each rewrites our llamaonnx nodes for one target and is verified against the
reference. `lower(model, target)` applies the one a target names."""

from __future__ import annotations

import onnx

TARGETS = ("portable", "onnx23", "ort")


def lower(model: onnx.ModelProto, target: str) -> onnx.ModelProto:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    if target == "portable":
        return model
    if target == "onnx23":
        from export.passes.onnx23 import lower_onnx23

        return lower_onnx23(model)
    from export.passes.ort import lower_ort

    return lower_ort(model)
