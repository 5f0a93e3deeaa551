"""Tiny seeded models written as Hugging Face folders with a real byte-level tokenizer."""

from pathlib import Path

from export.model.config import preset
from export.model.transformer import random_model
from export.sources.hf_folder import write_hf_folder

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
