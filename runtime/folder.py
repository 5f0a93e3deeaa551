"""Reads and validates a model folder written by `llamaonnx export` (see shared/DESIGN.md)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from runtime.errors import ModelFolderError

REQUIRED_FILES = ("model.onnx", "tokenizer.json", "llamaonnx.json")
# 2: the sha256 of every file (`files`), the kernel library inside the folder for genai
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    folder: Path
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int
    target: str
    precision: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    inputs: tuple[str, ...]
    kv_dtype: str  # "float32" | "float16": the type of past/present
    raw: dict
    custom_ops: tuple[str, ...] = ()  # op domains the graph needs beyond onnxruntime's own

    @property
    def shared_kv_buffer(self) -> bool:
        """The `ort` graph (GroupQueryAttention) reads and writes one preallocated cache buffer."""
        return self.target == "ort"

    @property
    def needs_position_ids(self) -> bool:
        return "position_ids" in self.inputs


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
        raw = json.loads((folder / "llamaonnx.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{folder}/llamaonnx.json is not readable JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format_version") not in READABLE_VERSIONS:
        version = raw.get("format_version") if isinstance(raw, dict) else None
        raise ModelFolderError(
            f"{folder}/llamaonnx.json has format_version {version!r}; this runtime reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        a, tokens, io = raw["architecture"], raw["special_tokens"], raw["io"]

        def count(section: dict, key: str) -> int:
            value = section[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelFolderError(
                    f"{folder}/llamaonnx.json: {key} must be an integer >= 1, got {value!r}"
                )
            return value

        eos = tuple(_token(folder, t) for t in tokens["eos_token_ids"])
        pad = tokens.get("pad_token_id")
        bos = tokens.get("bos_token_id")
        info = ModelInfo(
            folder=folder,
            n_layers=count(a, "n_layers"),
            n_heads=count(a, "n_heads"),
            n_kv_heads=count(a, "n_kv_heads"),
            head_dim=count(a, "head_dim"),
            vocab_size=count(a, "vocab_size"),
            max_position=count(a, "max_position"),
            target=str(raw["target"]),
            precision=str(raw["precision"]),
            bos_token_id=None if bos is None else _token(folder, bos),
            eos_token_ids=eos,
            pad_token_id=_token(folder, pad) if pad is not None else (eos[0] if eos else 0),
            inputs=tuple(map(str, io["inputs"])),
            kv_dtype=raw.get("kv_dtype", "float32"),
            raw=raw,
            custom_ops=tuple(raw.get("custom_ops", ())),
        )
    except (KeyError, TypeError) as e:
        raise ModelFolderError(f"{folder}/llamaonnx.json is malformed: {e!r}") from e
    if info.kv_dtype not in ("float32", "float16"):
        raise ModelFolderError(
            f"{folder}/llamaonnx.json: kv_dtype must be float32 or float16, got {info.kv_dtype!r}"
        )
    return info


def _token(folder: Path, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelFolderError(
            f"{folder}/llamaonnx.json: token ids must be integers >= 0, got {value!r}"
        )
    return value
