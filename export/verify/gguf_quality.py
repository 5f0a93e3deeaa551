"""GGUF files as users download them (Q4_0 … Q6_K, Q4_K_M), each run three ways on the same
token ids: our fp32 folder of the file (the reference: the file's own dequantized weights), our
quantized folder with the file's blocks carried, and llama.cpp on the file itself (through
llama-cpp-python, the `bench` extra). Scored on the project's three texts (prose, chat, code)
and a second, longer text of each kind: perplexity, its ratio to the fp32 reference, mean KL
from the reference (ours and llama.cpp's: which of the two stays closer to the model the file
holds), and the ratio of our perplexity to llama.cpp's with its standard error, per text and
over all six (~6,300 tokens: two engines' roundings move a ratio by chance, ~0.25 % on the
first three texts alone, so "within 0.3 % of llama.cpp" needs the longer sample to mean
anything). `make quality` runs it and writes docs/gguf_quality.md.

    python -m export.verify.gguf_quality [--models models] [--out docs/gguf_quality.md]
        [--types Q4_0,Q4_1,...] [--extra NAME=FILE.gguf:PRECISION ...] [--append]

Files other than the shipped Q4_1 are made with llama.cpp's own quantizer
(`llama_model_quantize`, allow_requantize: it dequantizes the shipped Q4_1 blocks to fp32, the
reference weights, and quantizes those). llama.cpp's logits come from one batch of all the ids
with every position's logits kept, the same teacher forcing as ours (llama-perplexity scores only
the second half of each window, so its figure would not be on the same tokens); a text longer
than WINDOW tokens is cut into equal windows, each scored from an empty cache by all three and
each starting with the tokens the tokenizer puts before a text (Gemma's BOS).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

# llama.cpp file type → the precision our folder is quantized at: the 4-bit mixes at int4
# (their 5- and 6-bit tensors carried in tiles of their own), files whose tensors are 6 or 8
# bits at int8 (int4 would round their Q8_0 tensors to 4 bits)
FILE_TYPES = {
    "Q4_0": (2, "int4"),
    "Q4_1": (3, "int4"),
    "Q8_0": (7, "int8"),
    "Q4_K_M": (15, "int4"),
    "Q5_K_M": (17, "int4"),
    "Q6_K": (18, "int8"),
}


def make_file(source: Path, out: Path, type_name: str) -> Path:
    """llama.cpp's quantizer: `source` → `out` as `type_name` (skipped when `out` exists)."""
    if out.exists():
        return out
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[type_name][0]
    params.allow_requantize = True
    params.nthread = 2
    out.parent.mkdir(parents=True, exist_ok=True)  # llama.cpp says only "iostream error" without it
    tmp = out.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {type_name}")
    tmp.rename(out)
    return out


def folder_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from runtime.session import Session

    session = Session(folder, provider="cpu")
    batch = np.array([ids], np.int64)
    n = len(ids)
    cache = session.new_cache(1, n)
    return session.forward(batch, np.ones_like(batch), np.arange(n)[None], cache)[0]


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=1024,
        n_batch=1024,
        n_ubatch=1024,
        n_threads=2,
        logits_all=True,
        verbose=False,
    )
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], np.float32)
    llm.close()
    return out


def tensor_types(path: Path) -> dict[str, int]:
    """How many weight tensors (2-D) the file holds of each type."""
    import collections

    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(
        collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    )


