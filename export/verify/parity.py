"""Verification: the ONNX model folder against the PyTorch reference, on the same inputs.

Measures, on every provider present: teacher-forced max |Δlogit| over a prefill and 32 cached
decode steps; the same for a right-padded batch of two prompts of different lengths; greedy-token
agreement (leading identical tokens) over the tolerance's number of steps on several prompts;
perplexity and mean KL divergence from the reference on the three texts that ship with the
runtime (prose, chat, code; the tolerance holds on each). Raises `ParityError` past the
tolerance of the folder's precision (export/verify/tolerances.py).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from export.errors import CorruptWeightsError, ParityError
from export.verify.oracle import ORACLE_TOLERANCE, oracle_logits
from export.verify.tolerances import tolerance, tolerance_key
from runtime.texts import eval_texts

log = logging.getLogger(__name__)
PLAUSIBLE_PERPLEXITY_FACTOR = 4
DECODE_STEPS = 32
# KL (nats) between two providers' next-token distributions for the same folder: kernel numerics
# alone (fp16 forms, H200 against CPU: about 1e-5). The mixed K-quant llama's CUDA form was 9.6e-3
# from its CPU run when onnxruntime's two GatherBlockQuantized read its embedding differently.
PROVIDER_KL = 1e-3
PROMPTS = [
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Explain in three sentences why the sky is blue."}],
]


def _ref_step(model, ids, mask, pos, past):
    with torch.no_grad():
        logits, past = model(
            torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), past
        )
    return logits.numpy(), past


def teacher_forced_delta(session, model, prompts: list[list[int]], steps: int) -> float:
    """Max |Δlogit| over a prefill (right-padded batch) and `steps` decode steps fed the same
    tokens (the reference's greedy choice)."""
    from runtime.generator import right_pad

    b = len(prompts)
    ids, mask, pos = right_pad(prompts, session.info.pad_token_id)
    cache = session.new_cache(b, ids.shape[1] + steps)
    ours = session.forward(ids, mask, pos, cache)
    ref, past = _ref_step(model, ids, mask, pos, model.empty_cache(b))
    valid = mask.astype(bool)
    delta = float(np.abs(ours[valid] - ref[valid]).max())
    lengths = mask.sum(1)
    nxt = ref[np.arange(b), lengths - 1].argmax(-1)
    for _ in range(steps):
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        step_ids, step_pos = nxt[:, None].astype(np.int64), lengths[:, None].astype(np.int64)
        ours = session.forward(step_ids, mask, step_pos, cache)
        ref, past = _ref_step(model, step_ids, mask, step_pos, past)
        delta = max(delta, float(np.abs(ours - ref).max()))
        nxt, lengths = ref[:, -1].argmax(-1), lengths + 1
    return delta


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """The NLL of each of ids[1:] under logits (S, V), float64: (S - 1,)."""
    logp = _log_softmax(logits[:-1])
    return -logp[np.arange(len(ids) - 1), ids[1:]]


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp(mean NLL) of ids[1:] under logits (S, V) computed in float64."""
    return nll_perplexity(token_nll(logits, ids))


def nll_perplexity(nll: np.ndarray) -> float:
    """exp(mean) of per-token NLLs."""
    mean = float(np.mean(nll))
    return math.exp(mean) if mean < 700 else math.inf  # exp(709) overflows a float


def paired_log_ratio(nll_a: np.ndarray, nll_b: np.ndarray) -> tuple[float, float]:
    """log(perplexity a / perplexity b) on the same tokens, and its standard error: the mean of
    the per-token differences and their standard deviation over √n. It says how far the ratio
    would move on another text of the same kind and length, so a ratio within about two of them
    of 1 is one these tokens cannot tell from chance."""
    d = np.asarray(nll_a, np.float64) - np.asarray(nll_b, np.float64)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def mean_kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(reference ‖ ours) of the next-token distributions, in nats."""
    p, q = _log_softmax(ref_logits), _log_softmax(logits)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def _leading_agreement(ours: list[int], ref: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), len(ref))


def plausible_perplexity(ppl: float, vocab_size: int, what: str) -> None:
    """CorruptWeightsError when a perplexity is worse than guessing uniformly among the
    vocabulary (with a margin for untrained test models, which score about the vocabulary size).
    No trained model scores that on text; broken weights do (an inverted tensor: 9e7)."""
    if not math.isfinite(ppl) or ppl > PLAUSIBLE_PERPLEXITY_FACTOR * vocab_size:
        raise CorruptWeightsError(
            f"{what} scores perplexity {ppl:.4g} on the evaluation text, worse than guessing "
            f"uniformly among its {vocab_size} tokens (at most {PLAUSIBLE_PERPLEXITY_FACTOR}× that "
            "is plausible): its weights look corrupt. Check the source file (its download, its "
            "sha256) and export again"
        )


