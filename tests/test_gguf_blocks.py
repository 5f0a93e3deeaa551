"""A GGUF that mixes block types the way Q4_K_M / Q5_K_M files do (Q4_K and Q5_K with Q6_K for
some tensors, Q5_0 / Q5_1 / Q4_0 / Q4_1 where a width is not a multiple of 256) exports and
quantizes with every tensor keeping its own type: carried exactly, on MatMulNBits and on the
native kernel alike, verified against the reference computed from the same dequantized file. A
type with no exact form (Q2_K) is quantized again, said so on the terminal and in report.json."""

import json
import logging

import numpy as np
import onnx
import pytest

from export.pipeline import export_model
from export.quant import QuantSettings, quantize_folder
from runtime import native
from runtime.folder import read_model_folder
from tests.gguf_writer import MIXED_TYPES, write_mixed

TYPES = MIXED_TYPES
MODULES = {  # GGUF name → our module
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
}


def _module(gguf_name: str) -> str:
    if gguf_name.startswith("blk."):
        _, layer, kind, _ = gguf_name.split(".")
        return f"layers.{layer}.{MODULES[kind]}"
    return {"token_embd.weight": "tok_embeddings", "output.weight": "output"}[gguf_name]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed file's fp32 `ort` folder (its reference: the file's own dequantized weights)."""
    root = tmp_path_factory.mktemp("gguf-mixed")
    path = write_mixed(root)
    export_model(path, root / "fp32", target="ort")
    return root


@pytest.mark.parametrize("kernel", ["nbits", "native"])
def test_every_tensor_keeps_its_own_gguf_type(mixed, kernel):
    out = mixed / f"int4-{kernel}"
    result = quantize_folder(mixed / "fp32", out, QuantSettings("int4", kernel=kernel))
    assert result["report"]["passed"]
    q = read_model_folder(out).quantization
    for name, kind in TYPES.items():
        record = q.weights[_module(name)]
        assert record.origin == f"gguf-{kind}" and record.carried, (name, record)
        assert record.bits == (4 if kind in ("Q4_0", "Q4_1", "Q4_K") else 8), (name, record)
        assert record.block_size == (16 if kind == "Q6_K" else 32)
    assert q.max_abs_carry_error < 1e-6 and not q.requantized_gguf_tensors
    # offsets (Q4_1, Q4_K, Q5_K) ride in MatMulNBits' 8-bit extra rows; the native tiles hold them
    if kernel == "nbits":
        assert 0 < q.max_abs_offset_error < 1e-2
    else:
        assert q.max_abs_offset_error is None
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["origins"]["gguf-Q6_K 8-bit"] == 3
    assert report["quantization"]["origins"]["gguf-Q8_0 8-bit"] == 1
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    if kernel == "nbits":
        assert ops["/model/layers.0/attention/wv/MatMulNBits"] == "MatMulNBits"
        assert ops["/model/layers.0/feed_forward/w13/MatMulNBits"] == "MatMulNBits"
        assert ops["/model/layers.1/feed_forward/w2/MatMulNBits"] == "MatMulNBits"
    else:  # every type on the native tiles, fp32 d and m where fp16 cannot hold them (Q5_K)
        assert "MatMulNBits" not in ops.values()
        tiles = {i.name: i.dims for i in graph.initializer if i.name.endswith(".tiles")}
        assert tiles["model.layers.0.feed_forward.w13.tiles"][-1] == 296  # Q4_K: its super-blocks
        assert tiles["model.layers.1.feed_forward.w13.tiles"][-1] == 320  # Q4_1 + Q4_0
        assert tiles["model.layers.1.attention.wo.tiles"][-1] == 352  # Q5_0 (m = −16·d)
        # Q5_K + Q5_K + Q5_1 (not super-blocks: fp32 d and m, and the zero points), and Q5_K
        assert tiles["model.layers.1.attention.qkv.tiles"][-1] == 464
        assert tiles["model.layers.1.feed_forward.w2.tiles"][-1] == 376  # Q5_K: its super-blocks
        assert tiles["model.layers.0.attention.wv.tiles"][-1] == 424  # Q6_K: its super-blocks
        assert tiles["model.layers.0.feed_forward.w2.tiles"][-1] == 424
        assert tiles["model.output.tiles"][-1] == 424
        assert "/model/layers.0/feed_forward/w13/MatMulQ4SwiGLU" in ops


def test_a_tied_q6_k_embedding_is_read_from_the_heads_own_tiles(tmp_path):
    """A tied model whose embedding is Q6_K (what llama.cpp's Q4_K_M makes of Llama 3.2 1B and
    Qwen2.5's small models): the embedding is GatherQ8 rows of the head's 424-byte tiles, one
    copy of the codes for both, exactly the file's values."""
    types = {k: v for k, v in MIXED_TYPES.items() if k != "output.weight"}
    types["token_embd.weight"] = "Q6_K"
    path = write_mixed(tmp_path, types, tied=True)
    export_model(path, tmp_path / "fp32", target="ort")
    out = tmp_path / "int4"
    result = quantize_folder(tmp_path / "fp32", out, QuantSettings("int4"))
    assert result["report"]["passed"]
    graph = onnx.load(out / "model.onnx").graph
    ops = [n.op_type for n in graph.node]
    gather = next(n for n in graph.node if n.op_type == "GatherQ8")
    head = next(n for n in graph.node if n.name == "/model/output/MatMulQ8")
    assert gather.input[0] == head.input[1] and "GatherBlockQuantized" not in ops
    tiles = next(i for i in graph.initializer if i.name == head.input[1])
    packed = onnx.numpy_helper.to_array(tiles, base_dir=str(out))
    assert packed.shape[-1] == 424 and not any(
        "tok_embeddings" in i.name for i in graph.initializer
    )
    fp32 = onnx.load(tmp_path / "fp32" / "model.onnx").graph
    name = next(n.input[0] for n in fp32.node if n.op_type == "Gather")  # (the tied table)
    table = next(onnx.numpy_helper.to_array(i, base_dir=str(tmp_path / "fp32"))
                 for i in fp32.initializer if i.name == name)  # fmt: skip
    ids = np.arange(table.shape[0], dtype=np.int64)
    rows = np.zeros(table.shape, np.float32)
    assert (
        native.library().llamaonnx_gather_q8(
            424,
            packed.ctypes.data,
            table.shape[0],
            table.shape[1],
            ids.ctypes.data,
            ids.size,
            rows.ctypes.data,
        )
        == 0
    )
    np.testing.assert_array_equal(rows, table)


def test_the_cuda_form_carries_every_type_and_says_what_fp16_rounds(mixed, caplog):
    """For CUDA (MatMulNBits, accuracy level 0, fp16 activations: onnxruntime's CUDA attention
    has no float32): every type keeps its own codes, and the scales float16 cannot hold (Q4_K's,
    Q5_K's and Q6_K's d·scale products) are rounded, which the terminal and report.json say,
    tensor by tensor, while Q8_0, Q5_0, Q5_1, Q4_0 and Q4_1 (fp16 in the file) lose nothing.
    The CPU's MatMulNBits form at accuracy level 0 (float activations) keeps them all exact."""
    from onnx import TensorProto

    out = mixed / "int4-nbits-level0"
    exact = QuantSettings("int4", kernel="nbits", accuracy_level=0)
    result = quantize_folder(mixed / "fp32", out, exact)
    assert result["report"]["passed"]
    q = read_model_folder(out).quantization
    assert q.accuracy_level == 0 and q.kernel == "nbits" and q.fp16_rounded_scales is None
    assert all(q.weights[_module(n)].origin == f"gguf-{k}" for n, k in TYPES.items())
    assert q.max_abs_carry_error < 1e-6 and 0 < q.max_abs_offset_error < 1e-2
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    scales = {i.data_type for i in graph.initializer if i.name.endswith(".scales")}
    assert scales == {TensorProto.FLOAT}

    out16 = mixed / "int4-cuda"
    with caplog.at_level(logging.WARNING):  # (no --fp16-activations: CUDA implies it)
        result = quantize_folder(mixed / "fp32", out16, QuantSettings("int4", provider="cuda"))
    assert result["report"]["passed"]
    info = read_model_folder(out16)
    q16 = info.quantization
    assert info.kv_dtype == "float16" and q16.accuracy_level == 0
    wide = {_module(n): k for n, k in TYPES.items() if k in ("Q4_K", "Q5_K", "Q6_K")}
    assert {m: r["gguf_type"] for m, r in q16.fp16_rounded_scales.items()} == wide
    assert all(0 < r["max_abs_error"] < 1e-3 for r in q16.fp16_rounded_scales.values())
    assert f"float16 cannot hold the scales of {len(wide)} carried GGUF tensors" in caplog.text
    # (the offset rows' scales are fp16 too: a little more or less rounding, either way)
    assert q16.max_abs_offset_error == pytest.approx(q.max_abs_offset_error, rel=0.1)
    report = json.loads((out16 / "report.json").read_text())
    assert report["quantization"]["fp16_rounded_scales"] == q16.fp16_rounded_scales
    from runtime.quality import quality_table

    rows = quality_table([out, out16]).splitlines()[2:]
    assert "fp16 scales rounded" not in rows[0]
    assert rows[1].rstrip(" |").endswith(f"fp16 scales rounded in {len(wide)}")


def test_int8_carries_the_4_bit_blocks_too(mixed):
    out = mixed / "int8"
    result = quantize_folder(mixed / "fp32", out, QuantSettings("int8"))
    assert result["report"]["passed"]
    q = read_model_folder(out).quantization
    assert all(r.carried for r in q.weights.values())
    assert q.weights["layers.0.attention.wq"].origin == "gguf-Q4_K"


def test_a_type_with_no_exact_form_is_requantized_and_said_so(tmp_path, caplog):
    path = write_mixed(tmp_path, {**TYPES, "blk.1.ffn_up.weight": "Q2_K"})
    export_model(path, tmp_path / "fp32", target="ort")
    with caplog.at_level(logging.WARNING):
        quantize_folder(tmp_path / "fp32", tmp_path / "int4", QuantSettings("int4"), verify=False)
    assert "layers.1.feed_forward.w3.weight is Q2_K in the GGUF" in caplog.text
    q = read_model_folder(tmp_path / "int4").quantization
    note = q.requantized_gguf_tensors["layers.1.feed_forward.w3.weight"]
    assert note["gguf_type"] == "Q2_K" and 0 < note["relative_rms_error"] < 0.5
    assert q.weights["layers.1.feed_forward.w3"].origin.startswith("rtn")
    assert q.weights["layers.0.feed_forward.w3"].origin == "gguf-Q4_K"


def test_a_q8_0_file_quantized_to_int4_is_4_bit(tmp_path):
    """When the file's main type is wider than asked (a Q8_0 file, int4), its layers are rounded
    to 4 bits as asked; the 8-bit LM head keeps its Q8_0 blocks."""
    types = {name: "Q8_0" for name in TYPES}
    path = write_mixed(tmp_path, types)
    export_model(path, tmp_path / "fp32", target="ort")
    quantize_folder(tmp_path / "fp32", tmp_path / "int4", QuantSettings("int4"), verify=False)
    q = read_model_folder(tmp_path / "int4").quantization
    assert q.weights["layers.0.attention.wq"].origin.startswith("rtn")
    assert q.weights["layers.0.attention.wq"].bits == 4
    assert q.weights["output"].origin == "gguf-Q8_0" and q.weights["output"].carried


def test_gguf_quality_table_shows_both_divergences():
    """docs/gguf_quality.md puts llama.cpp's KL from the reference beside ours (perplexity
    ratios scatter by chance; KL only grows with the error); rows scored before it was measured
    say so with a dash instead of a number, and each row's machine is named."""
    from export.verify.gguf_quality import markdown

    def row(file, cpp_kl):
        text = {
            "tokens": 503, "reference_perplexity": 18.914, "perplexity": 18.875,
            "llama_cpp_perplexity": 18.775, "ratio_to_reference": 0.9980,
            "ratio_to_llama_cpp": 1.0053, "llama_cpp_ratio_to_reference": 0.9927,
            "kl_divergence": 2.9e-3,
        }  # fmt: skip
        if cpp_kl is not None:
            text["llama_cpp_kl_divergence"] = cpp_kl
        return {"file": file, "tensor_types": {"Q4_1": 210}, "precision": "int4",
                "kernel": "native", "texts": {"prose": text}}  # fmt: skip

    table = markdown([row("new.gguf", 3.4e-3), row("old.gguf", None)], "test CPU").splitlines()
    header = next(line for line in table if line.startswith("| file"))
    new = next(line for line in table if line.startswith("| new.gguf"))
    old = next(line for line in table if line.startswith("| old.gguf"))
    cells = [c.strip() for c in header.split("|")]
    at = cells.index("llama.cpp KL")
    assert [c.strip() for c in new.split("|")][at] == "3.4e-03"
    assert [c.strip() for c in old.split("|")][at] == "—"
    assert [c.strip() for c in new.split("|")][cells.index("KL")] == "2.9e-03"
    # rows kept from a run on another machine name theirs (`--append`)
    assert "CPU: test CPU." in "\n".join(table)
    elsewhere = {**row("new.gguf", 3.4e-3), "cpu": "Other CPU"}
    text = markdown([elsewhere, row("old.gguf", None)], "test CPU")
    assert "CPUs: Other CPU (new.gguf); test CPU (old.gguf)." in text


def test_paired_log_ratio_is_the_perplexity_ratio_with_its_standard_error():
    """The ratio of two perplexities on the same tokens is exp of the mean per-token difference
    of their NLLs; its standard error is that difference's spread over √n, so two engines that
    differ by a constant per token have a ratio known exactly (s.e. 0) and a noisy difference's
    s.e. shrinks as the text grows."""
    from export.verify.parity import paired_log_ratio, perplexity, token_nll

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, 401).tolist()
    a = rng.normal(size=(401, 50)).astype(np.float32)
    b = a + rng.normal(scale=0.05, size=a.shape).astype(np.float32)
    log, se = paired_log_ratio(token_nll(a, ids), token_nll(b, ids))
    assert np.isclose(np.exp(log), perplexity(a, ids) / perplexity(b, ids), rtol=1e-12)
    d = token_nll(a, ids) - token_nll(b, ids)
    assert se > 0 and np.isclose(se, d.std(ddof=1) / np.sqrt(400))
    log_c, se_c = paired_log_ratio(token_nll(a, ids) + 0.01, token_nll(a, ids))
    assert np.isclose(log_c, 0.01) and se_c < 1e-12
    _, se_short = paired_log_ratio(token_nll(a, ids)[:100], token_nll(b, ids)[:100])
    assert se_short > se


