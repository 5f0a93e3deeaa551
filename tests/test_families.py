"""Every supported family against the oracle: a tiny seeded model built and saved by Hugging Face
transformers itself, exported to every target, its ONNX logits compared with transformers' own
forward pass in fp32 over a prefill, cached decode steps and a right-padded batch of two.

Families: llama (and so SmolLM2), mistral (sliding window), qwen2 (q/k/v biases), qwen3 (QK-norm),
gemma2 (1 + w norms, embedding scale, GeGLU, sandwich norms, query scale, soft-capping, alternating
local/global layers), gemma3 (the same with QK-norm and a local rope theta, no soft-capping) and
phi3 (fused q/k/v and gate/up weights, longrope). Windows and soft-caps are tiny so that they act
within the 22 tokens of a test."""

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
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**TINY, sliding_window=6, rope_theta=1e6)
    ),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            **TINY,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=6,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        )
    ),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(
            **TINY,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            },
        )
    ),
    "phi3": lambda: transformers.Phi3ForCausalLM(
        transformers.Phi3Config(
            **{**TINY, "max_position_embeddings": 256},
            original_max_position_embeddings=64,  # a cached run stays below: short factors
            rope_parameters=PHI3_LONGROPE,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    ),
}
TOLERANCE = 1e-4
PHI3_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0 + 0.1 * i for i in range(8)],
    "long_factor": [1.0 + 2.0 * i for i in range(8)],
}


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
    kind = hf.config.model_type
    assert config.qkv_bias == (kind == "qwen2")
    assert config.qk_norm == (kind in ("qwen3", "gemma3_text"))
    assert config.tie_embeddings == hf.config.tie_word_embeddings
    assert config.norm_offset == (1.0 if kind.startswith("gemma") else 0.0)
    assert config.sliding_window == getattr(hf.config, "sliding_window", None)
    assert config.rope_scaling.type == ("longrope" if kind == "phi3" else "none")


def test_the_int4_folder_verifies(family, tmp_path):
    """Quantized on llamaonnx's kernels: rewrites that do not apply to a family (q/k/v fusion
    with biases, the native attention with QK-norm) leave onnxruntime's ops in place."""
    from export.quant import QuantSettings, quantize_folder

    _, _, folders = family
    settings = QuantSettings("int4", kernel="native")  # on any CPU (its portable C path)
    report = quantize_folder(folders["ort"], tmp_path / "int4", settings)["report"]
    assert report["passed"] and report["providers"]["cpu"]["perplexity_ratio"] <= 1.01


def test_longrope_takes_its_long_factors_past_the_original_context(tmp_path):
    """transformers' rule: a forward whose last position passes original_max_position_embeddings
    rotates with the long factors, one below it with the short ones; both, on every target."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        **{**TINY, "max_position_embeddings": 256},
        original_max_position_embeddings=12,
        rope_parameters=PHI3_LONGROPE,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    hf = transformers.Phi3ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    for target in ("portable", "ort"):
        export_model(tmp_path / "hf", tmp_path / target, target=target)
        session = Session(tmp_path / target, provider="cpu")
        for n in (10, 22):  # below and past the original 12
            ids = np.array([list(range(3, 3 + 7 * n, 7))], np.int64)
            got = session.forward(
                ids, np.ones_like(ids), np.arange(n)[None], session.new_cache(1, n)
            )
            delta = float(np.abs(got - _hf(hf, ids)).max())
            assert delta <= TOLERANCE, (target, n, delta)


def test_hf_folder_refuses_a_family_it_cannot_spell(family, tmp_path):
    """`llamaonnx hf-folder` writes Llama config.json files; a Gemma written as one would load
    as a different model, so only the Llama family passes."""
    from export.errors import UnsupportedArchitectureError
    from export.sources import load_source
    from export.sources.hf_folder import hf_config

    hf, src, _ = family
    config = load_source(src).config
    if hf.config.model_type == "llama":
        assert hf_config(config)["model_type"] == "llama"
    else:
        with pytest.raises(UnsupportedArchitectureError, match="Llama-family folders only"):
            hf_config(config)


def test_a_multimodal_gemma3_folder_exports_its_language_model(tmp_path):
    """model_type gemma3: the text config is nested and the weights carry a prefix beside a
    vision tower; the export is the language model alone, with the multimodal model's own logits
    on text."""
    torch.manual_seed(0)
    text = transformers.Gemma3TextConfig(
        **TINY,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=250,
        boi_token_index=251,
        eoi_token_index=252,
    )
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    report = export_model(tmp_path / "hf", tmp_path / "ort", target="ort")["report"]
    assert report["passed"]
    session = Session(tmp_path / "ort", provider="cpu")
    ids = np.array([list(range(5, 200, 9))], np.int64)
    got = session.forward(ids, np.ones_like(ids), np.arange(22)[None], session.new_cache(1, 22))
    assert float(np.abs(got - _hf(hf, ids)).max()) <= TOLERANCE
