"""The export side's subcommands: `export`, `quantize`, `verify`, and `hf-folder`,
contributed to the `llamaonnx` dispatcher (runtime/cli.py) through the `llamaonnx.commands` entry
point. Registering imports nothing heavy; each command imports torch, onnx or onnxscript when it
runs, and says which extra to install where they are missing (an edge install)."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from runtime.cli import int_arg
from runtime.errors import LlamaonnxError

EXPORT_MODULES = ("torch", "onnx", "onnxscript", "gguf", "safetensors")


class MissingExtraError(LlamaonnxError, RuntimeError):
    """A command needs packages of an extra this install lacks."""


def _needs_export_extra(fn):
    @functools.wraps(fn)
    def run(args) -> int:
        try:
            return fn(args)
        except ModuleNotFoundError as e:
            if e.name not in EXPORT_MODULES:
                raise
            raise MissingExtraError(
                f"llamaonnx {args.command} needs {e.name}, which this install lacks: "
                "pip install 'llamaonnx[export]' (generate, chat and bench need only the runtime)"
            ) from None

    return run


def register(sub) -> None:
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
    e.set_defaults(fn=_needs_export_extra(_export))

    q = sub.add_parser("quantize", help="fp32 model folder → int4 / int8 / fp16 model folder")
    q.add_argument("in_dir", type=Path)
    q.add_argument("out_dir", type=Path)
    q.add_argument("--precision", required=True, help="int4 | int8 | fp16")
    q.add_argument("--force", action="store_true", help="replace an existing output folder")
    q.add_argument("--no-verify", action="store_true", help="skip the parity check")
    _add_quant_args(q)
    q.set_defaults(fn=_needs_export_extra(_quantize))

    v = sub.add_parser("verify", help="compare a model folder with the PyTorch reference")
    v.add_argument("model_dir", type=Path)
    v.add_argument(
        "--provider",
        action="append",
        choices=("cpu", "cuda"),
        help="check on this provider (repeatable; default: every provider present)",
    )
    v.set_defaults(fn=_needs_export_extra(_verify))

    h = sub.add_parser(
        "hf-folder", help="a source (default: bundled SmolLM2) as a float32 Hugging Face folder"
    )
    h.add_argument("source", nargs="?", default=None)
    h.add_argument("out_dir", type=Path)
    h.add_argument(
        "--force", action="store_true", help="replace a folder that hf-folder wrote before"
    )
    h.set_defaults(fn=_needs_export_extra(_hf_folder))


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
        precise=tuple(args.precise),
        provider=args.for_provider,
        accuracy_level=args.accuracy_level,
        fp16_activations=args.fp16_activations,
        kernel=args.kernel,
        kv_cache=args.kv_cache,
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
    from export.sources import load_source
    from export.sources.hf_folder import write_source

    write_source(load_source(args.source), args.out_dir, force=args.force)
    print(f"wrote {args.out_dir}")
    return 0


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    q = p.add_argument_group("quantization (int4, int8, fp16)")
    q.add_argument(
        "--block-size", type=int_arg(16, 256), default=32, help="MatMulNBits block: 16-256, 2^n"
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
        help="keep matching modules in float, e.g. 'layers.0.*', 'layers.-1.*' (the last "
        "layer) or 'output' (repeatable)",
    )
    q.add_argument(
        "--precise",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run matching projections' activations in two int8 digits on llamaonnx's kernels: "
        "float activations' quality for twice their integer work, e.g. '*' (all), 'output', "
        "'layers.*.feed_forward.w2' (the graph's names: layers.N.attention.qkv / .wo, "
        "layers.N.feed_forward.w13 / .w2, output; layers.-1 is the last layer; repeatable, "
        "the last match wins); "
        "PATTERN=B: the second digit on each activation row's B blocks of largest scale only "
        "(most of the rounding error, for B/nb of the extra work), e.g. '*=2'",
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
        "--fp16-activations",
        action="store_true",
        help="int4/int8 with fp16 activations and cache (always so with --for-provider cuda)",
    )
    q.add_argument(
        "--kernel",
        default="auto",
        choices=("auto", "native", "nbits"),
        help="int4/int8 on CPU at accuracy level 4: llamaonnx's own kernels (native: read GGUF "
        "blocks as they are, Q4_0 to Q8_0 and the K-quants, about twice MatMulNBits' decode "
        "speed; needs runtime/native built) or onnxruntime's MatMulNBits (nbits: runs on any "
        "onnxruntime); auto: native where it applies and is built",
    )
    q.add_argument(
        "--kv-cache",
        default="auto",
        choices=("auto", "float32", "float16"),
        help="the KV cache's type with llamaonnx's CPU attention (int4/int8, native kernel): "
        "float16 (llama.cpp's default f16 cache) halves its memory and what a decode step reads; "
        "auto: float16 where that attention runs, else float32",
    )


def _verify(args) -> int:
    from export.verify.parity import check, verify_folder
    from runtime.folder import update_file

    providers = tuple(dict.fromkeys(args.provider)) if args.provider else None
    report = verify_folder(args.model_dir, providers=providers)
    # the new report replaces the old one, and its checksum in llamaonnx.json, nothing else
    update_file(Path(args.model_dir), "report.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    check(report)
    return 0