def test_gguf_quality_pools_the_texts_and_judges_the_goal_against_chance():
    """Each file's three texts are also scored as one sample, and a miss of the 0.3 % goal is
    told apart from chance by its standard error; rows scored before the standard errors were
    measured show a dash and no pooled line."""
    from export.verify.gguf_quality import markdown, pooled, verdict

    assert verdict(1.0029, 0.001) == "within 0.3 %"
    assert verdict(0.9960, 0.0025) == "ours better by 0.40 %, 1.60 s.e. (chance)"
    assert verdict(1.0060, 0.0010) == "ours worse by 0.60 %, 5.98 s.e."
    rng = np.random.default_rng(1)
    ref = rng.gamma(2.0, 1.5, 1600)
    nll = {"ref": ref, "ours": ref + 0.002, "cpp": ref + rng.normal(0, 0.05, 1600)}
    q = pooled(nll)
    assert q["tokens"] == 1600 and np.isclose(q["ratio_to_reference"], np.exp(0.002))
    assert q["ratio_to_reference_se"] < 1e-12 < q["ratio_to_llama_cpp_se"]
    text = {
        "tokens": 503, "reference_perplexity": 18.9, "perplexity": 19.0,
        "llama_cpp_perplexity": 18.9, "ratio_to_reference": 1.005, "ratio_to_llama_cpp": 1.005,
        "llama_cpp_ratio_to_reference": 1.0, "kl_divergence": 3e-3,
        "llama_cpp_kl_divergence": 4e-3,
    }  # fmt: skip
    new = {"file": "new.gguf", "tensor_types": {"Q4_K": 16}, "precision": "int4",
           "kernel": "native", "texts": {"prose": {**text, "ratio_to_llama_cpp_se": 0.0021}},
           "pooled": q}  # fmt: skip
    old = {**new, "file": "old.gguf", "texts": {"prose": text}}
    del old["pooled"]
    table = markdown([new, old], "test CPU").splitlines()
    assert next(x for x in table if x.startswith("| new.gguf")).endswith("| 1.0050 | 0.21 % |")
    assert next(x for x in table if x.startswith("| old.gguf")).endswith("| 1.0050 | — |")
    at = table.index("## All texts pooled")
    summary = [x for x in table[at:] if x.startswith("| ")][1:]
    assert len(summary) == 1 and summary[0].startswith("| new.gguf | 1600 | 1.0020 ± 0.00 % |")


