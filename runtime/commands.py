"""The runtime's subcommands: `generate`, `chat`, `table` and `bench`. They need no torch: an
edge install (`pip install llamaonnx[runtime]`) runs them."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from runtime.cli import float_arg, int_arg, text_arg
from runtime.errors import LlamaonnxError, OptionError


def register(sub) -> None:
    for name, fn, helptext in (
        ("generate", _generate, "stream a reply to one prompt"),
        ("chat", _chat, "interactive multi-turn chat"),
    ):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("model_dir", type=Path)
        if name == "generate":
            g.add_argument("prompt")
            g.add_argument("--raw", action="store_true", help="no chat template: complete the text")
        _add_generation_args(g)
        g.set_defaults(fn=fn)
    t = sub.add_parser(
        "table", help="markdown table of model folders' verification reports (size, quality)"
    )
    t.add_argument("model_dirs", type=Path, nargs="+")
    t.set_defaults(fn=_table)
    _add_bench(sub)


def _table(args) -> int:
    from runtime.quality import quality_table

    print(quality_table(args.model_dirs))
    return 0


def _add_generation_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--max-new-tokens", type=int_arg(1), default=256, help="≥ 1")
    g.add_argument("--temperature", type=float_arg(0, 100), default=0.0, help="0 (greedy) to 100")
    g.add_argument("--top-k", type=int_arg(0), default=0, help="≥ 0 (0: off)")
    g.add_argument("--top-p", type=float_arg(0, 1, lo_open=True), default=1.0, help="(0, 1]")
    g.add_argument("--repetition-penalty", type=float_arg(0, lo_open=True), default=1.0, help="> 0")
    for name in ("presence", "frequency"):
        g.add_argument(
            f"--{name}-penalty", type=float_arg(-2, 2), default=0.0,
            help="-2 to 2 (OpenAI's, on the reply's tokens)",
        )  # fmt: skip
    g.add_argument("--seed", type=int_arg(0, 2**63 - 1), default=None)
    g.add_argument("--provider", default="auto", choices=("cpu", "cuda", "auto"))
    g.add_argument(
        "--threads", type=int_arg(1), default=None, help="1 to 4× the core count (default: all)"
    )
    g.add_argument(
        "--cuda-graph", action="store_true", help="capture decode as a CUDA graph (ort, cuda)"
    )
    g.add_argument(
        "--truncate",
        action="store_true",
        help="keep the prompt's last tokens when it does not fit the context",
    )
    g.add_argument(
        "--skip-checksums",
        action="store_true",
        help="open the folder without comparing its files with their recorded sha256",
    )


def _generation_config(args):
    from runtime.generator import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        truncate=args.truncate,
    )


def _session(args):
    from runtime.session import Session

    return Session(
        args.model_dir,
        provider=args.provider,
        threads=args.threads,
        cuda_graph=args.cuda_graph,
        check_files=not args.skip_checksums,
    )


def _generate(args) -> int:
    from runtime.generator import Generator

    config = _generation_config(args)
    text = text_arg(args.prompt, "the prompt")
    session = _session(args)
    print(
        f"[{args.model_dir}: {session.info.target} {session.info.precision} on {session.provider}]",
        file=sys.stderr,
    )
    gen = Generator(session)
    prompt = text if args.raw else [{"role": "user", "content": text}]
    for piece in gen.stream(prompt, config):
        print(piece, end="", flush=True)
    print()
    print(gen.stats.line(), file=sys.stderr)
    return 0


def _chat(args) -> int:
    from runtime.generator import Generator

    config = _generation_config(args)
    gen = Generator(_session(args))
    # invalid UTF-8 on stdin becomes lone surrogates here, repaired line by line, never a crash
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    history: list[dict] = []
    print("chat — /reset clears the history, Ctrl-C stops a reply, Ctrl-D quits")
    while True:
        try:
            line = text_arg(input("> "), "that line").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        if line == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        try:
            for piece in gen.stream(history, config):
                reply += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except LlamaonnxError as e:  # the history stays; the line that failed is dropped
            print(f"\nerror: {e}", flush=True)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": reply})


# -- bench ---------------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="speed side by side with llama.cpp, onnxruntime-genai, torch")
    b.add_argument("model_dirs", type=Path, nargs="+")
    b.add_argument(
        "--peer",
        action="append",
        default=[],
        choices=("llama.cpp", "genai", "torch"),
        help="add a peer when installed (repeatable): llama.cpp on the source GGUF, "
        "onnxruntime-genai on each ort folder, the PyTorch reference",
    )
    b.add_argument(
        "--genai-dir",
        type=Path,
        action="append",
        default=[],
        help="a folder built by onnxruntime-genai's model builder, run by genai",
    )
    b.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: source)")
    b.add_argument("--prompt-tokens", type=int_arg(1), default=128, help="≥ 1, within the context")
    b.add_argument("--new-tokens", type=int_arg(2), default=128, help="≥ 2 (decode needs two)")
    b.add_argument("--runs", type=int_arg(1, 1000), default=10, help="1-1000")
    b.add_argument("--warmup", type=int_arg(0, 100), default=1, help="0-100")
    b.add_argument("--threads", type=int_arg(1), default=2, help="1 to 4× the core count")
    b.add_argument(
        "--provider",
        default="cpu",
        choices=("cpu", "cuda", "cuda-graph"),
        help="cuda-graph: CUDA with decode captured as a CUDA graph (ort folders)",
    )
    b.add_argument(
        "--kernel-path",
        action="append",
        default=[],
        choices=("portable", "avx2", "avxvnni", "avx512", "amx", "neon"),
        help="run native folders on this kernel path (repeatable; default: the CPU's best)",
    )
    b.add_argument(
        "--llama-lib",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="with --peer llama.cpp, also run it from the libllama built in DIR (another build "
        "of the same llama.cpp, e.g. AVX2 only), labelled LABEL (repeatable)",
    )
    b.add_argument("--profile", action="store_true",
                   help="after the runs: where a step goes per op (ORT's profiler)")  # fmt: skip
    b.add_argument("--sweep", action="store_true",
                   help="decode speed and the prompt's prefill at context 128 to 8192")  # fmt: skip
    b.add_argument(
        "--sweep-runs", type=int_arg(1, 100), default=3, help="runs per sweep context (median)"
    )
    b.add_argument("--skip-checksums", action="store_true", help="open folders unchecked")
    b.add_argument("--json", type=Path, default=None)
    b.add_argument("--png", type=Path, default=None)
    b.add_argument("--markdown", type=Path, default=None, help="a report like docs/benchmarks.md")
    b.set_defaults(fn=_bench)
    from runtime.bench import load

    lo = sub.add_parser(
        "load", help="concurrent clients against OpenAI-compatible servers (serving benchmark)"
    )
    load.main_args(lo)
    lo.set_defaults(fn=_load)


def _load(args) -> int:
    from runtime.bench import load
    from runtime.files import write_atomic

    data = load.run(
        args.targets,
        levels=load.levels_arg(args.clients),
        per_client=args.requests,
        max_tokens=args.max_tokens,
        threads=args.threads,
        api_key=args.api_key,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
        prompt_words=args.prompt_words,
        ramp=args.ramp,
        soak_seconds=args.soak,
        min_steady=args.min_steady,
    )
    from runtime.bench.report import machine_chart, merged_report

    png = None
    if args.png and not args.soak:
        if args.markdown:  # one chart per machine, beside its section
            args.png = machine_chart(args.png, data["machine"])
        args.png.parent.mkdir(parents=True, exist_ok=True)
        load.chart(data, args.png)
        if args.markdown:
            png = os.path.relpath(args.png.absolute(), args.markdown.absolute().parent)
    text = load.markdown(data, "llamaonnx " + shlex.join(args.argv), png)
    print(text)
    if args.markdown and not args.soak:
        text = merged_report(args.markdown, text, load.HEADER)
    for path, body in ((args.json, json.dumps(data, indent=2) + "\n"), (args.markdown, text)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, body)
    if args.soak:
        failed = sum(t["soak"]["failed"] + t["soak"]["garbled"] for t in data["targets"])
    else:
        failed = sum(r["errors"] for t in data["targets"] for r in t["levels"])
    return 0 if not failed else 1


def _label_dir(text: str, option: str) -> tuple[str, Path]:
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise OptionError(f"{option} {text!r}: write LABEL=DIR, e.g. avx2=build/llama-avx2/bin")
    return label, Path(folder)


def _bench(args) -> int:
    from runtime.bench import SWEEP, PeerError, bench, chart, report_markdown, table
    from runtime.files import write_atomic

    data = bench(
        args.model_dirs,
        peers=args.peer,
        genai_dirs=args.genai_dir,
        gguf=args.gguf,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        provider=args.provider,
        sweep=SWEEP if args.sweep else (),
        sweep_runs=args.sweep_runs,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
        check_files=not args.skip_checksums,
        kernel_paths=tuple(args.kernel_path),
        llama_libs=dict(_label_dir(x, "--llama-lib") for x in args.llama_lib),
        profile=args.profile,
    )
    print(table(data))
    outputs = []
    if args.json:
        outputs.append((args.json, json.dumps(data, indent=2) + "\n"))
    from runtime.bench.report import machine_chart, merged_report

    if args.png and args.markdown:  # one chart per machine, beside its section
        args.png = machine_chart(args.png, data["machine"])
    if args.markdown:
        png = None
        if args.png:
            png = os.path.relpath(args.png.absolute(), args.markdown.absolute().parent)
        command = "llamaonnx " + shlex.join(args.argv)
        outputs.append(
            (args.markdown, merged_report(args.markdown, report_markdown(data, command, png)))
        )
    for path, text in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
        print(f"wrote {path}", file=sys.stderr)
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        chart(data, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    failed = [r for r in data["results"] if r.get("error")]
    if failed:  # after the table and files: what did run is kept, and the exit says what did not
        raise PeerError(
            "; ".join(f"{r['name']} could not run: {r['error']}" for r in failed)
            + ". Install the peer (make bench) or leave its --peer / --genai-dir out"
        )
    return 0
