"""Rewrite: a native gate/up projection and the SwiGLU after it → one `MatMulQ4SwiGLU` (or,
for a `MatMulQ8` one, `MatMulQ8SwiGLU`: Q8_0 and Q6_K files' gate/up).

Contract:

    x ─ MatMulQ4 (w13) ─ Split ─┬─ gate ─┬─ Sigmoid ─┐
                                │        └──────────── Mul (silu) ─┐
                                └─ up ───────────────────────────── Mul ─ out

becomes `MatMulQ4SwiGLU(x, tiles) → out`, computing silu(gate)·up in the kernel: 4 ops fewer a
layer. Only where every intermediate value has exactly these readers; else `skip` says which
did not.
"""

from __future__ import annotations

import onnx
from onnx import helper

from export.passes.graph import producers, replace_nodes, skip
from export.quant.graph import consumers
from export.quant.native import DOMAIN, OP, OP8, SWIGLU, SWIGLU8

NAME = "SwiGLU fusion"


def fuse_swiglu(g: onnx.GraphProto) -> int:
    """Rewrites in place; returns how many were fused."""
    made_by = producers(g)
    users = consumers(g)

    def only_user(name: str, op: str) -> onnx.NodeProto | None:
        found = users.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    fused = 0
    fused_op = {OP: SWIGLU, OP8: SWIGLU8}
    for mm in [n for n in g.node if n.op_type in fused_op and n.name.endswith(f"/w13/{n.op_type}")]:
        split = only_user(mm.output[0], "Split")
        if split is None or len(split.output) != 2:
            skip(NAME, mm.name, "its output is not read by one Split in two")
            continue
        gate, up = split.output
        sig = next((n for n in users.get(gate, []) if n.op_type == "Sigmoid"), None)
        silu = sig and only_user(sig.output[0], "Mul")
        if silu is None or sorted(silu.input) != sorted([gate, sig.output[0]]):
            skip(NAME, mm.name, "the gate does not go through Sigmoid and Mul (silu)")
            continue
        if len(users.get(gate, [])) != 2:
            skip(NAME, mm.name, "the gate has readers besides the silu")
            continue
        prod = only_user(silu.output[0], "Mul")
        if prod is None or sorted(prod.input) != sorted([silu.output[0], up]):
            skip(NAME, mm.name, "silu(gate) is not multiplied by up alone")
            continue
        if len(users.get(up, [])) != 1 or made_by.get(up) is not split:
            skip(NAME, mm.name, "up has other readers")
            continue
        op = fused_op[mm.op_type]
        new = helper.make_node(
            op,
            list(mm.input),
            [prod.output[0]],
            name=mm.name.replace(mm.op_type, op),
            domain=DOMAIN,
        )
        new.attribute.extend(mm.attribute)  # (its tiles' layout, and digits where marked)
        replace_nodes(g, [mm, split, sig, silu, prod], [new])
        fused += 1
    return fused
