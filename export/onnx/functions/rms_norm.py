"""llamaonnx.RMSNorm: one node per norm, body = the reference math.

Equivalent to the PyTorch code::

    x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    X ──► Mul(X, X) ──► ReduceMean(-1) ──► Add(eps) ──► Sqrt ──► Reciprocal ──┐
    X ──────────────────────────────────────────────────────────────────────► Mul ──► Mul(W) ──► Y
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
    attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "added to the mean square")],
)


def translate(x, weight, eps: float):
    return OPSET.RMSNorm(x, weight, epsilon=eps)


def function_proto() -> onnx.FunctionProto:
    import onnxscript

    @onnxscript.script(OPSET, default_opset=op)
    def RMSNorm(X, W, epsilon: float):
        mean_sq = op.ReduceMean(op.Mul(X, X), op.Constant(value_ints=[-1]), keepdims=1)
        eps = op.CastLike(op.Constant(value_float=epsilon), X)
        return op.Mul(op.Mul(X, op.Reciprocal(op.Sqrt(op.Add(mean_sq, eps)))), W)

    return RMSNorm.to_function_proto()