def test_gguf_quality_cuts_long_texts_into_even_windows():
    """A text longer than a window is scored in the fewest windows of equal length, every token
    in exactly one; a short text is one window."""
    from export.verify.gguf_quality import WINDOW, windows

    for n in (1, 503, WINDOW, WINDOW + 1, 1887, 3 * WINDOW + 2):
        ws = windows(list(range(n)))
        assert [t for w in ws for t in w] == list(range(n))
        assert len(ws) == -(-n // WINDOW) and max(map(len, ws)) - min(map(len, ws)) <= 1
    assert [len(w) for w in windows(list(range(1887)))] == [943, 944]
    # a tokenizer's leading BOS starts every window, and is counted in its length
    ids = [2] + list(range(100, 100 + 1887))
    ws = windows(ids, [2])
    assert [w[0] for w in ws] == [2, 2] and max(map(len, ws)) <= WINDOW
    assert [t for w in ws for t in w[1:]] == ids[1:]
    assert windows([2, 7], [2]) == [[2, 7]]
    with pytest.raises(AssertionError):
        windows([7, 8], [2])


def test_the_second_texts_are_longer_and_of_the_same_three_kinds(default_tokenizer):
    """The second prose, chat and code texts ship with the runtime and are each longer than the
    first of their kind (1,400–1,900 tokens on the default model: with the first three, ~6,300
    tokens for the two-engine comparison), and none repeats a first text."""
    from runtime.texts import eval_texts, more_texts

    first, second = eval_texts(), more_texts()
    assert [k.removesuffix(" 2") for k in second] == list(first)
    for (kind, text), old in zip(second.items(), first.values(), strict=True):
        n = len(default_tokenizer.encode(text))
        assert 1300 <= n <= 2000 and n > len(default_tokenizer.encode(old)), (kind, n)
        assert old[:200] not in text
    assert second["chat 2"].startswith("User: ") and "\n\nAssistant: " in second["chat 2"]
    compile(second["code 2"], "more-code.txt", "exec")  # real Python


def test_gguf_quality_scores_a_file_in_windows_and_pools_every_text(tmp_path, monkeypatch):
    """score() end to end on the mixed test GGUF, with llama.cpp's logits stood in by the fp32
    reference's (the `bench` extra is not in CI): all six texts, each cut into windows that
    start with the tokenizer's lead tokens, every scored token pooled once, and the stand-in's
    ratio to the reference exactly 1."""
    from export.verify import gguf_quality as gq
    from runtime.texts import eval_texts, more_texts
    from runtime.tokenizer import Tokenizer

    path = write_mixed(tmp_path)
    models = tmp_path / "m"
    monkeypatch.setattr(gq, "WINDOW", 200)  # the test model's context is 256
    monkeypatch.setattr(gq, "llama_cpp_logits",
                        lambda _, ids: gq.folder_logits(models / "x-fp32", ids))  # fmt: skip
    row = gq.score("x", path, "int4", models, lambda m: None)
    texts = {**eval_texts(), **more_texts()}
    assert list(row["texts"]) == list(texts)
    tok = Tokenizer.from_folder(models / "x-fp32")
    scored = 0
    for kind, text in texts.items():
        ids, lead = tok.encode(text), tok.encode("")
        ws = gq.windows(ids, lead)
        s = row["texts"][kind]
        assert s["tokens"] == len(ids) and s["windows"] == len(ws) > 1
        assert all(w[: len(lead)] == lead and len(w) <= 200 for w in ws)
        assert s["llama_cpp_ratio_to_reference"] == 1.0 and s["llama_cpp_kl_divergence"] < 1e-12
        assert s["kl_divergence"] > 0 and s["ratio_to_llama_cpp_se"] > 0
        scored += sum(len(w) - 1 for w in ws)
    q = row["pooled"]
    assert q["tokens"] == scored and q["llama_cpp_ratio_to_reference"] == 1.0
    assert q["ratio_to_llama_cpp"] == pytest.approx(q["ratio_to_reference"], rel=1e-12)
