"""Weights, config and tokenizer from a Hugging Face folder.

config.json + model.safetensors (or a sharded model.safetensors.index.json), tokenizer.json and
tokenizer_config.json (chat template). Safetensors only: no pickle is ever loaded. Hugging Face's
Llama already uses the rotate-half RoPE layout, so only names change (KEY_MAP).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from export.errors import SourceError, UnsupportedArchitectureError
from export.model.config import LlamaConfig
from export.sources.common import check_shapes, key_mapper
from export.sources.families import SWITCHES

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
# Gemma 2/3 norm both sides of attention and MLP: its post_attention_layernorm is not Llama's
GEMMA_KEYS = {
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.post_attention_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.post_ffn_norm.weight",
}
# Phi-3 stores q, k, v as one matrix and gate, up as another: split along the rows
PHI3_FUSED = {
    "model.layers.{i}.self_attn.qkv_proj.weight": (
        "layers.{i}.attention.wq.weight",
        "layers.{i}.attention.wk.weight",
        "layers.{i}.attention.wv.weight",
    ),
    "model.layers.{i}.mlp.gate_up_proj.weight": (
        "layers.{i}.feed_forward.w1.weight",
        "layers.{i}.feed_forward.w3.weight",
    ),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """How one `model_type` maps onto the one reference model (export/model/config.py)."""

    switches: dict  # the family's fixed switches
    keys: dict = dataclasses.field(default_factory=dict)  # names beyond / instead of KEY_MAP
    fused: dict = dataclasses.field(default_factory=dict)  # one tensor → row blocks of ours
    window: str = "none"  # "none", "all" (every layer, if `sliding_window` is set), "types"
    allowed: tuple[str, ...] = ()  # config flags that are supported for this family
    tied: bool = False  # tie_word_embeddings where the config does not say (transformers' default)


FAMILIES = {  # model_type → its family (families.py) and how its folder spells it
    "llama": Family(SWITCHES["llama"]),
    "mistral": Family(SWITCHES["mistral"], window="all"),
    "qwen2": Family(SWITCHES["qwen2"], allowed=("attention_bias",)),  # tied or untied head
    "qwen3": Family(SWITCHES["qwen3"]),
    "gemma2": Family(SWITCHES["gemma2"], keys=GEMMA_KEYS, window="types", tied=True),
    "gemma3_text": Family(SWITCHES["gemma3"], keys=GEMMA_KEYS, window="types", tied=True),
    "phi3": Family(SWITCHES["phi3"], fused=PHI3_FUSED, window="all"),  # mini-4k: 2047 window
}
# transformers' spellings of the MLP activation → ours
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _family(cfg: dict) -> Family:
    kind = cfg.get("model_type")
    if kind not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"config.json model_type is {kind!r}; supported: {', '.join(FAMILIES)}"
        )
    family = FAMILIES[kind]
    unsupported = [
        key
        for key in ("attention_bias", "mlp_bias", "use_sliding_window")
        if cfg.get(key) and key not in family.allowed
    ]
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    partial = cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        unsupported.append(f"partial_rotary_factor={partial}")
    act = _activation(cfg)
    if ACTIVATIONS.get(act) != family.switches.get("activation", "silu"):
        unsupported.append(f"hidden_act={act!r}")
    if unsupported:
        raise UnsupportedArchitectureError(
            f"config.json ({kind}) sets {', '.join(unsupported)}, which llamaonnx does not "
            "support yet"
        )
    return family


def _activation(cfg: dict) -> str:
    # Gemma names it hidden_activation (hidden_act is an older, ignored key there)
    return cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"


_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
             "intermediate_size")  # fmt: skip


def config_from_hf(cfg: dict) -> LlamaConfig:
    family = _family(cfg)
    missing = [key for key in _REQUIRED if key not in cfg]
    if missing:
        raise SourceError(f"config.json ({cfg['model_type']}) lacks {', '.join(missing)}")
    theta, rs, local_theta = _rope_settings(cfg)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return LlamaConfig.from_dict(
        dict(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=_scaling(cfg, rs),
            rope_local_theta=local_theta,
            max_position=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", family.tied)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            **family.switches,
            **_variants(cfg, family),
        )
    )


def _variants(cfg: dict, family: Family) -> dict:
    """The switches a family's config sets per model: window, layer types, softcaps, scales."""
    out = {}
    window = cfg.get("sliding_window")
    if family.window != "none" and window:
        out["sliding_window"] = int(window)
        if family.window == "types":
            out["layer_types"] = _layer_types(cfg)
    if family.switches.get("norm_offset"):  # Gemma
        out["embed_scale"] = float(cfg["hidden_size"]) ** 0.5
        scalar = cfg.get("query_pre_attn_scalar")
        if scalar:
            out["query_scale"] = float(scalar) ** -0.5
        for ours, theirs in (("attn_softcap", "attn_logit_softcapping"),
                             ("final_softcap", "final_logit_softcapping")):  # fmt: skip
            if cfg.get(theirs):
                out[ours] = float(cfg[theirs])
    return out