def score(name: str, path: Path, precision: str, models: Path, progress) -> dict:
    from export.pipeline import export_model
    from export.quant import QuantSettings, quantize_folder
    from export.verify.parity import mean_kl, nll_perplexity, paired_log_ratio, token_nll
    from runtime.texts import eval_texts, more_texts
    from runtime.tokenizer import Tokenizer

    fp32 = models / f"{name}-fp32"
    quant = models / f"{name}-{precision}"
    t = time.perf_counter()
    # (not verified again here: this table is the check, against the fp32 folder and llama.cpp;
    # `llamaonnx verify` runs the full one on any of these folders). Both folders are made anew
    # every run: one left by an older build may hold tiles of a layout this library reads
    # differently (a 424-byte Q6_K tile from before its crumbs scored a perplexity of 10⁷ here)
    export_model(path, fp32, target="ort", force=True, verify=False, progress=progress)
    quantize_folder(fp32, quant, QuantSettings(precision), force=True, verify=False,
                    progress=progress)  # fmt: skip
    info = json.loads((quant / "llamaonnx.json").read_text())["quantization"]
    tok = Tokenizer.from_folder(fp32)
    row = {
        "file": path.name,
        "tensor_types": tensor_types(path),
        "precision": precision,
        "kernel": info.get("kernel"),
        "origins": info.get("origins"),
        "requantized_gguf_tensors": info.get("requantized_gguf_tensors"),
        "texts": {},
    }
    nll: dict[str, list[np.ndarray]] = {"ref": [], "ours": [], "cpp": []}
    for kind, text in {**eval_texts(), **more_texts()}.items():
        ids = tok.encode(text)
        cut = windows(ids, tok.encode(""))
        per: dict[str, list[np.ndarray]] = {"ref": [], "ours": [], "cpp": []}
        kls: list[np.ndarray] = []
        for w in cut:
            ref, ours = folder_logits(fp32, w), folder_logits(quant, w)
            theirs = llama_cpp_logits(path, w)
            for key, logits in zip(per, (ref, ours, theirs), strict=True):
                per[key].append(token_nll(logits, w))
            kls.append(np.array([mean_kl(ref[:-1], x[:-1]) * (len(w) - 1) for x in (ours, theirs)]))
        text_nll = {k: np.concatenate(v) for k, v in per.items()}
        for key in nll:
            nll[key].append(text_nll[key])
        p_ref, p_ours, p_cpp = (nll_perplexity(text_nll[k]) for k in ("ref", "ours", "cpp"))
        kl, kl_cpp = (float(x) for x in sum(kls) / len(text_nll["ref"]))
        _, se = paired_log_ratio(text_nll["ours"], text_nll["cpp"])
        row["texts"][kind] = {
            "tokens": len(ids),
            "windows": len(cut),
            "reference_perplexity": p_ref,
            "perplexity": p_ours,
            "llama_cpp_perplexity": p_cpp,
            "ratio_to_reference": p_ours / p_ref,
            "ratio_to_llama_cpp": p_ours / p_cpp,
            "llama_cpp_ratio_to_reference": p_cpp / p_ref,
            "kl_divergence": kl,
            "llama_cpp_kl_divergence": kl_cpp,
            "ratio_to_llama_cpp_se": se,
        }
    row["pooled"] = pooled({k: np.concatenate(v) for k, v in nll.items()})
    progress(f"{name}: scored ({time.perf_counter() - t:.0f}s)")
    return row


# the longest run of tokens scored at once: longer texts are cut into windows of this many, each
# scored from an empty cache by all three (the logits of a window of Gemma's 262k vocabulary
# are 1 GB in float32)
WINDOW = 1024


