"""Export of tiny models to every target: structure, parity (via verify) and atomic writing."""

import json
from collections import Counter

import onnx
import pytest

from export.errors import ExportError
from export.pipeline import export_model
from runtime.errors import OutputFolderError

L = 2  # layers of the tiny preset


def _ops(folder):
    model = onnx.load(str(folder / "model.onnx"))
    return model, Counter((n.domain, n.op_type) for n in model.graph.node)


def test_portable_keeps_one_node_per_op_and_passes_full_check(tiny_folders):
    model, ops = _ops(tiny_folders["portable"])
    assert ops[("llamaonnx", "RMSNorm")] == 2 * L + 1
    assert ops[("llamaonnx", "RotaryEmbedding")] == 2 * L
    assert ops[("llamaonnx", "GroupQueryAttention")] == L
    assert {f.name for f in model.functions} == {
        "RMSNorm",
        "RotaryEmbedding",
        "GroupQueryAttention",
    }
    onnx.checker.check_model(model, full_check=True)
    names = {n.name for n in model.graph.node if n.domain == "llamaonnx"}
    assert {
        "/model/layers.1/attn/gqa",
        "/model/layers.0/attn/rope_q",
        "/model/layers.0/attn/rope_k",
        "/model/layers.1/ffn_norm",
        "/model/norm",
    } <= names


def test_onnx23_uses_standard_ops(tiny_folders):
    model, ops = _ops(tiny_folders["onnx23"])
    assert ops[("", "RMSNormalization")] == 2 * L + 1
    assert ops[("", "RotaryEmbedding")] == 2 * L
    assert ops[("", "Attention")] == L
    assert not [k for k in ops if k[0] == "llamaonnx"] and not model.functions


def test_ort_uses_fused_contrib_ops(tiny_folders):
    model, ops = _ops(tiny_folders["ort"])
    assert ops[("com.microsoft", "GroupQueryAttention")] == L  # rotary fused in
    norms = (
        ops[("com.microsoft", "SkipSimplifiedLayerNormalization")]
        + ops[("", "SimplifiedLayerNormalization")]
    )
    assert (
        norms == 2 * L + 1 and ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 2 * L
    )
    assert "position_ids" not in {i.name for i in model.graph.input}
    assert (tiny_folders["ort"] / "genai_config.json").is_file()


@pytest.mark.parametrize("target", ["portable", "onnx23", "ort"])
def test_every_target_verified_within_fp32_tolerance(tiny_folders, target):
    folder = tiny_folders[target]
    report = json.loads((folder / "report.json").read_text())
    cpu = report["providers"]["cpu"]
    assert report["passed"] and cpu["max_abs_logit_delta"] <= 1e-3
    assert cpu["greedy_agreement"] == 64
    info = json.loads((folder / "llamaonnx.json").read_text())
    assert info["target"] == target and len(info["provenance"]["sha256"]) == 64
    assert info["io"]["outputs"][:3] == ["logits", "present.0.key", "present.0.value"]


def test_existing_folder_unknown_target_and_failures_leave_nothing(
    tiny_source, tmp_path, monkeypatch
):
    src, _ = tiny_source
    with pytest.raises(ExportError, match="unknown target"):
        export_model(src, tmp_path / "x", target="tensorrt")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputFolderError, match="already exists"):
        export_model(src, tmp_path / "exists")

    def boom(*a, **k):
        raise RuntimeError("disk full while saving")

    monkeypatch.setattr("export.pipeline.save_onnx", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(src, tmp_path / "out", target="portable", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_failed_verification_leaves_no_folder(tiny_source, tmp_path, monkeypatch):
    from export.errors import ParityError
    from export.verify import tolerances

    src, _ = tiny_source
    strict = tolerances.Tolerance(
        greedy_steps=64, required_greedy=64, perplexity_ratio=1.0, max_kl=0.0, max_abs_logit=0.0
    )
    monkeypatch.setitem(tolerances.TOLERANCES, "fp32", strict)
    with pytest.raises(ParityError, match="max |Δlogit|"):
        export_model(src, tmp_path / "out", target="portable")
    assert list(tmp_path.iterdir()) == []


def test_non_llama_source_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    from export.errors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError):
        export_model(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_little_disk_is_refused(tmp_path, monkeypatch):
    import shutil

    from runtime.errors import OutputFolderError
    from runtime.files import check_disk

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10_000_000))
    with pytest.raises(OutputFolderError, match="too little disk space.*0.01 GB free"):
        check_disk(tmp_path / "out", 2_000_000_000)


