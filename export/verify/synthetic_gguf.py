"""A Llama-shaped GGUF of seeded random weights, for measuring speed on shapes the shipped model
does not have. SmolLM2-135M is 576 wide: no width of it but the MLP's 1536 is a multiple of 256,
so llama.cpp's Q4_K_M keeps K-quants only in its down projections (the rest fall back to Q5_0
and Q8_0). Most models users download (Llama 3.2 1B, Qwen2.5 1.5B, Mistral 7B: 2048, 1536,
4096 wide) are K-quants nearly throughout. This writes such a shape in F16, with the default
model's tokenizer and chat template (so every tool reads it as a model), and llama.cpp's own
quantizer (`gguf_quality.make_file`, the `bench` extra) makes the Q4_K_M users would download.
The weights are noise: a figure of speed, never of quality.

    python -m export.verify.synthetic_gguf OUT.gguf [--hidden 1024] [--ffn 2816] [--layers 16]
        [--heads 16] [--kv-heads 4] [--seed 0] [--as Q4_K_M] [--force]

(`--as`: also write OUT's name with that type's suffix, e.g. OUT-Q4_K_M.gguf, through llama.cpp;
an existing file is replaced only with `--force`.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# the source's keys that describe the shape: written from the arguments instead
SHAPE_KEYS = (
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.block_count",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.dimension_count",
)
# the writer's own, or the source's that no longer hold
SKIPPED = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture",
           "general.file_type"}  # fmt: skip


def _check(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int) -> None:
    sizes = {"hidden": hidden, "ffn": ffn, "layers": layers, "heads": heads, "kv_heads": kv_heads}
    problems = [f"{name} must be ≥ 1 (got {v})" for name, v in sizes.items() if v < 1]
    if not problems and (hidden % heads or heads % kv_heads or (hidden // heads) % 2):
        problems.append(
            f"hidden ({hidden}) must be a multiple of heads ({heads}) with an even head size, "
            f"and heads a multiple of kv_heads ({kv_heads})"
        )
    if not problems and (hidden % 32 or ffn % 32):
        problems.append(f"hidden ({hidden}) and ffn ({ffn}) must be multiples of 32 (a block)")
    if problems:
        raise ValueError("; ".join(problems))


def write(out: Path, hidden: int = 1024, ffn: int = 2816, layers: int = 16, heads: int = 16,
          kv_heads: int = 4, seed: int = 0, source: Path | None = None) -> Path:  # fmt: skip
    """A `llama` GGUF at `out` (F16 matrices, F32 norms of ones; embeddings tied), its metadata
    and tokenizer copied from `source` (default: the shipped SmolLM2 file) but for the shape.
    Written to a temporary name first: `out` is never left half-written."""
    import gguf

    from export.sources import default_gguf_path

    _check(hidden, ffn, layers, heads, kv_heads)
    src = gguf.GGUFReader(str(source or default_gguf_path()))
    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    for f in src.fields.values():  # each value with its own type (arrays: their elements')
        if f.name not in SKIPPED and f.name not in SHAPE_KEYS:
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    head = hidden // heads
    for key, value in zip(SHAPE_KEYS, (hidden, ffn, layers, heads, kv_heads, head), strict=True):
        w.add_uint32(key, value)
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(seed)

    def matrix(name: str, rows: int, cols: int) -> None:
        # std 0.02, as initialisers use: activations stay finite through every layer
        x = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
        w.add_tensor(name, x.astype(np.float16))

    matrix("token_embd.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        matrix(p + "attn_q.weight", hidden, hidden)
        matrix(p + "attn_k.weight", kv_heads * head, hidden)
        matrix(p + "attn_v.weight", kv_heads * head, hidden)
        matrix(p + "attn_output.weight", hidden, hidden)
        matrix(p + "ffn_gate.weight", ffn, hidden)
        matrix(p + "ffn_up.weight", ffn, hidden)
        matrix(p + "ffn_down.weight", hidden, ffn)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--as", dest="as_type", help="also quantize with llama.cpp (e.g. Q4_K_M)")
    ap.add_argument("--force", action="store_true", help="replace existing output files")
    args = ap.parse_args(argv)
    from export.verify.gguf_quality import FILE_TYPES, make_file

    if args.as_type and args.as_type not in FILE_TYPES:
        ap.error(f"--as {args.as_type}: one of {', '.join(FILE_TYPES)}")
    target = args.out.with_name(f"{args.out.stem}-{args.as_type}.gguf") if args.as_type else None
    for path in (args.out, target):
        if path is not None and path.exists() and not (args.force and path.is_file()):
            ap.error(f"{path} exists (--force replaces a file)")
    try:
        write(args.out, args.hidden, args.ffn, args.layers, args.heads, args.kv_heads, args.seed)
    except ValueError as e:
        ap.error(str(e))
    print(f"wrote {args.out}")
    if target is not None:
        target.unlink(missing_ok=True)  # (make_file keeps an existing file; --force said so)
        try:
            print(f"wrote {make_file(args.out, target, args.as_type)}")
        except ImportError:
            ap.error("--as needs llama-cpp-python, the `bench` extra (make bench installs it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
