"""Writes a source's weights as a Hugging Face folder (config.json, model.safetensors, tokenizer):
transformers reads it as an independent oracle in the tests, and `llamaonnx hf-folder` hands the
bundled GGUF to tools that want a Hugging Face folder (onnxruntime-genai's model builder, for the
benchmark's peer)."""

import dataclasses
import json
from pathlib import Path

import numpy as np

from export.errors import UnsupportedArchitectureError
from export.model.config import LlamaConfig
from export.sources.hf import KEY_MAP
from runtime.files import FolderKind

# what `llamaonnx hf-folder` writes, and so what its --force may replace
HF_FOLDER = FolderKind(
    "a Hugging Face folder written by `llamaonnx hf-folder`",
    "llamaonnx-hf.json",
    frozenset(
        {"llamaonnx-hf.json", "config.json", "model.safetensors", "tokenizer.json"}
        | {"tokenizer_config.json"}
    ),
)


# the family switches of export/model/config.py, which a Llama config.json cannot express
_SWITCHES = ("qkv_bias", "qk_norm", "norm_offset", "embed_scale", "activation", "sandwich_norm",
             "query_scale", "attn_softcap", "final_softcap", "sliding_window", "layer_types",
             "rope_local_theta")  # fmt: skip


def hf_config(c: LlamaConfig) -> dict:
    """transformers' LlamaConfig of a Llama-family model; other families are refused (the
    folder is for peers that read Llama folders, and a misnamed family would load wrongly)."""
    defaults = {f.name: f.default for f in dataclasses.fields(LlamaConfig)}
    changed = [name for name in _SWITCHES if getattr(c, name) != defaults[name]]
    if c.rope_scaling.type not in ("none", "linear", "llama3"):
        changed.append(f"rope scaling {c.rope_scaling.type}")
    if changed:
        raise UnsupportedArchitectureError(
            f"hf-folder writes Llama-family folders only; this model sets {', '.join(changed)} "
            "(use the model's own Hugging Face folder)"
        )
    scaling = None
    if c.rope_scaling.type == "linear":
        scaling = {"rope_type": "linear", "factor": c.rope_scaling.factor}
    elif c.rope_scaling.type == "llama3":
        s = c.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.resolved_head_dim,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": scaling,
        "max_position_embeddings": c.max_position,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids),
        "pad_token_id": c.pad_token_id,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def write_hf_folder(
    folder: Path, config: LlamaConfig, state: dict, tokenizer_json: dict | None = None
):
    from safetensors.numpy import save_file

    inverse = {}
    for hf, ours in KEY_MAP.items():
        for i in range(config.n_layers):
            inverse[ours.replace("{i}", str(i))] = hf.replace("{i}", str(i))
    tensors = {inverse[k]: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(config)))
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))


def write_source(source, folder: Path, force: bool = False) -> None:
    """A loaded `Source` (weights dequantized to float32) as a Hugging Face folder, atomically.
    `force` replaces only a folder this function wrote (its marker, llamaonnx-hf.json)."""
    from runtime.files import atomic_folder, write_json

    with atomic_folder(Path(folder), HF_FOLDER, force, [source.path]) as tmp:
        write_json(tmp / HF_FOLDER.marker, {"format_version": 1, "source": source.path.name})
        write_hf_folder(tmp, source.config, source.state, source.tokenizer_json)
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        if source.chat_template:
            config["chat_template"] = source.chat_template
        c = source.config
        vocab = {t["id"]: t["content"] for t in source.tokenizer_json.get("added_tokens", [])}
        for key, tid in (("bos_token", c.bos_token_id), ("pad_token", c.pad_token_id)):
            if tid is not None and tid in vocab:
                config[key] = vocab[tid]
        if c.eos_token_ids and c.eos_token_ids[0] in vocab:
            config["eos_token"] = vocab[c.eos_token_ids[0]]
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
