"""Rewrite: the projections that read one input, as one op each: q/k/v into the packed QKV that
onnxruntime's GroupQueryAttention takes as its first input, and the SwiGLU's gate (w1) and up
(w3) as one projection followed by a Split. At batch 1 every MatMul is a kernel call whatever its
width, so 7 a layer cost about a third more than 4.

`fusable` finds the groups (and says why a group was left apart), `concat` stacks their blocks
(quantized path, export/quant/nbits.py), `fuse_float_projections` stacks float weights (fp16).

    x ─┬─ wq ─┐                        x ─ qkv ─ GroupQueryAttention
       ├─ wk ─┼─ GroupQueryAttention   →
       └─ wv ─┘
    x ─┬─ w1 ─ gate                    x ─ w13 ─ Split ─┬─ gate
       └─ w3 ─ up                      →                └─ up
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from export.passes.graph import MS, replace_nodes, skip
from export.quant.blocks import Blocks
from export.quant.graph import Edit, consumers, linear_weights

NAME = "projection fusion"


def fused_names(layer: int, kind: str) -> tuple[str, str]:
    base = f"/model/layers.{layer}/{'attention/qkv' if kind == 'qkv' else 'feed_forward/w13'}"
    return base, base.removeprefix("/").replace("/", ".")


def rewire(kind, nodes, out, sizes, base, prefix, readers, new, init) -> None:
    """After one op computes a fused group into `out`: GroupQueryAttention reads the packed
    [B, S, (Nq + 2·Nkv)·Dh] QKV as its first input; gate and up are split apart again."""
    if kind == "qkv":
        gqa = readers[nodes[0].output[0]][0]
        gqa.input[0], gqa.input[1], gqa.input[2] = out, "", ""
        return
    new.append(
        helper.make_node(
            "Split",
            [out, init(f"{prefix}/split", np.array(sizes, np.int64))],
            [n.output[0] for n in nodes],
            name=f"{base}/Split",
            axis=-1,
        )
    )


def fusable(weights, readers, usable: Callable[[list[str]], bool]):
    """(layer, modules, "qkv" | "gate_up") for projections that read one input and can be one
    op: q/k/v when onnxruntime's GroupQueryAttention consumes them (it takes a packed QKV
    input), and the SwiGLU's gate (w1) and up (w3); `usable(modules)` says whether their
    weights can be stacked."""
    layers = sorted({int(m.split(".")[1]) for m in weights if m.startswith("layers.")})
    for i in layers:
        for kind, names in (("qkv", ("wq", "wk", "wv")), ("gate_up", ("w1", "w3"))):
            sub = "attention" if kind == "qkv" else "feed_forward"
            group = [f"layers.{i}.{sub}.{n}" for n in names]
            if not all(m in weights for m in group):
                continue  # (not a projection of this model, or kept in float)
            if not usable(group):
                skip(
                    NAME,
                    f"layer {i} {kind}",
                    "their weights cannot be stacked (one kept in float, or blocks differ)",
                )
                continue
            nodes = [weights[m][0] for m in group]
            if len({n.input[0] for n in nodes}) != 1:
                skip(NAME, f"layer {i} {kind}", "they do not read one input")
                continue
            if kind == "qkv":
                users = [readers.get(n.output[0], []) for n in nodes]
                gqa = users[0][0] if len(users[0]) == 1 else None
                if not (
                    gqa is not None
                    and gqa.op_type == "GroupQueryAttention"
                    and gqa.domain == MS
                    and all(len(u) == 1 and u[0] is gqa for u in users)
                    and list(gqa.input[:3]) == [n.output[0] for n in nodes]
                ):
                    skip(
                        NAME,
                        f"layer {i} qkv",
                        "onnxruntime's GroupQueryAttention is not their one reader",
                    )
                    continue
            yield i, group, kind


def concat(parts: list[Blocks]) -> Blocks:
    """Blocks of several weights with one input, stacked along N (one MatMulNBits for all)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    mid = 1 << (first.bits - 1)
    zps = [b.zero_points for b in parts]
    offs = [b.offsets for b in parts]
    return Blocks(
        first.bits,
        first.block_size,
        np.concatenate([b.codes for b in parts]),
        np.concatenate([b.scales for b in parts]),
        None
        if all(z is None for z in zps)
        else np.concatenate(
            [
                np.full(b.scales.shape, mid, np.uint8) if z is None else z
                for b, z in zip(parts, zps, strict=True)
            ]
        ),
        None
        if all(o is None for o in offs)
        else np.concatenate(
            [np.zeros_like(b.scales) if o is None else o for b, o in zip(parts, offs, strict=True)]
        ),
        "+".join(sorted({b.origin for b in parts})),
        carried=all(b.carried for b in parts),
    )


def fuse_float_projections(model: onnx.ModelProto) -> int:
    """q/k/v and gate/up as one float MatMul each, as the int4 path does: at batch 1 on a GPU
    every MatMul is a kernel of a few µs whatever its width. Returns how many groups were
    fused."""
    g = model.graph
    weights = linear_weights(model)
    readers = consumers(g)
    edit = Edit(model)
    fused = 0
    for layer, group, kind in fusable(weights, readers, lambda group: True):
        nodes = [weights[m][0] for m in group]
        base, prefix = fused_names(layer, kind)
        w_t = np.concatenate([weights[m][1].T for m in group], axis=1)  # [K, ΣN]
        new = [
            helper.make_node(
                "MatMul",
                [nodes[0].input[0], edit.init(f"{prefix}.weight_T", w_t)],
                [f"{prefix}/out"],
                name=f"{base}/MatMul",
            )
        ]
        sizes = [weights[m][1].shape[0] for m in group]
        rewire(kind, nodes, f"{prefix}/out", sizes, base, prefix, readers, new, edit.init)
        replace_nodes(g, nodes, new)
        fused += 1
    edit.commit()
    return fused
