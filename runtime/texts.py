"""The texts that ship with the runtime (runtime/data/), all written for the project: the
evaluation text that `verify` scores perplexity on and that `bench` cuts its prompts from
(prose), and two of other kinds that quality tables score beside it (a chat, Python code): a
quantization can hold on one kind of text and fail on another."""

from __future__ import annotations

import importlib.resources


def eval_text() -> str:
    return importlib.resources.files("runtime").joinpath("data/eval.txt").read_text()


KINDS = {"prose": "eval.txt", "chat": "chat.txt", "code": "code.txt"}


def eval_texts() -> dict[str, str]:
    """kind → text, for prose, chat and code."""
    data = importlib.resources.files("runtime").joinpath("data")
    return {kind: data.joinpath(name).read_text() for kind, name in KINDS.items()}
