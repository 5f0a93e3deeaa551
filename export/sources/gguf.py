"""Weights, config and tokenizer from a GGUF file: architectures llama, qwen2, qwen3, gemma2,
gemma3 and phi3 (export/sources/families.py).

Every tensor type the `gguf` package can dequantize is accepted (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
the K-quants, …). What llama.cpp's converter (convert_hf_to_gguf.py) changed is undone here:
- `llama`: the rows of attn_q / attn_k are permuted from Hugging Face's rotate-half RoPE layout to
  GGML's interleaved one (`LlamaModel.permute`); `unpermute` reverses it. The other architectures
  use rotate-half (NEOX) RoPE in llama.cpp and keep Hugging Face's rows.
- Gemma: every RMSNorm weight is stored as 1 + w; 1 is subtracted so the norms keep the family's
  offset attribute, as the Hugging Face folder has it.
- Phi-3: q/k/v as one attn_qkv matrix and gate/up as one ffn_up of twice the width: split.
- Llama 3's rope scaling as a `rope_freqs` tensor (a divisor per frequency) and Phi-3's longrope as
  `rope_factors_short` / `rope_factors_long`.
What a GGUF does not store, llama.cpp fixes per architecture, and so does this loader: Gemma's
sliding-layer pattern (every 2nd layer full for Gemma 2, every 6th for Gemma 3), Gemma 3's local
rope theta (10,000) and the query scale (head_dim ** -0.5, or (dim / heads) ** -0.5 for the 27B
models).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from export.errors import SourceError, UnsupportedArchitectureError, UnsupportedTensorTypeError
from export.model.config import LlamaConfig
from export.sources.common import check_shapes, key_mapper
from export.sources.families import BUILTIN_CHAT_TEMPLATES, END_OF_TURN, SWITCHES
from export.sources.gguf_tokenizer import tokenizer_json_from_gguf

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

# GGUF tensor name → our (Meta) name; "{i}" is the layer index.
KEY_MAP = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_q.bias": "layers.{i}.attention.wq.bias",  # qwen2
    "blk.{i}.attn_k.bias": "layers.{i}.attention.wk.bias",
    "blk.{i}.attn_v.bias": "layers.{i}.attention.wv.bias",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attention.q_norm.weight",  # qwen3, gemma3
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attention.k_norm.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attention_norm.weight",  # gemma
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_ffn_norm.weight",  # gemma
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
}
# Phi-3's fused tensors → the row blocks of ours they hold
FUSED = {
    "blk.{i}.attn_qkv.weight": (
        "layers.{i}.attention.wq.weight",
        "layers.{i}.attention.wk.weight",
        "layers.{i}.attention.wv.weight",
    ),
    "blk.{i}.ffn_up.weight": (
        "layers.{i}.feed_forward.w1.weight",
        "layers.{i}.feed_forward.w3.weight",
    ),
}
# tensors that configure RoPE rather than hold weights
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight")


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise SourceError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SourceError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on truncated files
        raise SourceError(f"{path} is a truncated or corrupt GGUF file: {e}") from e


def metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # a field type gguf cannot decode; we never need those
            continue
    return meta


def config_from_metadata(meta: dict, rope: dict[str, np.ndarray] | None = None) -> LlamaConfig:
    """`meta`: the key/value metadata; `rope`: the file's ROPE_TENSORS that it has."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture is {arch!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    rope = rope or {}

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise SourceError(f"GGUF metadata lacks {arch}.{key}")
        return value

    n_heads = int(get("attention.head_count"))
    n_layers = int(get("block_count"))
    dim = int(get("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    head_dim = int(meta.get(f"{arch}.attention.key_length", dim // n_heads))
    window = meta.get(f"{arch}.attention.sliding_window")
    switches = dict(SWITCHES[arch])
    if arch.startswith("gemma"):
        big = n_layers == (46 if arch == "gemma2" else 62)  # the 27B models (llama.cpp's rule)
        switches.update(
            embed_scale=float(dim) ** 0.5,
            query_scale=float(dim // n_heads if big else head_dim) ** -0.5,
            layer_types=_layer_types(
                meta.get(f"{arch}.attention.sliding_window_pattern"),
                2 if arch == "gemma2" else 6,
                n_layers,
            ),  # fmt: skip
        )
        if arch == "gemma3":
            switches["rope_local_theta"] = float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0))
        for ours, key in (("attn_softcap", "attn_logit_softcapping"),
                          ("final_softcap", "final_logit_softcapping")):  # fmt: skip
            if meta.get(f"{arch}.{key}"):
                switches[ours] = float(meta[f"{arch}.{key}"])
        if not window:
            raise SourceError(f"GGUF metadata lacks {arch}.attention.sliding_window")
    if window:
        switches["sliding_window"] = int(window)
    return LlamaConfig.from_dict(
        dict(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            intermediate_size=int(get("feed_forward_length")),
            head_dim=head_dim if head_dim != dim // n_heads else None,
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=_scaling(meta, arch, rope),
            max_position=int(get("context_length")),
            tie_embeddings=False,  # decided by the presence of output.weight in load_gguf
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_end_tokens(meta),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            **switches,
        )
    )


def _layer_types(pattern, default: int, n_layers: int) -> tuple[str, ...]:
    """`sliding_window_pattern`: a flag per layer (true: sliding), or n (every n-th layer full,
    llama.cpp's set_swa_pattern); absent, the architecture's own n."""
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise SourceError(
                f"GGUF sliding_window_pattern lists {len(pattern)} layers, the model has {n_layers}"
            )
        return tuple("sliding" if flag else "full" for flag in pattern)
    every = int(pattern) if pattern else default
    return tuple("full" if i % every == every - 1 else "sliding" for i in range(n_layers))


def _scaling(meta: dict, arch: str, rope: dict[str, np.ndarray]) -> dict:
    if "rope_freqs.weight" in rope:  # Llama 3.1+: the llama3 divisors, computed by the converter
        return {"type": "factors", "freq_factors": rope["rope_freqs.weight"].tolist()}
    if "rope_factors_long.weight" in rope:  # Phi-3.5's longrope
        original = int(meta[f"{arch}.rope.scaling.original_context_length"])
        out = {
            "type": "longrope",
            "factor": int(meta[f"{arch}.context_length"]) / original,
            "original_max_position": original,
            "short_factor": rope["rope_factors_short.weight"].tolist(),
            "long_factor": rope["rope_factors_long.weight"].tolist(),
        }
        if meta.get(f"{arch}.rope.scaling.attn_factor") is not None:
            out["attention_factor"] = float(meta[f"{arch}.rope.scaling.attn_factor"])
        return out
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return {"type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    if kind not in ("none", None):
        raise SourceError(
            f"GGUF rope scaling {kind!r} is not supported; supported: none, linear, and the "
            "rope_freqs / rope_factors tensors"
        )
    return {"type": "none"}


def _end_tokens(meta: dict) -> tuple[int, ...]:
    """The end-of-sequence id, the end-of-turn id, and any control token spelled like a chat
    template's end of turn (llama.cpp stops on those too): Gemma files list only <eos>, and
    its chats end with <end_of_turn>."""
    ids = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=False)):
        if kind == 3 and tok in END_OF_TURN:  # 3: control
            ids.append(i)
    return tuple(dict.fromkeys(t for t in ids if t is not None))


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's permute: GGML interleaved rows → HF rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor) -> np.ndarray:
    import gguf

    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise UnsupportedTensorTypeError(
            f"tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, and K-quants"
        ) from e
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGML order is reversed
    return np.ascontiguousarray(data.reshape(shape), dtype=np.float32)


