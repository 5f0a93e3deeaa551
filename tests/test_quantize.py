"""Quantization: block math against onnxruntime's kernels, GGUF blocks read exactly, every
precision round-tripping on tiny models of every target, and clear errors for bad settings."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.errors import QuantizationError
from export.quant import QuantSettings, quantize_folder
from export.quant.blocks import (
    FINE,
    Blocks,
    from_gguf,
    gguf_bits,
    held_offsets,
    offset_rows,
    quantize,
    sum_repeats,
)
from export.quant.native import LAYOUT, LAYOUT_OLDEST
from runtime import native
from runtime.errors import OutputFolderError
from tests.gguf_writer import encode_blocks, random_blocks

L = 2  # layers of the tiny presets


def _matmul_nbits(blocks, a: np.ndarray, level: int, k: int | None = None) -> np.ndarray:
    """Runs one MatMulNBits node holding `blocks` (K inputs: `k`, or all the blocks hold) on
    onnxruntime's CPU provider."""
    import onnxruntime as ort

    n, k = blocks.shape[0], k or blocks.shape[1]
    inputs = ["a", "q", "s"]
    inits = [
        numpy_helper.from_array(blocks.packed(), "q"),
        numpy_helper.from_array(blocks.scales, "s"),
    ]
    if blocks.zero_points is not None:
        inputs.append("z")
        inits.append(numpy_helper.from_array(blocks.packed_zero_points(), "z"))
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=blocks.bits,
        block_size=blocks.block_size,
        accuracy_level=level,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"a": a})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_blocks_pack_as_matmul_nbits_reads_them(bits, symmetric, block_size):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 256)).astype(np.float32)
    blocks = quantize(w, bits, block_size, symmetric)
    deq = blocks.dequantize()
    # round to nearest: every weight within half a step (plus the clipping the search chose)
    rel = np.sqrt(((deq - w) ** 2).mean() / (w**2).mean())
    assert rel < (0.12 if bits == 4 else 0.01)
    a = rng.standard_normal((3, 256)).astype(np.float32)
    np.testing.assert_allclose(_matmul_nbits(blocks, a, level=0), a @ deq.T, rtol=1e-4, atol=1e-4)


CARRIED = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", CARRIED)
def test_gguf_blocks_are_read_exactly(type_name):
    """Random codes, scales and minimums in GGML's byte layout: our reading dequantizes to what
    the gguf package's own dequantizer gives, and MatMulNBits computes with exactly that (the
    offsets of Q4_1 / Q5_1 / Q4_K / Q5_K to their 8-bit rows' rounding, bounded below)."""
    import gguf

    k = 512
    raw = random_blocks(type_name, 8, k, seed=len(type_name))
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(8, k)
    blocks = from_gguf(type_name, raw, k)
    assert blocks.carried and blocks.origin == f"gguf-{type_name}"
    assert blocks.bits == (4 if type_name in ("Q4_0", "Q4_1", "Q4_K") else 8)
    assert blocks.block_size == (16 if type_name == "Q6_K" else 32)
    np.testing.assert_allclose(blocks.dequantize(), want, rtol=1e-6, atol=1e-7)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, k)).astype(np.float32)
    if blocks.offsets is None:  # MatMulNBits alone holds the block exactly
        np.testing.assert_allclose(
            _matmul_nbits(blocks, a, 0), a @ want.T, rtol=1e-4, atol=1e-4 * np.abs(want).max()
        )
        return
    # the offsets ride as two 4-bit digits on the block sums, [a, S_0, S_0/FINE, S_1, …]
    nb = k // 32
    merged, wide_k = offset_rows(blocks)
    assert wide_k == k + 2 * nb
    held = held_offsets(blocks.offsets)
    step = np.abs(blocks.offsets).max(1, keepdims=True) / 7
    assert np.all(np.abs(held - blocks.offsets) <= step / (2 * FINE) + 1e-7)
    sums = a.reshape(2, nb, 32).sum(-1)
    pairs = np.stack([sums, sums / FINE], axis=-1).reshape(2, 2 * nb)
    wide = np.concatenate([a, pairs], axis=1)
    codes_part = (blocks.dequantize() - np.repeat(blocks.offsets, 32, axis=1)).T
    exact_held = a @ codes_part + sums @ held.T
    got = _matmul_nbits(merged, wide, 0, wide_k)
    np.testing.assert_allclose(got, exact_held, rtol=1e-4, atol=1e-4 * np.abs(exact_held).max())
    bound = np.abs(sums).sum(1, keepdims=True) * step.T / (2 * FINE)  # [batch, N]
    assert np.all(np.abs(exact_held - a @ want.T) <= bound + 1e-5)


