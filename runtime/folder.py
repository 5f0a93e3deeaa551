"""Reads and validates a model folder written by `llamaonnx export` (see shared/DESIGN.md)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from runtime.errors import ModelFolderError

REQUIRED_FILES = ("model.onnx", "tokenizer.json", "llamaonnx.json")
FORMAT_VERSION = 1


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
        a, tokens, io = raw["architecture"], raw["special_tokens"], raw["io"]
        if raw.get("format_version") != FORMAT_VERSION:
            raise ModelFolderError(
                f"{folder}/llamaonnx.json has format_version {raw.get('format_version')}; "
                f"this runtime reads {FORMAT_VERSION}"
            )
        eos = tuple(tokens["eos_token_ids"])
        pad = tokens.get("pad_token_id")
        return ModelInfo(
            folder=folder,
            n_layers=a["n_layers"],
            n_heads=a["n_heads"],
            n_kv_heads=a["n_kv_heads"],
            head_dim=a["head_dim"],
            vocab_size=a["vocab_size"],
            max_position=a["max_position"],
            target=raw["target"],
            precision=raw["precision"],
            bos_token_id=tokens.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=pad if pad is not None else (eos[0] if eos else 0),
            inputs=tuple(io["inputs"]),
            kv_dtype=raw.get("kv_dtype", "float32"),
            raw=raw,
            custom_ops=tuple(raw.get("custom_ops", ())),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{folder}/llamaonnx.json is malformed: {e!r}") from e
