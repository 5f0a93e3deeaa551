"""`llamaonnx quantize IN_DIR OUT_DIR --precision int4|int8|fp16`: a verified fp32 model folder →
a new folder whose graph holds quantized weights, verified against the same PyTorch reference.

int4 / int8 are weight-only: MatMulNBits for every projection (the LM head included, at
`head_bits`), GatherBlockQuantized for the token embedding. Where the folder was exported from a
GGUF whose tensors are Q4_0, Q4_1 or Q8_0 and the layer's bits match, those blocks are carried into
the graph as they are (the very values the fp32 reference computes with) instead of being quantized
a second time; each carried weight is checked to dequantize exactly to the fp32 graph's weight.
Q4_1's per-block offsets, which MatMulNBits cannot hold, ride along as 8-bit extra rows (see
blocks.offset_rows). At accuracy level 0 such a model computes what the reference computes, to
float rounding and that offset rounding (report.json: max_abs_offset_error).
fp16 converts the whole graph (see quant/fp16.py) and may follow an int4/int8 step for CUDA.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.errors import QuantizationError
from export.quant.blocks import (
    Blocks,
    check_settings,
    from_gguf,
    held_offsets,
    permute_rows,
    quantize,
)

if TYPE_CHECKING:
    from runtime.folder import Architecture, ModelInfo

log = logging.getLogger(__name__)
PRECISIONS = ("int4", "int8", "fp16")
PROVIDERS = ("cpu", "cuda")
# MatMulNBits accuracy_level: 4 = int8 activations with int32 accumulation (CPU's fast path);
# 0 = activations in their own type (CUDA ignores the level).
ACCURACY_LEVEL = {"cpu": 4, "cuda": 0}
KERNELS = ("auto", "native", "nbits")


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    precision: str  # int4 | int8 | fp16
    block_size: int = 32
    symmetric: bool = False  # blocks quantized here: symmetric, or asymmetric with zero points
    gguf_blocks: bool = True  # carry the source GGUF's blocks where their bits match
    head_bits: int = 8  # the LM head (and a tied embedding)
    embedding: bool = True  # the token embedding as GatherBlockQuantized
    keep: tuple[str, ...] = ()  # fnmatch patterns of modules kept in float (e.g. "layers.0.*")
    provider: str = "cpu"  # picks the accuracy level
    accuracy_level: int | None = None  # MatMulNBits accuracy_level; None: the provider's
    fp16_activations: bool = False  # int4/int8 with fp16 activations and cache (CUDA)
    # int4 on CPU: "native" (ai.llamaonnx ops), "nbits" (MatMulNBits), "auto" (native where fast)
    kernel: str = "auto"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise QuantizationError(
                f"unknown precision {self.precision!r}; choose one of {PRECISIONS}"
            )
        if self.provider not in PROVIDERS:
            raise QuantizationError(
                f"unknown provider {self.provider!r}; choose one of {PROVIDERS}"
            )
        if self.precision != "fp16":
            check_settings(self.bits, self.block_size)
            check_settings(self.head_bits, self.block_size)
        if self.kernel not in KERNELS:
            raise QuantizationError(f"unknown kernel {self.kernel!r}; choose one of {KERNELS}")
        if self.kernel == "native" and not self.native_applies:
            raise QuantizationError(
                "--kernel native is llamaonnx's CPU int4 kernel (int8 activations): it needs "
                "--precision int4, --for-provider cpu, accuracy level 4 and float32 activations"
            )
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise QuantizationError(
                f"accuracy level must be 0-4 (0: activations in float, 4: int8), "
                f"not {self.accuracy_level}"
            )

    @property
    def level(self) -> int:
        if self.accuracy_level is not None:
            return self.accuracy_level
        return ACCURACY_LEVEL[self.provider]

    @property
    def native_applies(self) -> bool:
        return (
            self.bits == 4
            and self.provider == "cpu"
            and self.level == 4
            and not self.fp16_activations
        )

    @property
    def native(self) -> bool:
        """Whether 4-bit blocks of 32 go to llamaonnx's own kernel (`export/quant/native.py`)."""
        if self.kernel == "nbits" or not self.native_applies:
            return False
        if self.kernel == "native":
            return True
        from runtime import native

        # auto: only where the AVX-512 VNNI kernel runs (the portable C path is correct but
        # slower than MatMulNBits)
        return native.available() and native.fast_path()

    @property
    def bits(self) -> int:
        return {"int4": 4, "int8": 8}.get(self.precision, 0)

    @property
    def float_type(self) -> str:
        return "float16" if self.precision == "fp16" or self.fp16_activations else "float32"


def _gguf_blocks(info: ModelInfo) -> dict[str, tuple[str, np.ndarray, int]]:
    """Our tensor name → (GGUF type name, raw rows, K) for the source GGUF's carried types."""
    prov = info.provenance
    if prov.format != "gguf":
        return {}
    path = Path(prov.source)
    from export.sources.common import sha256_of

    if not path.is_file() or sha256_of(path) != prov.sha256:
        raise QuantizationError(
            f"the folder was exported from {path}, which is missing or has changed since "
            "(sha256 differs); re-export, or pass --no-gguf-blocks to quantize the float weights"
        )
    import gguf

    from export.quant.blocks import GGUF_TYPES
    from export.sources.common import key_mapper
    from export.sources.gguf import KEY_MAP

    map_name = key_mapper(KEY_MAP)
    reader = gguf.GGUFReader(path)
    return {
        map_name(t.name): (t.tensor_type.name, t.data, int(t.shape[0]))
        for t in reader.tensors
        if t.tensor_type.name in GGUF_TYPES and map_name(t.name)
    }


