"""`llamaonnx.json`, the description of a model folder (shared/DESIGN.md): its one owner.

Every writer builds a `ModelInfo` and calls `write_model_info`; every reader calls
`read_model_folder` and gets typed fields, checked as they are read: the architecture, special
tokens, target and precision, I/O names, provenance (source, its sha256, tool versions),
quantization with the origin of every weight, and the checksums of the folder's files.

Format versions: 1 (first round), 2 (adds `files`, typed weight records, the kernel library
inside the folder). Version 1 folders are read as far as they go.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from pathlib import Path

from runtime.errors import IntegrityError, ModelFolderError
from runtime.files import FolderKind, digests, sha256_file, write_atomic, write_json

log = logging.getLogger(__name__)
INFO_FILE = "llamaonnx.json"
REQUIRED_FILES = ("model.onnx", "tokenizer.json", INFO_FILE)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclasses.dataclass(frozen=True)
class Architecture:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    rope_theta: float
    rope_scaling: dict
    norm_eps: float
    tie_embeddings: bool


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


@dataclasses.dataclass(frozen=True)
class Provenance:
    source: str  # the GGUF file or Hugging Face folder, as it was when exported
    format: str  # "gguf" | "hf"
    sha256: str
    tools: dict  # versions of the tools that wrote the folder


@dataclasses.dataclass(frozen=True)
class WeightRecord:
    """How one quantized weight is held."""

    origin: str  # "gguf-Q4_1" (the source's blocks), "rtn-asymmetric" (rounded here), ...
    bits: int
    block_size: int
    carried: bool  # the source's own blocks, not rounded a second time


@dataclasses.dataclass(frozen=True)
class Quantization:
    settings: dict  # the quantizer's settings as given (export/quant/settings.py)
    accuracy_level: int | None
    kernel: str | None  # "native" | "nbits" | None (fp16)
    float_type: str
    weights: dict[str, WeightRecord]
    max_abs_carry_error: float | None = None
    max_abs_offset_error: float | None = None
    fused_projections: int | None = None
    from_folder: str | None = None
    # GGUF tensors of a type not carried (Q2_K, Q3_K, IQ*), rounded again here: tensor →
    # {"gguf_type", "quantized_to", "relative_rms_error"}
    requantized_gguf_tensors: dict | None = None
    # projections whose activations run in two int8 digits (quantize --precise)
    two_digit_modules: list[str] | None = None
    # carried weights whose scales an fp16 graph rounds: module → {"gguf_type", "max_abs_error"}
    fp16_rounded_scales: dict | None = None

    @property
    def requantized_bits(self) -> set[int]:
        """Bit widths of which some weight was rounded here rather than carried."""
        return {w.bits for w in self.weights.values() if not w.carried}

    @property
    def origins(self) -> dict[str, int]:
        """'gguf-Q4_1 4-bit' → how many weights, for tables."""
        return dict(collections.Counter(f"{w.origin} {w.bits}-bit" for w in self.weights.values()))

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["origins"] = self.origins
        return out


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    architecture: Architecture
    special_tokens: SpecialTokens
    target: str
    precision: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    provenance: Provenance
    kv_dtype: str = "float32"  # "float32" | "float16": the type of past/present
    custom_ops: tuple[str, ...] = ()  # op domains the graph needs beyond onnxruntime's own
    quantization: Quantization | None = None
    files: dict | None = None  # name → {"sha256", "bytes"}; runtime/files.py seals them
    folder: Path | None = None  # where it was read from

    # the fields the runtime reads on every step, by their short names
    n_layers = property(lambda self: self.architecture.n_layers)
    n_heads = property(lambda self: self.architecture.n_heads)
    n_kv_heads = property(lambda self: self.architecture.n_kv_heads)
    head_dim = property(lambda self: self.architecture.head_dim)
    vocab_size = property(lambda self: self.architecture.vocab_size)
    max_position = property(lambda self: self.architecture.max_position)
    bos_token_id = property(lambda self: self.special_tokens.bos_token_id)
    eos_token_ids = property(lambda self: self.special_tokens.eos_token_ids)

    @property
    def pad_token_id(self) -> int:
        """The pad token, else the first end token (what batches pad with), else 0."""
        pad, eos = self.special_tokens.pad_token_id, self.eos_token_ids
        return pad if pad is not None else (eos[0] if eos else 0)

    @property
    def shared_kv_buffer(self) -> bool:
        """The `ort` graph (GroupQueryAttention) reads and writes one preallocated cache buffer."""
        return self.target == "ort"

    @property
    def needs_position_ids(self) -> bool:
        return "position_ids" in self.inputs

    def to_json(self) -> dict:
        out = {
            "format_version": FORMAT_VERSION,
            "architecture": dataclasses.asdict(self.architecture),
            "special_tokens": {
                **dataclasses.asdict(self.special_tokens),
                "eos_token_ids": list(self.eos_token_ids),
            },
            "target": self.target,
            "precision": self.precision,
            "kv_dtype": self.kv_dtype,
            "io": {"inputs": list(self.inputs), "outputs": list(self.outputs)},
            "provenance": dataclasses.asdict(self.provenance),
        }
        if self.custom_ops:
            out["custom_ops"] = list(self.custom_ops)
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_json()
        if self.files is not None:
            out["files"] = self.files
        return out


def write_model_info(folder: Path, info: ModelInfo) -> None:
    write_json(Path(folder) / INFO_FILE, info.to_json())


# -- checksums -----------------------------------------------------------------------------------
def seal(folder: Path) -> None:
    """Records the size and sha256 of every file of the folder in its llamaonnx.json."""
    info = read_model_folder(folder)
    write_model_info(folder, dataclasses.replace(info, files=digests(folder, skip=[INFO_FILE])))


def check_integrity(info: ModelInfo) -> None:
    """Every file the folder's manifest lists is there with its recorded size and sha256, or
    IntegrityError names the first that is not. Folders written before checksums (no `files`)
    are opened with a warning."""
    folder, files = info.folder, info.files
    if files is None:
        log.warning(
            "%s records no checksums (written by an older llamaonnx): its files cannot be "
            "checked; export it again to get integrity checks",
            folder,
        )
        return
    if not isinstance(files, dict):
        raise ModelFolderError(f"{folder}/{INFO_FILE}: 'files' must map file names to checksums")
    for name, record in files.items():
        path = Path(folder) / name
        if Path(name).name != name or not path.is_file():
            raise IntegrityError(
                f"{path} is listed in {INFO_FILE} but missing: the folder is incomplete; copy it "
                "again or export it again"
            )
        size = path.stat().st_size
        if size != record.get("bytes") or sha256_file(path) != record.get("sha256"):
            raise IntegrityError(
                f"{path} differs from the file written at export ({size} bytes, recorded "
                f"{record.get('bytes')}; sha256 differs): it is corrupt or was changed. Copy the "
                "folder again or export it again (--skip-checksums opens it anyway)"
            )


def update_file(folder: Path, name: str, data: bytes | str) -> None:
    """Rewrites one file of a sealed folder and its checksum in the manifest, nothing else: the
    other files keep the checksums they were written with."""
    folder = Path(folder)
    write_atomic(folder / name, data)
    info = read_model_folder(folder)
    if info.files is not None:
        p = folder / name
        files = {**info.files, name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}}
        write_model_info(folder, dataclasses.replace(info, files=files))


MODEL_FOLDER = FolderKind(
    "a llamaonnx model folder",
    INFO_FILE,
    frozenset(
        {
            INFO_FILE,
            "model.onnx",
            "model.onnx.data",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "report.json",
            "genai_config.json",
            "llamaonnx_kernels.so",
            "llamaonnx_kernels.dll",
        }
    ),
    finish=seal,
)


def model_size(folder: str | Path) -> int:
    """Bytes of the graph and its weights (model.onnx and model.onnx.data)."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.name.startswith("model.onnx"))


