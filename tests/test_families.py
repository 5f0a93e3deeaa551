"""Every supported family against the oracle: a tiny seeded model built and saved by Hugging Face
transformers itself, exported to every target, its ONNX logits compared with transformers' own
forward pass in fp32 over a prefill, cached decode steps and a right-padded batch of two.

Supported so far: llama (and so SmolLM2), qwen2 (q/k/v biases), qwen3 (QK-norm). The families
issue lists the rest (Mistral, Gemma 2/3, Phi-3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers  # the oracle (a dev dependency)

from export.pipeline import export_model
from runtime.generator import right_pad
from runtime.session import Session
from tests.tiny import TINY, byte_tokenizer_json

FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY, rope_theta=500000.0)
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**TINY, rope_theta=1e6, tie_word_embeddings=True)
    ),
    # head_dim 32 ≠ hidden/heads (16), as Qwen3's own configs have it
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**TINY, head_dim=32, rope_theta=1e6, tie_word_embeddings=True)
    ),
}
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(transformers model, folder it saved, {target: exported folder})."""
    torch.manual_seed(0)
    hf = FAMILIES[request.param]().eval()
    with torch.no_grad():  # random biases and norms, so that a dropped one shows (transformers
        for name, p in hf.named_parameters():  # starts biases at 0 and norm weights at 1)
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.5)
    src = tmp_path_factory.mktemp(f"{request.param}-hf")
    hf.save_pretrained(src)
    (src / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    out = tmp_path_factory.mktemp(f"{request.param}-onnx")
    folders = {t: out / t for t in ("portable", "onnx23", "ort")}
    for target, folder in folders.items():
        report = export_model(src, folder, target=target)["report"]
        assert report["oracle"]["reference_max_abs_logit_delta"] <= TOLERANCE
    return hf, src, folders


def _hf(hf, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return hf(torch.from_numpy(ids), **kwargs).logits.numpy()


@pytest.mark.parametrize("target", ["portable", "onnx23", "ort"])
def test_prefill_and_cached_decode_match_transformers(family, target):
    hf, _, folders = family
    session = Session(folders[target], provider="cpu")
    ids = np.array([list(range(5, 200, 9))], np.int64)  # 22 tokens
    expected = _hf(hf, ids)
    s, steps = ids.shape[1] - 6, 6  # prefill 16, then 6 cached decode steps
    cache = session.new_cache(1, ids.shape[1])
    got = [session.forward(ids[:, :s], np.ones((1, s), np.int64), np.arange(s)[None], cache)]
    for t in range(s, s + steps):
        mask = np.ones((1, t + 1), np.int64)
        got.append(session.forward(ids[:, t : t + 1], mask, np.array([[t]]), cache))
    delta = float(np.abs(np.concatenate(got, axis=1) - expected).max())
    assert delta <= TOLERANCE, delta


@pytest.mark.parametrize("target", ["portable", "onnx23", "ort"])
def test_a_right_padded_batch_matches_transformers(family, target):
    hf, _, folders = family
    session = Session(folders[target], provider="cpu")
    prompts = [list(range(7, 120, 5)), list(range(40, 90, 7))]  # 23 and 8 tokens
    ids, mask, pos = right_pad(prompts, session.info.pad_token_id)
    got = session.forward(ids, mask, pos, session.new_cache(2, ids.shape[1]))
    expected = _hf(hf, ids, mask)
    valid = mask.astype(bool)
    delta = float(np.abs(got[valid] - expected[valid]).max())
    assert delta <= TOLERANCE, delta


def test_the_family_is_read_from_the_folder(family):
    from export.sources import load_source

    hf, src, _ = family
    config = load_source(src).config
    assert config.qkv_bias == (hf.config.model_type == "qwen2")
    assert config.qk_norm == (hf.config.model_type == "qwen3")
    assert config.tie_embeddings == hf.config.tie_word_embeddings


def test_the_int4_folder_verifies(family, tmp_path):
    """Quantized on llamaonnx's kernels: rewrites that do not apply to a family (q/k/v fusion
    with biases, the native attention with QK-norm) leave onnxruntime's ops in place."""
    from export.quant import QuantSettings, quantize_folder

    _, _, folders = family
    report = quantize_folder(folders["ort"], tmp_path / "int4", QuantSettings("int4"))["report"]
    assert report["passed"] and report["providers"]["cpu"]["perplexity_ratio"] <= 1.01
