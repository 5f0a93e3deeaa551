"""The `llamaonnx` command. Subcommands import what they need when they run, so `generate` and
`chat` start fast and work on an edge install without torch (only `runtime` is imported)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import traceback
from pathlib import Path

from runtime import options
from runtime.errors import LlamaonnxError, Terminated
from runtime.files import signals_raise

log = logging.getLogger("llamaonnx")


def _int(lo: int | None = None, hi: int | None = None):
    return options.argparse_type(options.integer, lo, hi)


def _float(lo=None, hi=None, lo_open=False, hi_open=False):
    return options.argparse_type(options.number, lo, hi, lo_open=lo_open, hi_open=hi_open)


def _text(value: str, what: str) -> str:
    """Command-line text as valid Unicode: invalid UTF-8 bytes become U+FFFD, and we say so."""
    from runtime.tokenizer import repair_text

    text, replaced = repair_text(value)
    if replaced:
        log.warning("%s had bytes that are not UTF-8; they were replaced by U+FFFD", what)
    return text


def _quant_settings(args):
    from export.quant import QuantSettings

    return QuantSettings(
        precision=args.precision,
        block_size=args.block_size,
        symmetric=args.symmetric,
        gguf_blocks=not args.no_gguf_blocks,
        head_bits=args.head_bits,
        embedding=not args.float_embedding,
        keep=tuple(args.keep),
        provider=args.for_provider,
        accuracy_level=args.accuracy_level,
        fp16_activations=args.fp16_activations,
        kernel=args.kernel,
    )


def _export(args) -> int:
    from export.pipeline import export_model

    export_model(
        args.source,
        args.out_dir,
        target=args.target,
        precision=args.precision,
        force=args.force,
        verify=not args.no_verify,
        progress=lambda m: print(m, flush=True),
        quant=_quant_settings(args) if args.precision != "fp32" else None,
    )
    print(f"wrote {args.out_dir}")
    return 0


def _quantize(args) -> int:
    from export.quant import quantize_folder

    quantize_folder(
        args.in_dir,
        args.out_dir,
        _quant_settings(args),
        force=args.force,
        verify=not args.no_verify,
        progress=lambda m: print(m, flush=True),
    )
    print(f"wrote {args.out_dir}")
    return 0


def _hf_folder(args) -> int:
    from export.hf_folder import write_source
    from export.weights import load_source

    write_source(load_source(args.source), args.out_dir, force=args.force)
    print(f"wrote {args.out_dir}")
    return 0


def _table(args) -> int:
    from export.report import quality_table

    print(quality_table(args.model_dirs))
    return 0


def _bench(args) -> int:
    from runtime.bench import SWEEP, PeerError, bench, chart, table

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
    )
    print(table(data))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        chart(data, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    if args.markdown:
        from runtime.bench import report_markdown

        command = "llamaonnx " + shlex.join(args.argv)
        png = None
        if args.png:
            png = os.path.relpath(args.png.absolute(), args.markdown.absolute().parent)
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.markdown.with_suffix(".tmp")
        tmp.write_text(report_markdown(data, command, png))
        tmp.replace(args.markdown)
        print(f"wrote {args.markdown}", file=sys.stderr)
    failed = [r for r in data["results"] if r.get("error")]
    if failed:  # after the table and files: what did run is kept, and the exit says what did not
        raise PeerError(
            "; ".join(f"{r['name']} could not run: {r['error']}" for r in failed)
            + ". Install the peer (make bench) or leave its --peer / --genai-dir out"
        )
    return 0


def _app(args) -> int:
    from app.server import serve

    return serve(args)


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    q = p.add_argument_group("quantization (int4, int8, fp16)")
    q.add_argument(
        "--block-size", type=_int(16, 256), default=32, help="MatMulNBits block: 16-256, 2^n"
    )
    q.add_argument(
        "--symmetric", action="store_true", help="symmetric blocks (default: zero points)"
    )
    q.add_argument(
        "--no-gguf-blocks",
        action="store_true",
        help="quantize the float weights even where the GGUF source has Q4_0/Q4_1/Q8_0 blocks",
    )
    q.add_argument(
        "--head-bits",
        type=int,
        choices=(4, 8),
        default=8,
        help="bits of the LM head and embedding (4 | 8)",
    )
    q.add_argument(
        "--float-embedding", action="store_true", help="keep the token embedding in float"
    )
    q.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep matching modules in float, e.g. 'layers.0.*' or 'output' (repeatable)",
    )
    q.add_argument(
        "--for-provider",
        default="cpu",
        choices=("cpu", "cuda"),
        help="accuracy level: cpu = int8 compute (4), cuda = 0",
    )
    q.add_argument(
        "--accuracy-level",
        type=int,
        choices=range(5),
        default=None,
        help="MatMulNBits accuracy level 0-4 (default: the provider's; 0 computes in float, "
        "4 with int8 activations, CPU's fast path)",
    )
    q.add_argument(
        "--fp16-activations", action="store_true", help="int4/int8 with fp16 activations (CUDA)"
    )
    q.add_argument(
        "--kernel",
        default="auto",
        choices=("auto", "native", "nbits"),
        help="int4 on CPU at accuracy level 4: llamaonnx's own kernel (native: reads Q4_1 blocks "
        "as they are, about twice MatMulNBits' decode speed; needs runtime/native built) or "
        "onnxruntime's MatMulNBits (nbits: runs on any onnxruntime); auto: native where it "
        "applies and is built",
    )


def _verify(args) -> int:
    from export.verify import check, verify_folder
    from runtime.files import update_file

    providers = tuple(dict.fromkeys(args.provider)) if args.provider else None
    report = verify_folder(args.model_dir, providers=providers)
    # the new report replaces the old one, and its checksum in llamaonnx.json, nothing else
    update_file(Path(args.model_dir), "report.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    check(report)
    return 0


def _generation_config(args):
    from runtime.generator import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
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
    text = _text(args.prompt, "the prompt")
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
            line = _text(input("> "), "that line").strip()
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamaonnx", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="GGUF / Hugging Face folder → verified ONNX model folder")
    e.add_argument(
        "source", nargs="?", default=None, help="GGUF file or HF folder (default: bundled SmolLM2)"
    )
    e.add_argument("out_dir", type=Path)
    e.add_argument("--target", default="ort", help="portable | onnx23 | ort (default)")
    e.add_argument("--precision", default="fp32", help="fp32 (default) | int4 | int8 | fp16")
    e.add_argument("--force", action="store_true", help="replace an existing output folder")
    e.add_argument("--no-verify", action="store_true", help="skip the parity check")
    _add_quant_args(e)
    e.set_defaults(fn=_export)

    q = sub.add_parser("quantize", help="fp32 model folder → int4 / int8 / fp16 model folder")
    q.add_argument("in_dir", type=Path)
    q.add_argument("out_dir", type=Path)
    q.add_argument("--precision", required=True, help="int4 | int8 | fp16")
    q.add_argument("--force", action="store_true", help="replace an existing output folder")
    q.add_argument("--no-verify", action="store_true", help="skip the parity check")
    _add_quant_args(q)
    q.set_defaults(fn=_quantize)

    v = sub.add_parser("verify", help="compare a model folder with the PyTorch reference")
    v.add_argument("model_dir", type=Path)
    v.add_argument(
        "--provider",
        action="append",
        choices=("cpu", "cuda"),
        help="check on this provider (repeatable; default: every provider present)",
    )
    v.set_defaults(fn=_verify)

    h = sub.add_parser(
        "hf-folder", help="a source (default: bundled SmolLM2) as a float32 Hugging Face folder"
    )
    h.add_argument("source", nargs="?", default=None)
    h.add_argument("out_dir", type=Path)
    h.add_argument(
        "--force", action="store_true", help="replace a folder that hf-folder wrote before"
    )
    h.set_defaults(fn=_hf_folder)

    t = sub.add_parser(
        "table", help="markdown table of model folders' verification reports (size, quality)"
    )
    t.add_argument("model_dirs", type=Path, nargs="+")
    t.set_defaults(fn=_table)

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
    b.add_argument("--prompt-tokens", type=_int(1), default=128, help="≥ 1, within the context")
    b.add_argument("--new-tokens", type=_int(2), default=128, help="≥ 2 (decode needs two)")
    b.add_argument("--runs", type=_int(1, 1000), default=10, help="1-1000")
    b.add_argument("--warmup", type=_int(0, 100), default=1, help="0-100")
    b.add_argument("--threads", type=_int(1), default=2, help="1 to 4× the core count")
    b.add_argument(
        "--provider",
        default="cpu",
        choices=("cpu", "cuda", "cuda-graph"),
        help="cuda-graph: CUDA with decode captured as a CUDA graph (ort folders)",
    )
    b.add_argument("--sweep", action="store_true", help="decode speed at context 128 to 4096")
    b.add_argument(
        "--sweep-runs", type=_int(1, 100), default=3, help="runs per sweep context (median)"
    )
    b.add_argument("--skip-checksums", action="store_true", help="open folders unchecked")
    b.add_argument("--json", type=Path, default=None)
    b.add_argument("--png", type=Path, default=None)
    b.add_argument("--markdown", type=Path, default=None, help="a report like docs/benchmarks.md")
    b.set_defaults(fn=_bench)

    a = sub.add_parser("app", help="the Gradio chat in the browser (127.0.0.1 by default)")
    from app.server import add_arguments

    add_arguments(a)
    a.set_defaults(fn=_app)

    for name, fn, helptext in (
        ("generate", _generate, "stream a reply to one prompt"),
        ("chat", _chat, "interactive multi-turn chat"),
    ):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("model_dir", type=Path)
        if name == "generate":
            g.add_argument("prompt")
            g.add_argument("--raw", action="store_true", help="no chat template: complete the text")
        g.add_argument("--max-new-tokens", type=_int(1), default=256, help="≥ 1")
        g.add_argument("--temperature", type=_float(0, 100), default=0.0, help="0 (greedy) to 100")
        g.add_argument("--top-k", type=_int(0), default=0, help="≥ 0 (0: off)")
        g.add_argument("--top-p", type=_float(0, 1, lo_open=True), default=1.0, help="(0, 1]")
        g.add_argument(
            "--repetition-penalty", type=_float(0, lo_open=True), default=1.0, help="> 0"
        )
        g.add_argument("--seed", type=_int(0, 2**63 - 1), default=None)
        g.add_argument("--provider", default="auto", choices=("cpu", "cuda", "auto"))
        g.add_argument(
            "--threads", type=_int(1), default=None, help="1 to 4× the core count (default: all)"
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
        g.add_argument(
            "--cuda-graph", action="store_true", help="capture decode as a CUDA graph (ort, cuda)"
        )
        g.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    name = f"llamaonnx {args.command}"
    stop = None
    try:
        with signals_raise() as stop:  # SIGTERM/SIGHUP unwind like Ctrl-C: temporary files go
            return args.fn(args)
    except LlamaonnxError as e:  # the user's input or files: say what and what is allowed
        print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine: a full disk, a permission, a missing file
        print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"{name}: {e}; nothing half-written was left behind", file=sys.stderr)
        return 128 + e.signum
    except Exception:  # a bug in llamaonnx: the traceback is for its report
        if stop is not None and stop.signum:  # a library turned our Terminated into its own
            print(
                f"{name}: stopped by signal {stop.signum}; nothing half-written was left behind",
                file=sys.stderr,
            )
            return 128 + stop.signum
        traceback.print_exc()
        print(f"{name}: internal error (a bug in llamaonnx; please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
