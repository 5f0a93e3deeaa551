"""llamaonnx's CPU kernel (runtime/native/, `ai.llamaonnx.MatMulQ4`): the packed layout
against the blocks it holds, both code paths against numpy, the onnxruntime binding, and clear
errors."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.errors import QuantizationError
from export.quant.blocks import Blocks, from_gguf, quantize
from export.quant.native import (
    ATTENTION,
    BLOCK,
    DOMAIN,
    GATHER8,
    OP,
    OP8,
    ROWS,
    SWIGLU,
    TILE,
    TILE8,
    pack,
    supports,
)
from runtime import native


def test_the_packer_and_the_library_share_one_tile_layout():
    assert native.layout() == {"rows": ROWS, "block": BLOCK, "tile": TILE, "tile8": TILE8}


# -- reading packed tiles back (test helpers) ----------------------------------------------------
def unpack8(packed: np.ndarray) -> np.ndarray:
    """W [N, K] float32 from a packed MatMulQ8 B (for tests)."""
    g, nb, _ = packed.shape
    c = packed[..., :512].reshape(g, nb, 8, ROWS, 4).transpose(0, 3, 1, 2, 4)  # g, r, b, v, i
    c = c.reshape(g * ROWS, nb, BLOCK).astype(np.float32)
    d = np.ascontiguousarray(packed[..., 512:544]).view(np.float16).astype(np.float32)
    d = d.reshape(g, nb, ROWS).transpose(0, 2, 1).reshape(g * ROWS, nb, 1)
    z = packed[..., 544:560].reshape(g, nb, ROWS).transpose(0, 2, 1).reshape(g * ROWS, nb, 1)
    return (d * (c - z.astype(np.float32))).reshape(g * ROWS, nb * BLOCK)


def fields(packed: np.ndarray) -> tuple[np.ndarray, ...]:
    """codes q [N, K], d, m [N, nb] float32 and z [N, nb] from a packed B (for tests)."""
    g, nb, _ = packed.shape
    codes = packed[..., :256].reshape(g, nb, 4, ROWS, 4)  # g, b, v, r, i
    q = np.stack([codes & 15, codes >> 4], axis=-1)  # g, b, v, r, i, half
    q = q.transpose(0, 3, 1, 2, 5, 4).reshape(g * ROWS, nb * BLOCK)

    def per_row(lo: int, width: int, dtype) -> np.ndarray:
        x = np.ascontiguousarray(packed[..., lo : lo + width]).view(dtype)
        return x.reshape(g, nb, ROWS).transpose(0, 2, 1).reshape(g * ROWS, nb)

    d = per_row(256, 2 * ROWS, np.float16).astype(np.float32)
    m = per_row(288, 2 * ROWS, np.float16).astype(np.float32)
    return q, d, m, per_row(320, ROWS, np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    """W [N, K] float32 from a packed B: what the kernel multiplies by (for tests)."""
    q, d, m, _ = fields(packed)
    return np.repeat(d, BLOCK, axis=1) * q + np.repeat(m, BLOCK, axis=1)


def q4_1(n: int, k: int, seed: int = 0) -> Blocks:
    """Random GGUF Q4_1 blocks (fp16 d and m), read the way the GGUF loader reads them."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    raw = np.zeros((n, nb, 20), np.uint8)
    raw[..., 0:2] = (rng.random((n, nb, 1)) * 0.02 + 1e-3).astype(np.float16).view(np.uint8)
    raw[..., 2:4] = (-rng.random((n, nb, 1)) * 0.15).astype(np.float16).view(np.uint8)
    raw[..., 4:] = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    return from_gguf("Q4_1", raw.reshape(n, nb * 20), k)


