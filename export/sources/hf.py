"""Weights, config and tokenizer from a Hugging Face folder.

config.json + model.safetensors (or a sharded model.safetensors.index.json), tokenizer.json and
tokenizer_config.json (chat template). Safetensors only: no pickle is ever loaded. Hugging Face's
Llama already uses the rotate-half RoPE layout, so only names change (KEY_MAP).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.errors import SourceError, UnsupportedArchitectureError
from export.model.config import LlamaConfig
from export.sources.common import check_shapes, key_mapper

KEY_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attention.wq.bias",  # Qwen2
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attention.wk.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attention.wv.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attention.q_norm.weight",  # Qwen3
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attention.k_norm.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
}
map_name = key_mapper(KEY_MAP)


# model_type → the switches of the one reference model (export/model/config.py) it sets
FAMILIES = {
    "llama": {},
    "qwen2": {"qkv_bias": True},  # Qwen2 / 2.5: biases on q, k, v; tied or untied head
    "qwen3": {"qk_norm": True},  # Qwen3: RMSNorm on each head of q and k (QK-norm)
}


def _family(cfg: dict) -> dict:
    kind = cfg.get("model_type")
    if kind not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"config.json model_type is {kind!r}; supported: {', '.join(FAMILIES)}"
        )
    unsupported = [
        key
        for key in ("attention_bias", "mlp_bias", "use_sliding_window")
        if cfg.get(key) and not (key == "attention_bias" and FAMILIES[kind].get("qkv_bias"))
    ]
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={cfg['hidden_act']!r}")
    if unsupported:
        raise UnsupportedArchitectureError(
            f"config.json ({kind}) sets {', '.join(unsupported)}, which llamaonnx does not "
            "support yet"
        )
    return FAMILIES[kind]


def config_from_hf(cfg: dict) -> LlamaConfig:
    family = _family(cfg)
    theta, rs = _rope_settings(cfg)
    kind = rs.get("rope_type", rs.get("type", "none"))
    scaling = {"type": "none"}
    if kind == "linear":
        scaling = {"type": "linear", "factor": float(rs["factor"])}
    elif kind == "llama3":
        scaling = {
            "type": "llama3",
            "factor": float(rs["factor"]),
            "low_freq_factor": float(rs["low_freq_factor"]),
            "high_freq_factor": float(rs["high_freq_factor"]),
            "original_max_position": int(rs["original_max_position_embeddings"]),
        }
    elif kind not in ("none", "default"):
        raise SourceError(f"rope scaling {kind!r} is not supported; supported: linear, llama3")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return LlamaConfig.from_dict(
        dict(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            vocab_size=cfg["vocab_size"],
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            **family,
        )
    )


def _rope_settings(cfg: dict) -> tuple[float, dict]:
    """(rope theta, the scaling dict) in either spelling: transformers 5 saves them together as
    `rope_parameters` ({"rope_theta", "rope_type", "factor", …}); older folders keep
    `rope_theta` and `rope_scaling` at the top level. Reading only the old keys exported a
    transformers-5 Llama 3 with theta 10,000 and no llama3 scaling."""
    params = cfg.get("rope_parameters")
    if params is None:
        return float(cfg.get("rope_theta", 10000.0)), dict(cfg.get("rope_scaling") or {})
    if not isinstance(params, dict):
        raise SourceError(f"config.json rope_parameters must be an object, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise SourceError(
            "config.json has rope settings per layer type "
            f"({', '.join(sorted(params))}); a Llama model has one set"
        )
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))), dict(params)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SourceError(f"{index} is not a safetensors index ({e!r})") from None
        root = folder.resolve()
        for shard in shards:
            # a shard is a file of the folder itself: never `../x`, `/etc/passwd` or a link out
            if not isinstance(shard, str) or (folder / shard).resolve().parent != root:
                raise SourceError(
                    f"{index} names the shard {shard!r}, which is not a file inside {folder}; "
                    "shards must be plain file names in the model folder"
                )
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise SourceError(
        f"{folder} has no model.safetensors or model.safetensors.index.json "
        "(pickled .bin weights are never loaded)"
    )


def load_hf(folder: Path) -> tuple[LlamaConfig, dict[str, np.ndarray], dict, str | None]:
    from safetensors import safe_open

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    config = config_from_hf(json.loads(cfg_path.read_text()))
    state = {}
    for path in _weight_files(folder):
        if not path.is_file():
            raise SourceError(f"weight shard {path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    ours = map_name(key)
                    if ours is None:
                        if key.endswith("rotary_emb.inv_freq"):
                            continue
                        raise SourceError(f"unexpected tensor {key!r} in {path.name}")
                    state[ours] = f.get_tensor(key).float().numpy()
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"{path} is truncated or not a safetensors file: {e}") from e
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise SourceError(f"{folder} has no tokenizer.json")
    template = None
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        template = json.loads(tc.read_text()).get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    check_shapes(config, state)
    return config, state, json.loads(tok_path.read_text()), template
