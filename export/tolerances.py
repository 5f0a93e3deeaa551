"""Parity tolerances per precision, in one place. Never derived from a file name."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tolerance:
    max_abs_logit: float  # max |Δlogit| vs the fp32 PyTorch reference, teacher-forced
    greedy_steps: int  # greedy tokens that must be identical to the reference's
    perplexity_ratio: float  # ONNX perplexity / reference perplexity must not exceed this


TOLERANCES = {
    "fp32": Tolerance(max_abs_logit=1e-3, greedy_steps=64, perplexity_ratio=1.0001),
}


def tolerance(precision: str) -> Tolerance:
    try:
        return TOLERANCES[precision]
    except KeyError:
        raise ValueError(
            f"no tolerance for precision {precision!r}; known: {sorted(TOLERANCES)}"
        ) from None
