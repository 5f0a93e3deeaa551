"""`llamaonnx quantize IN_DIR OUT_DIR --precision int4|int8|fp16`: a verified fp32 model folder →
a new folder whose graph holds quantized weights, verified against the same PyTorch reference.

int4 / int8 are weight-only: MatMulNBits for every projection (the LM head included, at
`head_bits`), GatherBlockQuantized for the token embedding. Where the folder was exported from a
GGUF whose tensors are Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K (which are carried: see
carry.py), those blocks go into the graph as they are (the very values the fp32 reference computes
with) instead of being quantized a second time; each carried weight is checked to dequantize
exactly to the fp32 graph's weight. The per-block offsets of Q4_1, Q5_1, Q4_K and Q5_K, which
MatMulNBits cannot hold, ride along as 8-bit extra rows (see blocks.offset_rows). At accuracy
level 0 such a model computes what the reference computes, to float rounding and that offset
rounding (report.json: max_abs_offset_error; llamaonnx's kernels read the offsets exactly, and
there it is null). An fp16 graph also rounds the scales float16 cannot hold (Q4_K's, Q5_K's and
Q6_K's fp32 products), said on the terminal and in report.json (fp16_rounded_scales).
fp16 converts the whole graph (see quant/fp16.py) and may follow an int4/int8 step for CUDA.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from export.errors import QuantizationError
from export.quant.blocks import Blocks
from export.quant.carry import plan
from export.quant.settings import QuantSettings, counted_from_last

__all__ = ["QuantSettings", "quantize_folder"]
log = logging.getLogger(__name__)


def _genai_custom_ops(folder: Path) -> None:
    """onnxruntime-genai loads the kernel library named in the decoder's session options, and
    only from its allowed folders: the model folder, its execution providers' folders and the
    working directory, after resolving links. So the folder carries a copy of the library (about
    200 kB) and names it relatively: genai opens the folder from any path, copied anywhere. The
    llamaonnx runtime registers its installed library instead, built for its own onnxruntime."""
    from runtime import native
    from runtime.files import write_json

    library = native.library_path()
    (folder / native.FOLDER_LIBRARY).write_bytes(library.read_bytes())
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["custom_ops_library"] = native.FOLDER_LIBRARY
    write_json(path, config)


def quantize_folder(
    in_dir: str | Path,
    out_dir: str | Path,
    settings: QuantSettings,
    force: bool = False,
    verify: bool = True,
    model=None,
    progress: Callable[[str], None] = lambda msg: None,
    protected: tuple = (),
) -> dict:
    """Returns the new llamaonnx.json content with the verification report under "report".
    `protected`: paths besides `in_dir` that `out_dir` must never be, contain or lie inside."""
    import onnx

    from export.onnx.save import save_onnx
    from runtime.files import atomic_folder, check_disk, check_replaceable
    from runtime.folder import (
        MODEL_FOLDER,
        Quantization,
        WeightRecord,
        check_integrity,
        model_size,
        read_model_folder,
        write_model_info,
    )

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    protected = (in_dir, *protected)
    check_replaceable(out_dir, MODEL_FOLDER, force, protected)
    info = read_model_folder(in_dir)
    check_integrity(info)
    if info.precision != "fp32":
        raise QuantizationError(
            f"{in_dir} holds a {info.precision} model; quantize from an fp32 folder"
        )
    if settings.provider == "cpu" and settings.precision == "fp16":
        log.info("fp16 runs on CPU for checking; it is meant for CUDA")
    asked, settings = settings, counted_from_last(settings, info.n_layers)  # (layers.-1: last)

    t = time.perf_counter()
    try:
        proto = onnx.load(str(in_dir / "model.onnx"))
    except Exception as e:  # protobuf's DecodeError, a missing external data file, ...
        raise QuantizationError(
            f"{in_dir}/model.onnx (or its model.onnx.data) cannot be read: {type(e).__name__}: "
            f"{e}; export the fp32 folder again"
        ) from e
    check_disk(out_dir, proto.ByteSize() + (64 << 20))
    layers: dict[str, Blocks] = {}
    notes: dict = {}
    kv_dtype = settings.kv_dtype
    if settings.bits:
        from export.quant.nbits import quantize_graph

        choose, embedding_blocks, notes = plan(settings, info)
        # CUDA's MatMulNBits runs its batch-1 kernel only for K % 8 == 0 (else it dequantizes
        # the whole weight on every call)
        k_multiple = 8 if settings.provider == "cuda" else 1
        layers = quantize_graph(
            proto, choose, settings.level, embedding_blocks, k_multiple, settings.native, notes
        )
        if kv_dtype == "float16" and settings.float_type == "float32":
            from export.quant.attention import fp16_cache, ours_everywhere

            if settings.kv_cache == "auto" and not ours_everywhere(proto.graph):
                kv_dtype = "float32"  # a layer keeps onnxruntime's attention, or none is ours
            else:
                fp16_cache(proto.graph)
    if settings.provider == "cuda":
        from export.passes.logits import drop_keep_last

        if drop_keep_last(proto):  # (a device-to-host copy in the graph stops CUDA graphs)
            log.info("logits_to_keep dropped: a CUDA folder computes every position's logits")
    if settings.float_type == "float16":
        from export.quant.fp16 import convert_fp16
        from export.quant.fuse_projections import fuse_float_projections

        if not settings.bits:  # (the int4/int8 path fuses its own)
            notes["fused_projections"] = fuse_float_projections(proto)
        convert_fp16(proto)
        if settings.bits:
            from export.quant.carry import fp16_rounding

            rounded = fp16_rounding(layers)
            if rounded:  # (MatMulNBits' scales take the activations' type: no fp32 scales here)
                notes["fp16_rounded_scales"] = rounded
                types = ", ".join(sorted({r["gguf_type"] for r in rounded.values()}))
                worst = max(r["max_abs_error"] for r in rounded.values())
                log.warning(
                    "float16 cannot hold the scales of %d carried GGUF tensors (%s): the fp16 "
                    "graph rounds them, changing a weight by up to %.2e (the CPU's forms keep "
                    "them exact)",
                    len(rounded), types, worst,
                )  # fmt: skip
    from export.quant.native import DOMAIN as native_domain

    native_ops = any(n.domain == native_domain for n in proto.graph.node)
    precise: list[str] = []
    if settings.precise:
        from export.quant.native import two_digits

        if not native_ops:
            raise QuantizationError(
                "--precise needs llamaonnx's kernels, and this folder's projections are "
                "MatMulNBits (is runtime/native built? `make setup` builds it)"
            )
        precise = two_digits(proto.graph, settings.precise)
    kernel = ""
    if settings.bits:
        kernel = "llamaonnx's kernels, " if native_ops else "MatMulNBits, "
        if settings.kernel == "auto" and settings.native_applies and not native_ops:
            kernel = "MatMulNBits (llamaonnx's kernel library is not built here), "
    two = f", two-digit activations in {len(precise)} projections" if precise else ""
    progress(
        f"quantize {settings.precision}: {kernel}{len(layers)} weights "
        f"({dict(collections.Counter(b.origin for b in layers.values()))}){two} "
        f"({time.perf_counter() - t:.1f}s)"
    )
    quant = Quantization(
        settings={
            **dataclasses.asdict(settings),
            "keep": list(asked.keep),
            "precise": list(asked.precise),
        },
        accuracy_level=settings.level if settings.bits else None,
        kernel="native" if native_ops else "nbits" if settings.bits else None,
        float_type=settings.float_type,
        weights={
            m: WeightRecord(b.origin, b.bits, b.block_size, b.carried) for m, b in layers.items()
        },
        max_abs_carry_error=notes.get("max_abs_carry_error"),
        max_abs_offset_error=(notes.get("offset_error") or {}).get(settings.float_type),
        fp16_rounded_scales=notes.get("fp16_rounded_scales"),
        fused_projections=notes.get("fused_projections"),
        from_folder=str(in_dir.resolve()),
        requantized_gguf_tensors=notes.get("requantized_gguf_tensors"),
        two_digit_modules=precise or None,
    )
    new_info = dataclasses.replace(
        info,
        custom_ops=(native_domain,) if native_ops else info.custom_ops,
        precision=settings.precision,
        kv_dtype=kv_dtype,
        quantization=quant,
        files=None,
        folder=None,
    )
    with atomic_folder(out_dir, MODEL_FOLDER, force, protected) as tmp:
        t = time.perf_counter()
        save_onnx(proto, tmp)
        for f in in_dir.iterdir():
            if f.name not in ("model.onnx", "model.onnx.data", "llamaonnx.json", "report.json"):
                (tmp / f.name).write_bytes(f.read_bytes())
        if native_ops and (tmp / "genai_config.json").is_file():
            _genai_custom_ops(tmp)
        write_model_info(tmp, new_info)
        size = model_size(tmp)
        progress(f"save    {out_dir}: {size / 1e6:.1f} MB ({time.perf_counter() - t:.1f}s)")
        from export.verify.record import verify_and_record

        report = verify_and_record(
            tmp, model, verify, progress, size_bytes=size, quantization=quant.to_json()
        )
    return {**new_info.to_json(), "report": report}
