"""GGUF files of every GGUF family (llama, qwen2, qwen3, gemma2, gemma3, phi3), written from a tiny
seeded transformers model the way llama.cpp's converter writes them (tests/gguf_writer.py).

Two oracles: transformers' own GGUF reader loads each file back to the model it came from (so the
writer is right), and the file exports to the graph the model's Hugging Face folder exports to,
matching transformers' logits. Configs stay within what a GGUF can say: llama.cpp fixes Gemma's
query scale to head_dim ** -0.5, its sliding pattern (2 for Gemma 2, 6 for Gemma 3) and Gemma 3's
local theta (10,000); transformers' reader also leaves Gemma's soft-caps and query scalar at their
defaults (50, 30 and 256), so the Gemma models here use those (head_dim 256)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import numpy_helper

from export.pipeline import export_model
from runtime.session import Session
from tests.gguf_writer import write_gguf
from tests.test_families import PHI3_LONGROPE, TOLERANCE
from tests.tiny import TINY, byte_tokenizer_json

GEMMA3_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
}
MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY, rope_theta=500000.0)
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**TINY, rope_theta=1e6, tie_word_embeddings=True)
    ),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**TINY, head_dim=128, rope_theta=1e6, tie_word_embeddings=True)
    ),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            **TINY,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=6,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    ),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(
            **{**TINY, "num_hidden_layers": 6},  # 5 sliding layers, then a full one
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=6,
            rope_parameters=GEMMA3_ROPE,
        )
    ),
    "phi3": lambda: transformers.Phi3ForCausalLM(
        transformers.Phi3Config(
            **{**TINY, "max_position_embeddings": 256},
            original_max_position_embeddings=64,
            rope_parameters=PHI3_LONGROPE,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    ),
    "phi3-plain": lambda: transformers.Phi3ForCausalLM(  # rope without scaling
        transformers.Phi3Config(**TINY, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ),
}
# transformers' GGUF reader leaves out Phi-3's longrope factors: it reads "phi3-plain" only
READ_BY_TRANSFORMERS = sorted(set(MODELS) - {"phi3"})


@pytest.fixture(scope="module", params=sorted(MODELS))
def written(request, tmp_path_factory):
    """(arch, transformers model, its HF folder, its GGUF file)."""
    torch.manual_seed(1)
    hf = MODELS[request.param]().eval()
    arch = request.param.split("-")[0]
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.5)
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    hf.save_pretrained(root / "hf")
    tokenizer = byte_tokenizer_json()
    (root / "hf" / "tokenizer.json").write_text(json.dumps(tokenizer))
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    (root / "gguf").mkdir()
    path = write_gguf(root / "gguf" / "model.gguf", hf, arch, tokens)
    return arch, hf, root / "hf", path


def _logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


IDS = np.array([list(range(5, 200, 9))], np.int64)  # 22 tokens: past every window


@pytest.mark.parametrize("written", READ_BY_TRANSFORMERS, indirect=True)
def test_transformers_reads_the_written_gguf_back(written):
    """The oracle for the writer: transformers' GGUF loader undoes llama.cpp's conventions.
    (The longrope phi3 file is held to its model by the export test alone.)"""
    arch, hf, _, path = written
    back = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert float(np.abs(_logits(back, IDS) - _logits(hf, IDS)).max()) <= 1e-5


def test_the_gguf_exports_to_the_graph_of_the_hf_folder(written, tmp_path):
    arch, hf, folder, path = written
    graphs = {}
    for name, src in (("hf", folder), ("gguf", path)):
        out = tmp_path / name
        report = export_model(src, out, target="ort")["report"]
        assert report["passed"]
        session = Session(out, provider="cpu")
        got = session.forward(
            IDS, np.ones_like(IDS), np.arange(IDS.shape[1])[None], session.new_cache(1, 22)
        )
        delta = float(np.abs(got - _logits(hf, IDS)).max())
        assert delta <= TOLERANCE, (name, delta)
        graphs[name] = onnx.load(out / "model.onnx")
    a, b = graphs["hf"].graph, graphs["gguf"].graph
    assert [(n.op_type, n.domain, str(n.attribute)) for n in a.node] == [
        (n.op_type, n.domain, str(n.attribute)) for n in b.node
    ]
    weights = {i.name: numpy_helper.to_array(i) for i in b.initializer}
    # Gemma's norms went through 1 + w and back, Phi-3's longrope factors through float32
    for init in a.initializer:
        np.testing.assert_allclose(numpy_helper.to_array(init), weights[init.name], atol=1e-5)


def test_the_gguf_family_is_read_from_its_metadata(written):
    from export.sources import load_source

    arch, hf, folder, path = written
    ours, theirs = load_source(path).config.to_dict(), load_source(folder).config.to_dict()
    for config in (ours, theirs):
        for key in ("bos_token_id", "eos_token_ids", "pad_token_id"):  # a GGUF's tokenizer's
            config.pop(key)
        config["head_dim"] = config["head_dim"] or config["dim"] // config["n_heads"]
        config["norm_eps"] = float(np.float32(config["norm_eps"]))  # a GGUF holds float32
        for key in ("short_factor", "long_factor"):
            config["rope_scaling"][key] = np.float32(config["rope_scaling"][key]).tolist()
    assert ours == theirs


def test_a_llama3_gguf_carries_its_rope_scaling_as_rope_freqs(tmp_path):
    """Llama 3.1+ GGUFs store llama3 rope scaling as a rope_freqs tensor (a divisor per
    frequency), not as metadata: read as such, the export matches transformers' llama3 model."""
    torch.manual_seed(2)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, rope_parameters=rope))
    hf.eval()
    vocab = byte_tokenizer_json()["model"]["vocab"]
    path = write_gguf(tmp_path / "llama3.gguf", hf, "llama", sorted(vocab, key=vocab.get))
    from export.sources import load_source

    assert load_source(path).config.rope_scaling.type == "factors"
    export_model(path, tmp_path / "ort", target="ort")
    session = Session(tmp_path / "ort", provider="cpu")
    got = session.forward(IDS, np.ones_like(IDS), np.arange(22)[None], session.new_cache(1, 22))
    assert float(np.abs(got - _logits(hf, IDS)).max()) <= TOLERANCE
