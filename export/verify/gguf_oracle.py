"""A folder exported from a GGUF file against transformers' own reading of the same file: the
tokenizer's ids and the fp32 logits on the project's eval text (transformers dequantizes the
blocks the same way, so this is the oracle for the weights and the architecture, not for the
quantization). `make gemma` runs it on Gemma 3 270M Q4_K_M.

    python -m export.verify.gguf_oracle MODEL_DIR FILE.gguf [--tolerance 1e-3]

transformers' GGUF reader leaves some settings at its defaults (Gemma's query_pre_attn_scalar and
soft-caps, Qwen3's head_dim, Phi-3's longrope factors), so it is an oracle only for files whose
models use those defaults; Gemma 3 270M does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def compare(folder: Path, gguf: Path) -> dict:
    import torch
    import transformers

    from export.verify.parity import perplexity
    from runtime.session import Session
    from runtime.texts import eval_text
    from runtime.tokenizer import Tokenizer

    text = eval_text()
    theirs = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = theirs.encode(text)
    ours = Tokenizer.from_folder(folder).encode(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    batch = np.array([ids], np.int64)
    with torch.no_grad():
        want = model(torch.from_numpy(batch)).logits.float().numpy()
    session = Session(folder, provider="cpu")
    n = batch.shape[1]
    got = session.forward(batch, np.ones_like(batch), np.arange(n)[None], session.new_cache(1, n))
    return {
        "oracle": f"transformers {transformers.__version__}",
        "tokens": n,
        "same_token_ids": ours == ids,
        "max_abs_logit_delta": float(np.abs(got - want).max()),
        "perplexity": perplexity(got[0], ids),
        "oracle_perplexity": perplexity(want[0], ids),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.verify.gguf_oracle", description=__doc__)
    p.add_argument("folder", type=Path)
    p.add_argument("gguf", type=Path)
    p.add_argument("--tolerance", type=float, default=1e-3)
    a = p.parse_args(argv)
    result = compare(a.folder, a.gguf)
    print(json.dumps(result, indent=1))
    ok = result["same_token_ids"] and result["max_abs_logit_delta"] <= a.tolerance
    print("agrees with transformers" if ok else "DISAGREES with transformers")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
