"""A model's chat template, rendered as transformers renders it, under a bound on work and size.

The template comes with the model folder, so it is untrusted code. Jinja's immutable sandbox
already refuses attribute tricks and caps each `range` at 100,000 items, but not the total work:
two nested loops over `range(100000)` run for hours, and a string doubled in a loop fills the
memory. Here rendering also stops, with a ChatTemplateError naming the template, when
- it runs longer than `max_seconds` (counted by a trace function on the template's own frames,
  which sees every loop iteration of the compiled template; a normal chat renders in ~1 ms);
- its output, or any string or list it builds by `+`, `*`, `~` or `**`, passes `max_chars`.
Every other error of the template (a syntax error, an undefined name, its own
`raise_exception(...)`) is a ChatTemplateError naming the template too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sized

from runtime.errors import ChatTemplateError

MAX_SECONDS = 2.0
MAX_CHARS = 16 * 2**20
_CHECK_EVERY = 256  # trace events between clock readings
_TEMPLATE_FILE = "<template>"  # the file name Jinja gives code compiled from a string


class _Stop(Exception):
    """Raised inside the template to end it; turned into a ChatTemplateError by `render`."""


def _make_environment(max_chars: int):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, int) and isinstance(right, int):
                if right > 0 and abs(left) > 1 and abs(left).bit_length() * right > 4096:
                    raise _Stop(f"{left} ** {right} is too large a number")
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_size(len(seq) * n, max_chars)
            if operator == "+" and isinstance(left, Sized) and isinstance(right, Sized):
                _check_size(len(left) + len(right), max_chars)
            return super().call_binop(context, operator, left, right)

    return BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)


def _check_size(n: int, max_chars: int) -> None:
    if n > max_chars:
        raise _Stop(f"it builds a value of {n:,} items; at most {max_chars:,} are allowed")


def _raise_exception(message):
    """transformers' templates call this to refuse a conversation (roles out of order, ...)."""
    raise _Stop(f"it refused the conversation: {message}")


def _strftime_now(fmt):
    return time.strftime(fmt)


class ChatTemplate:
    def __init__(
        self,
        source: str,
        origin: str = "the chat template",
        max_seconds: float = MAX_SECONDS,
        max_chars: int = MAX_CHARS,
    ):
        from jinja2 import TemplateError

        self.source, self.origin = source, origin
        self.max_seconds, self.max_chars = max_seconds, max_chars
        env = _make_environment(max_chars)
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"{origin} does not compile: {e}") from None
        # `a ~ b` compiles to a call of these module globals: bound them like `+`
        namespace = self._template.root_render_func.__globals__
        for name in ("str_join", "markup_join"):
            namespace[name] = self._bounded_join(namespace[name])

    def _bounded_join(self, join):
        def bounded(seq):
            out = join(seq)
            _check_size(len(out), self.max_chars)
            return out

        return bounded

    def render(self, **context) -> str:
        deadline = time.monotonic() + self.max_seconds
        events = 0

        def local(frame, event, arg):
            nonlocal events
            events += 1
            if events % _CHECK_EVERY == 0 and time.monotonic() > deadline:
                raise _Stop(f"it ran for more than {self.max_seconds:g} s")
            return local

        def on_call(frame, event, arg):
            return local if frame.f_code.co_filename == _TEMPLATE_FILE else None

        pieces, size = [], 0
        previous = sys.gettrace()
        sys.settrace(on_call)
        try:
            for piece in self._template.generate(**context):
                size += len(piece)
                _check_size(size, self.max_chars)
                pieces.append(piece)
        except _Stop as e:
            raise ChatTemplateError(f"{self.origin} was stopped: {e}") from None
        except RecursionError:
            raise ChatTemplateError(f"{self.origin} recursed too deeply") from None
        except Exception as e:  # the template is the user's code: any failure is its error
            raise ChatTemplateError(
                f"{self.origin} failed to render: {type(e).__name__}: {e}"
            ) from None
        finally:
            sys.settrace(previous)
        return "".join(pieces)
