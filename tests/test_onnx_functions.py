"""Twin tests: each llamaonnx function body, run alone in onnxruntime, equals its torch op."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from export.model import ops
from export.onnx import functions as onnx_functions
from export.onnx.functions import gqa, rms_norm, rope
from export.onnx.functions.common import ONNX_OPSET


def _run(module, inputs: dict, n_outputs: int, **attrs):
    names = list(inputs)
    outs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(module.OP_TYPE, names, outs, domain=onnx_functions.DOMAIN, **attrs)
    dtype = {np.float32: TensorProto.FLOAT, np.int64: TensorProto.INT64}
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(k, dtype[v.dtype.type], None) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    onnx_functions.install(model)
    assert [n.op_type for n in model.graph.node] == [module.OP_TYPE]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama's w, Gemma's (1 + w)
def test_rms_norm_function_equals_torch(offset):
    x, w = np.random.randn(2, 3, 16).astype(np.float32), np.random.randn(16).astype(np.float32)
    (y,) = _run(rms_norm, {"X": x, "W": w}, 1, epsilon=1e-5, offset=offset)
    want = ops.rms_norm(torch.from_numpy(x), torch.from_numpy(w), 1e-5, offset).numpy()
    np.testing.assert_allclose(y, want, atol=1e-5)
    plain = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * (w + offset)
    np.testing.assert_allclose(y, plain, atol=1e-5)


def test_rope_function_equals_torch():
    x = np.random.randn(2, 4, 3 * 8).astype(np.float32)
    pos = np.random.randint(0, 32, (2, 4)).astype(np.int64)
    ang = np.outer(np.arange(32), 10000.0 ** (-np.arange(4) * 2 / 8))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    (y,) = _run(rope, {"X": x, "P": pos, "C": cos, "S": sin}, 1, num_heads=3)
    want = ops.rope(*(torch.from_numpy(a) for a in (x, pos, cos, sin)), 3).numpy()
    np.testing.assert_allclose(y, want, atol=1e-5)


@pytest.mark.parametrize(
    "h,hkv,past,softcap,window",
    [(4, 2, 3, 0.0, 0), (4, 1, 0, 0.0, 0), (3, 3, 2, 0.0, 0), (4, 2, 3, 0.5, 0), (4, 1, 4, 2.0, 3)],
)
def test_gqa_function_equals_torch(h, hkv, past, softcap, window):
    b, s, dh = 2, 3, 8
    r = lambda *shape: np.random.randn(*shape).astype(np.float32)
    mask = np.ones((b, past + s), np.int64)
    mask[1, 0] = 0
    bias = ops.attention_bias(torch.from_numpy(mask), s, torch.float32).numpy()
    inputs = {
        "q": r(b, s, h * dh),
        "k": r(b, s, hkv * dh),
        "v": r(b, s, hkv * dh),
        "pk": r(b, hkv, past, dh),
        "pv": r(b, hkv, past, dh),
        "bias": bias,
    }
    got = _run(
        gqa,
        inputs,
        3,
        num_heads=h,
        kv_num_heads=hkv,
        scale=dh**-0.5,
        softcap=softcap,
        sliding_window=window,
    )
    args = (h, hkv, dh**-0.5, softcap, window)
    want = ops.gqa(*(torch.from_numpy(a) for a in inputs.values()), *args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5)
