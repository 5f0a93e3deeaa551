"""What the source loaders share: foreign tensor names → ours, the shape check against the
config, and a source's sha256 (its provenance)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from export.errors import SourceChangedError, SourceError
from export.model.config import LlamaConfig
from runtime.files import sha256_file


def key_mapper(key_map: dict[str, str]):
    """Foreign tensor name → our name, for a map whose keys and values may hold "{i}" (a layer
    index); unknown names map to None."""
    rules = [
        (re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v)
        for k, v in key_map.items()
    ]

    def map_name(name: str) -> str | None:
        for rx, ours in rules:
            m = rx.match(name)
            if m:
                return ours.replace("{i}", m.group(1)) if m.groups() else ours
        return None

    return map_name


def sha256_of(path: Path) -> str:
    """A GGUF file's sha256; for a folder, that of its files' bytes in name order."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(p for p in path.iterdir() if p.is_file()):
        sha256_file(p, h)
    return h.hexdigest()


def check_source(provenance, then: str) -> Path:
    """The source a folder was exported from (its runtime.folder.Provenance), still there and
    unchanged (the sha256 recorded at export), or SourceChangedError saying so and `then`, what
    to do about it."""
    path = Path(provenance.source)
    if not path.exists():
        raise SourceChangedError(
            f"the folder was exported from {path}, which no longer exists; {then}"
        )
    if sha256_of(path) != provenance.sha256:
        raise SourceChangedError(
            f"the folder was exported from {path}, which has changed since (its sha256 differs "
            f"from the one recorded at export); {then}"
        )
    return path


def check_shapes(config: LlamaConfig, state: dict[str, np.ndarray]) -> None:
    dh = config.resolved_head_dim
    expected = {
        "tok_embeddings.weight": (config.vocab_size, config.dim),
        "layers.0.attention.wq.weight": (config.n_heads * dh, config.dim),
        "layers.0.attention.wk.weight": (config.n_kv_heads * dh, config.dim),
        "layers.0.feed_forward.w1.weight": (config.intermediate_size, config.dim),
    }
    for name, shape in expected.items():
        got = state.get(name)
        if got is None:
            raise SourceError(f"tensor {name} is missing from the source")
        if tuple(got.shape) != shape:
            raise SourceError(
                f"tensor {name} has shape {tuple(got.shape)} but the config implies {shape}: "
                "inconsistent head counts or dimensions"
            )
    missing = [
        f"layers.{i}"
        for i in range(config.n_layers)
        if f"layers.{i}.attention.wq.weight" not in state
    ]
    if missing:
        raise SourceError(f"the source lacks weights for {missing[:3]}… ({len(missing)} layers)")
