"""`logits_to_keep`: the LM head on the last n positions only, when the caller asks.

    hidden ─► [head MatMul] ─► … ─► logits (B, S, V)
    hidden ─► Slice(axis 1, from −logits_to_keep) ─► [head MatMul] ─► … ─► logits (B, n, V)

A prompt's prefill needs the next-token logits of its last position alone, yet computes the head
(vocab × hidden: a fifth of the default model's multiply-adds per token) and writes S × V floats
(25 MB for 130 tokens) for all of them. `logits_to_keep` is an int64 [1] initializer that is also
a graph input (onnxruntime: an overridable initializer), 0 by default: −0 slices from 0, so a
caller that does not feed it (verify, perplexity, onnxruntime-genai) gets every position as
before. The runtime feeds 1 where only the last position is read (transformers' argument of the
same name). Every target gets it; it touches no op of ours.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.errors import ExportError
from export.passes.graph import producers

NAME = "logits_to_keep"
HEADS = ("MatMul", "Gemm")


def keep_last(model: onnx.ModelProto) -> None:
    """Insert the slice before the head: follow `logits` back through its first inputs (a
    soft-capping Div/Tanh/Mul chain, if any) to the first MatMul."""
    g = model.graph
    if any(i.name == NAME for i in g.input):
        return
    made = producers(g)
    node = made.get("logits")
    while node is not None and node.op_type not in HEADS:
        node = made.get(node.input[0])
    if node is None:
        raise ExportError("the graph's logits do not come from a MatMul: no LM head found")
    hidden = node.input[0]
    g.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), NAME))
    g.input.append(helper.make_tensor_value_info(NAME, TensorProto.INT64, [1]))
    g.initializer.extend([
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max]), f"{NAME}/end"),
        numpy_helper.from_array(np.array([1]), f"{NAME}/axis"),
    ])  # fmt: skip
    sliced = f"{hidden}/kept"
    new = [
        helper.make_node("Neg", [NAME], [f"{NAME}/start"], name="/model/keep/neg"),
        helper.make_node(
            "Slice",
            [hidden, f"{NAME}/start", f"{NAME}/end", f"{NAME}/axis"],
            [sliced],
            name="/model/keep/slice",
        ),
    ]
    index = list(g.node).index(node)
    for k, n in enumerate(new):
        g.node.insert(index + k, n)
    node.input[0] = sliced


def drop_keep_last(model: onnx.ModelProto) -> bool:
    """Undo `keep_last` (every position's logits again); True if there was one to undo.

    For CUDA folders: Slice reads its start from host memory on onnxruntime's CUDA provider,
    while the Neg that computes it from the `logits_to_keep` input runs on the device, so
    onnxruntime puts a device-to-host copy in the graph, and a graph with copies cannot be
    captured as a CUDA graph ("all compute graph nodes have not been partitioned to the
    CUDAExecutionProvider", seen on an H200 with onnxruntime-gpu 1.31.1 for fp16 and int4
    folders). The H100 run of 2026-11-27, before `logits_to_keep`, captured the same graphs."""
    g = model.graph
    if not any(i.name == NAME for i in g.input):
        return False
    nodes = {n.name: n for n in g.node}
    neg, cut = nodes.get("/model/keep/neg"), nodes.get("/model/keep/slice")
    if neg is None or cut is None:
        raise ExportError(f"the graph has a {NAME} input but not the Neg and Slice that use it")
    for n in g.node:
        n.input[:] = [cut.input[0] if name == cut.output[0] else name for name in n.input]
    g.node.remove(neg)
    g.node.remove(cut)
    g.input.remove(next(i for i in g.input if i.name == NAME))
    dead = {NAME, f"{NAME}/end", f"{NAME}/axis"}
    for t in [t for t in g.initializer if t.name in dead]:
        g.initializer.remove(t)
    return True
