"""The verification table, the one renderer of what report.json holds: a row per model folder and
provider (the README's quality table, `llamaonnx table`, the app's Model tab). Torch-free: it
only reads folders."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.errors import ModelFolderError
from runtime.folder import ModelInfo, model_size, read_model_folder


def _weights(info: ModelInfo) -> str:
    q = info.quantization
    if not q:
        return "float32"
    if info.precision == "fp16":
        return "float16"
    parts = [f"{n}× {origin}" for origin, n in sorted(q.origins.items())]
    block = q.settings.get("block_size")
    two = len(q.two_digit_modules or ())
    digits = f", two-digit activations in {two} projection{'s' * (two > 1)}" if two else ""
    rounded = len(q.fp16_rounded_scales or ())
    if rounded:
        digits += f", fp16 scales rounded in {rounded}"
    return ", ".join(parts) + f"; block {block}, accuracy level {q.accuracy_level}{digits}"


def quality_table(folders: list[Path]) -> str:
    """One row per folder and provider it was verified on (report.json), CPU first."""
    rows = [
        "| model folder | precision | target | provider | size (MB) | perplexity (prose) "
        "| ratio to fp32 reference (prose / chat / code) | mean KL, nats (prose / chat / code) "
        "| greedy agreement | max \\|Δlogit\\| | weights |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for folder in map(Path, folders):
        info = read_model_folder(folder)
        report = json.loads((folder / "report.json").read_text())
        if not report.get("providers"):
            raise ModelFolderError(f"{folder} was not verified; run `llamaonnx verify {folder}`")
        for provider, r in sorted(report["providers"].items(), key=lambda kv: kv[0] != "cpu"):
            rows.append(_row(folder, info, provider, r))
    return "\n".join(rows)


def _row(folder: Path, info: ModelInfo, provider: str, r: dict) -> str:
    agree = r["greedy_agreement_per_prompt"]
    # reports written before the chat and code texts have the prose figures only
    texts = r.get("texts") or {"prose": r}
    ratios = " / ".join(f"{t['perplexity_ratio']:.4f}" for t in texts.values())
    kls = " / ".join(f"{t.get('kl_divergence', float('nan')):.1e}" for t in texts.values())
    return (
        f"| {folder.name} | {info.precision} | {info.target} | {provider} "
        f"| {model_size(folder) / 1e6:.1f} | {r['perplexity']:.3f} "
        f"| {ratios} | {kls} "
        f"| {sum(agree)}/{len(agree) * r['greedy_steps']} ({'/'.join(map(str, agree))}) "
        f"| {r['max_abs_logit_delta']:.2e} | {_weights(info)} |"
    )
