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


def write_gguf(
    path: Path, hf_model, arch: str, tokens: list[str], types: dict[str, str] | None = None
) -> Path:
    """`types`: GGUF tensor name → block type (Q4_K, Q6_K, …; the rest F32), its weights written
    as such blocks (`encode_blocks`; Q2_K: random blocks, there being no encoder for it here)."""
    import gguf

    types = types or {}
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
        if name in types:
            kind = types[name]
            raw = random_blocks(kind, *a.shape) if kind == "Q2_K" else encode_blocks(a, kind)
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, raw, raw_dtype=qtype)
            continue
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


# -- GGUF blocks in GGML's byte layout (ggml-common.h), for the carry tests ----------------------
# type → (weights a block, bytes a block, byte offsets of its fp16 fields)
BLOCK_LAYOUT = {
    "Q4_0": (32, 18, (0,)),
    "Q4_1": (32, 20, (0, 2)),
    "Q8_0": (32, 34, (0,)),
    "Q5_0": (32, 22, (0,)),
    "Q5_1": (32, 24, (0, 2)),
    "Q4_K": (256, 144, (0, 2)),
    "Q5_K": (256, 176, (0, 2)),
    "Q6_K": (256, 210, (208,)),
    "Q2_K": (256, 84, (80, 82)),  # not carried: for the test of what happens to it
}


def random_blocks(type_name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows of random GGUF blocks, uint8 [N, K / per · bytes]: every code, scale and minimum bit
    random, the fp16 fields (d, dmin / m) finite and of a weight's size."""
    per, nbytes, halves = BLOCK_LAYOUT[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // per, nbytes), dtype=np.uint8)
    for i, at in enumerate(halves):
        sign = -1 if i == 1 and type_name in ("Q4_1", "Q5_1") else 1  # Q4_1's m: a minimum
        x = (sign * (rng.random((n, k // per, 1)) * 0.01 + 1e-4)).astype(np.float16)
        raw[..., at : at + 2] = x.view(np.uint8)
    return raw.reshape(n, -1)


def _k_scale_bytes(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and minimums [.., 8] → Q4_K / Q5_K's 12 bytes (get_scale_min_k4
    reversed)."""
    lo = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    mid = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=-1).astype(np.uint8)


def encode_blocks(w: np.ndarray, type_name: str) -> np.ndarray:
    """W [N, K] float32 → GGUF blocks of `type_name`, uint8 [N, bytes]: gguf's own quantizer for
    the types it has, a plain round-to-nearest one here for the K types (these tests need valid
    blocks of real weights, not llama.cpp's best ones)."""
    import gguf

    if type_name not in ("Q4_K", "Q5_K", "Q6_K"):
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name])
    n, k = w.shape
    x = w.astype(np.float32).reshape(n, k // 256, -1, 32 if type_name != "Q6_K" else 16)
    half = lambda v: v.astype(np.float16).astype(np.float32)  # noqa: E731
    if type_name == "Q6_K":
        s = np.abs(x).max(-1) / 31  # [n, nsb, 16]
        d = half(s.max(-1) / 127)
        sc = np.clip(np.rint(s / np.where(d == 0, 1, d)[..., None]), 1, 127)
        step = d[..., None] * sc
        q = np.clip(np.rint(x / np.where(step == 0, 1, step)[..., None]) + 32, 0, 63)
        q = q.astype(np.uint8).reshape(n, k // 256, 2, 4, 32)  # halves of 128: 4 rows of 32
        ql = (q[:, :, :, 0:2] & 15) | ((q[:, :, :, 2:4] & 15) << 4)  # [n, nsb, 2, 2, 32]
        qh = sum(((q[:, :, :, t] >> 4) & 3) << (2 * t) for t in range(4))  # [n, nsb, 2, 32]
        d16 = d.astype(np.float16)[..., None].view(np.uint8)
        parts = [ql.reshape(n, -1, 128), qh.reshape(n, -1, 64), sc.astype(np.int8).view(np.uint8)]
        parts.append(d16)
        return np.concatenate(parts, axis=-1).reshape(n, -1)
    top = 15 if type_name == "Q4_K" else 31
    lo = np.minimum(x.min(-1), 0)
    s, mins = (x.max(-1) - lo) / top, -lo  # [n, nsb, 8]
    d, dmin = half(s.max(-1) / 63), half(mins.max(-1) / 63)
    sc = np.clip(np.rint(s / np.where(d == 0, 1, d)[..., None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(mins / np.where(dmin == 0, 1, dmin)[..., None]), 0, 63).astype(np.uint8)
    step = d[..., None] * sc
    q = np.rint((x + (dmin[..., None] * mn)[..., None]) / np.where(step == 0, 1, step)[..., None])
    q = np.clip(q, 0, top).astype(np.uint8)  # [n, nsb, 8, 32]
    qs = (q[:, :, 0::2] & 15) | ((q[:, :, 1::2] & 15) << 4)  # [n, nsb, 4, 32]
    parts = [d.astype(np.float16)[..., None].view(np.uint8),
             dmin.astype(np.float16)[..., None].view(np.uint8), _k_scale_bytes(sc, mn)]  # fmt: skip
    if type_name == "Q5_K":
        parts.append(sum((q[:, :, i] >> 4) << i for i in range(8)).astype(np.uint8))  # [n,nsb,32]
    parts.append(qs.reshape(n, k // 256, 128))
    return np.concatenate(parts, axis=-1).reshape(n, -1)


MIXED_TYPES = {  # what a Q4_K_M file looks like, one of each type somewhere
    "blk.0.attn_q.weight": "Q4_K",
    "blk.0.attn_k.weight": "Q4_K",
    "blk.0.attn_v.weight": "Q6_K",
    "blk.0.attn_output.weight": "Q8_0",  # (llama.cpp's fallback for Q6_K in a narrow row)
    "blk.0.ffn_gate.weight": "Q4_K",
    "blk.0.ffn_up.weight": "Q4_K",
    "blk.0.ffn_down.weight": "Q6_K",
    "blk.1.attn_q.weight": "Q5_K",
    "blk.1.attn_k.weight": "Q5_K",
    "blk.1.attn_v.weight": "Q5_1",
    "blk.1.attn_output.weight": "Q5_0",
    "blk.1.ffn_gate.weight": "Q4_1",
    "blk.1.ffn_up.weight": "Q4_0",
    "blk.1.ffn_down.weight": "Q5_K",
    "token_embd.weight": "Q4_K",
    "output.weight": "Q6_K",
}


def write_mixed(root: Path, types: dict[str, str] | None = None, tied: bool = False) -> Path:
    """root/mixed.gguf: a 2-layer llama of widths 256 and 512 (whole K super-blocks) whose
    tensors are in `types` (MIXED_TYPES: a Q4_K_M file's mix, one of each carried type), the
    byte-level tokenizer of tests/tiny.py; `tied`: the head is the embedding (no output.weight,
    as llama.cpp writes a tied model). Shared by tests/test_gguf_blocks.py and the GPU check
    (tests/gpu/run.sh)."""
    import transformers

    from tests.tiny import byte_tokenizer_json

    types = MIXED_TYPES if types is None else types
    torch.manual_seed(3)
    config = transformers.LlamaConfig(  # widths of 256 and 512: whole K super-blocks
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.08)
    vocab = byte_tokenizer_json()["model"]["vocab"]
    root.mkdir(parents=True, exist_ok=True)
    return write_gguf(root / "mixed.gguf", hf, "llama", sorted(vocab, key=vocab.get), types)