def _unpermute_for(name: str, arch: Architecture) -> Callable | None:
    from export.sources.gguf import unpermute

    if name.endswith("attention.wq.weight"):
        return lambda a: unpermute(a, arch.n_heads)
    if name.endswith("attention.wk.weight"):
        return lambda a: unpermute(a, arch.n_kv_heads)
    return None


def plan(settings: QuantSettings, info: ModelInfo):
    """→ (choose(module, W), embedding_blocks(table, head)) closures and the carry log."""
    carried = _gguf_blocks(info) if settings.gguf_blocks else {}
    arch = info.architecture
    notes: dict = {"max_abs_carry_error": 0.0}

    def carry(tensor: str, w: np.ndarray, bits: int) -> Blocks | None:
        if tensor not in carried:
            return None
        type_name, raw, k = carried[tensor]
        blocks = from_gguf(type_name, raw, k)
        if blocks.bits != bits:
            return None
        fix = _unpermute_for(tensor, arch)
        if fix:
            blocks = permute_rows(blocks, fix)
        err = float(np.abs(blocks.dequantize() - w).max())
        if err > 1e-6 * max(1.0, float(np.abs(w).max())):
            raise QuantizationError(
                f"the GGUF blocks of {tensor} do not reproduce the fp32 graph's weight "
                f"(max |Δ| {err:.2e}); the folder and its source disagree"
            )
        notes["max_abs_carry_error"] = max(notes["max_abs_carry_error"], err)
        if blocks.offsets is not None:  # what the graph's 8-bit offset rows hold of them
            off = float(np.abs(held_offsets(blocks.offsets) - blocks.offsets).max())
            notes["max_abs_offset_error"] = max(notes.get("max_abs_offset_error", 0.0), off)
        return blocks

    def blocks_for(tensor: str, w: np.ndarray, bits: int) -> Blocks:
        return carry(tensor, w, bits) or quantize(w, bits, settings.block_size, settings.symmetric)

    def choose(module: str, w: np.ndarray) -> Blocks | None:
        if any(fnmatch.fnmatchcase(module, p) for p in settings.keep):
            return None
        bits = settings.head_bits if module == "output" else settings.bits
        tensor = f"{module}.weight"
        if module == "output" and arch.tie_embeddings:
            tensor = "tok_embeddings.weight"
        return blocks_for(tensor, w, bits)

    def embedding_blocks(table: np.ndarray, head: Blocks | None) -> Blocks | None:
        if not settings.embedding or any(
            fnmatch.fnmatchcase("tok_embeddings", p) for p in settings.keep
        ):
            return None
        if head is not None and arch.tie_embeddings:
            return head  # one copy of the codes serves the LM head and the embedding
        return blocks_for("tok_embeddings.weight", table, settings.head_bits)

    return choose, embedding_blocks, notes


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
    if settings.bits:
        from export.quant.nbits import quantize_graph

        choose, embedding_blocks, notes = plan(settings, info)
        # CUDA's MatMulNBits runs its batch-1 kernel only for K % 8 == 0 (else it dequantizes
        # the whole weight on every call)
        k_multiple = 8 if settings.provider == "cuda" else 1
        layers = quantize_graph(
            proto, choose, settings.level, embedding_blocks, k_multiple, settings.native
        )
    if settings.float_type == "float16":
        from export.quant.fp16 import convert_fp16
        from export.quant.nbits import fuse_float_projections

        if not settings.bits:  # (the int4/int8 path fuses its own)
            notes["fused_projections"] = fuse_float_projections(proto)
        convert_fp16(proto)
    from export.quant.native import DOMAIN as native_domain

    native_ops = any(n.domain == native_domain for n in proto.graph.node)
    kernel = ""
    if settings.bits:
        kernel = "llamaonnx's kernels, " if native_ops else "MatMulNBits, "
        if settings.kernel == "auto" and settings.native_applies and not native_ops:
            kernel = "MatMulNBits (llamaonnx's kernels are not built or lack AVX-512 VNNI here), "
    progress(
        f"quantize {settings.precision}: {kernel}{len(layers)} weights "
        f"({dict(collections.Counter(b.origin for b in layers.values()))}) "
        f"({time.perf_counter() - t:.1f}s)"
    )
    quant = Quantization(
        settings={**dataclasses.asdict(settings), "keep": list(settings.keep)},
        accuracy_level=settings.level if settings.bits else None,
        kernel="native" if native_ops else "nbits" if settings.bits else None,
        float_type=settings.float_type,
        weights={
            m: WeightRecord(b.origin, b.bits, b.block_size, b.carried) for m, b in layers.items()
        },
        max_abs_carry_error=notes.get("max_abs_carry_error"),
        max_abs_offset_error=notes.get("max_abs_offset_error"),
        fused_projections=notes.get("fused_projections"),
        from_folder=str(in_dir.resolve()),
    )
    new_info = dataclasses.replace(
        info,
        custom_ops=(native_domain,) if native_ops else info.custom_ops,
        precision=settings.precision,
        kv_dtype=settings.float_type,
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
