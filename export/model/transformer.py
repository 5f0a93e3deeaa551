"""The PyTorch reference Llama, with Meta's module names and the KV cache as data.

Shape legend: B batch, S new tokens, P past length, T = P + S, D model dim, H query heads,
Hkv key/value heads, Dh head dim, V vocab.

forward(input_ids, attention_mask, position_ids, past) -> (logits, present), where past and present
are lists of (key, value) pairs of shape (B, Hkv, P|T, Dh) — no hidden module state (mlx-examples).
RMSNorm, RoPE and attention call the custom ops of export/model/ops.py, so the same object exports
to a graph with one node per op. The family switches of the config (export/model/config.py) are
read here and nowhere else: q/k/v biases, QK-norm, the norm offset, the embedding scale, the MLP
activation, sandwich norms, the attention scale, soft-capping, sliding windows per layer and their
own rotary tables.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from export.model import ops
from export.model.config import LlamaConfig, rope_inv_freq

KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim) - offset)  # an identity norm either way

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.offset)


def _norm(config: LlamaConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(config.dim if dim is None else dim, config.norm_eps, config.norm_offset)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        dh = config.resolved_head_dim
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.scale = config.attention_scale  # Gemma: query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_softcap or 0.0
        self.window = config.layer_window(layer) or 0
        qkv_bias = config.qkv_bias  # Qwen2: x·Wᵀ + b for q, k and v (not o)
        self.wq = nn.Linear(config.dim, config.n_heads * dh, bias=qkv_bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * dh, bias=qkv_bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * dh, bias=qkv_bias)
        self.wo = nn.Linear(config.n_heads * dh, config.dim, bias=False)
        self.head_dim = dh
        if config.qk_norm:  # Qwen3, Gemma 3: each head of q and k normalized before RoPE
            self.q_norm = _norm(config, dh)
            self.k_norm = _norm(config, dh)

    def _per_head_norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """(B, S, N·Dh) → RMSNorm over each head's Dh → (B, S, N·Dh)."""
        b, s, _ = x.shape
        return norm(x.reshape(b, s, -1, self.head_dim)).reshape(b, s, -1)

    def forward(self, x, position_ids, cos, sin, bias, past: KV) -> tuple[torch.Tensor, KV]:
        q, k = self.wq(x), self.wk(x)  # (B, S, H·Dh), (B, S, Hkv·Dh)
        if hasattr(self, "q_norm"):
            q, k = self._per_head_norm(q, self.q_norm), self._per_head_norm(k, self.k_norm)
        q = ops.rope(q, position_ids, cos, sin, self.n_heads)
        k = ops.rope(k, position_ids, cos, sin, self.n_kv_heads)
        v = self.wv(x)
        out, pk, pv = ops.gqa(
            q,
            k,
            v,
            past[0],
            past[1],
            bias,
            self.n_heads,
            self.n_kv_heads,
            self.scale,
            self.softcap,
            self.window,
        )
        return self.wo(out), (pk, pv)


class FeedForward(nn.Module):
    """Gated MLP: w2(act(w1 x) * w3 x), act = silu (SwiGLU [arxiv/2002.05202, eq. (5)]) or
    GELU with the tanh approximation (Gemma's GeGLU)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # up
        self.gelu = config.activation == "gelu_tanh"

    def forward(self, x):
        gate = self.w1(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.w2(gate * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block; with sandwich norms (Gemma 2/3) the attention and MLP outputs are
    normalized once more before they join the residual stream."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.attention_norm = _norm(config)
        self.attention = Attention(config, layer)
        self.ffn_norm = _norm(config)
        self.feed_forward = FeedForward(config)
        self.window = config.layer_window(layer)  # None: attends to every earlier key
        if config.sandwich_norm:
            self.post_attention_norm = _norm(config)
            self.post_ffn_norm = _norm(config)

    def forward(self, x, position_ids, cos, sin, bias, past: KV):
        h, present = self.attention(self.attention_norm(x), position_ids, cos, sin, bias, past)
        if hasattr(self, "post_attention_norm"):
            h = self.post_attention_norm(h)
        x = x + h
        h = self.feed_forward(self.ffn_norm(x))
        if hasattr(self, "post_ffn_norm"):
            h = self.post_ffn_norm(h)
        return x + h, present


class Transformer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = _norm(config)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Real cos/sin tables (llama2.c), not complex numbers: they export as plain initializers.
        cos, sin = _tables(config)
        self.register_buffer("cos_table", cos, persistent=False)  # (Tmax, Dh/2)
        self.register_buffer("sin_table", sin, persistent=False)
        self.local_tables = config.rope_local_theta is not None
        if self.local_tables:  # Gemma 3: the sliding layers rotate with their own theta
            cos, sin = _tables(config, local=True)
            self.register_buffer("cos_table_local", cos, persistent=False)
            self.register_buffer("sin_table_local", sin, persistent=False)
        self.longrope = config.rope_scaling.type == "longrope"
        if self.longrope:  # Phi-3.5: other frequencies once the context passes the original
            cos, sin = _tables(config, long=True)
            self.register_buffer("cos_table_long", cos, persistent=False)
            self.register_buffer("sin_table_long", sin, persistent=False)

    def empty_cache(self, batch: int) -> list[KV]:
        c = self.config
        shape = (batch, c.n_kv_heads, 0, c.resolved_head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(c.n_layers)]

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, S) int64
        attention_mask: torch.Tensor,  # (B, T) int64, 1 = token, 0 = padding
        position_ids: torch.Tensor,  # (B, S) int64
        past: list[KV],  # n_layers × ((B, Hkv, P, Dh), (B, Hkv, P, Dh))
    ) -> tuple[torch.Tensor, list[KV]]:
        x = self.tok_embeddings(input_ids)  # (B, S, D)
        c = self.config
        if c.embed_scale != 1.0:  # Gemma: × sqrt(D), rounded to the activations' dtype
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype)
        bias = ops.attention_bias(attention_mask, input_ids.shape[1], x.dtype)  # (B, 1, S, T)
        cos, sin = self.cos_table, self.sin_table
        if self.longrope:  # transformers' rule: long factors once max(position) + 1 > original
            long = position_ids.max() + 1 > c.rope_scaling.original_max_position
            cos = torch.where(long, self.cos_table_long, cos)
            sin = torch.where(long, self.sin_table_long, sin)
        biases = {None: bias}  # one windowed bias per window size, shared by its layers
        for w in sorted({layer.window for layer in self.layers} - {None}):
            biases[w] = ops.window_bias(bias, attention_mask, w)
        present = []
        for layer, layer_past in zip(self.layers, past, strict=True):
            tables = (cos, sin)
            if layer.window is not None and self.local_tables:
                tables = (self.cos_table_local, self.sin_table_local)
            x, kv = layer(x, position_ids, *tables, biases[layer.window], layer_past)
            present.append(kv)
        logits = self.output(self.norm(x))  # (B, S, V)
        if c.final_softcap is not None:  # Gemma 2
            logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
        return logits, present


def _tables(config: LlamaConfig, local: bool = False, long: bool = False):
    """(cos, sin) of every position × frequency, float32 from float64 angles."""
    inv_freq = torch.tensor(rope_inv_freq(config, local, long), dtype=torch.float64)
    angles = torch.outer(torch.arange(config.max_position, dtype=torch.float64), inv_freq)
    factor = 1.0 if local else config.rope_scaling.cos_sin_factor
    return (angles.cos() * factor).float(), (angles.sin() * factor).float()


def positions_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Position of each of the last `seq_len` tokens = number of real tokens before it."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -seq_len:]