def verify_folder(
    folder: str | Path,
    model=None,
    providers: tuple[str, ...] | None = None,
    check_files: bool = True,
) -> dict:
    """Compares the folder with the reference and returns the report (see `check`).
    `model`: the reference, when the caller has it (export); else it is rebuilt from the
    folder's source, after checking that the source is the file it was exported from.
    `check_files`: the folder's checksums (off for a folder still being written)."""
    import onnxruntime as ort

    from runtime.generator import GenerationConfig, Generator
    from runtime.session import Session

    folder = Path(folder)
    not_on = {}  # provider → why this folder is not checked there
    if providers is None:
        providers = ("cpu",)
        if "CUDAExecutionProvider" in ort.get_available_providers():
            from runtime.folder import read_model_folder
            from runtime.session import cuda_refusal

            refusal = cuda_refusal(read_model_folder(folder))
            if refusal:
                not_on["cuda"] = refusal
            else:
                providers = ("cpu", "cuda")
    first = Session(folder, provider=providers[0], check_files=check_files)
    info = first.info
    tol_key = tolerance_key(info)
    tol = tolerance(tol_key)
    if model is None:
        from export.sources import build_model, load_source
        from export.sources.common import check_source

        then = "verify rebuilds the reference from it: put it back, or export again"
        model = build_model(load_source(check_source(info.provenance, then)))
    tok = first.tokenizer
    prompts = [
        tok.encode_chat(m) if tok.chat_template else tok.encode(m[0]["content"]) for m in PROMPTS
    ]
    texts = {
        kind: tok.encode(text)[: min(1024, info.max_position)]
        for kind, text in eval_texts().items()
    }
    text_ids = texts["prose"]
    short = {kind: len(ids) for kind, ids in texts.items() if len(ids) < 16}
    if short:
        raise ParityError(
            f"the folder's tokenizer encodes the evaluation texts to {short} tokens; "
            "verification needs at least 16 to score one: is tokenizer.json the model's own?"
        )
    ref_text_logits = {}
    for kind, ids in texts.items():
        ref_text_logits[kind], _ = _ref_step(
            model,
            np.array([ids]),
            np.ones((1, len(ids)), np.int64),
            np.arange(len(ids))[None],
            model.empty_cache(1),
        )
        plausible_perplexity(
            perplexity(ref_text_logits[kind][0], ids), info.vocab_size, "the reference model"
        )
    ref_logits = ref_text_logits["prose"]
    ref_ppl = perplexity(ref_logits[0], text_ids)
    from export.model.generate import generate

    ref_greedy = [generate(model, [p], tol.greedy_steps, stop_ids=())[0] for p in prompts]
    report = {
        "precision": info.precision,
        "target": info.target,
        "tolerance_key": tol_key,
        "tolerance": vars(tol),
        "providers": {},
    }
    if not_on:
        report["not_checked_on"] = not_on
    failures = []
    oracle_name, oracle, why_none = oracle_logits(info.provenance, text_ids)
    report["oracle"] = {"name": oracle_name, "tolerance": ORACLE_TOLERANCE}
    if oracle is None:
        report["oracle"]["none_because"] = why_none
    else:  # our reading of the source against transformers' own
        delta = float(np.abs(ref_logits[0] - oracle).max())
        report["oracle"]["reference_max_abs_logit_delta"] = delta
        if delta > ORACLE_TOLERANCE:
            failures.append(
                f"the PyTorch reference differs from {oracle_name} on the same source by "
                f"max |Δlogit| {delta:.2e} > {ORACLE_TOLERANCE:.0e}: its config or weights were "
                "misread"
            )
    first_logits = None  # the first provider's prose logits, the other providers' yardstick
    for provider in providers:
        session = (
            first
            if provider == providers[0]
            else Session(folder, provider=provider, check_files=False)
        )
        single = teacher_forced_delta(session, model, prompts[:1], DECODE_STEPS)
        batch = teacher_forced_delta(session, model, prompts, DECODE_STEPS)
        scored = {}
        for kind, ids in texts.items():
            logits = session.forward(
                np.array([ids]),
                np.ones((1, len(ids)), np.int64),
                np.arange(len(ids))[None],
                session.new_cache(1, len(ids)),
            )
            ref_kind = ref_text_logits[kind][0]
            scored[kind] = {
                "tokens": len(ids),
                "perplexity": perplexity(logits[0], ids),
                "reference_perplexity": perplexity(ref_kind, ids),
                "kl_divergence": mean_kl(ref_kind[:-1], logits[0, :-1]),
                "logits": logits,
            }
            scored[kind]["perplexity_ratio"] = (
                scored[kind]["perplexity"] / scored[kind]["reference_perplexity"]
            )
        ours = scored["prose"].pop("logits")
        for kind in scored:
            scored[kind].pop("logits", None)
        ppl = scored["prose"]["perplexity"]
        cfg = GenerationConfig(max_new_tokens=tol.greedy_steps, stop_token_ids=())
        gen = Generator(session)
        agree = [
            _leading_agreement(gen.generate_ids([p], cfg)[0], r)
            for p, r in zip(prompts, ref_greedy, strict=True)
        ]
        result = {
            "max_abs_logit_delta": max(single, batch),
            "max_abs_logit_delta_batch": batch,
            "greedy_agreement": min(agree),
            "greedy_agreement_per_prompt": agree,
            "greedy_agreement_fraction": sum(agree) / (len(agree) * tol.greedy_steps),
            "greedy_steps": tol.greedy_steps,
            "perplexity": ppl,
            "reference_perplexity": ref_ppl,
            "perplexity_ratio": ppl / ref_ppl,
            "kl_divergence": scored["prose"]["kl_divergence"],
            "eval_tokens": len(text_ids),
            # every kind of text (prose above, chat, code): the tolerance holds on each
            "texts": scored,
            "worst_perplexity_ratio": max(x["perplexity_ratio"] for x in scored.values()),
            "worst_kl_divergence": max(x["kl_divergence"] for x in scored.values()),
        }
        if first_logits is None:
            first_logits = ours
        else:  # the same folder on another provider: only the kernels differ
            result["kl_to_first_provider"] = mean_kl(first_logits[0, :-1], ours[0, :-1])
            if result["kl_to_first_provider"] > PROVIDER_KL:
                failures.append(
                    f"{provider}: mean KL {result['kl_to_first_provider']:.2e} from the same "
                    f"folder on {providers[0]} > {PROVIDER_KL:.0e}: a kernel differs"
                )
        if oracle is not None:
            result["oracle_max_abs_logit_delta"] = float(np.abs(ours[0] - oracle).max())
            if info.precision == "fp32" and result["oracle_max_abs_logit_delta"] > ORACLE_TOLERANCE:
                failures.append(
                    f"{provider}: max |Δlogit| against {oracle_name} "
                    f"{result['oracle_max_abs_logit_delta']:.2e} > {ORACLE_TOLERANCE:.0e}"
                )
        report["providers"][provider] = result
        if tol.max_abs_logit is not None and result["max_abs_logit_delta"] > tol.max_abs_logit:
            failures.append(
                f"{provider}: max |Δlogit| {result['max_abs_logit_delta']:.2e} "
                f"> {tol.max_abs_logit:.0e}"
            )
        if min(agree) < tol.required_greedy:
            failures.append(
                f"{provider}: greedy tokens differ at step {min(agree)} of {tol.required_greedy}"
            )
        for kind, x in scored.items():
            if x["perplexity_ratio"] > tol.perplexity_ratio:
                failures.append(
                    f"{provider}: perplexity ratio {x['perplexity_ratio']:.5f} on the {kind} "
                    f"text > {tol.perplexity_ratio}"
                )
            if x["kl_divergence"] > tol.max_kl:
                failures.append(
                    f"{provider}: mean KL divergence {x['kl_divergence']:.2e} on the {kind} "
                    f"text > {tol.max_kl:.0e}"
                )
    report["passed"] = not failures
    report["failures"] = failures
    return report