def q8_0(n: int, k: int, seed: int = 0) -> Blocks:
    """Random GGUF Q8_0 blocks, the LM head's format."""
    rng = np.random.default_rng(seed)
    raw = np.zeros((n, k // 32, 34), np.uint8)
    raw[..., 0:2] = (rng.random((n, k // 32, 1)) * 0.01).astype(np.float16).view(np.uint8)
    raw[..., 2:] = rng.integers(0, 256, (n, k // 32, 32), dtype=np.uint8)
    return from_gguf("Q8_0", raw.reshape(n, -1), k)


def rounded(a: np.ndarray) -> np.ndarray:
    """a with each block of 32 rounded to int8 steps, in float32 as the kernel does it."""
    blocks = a.reshape(*a.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.float32(127) / np.where(amax == 0, np.float32(1), amax)
    codes = np.rint(blocks * inv).astype(np.float64)
    return (codes * (amax / np.float32(127)).astype(np.float64)).reshape(a.shape)


def reference(a: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """What the kernel computes: the codes centred on z times the activations rounded to int8 per
    block of 32, plus the rest of each weight, (m + z·d), times the exact block sums."""
    q, d, m, z = (x.astype(np.float64) for x in fields(packed))
    centred = np.repeat(d, 32, axis=1) * (q - np.repeat(z, 32, axis=1))
    rest = np.repeat(m + z * d, 32, axis=1)
    return (rounded(a) @ centred.T + a.astype(np.float64) @ rest.T).astype(np.float32)


def test_packed_tiles_hold_the_blocks():
    """GGUF's Q4_1 exactly (its d and m are fp16); blocks quantized here from floats to fp16's
    precision in d and m, a few hundredths of a quantization step."""
    gguf = q4_1(48, 96)
    packed = pack(gguf)
    assert packed.shape == (3, 3, 336)
    np.testing.assert_array_equal(unpack(packed), gguf.dequantize())
    w = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    for symmetric in (True, False):
        blocks = quantize(w, 4, 32, symmetric)
        step = np.abs(np.repeat(blocks.scales, 32, axis=1))  # (symmetric scales may be < 0)
        assert np.all(np.abs(unpack(pack(blocks)) - blocks.dequantize()) <= step / 50)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("n,k,m", [(16, 32, 1), (48, 96, 3), (64, 576, 5), (960, 576, 1)])
def test_kernel_matches_numpy(n, k, m, portable):
    blocks = q4_1(n, k, seed=n + k)
    packed = pack(blocks)
    a = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    y = np.zeros((m, n), np.float32)
    lib = native.library()
    try:
        lib.llamaonnx_fast_path(int(portable))
        assert (
            lib.llamaonnx_matmul(4, a.ctypes.data, m, k, packed.ctypes.data, n, y.ctypes.data) == 0
        )
    finally:
        lib.llamaonnx_fast_path(0)
    want = reference(a, packed)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    exact = a @ blocks.dequantize().T  # int8 activations: llama.cpp's Q4_1 error, no more
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 2e-2


@pytest.mark.parametrize("portable", [False, True])
def test_8bit_head_kernel_and_its_gather_match_numpy(portable):
    """MatMulQ8 (the LM head) computes the centred codes times the rounded activations; GatherQ8
    (the tied embedding) returns the rows exactly."""
    blocks = q8_0(64, 96)
    packed = pack(blocks)
    assert packed.shape == (4, 3, 560)
    np.testing.assert_array_equal(unpack8(packed), blocks.dequantize())
    lib = native.library()
    a = np.random.default_rng(3).standard_normal((5, 96)).astype(np.float32)
    y = np.zeros((5, 64), np.float32)
    try:
        lib.llamaonnx_fast_path(int(portable))
        assert (
            lib.llamaonnx_matmul(8, a.ctypes.data, 5, 96, packed.ctypes.data, 64, y.ctypes.data)
            == 0
        )
    finally:
        lib.llamaonnx_fast_path(0)
    want = rounded(a) @ unpack8(packed).T.astype(np.float64)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    ids = np.array([0, 63, 17, -1], np.int64)
    rows = np.zeros((4, 96), np.float32)
    assert (
        lib.llamaonnx_gather_q8(packed.ctypes.data, 64, 96, ids.ctypes.data, 4, rows.ctypes.data)
        == 0
    )
    np.testing.assert_array_equal(rows, blocks.dequantize()[ids])
    bad = np.array([1, 64], np.int64)
    assert (
        lib.llamaonnx_gather_q8(packed.ctypes.data, 64, 96, bad.ctypes.data, 2, rows.ctypes.data)
        == 2
    )


def test_gather_op_in_onnxruntime_and_its_error():
    packed = pack(q8_0(32, 64))
    node = helper.make_node(GATHER8, ["b", "ids"], ["rows"], domain=DOMAIN)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(packed, "b")],
    )
    sess = _load(graph)
    ids = np.array([[1, 2, 31], [0, 0, 5]], np.int64)
    (rows,) = sess.run(None, {"ids": ids})
    np.testing.assert_array_equal(rows, unpack8(packed)[ids])
    with pytest.raises(Exception, match="outside the vocabulary"):
        sess.run(None, {"ids": np.array([[32]], np.int64)})


def _load(graph, threads: int = 2) -> ort.InferenceSession:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(str(native.library_path()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _session(packed: np.ndarray, k: int, threads: int = 2) -> ort.InferenceSession:
    node = helper.make_node(OP if packed.shape[2] == 336 else OP8, ["a", "b"], ["y"], domain=DOMAIN)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(packed, "b")],
    )
    return _load(graph, threads)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (1, 130)])
def test_onnxruntime_op_matches_numpy_across_threads(shape):
    blocks = q4_1(1024, 192)
    packed = pack(blocks)
    a = np.random.default_rng(7).standard_normal((*shape, 192)).astype(np.float32)
    want = reference(a, packed)
    head = pack(q8_0(512, 192))
    want8 = rounded(a) @ unpack8(head).T.astype(np.float64)
    for threads in (1, 2):
        (y,) = _session(head, 192, threads).run(None, {"a": a})
        np.testing.assert_allclose(y, want8, rtol=1e-4, atol=1e-4 * np.abs(want8).max())
        (y,) = _session(packed, 192, threads).run(None, {"a": a})
        assert y.shape == (*shape, 1024)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_swiglu_op_is_silu_of_the_gate_times_the_up_rows():
    gate_up = q4_1(128, 96, seed=5)  # 64 gate rows, then 64 up rows
    packed = pack(gate_up)
    node = helper.make_node(SWIGLU, ["a", "b"], ["h"], domain=DOMAIN)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq", 96])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(packed, "b")],
    )
    a = np.random.default_rng(9).standard_normal((2, 5, 96)).astype(np.float32)
    both = reference(a, packed)
    g, u = both[..., :64].astype(np.float64), both[..., 64:]
    want = g / (1 + np.exp(-g)) * u
    for threads in (1, 2):
        (h,) = _load(graph, threads).run(None, {"a": a})
        assert h.shape == (2, 5, 64)
        np.testing.assert_allclose(h, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_wrong_inputs_get_clear_errors():
    packed = pack(q4_1(32, 64))
    sess = _session(packed[:, :1], 64)  # B says K = 32, the graph says 64
    with pytest.raises(Exception, match="K = 32"):
        sess.run(None, {"a": np.zeros((1, 1, 64), np.float32)})
    with pytest.raises(QuantizationError, match="blocks of 32"):
        pack(quantize(np.zeros((32, 64), np.float32), 4, 64, False))
    assert not supports(quantize(np.zeros((24, 64), np.float32), 4, 32, False))  # N % 16


def test_missing_library_says_how_to_build_it(monkeypatch, tmp_path):
    from runtime.errors import ModelFolderError

    monkeypatch.setattr(native, "HERE", tmp_path)
    with pytest.raises(ModelFolderError, match="pip install -e"):
        native.library_path()
    assert not native.available()


def test_this_machine_runs_the_fast_path_or_says_so():
    """Not a speed test: records which code path CI's CPU takes (both are checked above)."""
    assert native.fast_path() in (True, False)


# -- attention -------------------------------------------------------------------------------------
H, HKV, D, LEN = 6, 2, 64, 64


def _gqa(ours: bool, qkv, key, value, seqlens, total, tables):
    """One attention node — onnxruntime's GroupQueryAttention or ours — run on a shared cache
    buffer as the runtime binds it; returns the output and the cache after."""
    cos, sin = tables
    if ours:
        inputs = ["qkv", "pk", "pv", "sl", "tot", "cos", "sin"]
        attrs = {"domain": DOMAIN}
    else:
        inputs = ["qkv", "", "", "pk", "pv", "sl", "tot", "cos", "sin"]
        attrs = {"domain": "com.microsoft", "do_rotary": 1, "rotary_interleaved": 0}
    node = helper.make_node(
        ATTENTION, inputs, ["o", "k", "v"], num_heads=H, kv_num_heads=HKV, scale=0.125, **attrs
    )
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "g",
        [
            info("qkv", TensorProto.FLOAT, list(qkv.shape)),
            info("pk", TensorProto.FLOAT, list(key.shape)),
            info("pv", TensorProto.FLOAT, list(value.shape)),
            info("sl", TensorProto.INT32, [len(seqlens)]),
            info("tot", TensorProto.INT32, []),
        ],
        [info(n, TensorProto.FLOAT, None) for n in "okv"],
        [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 21),
            helper.make_opsetid("com.microsoft", 1),
            helper.make_opsetid(DOMAIN, 1),
        ],
    )
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(native.library_path()))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    key, value = key.copy(), value.copy()  # bound as past and present: written in place
    k, v = ort.OrtValue.ortvalue_from_numpy(key), ort.OrtValue.ortvalue_from_numpy(value)
    b = sess.io_binding()
    b.bind_cpu_input("qkv", qkv)
    b.bind_ortvalue_input("pk", k)
    b.bind_ortvalue_input("pv", v)
    b.bind_cpu_input("sl", np.asarray(seqlens, np.int32))
    b.bind_cpu_input("tot", np.array(total, np.int32))
    b.bind_output("o", "cpu")
    b.bind_ortvalue_output("k", k)
    b.bind_ortvalue_output("v", v)
    sess.run_with_iobinding(b)
    return b.get_outputs()[0].numpy(), key, value


@pytest.mark.parametrize("portable", [False, True])
def test_attention_matches_onnxruntime_group_query_attention(portable):
    """A padded two-row prompt, a decode step, then a second chunk of three tokens: the same
    outputs and cache as onnxruntime's kernel (on the rows' real tokens)."""
    pos = np.arange(LEN)[:, None] * 10000.0 ** (-np.arange(D // 2) / (D // 2))[None]
    tables = (np.cos(pos).astype(np.float32), np.sin(pos).astype(np.float32))
    width = (H + 2 * HKV) * D
    lib = native.library()
    try:
        lib.llamaonnx_fast_path(int(portable))
        both = {}
        for ours in (False, True):
            cache = np.zeros((2, HKV, LEN, D), np.float32)
            prompt = np.random.default_rng(1).standard_normal((2, 37, width)).astype(np.float32)
            o1, k, v = _gqa(ours, prompt, cache, cache, [36, 20], 37, tables)
            step = np.random.default_rng(2).standard_normal((2, 1, width)).astype(np.float32)
            o2, k, v = _gqa(ours, step, k, v, [37, 21], 38, tables)
            chunk = np.random.default_rng(3).standard_normal((1, 3, width)).astype(np.float32)
            o3, k3, _ = _gqa(ours, chunk, k[:1], v[:1], [40], 41, tables)
            both[ours] = (o1, o2, o3, k, v, k3)
    finally:
        lib.llamaonnx_fast_path(0)
    (a1, a2, a3, ak, av, ak3), (b1, b2, b3, bk, bv, bk3) = both[False], both[True]
    close = dict(rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(b1[0], a1[0], **close)
    np.testing.assert_allclose(b1[1, :21], a1[1, :21], **close)  # row 1: 21 real tokens
    np.testing.assert_allclose(b2, a2, **close)
    np.testing.assert_allclose(b3, a3, **close)
    np.testing.assert_allclose(bk[0, :, :38], ak[0, :, :38], **close)
    np.testing.assert_allclose(bv[1, :, :22], av[1, :, :22], **close)
    np.testing.assert_allclose(bk3[0, :, :41], ak3[0, :, :41], **close)
