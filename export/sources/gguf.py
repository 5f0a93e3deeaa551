"""Weights, config and tokenizer from a GGUF file (llama architecture).

Every tensor type the `gguf` package can dequantize is accepted (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
the K-quants, …). Layout change: llama.cpp's converter permutes the rows of attn_q / attn_k from
Hugging Face's rotate-half RoPE layout to GGML's interleaved one (convert_hf_to_gguf.py,
`LlamaModel.permute`); `unpermute` undoes it so our rotate-half RoPE applies.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from export.errors import SourceError, UnsupportedArchitectureError, UnsupportedTensorTypeError
from export.model.config import LlamaConfig
from export.sources.common import check_shapes, key_mapper
from export.sources.gguf_tokenizer import tokenizer_json_from_gguf

log = logging.getLogger(__name__)

# GGUF tensor name → our (Meta) name; "{i}" is the layer index.
KEY_MAP = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
}


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


def _metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # a field type gguf cannot decode; we never need those
            continue
    return meta


def config_from_metadata(meta: dict) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(
            f"GGUF architecture is {arch!r}; only 'llama' is supported"
        )

    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise SourceError(f"GGUF metadata lacks llama.{key}")
        return value

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    vocab = meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    head_dim = int(meta.get("llama.attention.key_length", dim // n_heads))
    scaling = {}
    if meta.get("llama.rope.scaling.type") == "linear":
        scaling = {"type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(t for t in (eos, eot) if t is not None))
    return LlamaConfig.from_dict(
        dict(
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            intermediate_size=int(get("feed_forward_length")),
            head_dim=head_dim if head_dim != dim // n_heads else None,
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position=int(get("context_length")),
            tie_embeddings=False,  # decided by the presence of output.weight below
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
    )


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
    meta = _metadata(reader)
    config = config_from_metadata(meta)
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise SourceError(
            "this GGUF stores llama3 rope scaling as a rope_freqs tensor, which is not supported "
            "yet; export from the Hugging Face folder instead"
        )
    state: dict[str, np.ndarray] = {}
    map_name = key_mapper(KEY_MAP)
    for t in reader.tensors:
        name = map_name(t.name)
        if name is None:
            raise SourceError(f"unexpected tensor {t.name!r} in a llama GGUF")
        w = _dequantize(t)
        if name.endswith("attention.wq.weight"):
            w = unpermute(w, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = unpermute(w, config.n_kv_heads)
        state[name] = w
    if "output.weight" not in state:
        config = LlamaConfig.from_dict({**config.to_dict(), "tie_embeddings": True})
    check_shapes(config, state)
    return config, state, tokenizer_json_from_gguf(meta), meta.get("tokenizer.chat_template")
