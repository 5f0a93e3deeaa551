"""The ONNX side of writing a model folder: the graph with its external weights, and
onnxruntime-genai's config. Atomic writing, replacement rules and checksums are the runtime's
(runtime/files.py), which owns the folder format for every writer.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from runtime.folder import ModelInfo

EXTERNAL_DATA_THRESHOLD = 64 * 1024 * 1024  # models above this keep weights in model.onnx.data


def save_onnx(model: onnx.ModelProto, folder: Path) -> None:
    path = folder / "model.onnx"
    large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )


def genai_config(info: ModelInfo) -> dict:
    """onnxruntime-genai's config for the `ort` graph (GroupQueryAttention, shared KV buffer)."""
    a, tokens = info.architecture, info.special_tokens
    # genai wants numbers: a model without a pad (or bos) token pads with its end token, as the
    # llamaonnx runtime does
    eos = list(info.eos_token_ids)
    bos = tokens.bos_token_id if tokens.bos_token_id is not None else (eos[0] if eos else 0)
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": a.max_position,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": a.head_dim,
                "hidden_size": a.dim,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": a.n_heads,
                "num_hidden_layers": a.n_layers,
                "num_key_value_heads": a.n_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": info.pad_token_id,
            "type": "llama",
            "vocab_size": a.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": min(a.max_position, 4096),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
