"""The app's subcommand, `llamaonnx app`, contributed to the dispatcher (runtime/cli.py)."""

from __future__ import annotations


def register(sub) -> None:
    from app.server import add_arguments

    a = sub.add_parser("app", help="the Gradio chat in the browser (127.0.0.1 by default)")
    add_arguments(a)
    a.set_defaults(fn=_app)
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (127.0.0.1:8000)")
    _serve_arguments(s)
    s.set_defaults(fn=_serve)


def _app(args) -> int:
    from app.server import serve

    return serve(args)


def _serve(args) -> int:
    from runtime.errors import OptionError

    if not args.ray:
        if args.replicas != 1 or args.max_replicas or args.ray_address:
            raise OptionError("--replicas, --max-replicas and --ray-address need --ray")
        from app.openai_server import serve

        return serve(args)
    try:
        import ray  # noqa: F401
    except ImportError:
        raise OptionError(
            "--ray needs Ray Serve: pip install 'llamaonnx[ray]' (or pip install 'ray[serve]')"
        ) from None
    from app.ray_serve import serve

    return serve(args)


def _serve_arguments(p) -> None:
    from pathlib import Path

    from runtime.options import argparse_type, integer, threads

    p.add_argument("model_dirs", nargs="+", type=Path, help="model folders (target ort)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    p.add_argument("--port", type=argparse_type(integer, 1, 65535), default=8000)
    p.add_argument("--slots", type=argparse_type(integer, 1, 256), default=8,
                   help="requests decoded together per model")  # fmt: skip
    p.add_argument("--queue-size", type=argparse_type(integer, 1, 100_000),
                   default=64, help="requests waiting at most; beyond, 429")  # fmt: skip
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    p.add_argument("--cors", action="append", default=None, metavar="ORIGIN",
                   help="allow this browser origin (repeatable); none by default")  # fmt: skip
    p.add_argument(
        "--threads",
        type=argparse_type(lambda name, text: threads(integer(name, text, 1))),
        default=None,
        help="1 to 4× the core count (default: all)",
    )
    r = p.add_argument_group("scale-out on Ray Serve (the `ray` extra)")
    r.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: one deployment per model folder")  # fmt: skip
    r.add_argument("--replicas", type=argparse_type(integer, 1, 1024), default=1,
                   help="replicas per model, each its own engine (with --ray)")  # fmt: skip
    r.add_argument("--max-replicas", type=argparse_type(integer, 1, 1024), default=None,
                   help="let Ray's autoscaler grow each model to this (with --ray)")  # fmt: skip
    r.add_argument("--ray-address", default=None,
                   help="a Ray cluster to join (default: start a local Ray)")  # fmt: skip
