"""llamaonnx.RMSNorm: one node per norm, body = the reference math.

Equivalent to the PyTorch code::

    x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (weight + offset)

    X ──► Mul(X, X) ──► ReduceMean(-1) ──► Add(eps) ──► Sqrt ──► Reciprocal ──┐
    X ──────────────────────────────────────────────────────────────────────► Mul ──► Mul ──► Y
                                                                     W ──► Add(offset) ──┘
offset is 0, or 1 for Gemma's (1 + w); the onnx23 and ort lowerings fold it into W.
"""

import onnx
import torch
from onnx.defs import OpSchema

from export.model import ops  # noqa: F401  (registers the torch ops)
from export.onnx.functions.common import DOMAIN, DOMAIN_VERSION, OPSET, op

OP_TYPE = "RMSNorm"
TORCH_OP = torch.ops.llamaonnx.rms_norm.default

SCHEMA = OpSchema(
    OP_TYPE,
    DOMAIN,
    DOMAIN_VERSION,
    doc="Root-mean-square normalization over the last axis, no mean subtraction, no bias.",
    inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("W", "T")],
    outputs=[OpSchema.FormalParameter("Y", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
    attributes=[
        OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "added to the mean square"),
        OpSchema.Attribute("offset", OpSchema.AttrType.FLOAT, "added to W (Gemma: 1)"),
    ],
)


def translate(x, weight, eps: float, offset: float):
    return OPSET.RMSNorm(x, weight, epsilon=eps, offset=offset)


def function_proto() -> onnx.FunctionProto:
    import onnxscript

    @onnxscript.script(OPSET, default_opset=op)
    def RMSNorm(X, W, epsilon: float, offset: float):
        mean_sq = op.ReduceMean(op.Mul(X, X), op.Constant(value_ints=[-1]), keepdims=1)
        eps = op.CastLike(op.Constant(value_float=epsilon), X)
        scale = op.Add(W, op.CastLike(op.Constant(value_float=offset), W))
        return op.Mul(op.Mul(X, op.Reciprocal(op.Sqrt(op.Add(mean_sq, eps)))), scale)

    return RMSNorm.to_function_proto()