def _layer_types(cfg: dict) -> tuple[str, ...]:
    """Gemma's sliding/full pattern: `layer_types` (transformers ≥ 4.53), else Gemma 3's
    `sliding_window_pattern` (every n-th layer full), else Gemma 2's alternation."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is not None:
        names = {"sliding_attention": "sliding", "full_attention": "full"}
        if len(types) != n or not set(types) <= set(names):
            raise SourceError(
                f"config.json layer_types must list {n} of {sorted(names)}, got {types!r}"
            )
        return tuple(names[t] for t in types)
    if cfg.get("model_type") == "gemma2":
        return tuple("sliding" if i % 2 == 0 else "full" for i in range(n))
    pattern = int(cfg.get("sliding_window_pattern", 6))
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n))


def _scaling(cfg: dict, rs: dict) -> dict:
    kind = rs.get("rope_type", rs.get("type", "none"))
    if kind in ("none", "default"):
        return {"type": "none"}
    if kind == "linear":
        return {"type": "linear", "factor": float(rs["factor"])}
    if kind == "llama3":
        return {
            "type": "llama3",
            "factor": float(rs["factor"]),
            "low_freq_factor": float(rs["low_freq_factor"]),
            "high_freq_factor": float(rs["high_freq_factor"]),
            "original_max_position": int(rs["original_max_position_embeddings"]),
        }
    if kind in ("longrope", "su"):  # Phi-3.5: transformers' _compute_longrope_parameters
        original = int(
            cfg.get("original_max_position_embeddings")
            or rs.get("original_max_position_embeddings")
            or cfg["max_position_embeddings"]
        )
        if cfg.get("original_max_position_embeddings"):
            factor = cfg["max_position_embeddings"] / original
        else:
            factor = float(rs.get("factor", 1.0))
        out = {
            "type": "longrope",
            "factor": factor,
            "original_max_position": original,
            "short_factor": rs["short_factor"],
            "long_factor": rs["long_factor"],
        }
        if rs.get("attention_factor") is not None:
            out["attention_factor"] = float(rs["attention_factor"])
        return out
    if kind == "yarn":  # Qwen2.5's long-context setting
        factor = rs.get("factor")
        original = rs.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
        if factor is None:
            factor = cfg["max_position_embeddings"] / original
        out = {
            "type": "yarn",
            "factor": float(factor),
            "original_max_position": int(original),
            "beta_fast": float(rs.get("beta_fast") or 32.0),
            "beta_slow": float(rs.get("beta_slow") or 1.0),
            "truncate": bool(rs.get("truncate", True)),
        }
        attention = rs.get("attention_factor")
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        if attention is None and mscale and mscale_all and factor > 1:
            scaled = lambda m: 0.1 * m * math.log(factor) + 1.0  # noqa: E731
            attention = scaled(mscale) / scaled(mscale_all)
        if attention is not None:
            out["attention_factor"] = float(attention)
        return out
    raise SourceError(
        f"rope scaling {kind!r} is not supported; supported: none, linear, llama3, longrope, "
        "yarn (dynamic NTK changes the frequencies with the length of each input: not yet)"
    )


def _rope_settings(cfg: dict) -> tuple[float, dict, float | None]:
    """(rope theta, the scaling dict, the sliding layers' theta or None) in either spelling:
    transformers 5 saves them together as `rope_parameters` ({"rope_theta", "rope_type",
    "factor", …}, or one such dict per layer type for Gemma 3); older folders keep `rope_theta`,
    `rope_scaling` and Gemma 3's `rope_local_base_freq` at the top level. Reading only the old
    keys exported a transformers-5 Llama 3 with theta 10,000 and no llama3 scaling."""
    local = cfg.get("rope_local_base_freq")
    local = float(local) if local is not None else None
    params = cfg.get("rope_parameters")
    if params is None:
        theta = float(cfg.get("rope_theta", 10000.0))
        return theta, dict(cfg.get("rope_scaling") or {}), local
    if not isinstance(params, dict):
        raise SourceError(f"config.json rope_parameters must be an object, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        return _rope_per_layer_type(cfg, params)
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))), dict(params), local


def _rope_per_layer_type(cfg: dict, params: dict) -> tuple[float, dict, float | None]:
    """Gemma 3 in transformers 5: {"full_attention": {…}, "sliding_attention": {…}}."""
    if set(params) - {"full_attention", "sliding_attention"}:
        raise SourceError(
            f"config.json has rope settings for layer types {sorted(params)}; supported: "
            "full_attention, sliding_attention"
        )
    full = params.get("full_attention") or params["sliding_attention"]
    local = params.get("sliding_attention")
    local_theta = None
    if local is not None and local is not full:
        if local.get("rope_type", "default") not in ("default", "none"):
            raise SourceError(
                "config.json scales the rope of the sliding layers "
                f"({local.get('rope_type')!r}); only their theta may differ"
            )
        local_theta = float(local.get("rope_theta", 10000.0))
    return float(full.get("rope_theta", cfg.get("rope_theta", 10000.0))), dict(full), local_theta


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


# Gemma 3's multimodal folders (model_type gemma3): the language model under a prefix, beside a
# vision tower that a text-only export leaves out
_MULTIMODAL_PREFIXES = {
    "model.language_model.": "model.",  # transformers 5
    "language_model.model.": "model.",  # older
    "language_model.lm_head.": "lm_head.",
}
_VISION = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
           "multi_modal_projector.")  # fmt: skip


def text_config(cfg: dict) -> dict:
    """The language model's config: Gemma 3's multimodal config nests it under text_config."""
    if cfg.get("model_type") != "gemma3":
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise SourceError("config.json (gemma3) has no text_config object")
    inherited = {k: cfg[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id") if k in cfg}
    tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    return {**inherited, **text, "model_type": "gemma3_text", "tie_word_embeddings": tie}


def _mapper(cfg: dict):
    """HF tensor name → [(our name, row block or None)], [] for a tensor left out, None for
    an unknown one."""
    family = FAMILIES[cfg["model_type"]]
    single = key_mapper({**KEY_MAP, **family.keys})
    fused = key_mapper({k: "\0".join(v) for k, v in family.fused.items()})

    def names(key: str) -> list[tuple[str, int | None]] | None:
        if key.endswith("rotary_emb.inv_freq") or key.startswith(_VISION):
            return []
        for prefix, plain in _MULTIMODAL_PREFIXES.items():
            if key.startswith(prefix):
                key = plain + key[len(prefix) :]
                break
        ours = single(key)
        if ours is not None:
            return [(ours, None)]
        parts = fused(key)
        return None if parts is None else [(n, k) for k, n in enumerate(parts.split("\0"))]

    return names


def _split(w: np.ndarray, ours: str, part: int, config: LlamaConfig) -> np.ndarray:
    """Row block `part` of a fused Phi-3 matrix: q | k | v or gate | up."""
    dh = config.resolved_head_dim
    if "attention" in ours:
        sizes = [config.n_heads * dh, config.n_kv_heads * dh, config.n_kv_heads * dh]
    else:
        sizes = [config.intermediate_size, config.intermediate_size]
    if w.shape[0] != sum(sizes):
        raise SourceError(
            f"a fused tensor for {ours} has {w.shape[0]} rows; the config implies {sum(sizes)}"
        )
    start = sum(sizes[:part])
    return np.ascontiguousarray(w[start : start + sizes[part]])


def load_hf(folder: Path) -> tuple[LlamaConfig, dict[str, np.ndarray], dict, str | None]:
    from safetensors import safe_open

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    cfg = text_config(json.loads(cfg_path.read_text()))
    config = config_from_hf(cfg)
    names = _mapper(cfg)
    state = {}
    for path in _weight_files(folder):
        if not path.is_file():
            raise SourceError(f"weight shard {path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    ours = names(key)
                    if ours is None:
                        raise SourceError(f"unexpected tensor {key!r} in {path.name}")
                    for name, part in ours:
                        w = f.get_tensor(key).float().numpy()
                        state[name] = w if part is None else _split(w, name, part, config)
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
