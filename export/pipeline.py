"""`llamaonnx export`: source → reference model → ONNX → lowering → model folder → verification.

Each stage reports its time through `progress`. The folder appears only when every stage,
verification included, has passed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from export.errors import ExportError
from export.onnx.save import genai_config, save_onnx
from export.passes import TARGETS, lower
from export.verify.record import verify_and_record
from runtime.files import atomic_folder, check_disk, check_replaceable, scratch_folder, write_json
from runtime.folder import (
    MODEL_FOLDER,
    Architecture,
    ModelInfo,
    Provenance,
    SpecialTokens,
    write_model_info,
)

PRECISIONS = ("fp32", "int4", "int8", "fp16")


def _tool_versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "llamaonnx": "0.1.0",
    }


def model_info(source, target: str, inputs: list[str], outputs: list[str]) -> ModelInfo:
    """The fp32 folder's description, from the source's config and the traced graph's I/O."""
    c = source.config
    return ModelInfo(
        architecture=Architecture(
            n_layers=c.n_layers,
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.resolved_head_dim,
            dim=c.dim,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            max_position=c.max_position,
            rope_theta=c.rope_theta,
            rope_scaling=c.to_dict()["rope_scaling"],
            norm_eps=c.norm_eps,
            tie_embeddings=c.tie_embeddings,
        ),
        special_tokens=SpecialTokens(c.bos_token_id, tuple(c.eos_token_ids), c.pad_token_id),
        target=target,
        precision="fp32",
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        provenance=Provenance(**source.provenance(), tools=_tool_versions()),
    )


def export_model(
    source_path: str | Path | None,
    out_dir: str | Path,
    target: str = "ort",
    precision: str = "fp32",
    force: bool = False,
    verify: bool = True,
    progress: Callable[[str], None] = lambda msg: None,
    quant=None,
) -> dict:
    """Returns llamaonnx.json's content, with the verification report under "report".

    A precision other than fp32 exports fp32 to a temporary folder first, then quantizes it with
    `quant` (QuantSettings; defaults for the precision when None) into `out_dir`, verified against
    the same reference model (the source is loaded once)."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of {TARGETS}")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    from export.sources import build_model, default_gguf_path, load_source

    out_dir = Path(out_dir)
    src = default_gguf_path() if source_path is None else Path(source_path)
    check_replaceable(out_dir, MODEL_FOLDER, force, [src])  # before the minutes of work, not after
    t = time.perf_counter()
    source = load_source(src)
    model = build_model(source)
    progress(
        f"load    {source.path.name}: {source.config.n_layers} layers "
        f"({time.perf_counter() - t:.1f}s)"
    )
    if precision == "fp32":
        return _export_fp32(source, model, out_dir, target, force, verify, progress, [src])

    from export.quant import QuantSettings, quantize_folder

    with scratch_folder(out_dir) as scratch:
        _export_fp32(source, model, scratch / "fp32", target, False, False, progress, [src])
        return quantize_folder(
            scratch / "fp32",
            out_dir,
            quant or QuantSettings(precision),
            force,
            verify,
            model=model if verify else None,
            progress=progress,
            protected=[src],
        )


def _export_fp32(source, model, out_dir: Path, target, force, verify, progress, protected) -> dict:
    check_disk(out_dir, 2 * sum(v.nbytes for v in source.state.values()) + (64 << 20))

    t = time.perf_counter()
    from export.onnx.trace import trace

    proto = trace(model)
    progress(
        f"trace   torch.onnx.export (dynamo): {len(proto.graph.node)} nodes "
        f"({time.perf_counter() - t:.1f}s)"
    )
    t = time.perf_counter()
    proto = lower(proto, target)
    progress(
        f"lower   target {target}: {len(proto.graph.node)} nodes ({time.perf_counter() - t:.1f}s)"
    )

    with atomic_folder(out_dir, MODEL_FOLDER, force, protected) as tmp:
        t = time.perf_counter()
        save_onnx(proto, tmp)
        # an overridable initializer (logits_to_keep) is optional: not one the runtime must feed
        weights = {i.name for i in proto.graph.initializer}
        inputs = [i.name for i in proto.graph.input if i.name not in weights]
        outputs = [o.name for o in proto.graph.output]
        info = model_info(source, target, inputs, outputs)
        write_model_info(tmp, info)
        (tmp / "tokenizer.json").write_text(json.dumps(source.tokenizer_json))
        if source.chat_template:
            (tmp / "chat_template.jinja").write_text(source.chat_template)
            write_json(tmp / "tokenizer_config.json", {"chat_template": source.chat_template})
        if target == "ort":
            write_json(tmp / "genai_config.json", genai_config(info))
        progress(f"save    {out_dir} ({time.perf_counter() - t:.1f}s)")
        report = verify_and_record(tmp, model, verify, progress)
    return {**info.to_json(), "report": report}