def read_model_folder(folder: str | Path) -> ModelInfo:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder {folder} does not exist (make one with `llamaonnx export`)"
        )
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise ModelFolderError(f"model folder {folder} lacks {', '.join(missing)}")
    try:
        raw = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{folder}/{INFO_FILE} is not readable JSON: {e}") from None
    return _parse(raw, folder)


def _parse(raw, folder: Path) -> ModelInfo:
    where = f"{folder}/{INFO_FILE}"
    if not isinstance(raw, dict) or raw.get("format_version") not in READABLE_VERSIONS:
        version = raw.get("format_version") if isinstance(raw, dict) else None
        raise ModelFolderError(
            f"{where} has format_version {version!r}; this runtime reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))}"
        )

    def count(section: dict, key: str) -> int:
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelFolderError(f"{where}: {key} must be an integer >= 1, got {value!r}")
        return value

    def token(value) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ModelFolderError(f"{where}: token ids must be integers >= 0, got {value!r}")
        return value

    try:
        a, t, p, io = raw["architecture"], raw["special_tokens"], raw["provenance"], raw["io"]
        q = raw.get("quantization")
        info = ModelInfo(
            architecture=Architecture(
                **{k: count(a, k) for k in _COUNTS},
                rope_theta=float(a["rope_theta"]),
                rope_scaling=dict(a.get("rope_scaling") or {"type": "none"}),
                norm_eps=float(a["norm_eps"]),
                tie_embeddings=bool(a["tie_embeddings"]),
            ),
            special_tokens=SpecialTokens(
                bos_token_id=None if t.get("bos_token_id") is None else token(t["bos_token_id"]),
                eos_token_ids=tuple(token(x) for x in t["eos_token_ids"]),
                pad_token_id=None if t.get("pad_token_id") is None else token(t["pad_token_id"]),
            ),
            target=str(raw["target"]),
            precision=str(raw["precision"]),
            inputs=tuple(map(str, io["inputs"])),
            outputs=tuple(map(str, io.get("outputs", ()))),
            provenance=Provenance(
                source=str(p["source"]),
                format=str(p["format"]),
                sha256=str(p["sha256"]),
                tools=dict(p.get("tools", {})),
            ),
            kv_dtype=raw.get("kv_dtype", "float32"),
            custom_ops=tuple(map(str, raw.get("custom_ops", ()))),
            quantization=_quantization(q) if q else None,
            files=raw.get("files"),
            folder=folder,
        )
    except ModelFolderError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFolderError(f"{where} is malformed: {e!r}") from e
    if info.kv_dtype not in ("float32", "float16"):
        raise ModelFolderError(
            f"{where}: kv_dtype must be float32 or float16, got {info.kv_dtype!r}"
        )
    return info