def summary(report: dict) -> str:
    """One line per provider: the figures a person reads first (and the oracle's, if any)."""
    line = "; ".join(
        f"{p}: max |Δlogit| {r['max_abs_logit_delta']:.2e}, "
        f"greedy {r['greedy_agreement_per_prompt']}/{r['greedy_steps']}, "
        f"perplexity {r['perplexity']:.3f} vs {r['reference_perplexity']:.3f}"
        f" (×{r['perplexity_ratio']:.4f}), KL {r['kl_divergence']:.1e}"
        + (
            f", worst of {'/'.join(r['texts'])} ×{r['worst_perplexity_ratio']:.4f} "
            f"KL {r['worst_kl_divergence']:.1e}"
            if "texts" in r
            else ""
        )
        for p, r in report["providers"].items()
    )
    oracle = report.get("oracle") or {}
    if oracle.get("name"):
        deltas = [r["oracle_max_abs_logit_delta"] for r in report["providers"].values()]
        line += (
            f"; against {oracle['name']}: reference {oracle['reference_max_abs_logit_delta']:.1e}"
            f", ONNX {max(deltas):.1e}"
        )
    return line


def check(report: dict) -> None:
    if not report["passed"]:
        raise ParityError(
            "ONNX model differs from the PyTorch reference: " + "; ".join(report["failures"])
        )
