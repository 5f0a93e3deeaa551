"""llamaonnx.RotaryEmbedding: RoPE on (B, S, N·Dh) in the rotate-half layout, one node per use.

Shape legend: B batch, S tokens, N heads, Dh head dim, Tmax table length.

Equivalent to the PyTorch code::

    x4 = x.reshape(B, S, N, Dh); cos = cos_table[position_ids][:, :, None]; sin = ...
    x1, x2 = x4.chunk(2, -1)
    y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).reshape(B, S, N·Dh)

    X ─► Reshape(B,S,N,Dh) ─► Split ─► x1, x2 ─┐
    position_ids ─► Gather(cos_table), Gather(sin_table) ─► Unsqueeze(2) ─┤
                              x1·cos − x2·sin, x2·cos + x1·sin ─► Concat ─► Reshape(B,S,N·Dh) ─► Y
"""

import onnx
import torch
from onnx.defs import OpSchema

from export.model import ops  # noqa: F401  (registers the torch ops)
from export.onnx.functions.common import DOMAIN, DOMAIN_VERSION, OPSET, op

OP_TYPE = "RotaryEmbedding"
TORCH_OP = torch.ops.llamaonnx.rope.default

SCHEMA = OpSchema(
    OP_TYPE,
    DOMAIN,
    DOMAIN_VERSION,
    doc="Rotary position embedding, rotate-half layout, cos/sin gathered by position id.",
    inputs=[
        OpSchema.FormalParameter("X", "T"),
        OpSchema.FormalParameter("position_ids", "tensor(int64)"),
        OpSchema.FormalParameter("cos_table", "T"),
        OpSchema.FormalParameter("sin_table", "T"),
    ],
    outputs=[OpSchema.FormalParameter("Y", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
    attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads packed in X")],
)


def translate(x, position_ids, cos_table, sin_table, num_heads: int):
    return OPSET.RotaryEmbedding(x, position_ids, cos_table, sin_table, num_heads=num_heads)


def function_proto() -> onnx.FunctionProto:
    import onnxscript

    @onnxscript.script(OPSET, default_opset=op)
    def RotaryEmbedding(X, position_ids, cos_table, sin_table, num_heads: int):
        zero_zero = op.Constant(value_ints=[0, 0])
        heads = op.Unsqueeze(op.Constant(value_int=num_heads), op.Constant(value_ints=[0]))
        minus_one = op.Constant(value_ints=[-1])
        x4 = op.Reshape(X, op.Concat(zero_zero, heads, minus_one, axis=0))  # (B, S, N, Dh)
        axis2 = op.Constant(value_ints=[2])
        cos = op.Unsqueeze(op.Gather(cos_table, position_ids), axis2)  # (B, S, 1, Dh/2)
        sin = op.Unsqueeze(op.Gather(sin_table, position_ids), axis2)
        x1, x2 = op.Split(x4, axis=-1, num_outputs=2)
        y1 = op.Sub(op.Mul(x1, cos), op.Mul(x2, sin))
        y2 = op.Add(op.Mul(x2, cos), op.Mul(x1, sin))
        y4 = op.Concat(y1, y2, axis=-1)
        return op.Reshape(y4, op.Concat(zero_zero, minus_one, axis=0))  # (B, S, N·Dh)

    return RotaryEmbedding.to_function_proto()
