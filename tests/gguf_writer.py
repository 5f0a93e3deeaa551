"""Test helper: a transformers model written as a GGUF file the way llama.cpp's converter
(convert_hf_to_gguf.py) writes one, in F32: its tensor names, its metadata keys, q/k rows permuted
for `llama`, Gemma's norms stored as 1 + w, Phi-3's fused q/k/v and gate/up, longrope factors as
tensors. transformers' own GGUF reader (the oracle) reads the file back in the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: rotate-half rows → GGML's interleaved rows."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _llama3_factors(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.generate_extra_tensors: 1 for short wavelengths, the
    factor for long ones, a smooth blend between."""
    import math

    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (rope["rope_theta"] ** (-i / head_dim))
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def _name(hf_name: str, arch: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    if module == "post_attention_layernorm":  # Llama's pre-MLP norm; Gemma's post-attention one
        module = "post_attention_norm" if arch.startswith("gemma") else "ffn_norm"
    else:
        module = HF_TO_GGUF[module]
    return f"blk.{layer}.{module}.{kind}"


def write_gguf(path: Path, hf_model, arch: str, tokens: list[str]) -> Path:
    import gguf

    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = c.rope_parameters
    rope = rope.get("full_attention", rope)
    w.add_rope_freq_base(rope["rope_theta"])
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if rope.get("rope_type") == "llama3":  # the converter's divisor per frequency
        w.add_tensor("rope_freqs.weight", _llama3_factors(rope, head_dim))
    if rope.get("rope_type") == "longrope":
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        for kind in ("short", "long"):
            factors = np.array(rope[f"{kind}_factor"], np.float32)
            w.add_tensor(f"rope_factors_{kind}.weight", factors)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_token_merges([])
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
    for token, add in ((c.bos_token_id, w.add_bos_token_id), (eos, w.add_eos_token_id),
                       (c.pad_token_id, w.add_pad_token_id)):  # fmt: skip
        if token is not None:
            add(token)
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = tensor.detach().to(torch.float32).numpy().copy()
        name = _name(hf_name, arch)
        if arch == "llama" and name.endswith("attn_q.weight"):
            a = _permute(a, c.num_attention_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            a = _permute(a, c.num_key_value_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            a = a + np.float32(1.0)  # llama.cpp stores Gemma's (1 + w)
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# a small SentencePiece vocabulary: control tokens, the 256 byte-fallback tokens, single characters
# and merged pieces (scores: the earlier, the likelier), enough to exercise merges and fallback
SPM_PIECES = (
    ["\u2581"] + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(".,:;!?()[]{}<>=+-*/_'\"#") + ["\u2581t", "\u2581th", "\u2581the", "he", "in", "ing",
    "\u2581a", "\u2581an", "\u2581and", "er", "on", "\u2581in", "\u2581is", "re", "at", "\u2581w",
    "\u2581wh", "en", "\u2581s", "\u2581c", "\u2581de", "\u2581def", "()", "):", "\u2581re",
    "\u2581return", "ret", "urn", "\u2581x", "\u2581=", "\u2581\u2581", "\u2581\u2581\u2581\u2581",
    "12", "123", "\u25811", "\u00e9", "t\u00e9", "\u2581caf", "\u2581caf\u00e9"]
)  # fmt: skip


def write_spm_gguf(path: Path, arch: str, add_space_prefix: bool = True) -> Path:
    """A GGUF holding a SentencePiece (`llama`) tokenizer only, as llama.cpp writes one."""
    import gguf

    specials = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = specials + byte_tokens + SPM_PIECES
    types = (
        [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 4
        + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(SPM_PIECES)
    )  # fmt: skip
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(SPM_PIECES))]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_bpe_gguf(path: Path, source: Path, pre: str) -> Path:
    """The byte-level vocabulary and merges of GGUF `source`, declaring pre-tokenizer `pre`."""
    import gguf

    from export.sources.gguf import _open, metadata

    meta = metadata(_open(source))
    w = gguf.GGUFWriter(str(path), meta["general.architecture"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
