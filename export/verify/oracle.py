"""The independent oracle: transformers' own forward pass over the source, beside our reference.

`verify` compared the ONNX graph with a reference built from our reading of the source's config;
a misread config (transformers 5's `rope_parameters`, say) then changed both alike and passed.
Where the source is a Hugging Face folder and transformers is installed, the evaluation text's
logits are also computed by transformers from the same folder, and both our reference and the
ONNX graph are compared with them. GGUF sources have no oracle yet (llama.cpp's logits would be
one; the families issue adds it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# fp32 logits of two implementations of the same model differ by float rounding only: on the tiny
# and default models ours and transformers' agree to ~1e-5 (tests/test_weights.py)
ORACLE_TOLERANCE = 1e-3


def oracle_logits(provenance, ids: list[int]) -> tuple[str | None, np.ndarray | None, str]:
    """(oracle name, logits [T, V] of `ids`, why not) — name and logits None where there is
    no oracle for this source, and the reason."""
    if provenance.format != "hf":
        return None, None, f"the source is {provenance.format}, which transformers cannot read here"
    try:
        import torch
        import transformers
    except ImportError:
        return None, None, "transformers is not installed (pip install transformers)"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        Path(provenance.source), torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].numpy()
    return f"transformers {transformers.__version__}", logits, ""
