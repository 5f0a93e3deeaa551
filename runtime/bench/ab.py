"""Two or more builds of llamaonnx's kernel library on one model folder, or two or more folders
of one model on the installed library, in one process, interleaved: how a kernel change is
measured before it is kept (README, "Speed"), and what a quantization choice costs
(`--precise`: docs/quantization.md).

    python -m runtime.bench.ab FOLDER --lib old=/tmp/old.so --lib new=runtime/native/_q4ops...so
        [--prompt-tokens 130,4096] [--new-tokens 128] [--rounds 12] [--threads 2] [--rows 8]
        [--json F]
    python -m runtime.bench.ab FOLDER FOLDER... [same options, no --lib]

Each library (or folder) gets its own session; every round runs each once on the same greedy
prompt, the order reversed every other round, and the first round is a warm-up. Per prompt
length: the median decode and prefill tok/s of each, the median and quartiles of the per-round
ratio to the first (pairs taken minutes apart drift together, so the pair ratio is steadier
than the ratio of medians), and whether each gave the first one's tokens (folders quantized
differently need not). This VM drifts 10–30 % within minutes: read a ratio with its quartiles,
never one round.

The library loaded first copies its weights into huge pages first (runtime/native/weights.c),
and measured a few per cent ahead of the same build loaded second; `--swap` loads them in the
reverse order (the report still lists them as given), so a result can be checked both ways.

Each library runs its kernels' loops on threads of its own (runtime/native/pool.c), which sleep
3 ms after that library's last node, so they barely overlap the other library's runs. A build
from before pool.c, or LLAMAONNX_POOL=0, leaves them to onnxruntime's threads, which spin on
into the other session's run: against them a pooled build's prefill read 0.85–0.93 in one
process and level in separate processes (2026-12-04, docs/speed.md), so compare such builds in
separate processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def parse_libs(items: list[str]) -> dict[str, Path]:
    libs: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lib {item!r}: expected NAME=PATH")
        if name in libs:
            raise ValueError(f"--lib {name!r} is given twice")
        if not Path(path).is_file():
            raise ValueError(f"--lib {name}={path}: no such file")
        libs[name] = Path(path)
    if len(libs) < 2:
        raise ValueError("give at least two --lib NAME=PATH to compare")
    return libs


def parse_engines(folders: list[Path], libs: list[str]) -> dict[str, tuple[Path, Path | None]]:
    """What to compare, by name: one folder's kernel libraries (`--lib NAME=PATH`, at least two),
    or two or more folders (named by their last path part) on the installed library."""
    if len(folders) == 1:
        return {name: (folders[0], path) for name, path in parse_libs(libs).items()}
    if libs:
        raise ValueError("give one folder with several --lib, or several folders without --lib")
    engines: dict[str, tuple[Path, Path | None]] = {}
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such folder")
        name = folder.name or str(folder)
        if name in engines:
            raise ValueError(f"{folder}: two folders named {name!r}; give distinct names")
        engines[name] = (folder, None)
    return engines


def compare(
    engines: dict[str, tuple[Path, Path | None]],
    prompt_tokens: list[int],
    new_tokens: int,
    rounds: int,
    threads: int | None,
    swap: bool = False,
    progress=lambda message: None,
    rows: int = 1,
) -> dict:
    from runtime.generator import GenerationConfig, Generator
    from runtime.session import Session

    if rounds < 2:
        raise ValueError("--rounds: at least 2 (the first is a warm-up)")
    names = list(engines)
    gens = {}
    for name in reversed(names) if swap else names:
        folder, lib = engines[name]
        gens[name] = Generator(Session(folder, threads=threads, kernel_library=lib))
    vocab = gens[names[0]].session.info.vocab_size
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0, stop_token_ids=())
    report = {"engines": {k: {"folder": str(f.resolve()),
                              "library": str(lib.resolve()) if lib else "installed"}
                          for k, (f, lib) in engines.items()},
              "new_tokens": new_tokens, "rounds": rounds, "swap": swap, "rows": rows,
              "lengths": []}  # fmt: skip
    for n in prompt_tokens:
        rng = np.random.default_rng(n)
        prompt = [int(t) for t in rng.integers(min(100, vocab - 1), vocab, n)]
        decode = {k: [] for k in names}
        prefill = {k: [] for k in names}
        tokens: dict[str, list[int]] = {}
        for r in range(rounds):
            for name in names if r % 2 else names[::-1]:
                out = gens[name].generate_ids([prompt] * rows, cfg)
                tokens[name] = [int(t) for t in np.asarray(out).ravel()]
                stats = gens[name].stats
                if r:  # the first round warms both up
                    decode[name].append(stats.decode_tokens_per_second)
                    prefill[name].append(n * rows / stats.time_to_first_token)
            progress(f"{n} tokens: round {r + 1}/{rounds}")
        base = names[0]
        row = {"prompt_tokens": n, "engines": {}}
        for name in names:
            ratio = np.array(decode[name]) / np.array(decode[base])
            pre = np.array(prefill[name]) / np.array(prefill[base])
            row["engines"][name] = {
                "decode_tokens_per_second": float(np.median(decode[name])),
                "prefill_tokens_per_second": float(np.median(prefill[name])),
                "decode_ratio": float(np.median(ratio)),
                "decode_ratio_quartiles": [float(x) for x in np.percentile(ratio, [25, 75])],
                "prefill_ratio": float(np.median(pre)),
                "prefill_ratio_quartiles": [float(x) for x in np.percentile(pre, [25, 75])],
                "same_tokens": tokens[name] == tokens[base],
            }
        report["lengths"].append(row)
    return report


def markdown(report: dict) -> str:
    engines = report["engines"]
    names = list(engines)
    folders = sorted({e["folder"] for e in engines.values()})
    on = (folders[0] if len(folders) == 1
          else ", ".join(f"`{k}` {e['folder']}" for k, e in engines.items()))  # fmt: skip
    lines = [
        f"A/B on {on}: {report['rounds'] - 1} interleaved rounds (after a "
        f"warm-up), {report.get('rows', 1)} row(s) of the prompt decoded together (tok/s of "
        f"all rows), {report['new_tokens']} new tokens; ratios to `{names[0]}`, median "
        "(quartiles) of the per-round ratios.",
        "",
        f"| prompt tokens | {'library' if len(folders) == 1 else 'folder'} | decode tok/s "
        "| decode ratio | prefill tok/s | prefill ratio "
        "| same tokens |",
        "|---:|---|---:|---|---:|---|---|",
    ]
    for row in report["lengths"]:
        for name, e in row["engines"].items():
            dq, pq = e["decode_ratio_quartiles"], e["prefill_ratio_quartiles"]
            lines.append(
                f"| {row['prompt_tokens']} | {name} | {e['decode_tokens_per_second']:.1f} | "
                f"{e['decode_ratio']:.3f} ({dq[0]:.3f}–{dq[1]:.3f}) | "
                f"{e['prefill_tokens_per_second']:.0f} | "
                f"{e['prefill_ratio']:.3f} ({pq[0]:.3f}–{pq[1]:.3f}) | "
                f"{'yes' if e['same_tokens'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.bench.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("folder", type=Path, nargs="+")
    p.add_argument("--lib", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--prompt-tokens", default="130")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--swap", action="store_true", help="load them in reverse order")
    p.add_argument(
        "--rows",
        type=int,
        default=1,
        help="decode this many copies of the prompt together (the engine's batches)",
    )
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    try:
        engines = parse_engines(a.folder, a.lib)
        lengths = [int(x) for x in a.prompt_tokens.split(",") if x]
        if not lengths or min(lengths) < 1:
            raise ValueError(f"--prompt-tokens {a.prompt_tokens!r}: positive integers, a,b,…")
        if a.rows < 1:
            raise ValueError(f"--rows: at least 1, got {a.rows}")
    except ValueError as e:
        p.error(str(e))
    report = compare(engines, lengths, a.new_tokens, a.rounds, a.threads, a.swap,
                     progress=lambda m: print(m, file=sys.stderr, flush=True),
                     rows=a.rows)  # fmt: skip
    print(markdown(report))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
