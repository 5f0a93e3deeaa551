"""Next-token choice from logits: greedy, temperature, top-k, top-p, repetition penalty (numpy)."""

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
