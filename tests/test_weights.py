"""Weight loading (GGUF and Hugging Face folders), checked against transformers as an oracle."""

import json

import numpy as np
import pytest
import torch
import transformers  # the oracle (a dev dependency)

from export.errors import SourceError, UnsupportedArchitectureError
from export.sources import build_model, default_gguf_path, load_source
from export.sources.hf_folder import write_hf_folder
from tests.tiny import TINY, preset, random_model

BYTE_TOKENIZER = {
    "version": "1.0",
    "model": {
        "type": "BPE",
        "vocab": {chr(65 + i % 26) + str(i): i for i in range(256)},
        "merges": [],
    },
}


def _hf_logits(folder, ids):
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits


def _our_logits(model, ids):
    t = torch.tensor(ids)
    b, s = t.shape
    with torch.no_grad():
        return model(t, torch.ones_like(t), torch.arange(s).expand(b, -1), model.empty_cache(b))[0]


@pytest.mark.parametrize("name", ["tiny", "tiny-tied-mqa", "tiny-mha"])
def test_hf_folder_round_trip_matches_transformers(tmp_path, name):
    ref = random_model(preset(name), seed=2)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    write_hf_folder(tmp_path, ref.config, state, BYTE_TOKENIZER)
    source = load_source(tmp_path)
    assert source.config.tie_embeddings == ref.config.tie_embeddings
    model = build_model(source)
    ids = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]] * 2
    diff = (_our_logits(model, ids) - _hf_logits(tmp_path, ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_default_gguf_matches_transformers_on_dequantized_weights(
    tmp_path, default_source, default_model, default_tokenizer
):
    write_hf_folder(tmp_path, default_source.config, default_source.state)
    ids = [
        default_tokenizer.encode(
            "The quick brown fox jumps over the lazy dog. def f(x): return 2*x"
        )
    ]
    diff = (_our_logits(default_model, ids) - _hf_logits(tmp_path, ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_default_config_from_gguf_metadata(default_source):
    c = default_source.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size) == (576, 30, 9, 3, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.eos_token_ids == (2,)
    assert default_gguf_path().name.endswith(".gguf")


TEXTS = [
    "Hello world!",
    "Prices rose 12.5% in 2024, to $1,234,567.",
    "naïve café — über straße; 日本語のテキスト; emoji 😀🚀",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "  leading spaces and\ttabs\n\nnew lines",
]


def test_gguf_tokenizer_matches_transformers_gguf_conversion(default_tokenizer):
    path = default_gguf_path()
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert default_tokenizer.encode(text) == hf(text).input_ids, text
        assert default_tokenizer.decode(default_tokenizer.encode(text)) == text


def test_gguf_tokenizer_known_ids(default_tokenizer):
    # SmolLM2's own tokenizer splits every digit and keeps its chat specials whole.
    assert default_tokenizer.encode("2024") == [34, 32, 34, 36]
    assert default_tokenizer.encode("<|im_start|>user") == [1, 4093]


def test_missing_truncated_and_foreign_sources_fail_clearly(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        load_source(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" * 10)
    with pytest.raises(SourceError, match="not a GGUF file"):
        load_source(bad)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(default_gguf_path().read_bytes()[:100_000])
    with pytest.raises(SourceError, match="truncated or corrupt"):
        load_source(trunc)
    folder = tmp_path / "falcon"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(UnsupportedArchitectureError, match="'falcon'; supported: llama, mistral"):
        load_source(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(SourceError, match="config.json \\(mistral\\) lacks hidden_size"):
        load_source(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="config.json is missing"):
        load_source(empty)


def test_inconsistent_head_counts_are_rejected(tmp_path):
    ref = random_model(preset("tiny"), seed=2)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    write_hf_folder(tmp_path, ref.config, state, BYTE_TOKENIZER)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # weights were made for 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="inconsistent head counts"):
        load_source(tmp_path)
    assert np.isfinite(state["norm.weight"]).all()


ROPE_CASES = {
    "llama3": dict(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "linear": dict(rope_theta=20000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "default": dict(rope_theta=1234.0),
    "yarn": dict(  # Qwen2.5's long-context setting, on a Llama here
        rope_theta=1e6,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "yarn-mscale": dict(
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 16,
            "beta_slow": 2,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
    ),
}


@pytest.mark.parametrize("spelling", ["transformers", "old keys"])
@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_config_spellings_of_rope_match_transformers(tmp_path, case, spelling):
    """A folder saved by the installed transformers (5: `rope_parameters`) and the same folder
    with the old top-level `rope_theta` / `rope_scaling` read the same, and give transformers'
    own logits: the oracle is transformers, not our writer."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, **ROPE_CASES[case])
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(BYTE_TOKENIZER))
    saved = json.loads((tmp_path / "config.json").read_text())
    if spelling == "old keys":
        params = saved.pop("rope_parameters", None) or {}
        saved["rope_theta"] = params.pop("rope_theta")
        if params.get("rope_type", "default") != "default":
            saved["rope_scaling"] = params
        (tmp_path / "config.json").write_text(json.dumps(saved))
    else:
        assert "rope_parameters" in saved  # what transformers 5 writes
    source = load_source(tmp_path)
    assert source.config.rope_theta == ROPE_CASES[case]["rope_theta"]
    ids = [list(range(3, 200, 7))] * 2  # 29 tokens, past llama3's original 64 in rotation
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits
    diff = (_our_logits(build_model(source), ids) - expected).abs().max().item()
    assert diff <= 1e-4, diff


def test_rope_settings_for_an_unknown_layer_type_are_refused(tmp_path):
    from tests.tiny import TINY

    config = {
        **TINY,
        "model_type": "llama",
        "rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding": {"rope_theta": 1e4}},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="rope settings for layer types .*'sliding'"):
        load_source(tmp_path)