def windows(ids: list[int], lead: list[int] = ()) -> list[list[int]]:
    """ids in the fewest consecutive windows of at most WINDOW tokens, of equal lengths to a
    token (each scored on its own, so none is left with a token or two). `lead`: the special
    tokens the tokenizer puts before a text (Gemma's BOS), which ids start with: every later
    window starts with them too, as the model expects a sequence to (without its BOS Gemma
    scores the same tokens far worse, and a quantized copy departs further from it)."""
    lead = list(lead)
    assert ids[: len(lead)] == lead, "ids do not start with the tokenizer's lead tokens"
    body, room = ids[len(lead) :], WINDOW - len(lead)
    n = max(1, -(-len(body) // room))
    cuts = [len(body) * i // n for i in range(n + 1)]
    return [lead + body[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def pooled(nll: dict[str, np.ndarray]) -> dict:
    """Every text's scored tokens as one sample: each perplexity ratio and its standard error
    (relative: that of the ratio's log), from the per-token NLLs of the reference (`ref`), ours
    and llama.cpp (`cpp`) on the same tokens."""
    from export.verify.parity import paired_log_ratio

    out: dict = {"tokens": len(nll["ref"])}
    for name, a, b in (
        ("ratio_to_reference", "ours", "ref"),
        ("llama_cpp_ratio_to_reference", "cpp", "ref"),
        ("ratio_to_llama_cpp", "ours", "cpp"),
    ):
        log, se = paired_log_ratio(nll[a], nll[b])
        out[name], out[f"{name}_se"] = math.exp(log), se
    return out


# the goal: ours within 0.3 % of llama.cpp's perplexity on the same file
GOAL = 0.003


def verdict(ratio: float, se: float) -> str:
    """Whether a ratio of ours to llama.cpp meets the goal and, if not, whether these tokens
    can tell it from chance (more than two standard errors from 1)."""
    if abs(ratio - 1) <= GOAL:
        return "within 0.3 %"
    side = "ours better" if ratio < 1 else "ours worse"
    z = abs(math.log(ratio)) / se
    return f"{side} by {100 * abs(ratio - 1):.2f} %, {z:.2f} s.e." + (" (chance)" if z < 2 else "")


def markdown(rows: list[dict], cpu: str) -> str:
    """The table; `cpu` names the machine of rows that do not record their own."""
    where: dict[str, list[str]] = {}
    for r in rows:
        where.setdefault(r.get("cpu") or cpu, []).append(r["file"])
    if len(where) == 1:
        machines = f"CPU: {next(iter(where))}."
    else:
        machines = "CPUs: " + "; ".join(f"{c} ({', '.join(f)})" for c, f in where.items()) + "."
    lines = [
        "# GGUF files: our carried blocks beside llama.cpp on the same file",
        "",
        "Generated by `make quality` (`python -m export.verify.gguf_quality`). Reference: our fp32",
        "folder of the same file (its dequantized weights). Ours: the quantized folder with the",
        "file's blocks carried, on onnxruntime's CPU provider (`native`: llamaonnx's kernels, with",
        "MatMulNBits for the blocks their tiles do not hold; `nbits`: MatMulNBits; both with int8",
        "activations). llama.cpp: llama-cpp-python on the file, same token ids, every position's",
        f"logits. {machines} KL: mean KL divergence from the reference's next-token",
        "distribution, nats (perplexity ratios move up and down by chance; KL only grows with the",
        "error).",
        "",
        "± s.e.: the standard error of ours ÷ llama.cpp (relative), from the per-token differences",
        "of log-likelihood on the same tokens: how far the ratio would move on another text of the",
        "same kind and length.",
        "",
        "| file | tensors | ours | text | tokens | reference ppl | ours ppl | ×ref | KL | "
        "llama.cpp ppl | llama.cpp ×ref | llama.cpp KL | ours ÷ llama.cpp | ± s.e. |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        types = ", ".join(f"{n}× {t}" for t, n in sorted(r["tensor_types"].items()))
        for kind, s in r["texts"].items():
            kl = s.get("llama_cpp_kl_divergence")  # rows from before it was measured: none
            cpp_kl = "—" if kl is None else f"{kl:.1e}"
            lines.append(
                f"| {r['file']} | {types} | {r['precision']} {r.get('kernel') or ''} | {kind} | "
                f"{s['tokens']} | "
                f"{s['reference_perplexity']:.3f} | {s['perplexity']:.3f} | "
                f"{s['ratio_to_reference']:.4f} | {s['kl_divergence']:.1e} | "
                f"{s['llama_cpp_perplexity']:.3f} | {s['llama_cpp_ratio_to_reference']:.4f} | "
                f"{cpp_kl} | {s['ratio_to_llama_cpp']:.4f} | "
                f"{_se(s.get('ratio_to_llama_cpp_se'))} |"
            )
            types = ""
    summary = [r for r in rows if "pooled" in r]
    if summary:
        lines += [
            "",
            "## All texts pooled",
            "",
            "Each file's tokens of every text above as one sample (ratios of perplexity on all of",
            "them; ± one standard error, relative). The goal: ours within 0.3 % of llama.cpp; a",
            "miss is marked chance when it is within two standard errors of 1.",
            "",
            "| file | tokens | ours ×ref | llama.cpp ×ref | ours ÷ llama.cpp | against the goal |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in summary:
            q = r["pooled"]
            lines.append(
                f"| {r['file']} | {q['tokens']} | "
                f"{q['ratio_to_reference']:.4f} ± {_se(q['ratio_to_reference_se'])} | "
                f"{q['llama_cpp_ratio_to_reference']:.4f} ± "
                f"{_se(q['llama_cpp_ratio_to_reference_se'])} | "
                f"{q['ratio_to_llama_cpp']:.4f} ± {_se(q['ratio_to_llama_cpp_se'])} | "
                f"{verdict(q['ratio_to_llama_cpp'], q['ratio_to_llama_cpp_se'])} |"
            )
    return "\n".join(lines) + "\n"


def _se(se: float | None) -> str:
    return "—" if se is None else f"{100 * se:.2f} %"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.verify.gguf_quality", description=__doc__)
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--out", type=Path, default=Path("docs/gguf_quality.md"))
    p.add_argument("--types", default=",".join(FILE_TYPES))
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        help="NAME=FILE.gguf:PRECISION, another file to score (e.g. Gemma 3's Q4_K_M)",
    )
    p.add_argument("--append", action="store_true", help="keep the rows of other files")
    a = p.parse_args(argv)
    from export.sources import default_gguf_path
    from runtime.bench.harness import machine
    from runtime.bench.report import cpu_key

    a.models.mkdir(parents=True, exist_ok=True)
    shipped = default_gguf_path()
    jobs = []
    for type_name in filter(None, a.types.split(",")):
        if type_name not in FILE_TYPES:
            p.error(f"--types: {type_name!r} is not one of {', '.join(FILE_TYPES)}")
        name = f"smollm2-135m-{type_name.lower()}"
        if type_name == "Q4_1":
            path = shipped
        else:
            path = make_file(shipped, a.models / f"{name}.gguf", type_name)
        jobs.append((name, path, FILE_TYPES[type_name][1]))
    for extra in a.extra:
        name, rest = extra.split("=", 1)
        file, precision = rest.rsplit(":", 1)
        jobs.append((name, Path(file), precision))
    rows = [score(n, f, prec, a.models, lambda m: print(m, flush=True)) for n, f, prec in jobs]
    cpu = cpu_key(machine())  # the model, family and vector extension: a VM's name hides them
    for r in rows:
        r["cpu"] = cpu
    if a.append and a.out.with_suffix(".json").is_file():  # earlier rows of other files stay
        done = {r["file"] for r in rows}
        old = json.loads(a.out.with_suffix(".json").read_text())
        rows = [r for r in old if r["file"] not in done] + rows
    a.out.write_text(markdown(rows, cpu))
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(a.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