def load_gguf(path: Path) -> tuple[LlamaConfig, dict[str, np.ndarray], dict, str | None]:
    """→ (config, state dict of float32 arrays in our names, tokenizer.json dict, chat template)."""
    reader = _open(Path(path))
    meta = metadata(reader)
    rope = {t.name: _dequantize(t) for t in reader.tensors if t.name in ROPE_TENSORS}
    config = config_from_metadata(meta, rope)
    arch = meta["general.architecture"]
    names = tensor_names(reader, config, arch)
    state: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name in ROPE_TENSORS:
            continue
        if t.name not in names:
            raise SourceError(f"unexpected tensor {t.name!r} in a {arch} GGUF")
        w = _dequantize(t)
        for name, (start, stop), heads in names[t.name]:
            part = np.ascontiguousarray(w[start:stop])
            if heads:
                part = unpermute(part, heads)
            if arch.startswith("gemma") and name.endswith("norm.weight"):
                part = part - np.float32(1.0)  # stored as 1 + w
            state[name] = part
    if "output.weight" not in state:
        config = LlamaConfig.from_dict({**config.to_dict(), "tie_embeddings": True})
    check_shapes(config, state)
    template = meta.get("tokenizer.chat_template")
    if template is None and arch in BUILTIN_CHAT_TEMPLATES:
        log.info("the GGUF has no chat template: using llama.cpp's built-in one for %s", arch)
        template = BUILTIN_CHAT_TEMPLATES[arch]
    return config, state, tokenizer_json_from_gguf(meta), template


def tensor_names(reader, config: LlamaConfig, arch: str) -> dict[str, list]:
    """GGUF tensor name → [(our name, its row range, heads to unpermute or 0)]: one entry for a
    tensor of ours, two or three for a fused Phi-3 one."""
    single, fused = key_mapper(KEY_MAP), key_mapper({k: "\0".join(v) for k, v in FUSED.items()})
    dh, ff = config.resolved_head_dim, config.intermediate_size
    sizes = {"attention": [config.n_heads * dh, config.n_kv_heads * dh, config.n_kv_heads * dh],
             "feed_forward": [ff, ff]}  # fmt: skip
    out = {}
    for t in reader.tensors:
        rows = int(t.shape[-1]) if len(t.shape) > 1 else int(t.shape[0])
        parts = fused(t.name)
        if parts is not None and (arch == "phi3" or "attn_qkv" in t.name):
            names = parts.split("\0")
            block = sizes["attention" if "attention" in names[0] else "feed_forward"]
            if rows == sum(block):  # else a plain ffn_up (its own width)
                edges = np.cumsum([0, *block])
                out[t.name] = [(n, (int(edges[k]), int(edges[k + 1])), 0) for k, n in
                               enumerate(names)]  # fmt: skip
                continue
        name = single(t.name)
        if name is None:
            continue
        heads = 0
        if arch == "llama" and name.endswith("attention.wq.weight"):
            heads = config.n_heads
        elif arch == "llama" and name.endswith("attention.wk.weight"):
            heads = config.n_kv_heads
        out[t.name] = [(name, (0, rows), heads)]
    return out
