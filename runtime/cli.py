"""The `llamaonnx` command: a thin dispatcher on the ground floor, present in every install.

Each package contributes its own subcommands through the entry-point group `llamaonnx.commands`
(pyproject.toml): a `register(subparsers)` function that adds parsers and imports nothing heavy,
so `llamaonnx --help` is instant and never imports torch. This module names no package above the
runtime; the runtime's own subcommands (generate, chat, bench) are in runtime/commands.py.

Errors: everything a user can cause derives from LlamaonnxError and ends with its message and
exit code 2 (an OSError too: a full disk, a permission); SIGTERM and SIGHUP unwind like Ctrl-C so
that temporary files go (128 + the signal); anything else is a bug in llamaonnx, printed with its
traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from runtime import options, plugins
from runtime.errors import LlamaonnxError, Terminated
from runtime.files import signals_raise

log = logging.getLogger("llamaonnx")
COMMANDS_GROUP = "llamaonnx.commands"
# the ground floor's own, found even where the package is not installed (python -m runtime.cli)
BUILTIN = {"runtime": "runtime.commands:register"}


# -- argument types shared by every package's subcommands --
def int_arg(lo: int | None = None, hi: int | None = None):
    return options.argparse_type(options.integer, lo, hi)


def float_arg(lo=None, hi=None, lo_open=False, hi_open=False):
    return options.argparse_type(options.number, lo, hi, lo_open=lo_open, hi_open=hi_open)


def text_arg(value: str, what: str) -> str:
    """Command-line text as valid Unicode: invalid UTF-8 bytes become U+FFFD, and we say so."""
    from runtime.tokenizer import repair_text

    text, replaced = repair_text(value)
    if replaced:
        log.warning("%s had bytes that are not UTF-8; they were replaced by U+FFFD", what)
    return text


# -- the dispatcher ------------------------------------------------------------------------------
def _contributions() -> list[tuple[str, str]]:
    """(name, "module:function") of every package's `register`, the runtime's first."""
    found = {**BUILTIN, **plugins.declared(COMMANDS_GROUP)}
    return sorted(found.items(), key=lambda kv: kv[0] != "runtime")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamaonnx",
        description="Llama-family models from PyTorch to verified ONNX, run with onnxruntime.",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for name, target in _contributions():
        try:
            register = plugins.load(target)
        except ImportError as e:  # a package of this install that cannot load: say, go on
            log.warning("the %s commands are unavailable: %s", name, e)
            continue
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    name = f"llamaonnx {args.command}"
    left = "nothing half-written was left behind"
    stop = None
    try:
        with signals_raise() as stop:
            return args.fn(args)
    except (LlamaonnxError, OSError) as e:  # the user's input, files or machine
        print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; {left}", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"{name}: {e}; {left}", file=sys.stderr)
        return 128 + e.signum
    except Exception:
        if stop is not None and stop.signum:  # a library turned our Terminated into its own
            print(f"{name}: stopped by signal {stop.signum}; {left}", file=sys.stderr)
            return 128 + stop.signum
        traceback.print_exc()
        print(f"{name}: internal error (a bug in llamaonnx; please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
