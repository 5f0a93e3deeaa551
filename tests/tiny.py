"""Tiny seeded models, by preset name, written as Hugging Face folders with a real byte-level
tokenizer (test helpers: they live here, not in the library)."""

from pathlib import Path

import torch

from export.errors import ConfigError
from export.model.config import LlamaConfig, RopeScaling
from export.model.transformer import Transformer
from export.sources.hf_folder import write_hf_folder

# The tiny seeded models of the tests, looked up by exact name.
PRESETS = {
    "tiny": LlamaConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=256,
        intermediate_size=128,
        max_position=256,
        tie_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    "tiny-tied-mqa": LlamaConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        vocab_size=256,
        intermediate_size=96,
        max_position=256,
        tie_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(type="llama3", factor=8.0, original_max_position=64),
    ),
    "tiny-mha": LlamaConfig(
        dim=48,
        n_layers=1,
        n_heads=3,
        n_kv_heads=3,
        vocab_size=128,
        intermediate_size=64,
        max_position=128,
        rope_scaling=RopeScaling(type="linear", factor=2.0),
    ),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def random_model(config: LlamaConfig, seed: int = 0) -> Transformer:
    """A seeded random model whose activations stay in a realistic range (for tests)."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5))
    return model.eval()


# a tiny model in transformers' own config names, for models that transformers builds (the oracle)
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def byte_tokenizer_json() -> dict:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {"type": "BPE", "vocab": {c: i for i, c in enumerate(alphabet)}, "merges": []},
    }


def write_tiny(folder: Path, name: str = "tiny", seed: int = 0):
    model = random_model(preset(name), seed=seed)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    write_hf_folder(folder, model.config, state, byte_tokenizer_json())
    import json

    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return model