_COUNTS = ("n_layers", "n_heads", "n_kv_heads", "head_dim", "dim", "intermediate_size")
_COUNTS += ("vocab_size", "max_position")


def _quantization(q: dict) -> Quantization:
    fields = {f.name for f in dataclasses.fields(Quantization)}
    weights = {}
    for module, w in q.get("weights", {}).items():
        if isinstance(w, str):  # format 1 wrote "gguf-Q4_1 4-bit/32"
            origin, _, rest = w.rpartition(" ")
            bits, _, block = rest.partition("-bit/")
            w = dict(origin=origin, bits=int(bits), block_size=int(block))
            w["carried"] = origin.startswith("gguf-")
        weights[module] = WeightRecord(**w)
    # format 1 kept the settings at the top level of the record
    settings = q.get("settings") or {k: v for k, v in q.items() if k not in fields | {"origins"}}
    return Quantization(
        settings=dict(settings),
        accuracy_level=q.get("accuracy_level"),
        kernel=q.get("kernel"),
        float_type=q.get("float_type", "float32"),
        weights=weights,
        max_abs_carry_error=q.get("max_abs_carry_error"),
        max_abs_offset_error=q.get("max_abs_offset_error"),
        fused_projections=q.get("fused_projections"),
        from_folder=q.get("from_folder"),
        requantized_gguf_tensors=q.get("requantized_gguf_tensors"),
        two_digit_modules=q.get("two_digit_modules"),
        fp16_rounded_scales=q.get("fp16_rounded_scales"),
    )