def test_a_pass_says_why_it_cannot_lower_a_graph(tiny_folders):
    """Preconditions are typed errors or logged reasons, never an assert."""
    from export.errors import LoweringError
    from export.passes import lower

    model = onnx.load(str(tiny_folders["portable"] / "model.onnx"))
    made = {o: n for n in model.graph.node for o in n.output}
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    gqa.input[1] = made[gqa.input[1]].input[0]  # k no longer goes through RotaryEmbedding
    with pytest.raises(LoweringError, match="--target onnx23 or portable"):
        lower(model, "ort")
    with pytest.raises(ExportError, match="unknown target 'tensorrt'"):
        lower(model, "tensorrt")


def test_rewrites_log_why_they_left_a_candidate(tiny_folders, tmp_path, caplog):
    from export.quant import QuantSettings, quantize_folder

    with caplog.at_level("INFO", logger="export.passes.graph"):
        quantize_folder(tiny_folders["onnx23"], tmp_path / "q", QuantSettings("int4"), verify=False)
    assert "projection fusion: layer 0 qkv left as it is: onnxruntime's GroupQueryAttention" in (
        caplog.text
    )


def test_verify_compares_with_transformers_and_catches_a_misread_config(
    tiny_source, tmp_path, monkeypatch
):
    """The first round's blind spot: a config misread by our loader changed the reference and
    the graph alike. transformers, reading the same folder, is the independent oracle."""
    import dataclasses

    from export.errors import ParityError
    from export.sources import hf

    src, _ = tiny_source
    good = export_model(src, tmp_path / "good", target="ort")["report"]
    assert good["oracle"]["name"].startswith("transformers ")
    assert good["oracle"]["reference_max_abs_logit_delta"] <= 1e-4
    assert good["providers"]["cpu"]["oracle_max_abs_logit_delta"] <= 1e-3

    read = hf.config_from_hf
    monkeypatch.setattr(  # the old bug: rope theta ignored
        hf, "config_from_hf", lambda cfg: dataclasses.replace(read(cfg), rope_theta=10000.0 * 7)
    )
    with pytest.raises(ParityError, match="differs from transformers .* misread"):
        export_model(src, tmp_path / "bad", target="ort")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("target", ["portable", "onnx23", "ort"])
def test_logits_to_keep_gives_the_last_positions_and_defaults_to_all(tiny_folders, target):
    """The optional `logits_to_keep` input: unfed, every position's logits (verify's view);
    1, the last position's alone, equal to the full run's last row; not a required input."""
    import numpy as np

    from runtime.session import Session

    session = Session(tiny_folders[target])
    assert session.keeps_logits and "logits_to_keep" not in session.input_names
    info = json.loads((tiny_folders[target] / "llamaonnx.json").read_text())
    assert "logits_to_keep" not in info["io"]["inputs"]
    ids = np.array([[5, 9, 17, 3, 11, 8, 2]])
    mask, pos = np.ones_like(ids), np.arange(7)[None]
    full = session.forward(ids, mask, pos, session.new_cache(1, 8))
    last = session.forward(ids, mask, pos, session.new_cache(1, 8), last=True)
    assert full.shape[1] == 7 and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    # the cache after a last-only prefill is the same: the next step agrees
    cache_a, cache_b = session.new_cache(1, 8), session.new_cache(1, 8)
    session.forward(ids, mask, pos, cache_a)
    session.forward(ids, mask, pos, cache_b, last=True)
    step = np.array([[4]])
    a = session.forward(step, np.ones((1, 8), np.int64), np.array([[7]]), cache_a)
    b = session.forward(step, np.ones((1, 8), np.int64), np.array([[7]]), cache_b)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_verify_compares_a_second_provider_with_the_first(tiny_folders, monkeypatch):
    """A folder checked on two providers is also checked provider against provider: the same
    graph, so only the kernels can differ (on a GPU this found CUDA's GatherBlockQuantized
    reading an embedding differently). Here the CPU twice: KL 0; over the bound, a failure."""
    import export.verify.parity as parity

    report = parity.verify_folder(tiny_folders["ort"], providers=("cpu", "cpu"))
    assert report["providers"]["cpu"]["kl_to_first_provider"] == pytest.approx(0, abs=1e-12)
    assert report["passed"]
    monkeypatch.setattr(parity, "PROVIDER_KL", -1.0)
    report = parity.verify_folder(tiny_folders["ort"], providers=("cpu", "cpu"))
    assert not report["passed"]
    assert any("from the same folder on cpu" in f for f in report["failures"])
