"""Parity tolerances per precision, in one place. Never derived from a file name.

fp32 must reproduce the reference: same greedy tokens, logits within float rounding. Quantized
precisions are judged by what the quantization issue asks on the default model — perplexity on the
shipped evaluation text relative to the fp32 reference, and the mean KL divergence of the next-token
distribution — while greedy agreement and max |Δlogit| are measured and reported beside them: a
quantized model may leave the reference's greedy path at a near-tie and still be fine.
"""

import dataclasses

from export.errors import ParityError


@dataclasses.dataclass(frozen=True)
class Tolerance:
    greedy_steps: int  # greedy tokens generated per prompt, compared with the reference's
    required_greedy: int  # leading greedy tokens that must be identical, on every prompt
    perplexity_ratio: float  # ONNX perplexity / reference perplexity must not exceed this
    max_kl: float  # mean KL(reference ‖ ONNX) per token over the evaluation text, in nats
    max_abs_logit: float | None  # teacher-forced max |Δlogit|; None: reported, not gated


TOLERANCES = {
    "fp32": Tolerance(
        greedy_steps=64,
        required_greedy=64,
        perplexity_ratio=1.0001,
        max_kl=1e-6,
        max_abs_logit=1e-3,
    ),
    "fp16": Tolerance(
        greedy_steps=128,
        required_greedy=0,
        perplexity_ratio=1.005,
        max_kl=2e-3,
        max_abs_logit=None,
    ),
    "int8": Tolerance(
        greedy_steps=128,
        required_greedy=0,
        perplexity_ratio=1.01,
        max_kl=5e-3,
        max_abs_logit=None,
    ),
    # int4 whose 4-bit weights are the source GGUF's own blocks, carried as they are
    "int4": Tolerance(
        greedy_steps=128,
        required_greedy=0,
        perplexity_ratio=1.01,
        max_kl=1e-2,
        max_abs_logit=None,
    ),
    # int4 quantized here from float weights (a second rounding when the source was 4-bit); on the
    # default model it must stay ahead of onnxruntime-genai's default int4 build, which scores
    # ×1.30 on the prose text, ×1.22 on chat and ×1.37 on code (KL 0.42 on prose; measured
    # 2026-12-01 against the same fp32 reference); ours scores ×1.20 / ×1.25 / ×1.26: ahead on
    # prose and code, behind on chat. 1.30 (genai's prose figure) is the regression bar
    "int4-requantized": Tolerance(
        greedy_steps=128,
        required_greedy=0,
        perplexity_ratio=1.30,
        max_kl=0.3,
        max_abs_logit=None,
    ),
}


def tolerance_key(info) -> str:
    """The TOLERANCES entry for a folder (runtime.folder.ModelInfo): its precision, and for int4
    whether any 4-bit weight was rounded here rather than carried from the source's blocks (the
    typed weight records say so; no name is parsed)."""
    q = info.quantization
    if info.precision == "int4" and q is not None and 4 in q.requantized_bits:
        return "int4-requantized"
    return info.precision


def tolerance(key: str) -> Tolerance:
    try:
        return TOLERANCES[key]
    except KeyError:
        raise ParityError(f"no tolerance for {key!r}; known: {sorted(TOLERANCES)}") from None
