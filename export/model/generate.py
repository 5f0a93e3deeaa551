"""Token generation with the PyTorch reference model (greedy or sampled), for tests and verify.

Prompts of different lengths are batched with padding on the side the caller asks for; positions
come from the mask, so left and right padding give the same tokens as each prompt alone.
"""

from __future__ import annotations

import torch

from export.model.transformer import Transformer, positions_from_mask


def pad_batch(prompts: list[list[int]], pad_id: int, side: str = "left"):
    """→ (input_ids (B, S), attention_mask (B, S)) with `side` padding."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl] = torch.tensor(p)
        mask[i, sl] = 1
    return ids, mask


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen) -> torch.Tensor:
    """(B, V) logits → (B,) next tokens."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
    padding_side: str = "left",
) -> list[list[int]]:
    """New tokens for each prompt (greedy when temperature is 0), stopping at any of `stop_ids`."""
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = pad_batch(prompts, pad, padding_side)
    lengths = mask.sum(-1)
    past = model.empty_cache(len(prompts))
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    pos = positions_from_mask(mask, ids.shape[1])
    logits, past = model(ids, mask, pos, past)
    last = logits[torch.arange(len(prompts)), lengths - 1 if padding_side == "right" else -1]
    for _ in range(max_new_tokens):
        nxt = _pick(last, temperature, top_k, top_p, gen)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t in stop_ids
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
        pos = positions_from_mask(mask, 1)
        logits, past = model(nxt[:, None], mask, pos, past)
        last = logits[:, -1]
    return out
