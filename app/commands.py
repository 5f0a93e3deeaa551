"""The app's subcommand, `llamaonnx app`, contributed to the dispatcher (runtime/cli.py)."""

from __future__ import annotations


def register(sub) -> None:
    from app.server import add_arguments

    a = sub.add_parser("app", help="the Gradio chat in the browser (127.0.0.1 by default)")
    add_arguments(a)
    a.set_defaults(fn=_app)


def _app(args) -> int:
    from app.server import serve

    return serve(args)