def test_q4_1_offset_rows_repeat_for_cuda():
    """For CUDA's K % 8 == 0: [S, S/FINE] 4 times (96 + 6 = 102 → 96 + 24), the copies weighted
    0, give what one copy gives."""
    import gguf

    raw = random_blocks("Q4_1", 8, 96, seed=3)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).reshape(8, 96)
    blocks = from_gguf("Q4_1", raw, 96)
    a = np.random.default_rng(2).standard_normal((2, 96)).astype(np.float32)
    sums = a.reshape(2, 3, 32).sum(-1)
    pairs = np.stack([sums, sums / FINE], axis=-1).reshape(2, 6)
    assert sum_repeats(96, 32, 8) == 4 and sum_repeats(96, 32, 1) == 1
    one, k1 = offset_rows(blocks)
    four, k4 = offset_rows(blocks, repeats=4)
    assert (k1, k4) == (102, 120)
    y1 = _matmul_nbits(one, np.concatenate([a, pairs], axis=1), 0, k1)
    y4 = _matmul_nbits(four, np.concatenate([a] + [pairs] * 4, axis=1), 0, k4)
    np.testing.assert_allclose(y4, y1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y1, a @ want.T, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("type_name", CARRIED)
def test_the_test_encoder_writes_blocks_gguf_reads_back(type_name):
    """The helper that writes real weights as GGUF blocks (the K types by a plain encoder): gguf's
    dequantizer gets the weights back to that type's rounding."""
    import gguf

    w = np.random.default_rng(4).standard_normal((16, 512)).astype(np.float32)
    raw = encode_blocks(w, type_name)
    back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(w.shape)
    rms = np.sqrt(((back - w) ** 2).mean())
    assert rms < {4: 0.1, 5: 0.05, 6: 0.025, 8: 0.01}[gguf_bits(type_name)]
    np.testing.assert_array_equal(from_gguf(type_name, raw, 512).dequantize(), back)


def test_block_sum_repeats_make_k_a_multiple_of_8():
    # the default model's widths: 576 (nb 18) needs the sums twice, 1536 (nb 48) once
    assert sum_repeats(576, 32, 8) == 2 and sum_repeats(1536, 32, 8) == 1
    for k in range(32, 4097, 32):
        r = sum_repeats(k, 32, 8)
        assert (k + 2 * (k // 32) * r) % 8 == 0 and r in (1, 2, 4)


@pytest.mark.parametrize("bits, block_size", [(3, 32), (4, 48), (4, 8), (8, 512), (2, 32)])
def test_bad_settings_raise_a_clear_error(bits, block_size):
    with pytest.raises(QuantizationError, match="bits must be|block size must be"):
        quantize(np.zeros((4, 64), np.float32), bits, block_size, symmetric=True)


def test_bad_precision_and_block_size_rejected_before_any_work():
    with pytest.raises(QuantizationError, match="choose one of"):
        QuantSettings("int2")
    with pytest.raises(QuantizationError, match="power of two from 16 to 256"):
        QuantSettings("int4", block_size=48)
    with pytest.raises(QuantizationError, match="bits must be one of"):
        QuantSettings("int4", head_bits=3)


@pytest.fixture(scope="module")
def quantized(tiny_folders, tmp_path_factory):
    """Each tiny target quantized to each precision (verified on the way)."""
    root = tmp_path_factory.mktemp("tiny-quant")
    out = {}
    for target, folder in tiny_folders.items():
        for precision in ("int4", "int8", "fp16"):
            out[target, precision] = root / f"{target}-{precision}"
            quantize_folder(folder, out[target, precision], _settings(precision))
    # int4 and int8 on the CPU run llamaonnx's own kernels (asked for by name, though `auto` picks
    # them wherever the library is built: the portable C path runs them anywhere); the MatMulNBits
    # form that any onnxruntime runs stays one flag away
    out["ort", "int4-nbits"] = root / "ort-int4-nbits"
    quantize_folder(
        tiny_folders["ort"], out["ort", "int4-nbits"], QuantSettings("int4", kernel="nbits")
    )
    for target, folder in tiny_folders.items():
        out[target, "int8-nbits"] = root / f"{target}-int8-nbits"
        quantize_folder(folder, out[target, "int8-nbits"], QuantSettings("int8", kernel="nbits"))
    return out


def _settings(precision: str, **kw) -> QuantSettings:
    """llamaonnx's own CPU kernels for int4 and int8, whatever the CPU of this machine."""
    return QuantSettings(precision, kernel="native" if precision != "fp16" else "auto", **kw)


def _ops(folder):
    model = onnx.load(str(folder / "model.onnx"))
    return model, Counter(n.op_type for n in model.graph.node)


# MatMulNBits per layer: q, k, v (one packed QKV on `ort`, whose GroupQueryAttention takes it), o,
# gate + up (one, then Split), down.
PER_LAYER = {"portable": 6, "onnx23": 6, "ort": 4}


@pytest.mark.parametrize("target", ["portable", "onnx23", "ort"])
def test_int4_on_cpu_runs_the_native_kernel_with_the_head_on_matmul_nbits(quantized, target):
    model, ops = _ops(quantized[target, "int4"])
    # gate/up and the SwiGLU after them are one MatMulQ4SwiGLU; the 8-bit head is MatMulQ8 (the
    # tiny presets' embedding is untied: its own GatherBlockQuantized)
    assert ops["MatMulQ4"] == (PER_LAYER[target] - 1) * L and ops["MatMulQ4SwiGLU"] == L
    assert ops["MatMulQ8"] == 1 and ops["MatMulNBits"] == 0
    assert ops["MatMul"] == ops["Concat"] == 0  # no block sums: the kernel reads offsets
    assert ops["Split"] == ops["Sigmoid"] == 0
    info = json.loads((quantized[target, "int4"] / "llamaonnx.json").read_text())
    assert info["custom_ops"] == ["ai.llamaonnx"] and info["quantization"]["kernel"] == "native"
    if target == "ort":  # and its attention (onnxruntime's GroupQueryAttention's inputs)
        gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        assert len(gqa) == L and {n.domain for n in gqa} == {"ai.llamaonnx"}
        assert all(len(n.input) == 7 and all(n.input) for n in gqa)
        # each residual norm is folded into the projection that reads it (export/quant/norm.py):
        # all but the last, whose output the head reads through logits_to_keep's Slice
        folded = [n for n in model.graph.node if n.domain == "ai.llamaonnx" and len(n.input) == 4]
        assert len(folded) == 2 * L - 1 and ops["SkipSimplifiedLayerNormalization"] == 1
        assert {n.op_type for n in folded} == {"MatMulQ4", "MatMulQ4SwiGLU"}
        genai = json.loads((quantized[target, "int4"] / "genai_config.json").read_text())
        library = genai["model"]["decoder"]["session_options"]["custom_ops_library"]
        folder = quantized[target, "int4"]  # a copy inside the folder, named relatively
        assert library == native.FOLDER_LIBRARY
        assert (folder / library).read_bytes() == native.library_path().read_bytes()


@pytest.mark.parametrize("target", ["portable", "onnx23", "ort"])
def test_int8_on_cpu_runs_the_native_8bit_kernel(quantized, target):
    """Every projection and the head on MatMulQ8 tiles, gate/up and the SwiGLU after them one
    MatMulQ8SwiGLU; on `ort` our attention and folded norms too."""
    model, ops = _ops(quantized[target, "int8"])
    assert ops["MatMulQ8"] == (PER_LAYER[target] - 1) * L + 1 and ops["MatMulQ8SwiGLU"] == L
    assert ops["MatMulNBits"] == ops["MatMulQ4"] == ops["MatMul"] == 0
    assert ops["Split"] == ops["Sigmoid"] == 0
    info = json.loads((quantized[target, "int8"] / "llamaonnx.json").read_text())
    assert info["quantization"]["kernel"] == "native"
    if target == "ort":
        gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        assert {n.domain for n in gqa} == {"ai.llamaonnx"}
        assert ops["SkipSimplifiedLayerNormalization"] == 1
        folded = [n for n in model.graph.node if n.domain == "ai.llamaonnx" and len(n.input) == 4]
        assert {n.op_type for n in folded} == {"MatMulQ8", "MatMulQ8SwiGLU"}
        assert len(folded) == 2 * L - 1


@pytest.mark.parametrize("target", ["portable", "onnx23", "ort"])
def test_weight_only_precisions_use_matmul_nbits_everywhere(quantized, target):
    for precision, bits in (("int4", 4), ("int8", 8)):
        if precision == "int4" and target != "ort":
            continue
        precision += "-nbits"
        model, ops = _ops(quantized[target, precision])
        assert ops["MatMulNBits"] == PER_LAYER[target] * L + 1  # + the LM head
        assert ops["GatherBlockQuantized"] == 1
        assert ops["Split"] == L
        assert ops["MatMul"] == 0  # nothing left in float (tiny weights are not from a GGUF)
        nbits = {
            n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node
            if n.op_type == "MatMulNBits"
        }
        assert nbits["/model/layers.0/attention/wo/MatMulNBits"]["bits"] == bits
        assert nbits["/model/layers.0/feed_forward/w13/MatMulNBits"]["N"] == 2 * 128
        assert nbits["/model/output/MatMulNBits"]["bits"] == 8  # head_bits
        assert {a["accuracy_level"] for a in nbits.values()} == {4}  # CPU: int8 compute
        assert not any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
        if target == "ort":
            qkv = nbits["/model/layers.0/attention/qkv/MatMulNBits"]
            assert qkv["N"] == (4 + 2 * 2) * 16  # tiny: 4 query heads, 2 KV heads, head dim 16
            gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
            assert all(list(n.input[1:3]) == ["", ""] for n in gqa)


@pytest.mark.parametrize("target", ["portable", "onnx23", "ort"])
def test_fp16_keeps_norms_in_fp32_and_logits_float32(quantized, target):
    model, ops = _ops(quantized[target, "fp16"])
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types["past_key_values.0.key"] == TensorProto.FLOAT16
    out = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert out["logits"] == TensorProto.FLOAT and out["present.0.key"] == TensorProto.FLOAT16
    weights = [t for t in model.graph.initializer if t.name.endswith(".weight_T")]
    # gate and up are one MatMul (then Split); on `ort` q, k and v too, GQA reading them packed
    assert len(weights) == (4 if target == "ort" else 6) * L + 1
    assert all(t.data_type == TensorProto.FLOAT16 for t in weights)
    splits = [n for n in model.graph.node if n.op_type == "Split" and "w13" in n.name]
    assert len(splits) == L
    if target == "ort":
        gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        assert all(list(n.input[1:3]) == ["", ""] for n in gqa)
    if target == "portable":  # our function ops run on float32 inputs (Cast around them)
        casts_in = [n for n in model.graph.node if n.op_type == "Cast" and "/Cast_in" in n.name]
        assert len(casts_in) >= 2 * L + 1
    if target == "onnx23":
        attn = [n for n in model.graph.node if n.op_type == "Attention"]
        assert all(
            helper.get_attribute_value(a) == TensorProto.FLOAT
            for n in attn
            for a in n.attribute
            if a.name == "softmax_precision"
        )


@pytest.mark.parametrize(
    "target,precision",
    [(t, p) for t in ("portable", "onnx23", "ort") for p in ("int4", "int8", "fp16")]
    + [("ort", "int4-nbits"), ("ort", "int8-nbits")],
)
def test_each_precision_round_trips_within_its_tolerance(quantized, target, precision):
    folder = quantized[target, precision]
    info = json.loads((folder / "llamaonnx.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    assert info["precision"] == precision.split("-")[0] and report["passed"], report["failures"]
    cpu = report["providers"]["cpu"]
    assert cpu["perplexity_ratio"] <= report["tolerance"]["perplexity_ratio"]
    assert cpu["kl_divergence"] <= report["tolerance"]["max_kl"]
    assert (
        report["size_bytes"] > 0
        and report["quantization"]["settings"]["precision"] == info["precision"]
    )
    assert len(cpu["greedy_agreement_per_prompt"]) == 3
    assert cpu["greedy_steps"] == 128


def test_quantized_model_generates_with_the_runtime(quantized):
    from runtime.generator import GenerationConfig, Generator
    from runtime.session import Session

    for precision in ("int4", "int4-nbits", "int8", "fp16"):
        gen = Generator(Session(quantized["ort", precision], provider="cpu"))
        ids = gen.generate_ids([[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=5))
        assert [len(x) for x in ids] == [5, 5]


def test_an_fp16_kv_cache_on_our_attention(tiny_folders, quantized, tmp_path):
    """--kv-cache float16, the default where our attention runs: the folder's past/present are
    fp16 (our attention rounds each new key and value once), it verifies, the runtime and genai's
    config agree, and it decodes what an fp32-cache folder decodes on the tiny model. Where our
    attention does not run, float32 by default and a clear error if float16 is asked for."""
    from runtime.generator import GenerationConfig, Generator
    from runtime.session import Session

    out, out32 = tmp_path / "kv16", tmp_path / "kv32"
    info = quantize_folder(tiny_folders["ort"], out, _settings("int4", kv_cache="float16"))
    assert info["kv_dtype"] == "float16" and info["report"]["passed"]
    default = json.loads((quantized["ort", "int4"] / "llamaonnx.json").read_text())
    assert default["kv_dtype"] == "float16"  # auto
    info32 = quantize_folder(tiny_folders["ort"], out32, _settings("int4", kv_cache="float32"))
    assert info32["kv_dtype"] == "float32" and info32["report"]["passed"]
    assert QuantSettings("int4", kernel="nbits").kv_dtype == "float32"
    assert QuantSettings("int4", kernel="native").kv_dtype == "float16"
    assert QuantSettings("int4", provider="cuda").kv_dtype == "float16"  # CUDA: fp16 graph
    with pytest.raises(QuantizationError, match="CUDA attention takes float16"):
        QuantSettings("int4", provider="cuda", kv_cache="float32")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    cache = [v for v in (*model.graph.input, *model.graph.output) if v.name.startswith("p")]
    assert {v.name.split(".")[0] for v in cache} == {"past_key_values", "present"}
    assert len(cache) == 4 * L  # past and present, keys and values
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in cache)
    ids = {}
    for name, folder in (("fp32", out32), ("fp16", out)):
        gen = Generator(Session(folder, provider="cpu"))
        ids[name] = gen.generate_ids([[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=8))
    assert ids["fp16"] == ids["fp32"]
    with pytest.raises(QuantizationError, match="needs llamaonnx's CPU attention kernel"):
        QuantSettings("int4", kernel="nbits", kv_cache="float16")
    with pytest.raises(QuantizationError, match="choose one of"):
        QuantSettings("int4", kv_cache="int8")


def test_keep_leaves_chosen_layers_in_float(tiny_folders, tmp_path):
    """--keep's patterns (fnmatch, layers.-K counted from the last layer) keep modules in float;
    the folder records them as written."""
    out = tmp_path / "kept"
    quantize_folder(
        tiny_folders["ort"],
        out,
        _settings("int4", keep=(f"layers.-{L}.*", "output")),
        verify=False,
    )
    model, ops = _ops(out)
    names = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    assert "/model/output/MatMul" in names and "/model/layers.0/attention/wq/MatMul" in names
    assert ops["MatMulQ4"] + ops["MatMulQ4SwiGLU"] == PER_LAYER["ort"] * (L - 1)
    info = json.loads((out / "llamaonnx.json").read_text())
    assert info["quantization"]["settings"]["keep"] == [f"layers.-{L}.*", "output"]
    with pytest.raises(QuantizationError, match=rf"layers.-{L + 1} is not a layer.*layers.-1"):
        quantize_folder(
            tiny_folders["ort"], tmp_path / "x", _settings("int4", keep=(f"layers.-{L + 1}.*",))
        )
    assert not (tmp_path / "x").exists()


def test_precise_projections_run_two_digit_activations(tiny_folders, quantized, tmp_path):
    """--precise marks the matching projections `digits` 2 (the kernel then rounds what each
    activation's int8 rounding left too): with all of them the logits come ~10× closer to those
    of the same blocks with float activations (MatMulNBits at accuracy level 0, whose own 8-bit
    offset rows are most of what is left); the report names them; the table says so."""
    from export.verify.activation_cost import markdown, measure
    from runtime.generator import right_pad
    from runtime.quality import quality_table
    from runtime.session import Session

    out = tmp_path / "precise"
    quantize_folder(
        tiny_folders["ort"], out, _settings("int4", precise=("*",), kv_cache="float32"),
        verify=False,
    )  # fmt: skip
    model, _ = _ops(out)
    ours = [n for n in model.graph.node if n.domain == native.DOMAIN and "MatMul" in n.op_type]
    assert ours and all({a.name: a.i for a in n.attribute}.get("digits") == 2 for n in ours)
    info = json.loads((out / "llamaonnx.json").read_text())["quantization"]
    assert len(info["two_digit_modules"]) == len(ours) and info["settings"]["precise"] == ["*"]
    exact = tmp_path / "exact"
    quantize_folder(
        tiny_folders["ort"], exact, QuantSettings("int4", kernel="nbits", accuracy_level=0),
        verify=False,
    )  # fmt: skip
    ids, mask, positions = right_pad([list(range(3, 40))], 0)

    def logits(folder):
        s = Session(folder, threads=1)
        return s.forward(ids, mask, positions, s.new_cache(1, 64)).astype(np.float64)

    one = tmp_path / "one"
    quantize_folder(
        tiny_folders["ort"], one, _settings("int4", kv_cache="float32"), verify=False
    )  # fmt: skip
    want = logits(exact)
    assert np.abs(logits(out) - want).max() < np.abs(logits(one) - want).max() / 5
    # what each set costs, measured (export/verify/activation_cost.py): the same two, by KL
    rows = measure(one, exact, ["none", "layers.-1.*,output", "*"], progress=lambda msg: None)
    kl = [np.mean(list(r["kl"].values())) for r in rows]
    assert [r["projections"] for r in rows] == [0, 5, len(ours)] and kl[2] < kl[1] < kl[0]
    assert kl[2] < kl[0] / 10 and "| `*` | 9 | 100.0 % |" in markdown(rows)
    assert 0 < rows[1]["extra"] < 1 and rows[0]["extra"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".activation-cost")]
    verified = quantized["ort", "int4"].parent / "ort-int4-precise"
    quantize_folder(tiny_folders["ort"], verified, _settings("int4", precise=("output",)))
    assert "two-digit activations in 1 projection |" in quality_table([verified])
    some = tmp_path / "some"
    last = _settings("int4", precise=("output", "layers.-1.*"))  # (the last layer: layers.1)
    quantize_folder(tiny_folders["ort"], some, last, verify=False)
    model, _ = _ops(some)
    marked = sorted(n.name for n in model.graph.node if "digits" in [a.name for a in n.attribute])
    assert marked == sorted(
        [f"/model/layers.1/{m}" for m in ("attention/qkv/MatMulQ4", "attention/wo/MatMulQ4",
                                          "feed_forward/w13/MatMulQ4SwiGLU",
                                          "feed_forward/w2/MatMulQ4")] + ["/model/output/MatMulQ8"]
    )  # fmt: skip
    # PATTERN=B: the second digit on each row's B blocks of largest scale; the last match wins
    few = tmp_path / "few"
    quantize_folder(
        tiny_folders["ort"], few, _settings("int4", precise=("*=1", "output"), kv_cache="float32"),
        verify=False,
    )  # fmt: skip
    model, _ = _ops(few)
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in model.graph.node}
    assert attrs["/model/output/MatMulQ8"]["digits"] == 2
    assert "blocks" not in attrs["/model/output/MatMulQ8"]
    w2 = attrs["/model/layers.1/feed_forward/w2/MatMulQ4"]
    assert (w2["digits"], w2["blocks"]) == (2, 1)
    modules = json.loads((few / "llamaonnx.json").read_text())["quantization"]
    assert "output" in modules["two_digit_modules"]
    assert "layers.1.feed_forward.w2=1" in modules["two_digit_modules"]
    err = {f: np.abs(logits(f) - want).max() for f in (one, few, out)}
    assert err[out] < err[few] < err[one]
    for bad in ("*=0", "*=x", "=2"):
        with pytest.raises(QuantizationError, match="PATTERN=BLOCKS"):
            QuantSettings("int4", precise=(bad,))
    with pytest.raises(QuantizationError, match="matches no projection.*layers.0.attention.qkv"):
        quantize_folder(tiny_folders["ort"], tmp_path / "x", _settings("int4", precise=("wq",)))
    assert not (tmp_path / "x").exists()
    with pytest.raises(QuantizationError, match="--precise .* needs"):
        QuantSettings("int4", kernel="nbits", precise=("*",))
    with pytest.raises(QuantizationError, match="--precise .* needs"):
        QuantSettings("fp16", precise=("*",))


def test_tied_embedding_and_head_share_one_copy_of_the_codes(tmp_path):
    from export.pipeline import export_model
    from tests.tiny import write_tiny

    src = tmp_path / "src"
    src.mkdir()
    write_tiny(src, name="tiny-tied-mqa")
    out = tmp_path / "int4"
    export_model(src, out, target="ort", precision="int4", quant=_settings("int4"))
    model, ops = _ops(out)  # llamaonnx's kernel: GatherQ8 reads the MatMulQ8 head's tiles
    gather = next(n for n in model.graph.node if n.op_type == "GatherQ8")
    head = next(n for n in model.graph.node if n.name == "/model/output/MatMulQ8")
    assert gather.input[0] == head.input[1] and ops["GatherBlockQuantized"] == 0
    assert _layouts(model) == {"GatherQ8": {LAYOUT}, "MatMulQ4": {LAYOUT}, "MatMulQ8": {LAYOUT},
                               "MatMulQ4SwiGLU": {LAYOUT}}  # fmt: skip
    assert json.loads((out / "report.json").read_text())["passed"]
    out = tmp_path / "int4-nbits"
    export_model(
        src, out, target="ort", precision="int4", quant=QuantSettings("int4", kernel="nbits")
    )
    model, ops = _ops(out)
    gbq = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.name == "/model/output/MatMulNBits")
    assert gbq.input[0] == head.input[1]
    assert json.loads((out / "report.json").read_text())["passed"]


def _layouts(model) -> dict[str, set]:
    """op → the `layout` attributes (None: none) of the nodes of ours that read tiles."""
    out = {}
    for n in model.graph.node:
        if n.domain == native.DOMAIN and n.op_type != "GroupQueryAttention":
            got = [helper.get_attribute_value(a) for a in n.attribute if a.name == "layout"]
            out.setdefault(n.op_type, set()).add(got[0] if got else None)
    return out


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_tiles_carry_their_layouts_revision_and_a_newer_one_is_refused(
    quantized, precision, tmp_path
):
    """Every node that reads tiles says which revision of the layouts it was packed in, through
    the fusions that rebuild it (gate/up with the SwiGLU, the folded norms), so that a library
    whose layouts have changed refuses a folder instead of misreading its bytes (tiles.h,
    TILE_LAYOUT). A folder from a newer llamaonnx, or older than the library reads, says so."""
    from runtime.errors import ModelFolderError
    from runtime.session import Session

    folder = quantized["ort", precision]
    layouts = _layouts(onnx.load(str(folder / "model.onnx")))
    assert len(layouts) >= 2 and all(v == {LAYOUT} for v in layouts.values())
    refused = ((LAYOUT + 1, "run it with the newer llamaonnx that wrote it"),
               (LAYOUT_OLDEST - 1, "quantize it again with this llamaonnx"))  # fmt: skip
    for revision, says in refused:
        copy = tmp_path / f"r{revision}"
        shutil.copytree(folder, copy)
        model = onnx.load(str(copy / "model.onnx"))
        node = next(n for n in model.graph.node if n.op_type.startswith("MatMulQ"))
        next(a for a in node.attribute if a.name == "layout").i = revision
        onnx.save(model, str(copy / "model.onnx"))
        with pytest.raises(ModelFolderError, match=f"revision {revision}.*{says}"):
            Session(copy, check_files=False)


def test_quantizing_a_quantized_folder_or_into_an_existing_one_fails(quantized, tiny_folders):
    with pytest.raises(QuantizationError, match="quantize from an fp32 folder"):
        quantize_folder(
            quantized["ort", "int4"], quantized["ort", "int4"].parent / "x", QuantSettings("int8")
        )
    with pytest.raises(OutputFolderError, match="already exists"):
        quantize_folder(tiny_folders["ort"], quantized["ort", "int8"], QuantSettings("int8"))


def test_int4_for_cuda_has_fp16_activations_and_level_0(tiny_folders, tmp_path):
    """The CUDA int4 build (checked here on the CPU): fp16 activations, scales and cache,
    accuracy level 0, verified within the int4 tolerance."""
    out = tmp_path / "int4-cuda"
    info = quantize_folder(
        tiny_folders["ort"], out, QuantSettings("int4", provider="cuda", fp16_activations=True)
    )
    assert info["kv_dtype"] == "float16" and info["report"]["passed"]
    model, ops = _ops(out)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert all(
        helper.get_attribute_value(a) == 0
        for n in nbits
        for a in n.attribute
        if a.name == "accuracy_level"
    )
    scales = {t.name: t.data_type for t in model.graph.initializer if t.name.endswith(".scales")}
    assert scales and set(scales.values()) == {TensorProto.FLOAT16}


def test_verify_cli_checks_the_asked_provider_and_table_has_a_row_per_provider(
    tiny_folders, tmp_path, capsys
):
    import shutil

    from runtime.cli import main
    from runtime.quality import quality_table

    folder = tmp_path / "ort"
    shutil.copytree(tiny_folders["ort"], folder)
    assert main(["verify", str(folder), "--provider", "cpu"]) == 0
    report = json.loads((folder / "report.json").read_text())
    assert list(report["providers"]) == ["cpu"] and report["passed"]
    # a report from a GPU machine: CUDA alone, or both (CPU first)
    report["providers"] = {"cuda": report["providers"]["cpu"], "cpu": report["providers"]["cpu"]}
    (folder / "report.json").write_text(json.dumps(report))
    rows = quality_table([folder]).splitlines()[2:]
    assert [r.split("|")[4].strip() for r in rows] == ["cpu", "cuda"]
    report["providers"] = {}
    (folder / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="was not verified"):
        quality_table([folder])


def test_auto_kernel_writes_one_layout_whatever_the_exporting_cpu(
    tiny_folders, quantized, tmp_path, monkeypatch, caplog
):
    """The folder does not depend on the CPU that quantizes it: auto writes llamaonnx's tiles even
    where this CPU has no vector path for them (the running machine picks its own path), and a
    native folder opened on such a CPU gets a warning. Only without the kernel library at all
    does auto write MatMulNBits, and it says so."""
    import logging

    from runtime.session import Session

    monkeypatch.setattr(native, "fast_path", lambda: False)
    out = tmp_path / "auto"
    quantize_folder(tiny_folders["ort"], out, QuantSettings("int4"), verify=False)
    _, ops = _ops(out)
    assert ops["MatMulQ4"] + ops["MatMulQ4SwiGLU"] > 0 and ops["MatMulNBits"] <= 1
    with caplog.at_level(logging.WARNING, logger="runtime.session"):
        Session(quantized["ort", "int4"], provider="cpu")
    assert "--kernel nbits" in caplog.text
    monkeypatch.setattr(native, "available", lambda: False)
    said = []
    out = tmp_path / "no-library"
    quantize_folder(
        tiny_folders["ort"], out, QuantSettings("int4"), verify=False, progress=said.append
    )
    _, ops = _ops(out)
    assert ops["MatMulQ4"] == 0 and ops["MatMulNBits"] == PER_LAYER["ort"] * L + 1
    assert any("kernel library is not built" in line for line in said)


def _cuda_gather_block_quantized(inits: dict, node, ids: np.ndarray) -> np.ndarray:
    """onnxruntime's CUDA GatherBlockQuantized for uint8 data, gather axis 0, in numpy
    (contrib_ops/cuda/quantization/gather_block_quantized.cu): element index and block index
    flat over the whole table, 4-bit codes and zero points two per byte in that flat order."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits, bs = attrs["bits"], attrs["block_size"]
    data, scales = inits[node.input[0]], inits[node.input[2]].reshape(-1)
    zp = inits[node.input[3]].reshape(-1) if len(node.input) > 3 else None
    per = 8 // bits
    row = data[0].size * per  # elements after the gather axis

    def get(buf, i):
        return (buf.reshape(-1)[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1)

    idx = ids.reshape(-1)[:, None] * row + np.arange(row)[None]  # flat element indices
    block = idx // bs
    offset = get(zp, block).astype(np.float32) if zp is not None else float(1 << (bits - 1))
    out = (get(data, idx).astype(np.float32) - offset) * scales[block]
    return out.reshape(*ids.shape, *data.shape[1:-1], data.shape[-1] * per)


def _embedding_graph(blocks, ids):
    from export.quant.embedding import quantize_embedding

    v, nb, bs = blocks.codes.shape
    table = numpy_helper.from_array(np.zeros((v, nb * bs), np.float32), "table")
    gather = helper.make_node("Gather", ["table", "ids"], ["emb"], name="/model/Gather")
    graph = helper.make_graph(
        [gather],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, list(ids.shape))],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)],
        [table],
    )

    def init(name, array):
        graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    quantize_embedding(graph, gather, blocks, shared=False, init=init)
    graph.initializer.remove(table)
    gbq = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    graph.output.append(helper.make_tensor_value_info(gbq.output[0], TensorProto.FLOAT, None))
    return graph, gbq


@pytest.mark.parametrize(
    "bits, nb, zero_points, offsets",
    [
        (4, 6, True, False),
        (4, 5, True, False),
        (4, 6, True, True),
        (4, 6, False, False),
        (8, 5, True, True),
    ],
)
def test_the_quantized_embedding_reads_the_same_on_onnxruntimes_cpu_and_cuda_kernels(
    bits, nb, zero_points, offsets
):
    """Both kernels read what `Blocks.dequantize` says, for every layout the embedding takes:
    4-bit codes with zero points laid out flat (nb even) or in an 8-bit container (nb odd),
    with or without Q4_1/K-quant offsets."""
    import onnxruntime as ort

    rng = np.random.default_rng(nb + bits)
    v, bs = 40, 32
    blocks = Blocks(
        bits=bits,
        block_size=bs,
        codes=rng.integers(0, 1 << bits, (v, nb, bs), dtype=np.uint8),
        scales=rng.random((v, nb), dtype=np.float32) + 0.1,
        zero_points=rng.integers(0, 1 << bits, (v, nb), dtype=np.uint8) if zero_points else None,
        offsets=rng.standard_normal((v, nb)).astype(np.float32) if offsets else None,
        origin="test",
    )
    ids = np.array([[3, 0, 39, 17, 18]], np.int64)
    graph, gbq = _embedding_graph(blocks, ids)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    emb, cpu_gbq = sess.run(None, {"ids": ids})
    np.testing.assert_allclose(emb, blocks.dequantize()[ids], rtol=1e-6, atol=1e-6)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    cuda_gbq = _cuda_gather_block_quantized(inits, gbq, ids)
    np.testing.assert_array_equal(cuda_gbq.reshape(cpu_gbq.shape), cpu_gbq)


def test_the_old_embedding_layout_is_read_differently_by_the_cuda_kernel():
    """Why the layout above: 4-bit zero points [V, nb, 1] beside codes [V, nb, bs/2] (quantize
    axis 2), read by the CPU kernel per block, are read by the CUDA kernel in flat block order."""
    rng = np.random.default_rng(0)
    v, nb, bs = 8, 4, 32
    codes = rng.integers(0, 16, (v, nb, bs), dtype=np.uint8)
    zp = rng.integers(0, 16, (v, nb), dtype=np.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    inits = {"q": packed, "s": np.ones((v, nb, 1), np.float32), "z": zp[..., None]}
    node = helper.make_node(
        "GatherBlockQuantized",
        ["q", "ids", "s", "z"],
        ["y"],
        bits=4,
        block_size=bs,
        gather_axis=0,
        quantize_axis=2,
        domain="com.microsoft",
    )
    ids = np.arange(v, dtype=np.int64)[None]
    want = (codes.astype(np.float32) - zp[..., None])[None]
    assert not np.array_equal(_cuda_gather_block_quantized(inits, node, ids), want)
