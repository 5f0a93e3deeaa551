"""Next-token choice from logits: greedy, temperature, top-k, top-p, repetition, presence and
frequency penalties (numpy)."""

from __future__ import annotations

import numpy as np

from runtime.errors import NumericalError

_BROKEN = (
    "the model computed {what} logits: its weights are corrupt or it overflowed; check the "
    "folder (`llamaonnx verify`) or export it again"
)


def apply_repetition_penalty(logits: np.ndarray, seen: list[int], penalty: float) -> np.ndarray:
    """CTRL-style [arxiv/1909.05858]: shrink the logits of tokens already present."""
    if penalty == 1.0 or not seen:
        return logits
    out = logits.copy()
    idx = np.unique(np.asarray(seen))
    vals = out[idx]
    out[idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def apply_penalties(
    logits: np.ndarray, generated: list[int], presence: float = 0.0, frequency: float = 0.0
) -> np.ndarray:
    """OpenAI's presence and frequency penalties: each token's logit lowered by `frequency` for
    every time the reply has already produced it, and by `presence` once if it has (the reply's
    tokens only, not the prompt's, as OpenAI and vLLM count them). Negative values raise them."""
    if (presence == 0.0 and frequency == 0.0) or not generated:
        return logits
    ids, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
    out = logits.copy()
    out[ids] -= (frequency * counts + presence).astype(out.dtype)
    return out


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    """OpenAI's logit_bias: each named token's logit plus its bias (-100 bans it in effect)."""
    if not bias:
        return logits
    out = logits.copy()
    ids, values = zip(*bias, strict=True)
    out[np.asarray(ids, np.int64)] += np.asarray(values, out.dtype)
    return out


def token_logprobs(
    logits: np.ndarray, token: int, top: int
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The model's log-probability of `token` and of its `top` likeliest tokens (ids, most
    likely first, ties by id), from the raw logits: the distribution the model gave, before
    penalties, biases, temperature or truncation (vLLM's default, "raw_logprobs")."""
    x = logits.astype(np.float64)
    mx = x.max()
    lp = x - (mx + np.log(np.exp(x - mx).sum()))
    best = ()
    if top > 0:
        ids = np.argpartition(-lp, top - 1)[:top] if top < lp.shape[-1] else np.arange(lp.size)
        ids = sorted(ids.tolist(), key=lambda i: (-lp[i], i))[:top]
        best = tuple((int(i), float(lp[i])) for i in ids)
    return float(lp[token]), best


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Sets to -inf every logit outside the top-k and outside the smallest top-p nucleus."""
    out = logits.astype(np.float64, copy=True)
    if 0 < top_k < out.shape[-1]:
        kth = np.partition(out, -top_k)[-top_k]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out, kind="stable")
        probs = _softmax(out[order])
        before = np.cumsum(probs) - probs  # mass of strictly better tokens
        out[order[before >= top_p]] = -np.inf
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def sample(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> int:
    """(V,) logits → token id. temperature 0 is greedy. NumericalError on NaN or infinite
    logits (argmax picks a NaN first, so checking the pick costs nothing on the greedy path)."""
    if temperature <= 0:
        tok = int(logits.argmax())
        if not np.isfinite(logits[tok]):
            raise NumericalError(_BROKEN.format(what="NaN or infinite"))
        return tok
    if not np.isfinite(logits).all():
        raise NumericalError(_BROKEN.format(what="NaN or infinite"))
    probs = _softmax(filter_logits(logits / temperature, top_k, top_p))
    return int(rng.choice(probs.shape[-1], p=probs))
