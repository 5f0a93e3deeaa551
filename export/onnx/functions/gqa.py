"""llamaonnx.GroupQueryAttention: attention over the cache with kv heads shared by query groups.

Shape legend: B batch, S new tokens, P past, T = P + S, H query heads, Hkv kv heads, Dh head dim.

Equivalent to the PyTorch code (export/model/ops.py `gqa`)::

    present_k = cat(past_k, k.view(B, S, Hkv, Dh).transpose(1, 2), dim=2)       # (B, Hkv, T, Dh)
    keys = present_k.repeat_interleave(H // Hkv, dim=1)                          # (B, H, T, Dh)
    s = q.view(B, S, H, Dh).transpose(1, 2) @ keys.transpose(2, 3) * scale
    s = softcap · tanh(s / softcap)                           # where softcap > 0 (Gemma 2)
    out = (softmax(s + bias) @ values).transpose(1, 2).reshape(B, S, H·Dh)

sliding_window only declares the window the bias already applies (export/model/ops.py), for the
lowering to kernels that build their own mask from sequence lengths.

    q ─► Reshape/Transpose ──────────────────────────────────┐
    k ─► Reshape/Transpose ─► Concat(past_k) ─► present_k ─► Unsqueeze/Expand/Reshape (repeat) ─┤
                         MatMul ─► Mul(scale) ─► softcap ─► Add(bias) ─► Softmax ─► MatMul(values)
    v ─► Reshape/Transpose ─► Concat(past_v) ─► present_v ─► repeat ──────────────────────┘
                                                            ─► Transpose/Reshape ─► Y (B, S, H·Dh)
"""

import onnx
import torch
from onnx.defs import OpSchema

from export.model import ops  # noqa: F401  (registers the torch ops)
from export.onnx.functions.common import DOMAIN, DOMAIN_VERSION, OPSET, op

OP_TYPE = "GroupQueryAttention"
TORCH_OP = torch.ops.llamaonnx.gqa.default

_P = OpSchema.FormalParameter
SCHEMA = OpSchema(
    OP_TYPE,
    DOMAIN,
    DOMAIN_VERSION,
    doc="Causal grouped-query attention over concat(past, new) keys/values with an additive bias.",
    inputs=[
        _P("query", "T"),
        _P("key", "T"),
        _P("value", "T"),
        _P("past_key", "T"),
        _P("past_value", "T"),
        _P("attn_bias", "T"),
    ],
    outputs=[_P("Y", "T"), _P("present_key", "T"), _P("present_value", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
    attributes=[
        OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads H"),
        OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads Hkv"),
        OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "usually Dh ** -0.5"),
        OpSchema.Attribute("softcap", OpSchema.AttrType.FLOAT, "cap · tanh(s / cap); 0: none"),
        OpSchema.Attribute(
            "sliding_window", OpSchema.AttrType.INT, "the window the bias applies; 0: none"
        ),
    ],
)


def translate(
    q,
    k,
    v,
    past_k,
    past_v,
    bias,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    softcap: float,
    window: int,
):
    return OPSET.GroupQueryAttention(
        q,
        k,
        v,
        past_k,
        past_v,
        bias,
        num_heads=num_heads,
        kv_num_heads=num_kv_heads,
        scale=scale,
        softcap=softcap,
        sliding_window=window,
        _num_outputs=3,
    )


def function_proto() -> onnx.FunctionProto:
    import onnxscript

    @onnxscript.script(OPSET, default_opset=op)
    def GroupQueryAttention(
        query,
        key,
        value,
        past_key,
        past_value,
        attn_bias,
        num_heads: int,
        kv_num_heads: int,
        scale: float,
        softcap: float,
        sliding_window: int,
    ):
        zero_zero = op.Constant(value_ints=[0, 0])
        minus_one = op.Constant(value_ints=[-1])
        h = op.Unsqueeze(op.Constant(value_int=num_heads), op.Constant(value_ints=[0]))
        hkv = op.Unsqueeze(op.Constant(value_int=kv_num_heads), op.Constant(value_ints=[0]))
        q4 = op.Transpose(
            op.Reshape(query, op.Concat(zero_zero, h, minus_one, axis=0)), perm=[0, 2, 1, 3]
        )
        k4 = op.Transpose(
            op.Reshape(key, op.Concat(zero_zero, hkv, minus_one, axis=0)), perm=[0, 2, 1, 3]
        )
        v4 = op.Transpose(
            op.Reshape(value, op.Concat(zero_zero, hkv, minus_one, axis=0)), perm=[0, 2, 1, 3]
        )
        present_key = op.Concat(past_key, k4, axis=2)  # (B, Hkv, T, Dh)
        present_value = op.Concat(past_value, v4, axis=2)
        # repeat_interleave over heads: (B, Hkv, T, Dh) → (B, Hkv, n_rep, T, Dh) → (B, H, T, Dh)
        shape = op.Shape(present_key)
        n_rep = op.Div(h, hkv)
        expanded = op.Concat(op.Slice(shape, [0], [2]), n_rep, op.Slice(shape, [2], [4]), axis=0)
        out_shape = op.Concat(op.Slice(shape, [0], [1]), h, op.Slice(shape, [2], [4]), axis=0)
        axis2 = op.Constant(value_ints=[2])
        keys = op.Reshape(op.Expand(op.Unsqueeze(present_key, axis2), expanded), out_shape)
        values = op.Reshape(op.Expand(op.Unsqueeze(present_value, axis2), expanded), out_shape)
        scores = op.MatMul(q4, op.Transpose(keys, perm=[0, 1, 3, 2]))  # (B, H, S, T)
        scores = op.Mul(scores, op.CastLike(op.Constant(value_float=scale), scores))
        cap = op.CastLike(op.Constant(value_float=softcap), scores)
        capped = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
        scores = op.Where(op.Greater(cap, op.CastLike(0.0, cap)), capped, scores)
        scores = op.Add(scores, attn_bias)
        probs = op.Softmax(scores, axis=-1)
        out = op.Transpose(op.MatMul(probs, values), perm=[0, 2, 1, 3])  # (B, S, H, Dh)
        Y = op.Reshape(out, op.Concat(zero_zero, minus_one, axis=0))
        return Y, present_key, present_value

    return GroupQueryAttention.to_function_proto()
