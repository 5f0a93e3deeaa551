"""The PyTorch reference Llama, with Meta's module names and the KV cache as data.

Shape legend: B batch, S new tokens, P past length, T = P + S, D model dim, H query heads,
Hkv key/value heads, Dh head dim, V vocab.

forward(input_ids, attention_mask, position_ids, past) -> (logits, present), where past and present
are lists of (key, value) pairs of shape (B, Hkv, P|T, Dh) — no hidden module state (mlx-examples).
RMSNorm, RoPE and attention call the custom ops of export/model/ops.py, so the same object exports
to a graph with one node per op.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from export.model import ops
from export.model.config import LlamaConfig, rope_inv_freq

KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        dh = config.resolved_head_dim
        self.n_heads, self.n_kv_heads, self.scale = config.n_heads, config.n_kv_heads, dh**-0.5
        qkv_bias = config.qkv_bias  # Qwen2: x·Wᵀ + b for q, k and v (not o)
        self.wq = nn.Linear(config.dim, config.n_heads * dh, bias=qkv_bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * dh, bias=qkv_bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * dh, bias=qkv_bias)
        self.wo = nn.Linear(config.n_heads * dh, config.dim, bias=False)
        self.head_dim = dh
        if config.qk_norm:  # Qwen3: each head of q and k normalized before RoPE
            self.q_norm = RMSNorm(dh, config.norm_eps)
            self.k_norm = RMSNorm(dh, config.norm_eps)

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
            q, k, v, past[0], past[1], bias, self.n_heads, self.n_kv_heads, self.scale
        )
        return self.wo(out), (pk, pv)


class FeedForward(nn.Module):
    """SwiGLU [arxiv/2002.05202, eq. (5)]: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, position_ids, cos, sin, bias, past: KV):
        h, present = self.attention(self.attention_norm(x), position_ids, cos, sin, bias, past)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x)), present


class Transformer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        inv_freq = torch.tensor(rope_inv_freq(config), dtype=torch.float64)
        angles = torch.outer(torch.arange(config.max_position, dtype=torch.float64), inv_freq)
        # Real cos/sin tables (llama2.c), not complex numbers: they export as plain initializers.
        self.register_buffer("cos_table", angles.cos().float(), persistent=False)  # (Tmax, Dh/2)
        self.register_buffer("sin_table", angles.sin().float(), persistent=False)

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
        bias = ops.attention_bias(attention_mask, input_ids.shape[1], x.dtype)  # (B, 1, S, T)
        present = []
        for layer, layer_past in zip(self.layers, past, strict=True):
            x, kv = layer(x, position_ids, self.cos_table, self.sin_table, bias, layer_past)
            present.append(kv)
        return self.output(self.norm(x)), present  # (B, S, V)


def positions_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Position of each of the last `seq_len` tokens = number of real tokens before it."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -seq_len:]
