"""RMSNorm, RoPE and grouped-query attention as `torch.library.custom_op`s.

The eager body of each op IS the reference math, so one model object runs in PyTorch and, at export,
each op becomes a single node of the `llamaonnx` ONNX domain (see export/onnx/functions/).

Shape legend: B batch, S new tokens, P past length, T = P + S, H query heads, Hkv key/value heads,
Dh head dim, D model dim, Tmax rotary table length.

- RMSNorm [Zhang & Sennrich 2019, eq. 4]: y = x / sqrt(mean(x²) + eps) · (offset + w) — no mean
  subtraction, no bias; offset is 0, or 1 for Gemma's (1 + w). Computed in fp32.
- RoPE [Su et al. 2021], "rotate-half" layout used by Hugging Face Llama: the pair (x_i, x_{i+Dh/2})
  is rotated by the angle pos · θ_i.
- GQA [Ainslie et al. 2023]: key/value head j serves query heads j·n_rep … (j+1)·n_rep - 1, i.e. the
  kv heads are `repeat_interleave`d. The cache is data: present = concat(past, new) along time.
  Family variants: scores soft-capped to cap · tanh(s / cap) before the bias (Gemma 2), and a
  sliding window, in which the query at position p sees keys at positions p - window < q <= p
  (Mistral, Gemma 2/3's local layers; transformers' `sliding_window` counts the same way). The
  window lives in the bias (`window_bias`), counted in positions, not cache slots, so that a padded
  batch gives every row what it gets alone; the op's `window` only declares it, for kernels that
  build their own mask from sequence lengths (onnxruntime's GroupQueryAttention).
"""

from __future__ import annotations

import torch

NAMESPACE = "llamaonnx"


@torch.library.custom_op(f"{NAMESPACE}::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (weight.float() + offset)).to(x.dtype)


@rms_norm.register_fake
def _(x, weight, eps, offset):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NAMESPACE}::rope", mutates_args=())
def rope(
    x: torch.Tensor,  # (B, S, N·Dh)
    position_ids: torch.Tensor,  # (B, S) int64
    cos_table: torch.Tensor,  # (Tmax, Dh/2)
    sin_table: torch.Tensor,  # (Tmax, Dh/2)
    num_heads: int,
) -> torch.Tensor:
    b, s, _ = x.shape
    x4 = x.reshape(b, s, num_heads, -1)  # (B, S, N, Dh)
    cos = cos_table[position_ids].unsqueeze(2)  # (B, S, 1, Dh/2)
    sin = sin_table[position_ids].unsqueeze(2)
    x1, x2 = x4.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.reshape(b, s, -1)


@rope.register_fake
def _(x, position_ids, cos_table, sin_table, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NAMESPACE}::gqa", mutates_args=())
def gqa(
    q: torch.Tensor,  # (B, S, H·Dh), rotated
    k: torch.Tensor,  # (B, S, Hkv·Dh), rotated
    v: torch.Tensor,  # (B, S, Hkv·Dh)
    past_k: torch.Tensor,  # (B, Hkv, P, Dh)
    past_v: torch.Tensor,  # (B, Hkv, P, Dh)
    attn_bias: torch.Tensor,  # (B, 1, S, T) additive: 0 where allowed, very negative elsewhere
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    softcap: float,  # 0: none
    window: int,  # the sliding window attn_bias already applies (window_bias); 0: none
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, _ = q.shape
    q4 = q.reshape(b, s, num_heads, -1).transpose(1, 2)  # (B, H, S, Dh)
    k4 = k.reshape(b, s, num_kv_heads, -1).transpose(1, 2)  # (B, Hkv, S, Dh)
    v4 = v.reshape(b, s, num_kv_heads, -1).transpose(1, 2)
    present_k = torch.cat((past_k, k4), dim=2)  # (B, Hkv, T, Dh)
    present_v = torch.cat((past_v, v4), dim=2)
    n_rep = num_heads // num_kv_heads
    keys = present_k.repeat_interleave(n_rep, dim=1)  # (B, H, T, Dh)
    values = present_v.repeat_interleave(n_rep, dim=1)
    scores = (q4 @ keys.transpose(2, 3)) * scale  # (B, H, S, T)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + attn_bias
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = (probs @ values).transpose(1, 2).reshape(b, s, -1)  # (B, S, H·Dh)
    return out, present_k, present_v


@gqa.register_fake
def _(q, k, v, past_k, past_v, attn_bias, num_heads, num_kv_heads, scale, softcap, window):
    b, s, _ = q.shape
    p = past_k.shape[2]
    hkv, dh = past_k.shape[1], past_k.shape[3]
    present = q.new_empty((b, hkv, p + s, dh))
    return torch.empty_like(q), present, present.clone()


def window_bias(attn_bias: torch.Tensor, attention_mask: torch.Tensor, window: int) -> torch.Tensor:
    """(B, 1, S, T) bias → the same with keys `window` or more positions behind each query
    masked to the dtype's minimum (a replacement, not an addition: no -inf, no NaN). Positions
    count the real tokens of the (B, T) padding mask, so padding anywhere does not shift it."""
    s = attn_bias.shape[-2]
    key = attention_mask.long().cumsum(-1)  # (B, T): 1 + position of each real key
    query = key[:, -s:]  # (B, S)
    near = (query[:, :, None] - key[:, None, :]) < window  # (B, S, T)
    return torch.where(near[:, None], attn_bias, torch.finfo(attn_bias.dtype).min)


def attention_bias(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) padding mask of 1/0 → (B, 1, S, T) additive bias, causal over the last S keys.

    Under KV caching the S new queries sit at cache positions T-S … T-1, so query i may see key j
    iff j <= T - S + i (the causal mask is aligned to the bottom-right) and key j is not padding.
    A finite minimum instead of -inf keeps a fully padded row (a left pad's query) free of NaN.
    """
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)  # (T,)
    query_pos = torch.arange(seq_len, device=attention_mask.device) + (total - seq_len)  # (S,)
    causal = key_pos[None, :] <= query_pos[:, None]  # (S, T)
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, S, T)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))
