"""What the int8 rounding of activations costs, projection by projection: a folder on llamaonnx's
kernels run with two-digit activations (`digits` 2, `quantize --precise`) on one set of its
projections at a time — each layer, each kind of projection, the LM head — scored by its mean KL
from a reference folder on the three texts (prose, chat, code; one forward over each text's first
1024 tokens, as `verify` does). Against the fp32 folder of the same GGUF blocks, whatever KL a
set removes is what int8 activations cost there: where two digits pay. `make quality` writes
docs/activation_cost.md.

    python -m export.verify.activation_cost QUANT_DIR REFERENCE_DIR [--out FILE.md]
        [--set PATTERN[,PATTERN...] ...]

Each set runs from a copy of the graph in a scratch folder beside QUANT_DIR that links its
weights file (onnxruntime reads external data only from inside a model's folder), removed after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


def default_sets(layers: int) -> list[str]:
    """One digit everywhere, each layer alone, each kind of projection, the last layer with the
    head, that with every q/k/v projection (whole, or on each row's 4 blocks of largest scale
    with the head's 4), each row's 1 or 2 blocks of largest scale everywhere (with the whole
    head, or the whole last layer), and everything."""
    final = f"layers.{layers - 1}.*"
    last = f"{final},output"
    kinds = [f"layers.*.{k}" for k in ("attention.qkv", "attention.wo", "feed_forward.w13",
                                       "feed_forward.w2")]  # fmt: skip
    return ["none", *(f"layers.{i}.*" for i in range(layers)), *kinds, "output", last,
            f"layers.*.attention.qkv,{last}", f"layers.*.attention.qkv=4,{final},output=4",
            "*=1", "*=2", "*=2,output", f"*=2,{final}", "*"]  # fmt: skip


def extra_work(graph) -> float:
    """The second digit's dot products in a decode step, as a fraction of the first's: each
    two-digit node's N·K (its B is [N/16, K/32, tile]), times B/nb where it has `blocks` B (the
    x86 kernels add only those blocks' products; a prompt's rows in groups of 4 add the union of
    theirs, so a prefill pays more), over every kernel node's N·K. Machine-independent, unlike
    the speed it costs."""
    from export.quant.native import DOMAIN, MATMULS

    dims = {t.name: list(t.dims) for t in graph.initializer}
    one = two = 0.0
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type not in MATMULS:
            continue
        n16, nb = dims[node.input[1]][:2]
        attrs = {a.name: a.i for a in node.attribute}
        one += n16 * nb
        if attrs.get("digits", 1) == 2:
            two += n16 * nb * (min(attrs.get("blocks", 0), nb) / nb if attrs.get("blocks") else 1)
    return two / one if one else 0.0


def _scratch(folder: Path) -> Path:
    """A folder beside `folder` with links to all its files but model.onnx."""
    scratch = Path(tempfile.mkdtemp(prefix=".activation-cost-", dir=folder.parent))
    for f in folder.iterdir():
        if f.name == "model.onnx":
            continue
        try:
            os.link(f, scratch / f.name)
        except OSError:  # another file system: a copy
            shutil.copy2(f, scratch / f.name)
    return scratch


def measure(quant_dir: Path, reference_dir: Path, sets: list[str], progress=print) -> list[dict]:
    """One row per set: its patterns, projections marked, KL and perplexity ratio per text."""
    import onnx

    from export.quant.native import two_digits
    from export.quant.settings import from_last
    from export.verify.parity import mean_kl, perplexity
    from runtime.session import Session
    from runtime.texts import eval_texts

    ref = Session(reference_dir, check_files=False)
    size = min(1024, ref.info.max_position)
    texts = {k: ref.tokenizer.encode(t)[:size] for k, t in eval_texts().items()}

    def logits(session, ids):
        a = np.array([ids], np.int64)
        cache = session.new_cache(1, len(ids))
        return session.forward(a, np.ones_like(a), np.arange(len(ids))[None], cache)[0]

    want = {k: logits(ref, ids).astype(np.float64) for k, ids in texts.items()}
    base = onnx.load(str(quant_dir / "model.onnx"), load_external_data=False)
    scratch = _scratch(quant_dir)
    rows = []
    try:
        for spec in sets:
            model = onnx.ModelProto()
            model.CopyFrom(base)
            patterns = tuple(from_last(p, ref.info.n_layers, "--set") for p in spec.split(","))
            marked = [] if spec == "none" else two_digits(model.graph, patterns)
            onnx.save(model, str(scratch / "model.onnx"))
            session = Session(scratch, check_files=False)
            got = {k: logits(session, ids).astype(np.float64) for k, ids in texts.items()}
            row = {
                "set": spec,
                "projections": len(marked),
                "extra": extra_work(model.graph),
                "kl": {k: mean_kl(want[k], got[k]) for k in texts},
                "ratio": {
                    k: perplexity(got[k], ids) / perplexity(want[k], ids)
                    for k, ids in texts.items()
                },  # fmt: skip
            }
            rows.append(row)
            progress(f"{spec}: mean KL {np.mean(list(row['kl'].values())):.3e}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def markdown(rows: list[dict]) -> str:
    one = np.mean(list(rows[0]["kl"].values())) if rows and rows[0]["set"] == "none" else None
    out = [
        "| two-digit activations on | projections | second digit's dot products (decode) "
        "| mean KL (prose / chat / code) | mean | of one digit's KL removed "
        "| perplexity ratio (prose / chat / code) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mean = np.mean(list(r["kl"].values()))
        removed = f"{(1 - mean / one) * 100:.0f} %" if one else ""
        out.append(
            f"| `{r['set']}` | {r['projections']} | {r['extra'] * 100:.1f} % | "
            + " / ".join(f"{v:.2e}" for v in r["kl"].values())
            + f" | {mean:.2e} | {removed} | "
            + " / ".join(f"{v:.4f}" for v in r["ratio"].values())
            + " |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    from runtime.folder import read_model_folder

    p = argparse.ArgumentParser(prog="python -m export.verify.activation_cost", description=__doc__)
    p.add_argument("quant_dir", type=Path)
    p.add_argument("reference_dir", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--set",
        action="append",
        dest="sets",
        metavar="PATTERNS",
        help="comma-separated projection patterns (as quantize --precise's, layers.-1 the last "
        "layer; 'none': one digit everywhere; repeatable; default: none, each layer, each kind, "
        "the head, ...)",
    )
    args = p.parse_args(argv)
    layers = read_model_folder(args.quant_dir).n_layers
    rows = measure(args.quant_dir, args.reference_dir, args.sets or default_sets(layers))
    text = markdown(rows)
    if args.out:
        args.out.write_text(
            f"What int8 activations cost in `{args.quant_dir.name}` against "
            f"`{args.reference_dir.name}` (`python -m export.verify.activation_cost`):\n\n" + text
        )
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
